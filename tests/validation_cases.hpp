// tests/validation_cases.hpp: argument validation, written once for every implementation of the
// four operations (the CPU reference now, the GPU API of quantize.cuh as well).
//
// Each case passes bad arguments and checks two things: the documented error code comes back, and
// nothing was touched: every buffer (inputs included) and the non-finite counter are compared byte
// for byte with their poisoned state. Validation happens before any memory access or CUDA call,
// so host buffers serve for the GPU API too: no case here ever makes a valid non-empty call.
//
// To run these cases against an implementation, define an adapter and instantiate the suite:
//
//   template <class T> struct MyOps {
//     using Elem = T;
//     static cudaError_t compute_scales(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s, float* scales);
//     static cudaError_t quantize(const T* x, const kvq::KvView& v, const kvq::QuantSpec& s,
//                                 std::int8_t* q, float* scales);
//     static cudaError_t quantize_with_scales(const T* x, const float* scales, const kvq::KvView& v,
//                                             const kvq::QuantSpec& s, std::int8_t* q);
//     static cudaError_t dequantize(const std::int8_t* q, const float* scales, const kvq::KvView& v,
//                                   const kvq::QuantSpec& s, T* y);
//   };
//   using MyTypes = ::testing::Types<MyOps<float>, MyOps<__half>, MyOps<__nv_bfloat16>>;
//   namespace kvq::test {  // the macro names the suite unqualified
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, ValidationCases, MyTypes);
//   }
//
// Include this header in one translation unit per test binary (it registers the suite).
#pragma once

#include <kvq/types.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace kvq::test {

enum class Op { kComputeScales, kQuantize, kQuantizeWithScales, kDequantize };
constexpr Op kAllOps[] = {Op::kComputeScales, Op::kQuantize, Op::kQuantizeWithScales, Op::kDequantize};

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kComputeScales: return "compute_scales";
    case Op::kQuantize: return "quantize";
    case Op::kQuantizeWithScales: return "quantize_with_scales";
    case Op::kDequantize: return "dequantize";
  }
  return "?";
}

/// The pointer arguments an operation can take.
enum class Arg { kX, kQ, kScales, kY };

/// Which pointers each operation receives.
inline bool takes(Op op, Arg a) {
  switch (op) {
    case Op::kComputeScales: return a == Arg::kX || a == Arg::kScales;
    case Op::kQuantize:
    case Op::kQuantizeWithScales: return a == Arg::kX || a == Arg::kQ || a == Arg::kScales;
    case Op::kDequantize: return a == Arg::kQ || a == Arg::kScales || a == Arg::kY;
  }
  return false;
}

template <class Ops>
class ValidationCases : public ::testing::Test {
 protected:
  using T = typename Ops::Elem;

  // A valid view, small enough that the poisoned buffers hold all of it: [2, 8, 16].
  static constexpr std::int64_t kB = 2, kT = 8, kC = 16, kN = kB * kT * kC;
  static KvView good_view() { return KvView{kB, kT, kC, kT * kC, kC}; }

  // Buffers with one spare element in front, so a pointer can be offset by 1 byte and stay inside.
  // x and y hold a poison byte pattern, q another, scales a NaN pattern.
  std::vector<unsigned char> x_bytes = std::vector<unsigned char>((kN + 1) * sizeof(T), 0xa5);
  std::vector<unsigned char> y_bytes = std::vector<unsigned char>((kN + 1) * sizeof(T), 0x5a);
  std::vector<unsigned char> q_bytes = std::vector<unsigned char>(kN + 1, 0x3c);
  std::vector<unsigned char> s_bytes = std::vector<unsigned char>((kN + 1) * sizeof(float), 0xff);
  unsigned long long counter = 12345;

  // Aligned pointers into the buffers (vector storage is aligned for any fundamental type).
  const T* x() { return reinterpret_cast<const T*>(x_bytes.data()); }
  std::int8_t* q() { return reinterpret_cast<std::int8_t*>(q_bytes.data()); }
  float* scales() { return reinterpret_cast<float*>(s_bytes.data()); }
  T* y() { return reinterpret_cast<T*>(y_bytes.data()); }

