"""Run-time precision: uniform slice counts, routed average-bit budgets, and measuring the bits used.

Each router gives a token one score per residual slice on a slice-major scale
(``mobiquant.layers.ordered_scores``), and slice ``e`` is on for the token where its score exceeds the
layer's threshold. The threshold table of a layer lists, for a grid of average bit-widths, the threshold
that gives that average on calibration data: ``count(scores > t) = tokens * (bits / 2 - 1)`` is a
quantile of the scores, so the table is exact on the data it was built from at every grid point and
interpolated between them. The grid is 0.125 bits apart (0.5 in earlier checkpoints, which load as they
are): a layer's threshold is not linear in bits between points (a layer whose share grows by a whole
slice between two points keeps its lower count over most of the interval), and 0.5 bits apart a budget
between points was spent up to 0.3 bits short. ``set_precision(model, avg_bits=x)`` interpolates every
layer's table at ``x``. By default a layer's table is not built for ``x`` itself but for its share of a
model-wide ``x`` (``mobiquant.allocation``): sensitive layers run above the average, robust ones below,
and the whole model at ``x``.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import logging
import math
import numbers
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from mobiquant.allocation import BISECTION_STEPS, Allocator, layer_cost_curves
from mobiquant.layers import (
    UNCALIBRATED,
    BitMeter,
    MeteredPass,
    MoBiLinear,
    PassMask,
    attach_meters,
    detach_meters,
    ordered_scores,
    pass_stack,
)
from mobiquant.slicing import BITS_PER_SLICE

# Recorded in a checkpoint's quantization_config: what its thresholds are thresholds on.
THRESHOLD_ORDER = "slice-major"
log = logging.getLogger(__name__)
# Where a model keeps the BudgetHold that moves its budget, so that set_precision can release it.
_HOLD_ATTRIBUTE = "_mobiquant_budget_hold"
# Held while a model's precision setting is written (set_precision, a budget hold's start, moves and release), not while
# layers read it: two writers interleaving layer by layer would leave a model half at one setting and half at the other
# for good, and a hold moving its budget as set_precision releases it would write its thresholds over the new setting.
# Reentrant: set_precision and a new hold release the model's hold inside it.
_SETTING_LOCK = threading.RLock()


def mobi_layers(model: nn.Module) -> list[MoBiLinear]:
    layers = [m for m in model.modules() if isinstance(m, MoBiLinear)]
    if not layers:
        raise ValueError("the model has no MoBiQuant layers (is it a MoBiQuant checkpoint?)")
    return layers


def threshold_for_bits(scores: torch.Tensor, bits: float) -> float:
    """The threshold at which the ordered scores ``[tokens, K-1]`` give ``bits`` average bits.

    A whole number of slices per token gets the whole-number threshold, which runs without the router.
    """
    return thresholds_for_bits(scores, [bits])[0]


def thresholds_for_bits(scores: torch.Tensor, bits: list[float]) -> list[float]:
    """``threshold_for_bits`` at each of ``bits``, sorting the scores once for all of them."""
    tokens, gates = scores.shape
    ordered = None
    thresholds = []
    for value in bits:
        wanted = min(max(round(tokens * (value / BITS_PER_SLICE - 1)), 0), tokens * gates)
        if wanted % tokens == 0:
            thresholds.append(float(gates - wanted // tokens))
            continue
        if ordered is None:
            ordered = torch.sort(scores.flatten().double(), descending=True).values
        thresholds.append(float((ordered[wanted - 1] + ordered[wanted]) / 2))
    return thresholds


def calibrate_thresholds(model: nn.Module, samples: torch.Tensor, allocate: bool = True,
                         progress: bool = False) -> None:
    """Fill every routed layer's threshold table so each grid budget is met exactly on ``samples``.

    With ``allocate`` each layer gets its own share of a grid budget from its estimated sensitivity
    (``mobiquant.allocation``); without, every layer runs at the budget itself. For each grid budget
    the calibration set runs once, as one batch; a hook sets each layer's threshold from its own scores
    just before the layer computes, so every layer sees inputs produced by upstream layers already
    routed at that budget.
    """
    layers = [layer for layer in mobi_layers(model) if layer.router is not None]
    if not layers:
        raise ValueError("the model has no routers: only uniform precision (set_precision(slices=k)) applies")
    grid = layers[0].threshold_bits.double().cpu().tolist()
    samples = samples.to(_device(model))
    allocator = Allocator(layer_cost_curves(model, layers, samples, progress=progress)) if allocate else None
    # The grid's ends need no pass: one slice for every token (threshold K - 1) and every slice (0).
    tables = {id(layer): [float(layer.num_slices - 1)] * (len(grid) - 1) + [0.0] for layer in layers}
    points_of_pass = _points_per_pass(grid)
    # Per pass, the layers some calibration token reached: an expert's tokens follow the routing of the blocks
    # before it, which run at the pass's budget, so an expert may be reached at some budgets and not at others.
    reached: dict[int, set[int]] = {index: set() for index in points_of_pass}
    for index, points in tqdm(points_of_pass.items(), desc="router thresholds", unit="budget", disable=not progress,
                              leave=False):
        shares = [_layer_shares(allocator, grid[point], len(layers)) for point in points]
        layer_bits = {id(layer): [share[i] for share in shares] for i, layer in enumerate(layers)}

        def hook(layer: MoBiLinear, args: tuple, index: int = index, points: list[int] = points,
                 layer_bits: dict = layer_bits) -> None:
            reached[index].add(id(layer))
            scores = ordered_scores(layer.router(args[0].reshape(-1, layer.in_features)))
            for point, threshold in zip(points, thresholds_for_bits(scores, layer_bits[id(layer)]), strict=True):
                tables[id(layer)][point] = threshold
            layer.threshold = tables[id(layer)][index]

        handles = [layer.register_forward_pre_hook(hook) for layer in layers]
        try:
            for layer in layers:
                layer.uniform_slices = None
            # The backbone alone: thresholds need no logits, and the whole calibration set's logits would not
            # fit in memory for a large vocabulary.
            with torch.no_grad():
                model.base_model(samples, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    missed = 0
    for layer in layers:
        unreached = [point for index, points in points_of_pass.items() if id(layer) not in reached[index]
                     for point in points]
        # No calibration token reached this layer in the pass of these grid budgets (an expert the router did not
        # choose there): no scores to take quantiles of. It runs each such budget at the nearest whole number of
        # slices, without its router (left alone, it would run them at one slice).
        for point in unreached:
            tables[id(layer)][point] = _whole_slices_threshold(layer, grid[point])
        missed += bool(unreached)
        layer.thresholds = torch.tensor(tables[id(layer)], dtype=torch.float32, device=layer.thresholds.device)
        layer.uniform_slices = layer.stored_slices
    if missed:
        log.warning("%d of %d routed layers saw no calibration token at some or all budgets (experts not routed "
                    "to): they run those budgets at the nearest whole number of slices", missed, len(layers))
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quant, dict):
        quant["threshold_allocation"] = "fisher" if allocate else "same-per-layer"
        quant["threshold_order"] = THRESHOLD_ORDER


def _layer_shares(allocator: Allocator | None, budget: float, count: int) -> list[float]:
    """Each of the ``count`` layers' bits at a grid ``budget``: the allocator's share, or the budget itself.

    A layer no token reached in the allocation's pass (an expert not routed to at full precision) weighs nothing
    there, so any share is free to the allocator, which gives it the fewest bits; the threshold passes, at lower
    budgets, may route tokens to it: it runs them at the budget itself, as without allocation.
    """
    if allocator is None:
        return [budget] * count
    shares = allocator.allocate(budget)
    return [share if curve.params else budget for share, curve in zip(shares, allocator.curves, strict=True)]


def _whole_slices_threshold(layer: MoBiLinear, bits: float) -> float:
    """The whole-number threshold on ordered scores that runs ``layer`` at the slice count nearest ``bits``; a budget
    halfway between two counts (an odd number of bits) takes the higher, at every budget alike."""
    # Not round(): it rounds halves to even, which would take 3 bits up to 2 slices but 5 bits down to 2.
    slices = min(max(math.floor(bits / BITS_PER_SLICE + 0.5), 1), layer.num_slices)
    return float(layer.num_slices - slices)


def _points_per_pass(grid: list[float]) -> dict[int, list[int]]:
    """The grid's inner points grouped by the pass over the calibration set that sets their thresholds.

    One pass per half bit (the grid points at whole multiples of 0.5 bits); a point between takes its
    thresholds from the scores of the nearest such pass, in which the layers upstream run at most 0.25 bits
    away: four times the points for the passes of a 0.5-bit grid.
    """
    inner = list(range(1, len(grid) - 1))
    passes = [i for i in inner if float(grid[i] * 2).is_integer()] or inner
    groups: dict[int, list[int]] = {i: [] for i in passes}
    for point in inner:
        nearest = min(passes, key=lambda i: (abs(grid[i] - grid[point]), i))
        groups[nearest].append(point)
    return groups


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _interpolate(grid: list[float], table: list[float], avg_bits: float) -> float:
    """The threshold of ``table`` (one per bit-width of ``grid``, ascending) at ``avg_bits``, linear between points."""
    position = bisect.bisect_left(grid, avg_bits)
    if position == 0:
        return table[0]
    if position >= len(grid):
        return table[-1]
    low, high = grid[position - 1], grid[position]
    weight = (avg_bits - low) / (high - low)
    return table[position - 1] + weight * (table[position] - table[position - 1])


def _budget_over_held_slices(layers: list[MoBiLinear], tables: list[tuple[list[float], list[float]]],
                             avg_bits: float) -> float:
    """The budget to read the tables at so that a model holding only its first slices spends ``avg_bits``.

    A layer's share of a budget can exceed what it holds (sensitive layers run above the average). On the
    slice-major scale (``ordered_scores``) such a layer's threshold lies below ``K - held``, so every token
    already has the held slices: it runs at exactly ``2 * held`` bits and the model spends less than the
    budget. The tables spend budget ``B`` exactly (on calibration data); a capped layer gives back its bits
    above ``2 * held``, estimated from where its threshold lies in its gate's interval (the share of tokens
    a gate turns on taken in proportion). Raising ``B`` until what is left equals ``avg_bits`` spends the
    bits the capped layers cannot use on the others, in the order the allocation ranks them.
    """
    weights = [layer.in_features * layer.out_features for layer in layers]
    total = sum(weights)

    def spent(budget: float) -> float:
        given_back = 0.0
        for layer, weight, (grid, table) in zip(layers, weights, tables, strict=True):
            threshold = max(_interpolate(grid, table, budget), 0.0)
            if threshold < layer.num_slices - layer.stored_slices:
                given_back += weight * BITS_PER_SLICE * (layer.num_slices - threshold - layer.stored_slices)
        return budget - given_back / total

    low, high = avg_bits, BITS_PER_SLICE * max(layer.num_slices for layer in layers)
    if spent(high) <= avg_bits:
        return high
    for _step in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if spent(middle) < avg_bits:
            low = middle
        else:
            high = middle
    return high


def set_precision(model: nn.Module, avg_bits: float | None = None, slices: int | None = None) -> None:
    """Run ``model`` at ``slices`` slices for every token, or routed at ``avg_bits`` average bits.

    No recalibration: routed budgets move along the threshold tables stored in the checkpoint. A model
    loaded with fewer slices than it was calibrated with (``max_slices``) runs budgets up to what it holds,
    re-allocated over the slices held; that re-allocation estimates what each capped layer gives back, so
    such a model can miss the budget by a few tenths of a bit even on the calibration text (``hold_budget``
    holds it on the text served).
    """
    if (avg_bits is None) == (slices is None):
        raise ValueError("give exactly one of avg_bits= or slices=")
    layers = mobi_layers(model)
    held = min(layer.stored_slices for layer in layers)
    # A refused request leaves the model as it was, a budget hold included: release only once it is accepted.
    if slices is not None:
        if isinstance(slices, bool) or not isinstance(slices, numbers.Integral):
            raise TypeError(f"slices must be a whole number of slices, got {slices!r}")
        if not 1 <= slices <= held:
            raise ValueError(f"slices must be in 1..{held} (slices held in memory), got {slices}")
        with _SETTING_LOCK:
            _release_hold(model)
            for layer in layers:
                layer.uniform_slices = int(slices)
        return
    tables, budget = _routed_budget(layers, avg_bits, held)
    with _SETTING_LOCK:
        _release_hold(model)
        _read_tables(layers, tables, budget)


def _release_hold(model: nn.Module) -> None:
    hold = getattr(model, _HOLD_ATTRIBUTE, None)
    if hold is not None:
        hold.release()


def _routed_budget(layers: list[MoBiLinear], avg_bits: float,
                   held: int) -> tuple[list[tuple[list[float], list[float]]], float]:
    """Every layer's ``(grid, thresholds)`` and the budget to read them at for ``avg_bits``, after checking
    ``avg_bits`` and that the tables can run it."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, numbers.Real):
        raise TypeError(f"avg_bits must be a number of bits such as 3.5, got {type(avg_bits).__name__} {avg_bits!r}")
    top = BITS_PER_SLICE * held
    if not BITS_PER_SLICE <= avg_bits <= top:
        raise ValueError(
            f"avg_bits must be in [{BITS_PER_SLICE}, {top}] ({held} slices held in memory), got {avg_bits}"
        )
    tables = []
    for layer in layers:
        if layer.router is None:
            raise ValueError("this checkpoint has no routers: use set_precision(model, slices=k)")
        table = layer.thresholds.double().tolist()
        lowest = min(table)
        if lowest >= UNCALIBRATED:
            raise ValueError("the router thresholds were never calibrated (run calibrate_thresholds)")
        if lowest < 0.0:
            raise ValueError("these router thresholds are on raw router logits, from a mobiquant before "
                             f"{THRESHOLD_ORDER!r} thresholds: run calibrate_thresholds again")
        tables.append((layer.threshold_bits.double().tolist(), table))
    budget = float(avg_bits)
    if any(layer.stored_slices < layer.num_slices for layer in layers):
        budget = _budget_over_held_slices(layers, tables, budget)
    return tables, budget


