// bench/bench_kernels.cuh: what kvq_bench and kvq_probe_rows both time around kvq's kernels: the
// inputs, the L2 flush, the spin that keeps a host launch out of a timed window, and the copy that
// every "% of copy" is measured against.
//
// Templates (with an unused parameter where there is nothing else to vary), so that the header
// may be included by more than one translation unit.
#pragma once

#include "random.hpp"

#include <kvq/numerics.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvq_bench {

/// x[i] = uniform_pm1(seed, i): the benchmark's inputs (random.hpp), never zeros.
template <class T>
__global__ void fill_uniform_kernel(T* x, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    x[i] = kvq::from_float<T>(uniform_pm1(seed, static_cast<std::uint64_t>(i)));
}

/// Reads all of p (n 16-byte words), leaving the L2 holding clean lines of it and nothing of the
/// case's operands. Reading, not writing: a memset would leave dirty lines that the timed call then
/// pays to write back. The store never happens; it keeps the loads from being optimized away.
template <int kUnused = 0>
__global__ void read_flush_kernel(const uint4* p, std::int64_t n, unsigned* sink) {
  unsigned acc = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

/// Keeps the GPU busy for about `cycles` clocks, so that the host's launch of what follows it is
/// not inside the timed window.
template <int kUnused = 0>
__global__ void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
constexpr long long kSpinCycles = 100000;  // about 50 us: longer than enqueueing an event and a graph

/// Device-to-device copy bandwidth, bytes read + written, on 2 GiB buffers far above the L2: the
/// median of `runs` copies timed with events after two warm-ups.
inline cudaError_t measure_copy_gbps(cudaStream_t stream, cudaEvent_t start, cudaEvent_t stop, int runs,
                                     double* gbps) {
  constexpr std::size_t kBytes = std::size_t{2} << 30;  // 2 GiB each way
  void *src = nullptr, *dst = nullptr;
  cudaError_t err = cudaMalloc(&src, kBytes);
  if (err == cudaSuccess) err = cudaMalloc(&dst, kBytes);
  if (err == cudaSuccess) err = cudaMemsetAsync(src, 1, kBytes, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(dst, 0, kBytes, stream);
  std::vector<float> ms;
  for (int i = 0; i < runs + 2 && err == cudaSuccess; ++i) {  // the first two are warm-up
    float t = 0;
    err = cudaEventRecord(start, stream);
    if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, stream);
    if (err == cudaSuccess) err = cudaEventRecord(stop, stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    if (err == cudaSuccess) err = cudaEventElapsedTime(&t, start, stop);
    if (i >= 2) ms.push_back(t);
  }
  cudaFree(src);
  cudaFree(dst);
  if (err != cudaSuccess) return err;
  std::sort(ms.begin(), ms.end());
  const std::size_t m = ms.size() / 2;
  const double median_ms = ms.size() % 2 == 1 ? ms[m] : 0.5 * (static_cast<double>(ms[m - 1]) + ms[m]);
  *gbps = 2.0 * static_cast<double>(kBytes) / (median_ms * 1e-3) * 1e-9;
  return cudaSuccess;
}

}  // namespace kvq_bench
