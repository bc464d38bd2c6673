// kvq/detail/vector_kernels.cuh: the vectorized strategy's kernels for views made of whole vectors.
//
// A view is "whole-vector" for a width V when every row is channels / V units of V elements and
// every unit is one aligned 16-byte access: channels % V == 0, and every pointer and stride aligned
// (which choose_vector_width checks). Then a thread's place in its block fixes which units it owns,
// and the kernels below need none of the tile kernels' per-unit bookkeeping (unit decoding,
// partial units, slots in shared memory): per element they do little more than the arithmetic of
// the numeric contract, which is what keeps them at the bandwidth limit (bench/results/h200.md).
// Views that are not whole-vector, and per-channel scale computation, use the tile kernels.
//
//   vector_apply_kernel   quantize under given scales, or dequantize; per-channel or per-token.
//                         A thread owns one unit column and walks rows, so per-channel scales and
//                         their reciprocals are read once per tile, not once per element.
//   token_scales_kernel   per-token scales (and codes) in one pass: a thread holds its units of a
//                         few rows in registers while the group amax is reduced across lanes.
//   channel_scales_kernel per-channel scales: one pass for token groups that fit a block (the
//                         group's rows staged in shared memory), or the amax pass of
//                         whole-sequence scales (atomicMax into the scale buffer).
//
// Codes under scales computed from the same 16-bit data take the lean arithmetic where the data is
// finite (device::quantize_within_amax: one correction step, no clamp), which is what lets the
// one-pass kernels keep up with memory on fp16 and bf16.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_plan.cuh>
#include <kvq/device.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

KVQ_NAMESPACE_BEGIN
namespace detail {

using device::Fragment;

/// How a whole-vector view is cut into tiles. Rows are the flattened batch * tokens rows; a tile is
/// `lanes` unit columns (threads across) by `rows_per_tile` rows.
struct VectorPlan {
  std::int64_t rows;  // batch * tokens (< 2^31)
  std::int64_t tokens, channels, batch_stride, token_stride;
  int units;           // units per row: channels / V
  int lanes_log2;      // threads across a tile: lanes = 2^lanes_log2 <= threads per block
  int col_items;       // token_scales_kernel: units per thread along a row (lanes * col_items >= units)
  std::int64_t rows_per_tile;  // per-token: flattened rows; per-channel: tokens of one token group
  std::int64_t sub_tiles;      // vector_apply_kernel, per-channel: tiles down one token group
  std::int64_t col_tiles;      // tiles across a row
  std::int64_t tiles;
  // scales
  std::int64_t group, groups;  // as in TilePlan
  bool row_group;              // per-token: one group spans the whole row
  int seg_log2;                // token_scales_kernel: lanes that share a group at one item (<= 32),
                               // or -1 when a row's group spans several warps
  FastDivmod token_div;        // flattened row -> (batch, token)
  FastDivmod group_div;        // token -> token group (per-channel), channel -> group (per-token)
  ScaleRows scale_rows;        // where each scale row lives

