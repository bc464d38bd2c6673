// kvq/detail/vectorized.cuh: the vectorized strategy (16-byte accesses, coarsened).
//
// Like coarsened, with each unit V = 16 / sizeof(T) consecutive channels read in one 16-byte load
// (float4-like for fp32, 8 halves for fp16/bf16) and written as one V-byte store of codes. V is
// chosen at run time from the alignment of every pointer and every row stride (16, 8, 4 or 2
// bytes, else scalar); a row's last partial vector is handled element by element, so any channel
// count and any element-aligned offset works. The default (Variant::kAuto) for every operation.
#pragma once

#include <kvq/detail/tile_kernels.cuh>

namespace kvq {
namespace detail {
inline namespace v0_1 {

// Chosen on the H200 (bench/results/h200.md): 256 threads, 4 units of 16 B per thread and a cap of
// 85 registers (3 blocks per SM) gave fp32 quantize_with_scales 3.83 TB/s (90% of a device copy).
// 8 units per thread spilled and was slower; persistent blocks with a register prefetch of the
// next tile were slower than one block per tile.
struct VectorizedPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 3;  // caps registers at 85 so 3 blocks (24 warps) fit
  static constexpr int kItems = 4;          // 4 x 16 B in flight per thread: 16 KiB per block
  static constexpr int kVectorBytes = 16;
  static constexpr bool kStageInShared = false;
};

using VectorizedStrategy = TileStrategy<VectorizedPolicy>;

}  // namespace v0_1
}  // namespace detail
}  // namespace kvq
