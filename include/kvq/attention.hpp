// kvq/attention.hpp: decode attention over the paged int8 cache: its shapes, plan and validation.
//
// Host-only and plain C++17, like paged.hpp. Decode attention reads, for each sequence b and query
// head qh, the sequence's keys and values of KV head qh / (q_heads / kv_heads) (grouped-query
// attention) and returns softmax(sm_scale * q K^T) V, with optionally the natural-log sum of
// exp(sm_scale * q k) over the sequence's tokens (`lse`), so that a caller can merge it with
// attention over other tokens. The CPU reference is kvq::reference::decode_attention (float64 over
// the dequantized cache); the GPU operation is kvq/attention.cuh.
#pragma once

#include <kvq/version.hpp>

#include <kvq/paged.hpp>

#include <driver_types.h>  // cudaError_t

#include <algorithm>
#include <cstddef>
#include <cstdint>

KVQ_NAMESPACE_BEGIN

/// Query or output rows `[batch, q_heads, head_dim]`: element (b, h, d) at b * batch_stride +
/// h * head_stride + d.
struct QueryRows {
  std::int64_t batch = 0;
  std::int64_t q_heads = 0;
  std::int64_t batch_stride = 0;
  std::int64_t head_stride = 0;
};

constexpr QueryRows dense_queries(std::int64_t batch, std::int64_t q_heads, std::int64_t head_dim) noexcept {
  return QueryRows{batch, q_heads, q_heads * head_dim, head_dim};
}

