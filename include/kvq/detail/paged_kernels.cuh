// kvq/detail/paged_kernels.cuh: the kernels behind kvq/paged.cuh.
//
// The kernels give each (token, head, K or V) row to a group of kLanes lanes (RowLanes) that runs
// the public row blocks of kvq/device.cuh on it, so a row in the cache is bit-identical to
// kvq::quantize per token on it (append) and to kvq::dequantize of it (gather). Rows are walked
// with a grid-stride loop over whole groups (the scheme-2 append: a contiguous range of tokens a
// block): the grid is sized from the host's static limits (tokens, or batch * max_pages_per_seq *
// page_size), not from device data.
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
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

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

/// f(std::integral_constant<int, paged_lanes<T>(head_dim)>{}): the lane counts the kernels are
/// compiled for, chosen at run time.
template <class T, class F>
decltype(auto) with_paged_lanes(std::int64_t head_dim, F&& f) {
  const int lanes = paged_lanes<T>(head_dim);
  return lanes == 8    ? f(std::integral_constant<int, 8>{})
         : lanes == 16 ? f(std::integral_constant<int, 16>{})
                       : f(std::integral_constant<int, 32>{});
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
// the open-page buffer as it was before the call, and the call's from k_new. Every decision reads
// rows within one page: whether a row's run reaches its page's end, where in the page it began,
// and (open rows) whether the row after its run is another of its sequence (reference::append_kv's
// `superseded`).
//
// The open rows a call leaves may reuse buffer rows a closing page still has to read (a half-filled
// page closes while a later one of its sequence opens), so the kernel is a cooperative launch with
// one grid barrier: an open row whose sequence has other rows in the call waits for every block's
// closers. One whose sequence has none (a decode step's) cannot share a buffer with a closer, since
// a sequence's rows are consecutive, and is written at once: a decode step never waits.

struct AppendByPagePolicy {
  static constexpr int kThreads = 256;     // eight warps: a decode step's closing heads at once, a warp each
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kMinBlocksPerSm = 2;  // 128 registers a thread
  static constexpr int kRoundTokens = 64;  // tokens whose fates a block decides at a time
  static constexpr int kTeamRows = 8;      // rows of a closing page a lane stages at a time
  static constexpr int kStageBytes = kTeamRows * kThreads * 16;  // dynamic shared memory (static is full)
  static constexpr int kMaxChannels = 256; // vector rows: at most 32 units of at most 8 channels
};
static_assert(2 * AppendByPagePolicy::kRoundTokens * kMaxKeysPerChannelPageHeads <= std::int64_t{1} << 30,
              "a round's (token, head, K or V) items are counted in int");

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
  /// x / d for 0 <= x < 2^31 and d < 2^31, unchecked: the round's item counts (kRoundTokens x
  /// kv_heads x 2, already int in the kernel) and the head count.
  __device__ int div_small(int x) const { return static_cast<int>(f.div(static_cast<std::uint32_t>(x))); }
};

/// A token's slot, sequence id and position; a row outside the call reads as padding.
struct TokenMeta {
  std::int64_t slot = -1;
  std::int32_t seq = -1, pos = -1;
};

__device__ inline TokenMeta load_meta(const std::int64_t* slots, const TokenPositions& tp, std::int64_t tokens,
                                      std::int64_t j) {
  TokenMeta m;
  if (j >= 0 && j < tokens) {
    m.slot = slots[j];
    m.seq = tp.seq_ids[j];
    m.pos = tp.positions[j];
  }
  return m;
}

/// Whether a token is written (the reference's detail::valid_token); `page` divides by page_size.
__device__ inline bool paged_valid_token(const PagedCache& c, const TokenMeta& m, const Int64Divmod& page) {
  return m.slot >= 0 && m.slot < c.slots() && m.seq >= 0 && m.seq < c.max_seqs && m.pos >= 0 &&
         page.mod(m.pos) == page.mod(m.slot);
}

/// What a token's K row does in its call.
enum class KeyFate : std::uint8_t {
  kSkipped,    ///< padding or untrusted: no K or V row
  kNone,       ///< its run reaches its page's end (the closer reads it from k_new), or it is superseded
  kCloses,     ///< its page's last position: it quantizes the page
  kOpensNow,   ///< into k_open now: no other row of its sequence is in the call
  kOpensLate,  ///< into k_open after the grid barrier, once every closer has read the buffer
};

