// kvq::reference::decode_attention on the CPU, the oracle of the GPU decode attention: identities
// it must satisfy exactly (one token returns its value, GQA picks KV head qh / group, empty and
// skipped sequences give 0 and lse -inf), agreement with attention computed here from gather_kv's
// rows, the lse merge of two halves of a sequence, attention over the original (unquantized) K/V
// within the int8 error, for both schemes; the validation of its arguments; and make_decode_plan
// (chunks aligned and covering the limit, the workspace its grid writes, hand-made plans checked).
#include "paged_cases.hpp"

#include <kvq/attention.hpp>
#include <kvq/reference.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kvq;
using namespace kvq::test;

/// A cache filled by appending `lens[b]` tokens to each sequence b, with the original K/V kept.
struct FilledCache {
  CacheLayout L;
  std::vector<std::uint8_t> bytes;
  std::vector<std::int32_t> table, lens;
  std::int64_t max_pages;
  std::vector<std::vector<float>> k, v;  // [b] -> (len, heads, dim) as appended (fp32)
  PagedCache cache() { return L.cache(bytes.data()); }
  SequenceTable seqs() const {
    return SequenceTable{static_cast<std::int64_t>(lens.size()), max_pages, table.data(), lens.data(), nullptr, nullptr};
  }
};

FilledCache fill(std::vector<std::int32_t> lens, std::int64_t page_size, std::int64_t heads, std::int64_t dim,
                 bool by_page, std::uint64_t seed, float (*value)(std::mt19937_64&, std::int64_t, std::int64_t) = nullptr) {
  const int batch = static_cast<int>(lens.size());
  std::int64_t max_len = 1;
  for (auto l : lens) max_len = std::max<std::int64_t>(max_len, l);
  const std::int64_t max_pages = (max_len + page_size - 1) / page_size, pages = batch * max_pages + 1;
  const ByPage bp = by_page ? ByPage{batch, 1, ElementType::kFloat} : ByPage{};
  FilledCache f{CacheLayout(pages, page_size, heads, dim, PoolLayout::kHnd, bp), {}, {}, lens, max_pages, {}, {}};
  f.bytes.assign(f.L.bytes, kCachePoison);
  f.table.assign(batch * max_pages, -1);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::int32_t> order(pages);
  for (std::int64_t p = 0; p < pages; ++p) order[p] = static_cast<std::int32_t>(p);
  std::shuffle(order.begin(), order.end(), rng);
  const PagedCache c = f.cache();
  for (int b = 0; b < batch; ++b) {
    const std::int64_t n = lens[b];
    for (std::int64_t p = 0; p < (n + page_size - 1) / page_size; ++p) f.table[b * max_pages + p] = order[b * max_pages + p];
    std::vector<float> k(n * heads * dim), v(n * heads * dim);
    for (std::int64_t i = 0; i < n * heads * dim; ++i) {
      k[i] = value ? value(rng, i / dim % heads, 0) : u(rng) * (i % dim == 3 ? 8.0f : 1.0f);
      v[i] = value ? value(rng, i / dim % heads, 1) : u(rng);
    }
    std::vector<std::int64_t> slots(n);
    std::vector<std::int32_t> ids(n, b), pos(n);
    for (std::int64_t t = 0; t < n; ++t) {
      slots[t] = static_cast<std::int64_t>(f.table[b * max_pages + t / page_size]) * page_size + t % page_size;
      pos[t] = static_cast<std::int32_t>(t);
    }
    if (n > 0) {
      EXPECT_EQ(reference::append_kv(k.data(), v.data(), dense_rows(n, heads, dim), slots.data(),
                                     TokenPositions{ids.data(), pos.data()}, c),
                cudaSuccess);
    }
    f.k.push_back(std::move(k));
    f.v.push_back(std::move(v));
  }
  return f;
}

std::vector<float> random_queries(std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(n);
  for (auto& x : q) x = u(rng);
  return q;
}

/// softmax(scale * q K^T) V in double over rows k, v (len, heads, dim) for query head qh.
void attend(const float* q, const std::vector<float>& k, const std::vector<float>& v, std::int64_t len,
            std::int64_t heads, std::int64_t dim, std::int64_t h, float scale, std::vector<double>& out, double& lse) {
  std::vector<double> s(len);
  double m = -INFINITY;
  for (std::int64_t t = 0; t < len; ++t) {
    double dot = 0;
    for (std::int64_t c = 0; c < dim; ++c) dot += static_cast<double>(q[c]) * k[(t * heads + h) * dim + c];
    s[t] = scale * dot;
    m = std::max(m, s[t]);
  }
  out.assign(dim, 0.0);
  double sum = 0;
  for (std::int64_t t = 0; t < len; ++t) {
    const double p = std::exp(s[t] - m);
    sum += p;
    for (std::int64_t c = 0; c < dim; ++c) out[c] += p * v[(t * heads + h) * dim + c];
  }
  for (auto& x : out) x = sum > 0 ? x / sum : 0.0;
  lse = sum > 0 ? m + std::log(sum) : -INFINITY;
}

