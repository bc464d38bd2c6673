// examples/device_blocks.cu: kvq inside an engine's own kernels (kvq/device.cuh).
//
// The engine keeps its KV cache in int8 with one fp32 scale per (head, token):
//   codes  (heads, max_tokens, head_dim) int8      scales (heads, max_tokens) fp32
// - Prefill: the prompt's K and V are quantized into the cache by kvq's host API.
// - Decode, each step: the engine's `append_token` kernel quantizes the new token's K and V with
//   kvq::device::quantize_row_warp (one warp per head), then its `decode_attention` kernel (one
//   block per head, one query) computes softmax(q K^T / sqrt(D)) V straight from the int8 cache
//   through kvq::device::load and kvq::device::dequantize.
// Checks (the example exits non-zero if one fails):
//   1. the cache's codes and scales equal kvq::reference::quantize per token, bit for bit, for the
//      prefix (host API) and for the appended tokens (device blocks); rows past the sequence are untouched;
//   2. decode attention equals attention in double over the same dequantized cache, within the
//      rounding of fp32 arithmetic (fp32_bound): this is the check of the kernel itself;
//   3. decode attention agrees with attention in double over the fp16 K and V before quantization,
//      within the error that int8 rounding (|error| <= scale/2 per element) causes (int8_error):
//      6 standard deviations of that error, and never more than its worst case.
#include <kvq/kvq.cuh>

#include "attention_error.hpp"
#include "example_support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

