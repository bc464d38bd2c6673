// Strided views through the CPU reference: the layouts engines use ([T, D], [B, H, T, D],
// [T, H, D] with one scale set per head), padded rows and sub-views.
//
// The rule checked everywhere: the reference on a strided view equals the reference on the same
// elements packed into a dense [batch, tokens, channels] tensor (scales, codes and dequantized
// values, bit for bit), and every element of the storage outside the view is left as it was. The
// input's padding is filled with NaN and large values, so reading it would change the scales or
// the non-finite count.

#include <kvq/reference.hpp>
#include <kvq/types.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using kvq::Granularity;
using kvq::KvView;
using kvq::QuantSpec;

constexpr std::int8_t kPoisonCode = 0x5a;
constexpr unsigned char kPoisonByte = 0xa5;

template <class T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

KvView packed(const KvView& v) { return KvView{v.batch, v.tokens, v.channels, v.tokens * v.channels, v.channels}; }

// Storage of `len` elements for `view`: padding is NaN / 60000 alternately, the view's own
// elements are normal random values with a few outlier channels.
template <class T>
std::vector<T> make_storage(std::int64_t len, const KvView& view, std::uint32_t seed) {
  std::vector<T> x(len);
  for (std::int64_t i = 0; i < len; ++i) x[i] = kvq::from_float<T>(i % 2 ? NAN : 60000.0f);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t b = 0; b < view.batch; ++b)
    for (std::int64_t t = 0; t < view.tokens; ++t)
      for (std::int64_t c = 0; c < view.channels; ++c)
        x[view.offset(b, t, c)] = kvq::from_float<T>(normal(rng) * (c % 8 == 5 ? 20.0f : 1.0f));
  return x;
}

// Marks the elements of `view` in storage of `len` elements; fails if the view leaves the storage.
std::vector<bool> coverage(const KvView& v, std::int64_t len) {
  std::vector<bool> in(len, false);
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) {
        const std::int64_t o = v.offset(b, t, c);
        EXPECT_TRUE(o >= 0 && o < len);
        if (o >= 0 && o < len) in[o] = true;
      }
  return in;
}

// Outputs of the three quantizing operations and dequantize on one view.
template <class T>
struct Outputs {
  std::vector<float> scales, scales2;
  std::vector<std::int8_t> q, q2;  // q from quantize, q2 from compute_scales + quantize_with_scales
  std::vector<T> y;
  unsigned long long nonfinite = 0;
};

template <class T>
Outputs<T> run_all(const T* x, std::int64_t len, const KvView& v, QuantSpec spec) {
  Outputs<T> o;
  const std::int64_t ns = kvq::scale_count(v, spec);
  o.scales.assign(ns, -5.0f);
  o.scales2.assign(ns, -5.0f);
  o.q.assign(len, kPoisonCode);
  o.q2.assign(len, kPoisonCode);
  o.y.resize(len);
  std::memset(static_cast<void*>(o.y.data()), kPoisonByte, len * sizeof(T));
  spec.nonfinite_count = &o.nonfinite;
  EXPECT_EQ(kvq::reference::quantize(x, v, spec, o.q.data(), o.scales.data()), cudaSuccess);
  EXPECT_EQ(kvq::reference::dequantize(o.q.data(), o.scales.data(), v, spec, o.y.data()), cudaSuccess);
  EXPECT_EQ(kvq::reference::compute_scales(x, v, spec, o.scales2.data()), cudaSuccess);
  EXPECT_EQ(kvq::reference::quantize_with_scales(x, o.scales2.data(), v, spec, o.q2.data()), cudaSuccess);
  return o;
}

