// kvq/detail/naive.cuh: the naive strategy, one thread per element.
//
// Scales come from a separate element-wise reduction (atomicMax of |x| bits into the zeroed scale
// buffer, then a finalize pass); codes and values are computed one element per thread with 64-bit
// index arithmetic. It is the baseline of the study: simple enough to trust, slow where a group is
// long (every element of a group hits the same address) and never chosen by Variant::kAuto.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_kernels.cuh>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct NaivePolicy {
  static constexpr int kThreads = 256;  // any multiple of the warp size does; 256 was not worse on the H200
};

/// The view and spec, and where element (b, t, c)'s scale lives.
struct NaiveIndex {
  std::int64_t batch, tokens, channels, batch_stride, token_stride;
  std::int64_t group, groups;
  bool per_token;
  ScaleRows scale_rows;

  NaiveIndex(const KvView& v, const QuantSpec& s)
      : batch(v.batch), tokens(v.tokens), channels(v.channels), batch_stride(v.batch_stride),
        token_stride(v.token_stride), per_token(s.granularity == Granularity::kPerToken), scale_rows(v, s) {
    group = per_token ? group_length(v.channels, s.group) : group_length(v.tokens, s.group);
    groups = per_token ? group_count(v.channels, s.group) : group_count(v.tokens, s.group);
  }
  __device__ std::int64_t size() const { return batch * tokens * channels; }
  /// Element i of the logical (batch, tokens, channels) order: its offset and its scale's index.
  __device__ void locate(std::int64_t i, std::int64_t& offset, std::int64_t& scale) const {
    const std::int64_t c = i % channels, row = i / channels;
    const std::int64_t t = row % tokens, b = row / tokens;
    offset = b * batch_stride + t * token_stride + c;
    scale = per_token ? scale_rows.base(row) + c / group : scale_rows.base(b * groups + t / group) + c;
  }
};

template <class T>
KVQ_KERNEL void naive_amax_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                                  NaiveIndex ix,
                                  unsigned int* __restrict__ amax_bits,  // scale_shape, zeroed
                                  unsigned long long* nonfinite) {
  const std::int64_t n = ix.size();
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t off, si;
    ix.locate(i, off, si);
    const float v = to_float(x[off]);
    if (nonfinite != nullptr && !is_finite(v)) atomicAdd(nonfinite, 1ull);
    const std::uint32_t a = finite_abs_bits(v);
    if (a != 0) atomicMax(amax_bits + si, a);
  }
}

template <class T>
KVQ_KERNEL void naive_quantize_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                                      const float* __restrict__ scales,  // scale_shape
                                      NaiveIndex ix,
                                      std::int8_t* __restrict__ q,  // same view
                                      unsigned long long* nonfinite) {
  const std::int64_t n = ix.size();
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t off, si;
    ix.locate(i, off, si);
    const float v = to_float(x[off]);
    if (nonfinite != nullptr && !is_finite(v)) atomicAdd(nonfinite, 1ull);
    q[off] = quantize_value(v, sanitize_scale(scales[si]));
  }
}

template <class T>
KVQ_KERNEL void naive_dequantize_kernel(const std::int8_t* __restrict__ q,  // view (batch, tokens, channels)
                                        const float* __restrict__ scales,  // scale_shape
                                        NaiveIndex ix,
                                        T* __restrict__ y) {  // same view
  const std::int64_t n = ix.size();
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t off, si;
    ix.locate(i, off, si);
    y[off] = dequantize_value<T>(q[off], sanitize_scale(scales[si]));
  }
}

struct NaiveStrategy {
  static unsigned grid(const KvView& v) {
    return grid_for(ceil_div<std::int64_t>(v.size(), NaivePolicy::kThreads));
  }

  /// scales <- the scale of every group (zero, atomic amax, finalize).
  template <class T>
  static cudaError_t compute_scales(const T* x, const KvView& view, const QuantSpec& spec, float* scales,
                                    cudaStream_t stream) {
    KVQ_TRY(scale_step<ScaleStep::kZero>(scales, view, spec, stream));
    naive_amax_kernel<<<grid(view), NaivePolicy::kThreads, 0, stream>>>(
        x, NaiveIndex(view, spec), reinterpret_cast<unsigned int*>(scales), spec.nonfinite_count);
    KVQ_TRY(check_launch());
    return scale_step<ScaleStep::kFinalize>(scales, view, spec, stream);
  }

  template <class T>
  static cudaError_t quantize_with_scales(const T* x, const float* scales, const KvView& view, const QuantSpec& spec,
                                          std::int8_t* q, unsigned long long* nonfinite, cudaStream_t stream) {
    naive_quantize_kernel<<<grid(view), NaivePolicy::kThreads, 0, stream>>>(x, scales, NaiveIndex(view, spec), q,
                                                                            nonfinite);
    return check_launch();
  }

  template <class T>
  static cudaError_t dequantize(const std::int8_t* q, const float* scales, const KvView& view, const QuantSpec& spec,
                                T* y, cudaStream_t stream) {
    naive_dequantize_kernel<<<grid(view), NaivePolicy::kThreads, 0, stream>>>(q, scales, NaiveIndex(view, spec), y);
    return check_launch();
  }
};

}  // namespace detail
KVQ_NAMESPACE_END
