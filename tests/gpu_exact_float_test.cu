// GPU == CPU reference, bit for bit, for float inputs (see gpu_exact.cuh), exact ties, and the
// shared argument-validation cases on the GPU API (they run without a GPU: validation comes first).
#include "gpu_exact.cuh"
#include "validation_cases.hpp"

// The GPU API behind the shared validation cases (validation_cases.hpp), one type per variant.
template <class T, kvq::Variant kVariant>
struct GpuOps {
  using Elem = T;
  static cudaError_t compute_scales(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s, float* scales) {
    return kvq::compute_scales(x, v, s, scales, kVariant);
  }
  static cudaError_t quantize(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s, std::int8_t* q,
                              float* scales) {
    return kvq::quantize(x, v, s, q, scales, kVariant);
  }
  static cudaError_t quantize_with_scales(const T* x, const float* scales, const kvq::KvView& v,
                                          const kvq::QuantSpec& s, std::int8_t* q) {
    return kvq::quantize_with_scales(x, scales, v, s, q, kVariant);
  }
  static cudaError_t dequantize(const std::int8_t* q, const float* scales, const kvq::KvView& v,
                                const kvq::QuantSpec& s, T* y) {
    return kvq::dequantize(q, scales, v, s, y, kVariant);
  }
};

using GpuTypes = ::testing::Types<GpuOps<float, kvq::Variant::kAuto>, GpuOps<float, kvq::Variant::kNaive>,
                                  GpuOps<float, kvq::Variant::kTiled>, GpuOps<float, kvq::Variant::kCoarsened>,
                                  GpuOps<float, kvq::Variant::kVectorized>>;

namespace kvq::test {
INSTANTIATE_TYPED_TEST_SUITE_P(GpuApi, ValidationCases, GpuTypes);
}  // namespace kvq::test

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

class Ties : public GpuTest {};

// The GPU multiplies by the reciprocal and divides only near a .5 tie (numerics.hpp): exact ties,
// and quotients one and two ulps either side of them, must round exactly as the reference does.
TEST_F(Ties, NearAndOnHalfwayPointsMatchTheReference) {
  constexpr std::int64_t kChannels = 1024;
  std::vector<float> x;
  Rng rng(7);
  for (float step : {1.0f, 0.125f, 0.75f / 127.0f * 127.0f}) {
    for (std::int64_t c = 0; c < kChannels; ++c) {
      const float k = std::floor(rng.symmetric() * 127.0f) + 0.5f;  // a tie of the quotient
      float v = k * step;
      switch (c % 5) {
        case 1: v = std::nextafter(v, INFINITY); break;
        case 2: v = std::nextafter(v, -INFINITY); break;
        case 3: v = std::nextafter(std::nextafter(v, INFINITY), INFINITY); break;
        default: break;
      }
      x.push_back(c == 0 ? 127.0f * step : v);  // c = 0 sets the amax: scale = step exactly
    }
  }
  const KvView view = contiguous_view(static_cast<std::int64_t>(x.size()) / kChannels, kChannels);
  for (std::int64_t group : {std::int64_t{0}, std::int64_t{128}}) {
    SCOPED_TRACE("group " + std::to_string(group));
    check_view_exact(view, view.size(), QuantSpec{Granularity::kPerToken, group}, x);
  }
}

}  // namespace
}  // namespace kvq::test
