"""Where the prefill path's time goes at 2048 tokens: its parts timed alone against fp16 cuBLAS, one run, on a GPU.

``bench/kernel_speed.py`` times the whole prefill product (``elastic_linear``) against cuBLAS on a dense fp16
weight. The dequantisation path (``MOBIQUANT_PREFILL=dequant``) is three parts: the slice counts present read
back to the host (``torch.unique(...).tolist()``, one sync), ``W_k`` written by the dequantisation kernel, and
cuBLAS on it. Each part is timed here alone, and the kernel plus cuBLAS without the host read, so that the
ratio to fp16 cuBLAS says which part to take away; and the whole call given the count on the host (``uniform=``,
as ``MoBiLinear`` passes it under a uniform setting), which reads nothing back. Plain launches (the host read
cannot be graph-captured), weight copies rotated past the L2 as in the kernel bench.

    python bench/prefill_parts.py --out prefill_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # the kernel bench's helpers; it puts the repository root on the path

import torch  # noqa: E402
from kernel_speed import GROUP_SIZE, SHAPES, l2_cache_bytes, packed_weight, rotation_copies, timed  # noqa: E402

from mobiquant import kernels  # noqa: E402
from mobiquant.kernels import _launch  # noqa: E402

TOKENS = 2048


def parts(out_features: int, in_features: int, k: int, iters: int) -> dict[str, float]:
    """Seconds per call of each part at ``k`` slices for every token."""
    weight_bytes = 2 * out_features * in_features
    copies = rotation_copies(weight_bytes, l2_cache_bytes())
    packed = [packed_weight(out_features, in_features) for _ in range(copies)]
    dense = [torch.randn(out_features, in_features, device="cuda").half() for _ in range(copies)]
    x = torch.randn(TOKENS, in_features, device="cuda").half()
    slices = torch.full((TOKENS,), k, dtype=torch.long, device="cuda")
    out = torch.empty(TOKENS, out_features, device="cuda").half()
    rebuilt = torch.empty(out_features, in_features, device="cuda").half()

    def whole(i: int, uniform: int | None = None) -> None:
        planes, scale, zero, gains = packed[i]
        kernels.elastic_linear(x, planes, scale, zero, slices, GROUP_SIZE, out=out, gains=gains, uniform=uniform)

    def dequantise(i: int) -> None:
        planes, scale, zero, gains = packed[i]
        _launch.launch_dequant(planes, scale, zero, k, GROUP_SIZE, rebuilt, gains)

    def dequantise_then_cublas(i: int) -> None:
        dequantise(i)
        torch.matmul(x, rebuilt.T, out=out)

    previous = os.environ.get(kernels.PREFILL_ENV)
    os.environ[kernels.PREFILL_ENV] = "dequant"
    try:
        return {
            "fp16 cuBLAS": timed(lambda i: torch.matmul(x, dense[i].T, out=out), iters, False, copies),
            "elastic_linear (dequant path)": timed(whole, iters, False, copies),
            "elastic_linear, uniform=k": timed(lambda i: whole(i, uniform=k), iters, False, copies),
            "host read of the counts": timed(lambda _: torch.unique(slices).tolist(), iters, False),
            "dequantisation kernel": timed(dequantise, iters, False, copies),
            "cuBLAS on W_k": timed(lambda _: torch.matmul(x, rebuilt.T, out=out), iters, False),
            "kernel + cuBLAS, no host read": timed(dequantise_then_cublas, iters, False, copies),
        }
    finally:
        if previous is None:
            os.environ.pop(kernels.PREFILL_ENV)
        else:
            os.environ[kernels.PREFILL_ENV] = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[2])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    rows = []
    for shape, (out_features, in_features) in SHAPES.items():
        for k in args.slices:
            seconds = parts(out_features, in_features, k, args.iters)
            rows.append({"shape": shape, "tokens": TOKENS, "slices": k, "seconds": seconds})
            base = seconds["fp16 cuBLAS"]
            print(f"{shape}, {TOKENS} tokens, {k} slices: " + "; ".join(
                f"{name} {1e6 * value:.1f} us ({value / base:.2f}x)" for name, value in seconds.items()), flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
