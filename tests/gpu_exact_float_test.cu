// GPU == CPU reference, bit for bit, for float inputs (see gpu_exact.cuh), exact ties, and the
// shared argument-validation cases on the GPU API (they run without a GPU: validation comes first).
#include "gpu_exact.cuh"
#include "validation_cases.hpp"

// The GPU API behind the shared validation cases (validation_cases.hpp): quantize.cuh's functions,
// and study.cuh's once per variant.
template <class T>
struct GpuOps {
  using Elem = T;
  static cudaError_t compute_scales(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s, float* scales) {
    return kvq::compute_scales(x, v, s, scales);
  }
  static cudaError_t quantize(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s, std::int8_t* q,
                              float* scales) {
    return kvq::quantize(x, v, s, q, scales);
  }
  static cudaError_t quantize_with_scales(const T* x, const float* scales, const kvq::KvView& v,
                                          const kvq::QuantSpec& s, std::int8_t* q) {
    return kvq::quantize_with_scales(x, scales, v, s, q);
  }
  static cudaError_t dequantize(const std::int8_t* q, const float* scales, const kvq::KvView& v,
                                const kvq::QuantSpec& s, T* y) {
    return kvq::dequantize(q, scales, v, s, y);
  }
};

template <class T, kvq::Variant kVariant>
struct GpuStudyOps {
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

using GpuTypes = ::testing::Types<GpuOps<float>, GpuOps<__half>, GpuOps<__nv_bfloat16>,
                                  GpuStudyOps<float, kvq::Variant::kAuto>, GpuStudyOps<float, kvq::Variant::kNaive>,
                                  GpuStudyOps<float, kvq::Variant::kTiled>, GpuStudyOps<float, kvq::Variant::kCoarsened>,
                                  GpuStudyOps<float, kvq::Variant::kVectorized>>;

namespace kvq::test {
INSTANTIATE_TYPED_TEST_SUITE_P(GpuApi, ValidationCases, GpuTypes);
}  // namespace kvq::test

namespace kvq::test {
namespace {

class ExactFloat : public GpuTestWithParam<ExactParam> {};

TEST_P(ExactFloat, EveryVariantEveryShapeEveryLayout) {
  check_shape_matrix<float>(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(All, ExactFloat, exact_params(), exact_param_name);

class Ties : public GpuTest {};

// The GPU multiplies by the reciprocal and corrects the quotient with two FMA steps (numerics.hpp):
// exact ties, and quotients one and two ulps either side of them, must round exactly as the
// reference's division does.
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

// Given scales anywhere in fp32: denormal, on and next to the edges of the reciprocal's fast range
// (2^-100 and 2^126, where quantize_by_reciprocal hands over to the division), huge, and not
// positive-finite (read as 1). Per-channel scales, one per channel, so every fragment mixes them;
// inputs span the whole fp32 range with NaN and Inf, and include ties of every scale.
template <class T>
void check_given_scales_across_the_range() {
  const float edges[] = {0x1p-149f, 0x1.8p-127f, 0x1p-101f, std::nextafter(0x1p-100f, 0.0f), 0x1p-100f,
                         std::nextafter(0x1p-100f, 1.0f), 1e-30f, 1.0f / 127.0f, 1.0f, 3.0f, 1e30f,
                         std::nextafter(0x1p126f, 0.0f), 0x1p126f, std::nextafter(0x1p126f, INFINITY), 0x1p127f,
                         3.4e38f, 0.0f, -1.0f, NAN, INFINITY};
  constexpr std::int64_t kChannels = 8 * 20, kTokens = 96;  // whole vectors, every edge in every unit
  std::vector<float> scales(kChannels);
  for (std::int64_t c = 0; c < kChannels; ++c) scales[c] = edges[(c * 7) % 20];
  std::vector<T> x(kTokens * kChannels);
  Rng rng(11);
  for (std::int64_t t = 0; t < kTokens; ++t)
    for (std::int64_t c = 0; c < kChannels; ++c) {
      const float s = sanitize_scale(scales[c]);
      float v;
      switch (rng.next() % 4) {
        case 0: v = (std::floor(rng.symmetric() * 130.0f) + 0.5f) * s; break;  // a tie (or next to it)
        case 1: v = rng.symmetric() * 140.0f * s; break;                       // codes, some saturating
        case 2: v = std::ldexp(rng.symmetric(), static_cast<int>(rng.next() % 270) - 140); break;
        default: v = (rng.next() % 50 == 0) ? NAN : std::ldexp(rng.symmetric(), 127 - static_cast<int>(rng.next() % 8));
      }
      x[t * kChannels + c] = from_float<T>(v);
    }
  const KvView view = contiguous_view(kTokens, kChannels);
  const QuantSpec spec{Granularity::kPerChannel, 0};
  std::vector<std::int8_t> want(x.size());
  ASSERT_EQ(reference::quantize_with_scales(x.data(), scales.data(), view, spec, want.data()), cudaSuccess);
  DeviceBuffer<T> d_x(x.size());
  DeviceBuffer<float> d_s(scales.size());
  DeviceBuffer<std::int8_t> d_q(x.size());
  KVQ_ASSERT_CUDA(d_x.upload(x));
  KVQ_ASSERT_CUDA(d_s.upload(scales));
  for (Variant variant : kAllVariants) {
    SCOPED_TRACE(to_string(variant));
    KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
    KVQ_ASSERT_CUDA(quantize_with_scales(d_x.get(), d_s.get(), view, spec, d_q.get(), variant));
    std::vector<std::int8_t> got;
    KVQ_ASSERT_CUDA(d_q.download(got));
    expect_identical(got, want, "codes");
  }
}

// Scales computed from the data below the reciprocal's fast range (amax / 127 < 2^-100), at its
// edge, and of denormal data: those groups must take the division, the others the FMA path.
TEST_F(Ties, ComputedScalesOfTinyGroups) {
  constexpr std::int64_t kChannels = 1024, kTokens = 12;
  const int exponents[kTokens] = {-80, -92, -93, -94, -95, -100, -110, -120, -126, -130, -140, -148};
  std::vector<float> x(kTokens * kChannels);
  Rng rng(5);
  for (std::int64_t t = 0; t < kTokens; ++t)
    for (std::int64_t c = 0; c < kChannels; ++c) {
      const float k = std::floor(rng.symmetric() * 127.0f) + 0.5f;  // ties of a unit scale, then scaled
      x[t * kChannels + c] = std::ldexp(c == 0 ? 127.0f : k, exponents[t]);
    }
  const KvView view = contiguous_view(kTokens, kChannels);
  for (const QuantSpec& spec : {QuantSpec{Granularity::kPerToken, 0}, QuantSpec{Granularity::kPerToken, 32},
                                QuantSpec{Granularity::kPerChannel, 0}, QuantSpec{Granularity::kPerChannel, 4}}) {
    SCOPED_TRACE(std::string(to_string(spec.granularity)) + " group " + std::to_string(spec.group));
    check_view_exact(view, view.size(), spec, x);
  }
}

TEST_F(Ties, GivenScalesAcrossTheWholeFloatRange) {
  check_given_scales_across_the_range<float>();
  check_given_scales_across_the_range<__nv_bfloat16>();
}

constexpr int kStoreUnits = 64;  // threads of store_rows: units of 4 floats per row

/// device::store of 16-byte fragments, one row per block: to global memory at a row stride known
/// only at run time (the kind of address where nvcc split the store, now device::store's vector
/// instruction), and to shared memory (its plain path), copied out after a barrier.
__global__ void store_rows(const std::int8_t* q,     // (rows, stride)
                           const float* scales,      // (rows)
                           std::int64_t stride,
                           float* y_global,          // (rows, stride)
                           float* y_shared) {        // (rows, stride)
  __shared__ alignas(16) float staged[4 * kStoreUnits];
  const std::int64_t row = blockIdx.x, at = row * stride + 4 * threadIdx.x;
  const auto values = device::dequantize<float>(device::load<4>(q + at), scales[row]);
  device::store<4>(y_global + at, values);
  device::store<4>(staged + 4 * threadIdx.x, values);
  __syncthreads();
  for (int i = 0; i < 4; ++i) y_shared[at + i] = staged[4 * threadIdx.x + i];
}

class DeviceApi : public GpuTest {};

// Both destinations must hold the reference's values, and the padding past each row nothing.
TEST_F(DeviceApi, StoreOfSixteenBytesToGlobalAndSharedMemory) {
  constexpr std::int64_t kRows = 7, kChannels = 4 * kStoreUnits, kStride = kChannels + 12;
  const KvView view{1, kRows, kChannels, kRows * kStride, kStride};
  const QuantSpec per_token{Granularity::kPerToken, 0};
  std::vector<std::int8_t> q(kRows * kStride);
  Rng rng(3);
  for (auto& code : q) code = static_cast<std::int8_t>(static_cast<int>(rng.next() % 255) - 127);
  const std::vector<float> scales = {1.0f / 127, 3.5f, 0x1p-120f, 0.0f, -2.0f, NAN, 7e30f};  // 0, -2, NaN: read as 1
  std::vector<float> want = poisoned<float>(q.size(), kPoisonValueByte);
  ASSERT_EQ(reference::dequantize(q.data(), scales.data(), view, per_token, want.data()), cudaSuccess);
  DeviceBuffer<std::int8_t> d_q(q.size());
  DeviceBuffer<float> d_s(scales.size()), d_global(q.size()), d_shared(q.size());
  KVQ_ASSERT_CUDA(d_q.upload(q));
  KVQ_ASSERT_CUDA(d_s.upload(scales));
  KVQ_ASSERT_CUDA(d_global.poison(kPoisonValueByte));
  KVQ_ASSERT_CUDA(d_shared.poison(kPoisonValueByte));
  store_rows<<<kRows, kStoreUnits>>>(d_q.get(), d_s.get(), kStride, d_global.get(), d_shared.get());
  KVQ_ASSERT_CUDA(cudaGetLastError());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<float> got;
  KVQ_ASSERT_CUDA(d_global.download(got));
  expect_identical(got, want, "global memory");
  KVQ_ASSERT_CUDA(d_shared.download(got));
  expect_identical(got, want, "shared memory");
}

}  // namespace
}  // namespace kvq::test
