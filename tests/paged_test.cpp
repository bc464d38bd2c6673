// The paged cache on the CPU: kvq::reference::append_kv and gather_kv against the dense reference
// (every written (token, head) row equals kvq::reference::quantize per token on that row, every
// gathered row kvq::reference::dequantize of those codes, every other byte untouched), over every
// pool layout, page sizes 1-128, head dims 64-256 and the three dtypes; untrusted slots and tables
// skipped and counted; and the validation of caches and arguments (error codes, nothing touched).
#include "paged_cases.hpp"

#include <kvq/paged.hpp>
#include <kvq/reference.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kvq;
using namespace kvq::test;

template <class T>
std::vector<T> random_rows(std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<T> v(n);
  for (std::int64_t i = 0; i < n; ++i) {
    float x = u(rng) * (i % 64 == 5 ? 20.0f : 1.0f);
    if (rng() % 997 == 0) x = (rng() % 2) ? NAN : INFINITY;  // NaN / Inf: code 0 / saturated, not in the amax
    v[i] = from_float<T>(x);
  }
  return v;
}

/// The bytes a cache must hold after `slots[t]` received token t (dense rows [tokens, heads, dim]),
/// built from the dense reference: poison everywhere else.
template <class T>
std::vector<std::uint8_t> expected_cache(const CacheLayout& L, const std::vector<T>& k, const std::vector<T>& v,
                                         const std::vector<std::int64_t>& slots, std::vector<std::uint8_t> bytes) {
  const std::int64_t tokens = static_cast<std::int64_t>(slots.size()), rows = tokens * L.kv_heads;
  const KvView dense{1, rows, L.head_dim, rows * L.head_dim, L.head_dim};
  const QuantSpec per_token{Granularity::kPerToken, 0};
  std::vector<std::int8_t> qk(rows * L.head_dim), qv(rows * L.head_dim);
  std::vector<float> sk(rows), sv(rows);
  EXPECT_EQ(reference::quantize(k.data(), dense, per_token, qk.data(), sk.data()), cudaSuccess);
  EXPECT_EQ(reference::quantize(v.data(), dense, per_token, qv.data(), sv.data()), cudaSuccess);
  const PagedCache c = L.cache(bytes.data());
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t slot = slots[t];
    if (slot < 0 || slot >= c.slots()) continue;
    const std::int64_t page = slot / c.page_size, off = slot % c.page_size;
    for (std::int64_t h = 0; h < c.kv_heads; ++h) {
      const std::int64_t at = page * L.strides.page_stride + off * L.strides.token_stride + h * L.strides.head_stride;
      std::memcpy(c.k_codes + at, qk.data() + (t * c.kv_heads + h) * c.head_dim, c.head_dim);
      std::memcpy(c.v_codes + at, qv.data() + (t * c.kv_heads + h) * c.head_dim, c.head_dim);
      c.k_scales[c.scale_offset(slot, h)] = sk[t * c.kv_heads + h];
      c.v_scales[c.scale_offset(slot, h)] = sv[t * c.kv_heads + h];
    }
  }
  return bytes;
}

template <class T>
class PagedReference : public ::testing::Test {};
using Types = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(PagedReference, Types);