namespace {

constexpr const char* kName = "device_blocks";

constexpr int kHeads = 8;          // KV heads of one layer
constexpr int kHeadDim = 128;
constexpr int kMaxTokens = 512;    // cache capacity per head
constexpr int kPrefixTokens = 300;
constexpr int kDecodeSteps = 4;
constexpr int kTokens = kPrefixTokens + kDecodeSteps;
static_assert(kTokens <= kMaxTokens, "the sequence must fit in the cache");

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Check 3 allows 6 standard deviations of the int8 error model (int8_error): the output error of a
// channel is a sum over hundreds of tokens of bounded, independent rounding errors, so nearly
// Gaussian, and 6 sigma is exceeded with probability ~2e-9 per channel (4096 channels checked).
constexpr double kSigmas = 6.0;

// ---------------------------------------------------------------------------------------------
// The engine's kernels.

constexpr int kAppendWarps = 4;  // heads per block of append_token

/// Writes the K and V of the token at position `pos` into the cache: warp w of the grid quantizes
/// head w's rows, each with a scale of its own (per token), codes and scale in one call.
__global__ void __launch_bounds__(kAppendWarps * kWarpSize)
    append_token(const __half* __restrict__ k_new,  // (heads, head_dim)
                 const __half* __restrict__ v_new,  // (heads, head_dim)
                 int heads, int head_dim, int max_tokens, int pos,
                 std::int8_t* __restrict__ k_codes,  // (heads, max_tokens, head_dim)
                 float* __restrict__ k_scales,       // (heads, max_tokens)
                 std::int8_t* __restrict__ v_codes,  // (heads, max_tokens, head_dim)
                 float* __restrict__ v_scales) {     // (heads, max_tokens)
  const int head = static_cast<int>(blockIdx.x) * kAppendWarps + static_cast<int>(threadIdx.x) / kWarpSize;
  // `head` is the same for the 32 lanes of a warp, so whole warps leave here: quantize_row_warp
  // reduces across the warp and needs all 32 lanes.
  if (head >= heads) return;
  const std::int64_t row = static_cast<std::int64_t>(head) * max_tokens + pos;  // (head, pos)
  const std::int64_t in = static_cast<std::int64_t>(head) * head_dim;
  kvq::device::quantize_row_warp(k_new + in, head_dim, k_codes + row * head_dim, k_scales + row);
  kvq::device::quantize_row_warp(v_new + in, head_dim, v_codes + row * head_dim, v_scales + row);
}

constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = kAttentionWarps * kWarpSize;
constexpr int kCodesPerLoad = 4;  // one 4-byte load per lane: a warp reads 128 codes of a row at once

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/// Reduces over the 32 lanes of a warp; every lane gets the result.
template <class Op>
__device__ float warp_reduce(float x, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

/// Reduces over the block; every thread gets the same result (all read the per-warp slots in the
/// same order). Contains __syncthreads: every thread of the block must call it.
template <class Op>
__device__ float block_reduce(float x, Op op, float* slots) {  // slots: (kAttentionWarps) in shared memory
  x = warp_reduce(x, op);
  if (threadIdx.x % kWarpSize == 0) slots[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  float r = slots[0];
  for (int w = 1; w < kAttentionWarps; ++w) r = op(r, slots[w]);
  __syncthreads();  // everyone has read the slots before they are reused
  return r;
}

/// out[head] = softmax(q[head] K[head]^T / sqrt(D)) V[head] over the first `len` tokens of the
/// int8 cache. One block per head. All `len` scores of a head are kept in shared memory, which
/// bounds the context this simple kernel handles (a long context needs a split over tokens).
template <int kDim>
__global__ void __launch_bounds__(kAttentionThreads)
    decode_attention(const __half* __restrict__ q,             // (heads, kDim)
                     const std::int8_t* __restrict__ k_codes,  // (heads, max_tokens, kDim)
                     const float* __restrict__ k_scales,       // (heads, max_tokens)
                     const std::int8_t* __restrict__ v_codes,  // (heads, max_tokens, kDim)
                     const float* __restrict__ v_scales,       // (heads, max_tokens)
                     int max_tokens, int len,
                     float* __restrict__ out) {                // (heads, kDim)
  // Lane l owns, in chunk c, channels [(c * 32 + l) * 4, +4): a warp reads a whole row, coalesced.
  constexpr int kChunks = kDim / (kWarpSize * kCodesPerLoad);
  static_assert(kChunks * kWarpSize * kCodesPerLoad == kDim, "this kernel needs a head dim that is a multiple of 128");
  extern __shared__ float weights[];                   // (len): scores, then exp(score - max)
  __shared__ float partial[kAttentionWarps][kDim];     // each warp's sum of p_t * v_t
  __shared__ float slots[kAttentionWarps];

  const int head = static_cast<int>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const std::int64_t head_row = static_cast<std::int64_t>(head) * max_tokens;  // row of (head, token 0)
  auto channel = [lane](int c) { return (c * kWarpSize + lane) * kCodesPerLoad; };

  // The query stays in registers: every token needs the same lane's channels of it.
  float qf[kChunks][kCodesPerLoad];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const auto f = kvq::device::load<kCodesPerLoad>(q + static_cast<std::int64_t>(head) * kDim + channel(c));
#pragma unroll
    for (int i = 0; i < kCodesPerLoad; ++i) qf[c][i] = kvq::to_float(f[i]);
  }
  const float inv_sqrt_dim = 1.0f / sqrtf(static_cast<float>(kDim));

  // 1. Scores. Warp w takes tokens w, w + 4, ...; its lanes split the channels of each row.
  for (int t = warp; t < len; t += kAttentionWarps) {
    const std::int64_t row = head_row + t;
    const float scale = k_scales[row];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const auto k = kvq::device::dequantize<float>(kvq::device::load<kCodesPerLoad>(k_codes + row * kDim + channel(c)),
                                                    scale);
#pragma unroll
      for (int i = 0; i < kCodesPerLoad; ++i) dot += qf[c][i] * k[i];
    }
    dot = warp_reduce(dot, Sum{});
    if (lane == 0) weights[t] = dot * inv_sqrt_dim;
  }
  __syncthreads();

  // 2. Softmax weights (unnormalized; the sum divides at the end).
  float local_max = -INFINITY;
  for (int t = static_cast<int>(threadIdx.x); t < len; t += kAttentionThreads) local_max = fmaxf(local_max, weights[t]);
  const float max_score = block_reduce(local_max, Max{}, slots);
  float local_sum = 0.0f;
  for (int t = static_cast<int>(threadIdx.x); t < len; t += kAttentionThreads) {
    const float e = expf(weights[t] - max_score);
    weights[t] = e;
    local_sum += e;
  }
  // The __syncthreads inside also makes every weights[t] written above visible to the block.
  const float sum = block_reduce(local_sum, Sum{}, slots);

  // 3. Weighted sum of V, same split as the scores; then the warps' partial sums are added.
  float acc[kChunks][kCodesPerLoad] = {};
  for (int t = warp; t < len; t += kAttentionWarps) {
    const std::int64_t row = head_row + t;
    const float p = weights[t];
    const float scale = v_scales[row];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const auto v = kvq::device::dequantize<float>(kvq::device::load<kCodesPerLoad>(v_codes + row * kDim + channel(c)),
                                                    scale);
#pragma unroll
      for (int i = 0; i < kCodesPerLoad; ++i) acc[c][i] += p * v[i];
    }
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int i = 0; i < kCodesPerLoad; ++i) partial[warp][channel(c) + i] = acc[c][i];
  __syncthreads();
  const float inv_sum = 1.0f / sum;
  for (int d = static_cast<int>(threadIdx.x); d < kDim; d += kAttentionThreads) {
    float o = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) o += partial[w][d];
    out[static_cast<std::int64_t>(head) * kDim + d] = o * inv_sum;
  }
}