  struct Ptrs {
    const T* x;
    std::int8_t* q;
    float* scales;
    T* y;
  };
  Ptrs good_ptrs() { return Ptrs{x(), q(), scales(), y()}; }

  QuantSpec spec(Granularity g = Granularity::kPerToken, std::int64_t group = 0) {
    return QuantSpec{g, group, &counter};
  }

  static cudaError_t call(Op op, const KvView& v, const QuantSpec& s, const Ptrs& p) {
    switch (op) {
      case Op::kComputeScales: return Ops::compute_scales(p.x, v, s, p.scales);
      case Op::kQuantize: return Ops::quantize(p.x, v, s, p.q, p.scales);
      case Op::kQuantizeWithScales: return Ops::quantize_with_scales(p.x, p.scales, v, s, p.q);
      case Op::kDequantize: return Ops::dequantize(p.q, p.scales, v, s, p.y);
    }
    return cudaErrorUnknown;
  }

  struct Snapshot {
    std::vector<unsigned char> x, y, q, s;
    unsigned long long counter;
  };
  Snapshot snapshot() const { return Snapshot{x_bytes, y_bytes, q_bytes, s_bytes, counter}; }

  void expect_untouched(const Snapshot& before, const std::string& what) const {
    EXPECT_TRUE(before.x == x_bytes) << what << ": x was modified";
    EXPECT_TRUE(before.y == y_bytes) << what << ": y was written";
    EXPECT_TRUE(before.q == q_bytes) << what << ": q was written";
    EXPECT_TRUE(before.s == s_bytes) << what << ": scales were written";
    EXPECT_EQ(before.counter, counter) << what << ": the non-finite counter changed";
  }

  // Calls `op` and expects `want` with nothing touched.
  void expect_error(Op op, const KvView& v, const QuantSpec& s, const Ptrs& p, cudaError_t want,
                    const std::string& what) {
    const Snapshot before = snapshot();
    const cudaError_t got = call(op, v, s, p);
    EXPECT_EQ(got, want) << op_name(op) << ", " << what;
    expect_untouched(before, std::string(op_name(op)) + ", " + what);
  }

  // Every operation, both granularities.
  void expect_error_everywhere(const KvView& v, std::int64_t group, cudaError_t want, const std::string& what) {
    for (Op op : kAllOps)
      for (Granularity g : {Granularity::kPerToken, Granularity::kPerChannel})
        expect_error(op, v, spec(g, group), good_ptrs(), want, what + " (" + to_string(g) + ")");
  }
};

TYPED_TEST_SUITE_P(ValidationCases);

TYPED_TEST_P(ValidationCases, NullPointers) {
  for (Op op : kAllOps)
    for (Arg a : {Arg::kX, Arg::kQ, Arg::kScales, Arg::kY}) {
      if (!takes(op, a)) continue;
      auto p = this->good_ptrs();
      if (a == Arg::kX) p.x = nullptr;
      if (a == Arg::kQ) p.q = nullptr;
      if (a == Arg::kScales) p.scales = nullptr;
      if (a == Arg::kY) p.y = nullptr;
      this->expect_error(op, this->good_view(), this->spec(), p, cudaErrorInvalidValue,
                         "null pointer argument " + std::to_string(static_cast<int>(a)));
    }
}

TYPED_TEST_P(ValidationCases, NegativeSizes) {
  const KvView g = this->good_view();
  for (int which = 0; which < 3; ++which) {
    KvView v = g;
    (which == 0 ? v.batch : which == 1 ? v.tokens : v.channels) = -1;
    this->expect_error_everywhere(v, 0, cudaErrorInvalidValue, "size " + std::to_string(which) + " = -1");
    (which == 0 ? v.batch : which == 1 ? v.tokens : v.channels) = std::numeric_limits<std::int64_t>::min();
    this->expect_error_everywhere(v, 0, cudaErrorInvalidValue, "size " + std::to_string(which) + " = INT64_MIN");
  }
  // A negative size is an error even when another size is 0 (it is not an empty tensor).
  this->expect_error_everywhere(KvView{0, -3, 16, 0, 16}, 0, cudaErrorInvalidValue, "batch 0, tokens -3");
}

