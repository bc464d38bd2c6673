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
// the default round-to-nearest-even, so nvcc (without --use_fast_math) and g++ agree bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#ifndef __CUDA_ARCH__
#include <cmath>
#endif

namespace kvq {

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

__host__ __device__ inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

/// a * b + c with one rounding (std::fma on the host, FFMA on the GPU).
__host__ __device__ inline float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

/// The scale of a group from its amax (the max of |x| over its finite values, 0 if none).
__host__ __device__ inline float scale_from_amax(float amax) {
  const float s = div_rn(amax, Int8Codes::kMaxF);
  return s > 0.0f ? s : 1.0f;
}

/// A scale as every operation reads it: anything but a positive finite number is 1.
__host__ __device__ inline float sanitize_scale(float s) { return (s > 0.0f && is_finite(s)) ? s : 1.0f; }

/// Saturating round-half-to-even of a quotient to an int8 code. Clamps first, then rounds.
__host__ __device__ inline std::int8_t saturate_round(float v) {
  if (v != v) return 0;  // NaN
  v = v < -Int8Codes::kMaxF ? -Int8Codes::kMaxF : v;
  v = v > Int8Codes::kMaxF ? Int8Codes::kMaxF : v;
#ifdef __CUDA_ARCH__
  return static_cast<std::int8_t>(__float2int_rn(v));
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
  const float r = __frcp_rn(scale);  // IEEE 1 / scale, round to nearest even: shorter than a division
#else
  const float r = 1.0f / scale;
#endif
  return (scale >= kMinFastScale && scale <= kMaxFastScale) ? r : bits_to_float(0x7fc00000u);
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
  q = fma_rn(fma_rn(-q, scale, x), inv_scale, q);
  q = fma_rn(fma_rn(-q, scale, x), inv_scale, q);
  exact = q == q;
  const float c = fminf(fmaxf(q, -Int8Codes::kMaxF), Int8Codes::kMaxF);
  return float_bits(add_rn(c, kRoundMagic));  // low byte: the code, two's complement
}

/// The smallest group amax whose scale amax / 127 is inside the fast range (2^-93 / 127 > 2^-100).
constexpr float kMinFastAmax = 0x1p-93f;

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
  return float_bits(add_rn(fma_rn(fma_rn(-q, scale, x), inv_scale, q), kRoundMagic));
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

}  // namespace kvq
