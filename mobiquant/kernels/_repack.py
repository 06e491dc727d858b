"""The decode kernel's weight layout, built from the checkpoint's bit planes at the first launch and cached.

The checkpoint keeps ``mobiquant.slicing``'s bit planes (its on-disk format does not change); the decode
kernel reads each slice's 2-bit codes regrouped so that one 16-byte load per lane and slice brings the
codes of the lane's tensor-core fragments for a 16-row x 128-column tile (see kernels/decode.cu, "Fragment
order"), and the group parameters as ``(s, b_k)`` pairs in the activations' type, one table per slice
count, with the row gains of a v2 checkpoint folded in (so they cost the kernel nothing). Both are pure
functions of the planes, scale, zero and gains, written with torch ops so that they run on the weights'
device and on the CPU (the emulator in tests/kernels reads the same tensors).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from mobiquant.slicing import BITS_PER_SLICE, WORD_BITS

TILE_ROWS = 16
TILE_COLS = 128
SPAN_COLS = 32
SPANS_PER_TILE = TILE_COLS // SPAN_COLS
LANES = 32
# Rows unpacked at a time: bounds the temporaries of a 14336-row layer to tens of megabytes.
ROW_CHUNK = 1024


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def slice_codes(planes: torch.Tensor, slice_index: int, rows: slice) -> torch.Tensor:
    """Codes ``q_e`` in 0..3 (uint8 ``[rows, in]``) of slice ``slice_index`` (0-based) from its two planes."""
    bit_index = torch.arange(WORD_BITS, device=planes.device, dtype=torch.int32)
    high, low = (
        ((planes[BITS_PER_SLICE * slice_index + p, rows].unsqueeze(-1) >> bit_index) & 1).to(torch.uint8)
        for p in (0, 1)
    )
    return (2 * high + low).flatten(1)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 as the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_decode_weights(planes: torch.Tensor) -> torch.Tensor:
    """int32 ``[K, row_tiles, tiles, 32 lanes, 4 spans]`` from planes ``[2K, out, in/32]``.

    Word (slice e, row tile, tile, lane = 4g + t, span s) holds, at field i = 4c + r (bits 2i..2i+1 for the
    first column, 16+2i..16+2i+1 for the second), the codes of row g + 8 (r % 2) and columns
    128 tile + 32 s + 8t + 4c + 2 (r // 2) + (0, 1). Rows and columns past the weight are zero codes.
    """
    num_slices, out_features = planes.shape[0] // BITS_PER_SLICE, planes.shape[1]
    in_features = planes.shape[2] * WORD_BITS
    row_tiles, tiles = ceil_div(out_features, TILE_ROWS), ceil_div(in_features, TILE_COLS)
    packed = torch.zeros(num_slices, row_tiles, tiles * LANES * SPANS_PER_TILE, dtype=torch.int64,
                         device=planes.device)  # fmt: skip
    for e in range(num_slices):
        for start in range(0, out_features, ROW_CHUNK):
            rows = slice(start, min(start + ROW_CHUNK, out_features))
            codes = torch.zeros(ceil_div(rows.stop - start, TILE_ROWS) * TILE_ROWS, tiles * TILE_COLS,
                                dtype=torch.uint8, device=planes.device)  # fmt: skip
            codes[: rows.stop - start, :in_features] = slice_codes(planes, e, rows)
            # row = 16 rt + 8 rh + g; column = 128 tile + 32 s + 8 t + 4 c + 2 rp + h
            grid = codes.view(-1, 2, 8, tiles, SPANS_PER_TILE, 4, 2, 2, 2)
            words = torch.zeros(grid.shape[0], 8, tiles, 4, SPANS_PER_TILE, dtype=torch.int64, device=planes.device)
            for c in range(2):
                for rp in range(2):
                    for rh in range(2):
                        for h in range(2):
                            field = 4 * c + 2 * rp + rh
                            part = grid[:, rh, :, :, :, :, c, rp, h].permute(0, 1, 2, 4, 3).to(torch.int64)
                            words |= part << (2 * field + 16 * h)
            # [rt, g, tile, t, s] -> rows of the packed array as [rt][tile][lane = 4g + t][s]
            ordered = words.permute(0, 2, 1, 3, 4).reshape(-1, tiles * LANES * SPANS_PER_TILE)
            packed[e, start // TILE_ROWS : start // TILE_ROWS + ordered.shape[0]] = ordered
    return to_int32(packed.view(num_slices, row_tiles, tiles, LANES, SPANS_PER_TILE)).contiguous()


def affine_units_per_tile(group_size: int) -> int:
    """1 when every 128-column tile lies in one group (the g128 kernels), else 4: one pair per span."""
    return 1 if group_size % TILE_COLS == 0 else SPANS_PER_TILE


def decode_affine(
    scale: torch.Tensor,
    zero: torch.Tensor,
    num_slices: int,
    group_size: int,
    dtype: torch.dtype,
    gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 ``[K, row_tiles, units, 8, 2]``: per slice count k, row tile, unit (tile or span) and row
    ``g + 8 rh`` the pair (s, b'_k) in ``dtype`` (s in bits 0-15), ``b'_k = s * (0.5 / 4^(k-1) - z + 2)``: the
    kernel multiplies s by the centred code ``c_k / 4^(k-1) - 2``. With row gains ``g`` (``[K, out]``) the pair
    is ``(g s, g b'_k + (1 - g) s (2 - z))``: ``C + g (W_k - C)`` with ``C = s (2 - z)``, the same two numbers."""
    out_features, groups = scale.shape
    in_features = groups * group_size
    row_tiles, tiles = ceil_div(out_features, TILE_ROWS), ceil_div(in_features, TILE_COLS)
    per_tile = affine_units_per_tile(group_size)
    unit_cols = TILE_COLS // per_tile
    # The group of each unit; units past the input (the padded tail) repeat the last group.
    unit_group = (torch.arange(tiles * per_tile, device=scale.device) * unit_cols // group_size).clamp(max=groups - 1)
    s = scale.float()[:, unit_group]
    z = zero.float()[:, unit_group]
    tables = []
    for k in range(1, num_slices + 1):
        step, offset = s, s * (0.5 / 4 ** (k - 1) - z + 2)
        if gains is not None:
            gain = gains[k - 1].float().unsqueeze(-1)
            step, offset = gain * s, gain * offset + (1.0 - gain) * s * (2.0 - z)
        pair = torch.stack([step, offset]).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        word = torch.zeros(row_tiles * TILE_ROWS, tiles * per_tile, dtype=torch.int64, device=scale.device)
        word[:out_features] = pair[0] | (pair[1] << 16)
        # row = 16 rt + 8 rh + g -> [rt, unit, g, rh]
        tables.append(word.view(row_tiles, 2, 8, -1).permute(0, 3, 2, 1))
    return to_int32(torch.stack(tables)).contiguous()


@dataclass(frozen=True)
class DecodeWeights:
    packed: torch.Tensor
    affine: torch.Tensor


_cache: dict[tuple, tuple[tuple, DecodeWeights]] = {}
_lock = threading.Lock()


def decode_weights(
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    gains: torch.Tensor | None = None,
) -> DecodeWeights:
    """The decode layout of these weights (and row gains) for activations of ``dtype``, built once per weight.

    Keyed by the tensors' identities and version counters (an in-place update rebuilds it); an entry is
    dropped when its planes tensor is freed. Build it before capturing a CUDA graph (a warm-up call does).
    """
    key = (id(planes), id(scale), id(zero), id(gains), group_size, dtype)
    versions = (planes._version, scale._version, zero._version, None if gains is None else gains._version,
                planes.data_ptr(), planes.device)
    with _lock:
        entry = _cache.get(key)
        if entry is not None and entry[0] == versions:
            return entry[1]
    built = DecodeWeights(
        pack_decode_weights(planes),
        decode_affine(scale, zero, planes.shape[0] // BITS_PER_SLICE, group_size, dtype, gains),
    )
    with _lock:
        if key not in _cache:
            weakref.finalize(planes, _cache.pop, key, None)
        _cache[key] = (versions, built)
    return built
