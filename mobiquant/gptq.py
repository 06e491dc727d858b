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

Several weights, one pass. Every step above is per row, so weights of one input width (the linears that read
one input) can share the loop: their rows side by side, each row with its own weight's Hessian factor, column
order and group parameters (:func:`nested_codes_many`). The loop's cost is a fixed number of small steps per
column whatever the rows, so on a GPU, where each step is a kernel launch, a shared pass costs about what one
weight's pass does; there each block of columns is also captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
# The finest precision the objective may weigh: its prefixes one weighted precision up are all tried per weight.
MAX_SEARCHED_BITS = 8

# A weight's columns at the positions of one block of the pass, ``[positions, parts]`` (each part has its own
# order) -> the quantizer of those positions: (position in the block, current values of the copies
# ``[copies, rows]``) -> (codes ``[rows]``, the copies' quantized values ``[copies, rows]``).
ColumnQuantizer = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
BlockQuantizer = Callable[[torch.Tensor], ColumnQuantizer]


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


class _Parts:
    """Several weights of one input width in one pass: their rows side by side (``[..., rows]``), each part with
    its own Hessian, column order and factor. A position of the pass is a column of every part, each its own."""

    def __init__(self, weights: Sequence[torch.Tensor], hessians: Sequence[torch.Tensor], damp: float,
                 act_order: bool) -> None:
        in_features = weights[0].shape[1]
        if any(w.shape[1] != in_features or h.shape != (in_features, in_features)
               for w, h in zip(weights, hessians, strict=True)):
            raise ValueError("weights compensated in one pass need one input width and a Hessian of that width each")
        device = weights[0].device
        orders, dampeds = [], []
        for hessian in hessians:
            hessian = hessian.double().to(device)
            order = (torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order
                     else torch.arange(in_features, device=device))
            orders.append(order)
            dampeds.append(damped_hessian(hessian[order][:, order], damp))
        self.orders = torch.stack(orders, dim=1)  # [in, parts]
        self.dampeds = torch.stack(dampeds)  # [parts, in, in], each in its part's order
        self.sizes = [w.shape[0] for w in weights]
        self.bounds = list(itertools.pairwise([0, *itertools.accumulate(self.sizes)]))
        self.row_part = torch.repeat_interleave(torch.arange(len(weights), device=device),
                                                torch.tensor(self.sizes, device=device))
        # [parts, rows], 1 where the row belongs to the part: a product with it spreads per-part entries over the
        # rows exactly, and (unlike an index) in one fast product on the CPU too.
        self.one_hot = torch.nn.functional.one_hot(self.row_part, len(weights)).T.double()
        # [in, 1, rows]: column-major, so a position's column and the rows of the updates are contiguous.
        self.target = torch.cat([w.double().T[o] for w, o in zip(weights, orders, strict=True)], dim=1).unsqueeze(1)

    def pivots(self, matrices: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[end - start, rows]``: each row's part's diagonal entries of ``matrices`` at positions start..end."""
        return matrices.diagonal(dim1=1, dim2=2)[:, start:end].T[:, self.row_part]

    def coupling(self, matrices: torch.Tensor, position: int, end: int) -> torch.Tensor:
        """Row ``position`` of each part's matrix from ``position + 1`` to ``end``, per row: ``[columns, 1, rows]``
        (``[columns, 1, 1]`` with one part, which broadcasts over the rows without a gather)."""
        if len(self.sizes) == 1:
            return matrices[0, position, position + 1 : end, None, None]
        return torch.mm(matrices[:, position, position + 1 : end].T, self.one_hot)[:, None]

    def reach_later(self, tensor: torch.Tensor, matrices: torch.Tensor, start: int, end: int,
                    deltas: torch.Tensor) -> None:
        """``tensor[end:] -= M[end:, start:end] deltas`` per part (``matrices[part, end:, start:end]`` is M): a block's
        changes reach the positions after it."""
        later, copies = len(tensor) - end, tensor.shape[1]
        if later == 0:
            return
        if len(self.sizes) == 1:
            tensor[end:].view(later, -1).addmm_(matrices[0, end:, start:end], deltas.view(end - start, -1),
                                                 alpha=-1.0)
            return
        for part, (low, high) in enumerate(self.bounds):
            change = matrices[part, end:, start:end] @ deltas[:, :, low:high].reshape(end - start, -1)
            tensor[end:, :, low:high] -= change.view(later, copies, high - low)

    def per_part(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., parts]``: sums of ``[..., rows]`` over each part's rows."""
        return torch.stack([rows[..., low:high].sum(dim=-1) for low, high in self.bounds], dim=-1)


def _block_pass(parts: _Parts, quantize: ColumnQuantizer, factors: torch.Tensor, pivots: torch.Tensor,
                errors: torch.Tensor, codes: torch.Tensor, work: torch.Tensor, values: torch.Tensor | None) -> None:
    """GPTQ's pass over one block, every tensor the block's own (``factors`` ``[parts, n, n]``, the rest ``[n, ...]``):
    each position's codes, its scaled error into ``errors``, and the error's update of the block's later positions."""
    size = len(work)
    for position in range(size):
        codes[position], quantized = quantize(position, work[position])
        if values is not None:
            values[position] = quantized
        error = torch.sub(work[position], quantized, out=errors[position])
        error /= pivots[position]
        work[position + 1 :].addcmul_(parts.coupling(factors, position, size), error, value=-1.0)


class _GraphedBlock:
    """:func:`_block_pass` captured once in a CUDA graph and replayed for every block of its size.

    A pass launches some twenty small kernels per column whatever the rows, so on a GPU the host's launches, not
    the arithmetic, set its time; a replay launches a block's thousands of kernels at once. The graph reads and
    writes buffers of its own: each block's inputs are copied in and its results out.
    """

    def __init__(self, parts: _Parts, quantize_block: BlockQuantizer, size: int, copies: int, keep_values: bool):
        rows, count = parts.target.shape[-1], len(parts.sizes)
        options = {"dtype": torch.float64, "device": parts.target.device}
        self.size = size
        self.columns = torch.zeros(size, count, dtype=torch.int64, device=options["device"])
        self.factors = torch.eye(size, **options).repeat(count, 1, 1)
        self.pivots = torch.ones(size, rows, **options)
        self.errors = torch.zeros(size, copies, rows, **options)
        self.codes = torch.zeros(size, rows, dtype=torch.int64, device=options["device"])
        self.work = torch.zeros(size, copies, rows, **options)
        self.values = torch.zeros(size, copies, rows, **options) if keep_values else None

        def run_pass() -> None:
            _block_pass(parts, quantize_block(self.columns), self.factors, self.pivots, self.errors, self.codes,
                        self.work, self.values)

        self.run_pass, self.graph = run_pass, None
        if options["device"].type != "cuda":
            return  # no graphs here: the same buffers, run eagerly
        # Capture needs the pass to have run once outside it, on a side stream (PyTorch's CUDA graph recipe).
        side = torch.cuda.Stream(device=options["device"])
        side.wait_stream(torch.cuda.current_stream(options["device"]))
        with torch.cuda.stream(side):
            run_pass()
        torch.cuda.current_stream(options["device"]).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Thread-local: blocks calibrated in other threads (on this GPU or another) go on allocating and launching
        # while this one captures; the default, global mode would refuse their allocations.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            run_pass()

    def run(self, columns: torch.Tensor, factors: torch.Tensor, pivots: torch.Tensor, codes: torch.Tensor,
            work: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        """One block's pass: its codes (and values) written to ``codes`` (``values``); returns its scaled errors
        (the graph's buffer, valid until the next run)."""
        for buffer, given in ((self.columns, columns), (self.factors, factors), (self.pivots, pivots),
                              (self.work, work)):
            buffer.copy_(given)
        if self.graph is None:
            self.run_pass()
        else:
            self.graph.replay()
        codes.copy_(self.codes)
        if values is not None:
            values.copy_(self.values)
        return self.errors

def compensate_columns(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    quantize_block: BlockQuantizer,
    copies: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    descent_sweeps: int = 0,
    cuda_graphs: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The GPTQ column loop, then ``descent_sweeps`` sweeps of coordinate descent (see the module notes), over
    ``weights`` of one input width at once, each with its own Hessian: each weight's codes ``[out, in]`` (int64)
    and each copy's output error per weight ``[copies, weights]``.

    The weights' rows share every step of the loop (the reason to pass several: a pass costs a number of small
    steps per column, whatever the rows). The error is ``||X (W - Q)^T||^2`` with the damped Hessian, returned
    because it falls out of the loop for free (after sweeps, computed afresh from the final codes). With
    ``cuda_graphs``, GPTQ's pass replays each full block from one CUDA graph captured on the weights' CUDA device
    (the quantizer must then not read the device from the host); elsewhere the same buffers run without a graph.
    """
    if isinstance(descent_sweeps, bool) or not isinstance(descent_sweeps, int) or descent_sweeps < 0:
        raise ValueError(f"descent_sweeps must be a whole number >= 0, got {descent_sweeps!r}")
    parts = _Parts(weights, hessians, damp, act_order)
    # U, the upper Cholesky factor of the damped Hessian's inverse (module notes), per part.
    factors = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(parts.dampeds)), upper=True)
    in_features, _, rows = parts.target.shape
    device = parts.target.device
    work = parts.target.repeat(1, copies, 1)
    codes = torch.empty(in_features, rows, dtype=torch.int64, device=device)
    # The quantized values are kept only for the descent, which starts from them.
    values = torch.empty_like(work) if descent_sweeps else None
    squared_errors = torch.zeros(copies, rows, dtype=torch.float64, device=device)
    graphed = (_GraphedBlock(parts, quantize_block, min(block_size, in_features), copies, values is not None)
               if cuda_graphs else None)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = (codes[start:end], work[start:end], None if values is None else values[start:end])
        if graphed is not None and end - start == graphed.size:
            block_errors = graphed.run(parts.orders[start:end], factors[:, start:end, start:end],
                                       parts.pivots(factors, start, end), *block)
        else:
            block_errors = torch.empty(end - start, copies, rows, dtype=torch.float64, device=device)
            _block_pass(parts, quantize_block(parts.orders[start:end]), factors[:, start:end, start:end],
                        parts.pivots(factors, start, end), block_errors, *block)
        squared_errors += block_errors.pow(2).sum(dim=0)
        parts.reach_later(work, factors.transpose(1, 2), start, end, block_errors)
    errors = parts.per_part(squared_errors)
    if values is not None:
        errors = _descend(parts, values, codes, quantize_block, descent_sweeps, block_size)
    back = torch.argsort(parts.orders, dim=0)
    return [codes[back[:, part], low:high].T.contiguous() for part, (low, high) in enumerate(parts.bounds)], errors


def _descend(parts: _Parts, values: torch.Tensor, codes: torch.Tensor, quantize_block: BlockQuantizer, sweeps: int,
             block_size: int) -> torch.Tensor:
    """Coordinate-descent sweeps over ``codes``/``values`` (``[in, ...]``, in the pass's order), in place.

    Returns each copy's error ``sum_rows e H e^T`` per part after the sweeps, ``[copies, parts]``.
    """
    in_features, copies, rows = values.shape
    hessians = parts.dampeds

    def times_hessian(errors: torch.Tensor) -> torch.Tensor:
        return torch.cat([(hessians[part] @ errors[:, :, low:high].reshape(in_features, -1)).view(
            in_features, copies, high - low) for part, (low, high) in enumerate(parts.bounds)], dim=-1)

    for _sweep in range(sweeps):
        gradient = times_hessian(parts.target - values)
        for start in range(0, in_features, block_size):
            end = min(start + block_size, in_features)
            quantize = quantize_block(parts.orders[start:end])
            pivots = parts.pivots(hessians, start, end)
            # A change of a value is minus the change of its error: the gradient moves by -change H.
            changes = torch.empty(end - start, copies, rows, dtype=torch.float64, device=values.device)
            for position in range(start, end):
                aim = torch.addcdiv(values[position], gradient[position], pivots[position - start])
                codes[position], quantized = quantize(position - start, aim)
                torch.sub(quantized, values[position], out=changes[position - start])
                values[position] = quantized
                gradient[position + 1 : end].addcmul_(parts.coupling(hessians, position, end),
                                                       changes[position - start], value=-1.0)
            parts.reach_later(gradient, hessians, start, end, changes)
    errors = parts.target - values
    return parts.per_part((errors * times_hessian(errors)).sum(dim=0))


def _check_objective(bit_weights: Mapping[int, float], code_bits: int) -> dict[int, float]:
    """The weighted precisions (bits -> positive weight) of ``bit_weights``, or a ValueError."""
    weighted = {int(b): float(w) for b, w in bit_weights.items() if w > 0}
    if not weighted or min(bit_weights.values()) < 0:
        raise ValueError(f"bit_weights must map precisions to non-negative weights, not all zero; "
                         f"got {dict(bit_weights)}")
    if min(weighted) < 1 or max(weighted) > min(code_bits, MAX_SEARCHED_BITS):
        raise ValueError(f"weighted precisions must lie in 1..{min(code_bits, MAX_SEARCHED_BITS)} bits, "
                         f"got {sorted(weighted)}")
    return weighted


def _check_gains(weight: torch.Tensor, weighted: Mapping[int, float],
                 row_gains: Mapping[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
    gains = {int(b): g.double().to(weight.device) for b, g in (row_gains or {}).items()}
    if not set(gains) <= set(weighted):
        raise ValueError(f"row gains apply to weighted precisions only ({sorted(weighted)}), got {sorted(gains)}")
    if any(g.shape != weight.shape[:1] or not bool(torch.isfinite(g).all()) for g in gains.values()):
        raise ValueError(f"row gains must be finite, one per output row ({weight.shape[0]})")
    if max(weighted) in gains and not bool((gains[max(weighted)] > 0).all()):
        raise ValueError("the finest weighted precision's row gains must be positive (its codes aim through them)")
    return gains


def shared_pass_key(in_features: int, bit_weights: Mapping[int, float]) -> tuple[int, tuple[int, ...], float]:
    """What weights must share to have their codes chosen in one pass of :func:`nested_codes_many`: the input
    width, the weighted precisions and the finest one's weight (the coarser weights may differ)."""
    weighted = {int(b): float(w) for b, w in bit_weights.items() if w > 0}
    return in_features, tuple(sorted(weighted)), weighted[max(weighted)] if weighted else 0.0


def shared_passes(shapes: Sequence[tuple[int, int]], objectives: Sequence[Mapping[int, float]],
                  budget: float = 2.0) -> list[list[int]]:
    """Indices of the weights (``[out, in]`` shapes, their objectives: precision -> weight, in bits or in slices
    alike) to compensate together, in order.

    Weights with one :func:`shared_pass_key` join a pass while its weights hold at most ``budget`` times the
    elements of the largest weight given: a pass's working memory grows with its rows, so the budget keeps it
    within a small multiple of what the largest weight alone needs.
    """
    limit = budget * max(out * inp for out, inp in shapes)
    passes: dict[tuple, list[list[int]]] = {}
    for index, ((out, inp), objective) in enumerate(zip(shapes, objectives, strict=True)):
        open_passes = passes.setdefault(shared_pass_key(inp, objective), [[]])
        if open_passes[-1] and sum(shapes[i][0] for i in open_passes[-1]) * inp + out * inp > limit:
            open_passes.append([])
        open_passes[-1].append(index)
    return sorted((indices for group in passes.values() for indices in group), key=min)


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
    return nested_codes_many([weight], [hessian], [scale], [zero], code_bits, [bit_weights], block_size, damp,
                             act_order, [row_gains], descent_sweeps)[0]


def nested_codes_many(
    weights: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    zeros: Sequence[torch.Tensor],
    code_bits: int,
    bit_weights: Sequence[Mapping[int, float]],
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    row_gains: Sequence[Mapping[int, torch.Tensor] | None] | None = None,
    descent_sweeps: int = 0,
    cuda_graphs: bool = False,
) -> list[tuple[torch.Tensor, dict[int, float]]]:
    """:func:`nested_codes` of several weights in one pass: the same codes and errors as one call each.

    The weights share one :func:`shared_pass_key` (an input width, the weighted precisions, the finest one's
    weight); each has its own Hessian, group parameters, coarser weights and row gains. A pass costs a number
    of small steps per column whatever its rows, so on a GPU one pass for the linears reading one input is
    several times faster than one pass each (:func:`shared_passes` groups them). ``cuda_graphs``: see
    :func:`compensate_columns`.
    """
    row_gains = list(row_gains) if row_gains is not None else [None] * len(weights)
    if not weights or not len(weights) == len(hessians) == len(scales) == len(zeros) == len(bit_weights) == len(
            row_gains):
        raise ValueError("nested_codes_many needs one Hessian, scale, zero, objective and gains entry per weight")
    objectives = [_check_objective(objective, code_bits) for objective in bit_weights]
    keys = {shared_pass_key(w.shape[1], objective) for w, objective in zip(weights, objectives, strict=True)}
    if len(keys) > 1:
        raise ValueError(f"weights in one pass need one input width, weighted precisions and finest weight; "
                         f"got {sorted(keys)}")
    gains = [_check_gains(w, objective, g) for w, objective, g in zip(weights, objectives, row_gains, strict=True)]
    device = weights[0].device
    options = {"dtype": torch.float64, "device": device}
    precisions = sorted(objectives[0])
    finest, coarser = precisions[-1], len(precisions) - 1
    finest_weight = objectives[0][finest]
    group_size = weights[0].shape[1] // scales[0].shape[1]

    # Candidates: every code of the second finest weighted precision (one empty prefix if only one is
    # weighted). Below such a prefix only the finest term varies, a convex quadratic in the code, so its
    # best finest code is the nearest level clamped into the prefix's interval: exact, at a quarter of
    # the cost of trying every finest code for the default 2/4/6/8-bit weights.
    coarse = precisions[-2] if coarser else 0
    prefixes = torch.arange(2**coarse, device=device)
    span = 2 ** (finest - coarse)
    lowest, highest = prefixes * span, prefixes * span + span - 1
    steps = torch.tensor([2.0 ** (b - 2) for b in precisions], **options)
    # Every weighted precision's coordinate for every finest code, so the chosen codes' values are one lookup;
    # a candidate prefix's coarser coordinates are those of the lowest finest code below it.
    code_coordinates = ((torch.arange(2**finest, device=device)[None] >> torch.tensor(
        [finest - b for b in precisions], device=device)[:, None]).double() + 0.5) / steps[:, None]
    coordinates = code_coordinates[:coarser, lowest]
    candidate_terms = torch.cat([coordinates.pow(2), coordinates])

    # Each precision's value is affine in its grid coordinate a = (code + 0.5) / 2^(b-2): alpha a + beta, with
    # alpha = g s and beta = C (1 - g) - g s z per row (g = 1 without a gain, C = s (2 - z) the group's centre).
    # A coarser term lambda (alpha a + beta - x)^2 is, up to a constant the argmin ignores,
    # [lambda alpha^2, -2 lambda alpha (x - beta)] . [a^2, a]: every candidate's coarser terms are one product
    # [rows, 2 * coarser] @ [2 * coarser, candidates]. The finest term in its own code c is
    # alpha_f (c + 0.5) / 2^(f-2) + beta_f - x: a slope and an intercept. All of it per group and row, the
    # parts' rows side by side: [groups, fields, rows] with the fields below.
    def grid_fields(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, objective: Mapping[int, float],
                    gain: Mapping[int, torch.Tensor]) -> torch.Tensor:
        scale, zero = scale.double().to(device), zero.double().to(device)
        gain_rows = torch.stack([gain.get(b, torch.ones(weight.shape[0], **options)) for b in precisions])
        alphas = (gain_rows[:, :, None] * scale).permute(2, 0, 1)
        betas = (scale * (2.0 - zero) * (1.0 - gain_rows[:, :, None])).permute(2, 0, 1) - alphas * zero.T[:, None]
        lambdas = torch.tensor([objective[b] for b in precisions[:-1]], **options)[None, :, None]
        slope = alphas[:, -1:] / steps[-1]
        return torch.cat([alphas, betas, lambdas * alphas[:, :-1].pow(2), -2.0 * lambdas * alphas[:, :-1], slope,
                          slope * 0.5 + betas[:, -1:], scale.T[:, None], zero.T[:, None]], dim=1)

    fields = torch.cat([grid_fields(*problem) for problem in zip(weights, scales, zeros, objectives, gains,
                                                                   strict=True)], dim=-1)
    count = len(precisions)
    alpha_at, beta_at, squared_at, linear_at = 0, count, 2 * count, 3 * count - 1
    slope_at, offset_at, scale_at, zero_at = 4 * count - 2, 4 * count - 1, 4 * count, 4 * count + 1
    sizes = torch.tensor([w.shape[0] for w in weights], device=device)
    row_part = torch.repeat_interleave(torch.arange(len(weights), device=device), sizes)

    def quantize_block(columns: torch.Tensor) -> ColumnQuantizer:
        # Each row's own group at each position of the block, gathered once: [positions, fields, rows].
        groups = (columns // group_size)[:, row_part]
        block = fields.gather(0, groups[:, None].expand(-1, fields.shape[1], -1))

        def quantize(position: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            grid = block[position]
            alpha, beta, slope = grid[alpha_at:beta_at], grid[beta_at:squared_at], grid[slope_at]
            coarser_rows = torch.cat([grid[squared_at:linear_at],
                                      grid[linear_at:slope_at] * (values[:coarser] - beta[:coarser])])
            # The finest precision's nearest code to its target (a positive gain keeps the value increasing in
            # the code), clamped into each candidate's interval.
            nearest = torch.floor((values[coarser] - beta[coarser]) / slope)[:, None]
            leaves = torch.clamp(nearest, lowest, highest)
            miss = torch.addcmul((grid[offset_at] - values[coarser])[:, None], leaves, slope[:, None])
            total = torch.mm(coarser_rows.T, candidate_terms).addcmul_(miss, miss, value=finest_weight)
            best = leaves.gather(-1, torch.argmin(total, dim=-1, keepdim=True)).squeeze(-1).to(torch.int64)
            quantized = torch.addcmul(beta, alpha, code_coordinates[:, best])
            if code_bits == finest:
                return best, quantized
            # The unweighted finer bits: the nearest level to their own copy inside the chosen code's interval.
            s, z = grid[scale_at], grid[zero_at]
            spread = 2 ** (code_bits - finest)
            nearest = torch.floor((values[-1] / s + z) * 2.0 ** (code_bits - 2))
            codes = torch.minimum(torch.maximum(nearest, (best * spread).double()),
                                  (best * spread + spread - 1).double())
            finer = s * ((codes + 0.5) / 2.0 ** (code_bits - 2) - z)
            return codes.to(torch.int64), torch.cat([quantized, finer[None]])

        return quantize

    tracked = precisions if code_bits == finest else [*precisions, code_bits]
    codes, errors = compensate_columns(weights, hessians, quantize_block, len(tracked), block_size, damp, act_order,
                                       descent_sweeps, cuda_graphs)
    return [(part_codes, dict(zip(tracked, errors[:, part].tolist(), strict=True)))
            for part, part_codes in enumerate(codes)]


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

    def quantize_block(columns: torch.Tensor) -> ColumnQuantizer:
        groups = (columns[:, 0] // group_size).tolist()

        def quantize(position: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s, z = scale[:, groups[position]], zero[:, groups[position]]
            codes = torch.clamp(torch.round(values[0] / s) + z, 0, top)
            return codes.to(torch.int64), ((codes - z) * s).unsqueeze(0)

        return quantize

    (codes,), _ = compensate_columns([weight], [hessian], quantize_block, 1, block_size, damp, act_order)
    s = scale.repeat_interleave(group_size, dim=-1)
    z = zero.repeat_interleave(group_size, dim=-1)
    return ((codes.double() - z) * s).to(weight.dtype)
