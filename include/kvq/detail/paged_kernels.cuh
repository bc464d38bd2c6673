// kvq/detail/paged_kernels.cuh: the kernels behind kvq/paged.cuh.
//
// The kernels give each (token, head, K or V) row to a group of kLanes lanes (RowLanes) that runs
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
#include <kvq/detail/row_kernels.cuh>
#include <kvq/device.cuh>
#include <kvq/paged.hpp>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

/// Whether a token is skipped for its slot: padding (a negative slot, not counted), or a slot
/// past the pool (untrusted: counted once per token, by the one thread whose `counts` is set).
__device__ inline bool paged_slot_skipped(std::int64_t slot, const PagedCache& c, bool counts,
                                          unsigned long long* error_count) {
  if (slot < 0) return true;
  if (slot < c.slots()) return false;
  if (counts && error_count != nullptr) atomicAdd(error_count, 1ull);
  return true;
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
    if (paged_slot_skipped(slot, cache, !is_v && h == 0 && g.lane == 0, error_count)) continue;
    const std::int64_t page = slot / cache.page_size, offset = slot % cache.page_size;
    const PageStrides& s = is_v ? cache.v_strides : cache.k_strides;
    std::int8_t* codes = (is_v ? cache.v_codes : cache.k_codes) + page * s.page_stride + offset * s.token_stride +
                         h * s.head_stride;
    float* scale = (is_v ? cache.v_scales : cache.k_scales) + cache.scale_offset(slot, h);
    const T* x = (is_v ? v_new : k_new) + t * rows.token_stride + h * rows.head_stride;
    device::quantize_row(g, x, cache.head_dim, codes, scale);
  }
}

/// A row held by a group's lanes (`held[u]` the lane's unit g.lane + u * kLanes where owns(u))
/// quantized per token: its codes into dst, its scale into *scale_out, those of row_scales_kernel
/// (kvq::quantize per token) bit for bit. Every lane of the group must call it.
template <int kLanes, int kUnits, class T, class Owns>
__device__ inline void quantize_held_row(const device::RowLanes<kLanes>& g,
                                         const device::Bits<16 / sizeof(T), T> (&held)[kUnits], Owns owns,
                                         std::int8_t* dst,  // (units * V)
                                         float* scale_out) {
  constexpr int V = 16 / sizeof(T);
  unsigned long long bad = 0;  // not counted by append_kv: it decides the lean codes path
  std::uint32_t m = held_amax_bits<V, kUnits, T>(held, owns, bad);
  // The lean codes path is decided per lane, on its own values, as in row_scales_kernel.
  m = device::warp_max_bits(m, g.mask);
  const float amax = bits_to_float(m), scale = scale_from_amax(amax), inv = reciprocal(scale);
  if (g.lane == 0) *scale_out = scale;
  Fragment<float, V> sc, rs;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sc[e] = scale;
    rs[e] = inv;
  }
  with_codes_path<T>(bad == 0 && lean_codes_apply(amax), [&](auto lean) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
      if (owns(u))
        device::store<V>(dst + (g.lane + u * kLanes) * V, codes<decltype(lean)::value>(device::unpack<T, V>(held[u]), sc, rs));
  });
}

