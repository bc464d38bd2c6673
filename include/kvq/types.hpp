// kvq/types.hpp: the data model (views, quantization specs, variants) and argument validation.
//
// Host-only and plain C++17: it needs the CUDA headers for `cudaError_t`, never nvcc or a GPU, so
// an engine can validate its arguments (and tests can check validation) on any machine.
#pragma once

#include <kvq/version.hpp>

#include <driver_types.h>  // cudaError_t

#include <cstddef>
#include <cstdint>
#include <limits>

KVQ_NAMESPACE_BEGIN

/// Which elements share one scale.
enum class Granularity {
  kPerToken,    ///< one scale per (batch, token) row, or per `group` channels of that row
  kPerChannel,  ///< one scale per (batch, channel) over all tokens, or over each run of `group` tokens
};

/// Kernel strategy. Every operation implements every strategy; `kAuto` is what users call.
enum class Variant {
  kAuto,        ///< the fastest strategy for the operation (chosen from H200 measurements)
  kNaive,       ///< one thread per element; scales by a separate element-wise atomic reduction
  kTiled,       ///< a block stages a tile in shared memory; one pass for per-token and grouped per-channel
  kCoarsened,   ///< each thread owns several elements in registers, scalar accesses
  kVectorized,  ///< like coarsened, with 16/8/4-byte accesses chosen from pointer and stride alignment
};

/// A strided view of a KV tensor: `batch` independent [tokens, channels] matrices, channels contiguous.
/// Strides are in elements. Examples:
///   [T, D]            : {1, T, D, T * D, D}
///   [B, H, T, D]      : {B * H, T, D, T * D, D}
///   [T, H, D] per head: {H, T, D, D, H * D}
struct KvView {
  std::int64_t batch = 1;
  std::int64_t tokens = 0;
  std::int64_t channels = 0;
  std::int64_t batch_stride = 0;
  std::int64_t token_stride = 0;

  /// Number of logical elements (batch * tokens * channels).
  constexpr std::int64_t size() const noexcept { return batch * tokens * channels; }
  /// True when there is nothing to do; an empty tensor is a successful no-op everywhere.
  constexpr bool empty() const noexcept { return batch == 0 || tokens == 0 || channels == 0; }
  /// Element offset of (b, t, c).
  constexpr std::int64_t offset(std::int64_t b, std::int64_t t, std::int64_t c) const noexcept {
    return b * batch_stride + t * token_stride + c;
  }
};

/// A dense [tokens, channels] matrix (the paper's layout).
constexpr KvView contiguous_view(std::int64_t tokens, std::int64_t channels) noexcept {
  return KvView{1, tokens, channels, tokens * channels, channels};
}

/// Where the scales live: scale (b, r, c) of scale_shape() is at
/// scales[b * batch_stride + r * row_stride + c], strides in elements, columns contiguous. A stride
/// of 0 (the default) means the contiguous one: row_stride = cols, batch_stride = rows * row_stride.
/// Examples, for per-token scales of a [T, H, D] cache seen per head (batch = H, one scale per row):
///   contiguous [H, T]                  : {}            (or {T, 1})
///   [H, T_max] (a capacity, not T)     : {T_max, 1}
///   [T, H] (vLLM's per token-head)     : {1, H}
struct ScaleStrides {
  std::int64_t batch_stride = 0;
  std::int64_t row_stride = 0;
};

/// How to quantize.
struct QuantSpec {
  Granularity granularity = Granularity::kPerChannel;
  /// Elements per scale along the reduced axis: channels for per-token, tokens for per-channel.
  /// 0 means the whole axis. A group longer than the axis is one (ragged) group; the last group
  /// of an axis may be ragged.
  std::int64_t group = 0;
  /// Optional counter, in the memory the operation runs on (device memory for the GPU API, host
  /// memory for the reference): each quantizing call adds the number of NaN/Inf inputs it read.
  unsigned long long* nonfinite_count = nullptr;
  /// The layout of the scale array (default: contiguous in scale_shape()).
  ScaleStrides scale_strides = {};
};

/// Number of scale groups along one axis of length `extent` (extent > 0).
constexpr std::int64_t group_count(std::int64_t extent, std::int64_t group) noexcept {
  return (group <= 0 || group >= extent) ? 1 : (extent + group - 1) / group;
}

