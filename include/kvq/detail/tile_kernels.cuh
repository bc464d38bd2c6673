// kvq/detail/tile_kernels.cuh: the tile kernels behind the tiled, coarsened and vectorized strategies.
//
// One block owns one tile at a time (see tile_plan.cuh). A strategy is a policy: threads per block,
// units per thread per chunk (coarsening), vector width V, and whether a chunk is staged in shared
// memory (tiled) or held in registers (coarsened, vectorized). Group amax values meet in shared
// memory as bits with atomicMax, which is exact and independent of order, so every strategy
// produces the reference's scales bit for bit.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_plan.cuh>
#include <kvq/device.cuh>

#include <cstdint>
#include <type_traits>

KVQ_NAMESPACE_BEGIN
namespace detail {

using device::Fragment;

/// Where one tile lies in the view.
struct TileCoord {
  std::int64_t row0;       // per-token: first flattened row; per-channel: first token
  std::int64_t b;          // per-channel: batch
  std::int64_t scale_row;  // per-channel: token group
  std::int64_t c0;         // first channel
  int rows, cols;
};

/// Decodes tile `tile`; false when it holds nothing (sub-blocks past a ragged last group).
__device__ inline bool tile_coord(const TilePlan& p, std::int64_t tile, TileCoord& tc) {
  const std::int64_t ct = tile % p.col_tiles;
  const std::int64_t rest = tile / p.col_tiles;
  tc.c0 = ct * p.tile_cols;
  tc.cols = static_cast<int>(min(p.tile_cols, p.channels - tc.c0));
  if (p.per_token) {
    tc.b = 0;
    tc.scale_row = 0;
    tc.row0 = rest * p.tile_rows;
    tc.rows = static_cast<int>(min(p.tile_rows, p.batch * p.tokens - tc.row0));
  } else {
    const std::int64_t rb = rest % p.row_blocks;
    tc.b = rest / p.row_blocks;
    tc.scale_row = rb / p.sub_blocks;
    tc.row0 = tc.scale_row * p.group + (rb % p.sub_blocks) * p.tile_rows;
    const std::int64_t group_end = min((tc.scale_row + 1) * p.group, p.tokens);
    tc.rows = static_cast<int>(max(std::int64_t{0}, min(p.tile_rows, group_end - tc.row0)));
  }
  return tc.rows > 0;
}

/// Element offset of (row_local, channel c0) of a tile.
template <bool kPerToken>
__device__ inline std::int64_t row_offset(const TilePlan& p, const TileCoord& tc, int row_local) {
  if constexpr (kPerToken) {
    const std::int64_t r = tc.row0 + row_local;
    std::int64_t b, t;
    if (r < INT32_MAX && p.tokens < INT32_MAX) {
      std::uint32_t q, m;
      p.token_div.divmod(static_cast<std::uint32_t>(r), q, m);
      b = q;
      t = m;
    } else {
      b = r / p.tokens;
      t = r % p.tokens;
    }
    return b * p.batch_stride + t * p.token_stride + tc.c0;
  } else {
    return tc.b * p.batch_stride + (tc.row0 + row_local) * p.token_stride + tc.c0;
  }
}

/// Index into the scale tensor of slot s of a tile, or -1 when the slot lies outside the view.
template <bool kPerToken>
__device__ inline std::int64_t slot_scale_index(const TilePlan& p, const TileCoord& tc, int s) {
  if constexpr (kPerToken) {
    const int row_local = s / p.slots_per_row, g = s % p.slots_per_row;
    if (row_local >= tc.rows || static_cast<std::int64_t>(g) * p.group >= tc.cols) return -1;
    return p.scale_rows.base(tc.row0 + row_local) + tc.c0 / p.group + g;
  } else {
    if (s >= tc.cols) return -1;
    return p.scale_rows.base(tc.b * p.groups + tc.scale_row) + tc.c0 + s;
  }
}

/// One unit (V consecutive channels of one row) of a tile; n = 0 when the unit is outside it.
struct Unit {
  int row_local;
  int col;  // channel offset from the tile's c0
  int n;    // valid elements, V for a full unit
  std::int64_t offset;
};

template <int V, bool kPerToken>
__device__ inline Unit unit_at(const TilePlan& p, const TileCoord& tc, int u) {
  Unit un{0, 0, 0, 0};
  if (u >= p.units) return un;
  std::uint32_t row_local, vec;
  p.unit_div.divmod(static_cast<std::uint32_t>(u), row_local, vec);
  un.row_local = static_cast<int>(row_local);
  un.col = static_cast<int>(vec) * V;
  if (un.row_local >= tc.rows || un.col >= tc.cols) return un;
  un.n = min(V, tc.cols - un.col);
  un.offset = row_offset<kPerToken>(p, tc, un.row_local) + un.col;
  return un;
}

/// A full unit is one vector access; a partial one (row tail) is read element by element and
/// padded with zeros, which are finite and never raise an amax.
template <int V, class E>
__device__ inline Fragment<E, V> load_unit(const E* base, const Unit& u) {
  if (u.n == V) return device::load<V>(base + u.offset);
  Fragment<E, V> f;
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = j < u.n ? base[u.offset + j] : E{};
  return f;
}

template <int V, class E>
__device__ inline void store_unit(E* base, const Unit& u, const Fragment<E, V>& f) {
  if (u.n == V) {
    device::store<V>(base + u.offset, f);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < u.n) base[u.offset + j] = f[j];
}

/// Per-token: the slot of a unit's first element, and how many elements remain in that group.
struct UnitSlot {
  int slot;
  std::int64_t run;
};

__device__ inline UnitSlot per_token_slot(const TilePlan& p, const Unit& u) {
  const std::uint32_t g = p.group_div.div(static_cast<std::uint32_t>(u.col));
  return UnitSlot{u.row_local * p.slots_per_row + static_cast<int>(g),
                  static_cast<std::int64_t>(g + 1) * p.group - u.col};
}

/// Slot of each element of a unit (elements past the row's end get the unit's first slot).
template <int V, bool kPerToken>
__device__ inline void unit_slots(const TilePlan& p, const Unit& u, int (&slot)[V]) {
  if constexpr (kPerToken) {
    const UnitSlot us = per_token_slot(p, u);
    if (us.run >= V) {  // the usual case: the whole unit lies in one group
#pragma unroll
      for (int j = 0; j < V; ++j) slot[j] = us.slot;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        slot[j] = (j < us.run || j >= u.n) ? us.slot : us.slot + 1 + static_cast<int>(p.group_div.div(j - us.run));
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) slot[j] = u.col + (j < u.n ? j : 0);
  }
}

/// Shared memory of one tile kernel: slots, and the staged chunk for the tiled strategy.
template <class Policy, class E, int V>
struct TileStorage {
  static constexpr int kStaged = Policy::kStageInShared ? Policy::kThreads * Policy::kItems : 1;
  std::uint32_t amax_bits[kMaxSlots];  // scales_kernel: each slot's amax, zero between tiles
  std::uint32_t slot_bits[kMaxSlots];  // the scale of each slot, as bits
  float slot_inv[kMaxSlots];           // reciprocal(scale), for quantize_value's fast path
  Fragment<E, V> stage[kStaged];

