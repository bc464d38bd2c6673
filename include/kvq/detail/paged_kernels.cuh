// kvq/detail/paged_kernels.cuh: the kernels behind kvq/paged.cuh.
//
// Both kernels give each (token, head, K or V) row to a group of kLanes lanes (RowLanes) that runs
// the public row blocks of kvq/device.cuh on it, so a row in the cache is bit-identical to
// kvq::quantize per token on it (append) and to kvq::dequantize of it (gather). Rows are walked
// with a grid-stride loop over whole groups: the grid is sized from the host's static limits
// (tokens, or batch * max_pages_per_seq * page_size), not from device data.
//
// Device data the host cannot see is checked here: a slot past the pool, a length past a
// sequence's pages, a block-table entry past the pool, an output row past the output. Such a
// token (or sequence) is skipped and counted once in the caller's counter; nothing outside the
// operands is read or written.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/config.cuh>
#include <kvq/device.cuh>
#include <kvq/paged.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct PagedPolicy {
  static constexpr int kThreads = 128;
  static constexpr int kMaxBlocks = 132 * 16;  // a full H200 many times over; more only adds tail
};

/// Lanes per row: enough that every lane has a 16-byte vector for rows of up to kLanes vectors.
template <class T>
inline int paged_lanes(std::int64_t head_dim) {
  const std::int64_t vectors = (head_dim * static_cast<std::int64_t>(sizeof(T)) + 15) / 16;
  return vectors <= 8 ? 8 : vectors <= 16 ? 16 : 32;
}

inline unsigned paged_grid(std::int64_t rows, int lanes) {
  const std::int64_t threads = rows * lanes;
  const std::int64_t blocks = (threads + PagedPolicy::kThreads - 1) / PagedPolicy::kThreads;
  return static_cast<unsigned>(std::min<std::int64_t>(blocks, PagedPolicy::kMaxBlocks));
}

template <int kLanes, class T>
KVQ_KERNEL void __launch_bounds__(PagedPolicy::kThreads)
    append_kv_kernel(const T* k_new, const T* v_new,  // rows (tokens, kv_heads, head_dim)
                     TokenRows rows,
                     const std::int64_t* __restrict__ slot_mapping,  // (tokens)
                     PagedCache cache,
                     unsigned long long* error_count) {  // optional
  const auto g = device::RowLanes<kLanes>::this_thread();
  const std::int64_t groups_per_block = PagedPolicy::kThreads / kLanes;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * groups_per_block;
  const std::int64_t n = rows.tokens * cache.kv_heads * 2;
  for (std::int64_t i = blockIdx.x * groups_per_block + threadIdx.x / kLanes; i < n; i += stride) {
    const bool is_v = i & 1;
    const std::int64_t th = i >> 1, t = th / cache.kv_heads, h = th % cache.kv_heads;
    const std::int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    if (slot >= cache.slots()) {  // untrusted: skipped, counted once per token
      if (error_count != nullptr && !is_v && h == 0 && g.lane == 0) atomicAdd(error_count, 1ull);
      continue;
    }
    const std::int64_t page = slot / cache.page_size, offset = slot % cache.page_size;
    const PageStrides& s = is_v ? cache.v_strides : cache.k_strides;
    std::int8_t* codes = (is_v ? cache.v_codes : cache.k_codes) + page * s.page_stride + offset * s.token_stride +
                         h * s.head_stride;
    float* scale = (is_v ? cache.v_scales : cache.k_scales) + cache.scale_offset(slot, h);
    const T* x = (is_v ? v_new : k_new) + t * rows.token_stride + h * rows.head_stride;
    device::quantize_row(g, x, cache.head_dim, codes, scale);
  }
}

