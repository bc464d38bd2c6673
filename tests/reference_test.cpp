// The CPU reference (kvq/reference.hpp) against an independently written float64 model of the
// numeric contract, on >= 10^6 random values per (dtype, granularity, group).
//
// The model uses nothing from kvq's numerics: it decodes fp16/bf16 bits itself, works in double,
// and rounds to fp32/fp16/bf16 with its own round-to-nearest-even (round_to_format below). (Only
// the test data is made with kvq::from_float: it just has to be some values of T.)
//
// Why comparing the scales exactly is sound: the contract's scale is the IEEE fp32 quotient
// amax / 127. The model computes amax / 127 in double (one rounding to 53 bits) and then rounds
// that to fp32 (a second rounding to 24 bits). For +, -, *, / of p-bit operands, rounding first to
// q >= 2p + 2 bits and then to p bits gives the correctly rounded p-bit result (double rounding is
// innocuous; Figueroa, "When is double rounding innocuous?", 1995): 53 >= 2 * 24 + 2. So the model's
// scale is the contract's fp32 scale exactly, with no tolerance. The same argument makes the
// model's quotient x / scale equal to the IEEE fp32 quotient, so every code must match, and the
// dequantized value (code * scale is exact in double, then rounded to fp32 and to T) too.
//
// Separately the test rounds the exact quotient, as the paper's formula q = round(x / scale)
// reads, and counts where that differs from the fp32 quotient's code: only quotients within one
// fp32 ulp of a .5 tie may differ (checked for each), and for quotients that are not exact ties
// of the data (127 * x / amax = k + 0.5) there must be very few. The counts are printed.

#include <kvq/reference.hpp>
#include <kvq/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace {

using kvq::Granularity;
using kvq::KvView;
using kvq::QuantSpec;

// --- an independent model of the number formats ------------------------------------------------

struct Format {
  int precision;    // significand bits, the implicit one included
  int min_exponent; // exponent of the smallest normal value
  double max_finite;
};
constexpr Format kFp32{24, -126, 0x1.fffffep127};
constexpr Format kFp16{11, -14, 65504.0};
constexpr Format kBf16{8, -126, 0x1.fep127};

double round_half_even(double v) {
  const double fl = std::floor(v), frac = v - fl;  // both exact in double
  if (frac > 0.5) return fl + 1;
  if (frac < 0.5) return fl;
  return std::fmod(fl, 2.0) == 0 ? fl : fl + 1;
}

// v rounded to the nearest value of `f` (ties to even), with overflow to +-Inf.
double round_to_format(double v, const Format& f) {
  if (v == 0 || !std::isfinite(v)) return v;
  const int e = std::max(std::ilogb(v), f.min_exponent);  // below min_exponent: the denormal grid
  const double quantum = std::ldexp(1.0, e - (f.precision - 1));
  const double r = round_half_even(v / quantum) * quantum;  // v / quantum is exact (power of two)
  if (std::fabs(r) > f.max_finite) return std::copysign(std::numeric_limits<double>::infinity(), v);
  return r;
}

// Distance between adjacent values of `f` around v (the denormal spacing below the normal range).
double ulp(double v, const Format& f) {
  const int e = v == 0 ? f.min_exponent : std::max(std::ilogb(v), f.min_exponent);
  return std::ldexp(1.0, e - (f.precision - 1));
}
double ulp_fp32(double v) { return ulp(v, kFp32); }

