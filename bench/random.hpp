// bench/random.hpp: the benchmark's inputs, the same on the host and the GPU.
//
// A counter-based hash (SplitMix64's finalizer) of (seed, index): the GPU fills a tensor in one
// pass, and the CPU side regenerates any part of the same tensor bit for bit instead of copying it
// back. Values are k / 2^23 - 1 for a 24-bit k, uniform in [-1, 1): the paper's test data, exact
// in fp32 (so no FMA contraction or rounding mode can make the two sides differ).
#pragma once

#include <cuda_runtime_api.h>  // __host__ __device__ for the host compiler too

#include <cstdint>

namespace kvq_bench {

__host__ __device__ inline float uniform_pm1(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  constexpr float kInv2Pow23 = 1.0f / 8388608.0f;
  return static_cast<float>(static_cast<std::uint32_t>(z >> 40)) * kInv2Pow23 - 1.0f;
}

/// A seed per name, so every case gets its own data (FNV-1a).
inline std::uint64_t seed_of(const char* name) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (; *name != '\0'; ++name) h = (h ^ static_cast<unsigned char>(*name)) * 0x100000001b3ull;
  return h;
}

}  // namespace kvq_bench
