// examples/engine_kernel.cu: one attention layer of an engine on kvq's library API.
//
// Four sequences of different prompt lengths share the layer's paged int8 cache: pages of 16
// tokens (NHD, kPerTokenHead: one fp32 scale per (token, head) for K and for V), handed out from
// a shuffled free list as an engine's block manager hands them out; 32 query / 8 KV heads, head
// dim 128, fp16.
//   - Prefill: every prompt's K and V in one kvq::append_kv call (vLLM's slot mapping).
//   - Decode, each step: one new token a sequence (one append_kv call), then kvq::decode_attention
//     of each sequence's query over its cache, with the plan and workspace made once from static
//     limits (the call could be captured in a CUDA graph and replayed every step).
// Checks (the example exits non-zero if one fails):
//   1. after the prefill and after every step, the cache (codes, scales, and the bytes of pages
//      nobody owns) equals kvq::reference::append_kv's on a host twin, bit for bit;
//   2. every step's output equals kvq::reference::decode_attention over the same cache within the
//      bound tests/gpu_attention_test.cu states (fp32 accumulation; 2 ulp of fp16 at the output,
//      plus 1e-5 of the largest |v| for outputs near 0);
//   3. it agrees with attention in double over the fp16 K and V before quantization, within the
//      error int8 rounding causes (example::int8_error: 6 standard deviations of it, never more
//      than its worst case), plus that bound of check 2.
#include <kvq/kvq.cuh>

#include "attention_error.hpp"
#include "example_support.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr const char* kName = "engine_kernel";

constexpr int kSeqs = 4;
constexpr int kPrompt[kSeqs] = {300, 77, 513, 1};
constexpr int kDecodeSteps = 4;
constexpr int kKvHeads = 8, kQHeads = 32, kHeadDim = 128, kPageSize = 16;
constexpr int kMaxLen = *std::max_element(kPrompt, kPrompt + kSeqs) + kDecodeSteps;  // the static limit
constexpr int kMaxPagesPerSeq = (kMaxLen + kPageSize - 1) / kPageSize;
constexpr int kPages = kSeqs * kMaxPagesPerSeq + 8;                // a few never handed out
constexpr std::int64_t kRow = std::int64_t{kKvHeads} * kHeadDim;   // one token, all heads
constexpr double kSigmas = 6.0;  // check 3, as examples/device_blocks.cu argues for it
constexpr double kHalfEps = 1.0 / 2048;  // fp16's unit roundoff

// Poison in both twins before anything is written: kvq never writes the code -128 nor a NaN scale.
constexpr unsigned char kPoisonCodeByte = 0x80, kPoisonScaleByte = 0xff;

/// One layer's cache in one allocation: K codes, V codes ([pages, page, heads, dim] int8), K
/// scales, V scales ([pages, page, heads] fp32). `base` is device or host memory alike.
struct CacheBytes {
  static constexpr std::size_t kCodes = std::size_t{kPages} * kPageSize * kRow;
  static constexpr std::size_t kScales = std::size_t{kPages} * kPageSize * kKvHeads * sizeof(float);
  static constexpr std::size_t kTotal = 2 * kCodes + 2 * kScales;
  static kvq::PagedCache cache(unsigned char* base) {
    kvq::PagedCache c;
    c.num_pages = kPages;
    c.page_size = kPageSize;
    c.kv_heads = kKvHeads;
    c.head_dim = kHeadDim;
    c.k_codes = reinterpret_cast<std::int8_t*>(base);
    c.v_codes = reinterpret_cast<std::int8_t*>(base + kCodes);
    c.k_strides = c.v_strides = kvq::nhd_strides(kPageSize, kKvHeads, kHeadDim);
    c.k_scales = reinterpret_cast<float*>(base + 2 * kCodes);
    c.v_scales = reinterpret_cast<float*>(base + 2 * kCodes + kScales);
    return c;
  }
};

/// The engine's bookkeeping: each sequence's pages (the block table) and length.
struct Sequences {
  std::vector<std::int32_t> table = std::vector<std::int32_t>(kSeqs * kMaxPagesPerSeq, -1);
  std::vector<std::int32_t> lens = std::vector<std::int32_t>(kSeqs, 0);
  std::vector<std::int32_t> free_pages;