TYPED_TEST(PagedReference, AppendEqualsDenseQuantizeAndGatherEqualsDequantize) {
  using T = TypeParam;
  for (PoolLayout layout : {PoolLayout::kNhdPadded, PoolLayout::kHnd, PoolLayout::kInterleavedNhd})
    for (std::int64_t page_size : {1, 16, 64, 128})
      for (std::int64_t dim : {64, 80, 96, 128, 256}) {
        const std::int64_t heads = 2, pages = 4096 / page_size / 4 + 3;
        const CacheLayout L(pages, page_size, heads, dim, layout);
        std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
        const PagedCache cache = L.cache(bytes.data());
        Traffic traffic(5, pages, page_size, pages, page_size * 7 + dim);
        std::vector<std::int64_t> all_slots;
        std::vector<T> all_k, all_v;
        unsigned long long errors = 0, want_errors = 0;
        for (int step = 0; step < 4; ++step) {
          std::vector<std::int64_t> slots = traffic.step(step % 2 == 1, 300);
          slots.push_back(cache.slots());      // past the pool: skipped, counted
          slots.push_back(cache.slots() * 9);  // far past it
          want_errors += 2;
          const std::int64_t n = static_cast<std::int64_t>(slots.size());
          const std::vector<T> k = random_rows<T>(n * heads * dim, step * 31 + dim), v = random_rows<T>(n * heads * dim, step * 37 + dim);
          ASSERT_EQ(reference::append_kv(k.data(), v.data(), dense_rows(n, heads, dim), slots.data(), cache, &errors),
                    cudaSuccess);
          all_slots.insert(all_slots.end(), slots.begin(), slots.end());
          all_k.insert(all_k.end(), k.begin(), k.end());
          all_v.insert(all_v.end(), v.begin(), v.end());
        }
        const std::string what = L.name();
        EXPECT_EQ(errors, want_errors) << what;
        const std::vector<std::uint8_t> want =
            expected_cache(L, all_k, all_v, all_slots, std::vector<std::uint8_t>(L.bytes, kCachePoison));
        ASSERT_TRUE(want == bytes) << what << ": the cache differs from the dense reference's rows";

        // Gather every sequence back (with an output start per sequence) and compare with dequantize.
        const auto& lens = traffic.lens();
        const int batch = static_cast<int>(lens.size());
        std::vector<std::int32_t> start(batch);
        std::int64_t total = 0;
        for (int b = 0; b < batch; ++b) {
          start[b] = static_cast<std::int32_t>(total);
          total += lens[b];
        }
        const SequenceTable seqs{batch, traffic.max_pages(), traffic.table().data(), lens.data(), start.data()};
        std::vector<T> gk(total * heads * dim, from_float<T>(-7.0f)), gv = gk;
        unsigned long long gather_errors = 0;
        ASSERT_EQ(reference::gather_kv(cache, seqs, gk.data(), gv.data(), dense_rows(total, heads, dim), &gather_errors),
                  cudaSuccess);
        EXPECT_EQ(gather_errors, 0u) << what;
        // Expected: each sequence's tokens, in order, dequantized from the dense quantize of the rows.
        for (int kv = 0; kv < 2; ++kv) {
          const std::vector<T>& x = kv ? all_v : all_k;
          const std::int64_t rows = static_cast<std::int64_t>(all_slots.size()) * heads;
          const KvView dense{1, rows, dim, rows * dim, dim};
          const QuantSpec per_token{Granularity::kPerToken, 0};
          std::vector<std::int8_t> q(rows * dim);
          std::vector<float> s(rows);
          std::vector<T> y(rows * dim);
          ASSERT_EQ(reference::quantize(x.data(), dense, per_token, q.data(), s.data()), cudaSuccess);
          ASSERT_EQ(reference::dequantize(q.data(), s.data(), dense, per_token, y.data()), cudaSuccess);
          // slot -> the appended token that holds it
          std::vector<std::int64_t> token_of(cache.slots(), -1);
          for (std::size_t t = 0; t < all_slots.size(); ++t)
            if (all_slots[t] >= 0 && all_slots[t] < cache.slots()) token_of[all_slots[t]] = static_cast<std::int64_t>(t);
          const std::vector<T>& got = kv ? gv : gk;
          for (int b = 0; b < batch; ++b)
            for (std::int64_t t = 0; t < lens[b]; ++t) {
              const std::int64_t slot =
                  static_cast<std::int64_t>(traffic.table()[b * traffic.max_pages() + t / page_size]) * page_size + t % page_size;
              const std::int64_t src = token_of[slot];
              ASSERT_GE(src, 0);
              ASSERT_EQ(std::memcmp(&got[(start[b] + t) * heads * dim], &y[src * heads * dim], heads * dim * sizeof(T)), 0)
                  << what << (kv ? " V" : " K") << " sequence " << b << " token " << t;
            }
        }
      }
}

