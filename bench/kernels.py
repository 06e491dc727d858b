"""Speed of the MoBiQuant kernels on Llama-3-8B layer shapes.

    python bench/kernels.py --out bench-kernels.json

Always builds the CUBINs first (the compile report is part of the output). Without a CUDA device it
says so and exits 0 after that step. With one it times, for every shape, token count and precision
(uniform 1-4 slices and a routed mix averaging 3 bits):
  * the kernel (``mobiquant.kernels.elastic_linear``),
  * torch fp16 matmul on a dense weight (cuBLAS),
  * PyTorch dequantise-then-matmul (``reference_elastic_linear``, what the layer does without kernels),
and the kernel's achieved bandwidth (bytes it must move: the planes of the slices read, group
parameters, activations and outputs) against the measured device-to-device copy bandwidth. It ends
with a decode-speed estimate for the 224 linear layers of Llama-3-8B at 2/4/6 bits against fp16
(linear layers only: attention, norms and the LM head are not in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mobiquant import kernels

# (out_features, in_features) of Llama-3-8B's projections.
SHAPES = {"q/o 4096x4096": (4096, 4096), "down 4096x14336": (4096, 14336), "gate/up 14336x4096": (14336, 4096)}
LAYER_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
LAYERS = 32
TOKENS = (1, 16, 128, 2048)
GROUP_SIZE = 128
NUM_SLICES = 4
# Probabilities of 1..4 slices for the routed mix: mean 1.5 slices = 3 bits.
ROUTED_MIX = (0.625, 0.25, 0.125, 0.0)


def timed(fn: Callable[[], object], iters: int, graphs: bool) -> float:
    """Mean seconds per call. With graphs, ``iters`` calls are captured once and replayed, so that the
    Python cost of a launch (large next to a 2-bit GEMV) is not counted."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        start.record()
        graph.replay()
        end.record()
    else:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) on a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10, graphs=False)
    return 2 * src.numel() / seconds


def packed_weight(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random planes and plausible group parameters: speed does not depend on the values."""
    groups = in_features // GROUP_SIZE
    planes = torch.randint(-(2**31), 2**31 - 1, (2 * NUM_SLICES, out_features, in_features // 32), dtype=torch.int32)
    scale = (torch.rand(out_features, groups) * 0.01 + 1e-3).half()
    zero = (torch.rand(out_features, groups) * 4).half()
    return planes.cuda(), scale.cuda(), zero.cuda()


def draw_slices(mix: str, tokens: int) -> torch.Tensor:
    if mix == "routed":
        return (torch.multinomial(torch.tensor(ROUTED_MIX), tokens, replacement=True) + 1).cuda()
    return torch.full((tokens,), int(mix), dtype=torch.int64, device="cuda")


def moved_bytes(out_features: int, in_features: int, tokens: int, slices: torch.Tensor) -> int:
    """Bytes the product has to move at least: planes of the deepest slice used, parameters, x and y."""
    kmax = int(slices.max())
    planes = 2 * kmax * out_features * in_features // 8
    params = 2 * 2 * out_features * (in_features // GROUP_SIZE)
    return planes + params + 2 * tokens * (in_features + out_features)


def bench_shape(name: str, out_features: int, in_features: int, args: argparse.Namespace, bandwidth: float) -> list:
    planes, scale, zero = packed_weight(out_features, in_features)
    dense = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
        fp16 = timed(lambda x=x: x @ dense.T, args.iters, args.graphs)
        for mix in ("1", "2", "3", "4", "routed"):
            slices = draw_slices(mix, tokens)
            out = torch.empty(tokens, out_features, device="cuda", dtype=torch.float16)

            def kernel(x: torch.Tensor = x, slices: torch.Tensor = slices, out: torch.Tensor = out) -> None:
                kernels.elastic_linear(x, planes, scale, zero, slices, GROUP_SIZE, out=out)

            seconds = timed(kernel, args.iters, args.graphs)
            dequant = timed(
                lambda x=x, slices=slices: kernels.reference_elastic_linear(x, planes, scale, zero, slices, GROUP_SIZE),
                2,
                graphs=False,
            )
            achieved = moved_bytes(out_features, in_features, tokens, slices) / seconds
            rows.append(
                {
                    "shape": name,
                    "out": out_features,
                    "in": in_features,
                    "tokens": tokens,
                    "slices": mix,
                    "avg_bits": 2.0 * float(slices.double().mean()),
                    "kernel_s": seconds,
                    "fp16_s": fp16,
                    "dequant_matmul_s": dequant,
                    "speedup_vs_fp16": fp16 / seconds,
                    "speedup_vs_dequant": dequant / seconds,
                    "bandwidth_Bps": achieved,
                    "bandwidth_fraction": achieved / bandwidth,
                }
            )
            print(_format_row(rows[-1]), flush=True)
    return rows


def decode_estimate(args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of one decode step through Llama-3-8B's linear layers (sum of T=1 products x 32 layers)."""
    per_layer = {"fp16": 0.0, "2 bits": 0.0, "4 bits": 0.0, "6 bits": 0.0}
    for out_features, in_features in LAYER_SHAPES:
        planes, scale, zero = packed_weight(out_features, in_features)
        dense = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
        x = torch.randn(1, in_features, device="cuda", dtype=torch.float16)
        per_layer["fp16"] += timed(lambda x=x, dense=dense: x @ dense.T, args.iters, args.graphs)
        for k, label in ((1, "2 bits"), (2, "4 bits"), (3, "6 bits")):
            slices = torch.full((1,), k, dtype=torch.int64, device="cuda")
            per_layer[label] += timed(
                lambda x=x, p=planes, s=scale, z=zero, k=slices: kernels.elastic_linear(x, p, s, z, k, GROUP_SIZE),
                args.iters,
                args.graphs,
            )
    return {label: 1.0 / (LAYERS * seconds) for label, seconds in per_layer.items()}


def _format_row(row: dict) -> str:
    return (
        f"{row['shape']:<20} T={row['tokens']:<5} k={row['slices']:<7} {row['kernel_s'] * 1e6:9.1f} us  "
        f"x{row['speedup_vs_fp16']:5.2f} vs fp16  x{row['speedup_vs_dequant']:7.1f} vs dequant+mm  "
        f"{100 * row['bandwidth_fraction']:5.1f}% of copy bw"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the raw numbers (and the compile report) as JSON here")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="time plain launches")
    args = parser.parse_args(argv)

    compiled = kernels.compile_kernels()
    for result in compiled:
        print(f"compiled {result.kernel:<8} {result.arch}  {result.cubin_bytes:>8} bytes  {result.seconds:6.2f} s")
    report: dict[str, object] = {"compile": [r.as_dict() for r in compiled]}
    if not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): kernels compiled, GPU timings not measured")
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return 0

    bandwidth = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        rows += bench_shape(name, out_features, in_features, args, bandwidth)
    estimate = decode_estimate(args)
    for label, tokens_per_s in estimate.items():
        print(f"Llama-3-8B linear layers, decode at {label:<6}: {tokens_per_s:8.1f} tokens/s")
    report.update(device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bandwidth, rows=rows, decode=estimate)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
