// kvq/detail/attention_kernels.cuh: the kernels behind kvq/attention.cuh (decode attention).
//
// Flash-decoding in two kernels. decode_partial_kernel: one block per (chunk of a sequence, KV
// head, sequence), 4 warps. A tile of kTile tokens of the chunk's keys and values is dequantized
// into shared memory (fp32, exactly as gather_kv dequantizes them); each warp owns some of the
// group's query heads, a lane scores one token of the tile against its head, and the warp keeps
// an online softmax (running max, sum, and the lanes' channels of the weighted values). So every
// KV page is read once per group, whatever the group size. The chunk's unnormalized sums go to the
// workspace. decode_merge_kernel: one warp per (sequence, query head) combines the chunks in
// order: no atomics, so the result is deterministic and identical eager and in a graph.
//
// The arithmetic is the contract's inline PTX (mul_rn, fma_rn, ...) and ex2.approx / lg2.approx
// spelled in PTX, so the caller's --use_fast_math changes nothing. Scores are kept in base 2.
// This first kernel uses CUDA cores only (no tensor cores) and scalar code loads.
#pragma once

#include <kvq/version.hpp>

#include <kvq/attention.hpp>
#include <kvq/detail/config.cuh>
#include <kvq/detail/paged_kernels.cuh>
#include <kvq/numerics.hpp>
#include <kvq/paged.hpp>

#include <cuda_runtime.h>

#include <cstdint>

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