TEST(PagedReference, UntrustedTablesAreSkippedAndCounted) {
  const CacheLayout L(8, 4, 1, 64, PoolLayout::kNhdPadded);
  std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
  const PagedCache cache = L.cache(bytes.data());
  const std::vector<std::int32_t> table = {0, 1, 9, -1,   // sequence 0: a page past the pool, a negative page
                                           2, 3, 4, 5,    // sequence 1: length past its pages
                                           6, 7, 0, 0};   // sequence 2: output rows past the output
  const std::vector<std::int32_t> lens = {14, 17, 6}, start = {0, 20, 30};
  const SequenceTable seqs{3, 4, table.data(), lens.data(), start.data()};
  std::vector<float> k(32 * 64, -7.0f), v = k;
  unsigned long long errors = 0;
  ASSERT_EQ(reference::gather_kv(cache, seqs, k.data(), v.data(), dense_rows(32, 1, 64), &errors), cudaSuccess);
  // seq 0: tokens 8-13 on pages 9 and -1 (6 tokens); seq 1: skipped whole (1); seq 2: rows 32-35 (4).
  EXPECT_EQ(errors, 6u + 1u + 4u);
  for (std::int64_t row = 20; row < 30; ++row) EXPECT_EQ(k[row * 64], -7.0f) << "a skipped sequence was written";
}

// --- keys per channel per page ---

/// What a kKeysPerChannelPage cache must hold after `traffic`'s steps wrote `k` and `v` (rows of
/// heads * dim per (sequence, position)), derived from the dense reference: V rows per token, full
/// pages of keys per channel over their non-sink tokens, the open page's rows as `open_writer`
/// says who last wrote each, the sinks verbatim; poison everywhere else.
template <class T>
std::vector<std::uint8_t> expected_by_page(const CacheLayout& L, const Traffic& traffic,
                                           const std::vector<std::vector<std::vector<T>>>& k,
                                           const std::vector<std::vector<std::vector<T>>>& v,
                                           const std::vector<std::vector<std::int64_t>>& open_writer) {
  std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
  const PagedCache c = L.cache(bytes.data());
  const std::int64_t ps = c.page_size, heads = c.kv_heads, dim = c.head_dim, row = heads * dim;
  const QuantSpec per_token{Granularity::kPerToken, 0}, per_channel{Granularity::kPerChannel, 0};
  auto codes_at = [&](std::int8_t* pool, std::int64_t page, std::int64_t off, std::int64_t h) {
    return pool + page * L.strides.page_stride + off * L.strides.token_stride + h * L.strides.head_stride;
  };
  for (std::size_t s = 0; s < traffic.lens().size(); ++s) {
    const std::int64_t len = traffic.lens()[s];
    for (std::int64_t pos = 0; pos < len; ++pos) {
      const std::int64_t page = traffic.table()[s * traffic.max_pages() + pos / ps], off = pos % ps;
      for (std::int64_t h = 0; h < heads; ++h) {  // values: per token
        float scale = 0;
        EXPECT_EQ(reference::quantize(v[s][pos].data() + h * dim, contiguous_view(1, dim), per_token,
                                      codes_at(c.v_codes, page, off, h), &scale), cudaSuccess);
        c.v_scales[c.scale_offset(page * ps + off, h)] = scale;
      }
      if (pos < c.sink_tokens)
        for (std::int64_t i = 0; i < row; ++i) {
          static_cast<T*>(c.k_sink)[c.sink_offset(s, pos, 0, 0) + i] = k[s][pos][i];
          static_cast<T*>(c.v_sink)[c.sink_offset(s, pos, 0, 0) + i] = v[s][pos][i];
        }
    }
    for (std::int64_t p = 0; (p + 1) * ps <= len; ++p) {  // full pages of keys: per channel
      const std::int64_t page = traffic.table()[s * traffic.max_pages() + p];
      const std::int64_t first = std::max(p * ps, c.sink_tokens), end = (p + 1) * ps;
      std::vector<T> x;  // the page's non-sink rows, [rows, heads, dim]
      for (std::int64_t q = first; q < end; ++q) x.insert(x.end(), k[s][q].begin(), k[s][q].end());
      std::vector<float> scales(heads * dim, 1.0f);  // no token: amax 0, scale 1
      std::vector<std::int8_t> ignored(x.size());
      const std::int64_t rows = end - first;
      if (rows > 0) {
        EXPECT_EQ(reference::quantize(x.data(), KvView{heads, rows, dim, dim, row}, per_channel, ignored.data(),
                                      scales.data()), cudaSuccess);
      }
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t ch = 0; ch < dim; ++ch) {
          const float sc = scales[h * dim + ch];
          c.k_scales[c.channel_scale_offset(page, h, ch)] = sc;
          for (std::int64_t q = p * ps; q < end; ++q)
            codes_at(c.k_codes, page, q % ps, h)[ch] = quantize_value(to_float(k[s][q][h * dim + ch]), sc);
        }
    }
    for (std::int64_t r = 0; r < ps; ++r)  // the open-page buffer
      if (open_writer[s][r] >= 0)
        for (std::int64_t i = 0; i < row; ++i) static_cast<T*>(c.k_open)[c.open_offset(s, r, 0, 0) + i] = k[s][open_writer[s][r]][i];
  }
  return bytes;
}

