// MoBiQuant decode kernel: y[t] = x[t] @ W_{k_t}^T for 1..16 tokens, each with its own slice count k_t,
// on tensor cores (mma.m16n8k16, fp32 accumulators) with the weights as the A operand and the tokens as N.
//
// Inputs (the layout is built once per weight by mobiquant/kernels/_repack.py from the checkpoint's planes)
//   x       [tokens, in]   fp16 or bf16, row-major, 16-byte aligned rows (in is a multiple of 32)
//   packed  [K][row_tiles][tiles][32 lanes] uint4: slice e's 2-bit codes q_e of a 16-row x 128-column tile,
//           the 16 weights each lane feeds one mma pair per 32-column span in one 32-bit word (see below)
//   affine  [K][row_tiles][units][8][2] u32: (s, b'_k) as a pair of x's type per row and unit (a tile
//           when the group size is a multiple of 128, else a 32-column span), b'_k = s * (0.5 / 4^(k-1) - z + 2)
//   slices  [tokens] int64 slice count per token (clamped to 1..K)
//   y       [tokens, out]  x's type; every element is written exactly once
//
// Dequantisation: W_k = s * ((c_k + 0.5) / 4^(k-1) - z) = s * (c_k / 4^(k-1) - 2) + b'_k.
//   The codes of a lane's half2 register sit in one 2-bit field of the low and of the high half of a word.
//   One LOP3 per slice moves them under the mantissa of the magic number 2^MANTISSA (fp16: 1024, bf16: 128),
//   which turns them into the exact value 2^MANTISSA + c * 4^p. One HFMA2 by powers of two makes that
//   c / 4^(k-1) - 2 exactly, and one HFMA2 with (s, b'_k) gives W, rounded once. Fields at positions p that would
//   not fit the mantissa are shifted down first: one shift per slice and position group, shared by all
//   lanes' registers. bf16 at 4 slices splits the code into two 2-slice halves (c = 16 hi + lo).
//
// Fragment order. For a 16-column chunk the mma's A fragment of lane (g = lane / 4, t = lane % 4) holds rows
// g and g + 8 at k-indices {2t, 2t+1, 2t+8, 2t+9}, and its B fragment holds token g at the same k-indices.
// A k-permutation applied to both operands leaves the product unchanged, so k-index 2t + j of chunk c is
// mapped to column 8t + 4c + j and k-index 2t + 8 + j to column 8t + 4c + 2 + j (j = 0, 1) of a 32-column
// span. Then a lane's B fragments of both chunks are the 8 consecutive columns 8t..8t+7 of token g's row:
// one 16-byte load, and its A registers are position i = 4c + r of the span's word:
//   r = 0: row g,   columns 8t+4c, +1      r = 1: row g+8, columns 8t+4c, +1
//   r = 2: row g,   columns 8t+4c+2, +3    r = 3: row g+8, columns 8t+4c+2, +3
// with the first column in bits 2i..2i+1 and the second in bits 16+2i..16+2i+1.
//
// Partitioning. A block of 8 warps owns one 16-row tile; warp w takes the 128-column tiles w, w+8, ...
// (split-K striped over the row, so a 4096-column row keeps 8 warps busy on it), prefetches its next tile's
// weights, activations and affine pairs into registers while the current one is multiplied, and the 8 partial
// sums meet in shared memory at the end. Columns past the last whole tile (in % 128) are a tail tile with its
// activation loads predicated. Tokens at another slice count than the pass's read zeros instead of x, so one
// pass per slice count present serves every mix; a uniform batch makes one pass.
#include "common.cuh"

#define DECODE_WARPS 8
#define DECODE_THREADS (DECODE_WARPS * 32)
#define TILE_ROWS 16
#define TILE_COLS 128
#define SPANS_PER_TILE 4
#define SPAN_COLS 32

template <typename T>
struct HalfFormat;
template <>
struct HalfFormat<F16> {
    static constexpr int MANTISSA = 10, BIAS = 15;
};
template <>
struct HalfFormat<BF16> {
    static constexpr int MANTISSA = 7, BIAS = 127;
};