// Element decoding from bits.
double decode(float x) { return x; }
double decode(__half h) {
  std::uint16_t u;
  std::memcpy(&u, &h, 2);
  const int e = (u >> 10) & 0x1f, m = u & 0x3ff;
  double v = e == 0x1f ? (m ? std::nan("") : INFINITY)
             : e == 0  ? std::ldexp(double(m), -24)
                       : std::ldexp(double(m + 1024), e - 25);
  return (u >> 15) ? -v : v;
}
double decode(__nv_bfloat16 h) {
  std::uint16_t u;
  std::memcpy(&u, &h, 2);
  const std::uint32_t w = std::uint32_t(u) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
template <class T>
const Format& format_of();
template <>
const Format& format_of<float>() { return kFp32; }
template <>
const Format& format_of<__half>() { return kFp16; }
template <>
const Format& format_of<__nv_bfloat16>() { return kBf16; }

template <class T>
const char* type_name();
template <>
const char* type_name<float>() { return "float"; }
template <>
const char* type_name<__half>() { return "half"; }
template <>
const char* type_name<__nv_bfloat16>() { return "bf16"; }

// --- the model of the operations --------------------------------------------------------------

struct Model {
  std::vector<double> scales;     // (scale shape), fp32 values held in double
  std::vector<int> codes;         // per element of the view, in (b, t, c) order
  std::vector<double> y;          // dequantized, rounded to T, per element
  unsigned long long nonfinite = 0;
  long long tie_sensitive = 0;    // codes where rounding the exact quotient would differ
  long long near_ties = 0;        // quotients within one fp32 ulp of a .5 tie (exact ties excluded)
  long long data_ties = 0;        // of those, the ones where 127 * x / amax is exactly a .5 tie
};

// Group length and number of groups along an axis of `extent`, straight from the data model.
std::int64_t model_group(std::int64_t extent, std::int64_t group) { return group == 0 || group > extent ? extent : group; }

template <class T>
Model run_model(const std::vector<T>& x, const KvView& v, const QuantSpec& spec) {
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const std::int64_t axis = per_token ? v.channels : v.tokens;
  const std::int64_t g = model_group(axis, spec.group);
  const std::int64_t ngroups = (axis + g - 1) / g;
  auto scale_index = [&](std::int64_t b, std::int64_t t, std::int64_t c) {
    return per_token ? (b * v.tokens + t) * ngroups + c / g : (b * ngroups + t / g) * v.channels + c;
  };
  const std::int64_t nscales = per_token ? v.batch * v.tokens * ngroups : v.batch * ngroups * v.channels;

  Model m;
  std::vector<double> amax(nscales, 0.0);
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) {
        const double xv = decode(x[v.offset(b, t, c)]);
        if (!std::isfinite(xv)) { ++m.nonfinite; continue; }
        double& a = amax[scale_index(b, t, c)];
        a = std::max(a, std::fabs(xv));
      }
  m.scales.resize(nscales);
  for (std::int64_t i = 0; i < nscales; ++i) {
    const double s = round_to_format(amax[i] / 127.0, kFp32);
    m.scales[i] = s > 0 ? s : 1.0;
  }
  m.codes.reserve(v.size());
  m.y.reserve(v.size());
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) {
        const double xv = decode(x[v.offset(b, t, c)]);
        const double s = m.scales[scale_index(b, t, c)];
        int code;
        if (std::isnan(xv)) {
          code = 0;
        } else {
          const double exact = xv / s;  // +-Inf stays +-Inf
          const double q32 = round_to_format(exact, kFp32);
          code = int(round_half_even(std::clamp(q32, -127.0, 127.0)));
          if (std::isfinite(exact)) {
            const int code_exact = int(round_half_even(std::clamp(exact, -127.0, 127.0)));
            const double dist = std::fabs(exact - (std::floor(exact) + 0.5));
            const bool near_tie = std::fabs(exact) < 127.5 && dist != 0 && dist <= ulp_fp32(exact);
            m.near_ties += near_tie;
            // 254 * x == (2k + 1) * amax, both products exact in double: the data sits on a tie,
            // and only the rounding of the scale moved the quotient off it.
            m.data_ties += near_tie && 254 * xv == (2 * std::floor(exact) + 1) * amax[scale_index(b, t, c)];
            if (code_exact != code) {
              ++m.tie_sensitive;
              EXPECT_TRUE(near_tie) << "x=" << xv << " scale=" << s << ": codes differ away from a tie";
            }
          }
        }
        m.codes.push_back(code);
        const double p = round_to_format(code * s, kFp32);  // code * s is exact in double
        m.y.push_back(round_to_format(p, format_of<T>()));
      }
  return m;
}

