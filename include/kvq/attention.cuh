// kvq/attention.cuh: decode attention straight from the paged int8 cache.
//
// One query token per sequence, grouped-query attention, both cache layouts and both scales
// schemes (under kKeysPerChannelPage the open page's keys and the sinks come from their
// full-precision buffers), dequantized in registers and shared memory, never materialized.
// Shapes, plan and validation are in kvq/attention.hpp; the CPU oracle is
// kvq::reference::decode_attention.
#pragma once

#include <kvq/version.hpp>

#include <kvq/attention.hpp>
#include <kvq/detail/attention_kernels.cuh>
#include <kvq/detail/config.cuh>
#include <kvq/paged.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

KVQ_NAMESPACE_BEGIN

/// out (and lse, optional: the natural log of the softmax's sum per (sequence, query head), for
/// merging with attention over other tokens) <- decode attention of each sequence's query heads
/// over its cached tokens, with the work split by `plan` (make_decode_plan, from static limits:
/// the grid is fixed, so a captured call replays with other lengths and contents). `workspace`:
/// device memory of decode_workspace_bytes(plan). Sequences of length 0 give 0 (lse -inf).
/// Untrusted table data is skipped and counted in *error_count (device memory, optional): a
/// length below 0 or past the table's pages or the plan's max_seq_len (or, under
/// kKeysPerChannelPage, an id outside the cache) makes the sequence empty, counted once; a page
/// outside the pool drops its tokens from the softmax, counted once per token.
/// Bad arguments (validate_decode_attention) return an error with nothing enqueued:
/// cudaErrorInvalidValue, cudaErrorMisalignedAddress. T in {__half, __nv_bfloat16, float}.
template <class T>
[[nodiscard]] inline cudaError_t decode_attention(const T* q, const QueryRows& q_rows,  // (batch, q_heads, head_dim)
                                                  const PagedCache& cache, const SequenceTable& seqs, float sm_scale,
                                                  T* out, const QueryRows& out_rows,  // (batch, q_heads, head_dim)
                                                  float* lse,                         // (batch, q_heads) or null
                                                  const DecodePlan& plan, void* workspace, std::size_t workspace_bytes,
                                                  unsigned long long* error_count = nullptr,
                                                  cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_decode_attention(q, q_rows, cache, seqs, out, out_rows, lse, plan, workspace,
                                                  workspace_bytes);
      err != cudaSuccess)
    return err;
  if (q_rows.batch == 0) return cudaSuccess;
  return detail::launch_decode_attention(q, q_rows, cache, seqs, sm_scale, out, out_rows, lse, plan, workspace,
                                         error_count, stream);
}

KVQ_NAMESPACE_END