// The pair (2^e, 2^e), or (-2^e, -2^e), as two 16-bit values of type T.
template <typename T>
constexpr u32 pow2_pair(int e, bool negative) {
    const u32 h = ((u32)(e + HalfFormat<T>::BIAS) << HalfFormat<T>::MANTISSA) | (negative ? 0x8000u : 0u);
    return h | (h << 16);
}

// The pair (-(2^m + 2), -(2^m + 2)): the magic number's scaled value plus the centring 2 (see
// dequantise_span), exact for 2 <= m <= MANTISSA + 1.
template <typename T>
constexpr u32 centred_magic_pair(int m) {
    const u32 h = 0x8000u | ((u32)(m + HalfFormat<T>::BIAS) << HalfFormat<T>::MANTISSA) |
                  (1u << (HalfFormat<T>::MANTISSA + 1 - m));
    return h | (h << 16);
}

// How many 2-bit field positions p, counted from bit 0 of a half, hold a code of `slices` slices times 4^p
// under a mantissa of `mantissa` bits.
constexpr int positions_fitting(int slices, int mantissa) {
    int p = 0;
    while (p < 8 && ((1 << (2 * slices)) - 1) * (1 << (2 * p)) < (1 << mantissa)) ++p;
    return p;
}

template <typename T, int K>
struct DequantPlan {
    static constexpr int MANTISSA = HalfFormat<T>::MANTISSA;
    // A code of 4 slices (8 bits) does not fit bf16's 7-bit mantissa: two parts of 2 slices.
    static constexpr int PER_PART = (MANTISSA < 2 * K) ? K / 2 : K;
    static constexpr int PARTS = K / PER_PART;
    static constexpr int POSITIONS = positions_fitting(PER_PART, MANTISSA);
};

__device__ __forceinline__ u32 and_or(u32 a, u32 mask, u32 c) {
    u32 d;  // (a & mask) | c in one LOP3
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(c));
    return d;
}

__device__ __forceinline__ u32 byte_permute(u32 a, u32 selector) {
    u32 d;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(a), "r"(selector));
    return d;
}

__device__ __forceinline__ uint4 load_global_nc(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 load_global_nc(const uint2* p) {
    uint2 v;
    asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 word_of(const uint4& v, int s) { return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w; }

// The 8 A registers of one lane for one 32-column span at K slices: words[e] is slice e's word of the span,
// affine[h] the (s, b_k) pair of row g (h = 0) or g + 8 (h = 1).
template <typename T, int K>
__device__ __forceinline__ void dequantise_span(const u32 (&words)[K], const u32 (&affine)[2], u32 (&frag)[8]) {
    using Plan = DequantPlan<T, K>;
    constexpr u32 MAGIC = pow2_pair<T>(Plan::MANTISSA, false);
    const u32 scale[2] = {byte_permute(affine[0], 0x1010u), byte_permute(affine[1], 0x1010u)};
    const u32 offset[2] = {byte_permute(affine[0], 0x3232u), byte_permute(affine[1], 0x3232u)};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int p = i % Plan::POSITIONS;  // field position after the shift
        const int shift = 2 * (i - p);
        u32 value = 0;  // c_k / 4^(k-1) as a pair of T
#pragma unroll
        for (int part = 0; part < Plan::PARTS; ++part) {
            u32 fields = MAGIC;
#pragma unroll
            for (int j = 0; j < Plan::PER_PART; ++j) {
                const u32 word = words[part * Plan::PER_PART + j];
                const int place = 2 * (Plan::PER_PART - 1 - j);  // the slice's weight 4^(...) inside the part
                const int net = place - shift;
                const u32 moved = net >= 0 ? word << net : word >> -net;
                fields = and_or(moved, (3u << (2 * p + place)) * 0x10001u, fields);
            }
            // fields = 2^MANTISSA + code * 4^p; scaled by 4^-p and the part's weight among the K slices.
            // The first part is also centred: c_k / 4^(k-1) - 2 lies in [-2, 2), still exact, and leaves
            // the offset b'_k = s * (0.5 / 4^(k-1) - z + 2) small next to the weights (fewer bits lost
            // when it is rounded to 16 bits).
            const int exponent = -2 * p + 2 * (1 - (part + 1) * Plan::PER_PART);
            const u32 exact = T::fma2(fields, pow2_pair<T>(exponent, false),
                                      part == 0 ? centred_magic_pair<T>(Plan::MANTISSA + exponent)
                                                : pow2_pair<T>(Plan::MANTISSA + exponent, true));
            value = part == 0 ? exact : T::fma2(exact, pow2_pair<T>(0, false), value);
        }
        frag[i] = T::fma2(value, scale[i & 1], offset[i & 1]);
    }
}

// One tile: 4 spans x 2 chunks of 16 columns, each an mma per 8-token n-tile.
template <typename T, int NT, int K, bool SPAN_AFFINE>
__device__ __forceinline__ void tile_product(const uint4 (&weights)[K], const uint4 (&xs)[NT][SPANS_PER_TILE],
                                             const uint2 (&affine)[SPAN_AFFINE ? SPANS_PER_TILE : 1],
                                             float (&acc)[NT][4]) {
#pragma unroll
    for (int s = 0; s < SPANS_PER_TILE; ++s) {
        u32 words[K];
#pragma unroll
        for (int e = 0; e < K; ++e) words[e] = word_of(weights[e], s);
        const uint2 pair = affine[SPAN_AFFINE ? s : 0];
        const u32 rows[2] = {pair.x, pair.y};
        u32 frag[8];
        dequantise_span<T, K>(words, rows, frag);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const u32 a[4] = {frag[4 * c], frag[4 * c + 1], frag[4 * c + 2], frag[4 * c + 3]};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const u32 b0 = c == 0 ? xs[nt][s].x : xs[nt][s].z;
                const u32 b1 = c == 0 ? xs[nt][s].y : xs[nt][s].w;
                T::mma(acc[nt], a, b0, b1);
            }
        }
    }
}