/// Token t's fate, decided by the lanes of group g together; for a closer, `nearest` becomes the
/// distance back to the nearest row not in its run (the page's positions [pos - nearest + 1, pos]
/// come from k_new, the earlier ones from k_open), at most its page offset + 1. The kLanes rows on
/// either side are loaded with t's own (one round trip decides a decode step's token, and any token
/// of a page of up to kLanes + 1 rows); rows further away as a scan reaches them.
template <int kLanes>
__device__ inline KeyFate key_fate(const device::RowLanes<kLanes>& g, const PagedCache& c,
                                   const std::int64_t* slots, const TokenPositions& tp, std::int64_t tokens,
                                   std::int64_t t, const Int64Divmod& page, std::uint32_t& nearest) {
  const TokenMeta me = load_meta(slots, tp, tokens, t);
  const TokenMeta next = load_meta(slots, tp, tokens, t + 1 + g.lane), prev = load_meta(slots, tp, tokens, t - 1 - g.lane);
  if (!paged_valid_token(c, me, page)) return KeyFate::kSkipped;
  const std::int64_t offset = page.mod(me.pos), ps = c.page_size;
  // Whether row t + k (m its meta) continues t's run: the same sequence, k positions on.
  auto in_run = [&](const TokenMeta& m, std::int64_t k) {
    return paged_valid_token(c, m, page) && m.seq == me.seq && m.pos == me.pos + k;
  };
  // The least k in [1, limit] whose row t + dir * k is not in the run (limit + 1 if none), and
  // that row's meta when k <= kLanes (the scan's first rows, held by lane k - 1).
  auto run_break = [&](std::int64_t dir, std::int64_t limit, const TokenMeta& near) {
    std::uint32_t k_min = static_cast<std::uint32_t>(limit + 1);
    for (std::int64_t k = 1 + g.lane; k <= limit; k += kLanes)
      if (!in_run(k == 1 + g.lane ? near : load_meta(slots, tp, tokens, t + dir * k), dir * k)) {
        k_min = static_cast<std::uint32_t>(k);
        break;
      }
    return ~device::warp_max_bits(~k_min, g.mask);  // the group's least
  };
  auto seq_of = [&](std::int64_t j, std::uint32_t k, const TokenMeta& near) {  // row j = t +- k's id, slot
    TokenMeta m = k <= kLanes ? TokenMeta{__shfl_sync(g.mask, near.slot, static_cast<int>(k - 1), kLanes),
                                          __shfl_sync(g.mask, near.seq, static_cast<int>(k - 1), kLanes), 0}
                              : load_meta(slots, tp, tokens, j);
    return m;
  };
  if (offset == ps - 1) {
    nearest = run_break(-1, offset, prev);
    return KeyFate::kCloses;
  }
  const std::uint32_t end = run_break(1, ps - 1 - offset, next);
  if (end == ps - offset) return KeyFate::kNone;  // the run reaches the page's end: its closer reads it
  const TokenMeta after = seq_of(t + end, end, next);
  const bool seq_goes_on = after.seq == me.seq && t + end < tokens;
  if (seq_goes_on && after.slot >= 0) return KeyFate::kNone;  // superseded
  const std::uint32_t back = run_break(-1, offset, prev);  // to the row before the run's part in this page
  const TokenMeta before = seq_of(t - back, back, prev);
  return seq_goes_on || (before.seq == me.seq && t - back >= 0) ? KeyFate::kOpensLate : KeyFate::kOpensNow;
}

/// A closing page's rows are quantized by a team: one warp where the page's rows fit kTeamRows a
/// lane (rowslots = 32 / kLanes rows at a time), else the whole block. Lane (unit, rowslot) of a
/// team holds its unit of rows start + rowslot + k * rowslots.
template <int kLanes>
struct CloserTeam {
  bool block;    // the team is the block (else a warp)
  int threads;   // team size
  int index;     // this thread's team in its block
  int rowslot;   // this thread's rows
  int rowslots;  // rows at a time
  int rows;      // rows a lane stages, ceil(page_size / rowslots)
  int held;      // rows a lane holds, those of its rowslot: ceil((page_size - rowslot) / rowslots)
  __device__ explicit CloserTeam(std::int64_t page_size) {
    using P = AppendByPagePolicy;
    block = page_size > (32 / kLanes) * P::kTeamRows;
    threads = block ? P::kThreads : 32;
    index = static_cast<int>(threadIdx.x) / threads;
    rowslot = static_cast<int>(threadIdx.x) % threads / kLanes;
    rowslots = threads / kLanes;
    rows = static_cast<int>((page_size + rowslots - 1) / rowslots);
    held = rowslot < page_size ? static_cast<int>((page_size - rowslot + rowslots - 1) / rowslots) : 0;
  }
  __device__ int count() const { return AppendByPagePolicy::kThreads / threads; }
  __device__ void sync() const {
    if (block) __syncthreads();
    else __syncwarp();
  }
  __device__ bool any(bool p) const { return block ? __syncthreads_or(p) != 0 : __any_sync(kFullMask, p) != 0; }
};

