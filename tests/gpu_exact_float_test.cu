// GPU == CPU reference, bit for bit, for float inputs (see gpu_exact.cuh).
#include "gpu_exact.cuh"

namespace kvq::test {
namespace {

class ExactFloat : public GpuTestWithParam<ExactParam> {};

TEST_P(ExactFloat, EveryVariantEveryShapeEveryLayout) {
  check_shape_matrix<float>(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(All, ExactFloat,
                         ::testing::Combine(::testing::Values(Granularity::kPerToken, Granularity::kPerChannel),
                                            ::testing::Values<std::int64_t>(0, 32, 128)),
                         exact_param_name);

}  // namespace
}  // namespace kvq::test
