// tests/gpu_exact.cuh: the GPU paths against the CPU reference, bit for bit.
//
// Every variant, every operation, on every shape of the matrix below, for one dtype per translation
// unit (so nvcc compiles the three in parallel). Outputs are poisoned before every run with values
// no operation produces (NaN scales and values, code -128), and whole buffers are compared byte for
// byte, so an unwritten element, a write outside the view, or a one-ulp difference all fail.
#pragma once

#include <kvq/kvq.cuh>

#include "gpu_test.hpp"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace kvq::test {

/// Asserts that a CUDA call succeeded; the call is made once, and its own error is the one printed.
#define KVQ_ASSERT_CUDA(expr)                                                   \
  do {                                                                          \
    const cudaError_t kvq_assert_err_ = (expr);                                 \
    ASSERT_EQ(kvq_assert_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(kvq_assert_err_); \
  } while (0)

/// Owns n elements of device memory.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (cudaMalloc(&ptr_, bytes() == 0 ? 1 : bytes()) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  std::size_t bytes() const { return n_ * sizeof(T); }
  /// Copies and waits (a pageable copy may return before its DMA lands, and non-blocking streams
  /// do not order themselves after the legacy default stream).
  cudaError_t upload(const std::vector<T>& h) {
    const cudaError_t err = cudaMemcpy(ptr_, h.data(), bytes(), cudaMemcpyHostToDevice);
    return err != cudaSuccess ? err : cudaDeviceSynchronize();
  }
  cudaError_t download(std::vector<T>& h) const {
    h.resize(n_);
    return cudaMemcpy(h.data(), ptr_, bytes(), cudaMemcpyDeviceToHost);
  }
  /// Fills every byte and waits, so work on any stream (non-blocking ones too) sees the poison.
  cudaError_t poison(int byte) {
    const cudaError_t err = cudaMemset(ptr_, byte, bytes());
    return err != cudaSuccess ? err : cudaDeviceSynchronize();
  }

 private:
  T* ptr_ = nullptr;
  std::size_t n_;
};

/// A call captured once into a CUDA graph on a stream of its own (thread-local capture), to be
/// replayed with new contents in the buffers it was given.
class CapturedCall {
 public:
  CapturedCall() = default;
  ~CapturedCall() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  CapturedCall(const CapturedCall&) = delete;
  CapturedCall& operator=(const CapturedCall&) = delete;
  /// Records call(stream) and instantiates it: the call's own error first, then the capture's.
  template <class Call>
  cudaError_t capture(Call&& call) {
    if (cudaError_t err = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); err != cudaSuccess) return err;
    if (cudaError_t err = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal); err != cudaSuccess)
      return err;
    const cudaError_t called = call(stream_);
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph_);
    if (called != cudaSuccess) return called;
    if (ended != cudaSuccess) return ended;
    return cudaGraphInstantiate(&exec_, graph_, 0);
  }
  /// Launches the graph and waits for it.
  cudaError_t replay() {
    const cudaError_t err = cudaGraphLaunch(exec_, stream_);
    return err != cudaSuccess ? err : cudaStreamSynchronize(stream_);
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

constexpr int kPoisonScaleByte = 0xff;  // NaN, which no scale is
constexpr int kPoisonCodeByte = 0x80;   // -128, which no code is
constexpr int kPoisonValueByte = 0xff;  // NaN in fp32, fp16 and bf16

template <class T>
std::vector<T> poisoned(std::size_t n, int byte) {
  std::vector<T> v(n);
  std::memset(static_cast<void*>(v.data()), byte, n * sizeof(T));
  return v;
}

/// splitmix64: fast, reproducible, good enough for test data.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
  float symmetric() { return 2.0f * uniform() - 1.0f; }

 private:
  std::uint64_t s_;
};

/// KV-like data: symmetric values whose magnitude varies by channel (a few outlier channels) and by
/// token, so groups have different scales. With `specials`, about one element in 2000 is NaN, +Inf,
/// -Inf, a denormal or an exact tie candidate, and some whole rows are zero.
template <class T>
std::vector<T> kv_like_data(std::size_t n, std::int64_t channels, std::uint64_t seed, bool specials) {
  std::vector<T> v(n);
  Rng rng(seed);
  const float kinds[] = {NAN, INFINITY, -INFINITY, 1e-40f, -3e-39f, 0.0f};
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t c = static_cast<std::int64_t>(i % static_cast<std::size_t>(channels));
    const float channel_gain = (c % 17 == 5) ? 12.0f : 1.0f + 0.25f * static_cast<float>(c % 7);
    float x = rng.symmetric() * channel_gain * (0.5f + rng.uniform());
    if (specials && rng.next() % 2000 == 0) x = kinds[rng.next() % 6];
    v[i] = from_float<T>(x);
  }
  return v;
}

