// bench/paged_ops.cu: the paged cache's benchmark operands and their check (see paged_ops.hpp).
#include "paged_ops.hpp"

#include "random.hpp"

#include <kvq/attention.cuh>
#include <kvq/paged.cuh>
#include <kvq/reference.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>

namespace kvq_bench {

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> cases;
  for (DType t : kDTypes) {
    for (std::int64_t s : {1, 8, 64, 256}) cases.push_back(PagedCase{t, true, s, 8, 128, 16});
    for (std::int64_t page : {16, 64}) cases.push_back(PagedCase{t, false, 32768, 8, 128, page});
  }
  for (std::int64_t s : {8, 64, 256}) cases.push_back(PagedCase{DType::kHalf, true, s, 8, 128, 16, true});
  for (std::int64_t page : {16, 64}) cases.push_back(PagedCase{DType::kHalf, false, 32768, 8, 128, page, true});
  return cases;
}

namespace {

void ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

template <class T>
std::vector<T> uniform_values(std::int64_t n, std::uint64_t seed) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) v[i] = kvq::from_float<T>(uniform_pm1(seed, static_cast<std::uint64_t>(i)));
  return v;
}

constexpr std::uint8_t kCachePoison = 0x80;  // code -128 (never written), scale -4.7e-38 (never a scale)

}  // namespace

struct PagedAppend::State {
  PagedCase c;
  kvq::PagedCache cache;
  kvq::TokenRows rows;
  void* k = nullptr;
  void* v = nullptr;
  std::int64_t* slots = nullptr;
  std::int32_t* ids = nullptr;  // kKeysPerChannelPage: sequence ids and positions
  std::int32_t* positions = nullptr;
  std::uint8_t* pool = nullptr;  // K codes, V codes, K scales, V scales (and the open-page buffer), back to back
  std::size_t pool_bytes = 0;
  std::vector<std::int64_t> host_slots;
  std::vector<std::int32_t> host_ids, host_positions;

  ~State() {
    cudaFree(k);
    cudaFree(v);
    cudaFree(slots);
    cudaFree(ids);
    cudaFree(positions);
    cudaFree(pool);
  }

  template <class T>
  cudaError_t launch(cudaStream_t s) const {
    return kvq::append_kv(static_cast<const T*>(k), static_cast<const T*>(v), rows, slots,
                          kvq::TokenPositions{ids, positions}, cache, nullptr, s);
  }