// --- random data -------------------------------------------------------------------------------

enum class Dist { kUniform, kNormalWithOutliers, kWideRange };

const char* dist_name(Dist d) {
  return d == Dist::kUniform ? "uniform" : d == Dist::kNormalWithOutliers ? "normal+outliers" : "wide-range";
}

// Fills a dense (batch, tokens, channels) tensor. Values are generated in double and rounded to T
// by a plain conversion (the data only has to be some values of T; nothing here is under test).
template <class T>
std::vector<T> make_data(const KvView& v, Dist dist, std::uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  // fp16 overflows past 65504; keep the wide range inside every format, denormals included.
  const bool half = std::is_same_v<T, __half>;
  std::uniform_real_distribution<double> log2mag(half ? -26.0 : -140.0, half ? 15.0 : 120.0);
  std::vector<T> x(v.size());
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) {
        double val = 0;
        switch (dist) {
          case Dist::kUniform: val = uni(rng); break;
          case Dist::kNormalWithOutliers:
            // Every 16th channel is an outlier channel (x40), as seen in real K caches; channel 3
            // and token 5 are all zeros, so both granularities meet zero groups.
            val = normal(rng) * (c % 16 == 7 ? 40.0 : 1.0);
            if (c == 3 || t == 5) val = 0;
            break;
          case Dist::kWideRange: val = (rng() & 1 ? -1 : 1) * std::exp2(log2mag(rng)); break;
        }
        x[v.offset(b, t, c)] = kvq::from_float<T>(static_cast<float>(val));
      }
  return x;
}

// --- the comparison ------------------------------------------------------------------------------

struct Totals {
  long long elements = 0, tie_sensitive = 0, near_ties = 0, data_ties = 0;
};

// Runs every reference operation on x and compares with the model. Returns counts for reporting.
template <class T>
Totals check_against_model(const std::vector<T>& x, const KvView& v, const QuantSpec& spec_in, const std::string& what) {
  SCOPED_TRACE(what);
  const Model m = run_model(x, v, spec_in);
  const std::int64_t nscales = kvq::scale_count(v, spec_in);
  EXPECT_EQ(nscales, static_cast<std::int64_t>(m.scales.size()));

  unsigned long long counter = 0;
  QuantSpec spec = spec_in;
  spec.nonfinite_count = &counter;
  std::vector<float> scales(nscales, -7.0f), scales2(nscales, -7.0f);
  std::vector<std::int8_t> q(v.size(), 99), q2(v.size(), 99);
  std::vector<T> y(v.size());
  EXPECT_EQ(kvq::reference::quantize(x.data(), v, spec, q.data(), scales.data()), cudaSuccess);
  EXPECT_EQ(counter, m.nonfinite);
  EXPECT_EQ(kvq::reference::dequantize(q.data(), scales.data(), v, spec, y.data()), cudaSuccess);
  // The two-step path (compute_scales, then quantize_with_scales) must agree with quantize.
  EXPECT_EQ(kvq::reference::compute_scales(x.data(), v, spec, scales2.data()), cudaSuccess);
  EXPECT_EQ(kvq::reference::quantize_with_scales(x.data(), scales2.data(), v, spec, q2.data()), cudaSuccess);
  EXPECT_EQ(counter, 3 * m.nonfinite);
  EXPECT_TRUE(std::memcmp(scales.data(), scales2.data(), nscales * sizeof(float)) == 0);
  EXPECT_TRUE(q == q2);

  long long bad_scales = 0, bad_codes = 0, bad_y = 0, bad_roundtrip = 0;
  for (std::int64_t i = 0; i < nscales; ++i) {
    if (static_cast<double>(scales[i]) != m.scales[i] && bad_scales++ < 5)
      ADD_FAILURE() << "scale " << i << ": " << scales[i] << " vs model " << m.scales[i];
  }
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const std::int64_t axis = per_token ? v.channels : v.tokens;
  const std::int64_t g = model_group(axis, spec.group), ngroups = (axis + g - 1) / g;
  std::int64_t i = 0;
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c, ++i) {
        const std::int64_t o = v.offset(b, t, c);
        if (q[o] != m.codes[i] && bad_codes++ < 5)
          ADD_FAILURE() << "code at (" << b << "," << t << "," << c << ") x=" << decode(x[o]) << ": " << int(q[o])
                        << " vs model " << m.codes[i];
        const double yv = decode(y[o]);
        if (yv != m.y[i] && bad_y++ < 5)
          ADD_FAILURE() << "y at (" << b << "," << t << "," << c << "): " << yv << " vs model " << m.y[i];
        // Round trip: within half a scale, plus what rounding adds: the fp32 quotient (2^-24
        // relative, scaled back: s * 2^-16 covers it), the scale itself (amax may exceed 127 * s by
        // 127 half-ulps of s, which matters when s is denormal and has few bits), the fp32 product
        // and the output type.
        const double xv = decode(x[o]);
        if (std::isfinite(xv)) {
          const double s = m.scales[per_token ? (b * v.tokens + t) * ngroups + c / g : (b * ngroups + t / g) * v.channels + c];
          const double tol = s * (0.5 + 0x1p-16) + 127 * 0.5 * ulp_fp32(s) + 0.5 * ulp_fp32(yv) +
                             0.5 * ulp(yv, format_of<T>());
          if (std::fabs(yv - xv) > tol && bad_roundtrip++ < 5)
            ADD_FAILURE() << "round trip at (" << b << "," << t << "," << c << "): |" << yv << " - " << xv
                          << "| > " << tol;
        }
      }
  EXPECT_EQ(bad_scales, 0);
  EXPECT_EQ(bad_codes, 0);
  EXPECT_EQ(bad_y, 0);
  EXPECT_EQ(bad_roundtrip, 0);
  return Totals{v.size(), m.tie_sensitive, m.near_ties, m.data_ties};
}

