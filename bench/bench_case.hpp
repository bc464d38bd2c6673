// bench/bench_case.hpp: what one benchmark case is, its name, and the bytes it moves.
//
// Host-only: shared by the Google Benchmark driver (kvq_bench.cu), the per-dtype launchers
// (ops_*.cu) and the CPU side (host_reference.cpp).
#pragma once

#include <kvq/types.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvq_bench {

enum class Op { kComputeScales, kQuantize, kQuantizeWithScales, kDequantize };
enum class DType { kFloat, kHalf, kBfloat16 };

constexpr Op kOps[] = {Op::kComputeScales, Op::kQuantize, Op::kQuantizeWithScales, Op::kDequantize};
constexpr DType kDTypes[] = {DType::kFloat, DType::kHalf, DType::kBfloat16};
constexpr kvq::Variant kVariants[] = {kvq::Variant::kAuto, kvq::Variant::kNaive, kvq::Variant::kTiled,
                                      kvq::Variant::kCoarsened, kvq::Variant::kVectorized};

inline const char* to_string(Op op) {
  switch (op) {
    case Op::kComputeScales: return "compute_scales";
    case Op::kQuantize: return "quantize";
    case Op::kQuantizeWithScales: return "quantize_with_scales";
    case Op::kDequantize: return "dequantize";
  }
  return "unknown";
}

inline const char* to_string(DType t) {
  switch (t) {
    case DType::kFloat: return "float";
    case DType::kHalf: return "half";
    case DType::kBfloat16: return "bfloat16";
  }
  return "unknown";
}

inline std::size_t size_of(DType t) { return t == DType::kFloat ? 4 : 2; }

/// How a case's tensor is laid out: what its view is and how its name reads.
enum class Layout {
  kMatrix,  ///< [T, D], the paper's matrix: T131072_D8192
  kRows,    ///< [rows, D], rows one head wide (tokens x heads of [T, H, D]): rows262144_D128
  kTHD,     ///< [T, H, D] seen per head, one scale set per head (vLLM's cache): THD_T32768_H8_D128
  kBHTD,    ///< [B, H, T, D], one scale set per (sequence, head) (Hugging Face's): BHTD_B4_H8_T8192_D128
};

/// A tensor's shape in its layout. `tokens` is T (rows for kRows), `channels` is D.
struct Shape {
  std::int64_t tokens = 0;
  std::int64_t channels = 0;
  Layout layout = Layout::kMatrix;
  std::int64_t heads = 1;  // H of kTHD and kBHTD
  std::int64_t batch = 1;  // B of kBHTD
  std::int64_t elements() const { return batch * heads * tokens * channels; }
  bool operator==(const Shape& o) const {
    return tokens == o.tokens && channels == o.channels && layout == o.layout && heads == o.heads && batch == o.batch;
  }
  /// The kvq view of the whole tensor (every layout is dense: the view covers its storage).
  kvq::KvView view() const {
    switch (layout) {
      case Layout::kTHD: return kvq::KvView{heads, tokens, channels, channels, heads * channels};
      case Layout::kBHTD: return kvq::KvView{batch * heads, tokens, channels, tokens * channels, channels};
      default: return kvq::contiguous_view(tokens, channels);
    }
  }
};

constexpr Shape rows_shape(std::int64_t rows, std::int64_t dim) { return Shape{rows, dim, Layout::kRows}; }
constexpr Shape thd_shape(std::int64_t tokens, std::int64_t heads, std::int64_t dim) {
  return Shape{tokens, dim, Layout::kTHD, heads};
}
constexpr Shape bhtd_shape(std::int64_t batch, std::int64_t heads, std::int64_t tokens, std::int64_t dim) {
  return Shape{tokens, dim, Layout::kBHTD, heads, batch};
}

inline std::string to_string(Shape s) {
  const std::string T = std::to_string(s.tokens), D = "_D" + std::to_string(s.channels);
  switch (s.layout) {
    case Layout::kRows: return "rows" + T + D;
    case Layout::kTHD: return "THD_T" + T + "_H" + std::to_string(s.heads) + D;
    case Layout::kBHTD: return "BHTD_B" + std::to_string(s.batch) + "_H" + std::to_string(s.heads) + "_T" + T + D;
    default: return "T" + T + D;
  }
}