/// append_kv_kernel for whole-vector rows (head_dim a multiple of V = 16 / sizeof(T), 16-byte
/// aligned rows, codes aligned to V bytes): a group of kLanes lanes takes a (token, head) pair,
/// K and V rows both, each lane holding kUnits 16-byte units of each in registers, so a row is
/// read once and a lane keeps 2 * kUnits loads in flight. The codes and scale are those of
/// row_scales_kernel (kvq::quantize per token), bit for bit.
template <int kLanes, int kUnits, class T>
KVQ_KERNEL void __launch_bounds__(PagedPolicy::kThreads)
    append_kv_rows_kernel(const T* k_new, const T* v_new,  // rows (tokens, kv_heads, head_dim)
                          TokenRows rows,
                          const std::int64_t* __restrict__ slot_mapping,  // (tokens)
                          PagedCache cache,
                          unsigned long long* error_count) {  // optional
  constexpr int V = 16 / sizeof(T);
  const auto g = device::RowLanes<kLanes>::this_thread();
  const std::int64_t groups_per_block = PagedPolicy::kThreads / kLanes;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * groups_per_block;
  const std::int64_t n = rows.tokens * cache.kv_heads;
  const int units = static_cast<int>(cache.head_dim / V);
  for (std::int64_t i = blockIdx.x * groups_per_block + threadIdx.x / kLanes; i < n; i += stride) {
    const std::int64_t t = i / cache.kv_heads, h = i % cache.kv_heads;
    const std::int64_t slot = slot_mapping[t];
    if (paged_slot_skipped(slot, cache, h == 0 && g.lane == 0, error_count)) continue;
    const T* x[2] = {k_new + t * rows.token_stride + h * rows.head_stride,
                     v_new + t * rows.token_stride + h * rows.head_stride};
    auto owns = [&](int u) { return g.lane + u * kLanes < units; };  // unit g.lane + u * kLanes
    device::Bits<V, T> held[2][kUnits];
#pragma unroll
    for (int kv = 0; kv < 2; ++kv)
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
        if (owns(u)) held[kv][u] = device::load_bits<V>(x[kv] + (g.lane + u * kLanes) * V);
    const std::int64_t page = slot / cache.page_size, offset = slot % cache.page_size;
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
      const PageStrides& s = kv ? cache.v_strides : cache.k_strides;
      quantize_held_row<kLanes, kUnits, T>(
          g, held[kv], owns,
          (kv ? cache.v_codes : cache.k_codes) + page * s.page_stride + offset * s.token_stride + h * s.head_stride,
          (kv ? cache.v_scales : cache.k_scales) + cache.scale_offset(slot, h));
    }
  }
}

/// Whether append_kv_rows_kernel takes these rows: whole 16-byte units at 16-byte aligned rows,
/// codes at unit-aligned rows, and at most 32 units a row (head dims up to 256 for fp16 / bf16).
template <class T>
inline bool append_takes_rows(const T* k_new, const T* v_new, const TokenRows& rows, const PagedCache& c) {
  constexpr std::int64_t V = 16 / sizeof(T);
  auto codes_aligned = [](const std::int8_t* p, const PageStrides& s) {
    return is_aligned(p, V) && s.page_stride % V == 0 && s.token_stride % V == 0 && s.head_stride % V == 0;
  };
  return c.head_dim % V == 0 && c.head_dim / V <= 32 && is_aligned(k_new, 16) && is_aligned(v_new, 16) &&
         rows.token_stride % V == 0 && rows.head_stride % V == 0 && codes_aligned(c.k_codes, c.k_strides) &&
         codes_aligned(c.v_codes, c.v_strides);
}

// --- kKeysPerChannelPage ------------------------------------------------------------------------
//
// V rows are written as under kPerTokenHead. A K row goes to the sinks when its position is one,
// and then either to the open-page buffer (its page is still open after the call) or nowhere yet
// (its page fills in this call): the page's last token closes it, computing each channel's scale
// over the page's non-sink tokens and every code. A closing page reads its earlier tokens from
// the open-page buffer as it was before the call, and the call's from k_new; the open rows the
// call leaves may reuse those buffer rows (a half-filled page closes while a later one opens), so
// the kernel runs in two phases with one grid barrier between them (a cooperative launch): first
// V rows, sinks and closers, then the open rows. Every decision reads rows within one page: whether
// a row's run reaches its page's end, where in the page it began, and (open rows) whether the row
// after its run is another of its sequence (reference::append_kv's `superseded`).

