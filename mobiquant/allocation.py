"""Cross-layer bit allocation: how many bits each routed layer runs at for one model-wide budget.

Layers are not equally sensitive: dropping a slice in one layer can cost the model far more loss than
in another of the same size. The cost of running token ``t`` of a layer at ``k`` slices is estimated
from one backward pass at full slices, with the empirical Fisher diagonal of the layer's output (the
second-order estimate HAWQ and SqueezeLLM use for weights):

    cost[t, k] = 1/2 * sum_j g[t, j]^2 * (x_t (W_k - W_K)^T)_j^2,   g = d(calibration loss)/d(output)

Inside a layer the router's ordered scores decide the order in which (token, slice) pairs are switched
on as its threshold falls (slice 2 for every token, in the router's order, then slice 3, ...); summing
``cost`` along that order gives the layer a curve of cost against bits. A Lagrange multiplier prices
bits, weighted by each layer's parameter count, against cost; bisection on the price meets the budget,
and the last step is shared between the two closest solutions so the budget is met exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mobiquant.layers import MoBiLinear, ordered_scores
from mobiquant.slicing import BITS_PER_SLICE

BISECTION_STEPS = 100


@dataclass
class CostCurve:
    """A layer's estimated loss increase after the first ``n`` (token, slice) pairs in router order are on."""

    params: float
    """The layer's weight in the budget: its parameter count, times the share of the calibration tokens it served
    (1 in a dense model; an expert's linears serve only the tokens routed to them, as ``track_bits`` counts)."""
    tokens: int
    cost: torch.Tensor  # float64 [tokens * (K - 1) + 1]

    def bits(self, switched_on: int) -> float:
        return BITS_PER_SLICE * (1.0 + switched_on / self.tokens)

    @property
    def top_bits(self) -> float:
        return self.bits(len(self.cost) - 1)


def cost_curve(scores: torch.Tensor, costs: torch.Tensor, params: int) -> CostCurve:
    """The curve of a layer with gate ``scores`` ``[tokens, K-1]`` and ``costs`` ``[tokens, K]``.

    ``costs[:, k-1]`` is a token's cost at ``k`` slices. Turning gate ``e`` on moves a token from ``e`` to
    ``e+1`` slices. A token's scores never rise with ``e`` (ordered or nested scores), and the stable sort
    keeps its gates in order where scores tie, so the walk never turns on a gate before the one it
    depends on.
    """
    tokens = scores.shape[0]
    costs = costs.double()
    gains = (costs[:, 1:] - costs[:, :-1]).reshape(-1)
    order = torch.sort(scores.reshape(-1).double(), descending=True, stable=True).indices
    start = costs[:, 0].sum().reshape(1)
    return CostCurve(params, tokens, torch.cat([start, start + torch.cumsum(gains[order], dim=0)]))


def lagrangian_choice(curves: list[CostCurve], price: float) -> list[int]:
    """Each layer's number of switched-on pairs minimising its cost plus ``price`` per parameter-bit."""
    chosen = []
    for curve in curves:
        steps = torch.arange(len(curve.cost), dtype=torch.float64, device=curve.cost.device)
        objective = curve.cost + price * curve.params * BITS_PER_SLICE * steps / curve.tokens
        chosen.append(int(torch.argmin(objective)))
    return chosen


def allocate_bits(curves: list[CostCurve], budget: float) -> list[float]:
    """Bits per layer whose parameter-weighted average is ``budget``, spending them where cost falls most."""
    return Allocator(curves).allocate(budget)