// --- parameterized over dtype x granularity x group ------------------------------------------------

enum class Dtype { kFloat, kHalf, kBf16 };

struct Param {
  Dtype dtype;
  Granularity granularity;
  std::int64_t group;
};

// Printed into test names (ctest shows ".../float_per_token_group32").
void PrintTo(const Param& p, std::ostream* os) {
  const char* d = p.dtype == Dtype::kFloat ? "float" : p.dtype == Dtype::kHalf ? "half" : "bf16";
  *os << d << "_" << kvq::to_string(p.granularity) << "_group" << p.group;
}

class ReferenceVsModel : public ::testing::TestWithParam<Param> {
 protected:
  template <class T>
  void run() {
    const Param p = GetParam();
    const QuantSpec spec{p.granularity, p.group};
    // Three shapes, one distribution each, ~1.02e6 values in all. 100 channels / 1000 tokens make
    // groups of 32, 48 and 128 ragged (128 > 100 is a single group longer than the axis); 256
    // channels divide evenly by 32 and 128.
    struct Case { KvView view; Dist dist; };
    const Case cases[] = {
        {KvView{3, 1000, 100, 1000 * 100, 100}, Dist::kUniform},
        {KvView{2, 700, 256, 700 * 256, 256}, Dist::kNormalWithOutliers},
        {KvView{1, 2500, 144, 2500 * 144, 144}, Dist::kWideRange},
    };
    Totals all;
    std::uint32_t seed = 1234 + static_cast<std::uint32_t>(p.group) * 7 + static_cast<std::uint32_t>(p.granularity);
    for (const Case& c : cases) {
      const std::vector<T> x = make_data<T>(c.view, c.dist, seed++);
      const Totals t = check_against_model(x, c.view, spec, dist_name(c.dist));
      all.elements += t.elements;
      all.tie_sensitive += t.tie_sensitive;
      all.near_ties += t.near_ties;
      all.data_ties += t.data_ties;
    }
    ASSERT_GE(all.elements, 1000000);
    std::printf("[ model    ] %s %s group %lld: %lld values, %lld within one fp32 ulp of a tie "
                "(%lld of them data on a tie), %lld codes differ from rounding the exact quotient\n",
                type_name<T>(), kvq::to_string(p.granularity), static_cast<long long>(p.group), all.elements,
                all.near_ties, all.data_ties, all.tie_sensitive);
    // A quotient in [64, 127] has an fp32 ulp of 2^-17 (7.6e-6), so a continuous quotient lands
    // within one ulp of a tie with probability ~1e-5. That bound holds for quotients that are not
    // ties of the data. fp16/bf16 data also sits exactly on ties (x = amax / 2 -> 63.5, common when
    // amax rounds to a power of two): only the rounding of the scale moves the quotient off the
    // tie, the fp32 division mostly lands back on it and rounds to even (the right code for
    // 127 * x / amax). Those depend on the data alone; they are counted apart and not bounded.
    EXPECT_LE(all.near_ties - all.data_ties, all.elements / 50000);
  }
};

