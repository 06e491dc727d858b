// Shared definitions for the MoBiQuant kernels (decode.cu, prefill.cu).
//
// The kernels are compiled at run time by NVRTC with no CUDA headers on the include path: the pip
// wheel that carries NVRTC does not ship cuda_fp16.h, and a header-free build works the same from a
// fresh virtual environment, a CI machine without a toolkit and a GPU host. So the few half-precision
// operations needed here are written as inline PTX on raw 16-bit storage (u16) instead of __half.
//
// Everything below is sm_80 or newer (cp.async, ldmatrix, bf16 mma, cvt.rn.bf16x2.f32).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// Codes of up to 4 slices (8 bits) fit one byte, which the byte-packed dequantisation below relies on;
// the host falls back to PyTorch for checkpoints with more slices.
#define MAX_SLICES 4
#define MAX_PLANES (2 * MAX_SLICES)

// 2^23 as a float: OR-ing an integer n < 2^23 into the mantissa of 2^23 gives the float 2^23 + n, so
// one byte-permute plus one subtraction turns a byte into an exact float (cheaper than I2F).
#define MAGIC_FLOAT_BITS 0x4B000000u
#define MAGIC_FLOAT 8388608.0f

// Byte `b` of `packed` as an exact float in [0, 255].
__device__ __forceinline__ float byte_to_float(u32 packed, int b) {
    u32 bits;
    // prmt selector: result byte 0 <- byte b of `packed`, bytes 1-2 <- 0x00, byte 3 <- 0x4B.
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(bits) : "r"(packed), "r"(MAGIC_FLOAT_BITS), "r"(0x7540u | b));
    return __uint_as_float(bits) - MAGIC_FLOAT;
}

// Bits j, j+8, j+16, j+24 of `word`, moved to bit 0 of bytes 0..3: four columns of one bit plane at once.
__device__ __forceinline__ u32 spread_bits(u32 word, int j) {
    return (word >> j) & 0x01010101u;
}

// One slice (high plane, low plane) appended below the codes held byte-wise in `codes`:
// c_e = 4 * c_(e-1) + 2 * high + low, for the four columns j, j+8, j+16, j+24 of a 32-column word.
__device__ __forceinline__ u32 append_slice(u32 codes, u32 high_plane, u32 low_plane, int j) {
    return (codes << 2) | (spread_bits(high_plane, j) << 1) | spread_bits(low_plane, j);
}

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Activation element types. Each gives conversions to and from float and the tensor-core product.
struct F16 {
    __device__ __forceinline__ static float to_float(u16 v) { return half_to_float(v); }
    __device__ __forceinline__ static u16 from_float(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
    // Two floats packed as (lo in bits 0-15, hi in bits 16-31); PTX puts the first source in the upper half.
    __device__ __forceinline__ static u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    // d = a * b + c on two packed halves, rounded once.
    __device__ __forceinline__ static u32 fma2(u32 a, u32 b, u32 c) {
        u32 d;
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
        return d;
    }
    __device__ __forceinline__ static void mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct BF16 {
    // bfloat16 is the upper half of a float32, so widening is a shift.
    __device__ __forceinline__ static float to_float(u16 v) { return __uint_as_float(((u32)v) << 16); }
    __device__ __forceinline__ static u16 from_float(float f) {
        u16 h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
    __device__ __forceinline__ static u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    __device__ __forceinline__ static u32 fma2(u32 a, u32 b, u32 c) {
        u32 d;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
        return d;
    }
    __device__ __forceinline__ static void mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// Dequantisation constants of one group at k slices: W = a * c_k + b with
//   a = s * 4^(1-k)   and   b = s * (0.5 * 4^(1-k) - z),
// which is W_k = s * ((c_k + 0.5) / 4^(k-1) - z) of slicing.py with the products precomputed in fp32.
struct GroupAffine {
    float a, b;
};

__device__ __forceinline__ GroupAffine group_affine(u16 scale, u16 zero, int k) {
    const float step = 1.0f / (float)(1 << (2 * (k - 1)));
    const float s = half_to_float(scale);
    GroupAffine g;
    g.a = s * step;
    g.b = s * (0.5f * step - half_to_float(zero));
    return g;
}

// Format v2's row gain g of the precision being rebuilt: W' = C + g (W - C), C = s * (2 - z) the centre of the
// group's range, is again one multiply-add per weight, a' = g a and b' = C + g (b - C), so a gained weight
// costs the inner loop nothing (the decode layout folds the same two numbers on the host).
__device__ __forceinline__ GroupAffine fold_row_gain(GroupAffine affine, u16 scale, u16 zero, float gain) {
    const float centre = half_to_float(scale) * (2.0f - half_to_float(zero));
    GroupAffine g;
    g.a = affine.a * gain;
    g.b = fmaf(gain, affine.b - centre, centre);
    return g;
}
