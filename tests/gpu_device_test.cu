// The device blocks of kvq/device.cuh, each against the CPU reference, bit for bit: the row blocks
// (quantize_row / dequantize_row for groups of 8, 16 and 32 lanes, and the _warp forms) on aligned
// rows (16-byte vectors) and misaligned ones (element by element), in 2-D blocks; warp_amax over
// full and partial masks with NaN, Inf and subnormals; the fragment quantize / dequantize under
// scales the host API would sanitize.
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

}  // namespace
}  // namespace kvq::test
