// kvq/detail/attention_kernels.cuh: the kernels behind kvq/attention.cuh (decode attention).
//
// Flash-decoding: one block per (chunk of a sequence, KV head, sequence) writes the chunk's
// unnormalized partial (acc[head_dim], running max m in base 2, sum l) for each query head of the
// group to the workspace; decode_merge_kernel, one warp per (sequence, query head), combines them
// in order: no atomics, so the result is deterministic and identical eager and in a graph. Every
// KV page is read once per group, whatever the group size. Two partial kernels:
//
//   decode_mma_kernel     tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate), for fp16 /
//                         bf16 queries, head dims 64 / 128 / 256 and 16-byte aligned pools. Each
//                         warp takes tiles of 16 tokens straight from the pool into registers
//                         (K and V codes as int8, converted exactly to fp16), S^T = K Q^T and
//                         O^T += V^T P^T on the tensor cores, the tile's tokens on the MMA's rows
//                         (one MMA per 16 channels) and the query heads as its columns.
//                         Per-token scales multiply S after the MMA (keys) and P before it
//                         (values); per-channel key scales (kKeysPerChannelPage) multiply Q,
//                         once per page. Whatever is not exact in fp16 (Q, P) goes in as two fp16
//                         terms, hi + lo, so the products carry about 2^-22 of relative error, as
//                         fp32 would. The block's four warps merge their partials in shared
//                         memory. Under kKeysPerChannelPage one more block per (sequence, head)
//                         runs the scalar code on the full-precision tokens (sinks, open page).
//   decode_partial_kernel CUDA cores, any head dim, alignment and type: a tile of tokens
//                         dequantized into shared memory (fp32, as gather_kv dequantizes), a lane
//                         per token scoring it, a warp per query head of the group.
//
// The arithmetic is the contract's inline PTX (mul_rn, fma_rn, ...), ex2.approx / lg2.approx and
// the fp16 conversions spelled in PTX, so the caller's --use_fast_math changes nothing. Scores are
// kept in base 2.
#pragma once

#include <kvq/version.hpp>

#include <kvq/attention.hpp>
#include <kvq/detail/config.cuh>
#include <kvq/detail/paged_kernels.cuh>
#include <kvq/device.cuh>
#include <kvq/numerics.hpp>
#include <kvq/paged.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