/// x / d and x % d (C++'s, truncating) for d = f.divisor: by FastDivmod where 0 <= x < 2^31,
/// the common case, and by `/` elsewhere.
struct Int64Divmod {
  FastDivmod f;
  std::int64_t d = 1;
  Int64Divmod() = default;
  explicit Int64Divmod(std::int64_t divisor)
      : f(static_cast<std::uint32_t>(std::min<std::int64_t>(divisor, INT32_MAX))), d(divisor) {}
  __device__ std::int64_t div(std::int64_t x) const {
    return x >= 0 && x <= INT32_MAX && d <= INT32_MAX ? std::int64_t{f.div(static_cast<std::uint32_t>(x))} : x / d;
  }
  __device__ std::int64_t mod(std::int64_t x) const { return x - div(x) * d; }
};

/// Whether token j is written (the reference's detail::valid_token); `page` divides by page_size.
__device__ inline bool paged_valid_token(const PagedCache& c, const std::int64_t* slots, const TokenPositions& tp,
                                         std::int64_t j, const Int64Divmod& page) {
  const std::int64_t slot = slots[j], seq = tp.seq_ids[j], pos = tp.positions[j];
  return slot >= 0 && slot < c.slots() && seq >= 0 && seq < c.max_seqs && pos >= 0 && page.mod(pos) == page.mod(slot);
}