  /// The slot of sequence b's next token, taking a page from the free list when it needs one.
  std::int64_t next_slot(int b) {
    const int t = lens[b]++;
    std::int32_t& page = table[b * kMaxPagesPerSeq + t / kPageSize];
    if (t % kPageSize == 0) {
      page = free_pages.back();
      free_pages.pop_back();
    }
    return std::int64_t{page} * kPageSize + t % kPageSize;
  }
};

/// Every token the model produces, per sequence: K and V rows [tokens, heads, dim] in fp16, and
/// the query of each decode step [steps, q_heads, dim].
struct Tokens {
  std::vector<std::vector<__half>> k, v, q;
};

Tokens make_tokens(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::lognormal_distribution<float> magnitude(0.0f, 0.3f);  // per-token and per-channel spread
  Tokens x;
  for (int b = 0; b < kSeqs; ++b) {
    const int tokens = kPrompt[b] + kDecodeSteps;
    std::vector<float> channel_sigma(kRow);
    for (float& c : channel_sigma) c = magnitude(rng);
    x.k.emplace_back(tokens * kRow);
    x.v.emplace_back(tokens * kRow);
    for (int t = 0; t < tokens; ++t) {
      const float k_sigma = magnitude(rng), v_sigma = magnitude(rng);
      for (std::int64_t i = 0; i < kRow; ++i) {
        x.k[b][t * kRow + i] = kvq::from_float<__half>(k_sigma * channel_sigma[i] * normal(rng));
        x.v[b][t * kRow + i] = kvq::from_float<__half>(v_sigma * normal(rng));
      }
    }
    x.q.emplace_back(std::size_t{kDecodeSteps} * kQHeads * kHeadDim);
    for (__half& e : x.q[b]) e = kvq::from_float<__half>(normal(rng));
  }
  return x;
}

/// Check 1: the device cache against its host twin, byte for byte.
bool cache_matches(const example::DeviceArray<unsigned char>& device, const std::vector<unsigned char>& host,
                   const char* when) {
  std::vector<unsigned char> got(host.size());
  example::check(cudaMemcpy(got.data(), device.get(), got.size(), cudaMemcpyDeviceToHost), "download the cache");
  std::size_t diff = 0;
  for (std::size_t i = 0; i < got.size(); ++i) diff += got[i] != host[i];
  std::printf("  %-22s cache vs kvq::reference::append_kv: %zu of %zu bytes differ\n", when, diff, got.size());
  return diff == 0;
}

/// Checks 2 and 3 for one decode step: `got` and `want` are [seqs, q_heads, dim] (GPU and
/// reference), over the host twin `hc` of the cache.
bool attention_matches(const Tokens& x, const Sequences& s, const kvq::PagedCache& hc, int step,
                       const std::vector<__half>& got, const std::vector<__half>& want) {
  constexpr int kGroup = kQHeads / kKvHeads;
  double worst_2 = 0.0, worst_3 = 0.0, sigmas = 0.0;
  bool finite = true;
  std::vector<__half> k, v;
  std::vector<float> ks, vs, q(kHeadDim);
  std::vector<double> exact(kHeadDim);
  for (int b = 0; b < kSeqs; ++b) {
    const int len = s.lens[b];
    for (int h = 0; h < kKvHeads; ++h) {
      // KV head h of sequence b before quantization, and its scales in the cache.
      k.assign(std::size_t(len) * kHeadDim, __half{});
      v.assign(std::size_t(len) * kHeadDim, __half{});
      ks.assign(len, 0.0f);
      vs.assign(len, 0.0f);
      double max_v = 0.0;
      for (int t = 0; t < len; ++t) {
        std::copy_n(x.k[b].begin() + t * kRow + h * kHeadDim, kHeadDim, k.begin() + t * kHeadDim);
        std::copy_n(x.v[b].begin() + t * kRow + h * kHeadDim, kHeadDim, v.begin() + t * kHeadDim);
        const std::int64_t slot = std::int64_t{s.table[b * kMaxPagesPerSeq + t / kPageSize]} * kPageSize + t % kPageSize;
        ks[t] = hc.k_scales[hc.scale_offset(slot, h)];
        vs[t] = hc.v_scales[hc.scale_offset(slot, h)];
        for (int d = 0; d < kHeadDim; ++d)
          max_v = std::max(max_v, std::fabs(double(kvq::to_float(v[t * kHeadDim + d]))) + vs[t] / 2);
      }
      for (int g = 0; g < kGroup; ++g) {
        const int qh = h * kGroup + g;
        for (int d = 0; d < kHeadDim; ++d) q[d] = kvq::to_float(x.q[b][(step * kQHeads + qh) * kHeadDim + d]);
        kvq::metrics::attention(q.data(), 1, k.data(), v.data(), len, kHeadDim, exact.data());
        const example::Int8Error e8 = example::int8_error(q.data(), k.data(), v.data(), ks.data(), vs.data(), len,
                                                          kHeadDim);
        for (int d = 0; d < kHeadDim; ++d) {
          const std::size_t i = (std::size_t(b) * kQHeads + qh) * kHeadDim + d;
          const double g_out = kvq::to_float(got[i]), w_out = kvq::to_float(want[i]);
          finite = finite && std::isfinite(g_out);
          const double bound_2 = 2 * kHalfEps * std::fabs(w_out) + 1e-5 * max_v;
          const double e2 = std::fabs(g_out - w_out), e3 = std::fabs(g_out - exact[d]);
          worst_2 = std::max(worst_2, e2 / bound_2);
          worst_3 = std::max(worst_3, e3 / (std::min(kSigmas * e8.sigma[d], e8.worst_case) + bound_2));
          sigmas = std::max(sigmas, e3 / e8.sigma[d]);
        }
      }
    }
  }
  std::printf("  step %d: vs kvq::reference::decode_attention %.2f of the bound; vs attention on fp16 K/V "
              "%.2f sigma, %.2f of the bound%s\n",
              step, worst_2, sigmas, worst_3, finite ? "" : "; NON-FINITE OUTPUT");
  return finite && worst_2 <= 1.0 && worst_3 <= 1.0;
}

}  // namespace