def _read_tables(layers: list[MoBiLinear], tables: list[tuple[list[float], list[float]]], budget: float) -> None:
    # The threshold first: a layer that sees its uniform setting gone (MoBiLinear.route) finds the new threshold.
    for layer, (grid, table) in zip(layers, tables, strict=True):
        layer.threshold = _interpolate(grid, table, budget)
        layer.uniform_slices = None


class _PassHooks:
    """Names the hooks one ``track_bits`` block or budget hold put on a model, so each ends only its own passes.

    A copy of the model copies its hooks: a hold's still mark the copy's passes (the copy holds the budget too), a
    tracking block's do nothing (the copy carries no meter of the block). Inert hooks mark no pass; hooks taken off
    (``remove``) turn inert."""

    def __init__(self, follows_copies: bool) -> None:
        self.follows_copies, self.inert = follows_copies, False
        self.handles: list[RemovableHandle] = []

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.inert = not state.get("follows_copies", False)
        # Hooks pickled by earlier versions did not list their handles.
        self.__dict__.setdefault("handles", [])

    def remove(self) -> None:
        self.inert = True
        for handle in self.handles:
            handle.remove()


def _follow_attention_mask(model: nn.Module, follows_copies: bool = False) -> _PassHooks:
    """Hooks marking, in this thread, each forward pass of ``model`` with its 2-D attention mask, so that the layers
    it runs do not count padding: the padding of a batch would move the bits measured (and a held budget) with the
    batch's make-up, though it changes no real token's routing. Passes nest (``mobiquant.layers.pass_stack``)."""
    parameters = list(inspect.signature(model.forward).parameters)
    position = parameters.index("attention_mask") if "attention_mask" in parameters else None
    owner = _PassHooks(follows_copies)
    # Partials of module functions, not closures: a model pickled with its hooks must pickle them.
    owner.handles = [model.register_forward_pre_hook(functools.partial(_begin_pass, owner, position), with_kwargs=True),
                     model.register_forward_hook(functools.partial(_end_pass, owner), always_call=True)]
    return owner


