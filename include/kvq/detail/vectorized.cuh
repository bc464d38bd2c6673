// kvq/detail/vectorized.cuh: the vectorized strategy (16-byte accesses, coarsened).
//
// Each unit is V = 16 / sizeof(T) consecutive channels, read in one 16-byte load (float4-like for
// fp32, 8 halves for fp16/bf16) and written as one V-byte store of codes. Views made of whole
// vectors (channels % V == 0, every pointer and stride aligned) run the lean kernels of
// vector_kernels.cuh, or, per token with one scale per row of at most 64 units (every head dim
// engines use), those of row_kernels.cuh. Any other view runs the tile kernels at the widest width its alignment
// allows (16, 8, 4 or 2 bytes, else scalar), with a row's last partial vector handled element by
// element, so any channel count and any element-aligned offset works. The default
// (Variant::kAuto) for every operation.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/row_kernels.cuh>
#include <kvq/detail/tile_kernels.cuh>
#include <kvq/detail/vector_kernels.cuh>

#include <atomic>
#include <cstdint>

KVQ_NAMESPACE_BEGIN
namespace detail {

// Chosen on the H200 (bench/results/h200-2026-11-28.md, in git at db59eb8): 256 threads, 4 units
// of 16 B per thread and a cap of 85 registers (3 blocks per SM) gave fp32 quantize_with_scales
// 3.83 TB/s (90% of a device copy) with the tile kernels. 8 units per thread spilled and was
// slower; persistent blocks with a register prefetch of the next tile were slower than one block
// per tile.
struct VectorizedPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 3;  // caps registers at 85 so 3 blocks (24 warps) fit
  static constexpr int kItems = 4;          // 4 x 16 B in flight per thread: 16 KiB per block
  static constexpr int kVectorBytes = 16;
  static constexpr bool kStageInShared = false;
};

/// The whole-vector kernels' policy: lighter kernels, so more blocks per SM.
struct WholeVectorPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 4;  // caps registers at 64
  static constexpr int kMinBlocksPerSMDequantize = 6;  // vector_apply_kernel, per-channel dequantize:
                                                       // 40 registers
  static constexpr int kMinBlocksPerSMStaged = 3;  // channel_scales_kernel, one pass: 80 registers;
                                                   // its 64-80 KiB of staged rows allow 3 blocks too
  static constexpr int kItems = 4;           // vector_apply_kernel, channel_scales_kernel: rows per thread
                                             // per pass (more rows made dequantize slower on the H200)
  // vector_apply_kernel: passes per tile at most. Taller tiles amortize the per-channel reciprocals,
  // which 16-bit quantize needs (8 per thread per tile); shorter ones were faster for the rest
  // (H200, 131072 x 8192: 16-bit quantize_with_scales 94% -> 84% of copy at 4 passes instead of
  // 16). Per-channel dequantize, one pass of 4 rows with 6 blocks per SM: fp32 / fp16 1335 / 783 us
  // at 2 passes and 4 blocks, 1303 / 777 us now (821 us for fp16 at 4 blocks); 131072 x 1024 174 /
  // 105 -> 170 / 103 us. Per-token dequantize (a scale per row) kept 2 passes at 4 blocks: fp16
  // 800 us, against 835 us at one pass and 6 blocks (bench/results/h200/experiments_2026-11-29c.txt
  // at db59eb8, sections 3-4).
  static constexpr int kApplyPasses = 4;
  static constexpr int kApplyPasses16BitQuantize = 16;
  static constexpr int kApplyPassesDequantize = 1;
  static constexpr int kApplyPassesDequantizePerToken = 2;
  // vector_apply_kernel: tiles to keep at least while adding passes, about two waves of 4
  // blocks on each of the H200's 132 SMs. 4096 kept tiles short on mid-sized views (H200, L2
  // flushed: fp16 quantize_with_scales 131072 x 256 and 262144 x 128 42.0 / 41.7 -> 34.8 / 34.9 us,
  // fp32 65536 x 256 32.0 -> 29.1 us; experiments_2026-11-29c.txt at db59eb8).
  static constexpr std::int64_t kApplyTargetTiles = 1024;
  // vector_apply_kernel and channel_scales_kernel<kScales>: views of fewer tiles than this (two
  // blocks per SM of an H200) get shorter or narrower ones, down to one row per thread
  // (plan_vector_apply, plan_channel_scales).
  static constexpr std::int64_t kMinTiles = 264;
  // channel_scales_kernel<kAtomicAmax> (the whole-sequence amax pass): tiles to aim for, and passes
  // of kItems rows per tile at most. About one wave, so no tile waits for a second one, with taller
  // tiles and fewer atomics than apply's. 2048 tiles were slower (H200, 131072 x 8192: fp16 / bf16
  // 550 -> 493 / 492 us, fp32 962 -> 957 us; 4 x 32768 x 1024 fp16 / fp32 94 -> 73 / 212 -> 134 us,
  // 262144 x 128 fp16 34.4 -> 26.3 us; bench/results/h200/experiments_2026-11-29b.txt at db59eb8).
  static constexpr std::int64_t kAmaxTargetTiles = 512;
  static constexpr int kAmaxMaxPasses = 256;
  static constexpr int kTokenItems = 8;      // token_scales_kernel: units held per thread,
  static constexpr int kTokenRowItems = 4;   // from at most this many rows
  // channel_scales_kernel, one pass: rows staged per thread. A g128 tile is then 8 row lanes by 32
  // units (512 B of each row); 8 rows made it 256 B wide and slower (H200, 131072 x 8192, g128
  // quantize fp32 / fp16 / bf16 at 77.8 / 82.6 / 77.1% of copy, against 90.7 / 92.2 / 92.8% now),
  // and 32 rows (1 KiB, 128 KiB staged) left one block per SM (52-66% in a probe).
  static constexpr int kChannelRowItems = 16;
};