TEST_P(ReferenceVsModel, CodesScalesAndRoundTrip) {
  switch (GetParam().dtype) {
    case Dtype::kFloat: run<float>(); break;
    case Dtype::kHalf: run<__half>(); break;
    case Dtype::kBf16: run<__nv_bfloat16>(); break;
  }
}

std::vector<Param> all_params() {
  std::vector<Param> out;
  for (Dtype d : {Dtype::kFloat, Dtype::kHalf, Dtype::kBf16})
    for (Granularity g : {Granularity::kPerToken, Granularity::kPerChannel})
      for (std::int64_t group : {0, 1, 32, 48, 128}) out.push_back(Param{d, g, group});
  return out;
}
INSTANTIATE_TEST_SUITE_P(AllGroups, ReferenceVsModel, ::testing::ValuesIn(all_params()));

// --- typed tests: non-finite inputs and every value of the 16-bit formats ------------------------

template <class T>
class ReferenceTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(ReferenceTyped, ElementTypes);

TYPED_TEST(ReferenceTyped, NonFiniteValuesSprinkled) {
  using T = TypeParam;
  // Normal data with ~1% NaN, +Inf and -Inf, and one row and one channel that are entirely
  // non-finite (groups without a finite value).
  const KvView v{2, 300, 96, 300 * 96, 96};
  std::vector<T> x = make_data<T>(v, Dist::kNormalWithOutliers, 99);
  std::mt19937 rng(5);
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY};
  for (std::int64_t i = 0; i < v.size(); ++i)
    if (rng() % 100 == 0) x[i] = kvq::from_float<T>(specials[rng() % 3]);
  for (std::int64_t c = 0; c < v.channels; ++c) x[v.offset(1, 17, c)] = kvq::from_float<T>(specials[c % 3]);
  for (std::int64_t t = 0; t < v.tokens; ++t) x[v.offset(0, t, 40)] = kvq::from_float<T>(specials[t % 3]);
  for (Granularity gr : {Granularity::kPerToken, Granularity::kPerChannel})
    for (std::int64_t group : {0, 1, 32, 48})
      check_against_model(x, v, QuantSpec{gr, group},
                          std::string(kvq::to_string(gr)) + " group " + std::to_string(group));
}

TYPED_TEST(ReferenceTyped, EveryBitPatternOfA16BitType) {
  using T = TypeParam;
  // All 65536 bit patterns as one [256, 256] matrix (for float: a spread of 65536 patterns from the
  // whole fp32 range, denormals, NaN and Inf included). Every granularity and group sees
  // denormals, the extremes of the format and non-finite values side by side.
  const KvView v = kvq::contiguous_view(256, 256);
  std::vector<T> x(v.size());
  for (std::uint32_t u = 0; u < 0x10000; ++u) {
    if constexpr (sizeof(T) == 2) {
      const std::uint16_t b = static_cast<std::uint16_t>(u);
      std::memcpy(static_cast<void*>(&x[u]), &b, 2);
    } else {
      const std::uint32_t b = u * 0x10001u;  // covers exponents 0..255 and both signs
      std::memcpy(static_cast<void*>(&x[u]), &b, 4);
    }
  }
  for (Granularity gr : {Granularity::kPerToken, Granularity::kPerChannel})
    for (std::int64_t group : {0, 1, 32, 48, 300})
      check_against_model(x, v, QuantSpec{gr, group},
                          std::string(kvq::to_string(gr)) + " group " + std::to_string(group));
}

