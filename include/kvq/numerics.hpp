// kvq/numerics.hpp: the numeric contract, one definition for the CPU reference and every GPU path.
//
//   scale  = amax / 127 (IEEE fp32 division), amax over the finite values of the group;
//            a scale that comes out 0 (all-zero group, no finite value, or amax / 127 underflowing)
//            is 1, so such a group has codes 0 and dequantizes to exact zeros.
//   q      = saturate(round_half_to_even(x / scale)) in [-127, 127], IEEE division, clamp BEFORE
//            narrowing (__float2int_rn(127.5f) is 128); NaN -> 0, +Inf -> 127, -Inf -> -127.
//   y      = float(q) * scale (one IEEE multiply), rounded to the output type (round to nearest even).
//   A given scale (quantize_with_scales, dequantize) that is not positive and finite is read as 1.
//   fp16 / bf16 inputs are widened to fp32 exactly before any arithmetic.
//
// No step can be contracted into an FMA and none depends on the rounding mode of the host beyond
// the default round-to-nearest-even, so nvcc and g++ agree bit for bit; on the GPU the steps are
// inline PTX that nvcc's fast-math flags (--use_fast_math, -ftz=true, -prec-div=false) leave as
// they are (see add_rn), so the agreement holds whatever flags the caller builds with.
#pragma once

#include <kvq/version.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#ifndef __CUDA_ARCH__
#include <cmath>
#endif

KVQ_NAMESPACE_BEGIN

/// The symmetric int8 code range.
struct Int8Codes {
  static constexpr int kMax = 127;
  static constexpr float kMaxF = 127.0f;
};

/// Bits of an fp32 value. For non-negative floats the unsigned order of the bits is the numeric
/// order, which makes amax reductions exact, order-free and usable with integer atomicMax.
__host__ __device__ inline std::uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

__host__ __device__ inline float bits_to_float(std::uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

constexpr std::uint32_t kAbsMask = 0x7fffffffu;
constexpr std::uint32_t kInfBits = 0x7f800000u;

__host__ __device__ inline bool is_finite(float x) { return (float_bits(x) & kAbsMask) < kInfBits; }

/// |x| as bits when x is finite, 0 otherwise: the contribution of x to its group's amax.
__host__ __device__ inline std::uint32_t finite_abs_bits(float x) {
  const std::uint32_t a = float_bits(x) & kAbsMask;
  return a < kInfBits ? a : 0u;
}

/// The larger of two amaxes (finite and >= 0), on the bits: exact and order-free like fmaxf, and,
/// unlike fmaxf under -ftz, it keeps a subnormal amax.
__host__ __device__ inline float max_amax(float a, float b) {
  const std::uint32_t x = float_bits(a), y = float_bits(b);
  return bits_to_float(x > y ? x : y);
}

/// Exact widening of every supported input type to fp32.
__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
// bf16 is the high half of an fp32: a shift, written out because __bfloat162float's 16-bit asm
// operand kept nvcc from holding fragments of bf16 in registers.
__host__ __device__ inline float to_float(__nv_bfloat16 x) {
  std::uint16_t b;
  std::memcpy(&b, &x, sizeof(b));
  return bits_to_float(static_cast<std::uint32_t>(b) << 16);
}

/// Round-to-nearest-even narrowing from fp32 to an output type.
template <class T>
__host__ __device__ inline T from_float(float x);
template <>
__host__ __device__ inline float from_float<float>(float x) { return x; }
template <>
__host__ __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The contract's fp32 operations. On the GPU each is one PTX instruction written out with its
// rounding and without `.ftz`: nvcc's fast-math flags (--use_fast_math, or -ftz=true and
// -prec-div=false alone) rewrite what it emits for C++ arithmetic and for intrinsics such as
// __fmul_rn into flush-to-zero or approximate forms, but never inline PTX. So kvq's scales, codes
// and values do not depend on the flags of the translation unit that includes it (the GPU tests run
// built both ways, and tests/fast_math compares the PTX). The same holds for comparisons: under
// -ftz a float comparison reads a subnormal as zero, so the contract compares bits (see is_positive).
// On the host they are the plain IEEE operations (g++ has no fast-math by default; -ffast-math would
// change the reference, and the build never passes it).
__host__ __device__ inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

__host__ __device__ inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a * b;
#endif
}

/// IEEE division, correctly rounded (never the approximate division of -prec-div=false).
__host__ __device__ inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

/// a * b + c with one rounding (std::fma on the host, FFMA on the GPU).
__host__ __device__ inline float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
#else
  return std::fma(a, b, c);
#endif
}