  __device__ void set_scale(int s, float scale) {
    slot_bits[s] = float_bits(scale);
    slot_inv[s] = reciprocal(scale);
  }
};

/// Hands each unit the scales (and reciprocals) of its elements, once the tile's slots hold scales.
/// Per-channel, a thread's channels are the same for every unit of the tile, so they are read from
/// shared memory once; per-token, a unit usually lies in one group and reads one slot.
template <int V, bool kPerToken>
struct UnitScaler {
  Fragment<float, V> channel_scale, channel_inv;

  template <class Storage>
  __device__ UnitScaler(const TilePlan& p, const Storage& sm, int tid) {
    if constexpr (!kPerToken) {
      const int col = (tid % p.vecs_per_row) * V;  // < slots, and col + V <= slots
#pragma unroll
      for (int j = 0; j < V; ++j) {
        channel_scale[j] = bits_to_float(sm.slot_bits[col + j]);
        channel_inv[j] = sm.slot_inv[col + j];
      }
    }
  }

  template <class Storage>
  __device__ void get(const TilePlan& p, const Unit& u, const Storage& sm, Fragment<float, V>& scale,
                      Fragment<float, V>& inv) const {
    if constexpr (kPerToken) {
      const UnitSlot us = per_token_slot(p, u);
      if (us.run >= V) {
        const float s = bits_to_float(sm.slot_bits[us.slot]), r = sm.slot_inv[us.slot];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          scale[j] = s;
          inv[j] = r;
        }
        return;
      }
      int slot[V];
      unit_slots<V, kPerToken>(p, u, slot);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        scale[j] = bits_to_float(sm.slot_bits[slot[j]]);
        inv[j] = sm.slot_inv[slot[j]];
      }
    } else {
      scale = channel_scale;
      inv = channel_inv;
    }
  }
};

