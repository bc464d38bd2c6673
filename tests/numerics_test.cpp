// The numeric contract (kvq/numerics.hpp) on hand-computed cases, plus the group-level rules
// (zero group, group without a finite value, non-finite inputs) through the CPU reference.
//
// Every expected value here was worked out by hand (or is a bit pattern with a comment saying
// why); none is computed by calling the function under test a second time.

#include <kvq/detail/config.cuh>
#include <kvq/numerics.hpp>
#include <kvq/reference.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kDenormMin = std::numeric_limits<float>::denorm_min();  // 2^-149
constexpr float kFltMax = std::numeric_limits<float>::max();

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
std::uint16_t bits16(__half h) {
  std::uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}
std::uint16_t bits16(__nv_bfloat16 h) {
  std::uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}
template <class T>
T from_bits16(std::uint16_t u) {
  T h;
  std::memcpy(static_cast<void*>(&h), &u, sizeof h);  // a bit pattern, not an object copy
  return h;
}

// --- rounding and saturation -------------------------------------------------------------------

TEST(SaturateRound, TiesRoundHalfToEven) {
  EXPECT_EQ(kvq::saturate_round(0.5f), 0);
  EXPECT_EQ(kvq::saturate_round(1.5f), 2);
  EXPECT_EQ(kvq::saturate_round(2.5f), 2);
  EXPECT_EQ(kvq::saturate_round(3.5f), 4);
  EXPECT_EQ(kvq::saturate_round(-0.5f), 0);
  EXPECT_EQ(kvq::saturate_round(-1.5f), -2);
  EXPECT_EQ(kvq::saturate_round(-2.5f), -2);
  EXPECT_EQ(kvq::saturate_round(125.5f), 126);
  EXPECT_EQ(kvq::saturate_round(126.5f), 126);
  EXPECT_EQ(kvq::saturate_round(-126.5f), -126);
}

TEST(SaturateRound, NonTiesRoundToNearest) {
  // One fp32 ulp either side of a tie decides the direction.
  EXPECT_EQ(kvq::saturate_round(std::nextafter(0.5f, 0.0f)), 0);
  EXPECT_EQ(kvq::saturate_round(std::nextafter(0.5f, 1.0f)), 1);
  EXPECT_EQ(kvq::saturate_round(std::nextafter(2.5f, 3.0f)), 3);
  EXPECT_EQ(kvq::saturate_round(std::nextafter(-2.5f, -3.0f)), -3);
  EXPECT_EQ(kvq::saturate_round(std::nextafter(1.5f, 1.0f)), 1);
  EXPECT_EQ(kvq::saturate_round(0.0f), 0);
  EXPECT_EQ(kvq::saturate_round(-0.0f), 0);
  EXPECT_EQ(kvq::saturate_round(kDenormMin), 0);
  EXPECT_EQ(kvq::saturate_round(-42.3f), -42);
}

TEST(SaturateRound, ClampsBeforeNarrowing) {
  // __float2int_rn(127.5f) is 128, which narrows to -128: the clamp must come first.
  EXPECT_EQ(kvq::saturate_round(127.5f), 127);
  EXPECT_EQ(kvq::saturate_round(std::nextafter(127.5f, 0.0f)), 127);
  EXPECT_EQ(kvq::saturate_round(128.0f), 127);
  EXPECT_EQ(kvq::saturate_round(255.0f), 127);
  EXPECT_EQ(kvq::saturate_round(256.0f), 127);  // would wrap to 0 if narrowed first
  EXPECT_EQ(kvq::saturate_round(1e30f), 127);
  EXPECT_EQ(kvq::saturate_round(kFltMax), 127);
  // The range is symmetric: -128 is never produced.
  EXPECT_EQ(kvq::saturate_round(-127.5f), -127);
  EXPECT_EQ(kvq::saturate_round(-128.0f), -127);
  EXPECT_EQ(kvq::saturate_round(-128.5f), -127);
  EXPECT_EQ(kvq::saturate_round(-1e30f), -127);
  EXPECT_EQ(kvq::saturate_round(-kFltMax), -127);
}

TEST(SaturateRound, NonFinite) {
  EXPECT_EQ(kvq::saturate_round(kNaN), 0);
  EXPECT_EQ(kvq::saturate_round(-kNaN), 0);
  EXPECT_EQ(kvq::saturate_round(from_bits(0x7fc0dead)), 0);  // a NaN with a payload
  EXPECT_EQ(kvq::saturate_round(kInf), 127);
  EXPECT_EQ(kvq::saturate_round(-kInf), -127);
}

