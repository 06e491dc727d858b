"""The elastic linear layer and its per-token router (MoBiRoute).

A token routed to ``k`` slices gets ``y = x @ W_k^T + b``. The PyTorch path groups tokens by slice
count and runs one dense product per group with ``W_k`` rebuilt from the codes; on CUDA tensors the
NVRTC kernels of ``mobiquant.kernels`` take over unless ``MOBIQUANT_KERNELS=off``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mobiquant.slicing import (
    BITS_PER_SLICE,
    PARAM_DTYPE,
    WORD_BITS,
    SlicedWeight,
    check_num_slices,
    dequantize_codes,
    unpack_codes,
)

# Fills a threshold table that was never calibrated; as a threshold it leaves every residual slice off.
UNCALIBRATED = 1.0e9
# MoBiLinear buffers whose dtype is part of the checkpoint format. A cast of the whole model (``.to(torch.bfloat16)``,
# ``.half()``) moves them but keeps their dtype, as loading with a ``dtype`` does: recast, a later save would write
# them rounded. The forward pass casts them where it uses them.
FIXED_DTYPE_BUFFERS = ("scale", "zero", "gains", "threshold_bits", "thresholds")


class MoBiRouter(nn.Module):
    """Two-layer MLP giving one logit per residual slice (slice 1 is always on).

    The MLP sees the token's direction (``x`` RMS-normalised: its scale varies by orders of magnitude
    across layers); its scale enters through ``norm_weight * log(rms(x)^2)``. The output error a
    truncated weight leaves grows as ``|x|^2``, so ``norm_weight`` starts at 1: a token's logits then
    move with the log of the error it would keep, whatever its norm.
    """

    def __init__(self, in_features: int, num_slices: int, hidden: int = 32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        # With ``generator``: nn.Linear's initialisation, drawn from it instead of torch's global generator, which
        # blocks calibrated in threads of one process share (a router would depend on what other threads drew).
        # Same draws in the same order: seeded as the global one was, it gives the router a block calibrated
        # alone got.
        device = "meta" if generator is not None else None
        self.fc1 = nn.Linear(in_features, hidden, device=device)
        self.fc2 = nn.Linear(hidden, num_slices - 1, device=device)
        self.act = nn.SiLU()
        self.norm_weight = nn.Parameter(torch.ones(num_slices - 1))
        if generator is not None:
            for linear in (self.fc1, self.fc2):
                linear.to_empty(device="cpu")
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(linear.in_features)
                nn.init.uniform_(linear.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / x.shape[-1] + 1e-6
        # fc1 is linear: scaling its small output row by row equals feeding it the normalised x, without
        # writing a normalised copy of x (on CPU that copy cost more than the router's products).
        projected = F.linear(x, self.fc1.weight.float())
        hidden = torch.addcmul(self.fc1.bias.float(), projected, torch.rsqrt(mean_square))
        logits = self.fc2(self.act(hidden).to(self.fc2.weight.dtype)).float()
        return logits + self.norm_weight.float() * mean_square.log()


def gate_scores(logits: torch.Tensor) -> torch.Tensor:
    """Nested gate scores: slice ``e`` can be on only if slices ``2..e-1`` are, so use the prefix minimum."""
    return torch.cummin(logits, dim=-1).values


def ordered_scores(logits: torch.Tensor) -> torch.Tensor:
    """Gate scores on one slice-major scale: every token's gate ``e`` ranks above every token's gate ``e+1``.

    With ``K - 1`` gates, gate ``e`` (column ``e - 2``) maps its nested score into the open interval
    ``(K - e, K - e + 1)`` by an order-keeping squash. One threshold ``t`` in ``[0, K - 1]`` then fills the
    slices level by level: gates whose interval lies above ``t`` are on for every token, those below are
    off, and only in the gate whose interval holds ``t`` does the router choose the tokens. An integer
    ``t`` is uniform precision, ``K - t`` slices. Why: truncation error falls about 16x per slice, so at one
    average, tokens split between two adjacent slice counts lose far less than tokens spread over all of
    them, which is what one threshold on the raw scores gives.
    """
    nested = gate_scores(logits.double())
    levels = torch.arange(nested.shape[-1] - 1, -1, -1, dtype=torch.float64, device=nested.device)
    return levels + 0.5 + torch.atan(nested) / torch.pi


def slices_from_scores(scores: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Slice count per token (1 + number of residual gates whose ordered score exceeds ``threshold``)."""
    return 1 + (scores > threshold).sum(dim=-1)


