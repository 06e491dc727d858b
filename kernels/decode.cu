// MoBiQuant decode kernel: y[t] = x[t] @ W_{k_t}^T for 1..16 tokens, each with its own slice count k_t.
//
// Memory layout (the contract of mobiquant/slicing.py)
//   x       [tokens, in]            fp16 or bf16, row-major, 16-byte aligned rows (in is a multiple of 32)
//   planes  [2K, out, in/32]        u32 words. Plane p holds bit 2K-1-p of the full code c_K (MSB first),
//                                   so c_k is read from planes 0..2k-1 alone; bit j of word w in row r is
//                                   input column 32w + j.
//   scale,  [out, in/group_size]    fp16 group parameters; one 32-column word never straddles two
//   zero                            groups because group_size is a multiple of 32.
//   slices  [tokens]                int64 slice count per token (1..K)
//   y       [tokens, out]           same dtype as x; every element is written exactly once
//
// Dequantisation: W_k = s * ((c_k + 0.5) / 4^(k-1) - z) = a_k * c_k + b_k (see group_affine).
//
// Thread mapping
//   * A block has 4 warps; each warp owns 2 consecutive output rows and all tokens of the call, so the
//     plane words of a row are read from DRAM once per call whatever the number of tokens.
//   * Lane l of a warp walks the words l, l+32, l+64, ... of its rows: for each plane the warp reads 32
//     consecutive words (128 bytes), a fully coalesced line. Only planes 0..2*kmax-1 are loaded, where
//     kmax is the largest slice count among the tokens: the kernel reads only the slices it needs.
//   * Shift-and-add: the codes of one word are kept byte-packed, four columns per register (register j
//     holds columns j, j+8, j+16, j+24). Adding slice e is c_e = 4 c_(e-1) + 2 hi + lo on all four bytes
//     at once (append_slice), i.e. the lower slices are shifted up and the next slice is added below
//     them at the bit-plane level. The codes are turned into floats only when a token needs them.
//   * Tokens are sorted by slice count once per block (thread 0, counting sort over at most 16 tokens),
//     so while a warp walks the tokens it only ever adds slices: every slice of a word is unpacked once
//     per row, however many tokens share it.
//   * Accumulation is fp32: per word, a 32-term dot product per (row, token); per row and token, a sum
//     over the lane's words; finally a butterfly reduction over the 32 lanes.
//   * MAX_TOKENS is a template parameter (1, 2, 4, 8, 16) so that the per-token accumulators are indexed
//     at compile time and stay in registers; the host picks the smallest instance that fits.
#include "common.cuh"

#define DECODE_WARPS 4
#define ROWS_PER_WARP 2
#define DECODE_THREADS (DECODE_WARPS * 32)

template <typename T, int MAX_TOKENS>
__device__ __forceinline__ void decode_impl(const u16* __restrict__ x, const u32* __restrict__ planes,
                                            const u16* __restrict__ scale, const u16* __restrict__ zero,
                                            const i64* __restrict__ slices, u16* __restrict__ y, int tokens,
                                            int out_features, int in_features, int num_slices, int group_size) {
    __shared__ int order_s[MAX_TOKENS];
    __shared__ int level_s[MAX_TOKENS];
    __shared__ int kmax_s;

    if (threadIdx.x == 0) {
        // Counting sort of the tokens by slice count. Counts outside 1..num_slices are clamped so that a
        // bad routing decision can never read past the planes; the layer validates them before calling.
        int count[MAX_SLICES + 2] = {0};
        int kmax = 1;
        for (int t = 0; t < tokens; ++t) {
            const int k = (int)min(max(slices[t], (i64)1), (i64)num_slices);
            ++count[k + 1];
            kmax = max(kmax, k);
        }
        for (int k = 1; k <= MAX_SLICES; ++k) count[k + 1] += count[k];
        for (int t = 0; t < tokens; ++t) {
            const int k = (int)min(max(slices[t], (i64)1), (i64)num_slices);
            const int pos = count[k]++;
            order_s[pos] = t;
            level_s[pos] = k;
        }
        kmax_s = kmax;
    }
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * DECODE_WARPS + warp) * ROWS_PER_WARP;
    if (row0 >= out_features) return;  // no __syncthreads below this point

    const int words = in_features / 32;
    const int groups = in_features / group_size;
    const int kmax = kmax_s;

    int order[MAX_TOKENS];
    int level[MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < MAX_TOKENS; ++t) {
        order[t] = t < tokens ? order_s[t] : 0;
        level[t] = t < tokens ? level_s[t] : 0;
    }
    bool row_ok[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) row_ok[r] = row0 + r < out_features;

    float acc[ROWS_PER_WARP][MAX_TOKENS];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) acc[r][t] = 0.0f;

    for (int w = lane; w < words; w += 32) {
        // Issue every load of this word first so that they are in flight together.
        u32 pw[ROWS_PER_WARP][MAX_PLANES];
        u16 sc[ROWS_PER_WARP], zc[ROWS_PER_WARP];
        const int g = (w * 32) / group_size;
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            const int row = row0 + r;
#pragma unroll
            for (int p = 0; p < MAX_PLANES; ++p)
                pw[r][p] = (row_ok[r] && p < 2 * kmax)
                               ? planes[((size_t)p * out_features + row) * words + w]
                               : 0u;
            sc[r] = row_ok[r] ? scale[(size_t)row * groups + g] : (u16)0;
            zc[r] = row_ok[r] ? zero[(size_t)row * groups + g] : (u16)0;
        }

        u32 codes[ROWS_PER_WARP][8];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) codes[r][j] = 0u;
        float v[ROWS_PER_WARP][32];  // dequantised weights of this word at slice count `folded`
        int folded = 0;