/// The per-token kernels of rows one head wide (row_kernels.cuh). Chosen on the H200 with
/// kvq_probe_rows (bench/results/h200.md): rows of 64 and 128 channels, 2048 to 1M rows.
struct RowPolicy {
  // 128 threads were 0-3% faster than 256 on calls of 100 MB and more; 8 blocks cap registers at
  // 64, where none spills (4 units of 16-bit quantize take 55-60, dequantize 32 or fewer).
  static constexpr int kThreads = 128;
  static constexpr int kMinBlocksPerSM = 8;
  static constexpr int kMaxRowUnits = 64;  // rows of at most 512 fp16 / 256 fp32 channels
  // plan_rows gives each thread fewer units while the grid would have fewer threads than this:
  // 2048 rows of 128 fp16 channels took 2.0 us at one unit per thread against 2.4 us at four;
  // 16384 rows 3.5 us against 3.1 us.
  static constexpr std::int64_t kTargetThreads = std::int64_t{1} << 16;

  /// Units per thread at most. Values of codes: 2 (fp16 1M x 128 dequantize 100 us against 109 us
  /// at 4: more lanes per row write longer runs); the quantizing kernels: 4 (fp16 1M x 128
  /// quantize 98 us against 107 us at 2: the row's reduction and scale once per 32 elements).
  static constexpr int max_units(RowOp op) { return op == RowOp::kValues ? 2 : 4; }
  /// Lanes per row at least (for rows that wide): 4, so that one load instruction reads 64
  /// contiguous bytes of each row it touches (fp16 1M x 64 quantize 55 us at 2 units and 4 lanes,
  /// 59 us at 4 and 2); codes under given scales, as many as write a whole 32-byte sector of codes
  /// per row (fp32: 8 lanes; fp32 1M x 64 80-82 us at 2 units and 8 lanes, 84-85 us at 4 and 4).
  static constexpr int min_lanes(RowOp op, int V) { return op == RowOp::kCodes ? (32 / V > 4 ? 32 / V : 4) : 4; }
};

/// Lets `kernel` take up to `bytes` of dynamic shared memory on the current device (past the
/// default 48 KiB). Set once per device and kernel, not per launch: it is a driver call. False when
/// the device refuses (less shared memory per block than that); the caller then takes another path.
template <class Kernel>
inline bool allow_shared_bytes(Kernel* kernel, int bytes) {
  static std::atomic<std::uint64_t> allowed{0};  // bit d: done on device d (< 64)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
  if ((allowed.load(std::memory_order_relaxed) & bit) != 0) return true;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // not the caller's error: it falls back
    return false;
  }
  allowed.fetch_or(bit, std::memory_order_relaxed);
  return true;
}

