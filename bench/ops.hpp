// bench/ops.hpp: one entry point that runs any operation of the kvq host API for any dtype.
//
// Each dtype is instantiated in its own translation unit (ops_float.cu, ops_half.cu,
// ops_bfloat16.cu): instantiating the API for one dtype compiles every strategy's kernels, about a
// minute of nvcc each, so three files build in parallel and the driver never includes the kernels.
#pragma once

#include "bench_case.hpp"

#include <cuda_runtime_api.h>

namespace kvq_bench {

/// The arguments of one call. x and y point to elements of the dtype named by the call.
struct Launch {
  Op op = Op::kQuantize;
  DeviceTensors tensors;
  kvq::KvView view;
  kvq::QuantSpec spec;
  kvq::Variant variant = kvq::Variant::kAuto;
  cudaStream_t stream = nullptr;
};

cudaError_t launch_float(const Launch& l);
cudaError_t launch_half(const Launch& l);
cudaError_t launch_bfloat16(const Launch& l);

/// Enqueues l.op on l.stream through the public API (no synchronization).
inline cudaError_t launch(DType t, const Launch& l) {
  switch (t) {
    case DType::kFloat: return launch_float(l);
    case DType::kHalf: return launch_half(l);
    case DType::kBfloat16: return launch_bfloat16(l);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvq_bench