/// Computes the scales of every tile (TileMode::kScales, optionally writing codes too when q is not
/// null) or merges each tile's group amax into `scales` as bits (TileMode::kAtomicAmax; the buffer
/// must be zeroed first and finalized after).
///
/// One block per tile. (Persistent blocks that prefetch their next tile into registers were
/// measured slower on the H200 than letting the block scheduler overlap many short blocks.)
template <class Policy, int V, bool kPerToken, class T>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, Policy::kMinBlocksPerSM)
    scales_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                  TilePlan p, TileMode mode,
                  float* __restrict__ scales,  // scale_shape(view, spec)
                  std::int8_t* __restrict__ q,  // same view as x, or null
                  unsigned long long* nonfinite) {  // optional counter
  constexpr int kThreads = Policy::kThreads, kItems = Policy::kItems, kChunk = kThreads * kItems;
  __shared__ TileStorage<Policy, T, V> sm;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % kWarpSize;
  unsigned long long bad = 0;
  const bool one_chunk = p.chunks == 1;

  for (int s = tid; s < p.slots; s += kThreads) sm.amax_bits[s] = 0;
  __syncthreads();

  for (std::int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    TileCoord tc;
    const bool nonempty = tile_coord(p, tile, tc);  // the same for the whole block

    // Sweep 1: amax of every slot. A one-chunk tile stays in registers (or the stage) for sweep 2.
    Fragment<T, V> held[kItems];
    std::uint32_t colmax[V] = {};  // per-channel: this thread's channels never change
    int run_slot = -1;             // per-token: the slot being accumulated, and its amax
    std::uint32_t run_max = 0;
    for (int chunk = 0; chunk < p.chunks; ++chunk) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        held[k] = load_unit<V>(x, unit_at<V, kPerToken>(p, tc, chunk * kChunk + k * kThreads + tid));
        if constexpr (Policy::kStageInShared) sm.stage[k * kThreads + tid] = held[k];
      }
      if constexpr (Policy::kStageInShared) __syncthreads();
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const Fragment<T, V> f = Policy::kStageInShared ? sm.stage[k * kThreads + tid] : held[k];
        if (nonfinite != nullptr) bad += device::count_nonfinite(f);
        if constexpr (kPerToken) {
          const Unit u = unit_at<V, kPerToken>(p, tc, chunk * kChunk + k * kThreads + tid);
          if (u.n == 0) continue;
          const UnitSlot us = per_token_slot(p, u);
          if (us.slot != run_slot) {  // a new group: hand the finished one over
            if (run_slot >= 0) atomicMax(&sm.amax_bits[run_slot], run_max);
            run_slot = us.slot;
            run_max = 0;
          }
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (j >= u.n) continue;
            const std::uint32_t a = finite_abs_bits(to_float(f[j]));
            if (j < us.run)
              run_max = max(run_max, a);
            else  // a group boundary inside the vector: only when V does not divide the group
              atomicMax(&sm.amax_bits[us.slot + 1 + static_cast<int>(p.group_div.div(j - us.run))], a);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) colmax[j] = max(colmax[j], finite_abs_bits(to_float(f[j])));
        }
      }
      if constexpr (Policy::kStageInShared) __syncthreads();
    }
    if constexpr (kPerToken) {
      // Lanes that end on the same slot (the whole warp, for long groups) combine first.
      const unsigned peers = __match_any_sync(kFullMask, run_slot);
      const std::uint32_t m = device::warp_max_bits(run_max, peers);
      if (run_slot >= 0 && lane == __ffs(peers) - 1) atomicMax(&sm.amax_bits[run_slot], m);
    } else {
      // Every unit of this thread lies in the same V channels (vecs_per_row divides kThreads);
      // lanes that share channels are vecs_per_row apart.
      const int wv = p.vecs_per_row;
#pragma unroll
      for (int j = 0; j < V; ++j)
        for (int off = kWarpSize / 2; off >= wv; off /= 2) colmax[j] = max(colmax[j], __shfl_xor_sync(kFullMask, colmax[j], off));
      const int col = (tid % wv) * V;
      if (lane < wv)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (col + j < tc.cols && colmax[j] != 0) atomicMax(&sm.amax_bits[col + j], colmax[j]);
    }
    __syncthreads();

    // Scales. The amax slots are zeroed here for the next tile: nothing reads them until its sweep 1,
    // which starts after the barrier below.
    for (int s = tid; s < p.slots; s += kThreads) {
      const std::int64_t idx = nonempty ? slot_scale_index<kPerToken>(p, tc, s) : -1;
      const std::uint32_t bits = sm.amax_bits[s];
      sm.amax_bits[s] = 0;
      if (mode == TileMode::kAtomicAmax) {
        if (idx >= 0 && bits != 0) atomicMax(reinterpret_cast<unsigned int*>(scales) + idx, bits);
      } else {
        const float scale = scale_from_amax(bits_to_float(bits));
        sm.set_scale(s, scale);
        if (idx >= 0) scales[idx] = scale;
      }
    }
    __syncthreads();

    if (q != nullptr && nonempty) {  // sweep 2: codes
      const UnitScaler<V, kPerToken> scaler(p, sm, tid);
      for (int chunk = 0; chunk < p.chunks; ++chunk) {
        if (!one_chunk) {  // the tile did not fit: read the chunk again (from L2, usually)
#pragma unroll
          for (int k = 0; k < kItems; ++k)
            held[k] = load_unit<V>(x, unit_at<V, kPerToken>(p, tc, chunk * kChunk + k * kThreads + tid));
        }
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
          const Unit u = unit_at<V, kPerToken>(p, tc, chunk * kChunk + k * kThreads + tid);
          if (u.n == 0) continue;
          const Fragment<T, V> f = (Policy::kStageInShared && one_chunk) ? sm.stage[k * kThreads + tid] : held[k];
          Fragment<float, V> scale, inv;
          scaler.get(p, u, sm, scale, inv);
          store_unit<V>(q, u, device::quantize<V>(f, scale, inv));
        }
      }
    }
  }
  if (bad != 0) atomicAdd(nonfinite, bad);
}