def _begin_pass(owner: _PassHooks, position: int | None, module: nn.Module, args: tuple, kwargs: dict) -> None:
    if owner.inert:
        return
    stack = pass_stack()
    if any(entry.owner is not None and entry.owner.inert for entry in stack):
        # Hooks taken off (a block closed, a hold released) in another thread while this thread ran a pass they began:
        # its end hook went with them. Dropped here, or the thread would keep every such pass (its mask, its kwargs
        # and the cache in them) as long as it lives.
        stack[:] = [entry for entry in stack if entry.owner is None or not entry.owner.inert]
    top = stack[-1] if stack else None
    if top is not None and top.module is module and top.kwargs is kwargs:
        # The same call, already begun by the hooks of another block or hold on this model: the same mask.
        stack.append(MeteredPass(top.mask, module, owner, kwargs))
        return
    mask = kwargs.get("attention_mask")
    if mask is None and position is not None and position < len(args):
        mask = args[position]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        pass_mask = PassMask(mask)
    elif mask is None and top is not None and top.declared and top.module is module:
        pass_mask = top.mask
    else:
        pass_mask = None
    stack.append(MeteredPass(pass_mask, module, owner, kwargs))


def _end_pass(owner: _PassHooks, module: nn.Module, args: tuple, output: object) -> None:
    stack = pass_stack()
    for index in range(len(stack) - 1, -1, -1):
        if stack[index].owner is owner:
            del stack[index]
            return