TEST(SaturateRound, EveryCodeIsReachedFromItsOwnValue) {
  for (int k = -127; k <= 127; ++k) EXPECT_EQ(kvq::saturate_round(static_cast<float>(k)), k);
}

// --- quantize_value: the quotient, then the rounding --------------------------------------------

TEST(QuantizeValue, TiesOfTheQuotient) {
  // scale 0.5: x / 0.5 is exact, so these quotients are exact ties.
  EXPECT_EQ(kvq::quantize_value(0.25f, 0.5f), 0);    // 0.5
  EXPECT_EQ(kvq::quantize_value(0.75f, 0.5f), 2);    // 1.5
  EXPECT_EQ(kvq::quantize_value(1.25f, 0.5f), 2);    // 2.5
  EXPECT_EQ(kvq::quantize_value(-1.25f, 0.5f), -2);  // -2.5
  EXPECT_EQ(kvq::quantize_value(63.25f, 0.5f), 126); // 126.5
  EXPECT_EQ(kvq::quantize_value(63.75f, 0.5f), 127); // 127.5: clamped, not 128
  EXPECT_EQ(kvq::quantize_value(-63.75f, 0.5f), -127);
  EXPECT_EQ(kvq::quantize_value(100.0f, 0.5f), 127); // 200: saturated
}

TEST(QuantizeValue, UsesIeeeDivisionNotAReciprocal) {
  // 37.5 / 15 is exactly 2.5, which rounds to 2. Multiplying by fl(1/15) instead gives
  // 2.5000002, which rounds to 3: this pins the contract to a true division.
  EXPECT_EQ(kvq::quantize_value(37.5f, 15.0f), 2);
  EXPECT_EQ(kvq::quantize_value(-37.5f, 15.0f), -2);
  // Same for 45.5 / 7 = 6.5 (reciprocal: 6.5000005 -> 7).
  EXPECT_EQ(kvq::quantize_value(45.5f, 7.0f), 6);
}

// The GPU's division-free path (code_word: the reciprocal, two FMA steps, rounding by adding
// 1.5 * 2^23), compiled for the host, against the IEEE division it replaces, with the GPU's
// fallback to the division where it reports !exact. The hand-computed cases above (37.5 / 15,
// 45.5 / 7) are where a plain multiply by the reciprocal is wrong.
std::int8_t gpu_style_code(float x, float scale) {
  bool exact = false;
  const std::int8_t q = kvq::quantize_by_reciprocal(x, scale, kvq::reciprocal(scale), exact);
  return exact ? q : kvq::quantize_value(x, scale);
}

TEST(ReciprocalPath, HandComputedCases) {
  EXPECT_EQ(gpu_style_code(37.5f, 15.0f), 2);
  EXPECT_EQ(gpu_style_code(-37.5f, 15.0f), -2);
  EXPECT_EQ(gpu_style_code(45.5f, 7.0f), 6);
  EXPECT_EQ(gpu_style_code(63.75f, 0.5f), 127);  // 127.5: clamped, not 128
  EXPECT_EQ(gpu_style_code(kNaN, 0.5f), 0);
  EXPECT_EQ(gpu_style_code(kInf, 0.5f), 127);
  EXPECT_EQ(gpu_style_code(-kInf, 0.5f), -127);
  EXPECT_EQ(gpu_style_code(1.0f, kDenormMin), 127);   // scale below the fast range: divides
  EXPECT_EQ(gpu_style_code(kFltMax, 1e-30f), 127);    // x * (1 / scale) overflows: divides
  bool exact = false;
  kvq::quantize_by_reciprocal(1.0f, 1.0f, kvq::reciprocal(1.0f), exact);
  EXPECT_TRUE(exact);
  kvq::quantize_by_reciprocal(1.0f, 0x1p-101f, kvq::reciprocal(0x1p-101f), exact);
  EXPECT_FALSE(exact);  // reciprocal() is NaN outside [2^-100, 2^126]
}