KVQ_NAMESPACE_BEGIN
namespace detail {

struct DecodePolicy {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kMaxHeadsPerWarp = (kMaxDecodeGroup + kWarps - 1) / kWarps;  // 4
};

/// Tiles by head dim: 32 tokens of up to 128 channels, or 8 of up to 256 (41 and 33 KB of
/// shared memory: under the 48 KB a kernel gets without opting in).
template <int kMaxDim>
struct DecodeTile {
  static constexpr int kTokens = kMaxDim <= 128 ? 32 : 8;
  static constexpr int kChannelsPerLane = kMaxDim / kWarpSize;
};

__device__ inline float ex2_approx(float x) {  // 2^x; 2^-inf = 0, and below 2^-126 (a weight nothing sees) 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ inline float lg2_approx(float x) {
  float y;
  asm("lg2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
/// max(a, b) without .ftz (fmaxf becomes max.ftz.f32 under the caller's -ftz=true); NaN-free inputs.
__device__ inline float max_rn(float a, float b) {
  float y;
  asm("max.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}
/// x == -inf, on the bits (a float comparison becomes setp.ftz under -ftz=true).
__device__ inline bool is_neg_inf(float x) { return float_bits(x) == 0xff800000u; }
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

/// Channel ch of token t of a sequence (id seq, length len) on `page`, head h, K or V, as
/// reference::detail::token_values gives it for T = float.
__device__ inline float paged_token_value(const PagedCache& c, std::int64_t seq, std::int64_t len, std::int64_t t,
                                          std::int64_t page, std::int64_t h, bool is_v, std::int64_t ch) {
  const std::int64_t ps = c.page_size, offset = t % ps;
  const bool by_page = c.scheme == PagedScheme::kKeysPerChannelPage;
  if (by_page && t < c.sink_tokens)
    return paged_full_value(is_v ? c.v_sink : c.k_sink, c.open_type, c.sink_offset(seq, t, h, ch));
  if (by_page && !is_v && t >= len / ps * ps) return paged_full_value(c.k_open, c.open_type, c.open_offset(seq, offset, h, ch));
  const PageStrides& s = is_v ? c.v_strides : c.k_strides;
  const std::int8_t code =
      (is_v ? c.v_codes : c.k_codes)[page * s.page_stride + offset * s.token_stride + h * s.head_stride + ch];
  const float scale = by_page && !is_v ? c.k_scales[c.channel_scale_offset(page, h, ch)]
                                       : (is_v ? c.v_scales : c.k_scales)[c.scale_offset(page * ps + offset, h)];
  return dequantize_value<float>(code, sanitize_scale(scale));
}

/// Where partial s of (sequence b, query head qh) lives in the workspace: acc[head_dim] (the
/// unnormalized weighted values), then m (running max, base 2) and l (sum). A plan has room for
/// splits + 1 partials per (sequence, query head): the chunks, and the full-precision tokens.
__device__ inline std::int64_t decode_partial_offset(const DecodePlan& p, std::int64_t b, std::int64_t qh,
                                                     std::int64_t s) {
  return ((b * p.limits.q_heads + qh) * (p.splits + 1) + s) * (p.limits.head_dim + 2);
}

/// A sequence as decode attention reads it: its cache id and its length, both untrusted. A length
/// below 0 or past the table's pages or the plan, or (kKeysPerChannelPage) an id outside the cache,
/// make it empty; `count` says whether this block counts that (once per sequence).
struct DecodeSequence {
  std::int64_t seq, len;
  __device__ DecodeSequence(const PagedCache& c, const SequenceTable& seqs, const DecodePlan& plan, std::int64_t b,
                            bool count, unsigned long long* error_count) {
    seq = seqs.seq_ids != nullptr ? seqs.seq_ids[b] : b;
    len = seqs.seq_lens[b];
    const bool by_page = c.scheme == PagedScheme::kKeysPerChannelPage;
    if (len < 0 || len > seqs.max_pages_per_seq * c.page_size || len > plan.split_tokens * plan.splits ||
        (by_page && (seq < 0 || seq >= c.max_seqs))) {
      if (error_count != nullptr && count) atomicAdd(error_count, 1ull);
      len = 0;
    }
  }
};

struct TokenRange {
  std::int64_t begin, end;
};

/// The scalar path's shared memory: the group's queries (* sm_scale * log2(e)) and one tile of
/// dequantized keys and values (+1: lanes read different rows of one column).
template <int kMaxDim>
struct ScalarDecodeSmem {
  static constexpr int kTile = DecodeTile<kMaxDim>::kTokens;
  float q[kMaxDecodeGroup * kMaxDim];
  float k[kTile][kMaxDim + 1];
  float v[kTile][kMaxDim + 1];
  bool valid[kTile];
};

/// The whole block: the partial of the tokens in `ranges` of sequence b (cache id seq, length
/// len), KV head h, on the CUDA cores, written as partial `part`. A token whose page is outside
/// the pool is dropped and counted (by KV head 0).
template <int kMaxDim, class T>
__device__ void decode_block_scalar(ScalarDecodeSmem<kMaxDim>& sm, const T* __restrict__ q, const QueryRows& q_rows,
                                    const PagedCache& cache, const SequenceTable& seqs, float sm_scale,
                                    const DecodePlan& plan, float* __restrict__ workspace,
                                    unsigned long long* error_count, std::int64_t b, std::int64_t h,
                                    const DecodeSequence& sq, const TokenRange* ranges, int n_ranges,
                                    std::int64_t part) {
  constexpr int kWarps = DecodePolicy::kWarps, kTile = ScalarDecodeSmem<kMaxDim>::kTile;
  constexpr int kChannelsPerLane = DecodeTile<kMaxDim>::kChannelsPerLane;
  const std::int64_t d = cache.head_dim, group = q_rows.q_heads / cache.kv_heads, ps = cache.page_size;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;

  const float q_scale = mul_rn(sm_scale, kLog2e);
  for (std::int64_t i = threadIdx.x; i < group * d; i += DecodePolicy::kThreads) {
    const std::int64_t qh = h * group + i / d;
    sm.q[i] = mul_rn(to_float(q[b * q_rows.batch_stride + qh * q_rows.head_stride + i % d]), q_scale);
  }

  float m[DecodePolicy::kMaxHeadsPerWarp], l[DecodePolicy::kMaxHeadsPerWarp];
  float acc[DecodePolicy::kMaxHeadsPerWarp][kChannelsPerLane];
#pragma unroll
  for (int j = 0; j < DecodePolicy::kMaxHeadsPerWarp; ++j) {
    m[j] = kNegInf;
    l[j] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) acc[j][c] = 0.0f;
  }

  for (int range = 0; range < n_ranges; ++range) {
    const std::int64_t end = ranges[range].end;
    for (std::int64_t t0 = ranges[range].begin; t0 < end; t0 += kTile) {
      __syncthreads();  // the previous tile is consumed (and q written, the first time)
      if (threadIdx.x < kTile) {
        const std::int64_t t = t0 + threadIdx.x;
        bool ok = t < end;
        if (ok) {
          const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / ps];
          ok = page >= 0 && page < cache.num_pages;
          if (!ok && error_count != nullptr && h == 0) atomicAdd(error_count, 1ull);  // counted once per token
        }
        sm.valid[threadIdx.x] = ok;
      }
      __syncthreads();
      for (std::int64_t i = threadIdx.x; i < kTile * d; i += DecodePolicy::kThreads) {
        const int r = static_cast<int>(i / d);
        const std::int64_t ch = i % d, t = t0 + r;
        float kv = 0.0f, vv = 0.0f;
        if (sm.valid[r]) {
          const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / ps];
          kv = paged_token_value(cache, sq.seq, sq.len, t, page, h, false, ch);
          vv = paged_token_value(cache, sq.seq, sq.len, t, page, h, true, ch);
        }
        sm.k[r][ch] = kv;
        sm.v[r][ch] = vv;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < DecodePolicy::kMaxHeadsPerWarp; ++j) {
        const std::int64_t gi = warp + j * kWarps;  // this warp's j-th head of the group
        if (gi >= group) break;
        // Lane r scores token r of the tile (base 2, scaled).
        float s = kNegInf;
        if (lane < kTile && sm.valid[lane]) {
          float dot = 0.0f;
          for (std::int64_t ch = 0; ch < d; ++ch) dot = fma_rn(sm.q[gi * d + ch], sm.k[lane][ch], dot);
          s = dot;
        }
        float tile_max = s;
        for (int off = 16; off > 0; off >>= 1) tile_max = max_rn(tile_max, __shfl_xor_sync(kFullMask, tile_max, off));
        const float m_new = max_rn(m[j], tile_max);
        if (is_neg_inf(m_new)) continue;  // no valid token yet
        const float alpha = ex2_approx(sub_rn(m[j], m_new));  // 0 when m was -inf
        const float p = is_neg_inf(s) ? 0.0f : ex2_approx(sub_rn(s, m_new));
        float p_sum = p;
        for (int off = 16; off > 0; off >>= 1) p_sum = add_rn(p_sum, __shfl_xor_sync(kFullMask, p_sum, off));
        l[j] = fma_rn(l[j], alpha, p_sum);
        m[j] = m_new;
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) acc[j][c] = mul_rn(acc[j][c], alpha);
        for (int r = 0; r < kTile; ++r) {
          const float pr = __shfl_sync(kFullMask, p, r);
#pragma unroll
          for (int c = 0; c < kChannelsPerLane; ++c) {
            const std::int64_t ch = lane + c * kWarpSize;
            if (ch < d) acc[j][c] = fma_rn(pr, sm.v[r][ch], acc[j][c]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < DecodePolicy::kMaxHeadsPerWarp; ++j) {
    const std::int64_t gi = warp + j * kWarps;
    if (gi >= group) break;
    float* out = workspace + decode_partial_offset(plan, b, h * group + gi, part);
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      const std::int64_t ch = lane + c * kWarpSize;
      if (ch < d) out[ch] = acc[j][c];
    }
    if (lane == 0) {
      out[d] = m[j];
      out[d + 1] = l[j];
    }
  }
}

/// The CUDA-core partial kernel: one block per (chunk, KV head, sequence), 4 warps.
template <int kMaxDim, class T>
KVQ_KERNEL void __launch_bounds__(DecodePolicy::kThreads)
    decode_partial_kernel(const T* __restrict__ q, QueryRows q_rows,  // (batch, q_heads, head_dim)
                          PagedCache cache, SequenceTable seqs, float sm_scale, DecodePlan plan,
                          float* __restrict__ workspace, unsigned long long* error_count) {
  __shared__ ScalarDecodeSmem<kMaxDim> sm;
  const std::int64_t split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (b >= q_rows.batch) return;  // the grid covers max_batch
  const DecodeSequence sq(cache, seqs, plan, b, split == 0 && h == 0 && threadIdx.x == 0, error_count);
  const TokenRange range{split * plan.split_tokens, min(sq.len, (split + 1) * plan.split_tokens)};
  decode_block_scalar<kMaxDim>(sm, q, q_rows, cache, seqs, sm_scale, plan, workspace, error_count, b, h, sq, &range, 1,
                               split);
}

// --- the tensor-core partial kernel ----------------------------------------------------------------
//
// Fragments of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 r + j
// holds A (16 x 16) rows r and r + 8, columns 2j, 2j + 1, 2j + 8, 2j + 9; B (16 x 8) rows 2j,
// 2j + 1, 2j + 8, 2j + 9 of column r; C (16 x 8) rows r and r + 8, columns 2j, 2j + 1. Both
// products put a tile's 16 tokens on the MMA's 16 rows or its k, so one MMA covers the tile, and
// the group's query heads are the 8 columns (two n-tiles of them for groups over 8). The sums
// over k are free to visit channels and tokens in any order, so each lane's operands come from
// contiguous bytes of the pool:
//   S^T = K Q^T, per k-step: A = K, B = Q^T. Lane (r, j) reads tokens r and r + 8, D/4 key bytes
//     (DecodeLaneBytes::key_channel); word s of them is k-step s's columns 2j, 2j + 1 (its first
//     two codes) and 2j + 8, 2j + 9 (the last two); Q^T's fragment takes the same channels. C: the
//     scores of tokens r and r + 8 for heads 2j, 2j + 1, so a head's softmax is over lanes of one j.
//   O^T += V^T P^T, per m-tile of 16 channels: A = V^T, B = P^T, k = the tile's tokens. Lane
//     (r, j) reads tokens 2j, 2j + 1, 2j + 8, 2j + 9, D/8 value bytes (value_channel); byte mt of
//     them is m-tile mt's row r, byte D/16 + mt its row r + 8. P^T's fragment is S^T's C fragment
//     transposed, 8 x 8 at a time (movmatrix). C: those channels for heads 2j, 2j + 1, the columns
//     whose softmax state the lane holds.

struct DecodeMmaPolicy {
  static constexpr int kWarps = DecodePolicy::kWarps;
  static constexpr int kTileTokens = 16;
  static constexpr int kBlockTokens = 64;  // a warp's run of tiles (kDecodeSplitAlign)
  /// Blocks an SM, as make_decode_plan plans its waves (decode_blocks_per_sm): what the registers
  /// allow (at head dim 128: 128 registers, about 12 bytes of spill a thread).
  static constexpr int min_blocks_per_sm(int k_steps, int head_tiles) {
    return static_cast<int>(decode_blocks_per_sm(16 * k_steps, 8 * head_tiles));
  }
};

/// d = a b + c on the tensor cores: fp16 a (16 x 16) and b (16 x 8), fp32 c and d (16 x 8).
__device__ inline void mma_f16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2],
                               const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

/// fp16x2 of (lo, hi), rounded to nearest: lo in the low half.
__device__ inline std::uint32_t pack_half2(float lo, float hi) {
  std::uint32_t d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}
__device__ inline float half_bits_to_float(std::uint32_t h16) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(static_cast<unsigned short>(h16)));
  return f;
}

/// x0 and x1 as two fp16 terms each: hi = fp16(x), lo = fp16(x - hi), packed in pairs.
__device__ inline void split_half2(float x0, float x1, std::uint32_t& hi, std::uint32_t& lo) {
  hi = pack_half2(x0, x1);
  lo = pack_half2(sub_rn(x0, half_bits_to_float(hi & 0xffffu)), sub_rn(x1, half_bits_to_float(hi >> 16)));
}

/// Codes 0, 1 and 2, 3 of a word as two fp16x2, exactly: fp16 0x64XX is 1024 + XX, XX = code + 128.
__device__ inline void codes_to_half2(std::uint32_t w, std::uint32_t& c01, std::uint32_t& c23) {
  constexpr std::uint32_t kBias = 0x80808080u, kExponent = 0x64646464u, k1152 = 0x64806480u;
  w ^= kBias;
  const std::uint32_t a = __byte_perm(w, kExponent, 0x4140), b = __byte_perm(w, kExponent, 0x4342);
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(c01) : "r"(a), "r"(k1152));
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(c23) : "r"(b), "r"(k1152));
}

