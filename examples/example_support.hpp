// examples/example_support.hpp: the few lines every example needs and that are not about kvq:
// the GPU check (skip or fail), CUDA error checks, and an owning device buffer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace example {

/// Exit code of an example that found no usable GPU. ctest reports it as "skipped"
/// (SKIP_RETURN_CODE in examples/CMakeLists.txt); 77 is the automake convention.
constexpr int kSkipExitCode = 77;

/// True when KVQ_REQUIRE_GPU is set to anything but "" or "0" (the rule of tests/gpu_test.hpp).
inline bool gpu_required() {
  const char* v = std::getenv("KVQ_REQUIRE_GPU");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// 0 when a GPU is usable. Otherwise prints why and returns the code to exit with: kSkipExitCode,
/// or 1 when KVQ_REQUIRE_GPU is set. ANY error of cudaGetDeviceCount counts as "no GPU": a machine
/// without a driver answers cudaErrorInsufficientDriver, not cudaErrorNoDevice.
inline int gpu_unavailable_exit_code(const char* example_name) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return 0;
  char reason[256];
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so it cannot resurface in a later check
    std::snprintf(reason, sizeof(reason), "cudaGetDeviceCount failed: %s (%s)", cudaGetErrorName(err),
                  cudaGetErrorString(err));
  } else {
    std::snprintf(reason, sizeof(reason), "cudaGetDeviceCount reported 0 devices");
  }
  if (gpu_required()) {
    std::printf("%s: FAILED: KVQ_REQUIRE_GPU is set but no GPU is usable: %s\n", example_name, reason);
    return 1;
  }
  std::printf("%s: SKIPPED: no usable GPU (%s); set KVQ_REQUIRE_GPU=1 to make this a failure\n", example_name,
              reason);
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