template <class T>
class PagedReferenceByPage : public ::testing::Test {};
TYPED_TEST_SUITE(PagedReferenceByPage, Types);

TYPED_TEST(PagedReferenceByPage, FullPagesEqualDensePerChannelQuantizeAndTheOpenPageIsKeptExact) {
  using T = TypeParam;
  for (PoolLayout layout : {PoolLayout::kNhdPadded, PoolLayout::kHnd, PoolLayout::kInterleavedNhd})
    for (std::int64_t page_size : {1, 16, 64})
      for (std::int64_t dim : {64, 80})
        for (std::int64_t sinks : {0, 1, 4}) {
          constexpr int kSeqs = 5;
          const std::int64_t heads = 2, pages = 2048 / page_size + 3;
          const CacheLayout L(pages, page_size, heads, dim, layout, ByPage{kSeqs, sinks, element_type_of<T>()});
          std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
          const PagedCache cache = L.cache(bytes.data());
          ASSERT_EQ(validate_cache(cache), cudaSuccess) << L.name();
          Traffic traffic(kSeqs, pages, page_size, pages / kSeqs, page_size * 5 + dim + sinks);
          std::vector<std::vector<std::vector<T>>> hk(kSeqs), hv(kSeqs);  // [seq][pos] -> heads * dim
          std::vector<std::vector<std::int64_t>> open_writer(kSeqs, std::vector<std::int64_t>(page_size, -1));
          unsigned long long errors = 0, want_errors = 0;
          int straddles = 0;
          for (int step = 0; step < 6; ++step) {
            std::vector<std::int32_t> lens_before = traffic.lens();
            // Chunks up to 3 pages and a bit: a chunk then closes a partial page, fills pages and
            // leaves a new one open in one call.
            std::vector<std::int64_t> slots = traffic.step(step % 3 == 2, 3 * page_size + 5);
            std::vector<std::int32_t> ids = traffic.seq_ids(), pos = traffic.positions();
            // Untrusted: an id past max_seqs, a negative position, a slot whose offset is not the position's.
            slots.push_back(0), ids.push_back(kSeqs), pos.push_back(0);
            slots.push_back(0), ids.push_back(0), pos.push_back(-3);
            if (page_size > 1) slots.push_back(1), ids.push_back(1), pos.push_back(0);
            want_errors += page_size > 1 ? 3 : 2;
            const std::int64_t n = static_cast<std::int64_t>(slots.size());
            const std::vector<T> k = random_rows<T>(n * heads * dim, step * 31 + dim + sinks);
            const std::vector<T> v = random_rows<T>(n * heads * dim, step * 37 + dim + sinks);
            ASSERT_EQ(reference::append_kv(k.data(), v.data(), dense_rows(n, heads, dim), slots.data(),
                                           TokenPositions{ids.data(), pos.data()}, cache, &errors),
                      cudaSuccess);
            for (std::int64_t t = 0; t < n; ++t) {  // the history the expected cache is built from
              if (slots[t] < 0 || ids[t] >= kSeqs || pos[t] < 0 || slots[t] % page_size != pos[t] % page_size) continue;
              auto& sk = hk[ids[t]];
              auto& sv = hv[ids[t]];
              ASSERT_EQ(static_cast<std::int64_t>(sk.size()), pos[t]);
              sk.emplace_back(k.begin() + t * heads * dim, k.begin() + (t + 1) * heads * dim);
              sv.emplace_back(v.begin() + t * heads * dim, v.begin() + (t + 1) * heads * dim);
            }
            for (int s = 0; s < kSeqs; ++s) {  // the open page after the step: its new rows were written
              const std::int64_t len = traffic.lens()[s], open_start = len / page_size * page_size;
              const std::int64_t p0 = lens_before[s], last = len - 1;  // this step's positions [p0, last]
              // The case the GPU must order: a page half-filled before the call closes in it while
              // the call leaves a later page open, whose rows overwrite the open buffer's.
              straddles += len > p0 && p0 % page_size != 0 && last / page_size > p0 / page_size && len % page_size != 0;
              if (len % page_size == 0) continue;
              for (std::int64_t p = std::max<std::int64_t>(open_start, lens_before[s]); p < len; ++p)
                open_writer[s][p % page_size] = p;
            }
          }
          const std::string what = L.name();
          EXPECT_EQ(errors, want_errors) << what;
          if (page_size > 1) {
            EXPECT_GT(straddles, 0) << what << ": the traffic never closed a half-filled page while opening another";
          }
          const std::vector<std::uint8_t> want = expected_by_page<T>(L, traffic, hk, hv, open_writer);
          const auto diff = std::mismatch(bytes.begin(), bytes.end(), want.begin());
          ASSERT_TRUE(diff.first == bytes.end())
              << what << ": differs at byte " << (diff.first - bytes.begin()) << " (V scales at " << L.v_scales
              << ", open buffer at " << L.k_open << ", sinks at " << L.k_sink << ", end " << L.bytes << ")";

          // gather: sinks and the open page exact, full pages of keys under their channel scales.
          const auto& lens = traffic.lens();
          std::vector<std::int32_t> start(kSeqs);
          std::int64_t total = 0;
          for (int b = 0; b < kSeqs; ++b) {
            start[b] = static_cast<std::int32_t>(total);
            total += lens[b];
          }
          const SequenceTable seqs{kSeqs, traffic.max_pages(), traffic.table().data(), lens.data(), start.data(), nullptr};
          std::vector<T> gk(std::max<std::int64_t>(total, 1) * heads * dim), gv = gk;
          ASSERT_EQ(reference::gather_kv(cache, seqs, gk.data(), gv.data(), dense_rows(total, heads, dim)), cudaSuccess);
          for (int b = 0; b < kSeqs; ++b)
            for (std::int64_t t = 0; t < lens[b]; ++t) {
              const T* got_k = &gk[(start[b] + t) * heads * dim];
              const T* got_v = &gv[(start[b] + t) * heads * dim];
              const bool exact_k = t < sinks || t >= lens[b] / page_size * page_size;
              if (exact_k) {
                ASSERT_EQ(std::memcmp(got_k, hk[b][t].data(), heads * dim * sizeof(T)), 0) << what << " K " << t;
              }
              if (t < sinks) {
                ASSERT_EQ(std::memcmp(got_v, hv[b][t].data(), heads * dim * sizeof(T)), 0) << what << " V " << t;
              }
              if (!exact_k) {  // within half a scale of the key: dequantized per channel
                const std::int64_t page = traffic.table()[b * traffic.max_pages() + t / page_size];
                for (std::int64_t i = 0; i < heads * dim; ++i) {
                  const float x = to_float(hk[b][t][i]);
                  if (!is_finite(x)) continue;
                  const float sc = cache.k_scales[cache.channel_scale_offset(page, i / dim, i % dim)];
                  ASSERT_LE(std::fabs(to_float(got_k[i]) - x), 0.5f * sc * 1.01f + std::fabs(x) * 0.01f) << what;
                }
              }
            }
        }
}