/// Codes under given scales (In = T, Out = int8), or values of codes (In = int8, Out = T).
template <class Policy, int V, bool kPerToken, class In, class Out>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, Policy::kMinBlocksPerSM)
    apply_kernel(const In* __restrict__ in,  // view (batch, tokens, channels)
                 const float* __restrict__ scales,  // scale_shape(view, spec)
                 TilePlan p,
                 Out* __restrict__ out,  // same view
                 unsigned long long* nonfinite) {  // optional counter (quantize only)
  constexpr int kThreads = Policy::kThreads, kItems = Policy::kItems, kChunk = kThreads * kItems;
  constexpr bool kDequantize = std::is_same_v<In, std::int8_t>;
  __shared__ TileStorage<Policy, In, V> sm;
  const int tid = static_cast<int>(threadIdx.x);
  unsigned long long bad = 0;

  for (std::int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    TileCoord tc;
    if (!tile_coord(p, tile, tc)) continue;
    for (int s = tid; s < p.slots; s += kThreads) {
      const std::int64_t idx = slot_scale_index<kPerToken>(p, tc, s);
      sm.set_scale(s, idx >= 0 ? sanitize_scale(scales[idx]) : 1.0f);
    }
    __syncthreads();
    const UnitScaler<V, kPerToken> scaler(p, sm, tid);
    for (int chunk = 0; chunk < p.chunks; ++chunk) {
      Fragment<In, V> held[kItems];
      Unit units[kItems];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        units[k] = unit_at<V, kPerToken>(p, tc, chunk * kChunk + k * kThreads + tid);
        held[k] = load_unit<V>(in, units[k]);
        if constexpr (Policy::kStageInShared) sm.stage[k * kThreads + tid] = held[k];
      }
      if constexpr (Policy::kStageInShared) __syncthreads();
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const Unit& u = units[k];
        if (u.n == 0) continue;
        const Fragment<In, V> f = Policy::kStageInShared ? sm.stage[k * kThreads + tid] : held[k];
        Fragment<float, V> scale, inv;
        scaler.get(p, u, sm, scale, inv);
        if constexpr (kDequantize) {
          store_unit<V>(out, u, device::dequantize<Out, V>(f, scale));
        } else {
          if (nonfinite != nullptr) bad += device::count_nonfinite(f);
          store_unit<V>(out, u, device::quantize<V>(f, scale, inv));
        }
      }
      if constexpr (Policy::kStageInShared) __syncthreads();
    }
    __syncthreads();
  }
  if (bad != 0) atomicAdd(nonfinite, bad);
}

