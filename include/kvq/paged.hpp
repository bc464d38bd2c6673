// kvq/paged.hpp: the paged int8 KV cache's data model and argument validation.
//
// Host-only and plain C++17, like types.hpp: an engine can describe and check its cache on any
// machine; the GPU operations are in kvq/paged.cuh, their CPU reference in kvq/reference.hpp.
//
// A cache is one layer's K and V code pools of `num_pages` pages of `page_size` tokens, `kv_heads`
// heads of `head_dim` channels each, int8, with fp32 scales beside them. Which pages belong to which
// sequence is the engine's business: the write path takes vLLM's slot mapping (slot = page *
// page_size + offset), the read path a block table `[batch, max_pages_per_seq]` and sequence
// lengths. FlashInfer's CSR form maps onto the block table row by row: sequence b's pages are
// indices[indptr[b] .. indptr[b + 1]) and its length is (pages - 1) * page_size + last_page_len.
#pragma once

#include <kvq/version.hpp>

#include <kvq/types.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>  // cudaError_t

#include <algorithm>
#include <cstddef>
#include <cstdint>

KVQ_NAMESPACE_BEGIN

/// Where code (page, token, head, d) of a pool lives: page * page_stride + token * token_stride +
/// head * head_stride + d, in elements (bytes: codes are int8); channels are contiguous.
/// NHD (vLLM's and FlashInfer's default) is [pages, page_size, heads, dim], HND is
/// [pages, heads, page_size, dim]. K and V interleaved in one pool ([pages, 2, ...]) are two pools
/// with the same strides, V starting one half-page after K: page_stride covers both halves.
struct PageStrides {
  std::int64_t page_stride = 0;
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
};

constexpr PageStrides nhd_strides(std::int64_t page_size, std::int64_t kv_heads, std::int64_t head_dim) noexcept {
  return PageStrides{page_size * kv_heads * head_dim, kv_heads * head_dim, head_dim};
}
constexpr PageStrides hnd_strides(std::int64_t page_size, std::int64_t kv_heads, std::int64_t head_dim) noexcept {
  return PageStrides{page_size * kv_heads * head_dim, head_dim, page_size * head_dim};
}

/// How a cache's scales are laid out (and so what its codes mean).
enum class PagedScheme {
  /// One fp32 scale per (page, token, head) for K and for V, as vLLM's int8 path and LMDeploy:
  /// k_scales and v_scales are [num_pages, page_size, kv_heads], contiguous. A (token, head) row's
  /// codes and scale are those of kvq::quantize per token on that row.
  kPerTokenHead,
  /// Keys per channel per page, values per token-head: k_scales is [num_pages, kv_heads, head_dim]
  /// (one fp32 scale per channel of a head, over the page's tokens), v_scales as kPerTokenHead.
  /// A page's key codes and scales are written when its last token arrives, and equal
  /// kvq::quantize per channel with group = page_size over the page's tokens (the sink tokens
  /// among them left out of the scales). Until then a sequence's open page of keys is held in full
  /// precision in k_open; the first sink_tokens keys and values of every sequence are also kept
  /// in full precision (k_sink, v_sink). The scheme bench/results/accuracy.md found best.
  kKeysPerChannelPage,
};

/// The element type of a cache's full-precision buffers (kKeysPerChannelPage): that of the
/// tokens append_kv is given.
enum class ElementType { kFloat, kHalf, kBfloat16 };

template <class T>
constexpr ElementType element_type_of() noexcept;
template <>
constexpr ElementType element_type_of<float>() noexcept { return ElementType::kFloat; }
template <>
constexpr ElementType element_type_of<__half>() noexcept { return ElementType::kHalf; }
template <>
constexpr ElementType element_type_of<__nv_bfloat16>() noexcept { return ElementType::kBfloat16; }

constexpr std::size_t element_size(ElementType t) noexcept { return t == ElementType::kFloat ? 4 : 2; }

