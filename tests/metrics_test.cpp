// Error metrics (kvq/metrics.hpp) on inputs whose answers are worked out by hand.

#include <kvq/metrics.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

namespace m = kvq::metrics;

TEST(Metrics, MaxAbsError) {
  const std::vector<float> a = {1.0f, -2.0f, 3.0f, 0.5f};
  const std::vector<float> b = {1.5f, -2.0f, 0.0f, -0.5f};
  EXPECT_DOUBLE_EQ(m::max_abs_error(a.data(), b.data(), 4), 3.0);  // |3 - 0|
  EXPECT_DOUBLE_EQ(m::max_abs_error(a.data(), a.data(), 4), 0.0);
  EXPECT_DOUBLE_EQ(m::max_abs_error(a.data(), b.data(), 0), 0.0);  // nothing to compare
  EXPECT_DOUBLE_EQ(m::max_abs_error(a.data(), b.data(), 2), 0.5);  // only the first two
}

TEST(Metrics, L2Error) {
  const std::vector<double> a = {0.0, 3.0, 1.0};
  const std::vector<double> b = {4.0, 0.0, 1.0};
  EXPECT_DOUBLE_EQ(m::l2_error(a.data(), b.data(), 3), 5.0);  // sqrt(16 + 9)
  EXPECT_DOUBLE_EQ(m::l2_error(b.data(), a.data(), 3), 5.0);  // symmetric
  EXPECT_DOUBLE_EQ(m::l2_error(a.data(), a.data(), 3), 0.0);
}

TEST(Metrics, RelativeL2Error) {
  const std::vector<double> a = {3.0, 4.0};  // ||a|| = 5
  const std::vector<double> b = {3.0, 1.0};  // ||a - b|| = 3
  EXPECT_DOUBLE_EQ(m::relative_l2_error(a.data(), b.data(), 2), 0.6);
  const std::vector<double> zero = {0.0, 0.0};
  EXPECT_DOUBLE_EQ(m::relative_l2_error(a.data(), zero.data(), 2), 1.0);
  EXPECT_DOUBLE_EQ(m::relative_l2_error(zero.data(), zero.data(), 2), 0.0);  // both zero: no error
  EXPECT_EQ(m::relative_l2_error(zero.data(), a.data(), 2), std::numeric_limits<double>::infinity());
}

TEST(Metrics, MixedElementTypesAreWidenedExactly) {
  // fp16 0.5 and bf16 -0.25 against float: the differences are exact in double.
  const std::vector<__half> h = {__float2half_rn(0.5f), __float2half_rn(-1.0f)};
  const std::vector<__nv_bfloat16> bf = {__float2bfloat16_rn(-0.25f), __float2bfloat16_rn(-1.0f)};
  const std::vector<float> f = {0.25f, -1.0f};
  EXPECT_DOUBLE_EQ(m::max_abs_error(h.data(), f.data(), 2), 0.25);
  EXPECT_DOUBLE_EQ(m::max_abs_error(bf.data(), h.data(), 2), 0.75);
  EXPECT_DOUBLE_EQ(m::l2_error(bf.data(), f.data(), 2), 0.5);
}

TEST(Metrics, AttentionScoreErrorHandComputed) {
  // q = (1, 2). Token 0: q.k = 1, q.k_hat = 3 -> 2. Token 1: q.k = 2, q.k_hat = 0 -> 2. Mean 2.
  const std::vector<float> q = {1.0f, 2.0f};
  const std::vector<float> k = {1.0f, 0.0f, 0.0f, 1.0f};      // (2 tokens, dim 2)
  const std::vector<float> k_hat = {1.0f, 1.0f, 0.0f, 0.0f};  // (2 tokens, dim 2)
  EXPECT_DOUBLE_EQ(m::attention_score_error(q.data(), k.data(), k_hat.data(), 2, 2), 2.0);
  // Absolute values: errors of opposite sign do not cancel. Token 0 +1, token 1 -1 -> mean 1.
  const std::vector<float> k_hat2 = {2.0f, 0.0f, -1.0f, 1.0f};
  EXPECT_DOUBLE_EQ(m::attention_score_error(q.data(), k.data(), k_hat2.data(), 2, 2), 1.0);
}

TEST(Metrics, AttentionScoreErrorIsZeroForIdenticalKeys) {
  const std::vector<float> q = {0.3f, -1.7f, 2.2f};
  const std::vector<float> k = {1.0f, 2.0f, 3.0f, -4.0f, 5.0f, 0.125f};
  EXPECT_EQ(m::attention_score_error(q.data(), k.data(), k.data(), 2, 3), 0.0);
  EXPECT_EQ(m::attention_score_error(q.data(), k.data(), k.data(), 0, 3), 0.0);  // no tokens
}