__device__ inline float ex2_approx(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
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

/// Where chunk s of (sequence b, query head qh) keeps its partial result in the workspace:
/// acc[head_dim] (the unnormalized weighted values), then m (running max, base 2) and l (sum).
__device__ inline std::int64_t decode_partial_offset(const DecodePlan& p, std::int64_t b, std::int64_t qh,
                                                     std::int64_t s) {
  return ((b * p.limits.q_heads + qh) * p.splits + s) * (p.limits.head_dim + 2);
}

template <int kMaxDim, class T>
KVQ_KERNEL void __launch_bounds__(DecodePolicy::kThreads)
    decode_partial_kernel(const T* __restrict__ q, QueryRows q_rows,  // (batch, q_heads, head_dim)
                          PagedCache cache, SequenceTable seqs, float sm_scale, DecodePlan plan,
                          float* __restrict__ workspace, unsigned long long* error_count) {
  constexpr int kWarps = DecodePolicy::kWarps, kTile = DecodeTile<kMaxDim>::kTokens;
  constexpr int kChannelsPerLane = DecodeTile<kMaxDim>::kChannelsPerLane;
  const std::int64_t split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (b >= q_rows.batch) return;  // the grid covers max_batch
  const std::int64_t d = cache.head_dim, group = q_rows.q_heads / cache.kv_heads, ps = cache.page_size;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;

  __shared__ float q_s[kMaxDecodeGroup * kMaxDim];  // the group's queries, * sm_scale * log2(e)
  __shared__ float k_s[kTile][kMaxDim + 1];         // +1: lanes read different rows, same column
  __shared__ float v_s[kTile][kMaxDim + 1];
  __shared__ bool valid_s[kTile];

  // The sequence: untrusted length and id (counted once, by chunk 0 of KV head 0); the chunk.
  std::int64_t seq = seqs.seq_ids != nullptr ? seqs.seq_ids[b] : b, len = seqs.seq_lens[b];
  const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
  if (len < 0 || len > seqs.max_pages_per_seq * ps || len > plan.split_tokens * plan.splits ||
      (by_page && (seq < 0 || seq >= cache.max_seqs))) {
    if (error_count != nullptr && split == 0 && h == 0 && threadIdx.x == 0) atomicAdd(error_count, 1ull);
    len = 0;
  }
  const std::int64_t begin = split * plan.split_tokens, end = min(len, begin + plan.split_tokens);

  const float q_scale = mul_rn(sm_scale, kLog2e);
  for (std::int64_t i = threadIdx.x; i < group * d; i += DecodePolicy::kThreads) {
    const std::int64_t qh = h * group + i / d;
    q_s[i] = mul_rn(to_float(q[b * q_rows.batch_stride + qh * q_rows.head_stride + i % d]), q_scale);
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

  for (std::int64_t t0 = begin; t0 < end; t0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and q_s written, the first time)
    if (threadIdx.x < kTile) {
      const std::int64_t t = t0 + threadIdx.x;
      bool ok = t < end;
      if (ok) {
        const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / ps];
        ok = page >= 0 && page < cache.num_pages;
        if (!ok && error_count != nullptr && h == 0) atomicAdd(error_count, 1ull);  // counted once per token
      }
      valid_s[threadIdx.x] = ok;
    }
    __syncthreads();
    for (std::int64_t i = threadIdx.x; i < kTile * d; i += DecodePolicy::kThreads) {
      const int r = static_cast<int>(i / d);
      const std::int64_t ch = i % d, t = t0 + r;
      float kv = 0.0f, vv = 0.0f;
      if (valid_s[r]) {
        const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / ps];
        kv = paged_token_value(cache, seq, len, t, page, h, false, ch);
        vv = paged_token_value(cache, seq, len, t, page, h, true, ch);
      }
      k_s[r][ch] = kv;
      v_s[r][ch] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < DecodePolicy::kMaxHeadsPerWarp; ++j) {
      const std::int64_t gi = warp + j * kWarps;  // this warp's j-th head of the group
      if (gi >= group) break;
      // Lane r scores token r of the tile (base 2, scaled).
      float s = kNegInf;
      if (lane < kTile && valid_s[lane]) {
        float dot = 0.0f;
        for (std::int64_t ch = 0; ch < d; ++ch) dot = fma_rn(q_s[gi * d + ch], k_s[lane][ch], dot);
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
          if (ch < d) acc[j][c] = fma_rn(pr, v_s[r][ch], acc[j][c]);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < DecodePolicy::kMaxHeadsPerWarp; ++j) {
    const std::int64_t gi = warp + j * kWarps;
    if (gi >= group) break;
    float* out = workspace + decode_partial_offset(plan, b, h * group + gi, split);
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

/// One warp per (sequence, query head): the chunks merged in order, normalized, rounded to T.
template <class T>
KVQ_KERNEL void __launch_bounds__(DecodePolicy::kThreads)
    decode_merge_kernel(const float* __restrict__ workspace, DecodePlan plan, QueryRows out_rows,
                        T* __restrict__ out,  // (batch, q_heads, head_dim)
                        float* __restrict__ lse) {  // (batch, q_heads) or null
  const std::int64_t item = (static_cast<std::int64_t>(blockIdx.x) * DecodePolicy::kThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (item >= out_rows.batch * out_rows.q_heads) return;
  const std::int64_t b = item / out_rows.q_heads, qh = item % out_rows.q_heads, d = plan.limits.head_dim;
  float m = kNegInf;
  for (std::int64_t s = 0; s < plan.splits; ++s) m = max_rn(m, workspace[decode_partial_offset(plan, b, qh, s) + d]);
  float l = 0.0f;
  for (std::int64_t s = 0; s < plan.splits; ++s) {
    const float* part = workspace + decode_partial_offset(plan, b, qh, s);
    if (!is_neg_inf(part[d])) l = fma_rn(part[d + 1], ex2_approx(sub_rn(part[d], m)), l);
  }
  T* o = out + b * out_rows.batch_stride + qh * out_rows.head_stride;
  for (std::int64_t ch = lane; ch < d; ch += kWarpSize) {
    float a = 0.0f;
    for (std::int64_t s = 0; s < plan.splits; ++s) {
      const float* part = workspace + decode_partial_offset(plan, b, qh, s);
      if (!is_neg_inf(part[d])) a = fma_rn(part[ch], ex2_approx(sub_rn(part[d], m)), a);
    }
    o[ch] = from_float<T>(is_positive(l) ? div_rn(a, l) : 0.0f);
  }
  if (lse != nullptr && lane == 0) lse[b * out_rows.q_heads + qh] = is_positive(l) ? mul_rn(add_rn(m, lg2_approx(l)), kLn2) : kNegInf;
}

template <class T>
cudaError_t launch_decode_attention(const T* q, const QueryRows& q_rows, const PagedCache& cache,
                                    const SequenceTable& seqs, float sm_scale, T* out, const QueryRows& out_rows,
                                    float* lse, const DecodePlan& plan, void* workspace,
                                    unsigned long long* error_count, cudaStream_t stream) {
  float* ws = static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(cache.kv_heads),
                  static_cast<unsigned>(plan.limits.max_batch));
  if (cache.head_dim <= 128)
    decode_partial_kernel<128, T><<<grid, DecodePolicy::kThreads, 0, stream>>>(q, q_rows, cache, seqs, sm_scale, plan,
                                                                              ws, error_count);
  else
    decode_partial_kernel<256, T><<<grid, DecodePolicy::kThreads, 0, stream>>>(q, q_rows, cache, seqs, sm_scale, plan,
                                                                              ws, error_count);
  KVQ_TRY(check_launch());
  const std::int64_t warps = plan.limits.max_batch * plan.limits.q_heads;
  const unsigned merge_blocks = static_cast<unsigned>((warps + DecodePolicy::kWarps - 1) / DecodePolicy::kWarps);
  decode_merge_kernel<T><<<merge_blocks, DecodePolicy::kThreads, 0, stream>>>(ws, plan, out_rows, out, lse);
  return check_launch();
}

}  // namespace detail
KVQ_NAMESPACE_END