// A run broken inside a call (a skipped token): its open rows are not kept, since another row of
// the sequence follows it; the run after the break keeps its page's rows.
TEST(PagedReferenceByPage, AnOpenRunFollowedByItsSequenceIsNotKept) {
  using T = __half;
  const std::int64_t page_size = 4, heads = 2, dim = 64;
  const CacheLayout L(8, page_size, heads, dim, PoolLayout::kHnd, ByPage{2, 0, ElementType::kHalf});
  std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
  const PagedCache cache = L.cache(bytes.data());
  const std::vector<T> k = random_rows<T>(5 * heads * dim, 7), v = random_rows<T>(5 * heads * dim, 8);
  // Sequence 0: positions 2, 3 (its slot past the pool: skipped), 4, 5 on pages 3 and 5; sequence 1's 0.
  const std::vector<std::int64_t> slots = {3 * 4 + 2, 8 * 4 + 3, 5 * 4 + 0, 5 * 4 + 1, 6 * 4 + 0};
  const std::vector<std::int32_t> ids = {0, 0, 0, 0, 1}, pos = {2, 3, 4, 5, 0};
  unsigned long long errors = 0;
  ASSERT_EQ(reference::append_kv(k.data(), v.data(), dense_rows(5, heads, dim), slots.data(),
                                 TokenPositions{ids.data(), pos.data()}, cache, &errors),
            cudaSuccess);
  EXPECT_EQ(errors, 1u);
  const T* open = static_cast<const T*>(cache.k_open);
  auto open_row_is = [&](std::int64_t seq, std::int64_t offset, std::int64_t row) {
    for (std::int64_t h = 0; h < heads; ++h)
      if (std::memcmp(open + cache.open_offset(seq, offset, h, 0), &k[(row * heads + h) * dim], dim * sizeof(T)) != 0)
        return false;
    return true;
  };
  auto open_row_untouched = [&](std::int64_t seq, std::int64_t offset) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const auto* p = reinterpret_cast<const std::uint8_t*>(open + cache.open_offset(seq, offset, h, 0));
      if (std::any_of(p, p + dim * sizeof(T), [](std::uint8_t b) { return b != kCachePoison; })) return false;
    }
    return true;
  };
  EXPECT_TRUE(open_row_is(0, 0, 2)) << "position 4";
  EXPECT_TRUE(open_row_is(0, 1, 3)) << "position 5";
  EXPECT_TRUE(open_row_untouched(0, 2)) << "position 2: superseded, not kept";
  EXPECT_TRUE(open_row_untouched(0, 3));
  EXPECT_TRUE(open_row_is(1, 0, 4)) << "sequence 1's position 0";
}