/// 2^e for e in [-126, 127].
__device__ inline float exp2_int(int e) { return __uint_as_float(static_cast<std::uint32_t>(e + 127) << 23); }

constexpr int floor_pow2(int x) { return x < 2 ? x : 2 * floor_pow2(x / 2); }

/// Which channels of a row each lane reads, for head dims that are multiples of 16. A lane's D/4
/// key bytes (D/8 value bytes) are a main run, a power of two of them, contiguous across lanes and
/// as aligned as its length, then the rest in a tail run after all lanes' main runs: at head dims
/// 64, 128, 256 only the main run (one row in 16-byte loads); at 80 and 96 a 16-byte key load and
/// an 8-byte value load, then 4 or 8 key bytes and 2 or 4 value bytes.
template <int kDim>
struct DecodeLaneBytes {
  static_assert(kDim % 16 == 0, "the tensor-core path takes head dims of 16 k");
  static constexpr int kKeyWords = kDim / 16;  // a k-step each
  static constexpr int kKeyMainWords = floor_pow2(kKeyWords), kKeyTailWords = kKeyWords - kKeyMainWords;
  static constexpr int kValueBytes = kDim / 8;
  static constexpr int kValueMainBytes = floor_pow2(kValueBytes), kValueTailBytes = kValueBytes - kValueMainBytes;
  static constexpr int kValueWords = (kValueBytes + 3) / 4;  // the tail from word kValueMainBytes / 4 on
  static_assert(kKeyTailWords <= 2 && (kValueTailBytes == 0 || kValueTailBytes == 2 || kValueTailBytes == 4),
                "tails a single load each (head dims 64, 80, 96, 128, 256, ...)");
  /// Key word s of lane j: channels key_channel(j, s) to key_channel(j, s) + 3.
  __host__ __device__ static constexpr int key_channel(int j, int s) {
    return s < kKeyMainWords ? 4 * (j * kKeyMainWords + s) : 4 * (4 * kKeyMainWords + j * kKeyTailWords + s - kKeyMainWords);
  }
  /// Value byte i of lane r.
  __host__ __device__ static constexpr int value_channel(int r, int i) {
    return i < kValueMainBytes ? r * kValueMainBytes + i : 8 * kValueMainBytes + r * kValueTailBytes + i - kValueMainBytes;
  }
};