/// kKeysPerChannelPage: the most KV heads a cache may have. append_kv decides a round of up to 64
/// tokens at a time and counts its (token, head, K or V) rows, and a batch of rows past them, in
/// int.
constexpr std::int64_t kMaxKeysPerChannelPageHeads = std::int64_t{1} << 23;

/// One layer's paged cache. Plain pointers into device memory (host memory for the reference);
/// kvq never allocates or frees them.
struct PagedCache {
  std::int64_t num_pages = 0;
  std::int64_t page_size = 0;  // tokens per page, >= 1
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
  PagedScheme scheme = PagedScheme::kPerTokenHead;
  std::int8_t* k_codes = nullptr;  // at k_strides
  std::int8_t* v_codes = nullptr;  // at v_strides
  PageStrides k_strides;
  PageStrides v_strides;
  float* k_scales = nullptr;  // [num_pages, page_size, kv_heads]; kKeysPerChannelPage: [num_pages, kv_heads, head_dim]
  float* v_scales = nullptr;  // [num_pages, page_size, kv_heads]

  // kKeysPerChannelPage only: sequence ids are [0, max_seqs); the buffers are of `open_type`.
  ElementType open_type = ElementType::kHalf;
  std::int64_t max_seqs = 0;
  void* k_open = nullptr;  // [max_seqs, page_size, kv_heads, head_dim]: keys of each sequence's open page
  std::int64_t sink_tokens = 0;
  void* k_sink = nullptr;  // [max_seqs, sink_tokens, kv_heads, head_dim] (null when sink_tokens is 0)
  void* v_sink = nullptr;  // [max_seqs, sink_tokens, kv_heads, head_dim]

  /// Token slots in the pool: the valid slot numbers are [0, slots()).
  __host__ __device__ constexpr std::int64_t slots() const noexcept { return num_pages * page_size; }
  /// Offset of per-token scale (slot, head) in v_scales (and k_scales under kPerTokenHead).
  __host__ __device__ constexpr std::int64_t scale_offset(std::int64_t slot, std::int64_t head) const noexcept {
    return slot * kv_heads + head;
  }
  /// kKeysPerChannelPage: offset of key scale (page, head, channel) in k_scales.
  __host__ __device__ constexpr std::int64_t channel_scale_offset(std::int64_t page, std::int64_t head,
                                                                  std::int64_t c) const noexcept {
    return (page * kv_heads + head) * head_dim + c;
  }
  /// kKeysPerChannelPage: element offset of (sequence, row, head, channel) in k_open, and of
  /// (sequence, sink position, head, channel) in k_sink / v_sink.
  __host__ __device__ constexpr std::int64_t open_offset(std::int64_t seq, std::int64_t row, std::int64_t head,
                                                         std::int64_t c) const noexcept {
    return ((seq * page_size + row) * kv_heads + head) * head_dim + c;
  }
  __host__ __device__ constexpr std::int64_t sink_offset(std::int64_t seq, std::int64_t pos, std::int64_t head,
                                                         std::int64_t c) const noexcept {
    return ((seq * sink_tokens + pos) * kv_heads + head) * head_dim + c;
  }
  /// Elements of k_scales.
  constexpr std::int64_t k_scale_count() const noexcept {
    return scheme == PagedScheme::kKeysPerChannelPage ? num_pages * kv_heads * head_dim : slots() * kv_heads;
  }
};

/// kKeysPerChannelPage: which sequence each new token belongs to (its id, < max_seqs) and its
/// position in it (int32, device memory, one per token). The tokens of one sequence within one
/// call must be consecutive rows with consecutive positions (as engines lay out a batch), and
/// slot % page_size must equal position % page_size; a sequence's positions restart at 0 when its
/// id is reused. A padding row (negative slot) between two rows of one sequence must carry its id.
struct TokenPositions {
  const std::int32_t* seq_ids = nullptr;
  const std::int32_t* positions = nullptr;
};

/// Dense token rows `[tokens, kv_heads, head_dim]`: element (t, h, d) at t * token_stride +
/// h * head_stride + d. The new tokens of append_kv, the output of gather_kv.
struct TokenRows {
  std::int64_t tokens = 0;
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
};

