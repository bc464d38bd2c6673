// examples/torch/csrc/common.hpp: what every kvq torch op checks and how it calls kvq.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace kvq_torch {

/// Numbers, shapes and devices as text for error messages, formatted without iostreams: an
/// extension built by another GCC than the libstdc++ torch runs with was seen to crash formatting
/// a number through a stream (every message with a number in it), while text passes through.
inline std::string text(int64_t v) { return std::to_string(v); }
inline std::string text(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
inline std::string text(const at::Device& d) {
  return c10::DeviceTypeName(d.type(), /*lower_case=*/true) + (d.has_index() ? ":" + std::to_string(d.index()) : "");
}

/// t is a CUDA tensor (on `device` when given).
inline void check_cuda(const at::Tensor& t, const char* name, c10::optional<at::Device> device = c10::nullopt) {
  TORCH_CHECK(t.defined(), "kvq: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "kvq: ", name, " must be a CUDA tensor, got one on ", text(t.device()));
  if (device) TORCH_CHECK(t.device() == *device, "kvq: ", name, " is on ", text(t.device()), ", the other operands on ", text(*device));
}

inline void check_value_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "kvq: ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

/// A kvq status as a RuntimeError naming the op and the CUDA error (nothing was launched: kvq
/// validates before it launches).
inline void check_kvq(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "kvq::", op, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
              ")");
}

/// f(pointer) with t's data as float*, __half* or __nv_bfloat16*.
template <class F>
void dispatch_value_type(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(t.data_ptr<float>()); break;
    case at::kHalf: f(reinterpret_cast<__half*>(t.data_ptr<at::Half>())); break;
    case at::kBFloat16: f(reinterpret_cast<__nv_bfloat16*>(t.data_ptr<at::BFloat16>())); break;
    default: TORCH_CHECK(false, "kvq: unsupported dtype ", t.scalar_type());
  }
}

}  // namespace kvq_torch