@contextmanager
def declare_padding(model: nn.Module, attention_mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward pass of ``model`` given no attention mask is metered (``track_bits``,
    ``hold_budget``) as if given ``attention_mask`` (``[batch, tokens]``, 0 for padding); the model itself still
    runs without one. For a caller that pads a batch the model needs no mask for (right padding of a causal model,
    as lm-eval does) but whose padding should not count."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, tokens], got shape {tuple(attention_mask.shape)}")
    stack = pass_stack()
    declaration = MeteredPass(PassMask(attention_mask), model, declared=True)
    stack.append(declaration)
    try:
        yield
    finally:
        for index in range(len(stack) - 1, -1, -1):
            if stack[index] is declaration:
                del stack[index]
                break


def _record_mask(*_args: object, **_kwargs: object) -> None:
    """The mask hook of earlier versions, kept so that a model they pickled with its hooks still loads."""


_forget_mask = _record_mask


class _PassCounts:
    """What one thread's forward pass has spent so far."""

    __slots__ = ("tokens", "weighted_slices", "weighted_tokens")

    def __init__(self) -> None:
        self.weighted_slices = self.weighted_tokens = 0.0
        self.tokens = 0


class _PassMeter:
    """A hold's meter of the forward pass under way in each thread, which also knows the pass's tokens: the most that
    one layer counted.

    Per thread: passes that several threads run at once each move the budget by their own bits (one count for all
    would give the first pass to end the layers the others had run so far, and them the rest). Every token of a pass
    runs through the attention linears, while an expert's linears see only the tokens routed to it: the tokens
    weighted by the layers' sizes, over all the layers' sizes, would undercount a mixture of experts' tokens (in a
    dense model, where every layer counts every token, both are the same)."""

    def __init__(self) -> None:
        self._threads = threading.local()

    def __getstate__(self) -> dict[str, object]:
        # Empty between passes; a copy made inside a pass starts its next pass from nothing.
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._threads = threading.local()

    def _counts(self) -> _PassCounts:
        counts = getattr(self._threads, "counts", None)
        if counts is None:
            counts = self._threads.counts = _PassCounts()
        return counts

    def add(self, slice_sum: float, tokens: int, layer_params: int) -> None:
        counts = self._counts()
        counts.weighted_slices += slice_sum * layer_params
        counts.weighted_tokens += tokens * layer_params
        counts.tokens = max(counts.tokens, tokens)

    def take(self) -> tuple[float, int] | None:
        """The average bits and the tokens of this thread's pass, counted from nothing again; None if it counted no
        token."""
        counts = self._counts()
        if not counts.weighted_tokens:
            return None
        self._threads.counts = _PassCounts()
        return BITS_PER_SLICE * counts.weighted_slices / counts.weighted_tokens, counts.tokens


