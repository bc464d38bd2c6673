// tests/gpu_available.hpp: the one rule for "is there a GPU to run on", shared by the GPU test
// fixture (gpu_test.hpp) and the examples. Plain C++, no GoogleTest.
//
// ANY error from cudaGetDeviceCount, or a count of 0, means no usable GPU: a machine without a
// driver answers cudaErrorInsufficientDriver, not cudaErrorNoDevice. KVQ_REQUIRE_GPU=1 in the
// environment turns that from a skip into a failure, so a GPU machine never reports skipped GPU
// work as a pass.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace kvq::test {

/// True when KVQ_REQUIRE_GPU is set to anything but "" or "0".
inline bool gpu_required() {
  const char* v = std::getenv("KVQ_REQUIRE_GPU");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// Empty when a usable device is present; otherwise why not.
inline std::string gpu_unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clears a non-sticky error; a missing driver stays sticky (harmless: no GPU work follows)
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "cudaGetDeviceCount reported 0 devices";
  return {};
}

}  // namespace kvq::test