class MoBiLinear(nn.Module):
    """A linear layer stored as MoBiSlice bit planes, run at a per-token slice count."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_slices: int = 4,
        group_size: int = 128,
        bias: bool = False,
        router_hidden: int | None = 32,
        threshold_grid: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_num_slices(num_slices)
        self.in_features, self.out_features = in_features, out_features
        self.num_slices, self.group_size = num_slices, group_size
        self.compute_dtype = dtype
        groups = in_features // group_size
        plane_shape = (BITS_PER_SLICE * num_slices, out_features, in_features // WORD_BITS)
        self.register_buffer("planes", torch.zeros(plane_shape, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=PARAM_DTYPE))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=PARAM_DTYPE))
        self.register_buffer("gains", torch.ones(num_slices, out_features, dtype=PARAM_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.router = MoBiRouter(in_features, num_slices, router_hidden) if router_hidden and num_slices > 1 else None
        if self.router is not None:
            # Its hard threshold passes no gradient: an optimizer given it would never move it (calibration trains
            # routers on its own layers, before they are copied here).
            self.router.requires_grad_(False)
        # Row i: the threshold on ordered_scores giving average bits threshold_bits[i] on calibration data;
        # the grid is 0.125 bits apart by default (one pass over the calibration set per half bit sets four
        # points: mobiquant.precision).
        points = threshold_grid or 16 * num_slices - 15
        self.register_buffer("threshold_bits", torch.linspace(2.0, 2.0 * num_slices, points, dtype=torch.float32))
        self.register_buffer("thresholds", torch.full((points,), UNCALIBRATED, dtype=torch.float32))
        self.uniform_slices: int | None = num_slices
        self.threshold: float = UNCALIBRATED
        # Every open ``track_bits`` block counts this layer's tokens, nested blocks included. Replaced, never changed
        # in place (attach_meters): a pass in another thread counts with the list it read.
        self.bit_meters: list[Meter] = []
        self._cache_dense = False
        self._dense: dict[int, torch.Tensor] = {}
        self._codes: torch.Tensor | None = None
        self._gained: tuple[tuple[int, int], bool] | None = None
        self._register_load_state_dict_pre_hook(self._drop_cache)

    @property
    def stored_slices(self) -> int:
        """Slices held in memory (fewer than ``num_slices`` after loading with ``max_slices``)."""
        return self.planes.shape[0] // BITS_PER_SLICE

    def sliced_weight(self) -> SlicedWeight:
        return SlicedWeight(self.planes, self.scale, self.zero, self.group_size, self.gains[: self.stored_slices])

    def load_sliced(self, sliced: SlicedWeight, bias: torch.Tensor | None = None) -> None:
        """Take the planes, group parameters and gains of ``sliced`` (and the bias, if the layer has one)."""
        self.planes = sliced.planes.clone()
        self.scale = sliced.scale.to(PARAM_DTYPE).clone()
        self.zero = sliced.zero.to(PARAM_DTYPE).clone()
        gains = torch.ones_like(self.gains) if sliced.gains is None else sliced.gains.to(PARAM_DTYPE)
        self.gains = torch.cat([gains, self.gains[len(gains):].to(gains.device)]).clone()
        if bias is not None:
            self.bias = bias.detach().to(self.compute_dtype).clone()
        self._drop_cache()

    def keep_slices(self, max_slices: int) -> None:
        """Drop every slice after the first ``max_slices`` from memory."""
        if not 1 <= max_slices <= self.stored_slices:
            raise ValueError(f"max_slices must be in 1..{self.stored_slices}, got {max_slices}")
        self.planes = self.planes[: BITS_PER_SLICE * max_slices].contiguous()
        if self.uniform_slices is not None:
            self.uniform_slices = min(self.uniform_slices, max_slices)
        self._drop_cache()

    @property
    def cache_dense(self) -> bool:
        """Whether ``dense_weight`` keeps every ``W_k`` it builds; turning it off frees those copies."""
        return self._cache_dense

    @cache_dense.setter
    def cache_dense(self, keep: bool) -> None:
        self._cache_dense = keep
        if not keep:
            self._dense.clear()

    @property
    def dense_cache_bytes(self) -> int:
        return sum(weight.numel() * weight.element_size() for weight in self._dense.values())

    def dense_weight(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """``W_k`` as a dense matrix, rebuilt from the stored codes by shift-and-scale.

        The PyTorch path keeps the codes ``c_K`` unpacked (one byte per weight up to 4 slices) and rebuilds
        ``W_k`` at each call; ``cache_dense = True`` keeps every ``W_k`` it has built instead (faster, but one
        dense copy per slice count in use).
        """
        cached = self._dense.get(k)
        # A weight built under torch.inference_mode() cannot be saved for a backward outside it: rebuilt there.
        usable = cached is not None and (torch.is_inference_mode_enabled() or not cached.is_inference())
        if usable and cached.dtype == dtype and cached.device == self.planes.device:
            return cached
        codes = self.dense_codes()
        shift = BITS_PER_SLICE * (self.stored_slices - k)
        codes = codes >> shift if shift else codes
        weight = dequantize_codes(codes, self.scale, self.zero, k, dtype, self.gains[k - 1] if self.gained else None)
        if self.cache_dense:
            self._dense[k] = weight
        return weight

    def dense_codes(self) -> torch.Tensor:
        """The codes ``c_K`` of every slice held, unpacked (``[out, in]``; one byte per weight up to 4 slices) and
        kept until the planes change."""
        if self._codes is None or self._codes.device != self.planes.device:
            code_dtype = torch.uint8 if BITS_PER_SLICE * self.stored_slices <= 8 else torch.int32
            self._codes = unpack_codes(self.planes, self.stored_slices).to(code_dtype)
        return self._codes

    @property
    def gained(self) -> bool:
        """Whether any row gain differs from 1. Read once per gains tensor and version (on a GPU the read waits
        for the device), so a reassigned or edited tensor is read again."""
        key = (id(self.gains), self.gains._version)
        if self._gained is None or self._gained[0] != key:
            self._gained = (key, bool((self.gains != 1).any()))
        return self._gained[1]

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Slice count per token of ``x`` (``[..., in]`` -> ``[...]``) under the current setting."""
        uniform, threshold = self._setting()
        return self._counts(x, uniform, threshold)

    def _setting(self) -> tuple[int | None, float]:
        """The slice count of every token where the setting alone decides it (None where the router does), and
        the threshold on ordered scores."""
        # Read once: set_precision in another thread may turn a uniform setting routed between two reads, and the
        # second read would then run the layer at every slice held, which neither setting asked for.
        uniform = self.uniform_slices
        if uniform is not None or self.router is None:
            return uniform or self.stored_slices, 0.0
        # A whole number leaves no gate to choose tokens for (see ordered_scores): no router is needed.
        threshold = min(max(self.threshold, 0.0), float(self.num_slices - 1))
        if threshold.is_integer():
            return min(self.num_slices - int(threshold), self.stored_slices), threshold
        return None, threshold

    def _counts(self, x: torch.Tensor, uniform: int | None, threshold: float) -> torch.Tensor:
        if uniform is not None:
            return self._uniform_counts(x, uniform)
        counts = slices_from_scores(ordered_scores(self.router(x)), threshold)
        return counts.clamp(max=self.stored_slices)

    def _uniform_counts(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` slices for every token of ``x``, checked on the host before any tensor is made."""
        if not 1 <= k <= self.stored_slices:
            raise ValueError(f"slice counts must lie in 1..{self.stored_slices}, got {k}")
        return torch.full(x.shape[:-1], k, dtype=torch.long, device=x.device)

    # torch.compile runs the layer eagerly and compiles the model around it: the token groups are data-dependent (one
    # graph per split), the weights it rebuilds take the slice count as a symbol inductor cannot print
    # (``4 ** (k - 1)``), and its cache checks (``gained``) and layer shapes would recompile it at every layer.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, slices: torch.Tensor | int | None = None) -> torch.Tensor:
        # Only a caller's tensor of counts is checked here: reading a CUDA tensor's min and max waits for the
        # GPU, and route() already checks its uniform count and clamps routed ones.
        # A count every token shares, known on the host: the product then never reads the counts back.
        uniform = slices if isinstance(slices, int) else None
        if slices is None:
            uniform, threshold = self._setting()
            slices = self._counts(x, uniform, threshold)
        elif isinstance(slices, int):
            slices = self._uniform_counts(x, slices)
        elif int(slices.min()) < 1 or int(slices.max()) > self.stored_slices:
            raise ValueError(f"slice counts must lie in 1..{self.stored_slices}")
        meters = self.bit_meters
        if meters:
            self._count_bits(slices, meters)
        flat_x = x.reshape(-1, self.in_features)
        flat_k = slices.reshape(-1)
        out = _grouped_product(self, flat_x, flat_k, uniform)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _count_bits(self, slices: torch.Tensor, meters: list[Meter]) -> None:
        # Every meter counts the tokens of the innermost metered pass running in this thread: count them once.
        slice_sum, tokens = _counted_slices(slices, current_pass_mask())
        slice_sum, weights = float(slice_sum), self.in_features * self.out_features
        for meter in meters:
            meter.add(slice_sum, tokens, weights)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, slices={self.stored_slices}/"
            f"{self.num_slices}, group_size={self.group_size}, router={self.router is not None}"
        )

    def __getstate__(self) -> dict[str, object]:
        # A copy (copy.deepcopy, pickle) starts with no meters: they count the model of the track_bits block or held
        # budget that attached them, which would never detach them from the copy. A held budget is copied with the
        # model and gives the copy's layers its own copied meters (BudgetHold.__setstate__).
        return {**self.__dict__, "bit_meters": []}

    def _drop_cache(self, *_args: object, **_kwargs: object) -> None:
        self._dense.clear()
        self._codes = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoBiLinear:
        kept = {name: self._buffers[name] for name in FIXED_DTYPE_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            applied = self._buffers[name]
            if applied is not None and applied.dtype != original.dtype:
                # From the original, not back from the cast: a round trip through bfloat16 would round it.
                self._buffers[name] = original.to(device=applied.device)
        return self


def _grouped_product(layer: MoBiLinear, x: torch.Tensor, slices: torch.Tensor,
                     uniform: int | None = None) -> torch.Tensor:
    """``x[t] @ W_{slices[t]}^T`` for every token, one dense product per distinct slice count; ``uniform``, the count
    of every token where the caller knows it on the host."""
    # The kernels have no backward: a product that needs gradients (the bit allocation's pass) stays in PyTorch.
    if x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()):
        from mobiquant import kernels

        if kernels.enabled():
            return kernels.elastic_linear(x, layer.planes, layer.scale, layer.zero, slices, layer.group_size,
                                          gains=layer.gains if layer.gained else None, uniform=uniform)
    if uniform is not None:
        return x @ layer.dense_weight(uniform, x.dtype).T
    present, counts = torch.unique(slices, return_counts=True)
    if len(present) == 1:
        return x @ layer.dense_weight(int(present[0]), x.dtype).T
    # Tokens sorted by slice count make each group a contiguous run of rows: one gather, one product per
    # group, one scatter back (the paper's token permutation).
    order = torch.argsort(slices, stable=True)
    grouped = torch.split(x[order], counts.tolist())
    products = torch.cat([rows @ layer.dense_weight(k, x.dtype).T
                          for k, rows in zip(present.tolist(), grouped, strict=True)])
    return products.new_empty(products.shape).index_copy(0, order, products)


class PassMask:
    """A forward pass's 2-D attention mask (``[batch, past + new]``, 0 for padding), laid over the tokens of the
    layers it meters: a layer's tokens are the mask's last ``new`` columns, batch-major (``[batch, new]`` or
    flattened)."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.attention_mask = attention_mask
        self._real: dict[tuple[int, torch.device], tuple[torch.Tensor, int]] = {}

    def real_tokens(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, int] | None:
        """For a layer running ``tokens`` tokens on ``device``: the flattened 0/1 mask of its real tokens, on
        ``device``, and their number; None where the mask cannot be laid over them.

        Built once per pass for each number of new tokens and device, so each layer counts with one product and
        one sum on its own device (layers of a model split across devices included) and one read.
        """
        batch, columns = self.attention_mask.shape
        if not batch or tokens % batch or tokens // batch > columns:
            return None
        key = (tokens, device)
        if key not in self._real:
            real = (self.attention_mask[:, columns - tokens // batch:] != 0).reshape(-1)
            self._real[key] = real.to(device=device, dtype=torch.long), int(real.sum())
        return self._real[key]


# Set while a mixture of experts runs one expert: which of the pass's tokens (rows of its flattened hidden states)
# the expert's layers serve, and how many tokens the pass has.
_SERVED_ROWS: ContextVar[tuple[torch.Tensor, int] | None] = ContextVar("mobiquant_served_rows", default=None)


@contextlib.contextmanager
def serving_rows(rows: torch.Tensor, tokens: int) -> Iterator[None]:
    """The layers run inside serve only rows ``rows`` of the pass's ``tokens`` tokens (an expert's share): the
    attention mask of a metered pass is laid over those rows."""
    token = _SERVED_ROWS.set((rows, tokens))
    try:
        yield
    finally:
        _SERVED_ROWS.reset(token)


def served_rows() -> tuple[torch.Tensor, int] | None:
    """Inside :func:`serving_rows`: the rows served and the pass's token count; None outside."""
    return _SERVED_ROWS.get()


def _counted_slices(slices: torch.Tensor, attention_mask: PassMask | None) -> tuple[torch.Tensor, int]:
    """The slices summed over the tokens to count, on ``slices``' device and not yet read, and their number.

    Without ``attention_mask``, or for tokens it cannot be laid over, every token counts. An expert's layer
    (:func:`serving_rows`) counts those of its rows the mask marks real.
    """
    served = _SERVED_ROWS.get() if attention_mask is not None else None
    if served is not None and len(served[0]) == slices.numel():
        rows, tokens = served
        real = attention_mask.real_tokens(tokens, slices.device)
        if real is None:
            return slices.sum(), slices.numel()
        flat_real = real[0][rows.to(slices.device)]
        return (slices.reshape(-1) * flat_real).sum(), int(flat_real.sum())
    real = attention_mask.real_tokens(slices.numel(), slices.device) if attention_mask is not None else None
    if real is None:
        return slices.sum(), slices.numel()
    flat_real, tokens = real
    return (slices.reshape(-1) * flat_real).sum(), tokens


class MeteredPass:
    """One forward pass of a metered model (``track_bits``, ``hold_budget``) running in this thread, or a caller's
    declaration of the padding of the next pass of ``module`` that is given no mask (``declare_padding``)."""

    __slots__ = ("declared", "kwargs", "mask", "module", "owner")

    def __init__(self, mask: PassMask | None, module: object, owner: object = None, kwargs: object = None,
                 declared: bool = False) -> None:
        self.mask, self.module, self.owner, self.kwargs, self.declared = mask, module, owner, kwargs, declared


# Per thread, the metered passes running, innermost last: a pass of a model run inside another's (from a hook, a
# draft model in speculative decoding) counts with its own mask and leaves the outer pass's mask as it was.
_PASSES = threading.local()


def pass_stack() -> list[MeteredPass]:
    """This thread's metered passes, outermost first."""
    stack = getattr(_PASSES, "stack", None)
    if stack is None:
        stack = _PASSES.stack = []
    return stack


def current_pass_mask() -> PassMask | None:
    """The 2-D attention mask of the innermost metered pass running in this thread, whose padding the layers it runs
    do not count (``_counted_slices``); None (count every token) outside any such pass or in one given no mask."""
    stack = getattr(_PASSES, "stack", None)
    return stack[-1].mask if stack else None


class Meter(Protocol):
    """What a layer counts its tokens into (``BitMeter``, a budget hold's meter of each pass)."""

    def add(self, slice_sum: float, tokens: int, layer_params: int) -> None: ...


# Guards every change of a layer's meter list: two threads opening or closing blocks at once would otherwise each build
# a new list from the one they read, and the later would drop the earlier's meter.
_METER_LISTS_LOCK = threading.Lock()


def attach_meters(layers: list[MoBiLinear], meters: list[Meter]) -> None:
    """Give each of ``layers`` the ``meters`` it does not count in yet."""
    with _METER_LISTS_LOCK:
        for layer in layers:
            layer.bit_meters = layer.bit_meters + [meter for meter in meters if meter not in layer.bit_meters]


def detach_meters(layers: list[MoBiLinear], meters: list[Meter]) -> None:
    """Take ``meters`` off each of ``layers``."""
    with _METER_LISTS_LOCK:
        for layer in layers:
            layer.bit_meters = [meter for meter in layer.bit_meters if all(meter is not gone for gone in meters)]


class BitMeter:
    """Counts the average bits actually used: 2 x slices per token, weighted by each layer's size.

    Layers run by several threads add to one meter at once: the sums change under a lock."""

    def __init__(self) -> None:
        self.weighted_slices = 0.0
        self.weighted_tokens = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {name: value for name, value in self.__dict__.items() if name != "_lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        # Meters pickled by earlier versions carry the name of a thread-local slot they no longer use.
        self.__dict__.update({name: value for name, value in state.items() if name != "_this_thread"})
        self._lock = threading.Lock()

    def add(self, slice_sum: float, tokens: int, layer_params: int) -> None:
        """Count ``tokens`` tokens that ran ``slice_sum`` slices in all through a layer of ``layer_params`` weights."""
        # Once per layer and pass, against a layer's products: the lock costs nothing measurable. Without it two
        # threads reading a sum before either writes it back lose one's count (CPython 3.11 happens not to switch
        # threads inside a float +=; free-threaded builds do).
        with self._lock:
            self.weighted_slices += slice_sum * layer_params
            self.weighted_tokens += tokens * layer_params

    @property
    def avg_bits(self) -> float:
        # Both sums of the same adds: a read between another thread's two updates would pair them wrongly.
        with self._lock:
            weighted_slices, weighted_tokens = self.weighted_slices, self.weighted_tokens
        if not weighted_tokens:
            raise ValueError("no token has passed through a MoBiQuant layer yet")
        return BITS_PER_SLICE * weighted_slices / weighted_tokens