class ReferenceDecodeAttention : public ::testing::TestWithParam<bool> {};  // the scheme: keys per channel?
INSTANTIATE_TEST_SUITE_P(Schemes, ReferenceDecodeAttention, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "keys_per_channel_page" : "per_token_head"; });

TEST_P(ReferenceDecodeAttention, EqualsAttentionOverGatheredRowsAndOverTheOriginalWithinTheInt8Error) {
  const bool by_page = GetParam();
  const std::int64_t heads = 2, dim = 64, group = 3, q_heads = heads * group;
  for (std::int64_t page_size : {1, 16, 64}) {
    FilledCache f = fill({0, 1, 37, 200, 64}, page_size, heads, dim, by_page, 7 + page_size);
    const PagedCache c = f.cache();
    const std::int64_t batch = static_cast<std::int64_t>(f.lens.size());
    const std::vector<float> q = random_queries(batch * q_heads * dim, 3);
    std::vector<float> out(batch * q_heads * dim, -7.0f), lse(batch * q_heads, -7.0f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
    unsigned long long errors = 0;
    ASSERT_EQ(reference::decode_attention(q.data(), dense_queries(batch, q_heads, dim), c, f.seqs(), scale, out.data(),
                                          dense_queries(batch, q_heads, dim), lse.data(), &errors),
              cudaSuccess);
    EXPECT_EQ(errors, 0u);
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t len = f.lens[b];
      std::vector<float> gk(std::max<std::int64_t>(len, 1) * heads * dim), gv = gk;
      const std::int32_t one_len[] = {static_cast<std::int32_t>(len)};
      const SequenceTable one{1, f.max_pages, f.table.data() + b * f.max_pages, one_len, nullptr, nullptr};
      const std::int32_t id[] = {static_cast<std::int32_t>(b)};
      SequenceTable one_id = one;
      one_id.seq_ids = id;
      if (len > 0) {
        ASSERT_EQ(reference::gather_kv(c, one_id, gk.data(), gv.data(), dense_rows(len, heads, dim)), cudaSuccess);
      }
      for (std::int64_t qh = 0; qh < q_heads; ++qh) {
        const float* qr = &q[(b * q_heads + qh) * dim];
        const float* got = &out[(b * q_heads + qh) * dim];
        std::vector<double> want, orig;
        double want_lse = 0, orig_lse = 0;
        attend(qr, gk, gv, len, heads, dim, qh / group, scale, want, want_lse);
        attend(qr, f.k[b], f.v[b], len, heads, dim, qh / group, scale, orig, orig_lse);
        const std::string what = "page " + std::to_string(page_size) + " seq " + std::to_string(b) + " head " +
                                 std::to_string(qh);
        for (std::int64_t c2 = 0; c2 < dim; ++c2) {
          // The same dequantized rows and float64: equal up to the final rounding to fp32.
          EXPECT_EQ(got[c2], static_cast<float>(want[c2])) << what;
          // Against the unquantized K/V: values are within half a scale (|v| <= 1: 1/254) and the
          // scores within sum |q| * half a key scale; a loose bound that still catches a wrong head.
          EXPECT_NEAR(got[c2], orig[c2], 0.03) << what;
        }
        if (len == 0) {
          EXPECT_EQ(lse[b * q_heads + qh], -INFINITY) << what;
          for (std::int64_t c2 = 0; c2 < dim; ++c2) EXPECT_EQ(got[c2], 0.0f) << what;
        } else {
          EXPECT_EQ(lse[b * q_heads + qh], static_cast<float>(want_lse)) << what;
          EXPECT_NEAR(lse[b * q_heads + qh], orig_lse, 0.05) << what;
        }
        if (len == 1) {  // one token: its value exactly (p = 1)
          for (std::int64_t c2 = 0; c2 < dim; ++c2) EXPECT_EQ(got[c2], gv[(qh / group) * dim + c2]) << what;
        }
      }
    }
  }
}

