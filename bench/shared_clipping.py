"""How close one clipping range shared by every precision can come to each precision's own optimum.

MoBiSlice derives every precision from one scale and zero per group, set for the base slice: a weight
clipped at 2 bits stays clipped at 4. This measures the cost on Gaussian weights, the most favourable
case (real weights have heavier tails). For each shared clipping ``c`` (in standard deviations), the
mean squared error at 4 levels (2 bits) and 16 levels (4 bits), each divided by that precision's own
optimum over ``c``:

    python bench/shared_clipping.py
"""

from __future__ import annotations

import argparse

import torch


def quantization_mse(weights: torch.Tensor, clip: float, levels: int) -> float:
    """Mean squared error of the uniform midpoint quantizer with ``levels`` levels on ``[-clip, clip]``."""
    step = 2 * clip / levels
    codes = torch.clamp(torch.floor((weights + clip) / step), 0, levels - 1)
    return float((weights - (-clip + (codes + 0.5) * step)).pow(2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    weights = torch.randn(args.samples, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    clips = torch.linspace(1.5, 3.5, 201, dtype=torch.float64).tolist()
    errors = {levels: [quantization_mse(weights, clip, levels) for clip in clips] for levels in (4, 16)}
    best = {levels: min(range(len(clips)), key=errors[levels].__getitem__) for levels in errors}
    print(f"optimal clipping: 2 bits {clips[best[4]]:.2f} sd, 4 bits {clips[best[16]]:.2f} sd")
    print("\n| shared clipping (sd) | 2-bit MSE / 2-bit optimum | 4-bit MSE / 4-bit optimum |")
    print("|---|---|---|")
    shown = sorted({best[4], best[16], *range(best[4], best[16], 10)})
    for index in shown:
        ratios = [errors[levels][index] / errors[levels][best[levels]] for levels in (4, 16)]
        print(f"| {clips[index]:.2f} | {ratios[0]:.3f} | {ratios[1]:.3f} |")


if __name__ == "__main__":
    main()
