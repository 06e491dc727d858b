"""Scale: memory bounded by one block, and the cost of one block projected to a whole release.

``memory``: two random Llamas that differ only in depth are quantized by ``mobiquant quantize`` (each in its
own process); the extra peak RSS of the deeper one over its extra float32 weight bytes is the share of the
model a run holds. A run that loads the whole model in float32 (what the pipeline did before) gives 1 or
more; the target is at most 0.4. The same ratio for a plain ``from_pretrained`` in float32 is printed beside.

``cost``: one block of a random model of a given shape is calibrated on the current device (phases timed);
the block time and peak memory are projected to the ``compress/llama`` settings (128 x 2048 tokens, 2 + 20
epochs) for the whole model. ``paper`` gives the same projection from the FLOPs of the calibration steps
and a device's peak throughput at a stated utilisation, for when no GPU is at hand.

    python bench/scale.py memory [--hidden 1024 --layers 2,10]
    python bench/scale.py cost --shapes smollm2,llama-3.2-1b [--device auto --samples 4 --seqlen 256]
    python bench/scale.py paper
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.pipeline.tiny import build_tiny_llama  # noqa: E402

# Block shapes of the releases the pipeline targets (Llama family: hidden, MLP width, heads, KV heads, blocks).
SHAPES = {
    "smollm2": {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "blocks": 30},
    "llama-3.2-1b": {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "blocks": 16},
    "llama-3-8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "blocks": 32},
}
# The compress/llama deployment (prefect.yaml).
TARGET = {"samples": 128, "seqlen": 2048, "epochs_stage1": 2, "epochs_stage2": 20, "num_slices": 4, "batch_size": 4}
# Dense peak throughput of one H100 SXM (TFLOP/s) by matrix precision, from NVIDIA's datasheet.
H100_PEAK = {"float32": 67.0, "tf32": 495.0, "bfloat16": 989.0}
PAPER_UTILISATION = 0.4


# --------------------------------------------------------------------------------------------------------------------
# memory


def peak_rss_mb(argv: list[str], env: dict[str, str]) -> float:
    """Peak resident memory (MB) of a child process, from the kernel's accounting of that process alone."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def linear_weight_bytes(hidden: int, layers: int) -> int:
    """float32 bytes of the quantized linears of build_tiny_llama's blocks (4 heads, 2 KV heads, MLP 2x)."""
    kv = hidden // 2
    per_block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * 2 * hidden
    return 4 * per_block * layers


