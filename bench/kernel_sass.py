"""Cost of every kernel instance read from its machine code, without a GPU.

    python bench/kernel_sass.py [--arch sm_80 --arch sm_90] [--json]

Compiles each kernel instance with NVRTC (``--ptxas-options=-v`` for registers and spills), disassembles
the CUBIN with ``nvdisasm`` (PyPI wheel ``nvidia-cuda-nvdisasm``, found inside site-packages or on PATH),
finds the steady-state loop (a backward branch and the instructions between its target and it; the loop
with the most multiply-add instructions) and prints per instance: registers, spill bytes (stores plus
loads), static instructions in that loop, weights one lane processes per iteration, and their ratio,
instructions per weight. Every SASS instruction is issued for all 32 lanes of a warp, so instructions
per weight is loop instructions over the weights each lane handles per iteration.
``--json`` prints a list of rows with the keys
``kernel, arch, tokens, slices, registers, spills, loop_instructions, weights_per_iteration,
instructions_per_weight``. Runs from a plain checkout (the repository root goes first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout: mobiquant is not installed
    sys.path.insert(0, str(REPO_ROOT))

from mobiquant.kernels import _compile  # noqa: E402

ARCHS = ("sm_80", "sm_90")
ROW_KEYS = (
    "kernel", "arch", "tokens", "slices", "registers", "spills", "loop_instructions", "weights_per_iteration",
    "instructions_per_weight",
)  # fmt: skip
# Decode instances: n8 serves 1-8 tokens, n16 9-16 (the tokens are the mma's N); g128 takes one affine pair
# per 128-column tile (group sizes that are multiples of 128), g32 one per 32-column span.
DECODE_TOKEN_TILES = (8, 16)
DECODE_GROUP_MODES = (128, 32)
# One mma.m16n8k16 multiplies 16 x 16 weights by 8 tokens: 8 weights per lane and 8-token n-tile.
WEIGHTS_PER_LANE_PER_MMA = 16 * 16 // 32
# Per lane and loop iteration of the prefill kernel: a BN = 128 rows x BK = 32 columns tile, 256 threads.
PREFILL_WEIGHTS_PER_LANE = 128 * 32 // 256
PREFILL_TILE_TOKENS = 128

# The multiply-add instructions that do a GEMV's or GEMM's arithmetic.
MATH_OPCODES = {"HMMA", "HGMMA", "IMMA", "HFMA2", "FFMA", "FMUL", "HMUL2", "HADD2", "FADD"}
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Instance:
    """One kernel as compiled for measurement: its module, extra NVRTC options and how many weights one
    lane processes per iteration of its steady-state loop (a function of that loop's instructions)."""

    kernel: str
    module: str
    tokens: int
    slices: int | str
    options: tuple[str, ...]
    weights_per_lane: Callable[[list[str]], int]


@dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int  # index of the backward branch
    opcodes: tuple[str, ...]


def instances() -> list[Instance]:
    """Every kernel instance the library ships, as rows of the table."""
    found = []
    for dtype in ("f16", "bf16"):
        for group in DECODE_GROUP_MODES:
            for tokens in DECODE_TOKEN_TILES:
                for slices in range(1, 5):
                    # The kernel holds one loop per slice count; this build keeps only the one measured.
                    found.append(
                        Instance(f"mbq_decode_{dtype}_n{tokens}_g{group}", "decode", tokens, slices,
                                 (f"-DMBQ_ONLY_LEVEL={slices}",), functools.partial(mma_weights, tokens // 8))
                    )  # fmt: skip
        found.append(
            Instance(f"mbq_prefill_{dtype}", "prefill", PREFILL_TILE_TOKENS, "1-4", (),
                     lambda _opcodes: PREFILL_WEIGHTS_PER_LANE)
        )  # fmt: skip
    return found


def mma_weights(token_tiles: int, opcodes: list[str]) -> int:
    """Weights per lane of a loop whose mma instructions each cover 16 x 16 weights for one 8-token tile."""
    mmas = sum(op.startswith("HMMA") for op in opcodes)
    if mmas % token_tiles:
        raise ValueError(f"{mmas} mma instructions do not split into {token_tiles} token tiles")
    return WEIGHTS_PER_LANE_PER_MMA * mmas // token_tiles


def tool_path(name: str) -> str:
    """``name`` (nvdisasm, cuobjdump) from the PyPI wheels in site-packages, else from PATH."""
    for entry in map(Path, sys.path):
        for candidate in sorted(entry.glob(f"nvidia/*/bin/{name}")):
            if candidate.is_file():
                return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-{name} (the 'cuda' or 'dev' extra)")
    return found


@functools.lru_cache(maxsize=8)
def disassembly(cubin: bytes) -> tuple[str, ...]:
    """``nvdisasm -c`` of a CUBIN, as lines."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "module.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool_path("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True)
    return tuple(text.stdout.splitlines())


def disassemble(cubin: bytes, function: str) -> list[str]:
    """The SASS lines of one function of ``cubin``: its ``.text.<function>`` section in ``nvdisasm -c``."""
    section = re.compile(r"^\s*\.section\s+\.text\.(\w+),")
    lines, inside = [], False
    for line in disassembly(cubin):
        if match := section.match(line):
            inside = match.group(1) == function
        elif inside:
            lines.append(line)
    if not lines:
        raise ValueError(f"{function} is not in the CUBIN")
    return lines


def parse_sass(lines: list[str]) -> tuple[list[str], list[tuple[int, str | None]]]:
    """Opcodes in program order, and per instruction (its index, the label it branches to if a BRA)."""
    opcodes: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str | None]] = []
    for line in lines:
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        instruction = INSTRUCTION.match(line)
        if not instruction:
            continue
        opcode = instruction.group(3)
        target = BRANCH_TARGET.search(line) if opcode.startswith("BRA") else None
        branches.append((len(opcodes), target.group(1) if target else None))
        opcodes.append(opcode)
    resolved = [(index, str(labels[target])) if target in labels else (index, None) for index, target in branches]
    return opcodes, resolved


def loops(lines: list[str]) -> list[Loop]:
    """Every loop of the function: a branch to a label at or before it."""
    opcodes, branches = parse_sass(lines)
    found = []
    for index, target in branches:
        if target is not None and int(target) <= index:
            start = int(target)
            found.append(Loop(start, index, tuple(opcodes[start : index + 1])))
    return found


def math_instructions(opcodes: tuple[str, ...] | list[str]) -> int:
    return sum(op.split(".")[0] in MATH_OPCODES for op in opcodes)


def steady_state_loop(lines: list[str]) -> Loop:
    """The loop with the most multiply-add instructions (tensor-core or not); of equals, the shortest: the
    loop that does the kernel's work, with any loops nested in it (counted statically, once each)."""
    found = loops(lines)
    if not found:
        raise ValueError("no loop in this function")
    return max(found, key=lambda loop: (math_instructions(loop.opcodes), -len(loop.opcodes)))


def ptxas_resources(log: str, arch: str) -> dict[str, tuple[int, int]]:
    """Per function: (registers, spill bytes stored + loaded) from NVRTC's --ptxas-options=-v log."""
    resources: dict[str, tuple[int, int]] = {}
    function, spills = None, 0
    for line in log.splitlines():
        if match := PTXAS_FUNCTION.search(line):
            function = match.group(1) if match.group(2) == arch else None
        elif (match := PTXAS_SPILLS.search(line)) and function:
            spills = int(match.group(1)) + int(match.group(2))
        elif (match := PTXAS_REGISTERS.search(line)) and function:
            resources[function] = (int(match.group(1)), spills)
    return resources


def measure(instance: Instance, arch: str) -> dict[str, object]:
    source, headers = _compile.read_sources(instance.module)
    options = (*_compile.BASE_OPTIONS, "--ptxas-options=-v", *instance.options)
    cubin, result = _compile.compile_source(instance.module, source, arch, headers, options)
    registers, spills = ptxas_resources(result.log, arch)[instance.kernel]
    loop = steady_state_loop(disassemble(cubin, instance.kernel))
    instructions = len([op for op in loop.opcodes if op != "NOP"])
    weights = instance.weights_per_lane(list(loop.opcodes))
    return {
        "kernel": instance.kernel,
        "arch": arch,
        "tokens": instance.tokens,
        "slices": instance.slices,
        "registers": registers,
        "spills": spills,
        "loop_instructions": instructions,
        "weights_per_iteration": weights,
        "instructions_per_weight": round(instructions / weights, 3),
    }


def table(rows: list[dict[str, object]]) -> str:
    cells = [list(ROW_KEYS)] + [[str(row[key]) for key in ROW_KEYS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(ROW_KEYS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help=f"target (repeatable; default: {' '.join(ARCHS)})")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = parser.parse_args(argv)
    archs = args.arch or ARCHS
    for arch in archs:
        try:
            _compile.check_arch(arch)
        except _compile.UnsupportedArchError as error:
            parser.error(str(error))
    try:
        rows = [measure(instance, arch) for arch in archs for instance in instances()]
    except (FileNotFoundError, _compile.NvrtcUnavailableError) as error:  # no nvdisasm, no NVRTC
        print(f"kernel_sass: {error}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