struct VectorizedStrategy : TileStrategy<VectorizedPolicy> {
  using Tiles = TileStrategy<VectorizedPolicy>;
  using Policy = WholeVectorPolicy;

  template <class T>
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));

  template <class T>
  static bool whole_vector(const KvView& view, const void* t_ptr, const void* q_ptr) {
    return Tiles::vector_width<T>(view, t_ptr, q_ptr) == kWidth<T> && whole_vector_view(view, kWidth<T>);
  }

  template <int kColItems, class T>
  static cudaError_t launch_token_scales(const T* x, const VectorPlan& p, float* scales, std::int8_t* q,
                                         unsigned long long* nonfinite, cudaStream_t stream) {
    token_scales_kernel<Policy, kWidth<T>, kColItems>
        <<<grid_for(p.tiles), Policy::kThreads, 0, stream>>>(x, p, scales, q, nonfinite);
    return check_launch();
  }

  /// Rows one head wide with one scale each: the row kernels, when plan_rows takes the view.
  template <class T>
  static bool row_view(const KvView& view, const QuantSpec& spec, const void* t_ptr, const void* q_ptr, RowOp op,
                       RowPlan& p) {
    return spec.granularity == Granularity::kPerToken && group_length(view.channels, spec.group) == view.channels &&
           whole_vector<T>(view, t_ptr, q_ptr) && plan_rows<RowPolicy>(view, spec, kWidth<T>, op, p);
  }

  static unsigned row_blocks(const RowPlan& p) {
    return static_cast<unsigned>(ceil_div<std::int64_t>(p.threads(), RowPolicy::kThreads));
  }

  template <int kUnits, class T>
  static cudaError_t launch_row_scales(const T* x, const RowPlan& p, float* scales, std::int8_t* q,
                                       unsigned long long* nonfinite, cudaStream_t stream) {
    row_scales_kernel<RowPolicy, kWidth<T>, kUnits><<<row_blocks(p), RowPolicy::kThreads, 0, stream>>>(x, p, scales, q,
                                                                                                    nonfinite);
    return check_launch();
  }

  template <class T, int kUnits, class In, class Out>
  static cudaError_t launch_row_apply(const In* in, const float* scales, const RowPlan& p, Out* out,
                                      unsigned long long* nonfinite, cudaStream_t stream) {
    row_apply_kernel<RowPolicy, kWidth<T>, kUnits><<<row_blocks(p), RowPolicy::kThreads, 0, stream>>>(in, scales, p, out,
                                                                                                   nonfinite);
    return check_launch();
  }

  template <class T>
  static cudaError_t scales(const T* x, const KvView& view, const QuantSpec& spec, TileMode mode, float* scales,
                            std::int8_t* q, cudaStream_t stream) {
    RowPlan rp{};
    if (mode == TileMode::kScales &&
        row_view<T>(view, spec, x, q != nullptr ? static_cast<const void*>(q) : static_cast<const void*>(x),
                    RowOp::kScales, rp)) {
      unsigned long long* counter = spec.nonfinite_count;
      if (rp.units_per_thread == 4) return launch_row_scales<4>(x, rp, scales, q, counter, stream);
      if (rp.units_per_thread == 2) return launch_row_scales<2>(x, rp, scales, q, counter, stream);
      return launch_row_scales<1>(x, rp, scales, q, counter, stream);
    }
    if (mode == TileMode::kScales && spec.granularity == Granularity::kPerToken &&
        whole_vector<T>(view, x, q != nullptr ? static_cast<const void*>(q) : static_cast<const void*>(x))) {
      bool fits = false;
      const VectorPlan p = plan_token_scales<Policy>(view, spec, kWidth<T>, fits);
      if (fits) {
        unsigned long long* counter = spec.nonfinite_count;
        if (p.col_items == 1) return launch_token_scales<1>(x, p, scales, q, counter, stream);
        if (p.col_items == 2) return launch_token_scales<2>(x, p, scales, q, counter, stream);
        if (p.col_items == 4) return launch_token_scales<4>(x, p, scales, q, counter, stream);
        return launch_token_scales<8>(x, p, scales, q, counter, stream);
      }
    }
    if (spec.granularity == Granularity::kPerChannel &&
        whole_vector<T>(view, x, q != nullptr ? static_cast<const void*>(q) : static_cast<const void*>(x))) {
      bool fits = false;
      const VectorPlan p = plan_channel_scales<Policy>(view, spec, mode, kWidth<T>, fits);
      if (fits && mode == TileMode::kAtomicAmax) {
        channel_scales_kernel<Policy, kWidth<T>, TileMode::kAtomicAmax>
            <<<grid_for(p.tiles), Policy::kThreads, 0, stream>>>(x, p, scales, nullptr, spec.nonfinite_count);
        return check_launch();
      }
      if (fits && mode == TileMode::kScales) {
        constexpr auto kernel = channel_scales_kernel<Policy, kWidth<T>, TileMode::kScales, T>;
        // Allowed once per device for the widest plan; a device that refuses takes the tile kernels.
        if (allow_shared_bytes(kernel, channel_scales_shared_bytes<Policy, kWidth<T>>(Policy::kThreads))) {
          kernel<<<grid_for(p.tiles), Policy::kThreads, channel_scales_shared_bytes<Policy, kWidth<T>>(1 << p.lanes_log2),
                   stream>>>(x, p, scales, q, spec.nonfinite_count);
          return check_launch();
        }
      }
    }
    return Tiles::scales(x, view, spec, mode, scales, q, stream);
  }

  /// kOwnScales: the scales were computed from `in` (per-channel whole-sequence), which lets 16-bit
  /// data take the lean arithmetic (device::quantize_within_amax) wherever it is finite.
  template <class T, bool kOwnScales = false, class In, class Out>
  static cudaError_t apply(const In* in, const float* scales, const KvView& view, const QuantSpec& spec, Out* out,
                           cudaStream_t stream) {
    constexpr bool kDequantize = std::is_same_v<In, std::int8_t>;
    const void* t_ptr = kDequantize ? static_cast<const void*>(out) : static_cast<const void*>(in);
    const void* q_ptr = kDequantize ? static_cast<const void*>(in) : static_cast<const void*>(out);
    constexpr int V = kWidth<T>;
    const bool per_token = spec.granularity == Granularity::kPerToken;
    unsigned long long* counter = kDequantize ? nullptr : spec.nonfinite_count;
    RowPlan rp{};
    if (row_view<T>(view, spec, t_ptr, q_ptr, kDequantize ? RowOp::kValues : RowOp::kCodes, rp)) {
      if constexpr (!kDequantize)  // dequantize plans 2 units per thread at most
        if (rp.units_per_thread == 4) return launch_row_apply<T, 4>(in, scales, rp, out, counter, stream);
      if (rp.units_per_thread == 2) return launch_row_apply<T, 2>(in, scales, rp, out, counter, stream);
      return launch_row_apply<T, 1>(in, scales, rp, out, counter, stream);
    }
    // Per-token, every unit must lie in one group.
    if (whole_vector<T>(view, t_ptr, q_ptr) && (!per_token || group_length(view.channels, spec.group) % V == 0)) {
      const int max_passes = kDequantize     ? (per_token ? Policy::kApplyPassesDequantizePerToken
                                                          : Policy::kApplyPassesDequantize)
                             : sizeof(T) == 2 ? Policy::kApplyPasses16BitQuantize
                                              : Policy::kApplyPasses;
      const VectorPlan p =
          plan_vector_apply(view, spec, Policy::kThreads, Policy::kItems, V, max_passes, Policy::kApplyTargetTiles,
                            Policy::kMinTiles);
      if (per_token)
        vector_apply_kernel<Policy, V, true><<<grid_for(p.tiles), Policy::kThreads, 0, stream>>>(in, scales, p, out, counter);
      else
        vector_apply_kernel<Policy, V, false, In, Out, kOwnScales && sizeof(T) == 2>
            <<<grid_for(p.tiles), Policy::kThreads, 0, stream>>>(in, scales, p, out, counter);
      return check_launch();
    }
    return Tiles::template apply<T>(in, scales, view, spec, out, stream);
  }

  template <class T>
  static cudaError_t codes_under_own_scales(const T* x, const float* scales, const KvView& view,
                                            const QuantSpec& spec, std::int8_t* q, cudaStream_t stream) {
    return apply<T, true>(x, scales, view, spec, q, stream);
  }
};

}  // namespace detail
KVQ_NAMESPACE_END
