// The paged cache on the GPU, against kvq::reference bit for bit: random engine traffic (prefill
// chunks and decode steps from a shuffled free list, padding and out-of-pool slots mixed in) for
// every pool layout, page sizes 1-128, head dims 64-256 and the three dtypes, the whole cache
// buffer (codes, scales and the untouched bytes around them) compared after every step; gather_kv
// of every sequence; a decode step captured once in a CUDA graph and replayed with new contents;
// untrusted slots and tables skipped and counted as the reference counts them.
#include "gpu_exact.cuh"
#include "paged_cases.hpp"

#include <kvq/paged.cuh>

namespace kvq::test {
namespace {

template <class T>
std::vector<T> random_rows(std::int64_t n, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<T> v(n);
  for (std::int64_t i = 0; i < n; ++i) {
    float x = rng.symmetric() * (i % 64 == 5 ? 20.0f : 1.0f) * (0.5f + rng.uniform());
    if (rng.next() % 997 == 0) x = (rng.next() % 2) ? NAN : INFINITY;
    v[i] = from_float<T>(x);
  }
  return v;
}

/// A cache in one device buffer and its host twin, kept equal by the reference.
struct TwinCache {
  CacheLayout L;
  std::vector<std::uint8_t> host;
  DeviceBuffer<std::uint8_t> device;
  explicit TwinCache(const CacheLayout& layout) : L(layout), host(layout.bytes, kCachePoison), device(layout.bytes) {}
  PagedCache on_host() { return L.cache(host.data()); }
  PagedCache on_device() const { return L.cache(device.get()); }
};

template <class T>
class GpuPaged : public GpuTest {};
using Types = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(GpuPaged, Types);

/// Appends the same tokens on both sides and compares the whole buffer. `ids` and `pos` (one per
/// slot): the tokens' sequences and positions, for kKeysPerChannelPage caches.
template <class T>
void append_both(TwinCache& c, const std::vector<std::int64_t>& slots, std::uint64_t seed, unsigned long long* d_errors,
                 unsigned long long& host_errors, const std::string& what, const std::vector<std::int32_t>& ids = {},
                 const std::vector<std::int32_t>& pos = {}) {
  const std::int64_t n = static_cast<std::int64_t>(slots.size()), heads = c.L.kv_heads, dim = c.L.head_dim;
  // Rows with a padded token stride: the inputs are strided as an engine's qkv projection output.
  const TokenRows rows{n, heads * dim + 8, dim};
  const std::vector<T> k = random_rows<T>(std::max<std::int64_t>(n * rows.token_stride, 1), seed);
  const std::vector<T> v = random_rows<T>(std::max<std::int64_t>(n * rows.token_stride, 1), seed + 1);
  DeviceBuffer<T> dk(k.size()), dv(v.size());
  DeviceBuffer<std::int64_t> ds(std::max<std::size_t>(slots.size(), 1));
  ASSERT_TRUE(dk.get() && dv.get() && ds.get());
  KVQ_ASSERT_CUDA(dk.upload(k));
  KVQ_ASSERT_CUDA(dv.upload(v));
  if (n > 0) KVQ_ASSERT_CUDA(ds.upload(slots));
  DeviceBuffer<std::int32_t> d_ids(std::max<std::size_t>(ids.size(), 1)), d_pos(std::max<std::size_t>(pos.size(), 1));
  ASSERT_TRUE(d_ids.get() && d_pos.get());
  if (!ids.empty()) {
    KVQ_ASSERT_CUDA(d_ids.upload(ids));
    KVQ_ASSERT_CUDA(d_pos.upload(pos));
  }
  const TokenPositions h_tp = ids.empty() ? TokenPositions{} : TokenPositions{ids.data(), pos.data()};
  const TokenPositions d_tp = ids.empty() ? TokenPositions{} : TokenPositions{d_ids.get(), d_pos.get()};
  ASSERT_EQ(reference::append_kv(k.data(), v.data(), rows, slots.data(), h_tp, c.on_host(), &host_errors), cudaSuccess);
  KVQ_ASSERT_CUDA(append_kv(dk.get(), dv.get(), rows, ds.get(), d_tp, c.on_device(), d_errors));
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<std::uint8_t> got;
  KVQ_ASSERT_CUDA(c.device.download(got));
  const std::int64_t i = first_difference(got, c.host);
  ASSERT_EQ(i, -1) << what << ": the cache differs from the reference at byte " << i << " (codes end at "
                   << c.L.k_scales << ", K scales at " << c.L.k_scales << ", V scales at " << c.L.v_scales << ")";
}

/// gather_kv of every sequence of `traffic` on both sides, with and without output starts.
template <class T>
void gather_both(TwinCache& c, const Traffic& traffic, const std::string& what) {
  const auto& lens = traffic.lens();
  const std::int64_t batch = static_cast<std::int64_t>(lens.size()), heads = c.L.kv_heads, dim = c.L.head_dim;
  std::vector<std::int32_t> start(batch);
  std::int64_t total = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    start[b] = static_cast<std::int32_t>(total + 3 * b);  // a gap of 3 rows between sequences stays poisoned
    total += lens[b];
  }
  total += 3 * batch;
  DeviceBuffer<std::int32_t> d_table(traffic.table().size()), d_lens(lens.size()), d_start(start.size());
  ASSERT_TRUE(d_table.get() && d_lens.get() && d_start.get());
  KVQ_ASSERT_CUDA(d_table.upload(traffic.table()));
  KVQ_ASSERT_CUDA(d_lens.upload(lens));
  KVQ_ASSERT_CUDA(d_start.upload(start));
  for (bool with_start : {true, false}) {
    const std::int64_t out_tokens = with_start ? total : batch * traffic.max_pages() * c.L.page_size;
    const TokenRows out = dense_rows(out_tokens, heads, dim);
    std::vector<T> want_k = poisoned<T>(out_tokens * heads * dim, kPoisonValueByte), want_v = want_k;
    const SequenceTable h_seqs{batch, traffic.max_pages(), traffic.table().data(), lens.data(),
                               with_start ? start.data() : nullptr};
    ASSERT_EQ(reference::gather_kv(c.on_host(), h_seqs, want_k.data(), want_v.data(), out), cudaSuccess);
    DeviceBuffer<T> dk(want_k.size()), dv(want_v.size());
    ASSERT_TRUE(dk.get() && dv.get());
    KVQ_ASSERT_CUDA(dk.poison(kPoisonValueByte));
    KVQ_ASSERT_CUDA(dv.poison(kPoisonValueByte));
    const SequenceTable d_seqs{batch, traffic.max_pages(), d_table.get(), d_lens.get(),
                               with_start ? d_start.get() : nullptr};
    KVQ_ASSERT_CUDA(gather_kv(c.on_device(), d_seqs, dk.get(), dv.get(), out));
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<T> got_k, got_v;
    KVQ_ASSERT_CUDA(dk.download(got_k));
    KVQ_ASSERT_CUDA(dv.download(got_v));
    const std::string how = what + (with_start ? " (out_start)" : " (padded rows)");
    expect_identical(got_k, want_k, "gather_kv K " + how);
    expect_identical(got_v, want_v, "gather_kv V " + how);
  }
}

/// After a run of traffic: the device counted the tokens the reference skipped, `expected` of
/// them, and gather_kv agrees on both sides.
template <class T>
void expect_counted_then_gather(TwinCache& c, const Traffic& traffic, const DeviceBuffer<unsigned long long>& d_errors,
                                unsigned long long host_errors, unsigned long long expected, const std::string& what) {
  std::vector<unsigned long long> errors;
  KVQ_ASSERT_CUDA(d_errors.download(errors));
  EXPECT_EQ(errors[0], host_errors) << what;
  EXPECT_EQ(host_errors, expected) << what;
  gather_both<T>(c, traffic, what);
}

TYPED_TEST(GpuPaged, RandomTrafficEqualsTheReferenceAfterEveryStep) {
  using T = TypeParam;
  // KVQ_TEST_SHAPES=small (the sanitizer runs): two page sizes and head dims, every layout.
  const std::vector<std::int64_t> page_sizes = small_shapes() ? std::vector<std::int64_t>{1, 16}
                                                               : std::vector<std::int64_t>{1, 16, 64, 128};
  const std::vector<std::int64_t> dims = small_shapes() ? std::vector<std::int64_t>{80, 128}
                                                         : std::vector<std::int64_t>{64, 80, 96, 128, 256};
  for (PoolLayout layout : {PoolLayout::kNhdPadded, PoolLayout::kHnd, PoolLayout::kInterleavedNhd})
    for (std::int64_t page_size : page_sizes)
      for (std::int64_t dim : dims) {
        const std::int64_t heads = 2, pages = 2048 / page_size + 5;
        TwinCache c(CacheLayout(pages, page_size, heads, dim, layout));
        ASSERT_TRUE(c.device.get());
        KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
        DeviceBuffer<unsigned long long> d_errors(1);
        KVQ_ASSERT_CUDA(d_errors.poison(0));
        unsigned long long host_errors = 0;
        Traffic traffic(7, pages, page_size, pages, 11 * page_size + dim);
        const std::string what = c.L.name();
        for (int step = 0; step < 6; ++step) {
          std::vector<std::int64_t> slots = traffic.step(step % 3 != 0, 200);
          slots.insert(slots.begin() + slots.size() / 2, pages * page_size + step);  // past the pool
          append_both<T>(c, slots, 100 * step + dim, d_errors.get(), host_errors, what + " step " + std::to_string(step));
          if (::testing::Test::HasFatalFailure()) return;
        }
        expect_counted_then_gather<T>(c, traffic, d_errors, host_errors, 6, what);
        if (::testing::Test::HasFailure()) return;
      }
}

TYPED_TEST(GpuPaged, KeysPerChannelPageTrafficEqualsTheReferenceAfterEveryStep) {
  using T = TypeParam;
  const std::vector<std::int64_t> page_sizes = small_shapes() ? std::vector<std::int64_t>{1, 16}
                                                               : std::vector<std::int64_t>{1, 16, 64, 128};
  const std::vector<std::int64_t> dims = small_shapes() ? std::vector<std::int64_t>{80, 128}
                                                         : std::vector<std::int64_t>{64, 80, 96, 128, 256};
  constexpr int kSeqs = 7;
  for (PoolLayout layout : {PoolLayout::kNhdPadded, PoolLayout::kHnd, PoolLayout::kInterleavedNhd})
    for (std::int64_t page_size : page_sizes)
      for (std::int64_t dim : dims)
        for (std::int64_t sinks : {0, 1}) {
          const std::int64_t heads = 2, pages = 2048 / page_size + 5;
          TwinCache c(CacheLayout(pages, page_size, heads, dim, layout, ByPage{kSeqs, sinks, element_type_of<T>()}));
          ASSERT_TRUE(c.device.get());
          KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
          DeviceBuffer<unsigned long long> d_errors(1);
          KVQ_ASSERT_CUDA(d_errors.poison(0));
          unsigned long long host_errors = 0;
          Traffic traffic(kSeqs, pages, page_size, pages / kSeqs, 13 * page_size + dim + sinks);
          const std::string what = c.L.name();
          for (int step = 0; step < 6; ++step) {
            // Chunks of up to 3 pages and a bit: half-filled pages close while others open.
            std::vector<std::int64_t> slots = traffic.step(step % 3 == 2, 3 * page_size + 5);
            std::vector<std::int32_t> ids = traffic.seq_ids(), pos = traffic.positions();
            slots.push_back(0), ids.push_back(kSeqs), pos.push_back(0);  // an id past max_seqs: counted
            append_both<T>(c, slots, 100 * step + dim, d_errors.get(), host_errors, what + " step " + std::to_string(step),
                           ids, pos);
            if (::testing::Test::HasFatalFailure()) return;
          }
          expect_counted_then_gather<T>(c, traffic, d_errors, host_errors, 6, what);
          if (::testing::Test::HasFailure()) return;
        }
}

// Runs broken inside a call (a skipped token, a position out of line): the open rows of a run
// that another row of its sequence follows are not kept (reference::append_kv's `superseded`),
// and every byte equals the reference's, whatever the GPU's blocks do first.
TYPED_TEST(GpuPaged, KeysPerChannelPageRunsBrokenInsideACall) {
  using T = TypeParam;
  const std::int64_t page_size = 4, pages = 8, heads = 2, dim = 128;
  TwinCache c(CacheLayout(pages, page_size, heads, dim, PoolLayout::kHnd, ByPage{2, 0, element_type_of<T>()}));
  ASSERT_TRUE(c.device.get());
  KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
  DeviceBuffer<unsigned long long> d_errors(1);
  KVQ_ASSERT_CUDA(d_errors.poison(0));
  unsigned long long host_errors = 0;
  auto slot = [&](std::int64_t page, std::int64_t pos) { return page * page_size + pos % page_size; };
  // Sequence 0 on pages 3 then 5, sequence 1 on page 6; positions 0 and 1 of sequence 0 first.
  append_both<T>(c, {slot(3, 0), slot(3, 1)}, 1, d_errors.get(), host_errors, "positions 0, 1", {0, 0}, {0, 1});
  // 2, a slot past the pool for 3, then 4, 5: position 2 is superseded, 4 and 5 stay open.
  append_both<T>(c, {slot(3, 2), pages * page_size + 3, slot(5, 4), slot(5, 5), slot(6, 0)}, 2, d_errors.get(),
                 host_errors, "a skipped token", {0, 0, 0, 0, 1}, {2, 3, 4, 5, 0});
  // 6, 7: page 5 closes, 4 and 5 from the buffer rows the previous call kept.
  append_both<T>(c, {slot(5, 6), slot(5, 7), slot(6, 1)}, 3, d_errors.get(), host_errors, "a page closing", {0, 0, 1},
                 {6, 7, 1});
  // A position out of line (3 after 6, its offset its slot's): 6 is superseded, 3 closes a page
  // from whatever the buffer holds, on both sides alike.
  append_both<T>(c, {slot(5, 6), slot(5, 3), slot(6, 2)}, 4, d_errors.get(), host_errors, "a position out of line",
                 {0, 0, 1}, {6, 3, 2});
  std::vector<unsigned long long> errors;
  KVQ_ASSERT_CUDA(d_errors.download(errors));
  EXPECT_EQ(errors[0], host_errors);
  EXPECT_EQ(host_errors, 1u);
}

// Scheme 2's decode step (a cooperative launch) captured once and replayed with new contents.
TYPED_TEST(GpuPaged, KeysPerChannelPageDecodeStepCapturedOnceReplays) {
  using T = TypeParam;
  constexpr int kSeqs = 16;
  const std::int64_t page_size = 16, pages = kSeqs * 3, heads = 8, dim = 128;
  TwinCache c(CacheLayout(pages, page_size, heads, dim, PoolLayout::kHnd, ByPage{kSeqs, 1, element_type_of<T>()}));
  ASSERT_TRUE(c.device.get());
  KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
  const TokenRows rows = dense_rows(kSeqs, heads, dim);
  DeviceBuffer<T> dk(kSeqs * heads * dim), dv(kSeqs * heads * dim);
  DeviceBuffer<std::int64_t> ds(kSeqs);
  DeviceBuffer<std::int32_t> d_ids(kSeqs), d_pos(kSeqs);
  ASSERT_TRUE(dk.get() && dv.get() && ds.get() && d_ids.get() && d_pos.get());
  CapturedCall graph;
  KVQ_ASSERT_CUDA(graph.capture([&](cudaStream_t stream) {
    return append_kv(dk.get(), dv.get(), rows, ds.get(), TokenPositions{d_ids.get(), d_pos.get()}, c.on_device(),
                     nullptr, stream);
  }));
  Traffic traffic(kSeqs, pages, page_size, 3, 9);
  for (int step = 0; step < 40; ++step) {  // pages fill, close and new ones open
    std::vector<std::int64_t> slots = traffic.step(true, 1);
    std::vector<std::int32_t> ids = traffic.seq_ids(), pos = traffic.positions();
    for (std::size_t i = slots.size(); i-- > 0;)
      if (slots[i] < 0) {
        slots.erase(slots.begin() + i);
        ids.erase(ids.begin() + i);
        pos.erase(pos.begin() + i);
      }
    slots.resize(kSeqs, -1);  // the graph's batch: padding past the live sequences
    ids.resize(kSeqs, 0);
    pos.resize(kSeqs, 0);
    const std::vector<T> k = random_rows<T>(kSeqs * heads * dim, 3000 + step), v = random_rows<T>(kSeqs * heads * dim, 4000 + step);
    KVQ_ASSERT_CUDA(dk.upload(k));
    KVQ_ASSERT_CUDA(dv.upload(v));
    KVQ_ASSERT_CUDA(ds.upload(slots));
    KVQ_ASSERT_CUDA(d_ids.upload(ids));
    KVQ_ASSERT_CUDA(d_pos.upload(pos));
    KVQ_ASSERT_CUDA(graph.replay());
    ASSERT_EQ(reference::append_kv(k.data(), v.data(), rows, slots.data(), TokenPositions{ids.data(), pos.data()},
                                   c.on_host()),
              cudaSuccess);
    std::vector<std::uint8_t> got;
    KVQ_ASSERT_CUDA(c.device.download(got));
    ASSERT_EQ(first_difference(got, c.host), -1) << "replay " << step;
  }
}

TYPED_TEST(GpuPaged, DecodeStepOfManySequencesAndEightHeads) {
  using T = TypeParam;
  for (bool by_page : {false, true})
    for (int sequences : {1, 64, 256}) {
      const std::int64_t page_size = 16, pages = sequences * 4 + 2;
      const ByPage bp = by_page ? ByPage{sequences, 1, element_type_of<T>()} : ByPage{};
      TwinCache c(CacheLayout(pages, page_size, 8, 128, PoolLayout::kNhdPadded, bp));
      ASSERT_TRUE(c.device.get());
      KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
      unsigned long long host_errors = 0;
      Traffic traffic(sequences, pages, page_size, 4, sequences);
      const std::string what = std::string(by_page ? "keys per channel, " : "") + std::to_string(sequences) + " sequences";
      auto append = [&](bool decode, std::int64_t chunk, std::uint64_t seed, const std::string& step) {
        const std::vector<std::int64_t> slots = traffic.step(decode, chunk);
        const std::vector<std::int32_t> none;
        append_both<T>(c, slots, seed, nullptr, host_errors, what + " " + step, by_page ? traffic.seq_ids() : none,
                       by_page ? traffic.positions() : none);
      };
      append(false, 40, 1, "prefill");
      for (int step = 0; step < 3 && !::testing::Test::HasFatalFailure(); ++step) append(true, 1, 10 + step, "decode");
      if (::testing::Test::HasFatalFailure()) return;
      gather_both<T>(c, traffic, what);
    }
}

TYPED_TEST(GpuPaged, DecodeStepCapturedOnceReplaysWithNewContents) {
  using T = TypeParam;
  constexpr int kSeqs = 32;
  const std::int64_t page_size = 16, pages = kSeqs * 2, heads = 8, dim = 128;
  TwinCache c(CacheLayout(pages, page_size, heads, dim, PoolLayout::kHnd));
  ASSERT_TRUE(c.device.get());
  KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
  const TokenRows rows = dense_rows(kSeqs, heads, dim);
  DeviceBuffer<T> dk(kSeqs * heads * dim), dv(kSeqs * heads * dim);
  DeviceBuffer<std::int64_t> ds(kSeqs);
  ASSERT_TRUE(dk.get() && dv.get() && ds.get());
  CapturedCall graph;
  KVQ_ASSERT_CUDA(graph.capture(
      [&](cudaStream_t stream) { return append_kv(dk.get(), dv.get(), rows, ds.get(), c.on_device(), nullptr, stream); }));
  Traffic traffic(kSeqs, pages, page_size, 2, 5);
  for (int step = 0; step < 20; ++step) {  // 20 decode steps: pages fill and new ones are taken
    const std::vector<std::int64_t> slots = traffic.step(true, 1);
    ASSERT_EQ(slots.size() >= static_cast<std::size_t>(kSeqs), true);
    std::vector<std::int64_t> fixed(slots.begin(), slots.end());
    fixed.erase(std::remove(fixed.begin(), fixed.end(), -1), fixed.end());
    fixed.resize(kSeqs, -1);  // the graph's batch: padding past the live sequences
    const std::vector<T> k = random_rows<T>(kSeqs * heads * dim, 1000 + step), v = random_rows<T>(kSeqs * heads * dim, 2000 + step);
    KVQ_ASSERT_CUDA(dk.upload(k));
    KVQ_ASSERT_CUDA(dv.upload(v));
    KVQ_ASSERT_CUDA(ds.upload(fixed));
    KVQ_ASSERT_CUDA(graph.replay());
    ASSERT_EQ(reference::append_kv(k.data(), v.data(), rows, fixed.data(), c.on_host()), cudaSuccess);
    std::vector<std::uint8_t> got;
    KVQ_ASSERT_CUDA(c.device.download(got));
    ASSERT_EQ(first_difference(got, c.host), -1) << "replay " << step;
  }
}

TYPED_TEST(GpuPaged, UntrustedTablesAreSkippedAndCountedAsTheReference) {
  using T = TypeParam;
  TwinCache c(CacheLayout(8, 4, 1, 64, PoolLayout::kNhdPadded));
  ASSERT_TRUE(c.device.get());
  KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
  unsigned long long host_errors = 0;
  DeviceBuffer<unsigned long long> d_errors(1);
  KVQ_ASSERT_CUDA(d_errors.poison(0));
  // Fill every slot, with slots far past the pool and padding mixed in.
  std::vector<std::int64_t> slots;
  for (std::int64_t s = 0; s < 32; ++s) slots.insert(slots.end(), {s, -1, std::int64_t{1} << 40});
  append_both<T>(c, slots, 3, d_errors.get(), host_errors, "append");
  std::vector<unsigned long long> errors;
  KVQ_ASSERT_CUDA(d_errors.download(errors));
  EXPECT_EQ(errors[0], 32u);
  EXPECT_EQ(host_errors, 32u);

  const std::vector<std::int32_t> table = {0, 1, 9, -1, 2, 3, 4, 5, 6, 7, 0, 0}, lens = {14, 17, 6}, start = {0, 20, 30};
  DeviceBuffer<std::int32_t> dt(table.size()), dl(lens.size()), dst(start.size());
  ASSERT_TRUE(dt.get() && dl.get() && dst.get());
  KVQ_ASSERT_CUDA(dt.upload(table));
  KVQ_ASSERT_CUDA(dl.upload(lens));
  KVQ_ASSERT_CUDA(dst.upload(start));
  std::vector<T> want_k = poisoned<T>(32 * 64, kPoisonValueByte), want_v = want_k;
  unsigned long long want_count = 0;
  ASSERT_EQ(reference::gather_kv(c.on_host(), SequenceTable{3, 4, table.data(), lens.data(), start.data()}, want_k.data(),
                                 want_v.data(), dense_rows(32, 1, 64), &want_count),
            cudaSuccess);
  DeviceBuffer<T> dk(want_k.size()), dv(want_v.size());
  ASSERT_TRUE(dk.get() && dv.get());
  KVQ_ASSERT_CUDA(dk.poison(kPoisonValueByte));
  KVQ_ASSERT_CUDA(dv.poison(kPoisonValueByte));
  KVQ_ASSERT_CUDA(d_errors.poison(0));
  KVQ_ASSERT_CUDA(gather_kv(c.on_device(), SequenceTable{3, 4, dt.get(), dl.get(), dst.get()}, dk.get(), dv.get(),
                            dense_rows(32, 1, 64), d_errors.get()));
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  KVQ_ASSERT_CUDA(d_errors.download(errors));
  EXPECT_EQ(want_count, 11u);
  EXPECT_EQ(errors[0], want_count);
  std::vector<T> got_k, got_v;
  KVQ_ASSERT_CUDA(dk.download(got_k));
  KVQ_ASSERT_CUDA(dv.download(got_v));
  expect_identical(got_k, want_k, "gather_kv K with untrusted tables");
  expect_identical(got_v, want_v, "gather_kv V with untrusted tables");
}

TYPED_TEST(GpuPaged, BadArgumentsReturnAnErrorAndLaunchNothing) {
  using T = TypeParam;
  TwinCache c(CacheLayout(4, 16, 2, 64, PoolLayout::kHnd));
  ASSERT_TRUE(c.device.get());
  KVQ_ASSERT_CUDA(c.device.poison(kCachePoison));
  DeviceBuffer<T> dk(4 * 2 * 64);
  DeviceBuffer<std::int64_t> ds(4);
  PagedCache bad = c.on_device();
  bad.page_size = 0;
  EXPECT_EQ(append_kv(dk.get(), dk.get(), dense_rows(4, 2, 64), ds.get(), bad), cudaErrorInvalidValue);
  EXPECT_EQ(append_kv<T>(nullptr, dk.get(), dense_rows(4, 2, 64), ds.get(), c.on_device()), cudaErrorInvalidValue);
  EXPECT_EQ(gather_kv<T>(c.on_device(), SequenceTable{1, 1, nullptr, nullptr, nullptr}, dk.get(), dk.get() + 128,
                         dense_rows(1, 2, 64)),
            cudaErrorInvalidValue);
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<std::uint8_t> got;
  KVQ_ASSERT_CUDA(c.device.download(got));
  EXPECT_EQ(first_difference(got, c.host), -1) << "a refused call touched the cache";
}

}  // namespace
}  // namespace kvq::test
