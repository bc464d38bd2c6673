// kvq/paged.cuh: the paged int8 KV cache on the GPU: append new tokens' K and V, gather them back.
//
// The cache and its validation are in kvq/paged.hpp (host-only); the CPU reference of both
// operations, the oracle of the tests, is kvq::reference::append_kv / gather_kv. Like the dense
// host API (kvq/quantize.cuh), every call validates everything before any CUDA call and returns
// the error with nothing touched (cudaErrorInvalidValue, cudaErrorMisalignedAddress), returns
// cudaSuccess at once when there is nothing to do, and otherwise enqueues one kernel on `stream`
// and returns the launch status: no allocation, no synchronization, a grid fixed by host-side
// sizes, so a call can be captured into a CUDA graph and replayed with new contents.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/config.cuh>
#include <kvq/detail/paged_kernels.cuh>
#include <kvq/paged.hpp>

#include <cuda_runtime.h>

#include <cstdint>

KVQ_NAMESPACE_BEGIN

/// Quantizes new tokens' K and V into their slots, both in one launch: token t's row of head h
/// (head_dim values) goes to slot = slot_mapping[t] (page = slot / page_size, offset = slot %
/// page_size). A negative slot is padding: skipped, not counted. T in {float, __half,
/// __nv_bfloat16}; any head_dim, any alignment of the rows. Two tokens with the same slot race;
/// the engine hands out distinct slots.
///   kPerTokenHead: each row's codes and fp32 scale (at (slot, h)) are bit-identical to
///     kvq::quantize per token on that row. `positions` is not read.
///   kKeysPerChannelPage: `positions` gives each token's sequence id and position (see
///     TokenPositions for what they must satisfy). Values as above; keys stay in the sequence's
///     open-page buffer until the page's last token arrives, in this call or a later one, which
///     writes the page's key codes and per-channel scales (equal to kvq::quantize per channel with
///     group = page_size over the page's tokens, sinks left out of the scales); positions below
///     sink_tokens are also copied, K and V, to the sink buffers. T must be cache.open_type.
/// A slot at or past cache.slots() (and under kKeysPerChannelPage a sequence id outside
/// [0, max_seqs), a negative position, or a position whose page offset is not the slot's) is
/// skipped and counted once per token in *error_count (device memory, optional).
template <class T>
[[nodiscard]] inline cudaError_t append_kv(const T* k_new,  // rows (tokens, kv_heads, head_dim)
                                           const T* v_new,  // rows
                                           const TokenRows& rows,
                                           const std::int64_t* slot_mapping,  // (tokens)
                                           const TokenPositions& positions,   // (tokens) each
                                           const PagedCache& cache,
                                           unsigned long long* error_count = nullptr,
                                           cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_append_kv(k_new, v_new, rows, slot_mapping, positions, cache); err != cudaSuccess)
    return err;
  if (rows.tokens == 0) return cudaSuccess;
  if (cache.scheme == PagedScheme::kKeysPerChannelPage)
    return detail::launch_append_kv_by_page(k_new, v_new, rows, slot_mapping, positions, cache, error_count, stream);
  return detail::launch_append_kv(k_new, v_new, rows, slot_mapping, cache, error_count, stream);
}

/// append_kv without positions: for kPerTokenHead caches (kKeysPerChannelPage refuses it with
/// cudaErrorInvalidValue).
template <class T>
[[nodiscard]] inline cudaError_t append_kv(const T* k_new,  // rows (tokens, kv_heads, head_dim)
                                           const T* v_new,  // rows
                                           const TokenRows& rows,
                                           const std::int64_t* slot_mapping,  // (tokens)
                                           const PagedCache& cache,
                                           unsigned long long* error_count = nullptr,
                                           cudaStream_t stream = nullptr) {
  return append_kv(k_new, v_new, rows, slot_mapping, TokenPositions{}, cache, error_count, stream);
}

/// Dequantizes sequences back to dense rows: token t < seq_lens[b] of sequence b (page
/// block_table[b][t / page_size], offset t % page_size) goes to output row out_start[b] + t (or
/// b * max_pages_per_seq * page_size + t without out_start), equal to kvq::dequantize of those
/// codes and scales (under kKeysPerChannelPage: keys of full pages under their channel scales,
/// the open page's keys and the sinks from their full-precision buffers, converted to T, the
/// sequence's id being seqs.seq_ids[b], or b). Rows past a sequence's length are not written.
/// Untrusted table data is skipped and counted in *error_count (device memory, optional): a length
/// below 0 or past max_pages_per_seq * page_size (or, under kKeysPerChannelPage, an id outside
/// [0, max_seqs)) skips the sequence (counted once), a page outside the pool or an output row
/// outside [0, out.tokens) skips the token (counted once per token).
template <class T>
[[nodiscard]] inline cudaError_t gather_kv(const PagedCache& cache, const SequenceTable& seqs,
                                           T* k_out,  // out (tokens, kv_heads, head_dim)
                                           T* v_out,  // out
                                           const TokenRows& out,
                                           unsigned long long* error_count = nullptr,
                                           cudaStream_t stream = nullptr) {
  static_assert(detail::kSupportedType<T>, "kvq: T must be float, __half or __nv_bfloat16");
  if (cudaError_t err = validate_gather_kv(cache, seqs, k_out, v_out, out); err != cudaSuccess) return err;
  if (seqs.batch == 0 || seqs.max_pages_per_seq == 0 || out.tokens == 0) return cudaSuccess;
  return detail::launch_gather_kv(cache, seqs, k_out, v_out, out, error_count, stream);
}

KVQ_NAMESPACE_END
