"""Error-compensated codes (GPTQ) for fixed group parameters, optimised for several precisions at once.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), in the notation used below. A linear with calibration inputs ``X`` and
``H = X^T X + damp * mean(diag(H)) * I`` leaves, for a quantized weight ``Q``, the output error

    ||X (W - Q)^T||^2  =  sum over rows r of  (w_r - q_r) H (w_r - q_r)^T.

Columns are quantized one at a time. Once column ``i`` is fixed at ``q_i``, the columns not yet
quantized (set ``F``) absorb its error optimally (Optimal Brain Surgeon):
``W[:, F] -= (w_i - q_i) [H_F^-1]_{i,F} / [H_F^-1]_{ii}``, and that step costs
``||w_i - q_i||^2 / [H_F^-1]_{ii}``. With ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``),
row ``i`` of ``U`` from column ``i`` on is exactly ``[H_F^-1]_{i,F} / sqrt([H_F^-1]_{ii})`` for the
columns ``F = {i, i+1, ...}`` still open (GPTQ, section 3, "Cholesky reformulation"). So with
``e_i = (w_i - q_i) / U_ii`` the update is ``W[:, i:] -= e_i U[i, i:]``, and the costs telescope:

    ||X (W - Q)^T||^2  =  sum_i ||e_i||^2      (w_i: column i's value when it is quantized).

Lazy batches (GPTQ's "lazy batch-updates"): a column's update reaches the columns of its own block of
``block_size`` at once and the rest of the matrix once per block as one product ``E U[block, rest]``,
which gives the same result with far fewer passes over ``W``. Activation order quantizes the columns
with the largest ``H_ii`` first, while the most columns are left to absorb their error. The group
parameters are fixed before the columns are visited, so a column reads its own group's scale and zero
whatever the order.

Several precisions from one nested code (this project's MoBiSlice format, or MatGPTQ's "sliceable"
formats, arXiv 2602.03537): the code at ``b`` bits is the top ``b`` bits of the stored code, so one
choice per weight fixes every precision. Keeping one working copy ``W^(b)`` per weighted precision,
each corrected by its own error, the identity above holds for every copy, and the weighted output error
``sum_b lambda_b ||X (W - Q_b)^T||^2`` is the sum over columns of ``sum_b lambda_b ||e_i^(b)||^2``. Column
``i``'s choice enters only its own term (``U_ii`` is shared by all copies), so each weight's code is
chosen to minimise ``sum_b lambda_b (w_i^(b) - q_b(c))^2``, exactly over every code of the finest
weighted precision (every prefix is tried; the finest bits below a prefix have a closed-form best).
With one precision weighted this is plain GPTQ (round to nearest). MatGPTQ corrects one shared copy
by the precisions' mean error instead; measured worse on this format (issue 16).

Coordinate descent after the pass (QuantEase: Behdin et al., "QuantEase: Optimization-based Quantization
for Language Models", 2023). GPTQ fixes each column once, against the columns still open, and never
revisits it. With every other column fixed, a row's error ``e = w - q`` enters the objective through
column ``i`` as ``H_ii e_i^2 + 2 e_i sum_{j != i} H_ij e_j``, so column ``i``'s best value is the target

    q_i + (e H)_i / H_ii          (the current value plus the error's gradient over the curvature),

one per copy, and its code is chosen for those targets exactly as in the pass (``H_ii`` is shared by all
copies). A sweep visits every column in the pass's order; each step lowers the weighted objective or leaves
it, and ``G = E H`` is kept current with GPTQ's lazy blocks (a column's change reaches the rest of its
block at once and the later columns once per block). The pass's greedy choices weigh the finer
precisions' accurate copies against the coarser ones' large errors only column by column; the sweeps
trade them over the whole row (docs/method.md has what they move).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
# The finest precision the objective may weigh: its prefixes one weighted precision up are all tried per weight.
MAX_SEARCHED_BITS = 8

# (column index in the weight's own order, current values of the copies [copies, out])
#   -> (codes [out], the copies' quantized values [copies, out])
ColumnQuantizer = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def damped_hessian(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64, the Hessian every error here is measured with.

    A column no input ever reaches (``H_ii = 0``) gets ``H_ii = 1``: its weight cannot change the output,
    and the unit diagonal keeps ``H`` invertible without moving any other column.
    """
    damped = hessian.double().clone()
    diagonal = damped.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    return damped