struct DecodeShape {
    int tokens, out_features, in_features, num_slices;
    int row_tiles, tiles, full_tiles, spans;
};

// The registers of one tile: weights of K slices, activations of the lane's tokens, affine pairs of rows g
// and g + 8.
template <int NT, int K, bool SPAN_AFFINE>
struct TileRegisters {
    uint4 weights[K];
    uint4 xs[NT][SPANS_PER_TILE];
    uint2 affine[SPAN_AFFINE ? SPANS_PER_TILE : 1];
};

// Where a lane's next loads of one slice-count pass come from: pointers into the tile `tile`, advanced by
// DECODE_WARPS tiles after each load, so that no address is recomputed in the loop.
template <int NT, int K>
struct LaneSources {
    const uint4* weights[K];  // slice e of the tile, this lane
    const u16* x_rows[NT];    // token g + 8 nt's row at the tile's first column + 8t
    const uint2* affine;      // the tile's first unit, rows g and g + 8
    bool active[NT];          // the token exists and has this pass's slice count
    int tile, spans;
};

// Loads of the tile `from` points to into registers. Activations of inactive tokens are not loaded: the
// registers keep the zeros they were given before the loop. TAIL: the tile is the partial last one, its
// spans past the input are zero.
template <int NT, int K, bool SPAN_AFFINE, bool TAIL>
__device__ __forceinline__ void load_tile(const LaneSources<NT, K>& from, TileRegisters<NT, K, SPAN_AFFINE>& to) {
#pragma unroll
    for (int e = 0; e < K; ++e) to.weights[e] = load_global_nc(from.weights[e]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int s = 0; s < SPANS_PER_TILE; ++s) {
            if (from.active[nt] && (!TAIL || from.tile * SPANS_PER_TILE + s < from.spans))
                to.xs[nt][s] = load_global_nc(reinterpret_cast<const uint4*>(from.x_rows[nt] + s * SPAN_COLS));
            else if (TAIL)
                to.xs[nt][s] = uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
    for (int u = 0; u < (SPAN_AFFINE ? SPANS_PER_TILE : 1); ++u) to.affine[u] = load_global_nc(from.affine + u * 8);
}

// Moves `from` by `steps` tiles of the warp's stripe (DECODE_WARPS tiles each; negative steps go back).
template <int NT, int K, bool SPAN_AFFINE>
__device__ __forceinline__ void advance(LaneSources<NT, K>& from, int steps) {
#pragma unroll
    for (int e = 0; e < K; ++e) from.weights[e] += steps * DECODE_WARPS * 32;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) from.x_rows[nt] += steps * DECODE_WARPS * TILE_COLS;
    from.affine += steps * DECODE_WARPS * (SPAN_AFFINE ? SPANS_PER_TILE : 1) * 8;
    from.tile += steps * DECODE_WARPS;
}

