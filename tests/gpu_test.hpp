// tests/gpu_test.hpp: the fixture every GPU test derives from.
//
// Skips (with the reason) on ANY error from cudaGetDeviceCount, or when it reports no device: a
// machine without a driver answers cudaErrorInsufficientDriver, not cudaErrorNoDevice. With
// KVQ_REQUIRE_GPU=1 in the environment the same condition is a failure instead of a skip, so a
// GPU machine can never report skipped GPU tests as a pass.
#pragma once

#include "gpu_available.hpp"

#include <gtest/gtest.h>

#include <string>

namespace kvq::test {

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = unavailable_reason();
    if (reason.empty()) return;
    if (gpu_required()) FAIL() << "KVQ_REQUIRE_GPU is set but no GPU is usable: " << reason;
    GTEST_SKIP() << "no usable GPU (" << reason << "); set KVQ_REQUIRE_GPU=1 to make this a failure";
  }
  /// Why no GPU is usable (empty: one is). A seam for gpu_fixture_test.cpp, which replaces it to
  /// drive both of SetUp's outcomes on any machine; every GPU test asks the device.
  virtual std::string unavailable_reason() const { return gpu_unavailable_reason(); }
};

/// Same, for parameterized tests.
template <class Param>
class GpuTestWithParam : public GpuTest, public ::testing::WithParamInterface<Param> {};

}  // namespace kvq::test
