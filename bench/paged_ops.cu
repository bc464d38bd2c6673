// bench/paged_ops.cu: the paged cache's benchmark operands and their check (see paged_ops.hpp).
#include "paged_ops.hpp"

#include "random.hpp"

#include <kvq/paged.cuh>
#include <kvq/reference.hpp>

#include <algorithm>
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

}  // namespace kvq_bench
