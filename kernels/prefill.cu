// MoBiQuant prefill kernel: a grouped GEMM y[t] = x[t] @ W_{k_t}^T for routed batches, on tensor cores.
//
// Memory layout (the contract of mobiquant/slicing.py; see decode.cu for the full description)
//   x       [tokens, in]        fp16 or bf16, row-major, 16-byte aligned rows
//   planes  [2K, out, in/32]    u32 bit planes, MSB first: c_k is read from planes 0..2k-1 alone
//   scale,  [out, in/group]     fp16 group parameters
//   zero
//   gains   [K', out]           fp16 row gains of format v2 (K' >= K), or null (fold_row_gain in common.cuh)
//   order   [tokens]            int32: token indices sorted by slice count (a stable argsort)
//   offsets [K+1]               int32: tokens with k slices are order[offsets[k-1] : offsets[k]]
//   y       [tokens, out]       same dtype as x; every element is written exactly once
//
// Grouping. After routing, the tokens are permuted so that equal-precision tokens are contiguous
// (`order`); each precision group is one product, as in the paper. A token tile never mixes two
// precisions: blockIdx.y enumerates the tiles of group 1, then of group 2, and so on, so the grid
// needs at most ceil(tokens / BM) + K - 1 tiles and the host never has to read the group sizes back
// (blocks beyond the last tile exit at once). The base slice (planes 0-1) is read by every tile; the
// residual slices only by the tiles of the tokens that use them.
//
// Block tile: BM = 128 tokens x BN = 128 output rows, stepping over the input in BK = 32 columns,
// i.e. one u32 word per plane and row, which always lies inside one scale group.
//   * Gathered A: the x rows of the tile's tokens are copied with 16-byte cp.async into shared memory
//     through `order` (zero-filled past the group's last token), 3 stages deep so that global loads of
//     chunk i+2 overlap the math of chunk i.
//   * B: the tile's 2k plane words per row are copied (cp.async, 3 stages) next to it. Each thread then
//     rebuilds 16 weights of one row: the first 2k planes are shifted and added into the code c_k
//     (four columns per register, append_slice), turned into floats and mapped through the group's
//     scale and zero (W = a * c_k + b in fp32, the row's gain at k slices folded into a and b), and
//     stored as fp16/bf16 into a [BN][BK] tile.
//     Dequantising once per block tile reuses every weight for 128 tokens.
//   * 8 warps as 2 (tokens) x 4 (outputs); each warp computes 64 x 32 outputs as 4 x 4
//     mma.m16n8k16 tiles with fp32 accumulators, fragments loaded with ldmatrix. Shared rows are
//     padded from 32 to 40 elements (80 bytes) so that the eight 16-byte rows read by one ldmatrix
//     phase fall in distinct banks.
//   * Epilogue: each accumulator pair is converted and stored to y at the token's original row, so the
//     inverse permutation is free.
//
// Binary MMA on the bit planes (the paper's alternative) is not used: it needs the activations
// quantised to bit planes too, and the dequantised fp16 tiles keep the product exact up to one
// rounding of each weight.
#include "common.cuh"

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3
#define PREFILL_THREADS 256
#define SROW 40  // padded shared-memory row length in 16-bit elements (see the bank note above)
#define X_COPIES_PER_ROW (BK / 8)                                       // 16-byte copies per x row and chunk
#define X_COPIES_PER_THREAD (BM * X_COPIES_PER_ROW / PREFILL_THREADS)  // 2
#define PLANES_PER_THREAD_STEP (PREFILL_THREADS / BN)                   // 2: threads cover two planes at once
#define X_STAGE_BYTES (BM * SROW * 2)
#define X_COPY_ROWS_BYTES (PREFILL_THREADS / X_COPIES_PER_ROW * SROW * 2)  // from one x copy of a thread to the next
#define PLANES_STAGE_BYTES (MAX_PLANES * BN * 4)