class Allocator:
    """``allocate_bits`` for many budgets over the same curves, with ``lagrangian_choice`` made cheap.

    Each budget's bisection evaluates the choice at about a hundred prices, and a fine threshold grid asks for
    many budgets; a full scan of every curve per price dominated calibration. Here the choice at a price is
    exactly ``lagrangian_choice``'s (the same float64 operations on each objective entry, the first index of
    the minimum), found by branch and bound over blocks of a curve: ``fl(min cost of block + fl(fl(s * first
    step) / tokens))`` is, rounding being monotone, a lower bound on every objective entry of the block, so
    only blocks whose bound reaches an entry's value need their entries computed. Prices repeat (the bisection
    runs out of float64 resolution, and budgets share their first steps), so choices are remembered per price.
    """

    # Curve entries per block: near the square root of a curve's length at a few thousand calibration tokens,
    # so that both the bounds and the entries of the blocks that survive them are few.
    _BLOCK = 64

    def __init__(self, curves: list[CostCurve]) -> None:
        self.curves = curves
        # NaN entries are where torch.argmin stops; the bounds cannot place them, so such curves take the scan.
        self._scan = any(bool(torch.isnan(curve.cost).any()) for curve in curves)
        blocks = -(-max(len(curve.cost) for curve in curves) // self._BLOCK)
        device = curves[0].cost.device
        # Padding is +inf: never below a real entry, and a later index where it ties one.
        cost = torch.full((len(curves), blocks * self._BLOCK), float("inf"), dtype=torch.float64, device=device)
        for row, curve in zip(cost, curves, strict=True):
            row[: len(curve.cost)] = curve.cost
        self._cost = cost.reshape(len(curves), blocks, self._BLOCK)
        self._steps = torch.arange(blocks * self._BLOCK, dtype=torch.float64, device=device)
        self._steps = self._steps.reshape(blocks, self._BLOCK)
        self._block_min = self._cost.amin(dim=-1)
        self._block_first = self._steps[:, 0]
        self._tokens = torch.tensor([[curve.tokens] for curve in curves], dtype=torch.float64, device=device)
        self._total = sum(curve.params for curve in curves)
        self._choices: dict[float, list[int]] = {}

    def choice(self, price: float) -> list[int]:
        """``lagrangian_choice(self.curves, price)`` for a ``price >= 0`` (the bounds assume a non-negative one)."""
        if price not in self._choices:
            self._choices[price] = lagrangian_choice(self.curves, price) if self._scan else self._bound(price)
        return self._choices[price]

    def _bound(self, price: float) -> list[int]:
        # The per-parameter-bit price of each layer as lagrangian_choice forms it, in Python floats.
        scale = torch.tensor([[price * curve.params * BITS_PER_SLICE] for curve in self.curves],
                             dtype=torch.float64, device=self._cost.device)
        bound = self._block_min + scale * self._block_first / self._tokens
        layers = torch.arange(len(self.curves), device=self._cost.device)
        # The block of lowest bound gives each layer an entry's value; every block bounded above it is out.
        best = torch.argmin(bound, dim=1)
        reached = (self._cost[layers, best] + scale * self._steps[best] / self._tokens).amin(dim=1)
        layer, block = torch.nonzero(bound <= reached[:, None], as_tuple=True)
        objective = self._cost[layer, block] + scale[layer] * self._steps[block] / self._tokens[layer]
        lowest = torch.full_like(reached, float("inf")).scatter_reduce(0, layer, objective.amin(dim=1), "amin")
        steps = torch.where(objective == lowest[layer, None], self._steps[block], float("inf")).amin(dim=1)
        first = torch.full_like(reached, float("inf")).scatter_reduce(0, layer, steps, "amin")
        return [int(n) for n in first.tolist()]

    def _average_bits(self, bits: list[float]) -> float:
        return sum(curve.params * b for curve, b in zip(self.curves, bits, strict=True)) / self._total

    def _solution(self, price: float) -> list[float]:
        if price == 0.0:
            return [curve.top_bits for curve in self.curves]
        return [curve.bits(n) for curve, n in zip(self.curves, self.choice(price), strict=True)]

    def allocate(self, budget: float) -> list[float]:
        """Bits per layer whose parameter-weighted average is ``budget`` (``allocate_bits``)."""
        top = max(curve.top_bits for curve in self.curves)
        if not BITS_PER_SLICE <= budget <= top:
            raise ValueError(f"budget must be in [{BITS_PER_SLICE}, {top}], got {budget}")
        cheap, dear = 0.0, 1.0
        while self._average_bits(self._solution(dear)) > budget:
            dear *= 4.0
        for _step in range(BISECTION_STEPS):
            middle = (cheap + dear) / 2 if cheap == 0.0 else (cheap * dear) ** 0.5
            if self._average_bits(self._solution(middle)) > budget:
                cheap = middle
            else:
                dear = middle
        above, below = self._solution(cheap), self._solution(dear)
        high, low = self._average_bits(above), self._average_bits(below)
        share = 0.0 if high == low else (budget - low) / (high - low)
        return [b + share * (a - b) for a, b in zip(above, below, strict=True)]


def loss_gradient_passes(model: nn.Module, samples: torch.Tensor, batch_size: int = 4, progress: bool = False) -> None:
    """The calibration loss's forward and backward pass per batch of ``samples``, for hooks to read activations
    and output gradients. Differentiated with respect to the input embeddings only: no weight gets a gradient.
    """
    embed = model.get_input_embeddings()
    for start in tqdm(range(0, len(samples), batch_size), desc="sensitivity pass", unit="batch",
                      disable=not progress, leave=False):
        ids = samples[start : start + batch_size].to(embed.weight.device)
        embeds = embed(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            torch.autograd.grad(loss, embeds)


def layer_cost_curves(model: nn.Module, layers: list[MoBiLinear], samples: torch.Tensor,
                      batch_size: int = 4, progress: bool = False) -> list[CostCurve]:
    """One backward pass per batch of ``samples`` at full slices gives every layer its cost curve."""
    scores: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers}
    costs: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers}

    def record(layer: MoBiLinear, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, layer.in_features)
        with torch.no_grad():
            scores[id(layer)].append(ordered_scores(layer.router(x)).cpu())

        def on_gradient(grad: torch.Tensor) -> None:
            with torch.no_grad():
                # float32 whatever the model runs in: squared fp16 differences would underflow.
                x32 = x.float()
                full = layer.dense_weight(layer.stored_slices, torch.float32)
                g2 = grad.reshape(-1, layer.out_features).float().pow(2)
                per_k = [0.5 * (g2 * (x32 @ (layer.dense_weight(k, torch.float32) - full).T).pow(2)).sum(dim=-1)
                         for k in range(1, layer.stored_slices)]
                per_k.append(torch.zeros_like(per_k[0]))
                costs[id(layer)].append(torch.stack(per_k, dim=-1).double().cpu())

        output.register_hook(on_gradient)

    for layer in layers:
        layer.uniform_slices = layer.stored_slices
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        loss_gradient_passes(model, samples, batch_size, progress)
    finally:
        for handle in handles:
            handle.remove()
    served = {id(layer): sum(len(part) for part in scores[id(layer)]) for layer in layers}
    most = max(served.values())
    curves = []
    for layer in layers:
        if not served[id(layer)]:
            # An expert no calibration token reached weighs nothing in the budget (its thresholds: precision.py).
            curves.append(CostCurve(0.0, 1, torch.zeros(layer.stored_slices, dtype=torch.float64, device="cpu")))
            continue
        # Weighted by the tokens it served: a whole-model budget is the bits of the weights tokens actually ran.
        params = layer.in_features * layer.out_features * served[id(layer)] / most
        curves.append(cost_curve(torch.cat(scores[id(layer)]), torch.cat(costs[id(layer)]), params))
    return curves