/// Effective group length along an axis of length `extent`.
constexpr std::int64_t group_length(std::int64_t extent, std::int64_t group) noexcept {
  return (group <= 0 || group >= extent) ? extent : group;
}

/// Shape of the fp32 scale tensor, contiguous:
///   per-token:   [batch, tokens, ceil(channels / group)]
///   per-channel: [batch, ceil(tokens / group), channels]
struct ScaleShape {
  std::int64_t batch = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  constexpr std::int64_t size() const noexcept { return batch * rows * cols; }
};

constexpr ScaleShape scale_shape(const KvView& view, const QuantSpec& spec) noexcept {
  if (spec.granularity == Granularity::kPerToken)
    return ScaleShape{view.batch, view.tokens, view.channels > 0 ? group_count(view.channels, spec.group) : 0};
  return ScaleShape{view.batch, view.tokens > 0 ? group_count(view.tokens, spec.group) : 0, view.channels};
}

/// Number of fp32 scales an operation reads or writes.
constexpr std::int64_t scale_count(const KvView& view, const QuantSpec& spec) noexcept {
  return view.empty() ? 0 : scale_shape(view, spec).size();
}

/// spec.scale_strides with its zeros replaced by the contiguous strides of scale_shape(view, spec).
constexpr ScaleStrides scale_strides(const KvView& view, const QuantSpec& spec) noexcept {
  const ScaleShape shape = scale_shape(view, spec);
  const std::int64_t row = spec.scale_strides.row_stride != 0 ? spec.scale_strides.row_stride : shape.cols;
  const std::int64_t batch = spec.scale_strides.batch_stride != 0 ? spec.scale_strides.batch_stride : shape.rows * row;
  return ScaleStrides{batch, row};
}

/// Element offset of scale (b, r, c) of scale_shape(view, spec) in the scale array.
constexpr std::int64_t scale_offset(const KvView& view, const QuantSpec& spec, std::int64_t b, std::int64_t r,
                                    std::int64_t c) noexcept {
  const ScaleStrides st = scale_strides(view, spec);
  return b * st.batch_stride + r * st.row_stride + c;
}