struct PrefillSmem {
    u16 x[STAGES][BM][SROW];
    u32 planes[STAGES][MAX_PLANES][BN];
    u16 w[BN][SROW];
    int token[BM];
};
// Keep in sync with PREFILL_SMEM_BYTES in mobiquant/kernels/_launch.py (the host asks for this much dynamic smem).
static_assert(sizeof(PrefillSmem) == 53760, "prefill shared memory size changed");

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(p));
    return address;
}

// Shared-memory operands are 32-bit shared-window addresses, computed once per thread (shared_address) and
// stepped with 32-bit adds: a generic pointer would cost a 64-bit computation and a conversion per use.
// 16-byte asynchronous copy; src_bytes = 0 zero-fills the destination without reading `src`.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

__device__ __forceinline__ void ldmatrix_x4(u32 r[4], u32 address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// The tile row of thread tid's j-th x copy.
__device__ __forceinline__ int x_row(int tid, int j) {
    return tid / X_COPIES_PER_ROW + j * (PREFILL_THREADS / X_COPIES_PER_ROW);
}

template <typename T>
__device__ __forceinline__ void prefill_impl(const u16* __restrict__ x, const u32* __restrict__ planes,
                                             const u16* __restrict__ scale, const u16* __restrict__ zero,
                                             const u16* __restrict__ gains, const int* __restrict__ order,
                                             const int* __restrict__ offsets, u16* __restrict__ y,
                                             int out_features, int in_features, int num_slices, int group_size) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    PrefillSmem& sm = *reinterpret_cast<PrefillSmem*>(smem_raw);

    // Which precision group and which tokens of it this block handles.
    int tile = blockIdx.y;
    int level = 0, first = 0, rows = 0;
    for (int e = 1; e <= num_slices; ++e) {
        const int n = offsets[e] - offsets[e - 1];
        const int tiles = (n + BM - 1) / BM;
        if (tile < tiles) {
            level = e;
            first = offsets[e - 1] + tile * BM;
            rows = min(BM, n - tile * BM);
            break;
        }
        tile -= tiles;
    }
    if (level == 0) return;  // the grid over-provisions tiles; the same for the whole block

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int n0 = blockIdx.x * BN;
    const int words = in_features / 32;
    const int groups = in_features / group_size;
    const int chunks = in_features / BK;

    for (int i = tid; i < BM; i += PREFILL_THREADS) sm.token[i] = i < rows ? order[first + i] : -1;
    __syncthreads();

    // Every thread's share of a stage is fixed for the whole kernel, so its sources are computed once here
    // and each chunk only adds its column offset (loops with a trip count known to the compiler, no
    // division in the steady state):
    //   * x: rows tid / 4 and tid / 4 + 64 of the tile, 8 columns at (tid % 4) * 8 each (BM x BK / 8 = 512
    //     16-byte copies over 256 threads); a row past the group's last token is zero-filled.
    //   * planes: row tid % 128 of the tile, planes tid / 128 + 2j for j < level (2k x BN words over 256
    //     threads).
    // A share with nothing to read (a row past the group's tokens or past the output rows) keeps a source
    // that stays at the tensor's first element (a step of 0) and copies 0 bytes, which zero-fills.
    const int x_part = tid % X_COPIES_PER_ROW;
    const u16* x_src[X_COPIES_PER_THREAD];
    int x_bytes[X_COPIES_PER_THREAD], x_step[X_COPIES_PER_THREAD];
#pragma unroll
    for (int j = 0; j < X_COPIES_PER_THREAD; ++j) {
        const int token = sm.token[x_row(tid, j)];
        x_src[j] = token >= 0 ? x + (size_t)token * in_features + x_part * 8 : x;
        x_bytes[j] = token >= 0 ? 16 : 0;
        x_step[j] = token >= 0 ? BK : 0;
    }
    const int plane_row = tid % BN;
    const bool plane_row_ok = n0 + plane_row < out_features;
    const u32* plane_src =
        plane_row_ok ? planes + ((size_t)(tid / BN) * out_features + n0 + plane_row) * words : planes;
    const size_t plane_step = plane_row_ok ? (size_t)PLANES_PER_THREAD_STEP * out_features * words : 0;
    const int plane_chunk_step = plane_row_ok ? 1 : 0;
    const int plane_bytes = plane_row_ok ? 4 : 0;

    const u32 x_dst = shared_address(&sm.x[0][x_row(tid, 0)][x_part * 8]);
    const u32 plane_dst = shared_address(&sm.planes[0][tid / BN][plane_row]);
    auto load_stage = [&](int stage, int chunk) {
#pragma unroll
        for (int j = 0; j < X_COPIES_PER_THREAD; ++j) {
            cp_async16(x_dst + stage * X_STAGE_BYTES + j * X_COPY_ROWS_BYTES, x_src[j] + chunk * x_step[j],
                       x_bytes[j]);
        }
        const u32* src = plane_src + chunk * plane_chunk_step;
        u32 dst = plane_dst + stage * PLANES_STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < MAX_SLICES; ++j) {
            if (j < level) {
                cp_async4(dst, src, plane_bytes);  // planes[stage][PLANES_PER_THREAD_STEP * j + tid / BN][plane_row]
                src += plane_step;
                dst += PLANES_PER_THREAD_STEP * BN * 4;
            }
        }
    };

    // Thread tid rebuilds columns {4h..4h+3} + {0, 8, 16, 24} of row tid / 2, where h = tid % 2.
    // The dequantising thread's row is fixed; its group parameters are fetched one chunk ahead (plain
    // loads into registers) so that their latency hides behind the mma of the current chunk. A group spans
    // group_size / BK chunks: the parameters' address advances by one every that many chunks.
    const int dq_row = n0 + tid / 2;
    const bool dq_row_ok = dq_row < out_features;
    const float dq_gain =
        gains != nullptr && dq_row_ok ? half_to_float(gains[(size_t)(level - 1) * out_features + dq_row]) : 1.0f;
    const int chunks_per_group = group_size / BK;
    const size_t params_row = (size_t)(dq_row_ok ? dq_row : 0) * groups;
    int params_group = 0, params_chunk = 0;  // the group of the next chunk to fetch, and its chunk within
    auto load_params = [&](u16& s, u16& z) {
        s = dq_row_ok ? scale[params_row + params_group] : (u16)0;
        z = dq_row_ok ? zero[params_row + params_group] : (u16)0;
        if (++params_chunk == chunks_per_group) {
            params_chunk = 0;
            ++params_group;
        }
    };

    auto dequantize = [&](int stage, u16 s, u16 z) {
        const int r = tid / 2;
        const int h = tid % 2;
        u32* dst = reinterpret_cast<u32*>(&sm.w[r][0]);
        if (!dq_row_ok) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                dst[(4 * h + 8 * b) / 2] = 0u;
                dst[(4 * h + 8 * b) / 2 + 1] = 0u;
            }
            return;
        }
        GroupAffine ga = group_affine(s, z, level);
        if (gains != nullptr) ga = fold_row_gain(ga, s, z, dq_gain);
        u32 codes[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int e = 0; e < MAX_SLICES; ++e) {
            if (e < level) {
                // The thread's columns start at 4h: shifting the plane words once leaves constant shifts below.
                const u32 hi = sm.planes[stage][2 * e][r] >> (4 * h);
                const u32 lo = sm.planes[stage][2 * e + 1][r] >> (4 * h);
#pragma unroll
                for (int q = 0; q < 4; ++q) codes[q] = append_slice(codes[q], hi, lo, q);
            }
        }
