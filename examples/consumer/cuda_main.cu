// The CUDA side of an engine's use of kvq: one .cu file that calls the host API and a device block,
// compiled by nvcc in the consumer's own target. Without a GPU it checks what needs none (a
// rejected call touches nothing, an empty call succeeds); with one it quantizes a few rows both
// ways and compares them with the CPU reference, bit for bit.
#include <kvq/device.cuh>
#include <kvq/quantize.cuh>
#include <kvq/reference.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 4, kDim = 64;

/// One warp per row, as an engine's cache-write kernel would.
__global__ void quantize_rows(const __half* x,  // (rows, dim)
                              std::int8_t* q,   // (rows, dim)
                              float* scales) {  // (rows)
  const int row = blockIdx.x;
  kvq::device::quantize_row_warp(x + row * kDim, kDim, q + row * kDim, scales + row);
}

int fail(const char* what) {
  std::printf("FAILED: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  const kvq::KvView view = kvq::contiguous_view(kRows, kDim);
  const kvq::QuantSpec per_token{kvq::Granularity::kPerToken, 0};
  if (kvq::quantize<__half>(nullptr, view, per_token, nullptr, nullptr) != cudaErrorInvalidValue)
    return fail("a null pointer was not rejected");
  if (kvq::quantize<__half>(nullptr, kvq::KvView{}, per_token, nullptr, nullptr) != cudaSuccess)
    return fail("an empty call did not succeed");

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    std::printf("kvq consumer CUDA OK: host API validation (no GPU to run on)\n");
    return 0;
  }

  std::vector<__half> x(view.size());
  for (std::int64_t i = 0; i < view.size(); ++i) x[i] = __float2half(std::sin(0.3f * static_cast<float>(i)) * (1 + i % 7));
  std::vector<std::int8_t> q_ref(view.size());
  std::vector<float> s_ref(kRows);
  if (kvq::reference::quantize(x.data(), view, per_token, q_ref.data(), s_ref.data()) != cudaSuccess)
    return fail("reference::quantize");

  __half* dx = nullptr;
  std::int8_t* dq = nullptr;
  float* ds = nullptr;
  if (cudaMalloc(&dx, view.size() * sizeof(__half)) != cudaSuccess || cudaMalloc(&dq, 2 * view.size()) != cudaSuccess ||
      cudaMalloc(&ds, 2 * kRows * sizeof(float)) != cudaSuccess)
    return fail("cudaMalloc");
  cudaMemcpy(dx, x.data(), view.size() * sizeof(__half), cudaMemcpyHostToDevice);
  cudaMemset(dq, 0x80, 2 * view.size());  // poison: -128 is never a code
  cudaMemset(ds, 0xff, 2 * kRows * sizeof(float));
  if (kvq::quantize(dx, view, per_token, dq, ds) != cudaSuccess) return fail("kvq::quantize");
  quantize_rows<<<kRows, 32>>>(dx, dq + view.size(), ds + kRows);
  if (cudaDeviceSynchronize() != cudaSuccess) return fail("a kernel");

  std::vector<std::int8_t> q(2 * view.size());
  std::vector<float> s(2 * kRows);
  cudaMemcpy(q.data(), dq, q.size(), cudaMemcpyDeviceToHost);
  cudaMemcpy(s.data(), ds, s.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(dx);
  cudaFree(dq);
  cudaFree(ds);
  for (int way = 0; way < 2; ++way)
    if (std::memcmp(q.data() + way * view.size(), q_ref.data(), q_ref.size()) != 0 ||
        std::memcmp(s.data() + way * kRows, s_ref.data(), s_ref.size() * sizeof(float)) != 0)
      return fail(way == 0 ? "kvq::quantize differs from the reference" : "the device block differs from the reference");
  std::printf("kvq consumer CUDA OK: host API and device block equal the reference on %d x %d\n", kRows, kDim);
  return 0;
}
