// Scales that are not contiguous (QuantSpec::scale_strides): an engine's [H, T_max] scale array
// (capacity, not length), vLLM's [T, H] per token-head order, and rows with gaps. Every variant and
// operation against the CPU reference on the same layout, bit for bit; the gaps between scales start
// poisoned and must stay so (check_view_exact compares the whole scale array).
#include "gpu_exact.cuh"

namespace kvq::test {
namespace {

struct StridedCase {
  Layout layout;
  Granularity granularity;
  std::int64_t group;
  const char* what;
  ScaleStrides (*strides)(const KvView& view, const ScaleShape& shape);
};

const StridedCase kCases[] = {
    {Layout::kTokenHeadDim, Granularity::kPerToken, 0, "per token, [H, T_max] with T_max = T + 7",
     [](const KvView& v, const ScaleShape&) { return ScaleStrides{v.tokens + 7, 1}; }},
    {Layout::kTokenHeadDim, Granularity::kPerToken, 0, "per token, [T, H] (batch stride 1)",
     [](const KvView& v, const ScaleShape&) { return ScaleStrides{1, v.batch}; }},
    {Layout::kPaddedBatched, Granularity::kPerToken, 32, "per token g32, 3 floats after each row",
     [](const KvView&, const ScaleShape& s) { return ScaleStrides{0, s.cols + 3}; }},
    {Layout::kTokenHeadDim, Granularity::kPerChannel, 128, "per channel g128, [H, groups_max, D + 5]",
     [](const KvView&, const ScaleShape& s) { return ScaleStrides{(s.rows + 2) * (s.cols + 5), s.cols + 5}; }},
    {Layout::kPaddedBatched, Granularity::kPerChannel, 0, "per channel whole sequence, 9 floats between batches",
     [](const KvView&, const ScaleShape& s) { return ScaleStrides{s.rows * s.cols + 9, 0}; }},
};

template <class T>
class ScaleStridesExact : public GpuTest {};

using Types = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(ScaleStridesExact, Types);

TYPED_TEST(ScaleStridesExact, EveryVariantMatchesTheReferenceAndLeavesTheGaps) {
  using T = TypeParam;
  std::uint64_t seed = 11;
  const std::vector<std::int64_t> token_counts = small_shapes() ? std::vector<std::int64_t>{3, 257}
                                                                : std::vector<std::int64_t>{3, 257, 4099};
  for (const StridedCase& c : kCases)
    for (std::int64_t tokens : token_counts)
      for (std::int64_t channels : {64, 130, 1000}) {
        std::int64_t storage = 0;
        const KvView view = make_view(c.layout, tokens, channels, storage);
        QuantSpec spec{c.granularity, c.group};
        spec.scale_strides = c.strides(view, scale_shape(view, spec));
        ASSERT_EQ(validate(view, spec), cudaSuccess) << c.what;
        ASSERT_FALSE(detail::contiguous_scales(view, spec)) << c.what << ": the layout is the default one";
        std::ostringstream where;
        where << c.what << ", " << to_string(c.layout) << " T=" << tokens << " D=" << channels;
        SCOPED_TRACE(where.str());
        check_view_exact(view, storage, spec, kv_like_data<T>(storage, channels, seed++, /*specials=*/true));
        if (::testing::Test::HasFailure()) return;
      }
}

}  // namespace
}  // namespace kvq::test
