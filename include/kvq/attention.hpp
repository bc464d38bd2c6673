// kvq/attention.hpp: decode attention over the paged int8 cache: its shapes, plan and validation.
//
// Host-only and plain C++17, like paged.hpp. Decode attention reads, for each sequence b and query
// head qh, the sequence's keys and values of KV head qh / (q_heads / kv_heads) (grouped-query
// attention) and returns softmax(sm_scale * q K^T) V, with optionally the natural-log sum of
// exp(sm_scale * q k) over the sequence's tokens (`lse`), so that a caller can merge it with
// attention over other tokens. The CPU reference is kvq::reference::decode_attention (float64 over
// the dequantized cache); the GPU operation is the next step of issue 18.
#pragma once

#include <kvq/version.hpp>

#include <kvq/paged.hpp>

#include <driver_types.h>  // cudaError_t

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

KVQ_NAMESPACE_END