template <int kLanes, class T>
KVQ_KERNEL void __launch_bounds__(PagedPolicy::kThreads)
    gather_kv_kernel(PagedCache cache, SequenceTable seqs,
                     T* k_out, T* v_out,  // out (tokens, kv_heads, head_dim)
                     TokenRows out,
                     unsigned long long* error_count) {  // optional
  const auto g = device::RowLanes<kLanes>::this_thread();
  const std::int64_t groups_per_block = PagedPolicy::kThreads / kLanes;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * groups_per_block;
  const std::int64_t max_tokens = seqs.max_pages_per_seq * cache.page_size;
  const std::int64_t n = seqs.batch * max_tokens * cache.kv_heads * 2;
  for (std::int64_t i = blockIdx.x * groups_per_block + threadIdx.x / kLanes; i < n; i += stride) {
    const bool is_v = i & 1;
    const std::int64_t th = i >> 1, h = th % cache.kv_heads, bt = th / cache.kv_heads;
    const std::int64_t b = bt / max_tokens, t = bt % max_tokens;
    const bool counter = error_count != nullptr && !is_v && h == 0 && g.lane == 0;
    const std::int64_t len = seqs.seq_lens[b];
    if (len < 0 || len > max_tokens) {  // the whole sequence is skipped, counted once
      if (counter && t == 0) atomicAdd(error_count, 1ull);
      continue;
    }
    if (t >= len) continue;
    const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / cache.page_size];
    const std::int64_t row = (seqs.out_start != nullptr ? seqs.out_start[b] : b * max_tokens) + t;
    if (page < 0 || page >= cache.num_pages || row < 0 || row >= out.tokens) {  // skipped, counted per token
      if (counter) atomicAdd(error_count, 1ull);
      continue;
    }
    const std::int64_t offset = t % cache.page_size, slot = page * cache.page_size + offset;
    const PageStrides& s = is_v ? cache.v_strides : cache.k_strides;
    const std::int8_t* codes = (is_v ? cache.v_codes : cache.k_codes) + page * s.page_stride +
                               offset * s.token_stride + h * s.head_stride;
    const float scale = (is_v ? cache.v_scales : cache.k_scales)[cache.scale_offset(slot, h)];
    T* y = (is_v ? v_out : k_out) + row * out.token_stride + h * out.head_stride;
    device::dequantize_row(g, codes, cache.head_dim, scale, y);
  }
}

template <class T>
cudaError_t launch_append_kv(const T* k_new, const T* v_new, const TokenRows& rows, const std::int64_t* slot_mapping,
                             const PagedCache& cache, unsigned long long* error_count, cudaStream_t stream) {
  const std::int64_t n = rows.tokens * cache.kv_heads * 2;
  const int lanes = paged_lanes<T>(cache.head_dim);
  const unsigned grid = paged_grid(n, lanes);
  constexpr int kThreads = PagedPolicy::kThreads;
  if (lanes == 8)
    append_kv_kernel<8, T><<<grid, kThreads, 0, stream>>>(k_new, v_new, rows, slot_mapping, cache, error_count);
  else if (lanes == 16)
    append_kv_kernel<16, T><<<grid, kThreads, 0, stream>>>(k_new, v_new, rows, slot_mapping, cache, error_count);
  else
    append_kv_kernel<32, T><<<grid, kThreads, 0, stream>>>(k_new, v_new, rows, slot_mapping, cache, error_count);
  return check_launch();
}

template <class T>
cudaError_t launch_gather_kv(const PagedCache& cache, const SequenceTable& seqs, T* k_out, T* v_out,
                             const TokenRows& out, unsigned long long* error_count, cudaStream_t stream) {
  const std::int64_t n = seqs.batch * seqs.max_pages_per_seq * cache.page_size * cache.kv_heads * 2;
  const int lanes = paged_lanes<T>(cache.head_dim);
  const unsigned grid = paged_grid(n, lanes);
  constexpr int kThreads = PagedPolicy::kThreads;
  if (lanes == 8)
    gather_kv_kernel<8, T><<<grid, kThreads, 0, stream>>>(cache, seqs, k_out, v_out, out, error_count);
  else if (lanes == 16)
    gather_kv_kernel<16, T><<<grid, kThreads, 0, stream>>>(cache, seqs, k_out, v_out, out, error_count);
  else
    gather_kv_kernel<32, T><<<grid, kThreads, 0, stream>>>(cache, seqs, k_out, v_out, out, error_count);
  return check_launch();
}

}  // namespace detail
KVQ_NAMESPACE_END
