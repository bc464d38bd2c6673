// bench/ops_impl.cuh: the body of launch_<dtype>; included only by ops_<dtype>.cu.
#pragma once

#include "ops.hpp"

#include <kvq/study.cuh>

namespace kvq_bench {

template <class T>
cudaError_t launch_as(const Launch& l) {
  const T* x = static_cast<const T*>(l.tensors.x);
  T* y = static_cast<T*>(l.tensors.y);
  std::int8_t* q = l.tensors.q;
  float* scales = l.tensors.scales;
  switch (l.op) {
    case Op::kComputeScales: return kvq::compute_scales<T>(x, l.view, l.spec, scales, l.variant, l.stream);
    case Op::kQuantize: return kvq::quantize<T>(x, l.view, l.spec, q, scales, l.variant, l.stream);
    case Op::kQuantizeWithScales:
      return kvq::quantize_with_scales<T>(x, scales, l.view, l.spec, q, l.variant, l.stream);
    case Op::kDequantize: return kvq::dequantize<T>(q, scales, l.view, l.spec, y, l.variant, l.stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvq_bench