TYPED_TEST_P(ValidationCases, NegativeGroup) {
  this->expect_error_everywhere(this->good_view(), -1, cudaErrorInvalidValue, "group -1");
  this->expect_error_everywhere(this->good_view(), std::numeric_limits<std::int64_t>::min(), cudaErrorInvalidValue,
                                "group INT64_MIN");
}

TYPED_TEST_P(ValidationCases, NegativeStrides) {
  KvView v = this->good_view();
  v.token_stride = -this->kC;
  this->expect_error_everywhere(v, 0, cudaErrorInvalidValue, "token_stride < 0");
  v = this->good_view();
  v.batch_stride = -this->kT * this->kC;
  this->expect_error_everywhere(v, 0, cudaErrorInvalidValue, "batch_stride < 0");
  // Negative even where the dimension has extent 1 and the stride is never used.
  v = KvView{1, this->kT, this->kC, -1, this->kC};
  this->expect_error_everywhere(v, 0, cudaErrorInvalidValue, "batch_stride < 0 with batch 1");
}

TYPED_TEST_P(ValidationCases, OverlappingStrides) {
  const std::int64_t T = this->kT, C = this->kC;
  const struct {
    KvView v;
    const char* what;
  } cases[] = {
      {KvView{2, T, C, T * C, C - 1}, "token_stride < channels"},
      {KvView{2, T, C, T * C, 0}, "token_stride 0 with several tokens"},
      {KvView{2, T, C, T * C - 1, C}, "batch_stride one short of the matrix"},
      {KvView{2, T, C, 0, C}, "batch_stride 0 with several matrices"},
      {KvView{2, T, C, C, C}, "batch_stride == token_stride"},
      // [T, H, D]-style with the head stride one short of D: heads overlap.
      {KvView{2, T, C, C - 1, 2 * C}, "per-head batch_stride < channels"},
      // Heads interleaved correctly but the token stride does not step past all heads.
      {KvView{2, T, C, C, 2 * C - 1}, "per-head token_stride < heads * channels"},
  };
  for (const auto& c : cases) this->expect_error_everywhere(c.v, 0, cudaErrorInvalidValue, c.what);
}

TYPED_TEST_P(ValidationCases, Int64OverflowingViews) {
  const std::int64_t big = std::int64_t{1} << 62;
  const struct {
    KvView v;
    const char* what;
  } cases[] = {
      {KvView{1, big, 4, 0, 4}, "tokens * channels overflows"},
      {KvView{4, big / 2, 2, big, 2}, "batch * tokens * channels overflows"},
      {KvView{1, 3, 4, 0, big}, "(tokens - 1) * token_stride overflows"},
      {KvView{3, 2, 4, big, 4}, "(batch - 1) * batch_stride overflows"},
      {KvView{2, 2, 4, 3 * (big / 2), 3 * (big / 4)}, "the sum of the offsets overflows"},
  };
  for (const auto& c : cases) this->expect_error_everywhere(c.v, 0, cudaErrorInvalidValue, c.what);
}

