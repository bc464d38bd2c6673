// kvq::decode_attention on the GPU against kvq::reference::decode_attention: both schemes and
// layouts, head dims 64-256, groups 1-16, page sizes 1-64, lengths 0, 1, off page boundaries and
// long enough to split, fp16 and bf16 queries; deterministic (two runs and a graph replay equal
// bit for bit); untrusted tables counted; bad arguments refused with nothing enqueued.
//
// The bound, per output element: the reference is float64 over the same fp32 dequantized rows;
// the GPU accumulates in fp32 with ex2.approx (relative error 2^-22), so scores, weights and sums
// carry a relative error of a few 2^-22 times log2 of the tokens, far below the output's own
// rounding to fp16 / bf16 (2^-11 / 2^-8 relative). Hence |got - want| <= 2 ulp of the output type
// at |want|, plus 1e-5 of the largest |v| for outputs near 0 (cancellation among the weights).
#include "gpu_exact.cuh"
#include "paged_cases.hpp"

#include <kvq/attention.cuh>
#include <kvq/paged.cuh>

#include <cmath>

namespace kvq::test {
namespace {

int sm_count() {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, 0);
  return n;
}

template <class T>
double output_eps() {
  return std::is_same_v<T, __half> ? 0x1p-11 : std::is_same_v<T, __nv_bfloat16> ? 0x1p-8 : 0x1p-23;
}

struct AttentionCase {
  PoolLayout layout;
  bool by_page;
  std::int64_t page_size, kv_heads, group, dim;
  std::vector<std::int32_t> lens;
  std::string name() const {
    std::string s = std::string(to_string(layout)) + (by_page ? " keys per channel" : " per token-head") + " page " +
                    std::to_string(page_size) + " kv heads " + std::to_string(kv_heads) + " group " +
                    std::to_string(group) + " dim " + std::to_string(dim) + " lens";
    for (auto l : lens) s += " " + std::to_string(l);
    return s;
  }
};

/// Fills a cache by append_kv on the GPU (the reference's twin on the host), then runs decode
/// attention on both sides and compares.
template <class T>
void check_case(const AttentionCase& ac, int sm_count) {
  const int batch = static_cast<int>(ac.lens.size());
  std::int64_t max_len = 1;
  for (auto l : ac.lens) max_len = std::max<std::int64_t>(max_len, l);
  const std::int64_t max_pages = (max_len + ac.page_size - 1) / ac.page_size, pages = batch * max_pages + 2;
  const ByPage bp = ac.by_page ? ByPage{batch, 1, element_type_of<T>()} : ByPage{};
  const CacheLayout L(pages, ac.page_size, ac.kv_heads, ac.dim, ac.layout, bp);
  std::vector<std::uint8_t> host(L.bytes, kCachePoison);
  DeviceBuffer<std::uint8_t> device(L.bytes);
  ASSERT_TRUE(device.get());
  const PagedCache hc = L.cache(host.data()), dc = L.cache(device.get());
  // Pages shuffled; each sequence's tokens appended in one call (a prefill), K/V random.
  Rng rng(ac.dim * 7 + ac.group + ac.page_size);
  std::vector<std::int32_t> table(batch * max_pages, -1), order(pages);
  for (std::int64_t p = 0; p < pages; ++p) order[p] = static_cast<std::int32_t>(p);
  for (std::int64_t p = pages - 1; p > 0; --p) std::swap(order[p], order[rng.next() % (p + 1)]);
  std::vector<std::int64_t> slots;
  std::vector<std::int32_t> ids, pos;
  for (int b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < ac.lens[b]; ++t) {
      if (t % ac.page_size == 0) table[b * max_pages + t / ac.page_size] = order[b * max_pages + t / ac.page_size];
      slots.push_back(static_cast<std::int64_t>(table[b * max_pages + t / ac.page_size]) * ac.page_size + t % ac.page_size);
      ids.push_back(b);
      pos.push_back(static_cast<std::int32_t>(t));
    }
  const std::int64_t n = static_cast<std::int64_t>(slots.size()), row = ac.kv_heads * ac.dim;
  std::vector<T> k(std::max<std::int64_t>(n, 1) * row), v = k;
  for (auto& x : k) x = from_float<T>(rng.symmetric() * 2.0f);
  for (auto& x : v) x = from_float<T>(rng.symmetric());
  KVQ_ASSERT_CUDA(device.upload(host));
  if (n > 0) {
    DeviceBuffer<T> dk(k.size()), dv(v.size());
    DeviceBuffer<std::int64_t> ds(n);
    DeviceBuffer<std::int32_t> di(n), dp(n);
    KVQ_ASSERT_CUDA(dk.upload(k));
    KVQ_ASSERT_CUDA(dv.upload(v));
    KVQ_ASSERT_CUDA(ds.upload(slots));
    KVQ_ASSERT_CUDA(di.upload(ids));
    KVQ_ASSERT_CUDA(dp.upload(pos));
    const TokenRows rows = dense_rows(n, ac.kv_heads, ac.dim);
    ASSERT_EQ(reference::append_kv(k.data(), v.data(), rows, slots.data(), TokenPositions{ids.data(), pos.data()}, hc),
              cudaSuccess);
    KVQ_ASSERT_CUDA(append_kv(dk.get(), dv.get(), rows, ds.get(), TokenPositions{di.get(), dp.get()}, dc));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  }

  const std::int64_t q_heads = ac.kv_heads * ac.group;
  const QueryRows qrows{batch, q_heads, q_heads * ac.dim + 8, ac.dim};  // strided queries
  const QueryRows orows = dense_queries(batch, q_heads, ac.dim);
  std::vector<T> q(batch * qrows.batch_stride);
  for (auto& x : q) x = from_float<T>(rng.symmetric());
  const float sm_scale = 1.0f / std::sqrt(static_cast<float>(ac.dim));
  std::vector<T> want(batch * q_heads * ac.dim);
  std::vector<float> want_lse(batch * q_heads);
  const SequenceTable h_seqs{batch, max_pages, table.data(), ac.lens.data(), nullptr, nullptr};
  ASSERT_EQ(reference::decode_attention(q.data(), qrows, hc, h_seqs, sm_scale, want.data(), orows, want_lse.data()),
            cudaSuccess);

  const DecodePlan plan = make_decode_plan(DecodeLimits{batch + 2, q_heads, ac.kv_heads, ac.dim, max_len + 100}, sm_count);
  ASSERT_GT(plan.splits, 0);
  DeviceBuffer<T> dq(q.size()), dout(want.size());
  DeviceBuffer<float> dlse(want_lse.size());
  DeviceBuffer<std::uint8_t> ws(std::max<std::size_t>(decode_workspace_bytes(plan), 1));
  DeviceBuffer<std::int32_t> dt(std::max<std::size_t>(table.size(), 1)), dl(ac.lens.size());
  ASSERT_TRUE(dq.get() && dout.get() && dlse.get() && ws.get() && dt.get() && dl.get());
  KVQ_ASSERT_CUDA(dq.upload(q));
  KVQ_ASSERT_CUDA(dt.upload(table));
  KVQ_ASSERT_CUDA(dl.upload(ac.lens));
  KVQ_ASSERT_CUDA(dout.poison(kPoisonValueByte));
  KVQ_ASSERT_CUDA(dlse.poison(kPoisonScaleByte));
  KVQ_ASSERT_CUDA(ws.poison(kPoisonScaleByte));  // every partial read must have been written
  const SequenceTable d_seqs{batch, max_pages, dt.get(), dl.get(), nullptr, nullptr};
  DeviceBuffer<unsigned long long> d_errors(1);
  KVQ_ASSERT_CUDA(d_errors.poison(0));
  auto run = [&](cudaStream_t s) {
    return decode_attention(dq.get(), qrows, dc, d_seqs, sm_scale, dout.get(), orows, dlse.get(), plan, ws.get(),
                            decode_workspace_bytes(plan), d_errors.get(), s);
  };
  KVQ_ASSERT_CUDA(run(nullptr));
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<T> got;
  std::vector<float> got_lse;
  std::vector<unsigned long long> errors;
  KVQ_ASSERT_CUDA(dout.download(got));
  KVQ_ASSERT_CUDA(dlse.download(got_lse));
  KVQ_ASSERT_CUDA(d_errors.download(errors));
  EXPECT_EQ(errors[0], 0u);
  const std::string what = ac.name() + " splits " + std::to_string(plan.splits);
  const double eps = output_eps<T>();
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double w = to_float(want[i]), g = to_float(got[i]);
    ASSERT_LE(std::fabs(g - w), 2 * eps * std::fabs(w) + 1e-5 * 1.0 + 2 * eps * 1e-3) << what << " element " << i;
  }
  for (std::size_t i = 0; i < want_lse.size(); ++i) {
    if (std::isinf(want_lse[i])) {
      ASSERT_EQ(got_lse[i], want_lse[i]) << what << " lse " << i;
    } else {
      ASSERT_NEAR(got_lse[i], want_lse[i], 1e-4 * (1 + std::fabs(want_lse[i]))) << what << " lse " << i;
    }
  }
  // Deterministic: a second run, and a CUDA graph of the call, give the same bits.
  CapturedCall graph;
  KVQ_ASSERT_CUDA(graph.capture(run));
  KVQ_ASSERT_CUDA(dout.poison(kPoisonValueByte));
  KVQ_ASSERT_CUDA(graph.replay());
  std::vector<T> again;
  KVQ_ASSERT_CUDA(dout.download(again));
  expect_identical(again, got, "graph replay vs eager: " + what);
}

