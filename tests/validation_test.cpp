// Argument validation: the shared cases of validation_cases.hpp run against the CPU reference,
// plus the data model's helpers (scale_count, scale_shape, validate) on their own.

#include "validation_cases.hpp"

#include <kvq/reference.hpp>
#include <kvq/types.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

using kvq::Granularity;
using kvq::KvView;
using kvq::QuantSpec;

// --- the shared cases, on the CPU reference -----------------------------------------------------

// (Outside the anonymous namespace: the type's name is part of the test names ctest shows.)
template <class T>
struct ReferenceOps {
  using Elem = T;
  static cudaError_t compute_scales(const T* x, const KvView& v, const QuantSpec& s, float* scales) {
    return kvq::reference::compute_scales(x, v, s, scales);
  }
  static cudaError_t quantize(const T* x, const KvView& v, const QuantSpec& s, std::int8_t* q, float* scales) {
    return kvq::reference::quantize(x, v, s, q, scales);
  }
  static cudaError_t quantize_with_scales(const T* x, const float* scales, const KvView& v, const QuantSpec& s,
                                          std::int8_t* q) {
    return kvq::reference::quantize_with_scales(x, scales, v, s, q);
  }
  static cudaError_t dequantize(const std::int8_t* q, const float* scales, const KvView& v, const QuantSpec& s, T* y) {
    return kvq::reference::dequantize(q, scales, v, s, y);
  }
};

using ReferenceTypes = ::testing::Types<ReferenceOps<float>, ReferenceOps<__half>, ReferenceOps<__nv_bfloat16>>;

// The instantiation must name the suite from its own namespace.
namespace kvq::test {
INSTANTIATE_TYPED_TEST_SUITE_P(Validation, ValidationCases, ReferenceTypes);
}  // namespace kvq::test

// The GPU API (quantize.cuh, and study.cuh per variant) runs the same cases from
// gpu_exact_float_test.cu: its adapter needs nvcc. No case makes a valid non-empty call, so they
// need no device memory and run (and must pass) without a GPU.