/// c - a * b with one rounding: fma_rn(-a, b, c) (the negation is exact; on the GPU it folds
/// into the FFMA).
__host__ __device__ inline float fnma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  float r;
  asm("{\n\t.reg .f32 na;\n\tneg.f32 na, %1;\n\tfma.rn.f32 %0, na, %2, %3;\n\t}" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
#else
  return std::fma(-a, b, c);
#endif
}

/// x clamped to [lo, hi] (lo <= hi), subnormals kept; a NaN x gives lo (fmaxf's rule).
__host__ __device__ inline float clamp(float x, float lo, float hi) {
#ifdef __CUDA_ARCH__
  float r;
  asm("{\n\t.reg .f32 t;\n\tmax.f32 t, %1, %2;\n\tmin.f32 %0, t, %3;\n\t}" : "=f"(r) : "f"(x), "f"(lo), "f"(hi));
  return r;
#else
  return std::fmin(std::fmax(x, lo), hi);
#endif
}

/// x is NaN (one FSETP on the GPU, written as PTX so that no .ftz form appears; see add_rn).
__host__ __device__ inline bool is_nan(float x) {
#ifdef __CUDA_ARCH__
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.nan.f32 p, %1, %1;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(x));
  return r != 0;
#else
  return (float_bits(x) & kAbsMask) > kInfBits;
#endif
}

/// x > 0 (a positive subnormal included, +Inf included, NaN excluded), on the bits.
__host__ __device__ inline bool is_positive(float x) { return float_bits(x) - 1u < kInfBits; }

/// The scale of a group from its amax (the max of |x| over its finite values, 0 if none).
__host__ __device__ inline float scale_from_amax(float amax) {
  const float s = div_rn(amax, Int8Codes::kMaxF);
  return is_positive(s) ? s : 1.0f;
}

/// A scale as every operation reads it: anything but a positive finite number is 1.
/// (Positive and finite: bits in [1, kInfBits), one comparison.)
__host__ __device__ inline float sanitize_scale(float s) { return float_bits(s) - 1u < kInfBits - 1u ? s : 1.0f; }

/// Saturating round-half-to-even of a quotient to an int8 code. Clamps first, then rounds.
__host__ __device__ inline std::int8_t saturate_round(float v) {
  if (is_nan(v)) return 0;
  v = clamp(v, -Int8Codes::kMaxF, Int8Codes::kMaxF);
#ifdef __CUDA_ARCH__
  int q;
  asm("cvt.rni.s32.f32 %0, %1;" : "=r"(q) : "f"(v));  // round half to even, no .ftz (see add_rn)
  return static_cast<std::int8_t>(q);
#else
  return static_cast<std::int8_t>(std::nearbyint(v));
#endif
}

/// The code of x under `scale` (a scale produced by scale_from_amax or sanitize_scale).
__host__ __device__ inline std::int8_t quantize_value(float x, float scale) {
  return saturate_round(div_rn(x, scale));
}

/// The reciprocal the GPU multiplies by: 1 / scale correctly rounded, or NaN when the scale lies
/// outside [2^-100, 2^126], which sends every element of the group to the IEEE division. Inside,
/// 1 / scale is a normal float and quantize_by_reciprocal's residuals are exact (see there).
constexpr float kMinFastScale = 0x1p-100f;
constexpr float kMaxFastScale = 0x1p126f;

__host__ __device__ inline float reciprocal(float scale) {
#ifdef __CUDA_ARCH__
  float r;  // IEEE 1 / scale, round to nearest even: shorter than a division; no .ftz (see add_rn)
  asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(scale));
#else
  const float r = 1.0f / scale;
#endif
  // scale in [kMinFastScale, kMaxFastScale], on the bits: a negative or NaN scale is outside.
  const std::uint32_t b = float_bits(scale);
  return (b >= float_bits(kMinFastScale) && b <= float_bits(kMaxFastScale)) ? r : bits_to_float(0x7fc00000u);
}

/// 1.5 * 2^23: adding it to a float of magnitude below 2^22 rounds it to an integer (half to even),
/// which then sits in the low bits of the sum's significand.
constexpr float kRoundMagic = 12582912.0f;