template <int NT, int K, bool SPAN_AFFINE>
__device__ __forceinline__ void zero_activations(TileRegisters<NT, K, SPAN_AFFINE>& regs) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int s = 0; s < SPANS_PER_TILE; ++s) regs.xs[nt][s] = uint4{0u, 0u, 0u, 0u};
}

// One pass over the row tile for the tokens at slice count K. Two register sets take turns: while one
// tile is multiplied, the warp's next tile is loaded into the other.
template <typename T, int NT, int K, bool SPAN_AFFINE>
__device__ __forceinline__ void level_pass(const u16* __restrict__ x, const u32* __restrict__ packed,
                                           const u32* __restrict__ affine_table, const int (&level)[NT],
                                           const DecodeShape& shape, float (&acc)[NT][4]) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    LaneSources<NT, K> from;
    const size_t slice_stride = (size_t)shape.row_tiles * shape.tiles * 32;  // in uint4
#pragma unroll
    for (int e = 0; e < K; ++e)
        from.weights[e] = reinterpret_cast<const uint4*>(packed) + e * slice_stride +
                          ((size_t)blockIdx.x * shape.tiles + warp) * 32 + lane;
    constexpr int UNITS_PER_TILE = SPAN_AFFINE ? SPANS_PER_TILE : 1;
    from.affine = reinterpret_cast<const uint2*>(affine_table) +
                  (((size_t)(K - 1) * shape.row_tiles + blockIdx.x) * shape.tiles + warp) * UNITS_PER_TILE * 8 + g;
    from.tile = warp;
    from.spans = shape.spans;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int token = g + 8 * nt;
        from.active[nt] = token < shape.tokens && level[nt] == K;
        from.x_rows[nt] = x + (size_t)(from.active[nt] ? token : 0) * shape.in_features + warp * TILE_COLS + 8 * t;
    }

    TileRegisters<NT, K, SPAN_AFFINE> even, odd;
    zero_activations(even);
    zero_activations(odd);
    const int full = shape.full_tiles;
    // Invariant at the top of the loop: `even` holds tile `tile`, `from` points to tile + DECODE_WARPS.
    if (warp < full) {
        load_tile<NT, K, SPAN_AFFINE, false>(from, even);
        advance<NT, K, SPAN_AFFINE>(from, 1);
    }
    for (int tile = warp; tile < full; tile += 2 * DECODE_WARPS) {
        if (from.tile < full) load_tile<NT, K, SPAN_AFFINE, false>(from, odd);
        advance<NT, K, SPAN_AFFINE>(from, 1);
        tile_product<T, NT, K, SPAN_AFFINE>(even.weights, even.xs, even.affine, acc);
        if (tile + DECODE_WARPS >= full) break;
        if (from.tile < full) load_tile<NT, K, SPAN_AFFINE, false>(from, even);
        advance<NT, K, SPAN_AFFINE>(from, 1);
        tile_product<T, NT, K, SPAN_AFFINE>(odd.weights, odd.xs, odd.affine, acc);
    }
    // The partial last tile, if any, belongs to the warp whose stripe it continues (tile `full`); the loop
    // may have moved that warp's `from` past it.
    if (full < shape.tiles && warp == full % DECODE_WARPS) {
        advance<NT, K, SPAN_AFFINE>(from, (full - from.tile) / DECODE_WARPS);
        load_tile<NT, K, SPAN_AFFINE, true>(from, even);
        tile_product<T, NT, K, SPAN_AFFINE>(even.weights, even.xs, even.affine, acc);
    }
}

__device__ __forceinline__ int clamped_level(const i64* __restrict__ slices, int token, int num_slices) {
    return (int)min(max(slices[token], (i64)1), (i64)num_slices);
}

