"""A frozen linear weight fake-quantized at 1..K slices, with learnable clipping (LWC) and a router."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mobiquant.calibration.config import CalibrationConfig
from mobiquant.clip_search import clip_logit, search_clipping
from mobiquant.gptq import nested_codes_many
from mobiquant.layers import MoBiLinear, MoBiRouter, gate_scores
from mobiquant.slicing import (
    BITS_PER_SLICE,
    PARAM_DTYPE,
    SlicedWeight,
    check_slicing_shape,
    fit_row_gains,
    group_min_max,
    pack_codes,
    round_params,
    scale_zero_from_range,
    slice_weight,
)


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor`` in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


class TrainableSlicedLinear(nn.Module):
    """A frozen linear weight fake-quantized at 1..K slices with learnable clipping and a router."""

    def __init__(self, linear: nn.Linear, config: CalibrationConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_slicing_shape(linear.in_features, config.group_size)
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.group_size, self.num_slices = config.group_size, config.num_slices
        w_min, w_max = group_min_max(self.weight, config.group_size)
        self.register_buffer("w_min", w_min)
        self.register_buffer("w_max", w_max)
        self.upper_logit = nn.Parameter(torch.full_like(w_max, config.clip_init))
        self.lower_logit = nn.Parameter(torch.full_like(w_min, config.clip_init))
        # Drawn on the CPU from ``generator`` and moved: the same seed gives the same router on every device and
        # in every thread.
        self.router = (
            MoBiRouter(linear.in_features, config.num_slices, config.router_hidden, generator).to(self.weight.device)
            if config.routed else None
        )
        self.uniform_slices: int = 1
        self.routing: bool = False
        self.temperature: float = 1.0
        self.expected_slices: torch.Tensor | None = None
        # Tokens of the last routed forward: an expert's linears serve only the tokens routed to the expert.
        self.served_tokens = 0
        self.hard_slices: torch.Tensor | None = None
        # Set by take_codes: the stored codes c_K with their float16 group parameters, and W_1..W_K from them.
        self.fixed: SlicedWeight | None = None
        self._fixed_weights: list[torch.Tensor] = []

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.upper_logit), torch.sigmoid(self.lower_logit)

    def start_clipping_from_search(self, hessian: torch.Tensor, slice_weights: dict[int, float]) -> None:
        """Set the LWC parameters to the clip search's factors for inputs with ``X^T X = hessian``."""
        no_clip = float(torch.sigmoid(self.upper_logit.detach().max()))
        upper, lower = search_clipping(self.weight, hessian, self.group_size, slice_weights, no_clip=no_clip)
        with torch.no_grad():
            self.upper_logit.copy_(clip_logit(upper))
            self.lower_logit.copy_(clip_logit(lower))

    def frozen_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The group scale and zero of the clipping as it stands, rounded as the checkpoint stores them."""
        upper, lower = (factor.detach() for factor in self.clip_factors())
        return round_params(*scale_zero_from_range(self.w_min * lower, self.w_max * upper))

    def take_codes(self, sliced: SlicedWeight) -> None:
        """Compute with ``sliced`` from here on; the clipping gets no more gradient."""
        self.fixed = sliced
        self._fixed_weights = [sliced.dequantize(k) for k in range(1, self.num_slices + 1)]
        self.upper_logit.requires_grad_(False)
        self.lower_logit.requires_grad_(False)

    def _codes_u(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        upper, lower = self.clip_factors()
        scale, zero = scale_zero_from_range(self.w_min * lower, self.w_max * upper)
        s = scale.repeat_interleave(self.group_size, dim=-1)
        z = zero.repeat_interleave(self.group_size, dim=-1)
        return self.weight / s + z, s, z

    def fake_weights(self, up_to: int) -> list[torch.Tensor]:
        """``[W_1, ..., W_up_to]``: with gradients to the clipping parameters, or the fixed codes' weights."""
        if self.fixed is not None:
            return self._fixed_weights[:up_to]
        u, s, z = self._codes_u()
        weights = []
        for k in range(1, up_to + 1):
            per_level = 4.0 ** (k - 1)
            codes = torch.clamp(_floor_ste(u * per_level), 0, 4.0 * per_level - 1)
            weights.append(s * ((codes + 0.5) / per_level - z))
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.routing or self.router is None:
            return F.linear(x, self.fake_weights(self.uniform_slices)[-1], self.bias)
        weights = self.fake_weights(self.num_slices)
        logits = self.router(x)
        soft = torch.cumprod(torch.sigmoid(logits / self.temperature), dim=-1)
        hard = (gate_scores(logits) > 0).to(soft.dtype)
        masks = hard + (soft - soft.detach())
        self.expected_slices = 1 + soft.sum(dim=-1).mean()
        self.served_tokens = soft.numel() // soft.shape[-1]
        self.hard_slices = 1 + hard.sum(dim=-1).mean()
        out = F.linear(x, weights[0], self.bias)
        for e in range(1, self.num_slices):
            residual = F.linear(x, weights[e] - weights[e - 1])
            out = out + masks[..., e - 1 : e].to(out.dtype) * residual
        return out

    def to_mobilinear(self) -> MoBiLinear:
        upper, lower = self.clip_factors()
        out_features, in_features = self.weight.shape
        with torch.device(self.weight.device):  # the block's device, where its outputs are computed next
            layer = MoBiLinear(
                in_features,
                out_features,
                self.num_slices,
                self.group_size,
                bias=self.bias is not None,
                router_hidden=self.router.fc1.out_features if self.router is not None else None,
            )
        sliced = self.fixed or slice_weight(self.weight, self.group_size, self.num_slices,
                                            clip=(upper.detach(), lower.detach()))
        layer.load_sliced(sliced, self.bias)
        if self.router is not None:
            layer.router.load_state_dict(self.router.state_dict())
        return layer