// Per token-head: a suffix of a sequence's pages is then a sequence of its own (under keys per
// channel it is not: the sinks and the open page belong to the whole sequence).
TEST(ReferenceDecodeAttentionLse, MergesTwoHalvesIntoTheWhole) {
  const std::int64_t heads = 1, dim = 32, len = 96, page_size = 16;
  FilledCache f = fill({static_cast<std::int32_t>(len)}, page_size, heads, dim, false, 11);
  const PagedCache c = f.cache();
  const std::vector<float> q = random_queries(dim, 5);
  const float scale = 0.3f;
  auto run = [&](const SequenceTable& s, std::vector<float>& o, float& l) {
    o.assign(dim, 0.0f);
    ASSERT_EQ(reference::decode_attention(q.data(), dense_queries(1, 1, dim), c, s, scale, o.data(),
                                          dense_queries(1, 1, dim), &l),
              cudaSuccess);
  };
  std::vector<float> whole, first, second;
  float lw = 0, l1 = 0, l2 = 0;
  run(f.seqs(), whole, lw);
  // The first 48 tokens (3 pages) and the last 48, each as a sequence of its own pages.
  const std::int32_t half[] = {48};
  run(SequenceTable{1, f.max_pages, f.table.data(), half, nullptr, nullptr}, first, l1);
  run(SequenceTable{1, f.max_pages - 3, f.table.data() + 3, half, nullptr, nullptr}, second, l2);
  const double L = std::max(l1, l2) + std::log(std::exp(l1 - std::max(l1, l2)) + std::exp(l2 - std::max(l1, l2)));
  EXPECT_NEAR(lw, L, 1e-5);
  for (std::int64_t i = 0; i < dim; ++i)
    EXPECT_NEAR(whole[i], std::exp(l1 - L) * first[i] + std::exp(l2 - L) * second[i], 1e-5) << i;
}

TEST(ReferenceDecodeAttentionGqa, EachQueryHeadReadsItsGroupsKvHead) {
  // Values of KV head h are all h + 1 and keys are zero: every query head qh gets qh / group + 1.
  const std::int64_t heads = 4, dim = 16, group = 4, q_heads = heads * group;
  FilledCache f = fill({5, 33}, 16, heads, dim, false, 1,
                       [](std::mt19937_64&, std::int64_t h, std::int64_t is_v) { return is_v ? h + 1.0f : 0.0f; });
  const std::vector<float> q = random_queries(2 * q_heads * dim, 2);
  std::vector<float> out(2 * q_heads * dim);
  ASSERT_EQ(reference::decode_attention(q.data(), dense_queries(2, q_heads, dim), f.cache(), f.seqs(), 1.0f,
                                        out.data(), dense_queries(2, q_heads, dim)),
            cudaSuccess);
  for (std::int64_t i = 0; i < 2 * q_heads * dim; ++i)
    EXPECT_EQ(out[i], static_cast<float>((i / dim) % q_heads / group + 1)) << i;
}

TEST(ReferenceDecodeAttentionTables, SkippedSequencesAndPagesAreCounted) {
  FilledCache f = fill({20, 20}, 16, 1, 32, false, 4);
  f.table[1] = 1 << 20;  // sequence 0's second page: outside the pool (4 tokens skipped)
  f.lens[1] = 1 << 20;   // sequence 1: longer than its pages (skipped whole)
  const std::vector<float> q = random_queries(2 * 32, 9);
  std::vector<float> out(2 * 32, -7.0f), lse(2, -7.0f);
  unsigned long long errors = 0;
  ASSERT_EQ(reference::decode_attention(q.data(), dense_queries(2, 1, 32), f.cache(), f.seqs(), 1.0f, out.data(),
                                        dense_queries(2, 1, 32), lse.data(), &errors),
            cudaSuccess);
  EXPECT_EQ(errors, 4u + 1u);
  EXPECT_EQ(lse[1], -INFINITY);
  EXPECT_TRUE(std::isfinite(lse[0]));
}

TEST(ReferenceDecodeAttentionValidation, BadArgumentsAreRefused) {
  FilledCache f = fill({4}, 16, 2, 32, false, 4);
  const PagedCache c = f.cache();
  std::vector<float> q(6 * 32), out(6 * 32), lse(6);
  const QueryRows rows = dense_queries(1, 6, 32);
  auto call = [&](const float* qq, const QueryRows& qr, float* o, const QueryRows& orow, float* l) {
    return reference::decode_attention(qq, qr, c, f.seqs(), 1.0f, o, orow, l);
  };
  EXPECT_EQ(call(q.data(), rows, out.data(), rows, lse.data()), cudaSuccess);
  EXPECT_EQ(call(q.data(), dense_queries(1, 5, 32), out.data(), dense_queries(1, 5, 32), lse.data()),
            cudaErrorInvalidValue) << "a group that does not divide";
  EXPECT_EQ(call(nullptr, rows, out.data(), rows, lse.data()), cudaErrorInvalidValue);
  EXPECT_EQ(call(q.data(), rows, q.data(), rows, lse.data()), cudaErrorInvalidValue) << "out over q";
  EXPECT_EQ(call(q.data(), rows, out.data(), rows, out.data() + 4), cudaErrorInvalidValue) << "lse inside out";
  EXPECT_EQ(call(q.data(), rows, out.data(), rows, reinterpret_cast<float*>(reinterpret_cast<char*>(lse.data()) + 1)),
            cudaErrorMisalignedAddress);
  EXPECT_EQ(call(q.data(), rows, out.data(), dense_queries(2, 6, 32), lse.data()), cudaErrorInvalidValue)
      << "output batch differs";
  EXPECT_EQ(call(q.data(), QueryRows{1, 6, 6 * 32, 16}, out.data(), rows, lse.data()), cudaErrorInvalidValue)
      << "query heads overlapping";
}