template <int kLanes, int kUnits, class T>
KVQ_KERNEL void __launch_bounds__(AppendByPagePolicy::kThreads, AppendByPagePolicy::kMinBlocksPerSm)
    append_kv_by_page_kernel(const T* k_new, const T* v_new,  // rows (tokens, kv_heads, head_dim)
                             TokenRows rows,
                             const std::int64_t* __restrict__ slot_mapping,  // (tokens)
                             TokenPositions tp,                              // (tokens) each
                             PagedCache cache,
                             bool vectors,  // append_takes_rows, and k_open 16-byte aligned
                             Int64Divmod page_div, Int64Divmod head_div,  // by page_size, by kv_heads
                             unsigned long long* error_count) {  // optional
  using P = AppendByPagePolicy;
  constexpr int V = 16 / sizeof(T), kWords = V * sizeof(T) / 4, kGroups = P::kThreads / kLanes;
  // Rows of V (and open rows of K) by groups of kRowLanes lanes, kUnits units a lane (a prefill's
  // wide lanes, as append_kv_rows_kernel); fates and closing pages by groups of kLanes, a unit a lane.
  constexpr int kRowLanes = kLanes / kUnits, kRowGroups = P::kThreads / kRowLanes, kRowBatch = 4 / kUnits;
  static_assert(kRowBatch >= 1 && kRowLanes >= 1, "kvq: kUnits is 1, 2 or 4");
  const auto g = device::RowLanes<kLanes>::this_thread();
  const auto r = device::RowLanes<kRowLanes>::this_thread();
  const int group = static_cast<int>(threadIdx.x) / kLanes, row_group = static_cast<int>(threadIdx.x) / kRowLanes;
  const std::int64_t ps = cache.page_size, d = cache.head_dim, heads = cache.kv_heads;
  const int units = vectors ? static_cast<int>(d / V) : 0;  // vectors: at most kLanes (paged_lanes)
  T* const open = static_cast<T*>(cache.k_open);
  auto row_of = [&](const T* x, std::int64_t t, std::int64_t h) { return x + t * rows.token_stride + h * rows.head_stride; };
  auto owns = [&](int u) { return r.lane + u * kRowLanes < units; };  // step 2's unit r.lane + u * kRowLanes

  __shared__ KeyFate fate[P::kRoundTokens];
  __shared__ std::uint32_t nearest[P::kRoundTokens];
  __shared__ std::int32_t closers[P::kRoundTokens];  // round offsets of the round's closing tokens
  __shared__ int closer_count, late;
  __shared__ std::uint32_t team_max[P::kWarps][32][kWords];      // a block team's raw amax by warp
  __shared__ std::uint32_t exact_max[P::kWarps][P::kMaxChannels];  // a team's finite amax, NaN/Inf pages
  __shared__ float page_scale[P::kWarps][P::kMaxChannels];        // a team's amax, then scales
  __shared__ float page_recip[P::kWarps][P::kMaxChannels];        // and their reciprocals
  extern __shared__ uint4 stage_bytes[];  // (kTeamRows, kThreads): a closing page's rows, by thread
  auto stage = [&](int b) -> uint4& { return stage_bytes[b * P::kThreads + threadIdx.x]; };
  if (threadIdx.x == 0) late = 0;

  // A contiguous range of tokens a block: its tokens' rows are neighbours in memory, and a
  // decode step's tokens each get a block of their own when the grid allows.
  const std::int64_t per_block = (rows.tokens + gridDim.x - 1) / gridDim.x;
  const std::int64_t first = blockIdx.x * per_block, last = min(first + per_block, rows.tokens);

  // The fates of tokens [base, base + n), into shared memory; the first walk lists the closers and
  // counts untrusted tokens.
  auto decide = [&](std::int64_t base, int n, bool first_walk) {
    for (int i = group; i < n; i += kGroups) {
      std::uint32_t k = 0;
      const KeyFate f = key_fate(g, cache, slot_mapping, tp, rows.tokens, base + i, page_div, k);
      if (g.lane == 0) {
        fate[i] = f;
        nearest[i] = k;
        if (first_walk && f == KeyFate::kSkipped && slot_mapping[base + i] >= 0 && error_count != nullptr)
          atomicAdd(error_count, 1ull);  // untrusted: skipped, counted once per token
        if (first_walk && f == KeyFate::kCloses) closers[atomicAdd(&closer_count, 1)] = i;
        if (f == KeyFate::kOpensLate) late = 1;
      }
    }
  };
  // Token t's K row of head h into the open-page buffer, from `held` (vectors) or k_new.
  auto write_open_row = [&](std::int64_t t, std::int64_t h, const device::Bits<V, T>& held) {
    T* dst = open + cache.open_offset(tp.seq_ids[t], page_div.mod(tp.positions[t]), h, 0);
    if (vectors) {
      if (g.lane < units) device::store<V>(dst + g.lane * V, device::unpack<T, V>(held));
    } else {
      const T* src = row_of(k_new, t, h);
      for (std::int64_t c = g.lane; c < d; c += kLanes) dst[c] = src[c];
    }
  };

  // The page whose last position token t writes, head h, quantized by this thread's team.
  const CloserTeam<kLanes> team(ps);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  auto close_page = [&](std::int64_t t, std::int64_t h, std::uint32_t nearest_back) {
    const std::int64_t slot = slot_mapping[t], seq = tp.seq_ids[t], pos = tp.positions[t], page = page_div.div(slot);
    const std::int64_t start = pos - (ps - 1), old_end = pos - nearest_back + 1;
    const std::int64_t first_scaled = max(start, cache.sink_tokens);  // sinks: outside the scales
    auto key_row = [&](std::int64_t q) {  // position q in [start, pos]: the buffer's row, or the call's
      return q < old_end ? open + cache.open_offset(seq, q - start, h, 0) : row_of(k_new, t + (q - pos), h);
    };
    const PageStrides& s = cache.k_strides;
    std::int8_t* const k_page = cache.k_codes + page * s.page_stride + h * s.head_stride;
    float* const k_scales = cache.k_scales + cache.channel_scale_offset(page, h, 0);
    std::uint32_t* const exact = exact_max[team.block ? 0 : warp];
    if (!vectors) {  // channel by channel, every row serially
      for (std::int64_t c = static_cast<int>(threadIdx.x) % team.threads; c < d; c += team.threads) {
        auto key = [&](std::int64_t q) { return to_float(key_row(q)[c]); };
        std::uint32_t amax = 0;
        for (std::int64_t q = first_scaled; q <= pos; ++q) amax = max(amax, finite_abs_bits(key(q)));
        const float scale = scale_from_amax(bits_to_float(amax));
        k_scales[c] = scale;
        for (std::int64_t q = start; q <= pos; ++q) k_page[(q - start) * s.token_stride + c] = quantize_value(key(q), scale);
      }
      return;
    }
    const int u = g.lane;
    const bool has_unit = u < units;
    // The lane's rows k < team.held are positions start + rowslot + k * rowslots: in the buffer
    // below old_end (k < old_rows), else in k_new, each a fixed stride from the lane's first; those
    // from k_scaled on are outside the sinks. They are staged in shared memory by cp.async,
    // kTeamRows at a time: all in flight at once without holding registers, and read twice (amax,
    // codes). Row indices are 32-bit: the page's loops are most of a closer's instructions.
    const int old_rows = static_cast<int>((old_end - start - team.rowslot + team.rowslots - 1) / team.rowslots);
    const std::int64_t sink_rows = first_scaled - start;  // in [0, page_size]
    const int k_scaled =
        sink_rows <= team.rowslot ? 0 : static_cast<int>((sink_rows - team.rowslot + team.rowslots - 1) / team.rowslots);
    const std::int64_t open_step = team.rowslots * heads * d, new_step = team.rowslots * rows.token_stride;
    const T* const open_first = open + cache.open_offset(seq, team.rowslot, h, u * V);
    const T* const new_first = row_of(k_new, t + (start + team.rowslot - pos), h) + u * V;
    auto lane_row = [&](int k) { return k < old_rows ? open_first + k * open_step : new_first + k * new_step; };
    auto stage_rows = [&](int k0) {
#pragma unroll
      for (int b = 0; b < P::kTeamRows; ++b) {
        const int k = k0 + b;
        if (has_unit && k < team.held) copy_async_16(&stage(b), lane_row(k));
      }
      copy_async_wait_all();
    };
    auto staged = [&](int b) { return device::unpack<T, V>(reinterpret_cast<const device::Bits<V, T>&>(stage(b))); };
    // Each channel's raw amax over the lane's rows, then over the team's rowslots.
    std::uint32_t raw[kWords] = {};
    for (int k0 = 0; k0 < team.rows; k0 += P::kTeamRows) {
      stage_rows(k0);
#pragma unroll
      for (int b = 0; b < P::kTeamRows; ++b)
        if (has_unit && k0 + b < team.held && k0 + b >= k_scaled) device::raw_abs_max_into(raw, staged(b));
    }
#pragma unroll
    for (int w = 0; w < kWords; ++w)
      for (int lanes = kLanes; lanes < 32; lanes *= 2)
        raw[w] = device::RawAbs<T>::max(raw[w], __shfl_xor_sync(kFullMask, raw[w], lanes));
    if (team.block) {
      if (threadIdx.x % 32 < kLanes)
#pragma unroll
        for (int w = 0; w < kWords; ++w) team_max[warp][u][w] = raw[w];
      __syncthreads();
      for (int other = 0; other < P::kWarps; ++other)
#pragma unroll
        for (int w = 0; w < kWords; ++w) raw[w] = device::RawAbs<T>::max(raw[w], team_max[other][u][w]);
    }
    float amax[V];
    bool finite = true;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      std::uint32_t bits = raw[e * sizeof(T) / 4];
      if constexpr (sizeof(T) == 2) bits = (bits >> (16 * (e % 2))) & 0xffffu;
      finite &= bits < device::RawAbs<T>::kNonfinite;
      amax[e] = device::RawAbs<T>::value(bits);
    }
    const int team_thread = static_cast<int>(threadIdx.x) % team.threads;
    if (team.any(!finite)) {  // a NaN or Inf in the page: every channel's largest finite value
      for (int c = team_thread; c < units * V; c += team.threads) exact[c] = 0;
      team.sync();
      if (has_unit) {
        std::uint32_t m[V] = {};
        for (int k = k_scaled; k < team.held; ++k) {
          const Fragment<T, V> x = device::unpack<T, V>(device::load_bits<V>(lane_row(k)));
#pragma unroll
          for (int e = 0; e < V; ++e) m[e] = max(m[e], finite_abs_bits(to_float(x[e])));
        }
#pragma unroll
        for (int e = 0; e < V; ++e) atomicMax(&exact[u * V + e], m[e]);
      }
      team.sync();
#pragma unroll
      for (int e = 0; e < V; ++e) amax[e] = has_unit ? bits_to_float(exact[u * V + e]) : 0.0f;
    }
    // The lean codes (kvq::quantize's per-channel path) where every channel of the unit is finite
    // and its scale in the fast range; they hold for the rows its amax was taken over.
    bool lean = finite;
#pragma unroll
    for (int e = 0; e < V; ++e) lean &= lean_codes_apply(amax[e]);
    // Each channel's scale and reciprocal computed once for the team, by its threads in turn (not
    // by every rowslot holding the channel: a correctly rounded divide and reciprocal are tens of
    // instructions each), and passed through shared memory.
    float* const team_scale = page_scale[team.block ? 0 : warp];
    float* const team_recip = page_recip[team.block ? 0 : warp];
    if (has_unit && team.rowslot == 0)
#pragma unroll
      for (int e = 0; e < V; ++e) team_scale[u * V + e] = amax[e];
    team.sync();
    for (int c = team_thread; c < units * V; c += team.threads) {  // a thread's own c: amax in, scale out
      const float scale = scale_from_amax(team_scale[c]);
      team_scale[c] = scale;
      team_recip[c] = reciprocal(scale);
      k_scales[c] = scale;
    }
    team.sync();
    Fragment<float, V> sc, rs;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      sc[e] = has_unit ? team_scale[u * V + e] : 1.0f;
      rs[e] = has_unit ? team_recip[u * V + e] : 1.0f;
    }
    team.sync();  // team_max, exact and the scales are rewritten by the team's next page
    std::int8_t* const code_first = k_page + team.rowslot * s.token_stride + u * V;
    const std::int64_t code_step = team.rowslots * s.token_stride;
    // (A page with sinks takes the exact path throughout: the same codes, sinks outside the amax.)
    with_codes_path<T>(lean && start >= cache.sink_tokens, [&](auto within_amax) {
      for (int k0 = 0; k0 < team.rows; k0 += P::kTeamRows) {
        if (team.rows > P::kTeamRows) stage_rows(k0);  // else staged since the amax pass
        std::int8_t* code_row = code_first + k0 * code_step;
#pragma unroll
        for (int b = 0; b < P::kTeamRows; ++b, code_row += code_step)
          if (has_unit && k0 + b < team.held)
            device::store<V>(code_row, codes<decltype(within_amax)::value>(staged(b), sc, rs));
      }
    });
  };

  // Step 2's rows, by groups of kRowLanes lanes (held: the lane's units, where vectors): token t's
  // V row of head h quantized per token (and its sinks), and its K row into the open-page buffer.
  auto write_v_row = [&](std::int64_t t, std::int64_t h, std::int64_t slot, std::int64_t seq, std::int64_t pos,
                         const device::Bits<V, T> (&held)[kUnits]) {
    const std::int64_t page = page_div.div(slot), slot_offset = slot - page * ps;
    const PageStrides& s = cache.v_strides;
    std::int8_t* dst = cache.v_codes + page * s.page_stride + slot_offset * s.token_stride + h * s.head_stride;
    float* scale = cache.v_scales + cache.scale_offset(slot, h);
    if (vectors) quantize_held_row<kRowLanes, kUnits, T>(r, held, owns, dst, scale);
    else device::quantize_row(r, row_of(v_new, t, h), d, dst, scale);
    if (pos < cache.sink_tokens) {
      T* k_sink = static_cast<T*>(cache.k_sink) + cache.sink_offset(seq, pos, h, 0);
      T* v_sink = static_cast<T*>(cache.v_sink) + cache.sink_offset(seq, pos, h, 0);
      for (std::int64_t c = r.lane; c < d; c += kRowLanes) {
        k_sink[c] = row_of(k_new, t, h)[c];
        v_sink[c] = row_of(v_new, t, h)[c];
      }
    }
  };
  auto write_k_open = [&](std::int64_t t, std::int64_t h, std::int64_t seq, std::int64_t pos,
                          const device::Bits<V, T> (&held)[kUnits]) {
    T* dst = open + cache.open_offset(seq, page_div.mod(pos), h, 0);
    if (vectors) {
#pragma unroll
      for (int u = 0; u < kUnits; ++u)
        if (owns(u)) device::store<V>(dst + (r.lane + u * kRowLanes) * V, device::unpack<T, V>(held[u]));
    } else {
      const T* src = row_of(k_new, t, h);
      for (std::int64_t c = r.lane; c < d; c += kRowLanes) dst[c] = src[c];
    }
  };
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();

  // A decode step's token: a block of its own, and no neighbour row of its sequence. Its fate then
  // needs no scan (it closes its page at the page's last position, from the buffer's rows and its
  // own; else it opens now), and its rows are loaded together with the metadata: one round trip
  // before its V and open K rows are written, two before a closing page's codes. Compiled only
  // into the narrow-lane kernels: the wide ones run prefills (tokens x heads >= 33792), which leave
  // a block one token only on GPUs of 264 SMs or more, and there the walk below writes the same
  // bytes; this way they carry none of the path's registers.
  if constexpr (kUnits == 1) {
    if (vectors && per_block == 1 && first < rows.tokens && 2 * heads <= kRowBatch * kRowGroups) {
      const std::int64_t t = first;
      const TokenMeta me = load_meta(slot_mapping, tp, rows.tokens, t);
      const TokenMeta prev = load_meta(slot_mapping, tp, rows.tokens, t - 1);
      const TokenMeta next = load_meta(slot_mapping, tp, rows.tokens, t + 1);
      device::Bits<V, T> held[kRowBatch][kUnits];
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        const int i = row_group + b * kRowGroups;  // [0, heads): V rows, [heads, 2 * heads): K rows
        const T* x = i < heads ? row_of(v_new, t, i) : row_of(k_new, t, i - heads);
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
          if (i < 2 * heads && owns(u)) held[b][u] = device::load_bits<V>(x + (r.lane + u * kRowLanes) * V);
      }
      if (me.seq != prev.seq && me.seq != next.seq) {  // else the general walk below decides
        if (!paged_valid_token(cache, me, page_div)) {
          if (threadIdx.x == 0 && me.slot >= 0 && error_count != nullptr) atomicAdd(error_count, 1ull);
        } else {
          const bool closes = page_div.mod(me.pos) == ps - 1;
#pragma unroll
          for (int b = 0; b < kRowBatch; ++b) {
            const int i = row_group + b * kRowGroups;
            if (i < heads) write_v_row(t, i, me.slot, me.seq, me.pos, held[b]);
            else if (i < 2 * heads && !closes) write_k_open(t, i - heads, me.seq, me.pos, held[b]);
          }
          if (closes)  // rows [pos - page_size + 1, pos) from the buffer, pos from k_new
            for (int h = team.index; h < heads; h += team.count()) close_page(t, h, 1);
        }
        grid.barrier_arrive();  // no late row here; others may wait for this block's closer
        return;
      }
    }
  }

  for (std::int64_t base = first; base < last; base += P::kRoundTokens) {
    const int n = static_cast<int>(min(std::int64_t{P::kRoundTokens}, last - base));
    if (threadIdx.x == 0) closer_count = 0;
    __syncthreads();  // the previous round's readers are done
    // The round's rows by groups of kRowLanes lanes (kUnits units a lane), kRowBatch rows a group
    // with their loads in flight together: items [0, pairs) are (token, head) V rows (and sinks),
    // [pairs, 2 * pairs) K rows that open a page now. The first batch is loaded before the fates are
    // known, for every token that is not padding (a decode step's round is one batch).
    const int pairs = n * static_cast<int>(heads);
    auto item = [&](int i, std::int64_t& t, std::int64_t& h) {  // item i's token and head; whether V
      const int pair = i < pairs ? i : i - pairs, local = head_div.div_small(pair);
      t = base + local;
      h = pair - local * heads;
      return i < pairs;
    };
    device::Bits<V, T> held[kRowBatch][kUnits];
    auto load_batch = [&](int i0, const bool (&live)[kRowBatch]) {
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        std::int64_t t, h;
        const bool is_v = item(i0 + b * kRowGroups, t, h);
        const T* x = row_of(is_v ? v_new : k_new, t, h);
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
          if (live[b] && vectors && owns(u)) held[b][u] = device::load_bits<V>(x + (r.lane + u * kRowLanes) * V);
      }
    };
    {
      bool early[kRowBatch];  // padding rows too: not waiting for the slots puts these loads first
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) early[b] = row_group + b * kRowGroups < 2 * pairs;
      load_batch(row_group, early);
    }
    decide(base, n, true);
    __syncthreads();
    for (int i0 = row_group; i0 < 2 * pairs; i0 += kRowBatch * kRowGroups) {
      bool live[kRowBatch];
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        std::int64_t t, h;
        const int i = i0 + b * kRowGroups;
        const bool is_v = i < 2 * pairs && item(i, t, h);
        const KeyFate f = i < 2 * pairs ? fate[t - base] : KeyFate::kSkipped;
        live[b] = is_v ? f != KeyFate::kSkipped : f == KeyFate::kOpensNow;
      }
      if (i0 != row_group) load_batch(i0, live);
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        if (!live[b]) continue;
        std::int64_t t, h;
        if (item(i0 + b * kRowGroups, t, h)) {
          write_v_row(t, h, slot_mapping[t], tp.seq_ids[t], tp.positions[t], held[b]);
        } else {
          write_k_open(t, h, tp.seq_ids[t], tp.positions[t], held[b]);
        }
      }
    }
    // The round's closing pages, a (token, head) a team.
    const int items = closer_count * static_cast<int>(heads);
    for (int i = team.index; i < items; i += team.count()) {
      const int c = head_div.div_small(i), local = closers[c];
      close_page(base + local, i - c * heads, nearest[local]);
    }
  }

  // Every block's closers have read the buffer once every block has arrived. A block with no late
  // open row arrives and goes on (the barrier completes on arrivals alone: cooperative_groups'
  // grid barrier counts them, and waiting only polls for the count).
  auto arrival = grid.barrier_arrive();  // synchronizes the block first: `late` is final
  if (!late) return;
  grid.barrier_wait(std::move(arrival));
  for (std::int64_t base = first; base < last; base += P::kRoundTokens) {
    const int n = static_cast<int>(min(std::int64_t{P::kRoundTokens}, last - base));
    __syncthreads();
    decide(base, n, false);
    __syncthreads();
    for (int i = group; i < n * heads; i += kGroups) {
      const int local = head_div.div_small(i);
      if (fate[local] != KeyFate::kOpensLate) continue;
      const std::int64_t t = base + local, h = i - local * heads;
      device::Bits<V, T> held{};
      if (vectors && g.lane < units) held = device::load_bits<V>(row_of(k_new, t, h) + g.lane * V);
      write_open_row(t, h, held);
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
  with_paged_lanes<T>(head_dim, [&](auto lanes) { kernel(lanes, paged_grid(rows, decltype(lanes)::value)); });
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

/// Blocks of append_kv_by_page_kernel<kLanes, kUnits, T> that run at once on the current device:
/// a cooperative launch's most, with the kernel's stage buffer in dynamic shared memory (allowed
/// past the default 48 KB here). Asked of the runtime once a device (a decode step is called often).
template <int kLanes, int kUnits, class T>
cudaError_t append_by_page_blocks(int& blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device < kMaxDevices && (blocks = known[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  int sms = 0, per_sm = 0;
  if (cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess)
    return err;
  const auto kernel = append_kv_by_page_kernel<kLanes, kUnits, T>;
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             AppendByPagePolicy::kStageBytes);
      err != cudaSuccess)
    return err;
  if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, AppendByPagePolicy::kThreads,
                                                                      AppendByPagePolicy::kStageBytes);
      err != cudaSuccess)
    return err;
  blocks = std::max(per_sm * sms, 1);
  if (device < kMaxDevices) known[device].store(blocks, std::memory_order_relaxed);
  return cudaSuccess;
}