  /// Fills, runs once and checks; T is the case's dtype.
  template <class T>
  void prepare(cudaStream_t stream) {
    const std::int64_t h = c.kv_heads, d = c.head_dim, n = c.tokens;
    // The pool: twice the pages the tokens need, handed out shuffled (as a free list leaves them).
    const std::int64_t pages_needed = c.decode ? n : (n + c.page_size - 1) / c.page_size;
    const std::int64_t pages = 2 * pages_needed + 1;
    std::mt19937_64 rng(seed_of(c.name().c_str()));
    std::vector<std::int64_t> order(static_cast<std::size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    host_slots.resize(static_cast<std::size_t>(n));
    host_ids.resize(static_cast<std::size_t>(n));
    host_positions.resize(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) {
      // decode: sequence t at a position within its first page (some of them close it); prefill:
      // positions 0 to n - 1 of sequence 0.
      const std::int64_t offset = c.decode ? static_cast<std::int64_t>(rng() % c.page_size) : t % c.page_size;
      host_slots[t] = (c.decode ? order[t] : order[t / c.page_size]) * c.page_size + offset;
      host_ids[t] = c.decode ? static_cast<std::int32_t>(t) : 0;
      host_positions[t] = static_cast<std::int32_t>(c.decode ? offset : t);
    }
    cache.num_pages = pages;
    cache.page_size = c.page_size;
    cache.kv_heads = h;
    cache.head_dim = d;
    cache.k_strides = cache.v_strides = kvq::nhd_strides(c.page_size, h, d);
    const std::size_t codes = static_cast<std::size_t>(pages * c.page_size * h * d);
    const std::size_t scales = static_cast<std::size_t>(pages * c.page_size * h) * sizeof(float);
    const std::size_t k_scales = c.by_page ? static_cast<std::size_t>(pages * h * d) * sizeof(float) : scales;
    const std::int64_t seqs = c.decode ? n : 1;
    const std::size_t open_bytes = c.by_page ? static_cast<std::size_t>(seqs * c.page_size * h * d) * sizeof(T) : 0;
    pool_bytes = 2 * codes + k_scales + scales + open_bytes;
    if (c.by_page) {
      cache.scheme = kvq::PagedScheme::kKeysPerChannelPage;
      cache.open_type = kvq::element_type_of<T>();
      cache.max_seqs = seqs;
    }
    rows = kvq::dense_rows(n, h, d);
    const std::size_t in_bytes = static_cast<std::size_t>(n * h * d) * sizeof(T);
    ok(cudaMalloc(&k, in_bytes), "cudaMalloc");
    ok(cudaMalloc(&v, in_bytes), "cudaMalloc");
    ok(cudaMalloc(reinterpret_cast<void**>(&slots), static_cast<std::size_t>(n) * 8), "cudaMalloc");
    ok(cudaMalloc(reinterpret_cast<void**>(&pool), pool_bytes), "cudaMalloc");
    auto on = [&](std::uint8_t* base, kvq::PagedCache& cc) {
      cc.k_codes = reinterpret_cast<std::int8_t*>(base);
      cc.v_codes = reinterpret_cast<std::int8_t*>(base + codes);
      cc.k_scales = reinterpret_cast<float*>(base + 2 * codes);
      cc.v_scales = reinterpret_cast<float*>(base + 2 * codes + k_scales);
      cc.k_open = c.by_page ? base + 2 * codes + k_scales + scales : nullptr;
    };
    on(pool, cache);

    const std::vector<T> hk = uniform_values<T>(n * h * d, seed_of(c.name().c_str()) + 1);
    const std::vector<T> hv = uniform_values<T>(n * h * d, seed_of(c.name().c_str()) + 2);
    ok(cudaMemcpy(k, hk.data(), in_bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    ok(cudaMemcpy(v, hv.data(), in_bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    ok(cudaMemcpy(slots, host_slots.data(), static_cast<std::size_t>(n) * 8, cudaMemcpyHostToDevice), "cudaMemcpy");
    if (c.by_page) {
      ok(cudaMalloc(reinterpret_cast<void**>(&ids), static_cast<std::size_t>(n) * 4), "cudaMalloc");
      ok(cudaMalloc(reinterpret_cast<void**>(&positions), static_cast<std::size_t>(n) * 4), "cudaMalloc");
      ok(cudaMemcpy(ids, host_ids.data(), static_cast<std::size_t>(n) * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
      ok(cudaMemcpy(positions, host_positions.data(), static_cast<std::size_t>(n) * 4, cudaMemcpyHostToDevice),
         "cudaMemcpy");
    }
    ok(cudaMemset(pool, kCachePoison, pool_bytes), "cudaMemset");
    // The copies and the memset ran on the legacy stream, which a non-blocking `stream` does not
    // wait for (and neither waits for the host): without this the poison could land after the append.
    ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    ok(launch<T>(stream), "append_kv");
    ok(cudaStreamSynchronize(stream), "append_kv (the checked run)");

    std::vector<std::uint8_t> want(pool_bytes, kCachePoison), got(pool_bytes);
    kvq::PagedCache host = cache;
    on(want.data(), host);
    const kvq::TokenPositions host_tp{c.by_page ? host_ids.data() : nullptr, c.by_page ? host_positions.data() : nullptr};
    if (kvq::reference::append_kv(hk.data(), hv.data(), rows, host_slots.data(), host_tp, host) != cudaSuccess)
      throw std::runtime_error("the reference refused the case");
    ok(cudaMemcpy(got.data(), pool, pool_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
    const auto diff = std::mismatch(got.begin(), got.end(), want.begin());
    if (diff.first != got.end())
      throw std::runtime_error("WRONG RESULT: the cache differs from kvq::reference::append_kv at byte " +
                               std::to_string(diff.first - got.begin()) + " of " + std::to_string(pool_bytes));
  }
};

PagedAppend::PagedAppend(const PagedCase& c, cudaStream_t stream) : s_(new State) {
  s_->c = c;
  switch (c.dtype) {
    case DType::kFloat: s_->prepare<float>(stream); break;
    case DType::kHalf: s_->prepare<__half>(stream); break;
    case DType::kBfloat16: s_->prepare<__nv_bfloat16>(stream); break;
  }
}

PagedAppend::~PagedAppend() = default;

cudaError_t PagedAppend::launch(cudaStream_t stream) const {
  switch (s_->c.dtype) {
    case DType::kFloat: return s_->launch<float>(stream);
    case DType::kHalf: return s_->launch<__half>(stream);
    case DType::kBfloat16: return s_->launch<__nv_bfloat16>(stream);
  }
  return cudaErrorInvalidValue;
}

std::vector<DecodeCase> decode_cases() {
  return {DecodeCase{8, 32768}, DecodeCase{1, 131072}, DecodeCase{32, 1024}, DecodeCase{128, 2048},
          DecodeCase{8, 32768, 32, 8, 128, 64, true}};
}

std::vector<DecodeCase> decode_sweep_cases() {
  return {DecodeCase{8, 32768, 32, 8, 64}, DecodeCase{8, 32768, 32, 8, 80}, DecodeCase{8, 32768, 32, 8, 96},
          DecodeCase{8, 16384, 32, 8, 256}, DecodeCase{8, 32768, 8, 8, 128}, DecodeCase{8, 32768, 64, 8, 128},
          DecodeCase{8, 32768, 128, 8, 128}};
}

struct DecodeAttention::State {
  DecodeCase c;
  kvq::PagedCache cache;
  kvq::SequenceTable seqs;
  kvq::QueryRows rows;
  kvq::DecodePlan plan;
  std::uint8_t* pool = nullptr;  // K codes, V codes, K scales, V scales
  std::int32_t* table = nullptr;
  std::int32_t* lens = nullptr;
  __half* q = nullptr;
  __half* out = nullptr;
  void* workspace = nullptr;

  ~State() {
    cudaFree(pool);
    cudaFree(table);
    cudaFree(lens);
    cudaFree(q);
    cudaFree(out);
    cudaFree(workspace);
    cudaFree(cache.k_open);
  }

  cudaError_t launch(cudaStream_t s) const {
    return kvq::decode_attention(q, rows, cache, seqs, 1.0f / std::sqrt(static_cast<float>(c.head_dim)), out, rows,
                                 nullptr, plan, workspace, plan.workspace_bytes, nullptr, s);
  }

  void prepare(cudaStream_t stream) {
    const std::int64_t ps = c.page_size, h = c.kv_heads, d = c.head_dim;
    const std::int64_t pages_per_seq = (c.tokens + ps - 1) / ps, pages = c.batch * pages_per_seq;
    cache.num_pages = pages;
    cache.page_size = ps;
    cache.kv_heads = h;
    cache.head_dim = d;
    cache.k_strides = cache.v_strides = kvq::nhd_strides(ps, h, d);
    const std::size_t codes = static_cast<std::size_t>(pages * ps * h * d);
    const std::size_t v_scales = static_cast<std::size_t>(pages * ps * h) * sizeof(float);
    const std::size_t k_scales = c.by_page ? static_cast<std::size_t>(pages * h * d) * sizeof(float) : v_scales;
    if (c.by_page) {  // every page full: no open page, no sinks
      cache.scheme = kvq::PagedScheme::kKeysPerChannelPage;
      cache.max_seqs = c.batch;
      cache.open_type = kvq::ElementType::kHalf;
    }
    // Random codes and scales, made on the host (the reference reads them there too).
    std::vector<std::uint8_t> host(2 * codes + k_scales + v_scales);
    const std::uint64_t seed = seed_of(c.name().c_str());
    for (std::size_t i = 0; i < 2 * codes; ++i)
      host[i] = static_cast<std::uint8_t>(static_cast<std::int8_t>(uniform_pm1(seed, i) * 127.0f));
    float* ks = reinterpret_cast<float*>(host.data() + 2 * codes);
    float* vs = reinterpret_cast<float*>(host.data() + 2 * codes + k_scales);
    for (std::size_t i = 0; i < k_scales / 4; ++i) ks[i] = (1.0f + 0.5f * uniform_pm1(seed + 1, i)) / 127.0f;
    for (std::size_t i = 0; i < v_scales / 4; ++i) vs[i] = (1.0f + 0.5f * uniform_pm1(seed + 2, i)) / 127.0f;
    std::vector<std::int32_t> order(static_cast<std::size_t>(pages)), host_lens(c.batch, static_cast<std::int32_t>(c.tokens));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);  // the block table: shuffled pages
    const std::int64_t q_elems = c.batch * c.q_heads * d;
    std::vector<__half> host_q(static_cast<std::size_t>(q_elems));
    for (std::int64_t i = 0; i < q_elems; ++i) host_q[i] = __float2half(uniform_pm1(seed + 3, i));

    ok(cudaMalloc(reinterpret_cast<void**>(&pool), host.size()), "cudaMalloc");
    ok(cudaMemcpy(pool, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
    auto on = [&](std::uint8_t* base, kvq::PagedCache& cc) {
      cc.k_codes = reinterpret_cast<std::int8_t*>(base);
      cc.v_codes = reinterpret_cast<std::int8_t*>(base + codes);
      cc.k_scales = reinterpret_cast<float*>(base + 2 * codes);
      cc.v_scales = reinterpret_cast<float*>(base + 2 * codes + k_scales);
    };
    on(pool, cache);
    if (c.by_page) {  // an open-page buffer the full pages never read (validation wants one)
      ok(cudaMalloc(&cache.k_open, static_cast<std::size_t>(c.batch * ps * h * d) * 2), "cudaMalloc");
    }
    ok(cudaMalloc(reinterpret_cast<void**>(&table), order.size() * 4), "cudaMalloc");
    ok(cudaMemcpy(table, order.data(), order.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    ok(cudaMalloc(reinterpret_cast<void**>(&lens), host_lens.size() * 4), "cudaMalloc");
    ok(cudaMemcpy(lens, host_lens.data(), host_lens.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    ok(cudaMalloc(reinterpret_cast<void**>(&q), static_cast<std::size_t>(q_elems) * 2), "cudaMalloc");
    ok(cudaMemcpy(q, host_q.data(), static_cast<std::size_t>(q_elems) * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    ok(cudaMalloc(reinterpret_cast<void**>(&out), static_cast<std::size_t>(q_elems) * 2), "cudaMalloc");
    ok(cudaMemset(out, 0xff, static_cast<std::size_t>(q_elems) * 2), "cudaMemset");
    ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");  // before work on the non-blocking stream
    seqs = kvq::SequenceTable{c.batch, pages_per_seq, table, lens, nullptr, nullptr};
    rows = kvq::dense_queries(c.batch, c.q_heads, d);
    int sms = 0;
    ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
    plan = kvq::make_decode_plan(kvq::DecodeLimits{c.batch, c.q_heads, h, d, c.tokens}, sms);
    ok(cudaMalloc(&workspace, std::max<std::size_t>(plan.workspace_bytes, 16)), "cudaMalloc");
    ok(launch(stream), "decode_attention");
    ok(cudaStreamSynchronize(stream), "decode_attention (the checked run)");

    // Sequences 0 and batch - 1 against the reference (float64), within 2 fp16 ulps + 1e-4.
    std::vector<__half> got(static_cast<std::size_t>(q_elems));
    ok(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy");
    kvq::PagedCache hc = cache;
    on(host.data(), hc);
    std::vector<std::uint8_t> host_open(c.by_page ? static_cast<std::size_t>(c.batch * ps * h * d) * 2 : 0);
    hc.k_open = c.by_page ? host_open.data() : nullptr;
    std::vector<std::int64_t> checked = {0};
    if (c.batch > 1) checked.push_back(c.batch - 1);
    for (std::int64_t b : checked) {
      const kvq::SequenceTable one{1, pages_per_seq, order.data() + b * pages_per_seq, host_lens.data() + b, nullptr, nullptr};
      std::vector<__half> want(static_cast<std::size_t>(c.q_heads * d));
      if (kvq::reference::decode_attention(host_q.data() + b * c.q_heads * d, kvq::dense_queries(1, c.q_heads, d), hc,
                                           one, 1.0f / std::sqrt(static_cast<float>(d)), want.data(),
                                           kvq::dense_queries(1, c.q_heads, d)) != cudaSuccess)
        throw std::runtime_error("the reference refused the case");
      for (std::size_t i = 0; i < want.size(); ++i) {
        const float w = __half2float(want[i]), g = __half2float(got[b * c.q_heads * d + i]);
        if (!(std::fabs(g - w) <= std::fabs(w) * 0x1p-10f + 1e-4f))
          throw std::runtime_error("WRONG RESULT: sequence " + std::to_string(b) + " element " + std::to_string(i) +
                                   ": " + std::to_string(g) + " against the reference's " + std::to_string(w));
      }
    }
  }
};

DecodeAttention::DecodeAttention(const DecodeCase& c, cudaStream_t stream) : s_(new State) {
  s_->c = c;
  s_->prepare(stream);
}

DecodeAttention::~DecodeAttention() = default;

cudaError_t DecodeAttention::launch(cudaStream_t stream) const { return s_->launch(stream); }

}  // namespace kvq_bench