TYPED_TEST_P(ValidationCases, MisalignedPointers) {
  using T = typename TestFixture::T;
  // One byte past an aligned address: misaligned for every element type wider than a byte.
  const T* x_odd = reinterpret_cast<const T*>(this->x_bytes.data() + 1);
  T* y_odd = reinterpret_cast<T*>(this->y_bytes.data() + 1);
  float* s_odd = reinterpret_cast<float*>(this->s_bytes.data() + 1);
  float* s_two = reinterpret_cast<float*>(this->s_bytes.data() + 2);  // 2-aligned, not 4-aligned
  for (Op op : kAllOps) {
    auto p = this->good_ptrs();
    if (takes(op, Arg::kX)) {
      p.x = x_odd;
      this->expect_error(op, this->good_view(), this->spec(), p, cudaErrorMisalignedAddress, "x at an odd address");
      p = this->good_ptrs();
    }
    if (takes(op, Arg::kY)) {
      p.y = y_odd;
      this->expect_error(op, this->good_view(), this->spec(), p, cudaErrorMisalignedAddress, "y at an odd address");
      p = this->good_ptrs();
    }
    p.scales = s_odd;
    this->expect_error(op, this->good_view(), this->spec(), p, cudaErrorMisalignedAddress, "scales at an odd address");
    p.scales = s_two;
    this->expect_error(op, this->good_view(), this->spec(), p, cudaErrorMisalignedAddress, "scales 2-byte aligned");
  }
  if constexpr (sizeof(T) == 4) {
    // A float input 2 bytes off: aligned for fp16, not for fp32.
    auto p = this->good_ptrs();
    p.x = reinterpret_cast<const T*>(this->x_bytes.data() + 2);
    this->expect_error(Op::kQuantize, this->good_view(), this->spec(), p, cudaErrorMisalignedAddress,
                       "float x 2-byte aligned");
  }
}

TYPED_TEST_P(ValidationCases, BadGranularity) {
  for (int bad : {2, -1, 255}) {
    const QuantSpec s{static_cast<Granularity>(bad), 0, &this->counter};
    for (Op op : kAllOps)
      this->expect_error(op, this->good_view(), s, this->good_ptrs(), cudaErrorInvalidValue,
                         "granularity " + std::to_string(bad));
  }
}

TYPED_TEST_P(ValidationCases, ErrorsInTheViewComeBeforePointerErrors) {
  // Documented order: view and spec first, then each pointer in argument order.
  KvView bad = this->good_view();
  bad.tokens = -1;
  const typename TestFixture::Ptrs misaligned{reinterpret_cast<const typename TestFixture::T*>(this->x_bytes.data() + 1),
                                              this->q(), reinterpret_cast<float*>(this->s_bytes.data() + 1),
                                              reinterpret_cast<typename TestFixture::T*>(this->y_bytes.data() + 1)};
  for (Op op : kAllOps)
    this->expect_error(op, bad, this->spec(), misaligned, cudaErrorInvalidValue, "bad view, misaligned pointers");
  // A null first pointer wins over a misaligned later one.
  auto p = this->good_ptrs();
  p.x = nullptr;
  p.scales = reinterpret_cast<float*>(this->s_bytes.data() + 1);
  this->expect_error(Op::kQuantize, this->good_view(), this->spec(), p, cudaErrorInvalidValue,
                     "null x before misaligned scales");
}

TYPED_TEST_P(ValidationCases, EmptyTensorsSucceedAndTouchNothing) {
  const std::int64_t T = this->kT, C = this->kC;
  const KvView empties[] = {
      KvView{0, T, C, T * C, C},
      KvView{2, 0, C, 0, C},
      KvView{2, T, 0, T, 0},
      KvView{0, 0, 0, 0, 0},
      KvView{},  // the default view: batch 1, nothing else
  };
  const typename TestFixture::Ptrs null_ptrs{nullptr, nullptr, nullptr, nullptr};
  for (const KvView& v : empties)
    for (Op op : kAllOps)
      for (Granularity g : {Granularity::kPerToken, Granularity::kPerChannel})
        for (std::int64_t group : {0, 1, 32}) {
          const std::string what = "empty [" + std::to_string(v.batch) + "," + std::to_string(v.tokens) + "," +
                                   std::to_string(v.channels) + "] group " + std::to_string(group);
          this->expect_error(op, v, this->spec(g, group), null_ptrs, cudaSuccess, what + ", null pointers");
          this->expect_error(op, v, this->spec(g, group), this->good_ptrs(), cudaSuccess, what + ", real buffers");
        }
}