#pragma unroll
        for (int b = 0; b < 4; ++b) {
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {
                const float w0 = fmaf(byte_to_float(codes[2 * pair], b), ga.a, ga.b);
                const float w1 = fmaf(byte_to_float(codes[2 * pair + 1], b), ga.a, ga.b);
                dst[(4 * h + 2 * pair + 8 * b) / 2] = T::pack(w0, w1);
            }
        }
    };

    const int warp_m = warp / 4;  // 64-token slice of the tile
    const int warp_n = warp % 4;  // 32-output slice of the tile
    // This lane's ldmatrix rows at stage 0 and kk = 0 (see the loads below).
    const u32 a_rows = shared_address(&sm.x[0][warp_m * 64 + lane % 16][(lane / 16) * 8]);
    const u32 b_rows = shared_address(&sm.w[warp_n * 32 + lane % 8 + (lane / 16) * 8][((lane / 8) % 2) * 8]);
    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;

    // Prologue: STAGES-1 chunks in flight. Empty commit groups keep the wait count uniform at the tail.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < chunks) load_stage(s, s);
        cp_async_commit();
    }

    u16 s_next, z_next;
    load_params(s_next, z_next);

    for (int chunk = 0; chunk < chunks; ++chunk) {
        const int stage = chunk % STAGES;
        const u16 s_cur = s_next, z_cur = z_next;
        if (chunk + 1 < chunks) load_params(s_next, z_next);
        cp_async_wait<STAGES - 2>();
        // After this barrier chunk `chunk` is in shared memory for every thread, and every warp has
        // finished the mma of the previous chunk, so its stage and the weight tile may be overwritten.
        __syncthreads();
        const int next = chunk + STAGES - 1;
        if (next < chunks) load_stage(next % STAGES, next);
        cp_async_commit();
        dequantize(stage, s_cur, z_cur);
        __syncthreads();

        const u32 a_stage = a_rows + stage * X_STAGE_BYTES;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 a[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)  // sm.x[stage][warp_m * 64 + mi * 16 + lane % 16][kk + (lane / 16) * 8]
                ldmatrix_x4(a[mi], a_stage + (mi * 16 * SROW + kk) * 2);
            u32 b[4][2];
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                u32 t[4];
                // sm.w[warp_n * 32 + nj * 16 + lane % 8 + (lane / 16) * 8][kk + ((lane / 8) % 2) * 8]
                ldmatrix_x4(t, b_rows + (nj * 16 * SROW + kk) * 2);
                b[2 * nj][0] = t[0];
                b[2 * nj][1] = t[1];
                b[2 * nj + 1][0] = t[2];
                b[2 * nj + 1][1] = t[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) T::mma(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
        }
    }
    cp_async_wait<0>();

    // Accumulator c0,c1 is (token g, outputs 2t, 2t+1) of the m16n8 tile, c2,c3 the same 8 rows below,
    // with g = lane / 4 and t = lane % 4.
    const bool paired_stores = (out_features % 2) == 0;  // u32 stores need 4-byte aligned rows
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int col = n0 + warp_n * 32 + ni * 8 + 2 * (lane % 4);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int token = sm.token[warp_m * 64 + mi * 16 + lane / 4 + half * 8];
                if (token < 0) continue;
                const float v0 = acc[mi][ni][2 * half];
                const float v1 = acc[mi][ni][2 * half + 1];
                u16* dst = y + (size_t)token * out_features + col;
                if (paired_stores && col + 1 < out_features) {
                    *reinterpret_cast<u32*>(dst) = T::pack(v0, v1);
                } else {
                    if (col < out_features) dst[0] = T::from_float(v0);
                    if (col + 1 < out_features) dst[1] = T::from_float(v1);
                }
            }
        }
    }
}

// Two blocks per multiprocessor (53760 bytes of shared memory each): the bound keeps the registers at 128,
// which the folded row gains would otherwise raise past the 64K-register file's share of two blocks.
#define PREFILL_KERNEL(NAME, TYPE)                                                                           \
    extern "C" __global__ void __launch_bounds__(PREFILL_THREADS, 2)                                         \
        NAME(const u16* __restrict__ x, const u32* __restrict__ planes, const u16* __restrict__ scale,       \
             const u16* __restrict__ zero, const u16* __restrict__ gains, const int* __restrict__ order,     \
             const int* __restrict__ offsets, u16* __restrict__ y, int out_features, int in_features,         \
             int num_slices, int group_size) {                                                               \
        prefill_impl<TYPE>(x, planes, scale, zero, gains, order, offsets, y, out_features, in_features,      \
                           num_slices, group_size);                                                          \
    }

PREFILL_KERNEL(mbq_prefill_f16, F16)
PREFILL_KERNEL(mbq_prefill_bf16, BF16)
