// kvq/quantize.cuh: the host API.
//
// Free function templates for T in {float, __half, __nv_bfloat16}. Every one:
//   - takes its arguments in one order: data inputs, view and spec, outputs, variant, stream;
//   - validates everything before any CUDA call and returns the error (nothing is touched):
//     cudaErrorInvalidValue for a null pointer, a negative size, a negative group, negative,
//     overlapping or overflowing strides, or an unknown variant; cudaErrorMisalignedAddress for a
//     pointer not aligned to its element type;
//   - returns cudaSuccess at once for an empty view (any size 0), whatever the pointers;
//   - otherwise enqueues its work on `stream` and returns the launch status (cudaPeekAtLastError);
//     it never allocates, synchronizes or throws, so it can be captured into a CUDA graph.
// Scales are fp32, contiguous, laid out as scale_shape(view, spec). Codes and values use the same
// view as the input. Any element-aligned pointer and any channel count work with every variant.
#pragma once

#include <kvq/detail/dispatch.cuh>
#include <kvq/numerics.hpp>
#include <kvq/types.hpp>

#include <cuda_runtime.h>

#include <cstdint>

namespace kvq {
namespace detail {
inline namespace v0_1 {
template <class... Ptrs>
inline cudaError_t validate_call(const KvView& view, const QuantSpec& spec, Variant variant, const Ptrs*... ptrs) {
  if (!valid_variant(variant)) return cudaErrorInvalidValue;
  return validate_arguments(view, spec, ptrs...);
}
}  // namespace v0_1
}  // namespace detail

/// scales <- the scale of every group of x (amax over the group's finite values / 127; 1 for a
/// group with none). Per-channel over whole sequences takes two passes (amax, then finalize).
template <class T>
[[nodiscard]] inline cudaError_t compute_scales(const T* x,  // view (batch, tokens, channels)
                                                const KvView& view, const QuantSpec& spec,
                                                float* scales,  // scale_shape(view, spec)
                                                Variant variant = Variant::kAuto, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = detail::validate_call(view, spec, variant, x, scales); err != cudaSuccess || view.empty())
    return err;
  return detail::scales_and_codes<T>(x, view, spec, scales, nullptr, variant, stream);
}

/// scales <- computed on the GPU from x, and q <- codes of x under them. One pass over x for
/// per-token and grouped per-channel; two for per-channel over whole sequences.
template <class T>
[[nodiscard]] inline cudaError_t quantize(const T* x,  // view (batch, tokens, channels)
                                          const KvView& view, const QuantSpec& spec,
                                          std::int8_t* q,  // same view as x
                                          float* scales,   // scale_shape(view, spec)
                                          Variant variant = Variant::kAuto, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = detail::validate_call(view, spec, variant, x, q, scales); err != cudaSuccess || view.empty())
    return err;
  return detail::scales_and_codes<T>(x, view, spec, scales, q, variant, stream);
}

/// q <- codes of x under given (calibrated) scales: the paper's path. A scale that is not positive
/// and finite is read as 1.
template <class T>
[[nodiscard]] inline cudaError_t quantize_with_scales(const T* x,  // view (batch, tokens, channels)
                                                      const float* scales,  // scale_shape(view, spec)
                                                      const KvView& view, const QuantSpec& spec,
                                                      std::int8_t* q,  // same view as x
                                                      Variant variant = Variant::kAuto,
                                                      cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = detail::validate_call(view, spec, variant, x, scales, q); err != cudaSuccess || view.empty())
    return err;
  return detail::codes_from_scales<T>(x, scales, view, spec, q, variant, stream);
}

/// y <- float(q) * scale, rounded to T (round to nearest even).
template <class T>
[[nodiscard]] inline cudaError_t dequantize(const std::int8_t* q,  // view (batch, tokens, channels)
                                            const float* scales,   // scale_shape(view, spec)
                                            const KvView& view, const QuantSpec& spec,
                                            T* y,  // same view as q
                                            Variant variant = Variant::kAuto, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = detail::validate_call(view, spec, variant, q, scales, y); err != cudaSuccess || view.empty())
    return err;
  return detail::values_from_codes<T>(q, scales, view, spec, y, variant, stream);
}

}  // namespace kvq
