// kvq/study.cuh: the paper's kernel strategies, chosen at run time by a Variant.
//
// The host API of quantize.cuh with one more argument before the stream:
//   kvq::quantize(x, view, spec, q, scales, Variant::kTiled, stream);
// kAuto and kVectorized run what quantize.cuh runs; kNaive, kTiled and kCoarsened the study's
// other strategies (types.hpp says what each does). For the benchmark, the tests and anyone
// comparing strategies: including this header compiles every strategy's kernels for each call
// (about three times the kernels of quantize.cuh), so engines include quantize.cuh instead.
// Validation and errors as in quantize.cuh, plus cudaErrorInvalidValue for an unknown variant.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/coarsened.cuh>
#include <kvq/detail/naive.cuh>
#include <kvq/detail/tiled.cuh>
#include <kvq/quantize.cuh>

KVQ_NAMESPACE_BEGIN
namespace detail {

inline bool valid_variant(Variant v) {
  return v == Variant::kAuto || v == Variant::kNaive || v == Variant::kTiled || v == Variant::kCoarsened ||
         v == Variant::kVectorized;
}

/// Calls f(Strategy{}) with the tile strategy of a variant other than kNaive (kAuto: vectorized,
/// the fastest strategy for every operation, dtype and shape measured on the H200).
template <class F>
cudaError_t with_tile_strategy(Variant v, F&& f) {
  switch (v) {
    case Variant::kTiled: return f(TiledStrategy{});
    case Variant::kCoarsened: return f(CoarsenedStrategy{});
    default: return f(VectorizedStrategy{});
  }
}


}  // namespace detail

/// compute_scales() of quantize.cuh, by the strategy `variant` names.
template <class T>
[[nodiscard]] inline cudaError_t compute_scales(const T* x,  // view (batch, tokens, channels)
                                                const KvView& view, const QuantSpec& spec,
                                                float* scales,  // scale_shape(view, spec)
                                                Variant variant, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (!detail::valid_variant(variant)) return cudaErrorInvalidValue;
  if (cudaError_t err = validate_compute_scales(x, view, spec, scales); err != cudaSuccess || view.empty()) return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  if (variant == Variant::kNaive) return detail::NaiveStrategy::compute_scales(x, view, spec, scales, stream);
  return detail::with_tile_strategy(variant, [&](auto s) {
    return detail::scales_and_codes<decltype(s)>(x, view, spec, scales, nullptr, stream);
  });
}

/// quantize() of quantize.cuh, by the strategy `variant` names.
template <class T>
[[nodiscard]] inline cudaError_t quantize(const T* x,  // view (batch, tokens, channels)
                                          const KvView& view, const QuantSpec& spec,
                                          std::int8_t* q,  // same view as x
                                          float* scales,   // scale_shape(view, spec)
                                          Variant variant, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (!detail::valid_variant(variant)) return cudaErrorInvalidValue;
  if (cudaError_t err = validate_quantize(x, view, spec, q, scales); err != cudaSuccess || view.empty()) return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  if (variant == Variant::kNaive) {
    KVQ_TRY(detail::NaiveStrategy::compute_scales(x, view, spec, scales, stream));
    return detail::NaiveStrategy::quantize_with_scales(x, scales, view, spec, q, nullptr, stream);
  }
  return detail::with_tile_strategy(variant, [&](auto s) {
    return detail::scales_and_codes<decltype(s)>(x, view, spec, scales, q, stream);
  });
}

/// quantize_with_scales() of quantize.cuh, by the strategy `variant` names.
template <class T>
[[nodiscard]] inline cudaError_t quantize_with_scales(const T* x,  // view (batch, tokens, channels)
                                                      const float* scales,  // scale_shape(view, spec)
                                                      const KvView& view, const QuantSpec& spec,
                                                      std::int8_t* q,  // same view as x
                                                      Variant variant, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (!detail::valid_variant(variant)) return cudaErrorInvalidValue;
  if (cudaError_t err = validate_quantize_with_scales(x, scales, view, spec, q); err != cudaSuccess || view.empty()) return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  if (variant == Variant::kNaive)
    return detail::NaiveStrategy::quantize_with_scales(x, scales, view, spec, q, spec.nonfinite_count, stream);
  return detail::with_tile_strategy(variant, [&](auto s) {
    return detail::codes_from_scales<decltype(s)>(x, scales, view, spec, q, stream);
  });
}

/// dequantize() of quantize.cuh, by the strategy `variant` names.
template <class T>
[[nodiscard]] inline cudaError_t dequantize(const std::int8_t* q,  // view (batch, tokens, channels)
                                            const float* scales,   // scale_shape(view, spec)
                                            const KvView& view, const QuantSpec& spec,
                                            T* y,  // same view as q
                                            Variant variant, cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (!detail::valid_variant(variant)) return cudaErrorInvalidValue;
  if (cudaError_t err = validate_dequantize(q, scales, view, spec, y); err != cudaSuccess || view.empty()) return err;
  if (!detail::scale_rows_supported(view, spec)) return cudaErrorNotSupported;
  if (variant == Variant::kNaive) return detail::NaiveStrategy::dequantize(q, scales, view, spec, y, stream);
  return detail::with_tile_strategy(variant, [&](auto s) {
    return detail::values_from_codes<decltype(s)>(q, scales, view, spec, y, stream);
  });
}

KVQ_NAMESPACE_END