// --- validation ---

struct Buffers {
  CacheLayout L{16, 16, 2, 64, PoolLayout::kNhdPadded};
  std::vector<std::uint8_t> bytes = std::vector<std::uint8_t>(L.bytes, kCachePoison);
  std::vector<float> k = std::vector<float>(4 * 2 * 64, 0.5f), v = k;
  std::vector<std::int64_t> slots = {0, 1, 17, 255};
  PagedCache cache = L.cache(bytes.data());
};

TEST(PagedValidation, BadCachesAreRefusedAndNothingIsTouched) {
  Buffers b;
  const std::vector<std::uint8_t> before = b.bytes;
  auto append = [&](const PagedCache& c) {
    return reference::append_kv(b.k.data(), b.v.data(), dense_rows(4, 2, 64), b.slots.data(), c);
  };
  ASSERT_EQ(append(b.cache), cudaSuccess);  // the baseline is valid
  b.bytes = before;
  auto expect_refused = [&](PagedCache c, cudaError_t want, const char* what) {
    EXPECT_EQ(validate_cache(c), want) << what;
    EXPECT_EQ(append(c), want) << what;
    EXPECT_TRUE(b.bytes == before) << what << ": touched";
  };
  PagedCache c = b.cache;
  c.page_size = 0;
  expect_refused(c, cudaErrorInvalidValue, "page_size 0");
  c = b.cache;
  c.kv_heads = 0;
  expect_refused(c, cudaErrorInvalidValue, "kv_heads 0");
  c = b.cache;
  c.head_dim = 0;
  expect_refused(c, cudaErrorInvalidValue, "head_dim 0");
  c = b.cache;
  c.num_pages = -1;
  expect_refused(c, cudaErrorInvalidValue, "negative pages");
  c = b.cache;
  c.k_codes = nullptr;
  expect_refused(c, cudaErrorInvalidValue, "null K pool");
  c = b.cache;
  c.v_scales = nullptr;
  expect_refused(c, cudaErrorInvalidValue, "null V scales");
  c = b.cache;
  c.k_scales = reinterpret_cast<float*>(reinterpret_cast<std::uint8_t*>(c.k_scales) + 2);
  expect_refused(c, cudaErrorMisalignedAddress, "misaligned K scales");
  c = b.cache;
  c.k_strides.head_stride = 32;  // rows of 64 overlap
  expect_refused(c, cudaErrorInvalidValue, "overlapping head stride");
  c = b.cache;
  c.k_strides.token_stride = -1;
  expect_refused(c, cudaErrorInvalidValue, "negative stride");
  c = b.cache;
  c.v_codes = c.k_codes + 8;  // V overlapping K element-wise
  expect_refused(c, cudaErrorInvalidValue, "V pool overlapping K");
  c = b.cache;
  c.v_scales = c.k_scales + 3;
  expect_refused(c, cudaErrorInvalidValue, "V scales overlapping K scales");
  c = b.cache;
  c.k_scales = reinterpret_cast<float*>(c.v_codes + 64);
  expect_refused(c, cudaErrorInvalidValue, "K scales inside the V pool");
  c = b.cache;
  c.scheme = static_cast<PagedScheme>(7);
  expect_refused(c, cudaErrorInvalidValue, "unknown scheme");
  c = b.cache;
  c.num_pages = std::int64_t{1} << 60;
  expect_refused(c, cudaErrorInvalidValue, "sizes that overflow");

  // Interleaved K/V halves of one pool are element-disjoint: accepted.
  const CacheLayout I(16, 16, 2, 64, PoolLayout::kInterleavedNhd);
  std::vector<std::uint8_t> ib(I.bytes, kCachePoison);
  EXPECT_EQ(validate_cache(I.cache(ib.data())), cudaSuccess);
}