enum class Layout {
  kContiguous,     // [T, D]
  kTokenHeadDim,   // [T, H, D], one scale set per head (batch = H, interleaved rows)
  kPaddedBatched,  // [B, T, D + 3] with 5 elements between batches: padding must stay untouched
};

inline const char* to_string(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "TD";
    case Layout::kTokenHeadDim: return "THD";
    default: return "padded_BTD";
  }
}

/// The view of a layout and the number of elements its storage spans.
inline KvView make_view(Layout layout, std::int64_t tokens, std::int64_t channels, std::int64_t& storage) {
  switch (layout) {
    case Layout::kContiguous:
      storage = tokens * channels;
      return contiguous_view(tokens, channels);
    case Layout::kTokenHeadDim: {
      constexpr std::int64_t kHeads = 2;
      storage = tokens * kHeads * channels;
      return KvView{kHeads, tokens, channels, channels, kHeads * channels};
    }
    default: {
      constexpr std::int64_t kBatch = 2;
      const std::int64_t ts = channels + 3, bs = tokens * ts + 5;
      storage = kBatch * bs;
      return KvView{kBatch, tokens, channels, bs, ts};
    }
  }
}

/// Shapes that straddle tiles and vectors; KVQ_TEST_SHAPES=small keeps a subset (for the sanitizers).
inline bool small_shapes() {
  const char* s = std::getenv("KVQ_TEST_SHAPES");
  return s != nullptr && std::strcmp(s, "small") == 0;
}
inline std::vector<std::int64_t> test_tokens() {
  if (small_shapes()) return {1, 3, 257};
  return {1, 3, 257, 4099};
}
// 264 and 1000: rows of 33 to 250 vectors, which one warp holds several to a lane (per-token).
inline std::vector<std::int64_t> test_channels() {
  if (small_shapes()) return {1, 46, 130, 264};
  return {1, 46, 64, 96, 128, 130, 264, 1000, 8192};
}

constexpr Variant kAllVariants[] = {Variant::kNaive, Variant::kTiled, Variant::kCoarsened, Variant::kVectorized,
                                    Variant::kAuto};

/// Index of the first differing element, or -1.
template <class E>
std::int64_t first_difference(const std::vector<E>& a, const std::vector<E>& b) {
  if (a.size() != b.size()) return 0;
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(E)) == 0) return -1;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(E)) != 0) return static_cast<std::int64_t>(i);
  return -1;
}

inline double as_double(float x) { return x; }
inline double as_double(std::int8_t x) { return x; }
inline double as_double(int x) { return x; }
inline double as_double(std::uint32_t x) { return x; }
inline double as_double(unsigned long long x) { return static_cast<double>(x); }
inline double as_double(__half x) { return __half2float(x); }
inline double as_double(__nv_bfloat16 x) { return __bfloat162float(x); }

/// Fails the test (without stopping it) when got != want anywhere, naming the first difference.
template <class E>
void expect_identical(const std::vector<E>& got, const std::vector<E>& want, const std::string& what) {
  const std::int64_t i = first_difference(got, want);
  EXPECT_EQ(i, -1) << what << ": first difference at element " << i << ": got "
                   << (i >= 0 ? as_double(got[i]) : 0.0) << ", want " << (i >= 0 ? as_double(want[i]) : 0.0);
}