/// Contiguous [tokens, kv_heads, head_dim].
constexpr TokenRows dense_rows(std::int64_t tokens, std::int64_t kv_heads, std::int64_t head_dim) noexcept {
  return TokenRows{tokens, kv_heads * head_dim, head_dim};
}

namespace detail {

/// One axis of a strided tensor: `extent` indices `stride` elements apart.
struct Axis {
  std::int64_t extent, stride;
};

/// Offset of the last element (every extent >= 1, every stride >= 0), or -1 on overflow.
template <std::size_t N>
inline std::int64_t last_offset(const Axis (&axes)[N]) noexcept {
  std::int64_t end = 0, term = 0;
  for (const Axis& a : axes)
    if (mul_overflows(a.extent - 1, a.stride, &term) || add_overflows(end, term, &end)) return -1;
  return end;
}

/// Whether distinct indices always reach distinct elements: sorted by stride, each axis steps over
/// everything the smaller ones reach (sufficient, and what every dense or padded layout satisfies).
template <std::size_t N>
inline bool axes_injective(const Axis (&axes)[N]) noexcept {
  Axis sorted[N];
  std::copy(axes, axes + N, sorted);
  std::sort(sorted, sorted + N, [](const Axis& a, const Axis& b) { return a.stride < b.stride; });
  std::int64_t reach = 0;  // offset of the last element of the axes so far
  for (const Axis& a : sorted) {
    if (a.extent <= 1) continue;
    if (a.stride <= reach) return false;
    std::int64_t term = 0;
    if (mul_overflows(a.extent - 1, a.stride, &term) || add_overflows(reach, term, &reach)) return false;
  }
  return true;
}

inline bool valid_page_strides(const PagedCache& c, const PageStrides& s) noexcept {
  if (s.page_stride < 0 || s.token_stride < 0 || s.head_stride < 0) return false;
  const Axis axes[] = {{c.num_pages, s.page_stride}, {c.page_size, s.token_stride}, {c.kv_heads, s.head_stride},
                       {c.head_dim, 1}};
  return last_offset(axes) >= 0 && axes_injective(axes);
}

inline ByteRange pool_bytes(const std::int8_t* p, const PagedCache& c, const PageStrides& s) noexcept {
  const Axis axes[] = {{c.num_pages, s.page_stride}, {c.page_size, s.token_stride}, {c.kv_heads, s.head_stride},
                       {c.head_dim, 1}};
  const auto b = reinterpret_cast<std::uintptr_t>(p);
  return ByteRange{b, b + static_cast<std::uintptr_t>(last_offset(axes)) + 1};
}

inline ByteRange scales_bytes(const float* p, const PagedCache& c) noexcept {
  const auto b = reinterpret_cast<std::uintptr_t>(p);
  return ByteRange{b, b + static_cast<std::uintptr_t>(c.slots() * c.kv_heads) * sizeof(float)};
}
inline ByteRange k_scales_bytes(const PagedCache& c) noexcept {
  const auto b = reinterpret_cast<std::uintptr_t>(c.k_scales);
  return ByteRange{b, b + static_cast<std::uintptr_t>(c.k_scale_count()) * sizeof(float)};
}
inline ByteRange full_bytes(const void* p, std::int64_t rows, const PagedCache& c) noexcept {
  const auto b = reinterpret_cast<std::uintptr_t>(p);
  return ByteRange{b, b + static_cast<std::uintptr_t>(rows * c.kv_heads * c.head_dim) * element_size(c.open_type)};
}
/// Every array of a (valid) cache, to check others against: K codes, V codes, K scales, V scales,
/// and under kKeysPerChannelPage k_open, k_sink, v_sink (empty ranges where absent).
inline void cache_ranges(const PagedCache& c, ByteRange (&r)[7]) noexcept {
  r[0] = pool_bytes(c.k_codes, c, c.k_strides);
  r[1] = pool_bytes(c.v_codes, c, c.v_strides);
  r[2] = k_scales_bytes(c);
  r[3] = scales_bytes(c.v_scales, c);
  r[4] = r[5] = r[6] = ByteRange{};
  if (c.scheme == PagedScheme::kKeysPerChannelPage) {
    r[4] = full_bytes(c.k_open, c.max_seqs * c.page_size, c);
    if (c.sink_tokens > 0) {
      r[5] = full_bytes(c.k_sink, c.max_seqs * c.sink_tokens, c);
      r[6] = full_bytes(c.v_sink, c.max_seqs * c.sink_tokens, c);
    }
  }
}

template <class E>
inline ByteRange rows_bytes(const E* p, const TokenRows& r, std::int64_t kv_heads, std::int64_t head_dim) noexcept {
  const Axis axes[] = {{r.tokens, r.token_stride}, {kv_heads, r.head_stride}, {head_dim, 1}};
  const auto b = reinterpret_cast<std::uintptr_t>(p);
  return ByteRange{b, b + static_cast<std::uintptr_t>(last_offset(axes) + 1) * sizeof(E)};
}

/// K and V pools may share one allocation (interleaved pages) only element-disjointly: with equal
/// strides, V offset from K by a distance that acts as one more axis of extent 2.
inline bool pools_disjoint(const PagedCache& c) noexcept {
  const ByteRange k = pool_bytes(c.k_codes, c, c.k_strides), v = pool_bytes(c.v_codes, c, c.v_strides);
  if (!overlap(k, v)) return true;
  const PageStrides &a = c.k_strides, &b = c.v_strides;
  if (a.page_stride != b.page_stride || a.token_stride != b.token_stride || a.head_stride != b.head_stride)
    return false;
  const std::int64_t d = c.v_codes > c.k_codes ? c.v_codes - c.k_codes : c.k_codes - c.v_codes;
  const Axis axes[] = {{c.num_pages, a.page_stride}, {c.page_size, a.token_stride}, {c.kv_heads, a.head_stride},
                       {c.head_dim, 1}, {2, d}};
  return axes_injective(axes);
}

inline bool valid_rows(const TokenRows& r, std::int64_t kv_heads, std::int64_t head_dim) noexcept {
  if (r.tokens < 0 || r.token_stride < 0 || r.head_stride < 0) return false;
  if (r.tokens == 0) return true;
  const Axis axes[] = {{r.tokens, r.token_stride}, {kv_heads, r.head_stride}, {head_dim, 1}};
  return last_offset(axes) >= 0 && axes_injective(axes);
}

}  // namespace detail