  __device__ std::int64_t row_offset(std::uint32_t r) const {
    std::uint32_t b, t;
    token_div.divmod(r, b, t);
    return static_cast<std::int64_t>(b) * batch_stride + static_cast<std::int64_t>(t) * token_stride;
  }
};

/// True when `view` is whole-vector at width V (the caller has checked alignment) and its rows
/// can be indexed with 32-bit division.
inline bool whole_vector_view(const KvView& view, int V) {
  return view.channels % V == 0 && view.batch * view.tokens <= INT32_MAX;
}

inline int log2_exact(std::int64_t pow2) {
  int l = 0;
  while ((std::int64_t{1} << l) < pow2) ++l;
  return l;
}

/// Plan for vector_apply_kernel: a thread walks `items` rows at a time, up to `max_passes` times per
/// tile while the grid keeps at least `target_tiles` tiles (more rows per tile amortize reading and
/// inverting per-channel scales; fewer tiles leave SMs idle). A view with fewer than `min_tiles`
/// tiles of one pass gets shorter tiles, down to one row per thread: a decode-sized call then
/// spreads over more SMs, and each thread's chain of loads and arithmetic is short. The defaults
/// plan one pass, for the plans below that set their own tile height.
inline VectorPlan plan_vector_apply(const KvView& view, const QuantSpec& spec, int threads, int items, int V,
                                    int max_passes = 1, std::int64_t target_tiles = 1, std::int64_t min_tiles = 0) {
  VectorPlan p{};
  p.rows = view.batch * view.tokens;
  p.tokens = view.tokens;
  p.channels = view.channels;
  p.batch_stride = view.batch_stride;
  p.token_stride = view.token_stride;
  p.units = static_cast<int>(view.channels / V);
  p.scale_rows = ScaleRows(view, spec);
  const std::int64_t lanes = std::min<std::int64_t>(threads, pow2_ceil(p.units));
  p.lanes_log2 = log2_exact(lanes);
  p.col_items = 1;
  p.col_tiles = ceil_div<std::int64_t>(p.units, lanes);
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const std::int64_t extent = per_token ? view.channels : view.tokens;
  p.group = group_length(extent, spec.group);
  p.groups = group_count(extent, spec.group);
  p.row_group = per_token && p.group == view.channels;
  const std::int64_t rows_per_pass = (threads / lanes) * items;
  const std::int64_t passes =
      std::clamp<std::int64_t>(p.rows * p.col_tiles / (rows_per_pass * target_tiles), 1, max_passes);
  p.rows_per_tile = rows_per_pass * passes;
  if (!per_token)  // tiles never cross a token group, so each reads one row of scales
    p.rows_per_tile = std::min(p.rows_per_tile, ceil_div(p.group, rows_per_pass) * rows_per_pass);
  auto count_tiles = [&] {
    p.sub_tiles = per_token ? 1 : ceil_div(p.group, p.rows_per_tile);
    p.tiles = per_token ? p.col_tiles * ceil_div(p.rows, p.rows_per_tile) : p.col_tiles * view.batch * p.groups * p.sub_tiles;
  };
  count_tiles();
  const std::int64_t row_lanes = threads / lanes;
  while (p.tiles < min_tiles && p.rows_per_tile > row_lanes) {
    p.rows_per_tile = std::max(row_lanes, p.rows_per_tile / 2);
    count_tiles();
  }
  p.seg_log2 = 0;
  p.token_div = FastDivmod(static_cast<std::uint32_t>(view.tokens));
  p.group_div = FastDivmod(static_cast<std::uint32_t>(std::min<std::int64_t>(p.group, INT32_MAX)));
  return p;
}

/// Plan for token_scales_kernel<kColItems>; `ok` is false when the view does not fit it (a row of
/// more than threads * kColItems units, or groups that are neither whole rows nor a power of two
/// of at most 32 units).
template <class Policy>
__host__ __device__ constexpr int token_row_items(int col_items) {
  const int rows = Policy::kTokenItems / col_items < Policy::kTokenRowItems ? Policy::kTokenItems / col_items : Policy::kTokenRowItems;
  return rows > 1 ? rows : 1;
}

template <class Policy>
inline VectorPlan plan_token_scales(const KvView& view, const QuantSpec& spec, int V, bool& ok) {
  constexpr int threads = Policy::kThreads, max_items = Policy::kTokenItems;
  VectorPlan p = plan_vector_apply(view, spec, threads, 1, V);
  // A row that one warp can hold (at most kTokenItems units per lane) is reduced with shuffles
  // alone: no shared memory, no barrier, and its scale is computed by fewer threads.
  if (p.units <= kWarpSize * max_items) p.lanes_log2 = std::min(p.lanes_log2, 5);
  const std::int64_t lanes = std::int64_t{1} << p.lanes_log2;
  p.col_tiles = 1;
  p.col_items = static_cast<int>(pow2_ceil(ceil_div<std::int64_t>(p.units, lanes)));  // 1, 2, 4, 8...
  const int row_items = token_row_items<Policy>(p.col_items);
  p.rows_per_tile = (threads / lanes) * row_items;
  p.sub_tiles = 1;
  p.tiles = ceil_div(p.rows, p.rows_per_tile);
  const std::int64_t group_units = p.group / V;
  if (p.row_group) {
    p.seg_log2 = lanes <= kWarpSize ? p.lanes_log2 : -1;
  } else {
    p.seg_log2 = log2_exact(group_units);
  }
  ok = p.col_items <= max_items &&
       (p.row_group || (p.group % V == 0 && group_units <= kWarpSize && (group_units & (group_units - 1)) == 0));
  return p;
}

/// Copies 16 bytes from global to shared memory without passing through registers (cp.async on
/// sm_80 and later, a load and a store before); the thread that copied may read the bytes after
/// copy_async_wait_all().
__device__ inline void copy_async_16(uint4* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto to = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(gmem) : "memory");
#else
  *smem = *static_cast<const uint4*>(gmem);
#endif
}