/// decode_attention's arguments: a valid cache; q_heads a multiple of kv_heads; a table whose
/// batch is the queries'; query and output rows of the cache's head dim that do not overlap
/// themselves (T-aligned, non-null unless the batch is empty), the output disjoint from every
/// input; lse (optional, fp32 [batch, q_heads]) 4-byte aligned and disjoint too.
template <class T>
inline cudaError_t validate_decode_attention(const T* q, const QueryRows& q_rows, const PagedCache& cache,
                                             const SequenceTable& seqs, const T* out, const QueryRows& out_rows,
                                             const float* lse) noexcept {
  if (cudaError_t err = validate_cache(cache); err != cudaSuccess) return err;
  if (q_rows.batch < 0 || q_rows.q_heads < 1 || q_rows.q_heads % cache.kv_heads != 0) return cudaErrorInvalidValue;
  if (out_rows.batch != q_rows.batch || out_rows.q_heads != q_rows.q_heads || seqs.batch != q_rows.batch)
    return cudaErrorInvalidValue;
  const TokenRows qr{q_rows.batch, q_rows.batch_stride, q_rows.head_stride};
  const TokenRows orow{out_rows.batch, out_rows.batch_stride, out_rows.head_stride};
  if (!detail::valid_rows(qr, q_rows.q_heads, cache.head_dim) || !detail::valid_rows(orow, q_rows.q_heads, cache.head_dim))
    return cudaErrorInvalidValue;
  if (seqs.max_pages_per_seq < 0) return cudaErrorInvalidValue;
  if (q_rows.batch == 0) return cudaSuccess;
  if (!q || !out || !seqs.block_table || !seqs.seq_lens) return cudaErrorInvalidValue;
  if (!detail::is_aligned(q, sizeof(T)) || !detail::is_aligned(out, sizeof(T)) || !detail::is_aligned(lse, 4) ||
      !detail::is_aligned(seqs.block_table, 4) || !detail::is_aligned(seqs.seq_lens, 4) ||
      !detail::is_aligned(seqs.seq_ids, 4))
    return cudaErrorMisalignedAddress;
  const auto table = [](const void* p, std::int64_t bytes) {
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    return detail::ByteRange{b, b + static_cast<std::uintptr_t>(p ? bytes : 0)};
  };
  detail::ByteRange r[7];
  detail::cache_ranges(cache, r);
  const detail::ByteRange o = detail::rows_bytes(out, orow, q_rows.q_heads, cache.head_dim);
  const detail::ByteRange l = table(lse, q_rows.batch * q_rows.q_heads * 4);
  const detail::ByteRange in[] = {r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                                  detail::rows_bytes(q, qr, q_rows.q_heads, cache.head_dim),
                                  table(seqs.block_table, seqs.batch * seqs.max_pages_per_seq * 4),
                                  table(seqs.seq_lens, seqs.batch * 4),
                                  table(seqs.seq_ids, seqs.batch * 4)};
  for (const auto& i : in)
    if (detail::overlap(o, i) || detail::overlap(l, i)) return cudaErrorInvalidValue;
  if (detail::overlap(o, l)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

/// The static limits a decode plan is made from: a CUDA graph captured with one plan replays for
/// any batch up to max_batch and any lengths up to max_seq_len.
struct DecodeLimits {
  std::int64_t max_batch = 0;
  std::int64_t q_heads = 0;
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t max_seq_len = 0;
};

/// How decode_attention splits the work (flash-decoding): every sequence into `splits` chunks of
/// `split_tokens` tokens, one block per (chunk, KV head, sequence), merged in a fixed order. Made
/// from the limits and the GPU's SM count only, so the grid never depends on device data.
struct DecodePlan {
  DecodeLimits limits;
  std::int64_t splits = 0;
  std::int64_t split_tokens = 0;    // a multiple of kDecodeSplitAlign
  std::size_t workspace_bytes = 0;  // partial outputs: fp32 [max_batch, q_heads, splits + 1, head_dim + 2]
};

/// The largest group (q_heads / kv_heads) and head dim decode_attention runs.
constexpr std::int64_t kMaxDecodeGroup = 16;
constexpr std::int64_t kMaxDecodeHeadDim = 256;
/// Chunks start at multiples of this many tokens: the tensor-core kernel's warps take the
/// chunk's tokens in blocks of 64 (four tiles of 16).
constexpr std::int64_t kDecodeSplitAlign = 64;

/// Blocks of the decode kernels that run at once on an SM, by head dim and group (what their
/// registers allow: groups over 8 hold two tiles of query heads).
constexpr std::int64_t decode_blocks_per_sm(std::int64_t head_dim, std::int64_t group) noexcept {
  return group > 8 || head_dim > 128 ? 2 : 4;
}

/// A plan for `limits` on a GPU of `sm_count` SMs. The blocks run in waves of
/// decode_blocks_per_sm an SM, so the split count is the one that minimizes waves times
/// a block's time: its tokens per warp, plus a fixed cost of 32 for its setup and partial. One
/// long sequence is cut until it fills a wave, a large batch is not cut at all, and a count that
/// would start a nearly empty last wave loses to one that does not.
/// Limits that are not positive, or a group or head dim decode_attention does not run, give a plan
/// of 0 splits, which decode_attention refuses.
inline DecodePlan make_decode_plan(const DecodeLimits& limits, int sm_count) noexcept {
  DecodePlan p;
  p.limits = limits;
  if (limits.max_batch < 1 || limits.q_heads < 1 || limits.kv_heads < 1 || limits.head_dim < 1 ||
      limits.max_seq_len < 1 || limits.q_heads % limits.kv_heads != 0 ||
      limits.q_heads / limits.kv_heads > kMaxDecodeGroup || limits.head_dim > kMaxDecodeHeadDim || sm_count < 1 ||
      limits.max_batch > 65535 || limits.kv_heads > 65535 || limits.max_seq_len > (std::int64_t{1} << 31))
    return p;  // grid.z, grid.y; lengths are int32
  constexpr std::int64_t kWarpsPerBlock = 4, kBlockCostTokens = 32, kMaxSplits = 1024;
  const std::int64_t group = limits.q_heads / limits.kv_heads;
  const std::int64_t wave = decode_blocks_per_sm(limits.head_dim, group) * sm_count,
                     blocks = limits.max_batch * limits.kv_heads;
  const std::int64_t aligned_len = (limits.max_seq_len + kDecodeSplitAlign - 1) / kDecodeSplitAlign;
  std::int64_t best_cost = -1;
  for (std::int64_t s = 1; s <= std::min(kMaxSplits, aligned_len); ++s) {
    const std::int64_t tokens = (aligned_len + s - 1) / s * kDecodeSplitAlign;
    const std::int64_t splits = (limits.max_seq_len + tokens - 1) / tokens;
    // A block's four warps take its tokens in runs of kDecodeSplitAlign, in turn.
    const std::int64_t per_warp = ((tokens / kDecodeSplitAlign + kWarpsPerBlock - 1) / kWarpsPerBlock) * kDecodeSplitAlign;
    const std::int64_t cost = (blocks * splits + wave - 1) / wave * (per_warp + kBlockCostTokens);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      p.splits = splits;
      p.split_tokens = tokens;
    }
  }
  p.workspace_bytes =
      static_cast<std::size_t>(limits.max_batch * limits.q_heads * (p.splits + 1) * (limits.head_dim + 2)) *
      sizeof(float);
  return p;
}

/// The workspace decode_attention needs under `plan`, in bytes (16-byte aligned memory).
constexpr std::size_t decode_workspace_bytes(const DecodePlan& plan) noexcept { return plan.workspace_bytes; }

/// validate_decode_attention, and the plan and workspace: a plan with splits for this call's
/// heads and head dim, a batch within its max_batch, a 16-byte aligned workspace of at least
/// plan.workspace_bytes that shares no byte with the other operands.
template <class T>
inline cudaError_t validate_decode_attention(const T* q, const QueryRows& q_rows, const PagedCache& cache,
                                             const SequenceTable& seqs, const T* out, const QueryRows& out_rows,
                                             const float* lse, const DecodePlan& plan, const void* workspace,
                                             std::size_t workspace_bytes) noexcept {
  if (cudaError_t err = validate_decode_attention(q, q_rows, cache, seqs, out, out_rows, lse); err != cudaSuccess)
    return err;
  const DecodeLimits& l = plan.limits;
  if (plan.splits < 1 || plan.splits >= 65535 || plan.split_tokens < 1 || plan.split_tokens % kDecodeSplitAlign != 0 ||
      l.q_heads != q_rows.q_heads || l.kv_heads != cache.kv_heads || l.head_dim != cache.head_dim ||
      q_rows.batch > l.max_batch || l.max_batch > 65535 || l.kv_heads > 65535 ||
      l.q_heads / l.kv_heads > kMaxDecodeGroup || l.head_dim > kMaxDecodeHeadDim)
    return cudaErrorInvalidValue;
  // A plan made by hand must still hold every partial its grid writes.
  if (plan.workspace_bytes < static_cast<std::size_t>(l.max_batch * l.q_heads * (plan.splits + 1) * (l.head_dim + 2)) *
                                 sizeof(float))
    return cudaErrorInvalidValue;
  if (q_rows.batch == 0) return cudaSuccess;
  if (!workspace || workspace_bytes < plan.workspace_bytes) return cudaErrorInvalidValue;
  if (!detail::is_aligned(workspace, 16)) return cudaErrorMisalignedAddress;
  const auto w = reinterpret_cast<std::uintptr_t>(workspace);
  const detail::ByteRange ws{w, w + plan.workspace_bytes};
  detail::ByteRange r[7];
  detail::cache_ranges(cache, r);
  const TokenRows qr{q_rows.batch, q_rows.batch_stride, q_rows.head_stride};
  const TokenRows orow{out_rows.batch, out_rows.batch_stride, out_rows.head_stride};
  const auto table = [](const void* p, std::int64_t bytes) {
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    return detail::ByteRange{b, b + static_cast<std::uintptr_t>(p ? bytes : 0)};
  };
  const detail::ByteRange others[] = {r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                                      detail::rows_bytes(q, qr, q_rows.q_heads, cache.head_dim),
                                      detail::rows_bytes(out, orow, q_rows.q_heads, cache.head_dim),
                                      table(lse, q_rows.batch * q_rows.q_heads * 4),
                                      table(seqs.block_table, seqs.batch * seqs.max_pages_per_seq * 4),
                                      table(seqs.seq_lens, seqs.batch * 4),
                                      table(seqs.seq_ids, seqs.batch * 4)};
  for (const auto& o : others)
    if (detail::overlap(ws, o)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

KVQ_NAMESPACE_END