/// The cache itself: sizes >= 1, a known scheme, non-null pools and scales, scales 4-byte aligned,
/// strides that neither overlap nor overflow, and no two of its arrays sharing an element. Under
/// kKeysPerChannelPage also max_seqs >= 1, sink_tokens >= 0, kv_heads <= kMaxKeysPerChannelPageHeads,
/// a known open_type, and non-null, element-aligned full-precision buffers.
inline cudaError_t validate_cache(const PagedCache& c) noexcept {
  if (c.num_pages < 1 || c.page_size < 1 || c.kv_heads < 1 || c.head_dim < 1) return cudaErrorInvalidValue;
  if (c.scheme != PagedScheme::kPerTokenHead && c.scheme != PagedScheme::kKeysPerChannelPage)
    return cudaErrorInvalidValue;
  std::int64_t n = 0;
  if (detail::mul_overflows(c.slots(), c.kv_heads, &n) || detail::mul_overflows(n, c.head_dim, &n))
    return cudaErrorInvalidValue;
  if (!c.k_codes || !c.v_codes || !c.k_scales || !c.v_scales) return cudaErrorInvalidValue;
  if (!detail::is_aligned(c.k_scales, sizeof(float)) || !detail::is_aligned(c.v_scales, sizeof(float)))
    return cudaErrorMisalignedAddress;
  if (!detail::valid_page_strides(c, c.k_strides) || !detail::valid_page_strides(c, c.v_strides) ||
      !detail::pools_disjoint(c))
    return cudaErrorInvalidValue;
  if (c.scheme == PagedScheme::kKeysPerChannelPage) {
    if (c.max_seqs < 1 || c.sink_tokens < 0 || c.kv_heads > kMaxKeysPerChannelPageHeads)
      return cudaErrorInvalidValue;
    if (c.open_type != ElementType::kFloat && c.open_type != ElementType::kHalf &&
        c.open_type != ElementType::kBfloat16)
      return cudaErrorInvalidValue;
    if (detail::mul_overflows(c.max_seqs, c.page_size + c.sink_tokens, &n) ||
        detail::mul_overflows(n, c.kv_heads * c.head_dim, &n))
      return cudaErrorInvalidValue;
    if (!c.k_open || (c.sink_tokens > 0 && (!c.k_sink || !c.v_sink))) return cudaErrorInvalidValue;
    const std::size_t e = element_size(c.open_type);
    if (!detail::is_aligned(c.k_open, e) || !detail::is_aligned(c.k_sink, e) || !detail::is_aligned(c.v_sink, e))
      return cudaErrorMisalignedAddress;
  }
  detail::ByteRange r[7];
  detail::cache_ranges(c, r);
  for (int i = 0; i < 7; ++i)
    for (int j = i + 1; j < 7; ++j)
      if (i + j != 1 && detail::overlap(r[i], r[j])) return cudaErrorInvalidValue;  // K/V pools: pools_disjoint
  return cudaSuccess;
}