template <int kLanes, class T>
KVQ_KERNEL void __launch_bounds__(PagedPolicy::kThreads)
    append_kv_by_page_kernel(const T* k_new, const T* v_new,  // rows (tokens, kv_heads, head_dim)
                             TokenRows rows,
                             const std::int64_t* __restrict__ slot_mapping,  // (tokens)
                             TokenPositions tp,                              // (tokens) each
                             PagedCache cache,
                             bool vectors,  // append_takes_rows, and k_open 16-byte aligned
                             Int64Divmod page_div, Int64Divmod head_div,  // by page_size, by kv_heads
                             unsigned long long* error_count) {  // optional
  constexpr int V = 16 / sizeof(T);
  const auto g = device::RowLanes<kLanes>::this_thread();
  const std::int64_t groups_per_block = PagedPolicy::kThreads / kLanes;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * groups_per_block;
  const std::int64_t pairs = rows.tokens * cache.kv_heads, ps = cache.page_size, d = cache.head_dim;
  const int units = vectors ? static_cast<int>(d / V) : 0;
  T* const open = static_cast<T*>(cache.k_open);
  const std::int64_t first_group = blockIdx.x * groups_per_block + threadIdx.x / kLanes;
  // Phase 1a, (token, head) pairs kPairBatch at a time: their V rows (loads in flight together) and
  // their sinks; invalid tokens counted here.
  constexpr int kPairBatch = 4;
  auto owns = [&](int) { return g.lane < units; };  // vectors: one unit a lane (paged_lanes)
  for (std::int64_t th0 = first_group; th0 < pairs; th0 += kPairBatch * stride) {
    bool live[kPairBatch];
    device::Bits<V, T> held[kPairBatch][1];
#pragma unroll
    for (int b = 0; b < kPairBatch; ++b) {
      const std::int64_t th = th0 + b * stride, t = head_div.div(th), h = th - t * cache.kv_heads;
      live[b] = th < pairs && slot_mapping[t] >= 0;  // not padding
      if (!live[b]) continue;
      if (!paged_valid_token(cache, slot_mapping, tp, t, page_div)) {  // untrusted: skipped, counted once per token
        if (error_count != nullptr && h == 0 && g.lane == 0) atomicAdd(error_count, 1ull);
        live[b] = false;
        continue;
      }
      const T* xv = v_new + t * rows.token_stride + h * rows.head_stride;
      if (vectors && owns(0)) held[b][0] = device::load_bits<V>(xv + g.lane * V);
      if (const std::int64_t seq = tp.seq_ids[t], pos = tp.positions[t]; pos < cache.sink_tokens) {
        const T* x = k_new + t * rows.token_stride + h * rows.head_stride;
        T* k_sink = static_cast<T*>(cache.k_sink) + cache.sink_offset(seq, pos, h, 0);
        T* v_sink = static_cast<T*>(cache.v_sink) + cache.sink_offset(seq, pos, h, 0);
        for (std::int64_t c = g.lane; c < d; c += kLanes) {
          k_sink[c] = x[c];
          v_sink[c] = xv[c];
        }
      }
    }
#pragma unroll
    for (int b = 0; b < kPairBatch; ++b) {
      if (!live[b]) continue;
      const std::int64_t th = th0 + b * stride, t = head_div.div(th), h = th - t * cache.kv_heads;
      const std::int64_t slot = slot_mapping[t], page = page_div.div(slot), slot_offset = slot - page * ps;
      const PageStrides& s = cache.v_strides;
      std::int8_t* dst = cache.v_codes + page * s.page_stride + slot_offset * s.token_stride + h * s.head_stride;
      float* scale = cache.v_scales + cache.scale_offset(slot, h);
      if (vectors) quantize_held_row<kLanes, 1, T>(g, held[b], owns, dst, scale);
      else device::quantize_row(g, v_new + t * rows.token_stride + h * rows.head_stride, d, dst, scale);
    }
  }

  // Closing the page whose last position token t writes, head h (t valid, its offset ps - 1).
  auto close_page = [&](std::int64_t t, std::int64_t h) {
    const std::int64_t slot = slot_mapping[t], seq = tp.seq_ids[t], pos = tp.positions[t], page = page_div.div(slot);
    // Whether row j continues t's run: the same sequence at the position j - t further on.
    auto member = [&](std::int64_t jr) {
      return jr >= 0 && jr < rows.tokens && paged_valid_token(cache, slot_mapping, tp, jr, page_div) && tp.seq_ids[jr] == seq &&
             tp.positions[jr] == pos + (jr - t);
    };
    const std::int64_t page_index = page_div.div(pos), offset = pos - page_index * ps, start = page_index * ps;
    auto new_row = [&](std::int64_t q) {  // k_new's row of position q of the run, this head
      return k_new + (t + (q - pos)) * rows.token_stride + h * rows.head_stride;
    };
    // The page's positions before old_end are in the open-page buffer, the rest in this call: the
    // nearest row back from t that is not in the run, found by the group's lanes.
    std::uint32_t nearest = static_cast<std::uint32_t>(offset + 1);  // none within the page
    for (std::int64_t k = 1 + g.lane; k <= offset; k += kLanes)
      if (!member(t - k)) {
        nearest = static_cast<std::uint32_t>(k);
        break;
      }
    nearest = ~device::warp_max_bits(~nearest, g.mask);  // the group's least
    const std::int64_t old_end = pos - nearest + 1;
    const PageStrides& s = cache.k_strides;
    std::int8_t* const k_page = cache.k_codes + page * s.page_stride + h * s.head_stride;
    auto key_row = [&](std::int64_t q) {
      return q < old_end ? open + cache.open_offset(seq, q - start, h, 0) : new_row(q);  // q in [start, pos]
    };
    const std::int64_t first_scaled = max(start, cache.sink_tokens);
    if (vectors) {
      // A lane's 16-byte units of every token of the page, eight tokens' loads in flight at a time.
      constexpr int kBatch = 8, kWords = V * sizeof(T) / 4;
      // each(q, x) for the positions q in [from, pos] of unit u, x their keys' 16 bytes.
      auto for_each_key = [&](int u, std::int64_t from, auto each) {
        for (std::int64_t q0 = from; q0 <= pos; q0 += kBatch) {
          device::Bits<V, T> xs[kBatch];
#pragma unroll
          for (int b = 0; b < kBatch; ++b)
            if (q0 + b <= pos) xs[b] = device::load_bits<V>(key_row(q0 + b) + u * V);
#pragma unroll
          for (int b = 0; b < kBatch; ++b)
            if (q0 + b <= pos) each(q0 + b, device::unpack<T, V>(xs[b]));
        }
      };
      for (int u = g.lane; u < units; u += kLanes) {
        std::uint32_t raw[kWords] = {};
        for_each_key(u, first_scaled, [&](std::int64_t, const Fragment<T, V>& x) { device::raw_abs_max_into(raw, x); });
        Fragment<float, V> sc, rs;
        // The lean codes (kvq::quantize's per-channel path) where every channel of the unit is
        // finite and its scale in the fast range; they hold for the rows its amax was taken over.
        bool lean = true;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          std::uint32_t bits = raw[e * sizeof(T) / 4];
          if constexpr (sizeof(T) == 2) bits = (bits >> (16 * (e % 2))) & 0xffffu;
          float amax;
          if (bits < device::RawAbs<T>::kNonfinite) {
            amax = device::RawAbs<T>::value(bits);
          } else {  // a NaN or Inf in this channel: the largest finite value, element by element
            std::uint32_t m = 0;
            for (std::int64_t q = first_scaled; q <= pos; ++q) m = max(m, finite_abs_bits(to_float(key_row(q)[u * V + e])));
            amax = bits_to_float(m);
            lean = false;
          }
          lean &= lean_codes_apply(amax);
          sc[e] = scale_from_amax(amax);
          rs[e] = reciprocal(sc[e]);
          cache.k_scales[cache.channel_scale_offset(page, h, u * V + e)] = sc[e];
        }
        for_each_key(u, start, [&](std::int64_t q, const Fragment<T, V>& x) {
          with_codes_path<T>(lean && q >= first_scaled, [&](auto within_amax) {  // sinks: outside the amax
            device::store<V>(k_page + (q - start) * s.token_stride + u * V,
                             codes<decltype(within_amax)::value>(x, sc, rs));
          });
        });
      }
      return;
    }
    for (std::int64_t c = g.lane; c < d; c += kLanes) {
      auto key = [&](std::int64_t q) { return to_float(key_row(q)[c]); };
      std::uint32_t amax = 0;
      for (std::int64_t q = first_scaled; q <= pos; ++q) amax = max(amax, finite_abs_bits(key(q)));
      const float scale = scale_from_amax(bits_to_float(amax));
      cache.k_scales[cache.channel_scale_offset(page, h, c)] = scale;
      for (std::int64_t q = start; q <= pos; ++q) k_page[(q - start) * s.token_stride + c] = quantize_value(key(q), scale);
    }
  };
  // Phase 1b, the pages this call closes: a contiguous range of tokens a block, its closers' (token,
  // head) pairs spread over the block's groups. (Over a grid-stride walk of pairs, closers fall on
  // the same few groups whenever the stride is a multiple of page_size x kv_heads.)
  __shared__ std::int32_t closers[PagedPolicy::kThreads];  // offsets from `base`
  __shared__ int closer_count;
  const std::int64_t per_block = (rows.tokens + gridDim.x - 1) / gridDim.x;
  const std::int64_t block_end = (blockIdx.x + 1) * per_block < rows.tokens ? (blockIdx.x + 1) * per_block : rows.tokens;
  for (std::int64_t base = blockIdx.x * per_block; base < block_end; base += PagedPolicy::kThreads) {
    if (threadIdx.x == 0) closer_count = 0;
    __syncthreads();
    if (const std::int64_t t = base + threadIdx.x;
        t < block_end && paged_valid_token(cache, slot_mapping, tp, t, page_div) && page_div.mod(tp.positions[t]) == ps - 1)
      closers[atomicAdd(&closer_count, 1)] = static_cast<std::int32_t>(threadIdx.x);
    __syncthreads();
    const std::int64_t items = closer_count * cache.kv_heads;
    for (std::int64_t i = threadIdx.x / kLanes; i < items; i += groups_per_block) {
      const std::int64_t c = head_div.div(i);
      close_page(base + closers[c], i - c * cache.kv_heads);
    }
    __syncthreads();  // the list is rewritten next round
  }

  // Every closer has read the open-page buffer.
  cooperative_groups::this_grid().sync();

  // Phase 2, a token at a time: its K rows, where its page stays open, into the buffer.
  for (std::int64_t t = first_group; t < rows.tokens; t += stride) {
    if (slot_mapping[t] < 0 || !paged_valid_token(cache, slot_mapping, tp, t, page_div)) continue;  // counted above
    const std::int64_t seq = tp.seq_ids[t], pos = tp.positions[t], offset = page_div.mod(pos);
    if (offset == ps - 1) continue;  // a closer
    auto member = [&](std::int64_t jr) {
      return jr < rows.tokens && paged_valid_token(cache, slot_mapping, tp, jr, page_div) && tp.seq_ids[jr] == seq &&
             tp.positions[jr] == pos + (jr - t);
    };
    // The first row after t that is not in its run, within the page (none: the page closes).
    std::uint32_t end = static_cast<std::uint32_t>(ps);  // beyond the page
    for (std::int64_t k = 1 + g.lane; k <= ps - 1 - offset; k += kLanes)
      if (!member(t + k)) {
        end = static_cast<std::uint32_t>(k);
        break;
      }
    end = ~device::warp_max_bits(~end, g.mask);  // the group's least
    if (end == static_cast<std::uint32_t>(ps)) continue;  // the run reaches the page's end: closed
    const std::int64_t after = t + end;
    if (after < rows.tokens && slot_mapping[after] >= 0 && tp.seq_ids[after] == seq) continue;  // superseded
    // Every head's row, kHeadBatch rows' loads in flight at a time (a decode step's latency).
    constexpr int kHeadBatch = 8;
    for (std::int64_t h0 = 0; h0 < cache.kv_heads; h0 += kHeadBatch) {
      auto src = [&](int b) { return k_new + t * rows.token_stride + (h0 + b) * rows.head_stride; };
      auto dst = [&](int b) { return open + cache.open_offset(seq, offset, h0 + b, 0); };
      if (vectors) {
        for (int u = g.lane; u < units; u += kLanes) {
          device::Bits<V, T> xs[kHeadBatch];
#pragma unroll
          for (int b = 0; b < kHeadBatch; ++b)
            if (h0 + b < cache.kv_heads) xs[b] = device::load_bits<V>(src(b) + u * V);
#pragma unroll
          for (int b = 0; b < kHeadBatch; ++b)
            if (h0 + b < cache.kv_heads) device::store<V>(dst(b) + u * V, device::unpack<T, V>(xs[b]));
        }
      } else {
        for (int b = 0; b < kHeadBatch && h0 + b < cache.kv_heads; ++b)
          for (std::int64_t c = g.lane; c < d; c += kLanes) dst(b)[c] = src(b)[c];
      }
    }
  }
}

