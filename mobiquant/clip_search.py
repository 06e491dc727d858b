"""Activation-aware search of the clipping that learnable weight clipping (LWC) starts from.

With the small calibration budgets this project runs by default (a few optimizer steps per block),
LWC started at "no clipping" barely moves, and a 2-bit slice of an unclipped group is ruinous: on
SmolLM2-135M, one slice with min-max ranges gives perplexity 2.3e5, with the clipping found here 278.

For every group this picks the pair of factors ``(upper, lower)`` (``max' = upper * max``,
``min' = lower * min``, as in LWC) from a grid, minimising a weighted sum over slice counts ``k`` of
the output error the group leaves, ``||X_g (W_k,g - W_g)^T||^2`` for the layer's calibration inputs
``X``. With ``H = X^T X`` that error is ``d H_gg d^T`` for the row's difference ``d`` on the group's
columns: groups are chosen independently, ignoring the cross-group terms of ``H`` (as AWQ's clip
search does). The slice-count weights are the user's trade-off: a control calibrated for one precision
weighs only its own slice count, the elastic checkpoint weighs all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from mobiquant.arch import expert_token_positions
from mobiquant.slicing import group_min_max, round_params, scale_zero_from_range

log = logging.getLogger(__name__)

# Clipping factors tried for each end of every group, besides the no-clipping start of LWC.
CLIP_GRID = tuple(round(0.95 - 0.05 * i, 2) for i in range(11))


def group_hessian_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks ``H_gg`` of ``H = X^T X``: ``[in // group_size, group_size, group_size]``."""
    groups = hessian.shape[0] // group_size
    blocks = hessian.reshape(groups, group_size, groups, group_size)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def group_output_errors(
    weight: torch.Tensor,
    hessian_blocks: torch.Tensor,
    group_size: int,
    upper: torch.Tensor | float,
    lower: torch.Tensor | float,
    slice_counts: Sequence[int],
) -> torch.Tensor:
    """``[len(slice_counts), out, groups]``: each group's output error at each slice count.

    The group parameters are rounded to float16 exactly as a checkpoint stores them, so the error is
    the one the saved weight will have.
    """
    out_features, in_features = weight.shape
    groups = in_features // group_size
    w_min, w_max = group_min_max(weight, group_size)
    scale, zero = round_params(*scale_zero_from_range(w_min * lower, w_max * upper))
    grouped = weight.reshape(out_features, groups, group_size)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    u = grouped / s + z
    errors = []
    for k in slice_counts:
        per_level = 4.0 ** (k - 1)
        codes = torch.clamp(torch.floor(u * per_level), 0, 4.0 * per_level - 1)
        diff = (s * ((codes + 0.5) / per_level - z) - grouped).transpose(0, 1)
        errors.append(((diff @ hessian_blocks) * diff).sum(dim=-1).T)
    return torch.stack(errors)


