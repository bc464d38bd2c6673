// kvq/detail/tile_plan.cuh: how the tiled, coarsened and vectorized strategies cut a view into tiles.
//
// A tile is `rows x cols` elements of one view, owned by one thread block. Within a tile the block
// walks "units" of V consecutive channels (one vector access each), `Policy::kThreads *
// Policy::kItems` units per chunk. A tile's elements share at most `kMaxSlots` scales ("slots"),
// kept in shared memory while the tile is processed:
//   per-token:   rows of the flattened (batch * tokens) x channels matrix; a tile spans whole
//                groups of channels, slot = (row, group within the tile);
//   per-channel: rows are tokens of one batch inside one token group; slot = channel within the
//                tile; a group longer than a tile is split into sub-blocks whose amax are merged
//                with atomicMax (the two-pass path).
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/config.cuh>
#include <kvq/detail/scale_rows.cuh>
#include <kvq/types.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>

KVQ_NAMESPACE_BEGIN
namespace detail {

/// Scales one tile may touch; 8 KiB of shared memory.
constexpr int kMaxSlots = 2048;

/// What a tile kernel does with its tile.
enum class TileMode {
  kScales,     ///< compute each group's scale (optionally codes too): a tile spans whole groups
  kAtomicAmax, ///< merge the tile's per-group amax into the scale buffer (as bits) with atomicMax
  kApply,      ///< read given scales: quantize with them, or dequantize
};

struct TilePlan {
  // the view
  std::int64_t batch, tokens, channels, batch_stride, token_stride;
  bool per_token;
  std::int64_t group;   // elements per scale along the reduced axis (>= 1)
  std::int64_t groups;  // scales along the reduced axis
  // the tiling
  std::int64_t tile_rows, tile_cols;  // R x W elements
  std::int64_t col_tiles;             // tiles across the channels
  std::int64_t sub_blocks;            // per-channel: tiles down one token group
  std::int64_t row_blocks;            // tiles down the rows (per-token) or groups * sub_blocks (per-channel)
  std::int64_t tiles;                 // total: batch (per-channel only) * row_blocks * col_tiles
  int vecs_per_row;                   // units in one tile row
  int slots_per_row;                  // per-token: groups in one tile row
  int slots;                          // slots of one tile
  int units;                          // units of one tile
  int chunks;                         // ceil(units / units per chunk)
  FastDivmod unit_div;                // divides a unit index by vecs_per_row
  FastDivmod token_div;               // divides a flattened row index by tokens (rows < 2^31)
  FastDivmod group_div;               // divides a channel offset by group (per-token)
  ScaleRows scale_rows;               // where each scale row lives
};

inline std::int64_t pow2_floor(std::int64_t x) {
  std::int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}
inline std::int64_t pow2_ceil(std::int64_t x) {
  std::int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

/// Per-channel groups longer than this many tokens take the two-pass path.
constexpr std::int64_t kMaxOnePassGroupTokens = 1024;

/// True when per-channel scales of this spec need the two-pass path (a grid-wide amax first): groups
/// longer than one block stages, whole sequences of more than kMaxOnePassGroupTokens included. A
/// shorter whole sequence (a page of keys, a decode-sized view) is one group, done in one pass.
inline bool per_channel_two_pass(const KvView& v, const QuantSpec& s) {
  return s.granularity == Granularity::kPerChannel && group_length(v.tokens, s.group) > kMaxOnePassGroupTokens;
}

/// Plans the tiles of `view` for a kernel of `threads * items` units per chunk, vector width V,
/// element size `elem_bytes` of the wider operand, in `mode`.
inline TilePlan plan_tiles(const KvView& view, const QuantSpec& spec, TileMode mode, int threads, int items, int V,
                           int elem_bytes) {
  TilePlan p{};
  p.batch = view.batch;
  p.tokens = view.tokens;
  p.channels = view.channels;
  p.batch_stride = view.batch_stride;
  p.token_stride = view.token_stride;
  p.per_token = spec.granularity == Granularity::kPerToken;
  p.scale_rows = ScaleRows(view, spec);
  const std::int64_t chunk_units = static_cast<std::int64_t>(threads) * items;
  const std::int64_t D = view.channels;

  if (p.per_token) {
    p.group = group_length(D, spec.group);
    p.groups = group_count(D, spec.group);
    const std::int64_t g = p.group;
    const std::int64_t rows = view.batch * view.tokens;
    const std::int64_t cap = std::min<std::int64_t>(chunk_units * V, static_cast<std::int64_t>(kMaxSlots) * g);
    if (D <= cap) {
      p.tile_cols = D;
      p.vecs_per_row = static_cast<int>(ceil_div<std::int64_t>(D, V));
      p.slots_per_row = static_cast<int>(ceil_div<std::int64_t>(D, g));
      std::int64_t r = std::min<std::int64_t>(chunk_units / p.vecs_per_row, kMaxSlots / p.slots_per_row);
      p.tile_rows = std::max<std::int64_t>(1, std::min(r, rows));
    } else {
      const std::int64_t lcm = (g >= D) ? D : std::lcm<std::int64_t>(g, V);
      p.tile_cols = lcm <= cap ? (cap / lcm) * lcm : lcm;
      p.vecs_per_row = static_cast<int>(ceil_div<std::int64_t>(p.tile_cols, V));
      p.slots_per_row = static_cast<int>(ceil_div<std::int64_t>(p.tile_cols, g));
      p.tile_rows = 1;
    }
    p.col_tiles = ceil_div(D, p.tile_cols);
    p.sub_blocks = 1;
    p.row_blocks = ceil_div(rows, p.tile_rows);
    p.tiles = p.row_blocks * p.col_tiles;
    p.slots = static_cast<int>(p.tile_rows) * p.slots_per_row;
  } else {
    p.group = group_length(view.tokens, spec.group);
    p.groups = group_count(view.tokens, spec.group);
    const std::int64_t wv_max = std::min<std::int64_t>(threads, pow2_ceil(ceil_div<std::int64_t>(D, V)));
    const std::int64_t wv_min = std::min<std::int64_t>(wv_max, std::max<std::int64_t>(1, 128 / (V * elem_bytes)));
    std::int64_t wv, r;
    if (mode == TileMode::kScales) {  // one tile holds a whole group, preferably in one chunk
      r = p.group;
      wv = std::clamp<std::int64_t>(pow2_floor(std::max<std::int64_t>(1, chunk_units / r)), wv_min, wv_max);
    } else if (mode == TileMode::kAtomicAmax) {  // narrow and tall: few atomics per element
      wv = wv_min;
      r = std::min<std::int64_t>(p.group, 8 * chunk_units / wv);
    } else {  // apply: wide rows, a few chunks deep to amortize loading the scales
      wv = wv_max;
      r = std::min<std::int64_t>(p.group, std::max<std::int64_t>(1, 4 * chunk_units / wv));
    }
    p.vecs_per_row = static_cast<int>(wv);
    p.tile_cols = wv * V;
    p.tile_rows = r;
    p.slots_per_row = static_cast<int>(p.tile_cols);
    p.slots = static_cast<int>(p.tile_cols);
    p.col_tiles = ceil_div(D, p.tile_cols);
    p.sub_blocks = ceil_div(p.group, r);
    p.row_blocks = p.groups * p.sub_blocks;
    p.tiles = view.batch * p.row_blocks * p.col_tiles;
  }
  p.units = static_cast<int>(p.tile_rows * p.vecs_per_row);
  p.chunks = static_cast<int>(ceil_div<std::int64_t>(p.units, chunk_units));
  p.unit_div = FastDivmod(static_cast<std::uint32_t>(p.vecs_per_row));
  p.token_div = FastDivmod(static_cast<std::uint32_t>(std::min<std::int64_t>(view.tokens, INT32_MAX)));
  p.group_div = FastDivmod(static_cast<std::uint32_t>(std::min<std::int64_t>(p.group, INT32_MAX)));
  return p;
}

/// Largest vector width (in elements, a power of two <= v_max) at which every operand's rows start
/// aligned: each pointer aligned to V * its element size, and every stride that is used a multiple
/// of V. Row tails shorter than V are handled element by element, so any channel count works.
inline int choose_vector_width(const KvView& view, int v_max, const void* a, int a_bytes, const void* b, int b_bytes) {
  for (int v = v_max; v > 1; v /= 2) {
    const bool ok = reinterpret_cast<std::uintptr_t>(a) % (static_cast<std::uintptr_t>(v) * a_bytes) == 0 &&
                    reinterpret_cast<std::uintptr_t>(b) % (static_cast<std::uintptr_t>(v) * b_bytes) == 0 &&
                    (view.batch <= 1 || view.batch_stride % v == 0) && (view.tokens <= 1 || view.token_stride % v == 0);
    if (ok) return v;
  }
  return 1;
}

}  // namespace detail
KVQ_NAMESPACE_END