def compensate_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: ColumnQuantizer,
    copies: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    descent_sweeps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column loop, then ``descent_sweeps`` sweeps of coordinate descent (see the module notes): codes
    ``[out, in]`` (int64) and each copy's output error ``[copies]``.

    The error is ``||X (W - Q)^T||^2`` with the damped Hessian, returned because it falls out of the loop
    for free (after sweeps, computed afresh from the final codes).
    """
    if isinstance(descent_sweeps, bool) or not isinstance(descent_sweeps, int) or descent_sweeps < 0:
        raise ValueError(f"descent_sweeps must be a whole number >= 0, got {descent_sweeps!r}")
    hessian = hessian.double()
    order = (torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(hessian.shape[0], device=hessian.device))
    damped = damped_hessian(hessian[order][:, order], damp)
    # U, the upper Cholesky factor of the damped Hessian's inverse (module notes).
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    out_features, in_features = weight.shape
    # Column-major working copies [in, copies, out]: the column being quantized and the rows of the updates
    # below are contiguous.
    target = weight.double().T[order].unsqueeze(1)
    work = target.repeat(1, copies, 1)
    codes = torch.empty(in_features, out_features, dtype=torch.int64, device=weight.device)
    values = torch.empty_like(work)
    errors_sum = torch.zeros(copies, dtype=torch.float64, device=weight.device)
    columns = order.tolist()
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block_errors = torch.empty(end - start, copies, out_features, dtype=torch.float64, device=weight.device)
        for position in range(start, end):
            codes[position], values[position] = quantize_column(columns[position], work[position])
            error = torch.sub(work[position], values[position], out=block_errors[position - start])
            error /= factor[position, position]
            work[position + 1 : end].addcmul_(factor[position, position + 1 : end, None, None], error, value=-1.0)
        errors_sum += block_errors.pow(2).sum(dim=(0, 2))
        work[end:].view(in_features - end, copies * out_features).addmm_(
            factor[start:end, end:].T, block_errors.view(end - start, -1), alpha=-1.0)
    if descent_sweeps:
        errors_sum = _descend(target, values, codes, damped, columns, quantize_column, descent_sweeps, block_size)
    return codes[torch.argsort(order)].T.contiguous(), errors_sum


def _descend(target: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, damped: torch.Tensor,
             columns: list[int], quantize_column: ColumnQuantizer, sweeps: int, block_size: int) -> torch.Tensor:
    """Coordinate-descent sweeps over ``codes``/``values`` (``[in, ...]``, in the pass's order), in place.

    ``target`` is the weight ``[in, 1, out]``, ``damped`` the damped Hessian in the same order. Returns each
    copy's error ``sum_rows e H e^T`` after the sweeps.
    """
    in_features, copies, out_features = values.shape
    for _sweep in range(sweeps):
        errors = target - values
        gradient = (damped @ errors.view(in_features, -1)).view_as(errors)
        for start in range(0, in_features, block_size):
            end = min(start + block_size, in_features)
            # A change of a value is minus the change of its error: the gradient moves by -change H.
            changes = torch.empty(end - start, copies, out_features, dtype=torch.float64, device=values.device)
            for position in range(start, end):
                aim = torch.addcdiv(values[position], gradient[position], damped[position, position])
                codes[position], quantized = quantize_column(columns[position], aim)
                torch.sub(quantized, values[position], out=changes[position - start])
                values[position] = quantized
                gradient[position + 1 : end].addcmul_(damped[position, position + 1 : end, None, None],
                                                       changes[position - start], value=-1.0)
            gradient[end:].view(in_features - end, copies * out_features).addmm_(
                damped[end:, start:end], changes.view(end - start, -1), alpha=-1.0)
    errors = target - values
    return (errors * (damped @ errors.view(in_features, -1)).view_as(errors)).sum(dim=(0, 2))


def nested_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    code_bits: int,
    bit_weights: Mapping[int, float],
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    row_gains: Mapping[int, torch.Tensor] | None = None,
    descent_sweeps: int = 0,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Codes ``c`` of ``code_bits`` bits (int64 ``[out, in]``) on the floor-aligned grid, and each precision's error.

    The grid is MoBiSlice's (``mobiquant.slicing``): with the group's ``scale`` ``s`` and ``zero`` ``z``
    (``[out, in // group_size]``, used as given), the code at ``b`` bits is ``c >> (code_bits - b)`` and
    stands for ``s * ((c_b + 0.5) / 2^(b-2) - z)``; ``b = 2k`` is ``k`` slices, and an odd ``b`` is a grid
    of its own (3 bits: 8 levels) for a single-precision control. ``bit_weights`` maps precisions (bits) to
    the weight of their output error. Bits below the finest weighted precision are not in the objective:
    they round a copy of their own at ``code_bits``, compensated by its own error, inside the interval the
    weighted precisions chose (the weighted copies' corrections answer other errors than its own).
    ``row_gains`` maps weighted precisions to per-row gains ``[out]`` (positive at the finest): such a precision's value
    is ``C + g (v - C)`` with ``C = s (2 - z)`` the group's centre (``mobiquant.slicing.fit_row_gains``), so
    the codes are chosen for the weight the checkpoint will compute with. ``descent_sweeps`` sweeps of
    coordinate descent follow GPTQ's pass (module notes). Returns ``(codes, {bits: ||X (W - Q_bits)^T||^2})``
    with the damped Hessian, for every weighted precision and ``code_bits``.
    """
    weighted = {int(b): float(w) for b, w in bit_weights.items() if w > 0}
    if not weighted or min(bit_weights.values()) < 0:
        raise ValueError(f"bit_weights must map precisions to non-negative weights, not all zero; "
                         f"got {dict(bit_weights)}")
    finest = max(weighted)
    if min(weighted) < 1 or finest > min(code_bits, MAX_SEARCHED_BITS):
        raise ValueError(f"weighted precisions must lie in 1..{min(code_bits, MAX_SEARCHED_BITS)} bits, "
                         f"got {sorted(weighted)}")
    gains = {int(b): g.double().to(weight.device) for b, g in (row_gains or {}).items()}
    if not set(gains) <= set(weighted):
        raise ValueError(f"row gains apply to weighted precisions only ({sorted(weighted)}), got {sorted(gains)}")
    if any(g.shape != weight.shape[:1] or not bool(torch.isfinite(g).all()) for g in gains.values()):
        raise ValueError(f"row gains must be finite, one per output row ({weight.shape[0]})")
    if max(weighted) in gains and not bool((gains[max(weighted)] > 0).all()):
        raise ValueError("the finest weighted precision's row gains must be positive (its codes aim through them)")
    group_size = weight.shape[1] // scale.shape[1]
    scale, zero = scale.double(), zero.double()
    precisions = sorted(weighted)
    coarser = len(precisions) - 1
    options = {"dtype": torch.float64, "device": weight.device}

    # Candidates: every code of the second finest weighted precision (one empty prefix if only one is
    # weighted). Below such a prefix only the finest term varies, a convex quadratic in the code, so its
    # best finest code is the nearest level clamped into the prefix's interval: exact, at a quarter of
    # the cost of trying every finest code for the default 2/4/6/8-bit weights.
    coarse = precisions[-2] if coarser else 0
    prefixes = torch.arange(2**coarse, device=weight.device)
    span = 2 ** (finest - coarse)
    lowest, highest = prefixes * span, prefixes * span + span - 1
    # Each precision's value is affine in its grid coordinate a = (code + 0.5) / 2^(b-2): alpha a + beta, with
    # alpha = g s and beta = C (1 - g) - g s z per row (g = 1 without a gain, C = s (2 - z) the group's centre).
    # A coarser term lambda (alpha a + beta - x)^2 is, up to a constant the argmin ignores,
    # [lambda alpha^2, -2 lambda alpha (x - beta)] . [a^2, a]: every candidate's coarser terms are one product
    # [rows, 2 * coarser] @ [2 * coarser, candidates]. Per group and precision, [groups, precisions, rows]:
    steps = torch.tensor([2.0 ** (b - 2) for b in precisions], **options)
    row_gains_all = torch.stack([gains.get(b, torch.ones(weight.shape[0], **options)) for b in precisions])
    alphas = (row_gains_all[:, :, None] * scale).permute(2, 0, 1).contiguous()
    betas = (scale * (2.0 - zero) * (1.0 - row_gains_all[:, :, None])).permute(2, 0, 1) - alphas * zero.T[:, None]
    lambdas = torch.tensor([weighted[b] for b in precisions[:-1]], **options)[None, :, None]
    squared_coefficients = lambdas * alphas[:, :-1].pow(2)
    linear_coefficients = -2.0 * lambdas * alphas[:, :-1]
    # Every weighted precision's coordinate for every finest code, so the chosen codes' values are one lookup;
    # a candidate prefix's coarser coordinates are those of the lowest finest code below it.
    code_coordinates = ((torch.arange(2**finest, device=weight.device)[None] >> torch.tensor(
        [finest - b for b in precisions], device=weight.device)[:, None]).double() + 0.5) / steps[:, None]
    coordinates = code_coordinates[:coarser, lowest]
    candidate_terms = torch.cat([coordinates.pow(2), coordinates])
    # The finest term in its own code c: alpha_f (c + 0.5) / 2^(f-2) + beta_f - x, slope and intercept per group.
    finest_slopes = alphas[:, -1] / steps[-1]
    finest_offsets = finest_slopes * 0.5 + betas[:, -1]

    def quantize_column(column: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = column // group_size
        alpha, beta, slope = alphas[group], betas[group], finest_slopes[group]
        coarser_rows = torch.cat([squared_coefficients[group],
                                  linear_coefficients[group] * (values[:coarser] - beta[:coarser])])
        # The finest precision's nearest code to its target (a positive gain keeps the value increasing in the
        # code), clamped into each candidate's interval.
        nearest = torch.floor((values[coarser] - beta[coarser]) / slope)[:, None]
        leaves = torch.clamp(nearest, lowest, highest)
        miss = torch.addcmul((finest_offsets[group] - values[coarser])[:, None], leaves, slope[:, None])
        total = torch.mm(coarser_rows.T, candidate_terms).addcmul_(miss, miss, value=weighted[finest])
        best = leaves.gather(-1, torch.argmin(total, dim=-1, keepdim=True)).squeeze(-1).to(torch.int64)
        quantized = torch.addcmul(beta, alpha, code_coordinates[:, best])
        if code_bits == finest:
            return best, quantized
        # The unweighted finer bits: the nearest level to their own copy inside the chosen code's interval.
        s, z = scale[:, group], zero[:, group]
        spread = 2 ** (code_bits - finest)
        nearest = torch.floor((values[-1] / s + z) * 2.0 ** (code_bits - 2))
        codes = torch.minimum(torch.maximum(nearest, (best * spread).double()), (best * spread + spread - 1).double())
        finer = s * ((codes + 0.5) / 2.0 ** (code_bits - 2) - z)
        return codes.to(torch.int64), torch.cat([quantized, finer[None]])

    tracked = precisions if code_bits == finest else [*precisions, code_bits]
    codes, errors = compensate_columns(weight, hessian, quantize_column, len(tracked), block_size, damp, act_order,
                                       descent_sweeps)
    return codes, dict(zip(tracked, errors.tolist(), strict=True))


def minmax_gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ as users run it by default: asymmetric min-max groups, round to nearest; the dequantized weight.

    The grid is RTN's (``mobiquant.evaluation.rtn_quantize``): ``scale = (max - min) / (2^bits - 1)``,
    ``zero = round(-min / scale)``, value ``(q - zero) * scale``, groups fixed from the weight before
    any column moves (GPTQ's static groups, so activation order keeps one grid per group).
    """
    out_features, in_features = weight.shape
    grouped = weight.double().reshape(out_features, in_features // group_size, group_size)
    w_min, w_max = grouped.amin(dim=-1), grouped.amax(dim=-1)
    top = 2**bits - 1
    floor = torch.clamp(torch.maximum(w_max.abs(), w_min.abs()) * 2.0**-16, min=torch.finfo(torch.float64).tiny)
    scale = torch.maximum((w_max - w_min) / top, floor)
    zero = torch.round(-w_min / scale)

    def quantize_column(column: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = scale[:, column // group_size], zero[:, column // group_size]
        codes = torch.clamp(torch.round(values[0] / s) + z, 0, top)
        return codes.to(torch.int64), ((codes - z) * s).unsqueeze(0)

    codes, _ = compensate_columns(weight, hessian, quantize_column, 1, block_size, damp, act_order)
    s = scale.repeat_interleave(group_size, dim=-1)
    z = zero.repeat_interleave(group_size, dim=-1)
    return ((codes.double() - z) * s).to(weight.dtype)