template <class T>
cudaError_t launch_append_kv_by_page(const T* k_new, const T* v_new, const TokenRows& rows,
                                     const std::int64_t* slot_mapping, const TokenPositions& tp,
                                     const PagedCache& cache, unsigned long long* error_count, cudaStream_t stream) {
  const bool vectors = append_takes_rows(k_new, v_new, rows, cache) && is_aligned(cache.k_open, 16);
  auto launch = [&](auto lanes, auto units_per_lane) {
    constexpr int L = decltype(lanes)::value, U = decltype(units_per_lane)::value;
    int blocks = 0;
    if (cudaError_t err = append_by_page_blocks<L, U, T>(blocks); err != cudaSuccess) return err;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(std::min<std::int64_t>(blocks, rows.tokens)));  // a block a token at most
    config.blockDim = dim3(AppendByPagePolicy::kThreads);
    config.dynamicSmemBytes = AppendByPagePolicy::kStageBytes;
    config.stream = stream;
    cudaLaunchAttribute cooperative{};
    cooperative.id = cudaLaunchAttributeCooperative;
    cooperative.val.cooperative = 1;
    config.attrs = &cooperative;
    config.numAttrs = 1;
    if (cudaError_t err = cudaLaunchKernelEx(&config, append_kv_by_page_kernel<L, U, T>, k_new, v_new, rows,
                                             slot_mapping, tp, cache, vectors, Int64Divmod(cache.page_size),
                                             Int64Divmod(cache.kv_heads), error_count);
        err != cudaSuccess)
      return err;
    return check_launch();
  };
  // A prefill's V rows take four units a lane (fewer, wider lanes), as append_kv_rows_kernel's.
  constexpr std::int64_t V = 16 / sizeof(T), kWideRows = 132 * 256;
  const bool wide = vectors && rows.tokens * cache.kv_heads >= kWideRows && cache.head_dim / V > 4;
  using I1 = std::integral_constant<int, 1>;
  using I4 = std::integral_constant<int, 4>;
  auto with_lanes = [&](auto units_per_lane) {
    return with_paged_lanes<T>(cache.head_dim, [&](auto lanes) { return launch(lanes, units_per_lane); });
  };
  return wide ? with_lanes(I4{}) : with_lanes(I1{});
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