// Validation reads no byte of a cache, so its arrays may be addresses 1 GiB apart: a 1-page,
// 1-token, 1-channel cache of kMaxKeysPerChannelPageHeads heads is valid, one more head is not.
TEST(PagedValidation, KeysPerChannelCachesHaveAtMostMaxHeads) {
  auto at = [](int gib) { return reinterpret_cast<std::int8_t*>((std::uintptr_t{1} + gib) << 30); };  // GiB 1 + gib
  auto cache = [&](std::int64_t heads) {
    PagedCache c;
    c.num_pages = c.page_size = c.head_dim = c.max_seqs = 1;
    c.kv_heads = heads;
    c.scheme = PagedScheme::kKeysPerChannelPage;
    c.k_codes = at(0);
    c.v_codes = at(1);
    c.k_strides = c.v_strides = nhd_strides(1, heads, 1);
    c.k_scales = reinterpret_cast<float*>(at(2));
    c.v_scales = reinterpret_cast<float*>(at(3));
    c.k_open = at(4);
    return c;
  };
  EXPECT_EQ(validate_cache(cache(kMaxKeysPerChannelPageHeads)), cudaSuccess);
  EXPECT_EQ(validate_cache(cache(kMaxKeysPerChannelPageHeads + 1)), cudaErrorInvalidValue);
  PagedCache per_token = cache(kMaxKeysPerChannelPageHeads + 1);
  per_token.scheme = PagedScheme::kPerTokenHead;  // counts its rows in 64 bits
  EXPECT_EQ(validate_cache(per_token), cudaSuccess);
}

TEST(PagedValidation, KeysPerChannelCachesNeedTheirBuffersPositionsAndType) {
  const CacheLayout L(16, 16, 2, 64, PoolLayout::kHnd, ByPage{4, 2, ElementType::kHalf});
  std::vector<std::uint8_t> bytes(L.bytes, kCachePoison);
  const std::vector<std::uint8_t> before = bytes;
  const PagedCache good = L.cache(bytes.data());
  ASSERT_EQ(validate_cache(good), cudaSuccess);
  std::vector<__half> k(4 * 2 * 64, from_float<__half>(0.5f)), v = k;
  std::vector<float> kf(4 * 2 * 64, 0.5f);
  const std::vector<std::int64_t> slots = {0, 1, 2, 3};
  const std::vector<std::int32_t> ids = {0, 0, 0, 0}, pos = {0, 1, 2, 3};
  const TokenPositions tp{ids.data(), pos.data()};
  const TokenRows rows = dense_rows(4, 2, 64);
  EXPECT_EQ(reference::append_kv(k.data(), v.data(), rows, slots.data(), TokenPositions{}, good), cudaErrorInvalidValue)
      << "no positions";
  EXPECT_EQ(reference::append_kv(kf.data(), kf.data(), rows, slots.data(), tp, good), cudaErrorInvalidValue)
      << "fp32 tokens into an fp16 cache";
  PagedCache c = good;
  c.k_open = nullptr;
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "no open-page buffer";
  c = good;
  c.v_sink = nullptr;
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "sinks without a buffer";
  c = good;
  c.max_seqs = 0;
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "no sequences";
  c = good;
  c.sink_tokens = -1;
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "negative sinks";
  c = good;
  c.k_open = static_cast<std::uint8_t*>(c.k_open) + 1;
  EXPECT_EQ(validate_cache(c), cudaErrorMisalignedAddress) << "misaligned open-page buffer";
  c = good;
  c.k_sink = c.k_open;
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "sinks inside the open-page buffer";
  c = good;
  c.open_type = static_cast<ElementType>(9);
  EXPECT_EQ(validate_cache(c), cudaErrorInvalidValue) << "unknown element type";
  EXPECT_TRUE(bytes == before) << "a refused call touched the cache";
  EXPECT_EQ(reference::append_kv(k.data(), v.data(), rows, slots.data(), tp, good), cudaSuccess);
}

