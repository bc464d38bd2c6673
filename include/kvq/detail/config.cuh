// kvq/detail/config.cuh: namespaces, kernel attributes and small host/device helpers.
#pragma once

#include <kvq/version.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Kernels live in a versioned inline namespace and are hidden, so two shared libraries that both
// include (possibly different versions of) kvq cannot collide on a kernel symbol.
#define KVQ_KERNEL __global__ __attribute__((visibility("hidden")))

KVQ_NAMESPACE_BEGIN
namespace detail {

/// Returns the first error of a sequence of CUDA calls: `KVQ_TRY(cudaMemsetAsync(...));`
#define KVQ_TRY(expr)                                   \
  do {                                                  \
    const cudaError_t kvq_try_err_ = (expr);            \
    if (kvq_try_err_ != cudaSuccess) return kvq_try_err_; \
  } while (0)

/// Checks the launch just made without synchronizing (CUB's and CUTLASS's habit).
inline cudaError_t check_launch() { return cudaPeekAtLastError(); }

/// The element types every operation takes.
template <class T>
constexpr bool kSupportedType =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <class I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

/// Division by a run-time constant through a multiply and a shift (Granlund-Montgomery, as in
/// CUTLASS's FastDivmod). Valid for dividends below 2^31; callers fall back to `/` above that.
struct FastDivmod {
  std::uint32_t divisor = 1;
  std::uint32_t multiplier = 1;
  std::uint32_t shift = 0;

  FastDivmod() = default;
  __host__ explicit FastDivmod(std::uint32_t d) : divisor(d) {
    shift = 0;
    while ((1ull << shift) < d) ++shift;
    multiplier = static_cast<std::uint32_t>(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
  }
  __host__ __device__ std::uint32_t div(std::uint32_t n) const {
#ifdef __CUDA_ARCH__
    const std::uint32_t hi = __umulhi(n, multiplier);
#else
    const std::uint32_t hi = static_cast<std::uint32_t>((static_cast<std::uint64_t>(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }
  __host__ __device__ void divmod(std::uint32_t n, std::uint32_t& q, std::uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace detail
KVQ_NAMESPACE_END
