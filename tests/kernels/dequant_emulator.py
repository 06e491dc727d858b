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
    step = fp32(1.0 / (1 << (2 * (k - 1))))
    s = to_float(load(scale_bits, row * groups + group, "scale"), "float16")
    z = to_float(load(zero_bits, row * groups + group, "zero"), "float16")
    a = fp32(s * step)
    b = fp32(s * fp32(fp32(0.5 * step) - z))
    if gains is not None:  # fold_row_gain
        gain_bits = gains.contiguous().view(-1).numpy().view(np.uint16).astype(np.uint32)
        gain_row = k if "gain_of_next_precision" in bugs else k - 1
        gain = to_float(load(gain_bits, gain_row * out_features + row, "gains"), "float16")
        centre = fp32(s * fp32(2.0 - z))
        a, b = fp32(a * gain), fp32(gain * fp32(b - centre) + centre)  # fmaf: one rounding
    codes = [np.zeros(index.size, dtype=np.uint64) for _ in range(8)]
    for e in range(k):
        high_plane, low_plane = (2 * e + 1, 2 * e) if "planes_swapped" in bugs else (2 * e, 2 * e + 1)
        high = load(plane_words, (high_plane * out_features + row) * words + word, "planes")
        low = load(plane_words, (low_plane * out_features + row) * words + word, "planes")
        for j in range(8):  # append_slice
            spread_high, spread_low = (high >> np.uint64(j)) & 0x01010101, (low >> np.uint64(j)) & 0x01010101
            codes[j] = ((codes[j] << np.uint64(2)) | (spread_high << np.uint64(1)) | spread_low) & 0xFFFFFFFF
    pairs = []  # 16 pairs of (first, second) column values, as T::pack makes them
    for c in range(0, 32, 2):
        values = []
        for column in (c, c + 1):
            code = (codes[column % 8] >> np.uint64(8 * (column // 8))) & 0xFF  # byte_to_float: exact
            values.append(fp32(code.astype(np.float64) * a + b))  # fmaf: one rounding
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
