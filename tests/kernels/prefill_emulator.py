"""A CPU execution of kernels/prefill.cu, the grouped GEMM, following its source (a test tool, not product code).

A block's 256 threads run phase by phase: what every thread does between two ``__syncthreads`` is done for all
of them at once (numpy arrays over threads, or over a warp's 32 lanes). The shared-memory check makes that
order irrelevant: a word written by one thread and read or written by another before the next barrier is a
race, whichever order the hardware would pick. A ``cp.async`` copy is in flight from its issue to the
``cp.async.wait_group`` that retires its commit group; reading or overwriting a word with a copy in flight is
an error, and so is reading a word nothing has written. ``ldmatrix`` and ``mma.m16n8k16`` follow the fragment
layouts of the PTX ISA; fp32 fused multiply-adds are computed exactly and rounded once. Global loads are
checked for bounds and alignment; outputs start poisoned and must be written exactly once.

The host's arguments (token order, group offsets, grid) come from ``mobiquant.kernels._launch.prefill_schedule``,
the function the launcher calls. ``bugs`` plants mistakes so that the tests can show the check catches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mobiquant.kernels import _launch
from tests.kernels.decode_emulator import LANES, EmulatorError, Output, bits, from_float, mma_m16n8k16, pack2, to_float
from tests.kernels.dequant_emulator import append_slice, byte_to_float, fold_row_gain, fp32, group_affine

# prefill.cu's compile-time constants.
BM, BN, BK, STAGES, THREADS, SROW, MAX_PLANES = 128, 128, 32, 3, 256, 40, 8
X_COPIES_PER_ROW = BK // 8
X_COPIES_PER_THREAD = BM * X_COPIES_PER_ROW // THREADS
PLANES_PER_THREAD_STEP = THREADS // BN
WARPS = THREADS // LANES
X_STAGE_BYTES = BM * SROW * 2
X_COPY_ROWS_BYTES = THREADS // X_COPIES_PER_ROW * SROW * 2
PLANES_STAGE_BYTES = MAX_PLANES * BN * 4
# PrefillSmem in 32-bit words: u16 x[STAGES][BM][SROW], u32 planes[STAGES][MAX_PLANES][BN], u16 w[BN][SROW],
# int token[BM].
X_WORD = 0
PLANES_WORD = X_WORD + STAGES * BM * SROW // 2
W_WORD = PLANES_WORD + STAGES * MAX_PLANES * BN
TOKEN_WORD = W_WORD + BN * SROW // 2
SMEM_WORDS = TOKEN_WORD + BM
assert SMEM_WORDS * 4 == _launch.PREFILL_SMEM_BYTES

PLANTED_BUGS = {
    "wait_one_short",  # cp.async.wait_group STAGES-1: the current chunk's copies may still be in flight
    "no_refill_barrier",  # the barrier before a stage is refilled and the weight tile rebuilt is missing
    "no_dequant_barrier",  # the barrier between rebuilding the weight tile and the mma is missing
    "stage_of_next_chunk",  # the weight tile is rebuilt from the planes of the next stage
    "tile_overruns_group",  # a token tile runs on into the next precision group's tokens
    "gain_of_next_precision",  # the row gain read at k + 1 slices instead of k
    "b_halves_swapped",  # the two k-halves of a B fragment exchanged
    "odd_rows_paired",  # 32-bit output stores also for an odd number of output rows (misaligned)
}
MANY = -2  # several threads read a word in this barrier interval


class SharedWords:
    """Shared memory as 32-bit words, with the race, in-flight and uninitialised-read checks described above."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, dtype=np.uint32)
        self.writer = np.full(size, -1)
        self.written_in = np.full(size, -1)
        self.reader = np.full(size, -1)
        self.read_in = np.full(size, -1)
        self.in_flight = np.zeros(size, dtype=bool)
        self.epoch = 0
        self.committed = 0  # commit groups closed so far; copies issued now join group `committed`
        self.copies: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def _checked(self, address: np.ndarray, thread: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        address = np.asarray(address, dtype=np.int64)
        thread = np.broadcast_to(np.asarray(thread, dtype=np.int64), address.shape).ravel()
        address = address.ravel()
        outside = (address < 0) | (address >= self.values.size)
        if outside.any():
            raise EmulatorError(f"shared {what} at word {address[outside][0]} outside [0, {self.values.size})")
        clash = (self.written_in[address] == self.epoch) & (self.writer[address] != thread)
        if clash.any():
            i = np.flatnonzero(clash)[0]
            raise EmulatorError(f"race: thread {thread[i]} {what}s shared word {address[i]}, written by thread "
                                f"{self.writer[address[i]]} since the last barrier")  # fmt: skip
        if what != "read" and self.in_flight[address].any():
            raise EmulatorError(f"shared {what} over a cp.async still in flight")
        return address, thread

    @staticmethod
    def _one_thread_per_word(address: np.ndarray, thread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each distinct word and the one thread touching it in this access, or MANY."""
        words, inverse = np.unique(address, return_inverse=True)
        low = np.full(words.size, np.iinfo(np.int64).max)
        high = np.full(words.size, -1)
        np.minimum.at(low, inverse, thread)
        np.maximum.at(high, inverse, thread)
        return words, np.where(low == high, low, MANY)

    def _check_not_read_by_others(self, address: np.ndarray, thread: np.ndarray, what: str) -> None:
        read = (self.read_in[address] == self.epoch) & (self.reader[address] != thread)
        if read.any():
            i = np.flatnonzero(read)[0]
            raise EmulatorError(f"race: thread {thread[i]} {what}s shared word {address[i]}, read by another "
                                "thread since the last barrier")  # fmt: skip

    def store(self, address: np.ndarray, value: np.ndarray, thread: np.ndarray) -> None:
        address, thread = self._checked(address, thread, "write")
        self._check_not_read_by_others(address, thread, "write")
        if (self._one_thread_per_word(address, thread)[1] == MANY).any():
            raise EmulatorError("race: two threads write one shared word")
        self.values[address] = np.asarray(value, dtype=np.uint32).ravel()
        self.writer[address], self.written_in[address] = thread, self.epoch

    def load(self, address: np.ndarray, thread: np.ndarray) -> np.ndarray:
        shape = np.shape(address)
        address, thread = self._checked(address, thread, "read")
        if self.in_flight[address].any():
            raise EmulatorError("shared read of a word whose cp.async has not been waited for")
        if (self.written_in[address] < 0).any():
            raise EmulatorError(f"shared read of word {address[self.written_in[address] < 0][0]}, never written")
        words, readers = self._one_thread_per_word(address, thread)
        fresh = self.read_in[words] != self.epoch
        self.reader[words] = np.where(fresh | (self.reader[words] == readers), readers, MANY)
        self.read_in[words] = self.epoch
        return self.values[address].reshape(shape)

    def copy_async(self, address: np.ndarray, value: np.ndarray, thread: np.ndarray) -> None:
        """cp.async: the copy may land at any moment until it is waited for."""
        address, thread = self._checked(address, thread, "cp.async write")
        self._check_not_read_by_others(address, thread, "cp.async write")
        self.in_flight[address] = True
        self.copies.append((self.committed, address, np.asarray(value, dtype=np.uint32).ravel(), thread))

    def commit(self) -> None:
        self.committed += 1

    def wait(self, pending: int) -> None:
        """cp.async.wait_group: every group but the newest ``pending`` has landed."""
        landed = [c for c in self.copies if c[0] < self.committed - pending]
        self.copies = [c for c in self.copies if c[0] >= self.committed - pending]
        for _, address, value, thread in landed:
            self.values[address] = value
            self.writer[address], self.written_in[address] = thread, self.epoch
            self.in_flight[address] = False

    def barrier(self) -> None:
        self.epoch += 1


def global_load(array: np.ndarray, index: np.ndarray, count: int, name: str) -> np.ndarray:
    """``count`` consecutive elements at each ``index`` -> [count, n], checked for bounds and alignment."""
    index = np.asarray(index, dtype=np.int64)
    if ((index < 0) | (index + count > array.size)).any():
        raise EmulatorError(f"{name}: load outside [0, {array.size})")
    if ((index * array.itemsize) % (count * array.itemsize)).any():
        raise EmulatorError(f"{name}: {count * array.itemsize}-byte load misaligned")
    return np.stack([array[index + j] for j in range(count)])


def ldmatrix_x4(shared: SharedWords, address: np.ndarray, thread: np.ndarray) -> list[np.ndarray]:
    """ldmatrix.m8n8.x4.b16: lanes 8j..8j+7 give the rows of matrix j (16-byte rows at shared byte
    ``address``es); register j of lane l holds matrix j's row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1."""
    if (address % 16).any():
        raise EmulatorError("ldmatrix: row address not 16-byte aligned")
    lane = np.arange(LANES)
    row_word = address // 4
    words = np.stack([row_word[8 * j + lane // 4] + lane % 4 for j in range(4)])
    return list(shared.load(words, thread))


@dataclass
class Launch:
    dtype: str
    x: np.ndarray  # u16
    planes: np.ndarray  # u32
    scale: np.ndarray  # u16
    zero: np.ndarray  # u16
    gains: np.ndarray | None  # u16
    order: np.ndarray  # int32
    offsets: np.ndarray  # int32
    y: Output
    out_features: int
    in_features: int
    num_slices: int
    group_size: int
    bugs: frozenset[str]


def find_tile(launch: Launch, tile: int) -> tuple[int, int, int]:
    """The block's precision group (level), first position in ``order`` and token count; level 0: no tile."""
    offsets = global_load(launch.offsets, np.arange(launch.num_slices + 1), 1, "offsets")[0].astype(np.int64)
    for e in range(1, launch.num_slices + 1):
        n = offsets[e] - offsets[e - 1]
        tiles = -(-n // BM)
        if tile < tiles:
            first = offsets[e - 1] + tile * BM
            end = offsets[launch.num_slices] if "tile_overruns_group" in launch.bugs else offsets[e]
            return e, int(first), int(min(BM, end - first))
        tile -= tiles
    return 0, 0, 0


def prefill_block(launch: Launch, column_block: int, tile: int) -> None:
    level, first, rows = find_tile(launch, tile)
    if level == 0:
        return
    out_features, in_features, dtype = launch.out_features, launch.in_features, launch.dtype
    shared = SharedWords(SMEM_WORDS)
    tid = np.arange(THREADS)
    n0 = column_block * BN
    words = in_features // 32
    groups = in_features // launch.group_size
    chunks = in_features // BK

    fill = tid[tid < BM]
    token = np.full(fill.size, -1, dtype=np.int64)
    inside = fill < rows
    token[inside] = global_load(launch.order, first + fill[inside], 1, "order")[0]
    shared.store(TOKEN_WORD + fill, token.astype(np.int32).view(np.uint32), fill)
    shared.barrier()

    # Each thread's share of a stage, fixed for the kernel: x rows tid / 4 + 64 j (j < 2) at columns
    # 8 (tid % 4); planes tid / 128 + 2 j (j < level) of row tid % 128.
    x_part = tid % X_COPIES_PER_ROW
    x_rows = [tid // X_COPIES_PER_ROW + j * (THREADS // X_COPIES_PER_ROW) for j in range(X_COPIES_PER_THREAD)]
    x_tokens = [shared.load(TOKEN_WORD + r, tid).view(np.int32).astype(np.int64) for r in x_rows]
    plane_row = tid % BN
    plane_row_ok = n0 + plane_row < out_features

    # Shared byte addresses, as the source computes them: &sm.x[0][x_row(tid, 0)][x_part * 8] and
    # &sm.planes[0][tid / BN][plane_row], stepped by constants.
    x_dst = X_WORD * 4 + (x_rows[0] * SROW + x_part * 8) * 2
    plane_dst = PLANES_WORD * 4 + ((tid // BN) * BN + plane_row) * 4

    def load_stage(stage: int, chunk: int) -> None:
        for j, tokens in enumerate(x_tokens):
            present = tokens >= 0
            halves = np.zeros((8, THREADS), dtype=np.uint32)  # src_bytes = 0 zero-fills
            at = tokens[present] * in_features + x_part[present] * 8 + chunk * BK
            halves[:, present] = global_load(launch.x, at, 8, "x")
            dst = x_dst + stage * X_STAGE_BYTES + j * X_COPY_ROWS_BYTES
            if (dst % 16).any():
                raise EmulatorError("cp.async 16: shared destination misaligned")
            data = halves[0::2] | (halves[1::2] << 16)
            shared.copy_async(dst // 4 + np.arange(4)[:, None], data, tid)
        dst = plane_dst + stage * PLANES_STAGE_BYTES
        for j in range(level):
            plane = PLANES_PER_THREAD_STEP * j + tid // BN
            value = np.zeros(THREADS, dtype=np.uint32)
            at = (plane[plane_row_ok] * out_features + n0 + plane_row[plane_row_ok]) * words + chunk
            value[plane_row_ok] = global_load(launch.planes, at, 1, "planes")[0]
            shared.copy_async(dst // 4, value, tid)
            dst = dst + PLANES_PER_THREAD_STEP * BN * 4

    # Thread tid rebuilds columns {4h..4h+3} + {0, 8, 16, 24} of row tid / 2, h = tid % 2.
    dq_r, dq_h = tid // 2, tid % 2
    dq_row = n0 + dq_r
    dq_ok = dq_row < out_features
    gain = np.ones(THREADS)
    if launch.gains is not None:
        gain_level = level if "gain_of_next_precision" in launch.bugs else level - 1
        at = gain_level * out_features + dq_row[dq_ok]
        gain[dq_ok] = to_float(global_load(launch.gains, at, 1, "gains")[0], "float16")

    # The parameters of the next chunk to fetch: a group spans group_size / BK chunks.
    chunks_per_group = launch.group_size // BK
    params = {"group": 0, "chunk": 0}

    def load_params() -> tuple[np.ndarray, np.ndarray]:
        s, z = np.zeros(THREADS, dtype=np.uint32), np.zeros(THREADS, dtype=np.uint32)
        at = dq_row[dq_ok] * groups + params["group"]
        s[dq_ok] = global_load(launch.scale, at, 1, "scale")[0]
        z[dq_ok] = global_load(launch.zero, at, 1, "zero")[0]
        params["chunk"] += 1
        if params["chunk"] == chunks_per_group:
            params["chunk"], params["group"] = 0, params["group"] + 1
        return s, z

    def dequantize(stage: int, s: np.ndarray, z: np.ndarray) -> None:
        column = 4 * dq_h[:, None, None] + 2 * np.arange(2)[None, :, None] + 8 * np.arange(4)[None, None, :]
        address = W_WORD + dq_r[:, None, None] * (SROW // 2) + column // 2  # [thread, pair, b]
        thread = np.broadcast_to(tid[:, None, None], address.shape)
        idle = ~dq_ok
        shared.store(address[idle], np.zeros(address[idle].shape, dtype=np.uint32), thread[idle])
        if not dq_ok.any():
            return
        busy = tid[dq_ok]
        a, b = group_affine(s[dq_ok], z[dq_ok], level)
        if launch.gains is not None:
            a, b = fold_row_gain(a, b, s[dq_ok], z[dq_ok], gain[dq_ok])
        read_stage = (stage + 1) % STAGES if "stage_of_next_chunk" in launch.bugs else stage
        codes = [np.zeros(busy.size, dtype=np.uint64) for _ in range(4)]
        columns = (4 * dq_h[busy]).astype(np.uint32)  # the plane words shifted once to the thread's columns
        for e in range(level):
            high = shared.load(PLANES_WORD + (read_stage * MAX_PLANES + 2 * e) * BN + dq_r[busy], busy) >> columns
            low = shared.load(PLANES_WORD + (read_stage * MAX_PLANES + 2 * e + 1) * BN + dq_r[busy], busy) >> columns
            for q in range(4):
                codes[q] = append_slice(codes[q], high, low, q)
        packed = np.zeros((busy.size, 2, 4), dtype=np.uint32)
        for b_ in range(4):
            for pair in range(2):
                w0 = fp32(byte_to_float(codes[2 * pair], b_) * a + b)  # fmaf: one rounding
                w1 = fp32(byte_to_float(codes[2 * pair + 1], b_) * a + b)
                packed[:, pair, b_] = pack2(w0, w1, dtype)  # T::pack
        shared.store(address[dq_ok], packed, thread[dq_ok])

    warp_m, warp_n = np.arange(WARPS) // 4, np.arange(WARPS) % 4
    lane = np.arange(LANES)
    acc = np.zeros((WARPS, 4, 4, 4, LANES), dtype=np.float32)

    def warp_products(stage: int) -> None:
        for w in range(WARPS):
            thread = w * LANES + lane
            # This lane's ldmatrix rows at stage 0 and kk = 0, as shared byte addresses.
            a_rows = X_WORD * 4 + ((warp_m[w] * 64 + lane % 16) * SROW + (lane // 16) * 8) * 2
            b_rows = W_WORD * 4 + ((warp_n[w] * 32 + lane % 8 + (lane // 16) * 8) * SROW + ((lane // 8) % 2) * 8) * 2
            a_stage = a_rows + stage * X_STAGE_BYTES
            for kk in (0, 16):
                a = [ldmatrix_x4(shared, a_stage + (mi * 16 * SROW + kk) * 2, thread) for mi in range(4)]
                b = []
                for nj in range(2):
                    t = ldmatrix_x4(shared, b_rows + (nj * 16 * SROW + kk) * 2, thread)
                    halves = [(t[1], t[0]), (t[3], t[2])] if "b_halves_swapped" in launch.bugs else \
                        [(t[0], t[1]), (t[2], t[3])]  # fmt: skip
                    b += halves
                # The 4 x 4 mma of the warp at once: operand registers [mi, 1, lane] and [1, ni, lane].
                a_regs = [np.stack([a[mi][reg] for mi in range(4)])[:, None] for reg in range(4)]
                b_regs = [np.stack([b[ni][half] for ni in range(4)])[None] for half in range(2)]
                acc[w] = mma_m16n8k16(acc[w], a_regs, b_regs[0], b_regs[1], dtype)

    for stage in range(STAGES - 1):
        if stage < chunks:
            load_stage(stage, stage)
        shared.commit()
    s_next, z_next = load_params()
    for chunk in range(chunks):
        stage = chunk % STAGES
        s_cur, z_cur = s_next, z_next
        if chunk + 1 < chunks:
            s_next, z_next = load_params()
        shared.wait(STAGES - 1 if "wait_one_short" in launch.bugs else STAGES - 2)
        if "no_refill_barrier" not in launch.bugs:
            shared.barrier()
        following = chunk + STAGES - 1
        if following < chunks:
            load_stage(following % STAGES, following)
        shared.commit()
        dequantize(stage, s_cur, z_cur)
        if "no_dequant_barrier" not in launch.bugs:
            shared.barrier()
        warp_products(stage)
    shared.wait(0)

    paired = out_features % 2 == 0 or "odd_rows_paired" in launch.bugs
    stores = []  # (token, column, value of the column, value of the next), one entry per lane and pair
    for w in range(WARPS):
        thread = w * LANES + lane
        for mi in range(4):
            for ni in range(4):
                col = n0 + warp_n[w] * 32 + ni * 8 + 2 * (lane % 4)
                for half in range(2):
                    at = TOKEN_WORD + warp_m[w] * 64 + mi * 16 + lane // 4 + half * 8
                    tokens = shared.load(at, thread).view(np.int32).astype(np.int64)
                    stores.append((tokens, col, acc[w, mi, ni, 2 * half], acc[w, mi, ni, 2 * half + 1]))
    token, col, first, second = (np.concatenate(part) for part in zip(*stores, strict=True))
    present = token >= 0
    store_pairs(launch, token[present], col[present], first[present], second[present], paired)


def store_pairs(launch: Launch, token: np.ndarray, col: np.ndarray, first: np.ndarray, second: np.ndarray,
                paired: bool) -> None:  # fmt: skip
    """The epilogue's stores: a 32-bit store where both columns exist and rows are paired, else 16-bit ones."""
    out_features = launch.out_features
    element = token * out_features + col
    whole = paired & (col + 1 < out_features)
    if (element[whole] % 2).any():
        raise EmulatorError(f"y: 32-bit store at element {element[whole][element[whole] % 2 == 1][0]} misaligned")
    one, two = col < out_features, col + 1 < out_features
    index = np.concatenate([element[one], element[two] + 1])
    values = np.concatenate([first[one], second[two]]).astype(np.float64)
    y = launch.y
    if ((index < 0) | (index >= y.data.size)).any():
        raise EmulatorError(f"y: store outside [0, {y.data.size})")
    np.add.at(y.writes, index, 1)
    if (y.writes[index] > 1).any():
        raise EmulatorError(f"y: element {index[y.writes[index] > 1][0]} written twice")
    y.data[index] = from_float(values, launch.dtype)


def run_prefill_kernel(
    dtype: str,
    grid: tuple[int, int],
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    gains: torch.Tensor | None,
    order: torch.Tensor,
    offsets: torch.Tensor,
    out_features: int,
    in_features: int,
    num_slices: int,
    group_size: int,
    bugs: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, np.ndarray]:
    """One launch of the grouped GEMM on ``grid``, given its arguments as the host passes them: y [tokens, out]
    and how often each output was written."""
    unknown = set(bugs) - PLANTED_BUGS
    if unknown:
        raise ValueError(f"unknown planted bugs {unknown}")
    tokens = x.shape[0]
    poison = from_float(np.float64("nan"), dtype)
    launch = Launch(
        dtype=dtype,
        x=bits(x.view(torch.int16), np.uint16),
        planes=bits(planes, np.uint32),
        scale=bits(scale, np.uint16),
        zero=bits(zero, np.uint16),
        gains=None if gains is None else bits(gains, np.uint16),
        order=bits(order, np.int32),
        offsets=bits(offsets, np.int32),
        y=Output(np.full(tokens * out_features, poison, dtype=np.uint32), np.zeros(tokens * out_features, dtype=int)),
        out_features=out_features,
        in_features=in_features,
        num_slices=num_slices,
        group_size=group_size,
        bugs=frozenset(bugs),
    )
    for tile in range(grid[1]):
        for column_block in range(grid[0]):
            prefill_block(launch, column_block, tile)
    return launch.y.result(dtype, tokens, out_features)


def emulate_prefill(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
    gains: torch.Tensor | None = None,
    bugs: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, np.ndarray]:
    """y [tokens, out] as the grouped GEMM computes it, with its host arguments from prefill_schedule, and
    how often each output was written."""
    num_slices, out_features = planes.shape[0] // 2, planes.shape[1]
    dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
    order, offsets, grid = _launch.prefill_schedule(slices, num_slices, out_features)
    return run_prefill_kernel(dtype, grid, x, planes, scale, zero, gains, order, offsets, out_features, x.shape[1],
                              num_slices, group_size, bugs)  # fmt: skip
