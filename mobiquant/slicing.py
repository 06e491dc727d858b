"""MoBiSlice: a weight as 2-bit residual slices sharing one scale and zero per group.

Notation follows docs/method.md. For a group with scale ``s`` and zero ``z`` (in base-slice code units),
``u = W / s + z`` and the code at ``k`` slices is ``c_k = clamp(floor(u * 4^(k-1)), 0, 4^k - 1)``.
Because multiplying by a power of four is exact in floating point, ``c_(k-1) == c_k >> 2`` holds
bit for bit: dropping slices truncates, it never re-rounds. Dequantisation takes the midpoint of the
remaining interval, ``W_k = s * ((c_k + 0.5) / 4^(k-1) - z)``.

Packed layout (the contract with the CUDA kernels and the checkpoint format):

* ``planes``: int32 ``[2K, out_features, in_features // 32]``. Plane ``p`` holds bit ``2K-1-p`` of
  the full code ``c_K`` (most significant first), so slice ``e`` is planes ``2(e-1)`` (its high bit)
  and ``2e-1`` (its low bit), and ``c_k`` is read from the first ``2k`` planes alone. Bit ``j`` of word
  ``w`` in row ``r`` belongs to input column ``32 * w + j``.
* ``scale``, ``zero``: float16 ``[out_features, in_features // group_size]``.
* ``gains``: float16 ``[K, out_features]``, one per precision and output row (format v2). At ``k`` slices
  row ``r`` is ``C + gains[k-1, r] * (W_k - C)``, with ``C = s * (2 - z)`` the centre of each group's range:
  a least-squares correction of the row's amplitude at that precision (``fit_row_gains``). Nested codes
  chosen for several precisions at once leave the coarse ones systematically too wide or too narrow in
  some rows; the gain fixes that without touching the codes, so every precision keeps reading only its
  own slices. All ones is the plain format (v1 checkpoints).

Storage is therefore ``2K`` bits per weight for the codes plus ``32 / group_size`` bits for the
group parameters and ``16 K / in_features`` for the gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The packed layout's version, recorded in every checkpoint: v2 added the row gains (v1 reads as all ones).
FORMAT = "bitplanes-msb-int32-v2"
FORMAT_V1 = "bitplanes-msb-int32-v1"
BITS_PER_SLICE = 2
WORD_BITS = 32
# Most slices a weight may have: 16-bit codes. A float16 or bfloat16 weight holds at most 11 significant
# bits, so further slices would store rounding noise, and larger codes lose exactness on the way (float64
# holds 53-bit codes, int64 63 bits, the float32 dequantisation 24 bits).
MAX_SLICES = 8
PARAM_DTYPE = torch.float16
# Smallest scale relative to the group's largest magnitude, rounded down to a power of two. It keeps the
# zero point of a group whose values are all equal (range zero) finite in float16: |z| < 2**13 < 65504. A power
# of two is exact in float16 even where it is subnormal, so such a group loses only its zero's rounding.
_MIN_RELATIVE_SCALE = 2.0**-12
# Smallest positive float16 subnormal: scales never underflow to zero when stored.
_MIN_SCALE = 2.0**-24


class SliceShapeError(ValueError):
    """A weight whose shape cannot be sliced with the requested group size."""


def check_num_slices(num_slices: object) -> None:
    """Raise a clear error unless ``num_slices`` is a whole number of slices in ``1..MAX_SLICES``."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or not 1 <= num_slices <= MAX_SLICES:
        raise ValueError(
            f"num_slices must be a whole number in 1..{MAX_SLICES} ({BITS_PER_SLICE} bits each, at most "
            f"{BITS_PER_SLICE * MAX_SLICES}-bit codes), got {num_slices!r}"
        )


def check_slicing_shape(in_features: int, group_size: int) -> None:
    """Raise a clear error unless ``in_features`` splits into whole groups of whole words."""
    if group_size <= 0 or group_size % WORD_BITS:
        raise SliceShapeError(f"group_size must be a positive multiple of {WORD_BITS}, got {group_size}")
    if in_features % group_size:
        raise SliceShapeError(
            f"input size {in_features} is not a multiple of group_size {group_size}; "
            f"choose a group size that divides it (e.g. {_largest_dividing_group(in_features)})"
        )


def _largest_dividing_group(in_features: int) -> int | str:
    for candidate in (128, 64, 32):
        if in_features % candidate == 0:
            return candidate
    return "none available: the input size is not a multiple of 32"


