// bench/paged_ops.hpp: the paged cache's benchmark cases (kvq::append_kv), made and checked in
// paged_ops.cu, timed by kvq_bench.cu like every other case.
//
// Names read op/dtype/scheme/shape: append_kv/half/per_token_head/decode_S64_H8_D128_P16 is one
// decode step of 64 sequences (one new token each, 8 KV heads of 128 channels, pages of 16 tokens);
// .../prefill_T32768_H8_D128_P16 a prefill chunk of 32768 tokens of one sequence.
#pragma once

#include "bench_case.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kvq_bench {

struct PagedCase {
  DType dtype = DType::kHalf;
  bool decode = true;         // decode: `tokens` sequences with one token each; prefill: one sequence
  std::int64_t tokens = 0;
  std::int64_t kv_heads = 8;
  std::int64_t head_dim = 128;
  std::int64_t page_size = 16;
  bool by_page = false;       // kKeysPerChannelPage (keys per channel per page), else kPerTokenHead

  std::string name() const {
    const std::string shape = decode ? "decode_S" + std::to_string(tokens) : "prefill_T" + std::to_string(tokens);
    return std::string("append_kv/") + to_string(dtype) + (by_page ? "/keys_per_channel_page/" : "/per_token_head/") +
           shape + "_H" +
           std::to_string(kv_heads) + "_D" + std::to_string(head_dim) + "_P" + std::to_string(page_size);
  }
  /// K and V read, slots (and positions) read, codes and fp32 scales written: each once. Under
  /// kKeysPerChannelPage the key scales are one per channel per page filled.
  double bytes() const {
    const double rows = static_cast<double>(tokens * kv_heads), dim = static_cast<double>(head_dim);
    const double codes = 2 * rows * dim * (static_cast<double>(size_of(dtype)) + 1);
    const double k_scales = by_page ? static_cast<double>(tokens / page_size * kv_heads) * dim * 4 : rows * 4;
    return codes + rows * 4 + k_scales + static_cast<double>(tokens) * (by_page ? 16 : 8);
  }
};

/// The default workload's paged cases: decode steps of 1 to 256 sequences and a 32768-token
/// prefill chunk (pages of 16 and 64), fp16, bf16 and fp32, per token-head; and fp16 decode and
/// prefill with keys per channel per page.
std::vector<PagedCase> paged_cases();

/// One append's operands on the GPU: inputs filled, the cache poisoned, the call run once and the
/// whole cache (codes, scales and the bytes between) compared with kvq::reference::append_kv.
class PagedAppend {
 public:
  /// Throws std::runtime_error on a CUDA error or a result that differs from the reference.
  PagedAppend(const PagedCase& c, cudaStream_t stream);
  ~PagedAppend();
  PagedAppend(const PagedAppend&) = delete;
  PagedAppend& operator=(const PagedAppend&) = delete;
  cudaError_t launch(cudaStream_t stream) const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

/// Decode attention over a paged cache (kvq::decode_attention): 32 query / 8 KV heads of 128
/// channels by default, fp16 queries, pages of 64. Named
/// decode_attention/half/per_token_head/B8_T32768_Hq32_Hkv8_D128_P64.
struct DecodeCase {
  std::int64_t batch = 8;
  std::int64_t tokens = 32768;  // per sequence
  std::int64_t q_heads = 32;
  std::int64_t kv_heads = 8;
  std::int64_t head_dim = 128;
  std::int64_t page_size = 64;
  bool by_page = false;

  std::string name() const {
    return std::string("decode_attention/half/") + (by_page ? "keys_per_channel_page/" : "per_token_head/") + "B" +
           std::to_string(batch) + "_T" + std::to_string(tokens) + "_Hq" + std::to_string(q_heads) + "_Hkv" +
           std::to_string(kv_heads) + "_D" + std::to_string(head_dim) + "_P" + std::to_string(page_size);
  }
  /// Codes and scales of K and V read once, q read, out written.
  double bytes() const {
    const double rows = static_cast<double>(batch * tokens * kv_heads), dim = static_cast<double>(head_dim);
    const double k_scales = by_page ? static_cast<double>(batch * tokens / page_size * kv_heads) * dim * 4 : rows * 4;
    return 2 * rows * dim + rows * 4 + k_scales + 2.0 * static_cast<double>(batch * q_heads) * dim * 2;
  }
};

/// The default workload's decode cases: the four shapes, per token-head, and B=8 T=32768
/// with keys per channel per page.
std::vector<DecodeCase> decode_cases();
/// Head dims 64, 80, 96, 256 and groups 1, 8, 16 (B=8, each over >= 256 MB of codes): registered
/// for a filter only (e.g. '^decode_attention/'), not in the default workload.
std::vector<DecodeCase> decode_sweep_cases();

/// A cache of random codes and scales (pages shuffled), queries, a plan and its workspace; the
/// call run once and sequences 0 and batch - 1 compared with kvq::reference::decode_attention.
class DecodeAttention {
 public:
  DecodeAttention(const DecodeCase& c, cudaStream_t stream);  // throws std::runtime_error
  ~DecodeAttention();
  DecodeAttention(const DecodeAttention&) = delete;
  DecodeAttention& operator=(const DecodeAttention&) = delete;
  cudaError_t launch(cudaStream_t stream) const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace kvq_bench