def memory(args: argparse.Namespace) -> list[dict]:
    shallow, deep = args.layers
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mobiquant-scale-") as tmp:
        peaks: dict[str, dict[int, float]] = {"mobiquant quantize": {}, "from_pretrained float32 + forward": {}}
        for layers in (shallow, deep):
            folder = build_tiny_llama(Path(tmp) / f"llama-{layers}" / "model", layers=layers, hidden=args.hidden)
            text = str(folder.parent / "train.txt")
            quantize = [sys.executable, "-c", "import sys; from mobiquant.cli import main; sys.exit(main())",
                        "quantize", str(folder), "-o", str(Path(tmp) / f"out-{layers}"), "--data", text,
                        "--samples", "4", "--seqlen", "64", "--epochs", "1,1", "--group-size", "64",
                        "--device", "cpu", "--threads", str(args.threads)]
            peaks["mobiquant quantize"][layers] = peak_rss_mb(quantize, env)
            whole = [sys.executable, "-c",
                     "import sys, torch; from transformers import AutoModelForCausalLM as M; "
                     "m = M.from_pretrained(sys.argv[1], dtype=torch.float32); "
                     "m(torch.zeros(4, 64, dtype=torch.long))", str(folder)]
            peaks["from_pretrained float32 + forward"][layers] = peak_rss_mb(whole, env)
        extra_mb = (linear_weight_bytes(args.hidden, deep) - linear_weight_bytes(args.hidden, shallow)) / 2**20
        for what, by_depth in peaks.items():
            ratio = (by_depth[deep] - by_depth[shallow]) / extra_mb
            rows.append({"run": what, "hidden": args.hidden, f"peak_mb_{shallow}_blocks": round(by_depth[shallow]),
                         f"peak_mb_{deep}_blocks": round(by_depth[deep]), "extra_fp32_weights_mb": round(extra_mb),
                         "ratio": round(ratio, 3)})
    def blocks(count: int) -> str:
        return f"{count} block{'s' if count != 1 else ''}"

    print(f"| run | peak MB, {blocks(shallow)} | peak MB, {blocks(deep)} | extra fp32 weights MB | "
          "ratio (target <= 0.4) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row[f'peak_mb_{shallow}_blocks']} | {row[f'peak_mb_{deep}_blocks']} | "
              f"{row['extra_fp32_weights_mb']} | {row['ratio']:.3f} |")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# cost


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    blocks: int

    @property
    def block_params(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate


def step_flops_per_token(shape: Shape, seqlen: int, num_slices: int) -> dict[str, float]:
    """FLOPs per token of one training step (forward and backward, about 3 forwards) by stage.

    Stage 1 runs every linear at one slice; stage 2 alternates routed steps (all K slice products, since
    every token may take every slice) with uniform steps (one product). Attention adds ``4 * seqlen * hidden``
    per token and forward, whatever the slices.
    """
    linear = 2.0 * shape.block_params
    attention = 4.0 * seqlen * shape.hidden
    stage1 = 3 * (linear + attention)
    routed = 3 * (num_slices * linear + attention)
    return {"forward": linear + attention, "stage1": stage1, "stage2": (routed + stage1) / 2}


def block_flops(shape: Shape, tokens: int, epochs1: int, epochs2: int, num_slices: int, seqlen: int) -> float:
    per = step_flops_per_token(shape, seqlen, num_slices)
    return tokens * (per["forward"] + epochs1 * per["stage1"] + epochs2 * per["stage2"])


def block_memory_gb(shape: Shape, tokens: int, seqlen: int, batch: int, num_slices: int) -> float:
    """Peak device memory of one block's calibration (float32), counted tensor by tensor."""
    params = shape.block_params
    weights = 4 * params * (2 + 3 * num_slices)  # block, frozen copy, K fake weights with two saved intermediates
    data = 2 * 4 * tokens * shape.hidden  # inputs and targets on the device, float32
    kv = shape.hidden // shape.heads * shape.kv_heads
    per_token = shape.hidden * 6 + 2 * kv + 3 * shape.intermediate  # saved activations of one layer pass
    activations = 4 * batch * seqlen * per_token * num_slices
    return (weights + data + activations) / 2**30


def cost(args: argparse.Namespace) -> list[dict]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from mobiquant.arch import architecture_for
    from mobiquant.calibration import CalibrationConfig, calibrate_block
    from mobiquant.calibration.capture import block_outputs
    from mobiquant.devices import resolve_device, set_threads

    device = resolve_device(args.device)
    set_threads(args.threads)
    rows = []
    for name in args.shapes:
        shape = Shape(**SHAPES[name])
        config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             max_position_embeddings=max(args.seqlen, 2048))
        config._attn_implementation = "sdpa"  # as from_pretrained sets it; a bare layer would fall back to eager
        torch.manual_seed(0)
        with torch.device(device):
            block = LlamaDecoderLayer(config, layer_idx=0).float().eval()
            for linear in architecture_for("llama").quantized_linears(block).values():
                torch.nn.init.normal_(linear.weight, std=0.02)
            rotary = LlamaRotaryEmbedding(config)
            hidden = torch.randn(args.samples, args.seqlen, shape.hidden)
            positions = torch.arange(args.seqlen).unsqueeze(0)
            block_kwargs = {"position_embeddings": rotary(hidden[:1], positions), "attention_mask": None,
                            "position_ids": positions, "use_cache": False}
        group_size = 128 if shape.hidden % 128 == 0 and shape.intermediate % 128 == 0 else 64
        calibration = CalibrationConfig(group_size=group_size, epochs_stage1=args.epochs[0],
                                        epochs_stage2=args.epochs[1], batch_size=min(4, args.samples),
                                        compute_dtype=args.compute_dtype)
        marks: list[tuple[str, float]] = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        inputs = hidden
        block_outputs(block, inputs[:1], block_kwargs, 1, torch.float32)  # warm-up (kernels, allocator)
        start = time.perf_counter()
        result = calibrate_block(block, inputs, block_kwargs, architecture_for("llama"), calibration,
                                 progress=False, on_progress=_recorder(marks))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        phase = _phases(marks, start)
        tokens = args.samples * args.seqlen
        target_tokens = TARGET["samples"] * TARGET["seqlen"]
        rate1 = phase["stage1"] / max(tokens * calibration.epochs_stage1, 1)
        rate2 = phase["stage2"] / max(tokens * calibration.epochs_stage2, 1)
        projected_block = (phase["prepare"] + phase["gptq codes"] + phase["router fit"]
                           + rate1 / 3 * (target_tokens - tokens)
                           + rate1 * target_tokens * TARGET["epochs_stage1"]
                           + rate2 * target_tokens * TARGET["epochs_stage2"])
        if device.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        projected_peak = peak_gb + 2 * 4 * (target_tokens - tokens) * shape.hidden / 2**30
        rows.append({
            "shape": name, "device": str(device), "compute_dtype": args.compute_dtype, "tokens": tokens,
            "epochs": list(args.epochs), "block_seconds": round(seconds, 2),
            "phases_seconds": {k: round(v, 2) for k, v in phase.items()},
            "peak_gb": round(peak_gb, 2), "projected_block_minutes": round(projected_block / 60, 2),
            "projected_model_hours": round(projected_block * shape.blocks / 3600, 2),
            "projected_peak_gb": round(projected_peak, 1), "result_tensors": len(result.state),
        })
        del block, hidden, inputs
    print(f"| shape | device | dtype | measured block s ({args.samples}x{args.seqlen}, epochs {args.epochs[0]}+"
          f"{args.epochs[1]}) | peak GB | projected block min (128x2048, 2+20) | projected model h | "
          "projected peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['device']} | {row['compute_dtype']} | {row['block_seconds']} | "
              f"{row['peak_gb']} | {row['projected_block_minutes']} | {row['projected_model_hours']} | "
              f"{row['projected_peak_gb']} |")
    return rows