def fix_codes(linears: Sequence[TrainableSlicedLinear], hessians: Sequence[torch.Tensor],
              slice_weights: Sequence[Mapping[int, float]], damp: float, row_gain_slices: int = 0,
              gain_aware_passes: int = 0, descent_sweeps: int = 0) -> list[dict[int, float]]:
    """Freeze each linear's clipping and choose error-compensated codes for it (``mobiquant.gptq``), then the
    row gains of 1..``row_gain_slices`` slices for those codes (``fit_row_gains``); each of
    ``gain_aware_passes`` then chooses the codes again for the gained weights and refits the gains. Every
    choice of codes ends with ``descent_sweeps`` sweeps of coordinate descent.

    The linears' codes are chosen in one pass (``nested_codes_many``): they need one
    ``mobiquant.gptq.shared_pass_key`` (``shared_passes`` groups a block's linears). From here on each
    linear computes with its codes, so the router fit and its truncation errors see the weights the
    checkpoint will hold; the clipping gets no more gradient (moving it would move the grid under codes
    chosen for it). Returns per linear the output error at each weighted slice count and at K (of the last
    codes chosen, with the gains they were chosen for).
    """
    num_slices = linears[0].num_slices
    if any(linear.num_slices != num_slices or linear.group_size != linears[0].group_size for linear in linears):
        raise ValueError("linears compensated together need one slice count and group size")
    grids = [linear.frozen_grid() for linear in linears]
    bits = [{BITS_PER_SLICE * k: w for k, w in weights.items()} for weights in slice_weights]
    hessians = [hessian.to(linear.weight.device) for linear, hessian in zip(linears, hessians, strict=True)]
    weights = [linear.weight for linear in linears]
    code_bits = BITS_PER_SLICE * num_slices

    def choose(row_gains: list[dict[int, torch.Tensor]] | None) -> tuple[list[SlicedWeight], list[dict[int, float]]]:
        results = nested_codes_many(weights, hessians, [scale for scale, _ in grids], [zero for _, zero in grids],
                                    code_bits, bits, damp=damp, row_gains=row_gains, descent_sweeps=descent_sweeps,
                                    cuda_graphs=weights[0].is_cuda)
        slicings, errors = [], []
        for linear, hessian, (scale, zero), (codes, error) in zip(linears, hessians, grids, results, strict=True):
            sliced = SlicedWeight(pack_codes(codes, num_slices), scale.to(PARAM_DTYPE), zero.to(PARAM_DTYPE),
                                  linear.group_size)
            if row_gain_slices:
                sliced.gains = fit_row_gains(linear.weight, hessian, sliced, row_gain_slices)
            slicings.append(sliced)
            errors.append({b // BITS_PER_SLICE: e for b, e in error.items()})
        return slicings, errors

    slicings, errors = choose(None)
    # The finest weighted precision's codes are its nearest levels, and its gain stays near 1: the passes
    # aim the coarser precisions' codes through their gains (the linears share their weighted precisions).
    aimed = [k for k in range(1, row_gain_slices + 1) if BITS_PER_SLICE * k in bits[0]
             and BITS_PER_SLICE * k < max(bits[0])]
    for _pass in range(gain_aware_passes if aimed else 0):
        slicings, errors = choose([{BITS_PER_SLICE * k: sliced.gains[k - 1].double() for k in aimed}
                                   for sliced in slicings])
    for linear, sliced in zip(linears, slicings, strict=True):
        linear.take_codes(sliced)
    return errors
