// kvq/detail/tiled.cuh: the tiled strategy (the paper's shared-memory tile).
//
// Each chunk of a tile is staged in shared memory with scalar, coalesced loads; the staged chunk
// serves both the group amax and the codes, so per-token and grouped per-channel read global
// memory once. Scalar accesses and the extra shared-memory round trip keep it below the coarsened
// and vectorized strategies on the H200; it is kept as the study's data point, and as the strategy
// whose stage holds the most elements when registers are scarce.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/tile_kernels.cuh>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct TiledPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 2;  // 16 staged units per thread need the registers
  static constexpr int kItems = 16;         // 4096 staged elements per chunk (16 KiB of fp32)
  static constexpr int kVectorBytes = 1;    // scalar accesses (one element, whatever its size)
  static constexpr bool kStageInShared = true;
};

using TiledStrategy = TileStrategy<TiledPolicy>;

}  // namespace detail
KVQ_NAMESPACE_END
