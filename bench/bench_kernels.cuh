// bench/bench_kernels.cuh: the helper kernels kvq_bench and kvq_probe_rows time around kvq's:
// inputs, the L2 flush and the spin that keeps a host launch out of a timed window.
//
// Templates (with an unused parameter where there is nothing else to vary), so that the header
// may be included by more than one translation unit.
#pragma once

#include "random.hpp"

#include <kvq/numerics.hpp>

#include <cuda_runtime.h>

#include <cstdint>

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

}  // namespace kvq_bench