TEST(Metrics, AttentionWithUniformWeightsIsTheMeanOfV) {
  // q = 0: every score is 0, softmax is uniform, the output is the mean of the rows of V.
  const std::vector<float> q = {0.0f, 0.0f};
  const std::vector<float> k = {5.0f, -1.0f, 2.0f, 7.0f, -3.0f, 0.5f};   // (3, 2): irrelevant
  const std::vector<float> v = {1.0f, 10.0f, 2.0f, 20.0f, 6.0f, 30.0f};  // (3, 2)
  std::vector<double> out(2);
  m::attention(q.data(), 1, k.data(), v.data(), 3, 2, out.data());
  EXPECT_NEAR(out[0], 3.0, 1e-12);
  EXPECT_NEAR(out[1], 20.0, 1e-12);
}

TEST(Metrics, AttentionWithHandComputedSoftmax) {
  // dim 1, q = 1, keys 0 and ln 3: scores 0 and ln 3 (sqrt(1) = 1), weights 1/4 and 3/4.
  // V = (4, 8): output 1 + 6 = 7.
  const std::vector<double> q = {1.0};
  const std::vector<double> k = {0.0, std::log(3.0)};
  const std::vector<double> v = {4.0, 8.0};
  std::vector<double> out(1);
  m::attention(q.data(), 1, k.data(), v.data(), 2, 1, out.data());
  EXPECT_NEAR(out[0], 7.0, 1e-12);
  // dim 4 scales scores by 1/2: q = (1,1,1,1), key 1 = (ln 9)/4 * ones -> score (ln 9)/2 = ln 3.
  const std::vector<double> q4 = {1.0, 1.0, 1.0, 1.0};
  const double a = std::log(9.0) / 4;
  const std::vector<double> k4 = {0.0, 0.0, 0.0, 0.0, a, a, a, a};
  const std::vector<double> v4 = {4.0, 0.0, 0.0, 0.0, 8.0, 0.0, 0.0, -4.0};
  std::vector<double> out4(4);
  m::attention(q4.data(), 1, k4.data(), v4.data(), 2, 4, out4.data());
  EXPECT_NEAR(out4[0], 7.0, 1e-12);
  EXPECT_NEAR(out4[3], -3.0, 1e-12);
}

TEST(Metrics, AttentionIsStableForLargeScores) {
  // Scores of 1000 would overflow exp() without subtracting the max; equal scores -> uniform.
  const std::vector<double> q = {1000.0};
  const std::vector<double> k = {1.0, 1.0};
  const std::vector<double> v = {2.0, 4.0};
  std::vector<double> out(1);
  m::attention(q.data(), 1, k.data(), v.data(), 2, 1, out.data());
  EXPECT_NEAR(out[0], 3.0, 1e-12);
}

TEST(Metrics, AttentionOutputErrorIsZeroForIdenticalInputs) {
  const std::vector<float> q = {0.5f, -1.0f, 2.0f, 0.25f, 1.0f, -0.5f};  // (2 queries, dim 3)
  const std::vector<float> k = {1.0f, 0.0f, -1.0f, 2.0f, 1.0f, 0.5f, -0.5f, 0.25f, 3.0f};
  const std::vector<float> v = {1.0f, 2.0f, 3.0f, -1.0f, 0.0f, 4.0f, 2.0f, 2.0f, -2.0f};
  EXPECT_EQ(m::attention_output_error(q.data(), 2, k.data(), k.data(), v.data(), v.data(), 3, 3), 0.0);
}

TEST(Metrics, AttentionOutputErrorWithUniformAttention) {
  // q = 0, so attention is uniform for both K and K_hat: out = mean(V) = (2, 0),
  // out_hat = mean(V_hat) = (2, 1): relative L2 error 1 / 2.
  const std::vector<float> q = {0.0f, 0.0f};
  const std::vector<float> k = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<float> k_hat = {-1.0f, 0.0f, 9.0f, 4.0f};  // differs, but q = 0 ignores it
  const std::vector<float> v = {1.0f, 0.0f, 3.0f, 0.0f};
  const std::vector<float> v_hat = {1.0f, 0.0f, 3.0f, 2.0f};
  EXPECT_NEAR(m::attention_output_error(q.data(), 1, k.data(), k_hat.data(), v.data(), v_hat.data(), 2, 2), 0.5,
              1e-12);
}

TEST(Metrics, AttentionOutputErrorFromChangedKeys) {
  // dim 1, q = 1, V = (4, 8), V_hat = V. K = (0, 0): uniform, out = 6. K_hat = (0, ln 3):
  // weights 1/4, 3/4, out_hat = 7. Relative error |6 - 7| / 6.
  const std::vector<double> q = {1.0};
  const std::vector<double> k = {0.0, 0.0};
  const std::vector<double> k_hat = {0.0, std::log(3.0)};
  const std::vector<double> v = {4.0, 8.0};
  EXPECT_NEAR(m::attention_output_error(q.data(), 1, k.data(), k_hat.data(), v.data(), v.data(), 2, 1), 1.0 / 6.0,
              1e-12);
}

}  // namespace