/// append_kv's arguments: a valid cache; new K and V rows (T-aligned, non-overlapping strides)
/// and an 8-byte aligned slot mapping, all non-null unless there are no tokens; under
/// kKeysPerChannelPage, positions (non-null, 4-byte aligned) and T the cache's open_type; no input
/// sharing bytes with the cache.
template <class T>
inline cudaError_t validate_append_kv(const T* k_new, const T* v_new, const TokenRows& rows,
                                      const std::int64_t* slot_mapping, const TokenPositions& positions,
                                      const PagedCache& cache) noexcept {
  if (cudaError_t err = validate_cache(cache); err != cudaSuccess) return err;
  if (!detail::valid_rows(rows, cache.kv_heads, cache.head_dim)) return cudaErrorInvalidValue;
  const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
  if (by_page && cache.open_type != element_type_of<T>()) return cudaErrorInvalidValue;
  if (rows.tokens == 0) return cudaSuccess;
  if (!k_new || !v_new || !slot_mapping) return cudaErrorInvalidValue;
  if (by_page && (!positions.seq_ids || !positions.positions)) return cudaErrorInvalidValue;
  if (!detail::is_aligned(k_new, sizeof(T)) || !detail::is_aligned(v_new, sizeof(T)) ||
      !detail::is_aligned(slot_mapping, sizeof(std::int64_t)) || !detail::is_aligned(positions.seq_ids, 4) ||
      !detail::is_aligned(positions.positions, 4))
    return cudaErrorMisalignedAddress;
  const auto b = reinterpret_cast<std::uintptr_t>(slot_mapping);
  const auto ids = reinterpret_cast<std::uintptr_t>(positions.seq_ids);
  const auto pos = reinterpret_cast<std::uintptr_t>(positions.positions);
  const std::uintptr_t n4 = by_page ? static_cast<std::uintptr_t>(rows.tokens) * 4 : 0;
  const detail::ByteRange in[] = {detail::rows_bytes(k_new, rows, cache.kv_heads, cache.head_dim),
                                  detail::rows_bytes(v_new, rows, cache.kv_heads, cache.head_dim),
                                  {b, b + static_cast<std::uintptr_t>(rows.tokens) * sizeof(std::int64_t)},
                                  {ids, ids + n4},
                                  {pos, pos + n4}};
  detail::ByteRange out[7];
  detail::cache_ranges(cache, out);
  for (const auto& i : in)
    for (const auto& o : out)
      if (detail::overlap(i, o)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <class T>
inline cudaError_t validate_append_kv(const T* k_new, const T* v_new, const TokenRows& rows,
                                      const std::int64_t* slot_mapping, const PagedCache& cache) noexcept {
  return validate_append_kv(k_new, v_new, rows, slot_mapping, TokenPositions{}, cache);
}

/// Which sequences gather_kv reads: `batch` rows of a block table `[batch, max_pages_per_seq]`
/// (int32 page numbers) and their lengths (int32 tokens), both in the memory the operation runs on.
/// `out_start` (optional, int32 [batch]): the output row of each sequence's token 0; without it,
/// sequence b starts at row b * max_pages_per_seq * page_size. `seq_ids` (optional, int32 [batch]):
/// under kKeysPerChannelPage, the id (as given to append_kv) of each sequence, whose open page and
/// sinks are read; without it, b.
struct SequenceTable {
  std::int64_t batch = 0;
  std::int64_t max_pages_per_seq = 0;
  const std::int32_t* block_table = nullptr;
  const std::int32_t* seq_lens = nullptr;
  const std::int32_t* out_start = nullptr;
  const std::int32_t* seq_ids = nullptr;
};

/// gather_kv's arguments: a valid cache, a table with non-null, 4-byte aligned arrays (unless
/// batch is 0), and output rows (T-aligned, non-overlapping strides, disjoint from everything else).
template <class T>
inline cudaError_t validate_gather_kv(const PagedCache& cache, const SequenceTable& seqs, const T* k_out,
                                      const T* v_out, const TokenRows& out) noexcept {
  if (cudaError_t err = validate_cache(cache); err != cudaSuccess) return err;
  if (seqs.batch < 0 || seqs.max_pages_per_seq < 0 || !detail::valid_rows(out, cache.kv_heads, cache.head_dim))
    return cudaErrorInvalidValue;
  std::int64_t n = 0;
  if (detail::mul_overflows(seqs.batch, seqs.max_pages_per_seq, &n) ||
      detail::mul_overflows(seqs.max_pages_per_seq, cache.page_size, &n))
    return cudaErrorInvalidValue;
  if (seqs.batch == 0 || seqs.max_pages_per_seq == 0 || out.tokens == 0) return cudaSuccess;
  if (!seqs.block_table || !seqs.seq_lens || !k_out || !v_out) return cudaErrorInvalidValue;
  if (!detail::is_aligned(seqs.block_table, 4) || !detail::is_aligned(seqs.seq_lens, 4) ||
      !detail::is_aligned(seqs.out_start, 4) || !detail::is_aligned(seqs.seq_ids, 4) ||
      !detail::is_aligned(k_out, sizeof(T)) ||
      !detail::is_aligned(v_out, sizeof(T)))
    return cudaErrorMisalignedAddress;
  const detail::ByteRange ko = detail::rows_bytes(k_out, out, cache.kv_heads, cache.head_dim);
  const detail::ByteRange vo = detail::rows_bytes(v_out, out, cache.kv_heads, cache.head_dim);
  const auto table = [](const std::int32_t* p, std::int64_t count) {
    const auto b = reinterpret_cast<std::uintptr_t>(p);
    return detail::ByteRange{b, b + static_cast<std::uintptr_t>(p ? count : 0) * 4};
  };
  detail::ByteRange r[7];
  detail::cache_ranges(cache, r);
  const detail::ByteRange in[] = {r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                                  table(seqs.block_table, seqs.batch * seqs.max_pages_per_seq),
                                  table(seqs.seq_lens, seqs.batch),
                                  table(seqs.out_start, seqs.batch),
                                  table(seqs.seq_ids, seqs.batch),
                                  vo};
  for (const auto& i : in)
    if (detail::overlap(ko, i)) return cudaErrorInvalidValue;
  for (std::size_t i = 0; i + 1 < sizeof(in) / sizeof(in[0]); ++i)
    if (detail::overlap(vo, in[i])) return cudaErrorInvalidValue;
  return cudaSuccess;
}

KVQ_NAMESPACE_END