int main() {
  if (const int code = example::gpu_unavailable_exit_code(kName)) return code;
  using example::check;
  std::mt19937 rng(4719);
  const Tokens x = make_tokens(rng);
  Sequences seqs;
  for (int p = 0; p < kPages; ++p) seqs.free_pages.push_back(p);
  std::shuffle(seqs.free_pages.begin(), seqs.free_pages.end(), rng);

  // The cache, and its host twin that kvq::reference writes.
  example::DeviceArray<unsigned char> cache_bytes(CacheBytes::kTotal);
  std::vector<unsigned char> host_bytes(CacheBytes::kTotal);
  std::memset(host_bytes.data(), kPoisonCodeByte, 2 * CacheBytes::kCodes);
  std::memset(host_bytes.data() + 2 * CacheBytes::kCodes, kPoisonScaleByte, 2 * CacheBytes::kScales);
  check(cudaMemcpy(cache_bytes.get(), host_bytes.data(), host_bytes.size(), cudaMemcpyHostToDevice), "poison");
  const kvq::PagedCache cache = CacheBytes::cache(cache_bytes.get()), host = CacheBytes::cache(host_bytes.data());

  // Once: the decode plan from static limits, its workspace, the error counter.
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count");
  const kvq::DecodePlan plan = kvq::make_decode_plan({kSeqs, kQHeads, kKvHeads, kHeadDim, kMaxLen}, sms);
  example::DeviceArray<unsigned char> workspace(kvq::decode_workspace_bytes(plan));
  example::DeviceArray<unsigned long long> errors(1);
  check(cudaMemset(errors.get(), 0, errors.bytes()), "zero the error counter");
  std::printf("%s: %d sequences (prompts of %d, %d, %d, %d tokens), %d decode steps; paged int8 cache of %d pages "
              "of %d tokens, %d KV heads of %d, fp16; decode plan: %lld splits of %lld tokens\n",
              kName, kSeqs, kPrompt[0], kPrompt[1], kPrompt[2], kPrompt[3], kDecodeSteps, kPages, kPageSize, kKvHeads,
              kHeadDim, static_cast<long long>(plan.splits), static_cast<long long>(plan.split_tokens));

  // append_kv of `rows` ([tokens, heads, dim], fp16) to the given slots, on the GPU and on the twin.
  auto append = [&](const std::vector<__half>& k, const std::vector<__half>& v, const std::vector<std::int64_t>& slots) {
    const kvq::TokenRows rows = kvq::dense_rows(static_cast<std::int64_t>(slots.size()), kKvHeads, kHeadDim);
    example::DeviceArray<__half> dk(k.size()), dv(v.size());
    example::DeviceArray<std::int64_t> ds(slots.size());
    check(cudaMemcpy(dk.get(), k.data(), dk.bytes(), cudaMemcpyHostToDevice), "upload K");
    check(cudaMemcpy(dv.get(), v.data(), dv.bytes(), cudaMemcpyHostToDevice), "upload V");
    check(cudaMemcpy(ds.get(), slots.data(), ds.bytes(), cudaMemcpyHostToDevice), "upload slots");
    check(kvq::append_kv(dk.get(), dv.get(), rows, ds.get(), cache, errors.get()), "kvq::append_kv");
    check(kvq::reference::append_kv(k.data(), v.data(), rows, slots.data(), host), "kvq::reference::append_kv");
  };

  // Prefill: all prompts in one call, sequence after sequence.
  bool ok = true;
  {
    std::vector<__half> k, v;
    std::vector<std::int64_t> slots;
    for (int b = 0; b < kSeqs; ++b) {
      k.insert(k.end(), x.k[b].begin(), x.k[b].begin() + kPrompt[b] * kRow);
      v.insert(v.end(), x.v[b].begin(), x.v[b].begin() + kPrompt[b] * kRow);
      for (int t = 0; t < kPrompt[b]; ++t) slots.push_back(seqs.next_slot(b));
    }
    append(k, v, slots);
    ok &= cache_matches(cache_bytes, host_bytes, "after the prefill:");
  }

  example::DeviceArray<__half> q(std::size_t{kSeqs} * kQHeads * kHeadDim), out(q.size());
  example::DeviceArray<std::int32_t> table(seqs.table.size()), lens(kSeqs);
  const kvq::QueryRows rows = kvq::dense_queries(kSeqs, kQHeads, kHeadDim);
  const kvq::SequenceTable device_seqs{kSeqs, kMaxPagesPerSeq, table.get(), lens.get()};
  for (int step = 0; step < kDecodeSteps; ++step) {
    // One new token a sequence.
    std::vector<__half> k, v, query;
    std::vector<std::int64_t> slots;
    for (int b = 0; b < kSeqs; ++b) {
      const int t = seqs.lens[b];
      k.insert(k.end(), x.k[b].begin() + t * kRow, x.k[b].begin() + (t + 1) * kRow);
      v.insert(v.end(), x.v[b].begin() + t * kRow, x.v[b].begin() + (t + 1) * kRow);
      slots.push_back(seqs.next_slot(b));
      query.insert(query.end(), x.q[b].begin() + step * kQHeads * kHeadDim,
                   x.q[b].begin() + (step + 1) * kQHeads * kHeadDim);
    }
    append(k, v, slots);
    char when[32];
    std::snprintf(when, sizeof(when), "after decode step %d:", step);
    ok &= cache_matches(cache_bytes, host_bytes, when);

    // Attention of each sequence's query over its cache, the new token included.
    check(cudaMemcpy(table.get(), seqs.table.data(), table.bytes(), cudaMemcpyHostToDevice), "upload the block table");
    check(cudaMemcpy(lens.get(), seqs.lens.data(), lens.bytes(), cudaMemcpyHostToDevice), "upload the lengths");
    check(cudaMemcpy(q.get(), query.data(), q.bytes(), cudaMemcpyHostToDevice), "upload the queries");
    const float sm_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    check(kvq::decode_attention(q.get(), rows, cache, device_seqs, sm_scale, out.get(), rows, nullptr, plan,
                                workspace.get(), workspace.bytes(), errors.get()),
          "kvq::decode_attention");
    std::vector<__half> got(out.size()), want(out.size());
    check(cudaMemcpy(got.data(), out.get(), out.bytes(), cudaMemcpyDeviceToHost), "download the output");
    const kvq::SequenceTable host_seqs{kSeqs, kMaxPagesPerSeq, seqs.table.data(), seqs.lens.data()};
    check(kvq::reference::decode_attention(query.data(), rows, host, host_seqs, sm_scale, want.data(), rows),
          "kvq::reference::decode_attention");
    ok &= attention_matches(x, seqs, host, step, got, want);
  }
  unsigned long long skipped = 0;
  check(cudaMemcpy(&skipped, errors.get(), sizeof(skipped), cudaMemcpyDeviceToHost), "download the error counter");
  std::printf("  skipped and counted by kvq (want 0): %llu\n", skipped);
  ok &= skipped == 0;
  std::printf("%s: %s\n", kName, ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}