/// kBytes bytes of codes from p into words kFirst on of w (the last one's high bytes 0 where
/// kBytes is 2): in 16-byte loads when kBytes is a multiple of 16, else in one load of 8, 4 or 2
/// bytes (p aligned to it: DecodeLaneBytes' runs, in rows decode_takes_mma requires 16-byte aligned).
template <int kBytes, int kFirst, int kWords>
__device__ inline void load_bytes(std::uint32_t (&w)[kWords], const std::int8_t* p) {
  static_assert(kFirst + (kBytes + 3) / 4 <= kWords, "the run fits the words");
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 4; i += 4) {
      const uint4 x = *reinterpret_cast<const uint4*>(p + 4 * i);
      w[kFirst + i] = x.x;
      w[kFirst + i + 1] = x.y;
      w[kFirst + i + 2] = x.z;
      w[kFirst + i + 3] = x.w;
    }
  } else if constexpr (kBytes == 8) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    w[kFirst] = x.x;
    w[kFirst + 1] = x.y;
  } else if constexpr (kBytes == 4) {
    w[kFirst] = *reinterpret_cast<const std::uint32_t*>(p);
  } else {
    static_assert(kBytes == 2, "runs of 2, 4, 8 or 16 k bytes");
    w[kFirst] = *reinterpret_cast<const unsigned short*>(p);
  }
}
/// A lane's key bytes of a row: p points at its main run, p + tail at its tail run.
template <int kDim>
__device__ inline void load_key_bytes(std::uint32_t (&w)[DecodeLaneBytes<kDim>::kKeyWords], const std::int8_t* p,
                                      int tail) {
  using L = DecodeLaneBytes<kDim>;
  load_bytes<4 * L::kKeyMainWords, 0>(w, p);
  if constexpr (L::kKeyTailWords > 0) load_bytes<4 * L::kKeyTailWords, L::kKeyMainWords>(w, p + tail);
}
/// A lane's value bytes of a row, as load_key_bytes.
template <int kDim>
__device__ inline void load_value_bytes(std::uint32_t (&w)[DecodeLaneBytes<kDim>::kValueWords], const std::int8_t* p,
                                        int tail) {
  using L = DecodeLaneBytes<kDim>;
  load_bytes<L::kValueMainBytes, 0>(w, p);
  if constexpr (L::kValueTailBytes > 0) load_bytes<L::kValueTailBytes, L::kValueMainBytes / 4>(w, p + tail);
}
template <int kWords>
__device__ inline void zero_words(std::uint32_t (&w)[kWords]) {
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = 0u;
}

/// Byte b of x and of y (b < 4) as one fp16x2 (x's in the low half), exactly, as codes_to_half2.
__device__ inline std::uint32_t code_pair_to_half2(std::uint32_t x, std::uint32_t y, int b) {
  constexpr std::uint32_t kLowBytes = 0x00ff00ffu, k1152 = 0x64806480u;  // bias and exponent, per half
  const std::uint32_t t = (__byte_perm(x, y, static_cast<unsigned>(b | (b + 4) << 8)) & kLowBytes) ^ k1152;
  std::uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(t), "r"(k1152));
  return d;
}

/// The 8 x 8 fp16 matrix whose lane (r, j) holds row r, columns 2j and 2j + 1, transposed: lane
/// (r, j) gets rows 2j and 2j + 1 of column r.
__device__ inline std::uint32_t transpose_8x8(std::uint32_t x) {
  std::uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

/// One tile's operands for one lane, loaded ahead of its arithmetic.
template <int kDim>
struct DecodeTileData {
  static constexpr int kKeyWords = DecodeLaneBytes<kDim>::kKeyWords, kValueWords = DecodeLaneBytes<kDim>::kValueWords;
  std::uint32_t k[2][kKeyWords];    // tokens r, 8 + r: lane j's key bytes
  std::uint32_t v[4][kValueWords];  // tokens 2j, 2j + 1, 2j + 8, 2j + 9: lane r's value bytes
  // Tokens r, 8 + r: their scales as stored (k_scale: kPerTokenHead), sanitized where they are
  // used, so that nothing waits on the loads before the tile's turn; bit i: token i is valid.
  float k_scale[2], v_scale[2];
  std::uint32_t valid_bits;
  __device__ bool valid(int i) const { return (valid_bits >> i & 1u) != 0u; }
  std::int32_t page;  // the tile's page where page_size % 16 == 0 (kKeysPerChannelPage needs it)
};

template <int kSteps, int kHeadTiles, class T>
KVQ_KERNEL void __launch_bounds__(DecodePolicy::kThreads, DecodeMmaPolicy::min_blocks_per_sm(kSteps, kHeadTiles))
    decode_mma_kernel(const T* __restrict__ q, QueryRows q_rows,  // (batch, q_heads, head_dim)
                      PagedCache cache, SequenceTable seqs, float sm_scale, DecodePlan plan,
                      float* __restrict__ workspace, unsigned long long* error_count) {
  constexpr int D = 16 * kSteps, kRows = 8 * kHeadTiles, kMTiles = D / 16;
  constexpr int kWarps = DecodeMmaPolicy::kWarps, kTile = DecodeMmaPolicy::kTileTokens;
  constexpr int kBlock = DecodeMmaPolicy::kBlockTokens;
  // Up to head dim 64 a second tile fits in the registers (128 at 4 blocks an SM) and loads while
  // the first computes; above, one tile is in registers and the one after next is prefetched to L2.
  constexpr bool kTwoTiles = D <= 64;
  using Tile = DecodeTileData<D>;
  using Lane = DecodeLaneBytes<D>;
  constexpr int kScalarDim = (D + kWarpSize - 1) / kWarpSize * kWarpSize;  // decode_block_scalar's lanes
  union Smem {
    ScalarDecodeSmem<kScalarDim> scalar;  // the full-precision block
    struct {
      float q[kRows][D];  // the group's queries, as given
      // Each lane's B fragments of Q^T per k-step: {hi rows 2j.., hi rows 2j+8.., lo .., lo ..} of
      // column r of n-tile nt. A lane reads only what it wrote.
      uint4 frag[kWarps][kSteps][kHeadTiles][kWarpSize];
    } query;
    struct {
      float acc[kWarps][kRows][D];
      float m[kWarps][kRows], l[kWarps][kRows];
    } merge;
  };
  __shared__ Smem sm;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no mma.sync m16n8k16 before sm_80; decode_takes_mma never launches this there
#else
  const std::int64_t h = blockIdx.y, b = blockIdx.z;
  if (b >= q_rows.batch) return;  // the grid covers max_batch
  const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
  const std::int64_t ps = cache.page_size, group = q_rows.q_heads / cache.kv_heads;
  const DecodeSequence sq(cache, seqs, plan, b, blockIdx.x == 0 && h == 0 && threadIdx.x == 0, error_count);
  if (blockIdx.x == plan.splits) {  // kKeysPerChannelPage: the sinks and the open page, in full precision
    const std::int64_t open = max(sq.len / ps * ps, min(cache.sink_tokens, sq.len));
    const TokenRange ranges[2] = {{0, min(cache.sink_tokens, sq.len)}, {open, sq.len}};
    decode_block_scalar<kScalarDim>(sm.scalar, q, q_rows, cache, seqs, sm_scale, plan, workspace, error_count, b, h, sq, ranges,
                           2, plan.splits);
    return;
  }

  // The chunk's quantized tokens: [lo_t, hi_t) (the others are the full-precision block's). Token
  // positions are 32-bit: lengths are int32, and a chunk that starts past one has no tiles.
  const std::int64_t begin64 = min(blockIdx.x * plan.split_tokens, std::int64_t{1} << 31);
  std::int64_t lo64 = begin64, hi64 = min(sq.len, begin64 + plan.split_tokens);
  if (by_page) {
    lo64 = max(lo64, min(cache.sink_tokens, std::int64_t{1} << 31));
    hi64 = min(hi64, sq.len / ps * ps);
  }
  const std::uint32_t begin = static_cast<std::uint32_t>(begin64), lo_t = static_cast<std::uint32_t>(lo64),
                      hi_t = static_cast<std::uint32_t>(hi64);
  for (int i = threadIdx.x; i < kRows * D; i += DecodePolicy::kThreads) {
    const int row = i / D;
    sm.query.q[row][i % D] =
        row < group ? to_float(q[b * q_rows.batch_stride + (h * group + row) * q_rows.head_stride + i % D]) : 0.0f;
  }
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int r = lane >> 2, j = lane & 3;
  const std::int32_t* table = seqs.block_table + b * seqs.max_pages_per_seq;
  const bool page_tiles = ps % kTile == 0;  // every tile within one page
  const float base_scale = mul_rn(sm_scale, kLog2e);

  // Q (times the page's key scales under kKeysPerChannelPage) as hi + lo fp16 B fragments in
  // sm.query.frag, scaled by a power of two that keeps them in fp16's range; `score_scale` undoes it.
  uint4 (&frag)[kSteps][kHeadTiles][kWarpSize] = sm.query.frag[warp];
  bool q_has_lo = false;
  float score_scale = base_scale;
  auto make_q = [&](const float* key_scales) {  // (head_dim) of this KV head (16-byte aligned), or null
    // k-step s's channels: the four at j D/4 + 4 s, with their key scales as one 16-byte load.
    auto q4 = [&](int nt, int s) {
      const int c = Lane::key_channel(j, s);
      const float* x = sm.query.q[r + 8 * nt] + c;
      if (key_scales == nullptr) return make_float4(x[0], x[1], x[2], x[3]);
      // Loaded again by the second pass (volatile): 4 registers live at a time, not D / 4.
      float4 k;
      asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                   : "=f"(k.x), "=f"(k.y), "=f"(k.z), "=f"(k.w)
                   : "l"(key_scales + c));
      return make_float4(mul_rn(x[0], sanitize_scale(k.x)), mul_rn(x[1], sanitize_scale(k.y)),
                         mul_rn(x[2], sanitize_scale(k.z)), mul_rn(x[3], sanitize_scale(k.w)));
    };
    std::uint32_t amax = 0;
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt)
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const float4 x = q4(nt, s);
        amax = max(amax, max(max(float_bits(x.x) & kAbsMask, float_bits(x.y) & kAbsMask),
                             max(float_bits(x.z) & kAbsMask, float_bits(x.w) & kAbsMask)));
      }
    amax = device::warp_max_bits(amax);
    // |x| < 2^(e - 126) for biased exponent e: times 2^(141 - e) it is below 2^15.
    const int e = min(max(static_cast<int>(amax >> 23), 15), 253), shift = 141 - e;
    const float up = exp2_int(shift);
    score_scale = mul_rn(base_scale, exp2_int(-shift));
    bool lo_nonzero = false;
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int nt = 0; nt < kHeadTiles; ++nt) {
        const float4 x = q4(nt, s);
        uint4 f;
        split_half2(mul_rn(x.x, up), mul_rn(x.y, up), f.x, f.z);
        split_half2(mul_rn(x.z, up), mul_rn(x.w, up), f.y, f.w);
        lo_nonzero |= ((f.z | f.w) & 0x7fff7fffu) != 0;
        frag[s][nt][lane] = f;
      }
    q_has_lo = __any_sync(kFullMask, lo_nonzero);
  };
  std::int32_t q_page = -1;
  if (by_page) {  // until the first page in the pool: masked tiles multiply zeros
#pragma unroll
    for (int st = 0; st < kSteps; ++st)
#pragma unroll
      for (int nt = 0; nt < kHeadTiles; ++nt) frag[st][nt][lane] = make_uint4(0u, 0u, 0u, 0u);
  } else {
    make_q(nullptr);
  }

  // The softmax state of heads 8 nt + 2j + col (the lane's l: its tokens' part), and O^T.
  float m_run[kHeadTiles][2], l_run[kHeadTiles][2], acc[kMTiles][kHeadTiles][4];