namespace {

// --- the harness itself can see a write ----------------------------------------------------------

TEST(ValidationHarness, AValidCallSucceedsAndWrites) {
  // The control for the "touches nothing" checks: with good arguments the same buffers change.
  const KvView v = kvq::contiguous_view(4, 8);
  std::vector<float> x(32, 0.5f), s(4, -1.0f);
  std::vector<std::int8_t> q(32, 0x3c);
  ASSERT_EQ(kvq::reference::quantize(x.data(), v, QuantSpec{Granularity::kPerToken, 0}, q.data(), s.data()),
            cudaSuccess);
  EXPECT_EQ(q, std::vector<std::int8_t>(32, 127));
  EXPECT_EQ(s, std::vector<float>(4, 0.5f / 127.0f));
}

// --- scale_count / scale_shape -------------------------------------------------------------------

struct ShapeCase {
  KvView view;
  QuantSpec spec;
  std::int64_t batch, rows, cols;
  const char* what;
};

// Printed into test names (ctest shows ".../per_token_ragged_48_on_100").
void PrintTo(const ShapeCase& c, std::ostream* os) { *os << c.what; }

class ScaleShape : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(ScaleShape, MatchesTheDataModel) {
  const ShapeCase& c = GetParam();
  const kvq::ScaleShape s = kvq::scale_shape(c.view, c.spec);
  EXPECT_EQ(s.batch, c.batch);
  EXPECT_EQ(s.rows, c.rows);
  EXPECT_EQ(s.cols, c.cols);
  EXPECT_EQ(kvq::scale_count(c.view, c.spec), c.batch * c.rows * c.cols);
  EXPECT_EQ(s.size(), c.batch * c.rows * c.cols);
}

constexpr Granularity kTok = Granularity::kPerToken;
constexpr Granularity kChan = Granularity::kPerChannel;

// Per-token: [batch, tokens, ceil(channels / group)]; per-channel: [batch, ceil(tokens / group), channels].
const ShapeCase kShapeCases[] = {
    {KvView{1, 128, 64, 128 * 64, 64}, {kTok, 0}, 1, 128, 1, "per_token_whole_row"},
    {KvView{1, 128, 64, 128 * 64, 64}, {kChan, 0}, 1, 1, 64, "per_channel_whole_sequence"},
    {KvView{6, 50, 128, 50 * 128, 128}, {kTok, 32}, 6, 50, 4, "per_token_group_32"},
    {KvView{6, 50, 128, 50 * 128, 128}, {kTok, 1}, 6, 50, 128, "per_token_group_1"},
    {KvView{6, 50, 128, 50 * 128, 128}, {kTok, 128}, 6, 50, 1, "per_token_group_equal_to_row"},
    {KvView{2, 10, 100, 10 * 100, 100}, {kTok, 48}, 2, 10, 3, "per_token_ragged_48_on_100"},
    {KvView{2, 10, 100, 10 * 100, 100}, {kTok, 128}, 2, 10, 1, "per_token_group_longer_than_row"},
    {KvView{2, 100, 10, 100 * 10, 10}, {kChan, 48}, 2, 3, 10, "per_channel_ragged_48_on_100"},
    {KvView{2, 100, 10, 100 * 10, 10}, {kChan, 128}, 2, 1, 10, "per_channel_group_longer_than_sequence"},
    {KvView{2, 4099, 96, 4099 * 96, 96}, {kChan, 128}, 2, 33, 96, "per_channel_kivi_ragged_tail"},
    {KvView{2, 100, 10, 100 * 10, 10}, {kChan, 1}, 2, 100, 10, "per_channel_group_1"},
    // [T, H, D] with per-head scales: the scale tensor is [H, ...], whatever the strides.
    {KvView{8, 300, 46, 46, 8 * 46}, {kTok, 0}, 8, 300, 1, "token_head_dim_per_token"},
    {KvView{8, 300, 46, 46, 8 * 46}, {kChan, 0}, 8, 1, 46, "token_head_dim_per_channel"},
    {KvView{1, 1, 8191, 0, 0}, {kTok, 64}, 1, 1, 128, "single_row_8191_group_64"},
};

INSTANTIATE_TEST_SUITE_P(Layouts, ScaleShape, ::testing::ValuesIn(kShapeCases));

TEST(ScaleCount, EmptyViewsHaveNoScales) {
  for (Granularity g : {kTok, kChan})
    for (std::int64_t group : {0, 1, 48}) {
      const QuantSpec s{g, group};
      EXPECT_EQ(kvq::scale_count(KvView{0, 5, 7, 35, 7}, s), 0);
      EXPECT_EQ(kvq::scale_count(KvView{3, 0, 7, 0, 7}, s), 0);
      EXPECT_EQ(kvq::scale_count(KvView{3, 5, 0, 0, 0}, s), 0);
      EXPECT_EQ(kvq::scale_shape(KvView{3, 5, 0, 0, 0}, s).size(), 0);
    }
}

TEST(ScaleCount, GroupHelpers) {
  EXPECT_EQ(kvq::group_count(100, 0), 1);
  EXPECT_EQ(kvq::group_length(100, 0), 100);
  EXPECT_EQ(kvq::group_count(100, 48), 3);
  EXPECT_EQ(kvq::group_length(100, 48), 48);
  EXPECT_EQ(kvq::group_count(100, 100), 1);
  EXPECT_EQ(kvq::group_count(100, 101), 1);
  EXPECT_EQ(kvq::group_length(100, 101), 100);
  EXPECT_EQ(kvq::group_count(96, 32), 3);
  EXPECT_EQ(kvq::group_count(97, 32), 4);
  EXPECT_EQ(kvq::group_count(1, 1), 1);
}

// --- validate() accepts every layout the data model describes ------------------------------------

TEST(Validate, AcceptsTheDocumentedLayouts) {
  const std::int64_t B = 2, H = 8, T = 300, D = 46;
  const QuantSpec s{kTok, 0};
  EXPECT_EQ(kvq::validate(kvq::contiguous_view(T, D), s), cudaSuccess);            // [T, D]
  EXPECT_EQ(kvq::validate(KvView{B * H, T, D, T * D, D}, s), cudaSuccess);        // [B, H, T, D]
  EXPECT_EQ(kvq::validate(KvView{H, T, D, D, H * D}, s), cudaSuccess);            // [T, H, D]
  EXPECT_EQ(kvq::validate(KvView{B, T, D, T * (D + 6) + 3, D + 6}, s), cudaSuccess);  // padded rows
  EXPECT_EQ(kvq::validate(KvView{H, 1, D, D, 0}, s), cudaSuccess);   // one token: its stride is unused
  EXPECT_EQ(kvq::validate(KvView{1, T, D, 0, D}, s), cudaSuccess);   // one matrix: its stride is unused
  // Batch outermost in memory or innermost (per-head, batch_stride < token_stride) are both fine.
  EXPECT_EQ(kvq::validate(KvView{H, T, D, T * H * D, D}, s), cudaSuccess);
}

TEST(Validate, AcceptsAnyGroupIncludingLongerThanTheAxis) {
  const KvView v = kvq::contiguous_view(100, 100);
  for (Granularity g : {kTok, kChan})
    for (std::int64_t group : {0, 1, 3, 48, 99, 100, 101, 1 << 30})
      EXPECT_EQ(kvq::validate(v, QuantSpec{g, group}), cudaSuccess) << group;
}

TEST(Validate, ValidatePointerRules) {
  alignas(8) unsigned char buf[16] = {};
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const float*>(buf)), cudaSuccess);
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const float*>(buf + 4)), cudaSuccess);
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const float*>(buf + 2)), cudaErrorMisalignedAddress);
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const __half*>(buf + 2)), cudaSuccess);
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const __half*>(buf + 3)), cudaErrorMisalignedAddress);
  EXPECT_EQ(kvq::validate_pointer(reinterpret_cast<const std::int8_t*>(buf + 3)), cudaSuccess);  // int8: any address
  EXPECT_EQ(kvq::validate_pointer(static_cast<const float*>(nullptr)), cudaErrorInvalidValue);
}

}  // namespace
