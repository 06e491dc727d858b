"""A CPU execution of kernels/decode.cu, following its source line by line (a test tool, not product code).

Warps are numpy arrays of 32 lanes; registers hold the kernel's raw bits (u32 pairs of 16-bit floats);
16-bit float arithmetic is computed exactly in float64 and rounded once to fp16 or bf16 (round to nearest
even), as the hardware's fused HFMA2 does; ``mma.m16n8k16`` gathers its operands from the lanes with the
fragment layouts of the PTX ISA (``mma.m16n8k16`` with .f16/.bf16 operands and .f32 accumulators) and
accumulates in float32. Global memory checks bounds and alignment of every access; shared memory records,
per barrier interval, which thread wrote each word and fails on a read or write of another thread's word in
the same interval (a race); outputs start poisoned and are checked to be written exactly once.

``bugs`` plants mistakes in the emulated kernel, so that the tests can show that the check catches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mobiquant.kernels import _repack

LANES = 32
DECODE_WARPS = 8
TILE_ROWS, TILE_COLS, SPANS_PER_TILE, SPAN_COLS = 16, 128, 4, 32
FORMATS = {"float16": (10, 15), "bfloat16": (7, 127)}  # mantissa bits, exponent bias
PLANTED_BUGS = {
    "rows_swapped",  # A registers r = 1, 3 take row g's affine pair instead of row g + 8's
    "no_barrier",  # the __syncthreads before the cross-warp sum is missing
    "exponent_off_by_one",  # the exact step scales by 4^-(p+1) instead of 4^-p
    "tail_skipped",  # the partial last tile is never multiplied
    "tail_not_rewound",  # the partial last tile is read where the loop left the pointers, past it
    "b_chunks_swapped",  # chunk 0 multiplies with chunk 1's activations
}


class EmulatorError(AssertionError):
    """An illegal access: out of bounds, misaligned, a shared-memory race or an output written twice."""


# --- 16-bit floats as bits ------------------------------------------------------------------------------


def to_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint32) & 0xFFFF
    if dtype == "float16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    return (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round to nearest even into 16 bits."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16).astype(np.uint32)
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint32) & 0xFFFF


def unpack2(pair: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    pair = np.asarray(pair, dtype=np.uint32)
    return to_float(pair & 0xFFFF, dtype), to_float(pair >> 16, dtype)


def pack2(low: np.ndarray, high: np.ndarray, dtype: str) -> np.ndarray:
    return from_float(low, dtype) | (from_float(high, dtype) << 16)


def fma2(a: np.ndarray, b: np.ndarray, c: np.ndarray, dtype: str) -> np.ndarray:
    """fma.rn.{f16x2,bf16x2}: both halves of a * b + c, each rounded once."""
    (a0, a1), (b0, b1), (c0, c1) = unpack2(a, dtype), unpack2(b, dtype), unpack2(c, dtype)
    return pack2(a0 * b0 + c0, a1 * b1 + c1, dtype)


def pow2_pair(e: int, negative: bool, dtype: str) -> np.uint32:
    mantissa, bias = FORMATS[dtype]
    h = ((e + bias) << mantissa) | (0x8000 if negative else 0)
    return np.uint32(h | (h << 16))


def centred_magic_pair(m: int, dtype: str) -> np.uint32:
    mantissa, bias = FORMATS[dtype]
    h = 0x8000 | ((m + bias) << mantissa) | (1 << (mantissa + 1 - m))
    return np.uint32(h | (h << 16))


def positions_fitting(slices: int, mantissa: int) -> int:
    p = 0
    while p < 8 and ((1 << (2 * slices)) - 1) * (1 << (2 * p)) < (1 << mantissa):
        p += 1
    return p


def and_or(a: np.ndarray, mask: int, c: np.ndarray) -> np.ndarray:  # lop3 0xEA
    return (np.asarray(a, dtype=np.uint32) & np.uint32(mask)) | np.asarray(c, dtype=np.uint32)


def byte_permute(a: np.ndarray, selector: int) -> np.ndarray:  # prmt.b32 d, a, 0, selector
    a = np.asarray(a, dtype=np.uint32)
    out = np.zeros_like(a)
    for byte in range(4):
        source = (selector >> (4 * byte)) & 0x7
        value = (a >> (8 * source)) & 0xFF if source < 4 else np.zeros_like(a)
        out |= value << (8 * byte)
    return out


def mma_m16n8k16(acc: np.ndarray, a: list[np.ndarray], b0: np.ndarray, b1: np.ndarray, dtype: str) -> np.ndarray:
    """D = A B + C for one warp. acc [4, 32] float32; a: 4 registers [32]; b0, b1 [32]. Leading dimensions
    (the same on every operand, or broadcast) run a batch of independent products."""
    lane = np.arange(LANES)
    g, t = lane // 4, lane % 4
    batch = np.broadcast_shapes(np.shape(acc)[:-2], *(np.shape(r)[:-1] for r in (*a, b0, b1)))
    A = np.zeros((*batch, 16, 16))
    B = np.zeros((*batch, 16, 8))
    for reg, (row_add, col_add) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        low, high = unpack2(a[reg], dtype)
        A[..., g + row_add, 2 * t + col_add] = low
        A[..., g + row_add, 2 * t + col_add + 1] = high
    for reg, k_add in ((b0, 0), (b1, 8)):
        low, high = unpack2(reg, dtype)
        B[..., 2 * t + k_add, g] = low
        B[..., 2 * t + k_add + 1, g] = high
    C = np.zeros((*batch, 16, 8))
    for j, (row_add, col_add) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
        C[..., g + row_add, 2 * t + col_add] = acc[..., j, :]
    D = (A @ B + C).astype(np.float32)
    return np.stack([D[..., g, 2 * t], D[..., g, 2 * t + 1], D[..., g + 8, 2 * t], D[..., g + 8, 2 * t + 1]], axis=-2)


# --- memory ------------------------------------------------------------------------------------------------


@dataclass
class GlobalArray:
    """A device array of 32-bit or 16-bit words; addresses are element indices of ``word_bytes`` each."""

    name: str
    data: np.ndarray  # uint32 or uint16

    def load(self, index: np.ndarray, count: int, active: np.ndarray) -> np.ndarray:
        """``count`` consecutive words at ``index`` per active lane -> [count, lanes]; zeros elsewhere."""
        index = np.asarray(index, dtype=np.int64)
        width = count * self.data.itemsize
        for i in index[active]:
            if i < 0 or i + count > self.data.size:
                raise EmulatorError(f"{self.name}: load of {count} words at {i} outside [0, {self.data.size})")
            if (i * self.data.itemsize) % width:
                raise EmulatorError(f"{self.name}: {width}-byte load at byte {i * self.data.itemsize} misaligned")
        out = np.zeros((count, index.size), dtype=np.uint32)
        for j in range(count):
            out[j, active] = self.data[index[active] + j]
        return out


@dataclass
class Output:
    data: np.ndarray  # uint16 bits, poisoned with NaN
    writes: np.ndarray

    def result(self, dtype: str, tokens: int, out_features: int) -> tuple[torch.Tensor, np.ndarray]:
        """y [tokens, out] as float64 and how often each element was written."""
        values = to_float(self.data, dtype).reshape(tokens, out_features)
        return torch.from_numpy(values), self.writes.reshape(tokens, out_features)

    def store(self, index: int, bits: int) -> None:
        if not 0 <= index < self.data.size:
            raise EmulatorError(f"y: store at {index} outside [0, {self.data.size})")
        if self.writes[index]:
            raise EmulatorError(f"y: element {index} written twice")
        self.writes[index] += 1
        self.data[index] = bits


@dataclass
class SharedMemory:
    """Shared words with a race check: each word remembers its writer and barrier interval."""

    size: int
    epoch: int = 0
    values: np.ndarray = field(init=False)
    writer: np.ndarray = field(init=False)
    written_in: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.values = np.zeros(self.size, dtype=np.float32)
        self.writer = np.full(self.size, -1)
        self.written_in = np.full(self.size, -1)

    def _check(self, address: int, thread: int, what: str) -> None:
        if not 0 <= address < self.size:
            raise EmulatorError(f"shared {what} at {address} outside [0, {self.size})")
        if self.written_in[address] == self.epoch and self.writer[address] != thread:
            raise EmulatorError(
                f"race: thread {thread} {what}s shared word {address}, written by thread "
                f"{self.writer[address]} since the last barrier"
            )

    def store(self, address: int, value: float, thread: int) -> None:
        self._check(address, thread, "write")
        self.values[address], self.writer[address], self.written_in[address] = value, thread, self.epoch

    def load(self, address: int, thread: int) -> float:
        self._check(address, thread, "read")
        return float(self.values[address])

    def barrier(self) -> None:
        self.epoch += 1


# --- the kernel --------------------------------------------------------------------------------------------


@dataclass
class Launch:
    dtype: str
    token_tiles: int  # NT: 1 for the n8 kernels, 2 for n16
    span_affine: bool  # the g32 kernels
    x: GlobalArray  # u16
    packed: GlobalArray  # u32
    affine: GlobalArray  # u32
    slices: np.ndarray  # int64
    y: Output
    tokens: int
    out_features: int
    in_features: int
    num_slices: int
    bugs: frozenset[str]


def dequantise_span(launch: Launch, k: int, words: list[np.ndarray], affine: list[np.ndarray]) -> list[np.ndarray]:
    dtype = launch.dtype
    mantissa = FORMATS[dtype][0]
    per_part = k // 2 if mantissa < 2 * k else k
    parts = k // per_part
    positions = positions_fitting(per_part, mantissa)
    magic = pow2_pair(mantissa, False, dtype)
    scale = [byte_permute(affine[0], 0x1010), byte_permute(affine[1], 0x1010)]
    offset = [byte_permute(affine[0], 0x3232), byte_permute(affine[1], 0x3232)]
    frag = []
    for i in range(8):
        p = i % positions
        shift = 2 * (i - p)
        value = np.zeros(LANES, dtype=np.uint32)
        for part in range(parts):
            fields = np.full(LANES, magic, dtype=np.uint32)
            for j in range(per_part):
                word = words[part * per_part + j]
                place = 2 * (per_part - 1 - j)
                net = place - shift
                moved = (word << np.uint32(net)) if net >= 0 else (word >> np.uint32(-net))
                fields = and_or(moved & np.uint32(0xFFFFFFFF), ((3 << (2 * p + place)) * 0x10001) & 0xFFFFFFFF, fields)
            exponent = -2 * p + 2 * (1 - (part + 1) * per_part)
            if "exponent_off_by_one" in launch.bugs:
                exponent -= 2
            scaled_magic = mantissa + exponent
            offset_pair = centred_magic_pair(scaled_magic, dtype) if part == 0 else pow2_pair(scaled_magic, True, dtype)
            exact = fma2(fields, pow2_pair(exponent, False, dtype), offset_pair, dtype)
            value = exact if part == 0 else fma2(exact, pow2_pair(0, False, dtype), value, dtype)
        row = 0 if "rows_swapped" in launch.bugs else i & 1
        frag.append(fma2(value, scale[row], offset[row], dtype))
    return frag


def tile_product(launch: Launch, k: int, regs: dict, acc: np.ndarray) -> np.ndarray:
    for s in range(SPANS_PER_TILE):
        words = [regs["weights"][e][s] for e in range(k)]
        pair = regs["affine"][s if launch.span_affine else 0]
        frag = dequantise_span(launch, k, words, [pair[0], pair[1]])
        for c in range(2):
            a = frag[4 * c : 4 * c + 4]
            for nt in range(launch.token_tiles):
                chunk = 1 - c if "b_chunks_swapped" in launch.bugs else c
                xs = regs["xs"][nt][s]
                b0, b1 = (xs[0], xs[1]) if chunk == 0 else (xs[2], xs[3])
                acc[nt] = mma_m16n8k16(acc[nt], a, b0, b1, launch.dtype)
    return acc


@dataclass
class LaneSources:
    weights: list[np.ndarray]  # u32 element index of each slice's uint4, per lane
    x_rows: list[np.ndarray]  # u16 element index, per lane and n-tile
    affine: np.ndarray  # u32 element index of the uint2, per lane
    active: list[np.ndarray]
    tile: int
    spans: int


def load_tile(launch: Launch, k: int, source: LaneSources, regs: dict, tail: bool) -> None:
    every = np.ones(LANES, dtype=bool)
    regs["weights"] = [launch.packed.load(source.weights[e], 4, every) for e in range(k)]
    for nt in range(launch.token_tiles):
        for s in range(SPANS_PER_TILE):
            inside = not tail or source.tile * SPANS_PER_TILE + s < source.spans
            active = source.active[nt] & inside
            halves = launch.x.load(source.x_rows[nt] + s * SPAN_COLS, 8, active)
            loaded = halves[0::2] | (halves[1::2] << 16)
            # Inactive lanes keep their registers: zeros from before the loop (tail: zeroed).
            regs["xs"][nt][s] = np.where(active, loaded, regs["xs"][nt][s] if not tail else 0).astype(np.uint32)
    units = SPANS_PER_TILE if launch.span_affine else 1
    regs["affine"] = [launch.affine.load(source.affine + u * 16, 2, every) for u in range(units)]


def advance(launch: Launch, k: int, source: LaneSources, steps: int) -> None:
    source.weights = [w + steps * DECODE_WARPS * LANES * 4 for w in source.weights]
    source.x_rows = [r + steps * DECODE_WARPS * TILE_COLS for r in source.x_rows]
    source.affine = source.affine + steps * DECODE_WARPS * (SPANS_PER_TILE if launch.span_affine else 1) * 16
    source.tile += steps * DECODE_WARPS


def fresh_registers(launch: Launch) -> dict:
    zeros = np.zeros((4, LANES), dtype=np.uint32)
    return {"xs": [[zeros.copy() for _ in range(SPANS_PER_TILE)] for _ in range(launch.token_tiles)]}


def level_pass(launch: Launch, k: int, block: int, warp: int, level: list[np.ndarray], acc: np.ndarray) -> None:
    lane = np.arange(LANES)
    g, t = lane // 4, lane % 4
    row_tiles = -(-launch.out_features // TILE_ROWS)
    tiles = -(-launch.in_features // TILE_COLS)
    full = launch.in_features // TILE_COLS
    slice_stride = row_tiles * tiles * LANES * 4  # u32 elements
    weights = [e * slice_stride + ((block * tiles + warp) * LANES + lane) * 4 for e in range(k)]
    units_per_tile = SPANS_PER_TILE if launch.span_affine else 1
    affine = ((((k - 1) * row_tiles + block) * tiles + warp) * units_per_tile * 8 + g) * 2
    active, x_rows = [], []
    for nt in range(launch.token_tiles):
        token = g + 8 * nt
        on = (token < launch.tokens) & (level[nt] == k)
        active.append(on)
        x_rows.append(np.where(on, token, 0) * launch.in_features + warp * TILE_COLS + 8 * t)
    source = LaneSources(weights, x_rows, affine, active, warp, launch.in_features // SPAN_COLS)
    even, odd = fresh_registers(launch), fresh_registers(launch)
    if warp < full:
        load_tile(launch, k, source, even, tail=False)
        advance(launch, k, source, 1)
    tile = warp
    while tile < full:
        if source.tile < full:
            load_tile(launch, k, source, odd, tail=False)
        advance(launch, k, source, 1)
        tile_product(launch, k, even, acc)
        if tile + DECODE_WARPS >= full:
            break
        if source.tile < full:
            load_tile(launch, k, source, even, tail=False)
        advance(launch, k, source, 1)
        tile_product(launch, k, odd, acc)
        tile += 2 * DECODE_WARPS
    if full < tiles and warp == full % DECODE_WARPS and "tail_skipped" not in launch.bugs:
        if "tail_not_rewound" not in launch.bugs:
            advance(launch, k, source, (full - source.tile) // DECODE_WARPS)
        load_tile(launch, k, source, even, tail=True)
        tile_product(launch, k, even, acc)


def clamped_level(launch: Launch, token: int) -> int:
    return int(min(max(int(launch.slices[token]), 1), launch.num_slices))


def decode_block(launch: Launch, block: int) -> None:
    nt_count = launch.token_tiles
    shared = SharedMemory(DECODE_WARPS * nt_count * 4 * LANES)
    lane = np.arange(LANES)
    g = lane // 4
    present = 0
    for token in range(launch.tokens):
        present |= 1 << clamped_level(launch, token)
    level = [
        np.array([clamped_level(launch, int(n)) if n < launch.tokens else 0 for n in g + 8 * nt])
        for nt in range(nt_count)
    ]
    for warp in range(DECODE_WARPS):  # each warp runs up to the barrier; the race check orders them
        acc = np.zeros((nt_count, 4, LANES), dtype=np.float32)
        for k in range(1, 5):
            if present & (1 << k):
                level_pass(launch, k, block, warp, level, acc)
        for nt in range(nt_count):
            for j in range(4):
                for source_lane in range(LANES):
                    address = (warp * nt_count * 4 + nt * 4 + j) * LANES + source_lane
                    shared.store(address, acc[nt, j, source_lane], thread=warp * LANES + source_lane)
    if "no_barrier" not in launch.bugs:
        shared.barrier()
    for v in range(DECODE_WARPS * LANES):
        if v >= nt_count * 4 * LANES:
            continue
        index, source_lane = v // LANES, v % LANES
        total = np.float32(0.0)
        for w in range(DECODE_WARPS):
            total = np.float32(total + np.float32(shared.load((w * nt_count * 4 + index) * LANES + source_lane, v)))
        nt, j = index // 4, index % 4
        row = block * TILE_ROWS + source_lane // 4 + 8 * (j // 2)
        token = 8 * nt + 2 * (source_lane % 4) + j % 2
        if token < launch.tokens and row < launch.out_features:
            launch.y.store(token * launch.out_features + row, int(from_float(np.float64(total), launch.dtype)))


def bits(tensor: torch.Tensor, dtype: type[np.generic]) -> np.ndarray:
    """A copy of a tensor's raw bits as a flat numpy array of ``dtype`` (same item size)."""
    return tensor.contiguous().view(-1).numpy().view(dtype).copy()