__device__ inline void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

/// Plan for channel_scales_kernel<Policy>; `ok` is false when a token group is longer than the block
/// can hold. kScales: a tile is one whole token group, at most kChannelRowItems tokens per thread.
/// kAtomicAmax: a tile is a run of tokens of one group, walked kItems rows at a time.
template <class Policy>
inline VectorPlan plan_channel_scales(const KvView& view, const QuantSpec& spec, TileMode mode, int V, bool& ok) {
  constexpr int threads = Policy::kThreads, items = Policy::kItems, row_items = Policy::kChannelRowItems;
  VectorPlan p = plan_vector_apply(view, spec, threads, items, V);
  ok = true;
  if (mode == TileMode::kScales) {
    const std::int64_t row_lanes = pow2_ceil(ceil_div<std::int64_t>(p.group, row_items));
    ok = row_lanes <= threads;
    // No wider than the row: a narrow view (fp16 x 128 channels: 16 units) takes more row lanes
    // and fewer rows per thread, rather than leave lanes idle. A view of fewer than
    // Policy::kMinTiles tiles takes narrower ones still, while a group has rows for every row lane
    // (a decode-sized call: more blocks, fewer rows per thread).
    std::int64_t lanes = std::min(std::max<std::int64_t>(1, threads / row_lanes), pow2_ceil(p.units));
    while (lanes > 1 && ceil_div<std::int64_t>(p.units, lanes) * view.batch * p.groups < Policy::kMinTiles &&
           2 * threads / lanes <= p.group)
      lanes /= 2;
    p.lanes_log2 = log2_exact(lanes);
    p.col_tiles = ceil_div<std::int64_t>(p.units, lanes);
    p.rows_per_tile = p.group;
    p.sub_tiles = 1;
  } else {  // about one wave of tall tiles (Policy::kAmaxTargetTiles)
    const std::int64_t lanes = std::int64_t{1} << p.lanes_log2;
    const std::int64_t rows_per_pass = (threads / lanes) * items;
    const std::int64_t passes = std::clamp<std::int64_t>(
        p.rows * p.col_tiles / (rows_per_pass * Policy::kAmaxTargetTiles), 1, Policy::kAmaxMaxPasses);
    p.rows_per_tile = std::min(rows_per_pass * passes, ceil_div(p.group, rows_per_pass) * rows_per_pass);
    p.sub_tiles = ceil_div(p.group, p.rows_per_tile);
  }
  p.tiles = p.col_tiles * view.batch * p.groups * p.sub_tiles;
  return p;
}

/// Codes of a fragment under its scales: device::quantize_within_amax when kWithinAmax (16-bit data
/// under its own groups' scales, all finite, scales in the fast range), else device::quantize.
template <bool kWithinAmax, int V, class T>
__device__ inline device::Fragment<std::int8_t, V> codes(const Fragment<T, V>& x, const Fragment<float, V>& scale,
                                                         const Fragment<float, V>& inv_scale) {
  if constexpr (kWithinAmax)
    return device::quantize_within_amax<V>(x, scale, inv_scale);
  else
    return device::quantize<V>(x, scale, inv_scale);
}

/// Calls write(std::true_type{}) when 16-bit data may take the lean arithmetic, write(std::false_type{})
/// otherwise. Decided once per tile, so that each path is one straight run of code; fp32 data never
/// instantiates the lean path.
template <class T, class Write>
__device__ inline void with_codes_path(bool within_amax, Write&& write) {
  if constexpr (sizeof(T) == 2) {
    if (within_amax) {
      write(std::true_type{});
      return;
    }
  }
  write(std::false_type{});
}