namespace detail {

inline bool mul_overflows(std::int64_t a, std::int64_t b, std::int64_t* out) noexcept {
  return __builtin_mul_overflow(a, b, out);
}
inline bool add_overflows(std::int64_t a, std::int64_t b, std::int64_t* out) noexcept {
  return __builtin_add_overflow(a, b, out);
}

/// Largest element offset (b, t, c) = (batch-1, tokens-1, channels-1), or -1 on int64 overflow.
inline std::int64_t max_offset(const KvView& v) noexcept {
  std::int64_t a = 0, b = 0, sum = 0;
  if (mul_overflows(v.batch - 1, v.batch_stride, &a)) return -1;
  if (mul_overflows(v.tokens - 1, v.token_stride, &b)) return -1;
  if (add_overflows(a, b, &sum) || add_overflows(sum, v.channels - 1, &sum)) return -1;
  return sum;
}

/// True when no two (b, t, c) of the view share an address. Dimensions of extent 1 are ignored;
/// the rest, sorted by stride, must each step past everything the smaller ones span (the same
/// sufficient rule PyTorch uses for "non-overlapping"). Accepts [T,D], [B,H,T,D] and [T,H,D].
inline bool strides_do_not_overlap(const KvView& v) noexcept {
  struct Dim { std::int64_t stride, extent; };
  Dim dims[3] = {{1, v.channels}, {v.token_stride, v.tokens}, {v.batch_stride, v.batch}};
  if (dims[2].stride < dims[1].stride) { Dim t = dims[1]; dims[1] = dims[2]; dims[2] = t; }
  std::int64_t span = v.channels - 1;  // largest offset reachable by the smaller dimensions
  for (int i = 1; i < 3; ++i) {
    if (dims[i].extent <= 1) continue;
    if (dims[i].stride <= span) return false;
    std::int64_t reach = 0;
    if (mul_overflows(dims[i].extent - 1, dims[i].stride, &reach) || add_overflows(span, reach, &span))
      return false;
  }
  return true;
}

template <class P>
inline bool is_aligned(const P* p, std::size_t bytes) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace detail

namespace detail {
/// The scale array of a (valid, non-empty) view as a view of its own: (batch, rows, cols).
constexpr KvView scale_view(const KvView& view, const QuantSpec& spec) noexcept {
  const ScaleShape shape = scale_shape(view, spec);
  const ScaleStrides st = scale_strides(view, spec);
  return KvView{shape.batch, shape.rows, shape.cols, st.batch_stride, st.row_stride};
}
}  // namespace detail

/// Number of floats the scale array spans, from scale (0, 0, 0) to the last one inclusive: what to
/// allocate for it (scale_count() when the scales are contiguous). For a valid view and spec; 0 for
/// an empty view.
constexpr std::int64_t scale_extent(const KvView& view, const QuantSpec& spec) noexcept {
  if (view.empty()) return 0;
  const ScaleShape shape = scale_shape(view, spec);
  return scale_offset(view, spec, shape.batch - 1, shape.rows - 1, shape.cols - 1) + 1;
}

/// Checks a view and spec. Returns cudaSuccess, or cudaErrorInvalidValue for a negative size, a
/// negative group, a negative stride, strides under which two elements would share an address
/// (token_stride < channels, for example), or a view whose offsets overflow int64; the same for
/// the scale strides (negative, two scales at one address, overflow).
/// An empty view is valid (and every operation on it is a no-op).
inline cudaError_t validate(const KvView& view, const QuantSpec& spec) noexcept {
  if (view.batch < 0 || view.tokens < 0 || view.channels < 0) return cudaErrorInvalidValue;
  if (spec.group < 0) return cudaErrorInvalidValue;
  if (spec.granularity != Granularity::kPerToken && spec.granularity != Granularity::kPerChannel)
    return cudaErrorInvalidValue;
  if (view.empty()) return cudaSuccess;
  if ((view.batch > 1 && view.batch_stride <= 0) || (view.tokens > 1 && view.token_stride <= 0))
    return cudaErrorInvalidValue;
  if (view.batch_stride < 0 || view.token_stride < 0) return cudaErrorInvalidValue;
  std::int64_t n = 0;
  if (detail::mul_overflows(view.batch, view.tokens, &n) || detail::mul_overflows(n, view.channels, &n))
    return cudaErrorInvalidValue;
  if (detail::max_offset(view) < 0) return cudaErrorInvalidValue;
  if (!detail::strides_do_not_overlap(view)) return cudaErrorInvalidValue;
  if (spec.scale_strides.batch_stride < 0 || spec.scale_strides.row_stride < 0) return cudaErrorInvalidValue;
  const ScaleShape shape = scale_shape(view, spec);
  if (spec.scale_strides.batch_stride == 0 && spec.scale_strides.row_stride != 0 &&
      detail::mul_overflows(shape.rows, spec.scale_strides.row_stride, &n))
    return cudaErrorInvalidValue;  // the default batch stride, rows * row_stride, would overflow
  const KvView sv = detail::scale_view(view, spec);
  if (detail::max_offset(sv) < 0 || !detail::strides_do_not_overlap(sv)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

/// Checks one data pointer: null is cudaErrorInvalidValue, a pointer not aligned to its element
/// type is cudaErrorMisalignedAddress.
template <class P>
inline cudaError_t validate_pointer(const P* p) noexcept {
  if (p == nullptr) return cudaErrorInvalidValue;
  if (!detail::is_aligned(p, alignof(P))) return cudaErrorMisalignedAddress;
  return cudaSuccess;
}

/// Checks everything an operation receives: view and spec, then each (required) pointer in order.
/// Returns the first error found, before anything is read or written. On an empty view the
/// pointers are not looked at: the operation is a no-op.
template <class... Ptrs>
inline cudaError_t validate_arguments(const KvView& view, const QuantSpec& spec, const Ptrs*... ptrs) noexcept {
  cudaError_t err = validate(view, spec);
  if (err != cudaSuccess || view.empty()) return err;
  cudaError_t results[] = {validate_pointer(ptrs)...};
  for (cudaError_t e : results)
    if (e != cudaSuccess) return e;
  return cudaSuccess;
}

namespace detail {

/// The bytes [begin, end) from an operand's first element to its last.
struct ByteRange {
  std::uintptr_t begin = 0, end = 0;
};

inline bool overlap(ByteRange a, ByteRange b) noexcept { return a.begin < b.end && b.begin < a.end; }

/// Bytes spanned by a (valid, non-empty) view of elements of E at p.
template <class E>
inline ByteRange view_bytes(const E* p, const KvView& v) noexcept {
  const auto begin = reinterpret_cast<std::uintptr_t>(p);
  return {begin, begin + static_cast<std::uintptr_t>(max_offset(v) + 1) * sizeof(E)};
}

/// Bytes spanned by the scales of a (valid, non-empty) view.
inline ByteRange scale_bytes(const float* s, const KvView& v, const QuantSpec& spec) noexcept {
  return view_bytes(s, scale_view(v, spec));
}

/// cudaErrorInvalidValue when output `out` shares a byte with any of `others` (the operation's
/// inputs and its other output): the kernels read and write through __restrict__ pointers, so such
/// a call has no defined result. Judged on each operand's span, first element to last, which is
/// what the host can tell without walking the strides: operands interleaved in one buffer are
/// refused too.
template <class... Ranges>
inline cudaError_t validate_disjoint(ByteRange out, Ranges... others) noexcept {
  const bool any = (overlap(out, others) || ...);
  return any ? cudaErrorInvalidValue : cudaSuccess;
}

}  // namespace detail

/// What compute_scales() checks, here and in the CPU reference: validate_arguments(), then
/// cudaErrorInvalidValue when the scales overlap x.
template <class T>
inline cudaError_t validate_compute_scales(const T* x, const KvView& view, const QuantSpec& spec,
                                           const float* scales) noexcept {
  cudaError_t err = validate_arguments(view, spec, x, scales);
  if (err != cudaSuccess || view.empty()) return err;
  return detail::validate_disjoint(detail::scale_bytes(scales, view, spec), detail::view_bytes(x, view));
}

/// What quantize() checks: validate_arguments(), then that q and the scales overlap neither x nor
/// each other.
template <class T>
inline cudaError_t validate_quantize(const T* x, const KvView& view, const QuantSpec& spec, const std::int8_t* q,
                                     const float* scales) noexcept {
  cudaError_t err = validate_arguments(view, spec, x, q, scales);
  if (err != cudaSuccess || view.empty()) return err;
  const detail::ByteRange xs = detail::view_bytes(x, view), qs = detail::view_bytes(q, view),
                          ss = detail::scale_bytes(scales, view, spec);
  err = detail::validate_disjoint(qs, xs, ss);
  return err != cudaSuccess ? err : detail::validate_disjoint(ss, xs);
}

/// What quantize_with_scales() checks: validate_arguments(), then that q overlaps neither x nor
/// the scales.
template <class T>
inline cudaError_t validate_quantize_with_scales(const T* x, const float* scales, const KvView& view,
                                                 const QuantSpec& spec, const std::int8_t* q) noexcept {
  cudaError_t err = validate_arguments(view, spec, x, scales, q);
  if (err != cudaSuccess || view.empty()) return err;
  return detail::validate_disjoint(detail::view_bytes(q, view), detail::view_bytes(x, view),
                                   detail::scale_bytes(scales, view, spec));
}

/// What dequantize() checks: validate_arguments(), then that y overlaps neither q nor the scales.
template <class T>
inline cudaError_t validate_dequantize(const std::int8_t* q, const float* scales, const KvView& view,
                                       const QuantSpec& spec, const T* y) noexcept {
  cudaError_t err = validate_arguments(view, spec, q, scales, y);
  if (err != cudaSuccess || view.empty()) return err;
  return detail::validate_disjoint(detail::view_bytes(y, view), detail::view_bytes(q, view),
                                   detail::scale_bytes(scales, view, spec));
}

/// Short name for messages, benchmark labels and test names.
constexpr const char* to_string(Variant v) noexcept {
  switch (v) {
    case Variant::kAuto: return "auto";
    case Variant::kNaive: return "naive";
    case Variant::kTiled: return "tiled";
    case Variant::kCoarsened: return "coarsened";
    case Variant::kVectorized: return "vectorized";
  }
  return "unknown";
}

constexpr const char* to_string(Granularity g) noexcept {
  return g == Granularity::kPerToken ? "per_token" : "per_channel";
}

KVQ_NAMESPACE_END