template <class T>
class GpuDecodeAttention : public GpuTest {};
using AttentionTypes = ::testing::Types<__half, __nv_bfloat16>;
TYPED_TEST_SUITE(GpuDecodeAttention, AttentionTypes);

TYPED_TEST(GpuDecodeAttention, MatchesTheReferenceOverShapesSchemesAndLayouts) {
  using T = TypeParam;
  const int sms = sm_count();
  const std::vector<std::int32_t> lens = {0, 1, 17, 64, 300, 1000};
  // KVQ_TEST_SHAPES=small (the sanitizer runs): two head dims, one per tile size.
  const std::vector<std::int64_t> dims = small_shapes() ? std::vector<std::int64_t>{80, 256}
                                                         : std::vector<std::int64_t>{64, 80, 96, 128, 256};
  for (bool by_page : {false, true})
    for (PoolLayout layout : {PoolLayout::kNhdPadded, PoolLayout::kHnd, PoolLayout::kInterleavedNhd})
      for (std::int64_t dim : dims) {
        check_case<T>(AttentionCase{layout, by_page, 16, 2, 4, dim, lens}, sms);
        if (::testing::Test::HasFatalFailure()) return;
      }
  for (std::int64_t group : small_shapes() ? std::vector<std::int64_t>{3, 16} : std::vector<std::int64_t>{1, 2, 3, 8, 16})
    for (std::int64_t page_size : {1, 64}) {
      check_case<T>(AttentionCase{PoolLayout::kNhdPadded, false, page_size, 2, group, 128, {5, 640, 2049}}, sms);
      check_case<T>(AttentionCase{PoolLayout::kHnd, true, page_size, 2, group, 128, {5, 640, 2049}}, sms);
      if (::testing::Test::HasFatalFailure()) return;
    }
  // Head dims whose lanes read a main and a tail run of each row (HND rows are 16-byte aligned:
  // the tensor-core path), with groups over 8 (two tiles of query heads).
  for (std::int64_t dim : small_shapes() ? std::vector<std::int64_t>{80} : std::vector<std::int64_t>{80, 96})
    for (bool by_page : {false, true}) {
      check_case<T>(AttentionCase{PoolLayout::kHnd, by_page, 16, 2, 16, dim, {5, 640, 2049}}, sms);
      check_case<T>(AttentionCase{PoolLayout::kInterleavedNhd, by_page, 64, 3, 12, dim, {1, 300}}, sms);
      if (::testing::Test::HasFatalFailure()) return;
    }
  // One long sequence: the plan splits it across the GPU.
  check_case<T>(AttentionCase{PoolLayout::kNhdPadded, false, 64, 8, 4, 128, {small_shapes() ? 4096 : 32768}}, sms);
}