#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) {
            if (t < tokens) {
                const int k = level[t];
                if (k != folded) {
                    // Tokens are sorted, so k > folded: shift in the slices folded+1..k.
#pragma unroll
                    for (int e = 1; e <= MAX_SLICES; ++e) {
                        if (e > folded && e <= k) {
#pragma unroll
                            for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
                                for (int j = 0; j < 8; ++j)
                                    codes[r][j] = append_slice(codes[r][j], pw[r][2 * e - 2], pw[r][2 * e - 1], j);
                        }
                    }
                    folded = k;
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; ++r) {
                        const GroupAffine ga = group_affine(sc[r], zc[r], k);
#pragma unroll
                        for (int j = 0; j < 8; ++j)
#pragma unroll
                            for (int b = 0; b < 4; ++b)
                                v[r][j + 8 * b] = fmaf(byte_to_float(codes[r][j], b), ga.a, ga.b);
                    }
                }

                // The token's 32 activations of this word: four 16-byte loads.
                const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)order[t] * in_features + w * 32);
                float xf[32];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const uint4 u = xv[q];
                    const u32 parts[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        xf[8 * q + 2 * i] = T::to_float((u16)(parts[i] & 0xFFFFu));
                        xf[8 * q + 2 * i + 1] = T::to_float((u16)(parts[i] >> 16));
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; ++r) {
                    float d = 0.0f;
#pragma unroll
                    for (int c = 0; c < 32; ++c) d = fmaf(v[r][c], xf[c], d);
                    acc[r][t] += d;
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
#pragma unroll
        for (int t = 0; t < MAX_TOKENS; ++t) {
            float s = acc[r][t];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, offset);
            if (lane == 0 && t < tokens && row_ok[r])
                y[(size_t)order[t] * out_features + row0 + r] = T::from_float(s);
        }
    }
}

#define DECODE_KERNEL(NAME, TYPE, MAX_TOKENS)                                                                 \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                              \
        NAME(const u16* __restrict__ x, const u32* __restrict__ planes, const u16* __restrict__ scale,        \
             const u16* __restrict__ zero, const i64* __restrict__ slices, u16* __restrict__ y, int tokens,   \
             int out_features, int in_features, int num_slices, int group_size) {                             \
        decode_impl<TYPE, MAX_TOKENS>(x, planes, scale, zero, slices, y, tokens, out_features, in_features,   \
                                      num_slices, group_size);                                                \
    }

DECODE_KERNEL(mbq_decode_f16_t1, F16, 1)
DECODE_KERNEL(mbq_decode_f16_t2, F16, 2)
DECODE_KERNEL(mbq_decode_f16_t4, F16, 4)
DECODE_KERNEL(mbq_decode_f16_t8, F16, 8)
DECODE_KERNEL(mbq_decode_f16_t16, F16, 16)
DECODE_KERNEL(mbq_decode_bf16_t1, BF16, 1)
DECODE_KERNEL(mbq_decode_bf16_t2, BF16, 2)
DECODE_KERNEL(mbq_decode_bf16_t4, BF16, 4)
DECODE_KERNEL(mbq_decode_bf16_t8, BF16, 8)
DECODE_KERNEL(mbq_decode_bf16_t16, BF16, 16)
