// GPU == CPU reference, bit for bit, for __half inputs (see gpu_exact.cuh), and the host API's
// contract: offsets, streams, graph capture, NaN/Inf and the non-finite counter, argument
// validation, and the opt-in tensor of more than 2^31 elements.
#include "gpu_exact.cuh"

#include <algorithm>
#include <utility>

namespace kvq::test {
namespace {

class ExactHalf : public GpuTestWithParam<ExactParam> {};

TEST_P(ExactHalf, EveryVariantEveryShapeEveryLayout) {
  check_shape_matrix<__half>(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(All, ExactHalf, exact_params(), exact_param_name);

const QuantSpec kSpecs[] = {{Granularity::kPerToken, 0},
                            {Granularity::kPerToken, 32},
                            {Granularity::kPerChannel, 0},
                            {Granularity::kPerChannel, 32}};

class HostApi : public GpuTest {};

// Every operand shifted by 2, 4 and 8 bytes from a 256-byte boundary (and codes by 1..8 bytes):
// vector widths must drop to what the alignment allows, and nothing may fault.
TEST_F(HostApi, PointersOffsetByTwoFourEightBytes) {
  constexpr std::int64_t kTokens = 257, kChannels = 128, kPad = 16;
  const KvView view = contiguous_view(kTokens, kChannels);
  const std::int64_t n = view.size();
  const std::vector<__half> x = kv_like_data<__half>(n, kChannels, 11, false);
  DeviceBuffer<__half> d_x(n + kPad), d_y(n + kPad);
  DeviceBuffer<std::int8_t> d_q(n + kPad);
  DeviceBuffer<float> d_s(kTokens * kChannels);
  for (const QuantSpec& spec : kSpecs) {
    const std::int64_t ns = scale_count(view, spec);
    std::vector<float> ref_s(ns);
    std::vector<std::int8_t> ref_q(n);
    std::vector<__half> ref_y(n);
    ASSERT_EQ(reference::quantize(x.data(), view, spec, ref_q.data(), ref_s.data()), cudaSuccess);
    ASSERT_EQ(reference::dequantize(ref_q.data(), ref_s.data(), view, spec, ref_y.data()), cudaSuccess);
    for (int x_bytes : {2, 4, 8}) {
      for (int q_bytes : {1, 2, 4, 8}) {
        SCOPED_TRACE("x+" + std::to_string(x_bytes) + "B q+" + std::to_string(q_bytes) + "B " +
                     kvq::to_string(spec.granularity) + " g" + std::to_string(spec.group));
        __half* xp = d_x.get() + x_bytes / 2;
        __half* yp = d_y.get() + x_bytes / 2;
        std::int8_t* qp = d_q.get() + q_bytes;
        KVQ_ASSERT_CUDA(cudaMemcpy(xp, x.data(), n * sizeof(__half), cudaMemcpyHostToDevice));
        for (Variant variant : kAllVariants) {
          SCOPED_TRACE(kvq::to_string(variant));
          KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
          KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
          KVQ_ASSERT_CUDA(quantize(xp, view, spec, qp, d_s.get(), variant));
          KVQ_ASSERT_CUDA(dequantize(qp, d_s.get(), view, spec, yp, variant));
          KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
          std::vector<std::int8_t> got_q(n);
          std::vector<__half> got_y(n);
          std::vector<float> got_s(ns);
          KVQ_ASSERT_CUDA(cudaMemcpy(got_q.data(), qp, n, cudaMemcpyDeviceToHost));
          KVQ_ASSERT_CUDA(cudaMemcpy(got_y.data(), yp, n * sizeof(__half), cudaMemcpyDeviceToHost));
          KVQ_ASSERT_CUDA(cudaMemcpy(got_s.data(), d_s.get(), ns * sizeof(float), cudaMemcpyDeviceToHost));
          expect_identical(got_s, ref_s, "scales");
          expect_identical(got_q, ref_q, "codes");
          expect_identical(got_y, ref_y, "values");
          if (HasFailure()) return;
        }
      }
    }
  }
}

TEST_F(HostApi, NonDefaultStream) {
  cudaStream_t stream;
  KVQ_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::int64_t storage = 0;
  const KvView view = make_view(Layout::kTokenHeadDim, 257, 130, storage);
  const std::vector<__half> x = kv_like_data<__half>(storage, 130, 21, false);
  for (const QuantSpec& spec : kSpecs) check_view_exact(view, storage, spec, x, stream);
  KVQ_ASSERT_CUDA(cudaStreamDestroy(stream));
}

// The API neither allocates nor synchronizes, so a whole quantize + dequantize (the two-pass
// per-channel path included: memset, amax, finalize, codes) can be captured and replayed, and a
// replay sees new input data.
TEST_F(HostApi, CapturedIntoACudaGraphAndReplayed) {
  constexpr std::int64_t kTokens = 1000, kChannels = 96;
  const KvView view = contiguous_view(kTokens, kChannels);
  const std::int64_t n = view.size();
  for (const QuantSpec& spec : kSpecs) {
    SCOPED_TRACE(std::string(kvq::to_string(spec.granularity)) + " g" + std::to_string(spec.group));
    const std::int64_t ns = scale_count(view, spec);
    DeviceBuffer<__half> d_x(n), d_y(n);
    DeviceBuffer<std::int8_t> d_q(n);
    DeviceBuffer<float> d_s(ns);
    cudaStream_t stream;
    KVQ_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    KVQ_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const cudaError_t q_err = quantize(d_x.get(), view, spec, d_q.get(), d_s.get(), Variant::kAuto, stream);
    const cudaError_t d_err = dequantize(d_q.get(), d_s.get(), view, spec, d_y.get(), Variant::kAuto, stream);
    KVQ_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
    KVQ_ASSERT_CUDA(q_err);
    KVQ_ASSERT_CUDA(d_err);
    cudaGraphExec_t exec;
    KVQ_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    for (std::uint64_t replay = 0; replay < 2; ++replay) {
      const std::vector<__half> x = kv_like_data<__half>(n, kChannels, 100 + replay, false);
      std::vector<float> ref_s(ns);
      std::vector<std::int8_t> ref_q(n);
      std::vector<__half> ref_y(n);
      ASSERT_EQ(reference::quantize(x.data(), view, spec, ref_q.data(), ref_s.data()), cudaSuccess);
      ASSERT_EQ(reference::dequantize(ref_q.data(), ref_s.data(), view, spec, ref_y.data()), cudaSuccess);
      KVQ_ASSERT_CUDA(d_x.upload(x));
      KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
      KVQ_ASSERT_CUDA(d_s.poison(kPoisonScaleByte));
      KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
      KVQ_ASSERT_CUDA(cudaGraphLaunch(exec, stream));
      KVQ_ASSERT_CUDA(cudaStreamSynchronize(stream));
      std::vector<float> got_s;
      std::vector<std::int8_t> got_q;
      std::vector<__half> got_y;
      KVQ_ASSERT_CUDA(d_s.download(got_s));
      KVQ_ASSERT_CUDA(d_q.download(got_q));
      KVQ_ASSERT_CUDA(d_y.download(got_y));
      expect_identical(got_s, ref_s, "scales");
      expect_identical(got_q, ref_q, "codes");
      expect_identical(got_y, ref_y, "values");
    }
    KVQ_ASSERT_CUDA(cudaGraphExecDestroy(exec));
    KVQ_ASSERT_CUDA(cudaGraphDestroy(graph));
    KVQ_ASSERT_CUDA(cudaStreamDestroy(stream));
  }
}

// NaN, +-Inf, denormals and zero rows, on every variant; and the counter sees each non-finite
// input exactly once per call. 130 channels take the tile kernels; 128 and 1024 contiguous
// channels take the whole-vector kernels (rows within a warp, and rows across warps).
TEST_F(HostApi, NonFiniteInputsAndTheCounter) {
  for (const auto& [layout, channels] : {std::pair{Layout::kContiguous, std::int64_t{130}},
                                         std::pair{Layout::kPaddedBatched, std::int64_t{130}},
                                         std::pair{Layout::kContiguous, std::int64_t{128}},
                                         std::pair{Layout::kTokenHeadDim, std::int64_t{1024}}}) {
    std::int64_t storage = 0;
    const KvView view = make_view(layout, 4099, channels, storage);
    const std::vector<__half> x = kv_like_data<__half>(storage, channels, 31, /*specials=*/true);
    unsigned long long expected = 0;
    for (std::int64_t b = 0; b < view.batch; ++b)
      for (std::int64_t t = 0; t < view.tokens; ++t)
        for (std::int64_t c = 0; c < view.channels; ++c) expected += !is_finite(to_float(x[view.offset(b, t, c)]));
    ASSERT_GT(expected, 0u) << "the data must contain NaN/Inf for this test to mean anything";

    DeviceBuffer<unsigned long long> d_count(1);
    for (QuantSpec spec : kSpecs) {
      SCOPED_TRACE(std::string(to_string(layout)) + " D=" + std::to_string(channels) + " " +
                   kvq::to_string(spec.granularity) + " g" + std::to_string(spec.group));
      check_view_exact(view, storage, spec, x);
      const std::int64_t ns = scale_count(view, spec);
      DeviceBuffer<__half> d_x(storage);
      DeviceBuffer<std::int8_t> d_q(storage);
      DeviceBuffer<float> d_s(ns);
      KVQ_ASSERT_CUDA(d_x.upload(x));
      spec.nonfinite_count = d_count.get();
      for (Variant variant : kAllVariants) {
        SCOPED_TRACE(kvq::to_string(variant));
        KVQ_ASSERT_CUDA(d_count.poison(0));
        KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get(), variant));
        KVQ_ASSERT_CUDA(quantize_with_scales(d_x.get(), d_s.get(), view, spec, d_q.get(), variant));
        KVQ_ASSERT_CUDA(compute_scales(d_x.get(), view, spec, d_s.get(), variant));
        std::vector<unsigned long long> count;
        KVQ_ASSERT_CUDA(d_count.download(count));
        EXPECT_EQ(count[0], 3 * expected) << "quantize, quantize_with_scales and compute_scales each count once";
      }
    }
  }
}

TEST_F(HostApi, AllZeroInputHasUnitScalesZeroCodesExactZeros) {
  const KvView view = contiguous_view(300, 70);
  const std::int64_t n = view.size();
  DeviceBuffer<__half> d_x(n), d_y(n);
  DeviceBuffer<std::int8_t> d_q(n);
  DeviceBuffer<float> d_s(n);
  KVQ_ASSERT_CUDA(d_x.poison(0));
  for (const QuantSpec& spec : kSpecs) {
    for (Variant variant : kAllVariants) {
      KVQ_ASSERT_CUDA(d_s.poison(kPoisonScaleByte));  // only the first scale_count are written
      KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
      KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
      KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get(), variant));
      KVQ_ASSERT_CUDA(dequantize(d_q.get(), d_s.get(), view, spec, d_y.get(), variant));
      std::vector<float> s;
      std::vector<std::int8_t> q;
      std::vector<__half> y;
      KVQ_ASSERT_CUDA(d_s.download(s));
      KVQ_ASSERT_CUDA(d_q.download(q));
      KVQ_ASSERT_CUDA(d_y.download(y));
      const std::int64_t ns = scale_count(view, spec);
      EXPECT_TRUE(std::all_of(s.begin(), s.begin() + ns, [](float v) { return v == 1.0f; }));
      EXPECT_TRUE(std::all_of(q.begin(), q.end(), [](std::int8_t v) { return v == 0; }));
      EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](__half v) { return float_bits(__half2float(v)) == 0u; }));
    }
  }
}

