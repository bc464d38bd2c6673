// tests/gpu_test.hpp: the fixture every GPU test derives from.
//
// Skips (with the reason) on ANY error from cudaGetDeviceCount, or when it reports no device: a
// machine without a driver answers cudaErrorInsufficientDriver, not cudaErrorNoDevice. With
// KVQ_REQUIRE_GPU=1 in the environment the same condition is a failure instead of a skip, so a
// GPU machine can never report skipped GPU tests as a pass.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

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
    (void)cudaGetLastError();  // clears a non-sticky error; a missing driver stays sticky (harmless: we skip)
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "cudaGetDeviceCount reported 0 devices";
  return {};
}

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = gpu_unavailable_reason();
    if (reason.empty()) return;
    if (gpu_required()) FAIL() << "KVQ_REQUIRE_GPU is set but no GPU is usable: " << reason;
    GTEST_SKIP() << "no usable GPU (" << reason << "); set KVQ_REQUIRE_GPU=1 to make this a failure";
  }
};

/// Same, for parameterized tests.
template <class Param>
class GpuTestWithParam : public GpuTest, public ::testing::WithParamInterface<Param> {};

}  // namespace kvq::test