/// Codes under given scales (In = T, Out = int8), or values of codes (In = int8, Out = T), of a
/// whole-vector view.
///
/// Per-channel, a tile lies in one (batch, token group), so a thread reads its V scales and their
/// reciprocals once per tile. Per-token, a unit lies in one group (group % V == 0) and each row item
/// reads its own scale. kWithinAmax (per-channel, 16-bit In): the scales were computed from `in`
/// itself, so finite units under fast-range scales take device::quantize_within_amax.
template <class Policy, int V, bool kPerToken, class In, class Out, bool kWithinAmax = false>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, std::is_same_v<In, std::int8_t> && !kPerToken
                                                       ? Policy::kMinBlocksPerSMDequantize
                                                       : Policy::kMinBlocksPerSM)
    vector_apply_kernel(const In* __restrict__ in,  // view (batch, tokens, channels)
                        const float* __restrict__ scales,  // scale_shape(view, spec)
                        VectorPlan p,
                        Out* __restrict__ out,  // same view
                        unsigned long long* nonfinite) {  // optional counter (quantize only)
  constexpr int kItems = Policy::kItems;
  constexpr bool kDequantize = std::is_same_v<In, std::int8_t>;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & ((1 << p.lanes_log2) - 1);
  const int row_lanes = Policy::kThreads >> p.lanes_log2;
  unsigned long long bad = 0;

  for (std::int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const std::int64_t unit = ((tile % p.col_tiles) << p.lanes_log2) + lane;
    if (unit >= p.units) continue;
    const std::int64_t c = unit * V, rest = tile / p.col_tiles;
    // The tile's rows: per-token, flattened rows [r_begin, r_end); per-channel, tokens
    // [r_begin, r_end) of batch b, all in scale row `scale_row`.
    std::int64_t r_begin, r_end, base = c, group_of_c = 0, scale_row = 0;
    if constexpr (kPerToken) {
      r_begin = rest * p.rows_per_tile;
      r_end = min(r_begin + p.rows_per_tile, p.rows);
      group_of_c = p.group_div.div(static_cast<std::uint32_t>(c));
    } else {
      scale_row = rest / p.sub_tiles;
      const std::int64_t b = scale_row / p.groups, g = scale_row % p.groups;
      r_begin = g * p.group + rest % p.sub_tiles * p.rows_per_tile;
      r_end = min(min(r_begin + p.rows_per_tile, (g + 1) * p.group), p.tokens);
      base += b * p.batch_stride;
    }
    auto offset = [&](std::int64_t r) {
      return kPerToken ? p.row_offset(static_cast<std::uint32_t>(r)) + c : base + r * p.token_stride;
    };
    device::Bits<V, In> x[kItems];
    auto load_rows = [&](std::int64_t r0) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const std::int64_t r = r0 + k * row_lanes;
        if (r < r_end) x[k] = device::load_bits<V>(in + offset(r));
      }
    };
    // The first rows are requested before the per-channel scales are read and inverted, so that
    // the two memory latencies overlap: a decode-sized view is one pass per thread.
    std::int64_t r0 = r_begin + (tid >> p.lanes_log2);
    load_rows(r0);
    Fragment<float, V> scale, inv;
    bool fast_scales = kWithinAmax;  // every reciprocal in the fast range
    if constexpr (!kPerToken) {
      const float* tile_scales = scales + p.scale_rows.base(scale_row) + c;  // once, not per channel
#pragma unroll
      for (int j = 0; j < V; ++j) {
        scale[j] = sanitize_scale(tile_scales[j]);
        if constexpr (!kDequantize) inv[j] = reciprocal(scale[j]);
        if constexpr (kWithinAmax) fast_scales &= !is_nan(inv[j]);
      }
    }
    while (r0 < r_end) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const std::int64_t r = r0 + k * row_lanes;
        if (r >= r_end) break;
        if constexpr (kPerToken) {
          const float s = sanitize_scale(scales[p.scale_rows.base(r) + group_of_c]);
          const float rs = kDequantize ? 0.0f : reciprocal(s);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            scale[j] = s;
            inv[j] = rs;
          }
        }
        if constexpr (kDequantize) {
          device::store<V>(out + offset(r), device::dequantize<Out, V>(device::unpack<In, V>(x[k]), scale));
        } else {
          const Fragment<In, V> f = device::unpack<In, V>(x[k]);
          if (nonfinite != nullptr) bad += device::count_nonfinite(f);
          if constexpr (kWithinAmax) {  // finite 16-bit values under their own group's scales
            if (fast_scales && device::raw_abs_max(f) < device::RawAbs<In>::kNonfinite) {
              device::store<V>(out + offset(r), device::quantize_within_amax<V>(f, scale, inv));
              continue;
            }
          }
          device::store<V>(out + offset(r), device::quantize<V>(f, scale, inv));
        }
      }
      r0 += kItems * row_lanes;
      load_rows(r0);
    }
  }
  if (bad != 0) atomicAdd(nonfinite, bad);
}

