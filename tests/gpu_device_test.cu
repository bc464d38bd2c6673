// The device blocks of kvq/device.cuh, each against the CPU reference, bit for bit: the row blocks
// (quantize_row / dequantize_row for groups of 8, 16 and 32 lanes, and the _warp forms) on aligned
// rows (16-byte vectors) and misaligned ones (element by element), in 2-D blocks; warp_amax over
// full and partial masks with NaN, Inf and subnormals; the fragment quantize / dequantize under
// scales the host API would sanitize; and every other fragment block (load / load_bits / unpack /
// store, per-element-scale quantize and dequantize, quantize_within_amax, code_values, low_bytes,
// amax_bits, count_nonfinite, raw_abs_max and raw_abs_max_into / raw_abs_fold, warp_max_bits) for
// fragments of 1, 2 and 16 bytes' worth of elements.
#include "gpu_exact.cuh"

namespace kvq::test {
namespace {

namespace dev = kvq::device;

__device__ int linear_thread() { return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x; }
__device__ int block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

/// Row r = (global linear thread) / kLanes; its group quantizes it (kWarpForm: quantize_row_warp).
template <int kLanes, bool kWarpForm, class T>
__global__ void quantize_rows(const T* x, std::int64_t rows, std::int64_t n, std::int64_t stride, std::int8_t* q,
                              float* scales, float* returned) {
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * block_threads() + linear_thread()) / kLanes;
  if (row >= rows) return;  // whole groups leave together
  float s;
  if constexpr (kWarpForm)
    s = dev::quantize_row_warp(x + row * stride, n, q + row * stride, scales + row);
  else
    s = dev::quantize_row(dev::RowLanes<kLanes>::this_thread(), x + row * stride, n, q + row * stride, scales + row);
  if (dev::RowLanes<kLanes>::this_thread().lane == kLanes - 1) returned[row] = s;  // every lane gets the scale
}

template <int kLanes, bool kWarpForm, class T>
__global__ void dequantize_rows(const std::int8_t* q, const float* scales, std::int64_t rows, std::int64_t n,
                                std::int64_t stride, T* y) {
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * block_threads() + linear_thread()) / kLanes;
  if (row >= rows) return;
  if constexpr (kWarpForm)
    dev::dequantize_row_warp(q + row * stride, n, scales[row], y + row * stride);
  else
    dev::dequantize_row(dev::RowLanes<kLanes>::this_thread(), q + row * stride, n, scales[row], y + row * stride);
}

template <class T>
class DeviceBlocks : public GpuTest {};
using Types = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(DeviceBlocks, Types);