// An output that shares bytes with another operand is refused, whichever operand and however
// little they share; the same buffers at their own addresses are valid (the other cases).
TYPED_TEST_P(ValidationCases, OverlappingOperands) {
  using T = typename TestFixture::T;
  using Ptrs = typename TestFixture::Ptrs;
  const std::size_t x_span = this->kN * sizeof(T);  // bytes of the view of x: last byte at x_span - 1
  auto* x_raw = this->x_bytes.data();
  auto* q_raw = this->q_bytes.data();
  auto* s_raw = this->s_bytes.data();
  auto as_q = [](unsigned char* p) { return reinterpret_cast<std::int8_t*>(p); };
  auto as_s = [](unsigned char* p) { return reinterpret_cast<float*>(p); };
  auto as_t = [](unsigned char* p) { return reinterpret_cast<T*>(p); };
  const Ptrs good = this->good_ptrs();
  const struct {
    Op op;
    Ptrs p;
    const char* what;
  } cases[] = {
      {Op::kComputeScales, {good.x, good.q, as_s(x_raw), good.y}, "scales = x"},
      {Op::kComputeScales, {good.x, good.q, as_s(x_raw + x_span - sizeof(float)), good.y}, "scales on x's last float"},
      {Op::kQuantize, {good.x, as_q(x_raw), good.scales, good.y}, "q = x"},
      {Op::kQuantize, {good.x, as_q(x_raw + x_span - 1), good.scales, good.y}, "q on x's last byte"},
      {Op::kQuantize, {good.x, good.q, as_s(x_raw), good.y}, "scales = x"},
      {Op::kQuantize, {good.x, good.q, as_s(q_raw), good.y}, "scales = q"},
      {Op::kQuantizeWithScales, {good.x, as_q(x_raw), good.scales, good.y}, "q = x"},
      {Op::kQuantizeWithScales, {good.x, as_q(s_raw), good.scales, good.y}, "q = scales"},
      {Op::kDequantize, {good.x, good.q, good.scales, as_t(q_raw)}, "y = q"},
      {Op::kDequantize, {good.x, good.q, good.scales, as_t(s_raw)}, "y = scales"},
  };
  for (const auto& c : cases)
    for (Granularity g : {Granularity::kPerToken, Granularity::kPerChannel})
      this->expect_error(c.op, this->good_view(), this->spec(g), c.p, cudaErrorInvalidValue,
                         std::string(c.what) + " (" + to_string(g) + ")");
}

// Scale strides that are negative, make two scales share an address, or overflow.
TYPED_TEST_P(ValidationCases, BadScaleStrides) {
  const struct {
    ScaleStrides strides;
    const char* what;
  } cases[] = {
      {{-1, 0}, "negative batch stride"},
      {{0, -1}, "negative row stride"},
      {{1, 1}, "batches on top of each other"},
      {{0, std::numeric_limits<std::int64_t>::max() / 2}, "overflowing offsets"},
  };
  for (const auto& c : cases)
    for (Op op : kAllOps)
      for (Granularity g : {Granularity::kPerToken, Granularity::kPerChannel}) {
        QuantSpec s = this->spec(g, 4);
        s.scale_strides = c.strides;
        this->expect_error(op, this->good_view(), s, this->good_ptrs(), cudaErrorInvalidValue,
                           std::string(c.what) + " (" + to_string(g) + ")");
      }
}

REGISTER_TYPED_TEST_SUITE_P(ValidationCases, NullPointers, NegativeSizes, NegativeGroup, NegativeStrides,
                            OverlappingStrides, Int64OverflowingViews, MisalignedPointers, BadGranularity,
                            ErrorsInTheViewComeBeforePointerErrors, EmptyTensorsSucceedAndTouchNothing,
                            OverlappingOperands, BadScaleStrides);

}  // namespace kvq::test