class GpuDecodeAttentionArgs : public GpuTest {};

TEST_F(GpuDecodeAttentionArgs, BadArgumentsReturnAnErrorAndLaunchNothing) {
  const CacheLayout L(8, 16, 2, 64, PoolLayout::kHnd);
  DeviceBuffer<std::uint8_t> cache_bytes(L.bytes);
  DeviceBuffer<__half> q(4 * 64), out(4 * 64);
  DeviceBuffer<std::int32_t> table(4), lens(1);
  ASSERT_TRUE(cache_bytes.get() && q.get() && out.get() && table.get() && lens.get());
  KVQ_ASSERT_CUDA(out.poison(kPoisonValueByte));
  const PagedCache c = L.cache(cache_bytes.get());
  const SequenceTable seqs{1, 4, table.get(), lens.get(), nullptr, nullptr};
  const QueryRows rows = dense_queries(1, 4, 64);
  const DecodePlan plan = make_decode_plan(DecodeLimits{1, 4, 2, 64, 64}, sm_count());
  ASSERT_GT(plan.splits, 0);
  DeviceBuffer<std::uint8_t> ws(decode_workspace_bytes(plan) + 16);
  ASSERT_TRUE(ws.get());
  auto call = [&](const QueryRows& qr, const DecodePlan& p, void* w, std::size_t bytes) {
    return decode_attention(q.get(), qr, c, seqs, 1.0f, out.get(), qr, nullptr, p, w, bytes);
  };
  const std::size_t need = decode_workspace_bytes(plan);
  EXPECT_EQ(call(rows, plan, ws.get(), need - 1), cudaErrorInvalidValue) << "workspace too small";
  EXPECT_EQ(call(rows, plan, nullptr, need), cudaErrorInvalidValue) << "no workspace";
  EXPECT_EQ(call(rows, plan, ws.get() + 4, need), cudaErrorMisalignedAddress) << "misaligned workspace";
  EXPECT_EQ(call(dense_queries(1, 3, 64), plan, ws.get(), need), cudaErrorInvalidValue) << "group not dividing";
  EXPECT_EQ(call(dense_queries(2, 4, 64), plan, ws.get(), need), cudaErrorInvalidValue) << "batch past the plan";
  const DecodePlan wide = make_decode_plan(DecodeLimits{1, 4, 2, 512, 64}, sm_count());
  EXPECT_EQ(wide.splits, 0) << "head dim 512 is not run";
  EXPECT_EQ(call(rows, wide, ws.get(), need), cudaErrorInvalidValue) << "a plan of no splits";
  const DecodePlan big_group = make_decode_plan(DecodeLimits{1, 64, 2, 64, 64}, sm_count());
  EXPECT_EQ(big_group.splits, 0) << "group 32 is not run";
  EXPECT_EQ(call(rows, plan, cache_bytes.get(), need), cudaErrorInvalidValue) << "workspace inside the cache";
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<__half> got;
  KVQ_ASSERT_CUDA(out.download(got));
  const std::vector<__half> poison = poisoned<__half>(got.size(), kPoisonValueByte);
  expect_identical(got, poison, "a refused call wrote its output");
}

}  // namespace
}  // namespace kvq::test
