// kvq/detail/dispatch.cuh: an operation on one tile strategy (vectorized, tiled or coarsened).
//
// The host API (quantize.cuh) instantiates these for VectorizedStrategy only; study.cuh for the
// strategy a Variant names. A translation unit thus compiles the kernels of the strategies it
// calls, and no others.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_plan.cuh>
#include <kvq/detail/tile_kernels.cuh>
#include <kvq/types.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

KVQ_NAMESPACE_BEGIN
namespace detail {

/// scales <- scales of x; and q <- codes of x under them when q is not null.
template <class S, class T>
cudaError_t scales_and_codes(const T* x, const KvView& view, const QuantSpec& spec, float* scales, std::int8_t* q,
                             cudaStream_t stream) {
  if (!per_channel_two_pass(view, spec)) return S::scales(x, view, spec, TileMode::kScales, scales, q, stream);
  QuantSpec uncounted = spec;  // the codes pass reads x again: count its NaN/Inf only once
  uncounted.nonfinite_count = nullptr;
  KVQ_TRY(scale_step<ScaleStep::kZero>(scales, view, spec, stream));
  KVQ_TRY(S::scales(x, view, spec, TileMode::kAtomicAmax, scales, nullptr, stream));
  KVQ_TRY(scale_step<ScaleStep::kFinalize>(scales, view, spec, stream));
  return q == nullptr ? cudaSuccess : S::template codes_under_own_scales<T>(x, scales, view, uncounted, q, stream);
}

/// q <- codes of x under given scales.
template <class S, class T>
cudaError_t codes_from_scales(const T* x, const float* scales, const KvView& view, const QuantSpec& spec,
                              std::int8_t* q, cudaStream_t stream) {
  return S::template apply<T>(x, scales, view, spec, q, stream);
}

/// y <- values of q under given scales.
template <class S, class T>
cudaError_t values_from_codes(const std::int8_t* q, const float* scales, const KvView& view, const QuantSpec& spec,
                              T* y, cudaStream_t stream) {
  return S::template apply<T>(q, scales, view, spec, y, stream);
}

}  // namespace detail
KVQ_NAMESPACE_END
