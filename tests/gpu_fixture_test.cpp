// The GPU test fixture (tests/gpu_test.hpp): KVQ_REQUIRE_GPU parsing, and what SetUp does with and
// without a usable device. Runs on any machine: the fixture's decision is observed through gtest's
// test-part reporter, so both outcomes (skip, or failure when a GPU is required) are checked here
// without needing a second process.

#include "gpu_test.hpp"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

namespace {

// Sets (or unsets, for nullopt) KVQ_REQUIRE_GPU for the scope, restoring the old value after.
class ScopedRequireGpu {
 public:
  explicit ScopedRequireGpu(std::optional<std::string> value) {
    if (const char* old = std::getenv(kName)) old_ = std::string(old);
    if (value) setenv(kName, value->c_str(), 1);
    else unsetenv(kName);
  }
  ~ScopedRequireGpu() {
    if (old_) setenv(kName, old_->c_str(), 1);
    else unsetenv(kName);
  }
  ScopedRequireGpu(const ScopedRequireGpu&) = delete;
  ScopedRequireGpu& operator=(const ScopedRequireGpu&) = delete;

 private:
  static constexpr const char* kName = "KVQ_REQUIRE_GPU";
  std::optional<std::string> old_;
};

TEST(GpuRequired, UnsetMeansNotRequired) {
  ScopedRequireGpu env(std::nullopt);
  EXPECT_FALSE(kvq::test::gpu_required());
}

TEST(GpuRequired, EmptyAndZeroMeanNotRequired) {
  {
    ScopedRequireGpu env(std::string(""));
    EXPECT_FALSE(kvq::test::gpu_required());
  }
  {
    ScopedRequireGpu env(std::string("0"));
    EXPECT_FALSE(kvq::test::gpu_required());
  }
}

TEST(GpuRequired, AnyOtherValueMeansRequired) {
  for (const char* v : {"1", "yes", "true", "ON", "2", "00"}) {
    ScopedRequireGpu env(std::string{v});
    EXPECT_TRUE(kvq::test::gpu_required()) << "KVQ_REQUIRE_GPU=" << v;
  }
}

TEST(GpuRequired, ScopedEnvironmentIsRestored) {
  // The helper above must not leak a setting into later checks.
  {
    ScopedRequireGpu outer(std::string("1"));
    { ScopedRequireGpu inner(std::nullopt); }
    EXPECT_TRUE(kvq::test::gpu_required());
  }
}

// A fixture instance whose SetUp can be called directly, inside a reporter that records what the
// fixture reports (skip, failure or nothing) instead of applying it to the enclosing test. Its
// device check answers `reason` (empty: a usable GPU) instead of asking the machine, so every
// outcome of SetUp is exercised on every machine, with and without a GPU.
class Probe : public kvq::test::GpuTest {
 public:
  explicit Probe(std::string reason) : reason_(std::move(reason)) {}
  using kvq::test::GpuTest::SetUp;
  void TestBody() override {}

 private:
  std::string unavailable_reason() const override { return reason_; }
  std::string reason_;
};

void run_setup(const std::string& reason, ::testing::TestPartResultArray* results) {
  ::testing::ScopedFakeTestPartResultReporter reporter(
      ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, results);
  Probe probe(reason);
  probe.SetUp();
}

const std::string kNoDevice = "cudaGetDeviceCount reported 0 devices";

bool gpu_usable() { return kvq::test::gpu_unavailable_reason().empty(); }

TEST(GpuFixture, ReasonIsEmptyOnlyWithAUsableDevice) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  const std::string reason = kvq::test::gpu_unavailable_reason();
  if (err == cudaSuccess && count > 0) {
    EXPECT_EQ(reason, "");
  } else {
    // Any error (cudaErrorNoDevice, cudaErrorInsufficientDriver, ...) or zero devices is a reason,
    // and the reason names the error so the skip message says what happened.
    EXPECT_NE(reason, "");
    if (err != cudaSuccess) {
      EXPECT_NE(reason.find(cudaGetErrorName(err)), std::string::npos) << reason;
    }
  }
}

TEST(GpuFixture, WithAGpuSetUpReportsNothing) {
  for (const char* required : {"0", "1"}) {
    ScopedRequireGpu env(std::string{required});
    ::testing::TestPartResultArray r;
    run_setup("", &r);
    EXPECT_EQ(r.size(), 0) << "KVQ_REQUIRE_GPU=" << required;
  }
}

TEST(GpuFixture, WithoutAGpuSetUpSkipsWithTheReason) {
  ScopedRequireGpu env(std::nullopt);
  ::testing::TestPartResultArray r;
  run_setup(kNoDevice, &r);
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).skipped());
  const std::string message = r.GetTestPartResult(0).message();
  EXPECT_NE(message.find("no usable GPU"), std::string::npos) << message;
  EXPECT_NE(message.find(kNoDevice), std::string::npos) << message;
}

TEST(GpuFixture, WithoutAGpuSetUpFailsWhenAGpuIsRequired) {
  ScopedRequireGpu env(std::string("1"));
  ::testing::TestPartResultArray r;
  run_setup(kNoDevice, &r);
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).fatally_failed());
  const std::string message = r.GetTestPartResult(0).message();
  EXPECT_NE(message.find("KVQ_REQUIRE_GPU"), std::string::npos) << message;
  EXPECT_NE(message.find(kNoDevice), std::string::npos) << message;
}

TEST(GpuFixture, ZeroMeansSkipNotFail) {
  ScopedRequireGpu env(std::string("0"));
  ::testing::TestPartResultArray r;
  run_setup(kNoDevice, &r);
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).skipped());
}

TEST(GpuFixture, TheRealFixtureAsksTheDevice) {
  // What SetUp does on this machine: nothing with a usable GPU, a skip without one.
  ScopedRequireGpu env(std::nullopt);
  ::testing::TestPartResultArray r;
  run_setup(kvq::test::gpu_unavailable_reason(), &r);
  if (gpu_usable()) {
    EXPECT_EQ(r.size(), 0);
  } else {
    ASSERT_EQ(r.size(), 1);
    EXPECT_TRUE(r.GetTestPartResult(0).skipped());
  }
}

// Real tests on the fixture: without a GPU their bodies never run (ctest lists them as skipped);
// with one they run, and use the device: memory written by the GPU must read back.
class FixtureProbe : public kvq::test::GpuTest {};

void expect_device_round_trip(unsigned char value) {
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 256), cudaSuccess);
  unsigned char h[256] = {};
  EXPECT_EQ(cudaMemset(d, value, sizeof(h)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(cudaFree(d), cudaSuccess);
  for (unsigned char b : h) ASSERT_EQ(b, value);
}

TEST_F(FixtureProbe, BodyRunsOnlyWithAUsableGpu) { expect_device_round_trip(0xa7); }

class ParamFixtureProbe : public kvq::test::GpuTestWithParam<int> {};

TEST_P(ParamFixtureProbe, BodyRunsOnlyWithAUsableGpu) { expect_device_round_trip(static_cast<unsigned char>(GetParam())); }

INSTANTIATE_TEST_SUITE_P(Sizes, ParamFixtureProbe, ::testing::Values(1, 46));

}  // namespace