// The model itself, on cases whose answers are known, so a broken model cannot hide a broken
// reference (both would have to be wrong in the same way).
TEST(Model, RoundsLikeTheFormats) {
  EXPECT_EQ(round_half_even(2.5), 2);
  EXPECT_EQ(round_half_even(-2.5), -2);
  EXPECT_EQ(round_half_even(3.5), 4);
  EXPECT_EQ(round_half_even(-0.4), 0);
  EXPECT_EQ(round_to_format(1.0 / 127.0, kFp32), static_cast<double>(0x1.020408p-7f));
  EXPECT_EQ(round_to_format(65520.0, kFp16), INFINITY);
  EXPECT_EQ(round_to_format(65519.0, kFp16), 65504.0);
  EXPECT_EQ(round_to_format(std::ldexp(1.0, -25), kFp16), 0.0);              // tie to even (0)
  EXPECT_EQ(round_to_format(3 * std::ldexp(1.0, -25), kFp16), std::ldexp(1.0, -23));
  EXPECT_EQ(round_to_format(1 + std::ldexp(1.0, -8), kBf16), 1.0);
  EXPECT_EQ(round_to_format(63 * std::ldexp(1.0, -149) / 127, kFp32), 0.0);  // underflow
  EXPECT_EQ(round_to_format(64 * std::ldexp(1.0, -149) / 127, kFp32), std::ldexp(1.0, -149));
  EXPECT_EQ(decode(kvq::from_float<__half>(0.5f)), 0.5);
  EXPECT_EQ(decode(kvq::from_float<__nv_bfloat16>(-3.0f)), -3.0);
}

TEST(Model, AgreesWithAHandComputedGroup) {
  // Per-token, one row: amax 63.5 -> scale 0.5; codes 2 (2.5), -127, 2 (1.5).
  const std::vector<float> x = {1.25f, -63.5f, 0.75f};
  const Model m = run_model(x, kvq::contiguous_view(1, 3), QuantSpec{Granularity::kPerToken, 0});
  EXPECT_EQ(m.scales, std::vector<double>{0.5});
  EXPECT_EQ(m.codes, (std::vector<int>{2, -127, 2}));
  EXPECT_EQ(m.y, (std::vector<double>{1.0, -63.5, 1.0}));
}

// --- scale strides: the same scales, elsewhere -----------------------------------------------------

