// kvq/detail/coarsened.cuh: the coarsened strategy (several elements per thread, in registers).
//
// Each thread owns kItems scalar elements per chunk, strided by the block size so every load is
// coalesced; group amax values combine with warp reductions and shared-memory atomics. Wins over
// naive everywhere (no global atomics, no 64-bit division per element); loses to vectorized
// because every element is its own memory instruction. It is also what vectorized becomes when
// no operand allows a wider access.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_kernels.cuh>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct CoarsenedPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 3;  // caps registers at 85 so 3 blocks (24 warps) fit
  static constexpr int kItems = 8;          // 2048 elements per chunk
  static constexpr int kVectorBytes = 1;    // scalar accesses
  static constexpr bool kStageInShared = false;
};

using CoarsenedStrategy = TileStrategy<CoarsenedPolicy>;

}  // namespace detail
KVQ_NAMESPACE_END