// The whole check: strided == packed, padding untouched, input unchanged.
template <class T>
void check_matches_packed(const std::vector<T>& storage, const KvView& v, const QuantSpec& spec) {
  SCOPED_TRACE(std::string(kvq::to_string(spec.granularity)) + " group " + std::to_string(spec.group));
  ASSERT_EQ(kvq::validate(v, spec), cudaSuccess);
  const std::int64_t len = static_cast<std::int64_t>(storage.size());
  const std::vector<T> before = storage;

  const KvView pv = packed(v);
  std::vector<T> dense(v.size());
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) dense[pv.offset(b, t, c)] = storage[v.offset(b, t, c)];

  const Outputs<T> s = run_all(storage.data(), len, v, spec);
  const Outputs<T> p = run_all(dense.data(), v.size(), pv, spec);

  EXPECT_EQ(s.nonfinite, p.nonfinite) << "the strided call read elements outside the view";
  EXPECT_EQ(p.nonfinite, 0u);
  ASSERT_EQ(s.scales.size(), p.scales.size());
  EXPECT_TRUE(std::memcmp(s.scales.data(), p.scales.data(), s.scales.size() * sizeof(float)) == 0);
  EXPECT_TRUE(std::memcmp(s.scales2.data(), p.scales.data(), s.scales.size() * sizeof(float)) == 0);

  int mismatches = 0;
  for (std::int64_t b = 0; b < v.batch; ++b)
    for (std::int64_t t = 0; t < v.tokens; ++t)
      for (std::int64_t c = 0; c < v.channels; ++c) {
        const std::int64_t so = v.offset(b, t, c), po = pv.offset(b, t, c);
        const bool ok = s.q[so] == p.q[po] && s.q2[so] == p.q[po] && same_bytes(s.y[so], p.y[po]);
        if (!ok && mismatches++ < 5) ADD_FAILURE() << "element (" << b << "," << t << "," << c << ") differs";
      }
  EXPECT_EQ(mismatches, 0);

  const std::vector<bool> in = coverage(v, len);
  T poison_y;
  std::memset(static_cast<void*>(&poison_y), kPoisonByte, sizeof(T));
  std::int64_t touched = 0;
  for (std::int64_t i = 0; i < len; ++i)
    if (!in[i]) touched += s.q[i] != kPoisonCode || s.q2[i] != kPoisonCode || !same_bytes(s.y[i], poison_y);
  EXPECT_EQ(touched, 0) << "elements outside the view were written";
  EXPECT_TRUE(std::memcmp(before.data(), storage.data(), len * sizeof(T)) == 0) << "the input was modified";
}

const QuantSpec kSpecs[] = {
    {Granularity::kPerToken, 0},   {Granularity::kPerToken, 16}, {Granularity::kPerToken, 7},
    {Granularity::kPerChannel, 0}, {Granularity::kPerChannel, 8}, {Granularity::kPerChannel, 5},
};

template <class T>
class ViewTest : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(ViewTest, ElementTypes);

TYPED_TEST(ViewTest, TokenHeadDimWithOneScaleSetPerHead) {
  // vLLM-style [T, H, D]: batch H, batch_stride D, token_stride H * D.
  const std::int64_t T = 37, H = 5, D = 46;
  const KvView v{H, T, D, D, H * D};
  const auto x = make_storage<TypeParam>(T * H * D, v, 1);
  for (const QuantSpec& spec : kSpecs) check_matches_packed(x, v, spec);
}

TYPED_TEST(ViewTest, PerHeadScalesAreTheHeadsOwn) {
  // Per-channel, whole sequence, on [T, H, D]: the scale of (head h, channel d) comes from that
  // head's column alone, max over t of |x[t, h, d]| (not mixed with other heads).
  const std::int64_t T = 29, H = 4, D = 10;
  const KvView v{H, T, D, D, H * D};
  const auto x = make_storage<TypeParam>(T * H * D, v, 2);
  const QuantSpec spec{Granularity::kPerChannel, 0};
  std::vector<float> scales(kvq::scale_count(v, spec));
  ASSERT_EQ(scales.size(), static_cast<std::size_t>(H * D));
  ASSERT_EQ(kvq::reference::compute_scales(x.data(), v, spec, scales.data()), cudaSuccess);
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t d = 0; d < D; ++d) {
      float amax = 0;
      for (std::int64_t t = 0; t < T; ++t) amax = std::max(amax, std::fabs(kvq::to_float(x[t * H * D + h * D + d])));
      EXPECT_EQ(scales[h * D + d], amax / 127.0f) << "head " << h << " channel " << d;
    }
}

