// kvq/detail/dispatch.cuh: operations x strategies.
#pragma once

#include <kvq/detail/coarsened.cuh>
#include <kvq/detail/naive.cuh>
#include <kvq/detail/tiled.cuh>
#include <kvq/detail/vectorized.cuh>

#include <type_traits>

namespace kvq {
namespace detail {
inline namespace v0_1 {

template <class T>
constexpr bool kSupportedType =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

inline bool valid_variant(Variant v) {
  return v == Variant::kAuto || v == Variant::kNaive || v == Variant::kTiled || v == Variant::kCoarsened ||
         v == Variant::kVectorized;
}

/// What Variant::kAuto runs. Vectorized was the fastest strategy for every operation, dtype and
/// shape measured on the H200 (bench/results/h200.md); the others remain selectable for study.
inline Variant resolve(Variant v) { return v == Variant::kAuto ? Variant::kVectorized : v; }

/// Calls f(Strategy{}) with the tile strategy of a (resolved, non-naive) variant.
template <class F>
cudaError_t with_tile_strategy(Variant v, F&& f) {
  switch (v) {
    case Variant::kTiled: return f(TiledStrategy{});
    case Variant::kCoarsened: return f(CoarsenedStrategy{});
    default: return f(VectorizedStrategy{});
  }
}

/// scales <- scales of x; and q <- codes of x under them when q is not null.
template <class T>
cudaError_t scales_and_codes(const T* x, const KvView& view, const QuantSpec& spec, float* scales, std::int8_t* q,
                             Variant variant, cudaStream_t stream) {
  QuantSpec uncounted = spec;  // the codes pass reads x again: count its NaN/Inf only once
  uncounted.nonfinite_count = nullptr;
  variant = resolve(variant);
  if (variant == Variant::kNaive) {
    KVQ_TRY(NaiveStrategy::compute_scales(x, view, spec, scales, stream));
    return q == nullptr ? cudaSuccess : NaiveStrategy::quantize_with_scales(x, scales, view, spec, q, nullptr, stream);
  }
  return with_tile_strategy(variant, [&](auto strategy) -> cudaError_t {
    using S = decltype(strategy);
    if (!per_channel_two_pass(view, spec)) return S::scales(x, view, spec, TileMode::kScales, scales, q, stream);
    const std::int64_t n = scale_count(view, spec);
    KVQ_TRY(cudaMemsetAsync(scales, 0, static_cast<std::size_t>(n) * sizeof(float), stream));
    KVQ_TRY(S::scales(x, view, spec, TileMode::kAtomicAmax, scales, nullptr, stream));
    KVQ_TRY(finalize_scales(scales, n, stream));
    return q == nullptr ? cudaSuccess : S::template codes_under_own_scales<T>(x, scales, view, uncounted, q, stream);
  });
}

template <class T>
cudaError_t codes_from_scales(const T* x, const float* scales, const KvView& view, const QuantSpec& spec,
                              std::int8_t* q, Variant variant, cudaStream_t stream) {
  variant = resolve(variant);
  if (variant == Variant::kNaive)
    return NaiveStrategy::quantize_with_scales(x, scales, view, spec, q, spec.nonfinite_count, stream);
  return with_tile_strategy(variant, [&](auto strategy) -> cudaError_t {
    return decltype(strategy)::template apply<T>(x, scales, view, spec, q, stream);
  });
}

template <class T>
cudaError_t values_from_codes(const std::int8_t* q, const float* scales, const KvView& view, const QuantSpec& spec,
                              T* y, Variant variant, cudaStream_t stream) {
  variant = resolve(variant);
  if (variant == Variant::kNaive) return NaiveStrategy::dequantize(q, scales, view, spec, y, stream);
  return with_tile_strategy(variant, [&](auto strategy) -> cudaError_t {
    return decltype(strategy)::template apply<T>(q, scales, view, spec, y, stream);
  });
}

}  // namespace v0_1
}  // namespace detail
}  // namespace kvq