// The plan: chunks aligned for the tensor-core kernel, covering every length up to the limit with
// no empty chunk, the workspace its grid writes, a long sequence cut to fill the GPU, and no
// plan for limits decode_attention does not run.
TEST(DecodePlanning, ChunksCoverTheLimitAlignedAndFillTheGpu) {
  const DecodeLimits shapes[] = {{8, 32, 8, 128, 32768}, {1, 32, 8, 128, 131072}, {32, 32, 8, 128, 1024},
                                 {128, 32, 8, 128, 2048}, {1, 4, 2, 64, 1},        {3, 48, 3, 256, 2149},
                                 {256, 16, 1, 80, 100}};
  for (const int sms : {1, 132})
    for (const DecodeLimits& l : shapes) {
      const DecodePlan p = make_decode_plan(l, sms);
      const std::string what = "B" + std::to_string(l.max_batch) + " T" + std::to_string(l.max_seq_len) + " D" +
                               std::to_string(l.head_dim) + " on " + std::to_string(sms) + " SMs";
      ASSERT_GE(p.splits, 1) << what;
      EXPECT_EQ(p.split_tokens % kDecodeSplitAlign, 0) << what;
      EXPECT_GE(p.splits * p.split_tokens, l.max_seq_len) << what;
      EXPECT_LT((p.splits - 1) * p.split_tokens, l.max_seq_len) << what << ": an empty chunk";
      EXPECT_EQ(p.workspace_bytes, static_cast<std::size_t>(l.max_batch * l.q_heads * (p.splits + 1) *
                                                            (l.head_dim + 2)) * sizeof(float)) << what;
      EXPECT_EQ(decode_workspace_bytes(p), p.workspace_bytes) << what;
    }
  // One sequence of 131072 tokens, 8 KV heads, 132 SMs: cut into at least one block an SM.
  const DecodePlan long_one = make_decode_plan(DecodeLimits{1, 32, 8, 128, 131072}, 132);
  EXPECT_GE(long_one.splits * 8, 132);
  // A large batch fills the GPU by itself: not cut.
  EXPECT_EQ(make_decode_plan(DecodeLimits{128, 32, 8, 128, 2048}, 132).splits, 1);
  const DecodeLimits refused[] = {{0, 32, 8, 128, 100},  {1, 30, 8, 128, 100}, {1, 64, 2, 128, 100},
                                  {1, 32, 8, 512, 100},  {1, 32, 8, 128, 0},   {70000, 8, 8, 128, 100},
                                  {1, 8, 8, 128, (std::int64_t{1} << 31) + 1}};
  for (const DecodeLimits& l : refused) EXPECT_EQ(make_decode_plan(l, 132).splits, 0);
  EXPECT_EQ(make_decode_plan(shapes[0], 0).splits, 0) << "no SMs";
}

// A plan made by hand is checked before anything runs: its chunks aligned, its workspace as large
// as its grid writes.
TEST(DecodePlanning, AHandMadePlanIsCheckedLikeAnyOther) {
  FilledCache f = fill({4}, 16, 2, 32, false, 4);
  const PagedCache c = f.cache();
  std::vector<float> q(4 * 32), out(4 * 32);
  std::vector<float> ws(1 << 16);
  const QueryRows rows = dense_queries(1, 4, 32);
  const DecodePlan good = make_decode_plan(DecodeLimits{1, 4, 2, 32, 64}, 132);
  auto check = [&](const DecodePlan& p) {
    return validate_decode_attention(q.data(), rows, c, f.seqs(), out.data(), rows, nullptr, p, ws.data(),
                                     ws.size() * sizeof(float));
  };
  ASSERT_EQ(check(good), cudaSuccess);
  DecodePlan p = good;
  p.split_tokens = 100;
  EXPECT_EQ(check(p), cudaErrorInvalidValue) << "chunks not a multiple of kDecodeSplitAlign";
  p = good;
  p.workspace_bytes -= 4;
  EXPECT_EQ(check(p), cudaErrorInvalidValue) << "a workspace smaller than the grid writes";
  p = good;
  p.splits = 70000;
  EXPECT_EQ(check(p), cudaErrorInvalidValue) << "more chunks than a grid holds";
  p = good;
  p.split_tokens = 0;
  EXPECT_EQ(check(p), cudaErrorInvalidValue);
}

}  // namespace
