// GPU == CPU reference, bit for bit, on rows one head wide with one scale per row (the engines'
// per-(token, head) scheme, detail/row_kernels.cuh), at row counts that make plan_rows choose each
// number of units per thread, in the layouts engines use, and with NaN/Inf and the counter.
#include "gpu_exact.cuh"

#include <set>

namespace kvq::test {
namespace {

using detail::RowPlan;
using detail::RowPolicy;

template <class T>
constexpr int kWidth = 16 / static_cast<int>(sizeof(T));

constexpr QuantSpec kPerRow{Granularity::kPerToken, 0};

/// Row counts that straddle plan_rows' choices for rows of `channels`: a decode step, and just
/// enough rows for each number of units per thread to reach the target thread count.
/// KVQ_TEST_SHAPES=small (the sanitizers) keeps only the decode step unless `all` is set.
template <class T>
std::vector<std::int64_t> straddling_rows(std::int64_t channels, bool all = false) {
  const std::int64_t units = channels / kWidth<T>;
  std::vector<std::int64_t> rows = {37};
  if (small_shapes() && !all) return rows;
  for (std::int64_t u : {1, 2, 4}) {
    const std::int64_t lanes = detail::pow2_ceil(detail::ceil_div(units, u));
    if (lanes <= detail::kWarpSize) rows.push_back(detail::ceil_div(RowPolicy::kTargetThreads, lanes));
  }
  return rows;
}

constexpr detail::RowOp kRowOps[] = {detail::RowOp::kScales, detail::RowOp::kCodes, detail::RowOp::kValues};

/// The units per thread plan_rows gives `view` for `op` (0 when it does not take the view).
template <class T>
int planned_units(const KvView& view, detail::RowOp op) {
  RowPlan p{};
  return detail::plan_rows<RowPolicy>(view, kPerRow, kWidth<T>, op, p) ? p.units_per_thread : 0;
}

/// "scales U4, codes U2, values U2": what each op's kernel runs with on `view`.
template <class T>
std::string plans(const KvView& view) {
  std::string s;
  const char* names[] = {"scales", "codes", "values"};
  for (int i = 0; i < 3; ++i) s += std::string(i ? ", " : "") + names[i] + " U" + std::to_string(planned_units<T>(view, kRowOps[i]));
  return s;
}

/// Head dims engines use, and the widest row the row kernels take.
template <class T>
std::vector<std::int64_t> head_dims() {
  if (small_shapes()) return {128};
  return {64, 80, 96, 128, 256, RowPolicy::kMaxRowUnits * kWidth<T>};
}

template <class T>
class HeadRows : public GpuTest {};
using RowTypes = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(HeadRows, RowTypes);

TYPED_TEST(HeadRows, EveryUnitsPerThreadOnContiguousRows) {
  using T = TypeParam;
  std::set<int> planned[3];  // by op
  std::uint64_t seed = 500;
  for (std::int64_t channels : head_dims<T>()) {
    for (std::int64_t rows : straddling_rows<T>(channels, /*all=*/true)) {
      const KvView view = contiguous_view(rows, channels);
      SCOPED_TRACE("rows=" + std::to_string(rows) + " D=" + std::to_string(channels) + ": " + plans<T>(view));
      for (int i = 0; i < 3; ++i) {
        const int units = planned_units<T>(view, kRowOps[i]);
        ASSERT_NE(units, 0) << "plan_rows must take rows of " << channels << " channels";
        planned[i].insert(units);
      }
      const std::vector<T> x = kv_like_data<T>(view.size(), channels, seed++, /*specials=*/false);
      check_view_exact(view, view.size(), kPerRow, x);
      if (this->HasFailure()) return;
    }
  }
  // The row counts must reach every kernel instantiation that runs: quantize's and codes' 1, 2 and
  // 4 units per thread, and values' 1 and 2.
  EXPECT_EQ(planned[0], (std::set<int>{1, 2, 4})) << "row_scales_kernel";
  EXPECT_EQ(planned[1], (std::set<int>{1, 2, 4})) << "row_apply_kernel, codes";
  EXPECT_EQ(planned[2], (std::set<int>{1, 2})) << "row_apply_kernel, values";
}

// [T, H, D] with one scale per (head, token) (batch = H, interleaved rows) and padded [B, T, D]
// (rows and batches apart by more than a row): strided rows at both ends of the plan.
TYPED_TEST(HeadRows, TokenHeadDimAndPaddedViews) {
  using T = TypeParam;
  constexpr std::int64_t kHeads = 8, kDim = 128, kPad = 16;
  std::uint64_t seed = 600;
  for (std::int64_t rows : straddling_rows<T>(kDim)) {
    const std::int64_t tokens = detail::ceil_div(rows, kHeads);
    const KvView thd{kHeads, tokens, kDim, kDim, kHeads * kDim};
    const KvView padded{2, tokens, kDim, tokens * (kDim + kPad) + kPad, kDim + kPad};
    for (const KvView& view : {thd, padded}) {
      const std::int64_t storage = detail::max_offset(view) + 1;
      SCOPED_TRACE("batch=" + std::to_string(view.batch) + " T=" + std::to_string(tokens) + " token_stride " +
                   std::to_string(view.token_stride) + ": " + plans<T>(view));
      ASSERT_NE(planned_units<T>(view, detail::RowOp::kScales), 0);
      const std::vector<T> x = kv_like_data<T>(storage, view.token_stride, seed++, /*specials=*/false);
      check_view_exact(view, storage, kPerRow, x);
      if (this->HasFailure()) return;
    }
  }
}

// NaN, +-Inf, denormals and zero rows: exact results, and each quantizing call counts every
// non-finite input once.
TYPED_TEST(HeadRows, NonFiniteInputsAndTheCounter) {
  using T = TypeParam;
  constexpr std::int64_t kDim = 128;
  for (std::int64_t rows : straddling_rows<T>(kDim)) {
    const KvView view = contiguous_view(rows, kDim);
    SCOPED_TRACE("rows=" + std::to_string(rows) + ": " + plans<T>(view));
    const std::vector<T> x = kv_like_data<T>(view.size(), kDim, 700 + rows, /*specials=*/true);
    unsigned long long expected = 0;
    for (const T& v : x) expected += !is_finite(to_float(v));
    ASSERT_GT(expected, 0u) << "the data must contain NaN/Inf for this test to mean anything";
    check_view_exact(view, view.size(), kPerRow, x);

    DeviceBuffer<T> d_x(view.size());
    DeviceBuffer<std::int8_t> d_q(view.size());
    DeviceBuffer<float> d_s(view.tokens);
    DeviceBuffer<unsigned long long> d_count(1);
    KVQ_ASSERT_CUDA(d_x.upload(x));
    KVQ_ASSERT_CUDA(d_count.poison(0));
    QuantSpec spec = kPerRow;
    spec.nonfinite_count = d_count.get();
    KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get()));
    KVQ_ASSERT_CUDA(quantize_with_scales(d_x.get(), d_s.get(), view, spec, d_q.get()));
    KVQ_ASSERT_CUDA(compute_scales(d_x.get(), view, spec, d_s.get()));
    std::vector<unsigned long long> count;
    KVQ_ASSERT_CUDA(d_count.download(count));
    EXPECT_EQ(count[0], 3 * expected) << "quantize, quantize_with_scales and compute_scales each count once";
  }
}

}  // namespace
}  // namespace kvq::test