#pragma unroll
  for (int nt = 0; nt < kHeadTiles; ++nt) {
#pragma unroll
    for (int col = 0; col < 2; ++col) {
      m_run[nt][col] = kNegInf;
      l_run[nt][col] = 0.0f;
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
  }

  // The tile loads' invariants: this head's rows and this lane's bytes of them. Token positions,
  // offsets within a page and scale indices are 32-bit (lengths are int32; decode_takes_mma
  // checks that a page's rows and the scale arrays are under 2^31).
  const PageStrides &kst = cache.k_strides, &vst = cache.v_strides;
  const std::int8_t* const k_lane = cache.k_codes + h * kst.head_stride + Lane::key_channel(j, 0);
  const std::int8_t* const v_lane = cache.v_codes + h * vst.head_stride + Lane::value_channel(r, 0);
  const int k_tail = Lane::key_channel(j, Lane::kKeyMainWords) - Lane::key_channel(j, 0);
  const int v_tail = Lane::value_channel(r, Lane::kValueMainBytes) - Lane::value_channel(r, 0);
  const std::uint32_t ps32 = static_cast<std::uint32_t>(min(ps, std::int64_t{1} << 31));
  const std::uint32_t k_ts = static_cast<std::uint32_t>(kst.token_stride), v_ts = static_cast<std::uint32_t>(vst.token_stride);
  const std::uint32_t kvh = static_cast<std::uint32_t>(cache.kv_heads);
  auto in_pool = [&](std::int64_t p) { return p >= 0 && p < cache.num_pages; };
  auto key_token = [&](int i) { return static_cast<std::uint32_t>(r + 8 * i); };                         // i < 2
  auto value_token = [&](int i) { return static_cast<std::uint32_t>(2 * j + (i & 1) + 8 * (i >> 1)); };  // i < 4

  const bool ps_pow2 = (ps32 & (ps32 - 1)) == 0;
  const int ps_shift = __ffs(static_cast<int>(ps32)) - 1;
  auto page_index = [&](std::uint32_t t) { return ps_pow2 ? t >> ps_shift : t / ps32; };
  // Where page_size % 16 == 0 a tile is one page, read from the table a tile before its loads
  // need it (-1 past the chunk); otherwise each token finds its own page.
  auto table_page = [&](std::uint32_t t0) -> std::int32_t { return page_tiles && t0 < hi_t ? table[page_index(t0)] : -1; };

  // The tile's rows into L2 ahead of its loads (page_tiles): lane l takes token l % 16's key row
  // (l < 16) or value row, and the line of that token's value (key) scale.
  auto prefetch_tile = [&](std::uint32_t t0, std::int32_t page) {
    if (!page_tiles || t0 >= hi_t || !in_pool(page)) return;
    const std::uint32_t token = t0 - page_index(t0) * ps32 + static_cast<std::uint32_t>(lane % 16);
    const bool key = lane < 16;
    const std::int8_t* row = key ? cache.k_codes + h * kst.head_stride + page * kst.page_stride + token * k_ts
                                 : cache.v_codes + h * vst.head_stride + page * vst.page_stride + token * v_ts;
#pragma unroll
    for (int b = 0; b < D; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + b));
    if constexpr (D % 128 != 0 && D > 64)  // a row of 80 or 96 bytes may end in the next line
      asm volatile("prefetch.global.L2 [%0];" ::"l"(row + D - 1));
    const float* scale = (key || by_page ? cache.v_scales : cache.k_scales) +
                         (static_cast<std::uint32_t>(page) * ps32 + token) * kvh + static_cast<std::uint32_t>(h);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(scale));
  };

  auto load_tile = [&](std::uint32_t t0, std::int32_t page) {
    Tile td;
    const std::uint32_t t0u = t0;
    std::uint32_t tile_off = 0;  // page_tiles: the tile's tokens are at offsets tile_off + i of td.page
    td.page = -1;
    if (page_tiles) {
      tile_off = t0u - page_index(t0u) * ps32;
      td.page = page;
    }
    const bool tile_in_pool = page_tiles && in_pool(td.page);
    if (by_page && tile_in_pool) {  // the page's key scales, for make_q a tile later
      // The lane's first and last key scales (its last one's offset is a constant from its first:
      // fewer live registers than two offsets from the row).
      const float* ks = cache.k_scales + cache.channel_scale_offset(td.page, h, Lane::key_channel(j, 0));
      asm volatile("prefetch.global.L1 [%0];" ::"l"(ks));
      asm volatile("prefetch.global.L1 [%0];" ::"l"(ks + (Lane::key_channel(j, Lane::kKeyWords - 1) + 3 - Lane::key_channel(j, 0))));
    }
    if (tile_in_pool && t0 >= lo_t && t0 + kTile <= hi_t) {  // the common case: a whole tile of one page
      const std::int8_t* const k_page = k_lane + td.page * kst.page_stride;
      const std::int8_t* const v_page = v_lane + td.page * vst.page_stride;
      const std::uint32_t scale_tile = (static_cast<std::uint32_t>(td.page) * ps32 + tile_off) * kvh + static_cast<std::uint32_t>(h);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        load_key_bytes<D>(td.k[i], k_page + (tile_off + key_token(i)) * k_ts, k_tail);
        const std::uint32_t scale_at = scale_tile + key_token(i) * kvh;
        td.v_scale[i] = cache.v_scales[scale_at];
        td.k_scale[i] = by_page ? 1.0f : cache.k_scales[scale_at];
      }
      td.valid_bits = 3u;
#pragma unroll
      for (int i = 0; i < 4; ++i) load_value_bytes<D>(td.v[i], v_page + (tile_off + value_token(i)) * v_ts, v_tail);
      return td;
    }
    // Token i of the tile: its page (-1: none, or outside the pool) and offset, when in range.
    auto locate = [&](int i, std::int64_t& page, std::uint32_t& off) {
      const std::uint32_t t = t0 + i;
      page = -1;
      if (t < lo_t || t >= hi_t) return false;
      if (page_tiles) {
        page = tile_in_pool ? td.page : -1;
        off = tile_off + i;
      } else {
        const std::uint32_t index = page_index(t0u + i);
        page = table[index];
        off = t0u + i - index * ps32;
        if (!in_pool(page)) page = -1;
      }
      return true;
    };
    td.valid_bits = 0u;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      std::int64_t page;
      std::uint32_t off;
      const bool in_range = locate(key_token(i), page, off);
      // A dropped token counted once: by the lanes of j = 0 (they hold tokens r and r + 8), of KV head 0.
      if (in_range && page < 0 && j == 0 && h == 0 && error_count != nullptr) atomicAdd(error_count, 1ull);
      td.k_scale[i] = td.v_scale[i] = 1.0f;
      if (page >= 0) {
        load_key_bytes<D>(td.k[i], k_lane + page * kst.page_stride + off * kst.token_stride, k_tail);
        const std::int64_t scale_at = cache.scale_offset(page * ps + off, h);
        td.v_scale[i] = cache.v_scales[scale_at];
        if (!by_page) td.k_scale[i] = cache.k_scales[scale_at];
        td.valid_bits |= 1u << i;
      } else {
        zero_words(td.k[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // a dropped token's values are zeros (its weight is 0)
      std::int64_t page;
      std::uint32_t off;
      if (locate(value_token(i), page, off) && page >= 0)
        load_value_bytes<D>(td.v[i], v_lane + page * vst.page_stride + off * vst.token_stride, v_tail);
      else
        zero_words(td.v[i]);
    }
    return td;
  };

  // S^T of a tile: c[nt][2i + col] is token key_token(i)'s score for head 8 nt + 2j + col.
  auto scores = [&](const Tile& td, float (&c)[kHeadTiles][4], auto with_lo) {
#pragma unroll
    for (int st = 0; st < kSteps; ++st) {
      std::uint32_t a[4];
      codes_to_half2(td.k[0][st], a[0], a[2]);
      codes_to_half2(td.k[1][st], a[1], a[3]);
#pragma unroll
      for (int nt = 0; nt < kHeadTiles; ++nt) {
        const uint4 f = frag[st][nt][lane];
        const std::uint32_t b_hi[2] = {f.x, f.y};
        mma_f16(c[nt], a, b_hi, c[nt]);
        if constexpr (decltype(with_lo)::value) {
          const std::uint32_t b_lo[2] = {f.z, f.w};
          mma_f16(c[nt], a, b_lo, c[nt]);
        }
      }
    }
  };

  auto compute_tile = [&](const Tile& td) {
    if (by_page && td.page != q_page && td.page >= 0 && td.page < cache.num_pages) {
      make_q(cache.k_scales + cache.channel_scale_offset(td.page, h, 0));
      q_page = td.page;
    }
    float c[kHeadTiles][4] = {};
    if (q_has_lo)
      scores(td, c, std::true_type{});
    else
      scores(td, c, std::false_type{});
    float token_scale[2], v_scale[2];  // v_scale: 0 for a token that is not valid
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      token_scale[i] = by_page ? score_scale : mul_rn(score_scale, sanitize_scale(td.k_scale[i]));
      v_scale[i] = td.valid(i) ? sanitize_scale(td.v_scale[i]) : 0.0f;
    }
    // The online softmax, per head (column); a column's 16 tokens are held by the 8 lanes of its j.
    float alpha[kHeadTiles][2], p[kHeadTiles][4];
    bool rescale = false;
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt)
#pragma unroll
      for (int col = 0; col < 2; ++col) {
        float s[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) s[i] = td.valid(i) ? mul_rn(c[nt][2 * i + col], token_scale[i]) : kNegInf;
        float tile_max = max_rn(s[0], s[1]);
        tile_max = max_rn(tile_max, __shfl_xor_sync(kFullMask, tile_max, 4));
        tile_max = max_rn(tile_max, __shfl_xor_sync(kFullMask, tile_max, 8));
        tile_max = max_rn(tile_max, __shfl_xor_sync(kFullMask, tile_max, 16));
        const float m_new = max_rn(m_run[nt][col], tile_max);
        const bool none = is_neg_inf(m_new);  // no valid token yet
        alpha[nt][col] = none ? 1.0f : ex2_approx(sub_rn(m_run[nt][col], m_new));
        rescale |= float_bits(alpha[nt][col]) != float_bits(1.0f);
#pragma unroll
        for (int i = 0; i < 2; ++i)
          p[nt][2 * i + col] = none || is_neg_inf(s[i]) ? 0.0f : ex2_approx(sub_rn(s[i], m_new));
        l_run[nt][col] = fma_rn(l_run[nt][col], alpha[nt][col], add_rn(p[nt][col], p[nt][2 + col]));
        m_run[nt][col] = m_new;
      }
    if (__any_sync(kFullMask, rescale)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kHeadTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = mul_rn(acc[mt][nt][e], alpha[nt][e & 1]);
    }
    // P times the values' scales, over a power of two that keeps it below 2 (the tile's largest
    // scale's exponent, restored after the MMA), as hi + lo fp16, transposed into B fragments.
    std::uint32_t vmax = max(float_bits(v_scale[0]), float_bits(v_scale[1]));
    vmax = max(vmax, __shfl_xor_sync(kFullMask, vmax, 4));
    vmax = max(vmax, __shfl_xor_sync(kFullMask, vmax, 8));
    vmax = max(vmax, __shfl_xor_sync(kFullMask, vmax, 16));
    const int ve = min(static_cast<int>(vmax >> 23), 253);
    const float down = ve == 0 ? 1.0f : exp2_int(127 - ve), up = ve == 0 ? 1.0f : exp2_int(ve - 127);
    std::uint32_t p_hi[kHeadTiles][2], p_lo[kHeadTiles][2];