def _shape_names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}")
    return names


def _int_pair(text: str) -> tuple[int, int]:
    """Two positive whole numbers ``A,B`` (``--layers``: the shallow and the deep model; ``--epochs``: stage 1, 2)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected two positive whole numbers A,B, got {text!r}")
    return int(parts[0]), int(parts[1])


def _recorder(marks: list[tuple[str, float]]) -> object:
    def record(event: dict) -> None:
        marks.append((str(event["stage"]), time.perf_counter()))

    return record


def _phases(marks: list[tuple[str, float]], start: float) -> dict[str, float]:
    """Seconds per phase from the progress events: preparation (Hessians, clip search), stage 1, the compensated
    codes, router fit, stage 2."""
    times = {"prepare": 0.0, "stage1": 0.0, "gptq codes": 0.0, "router fit": 0.0, "stage2": 0.0}
    previous = start
    for stage, at in marks:
        key = "prepare" if stage == "clip search" else stage
        times[key] += at - previous
        previous = at
    return times


def paper(_args: argparse.Namespace) -> list[dict]:
    rows = []
    tokens = TARGET["samples"] * TARGET["seqlen"]
    for name, values in SHAPES.items():
        shape = Shape(**values)
        flops = block_flops(shape, tokens, TARGET["epochs_stage1"], TARGET["epochs_stage2"], TARGET["num_slices"],
                            TARGET["seqlen"])
        row = {"shape": name, "block_pflop": round(flops / 1e15, 2), "model_pflop": round(flops * shape.blocks / 1e15),
               "block_memory_gb": round(block_memory_gb(shape, tokens, TARGET["seqlen"], TARGET["batch_size"],
                                                        TARGET["num_slices"]), 1)}
        for precision, peak in H100_PEAK.items():
            row[f"hours_{precision}"] = round(flops * shape.blocks / (peak * 1e12 * PAPER_UTILISATION) / 3600, 2)
        rows.append(row)
    print(f"On paper: one H100 SXM at {PAPER_UTILISATION:.0%} of its dense peak, compress/llama settings "
          f"({TARGET['samples']} x {TARGET['seqlen']} tokens, {TARGET['epochs_stage1']} + {TARGET['epochs_stage2']} "
          "epochs, 4 slices)")
    print("| shape | PFLOP per block | PFLOP per model | hours float32 | hours TF32 | hours bf16 autocast | "
          "block memory GB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['block_pflop']} | {row['model_pflop']} | {row['hours_float32']} | "
              f"{row['hours_tf32']} | {row['hours_bfloat16']} | {row['block_memory_gb']} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mem = commands.add_parser("memory")
    mem.add_argument("--hidden", type=int, default=1024)
    mem.add_argument("--layers", type=_int_pair, default=(2, 10))
    mem.add_argument("--threads", type=int, default=2)
    run = commands.add_parser("cost")
    run.add_argument("--shapes", type=_shape_names, default=["smollm2", "llama-3.2-1b"])
    run.add_argument("--device", default="auto")
    run.add_argument("--compute-dtype", default="float32", choices=["float32", "tfloat32", "bfloat16"])
    run.add_argument("--samples", type=int, default=4)
    run.add_argument("--seqlen", type=int, default=256)
    run.add_argument("--epochs", type=_int_pair, default=(1, 1))
    run.add_argument("--threads", type=int)
    commands.add_parser("paper")
    for sub in (mem, run, commands.choices["paper"]):
        sub.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = {"memory": memory, "cost": cost, "paper": paper}[args.command](args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(math.isfinite(float(r.get("ratio", 0))) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