// Scores of a whole head live in shared memory, next to 2 KiB of static shared memory; stay well
// inside the 48 KiB a kernel gets without opting in.
static_assert(kMaxTokens * sizeof(float) <= 32 * 1024, "decode_attention keeps all scores in shared memory");

// ---------------------------------------------------------------------------------------------
// Host side: data, and the checks.

/// Every token the example sees, as the model would produce them.
struct Sequence {
  std::vector<__half> k, v;  // (heads, tokens, head_dim)
  std::vector<float> q;      // (decode_steps, heads, head_dim): the query of each decode step (fp16 values)
};

Sequence make_sequence(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::lognormal_distribution<float> magnitude(0.0f, 0.3f);  // per-token and per-channel spread
  Sequence s{std::vector<__half>(kHeads * kTokens * kHeadDim), std::vector<__half>(kHeads * kTokens * kHeadDim),
             std::vector<float>(kDecodeSteps * kHeads * kHeadDim)};
  for (int h = 0; h < kHeads; ++h) {
    std::vector<float> channel_sigma(kHeadDim);
    for (float& c : channel_sigma) c = magnitude(rng);
    for (int t = 0; t < kTokens; ++t) {
      const float k_sigma = magnitude(rng), v_sigma = magnitude(rng);
      for (int d = 0; d < kHeadDim; ++d) {
        const int i = (h * kTokens + t) * kHeadDim + d;
        s.k[i] = kvq::from_float<__half>(k_sigma * channel_sigma[d] * normal(rng));
        s.v[i] = kvq::from_float<__half>(v_sigma * normal(rng));
      }
    }
  }
  for (float& x : s.q) x = kvq::to_float(kvq::from_float<__half>(normal(rng)));
  return s;
}

/// Tokens [t0, t1) of every head of x (heads, tokens, head_dim), as a dense (heads, t1 - t0, head_dim).
std::vector<__half> token_rows(const std::vector<__half>& x, int t0, int t1) {
  std::vector<__half> rows;
  rows.reserve(static_cast<std::size_t>(kHeads * (t1 - t0) * kHeadDim));
  for (int h = 0; h < kHeads; ++h)
    rows.insert(rows.end(), x.begin() + (h * kTokens + t0) * kHeadDim, x.begin() + (h * kTokens + t1) * kHeadDim);
  return rows;
}

constexpr double kUnitRoundoff = 1.0 / (1 << 24);  // fp32
double gamma(int n) { return n * kUnitRoundoff / (1.0 - n * kUnitRoundoff); }