#pragma unroll
    for (int nt = 0; nt < kHeadTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float x0 = mul_rn(mul_rn(p[nt][2 * i], v_scale[i]), down);
        const float x1 = mul_rn(mul_rn(p[nt][2 * i + 1], v_scale[i]), down);
        std::uint32_t hi, lo;
        split_half2(x0, x1, hi, lo);
        p_hi[nt][i] = transpose_8x8(hi);
        p_lo[nt][i] = transpose_8x8(lo);
      }
    // O^T += (V^T P^T) up, 16 channels per MMA.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      constexpr int kHigh = kMTiles;  // byte of row r + 8
      const std::uint32_t a[4] = {
          code_pair_to_half2(td.v[0][mt / 4], td.v[1][mt / 4], mt % 4),
          code_pair_to_half2(td.v[0][(kHigh + mt) / 4], td.v[1][(kHigh + mt) / 4], (kHigh + mt) % 4),
          code_pair_to_half2(td.v[2][mt / 4], td.v[3][mt / 4], mt % 4),
          code_pair_to_half2(td.v[2][(kHigh + mt) / 4], td.v[3][(kHigh + mt) / 4], (kHigh + mt) % 4)};
#pragma unroll
      for (int nt = 0; nt < kHeadTiles; ++nt) {
        float pv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_f16(pv, a, p_hi[nt], pv);
        mma_f16(pv, a, p_lo[nt], pv);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = fma_rn(pv[e], up, acc[mt][nt][e]);
      }
    }
  };

  // This warp's tiles: blocks of kBlock tokens of the chunk, every kWarps-th, from lo_t on.
  auto next_tile = [&](std::uint32_t t) {
    t += kTile;
    if ((t - begin) % kBlock == 0) t += (kWarps - 1) * kBlock;
    return t;
  };
  std::uint32_t t = begin + warp * kBlock;
  while (t + kTile <= lo_t) t = next_tile(t);
  if (t < hi_t) {
    Tile a = load_tile(t, table_page(t));
    std::uint32_t tn = next_tile(t);  // the next tile to load, and its page
    std::int32_t tn_page = table_page(tn);
    if constexpr (kTwoTiles) {
      // Tile `nxt` loads while `cur` computes; the two alternate, so no tile is copied.
      Tile b;
      auto step = [&](const Tile& cur, Tile& nxt) {
        const bool more = tn < hi_t;
        if (more) {
          nxt = load_tile(tn, tn_page);
          tn = next_tile(tn);
          tn_page = table_page(tn);
        }
        compute_tile(cur);
        return more;
      };
      while (step(a, b) && step(b, a)) {
      }
    } else {
      // One tile in registers; the one after next is prefetched into L2 (a line a lane) a tile
      // before its loads, so they wait on L2 rather than on DRAM. (Three or four tiles ahead
      // measured slower: more of L2 held, no more latency hidden.)
      prefetch_tile(tn, tn_page);
      std::uint32_t t2 = next_tile(tn);  // the tile after tn, and its page
      std::int32_t t2_page = table_page(t2);
      while (true) {
        compute_tile(a);
        if (tn >= hi_t) break;
        prefetch_tile(t2, t2_page);
        a = load_tile(tn, tn_page);
        tn = t2;
        tn_page = t2_page;
        t2 = next_tile(t2);
        t2_page = table_page(t2);
      }
    }
  }

  // The block's four warps merged (in order) into the chunk's partial.
