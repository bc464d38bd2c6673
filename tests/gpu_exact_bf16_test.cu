// GPU == CPU reference, bit for bit, for __nv_bfloat16 inputs (see gpu_exact.cuh).
#include "gpu_exact.cuh"

namespace kvq::test {
namespace {

class ExactBf16 : public GpuTestWithParam<ExactParam> {};

TEST_P(ExactBf16, EveryVariantEveryShapeEveryLayout) {
  check_shape_matrix<__nv_bfloat16>(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(All, ExactBf16, exact_params(), exact_param_name);

}  // namespace
}  // namespace kvq::test