/// How far fp32 arithmetic may move decode_attention's output from attention computed exactly on
/// the same dequantized values (the GPU's dequantized values are bit-identical to the CPU's: one
/// IEEE multiply each). Standard rounding-error bounds, u = 2^-24, gamma_n = n u / (1 - n u):
///  - a score is a dot of D products summed in any order, then scaled by 1/sqrt(D) (3 more
///    roundings): its error is at most gamma_{D+3} * sum_i |q_i k_i| / sqrt(D);
///  - score - max adds u * (range of the scores); expf adds 2 ulp (<= 2^-22 relative);
///  - a log-weight error of at most e moves every softmax weight by a factor in [e^-2e, e^2e], so
///    the output by at most (e^2e - 1) * max|v|;
///  - the two sums over `len` tokens (weights, weighted values) and the final scaling add
///    2 * gamma_{len+3} * max|v|.
/// First order in u; the second-order terms are below 1e-9 of max|v| here.
double fp32_bound(const float* q,      // (head_dim)
                  const float* k_hat,  // (len, head_dim)
                  const float* v_hat,  // (len, head_dim)
                  int len) {
  double max_abs_dot = 0.0, max_abs_v = 0.0, lo = INFINITY, hi = -INFINITY;
  for (int t = 0; t < len; ++t) {
    double abs_dot = 0.0, score = 0.0;
    for (int d = 0; d < kHeadDim; ++d) {
      abs_dot += std::fabs(static_cast<double>(q[d]) * k_hat[t * kHeadDim + d]);
      score += static_cast<double>(q[d]) * k_hat[t * kHeadDim + d];
      max_abs_v = std::max(max_abs_v, std::fabs(static_cast<double>(v_hat[t * kHeadDim + d])));
    }
    max_abs_dot = std::max(max_abs_dot, abs_dot);
    lo = std::min(lo, score);
    hi = std::max(hi, score);
  }
  const double inv_sqrt_dim = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  const double score_error = gamma(kHeadDim + 3) * max_abs_dot * inv_sqrt_dim;
  const double range = (hi - lo) * inv_sqrt_dim + 2.0 * score_error;
  const double log_weight_error = score_error + kUnitRoundoff * range + std::ldexp(1.0, -22);
  return (std::expm1(2.0 * log_weight_error) + 2.0 * gamma(len + 3)) * max_abs_v;
}

/// Mismatches between the cache (heads, max_tokens, head_dim) + (heads, max_tokens) and the
/// reference (heads, tokens, head_dim) + (heads, tokens) over tokens [t0, t1); scales by bits.
struct Mismatches {
  long codes = 0, scales = 0;
};
Mismatches compare_rows(const std::vector<std::int8_t>& codes, const std::vector<float>& scales,
                        const std::vector<std::int8_t>& ref_codes, const std::vector<float>& ref_scales, int t0, int t1) {
  Mismatches m;
  for (int h = 0; h < kHeads; ++h)
    for (int t = t0; t < t1; ++t) {
      m.scales += kvq::float_bits(scales[h * kMaxTokens + t]) != kvq::float_bits(ref_scales[h * kTokens + t]);
      for (int d = 0; d < kHeadDim; ++d)
        m.codes += codes[(h * kMaxTokens + t) * kHeadDim + d] != ref_codes[(h * kTokens + t) * kHeadDim + d];
    }
  return m;
}

// Poison written to the cache before anything else, so that rows left unwritten (or written past
// the sequence) show: kvq never produces the code -128, nor a NaN scale.
constexpr unsigned char kPoisonCodeByte = 0x80;   // int8 -128
constexpr unsigned char kPoisonScaleByte = 0xff;  // fp32 NaN

/// What the GPU left: the cache, and the attention output of every decode step.
struct GpuResults {
  std::vector<std::int8_t> k_codes, v_codes;  // (heads, max_tokens, head_dim)
  std::vector<float> k_scales, v_scales;      // (heads, max_tokens)
  std::vector<std::vector<float>> out;        // (decode_steps) x (heads, head_dim)
};