#pragma unroll
  for (int nt = 0; nt < kHeadTiles; ++nt)
#pragma unroll
    for (int col = 0; col < 2; ++col)
#pragma unroll
      for (int off = 4; off < kWarpSize; off *= 2)
        l_run[nt][col] = add_rn(l_run[nt][col], __shfl_xor_sync(kFullMask, l_run[nt][col], off));
  __syncthreads();  // every warp is done with sm.query
#pragma unroll
  for (int nt = 0; nt < kHeadTiles; ++nt) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sm.merge.acc[warp][8 * nt + 2 * j + (e & 1)][Lane::value_channel(r, (e >> 1) * kMTiles + mt)] = acc[mt][nt][e];
    if (r == 0) {
#pragma unroll
      for (int col = 0; col < 2; ++col) {
        sm.merge.m[warp][8 * nt + 2 * j + col] = m_run[nt][col];
        sm.merge.l[warp][8 * nt + 2 * j + col] = l_run[nt][col];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * D; i += DecodePolicy::kThreads) {
    const int row = i / D, ch = i % D;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = max_rn(m_all, sm.merge.m[w][row]);
    float a = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      if (!is_neg_inf(sm.merge.m[w][row])) {
        const float f = ex2_approx(sub_rn(sm.merge.m[w][row], m_all));
        a = fma_rn(sm.merge.acc[w][row][ch], f, a);
        l = fma_rn(sm.merge.l[w][row], f, l);
      }
    float* out = workspace + decode_partial_offset(plan, b, h * group + row, blockIdx.x);
    out[ch] = a;
    if (ch == 0) {
      out[D] = m_all;
      out[D + 1] = l;
    }
  }
#endif
}