/// Dynamic shared memory of channel_scales_kernel<Policy, V, TileMode::kScales> for a plan with
/// `lanes` lanes: the staged units and the tile's amax bits and reciprocals.
template <class Policy, int V>
constexpr int channel_scales_shared_bytes(int lanes) {
  return Policy::kChannelRowItems * Policy::kThreads * static_cast<int>(sizeof(uint4)) +
         2 * lanes * V * static_cast<int>(sizeof(float));
}

/// Per-channel scales of a whole-vector view.
///
/// TileMode::kScales: a tile is one token group of `lanes` unit columns, staged in shared memory
/// (kChannelRowItems rows per thread, copied with cp.async; channel_scales_shared_bytes); the group
/// amax meets across row lanes with shuffles and shared-memory atomicMax, then the codes are
/// written from the staged rows when q is not null. One pass. Shared memory rather than registers
/// because what kept this kernel under the bandwidth limit was the tile's width: 16-byte units of
/// one row that a block reads side by side. Held in registers (8 rows per thread) a tile was
/// 256 bytes wide; staged, 16 rows per thread make it 512 in the same registers (H200, 131072 x
/// 8192, g128: fp16 82.6% -> 92.2% of copy; bench/results/h200.md).
/// TileMode::kAtomicAmax: a tile is a run of tokens of one group; each thread keeps the amax of its
/// V channels and the tiles merge theirs into the zeroed scale buffer as bits (atomicMax), which
/// finalize_scales turns into scales. The first pass of whole-sequence scales.
template <class Policy, int V, TileMode kMode, class T>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, kMode == TileMode::kScales ? Policy::kMinBlocksPerSMStaged
                                                                               : Policy::kMinBlocksPerSM)
    channel_scales_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                          VectorPlan p,
                          float* __restrict__ scales,  // [batch, groups, channels] (p.scale_rows)
                          std::int8_t* __restrict__ q,  // same view as x, or null (kScales only)
                          unsigned long long* nonfinite) {  // optional counter
  constexpr int kThreads = Policy::kThreads, kItems = Policy::kItems, kRowItems = Policy::kChannelRowItems;
  constexpr bool scales_mode = kMode == TileMode::kScales;
  using Unit = device::Bits<V, T>;
  static_assert(sizeof(Unit) == sizeof(uint4), "whole 16-byte units");
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = 1 << p.lanes_log2, lane = tid & (lanes - 1), row_lanes = kThreads >> p.lanes_log2;
  // kScales (dynamic, channel_scales_shared_bytes): [kRowItems][kThreads] staged units, then the
  // tile's lanes * V amax bits (then scale bits) and lanes * V reciprocals.
  // kAtomicAmax: the tile's amax bits, kept zero between tiles.
  extern __shared__ uint4 staged[];
  __shared__ std::uint32_t amax_merge[scales_mode ? 1 : kThreads * V];
  std::uint32_t* amax_bits = scales_mode ? reinterpret_cast<std::uint32_t*>(staged + kRowItems * kThreads) : amax_merge;
  float* tile_inv = reinterpret_cast<float*>(amax_bits + lanes * V);
  unsigned long long bad = 0;
  if constexpr (!scales_mode) {  // kAtomicAmax keeps amax_bits zero between tiles
    for (int k = tid; k < kThreads * V; k += kThreads) amax_bits[k] = 0;
    __syncthreads();
  }

  for (std::int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const std::int64_t unit = ((tile % p.col_tiles) << p.lanes_log2) + lane, rest = tile / p.col_tiles;
    const bool active = unit < p.units;
    const std::int64_t c = unit * V, scale_row = rest / p.sub_tiles;
    const std::int64_t b = scale_row / p.groups, g = scale_row % p.groups;
    const std::int64_t r_begin = g * p.group + rest % p.sub_tiles * p.rows_per_tile;
    const std::int64_t r_end = min(min(r_begin + p.rows_per_tile, (g + 1) * p.group), p.tokens);
    const T* base = x + b * p.batch_stride + c;
    const std::int64_t r_first = r_begin + (tid >> p.lanes_log2);
    // kScales: unit i of this thread's rows lives at staged[i * kThreads + tid], which only this
    // thread writes and reads, so the copies need no barrier of their own.
    auto held = [&](int i) { return reinterpret_cast<const Unit&>(staged[i * kThreads + tid]); };
    if constexpr (scales_mode) {
#pragma unroll
      for (int i = 0; i < kRowItems; ++i) {
        const std::int64_t r = r_first + i * row_lanes;
        if (active && r < r_end) copy_async_16(&staged[i * kThreads + tid], base + r * p.token_stride);
      }
      for (int s = tid; s < lanes * V; s += kThreads) amax_bits[s] = 0;
      copy_async_wait_all();
      __syncthreads();
    }

    // This thread's amax of each of its channels, as raw |x| bits (device::RawAbs): exact, two
    // 16-bit channels per instruction. A NaN or Inf shows as bits >= kNonfinite and is redone below.
    constexpr int kWords = V * sizeof(T) / 4;
    std::uint32_t raw[kWords] = {};
    if constexpr (scales_mode) {
#pragma unroll
      for (int i = 0; i < kRowItems; ++i)
        if (active && r_first + i * row_lanes < r_end) device::raw_abs_max_into(raw, device::unpack<T, V>(held(i)));
    } else if (active) {
      for (std::int64_t r0 = r_first; r0 < r_end; r0 += kItems * row_lanes) {
        device::Bits<V, T> f[kItems];
#pragma unroll
        for (int k = 0; k < kItems; ++k)
          if (r0 + k * row_lanes < r_end) f[k] = device::load_bits<V>(base + (r0 + k * row_lanes) * p.token_stride);
#pragma unroll
        for (int k = 0; k < kItems; ++k)
          if (r0 + k * row_lanes < r_end) device::raw_abs_max_into(raw, device::unpack<T, V>(f[k]));
      }
    }
    float colmax[V];
    bool has_nonfinite = false;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const std::uint32_t bits = sizeof(T) == 4 ? raw[j] : (raw[j * sizeof(T) / 4] >> (16 * (j % 2))) & 0xffffu;
      has_nonfinite |= bits >= device::RawAbs<T>::kNonfinite;
      colmax[j] = device::RawAbs<T>::value(bits);
    }
    if (has_nonfinite) {  // rare: the exact rule (finite values only) and the count, rereading this thread's rows
      std::uint32_t exact[V] = {};
      for (std::int64_t r = r_first; r < r_end; r += row_lanes) {
        const Fragment<T, V> f = device::load<V>(base + r * p.token_stride);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          exact[j] = max(exact[j], finite_abs_bits(to_float(f[j])));
          bad += !is_finite(to_float(f[j]));
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) colmax[j] = bits_to_float(exact[j]);
    }

    // Across the row lanes of a warp (lanes < 32), then across warps through atomicMax on bits.
#pragma unroll
    for (int j = 0; j < V; ++j)
      for (int off = lanes; off < kWarpSize; off <<= 1)
        colmax[j] = max_amax(colmax[j], __shfl_xor_sync(kFullMask, colmax[j], off));
    const bool warp_leader = (tid % kWarpSize) < lanes;  // first row lane of this warp
    float* const row_scales = scales + p.scale_rows.base(scale_row);  // once per tile
    auto* scale_bits = reinterpret_cast<unsigned int*>(row_scales);
    if (!scales_mode && lanes == kThreads) {  // one row lane: each channel has one thread in the block
      if (active)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (float_bits(colmax[j]) != 0u) atomicMax(scale_bits + c + j, float_bits(colmax[j]));
    } else {
      // The tile's warps meet in shared memory. kAtomicAmax then makes one global atomic per
      // channel and tile: narrow views (decode sizes) have thousands of tiles on the same few
      // hundred channels, and same-address atomics serialize.
      if (active && warp_leader)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (float_bits(colmax[j]) != 0u) atomicMax(&amax_bits[lane * V + j], float_bits(colmax[j]));
      __syncthreads();
      if constexpr (!scales_mode) {
        const std::int64_t first_c = ((tile % p.col_tiles) << p.lanes_log2) * V;  // the tile's first channel
        for (int k = tid; k < lanes * V; k += kThreads) {
          const std::uint32_t m = amax_bits[k];
          amax_bits[k] = 0;  // zero again for the next tile
          if (m != 0 && first_c + k < p.channels) atomicMax(scale_bits + first_c + k, m);
        }
        __syncthreads();
      }
    }
    if constexpr (scales_mode) {
      // Each of the tile's lanes * V scales and reciprocals is computed by one thread, not by every
      // row lane: the scale's bits replace the amax's.
      const std::int64_t first_c = ((tile % p.col_tiles) << p.lanes_log2) * V;
      for (int k = tid; k < lanes * V; k += kThreads) {
        const float s = scale_from_amax(bits_to_float(amax_bits[k]));
        amax_bits[k] = float_bits(s);
        tile_inv[k] = reciprocal(s);
        if (first_c + k < p.channels) row_scales[first_c + k] = s;
      }
      __syncthreads();
      Fragment<float, V> scale, inv;
      // 16-bit rows that are all finite, under scales in the fast range, take the lean arithmetic
      // (device::quantize_within_amax).
      bool within_amax = sizeof(T) == 2 && !has_nonfinite;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        scale[j] = bits_to_float(amax_bits[lane * V + j]);
        inv[j] = tile_inv[lane * V + j];
        within_amax &= !is_nan(inv[j]);
      }
      if (active && q != nullptr) {
        std::int8_t* q_base = q + b * p.batch_stride + c;
        with_codes_path<T>(within_amax, [&](auto lean) {
#pragma unroll
          for (int i = 0; i < kRowItems; ++i) {
            const std::int64_t r = r_first + i * row_lanes;
            if (r >= r_end) break;
            device::store<V>(q_base + r * p.token_stride,
                             codes<decltype(lean)::value>(device::unpack<T, V>(held(i)), scale, inv));
          }
        });
      }
      __syncthreads();  // the next tile zeroes amax_bits and restages
    }
  }
  if (bad != 0 && nonfinite != nullptr) atomicAdd(nonfinite, bad);
}

