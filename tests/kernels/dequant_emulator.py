"""A CPU execution of kernels/dequant.cu, following its source (a test tool, not product code).

Every thread of the launch is one element of numpy arrays (the kernel has no cross-thread traffic, so a
warp is just 32 consecutive elements); fp32 fused multiply-adds are computed exactly and rounded once;
global loads are bounds-checked, stores checked for bounds, 16-byte alignment and write-once.
``bugs`` plants mistakes so that the tests can show the check catches them.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.kernels.decode_emulator import EmulatorError, from_float, to_float

DEQUANT_THREADS = 256
PLANTED_BUGS = {
    "planes_swapped",  # the high and low plane of a slice exchanged
    "pair_swapped",  # the two weights of a 32-bit store exchanged
    "last_thread_skipped",  # the bounds test drops the launch's last word
    "gain_of_next_precision",  # the row gain read at k + 1 slices instead of k
}


def fp32(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def load(array: np.ndarray, index: np.ndarray, name: str) -> np.ndarray:
    if (index < 0).any() or (index >= array.size).any():
        raise EmulatorError(f"{name}: load outside [0, {array.size})")
    return array[index]


# --- common.cuh ------------------------------------------------------------------------------------------


def group_affine(scale_bits: np.ndarray, zero_bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of W = a c_k + b for float16 scale and zero bits, each product rounded to fp32 as the source does."""
    step = fp32(1.0 / (1 << (2 * (k - 1))))
    s, z = to_float(scale_bits, "float16"), to_float(zero_bits, "float16")
    return fp32(s * step), fp32(s * fp32(fp32(0.5 * step) - z))


def fold_row_gain(
    a: np.ndarray, b: np.ndarray, scale_bits: np.ndarray, zero_bits: np.ndarray, gain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """a' = g a and b' = fmaf(g, b - C, C) with C = s (2 - z)."""
    centre = fp32(to_float(scale_bits, "float16") * fp32(2.0 - to_float(zero_bits, "float16")))
    return fp32(a * gain), fp32(gain * fp32(b - centre) + centre)


def append_slice(codes: np.ndarray, high: np.ndarray, low: np.ndarray, j: int | np.ndarray) -> np.ndarray:
    """c = 4 c + 2 high + low for the columns j, j+8, j+16, j+24 of a 32-column word, held byte-wise (j may
    differ per thread)."""
    j = np.asarray(j).astype(np.uint64)
    spread_high = (high.astype(np.uint64) >> j) & 0x01010101
    spread_low = (low.astype(np.uint64) >> j) & 0x01010101
    return ((codes.astype(np.uint64) << np.uint64(2)) | (spread_high << np.uint64(1)) | spread_low) & 0xFFFFFFFF


def byte_to_float(codes: np.ndarray, b: int) -> np.ndarray:
    return ((codes.astype(np.uint64) >> np.uint64(8 * b)) & 0xFF).astype(np.float64)


def emulate_dequant(
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    k: int,
    group_size: int,
    dtype: torch.dtype,
    gains: torch.Tensor | None = None,
    bugs: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """W_k [out, in] in ``dtype`` as the kernel writes it, with float16 row ``gains`` [K', out] folded in when
    given; raises EmulatorError on an illegal access or an element written other than once."""
    unknown = set(bugs) - PLANTED_BUGS
    if unknown:
        raise ValueError(f"unknown planted bugs {unknown}")
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    out_features, in_features = planes.shape[1], planes.shape[2] * 32
    words = in_features // 32
    plane_words = planes.contiguous().view(-1).numpy().view(np.uint32).astype(np.uint64)
    scale_bits = scale.contiguous().view(-1).numpy().view(np.uint16).astype(np.uint32)
    zero_bits = zero.contiguous().view(-1).numpy().view(np.uint16).astype(np.uint32)
    w = np.full(out_features * in_features, from_float(np.float64("nan"), name), dtype=np.uint32)
    writes = np.zeros(out_features * in_features, dtype=int)

    blocks = -(-out_features * words // DEQUANT_THREADS)
    index = np.arange(blocks * DEQUANT_THREADS, dtype=np.int64)
    limit = out_features * words - (1 if "last_thread_skipped" in bugs else 0)
    index = index[index < limit]  # threads past the last word return
    row, word = index // words, index % words
    groups = in_features // group_size
    group = word * 32 // group_size
    scale_at = load(scale_bits, row * groups + group, "scale")
    zero_at = load(zero_bits, row * groups + group, "zero")
    a, b = group_affine(scale_at, zero_at, k)
    if gains is not None:
        gain_bits = gains.contiguous().view(-1).numpy().view(np.uint16).astype(np.uint32)
        gain_row = k if "gain_of_next_precision" in bugs else k - 1
        gain = to_float(load(gain_bits, gain_row * out_features + row, "gains"), "float16")
        a, b = fold_row_gain(a, b, scale_at, zero_at, gain)
    codes = [np.zeros(index.size, dtype=np.uint64) for _ in range(8)]
    for e in range(k):
        high_plane, low_plane = (2 * e + 1, 2 * e) if "planes_swapped" in bugs else (2 * e, 2 * e + 1)
        high = load(plane_words, (high_plane * out_features + row) * words + word, "planes")
        low = load(plane_words, (low_plane * out_features + row) * words + word, "planes")
        for j in range(8):
            codes[j] = append_slice(codes[j], high, low, j)
    pairs = []  # 16 pairs of (first, second) column values, as T::pack makes them
    for c in range(0, 32, 2):
        values = []
        for column in (c, c + 1):
            values.append(fp32(byte_to_float(codes[column % 8], column // 8) * a + b))  # fmaf: one rounding
        pairs.append((values[1], values[0]) if "pair_swapped" in bugs else tuple(values))
    for q in range(4):  # four 16-byte stores of 8 weights each
        destination = row * in_features + word * 32 + 8 * q
        if ((destination * 2) % 16).any():
            raise EmulatorError("w: 16-byte store misaligned")
        if (destination + 8 > w.size).any():
            raise EmulatorError("w: store out of bounds")
        for pair in range(4):
            for half in range(2):
                element = destination + 2 * pair + half
                w[element] = from_float(pairs[4 * q + pair][half], name)
                writes[element] += 1
    if (writes != 1).any():
        raise EmulatorError(f"w: {(writes == 0).sum()} elements never written, {(writes > 1).sum()} twice")
    return torch.from_numpy(to_float(w, name).reshape(out_features, in_features)).to(dtype)
