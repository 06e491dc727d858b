"""The compensated codes of one block's linears: one GPTQ pass each against shared passes, side by side, one run.

GPTQ's column loop costs a fixed number of small steps per column whatever the rows, so on a GPU it is bound by
launches. The linears that read one input (q, k, v, o, gate and up in a Llama block) can share a pass
(``mobiquant.gptq.nested_codes_many``, grouped by ``shared_passes`` as the calibration groups them). This script
chooses the default objective's codes for a block of random weights and random inputs (a pass costs the same
whatever the weights), both ways, on ``--device``, checks that the codes are the same, and prints the seconds of
each and their ratio; on CUDA also the shared passes replayed from CUDA graphs, as the calibration runs them. A small
pass warms the device up first.

    python bench/shared_passes.py --shape llama-3-8b --device cuda --out shared_passes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # a plain checkout, or another checkout's mobiquant installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from mobiquant.calibration import CalibrationConfig  # noqa: E402
from mobiquant.devices import resolve_device  # noqa: E402
from mobiquant.gptq import nested_codes, nested_codes_many, shared_passes  # noqa: E402
from mobiquant.slicing import BITS_PER_SLICE, slice_weight  # noqa: E402

# Llama block shapes: hidden, MLP width, KV width.
SHAPES = {"smollm2": (576, 1536, 192), "llama-3.2-1b": (2048, 8192, 512), "llama-3-8b": (4096, 14336, 1024)}


def block_linears(shape: str, tokens: int, group_size: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Per linear of a block: name, weight, Hessian of random correlated inputs of its width, group parameters."""
    hidden, mlp, kv = SHAPES[shape]
    generator = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}
    linears = []
    for name, (out, inp) in shapes.items():
        weight = (torch.randn(out, inp, generator=generator) * 0.02).to(device)
        x = torch.randn(tokens, inp, generator=generator) * (torch.rand(inp, generator=generator) * 3 + 0.1)
        x = x.to(device, torch.float64)
        sliced = slice_weight(weight, group_size, 4)
        linears.append({"name": name, "weight": weight, "hessian": x.T @ x, "scale": sliced.scale,
                        "zero": sliced.zero})
    return linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=4096, help="random input rows behind each Hessian")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each way (the best is kept)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = CalibrationConfig(group_size=args.group_size)
    linears = block_linears(args.shape, args.tokens, args.group_size, device)
    objectives = [{BITS_PER_SLICE * k: w for k, w in config.compensation_objective(linear["name"]).items()}
                  for linear in linears]
    passes = shared_passes([tuple(linear["weight"].shape) for linear in linears], objectives)

    def each_alone() -> list[torch.Tensor]:
        return [nested_codes(linear["weight"], linear["hessian"], linear["scale"], linear["zero"], 8, objective,
                             damp=config.damp)[0] for linear, objective in zip(linears, objectives, strict=True)]

    def shared(cuda_graphs: bool = False) -> list[torch.Tensor]:
        codes: dict[int, torch.Tensor] = {}
        for indices in passes:
            fields = {key: [linears[i][key] for i in indices] for key in ("weight", "hessian", "scale", "zero")}
            chosen = nested_codes_many(fields["weight"], fields["hessian"], fields["scale"], fields["zero"], 8,
                                       [objectives[i] for i in indices], damp=config.damp, cuda_graphs=cuda_graphs)
            codes.update({i: part_codes for i, (part_codes, _) in zip(indices, chosen, strict=True)})
        return [codes[i] for i in range(len(linears))]

    # A small pass first, so that neither way pays the device's and the solvers' first use.
    small = block_linears("smollm2", 256, 64, device)[1]
    nested_codes_many([small["weight"]] * 2, [small["hessian"]] * 2, [small["scale"]] * 2, [small["zero"]] * 2, 8,
                      [objectives[1]] * 2, damp=config.damp)
    ways = {"one pass each": each_alone, "shared passes": shared}
    if device.type == "cuda":  # the calibration's way on a GPU
        ways["shared passes, CUDA graphs"] = lambda: shared(cuda_graphs=True)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    results = {}
    for _repeat in range(args.repeats):
        for way, run in ways.items():
            started = time.perf_counter()
            results[way] = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[way].append(time.perf_counter() - started)
    same = {way: all(torch.equal(a, b) for a, b in zip(results["one pass each"], codes, strict=True))
            for way, codes in results.items()}
    best = {way: min(times) for way, times in seconds.items()}
    ratios = {way: best["one pass each"] / value for way, value in best.items()}
    names = [[linears[i]["name"] for i in indices] for indices in passes]
    print(f"{args.shape} block on {device}, group {args.group_size}: passes {names}")
    for way, value in best.items():
        print(f"{way}: {value:.2f} s, one pass each / this {ratios[way]:.2f}x, codes identical: {same[way]}")
    if args.out:
        args.out.write_text(json.dumps({"shape": args.shape, "device": str(device), "group_size": args.group_size,
                                        "passes": names, "seconds": seconds, "ratios": ratios, "identical": same},
                                       indent=1))
    if not all(same.values()):
        sys.exit("a way chose other codes than one pass each")


if __name__ == "__main__":
    main()