template <typename T, int NT, bool SPAN_AFFINE>
__device__ __forceinline__ void decode_impl(const u16* __restrict__ x, const u32* __restrict__ packed,
                                            const u32* __restrict__ affine_table, const i64* __restrict__ slices,
                                            u16* __restrict__ y, int tokens, int out_features, int in_features,
                                            int num_slices) {
    __shared__ float partial[DECODE_WARPS][NT * 4][32];
    DecodeShape shape;
    shape.tokens = tokens;
    shape.out_features = out_features;
    shape.in_features = in_features;
    shape.num_slices = num_slices;
    shape.row_tiles = (out_features + TILE_ROWS - 1) / TILE_ROWS;
    shape.tiles = (in_features + TILE_COLS - 1) / TILE_COLS;
    shape.full_tiles = in_features / TILE_COLS;
    shape.spans = in_features / SPAN_COLS;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4;
    // Slice counts are clamped so that a bad routing decision can never read past the slices held.
    int present = 0;
    for (int token = 0; token < tokens; ++token) present |= 1 << clamped_level(slices, token, num_slices);
    int level[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        level[nt] = g + 8 * nt < tokens ? clamped_level(slices, g + 8 * nt, num_slices) : 0;

    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[nt][j] = 0.0f;

#ifdef MBQ_ONLY_LEVEL  // bench/kernel_sass.py measures one slice count's loop at a time
    if (present & (1 << MBQ_ONLY_LEVEL)) level_pass<T, NT, MBQ_ONLY_LEVEL, SPAN_AFFINE>(x, packed, affine_table, level, shape, acc);
#else
    if (present & 2) level_pass<T, NT, 1, SPAN_AFFINE>(x, packed, affine_table, level, shape, acc);
    if (present & 4) level_pass<T, NT, 2, SPAN_AFFINE>(x, packed, affine_table, level, shape, acc);
    if (present & 8) level_pass<T, NT, 3, SPAN_AFFINE>(x, packed, affine_table, level, shape, acc);
    if (present & 16) level_pass<T, NT, 4, SPAN_AFFINE>(x, packed, affine_table, level, shape, acc);
#endif

#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) partial[warp][nt * 4 + j][lane] = acc[nt][j];
    __syncthreads();
    // Thread v sums accumulator v / 32 of lane v % 32 over the warps: one output per thread.
    const int v = threadIdx.x;
    if (v < NT * 4 * 32) {
        const int index = v / 32, source_lane = v % 32;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) sum += partial[w][index][source_lane];
        // Accumulator j of n-tile nt in lane (g, t): row g + 8 * (j / 2), token 8 nt + 2 t + j % 2.
        const int nt = index / 4, j = index % 4;
        const int row = blockIdx.x * TILE_ROWS + source_lane / 4 + 8 * (j / 2);
        const int token = 8 * nt + 2 * (source_lane % 4) + j % 2;
        if (token < tokens && row < out_features) y[(size_t)token * out_features + row] = T::from_float(sum);
    }
}

// 8-token kernels fit 128 registers (two blocks per multiprocessor); 16-token ones at 3-4 slices would spill.
#define DECODE_KERNEL(NAME, TYPE, NT, SPAN_AFFINE)                                                            \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, NT == 1 ? 2 : 1)                            \
        NAME(const u16* __restrict__ x, const u32* __restrict__ packed, const u32* __restrict__ affine,       \
             const i64* __restrict__ slices, u16* __restrict__ y, int tokens, int out_features,               \
             int in_features, int num_slices) {                                                               \
        decode_impl<TYPE, NT, SPAN_AFFINE>(x, packed, affine, slices, y, tokens, out_features, in_features,    \
                                           num_slices);                                                       \
    }

// n8: 1-8 tokens, n16: 9-16. g128: group size a multiple of 128 (one affine pair per tile), g32: any
// multiple of 32 (one per span).
DECODE_KERNEL(mbq_decode_f16_n8_g128, F16, 1, false)
DECODE_KERNEL(mbq_decode_f16_n16_g128, F16, 2, false)
DECODE_KERNEL(mbq_decode_f16_n8_g32, F16, 1, true)
DECODE_KERNEL(mbq_decode_f16_n16_g32, F16, 2, true)
DECODE_KERNEL(mbq_decode_bf16_n8_g128, BF16, 1, false)
DECODE_KERNEL(mbq_decode_bf16_n16_g128, BF16, 2, false)
DECODE_KERNEL(mbq_decode_bf16_n8_g32, BF16, 1, true)
DECODE_KERNEL(mbq_decode_bf16_n16_g32, BF16, 2, true)