TYPED_TEST(ViewTest, BatchHeadTokenDimEqualsIndependentMatrices) {
  // HF-style [B, H, T, D] is B * H independent [T, D] matrices, with their scales one after another.
  const std::int64_t B = 2, H = 3, T = 19, D = 40;
  const KvView v{B * H, T, D, T * D, D};
  const auto x = make_storage<TypeParam>(B * H * T * D, v, 3);
  for (const QuantSpec& spec : kSpecs) {
    SCOPED_TRACE(std::string(kvq::to_string(spec.granularity)) + " group " + std::to_string(spec.group));
    check_matches_packed(x, v, spec);
    std::vector<float> all(kvq::scale_count(v, spec));
    std::vector<std::int8_t> q_all(x.size());
    ASSERT_EQ(kvq::reference::quantize(x.data(), v, spec, q_all.data(), all.data()), cudaSuccess);
    const KvView one = kvq::contiguous_view(T, D);
    const std::int64_t per = kvq::scale_count(one, spec);
    ASSERT_EQ(per * B * H, static_cast<std::int64_t>(all.size()));
    for (std::int64_t m = 0; m < B * H; ++m) {
      std::vector<float> s(per);
      std::vector<std::int8_t> q(T * D);
      ASSERT_EQ(kvq::reference::quantize(x.data() + m * T * D, one, spec, q.data(), s.data()), cudaSuccess);
      EXPECT_TRUE(std::memcmp(s.data(), all.data() + m * per, per * sizeof(float)) == 0) << "matrix " << m;
      EXPECT_TRUE(std::memcmp(q.data(), q_all.data() + m * T * D, T * D) == 0) << "matrix " << m;
    }
  }
}

TYPED_TEST(ViewTest, PaddedTokenAndBatchStrides) {
  // Rows padded from 30 to 37 elements and matrices separated by 5 more: the padding holds NaN
  // and 60000 in the input and must stay poisoned in the outputs.
  const std::int64_t B = 3, T = 23, D = 30, row = 37, mat = T * row + 5;
  const KvView v{B, T, D, mat, row};
  const auto x = make_storage<TypeParam>(B * mat, v, 4);
  for (const QuantSpec& spec : kSpecs) check_matches_packed(x, v, spec);
}

TYPED_TEST(ViewTest, SubViewOfSomeHeadsLeavesTheOthersAlone) {
  // Heads 2..4 of a [T, 6, D] cache: the base pointer moves by 2 * D, batch is 3. Heads 0, 1 and 5
  // are "outside the view" and must not be read or written.
  const std::int64_t T = 17, H = 6, D = 24, first = 2, count = 3;
  const KvView full{H, T, D, D, H * D};
  const KvView sub{count, T, D, D, H * D};
  auto storage = make_storage<TypeParam>(T * H * D, full, 5);
  // Poison the heads outside the sub-view with NaN / 60000 too.
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h : {0, 1, 5})
      for (std::int64_t d = 0; d < D; ++d) storage[t * H * D + h * D + d] = kvq::from_float<TypeParam>(d % 2 ? NAN : 60000.0f);
  // Check through a shifted storage: element 0 of `shifted` is head `first` of token 0, and the view
  // covers the shifted storage up to its end minus the trailing heads.
  const std::vector<TypeParam> shifted(storage.begin() + first * D, storage.end());
  for (const QuantSpec& spec : kSpecs) check_matches_packed(shifted, sub, spec);
}

TYPED_TEST(ViewTest, SingleTokenDecodeStep) {
  // One new token per head, [H, D] inside a [T, H, D] cache at token 11: tokens 1 (token_stride is
  // not used and may be 0), batch H, batch_stride D.
  const std::int64_t T = 16, H = 8, D = 96, t_new = 11;
  const KvView v{H, 1, D, D, 0};
  const KvView cache{H, T, D, D, H * D};
  const auto storage = make_storage<TypeParam>(T * H * D, cache, 6);
  const std::vector<TypeParam> at_token(storage.begin() + t_new * H * D, storage.end());
  for (const QuantSpec& spec : kSpecs) check_matches_packed(at_token, v, spec);
}

TYPED_TEST(ViewTest, ContiguousTokenDimViewIsThePapersLayout) {
  // [T, D] through contiguous_view(): same as the explicit {1, T, D, T * D, D}.
  const KvView v = kvq::contiguous_view(50, 33);
  EXPECT_EQ(v.batch, 1);
  EXPECT_EQ(v.batch_stride, 50 * 33);
  EXPECT_EQ(v.token_stride, 33);
  const auto x = make_storage<TypeParam>(50 * 33, v, 7);
  for (const QuantSpec& spec : kSpecs) check_matches_packed(x, v, spec);
}

}  // namespace
