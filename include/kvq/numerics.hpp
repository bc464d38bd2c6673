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
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

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

/// The reciprocal the GPU's fast path multiplies by: 1 / scale correctly rounded, or NaN when that
/// overflows (a denormal scale), which sends every element of the group to the exact division.
__host__ __device__ inline float reciprocal(float scale) {
  const float r = div_rn(1.0f, scale);
  return is_finite(r) ? r : bits_to_float(0x7fc00000u);
}

/// Distance from a .5 tie under which the GPU falls back to the IEEE division (see below).
constexpr float kTieGuard = 0x1p-14f;

#ifdef __CUDA_ARCH__
/// The GPU's fast path: the code of x * inv_scale (inv_scale = reciprocal(scale)), with no
/// division and no conversion instruction. For |x / scale| <= 128 the product is within
/// 128 * (2^-23 + 2^-24) + 2^-149 < 2.3e-5 of the correctly rounded quotient, so unless it lies
/// within kTieGuard (6.1e-5) of some k + 0.5 both round to the same integer; above 128 both
/// saturate. `exact` is false near a tie and for NaN (NaN input, NaN reciprocal): the caller then
/// uses quantize_value(x, scale), so the result always equals the division's, bit for bit.
__device__ inline std::int8_t quantize_by_reciprocal(float x, float inv_scale, bool& exact) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (RNE)
  const float v = __fmul_rn(x, inv_scale);
  const float c = fminf(fmaxf(v, -Int8Codes::kMaxF), Int8Codes::kMaxF);
  const float t = __fadd_rn(c, kRoundMagic);
  exact = fabsf(fabsf(__fsub_rn(v, __fsub_rn(t, kRoundMagic))) - 0.5f) > kTieGuard;
  return static_cast<std::int8_t>(__float_as_uint(t) & 0xffu);  // the integer, two's complement
}

/// The code of x when quantize_by_reciprocal found x * inv_scale within kTieGuard of some
/// h = k + 0.5 (or NaN), settled exactly without a division. fp16 and bf16 data, with few mantissa
/// bits, put about one value in 2^11 (fp16) or 2^8 (bf16) there, so this must be cheap; it is out
/// of line to keep the fast path small. For a scale s >= 2^-100:
///   - r = fma(-h, s, x) is exact: x - h * s is a multiple of 2^(e(s) - 25) below 2^(e(s) - 12)
///     in magnitude (x / s is within 1e-4 of h), so it has at most 13 significant bits.
///   - fl(x / s) == h exactly when |x / s - h| <= half the spacing of floats next to h on r's side,
///     i.e. |r| <= s * that half-spacing (exact: a power of two times s). At equality the quotient
///     is halfway between h and its neighbour, and h, whose significand is even, wins.
///   - Then the code is saturate_round(h) (h's even neighbour); otherwise the quotient lies strictly
///     on r's side of h, and the code is k + 1 (r > 0) or k.
/// NaN and tiny scales take the division.
__device__ __noinline__ inline std::int8_t quantize_near_tie(float x, float scale, float inv_scale) {
  const float h = __fadd_rn(floorf(__fmul_rn(x, inv_scale)), 0.5f);
  if (!(scale >= 0x1p-100f) || !is_finite(h) || !is_finite(scale)) return quantize_value(x, scale);
  const float r = __fmaf_rn(-h, scale, x);
  // Half the spacing of floats above |h| (|h| >= 0.5); below 0.5 the spacing halves.
  float half_spacing = bits_to_float((float_bits(h) & kInfBits) - (24u << 23));
  const bool toward_zero = (r < 0.0f) != (h < 0.0f);
  if (fabsf(h) == 0.5f && toward_zero) half_spacing = __fmul_rn(half_spacing, 0.5f);
  if (fabsf(r) <= __fmul_rn(scale, half_spacing)) return saturate_round(h);
  return saturate_round(r > 0.0f ? __fadd_rn(h, 0.5f) : __fsub_rn(h, 0.5f));
}
#endif

/// Same result as quantize_value(x, scale), bit for bit, given inv_scale = reciprocal(scale); on
/// the GPU it multiplies, and settles near-ties with quantize_near_tie; on the host it divides.
__host__ __device__ inline std::int8_t quantize_value(float x, float scale, float inv_scale) {
#ifdef __CUDA_ARCH__
  bool exact;
  const std::int8_t q = quantize_by_reciprocal(x, inv_scale, exact);
  return exact ? q : quantize_near_tie(x, scale, inv_scale);
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