/// Checks 1-3 of the header comment; prints what it finds. True when all pass.
bool check_results(const Sequence& seq, const GpuResults& gpu) {
  const kvq::QuantSpec per_token{kvq::Granularity::kPerToken, 0};
  std::printf("%s: int8 cache [H=%d, T_max=%d, D=%d] with per-token scales; %d prompt tokens (host API), "
              "%d decode steps (append_token + decode_attention)\n",
              kName, kHeads, kMaxTokens, kHeadDim, kPrefixTokens, kDecodeSteps);
  bool ok = true;

  // 1. The cache against the CPU reference, per token, bit for bit.
  const kvq::KvView all{kHeads, kTokens, kHeadDim, kTokens * kHeadDim, kHeadDim};  // (heads, tokens, head_dim)
  std::vector<std::int8_t> ref_k(seq.k.size()), ref_v(seq.v.size());
  std::vector<float> ref_k_scales(kHeads * kTokens), ref_v_scales(kHeads * kTokens);  // (heads, tokens)
  example::check(kvq::reference::quantize(seq.k.data(), all, per_token, ref_k.data(), ref_k_scales.data()), "reference K");
  example::check(kvq::reference::quantize(seq.v.data(), all, per_token, ref_v.data(), ref_v_scales.data()), "reference V");
  for (int part = 0; part < 2; ++part) {
    const int t0 = part == 0 ? 0 : kPrefixTokens, t1 = part == 0 ? kPrefixTokens : kTokens;
    const Mismatches mk = compare_rows(gpu.k_codes, gpu.k_scales, ref_k, ref_k_scales, t0, t1);
    const Mismatches mv = compare_rows(gpu.v_codes, gpu.v_scales, ref_v, ref_v_scales, t0, t1);
    std::printf("  %s rows %d..%d vs kvq::reference::quantize: K %ld code / %ld scale mismatches, "
                "V %ld / %ld\n",
                part == 0 ? "prompt   (host API)     " : "appended (append_token) ", t0, t1 - 1, mk.codes, mk.scales,
                mv.codes, mv.scales);
    ok = ok && mk.codes == 0 && mk.scales == 0 && mv.codes == 0 && mv.scales == 0;
  }
  long touched = 0;  // rows past the sequence must still hold the poison
  for (int h = 0; h < kHeads; ++h)
    for (int t = kTokens; t < kMaxTokens; ++t) {
      const std::size_t row = static_cast<std::size_t>(h) * kMaxTokens + t;
      touched += kvq::float_bits(gpu.k_scales[row]) != 0xffffffffu || kvq::float_bits(gpu.v_scales[row]) != 0xffffffffu;
      for (int d = 0; d < kHeadDim; ++d)
        touched += gpu.k_codes[row * kHeadDim + d] != -128 || gpu.v_codes[row * kHeadDim + d] != -128;
    }
  std::printf("  rows %d..%d (past the sequence): %ld elements written (want 0)\n", kTokens, kMaxTokens - 1, touched);
  ok = ok && touched == 0;

  // 2 and 3. Attention against the CPU, per step and head.
  std::vector<float> k_hat(seq.k.size()), v_hat(seq.v.size());  // (heads, tokens, head_dim)
  example::check(kvq::reference::dequantize(ref_k.data(), ref_k_scales.data(), all, per_token, k_hat.data()), "dequantize K");
  example::check(kvq::reference::dequantize(ref_v.data(), ref_v_scales.data(), all, per_token, v_hat.data()), "dequantize V");
  std::vector<double> exact(kHeadDim), on_cache(kHeadDim);
  for (int step = 0; step < kDecodeSteps; ++step) {
    const int len = kPrefixTokens + step + 1;
    // Over heads and channels: largest |error|, and largest ratio of |error| to what it is checked against.
    double fp32_err = 0.0, fp32_ratio = 0.0, int8_err = 0.0, int8_sigmas = 0.0, int8_ratio = 0.0, worst_ratio = 0.0;
    double sq_err = 0.0, sq_ref = 0.0;
    bool finite = true;  // std::max would swallow a NaN: look for one explicitly
    for (int h = 0; h < kHeads; ++h) {
      const float* q = seq.q.data() + (step * kHeads + h) * kHeadDim;  // (head_dim)
      const std::size_t head = static_cast<std::size_t>(h) * kTokens * kHeadDim;
      kvq::metrics::attention(q, 1, k_hat.data() + head, v_hat.data() + head, len, kHeadDim, on_cache.data());
      kvq::metrics::attention(q, 1, seq.k.data() + head, seq.v.data() + head, len, kHeadDim, exact.data());
      const double b_fp32 = fp32_bound(q, k_hat.data() + head, v_hat.data() + head, len);
      const example::Int8Error e8 = example::int8_error(q, seq.k.data() + head, seq.v.data() + head,
                                                        ref_k_scales.data() + h * kTokens,
                                                        ref_v_scales.data() + h * kTokens, len, kHeadDim);
      const float* out = gpu.out[step].data() + h * kHeadDim;  // (head_dim)
      for (int d = 0; d < kHeadDim; ++d) {
        finite = finite && std::isfinite(out[d]);
        const double e_fp32 = std::fabs(out[d] - on_cache[d]), e_int8 = std::fabs(out[d] - exact[d]);
        fp32_err = std::max(fp32_err, e_fp32);
        fp32_ratio = std::max(fp32_ratio, e_fp32 / b_fp32);
        int8_err = std::max(int8_err, e_int8);
        int8_sigmas = std::max(int8_sigmas, e_int8 / e8.sigma[d]);
        int8_ratio = std::max(int8_ratio, e_int8 / (kSigmas * e8.sigma[d] + b_fp32));
        worst_ratio = std::max(worst_ratio, e_int8 / (e8.worst_case + b_fp32));
        sq_err += (out[d] - exact[d]) * (out[d] - exact[d]);
        sq_ref += exact[d] * exact[d];
      }
    }
    std::printf("  step %d (%d tokens): vs CPU on the int8 cache: max |err| %.1e = %.1e of the fp32 bound; "
                "vs CPU on fp16 K/V: max |err| %.1e = %.2f sigma (bound %.0f), %.3f of the worst case, "
                "relative L2 %.2f%%%s\n",
                step, len, fp32_err, fp32_ratio, int8_err, int8_sigmas, kSigmas, worst_ratio,
                100.0 * std::sqrt(sq_err / sq_ref), finite ? "" : "; NON-FINITE OUTPUT");
    ok = ok && finite && fp32_ratio <= 1.0 && int8_ratio <= 1.0 && worst_ratio <= 1.0;
  }
  return ok;
}

}  // namespace