/// The paper's T x D shapes, smallest first. The last five are the bandwidth shapes (>= 33 M
/// elements; 131072 x 8192 = 1.07 G elements is the headline).
constexpr Shape kPaperShapes[] = {{1024, 64},     {2048, 128},     {16384, 256},    {65536, 256},
                                  {131072, 256},  {131072, 1024},  {131072, 2048},  {131072, 4096},
                                  {131072, 8192}, {262144, 128}};
constexpr Shape kHeadline{131072, 8192};

inline bool is_paper_shape(Shape s) {
  for (Shape p : kPaperShapes)
    if (p == s) return true;
  return false;
}

/// A granularity and group as they appear in case names: per_token, per_channel_g128, ...
struct Scheme {
  kvq::Granularity granularity = kvq::Granularity::kPerChannel;
  std::int64_t group = 0;
};

/// Every scheme the binary registers: group 0 and 128 for both granularities, and per-token groups
/// of 32 channels (llama.cpp-like blocks; compare_torch.py times the same in PyTorch).
constexpr Scheme kSchemes[] = {{kvq::Granularity::kPerToken, 0},
                               {kvq::Granularity::kPerToken, 32},
                               {kvq::Granularity::kPerToken, 128},
                               {kvq::Granularity::kPerChannel, 0},
                               {kvq::Granularity::kPerChannel, 128}};

inline std::string to_string(Scheme s) {
  std::string name = kvq::to_string(s.granularity);
  if (s.group > 0) name += "_g" + std::to_string(s.group);
  return name;
}

struct Case {
  Op op = Op::kQuantize;
  DType dtype = DType::kFloat;
  Scheme scheme;
  kvq::Variant variant = kvq::Variant::kAuto;
  Shape shape;

  kvq::KvView view() const { return shape.view(); }
  kvq::QuantSpec spec() const {
    kvq::QuantSpec s;
    s.granularity = scheme.granularity;
    s.group = scheme.group;
    return s;
  }
  std::int64_t elements() const { return shape.elements(); }
  std::int64_t scale_count() const { return kvq::scale_count(view(), spec()); }
  /// Per-channel scales over groups of more than 1024 tokens (whole sequences, mostly) need every
  /// token's amax before the first code can be written: quantize reads the input twice (1024 is
  /// kvq::detail::kMaxOnePassGroupTokens; shorter groups are staged on chip).
  bool reads_input_twice() const {
    return op == Op::kQuantize && scheme.granularity == kvq::Granularity::kPerChannel &&
           kvq::group_length(shape.tokens, scheme.group) > 1024;
  }
};

/// op/dtype/granularity/variant/shape, e.g. quantize/half/per_token/vectorized/T131072_D8192 or
/// dequantize/bfloat16/per_token/auto/rows262144_D128.
inline std::string to_string(const Case& c) {
  return std::string(to_string(c.op)) + "/" + to_string(c.dtype) + "/" + to_string(c.scheme) + "/" +
         kvq::to_string(c.variant) + "/" + to_string(c.shape);
}

/// Bytes an operation must move at least, each operand once: the input read, the output
/// written, and the fp32 scales read or written. `moved` adds the second read of the input for
/// whole-sequence per-channel quantize, the bytes the hardware really moves.
struct Bytes {
  double counted = 0;
  double moved = 0;
};

inline Bytes bytes_of(const Case& c) {
  const double n = static_cast<double>(c.elements());
  const double wide = n * static_cast<double>(size_of(c.dtype));  // the float/half/bfloat16 side
  const double codes = n;                                         // int8
  const double scales = 4.0 * static_cast<double>(c.scale_count());
  Bytes b;
  switch (c.op) {
    case Op::kComputeScales: b.counted = wide + scales; break;
    case Op::kQuantize:
    case Op::kQuantizeWithScales: b.counted = wide + codes + scales; break;
    case Op::kDequantize: b.counted = codes + scales + wide; break;
  }
  b.moved = b.counted + (c.reads_input_twice() ? wide : 0.0);
  return b;
}

/// Device buffers of one case; unused ones may be null. x and y hold c.dtype elements.
struct DeviceTensors {
  void* x = nullptr;             // (tokens, channels) input of compute_scales / quantize*
  std::int8_t* q = nullptr;      // (tokens, channels) codes
  float* scales = nullptr;       // scale_shape(view, spec)
  void* y = nullptr;             // (tokens, channels) output of dequantize
};

}  // namespace kvq_bench