def search_clipping(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    slice_weights: Mapping[int, float],
    no_clip: float = 1.0,
    grid: Sequence[float] = CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group factors ``(upper, lower)``, each ``[out, in // group_size]``, with values in ``{no_clip} + grid``.

    ``slice_weights`` maps a slice count to its weight in the objective (absolute output errors, so a
    2-bit error counts with its full size). Coordinate descent, about 50 evaluations instead of the full
    grid's 144: the best symmetric factor (``upper == lower``) per group, then line searches over the
    whole grid for ``upper`` with ``lower`` fixed, ``lower`` with ``upper`` fixed, and ``upper`` again.
    Ties keep the earlier candidate, so a group is clipped only where that helps. (Measured on SmolLM2,
    2-bit objective, uniform 1 slice: full grid ppl 278; symmetric pass plus one step of neighbours 1365.)
    """
    if not slice_weights or min(slice_weights.values()) < 0:
        raise ValueError(f"slice_weights must map slice counts to non-negative weights, got {dict(slice_weights)}")
    weight = weight.float()
    blocks = group_hessian_blocks(hessian.float(), group_size)
    counts = sorted(slice_weights)
    coefficients = torch.tensor([float(slice_weights[k]) for k in counts], device=weight.device).view(-1, 1, 1)
    candidates = torch.tensor([no_clip, *sorted((f for f in grid if f < no_clip), reverse=True)], device=weight.device)

    def objective(upper: torch.Tensor | float, lower: torch.Tensor | float) -> torch.Tensor:
        return (group_output_errors(weight, blocks, group_size, upper, lower, counts) * coefficients).sum(0)

    def line_search(fixed: torch.Tensor | None, moving_upper: bool) -> torch.Tensor:
        best = best_index = None
        for index, factor in enumerate(candidates.tolist()):
            other = factor if fixed is None else fixed
            value = objective(factor, other) if moving_upper else objective(other, factor)
            if best is None:
                best, best_index = value, torch.zeros_like(value, dtype=torch.long)
                continue
            better = value < best
            best, best_index = torch.where(better, value, best), torch.where(better, index, best_index)
        return candidates[best_index]

    symmetric = line_search(None, moving_upper=True)
    upper = line_search(symmetric, moving_upper=True)
    lower = line_search(upper, moving_upper=False)
    return line_search(lower, moving_upper=True), lower


def clip_logit(factor: torch.Tensor) -> torch.Tensor:
    """The LWC parameter whose sigmoid is ``factor``."""
    return torch.log(factor) - torch.log1p(-factor)


class _TokensByPosition:
    """An expert linear's token weights looked up by the positions of the rows' tokens, not by row order.

    A token the weights were not measured on (the router sent it here only in this pass) weighs 1, the weights'
    mean: its own saliency was never measured at this linear, and 1 keeps the Hessian's scale that of ``X^T X``.
    """

    def __init__(self, positions: torch.Tensor, weights: torch.Tensor) -> None:
        order = positions.argsort()
        self.positions, self.weights = positions[order], weights[order]
        self.measured = positions
        self.seen: list[torch.Tensor] = []
        # Per call, the rows of tokens measured elsewhere; summed once at the end, not read (a device sync) per call.
        self.unmeasured: list[torch.Tensor] = []

    def weights_of(self, positions: torch.Tensor) -> torch.Tensor:
        if self.positions.device != positions.device:
            self.positions, self.weights = self.positions.to(positions.device), self.weights.to(positions.device)
        self.seen.append(positions)
        if not len(self.positions):
            self.unmeasured.append(torch.tensor(len(positions)))
            return torch.ones(len(positions), dtype=self.weights.dtype, device=positions.device)
        index = torch.searchsorted(self.positions, positions).clamp_max(len(self.positions) - 1)
        found = self.positions[index] == positions
        self.unmeasured.append((~found).sum())
        return torch.where(found, self.weights[index], torch.ones_like(self.weights[index]))

    def new_rows(self) -> int:
        return sum(int(count) for count in self.unmeasured)

    def rerouted(self) -> bool:
        seen = torch.cat(self.seen).cpu() if self.seen else torch.zeros(0, dtype=torch.int64)
        return not torch.equal(seen, self.measured.cpu())


def input_hessians(
    modules: Mapping[str, torch.nn.Module],
    run: Callable[[], torch.Tensor],
    token_weights: Mapping[str, torch.Tensor] | None = None,
    optional: Collection[str] = (),
    token_positions: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``X^T X`` (float64 sums) of the inputs each module sees while ``run()`` executes, and its result.

    With ``token_weights`` (per module, one weight per input row in the order ``run`` feeds them) the sums
    are ``X^T diag(w) X``; every module named there must see exactly that many rows. A module in ``optional``
    (an expert's linear: the router may send it no token) that sees no input gets a zero sum; any other is an
    error.

    An expert's tokens can be routed otherwise than when its weights were measured (a near tie in the router).
    With ``token_positions`` (per expert linear, the positions of its weights' tokens, as
    :func:`mobiquant.calibration.saliency.read_token_saliency` gives them) each row takes the weight of its own token,
    found by position (``run`` must run inside :func:`mobiquant.arch.counting_expert_tokens`); a token measured
    elsewhere weighs 1 (the weights' mean), and a warning counts those rows. An optional module without positions
    that sees another number of rows than its weights gets the unweighted sum, with a warning; one that sees as many
    rows can only be trusted to have seen the same tokens.
    """
    optional = set(optional)
    sums: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    rows_seen: dict[str, int] = dict.fromkeys(modules, 0)
    given = token_weights or {}
    by_position: dict[str, _TokensByPosition] = {}
    for name, positions in (token_positions or {}).items():
        if name not in given or name not in modules:
            continue
        if len(positions) != len(given[name]):
            raise ValueError(f"{name} has {len(positions)} token positions for {len(given[name])} token weights")
        by_position[name] = _TokensByPosition(positions, given[name])

    def accumulate(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            start = rows_seen[name]
            rows_seen[name] = start + len(x)
            weighted = x
            if name in by_position:
                positions = expert_token_positions()
                if positions is None or len(positions) != len(x):
                    raise RuntimeError(f"token positions of {name} given, but its rows' positions are unknown: "
                                       "run inside mobiquant.arch.counting_expert_tokens")
                weights = by_position[name].weights_of(positions)
                weighted = x * weights.to(dtype=x.dtype).unsqueeze(1)
            elif name in given:
                if name in optional:
                    plain[name] = plain[name] + x.T @ x if name in plain else x.T @ x
                weights = given[name][start : start + len(x)]
                if len(weights) != len(x):
                    if name in optional:
                        return
                    raise ValueError(f"{name} saw more input rows than its {len(given[name])} token weights")
                weighted = x * weights.to(device=x.device, dtype=x.dtype).unsqueeze(1)
            product = weighted.T @ x
            sums[name] = sums[name] + product if name in sums else product

        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in modules.items()]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    for name in set(optional) & (set(modules) - set(sums)):
        weight = modules[name].weight
        sums[name] = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    missing = set(modules) - set(sums)
    if missing:
        raise RuntimeError(f"no calibration input reached {sorted(missing)}")
    # Without positions, only a changed row count shows that routing changed.
    rerouted = sorted(name for name in optional & (set(given) - set(by_position))
                      if rows_seen[name] != len(given[name]))
    if rerouted:
        log.warning("%d expert linears saw other tokens than their saliencies were measured on (routing changed): "
                    "their tokens weigh alike, e.g. %s", len(rerouted), rerouted[0])
        # An expert that now sees no token keeps its zero sum.
        sums.update({name: plain[name] for name in rerouted if name in plain})
    matched = sorted(name for name, tokens in by_position.items() if tokens.rerouted())
    if matched:
        new_rows = sum(by_position[name].new_rows() for name in matched)
        log.warning("%d expert linears saw other tokens than their saliencies were measured on (routing changed at "
                    "a near tie), e.g. %s: each row keeps its own token's saliency, and their %d rows of tokens "
                    "measured at other experts weigh 1 (the mean)", len(matched), matched[0], new_rows)
    short = sorted(name for name in given if name in modules and name not in optional
                   and rows_seen[name] != len(given[name]))
    if short:
        raise ValueError(f"{short} saw fewer input rows than their token weights")
    return sums, result
