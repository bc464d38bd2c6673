// tests/header_hygiene/two_tus.hpp: what each of the two translation units does with kvq.
//
// two_tus_main.cu and two_tus_other.cu both include this, so each compiles its own copy of
// exercise_kvq (internal linkage) and with it its own instantiations of kvq's host API, device
// blocks, CPU reference and metrics. Linking the two checks that nothing kvq emits is a plain
// (non-inline, non-template) definition, which would be defined twice. Nothing here needs a GPU:
// the kernels are compiled and registered, never launched.
#pragma once

#include <kvq/kvq.cuh>

#include <cstdint>

int use_kvq_in_main_tu();   // two_tus_main.cu
int use_kvq_in_other_tu();  // two_tus_other.cu

namespace two_tus {
namespace {

/// One warp per row: the engine-side quantize block.
__global__ void quantize_rows(const __half* x,  // (rows, n)
                              std::int64_t n,
                              std::int8_t* q,   // (rows, n)
                              float* scales) {  // (rows)
  const std::int64_t row = blockIdx.x;
  kvq::device::quantize_row_warp(x + row * n, n, q + row * n, scales + row);
}

/// Four codes per thread: the engine-side dequantize blocks.
__global__ void dequantize_fours(const std::int8_t* q,  // (4 * threads)
                                 float scale,
                                 __half* y) {  // (4 * threads)
  const auto codes = kvq::device::load<4>(q + 4 * threadIdx.x);
  kvq::device::store<4>(y + 4 * threadIdx.x, kvq::device::dequantize<__half>(codes, scale));
}

/// Number of failed expectations.
int exercise_kvq() {
  int failures = 0;
  const kvq::QuantSpec per_token{kvq::Granularity::kPerToken, 0};
  const kvq::KvView row = kvq::contiguous_view(1, 4);

  // Host API, instantiated for __half. An empty view returns at once and a null pointer is
  // rejected by validation: neither reaches CUDA.
  failures += kvq::quantize<__half>(nullptr, kvq::KvView{}, per_token, nullptr, nullptr) != cudaSuccess;
  failures += kvq::quantize<__half>(nullptr, row, per_token, nullptr, nullptr) != cudaErrorInvalidValue;

  // CPU reference and metrics.
  const __half x[4] = {kvq::from_float<__half>(1.0f), kvq::from_float<__half>(-2.0f),
                       kvq::from_float<__half>(0.0f), kvq::from_float<__half>(4.0f)};
  std::int8_t q[4] = {};
  float scale = 0.0f;
  failures += kvq::reference::quantize(x, row, per_token, q, &scale) != cudaSuccess;
  failures += q[2] != 0 || q[3] != 127 || scale != kvq::scale_from_amax(4.0f);
  failures += kvq::metrics::max_abs_error(x, x, 4) != 0.0;

  // Reference the kernels, so that each unit keeps (and registers) its own.
  const void* kernels[] = {reinterpret_cast<const void*>(&quantize_rows),
                           reinterpret_cast<const void*>(&dequantize_fours)};
  failures += kernels[0] == kernels[1];
  return failures;
}

}  // namespace
}  // namespace two_tus