// Every finite fp16 and bf16 value under about a thousand scales each: amax / 127 for every 31st
// positive value of the format, the fast range's edges, and random fp32 scales inside it.
template <class T>
void expect_reciprocal_path_equals_division(std::uint32_t seed) {
  std::vector<float> xs, scales = {0x1p-100f, std::nextafter(0x1p-100f, 1.0f), 0x1p126f,
                                   std::nextafter(0x1p126f, 0.0f), 1.0f / 127.0f, 3.0f, 1e-20f, 1e20f};
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float x = kvq::to_float(from_bits16<T>(static_cast<std::uint16_t>(b)));
    if (!std::isfinite(x)) continue;
    xs.push_back(x);
    if (x > 0 && b % 31 == 0) scales.push_back(kvq::scale_from_amax(x));
  }
  std::mt19937 rng(seed);
  for (int i = 0; i < 200; ++i) scales.push_back(std::ldexp(1.0f + static_cast<float>(rng() % 8388608) / 8388608.0f,
                                                           static_cast<int>(rng() % 226) - 100));
  long mismatches = 0, fast = 0, pairs = 0;
  for (const float s : scales) {
    const float inv = kvq::reciprocal(s);
    for (const float x : xs) {
      bool exact = false;
      const std::int8_t q = kvq::quantize_by_reciprocal(x, s, inv, exact);
      const std::int8_t want = kvq::quantize_value(x, s);
      if (exact && q != want && ++mismatches <= 5)
        ADD_FAILURE() << "x = " << x << ", scale = " << s << ": " << int(q) << " != " << int(want);
      fast += exact;
      ++pairs;
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << pairs << " pairs";
  // bf16 reaches 3.4e38, so under small scales x * (1 / scale) overflows and divides (a fifth).
  EXPECT_GT(fast, pairs * 3 / 4) << "the fast path must carry most pairs for this to test it";
}

TEST(ReciprocalPath, EqualsTheDivisionOnEveryFp16Value) { expect_reciprocal_path_equals_division<__half>(1); }
TEST(ReciprocalPath, EqualsTheDivisionOnEveryBf16Value) {
  expect_reciprocal_path_equals_division<__nv_bfloat16>(2);
}

// code_word_within_amax, exhaustively over its whole domain: every positive finite amax of the
// format whose scale lies in the fast range, and every value of the format with |x| <= amax (both
// signs). About 1e9 pairs per format; the GPU's one-pass per-token and grouped per-channel kernels
// take this path for 16-bit data.
template <class T>
void expect_within_amax_path_equals_division() {
  std::vector<float> positive;  // ascending
  for (std::uint32_t b = 1; b < 0x8000; ++b) {
    const float x = kvq::to_float(from_bits16<T>(static_cast<std::uint16_t>(b)));
    if (std::isfinite(x)) positive.push_back(x);
  }
  long mismatches = 0, pairs = 0, amaxes = 0;
  for (std::size_t ia = 0; ia < positive.size(); ++ia) {
    const float amax = positive[ia];
    const float s = kvq::scale_from_amax(amax), inv = kvq::reciprocal(s);
    // Kernels take this path when the scale is in the fast range (inv not NaN), or decide earlier
    // from the amax: at least kMinFastAmax must imply the fast range.
    if (amax >= kvq::kMinFastAmax) {
      ASSERT_EQ(inv, inv) << "amax " << amax << ": scale outside the fast range";
    }
    if (inv != inv) continue;
    ++amaxes;
    for (std::size_t ix = 0; ix <= ia; ++ix) {
      for (const float x : {positive[ix], -positive[ix]}) {
        const auto q = static_cast<std::int8_t>(kvq::code_word_within_amax(x, s, inv) & 0xffu);
        if (q != kvq::quantize_value(x, s) && ++mismatches <= 5)
          ADD_FAILURE() << "x = " << x << ", amax = " << amax << ": " << int(q) << " != " << int(kvq::quantize_value(x, s));
        ++pairs;
      }
    }
    EXPECT_EQ(kvq::code_word_within_amax(0.0f, s, inv) & 0xffu, 0u);
  }
  EXPECT_EQ(mismatches, 0) << "of " << pairs << " pairs";
  EXPECT_GT(pairs, 1'000'000'000L);  // the whole domain, not a sample
  EXPECT_GT(amaxes, 28000);
}

TEST(ReciprocalPath, Fp16WithinTheGroupAmaxEqualsTheDivision) { expect_within_amax_path_equals_division<__half>(); }
TEST(ReciprocalPath, Bf16WithinTheGroupAmaxEqualsTheDivision) {
  expect_within_amax_path_equals_division<__nv_bfloat16>();
}

// fp32 values on and one to four ulps either side of ties k + 0.5 of random scales.
TEST(ReciprocalPath, EqualsTheDivisionNextToFp32Ties) {
  std::mt19937 rng(3);
  long mismatches = 0;
  for (int i = 0; i < 2000000; ++i) {
    const float s = std::ldexp(1.0f + static_cast<float>(rng() % 8388608) / 8388608.0f, static_cast<int>(rng() % 200) - 90);
    const float tie = (static_cast<float>(static_cast<int>(rng() % 256) - 128) + 0.5f) * s;
    const float x = from_bits(bits(tie) + static_cast<std::uint32_t>(static_cast<int>(rng() % 9) - 4));
    if (!std::isfinite(x)) continue;
    bool exact = false;
    const std::int8_t q = kvq::quantize_by_reciprocal(x, s, kvq::reciprocal(s), exact);
    if (exact && q != kvq::quantize_value(x, s) && ++mismatches <= 5)
      ADD_FAILURE() << "x = " << x << ", scale = " << s;
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(QuantizeValue, NonFiniteInputs) {
  EXPECT_EQ(kvq::quantize_value(kNaN, 0.5f), 0);
  EXPECT_EQ(kvq::quantize_value(kInf, 0.5f), 127);
  EXPECT_EQ(kvq::quantize_value(-kInf, 0.5f), -127);
  EXPECT_EQ(kvq::quantize_value(kInf, 1.0f), 127);
  // A finite x whose quotient overflows to infinity still saturates.
  EXPECT_EQ(kvq::quantize_value(kFltMax, kDenormMin), 127);
  EXPECT_EQ(kvq::quantize_value(-kFltMax, kDenormMin), -127);
}

TEST(QuantizeValue, DenormalInputsAndScales) {
  EXPECT_EQ(kvq::quantize_value(5 * kDenormMin, kDenormMin), 5);
  EXPECT_EQ(kvq::quantize_value(-127 * kDenormMin, kDenormMin), -127);
  EXPECT_EQ(kvq::quantize_value(kDenormMin, 2 * kDenormMin), 0);      // 0.5 -> 0
  EXPECT_EQ(kvq::quantize_value(3 * kDenormMin, 2 * kDenormMin), 2);  // 1.5 -> 2
  // A denormal input under a normal scale is a tiny quotient: code 0.
  EXPECT_EQ(kvq::quantize_value(kDenormMin, 1.0f), 0);
  // A normal input under a denormal scale saturates (no flush-to-zero of the scale).
  EXPECT_EQ(kvq::quantize_value(1e-30f, kDenormMin), 127);
}

// --- scales ----------------------------------------------------------------------------------

TEST(ScaleFromAmax, IsAmaxOver127InFp32) {
  EXPECT_EQ(kvq::scale_from_amax(127.0f), 1.0f);
  EXPECT_EQ(kvq::scale_from_amax(254.0f), 2.0f);
  EXPECT_EQ(kvq::scale_from_amax(63.5f), 0.5f);
  // 1/127 correctly rounded to fp32 is 0x3c010204 (0.0078740157).
  EXPECT_EQ(bits(kvq::scale_from_amax(1.0f)), 0x3c010204u);
  // The largest finite amax gives a finite scale.
  const float s = kvq::scale_from_amax(kFltMax);
  EXPECT_TRUE(std::isfinite(s));
  EXPECT_GT(s, 2.6e36f);
}

TEST(ScaleFromAmax, ZeroGroupGetsScaleOne) {
  EXPECT_EQ(kvq::scale_from_amax(0.0f), 1.0f);
  EXPECT_EQ(kvq::scale_from_amax(-0.0f), 1.0f);
}

TEST(ScaleFromAmax, DenormalAndUnderflowingScales) {
  // 127 * 2^-149 / 127 is exactly the smallest denormal.
  EXPECT_EQ(kvq::scale_from_amax(127 * kDenormMin), kDenormMin);
  // 64/127 = 0.504 of a denormal ulp rounds up to one ulp ...
  EXPECT_EQ(kvq::scale_from_amax(64 * kDenormMin), kDenormMin);
  // ... 63/127 = 0.496 rounds down to zero, and a zero scale becomes 1.
  EXPECT_EQ(kvq::scale_from_amax(63 * kDenormMin), 1.0f);
  EXPECT_EQ(kvq::scale_from_amax(kDenormMin), 1.0f);
  // FLT_MIN / 127 = 2^23 / 127 = 66052.03 denormal ulps -> 66052 = 0x10204.
  EXPECT_EQ(bits(kvq::scale_from_amax(std::numeric_limits<float>::min())), 0x00010204u);
}

TEST(SanitizeScale, NonPositiveOrNonFiniteReadsAsOne) {
  EXPECT_EQ(kvq::sanitize_scale(0.0f), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(-0.0f), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(-1.0f), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(-kDenormMin), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(kNaN), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(kInf), 1.0f);
  EXPECT_EQ(kvq::sanitize_scale(-kInf), 1.0f);
}

TEST(SanitizeScale, PositiveFiniteScalesPassThrough) {
  EXPECT_EQ(kvq::sanitize_scale(0.5f), 0.5f);
  EXPECT_EQ(kvq::sanitize_scale(kDenormMin), kDenormMin);
  EXPECT_EQ(kvq::sanitize_scale(kFltMax), kFltMax);
  EXPECT_EQ(kvq::sanitize_scale(3.0f), 3.0f);
}

TEST(FiniteAbsBits, IsTheAmaxContribution) {
  EXPECT_EQ(kvq::finite_abs_bits(-3.0f), bits(3.0f));
  EXPECT_EQ(kvq::finite_abs_bits(3.0f), bits(3.0f));
  EXPECT_EQ(kvq::finite_abs_bits(-0.0f), 0u);
  EXPECT_EQ(kvq::finite_abs_bits(kNaN), 0u);
  EXPECT_EQ(kvq::finite_abs_bits(-kNaN), 0u);
  EXPECT_EQ(kvq::finite_abs_bits(kInf), 0u);
  EXPECT_EQ(kvq::finite_abs_bits(-kInf), 0u);
  EXPECT_EQ(kvq::finite_abs_bits(-kFltMax), bits(kFltMax));
  EXPECT_EQ(kvq::finite_abs_bits(kDenormMin), 1u);
  // Unsigned order of the bits is the numeric order of |x| (what makes atomicMax on bits exact).
  EXPECT_LT(kvq::finite_abs_bits(kDenormMin), kvq::finite_abs_bits(std::numeric_limits<float>::min()));
  EXPECT_LT(kvq::finite_abs_bits(1.0f), kvq::finite_abs_bits(std::nextafter(1.0f, 2.0f)));
}

// --- dequantization ----------------------------------------------------------------------------

TEST(DequantizeValue, IsOneFp32Multiply) {
  EXPECT_EQ(kvq::dequantize_value<float>(127, 0.5f), 63.5f);
  EXPECT_EQ(kvq::dequantize_value<float>(-127, 2.0f), -254.0f);
  EXPECT_EQ(kvq::dequantize_value<float>(0, 1.0f), 0.0f);
  EXPECT_EQ(kvq::dequantize_value<float>(127, 2 * kDenormMin), 254 * kDenormMin);
  // q * s in double is exact (8 x 24 bits), so rounding it to fp32 once is the IEEE product.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-30.0f, 30.0f);
  for (int i = 0; i < 20000; ++i) {
    const float s = std::ldexp(1.0f + std::fabs(u(rng)) / 30.0f, static_cast<int>(u(rng)));
    const int q = static_cast<int>(rng() % 255) - 127;
    const float want = static_cast<float>(static_cast<double>(q) * static_cast<double>(s));
    ASSERT_EQ(bits(kvq::dequantize_value<float>(static_cast<std::int8_t>(q), s)), bits(want)) << q << " * " << s;
  }
}

TEST(DequantizeValue, RoundsToTheOutputTypeNearestEven) {
  // 2^-25 is half of the smallest fp16 denormal: a tie between 0 and 2^-24, to even (0).
  const float h = std::ldexp(1.0f, -25);
  EXPECT_EQ(bits16(kvq::dequantize_value<__half>(1, h)), 0x0000);
  EXPECT_EQ(bits16(kvq::dequantize_value<__half>(3, h)), 0x0002);  // 1.5 ulps -> 2 ulps
  // 1 + 2^-11 is a tie between 1 and 1 + 2^-10 in fp16: stays 1 (0x3c00).
  EXPECT_EQ(bits16(kvq::dequantize_value<__half>(1, 1.0f + std::ldexp(1.0f, -11))), 0x3c00);
  // 127 * 1024 = 130048 is past fp16's 65504: rounds to +Inf.
  EXPECT_EQ(bits16(kvq::dequantize_value<__half>(127, 1024.0f)), 0x7c00);
  // bf16: 1 + 2^-8 is a tie between 1 and 1 + 2^-7: stays 1 (0x3f80); 1 + 3 * 2^-8 -> 1 + 2^-6.
  EXPECT_EQ(bits16(kvq::dequantize_value<__nv_bfloat16>(1, 1.0f + std::ldexp(1.0f, -8))), 0x3f80);
  EXPECT_EQ(bits16(kvq::dequantize_value<__nv_bfloat16>(1, 1.0f + 3 * std::ldexp(1.0f, -8))), 0x3f82);
  EXPECT_EQ(bits16(kvq::dequantize_value<__nv_bfloat16>(-2, 0.5f)), 0xbf80);  // -1
}

// --- fp16 / bf16 conversions ------------------------------------------------------------------

// Value of an fp16 bit pattern, decoded by hand: sign, 5-bit exponent (bias 15), 10-bit mantissa.
double decode_fp16(std::uint16_t u) {
  const int sign = u >> 15, e = (u >> 10) & 0x1f, m = u & 0x3ff;
  double v;
  if (e == 0x1f) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0) v = std::ldexp(static_cast<double>(m), -24);  // denormal: m * 2^-24
  else v = std::ldexp(static_cast<double>(m + 1024), e - 25);
  return sign ? -v : v;
}

TEST(Widening, EveryFp16ValueIsExact) {
  for (std::uint32_t u = 0; u < 0x10000; ++u) {
    const double want = decode_fp16(static_cast<std::uint16_t>(u));
    const float got = kvq::to_float(from_bits16<__half>(static_cast<std::uint16_t>(u)));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << u;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << u;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << std::hex << u;
    }
  }
}

TEST(Widening, EveryBf16ValueIsExact) {
  // bf16 is the top half of an fp32: widening appends 16 zero bits.
  for (std::uint32_t u = 0; u < 0x10000; ++u) {
    const float want = from_bits(u << 16);
    const float got = kvq::to_float(from_bits16<__nv_bfloat16>(static_cast<std::uint16_t>(u)));
    if (std::isnan(want)) ASSERT_TRUE(std::isnan(got)) << std::hex << u;
    else ASSERT_EQ(bits(got), bits(want)) << std::hex << u;
  }
}

// For every pair of adjacent positive values (lo, hi) of a 16-bit format: the midpoint (exact in
// fp32) goes to the one with an even mantissa, and one fp32 ulp either side goes to the nearer one.
// `hi` past the largest finite value is +Inf, as round-to-nearest-even overflows.
template <class T>
void check_narrowing_midpoints(double (*decode)(std::uint16_t), std::uint16_t max_finite) {
  for (std::uint16_t u = 0; u < max_finite + 1; ++u) {
    const std::uint16_t lo = u, hi = static_cast<std::uint16_t>(u + 1);
    const double lo_v = decode(lo);
    // For the top pair, the "next value" of an unbounded exponent range: lo + one ulp of lo.
    const double hi_v = hi <= max_finite ? decode(hi) : lo_v + (lo_v - decode(static_cast<std::uint16_t>(lo - 1)));
    const float mid = static_cast<float>((lo_v + hi_v) / 2);  // exact: one bit more than the format
    ASSERT_EQ((lo_v + hi_v) / 2, static_cast<double>(mid));
    const std::uint16_t even = (lo % 2 == 0) ? lo : hi;
    for (int sign = 0; sign < 2; ++sign) {
      const float s = sign ? -1.0f : 1.0f;
      const std::uint16_t sb = sign ? 0x8000 : 0;
      ASSERT_EQ(bits16(kvq::from_float<T>(s * mid)), even | sb) << std::hex << u;
      ASSERT_EQ(bits16(kvq::from_float<T>(s * std::nextafter(mid, 0.0f))), lo | sb) << std::hex << u;
      ASSERT_EQ(bits16(kvq::from_float<T>(s * std::nextafter(mid, kInf))), hi | sb) << std::hex << u;
      ASSERT_EQ(bits16(kvq::from_float<T>(s * static_cast<float>(lo_v))), lo | sb) << std::hex << u;
    }
  }
}

double decode_bf16(std::uint16_t u) { return from_bits(static_cast<std::uint32_t>(u) << 16); }

TEST(Narrowing, Fp16IsRoundToNearestEven) {
  check_narrowing_midpoints<__half>(decode_fp16, 0x7bff);  // 65504
  EXPECT_EQ(bits16(kvq::from_float<__half>(65519.0f)), 0x7bff);
  EXPECT_EQ(bits16(kvq::from_float<__half>(65520.0f)), 0x7c00);  // the tie above 65504 overflows
  EXPECT_EQ(bits16(kvq::from_float<__half>(kInf)), 0x7c00);
  EXPECT_EQ(bits16(kvq::from_float<__half>(-kInf)), 0xfc00);
  EXPECT_EQ(bits16(kvq::from_float<__half>(-0.0f)), 0x8000);
  EXPECT_TRUE(std::isnan(decode_fp16(bits16(kvq::from_float<__half>(kNaN)))));
}

TEST(Narrowing, Bf16IsRoundToNearestEven) {
  check_narrowing_midpoints<__nv_bfloat16>(decode_bf16, 0x7f7f);
  EXPECT_EQ(bits16(kvq::from_float<__nv_bfloat16>(kFltMax)), 0x7f80);  // past bf16's max + half ulp
  EXPECT_EQ(bits16(kvq::from_float<__nv_bfloat16>(-kInf)), 0xff80);
  EXPECT_EQ(bits16(kvq::from_float<__nv_bfloat16>(kDenormMin)), 0x0000);  // below half a bf16 ulp
  EXPECT_TRUE(std::isnan(decode_bf16(bits16(kvq::from_float<__nv_bfloat16>(kNaN)))));
}

TEST(Narrowing, FloatIsIdentity) {
  for (float x : {0.0f, -0.0f, kDenormMin, 1.0f / 3.0f, -kFltMax, kInf})
    EXPECT_EQ(bits(kvq::from_float<float>(x)), bits(x));
}

// --- group-level rules, through the CPU reference -------------------------------------------------

// One row of `n` values, one per-token group.
struct Row {
  std::vector<float> x;
  std::vector<std::int8_t> q;
  std::vector<float> y;
  float scale = -1.0f;
  unsigned long long nonfinite = 0;

  explicit Row(std::vector<float> values) : x(std::move(values)), q(x.size(), 99), y(x.size(), 99.0f) {
    const kvq::KvView v = kvq::contiguous_view(1, static_cast<std::int64_t>(x.size()));
    kvq::QuantSpec spec{kvq::Granularity::kPerToken, 0, &nonfinite};
    EXPECT_EQ(kvq::reference::quantize(x.data(), v, spec, q.data(), &scale), cudaSuccess);
    spec.nonfinite_count = nullptr;
    EXPECT_EQ(kvq::reference::dequantize(q.data(), &scale, v, spec, y.data()), cudaSuccess);
  }
};

TEST(Contract, ZeroGroupHasScaleOneAndExactZeros) {
  Row r({0.0f, -0.0f, 0.0f, 0.0f});
  EXPECT_EQ(r.scale, 1.0f);
  for (std::size_t i = 0; i < r.x.size(); ++i) {
    EXPECT_EQ(r.q[i], 0);
    EXPECT_EQ(r.y[i], 0.0f);
  }
  EXPECT_EQ(r.nonfinite, 0u);
}

TEST(Contract, GroupWithoutAFiniteValue) {
  Row r({kNaN, kInf, -kInf, -kNaN});
  EXPECT_EQ(r.scale, 1.0f);
  EXPECT_EQ(r.q, (std::vector<std::int8_t>{0, 127, -127, 0}));
  EXPECT_EQ(r.y, (std::vector<float>{0.0f, 127.0f, -127.0f, 0.0f}));
  EXPECT_EQ(r.nonfinite, 4u);
}

TEST(Contract, NonFiniteValuesDoNotPoisonTheScale) {
  // amax over the finite values is 63.5, so the scale is exactly 0.5.
  Row r({1.25f, kNaN, -63.5f, kInf, 0.75f, -kInf});
  EXPECT_EQ(r.scale, 0.5f);
  EXPECT_EQ(r.q, (std::vector<std::int8_t>{2, 0, -127, 127, 2, -127}));
  EXPECT_EQ(r.y, (std::vector<float>{1.0f, 0.0f, -63.5f, 63.5f, 1.0f, -63.5f}));
  EXPECT_EQ(r.nonfinite, 3u);
}

TEST(Contract, GroupOfDenormals) {
  // amax 254 denormal ulps -> scale exactly 2 ulps; quotients 127, -63.5 (tie -> -64), 0.5 (-> 0).
  Row r({254 * kDenormMin, -127 * kDenormMin, kDenormMin});
  EXPECT_EQ(r.scale, 2 * kDenormMin);
  EXPECT_EQ(r.q, (std::vector<std::int8_t>{127, -64, 0}));
  EXPECT_EQ(r.y, (std::vector<float>{254 * kDenormMin, -128 * kDenormMin, 0.0f}));
}

TEST(Contract, UnderflowingScaleBecomesOne) {
  // amax / 127 = 20/127 of a denormal ulp rounds to 0: the group is treated as zero.
  Row r({10 * kDenormMin, -20 * kDenormMin});
  EXPECT_EQ(r.scale, 1.0f);
  EXPECT_EQ(r.q, (std::vector<std::int8_t>{0, 0}));
  EXPECT_EQ(r.y, (std::vector<float>{0.0f, 0.0f}));
}

TEST(Contract, AmaxElementMapsToFullScale) {
  // The element that sets amax quantizes to +-127 and dequantizes within half a scale.
  Row r({0.1f, -3.7f, 2.0f});
  EXPECT_EQ(r.q[1], -127);
  EXPECT_LE(std::fabs(r.y[1] - r.x[1]), r.scale / 2);
}

TEST(Contract, GivenScalesAreSanitized) {
  // quantize_with_scales and dequantize read 0, negative, NaN and Inf scales as 1.
  const std::vector<float> x = {2.4f, -2.6f, 0.5f, 130.0f};
  const kvq::KvView v = kvq::contiguous_view(1, 4);
  const kvq::QuantSpec spec{kvq::Granularity::kPerToken, 0};
  for (float bad : {0.0f, -0.0f, -2.0f, kNaN, kInf, -kInf}) {
    std::vector<std::int8_t> q(4, 99);
    ASSERT_EQ(kvq::reference::quantize_with_scales(x.data(), &bad, v, spec, q.data()), cudaSuccess);
    EXPECT_EQ(q, (std::vector<std::int8_t>{2, -3, 0, 127})) << bad;
    std::vector<float> y(4, 99.0f);
    ASSERT_EQ(kvq::reference::dequantize(q.data(), &bad, v, spec, y.data()), cudaSuccess);
    EXPECT_EQ(y, (std::vector<float>{2.0f, -3.0f, 0.0f, 127.0f})) << bad;
  }
}

TEST(Contract, NonFiniteCountAccumulatesOncePerCall) {
  const std::vector<float> x = {kNaN, 1.0f, kInf, 2.0f, -kInf, 3.0f};
  const kvq::KvView v = kvq::contiguous_view(2, 3);
  unsigned long long count = 10;  // the counter adds; it is not reset
  const kvq::QuantSpec spec{kvq::Granularity::kPerChannel, 0, &count};
  std::vector<std::int8_t> q(6);
  std::vector<float> s(3);
  ASSERT_EQ(kvq::reference::quantize(x.data(), v, spec, q.data(), s.data()), cudaSuccess);
  EXPECT_EQ(count, 13u);  // quantize reads each input twice but counts it once
  ASSERT_EQ(kvq::reference::compute_scales(x.data(), v, spec, s.data()), cudaSuccess);
  EXPECT_EQ(count, 16u);
  ASSERT_EQ(kvq::reference::quantize_with_scales(x.data(), s.data(), v, spec, q.data()), cudaSuccess);
  EXPECT_EQ(count, 19u);
}

TEST(FastDivmod, EqualsDivisionBelowTwoToThe31) {
  // The kernels' division by a run-time constant (kvq/detail/config.cuh), on its host path: the
  // same multiply and shift as __umulhi on the device.
  std::mt19937 rng(7);
  const std::uint32_t kMax = 0x7fffffffu;
  for (std::uint32_t d : {1u, 2u, 3u, 5u, 7u, 8u, 16u, 48u, 63u, 64u, 80u, 96u, 100u, 127u, 128u, 255u, 256u, 1000u,
                          4096u, 65535u, 65536u, 65537u, (1u << 20) + 1u, 1u << 30, (1u << 30) + 3u, kMax - 1u, kMax}) {
    const kvq::detail::FastDivmod f(d);
    std::vector<std::uint32_t> ns = {0u, 1u, d - 1u, d, d + 1u, kMax - 1u, kMax};
    for (std::uint32_t k : {2u, 3u, 1000u, 1u << 16})
      if (static_cast<std::uint64_t>(k) * d <= kMax) ns.insert(ns.end(), {k * d - 1u, k * d, k * d + 1u});
    for (int i = 0; i < 20000; ++i) ns.push_back(rng() & kMax);
    for (std::uint32_t n : ns) {
      if (n > kMax) continue;
      std::uint32_t q = 0, r = 0;
      f.divmod(n, q, r);
      ASSERT_EQ(q, n / d) << n << " / " << d;
      ASSERT_EQ(r, n % d) << n << " % " << d;
    }
  }
}

}  // namespace