def run_decode_kernel(
    dtype: str,
    token_tiles: int,
    span_affine: bool,
    grid: int,
    x: torch.Tensor,
    packed: torch.Tensor,
    affine: torch.Tensor,
    slices: torch.Tensor,
    tokens: int,
    out_features: int,
    in_features: int,
    num_slices: int,
    bugs: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, np.ndarray]:
    """One launch of a decode kernel on ``grid`` blocks, given its arguments as the host passes them:
    y [tokens, out] and how often each output was written."""
    unknown = set(bugs) - PLANTED_BUGS
    if unknown:
        raise ValueError(f"unknown planted bugs {unknown}")
    poison = from_float(np.float64("nan"), dtype)
    launch = Launch(
        dtype=dtype,
        token_tiles=token_tiles,
        span_affine=span_affine,
        x=GlobalArray("x", bits(x.view(torch.int16), np.uint16)),
        packed=GlobalArray("packed", bits(packed, np.uint32)),
        affine=GlobalArray("affine", bits(affine, np.uint32)),
        slices=slices.numpy().astype(np.int64),
        y=Output(np.full(tokens * out_features, poison, dtype=np.uint32), np.zeros(tokens * out_features, dtype=int)),
        tokens=tokens,
        out_features=out_features,
        in_features=in_features,
        num_slices=num_slices,
        bugs=frozenset(bugs),
    )
    for block in range(grid):
        decode_block(launch, block)
    return launch.y.result(dtype, tokens, out_features)


def emulate_decode(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
    bugs: frozenset[str] = frozenset(),
    gains: torch.Tensor | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """y [tokens, out] as the decode kernel computes it, and how often each output was written."""
    tokens, in_features = x.shape
    out_features = planes.shape[1]
    if tokens > 16:
        raise ValueError("the decode kernel takes at most 16 tokens")
    weights = _repack.decode_weights(planes, scale, zero, group_size, x.dtype, gains)
    dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
    return run_decode_kernel(
        dtype, 1 if tokens <= 8 else 2, _repack.affine_units_per_tile(group_size) > 1, -(-out_features // TILE_ROWS),
        x, weights.packed, weights.affine, slices, tokens, out_features, in_features, planes.shape[0] // 2, bugs,
    )  # fmt: skip