/// Per-token scales of a whole-vector view, and its codes when q is not null, in one pass.
///
/// A thread owns units lane + j * lanes (j < kColItems) of kRowItems rows. A group's amax meets
/// across the `seg` lanes that hold it with shuffles; a row-wide group wider than a warp meets in
/// shared memory (one barrier). The tile stays in registers, so the input is read once.
template <class Policy, int V, int kColItems, class T>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, Policy::kMinBlocksPerSM)
    token_scales_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                        VectorPlan p,
                        float* __restrict__ scales,  // [batch * tokens, groups] (p.scale_rows)
                        std::int8_t* __restrict__ q,  // same view as x, or null
                        unsigned long long* nonfinite) {  // optional counter
  constexpr int kThreads = Policy::kThreads;
  constexpr int kRowItems = token_row_items<Policy>(kColItems);
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ float warp_amax[kRowItems][kWarps];
  const int tid = static_cast<int>(threadIdx.x), warp = tid / kWarpSize;
  const int lanes = 1 << p.lanes_log2, lane = tid & (lanes - 1);
  const int row_lanes = kThreads >> p.lanes_log2;
  // Who writes a scale: lane 0 of a row-wide group, or the first lane of each group segment.
  // Fixed per thread, so decided once.
  const bool row_leader = p.row_group && lane == 0;
  const bool seg_leader = !p.row_group && (lane & ((1 << p.seg_log2) - 1)) == 0;
  const int unit_stride = lanes * V;  // elements between a thread's units along a row
  unsigned long long bad = 0;

  for (std::int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const unsigned long long bad_before_tile = bad;
    const std::int64_t row0 = tile * p.rows_per_tile + (tid >> p.lanes_log2);
    device::Bits<V, T> v[kRowItems][kColItems];
    float amax[kRowItems][kColItems];
#pragma unroll
    for (int i = 0; i < kRowItems; ++i) {
      const std::int64_t r = row0 + static_cast<std::int64_t>(i) * row_lanes;
      const T* row = x + (r < p.rows ? p.row_offset(static_cast<std::uint32_t>(r)) : 0);
#pragma unroll
      for (int j = 0; j < kColItems; ++j) {
        const int unit = lane + j * lanes;
        if (r < p.rows && unit < p.units) v[i][j] = device::load_bits<V>(row + static_cast<std::int64_t>(unit) * V);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowItems; ++i) {
      const std::int64_t r = row0 + static_cast<std::int64_t>(i) * row_lanes;
#pragma unroll
      for (int j = 0; j < kColItems; ++j) {
        const bool valid = r < p.rows && lane + j * lanes < p.units;
        amax[i][j] = valid ? bits_to_float(device::amax_bits(device::unpack<T, V>(v[i][j]), bad)) : 0.0f;
      }
    }

    // Group amax. Values are finite and non-negative, so max_amax is exact and order-free.
    if (p.seg_log2 >= 0 && p.row_group) {  // each row lies in the `seg` lanes of one warp
#pragma unroll
      for (int i = 0; i < kRowItems; ++i) {
        float m = amax[i][0];
#pragma unroll
        for (int j = 1; j < kColItems; ++j) m = max_amax(m, amax[i][j]);
        for (int off = 1; off < (1 << p.seg_log2); off <<= 1) m = max_amax(m, __shfl_xor_sync(kFullMask, m, off));
#pragma unroll
        for (int j = 0; j < kColItems; ++j) amax[i][j] = m;
      }
    } else if (p.seg_log2 >= 0) {  // each group lies in `seg` neighbouring lanes at one item
#pragma unroll
      for (int i = 0; i < kRowItems; ++i)
#pragma unroll
        for (int j = 0; j < kColItems; ++j)
          for (int off = 1; off < (1 << p.seg_log2); off <<= 1)
            amax[i][j] = max_amax(amax[i][j], __shfl_xor_sync(kFullMask, amax[i][j], off));
    } else {  // one group per row, across lanes / 32 warps
#pragma unroll
      for (int i = 0; i < kRowItems; ++i) {
        float m = amax[i][0];
#pragma unroll
        for (int j = 1; j < kColItems; ++j) m = max_amax(m, amax[i][j]);
        m = bits_to_float(device::warp_max_bits(float_bits(m)));
        if (tid % kWarpSize == 0) warp_amax[i][warp] = m;
      }
      __syncthreads();
      const int first = (tid >> p.lanes_log2) * (lanes / kWarpSize);
#pragma unroll
      for (int i = 0; i < kRowItems; ++i) {
        float m = 0.0f;
        for (int w = first; w < first + lanes / kWarpSize; ++w) m = max_amax(m, warp_amax[i][w]);
#pragma unroll
        for (int j = 0; j < kColItems; ++j) amax[i][j] = m;
      }
      __syncthreads();  // warp_amax is written again by the next tile
    }

    // Codes, under each group's scale; the lean arithmetic (with_codes_path) when this thread's
    // values are all finite and its groups' amaxes give fast-range scales.
    auto write = [&](auto lean) {
#pragma unroll
      for (int i = 0; i < kRowItems; ++i) {
        const std::int64_t r = row0 + static_cast<std::int64_t>(i) * row_lanes;
        if (r >= p.rows) break;
        std::int8_t* q_row = q + (q != nullptr ? p.row_offset(static_cast<std::uint32_t>(r)) + lane * V : 0);
        float* s_row = scales + p.scale_rows.base(r);
        // A row-wide group has one scale for all j: two divisions per row item, not per unit.
        float scale = scale_from_amax(amax[i][0]), inv = reciprocal(scale);
#pragma unroll
        for (int j = 0; j < kColItems; ++j) {
          if (lane + j * lanes >= p.units) break;
          if (j > 0 && !p.row_group) {
            scale = scale_from_amax(amax[i][j]);
            inv = reciprocal(scale);
          }
          if (seg_leader) s_row[(lane + j * lanes) >> p.seg_log2] = scale;
          if (row_leader && j == 0) s_row[0] = scale;
          if (q != nullptr) {
            Fragment<float, V> s, rs;
#pragma unroll
            for (int e = 0; e < V; ++e) {
              s[e] = scale;
              rs[e] = inv;
            }
            device::store<V>(q_row + j * unit_stride, codes<decltype(lean)::value>(device::unpack<T, V>(v[i][j]), s, rs));
          }
        }
      }
    };
    bool within_amax = false;
    if constexpr (sizeof(T) == 2) {
      within_amax = bad == bad_before_tile;
#pragma unroll
      for (int i = 0; i < kRowItems; ++i)
#pragma unroll
        for (int j = 0; j < kColItems; ++j) within_amax &= lean_codes_apply(amax[i][j]);
    }
    with_codes_path<T>(within_amax, write);
  }
  if (bad != 0 && nonfinite != nullptr) atomicAdd(nonfinite, bad);
}

}  // namespace detail
KVQ_NAMESPACE_END