/// One warp per (sequence, query head): the first `parts` partials merged in order, normalized,
/// rounded to T.
template <class T>
KVQ_KERNEL void __launch_bounds__(DecodePolicy::kThreads)
    decode_merge_kernel(const float* __restrict__ workspace, DecodePlan plan, std::int64_t parts, QueryRows out_rows,
                        T* __restrict__ out,  // (batch, q_heads, head_dim)
                        float* __restrict__ lse) {  // (batch, q_heads) or null
  const std::int64_t item = (static_cast<std::int64_t>(blockIdx.x) * DecodePolicy::kThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (item >= out_rows.batch * out_rows.q_heads) return;
  const std::int64_t b = item / out_rows.q_heads, qh = item % out_rows.q_heads, d = plan.limits.head_dim;
  float m = kNegInf;
  for (std::int64_t s = 0; s < parts; ++s) m = max_rn(m, workspace[decode_partial_offset(plan, b, qh, s) + d]);
  float l = 0.0f;
  for (std::int64_t s = 0; s < parts; ++s) {
    const float* part = workspace + decode_partial_offset(plan, b, qh, s);
    if (!is_neg_inf(part[d])) l = fma_rn(part[d + 1], ex2_approx(sub_rn(part[d], m)), l);
  }
  T* o = out + b * out_rows.batch_stride + qh * out_rows.head_stride;
  for (std::int64_t ch = lane; ch < d; ch += kWarpSize) {
    float a = 0.0f;
    for (std::int64_t s = 0; s < parts; ++s) {
      const float* part = workspace + decode_partial_offset(plan, b, qh, s);
      if (!is_neg_inf(part[d])) a = fma_rn(part[ch], ex2_approx(sub_rn(part[d], m)), a);
    }
    o[ch] = from_float<T>(is_positive(l) ? div_rn(a, l) : 0.0f);
  }
  if (lse != nullptr && lane == 0) lse[b * out_rows.q_heads + qh] = is_positive(l) ? mul_rn(add_rn(m, lg2_approx(l)), kLn2) : kNegInf;
}

/// Whether decode_mma_kernel runs this call: an sm_80 or later GPU, fp16 / bf16, head dim 64, 80,
/// 96, 128 or 256 (128 at most for groups over 8, whose twice as many rows need twice the
/// registers), code pools at 16-byte aligned rows whose pages span under 2 GiB of token rows,
/// fewer than 2^31 scales, and under kKeysPerChannelPage pages of a multiple of 16 tokens (a
/// tile's keys under one page's scales) and 16-byte aligned key scales.
template <class T>
inline bool decode_takes_mma(const PagedCache& c, std::int64_t group, const DecodePlan& plan) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 8)
      return false;
    auto aligned = [](const void* p, const PageStrides& s) {
      return is_aligned(p, 16) && s.page_stride % 16 == 0 && s.token_stride % 16 == 0 && s.head_stride % 16 == 0;
    };
    const std::int64_t d = c.head_dim;
    // 32-bit offsets within a page and scale indices (decode_mma_kernel's loads).
    auto page_rows_32 = [&](const PageStrides& s) {
      return s.token_stride >= 0 && c.page_size * s.token_stride < (std::int64_t{1} << 31);
    };
    const bool scales_32 = c.num_pages * c.page_size * c.kv_heads < (std::int64_t{1} << 31);
    return (d == 64 || d == 80 || d == 96 || d == 128 || d == 256) && (group <= 8 || d <= 128) && aligned(c.k_codes, c.k_strides) &&
           aligned(c.v_codes, c.v_strides) && page_rows_32(c.k_strides) && page_rows_32(c.v_strides) && scales_32 &&
           plan.split_tokens % DecodeMmaPolicy::kBlockTokens == 0 &&
           (c.scheme != PagedScheme::kKeysPerChannelPage ||
            (c.page_size % DecodeMmaPolicy::kTileTokens == 0 && is_aligned(c.k_scales, 16)));
  }
}

template <class T>
cudaError_t launch_decode_attention(const T* q, const QueryRows& q_rows, const PagedCache& cache,
                                    const SequenceTable& seqs, float sm_scale, T* out, const QueryRows& out_rows,
                                    float* lse, const DecodePlan& plan, void* workspace,
                                    unsigned long long* error_count, cudaStream_t stream) {
  float* ws = static_cast<float*>(workspace);
  const std::int64_t group = q_rows.q_heads / cache.kv_heads;
  const bool mma = decode_takes_mma<T>(cache, group, plan);
  const bool full_precision_block = mma && cache.scheme == PagedScheme::kKeysPerChannelPage;
  const dim3 grid(static_cast<unsigned>(plan.splits + (full_precision_block ? 1 : 0)),
                  static_cast<unsigned>(cache.kv_heads), static_cast<unsigned>(plan.limits.max_batch));
  const auto args = [&](auto kernel) {
    kernel<<<grid, DecodePolicy::kThreads, 0, stream>>>(q, q_rows, cache, seqs, sm_scale, plan, ws, error_count);
  };
  if constexpr (sizeof(T) == 2) {
    if (mma) {
      const std::int64_t d = cache.head_dim;
      if (d == 64)
        group <= 8 ? args(decode_mma_kernel<4, 1, T>) : args(decode_mma_kernel<4, 2, T>);
      else if (d == 80)
        group <= 8 ? args(decode_mma_kernel<5, 1, T>) : args(decode_mma_kernel<5, 2, T>);
      else if (d == 96)
        group <= 8 ? args(decode_mma_kernel<6, 1, T>) : args(decode_mma_kernel<6, 2, T>);
      else if (d == 128)
        group <= 8 ? args(decode_mma_kernel<8, 1, T>) : args(decode_mma_kernel<8, 2, T>);
      else
        args(decode_mma_kernel<16, 1, T>);
    }
  }
  if (!mma) {
    if (cache.head_dim <= 128)
      args(decode_partial_kernel<128, T>);
    else
      args(decode_partial_kernel<256, T>);
  }
  KVQ_TRY(check_launch());
  const std::int64_t warps = plan.limits.max_batch * plan.limits.q_heads;
  const unsigned merge_blocks = static_cast<unsigned>((warps + DecodePolicy::kWarps - 1) / DecodePolicy::kWarps);
  decode_merge_kernel<T><<<merge_blocks, DecodePolicy::kThreads, 0, stream>>>(
      ws, plan, plan.splits + (full_precision_block ? 1 : 0), out_rows, out, lse);
  return check_launch();
}

}  // namespace detail
KVQ_NAMESPACE_END