class BudgetHold:
    """Holds a routed model's measured average bits at ``avg_bits`` on the text it serves (``hold_budget``).

    The threshold tables spend a budget exactly on the text they were fitted on; on text of another domain
    the router scores shift and the same tables spend other bits (docs/quality.md). After every forward pass
    of the model the hold reads the bits that pass spent and moves the budget it reads the tables at by
    ``(avg_bits - spent) * min(1, tokens / horizon_tokens)``: integral feedback whose time constant is about
    ``horizon_tokens`` tokens, whether they come as whole prompts or one decoded token at a time, so the bits
    spent over ``n`` passes miss ``avg_bits`` by at most the budget's range over ``n`` full steps. Causal: a
    pass runs at the budget the passes before it set. The outputs then depend on what the model served
    before; for a fixed model use ``set_precision`` (or fit the thresholds on the serving text, ``mobiquant
    thresholds``). The budget moves between forward passes, so a captured CUDA graph, which freezes the
    thresholds, would not follow it.
    """

    def __init__(self, model: nn.Module, avg_bits: float, horizon_tokens: int = 512) -> None:
        if isinstance(horizon_tokens, bool) or not isinstance(horizon_tokens, numbers.Integral) or horizon_tokens < 1:
            raise ValueError(f"horizon_tokens must be a whole number of tokens >= 1, got {horizon_tokens!r}")
        layers = mobi_layers(model)
        held = min(layer.stored_slices for layer in layers)
        self._tables, self.budget = _routed_budget(layers, avg_bits, held)
        self.model, self.avg_bits, self.horizon_tokens = model, float(avg_bits), int(horizon_tokens)
        self._layers = layers
        # The budget's range: a model holding fewer slices than it was calibrated with reads its tables
        # above what it holds (_budget_over_held_slices).
        self._range = (float(BITS_PER_SLICE), float(BITS_PER_SLICE * max(layer.num_slices for layer in layers)))
        self._this_pass = _PassMeter()
        self.meter = BitMeter()
        self._released = False
        with _SETTING_LOCK:
            _release_hold(model)
            _read_tables(layers, self._tables, self.budget)
            attach_meters(layers, [self._this_pass, self.meter])
            self._pass_hooks = _follow_attention_mask(model, follows_copies=True)
            self._handles = [model.register_forward_hook(self._update), *self._pass_hooks.handles]
            setattr(model, _HOLD_ATTRIBUTE, self)

    def __setstate__(self, state: dict[str, object]) -> None:
        # A copy of the model (copy.deepcopy, pickle, torch.save) copies the hold with it, through the hooks and the
        # attribute that reach it: the copy holds the same budget, from where it stood, on its own. Its layers come
        # without meters (MoBiLinear.__getstate__): give them the copied hold's. (They are whole by now: a hold is
        # reached from the model's hooks, before its modules, and copies them within.)
        self.__dict__.update(state)
        if not isinstance(self._this_pass, _PassMeter):
            # A hold pickled by an earlier version: its pass meter, empty between passes, did not count tokens.
            self._this_pass = _PassMeter()
        if "_pass_hooks" not in state:
            # A hold pickled by an earlier version did not keep its mask hooks' owner: releasing it takes its hooks
            # off (they are among its handles) and turns this stand-in inert.
            self._pass_hooks = _PassHooks(follows_copies=True)
        # A hold pickled by an earlier version did not record a release: it was holding (a released hold's hooks are
        # off the model, which then no longer reaches it).
        self.__dict__.setdefault("_released", False)
        if not self._released:
            attach_meters(self._layers, [self._this_pass, self.meter])

    def _update(self, module: nn.Module, args: tuple, output: object) -> None:
        this_pass = self._this_pass.take()
        if this_pass is None:
            return
        spent, tokens = this_pass
        with _SETTING_LOCK:
            # Released while this pass ran (set_precision in another thread): the model's setting is no longer ours.
            if self._released:
                return
            moved = self.budget + min(1.0, tokens / self.horizon_tokens) * (self.avg_bits - spent)
            self.budget = min(max(moved, self._range[0]), self._range[1])
            _read_tables(self._layers, self._tables, self.budget)

    def release(self) -> None:
        """Stop moving the budget; the model keeps the thresholds of the last one."""
        with _SETTING_LOCK:
            self._released = True
            for handle in self._handles:
                handle.remove()
            self._pass_hooks.remove()
            detach_meters(self._layers, [self._this_pass, self.meter])
            if getattr(self.model, _HOLD_ATTRIBUTE, None) is self:
                delattr(self.model, _HOLD_ATTRIBUTE)

    def __enter__(self) -> BudgetHold:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def hold_budget(model: nn.Module, avg_bits: float, horizon_tokens: int = 512) -> BudgetHold:
    """Run ``model`` routed at ``avg_bits`` and keep its measured average there on whatever text it serves.

    Use as ``with hold_budget(model, 3.0) as hold: ...`` or keep the returned ``BudgetHold`` and ``release()``
    it; ``set_precision`` releases it too. ``hold.meter`` counts the bits spent while it holds. A copy of the model
    (``copy.deepcopy``, pickle) made while it holds holds the same budget on its own, from where it stood.
    """
    return BudgetHold(model, avg_bits, horizon_tokens)


@contextmanager
def track_bits(model: nn.Module) -> Iterator[BitMeter]:
    """Measure the average bits actually used by the tokens that pass through ``model`` inside the block.

    Tokens that a forward pass's 2-D ``attention_mask`` (passed to ``model`` itself) marks as padding do not count.
    The meter counts every pass of ``model`` in the block, whoever runs it: per model, not per request. Blocks
    nest: an outer block also counts the tokens of the blocks inside it. Passes nest too: a pass run inside another
    (from a hook, a draft model) counts with its own mask, and the outer pass keeps its own.
    """
    meter = BitMeter()
    layers = mobi_layers(model)
    attach_meters(layers, [meter])
    pass_hooks = _follow_attention_mask(model)
    try:
        yield meter
    finally:
        pass_hooks.remove()
        detach_meters(layers, [meter])