int main() {
  if (const int code = example::gpu_unavailable_exit_code(kName)) return code;
  using example::check;

  std::mt19937 rng(4719);
  const Sequence seq = make_sequence(rng);
  const kvq::QuantSpec per_token{kvq::Granularity::kPerToken, 0};

  // The engine's cache and its per-step inputs and outputs.
  const std::size_t cache_size = static_cast<std::size_t>(kHeads) * kMaxTokens * kHeadDim;
  const std::size_t scale_size = static_cast<std::size_t>(kHeads) * kMaxTokens;
  example::DeviceArray<std::int8_t> k_codes(cache_size), v_codes(cache_size);  // (heads, max_tokens, head_dim)
  example::DeviceArray<float> k_scales(scale_size), v_scales(scale_size);      // (heads, max_tokens)
  example::DeviceArray<__half> prompt_k(kHeads * kPrefixTokens * kHeadDim);    // (heads, prefix, head_dim)
  example::DeviceArray<__half> prompt_v(kHeads * kPrefixTokens * kHeadDim);    // (heads, prefix, head_dim)
  example::DeviceArray<__half> new_k(kHeads * kHeadDim), new_v(kHeads * kHeadDim);  // (heads, head_dim)
  example::DeviceArray<__half> query(kHeads * kHeadDim);                            // (heads, head_dim)
  example::DeviceArray<float> out(kHeads * kHeadDim);                               // (heads, head_dim)

  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  check(cudaMemsetAsync(k_codes.get(), kPoisonCodeByte, k_codes.bytes(), stream), "poison K codes");
  check(cudaMemsetAsync(v_codes.get(), kPoisonCodeByte, v_codes.bytes(), stream), "poison V codes");
  check(cudaMemsetAsync(k_scales.get(), kPoisonScaleByte, k_scales.bytes(), stream), "poison K scales");
  check(cudaMemsetAsync(v_scales.get(), kPoisonScaleByte, v_scales.bytes(), stream), "poison V scales");

  // Prefill through the host API. kvq's scales are contiguous per call, so one call per head
  // writes its codes into the head's rows and its scales into the head's row of the scale array.
  const std::vector<__half> prompt_k_host = token_rows(seq.k, 0, kPrefixTokens);
  const std::vector<__half> prompt_v_host = token_rows(seq.v, 0, kPrefixTokens);
  check(cudaMemcpyAsync(prompt_k.get(), prompt_k_host.data(), prompt_k.bytes(), cudaMemcpyHostToDevice, stream),
        "upload prompt K");
  check(cudaMemcpyAsync(prompt_v.get(), prompt_v_host.data(), prompt_v.bytes(), cudaMemcpyHostToDevice, stream),
        "upload prompt V");
  const kvq::KvView prompt_head = kvq::contiguous_view(kPrefixTokens, kHeadDim);
  for (int h = 0; h < kHeads; ++h) {
    const std::int64_t in = static_cast<std::int64_t>(h) * kPrefixTokens * kHeadDim;
    const std::int64_t row = static_cast<std::int64_t>(h) * kMaxTokens;  // (h, token 0) of the cache
    check(kvq::quantize(prompt_k.get() + in, prompt_head, per_token, k_codes.get() + row * kHeadDim,
                        k_scales.get() + row, stream),
          "kvq::quantize prompt K");
    check(kvq::quantize(prompt_v.get() + in, prompt_head, per_token, v_codes.get() + row * kHeadDim,
                        v_scales.get() + row, stream),
          "kvq::quantize prompt V");
  }

  // Decode: append the step's token, then attend over everything so far (the new token included).
  std::vector<std::vector<__half>> new_k_host(kDecodeSteps), new_v_host(kDecodeSteps), query_host(kDecodeSteps);
  std::vector<std::vector<float>> gpu_out(kDecodeSteps, std::vector<float>(kHeads * kHeadDim));  // (heads, head_dim)
  for (int step = 0; step < kDecodeSteps; ++step) {
    const int pos = kPrefixTokens + step, len = pos + 1;
    new_k_host[step] = token_rows(seq.k, pos, pos + 1);
    new_v_host[step] = token_rows(seq.v, pos, pos + 1);
    for (int i = 0; i < kHeads * kHeadDim; ++i)
      query_host[step].push_back(kvq::from_float<__half>(seq.q[step * kHeads * kHeadDim + i]));
    check(cudaMemcpyAsync(new_k.get(), new_k_host[step].data(), new_k.bytes(), cudaMemcpyHostToDevice, stream),
          "upload new K");
    check(cudaMemcpyAsync(new_v.get(), new_v_host[step].data(), new_v.bytes(), cudaMemcpyHostToDevice, stream),
          "upload new V");
    check(cudaMemcpyAsync(query.get(), query_host[step].data(), query.bytes(), cudaMemcpyHostToDevice, stream),
          "upload query");

    const unsigned append_blocks = (kHeads + kAppendWarps - 1) / kAppendWarps;
    append_token<<<append_blocks, kAppendWarps * kWarpSize, 0, stream>>>(
        new_k.get(), new_v.get(), kHeads, kHeadDim, kMaxTokens, pos, k_codes.get(), k_scales.get(), v_codes.get(),
        v_scales.get());
    check(cudaGetLastError(), "append_token launch");
    decode_attention<kHeadDim><<<kHeads, kAttentionThreads, len * sizeof(float), stream>>>(
        query.get(), k_codes.get(), k_scales.get(), v_codes.get(), v_scales.get(), kMaxTokens, len, out.get());
    check(cudaGetLastError(), "decode_attention launch");
    check(cudaMemcpyAsync(gpu_out[step].data(), out.get(), out.bytes(), cudaMemcpyDeviceToHost, stream),
          "download attention output");
  }

  GpuResults gpu{std::vector<std::int8_t>(cache_size), std::vector<std::int8_t>(cache_size),
                 std::vector<float>(scale_size), std::vector<float>(scale_size), std::move(gpu_out)};
  check(cudaMemcpyAsync(gpu.k_codes.data(), k_codes.get(), k_codes.bytes(), cudaMemcpyDeviceToHost, stream),
        "download K");
  check(cudaMemcpyAsync(gpu.v_codes.data(), v_codes.get(), v_codes.bytes(), cudaMemcpyDeviceToHost, stream),
        "download V");
  check(cudaMemcpyAsync(gpu.k_scales.data(), k_scales.get(), k_scales.bytes(), cudaMemcpyDeviceToHost, stream),
        "download K scales");
  check(cudaMemcpyAsync(gpu.v_scales.data(), v_scales.get(), v_scales.bytes(), cudaMemcpyDeviceToHost, stream),
        "download V scales");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");

  const bool ok = check_results(seq, gpu);
  std::printf("%s: %s\n", kName, ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