TEST(PagedValidation, BadAppendAndGatherArgumentsAreRefusedAndNothingIsTouched) {
  Buffers b;
  const std::vector<std::uint8_t> before = b.bytes;
  const TokenRows rows = dense_rows(4, 2, 64);
  auto append = [&](const float* k, const float* v, const TokenRows& r, const std::int64_t* s) {
    return reference::append_kv(k, v, r, s, b.cache);
  };
  EXPECT_EQ(append(nullptr, b.v.data(), rows, b.slots.data()), cudaErrorInvalidValue);
  EXPECT_EQ(append(b.k.data(), b.v.data(), rows, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(append(reinterpret_cast<const float*>(reinterpret_cast<const std::uint8_t*>(b.k.data()) + 2), b.v.data(),
                   rows, b.slots.data()),
            cudaErrorMisalignedAddress);
  EXPECT_EQ(append(b.k.data(), b.v.data(), rows,
                   reinterpret_cast<const std::int64_t*>(reinterpret_cast<const std::uint8_t*>(b.slots.data()) + 4)),
            cudaErrorMisalignedAddress);
  EXPECT_EQ(append(b.k.data(), b.v.data(), TokenRows{4, 64, 64}, b.slots.data()), cudaErrorInvalidValue)
      << "token rows overlapping their heads";
  EXPECT_EQ(append(b.k.data(), b.v.data(), TokenRows{-1, 128, 64}, b.slots.data()), cudaErrorInvalidValue);
  const auto* in_pool = reinterpret_cast<const float*>(b.cache.v_codes);
  EXPECT_EQ(append(in_pool, b.v.data(), rows, b.slots.data()), cudaErrorInvalidValue) << "input inside the cache";
  EXPECT_EQ(append(nullptr, nullptr, dense_rows(0, 2, 64), nullptr), cudaSuccess) << "no tokens: a no-op";
  EXPECT_TRUE(b.bytes == before);

  const std::vector<std::int32_t> table = {0, 1}, lens = {20};
  std::vector<float> k(64 * 2 * 64), v(64 * 2 * 64);
  const SequenceTable seqs{1, 2, table.data(), lens.data(), nullptr};
  auto gather = [&](const SequenceTable& s, float* ko, float* vo, const TokenRows& out) {
    return reference::gather_kv(b.cache, s, ko, vo, out);
  };
  const TokenRows out = dense_rows(64, 2, 64);
  EXPECT_EQ(gather(seqs, k.data(), v.data(), out), cudaSuccess);
  EXPECT_EQ(gather(seqs, nullptr, v.data(), out), cudaErrorInvalidValue);
  EXPECT_EQ(gather(SequenceTable{1, 2, nullptr, lens.data(), nullptr}, k.data(), v.data(), out), cudaErrorInvalidValue);
  EXPECT_EQ(gather(SequenceTable{-1, 2, table.data(), lens.data(), nullptr}, k.data(), v.data(), out),
            cudaErrorInvalidValue);
  EXPECT_EQ(gather(seqs, k.data(), k.data() + 64, out), cudaErrorInvalidValue) << "K and V outputs overlapping";
  EXPECT_EQ(gather(seqs, reinterpret_cast<float*>(b.cache.k_scales), v.data(), out), cudaErrorInvalidValue)
      << "output inside the cache";
  EXPECT_EQ(gather(seqs, reinterpret_cast<float*>(reinterpret_cast<std::uint8_t*>(k.data()) + 1), v.data(), out),
            cudaErrorMisalignedAddress);
  EXPECT_EQ(gather(SequenceTable{0, 2, nullptr, nullptr, nullptr}, nullptr, nullptr, out), cudaSuccess);
  EXPECT_TRUE(b.bytes == before);
}

}  // namespace
