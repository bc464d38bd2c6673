// examples/example_support.hpp: the few lines every example needs and that are not about kvq:
// the GPU check (skip or fail), CUDA error checks, and an owning device buffer.
#pragma once

#include "gpu_available.hpp"  // tests/: the GPU rule the tests use

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace example {

/// Exit code of an example that found no usable GPU. ctest reports it as "skipped"
/// (SKIP_RETURN_CODE in examples/CMakeLists.txt); 77 is the automake convention.
constexpr int kSkipExitCode = 77;

/// 0 when a GPU is usable. Otherwise prints why and returns the code to exit with: kSkipExitCode,
/// or 1 when KVQ_REQUIRE_GPU is set (the rule of tests/gpu_available.hpp, shared with the tests).
inline int gpu_unavailable_exit_code(const char* example_name) {
  const std::string reason = kvq::test::gpu_unavailable_reason();
  if (reason.empty()) return 0;
  if (kvq::test::gpu_required()) {
    std::printf("%s: FAILED: KVQ_REQUIRE_GPU is set but no GPU is usable: %s\n", example_name, reason.c_str());
    return 1;
  }
  std::printf("%s: SKIPPED: no usable GPU (%s); set KVQ_REQUIRE_GPU=1 to make this a failure\n", example_name,
              reason.c_str());
  return kSkipExitCode;
}

/// Exits the program with a message when a CUDA call failed. An example has nothing to clean up
/// that the driver would not reclaim at exit, so it stops at the first error.
inline void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "error: %s: %s (%s)\n", what, cudaGetErrorName(err), cudaGetErrorString(err));
  std::exit(1);
}

/// An owning array of `size` elements of T in device memory (cudaMalloc: 256-byte aligned).
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t size) : size_(size) {
    void* p = nullptr;
    check(cudaMalloc(&p, size * sizeof(T)), "cudaMalloc");
    data_ = static_cast<T*>(p);
  }
  ~DeviceArray() { (void)cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t bytes() const { return size_ * sizeof(T); }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace example
