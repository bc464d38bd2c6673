// kvq/quantize.cuh: the host API.
//
// Free function templates for T in {float, __half, __nv_bfloat16}. Every one:
//   - takes its arguments in one order: data inputs, view and spec, outputs, stream;
//   - validates everything before any CUDA call and returns the error (nothing is touched):
//     cudaErrorInvalidValue for a null pointer, a negative size, a negative group, negative,
//     overlapping or overflowing strides, or an output whose span (first element to last) overlaps
//     another operand's (types.hpp: validate_quantize and its siblings); cudaErrorMisalignedAddress
//     for a pointer not aligned to its element type;
//   - returns cudaSuccess at once for an empty view (any size 0), whatever the pointers;
//   - returns cudaErrorNotSupported, touching nothing, for scale strides whose batches do not
//     follow each other at the row stride, over 2^31 scale rows or more (detail/scale_rows.cuh);
//   - otherwise enqueues its work on `stream` and returns the launch status (cudaPeekAtLastError);
//     it never allocates, synchronizes or throws, so it can be captured into a CUDA graph.
// Scales are fp32, shaped scale_shape(view, spec), contiguous unless spec.scale_strides says
// otherwise (types.hpp). Codes and values use the same view as the input. Any element-aligned
// pointer and any channel count work.
//
// These run the vectorized strategy (the fastest for every operation measured) and compile its
// kernels only. The study's other strategies (naive, tiled, coarsened), chosen by a Variant at run
// time, are in kvq/study.cuh: a translation unit that does not include it does not compile them.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/dispatch.cuh>
#include <kvq/detail/vectorized.cuh>
#include <kvq/numerics.hpp>
#include <kvq/types.hpp>

#include <cuda_runtime.h>

#include <cstdint>

KVQ_NAMESPACE_BEGIN

/// scales <- the scale of every group of x (amax over the group's finite values / 127; 1 for a
/// group with none). Per-channel over whole sequences takes two passes (amax, then finalize).
template <class T>
[[nodiscard]] inline cudaError_t compute_scales(const T* x,  // view (batch, tokens, channels)
                                                const KvView& view, const QuantSpec& spec,
                                                float* scales,  // scale_shape(view, spec)
                                                cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_compute_scales(x, view, spec, scales); err != cudaSuccess || view.empty())
    return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  return detail::scales_and_codes<detail::VectorizedStrategy>(x, view, spec, scales, nullptr, stream);
}

/// scales <- computed on the GPU from x, and q <- codes of x under them. One pass over x for
/// per-token and grouped per-channel; two for per-channel over whole sequences.
template <class T>
[[nodiscard]] inline cudaError_t quantize(const T* x,  // view (batch, tokens, channels)
                                          const KvView& view, const QuantSpec& spec,
                                          std::int8_t* q,  // same view as x
                                          float* scales,   // scale_shape(view, spec)
                                          cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_quantize(x, view, spec, q, scales); err != cudaSuccess || view.empty())
    return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  return detail::scales_and_codes<detail::VectorizedStrategy>(x, view, spec, scales, q, stream);
}

/// q <- codes of x under given (calibrated) scales: the paper's path. A scale that is not positive
/// and finite is read as 1.
template <class T>
[[nodiscard]] inline cudaError_t quantize_with_scales(const T* x,  // view (batch, tokens, channels)
                                                      const float* scales,  // scale_shape(view, spec)
                                                      const KvView& view, const QuantSpec& spec,
                                                      std::int8_t* q,  // same view as x
                                                      cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_quantize_with_scales(x, scales, view, spec, q); err != cudaSuccess || view.empty())
    return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  return detail::codes_from_scales<detail::VectorizedStrategy>(x, scales, view, spec, q, stream);
}

/// y <- float(q) * scale, rounded to T (round to nearest even).
template <class T>
[[nodiscard]] inline cudaError_t dequantize(const std::int8_t* q,  // view (batch, tokens, channels)
                                            const float* scales,   // scale_shape(view, spec)
                                            const KvView& view, const QuantSpec& spec,
                                            T* y,  // same view as q
                                            cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_dequantize(q, scales, view, spec, y); err != cudaSuccess || view.empty())
    return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  return detail::values_from_codes<detail::VectorizedStrategy>(q, scales, view, spec, y, stream);
}

KVQ_NAMESPACE_END
