// MoBiQuant dequantisation kernel: W_k [out, in] in fp16 or bf16 from the first 2k bit planes, for the
// prefill path that multiplies each precision group with cuBLAS (mobiquant/kernels/__init__.py).
//
// Memory layout (the contract of mobiquant/slicing.py, as in prefill.cu)
//   planes  [2K, out, in/32]   u32 bit planes, MSB first: c_k is read from planes 0..2k-1 alone
//   scale,  [out, in/group]    fp16 group parameters (group_size a multiple of 32)
//   zero
//   gains   [K', out]          fp16 row gains of format v2 (K' >= k), or null: row r at k slices is
//                              C + gains[k-1][r] (W_k - C), folded into the group affine (fold_row_gain)
//   w       [out, in]          the output's type, 16-byte aligned; every element is written exactly once
//
// One thread per row and 32-column word: consecutive threads take consecutive words of a row, so each
// plane is read as whole 128-byte lines and each warp writes 2 KB of contiguous weights with 16-byte
// stores. The codes are built byte-packed by shift-and-add of the slices (append_slice in common.cuh),
// turned into floats with one PRMT and a subtraction (byte_to_float), and W = a * c_k + b in fp32
// (group_affine, with the row's gain folded in), rounded once to the output's type. The host clamps k to 1..K.
#include "common.cuh"

#define DEQUANT_THREADS 256

template <typename T, int K>
__device__ __forceinline__ void dequant_word(const u32* __restrict__ planes, const u16* __restrict__ scale,
                                             const u16* __restrict__ zero, const u16* __restrict__ gains,
                                             u16* __restrict__ w, int out_features, int in_features, int group_size,
                                             int row, int word) {
    const int words = in_features / 32;
    const int groups = in_features / group_size;
    const int group = word * 32 / group_size;
    const u16 s = scale[(i64)row * groups + group], z = zero[(i64)row * groups + group];
    GroupAffine affine = group_affine(s, z, K);
    if (gains != nullptr)
        affine = fold_row_gain(affine, s, z, half_to_float(gains[(i64)(K - 1) * out_features + row]));
    // Codes byte-packed, four columns per register: register j holds columns j, j+8, j+16, j+24.
    u32 codes[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) codes[j] = 0u;
#pragma unroll
    for (int e = 0; e < K; ++e) {
        const u32 high = planes[((i64)(2 * e) * out_features + row) * words + word];
        const u32 low = planes[((i64)(2 * e + 1) * out_features + row) * words + word];
#pragma unroll
        for (int j = 0; j < 8; ++j) codes[j] = append_slice(codes[j], high, low, j);
    }
    u32 pairs[16];
#pragma unroll
    for (int c = 0; c < 32; c += 2) {
        const float first = fmaf(byte_to_float(codes[c % 8], c / 8), affine.a, affine.b);
        const float second = fmaf(byte_to_float(codes[(c + 1) % 8], (c + 1) / 8), affine.a, affine.b);
        pairs[c / 2] = T::pack(first, second);
    }
    uint4* destination = reinterpret_cast<uint4*>(w + (i64)row * in_features + (i64)word * 32);
#pragma unroll
    for (int q = 0; q < 4; ++q)
        destination[q] = uint4{pairs[4 * q], pairs[4 * q + 1], pairs[4 * q + 2], pairs[4 * q + 3]};
}

template <typename T>
__device__ __forceinline__ void dequant_impl(const u32* __restrict__ planes, const u16* __restrict__ scale,
                                             const u16* __restrict__ zero, const u16* __restrict__ gains,
                                             u16* __restrict__ w, int out_features, int in_features, int k,
                                             int group_size) {
    const int words = in_features / 32;
    const i64 index = (i64)blockIdx.x * DEQUANT_THREADS + threadIdx.x;
    if (index >= (i64)out_features * words) return;
    const int row = (int)(index / words), word = (int)(index % words);
    // k is the same for the whole launch: one specialised body per slice count, no per-bit predicates.
    switch (k) {
        case 1: dequant_word<T, 1>(planes, scale, zero, gains, w, out_features, in_features, group_size, row, word); break;
        case 2: dequant_word<T, 2>(planes, scale, zero, gains, w, out_features, in_features, group_size, row, word); break;
        case 3: dequant_word<T, 3>(planes, scale, zero, gains, w, out_features, in_features, group_size, row, word); break;
        default: dequant_word<T, 4>(planes, scale, zero, gains, w, out_features, in_features, group_size, row, word); break;
    }
}

#define DEQUANT_KERNEL(NAME, TYPE)                                                                          \
    extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS)                                           \
        NAME(const u32* __restrict__ planes, const u16* __restrict__ scale, const u16* __restrict__ zero,   \
             const u16* __restrict__ gains, u16* __restrict__ w, int out_features, int in_features, int k,   \
             int group_size) {                                                                              \
        dequant_impl<TYPE>(planes, scale, zero, gains, w, out_features, in_features, k, group_size);       \
    }

DEQUANT_KERNEL(mbq_dequant_f16, F16)
DEQUANT_KERNEL(mbq_dequant_bf16, BF16)