def group_min_max(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum, each ``[out, in // group_size]``."""
    out_features, in_features = weight.shape
    grouped = weight.reshape(out_features, in_features // group_size, group_size)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def scale_zero_from_range(w_min: torch.Tensor, w_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero that map ``[w_min, w_max]`` onto the base-slice range ``[0, 4)``.

    Differentiable in ``w_min`` and ``w_max`` (used by learnable clipping). The scale has a floor so
    that constant groups stay finite; see ``_MIN_RELATIVE_SCALE``.
    """
    magnitude = torch.maximum(w_max.abs(), w_min.abs()).detach()
    floor = torch.exp2(torch.floor(torch.log2(magnitude * _MIN_RELATIVE_SCALE))).clamp(min=_MIN_SCALE)
    scale = torch.maximum((w_max - w_min) / 4.0, floor)
    zero = -w_min / scale
    return scale, zero


def round_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The group parameters exactly as stored (float16), returned in float32."""
    return scale.to(PARAM_DTYPE).float(), zero.to(PARAM_DTYPE).float()


def _expand(group_param: torch.Tensor, group_size: int) -> torch.Tensor:
    return group_param.repeat_interleave(group_size, dim=-1)


def full_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Integer codes ``c_K`` (int64) of ``weight`` for the given group parameters."""
    group_size = weight.shape[1] // scale.shape[1]
    s = _expand(scale.double(), group_size)
    z = _expand(zero.double(), group_size)
    u = weight.double() / s + z
    levels = 4**num_slices
    return torch.clamp(torch.floor(u * (levels // 4)), 0, levels - 1).to(torch.int64)


def pack_codes(codes: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Bit planes (int32 ``[2K, out, in // 32]``) of codes ``c_K``, most significant bit first."""
    out_features, in_features = codes.shape
    total_bits = BITS_PER_SLICE * num_slices
    words = codes.to(torch.int32).reshape(out_features, in_features // WORD_BITS, WORD_BITS)
    bit_index = torch.arange(WORD_BITS, dtype=torch.int32, device=codes.device)
    # A word's bits are distinct powers of two, so their int32 sum is the word; bit 31 is -2^31 in int32,
    # and the sum lands on the two's complement word without overflowing. One plane at a time keeps the
    # temporaries at the size of the codes.
    return torch.stack([(((words >> (total_bits - 1 - plane)) & 1) << bit_index).sum(dim=-1, dtype=torch.int32)
                        for plane in range(total_bits)])


def unpack_codes(planes: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Codes ``c_k`` (int64 ``[out, in]``) from the first ``2k`` bit planes."""
    total_bits = BITS_PER_SLICE * num_slices
    if planes.shape[0] < total_bits:
        raise ValueError(f"{num_slices} slices need {total_bits} bit planes, only {planes.shape[0]} are held")
    bit_index = torch.arange(WORD_BITS, dtype=torch.int32, device=planes.device)
    codes = torch.zeros(*planes.shape[1:], WORD_BITS, dtype=torch.int32, device=planes.device)
    # Most significant plane first: shift the bits read so far up and add the next one. An arithmetic shift
    # of a negative word still leaves the wanted bit lowest.
    for plane in planes[:total_bits]:
        codes <<= 1
        codes |= (plane.unsqueeze(-1) >> bit_index) & 1
    return codes.view(planes.shape[1], -1).to(torch.int64)


def group_centres(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``C = s * (2 - z)`` per group (``[out, groups]``): the weight at the middle of the group's range."""
    return scale.float() * (2.0 - zero.float())


def group_step_offset(
    scale: torch.Tensor, zero: torch.Tensor, num_slices: int, gain: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (``[out, groups, 1]``, float32), the ``step`` and ``offset`` with ``W_k = offset + c_k * step``:
    ``step = s / 4^(k-1)``, ``offset = s * (0.5 / 4^(k-1) - z)``; with a row ``gain`` (``[out]``) both are taken
    towards the group's centre as ``C + gain * (W_k - C)`` asks. Differentiable in ``scale``, ``zero`` and ``gain``.
    """
    s = scale.float().unsqueeze(-1)
    step = s / 4 ** (num_slices - 1)
    offset = step * 0.5 - s * zero.float().unsqueeze(-1)
    if gain is not None:
        g = gain.float().view(-1, 1, 1)
        offset = g * offset + (1.0 - g) * group_centres(scale, zero).unsqueeze(-1)
        step = g * step
    return step, offset


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    num_slices: int,
    dtype: torch.dtype,
    gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_k = s * ((c_k + 0.5) / 4^(k-1) - z)`` for codes at ``k = num_slices``; with a row ``gain``
    (``[out]``), ``C + gain * (W_k - C)`` (see the module docstring).

    Written as one ``addcmul`` of the codes with per-group step and offset, broadcast over each group:
    the CPU path rebuilds ``W_k`` on every call, and full-size temporaries for the expanded scale and
    zero cost more than the product they feed.
    """
    return affine_codes(codes, *group_step_offset(scale, zero, num_slices, gain)).to(dtype)


def affine_codes(
    codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``offset + codes * step`` with ``codes`` ``[out, in]`` and ``step``, ``offset`` ``[out, groups, 1]``, in
    float32, ``[out, in]``; written into ``out`` (float32, contiguous, as many elements) where given."""
    out_features, in_features = codes.shape
    grouped = codes.reshape(out_features, step.shape[1], -1).float()
    if out is None:
        weight = torch.addcmul(offset, grouped, step)
    else:
        weight = torch.addcmul(offset, grouped, step, out=out.view(grouped.shape))
    return weight.reshape(out_features, in_features)


@dataclass
class SlicedWeight:
    """A weight in MoBiSlice form: bit planes plus one scale and zero per group, and optional row gains."""

    planes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    gains: torch.Tensor | None = None

    @property
    def num_slices(self) -> int:
        return self.planes.shape[0] // BITS_PER_SLICE

    @property
    def shape(self) -> tuple[int, int]:
        return self.planes.shape[1], self.planes.shape[2] * WORD_BITS

    def codes(self, k: int) -> torch.Tensor:
        """Integer codes ``c_k`` at ``k`` slices (int64, ``[out, in]``)."""
        self._check_k(k)
        return unpack_codes(self.planes, k)

    def slice_codes(self, e: int) -> torch.Tensor:
        """The 2-bit values ``q_e = c_e - 4 c_(e-1)`` stored by slice ``e``."""
        self._check_k(e)
        return self.codes(e) & 3

    def dequantize(self, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight at ``k`` slices (``2k`` bits)."""
        gain = None if self.gains is None else self.gains[k - 1]
        return dequantize_codes(self.codes(k), self.scale, self.zero, k, dtype, gain)

    def truncate(self, max_slices: int) -> SlicedWeight:
        """The same weight keeping only its first ``max_slices`` slices."""
        self._check_k(max_slices)
        gains = None if self.gains is None else self.gains[:max_slices].clone()
        return SlicedWeight(self.planes[: BITS_PER_SLICE * max_slices].clone(), self.scale, self.zero,
                            self.group_size, gains)

    def nbytes(self) -> int:
        tensors = (self.planes, self.scale, self.zero) + (() if self.gains is None else (self.gains,))
        return sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_weight(self) -> float:
        out_features, in_features = self.shape
        return 8.0 * self.nbytes() / (out_features * in_features)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_slices:
            raise ValueError(f"slice count must be in 1..{self.num_slices}, got {k}")


def slice_weight(
    weight: torch.Tensor,
    group_size: int = 128,
    num_slices: int = 4,
    clip: tuple[torch.Tensor, torch.Tensor] | float | None = None,
) -> SlicedWeight:
    """Slice ``weight`` (``[out, in]``) into ``num_slices`` 2-bit residual slices.

    ``clip`` shrinks each group's range before the scale is fitted, as learnable weight clipping does:
    a float applies one factor in (0, 1] to both ends; a pair ``(upper, lower)`` of ``[out, in // group]``
    tensors of factors applies per group (``max' = upper * max``, ``min' = lower * min``).
    """
    if weight.dim() != 2:
        raise SliceShapeError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_num_slices(num_slices)
    check_slicing_shape(weight.shape[1], group_size)
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values")
    w_min, w_max = group_min_max(weight.float(), group_size)
    if clip is not None:
        upper, lower = (clip, clip) if isinstance(clip, float) else clip
        w_max, w_min = w_max * upper, w_min * lower
    scale, zero = round_params(*scale_zero_from_range(w_min, w_max))
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        largest = float(weight.abs().max())
        raise ValueError(f"weight values up to {largest:.3g} overflow the float16 group scale (|range| / 4 <= 65504)")
    codes = full_codes(weight, scale, zero, num_slices)
    return SlicedWeight(pack_codes(codes, num_slices), scale.to(PARAM_DTYPE), zero.to(PARAM_DTYPE), group_size)


def fit_row_gains(
    weight: torch.Tensor, hessian: torch.Tensor, sliced: SlicedWeight, up_to: int | None = None
) -> torch.Tensor:
    """Gains (float16 ``[K, out]``) that minimise each row's output error at each precision up to ``up_to``
    slices (default all); the finer precisions get gain 1.

    With ``X^T X = hessian``, ``R = W - C`` and ``D_k = W_k - C`` (``C`` the group centres), row ``r`` of
    ``||X (W - C - g D_k)^T||^2`` is least at ``g = <R_r, D_k,r>_H / <D_k,r, D_k,r>_H`` (float64). A row the
    inputs cannot tell apart from its centre (``<D, D>_H = 0``) keeps gain 1. Gains already on ``sliced``
    are ignored: the fit starts from the plain codes.
    """
    h = hessian.double()
    centre = group_centres(sliced.scale, sliced.zero).double().repeat_interleave(sliced.group_size, dim=-1)
    residual = weight.double() - centre
    gains = []
    fitted = sliced.num_slices if up_to is None else up_to
    for k in range(1, fitted + 1):
        deviation = dequantize_codes(sliced.codes(k), sliced.scale, sliced.zero, k, torch.float64) - centre
        projected = deviation @ h
        numerator = (residual * projected).sum(dim=-1)
        denominator = (deviation * projected).sum(dim=-1)
        positive = denominator > 0
        gains.append(torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 1.0))
    gains += [torch.ones_like(residual[:, 0])] * (sliced.num_slices - fitted)
    return torch.stack(gains).to(PARAM_DTYPE)