/// x of a cache's full-precision buffer, as float.
__device__ inline float paged_full_value(const void* p, ElementType t, std::int64_t i) {
  switch (t) {
    case ElementType::kFloat: return static_cast<const float*>(p)[i];
    case ElementType::kHalf: return to_float(static_cast<const __half*>(p)[i]);
    default: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

// --- gather_kv, both schemes ---------------------------------------------------------------------

/// Row (b, t, h, K or V) back to T: per token-head codes through dequantize_row; under
/// kKeysPerChannelPage keys of full pages under their channel scales, the open page's keys and the
/// sinks from their full-precision buffers.
template <int kLanes, class T>
KVQ_KERNEL void __launch_bounds__(PagedPolicy::kThreads)
    gather_kv_kernel(PagedCache cache, SequenceTable seqs,
                     T* k_out, T* v_out,  // out (tokens, kv_heads, head_dim)
                     TokenRows out,
                     unsigned long long* error_count) {  // optional
  const auto g = device::RowLanes<kLanes>::this_thread();
  const std::int64_t groups_per_block = PagedPolicy::kThreads / kLanes;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * groups_per_block;
  const std::int64_t ps = cache.page_size, d = cache.head_dim, max_tokens = seqs.max_pages_per_seq * ps;
  const std::int64_t n = seqs.batch * max_tokens * cache.kv_heads * 2;
  for (std::int64_t i = blockIdx.x * groups_per_block + threadIdx.x / kLanes; i < n; i += stride) {
    const bool is_v = i & 1;
    const std::int64_t th = i >> 1, h = th % cache.kv_heads, bt = th / cache.kv_heads;
    const std::int64_t b = bt / max_tokens, t = bt % max_tokens;
    const bool counter = error_count != nullptr && !is_v && h == 0 && g.lane == 0;
    const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
    const std::int64_t len = seqs.seq_lens[b];
    const std::int64_t seq = seqs.seq_ids != nullptr ? seqs.seq_ids[b] : b;
    if (len < 0 || len > max_tokens || (by_page && (seq < 0 || seq >= cache.max_seqs))) {  // skipped, counted once
      if (counter && t == 0) atomicAdd(error_count, 1ull);
      continue;
    }
    if (t >= len) continue;
    const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / ps];
    const std::int64_t row = (seqs.out_start != nullptr ? seqs.out_start[b] : b * max_tokens) + t;
    if (page < 0 || page >= cache.num_pages || row < 0 || row >= out.tokens) {
      if (counter) atomicAdd(error_count, 1ull);
      continue;
    }
    const std::int64_t offset = t % ps, slot = page * ps + offset;
    T* y = (is_v ? v_out : k_out) + row * out.token_stride + h * out.head_stride;
    if (by_page && t < cache.sink_tokens) {
      const void* sink = is_v ? cache.v_sink : cache.k_sink;
      for (std::int64_t c = g.lane; c < d; c += kLanes)
        y[c] = from_float<T>(paged_full_value(sink, cache.open_type, cache.sink_offset(seq, t, h, c)));
      continue;
    }
    const PageStrides& s = is_v ? cache.v_strides : cache.k_strides;
    const std::int8_t* codes = (is_v ? cache.v_codes : cache.k_codes) + page * s.page_stride + offset * s.token_stride +
                               h * s.head_stride;
    if (!by_page || is_v) {  // per token-head scales
      device::dequantize_row(g, codes, d, (is_v ? cache.v_scales : cache.k_scales)[cache.scale_offset(slot, h)], y);
    } else if (t >= len / ps * ps) {  // the open page: full precision
      for (std::int64_t c = g.lane; c < d; c += kLanes)
        y[c] = from_float<T>(paged_full_value(cache.k_open, cache.open_type, cache.open_offset(seq, offset, h, c)));
    } else {
      const float* scales = cache.k_scales + cache.channel_scale_offset(page, h, 0);
      for (std::int64_t c = g.lane; c < d; c += kLanes) y[c] = dequantize_value<T>(codes[c], sanitize_scale(scales[c]));
    }
  }
}

/// Launches `kernel(lanes, grid)` for `rows` rows of head_dim values of T: the lane count chosen by
/// paged_lanes as a compile-time constant (8, 16 or 32), the grid by paged_grid.
template <class T, class Kernel>
cudaError_t launch_by_lanes(std::int64_t rows, std::int64_t head_dim, Kernel kernel) {
  const int lanes = paged_lanes<T>(head_dim);
  const unsigned grid = paged_grid(rows, lanes);
  if (lanes == 8)
    kernel(std::integral_constant<int, 8>{}, grid);
  else if (lanes == 16)
    kernel(std::integral_constant<int, 16>{}, grid);
  else
    kernel(std::integral_constant<int, 32>{}, grid);
  return check_launch();
}

template <class T>
cudaError_t launch_append_kv(const T* k_new, const T* v_new, const TokenRows& rows, const std::int64_t* slot_mapping,
                             const PagedCache& cache, unsigned long long* error_count, cudaStream_t stream) {
  if (append_takes_rows(k_new, v_new, rows, cache)) {
    // A decode step (few rows): one unit a lane, the shallowest call. A prefill: four units a
    // lane (fewer, wider lanes), enough bytes in flight to reach copy bandwidth.
    constexpr std::int64_t V = 16 / sizeof(T), kWideRows = 132 * 256;
    const std::int64_t units = cache.head_dim / V, pairs = rows.tokens * cache.kv_heads;
    auto launch = [&](auto lanes, auto units_per_lane) {
      constexpr int L = decltype(lanes)::value, U = decltype(units_per_lane)::value;
      append_kv_rows_kernel<L, U, T><<<paged_grid(pairs, L), PagedPolicy::kThreads, 0, stream>>>(
          k_new, v_new, rows, slot_mapping, cache, error_count);
    };
    using I1 = std::integral_constant<int, 1>;
    using I4 = std::integral_constant<int, 4>;
    if (pairs >= kWideRows && units > 4) {
      if (units <= 8) launch(std::integral_constant<int, 2>{}, I4{});
      else if (units <= 16) launch(std::integral_constant<int, 4>{}, I4{});
      else launch(std::integral_constant<int, 8>{}, I4{});
    } else {
      if (units <= 8) launch(std::integral_constant<int, 8>{}, I1{});
      else if (units <= 16) launch(std::integral_constant<int, 16>{}, I1{});
      else launch(std::integral_constant<int, 32>{}, I1{});
    }
    return check_launch();
  }
  return launch_by_lanes<T>(rows.tokens * cache.kv_heads * 2, cache.head_dim, [&](auto lanes, unsigned grid) {
    append_kv_kernel<decltype(lanes)::value, T><<<grid, PagedPolicy::kThreads, 0, stream>>>(
        k_new, v_new, rows, slot_mapping, cache, error_count);
  });
}

template <class T>
cudaError_t launch_append_kv_by_page(const T* k_new, const T* v_new, const TokenRows& rows,
                                     const std::int64_t* slot_mapping, const TokenPositions& tp,
                                     const PagedCache& cache, unsigned long long* error_count, cudaStream_t stream) {
  const bool vectors = append_takes_rows(k_new, v_new, rows, cache) && is_aligned(cache.k_open, 16);
  cudaError_t err = cudaSuccess;
  launch_by_lanes<T>(rows.tokens * cache.kv_heads, cache.head_dim, [&](auto lanes, unsigned grid) {
    const auto kernel = append_kv_by_page_kernel<decltype(lanes)::value, T>;
    // A cooperative launch (its grid barrier): no more blocks than run at once.
    int device = 0, sms = 0, per_sm = 0;
    if ((err = cudaGetDevice(&device)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
        (err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, PagedPolicy::kThreads, 0)) != cudaSuccess)
      return;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(std::min(grid, static_cast<unsigned>(std::max(per_sm * sms, 1))));
    config.blockDim = dim3(PagedPolicy::kThreads);
    config.stream = stream;
    cudaLaunchAttribute cooperative{};
    cooperative.id = cudaLaunchAttributeCooperative;
    cooperative.val.cooperative = 1;
    config.attrs = &cooperative;
    config.numAttrs = 1;
    err = cudaLaunchKernelEx(&config, kernel, k_new, v_new, rows, slot_mapping, tp, cache, vectors,
                             Int64Divmod(cache.page_size), Int64Divmod(cache.kv_heads), error_count);
  });
  return err != cudaSuccess ? err : check_launch();
}

template <class T>
cudaError_t launch_gather_kv(const PagedCache& cache, const SequenceTable& seqs, T* k_out, T* v_out,
                             const TokenRows& out, unsigned long long* error_count, cudaStream_t stream) {
  const std::int64_t rows = seqs.batch * seqs.max_pages_per_seq * cache.page_size * cache.kv_heads * 2;
  return launch_by_lanes<T>(rows, cache.head_dim, [&](auto lanes, unsigned grid) {
    gather_kv_kernel<decltype(lanes)::value, T><<<grid, PagedPolicy::kThreads, 0, stream>>>(cache, seqs, k_out, v_out,
                                                                                          out, error_count);
  });
}

}  // namespace detail
KVQ_NAMESPACE_END