/// The GPU's path: the code of x / scale with no division, no branch and no conversion
/// instruction, given inv_scale = reciprocal(scale), bit-identical to quantize_value(x, scale).
///
/// q0 = RN(x * inv_scale) is within 1.5 ulp of x / scale (inv_scale is within 2^-24 relative of
/// 1 / scale). One Newton step, q1 = RN(q0 + r0 * inv_scale) with the residual
/// r0 = x - q0 * scale computed exactly by an FMA, lands within 1.5 * 2^-24 ulp of the exact
/// step's value and so within one ulp of x / scale. Markstein's theorem (inv_scale within half an
/// ulp of 1 / scale, q1 within one ulp of x / scale, exact residual) then makes the second step's
/// q2 = RN(q1 + r1 * inv_scale) the correctly rounded quotient: q2 == x / scale as IEEE divides,
/// and the code is saturate_round(q2) (clamp, then round half to even by adding 1.5 * 2^23).
/// The residuals are exact because scale >= 2^-100 keeps them on the subnormal grid or above
/// wherever the code can be non-zero (|x / scale| >= 0.25); where it is zero, a few ulps of a
/// quotient below 0.25 change nothing.
///
/// `exact` is false when q2 is NaN: a NaN or Inf input, x * inv_scale overflowing (such codes
/// saturate) or a NaN reciprocal (scale outside the fast range). The caller then divides.
/// (An exhaustive check of every fp16 and bf16 value against every scale amax / 127 of those
/// formats, and 2e8 fp32 values next to ties, found no difference from the division even with one
/// step; the second step is what the proof needs.)
///
/// code_word returns the bits of the rounded float, whose low byte is the code (so that four codes
/// pack into a word with byte permutes); quantize_by_reciprocal returns the code.
///
/// Also compiled for the host (fma_rn is std::fma there, the same correctly rounded operation), so the
/// CPU tests check this arithmetic against the division (numerics_test.cpp); on the host the
/// library itself still divides.
__host__ __device__ inline std::uint32_t code_word(float x, float scale, float inv_scale, bool& exact) {
  float q = mul_rn(x, inv_scale);
  q = fma_rn(fnma_rn(q, scale, x), inv_scale, q);
  q = fma_rn(fnma_rn(q, scale, x), inv_scale, q);
  exact = !is_nan(q);
  const float c = clamp(q, -Int8Codes::kMaxF, Int8Codes::kMaxF);
  return float_bits(add_rn(c, kRoundMagic));  // low byte: the code, two's complement
}

/// The smallest group amax whose scale amax / 127 is inside the fast range (2^-93 / 127 > 2^-100).
constexpr float kMinFastAmax = 0x1p-93f;

/// Whether the scale of a group of fp16 / bf16 values with this amax (finite, >= 0) is 1 (amax 0)
/// or inside the fast range, so that code_word_within_amax applies to the group. On the bits.
__host__ __device__ inline bool lean_codes_apply(float amax) {
  const std::uint32_t b = float_bits(amax);
  return b == 0u || b >= float_bits(kMinFastAmax);
}

/// code_word for one case that covers most of the work: x is an fp16 or bf16 value of a group whose
/// scale was computed from it (scale = scale_from_amax(amax), amax >= |x|), the scale is inside the
/// fast range and inv_scale = reciprocal(scale) (so not NaN; an amax of zero or at least
/// kMinFastAmax guarantees that). There one correction step gives the right code and
/// no clamp is needed: |x / scale| <= 127 * (1 + 2^-23). Both are shown by exhaustion, since such x
/// and scales are finite sets: every fp16 and every bf16 amax with every value of its format at most
/// that amax in magnitude, about 2e9 pairs, equals quantize_value (numerics_test.cpp,
/// ReciprocalPath.*WithinTheGroupAmax, runs that check). Three floating-point operations per element
/// fewer than code_word, no NaN test.
__host__ __device__ inline std::uint32_t code_word_within_amax(float x, float scale, float inv_scale) {
  const float q = mul_rn(x, inv_scale);
  return float_bits(add_rn(fma_rn(fnma_rn(q, scale, x), inv_scale, q), kRoundMagic));
}

__host__ __device__ inline std::int8_t quantize_by_reciprocal(float x, float scale, float inv_scale, bool& exact) {
  return static_cast<std::int8_t>(code_word(x, scale, inv_scale, exact) & 0xffu);
}

/// Same result as quantize_value(x, scale), bit for bit, given inv_scale = reciprocal(scale); on
/// the GPU it multiplies and corrects (quantize_by_reciprocal), on the host it divides.
__host__ __device__ inline std::int8_t quantize_value(float x, float scale, float inv_scale) {
#ifdef __CUDA_ARCH__
  bool exact;
  const std::int8_t q = quantize_by_reciprocal(x, scale, inv_scale, exact);
  return exact ? q : quantize_value(x, scale);
#else
  (void)inv_scale;
  return quantize_value(x, scale);
#endif
}

/// The value of a code under `scale`, rounded to T.
template <class T>
__host__ __device__ inline T dequantize_value(std::int8_t q, float scale) {
  return from_float<T>(mul_rn(static_cast<float>(q), scale));
}

KVQ_NAMESPACE_END
