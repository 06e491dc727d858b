"""Cross-layer bit allocation, against brute force and a float64 Fisher reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mobiquant.allocation import (
    Allocator,
    CostCurve,
    allocate_bits,
    cost_curve,
    lagrangian_choice,
    layer_cost_curves,
)
from mobiquant.layers import ordered_scores, slices_from_scores
from mobiquant.precision import mobi_layers
from tests.tiny_models import quantize_tiny, tiny_model


def random_curve(tokens: int, slices: int, params: int) -> tuple[CostCurve, torch.Tensor, torch.Tensor]:
    scores = ordered_scores(torch.randn(tokens, slices - 1, dtype=torch.float64))
    # Costs fall with slices, as truncation errors do, and reach 0 at full slices.
    costs = torch.rand(tokens, slices, dtype=torch.float64).sort(dim=-1, descending=True).values
    costs[:, -1] = 0.0
    return cost_curve(scores, costs, params), scores, costs


def test_curve_matches_every_threshold() -> None:
    curve, scores, costs = random_curve(tokens=40, slices=4, params=7)
    thresholds = torch.cat([scores.unique(), torch.tensor([float("inf"), -float("inf")], dtype=torch.float64)])
    for theta in thresholds.tolist():
        counts = slices_from_scores(scores, theta)
        switched_on = int((counts - 1).sum())
        expected = float(costs[torch.arange(len(costs)), counts - 1].sum())
        assert float(curve.cost[switched_on]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert curve.bits(0) == 2.0 and curve.bits(len(curve.cost) - 1) == 8.0


def test_price_choice_is_optimal_for_its_bits() -> None:
    curves = [random_curve(tokens=3, slices=3, params=p)[0] for p in (5, 11, 2)]
    total = sum(c.params for c in curves)
    options = []
    for steps in itertools.product(*(range(len(c.cost)) for c in curves)):
        bits = sum(c.params * c.bits(n) for c, n in zip(curves, steps, strict=True)) / total
        options.append((bits, sum(float(c.cost[n]) for c, n in zip(curves, steps, strict=True))))
    for price in torch.logspace(-4, 2, 40, dtype=torch.float64).tolist():
        steps = lagrangian_choice(curves, price)
        bits = sum(c.params * c.bits(n) for c, n in zip(curves, steps, strict=True)) / total
        cost = sum(float(c.cost[n]) for c, n in zip(curves, steps, strict=True))
        best = min(option_cost for option_bits, option_cost in options if option_bits <= bits + 1e-12)
        assert cost == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_allocation_meets_the_budget_and_grows_with_it() -> None:
    curves = [random_curve(tokens=50, slices=4, params=int(p))[0] for p in torch.randint(1, 100, (6,))]
    total = sum(c.params for c in curves)
    previous = [2.0] * len(curves)
    for budget in (2.0, 2.5, 3.0, 4.5, 6.0, 7.5, 8.0):
        bits = allocate_bits(curves, budget)
        assert sum(c.params * b for c, b in zip(curves, bits, strict=True)) / total == pytest.approx(budget, abs=1e-9)
        assert all(2.0 - 1e-12 <= b <= 8.0 + 1e-12 for b in bits)
        assert all(b >= p - 1e-9 for b, p in zip(bits, previous, strict=True))
        previous = bits
    with pytest.raises(ValueError, match="budget must be in"):
        allocate_bits(curves, 8.5)


def test_sensitive_layer_gets_more_bits() -> None:
    curve, scores, costs = random_curve(tokens=64, slices=4, params=10)
    sensitive = cost_curve(scores, 100.0 * costs, params=10)
    robust, sensitive_bits = allocate_bits([curve, sensitive], 4.0)
    assert sensitive_bits > 4.0 > robust
    assert allocate_bits([curve, cost_curve(scores, costs, params=10)], 4.0) == pytest.approx([4.0, 4.0])


@pytest.mark.parametrize("ties", [False, True])
def test_bounded_choice_is_the_full_scan(ties: bool) -> None:
    # The allocator's branch and bound must pick lagrangian_choice's pairs exactly, ties included (first index):
    # thresholds fitted with it are compared bit for bit with those of the full scan.
    gen = torch.Generator().manual_seed(int(ties))
    curves = []
    for tokens in (300, 7, 150, 64):
        if ties:
            # Few distinct scores and small whole costs: equal objectives at many prices.
            scores = torch.randint(0, 3, (tokens, 3), generator=gen).double().sort(dim=-1, descending=True).values
            costs = torch.randint(0, 4, (tokens, 4), generator=gen).double().sort(dim=-1, descending=True).values
        else:
            scores = ordered_scores(torch.randn(tokens, 3, generator=gen, dtype=torch.float64))
            costs = torch.rand(tokens, 4, generator=gen, dtype=torch.float64).sort(dim=-1, descending=True).values
        costs[:, -1] = 0.0
        curves.append(cost_curve(scores, costs, params=int(torch.randint(1, 50, (1,), generator=gen))))
    allocator = Allocator(curves)
    prices = torch.logspace(-10, 4, 800, dtype=torch.float64).tolist()
    for price in prices + [price * (1 + 1e-15) for price in prices[::9]]:
        assert allocator.choice(price) == lagrangian_choice(curves, price), price


def test_allocation_with_a_nan_cost_takes_the_full_scan() -> None:
    curve = random_curve(tokens=20, slices=4, params=3)[0]
    curve.cost[17] = float("nan")
    curves = [curve, random_curve(tokens=20, slices=4, params=5)[0]]
    assert Allocator(curves).choice(0.01) == lagrangian_choice(curves, 0.01)


def test_layer_costs_match_a_float64_fisher_reference() -> None:
    model = quantize_tiny(tiny_model("llama", seed=int(torch.randint(0, 10_000, ()))))
    layers = [layer for layer in mobi_layers(model) if layer.router is not None]
    samples = torch.randint(0, 128, (6, 16))
    curves = layer_cost_curves(model, layers, samples, batch_size=4)

    layer = layers[len(layers) // 2]
    probe = torch.zeros(*samples.shape, layer.out_features, requires_grad=True)
    seen = {}

    def add_probe(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        seen["x"] = args[0].detach().reshape(-1, layer.in_features).double()
        return output + probe

    handle = layer.register_forward_hook(add_probe)
    try:
        logits = model(samples).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), samples[:, 1:].reshape(-1),
                               reduction="sum")
        grad = torch.autograd.grad(loss, probe)[0].reshape(-1, layer.out_features).double()
    finally:
        handle.remove()
    sliced = layer.sliced_weight()
    full = sliced.dequantize(4).double()
    one_slice = 0.5 * (grad.pow(2) * (seen["x"] @ (sliced.dequantize(1).double() - full).T).pow(2)).sum()
    curve = curves[layers.index(layer)]
    assert curve.tokens == samples.numel()
    assert len(curve.cost) == 3 * samples.numel() + 1
    assert float(curve.cost[0]) == pytest.approx(float(one_slice), rel=1e-3)
    assert float(curve.cost[-1]) == pytest.approx(0.0, abs=1e-12)
