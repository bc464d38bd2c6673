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
// fixture reports (skip, failure or nothing) instead of applying it to the enclosing test.
class Probe : public kvq::test::GpuTest {
 public:
  using kvq::test::GpuTest::SetUp;
  void TestBody() override {}
};

void run_setup(::testing::TestPartResultArray* results) {
  ::testing::ScopedFakeTestPartResultReporter reporter(
      ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, results);
  Probe probe;
  probe.SetUp();
}

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

TEST(GpuFixture, WithoutAGpuSetUpSkipsWithAMessage) {
  ScopedRequireGpu env(std::nullopt);
  ::testing::TestPartResultArray r;
  run_setup(&r);
  if (gpu_usable()) {
    EXPECT_EQ(r.size(), 0) << "with a usable GPU, SetUp reports nothing";
    return;
  }
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).skipped());
  EXPECT_NE(std::string(r.GetTestPartResult(0).message()).find("no usable GPU"), std::string::npos)
      << r.GetTestPartResult(0).message();
}

TEST(GpuFixture, WithoutAGpuSetUpFailsWhenAGpuIsRequired) {
  ScopedRequireGpu env(std::string("1"));
  ::testing::TestPartResultArray r;
  run_setup(&r);
  if (gpu_usable()) {
    EXPECT_EQ(r.size(), 0) << "with a usable GPU, SetUp reports nothing";
    return;
  }
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).fatally_failed());
  EXPECT_NE(std::string(r.GetTestPartResult(0).message()).find("KVQ_REQUIRE_GPU"), std::string::npos)
      << r.GetTestPartResult(0).message();
}

TEST(GpuFixture, ZeroMeansSkipNotFail) {
  ScopedRequireGpu env(std::string("0"));
  ::testing::TestPartResultArray r;
  run_setup(&r);
  if (gpu_usable()) return;
  ASSERT_EQ(r.size(), 1);
  EXPECT_TRUE(r.GetTestPartResult(0).skipped());
}

// Real tests on the fixture: without a GPU their bodies never run (ctest lists them as skipped);
// with one they run and find the device usable. A fixture that let the body run without a GPU
// would fail here.
class FixtureProbe : public kvq::test::GpuTest {};

TEST_F(FixtureProbe, BodyRunsOnlyWithAUsableGpu) {
  EXPECT_TRUE(gpu_usable()) << "the body ran without a usable GPU";
  int device = -1;
  EXPECT_EQ(cudaGetDevice(&device), cudaSuccess);
}

class ParamFixtureProbe : public kvq::test::GpuTestWithParam<int> {};

TEST_P(ParamFixtureProbe, BodyRunsOnlyWithAUsableGpu) {
  EXPECT_TRUE(gpu_usable()) << "the body ran without a usable GPU (param " << GetParam() << ")";
}

INSTANTIATE_TEST_SUITE_P(Sizes, ParamFixtureProbe, ::testing::Values(1, 46));

}  // namespace