/// What scale_kernel does to each scale of a call.
enum class ScaleStep {
  kZero,      ///< 0: the start of an atomic amax
  kFinalize,  ///< scale_from_amax(the amax whose bits the scale holds): the end of the two-pass path
};

/// Every scale of a call (rows flattened scale rows of `cols` each, where `at` says), one step.
/// (A template in any case, so that every translation unit may define it: kernels cannot be `inline`.)
template <ScaleStep kStep>
KVQ_KERNEL void scale_kernel(float* __restrict__ scales, ScaleRows at, std::int64_t rows, std::int64_t cols) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    float& s = scales[at.base(i / cols) + i % cols];
    s = kStep == ScaleStep::kZero ? 0.0f : scale_from_amax(s);
  }
}

/// Blocks for a grid-stride loop over `work` items: all of them up to the hardware limit.
inline unsigned grid_for(std::int64_t work) {
  return static_cast<unsigned>(std::min<std::int64_t>(std::max<std::int64_t>(work, 1), std::int64_t{1} << 30));
}

/// Applies `step` to every scale of a call, and only to them: scales with gaps between rows
/// (QuantSpec::scale_strides) keep what the gaps hold. Contiguous scales are zeroed by a memset.
template <ScaleStep kStep>
inline cudaError_t scale_step(float* scales, const KvView& view, const QuantSpec& spec, cudaStream_t stream) {
  const ScaleShape shape = scale_shape(view, spec);
  const std::int64_t rows = shape.batch * shape.rows, n = rows * shape.cols;
  if (kStep == ScaleStep::kZero && contiguous_scales(view, spec))
    return cudaMemsetAsync(scales, 0, static_cast<std::size_t>(n) * sizeof(float), stream);
  constexpr int kThreads = 256;
  scale_kernel<kStep><<<grid_for(ceil_div<std::int64_t>(n, kThreads)), kThreads, 0, stream>>>(
      scales, ScaleRows(view, spec), rows, shape.cols);
  return check_launch();
}

/// Launches the tile kernels of one strategy at a vector width chosen from the operands' alignment.
template <class Policy>
struct TileStrategy {
  template <int V, class T>
  static cudaError_t scales_at(const T* x, const KvView& view, const QuantSpec& spec, TileMode mode, float* scales,
                               std::int8_t* q, cudaStream_t stream) {
    const TilePlan p = plan_tiles(view, spec, mode, Policy::kThreads, Policy::kItems, V, sizeof(T));
    const unsigned grid = grid_for(p.tiles);
    if (p.per_token)
      scales_kernel<Policy, V, true><<<grid, Policy::kThreads, 0, stream>>>(x, p, mode, scales, q, spec.nonfinite_count);
    else
      scales_kernel<Policy, V, false><<<grid, Policy::kThreads, 0, stream>>>(x, p, mode, scales, q, spec.nonfinite_count);
    return check_launch();
  }