/// Checks all four operations of every variant on one view against the reference.
template <class T>
void check_view_exact(const KvView& view, std::int64_t storage, const QuantSpec& spec, const std::vector<T>& x,
                      cudaStream_t stream = nullptr) {
  const std::int64_t ns = scale_extent(view, spec);  // gaps of strided scales included: they stay poisoned
  std::vector<float> ref_s = poisoned<float>(ns, kPoisonScaleByte);
  std::vector<std::int8_t> ref_q = poisoned<std::int8_t>(storage, kPoisonCodeByte);
  std::vector<T> ref_y = poisoned<T>(storage, kPoisonValueByte);
  QuantSpec host_spec = spec;
  host_spec.nonfinite_count = nullptr;
  ASSERT_EQ(reference::quantize(x.data(), view, host_spec, ref_q.data(), ref_s.data()), cudaSuccess);
  ASSERT_EQ(reference::dequantize(ref_q.data(), ref_s.data(), view, host_spec, ref_y.data()), cudaSuccess);

  DeviceBuffer<T> d_x(storage), d_y(storage);
  DeviceBuffer<std::int8_t> d_q(storage), d_qref(storage);
  DeviceBuffer<float> d_s(ns), d_sref(ns);
  ASSERT_TRUE(d_x.get() && d_y.get() && d_q.get() && d_qref.get() && d_s.get() && d_sref.get());
  KVQ_ASSERT_CUDA(d_x.upload(x));
  KVQ_ASSERT_CUDA(d_qref.upload(ref_q));
  KVQ_ASSERT_CUDA(d_sref.upload(ref_s));

  std::vector<float> got_s;
  std::vector<std::int8_t> got_q;
  std::vector<T> got_y;
  for (Variant variant : kAllVariants) {
    const std::string tag = std::string(kvq::to_string(variant)) + " ";
    KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
    KVQ_ASSERT_CUDA(d_s.poison(kPoisonScaleByte));
    KVQ_ASSERT_CUDA(quantize(d_x.get(), view, spec, d_q.get(), d_s.get(), variant, stream));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    KVQ_ASSERT_CUDA(d_q.download(got_q));
    KVQ_ASSERT_CUDA(d_s.download(got_s));
    expect_identical(got_s, ref_s, tag + "quantize: scales");
    expect_identical(got_q, ref_q, tag + "quantize: codes");

    KVQ_ASSERT_CUDA(d_s.poison(kPoisonScaleByte));
    KVQ_ASSERT_CUDA(compute_scales(d_x.get(), view, spec, d_s.get(), variant, stream));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    KVQ_ASSERT_CUDA(d_s.download(got_s));
    expect_identical(got_s, ref_s, tag + "compute_scales");

    KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
    KVQ_ASSERT_CUDA(quantize_with_scales(d_x.get(), d_sref.get(), view, spec, d_q.get(), variant, stream));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    KVQ_ASSERT_CUDA(d_q.download(got_q));
    expect_identical(got_q, ref_q, tag + "quantize_with_scales");

    KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
    KVQ_ASSERT_CUDA(dequantize(d_qref.get(), d_sref.get(), view, spec, d_y.get(), variant, stream));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    KVQ_ASSERT_CUDA(d_y.download(got_y));
    expect_identical(got_y, ref_y, tag + "dequantize");
    if (::testing::Test::HasFailure()) return;  // one failing variant says enough for this view
  }
}

/// (granularity, group)
using ExactParam = std::tuple<Granularity, std::int64_t>;

}  // namespace kvq::test

namespace kvq {
/// How gtest (and so ctest's test names) prints a granularity.
inline void PrintTo(Granularity g, std::ostream* os) { *os << to_string(g); }
}  // namespace kvq

namespace kvq::test {

inline std::string exact_param_name(const ::testing::TestParamInfo<ExactParam>& info) {
  return std::string(kvq::to_string(std::get<0>(info.param))) + "_g" + std::to_string(std::get<1>(info.param));
}

/// The parameters of each dtype's Exact* suite: both granularities, with groups of 0 (the whole
/// axis), 32, 100 (not a power of two), 128 and 1024 (the longest one-pass group).
inline auto exact_params() {
  return ::testing::Combine(::testing::Values(Granularity::kPerToken, Granularity::kPerChannel),
                            ::testing::Values<std::int64_t>(0, 32, 100, 128, 1024));
}

/// Every layout x tokens x channels for one dtype, granularity and group.
template <class T>
void check_shape_matrix(Granularity granularity, std::int64_t group) {
  const QuantSpec spec{granularity, group};
  std::uint64_t seed = 1;
  for (Layout layout : {Layout::kContiguous, Layout::kTokenHeadDim, Layout::kPaddedBatched}) {
    for (std::int64_t tokens : test_tokens()) {
      for (std::int64_t channels : test_channels()) {
        std::int64_t storage = 0;
        const KvView view = make_view(layout, tokens, channels, storage);
        std::ostringstream where;
        where << to_string(layout) << " T=" << tokens << " D=" << channels;
        SCOPED_TRACE(where.str());
        const std::vector<T> x = kv_like_data<T>(storage, channels, seed++, /*specials=*/false);
        check_view_exact(view, storage, spec, x);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

}  // namespace kvq::test
