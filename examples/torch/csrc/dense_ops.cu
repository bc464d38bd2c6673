// examples/torch/csrc/dense_ops.cu: kvq's dense operations as torch custom ops (namespace `kvq`).
//
// x is a KV tensor [tokens, channels] or [batch, tokens, channels] (fp32, fp16 or bf16) with its
// channels contiguous; its other strides are passed to kvq as they are (a per-head view of a
// [T, H, D] cache needs no copy). Scales are fp32 [batch, rows, cols] as kvq::scale_shape gives them
// (the batch axis dropped for a 2-D x), contiguous. Every op runs on the current torch stream and
// allocates its outputs through torch's allocator; a kvq error becomes a RuntimeError naming it.
#include "common.hpp"

#include <kvq/quantize.cuh>

namespace kvq_torch {
namespace {

kvq::QuantSpec spec_of(const std::string& granularity, int64_t group) {
  TORCH_CHECK(granularity == "per_token" || granularity == "per_channel",
              "kvq: granularity must be 'per_token' or 'per_channel', got '", granularity, "'");
  TORCH_CHECK(group >= 0, "kvq: group must be >= 0 (0: the whole axis), got ", text(group));
  kvq::QuantSpec spec;
  spec.granularity = granularity == "per_token" ? kvq::Granularity::kPerToken : kvq::Granularity::kPerChannel;
  spec.group = group;
  return spec;
}

/// The kvq view of x (2-D or 3-D, channels contiguous).
kvq::KvView view_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "kvq: ", name, " must be [tokens, channels] or [batch, tokens, channels], got ",
              text(x.dim()), " dimensions");
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, "kvq: ", name, "'s channels must be contiguous (stride(-1) == 1)");
  kvq::KvView v;
  v.batch = x.dim() == 3 ? x.size(0) : 1;
  v.tokens = x.size(-2);
  v.channels = x.size(-1);
  v.token_stride = x.stride(-2);
  v.batch_stride = x.dim() == 3 ? x.stride(0) : v.tokens * v.token_stride;
  return v;
}

std::vector<int64_t> scale_sizes(const at::Tensor& x, const kvq::KvView& v, const kvq::QuantSpec& spec) {
  const kvq::ScaleShape s = kvq::scale_shape(v, spec);
  if (x.dim() == 3) return {s.batch, s.rows, s.cols};
  return {s.rows, s.cols};
}

void check_scales(const at::Tensor& scales, const at::Tensor& x, const kvq::KvView& v, const kvq::QuantSpec& spec) {
  check_cuda(scales, "scales", x.device());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "kvq: scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(scale_sizes(x, v, spec)), "kvq: scales must be ",
              text(scale_sizes(x, v, spec)), " for this x and granularity, got ", text(scales.sizes()));
  TORCH_CHECK(scales.is_contiguous(), "kvq: scales must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, const std::string& granularity, int64_t group) {
  check_cuda(x, "x");
  check_value_dtype(x, "x");
  const kvq::QuantSpec spec = spec_of(granularity, group);
  const kvq::KvView v = view_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty_strided(x.sizes(), x.strides(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty(scale_sizes(x, v, spec), x.options().dtype(at::kFloat));
  dispatch_value_type(x, [&](auto* p) {
    check_kvq(kvq::quantize(p, v, spec, q.data_ptr<int8_t>(), scales.data_ptr<float>(), current_stream()), "quantize");
  });
  return {q, scales};
}

at::Tensor quantize_with_scales(const at::Tensor& x, const at::Tensor& scales, const std::string& granularity,
                                int64_t group) {
  check_cuda(x, "x");
  check_value_dtype(x, "x");
  const kvq::QuantSpec spec = spec_of(granularity, group);
  const kvq::KvView v = view_of(x, "x");
  check_scales(scales, x, v, spec);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty_strided(x.sizes(), x.strides(), x.options().dtype(at::kChar));
  dispatch_value_type(x, [&](auto* p) {
    check_kvq(kvq::quantize_with_scales(p, scales.data_ptr<float>(), v, spec, q.data_ptr<int8_t>(), current_stream()),
              "quantize_with_scales");
  });
  return q;
}

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scales, const std::string& granularity, int64_t group,
                      at::ScalarType dtype) {
  check_cuda(q, "q");
  TORCH_CHECK(q.scalar_type() == at::kChar, "kvq: q must be int8, got ", q.scalar_type());
  const kvq::QuantSpec spec = spec_of(granularity, group);
  const kvq::KvView v = view_of(q, "q");
  check_scales(scales, q, v, spec);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor y = at::empty_strided(q.sizes(), q.strides(), q.options().dtype(dtype));
  check_value_dtype(y, "dtype");
  dispatch_value_type(y, [&](auto* p) {
    check_kvq(kvq::dequantize(q.data_ptr<int8_t>(), scales.data_ptr<float>(), v, spec, p, current_stream()),
              "dequantize");
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvq, m) {
  m.def("quantize(Tensor x, str granularity, int group=0) -> (Tensor, Tensor)");
  m.def("quantize_with_scales(Tensor x, Tensor scales, str granularity, int group=0) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scales, str granularity, int group, ScalarType dtype) -> Tensor");
}

// For CPU too: tensors on the wrong device then reach the op's own checks (a RuntimeError naming
// the argument) rather than the dispatcher's "could not run with arguments from the CPU backend".
namespace {
void impl_ops(torch::Library& m) {
  m.impl("quantize", &quantize);
  m.impl("quantize_with_scales", &quantize_with_scales);
  m.impl("dequantize", &dequantize);
}
}  // namespace

TORCH_LIBRARY_IMPL(kvq, CUDA, m) { impl_ops(m); }
TORCH_LIBRARY_IMPL(kvq, CPU, m) { impl_ops(m); }

}  // namespace kvq_torch