  template <int V, class In, class Out>
  static cudaError_t apply_at(const In* in, const float* scales, const KvView& view, const QuantSpec& spec, Out* out,
                              cudaStream_t stream) {
    constexpr int kElemBytes = sizeof(In) > sizeof(Out) ? sizeof(In) : sizeof(Out);
    const TilePlan p = plan_tiles(view, spec, TileMode::kApply, Policy::kThreads, Policy::kItems, V, kElemBytes);
    const unsigned grid = grid_for(p.tiles);
    unsigned long long* counter = std::is_same_v<In, std::int8_t> ? nullptr : spec.nonfinite_count;
    if (p.per_token)
      apply_kernel<Policy, V, true><<<grid, Policy::kThreads, 0, stream>>>(in, scales, p, out, counter);
    else
      apply_kernel<Policy, V, false><<<grid, Policy::kThreads, 0, stream>>>(in, scales, p, out, counter);
    return check_launch();
  }

  /// Widest vector (of at most Policy::kVectorBytes of T) that every operand allows.
  template <class T>
  static int vector_width(const KvView& view, const void* t_ptr, const void* q_ptr) {
    constexpr int kMax = Policy::kVectorBytes / static_cast<int>(sizeof(T)) > 0 ? Policy::kVectorBytes / static_cast<int>(sizeof(T)) : 1;
    return choose_vector_width(view, kMax, t_ptr, sizeof(T), q_ptr, 1);
  }

  template <class T>
  static cudaError_t scales(const T* x, const KvView& view, const QuantSpec& spec, TileMode mode, float* scales,
                            std::int8_t* q, cudaStream_t stream) {
    switch (vector_width<T>(view, x, q != nullptr ? static_cast<const void*>(q) : static_cast<const void*>(x))) {
      case 8: if constexpr (Policy::kVectorBytes / sizeof(T) >= 8) return scales_at<8>(x, view, spec, mode, scales, q, stream); [[fallthrough]];
      case 4: if constexpr (Policy::kVectorBytes / sizeof(T) >= 4) return scales_at<4>(x, view, spec, mode, scales, q, stream); [[fallthrough]];
      case 2: if constexpr (Policy::kVectorBytes / sizeof(T) >= 2) return scales_at<2>(x, view, spec, mode, scales, q, stream); [[fallthrough]];
      default: return scales_at<1>(x, view, spec, mode, scales, q, stream);
    }
  }

  template <class T, class In, class Out>
  static cudaError_t apply(const In* in, const float* scales, const KvView& view, const QuantSpec& spec, Out* out,
                           cudaStream_t stream) {
    const void* t_ptr = std::is_same_v<In, std::int8_t> ? static_cast<const void*>(out) : static_cast<const void*>(in);
    const void* q_ptr = std::is_same_v<In, std::int8_t> ? static_cast<const void*>(in) : static_cast<const void*>(out);
    switch (vector_width<T>(view, t_ptr, q_ptr)) {
      case 8: if constexpr (Policy::kVectorBytes / sizeof(T) >= 8) return apply_at<8>(in, scales, view, spec, out, stream); [[fallthrough]];
      case 4: if constexpr (Policy::kVectorBytes / sizeof(T) >= 4) return apply_at<4>(in, scales, view, spec, out, stream); [[fallthrough]];
      case 2: if constexpr (Policy::kVectorBytes / sizeof(T) >= 2) return apply_at<2>(in, scales, view, spec, out, stream); [[fallthrough]];
      default: return apply_at<1>(in, scales, view, spec, out, stream);
    }
  }

  /// Codes of x under scales computed from x itself (the second pass of whole-sequence scales).
  /// The tile kernels take the general arithmetic for it.
  template <class T>
  static cudaError_t codes_under_own_scales(const T* x, const float* scales, const KvView& view,
                                            const QuantSpec& spec, std::int8_t* q, cudaStream_t stream) {
    return apply<T>(x, scales, view, spec, q, stream);
  }
};

}  // namespace detail
KVQ_NAMESPACE_END