TEST_F(HostApi, EmptyTensorIsANoOpOnTheGpu) {
  for (const KvView& view : {KvView{1, 0, 128, 0, 128}, KvView{0, 5, 5, 25, 5}, KvView{2, 4, 0, 0, 0}}) {
    EXPECT_EQ(quantize<__half>(nullptr, view, kSpecs[0], nullptr, nullptr), cudaSuccess);
    EXPECT_EQ(dequantize<__half>(nullptr, nullptr, view, kSpecs[2], nullptr), cudaSuccess);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// Validation happens before any CUDA call, so this needs no GPU: it runs (and must pass) everywhere.
// Host buffers stand in for device pointers; had anything been touched, they would differ.
TEST(HostApiValidation, BadArgumentsReturnTheirErrorAndTouchNothing) {
  const KvView view = contiguous_view(8, 16);
  const QuantSpec spec{Granularity::kPerToken, 0};
  alignas(16) __half x[8 * 16 + 8];
  alignas(16) __half y[8 * 16 + 8];
  alignas(16) std::int8_t q[8 * 16 + 8];
  alignas(16) float s[64];
  std::memset(static_cast<void*>(y), 0x5a, sizeof(y));
  std::memset(q, 0x5a, sizeof(q));
  std::memset(s, 0x5a, sizeof(s));
  const auto untouched = [&] {
    for (std::size_t i = 0; i < sizeof(q); ++i)
      if (static_cast<unsigned char>(q[i]) != 0x5a) return false;
    const unsigned char* yb = reinterpret_cast<const unsigned char*>(y);
    const unsigned char* sb = reinterpret_cast<const unsigned char*>(s);
    return std::all_of(yb, yb + sizeof(y), [](unsigned char c) { return c == 0x5a; }) &&
           std::all_of(sb, sb + sizeof(s), [](unsigned char c) { return c == 0x5a; });
  };
  const __half* x_odd = reinterpret_cast<const __half*>(reinterpret_cast<const char*>(x) + 1);
  const float* s_odd = reinterpret_cast<const float*>(reinterpret_cast<const char*>(s) + 2);

  EXPECT_EQ(quantize<__half>(nullptr, view, spec, q, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, view, spec, nullptr, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, view, spec, q, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(compute_scales<__half>(x, view, spec, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(quantize_with_scales<__half>(x, nullptr, view, spec, q), cudaErrorInvalidValue);
  EXPECT_EQ(dequantize<__half>(q, s, view, spec, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x_odd, view, spec, q, s), cudaErrorMisalignedAddress);
  EXPECT_EQ(dequantize<__half>(q, s_odd, view, spec, y), cudaErrorMisalignedAddress);
  EXPECT_EQ(quantize<__half>(x, KvView{1, -1, 16, 0, 16}, spec, q, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, KvView{1, 8, 16, 128, 15}, spec, q, s), cudaErrorInvalidValue);  // rows overlap
  EXPECT_EQ(quantize<__half>(x, KvView{2, 8, 16, 64, 16}, spec, q, s), cudaErrorInvalidValue);   // batches overlap
  EXPECT_EQ(quantize<__half>(x, KvView{1, INT64_MAX, 16, 0, 16}, spec, q, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, view, QuantSpec{Granularity::kPerToken, -1}, q, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, view, QuantSpec{static_cast<Granularity>(7), 0}, q, s), cudaErrorInvalidValue);
  EXPECT_EQ(quantize<__half>(x, view, spec, q, s, static_cast<Variant>(42)), cudaErrorInvalidValue);
  EXPECT_TRUE(untouched());
}

// Opt-in (KVQ_TEST_LARGE=1; about 11 GB of device memory): a tensor of more than 2^31 elements,
// so every index that multiplies sizes must be 64-bit. Checked against the reference on sampled
// rows (per-token) and on every scale (per-channel over the whole sequence).
TEST_F(HostApi, LargeTensorPastTwoToThe31Elements) {
  const char* flag = std::getenv("KVQ_TEST_LARGE");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) GTEST_SKIP() << "set KVQ_TEST_LARGE=1 to run (needs ~11 GB)";
  constexpr std::int64_t kTokens = (std::int64_t{1} << 18) + 1, kChannels = 8192;
  const KvView view = contiguous_view(kTokens, kChannels);
  const std::int64_t n = view.size();
  ASSERT_GT(n, std::int64_t{1} << 31);
  const std::vector<__half> x = kv_like_data<__half>(n, kChannels, 41, false);
  DeviceBuffer<__half> d_x(n), d_y(n);
  DeviceBuffer<std::int8_t> d_q(n);
  DeviceBuffer<float> d_s(kTokens);
  ASSERT_TRUE(d_x.get() && d_y.get() && d_q.get() && d_s.get()) << "not enough device memory";
  KVQ_ASSERT_CUDA(d_x.upload(x));

  const std::vector<std::int64_t> rows = {0, 1, 4095, 262143, 262144, kTokens / 2, kTokens - 2, kTokens - 1};
  const auto check_rows = [&](const QuantSpec& spec, const std::vector<float>& scales_all, std::int64_t scale_row_len) {
    for (std::int64_t r : rows) {
      SCOPED_TRACE("row " + std::to_string(r));
      std::vector<std::int8_t> got_q(kChannels), ref_q(kChannels);
      std::vector<__half> got_y(kChannels), ref_y(kChannels);
      KVQ_ASSERT_CUDA(cudaMemcpy(got_q.data(), d_q.get() + r * kChannels, kChannels, cudaMemcpyDeviceToHost));
      KVQ_ASSERT_CUDA(cudaMemcpy(got_y.data(), d_y.get() + r * kChannels, kChannels * 2, cudaMemcpyDeviceToHost));
      const float* row_scales = spec.granularity == Granularity::kPerToken ? &scales_all[r * scale_row_len]
                                                                           : scales_all.data();
      const KvView row_view = contiguous_view(1, kChannels);
      ASSERT_EQ(reference::quantize_with_scales(x.data() + r * kChannels, row_scales, row_view, spec, ref_q.data()),
                cudaSuccess);
      ASSERT_EQ(reference::dequantize(ref_q.data(), row_scales, row_view, spec, ref_y.data()), cudaSuccess);
      expect_identical(got_q, ref_q, "codes");
      expect_identical(got_y, ref_y, "values");
    }
  };

  {  // per-token, one pass
    const QuantSpec spec{Granularity::kPerToken, 0};
    KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get()));
    KVQ_ASSERT_CUDA(dequantize(d_q.get(), d_s.get(), view, spec, d_y.get()));
    std::vector<float> got_s;
    KVQ_ASSERT_CUDA(d_s.download(got_s));
    for (std::int64_t r : rows) {
      float want = 0;
      ASSERT_EQ(reference::compute_scales(x.data() + r * kChannels, contiguous_view(1, kChannels), spec, &want),
                cudaSuccess);
      EXPECT_EQ(float_bits(got_s[r]), float_bits(want)) << "row " << r;
    }
    check_rows(spec, got_s, 1);
  }
  {  // per-channel over the whole sequence, two passes
    const QuantSpec spec{Granularity::kPerChannel, 0};
    KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get()));
    KVQ_ASSERT_CUDA(dequantize(d_q.get(), d_s.get(), view, spec, d_y.get()));
    std::vector<float> got_s(kChannels), ref_s(kChannels);
    KVQ_ASSERT_CUDA(cudaMemcpy(got_s.data(), d_s.get(), kChannels * sizeof(float), cudaMemcpyDeviceToHost));
    ASSERT_EQ(reference::compute_scales(x.data(), view, spec, ref_s.data()), cudaSuccess);
    expect_identical(got_s, ref_s, "per-channel scales");
    check_rows(spec, got_s, 0);
  }
}

}  // namespace
}  // namespace kvq::test