/// One (lanes, form) of the row blocks on rows of n values at an element offset into the buffers.
template <int kLanes, bool kWarpForm, class T>
void check_rows(std::int64_t n, std::int64_t offset) {
  constexpr std::int64_t kRows = 37;
  const std::int64_t stride = (n + 15) / 16 * 16 + 16;  // keeps each row's start 16-byte aligned
  const std::int64_t storage = kRows * stride + offset;
  const KvView view{1, kRows, n, kRows * stride, stride};
  const QuantSpec per_token{Granularity::kPerToken, 0};
  std::vector<T> x = kv_like_data<T>(storage, n, 7 + n + offset, /*specials=*/true);
  std::vector<std::int8_t> ref_q = poisoned<std::int8_t>(storage, kPoisonCodeByte);
  std::vector<float> ref_s(kRows);
  ASSERT_EQ(reference::quantize(x.data() + offset, view, per_token, ref_q.data() + offset, ref_s.data()), cudaSuccess);
  // Given scales as the host API reads them: two rows get scales that are read as 1.
  std::vector<float> given = ref_s;
  given[3] = -2.0f;
  given[5] = NAN;
  std::vector<T> ref_y = poisoned<T>(storage, kPoisonValueByte);
  ASSERT_EQ(reference::dequantize(ref_q.data() + offset, given.data(), view, per_token, ref_y.data() + offset),
            cudaSuccess);

  DeviceBuffer<T> d_x(storage), d_y(storage);
  DeviceBuffer<std::int8_t> d_q(storage), d_qref(storage);
  DeviceBuffer<float> d_s(kRows), d_ret(kRows), d_given(kRows);
  ASSERT_TRUE(d_x.get() && d_y.get() && d_q.get() && d_qref.get() && d_s.get() && d_ret.get() && d_given.get());
  KVQ_ASSERT_CUDA(d_x.upload(x));
  KVQ_ASSERT_CUDA(d_qref.upload(ref_q));
  KVQ_ASSERT_CUDA(d_given.upload(given));
  KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
  KVQ_ASSERT_CUDA(d_s.poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(d_ret.poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
  const dim3 block(8, 8);  // 2-D: the lane is not threadIdx.x % 32
  const unsigned grid = static_cast<unsigned>((kRows * kLanes + 63) / 64);
  quantize_rows<kLanes, kWarpForm><<<grid, block>>>(d_x.get() + offset, kRows, n, stride, d_q.get() + offset,
                                                    d_s.get(), d_ret.get());
  dequantize_rows<kLanes, kWarpForm><<<grid, block>>>(d_qref.get() + offset, d_given.get(), kRows, n, stride,
                                                      d_y.get() + offset);
  KVQ_ASSERT_CUDA(cudaGetLastError());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<std::int8_t> q;
  std::vector<float> s, ret;
  std::vector<T> y;
  KVQ_ASSERT_CUDA(d_q.download(q));
  KVQ_ASSERT_CUDA(d_s.download(s));
  KVQ_ASSERT_CUDA(d_ret.download(ret));
  KVQ_ASSERT_CUDA(d_y.download(y));
  const std::string what = std::string(kWarpForm ? "_warp" : "") + " lanes " + std::to_string(kLanes) + " n " +
                           std::to_string(n) + " offset " + std::to_string(offset);
  expect_identical(q, ref_q, "quantize_row" + what + ": codes");
  expect_identical(s, ref_s, "quantize_row" + what + ": stored scales");
  expect_identical(ret, ref_s, "quantize_row" + what + ": returned scales");
  expect_identical(y, ref_y, "dequantize_row" + what);
}

TYPED_TEST(DeviceBlocks, RowBlocksMatchTheReference) {
  using T = TypeParam;
  for (std::int64_t n : {1, 7, 64, 100, 128, 256})
    for (std::int64_t offset : {0, 1, 8}) {  // 8 fp16 / bf16 elements: still 16-byte aligned
      check_rows<8, false, T>(n, offset);
      check_rows<16, false, T>(n, offset);
      check_rows<32, false, T>(n, offset);
      check_rows<32, true, T>(n, offset);
      if (::testing::Test::HasFailure()) return;
    }
}

/// Each thread's value through warp_amax over its group of kLanes lanes.
template <int kLanes>
__global__ void group_amax(const float* in, float* out) {
  const int t = blockIdx.x * block_threads() + linear_thread();
  out[t] = dev::warp_amax(in[t], dev::RowLanes<kLanes>::this_thread().mask);
}

template <int kLanes>
void check_warp_amax(const std::vector<float>& in) {
  const int n = static_cast<int>(in.size());
  DeviceBuffer<float> d_in(n), d_out(n);
  ASSERT_TRUE(d_in.get() && d_out.get());
  KVQ_ASSERT_CUDA(d_in.upload(in));
  KVQ_ASSERT_CUDA(d_out.poison(kPoisonScaleByte));
  group_amax<kLanes><<<n / 128, dim3(32, 4)>>>(d_in.get(), d_out.get());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<float> out;
  KVQ_ASSERT_CUDA(d_out.download(out));
  std::vector<float> want(n);
  for (int g = 0; g < n; g += kLanes) {
    std::uint32_t m = 0;  // the largest finite |x| of the group, NaN and Inf ignored
    for (int i = g; i < g + kLanes; ++i) m = std::max(m, finite_abs_bits(in[i]));
    for (int i = g; i < g + kLanes; ++i) want[i] = bits_to_float(m);
  }
  expect_identical(out, want, "warp_amax over " + std::to_string(kLanes) + " lanes");
}

class DeviceBlocksAmax : public GpuTest {};

TEST_F(DeviceBlocksAmax, WarpAmaxOverFullAndPartialMasks) {
  Rng rng(3);
  std::vector<float> in(1024);
  const float specials[] = {NAN, INFINITY, -INFINITY, 1e-40f, -3e-39f, -0.0f, 0.0f};
  for (std::size_t i = 0; i < in.size(); ++i)
    in[i] = (rng.next() % 5 == 0) ? specials[rng.next() % 7] : rng.symmetric() * std::exp2(rng.symmetric() * 60.0f);
  for (int i = 64; i < 72; ++i) in[i] = NAN;  // a group of 8 with no finite value: amax 0
  for (int i = 128; i < 160; ++i) in[i] = (i % 2) ? 1e-40f : -2e-45f;  // subnormals only: kept, not flushed
  check_warp_amax<4>(in);
  check_warp_amax<8>(in);
  check_warp_amax<16>(in);
  check_warp_amax<32>(in);
}

/// Fragment blocks: thread t quantizes its V values under scales[t] and dequantizes its codes.
template <class T>
__global__ void fragments(const T* x, const float* scales, std::int8_t* q, T* y) {
  constexpr int V = 16 / sizeof(T);
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const auto codes = dev::quantize(dev::load<V>(x + t * V), scales[t]);
  dev::store(q + t * V, codes);
  dev::store(y + t * V, dev::dequantize<T>(codes, scales[t]));
}

TYPED_TEST(DeviceBlocks, FragmentBlocksSanitizeScalesAsTheHostApi) {
  using T = TypeParam;
  constexpr int V = 16 / sizeof(T), kThreads = 256;
  Rng rng(5);
  const std::vector<T> x = kv_like_data<T>(kThreads * V, V, 9, /*specials=*/true);
  std::vector<float> scales(kThreads);
  const float odd[] = {0.0f, -1.0f, NAN, INFINITY, 1e-40f, 1e38f, 0x1p-101f, 0x1p127f};
  for (int t = 0; t < kThreads; ++t)
    scales[t] = t % 4 == 0 ? odd[(t / 4) % 8] : std::exp2(rng.symmetric() * 20.0f) / 127.0f;
  std::vector<std::int8_t> want_q(kThreads * V);
  std::vector<T> want_y(kThreads * V);
  for (int i = 0; i < kThreads * V; ++i) {
    const float s = sanitize_scale(scales[i / V]);
    want_q[i] = quantize_value(to_float(x[i]), s);
    want_y[i] = dequantize_value<T>(want_q[i], s);
  }
  DeviceBuffer<T> d_x(kThreads * V), d_y(kThreads * V);
  DeviceBuffer<std::int8_t> d_q(kThreads * V);
  DeviceBuffer<float> d_s(kThreads);
  ASSERT_TRUE(d_x.get() && d_y.get() && d_q.get() && d_s.get());
  KVQ_ASSERT_CUDA(d_x.upload(x));
  KVQ_ASSERT_CUDA(d_s.upload(scales));
  KVQ_ASSERT_CUDA(d_q.poison(kPoisonCodeByte));
  KVQ_ASSERT_CUDA(d_y.poison(kPoisonValueByte));
  fragments<<<1, kThreads>>>(d_x.get(), d_s.get(), d_q.get(), d_y.get());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<std::int8_t> q;
  std::vector<T> y;
  KVQ_ASSERT_CUDA(d_q.download(q));
  KVQ_ASSERT_CUDA(d_y.download(y));
  expect_identical(q, want_q, "device::quantize(fragment, scale)");
  expect_identical(y, want_y, "device::dequantize(fragment, scale)");
}

/// Outputs of fragment_blocks: per element (n = threads * N) and per thread.
template <class T>
struct FragmentOutputs {
  T* loaded;                        // (n) store(load(x))
  T* unpacked;                      // (n) store(unpack(load_bits(x)))
  std::int8_t* codes_each;          // (n) quantize(x, scales, reciprocals)
  std::int8_t* codes_lean;          // (n) quantize_within_amax where it applies (else untouched)
  std::int8_t* low;                 // (n) low_bytes(words)
  float* code_floats;               // (n) code_values(codes)
  T* values_each;                   // (n) dequantize(codes, scales)
  std::uint32_t* amax;              // (threads) amax_bits(x, count)
  std::uint32_t* amax_plain;        // (threads) amax_bits(x)
  unsigned long long* amax_count;   // (threads) 1 + the count amax_bits added
  int* nonfinite;                   // (threads) count_nonfinite(x)
  std::uint32_t* raw;               // (threads) raw_abs_max(x)
  std::uint32_t* raw_pair;          // (threads) raw_abs_fold over x and the neighbour's fragment
  std::uint32_t* warp_max;          // (threads) warp_max_bits(amax) over the full warp
};

/// Thread t applies each fragment block to elements [t * N, t * N + N).
template <int N, class T>
__global__ void fragment_blocks(const T* x, const float* scales, const std::int8_t* codes,
                                const std::uint32_t* words, FragmentOutputs<T> out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int e = t * N;
  const auto f = dev::load<N>(x + e);
  dev::store(out.loaded + e, f);
  dev::store(out.unpacked + e, dev::unpack<T, N>(dev::load_bits<N>(x + e)));

  dev::Fragment<float, N> s, inv;
  for (int i = 0; i < N; ++i) {
    s[i] = sanitize_scale(scales[e + i]);
    inv[i] = reciprocal(s[i]);
  }
  dev::store(out.codes_each + e, dev::quantize<N>(f, s, inv));
  const auto q = dev::load<N>(codes + e);
  const auto floats = dev::code_values(q);  // up to 32 bytes: stored element by element
  for (int i = 0; i < N; ++i) out.code_floats[e + i] = floats[i];
  dev::store(out.values_each + e, dev::dequantize<T>(q, s));
  std::uint32_t w[N];
  for (int i = 0; i < N; ++i) w[i] = words[e + i];
  dev::store(out.low + e, dev::low_bytes<N>(w));

  unsigned long long count = 1;  // amax_bits adds to it
  const std::uint32_t amax = dev::amax_bits(f, count);
  out.amax[t] = amax;
  out.amax_count[t] = count;
  out.amax_plain[t] = dev::amax_bits(f);
  out.nonfinite[t] = dev::count_nonfinite(f);
  out.raw[t] = dev::raw_abs_max(f);
  out.warp_max[t] = dev::warp_max_bits(amax);
  const auto neighbour = dev::load<N>(x + (t ^ 1) * N);
  if constexpr (N * sizeof(T) % 4 == 0) {
    std::uint32_t acc[N * sizeof(T) / 4] = {};
    dev::raw_abs_max_into(acc, f);
    dev::raw_abs_max_into(acc, neighbour);
    out.raw_pair[t] = dev::raw_abs_fold<T>(acc);
  } else {
    out.raw_pair[t] = ::max(dev::raw_abs_max(f), dev::raw_abs_max(neighbour));
  }
  if constexpr (sizeof(T) == 2) {
    const float a = bits_to_float(amax);
    if (dev::count_nonfinite(f) == 0 && lean_codes_apply(a)) {
      dev::Fragment<float, N> ls, linv;
      for (int i = 0; i < N; ++i) {
        ls[i] = scale_from_amax(a);
        linv[i] = reciprocal(ls[i]);
      }
      dev::store(out.codes_lean + e, dev::quantize_within_amax<N>(f, ls, linv));
    }
  }
}

/// |x| as the raw bits of T (the sign bit cleared).
template <class T>
std::uint32_t raw_abs(T x) {
  std::uint32_t b = 0;
  std::memcpy(&b, &x, sizeof(T));
  return b & (sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu);
}

template <int N, class T>
void check_fragment_blocks() {
  constexpr int kThreads = 256, n = kThreads * N;
  Rng rng(11 + N);
  std::vector<T> x = kv_like_data<T>(n, 8, 13 + N, /*specials=*/false);
  const float specials[] = {NAN, INFINITY, -INFINITY, 1e-40f, -3e-39f, 0.0f, 65504.0f, -1e30f};
  for (int t = 0; t < kThreads; ++t) {
    if (t % 5 == 1) x[t * N + rng.next() % N] = from_float<T>(specials[rng.next() % 8]);  // one special
    if (t % 11 == 3)
      for (int i = 0; i < N; ++i) x[t * N + i] = from_float<T>(i % 2 ? 1e-40f : -0.0f);  // subnormal amax
    if (t % 13 == 7)
      for (int i = 0; i < N; ++i) x[t * N + i] = from_float<T>(0.0f);  // amax 0
  }
  std::vector<float> scales(n);
  const float odd[] = {0.0f, -1.0f, NAN, INFINITY, 1e-40f, 1e38f, 0x1p-101f, 0x1p127f};
  for (int i = 0; i < n; ++i) scales[i] = i % 3 == 0 ? odd[(i / 3) % 8] : std::exp2(rng.symmetric() * 20.0f) / 127.0f;
  std::vector<std::int8_t> codes(n);
  std::vector<std::uint32_t> words(n);
  for (int i = 0; i < n; ++i) {
    codes[i] = static_cast<std::int8_t>(i % 256 - 128);  // every code
    words[i] = static_cast<std::uint32_t>(rng.next());
  }

  // What each block must produce, from the numeric contract on the host.
  std::vector<std::int8_t> want_each(n), want_lean = poisoned<std::int8_t>(n, kPoisonCodeByte), want_low(n);
  std::vector<float> want_floats(n);
  std::vector<T> want_values(n);
  std::vector<std::uint32_t> want_amax(kThreads), want_raw(kThreads), want_pair(kThreads), want_warp(kThreads);
  std::vector<unsigned long long> want_count(kThreads);
  std::vector<int> want_nonfinite(kThreads);
  for (int i = 0; i < n; ++i) {
    const float s = sanitize_scale(scales[i]);
    want_each[i] = quantize_value(to_float(x[i]), s);
    want_floats[i] = static_cast<float>(codes[i]);
    want_values[i] = from_float<T>(mul_rn(static_cast<float>(codes[i]), s));
    want_low[i] = static_cast<std::int8_t>(words[i] & 0xffu);
  }
  for (int t = 0; t < kThreads; ++t) {
    std::uint32_t m = 0, raw = 0, raw_neighbour = 0;
    int bad = 0;
    for (int i = 0; i < N; ++i) {
      m = std::max(m, finite_abs_bits(to_float(x[t * N + i])));
      bad += !is_finite(to_float(x[t * N + i]));
      raw = std::max(raw, raw_abs(x[t * N + i]));
      raw_neighbour = std::max(raw_neighbour, raw_abs(x[(t ^ 1) * N + i]));
    }
    want_amax[t] = m;
    want_count[t] = 1 + bad;
    want_nonfinite[t] = bad;
    want_raw[t] = raw;
    want_pair[t] = std::max(raw, raw_neighbour);
    if (sizeof(T) == 2 && bad == 0 && lean_codes_apply(bits_to_float(m)))
      for (int i = 0; i < N; ++i)
        want_lean[t * N + i] = quantize_value(to_float(x[t * N + i]), scale_from_amax(bits_to_float(m)));
  }
  for (int t = 0; t < kThreads; ++t)
    want_warp[t] = *std::max_element(want_amax.begin() + t / 32 * 32, want_amax.begin() + t / 32 * 32 + 32);

  DeviceBuffer<T> d_x(n), d_loaded(n), d_unpacked(n), d_values(n);
  DeviceBuffer<float> d_scales(n), d_floats(n);
  DeviceBuffer<std::int8_t> d_codes(n), d_each(n), d_lean(n), d_low(n);
  DeviceBuffer<std::uint32_t> d_words(n), d_amax(kThreads), d_plain(kThreads), d_raw(kThreads), d_pair(kThreads),
      d_warp(kThreads);
  DeviceBuffer<unsigned long long> d_count(kThreads);
  DeviceBuffer<int> d_nonfinite(kThreads);
  ASSERT_TRUE(d_x.get() && d_loaded.get() && d_unpacked.get() && d_values.get() && d_scales.get() &&
              d_floats.get() && d_codes.get() && d_each.get() && d_lean.get() && d_low.get() && d_words.get() &&
              d_amax.get() && d_plain.get() && d_raw.get() && d_pair.get() && d_warp.get() && d_count.get() &&
              d_nonfinite.get());
  KVQ_ASSERT_CUDA(d_x.upload(x));
  KVQ_ASSERT_CUDA(d_scales.upload(scales));
  KVQ_ASSERT_CUDA(d_codes.upload(codes));
  KVQ_ASSERT_CUDA(d_words.upload(words));
  for (auto* b : {&d_each, &d_lean, &d_low}) KVQ_ASSERT_CUDA(b->poison(kPoisonCodeByte));
  for (auto* b : {&d_loaded, &d_unpacked, &d_values}) KVQ_ASSERT_CUDA(b->poison(kPoisonValueByte));
  for (auto* b : {&d_amax, &d_plain, &d_raw, &d_pair, &d_warp}) KVQ_ASSERT_CUDA(b->poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(d_floats.poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(d_count.poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(d_nonfinite.poison(kPoisonScaleByte));
  const FragmentOutputs<T> out{d_loaded.get(), d_unpacked.get(), d_each.get(),  d_lean.get(), d_low.get(),
                               d_floats.get(), d_values.get(),   d_amax.get(),  d_plain.get(), d_count.get(),
                               d_nonfinite.get(), d_raw.get(),   d_pair.get(),  d_warp.get()};
  fragment_blocks<N><<<2, kThreads / 2>>>(d_x.get(), d_scales.get(), d_codes.get(), d_words.get(), out);
  KVQ_ASSERT_CUDA(cudaGetLastError());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());

  const std::string what = " (N " + std::to_string(N) + ")";
  std::vector<T> got_t;
  std::vector<std::int8_t> got_q;
  std::vector<float> got_f;
  std::vector<std::uint32_t> got_u;
  KVQ_ASSERT_CUDA(d_loaded.download(got_t));
  expect_identical(got_t, x, "load / store" + what);
  KVQ_ASSERT_CUDA(d_unpacked.download(got_t));
  expect_identical(got_t, x, "load_bits / unpack" + what);
  KVQ_ASSERT_CUDA(d_values.download(got_t));
  expect_identical(got_t, want_values, "dequantize(codes, scale fragment)" + what);
  KVQ_ASSERT_CUDA(d_each.download(got_q));
  expect_identical(got_q, want_each, "quantize(x, scale fragment, reciprocals)" + what);
  KVQ_ASSERT_CUDA(d_lean.download(got_q));
  expect_identical(got_q, want_lean, "quantize_within_amax" + what);
  KVQ_ASSERT_CUDA(d_low.download(got_q));
  expect_identical(got_q, want_low, "low_bytes" + what);
  KVQ_ASSERT_CUDA(d_floats.download(got_f));
  expect_identical(got_f, want_floats, "code_values" + what);
  KVQ_ASSERT_CUDA(d_amax.download(got_u));
  expect_identical(got_u, want_amax, "amax_bits(x, count)" + what);
  KVQ_ASSERT_CUDA(d_plain.download(got_u));
  expect_identical(got_u, want_amax, "amax_bits(x)" + what);
  KVQ_ASSERT_CUDA(d_raw.download(got_u));
  expect_identical(got_u, want_raw, "raw_abs_max" + what);
  KVQ_ASSERT_CUDA(d_pair.download(got_u));
  expect_identical(got_u, want_pair, "raw_abs_max_into / raw_abs_fold" + what);
  KVQ_ASSERT_CUDA(d_warp.download(got_u));
  expect_identical(got_u, want_warp, "warp_max_bits" + what);
  std::vector<unsigned long long> got_count;
  KVQ_ASSERT_CUDA(d_count.download(got_count));
  expect_identical(got_count, want_count, "amax_bits' nonfinite count" + what);
  std::vector<int> got_nonfinite;
  KVQ_ASSERT_CUDA(d_nonfinite.download(got_nonfinite));
  expect_identical(got_nonfinite, want_nonfinite, "count_nonfinite" + what);
}

TYPED_TEST(DeviceBlocks, EveryFragmentBlockMatchesTheContract) {
  using T = TypeParam;
  check_fragment_blocks<1, T>();
  check_fragment_blocks<2, T>();
  check_fragment_blocks<16 / sizeof(T), T>();
}

}  // namespace
}  // namespace kvq::test