TYPED_TEST(ReferenceTyped, StridedScalesAreTheContiguousOnesElsewhere) {
  using T = TypeParam;
  const KvView v{3, 40, 24, 40 * 24, 24};  // [B, T, D]
  const std::vector<T> x = make_data<T>(v, Dist::kNormalWithOutliers, 3);
  const std::int64_t storage = v.size();
  for (Granularity gr : {Granularity::kPerToken, Granularity::kPerChannel})
    for (std::int64_t group : {0, 8}) {
      const QuantSpec flat{gr, group};
      const kvq::ScaleShape sh = kvq::scale_shape(v, flat);
      for (kvq::ScaleStrides st : {kvq::ScaleStrides{sh.rows * sh.cols + 7, 0}, kvq::ScaleStrides{0, sh.cols + 2},
                                   kvq::ScaleStrides{sh.cols, sh.batch * sh.cols}}) {  // the last: batches interleaved
        QuantSpec spec = flat;
        spec.scale_strides = st;
        const std::string what = std::string(kvq::to_string(gr)) + " group " + std::to_string(group) + " strides " +
                                 std::to_string(st.batch_stride) + "/" + std::to_string(st.row_stride);
        ASSERT_EQ(kvq::validate(v, spec), cudaSuccess) << what;
        std::vector<float> s_flat(kvq::scale_count(v, flat)), s(kvq::scale_extent(v, spec), -3.0f);
        std::vector<std::int8_t> q_flat(storage, 0), q(storage, 0), q2(storage, 0);
        std::vector<T> y_flat(storage), y(storage);
        ASSERT_EQ(kvq::reference::quantize(x.data(), v, flat, q_flat.data(), s_flat.data()), cudaSuccess);
        ASSERT_EQ(kvq::reference::quantize(x.data(), v, spec, q.data(), s.data()), cudaSuccess);
        EXPECT_EQ(q, q_flat) << what;
        std::vector<bool> used(s.size(), false);
        for (std::int64_t b = 0; b < sh.batch; ++b)
          for (std::int64_t r = 0; r < sh.rows; ++r)
            for (std::int64_t c = 0; c < sh.cols; ++c) {
              const std::int64_t at = kvq::scale_offset(v, spec, b, r, c);
              used[at] = true;
              ASSERT_EQ(s[at], s_flat[(b * sh.rows + r) * sh.cols + c]) << what;
            }
        for (std::size_t i = 0; i < s.size(); ++i)
          if (!used[i]) {
            ASSERT_EQ(s[i], -3.0f) << what << ": a gap was written at " << i;
          }
        ASSERT_EQ(kvq::reference::quantize_with_scales(x.data(), s.data(), v, spec, q2.data()), cudaSuccess);
        EXPECT_EQ(q2, q_flat) << what;
        ASSERT_EQ(kvq::reference::dequantize(q.data(), s.data(), v, spec, y.data()), cudaSuccess);
        ASSERT_EQ(kvq::reference::dequantize(q_flat.data(), s_flat.data(), v, flat, y_flat.data()), cudaSuccess);
        EXPECT_EQ(std::memcmp(y.data(), y_flat.data(), y.size() * sizeof(T)), 0) << what;
      }
    }
}

TEST(ScaleStrides, OverlappingOrNegativeStridesAreRejected) {
  const KvView v{2, 8, 16, 8 * 16, 16};
  const QuantSpec per_channel{Granularity::kPerChannel, 4};  // scales [2, 2, 16]
  const QuantSpec per_token{Granularity::kPerToken, 0};      // scales [2, 8, 1]
  auto with = [](QuantSpec s, std::int64_t batch, std::int64_t row) {
    s.scale_strides = kvq::ScaleStrides{batch, row};
    return s;
  };
  EXPECT_EQ(kvq::validate(v, with(per_channel, 0, 15)), cudaErrorInvalidValue) << "rows overlap";
  EXPECT_EQ(kvq::validate(v, with(per_channel, 31, 16)), cudaErrorInvalidValue) << "batches overlap";
  EXPECT_EQ(kvq::validate(v, with(per_channel, -32, 16)), cudaErrorInvalidValue);
  EXPECT_EQ(kvq::validate(v, with(per_channel, 32, -16)), cudaErrorInvalidValue);
  EXPECT_EQ(kvq::validate(v, with(per_token, 1, 1)), cudaErrorInvalidValue) << "[T, H] needs row stride >= H";
  EXPECT_EQ(kvq::validate(v, with(per_token, 0, std::int64_t{1} << 62)), cudaErrorInvalidValue) << "overflow";
  EXPECT_EQ(kvq::validate(v, with(per_token, 1, 2)), cudaSuccess) << "[T, H]";
  EXPECT_EQ(kvq::validate(v, with(per_channel, 64, 0)), cudaSuccess) << "a gap between batches";
  EXPECT_EQ(kvq::scale_extent(v, with(per_channel, 64, 0)), 64 + 32);
  EXPECT_EQ(kvq::scale_extent(v, per_channel), kvq::scale_count(v, per_channel));
}

}  // namespace
