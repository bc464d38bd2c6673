// examples/torch/csrc/paged_ops.cu: kvq's paged cache as torch custom ops (namespace `kvq`).
//
// A cache is torch tensors: k_codes and v_codes int8 [pages, page_size, kv_heads, head_dim] for
// layout "NHD" or [pages, kv_heads, page_size, head_dim] for "HND" (any strides with contiguous
// channels, so K and V may be the two halves of one [pages, 2, ...] pool), v_scales fp32 [pages,
// page_size, kv_heads], k_scales fp32 of that shape for scheme "per_token_head" or [pages,
// kv_heads, head_dim] for "keys_per_channel_page", which also takes k_open [max_seqs, page_size,
// kv_heads, head_dim] of the tokens' dtype and optionally k_sink / v_sink [max_seqs, sink_tokens,
// kv_heads, head_dim]. kvq_torch.PagedKvCache builds them. kvq validates the assembled cache
// (sizes, strides, overlaps, alignment) before anything is launched.
#include "common.hpp"

#include <kvq/attention.cuh>
#include <kvq/paged.cuh>

#include <optional>

namespace kvq_torch {
namespace {

struct CacheTensors {
  const at::Tensor& k_codes;
  const at::Tensor& v_codes;
  const at::Tensor& k_scales;
  const at::Tensor& v_scales;
  const std::string& layout;
  const std::string& scheme;
  const c10::optional<at::Tensor>& k_open;
  const c10::optional<at::Tensor>& k_sink;
  const c10::optional<at::Tensor>& v_sink;
};

kvq::PageStrides strides_of(const at::Tensor& codes, bool nhd) {
  return kvq::PageStrides{codes.stride(0), codes.stride(nhd ? 1 : 2), codes.stride(nhd ? 2 : 1)};
}

kvq::ElementType element_type_of(at::ScalarType s) {
  return s == at::kFloat ? kvq::ElementType::kFloat : s == at::kHalf ? kvq::ElementType::kHalf : kvq::ElementType::kBfloat16;
}

/// The kvq::PagedCache the tensors describe, after the checks torch can make (device, dtype,
/// rank); kvq's own validation follows in the op.
kvq::PagedCache cache_of(const CacheTensors& c, const at::Device& device) {
  TORCH_CHECK(c.layout == "NHD" || c.layout == "HND", "kvq: layout must be 'NHD' or 'HND', got '", c.layout, "'");
  TORCH_CHECK(c.scheme == "per_token_head" || c.scheme == "keys_per_channel_page",
              "kvq: scheme must be 'per_token_head' or 'keys_per_channel_page', got '", c.scheme, "'");
  const bool nhd = c.layout == "NHD", by_page = c.scheme == "keys_per_channel_page";
  for (auto [t, name] : {std::pair{&c.k_codes, "k_codes"}, std::pair{&c.v_codes, "v_codes"}}) {
    check_cuda(*t, name, device);
    TORCH_CHECK(t->scalar_type() == at::kChar, "kvq: ", name, " must be int8, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4, "kvq: ", name, " must be 4-D ([pages, page_size, kv_heads, head_dim] or HND), got ",
                text(t->dim()), " dimensions");
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "kvq: ", name, "'s channels must be contiguous");
  }
  TORCH_CHECK(c.k_codes.sizes() == c.v_codes.sizes(), "kvq: k_codes ", text(c.k_codes.sizes()), " and v_codes ",
              text(c.v_codes.sizes()), " differ");
  kvq::PagedCache cache;
  cache.num_pages = c.k_codes.size(0);
  cache.page_size = c.k_codes.size(nhd ? 1 : 2);
  cache.kv_heads = c.k_codes.size(nhd ? 2 : 1);
  cache.head_dim = c.k_codes.size(3);
  cache.scheme = by_page ? kvq::PagedScheme::kKeysPerChannelPage : kvq::PagedScheme::kPerTokenHead;
  cache.k_codes = c.k_codes.data_ptr<int8_t>();
  cache.v_codes = c.v_codes.data_ptr<int8_t>();
  cache.k_strides = strides_of(c.k_codes, nhd);
  cache.v_strides = strides_of(c.v_codes, nhd);
  const std::vector<int64_t> token_scales{cache.num_pages, cache.page_size, cache.kv_heads};
  const std::vector<int64_t> channel_scales{cache.num_pages, cache.kv_heads, cache.head_dim};
  auto check_scales = [&](const at::Tensor& s, const char* name, const std::vector<int64_t>& shape) {
    check_cuda(s, name, device);
    TORCH_CHECK(s.scalar_type() == at::kFloat, "kvq: ", name, " must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.sizes() == at::IntArrayRef(shape), "kvq: ", name, " must be ", text(shape), ", got ", text(s.sizes()));
    TORCH_CHECK(s.is_contiguous(), "kvq: ", name, " must be contiguous");
  };
  check_scales(c.k_scales, "k_scales", by_page ? channel_scales : token_scales);
  check_scales(c.v_scales, "v_scales", token_scales);
  cache.k_scales = c.k_scales.data_ptr<float>();
  cache.v_scales = c.v_scales.data_ptr<float>();
  if (!by_page) return cache;
  TORCH_CHECK(c.k_open.has_value(), "kvq: scheme 'keys_per_channel_page' needs k_open");
  const at::Tensor& open = *c.k_open;
  check_cuda(open, "k_open", device);
  check_value_dtype(open, "k_open");
  TORCH_CHECK(open.dim() == 4 && open.size(1) == cache.page_size && open.size(2) == cache.kv_heads &&
                  open.size(3) == cache.head_dim && open.is_contiguous(),
              "kvq: k_open must be contiguous [max_seqs, page_size, kv_heads, head_dim], got ", text(open.sizes()));
  cache.open_type = element_type_of(open.scalar_type());
  cache.max_seqs = open.size(0);
  cache.k_open = open.data_ptr();
  TORCH_CHECK(c.k_sink.has_value() == c.v_sink.has_value(), "kvq: give both k_sink and v_sink, or neither");
  if (c.k_sink.has_value()) {
    for (auto [t, name] : {std::pair{&*c.k_sink, "k_sink"}, std::pair{&*c.v_sink, "v_sink"}}) {
      check_cuda(*t, name, device);
      TORCH_CHECK(t->scalar_type() == open.scalar_type(), "kvq: ", name, " must be k_open's dtype");
      TORCH_CHECK(t->dim() == 4 && t->size(0) == cache.max_seqs && t->size(2) == cache.kv_heads &&
                      t->size(3) == cache.head_dim && t->is_contiguous(),
                  "kvq: ", name, " must be contiguous [max_seqs, sink_tokens, kv_heads, head_dim], got ", text(t->sizes()));
    }
    TORCH_CHECK(c.k_sink->sizes() == c.v_sink->sizes(), "kvq: k_sink and v_sink differ");
    cache.sink_tokens = c.k_sink->size(1);
    cache.k_sink = cache.sink_tokens > 0 ? c.k_sink->data_ptr() : nullptr;
    cache.v_sink = cache.sink_tokens > 0 ? c.v_sink->data_ptr() : nullptr;
  }
  return cache;
}

void check_int(const at::Tensor& t, const char* name, at::ScalarType type, const at::Device& device, int64_t n) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == type, "kvq: ", name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "kvq: ", name, " must be contiguous [", text(n), "], got ",
              text(t.sizes()));
}

unsigned long long* counter_of(const c10::optional<at::Tensor>& error_count, const at::Device& device) {
  if (!error_count.has_value()) return nullptr;
  check_int(*error_count, "error_count", at::kLong, device, 1);
  return reinterpret_cast<unsigned long long*>(error_count->data_ptr<int64_t>());
}

/// Token rows [tokens, kv_heads, head_dim] with contiguous channels.
kvq::TokenRows rows_of(const at::Tensor& x, const char* name, const kvq::PagedCache& cache) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == cache.kv_heads && x.size(2) == cache.head_dim, "kvq: ", name,
              " must be [tokens, ", text(cache.kv_heads), ", ", text(cache.head_dim), "], got ", text(x.sizes()));
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, "kvq: ", name, "'s channels must be contiguous");
  return kvq::TokenRows{x.size(0), x.stride(0), x.stride(1)};
}

void append_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot_mapping, const at::Tensor& k_codes,
               const at::Tensor& v_codes, const at::Tensor& k_scales, const at::Tensor& v_scales, const std::string& layout,
               const std::string& scheme, const c10::optional<at::Tensor>& seq_ids,
               const c10::optional<at::Tensor>& positions, const c10::optional<at::Tensor>& k_open,
               const c10::optional<at::Tensor>& k_sink, const c10::optional<at::Tensor>& v_sink,
               const c10::optional<at::Tensor>& error_count) {
  check_cuda(k, "k");
  const at::Device device = k.device();
  check_cuda(v, "v", device);
  check_value_dtype(k, "k");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "kvq: v must be k's dtype");
  const c10::cuda::CUDAGuard guard(device);
  const kvq::PagedCache cache = cache_of({k_codes, v_codes, k_scales, v_scales, layout, scheme, k_open, k_sink, v_sink}, device);
  const kvq::TokenRows rows = rows_of(k, "k", cache);
  TORCH_CHECK(v.sizes() == k.sizes() && v.strides() == k.strides(), "kvq: v must have k's sizes and strides");
  check_int(slot_mapping, "slot_mapping", at::kLong, device, rows.tokens);
  kvq::TokenPositions tp;
  if (cache.scheme == kvq::PagedScheme::kKeysPerChannelPage) {
    TORCH_CHECK(seq_ids.has_value() && positions.has_value(), "kvq: scheme 'keys_per_channel_page' needs seq_ids and positions");
    check_int(*seq_ids, "seq_ids", at::kInt, device, rows.tokens);
    check_int(*positions, "positions", at::kInt, device, rows.tokens);
    TORCH_CHECK(k_open->scalar_type() == k.scalar_type(), "kvq: k_open must be k's dtype");
    tp = kvq::TokenPositions{seq_ids->data_ptr<int32_t>(), positions->data_ptr<int32_t>()};
  }
  unsigned long long* errors = counter_of(error_count, device);
  dispatch_value_type(k, [&](auto* kp) {
    using T = std::remove_pointer_t<decltype(kp)>;
    check_kvq(kvq::append_kv(kp, reinterpret_cast<const T*>(v.data_ptr()), rows, slot_mapping.data_ptr<int64_t>(), tp,
                             cache, errors, current_stream()),
              "append_kv");
  });
}

/// The table's SequenceTable (block_table int32 [batch, max_pages_per_seq], seq_lens int32 [batch]).
kvq::SequenceTable table_of(const at::Tensor& block_table, const at::Tensor& seq_lens,
                            const c10::optional<at::Tensor>& seq_ids, const at::Device& device) {
  check_cuda(block_table, "block_table", device);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.is_contiguous(),
              "kvq: block_table must be contiguous int32 [batch, max_pages_per_seq], got ", block_table.scalar_type(), " ",
              text(block_table.sizes()));
  const int64_t batch = block_table.size(0);
  check_int(seq_lens, "seq_lens", at::kInt, device, batch);
  if (seq_ids.has_value()) check_int(*seq_ids, "seq_ids", at::kInt, device, batch);
  return kvq::SequenceTable{batch, block_table.size(1), block_table.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                            nullptr, seq_ids.has_value() ? seq_ids->data_ptr<int32_t>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor> gather_kv(const at::Tensor& k_codes, const at::Tensor& v_codes,
                                             const at::Tensor& k_scales, const at::Tensor& v_scales,
                                             const std::string& layout, const std::string& scheme,
                                             const at::Tensor& block_table, const at::Tensor& seq_lens,
                                             at::ScalarType dtype, const c10::optional<at::Tensor>& k_open,
                                             const c10::optional<at::Tensor>& k_sink,
                                             const c10::optional<at::Tensor>& v_sink,
                                             const c10::optional<at::Tensor>& seq_ids,
                                             const c10::optional<at::Tensor>& error_count) {
  check_cuda(k_codes, "k_codes");
  const at::Device device = k_codes.device();
  const c10::cuda::CUDAGuard guard(device);
  const kvq::PagedCache cache = cache_of({k_codes, v_codes, k_scales, v_scales, layout, scheme, k_open, k_sink, v_sink}, device);
  const kvq::SequenceTable seqs = table_of(block_table, seq_lens, seq_ids, device);
  // One row per table slot: sequence b's token t at row b * max_pages_per_seq * page_size + t.
  const int64_t tokens = seqs.batch * seqs.max_pages_per_seq * cache.page_size;
  const auto options = k_codes.options().dtype(dtype);
  at::Tensor k = at::empty({tokens, cache.kv_heads, cache.head_dim}, options);
  at::Tensor v = at::empty({tokens, cache.kv_heads, cache.head_dim}, options);
  check_value_dtype(k, "dtype");
  unsigned long long* errors = counter_of(error_count, device);
  const kvq::TokenRows out = kvq::dense_rows(tokens, cache.kv_heads, cache.head_dim);
  dispatch_value_type(k, [&](auto* kp) {
    using T = std::remove_pointer_t<decltype(kp)>;
    check_kvq(kvq::gather_kv(cache, seqs, kp, reinterpret_cast<T*>(v.data_ptr()), out, errors, current_stream()),
              "gather_kv");
  });
  return {k, v};
}

std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& v_codes, const at::Tensor& k_scales,
    const at::Tensor& v_scales, const std::string& layout, const std::string& scheme, const at::Tensor& block_table,
    const at::Tensor& seq_lens, double sm_scale, int64_t max_seq_len, const c10::optional<at::Tensor>& k_open,
    const c10::optional<at::Tensor>& k_sink, const c10::optional<at::Tensor>& v_sink,
    const c10::optional<at::Tensor>& seq_ids, const c10::optional<at::Tensor>& error_count) {
  check_cuda(q, "q");
  const at::Device device = q.device();
  check_value_dtype(q, "q");
  const c10::cuda::CUDAGuard guard(device);
  const kvq::PagedCache cache = cache_of({k_codes, v_codes, k_scales, v_scales, layout, scheme, k_open, k_sink, v_sink}, device);
  const kvq::SequenceTable seqs = table_of(block_table, seq_lens, seq_ids, device);
  TORCH_CHECK(q.dim() == 3 && q.size(0) == seqs.batch && q.size(2) == cache.head_dim, "kvq: q must be [batch = ",
              text(seqs.batch), ", q_heads, ", text(cache.head_dim), "], got ", text(q.sizes()));
  TORCH_CHECK(q.stride(2) == 1, "kvq: q's channels must be contiguous");
  const kvq::QueryRows q_rows{q.size(0), q.size(1), q.stride(0), q.stride(1)};
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  const kvq::QueryRows out_rows = kvq::dense_queries(q.size(0), q.size(1), q.size(2));
  // The plan from static limits (batch and max_seq_len), so a captured call replays with other lengths.
  const kvq::DecodePlan plan = kvq::make_decode_plan(
      kvq::DecodeLimits{seqs.batch, q.size(1), cache.kv_heads, cache.head_dim, max_seq_len},
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  TORCH_CHECK(plan.splits > 0, "kvq: decode_attention does not take these limits (batch ", text(seqs.batch),
              ", q_heads ", text(q.size(1)), ", kv_heads ", text(cache.kv_heads), ", head_dim ", text(cache.head_dim),
              ", max_seq_len ", text(max_seq_len), ")");
  at::Tensor workspace = at::empty({static_cast<int64_t>(kvq::decode_workspace_bytes(plan))}, q.options().dtype(at::kByte));
  unsigned long long* errors = counter_of(error_count, device);
  dispatch_value_type(q, [&](auto* qp) {
    using T = std::remove_pointer_t<decltype(qp)>;
    check_kvq(kvq::decode_attention(qp, q_rows, cache, seqs, static_cast<float>(sm_scale),
                                    reinterpret_cast<T*>(out.data_ptr()), out_rows, lse.data_ptr<float>(), plan,
                                    workspace.data_ptr(), workspace.numel(), errors, current_stream()),
              "decode_attention");
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvq, m) {
  m.def(
      "append_kv(Tensor k, Tensor v, Tensor slot_mapping, Tensor(a!) k_codes, Tensor(b!) v_codes, Tensor(c!) k_scales, "
      "Tensor(d!) v_scales, str layout, str scheme, Tensor? seq_ids=None, Tensor? positions=None, "
      "Tensor(e!)? k_open=None, Tensor(f!)? k_sink=None, Tensor(g!)? v_sink=None, Tensor(h!)? error_count=None) -> ()");
  m.def(
      "gather_kv(Tensor k_codes, Tensor v_codes, Tensor k_scales, Tensor v_scales, str layout, str scheme, "
      "Tensor block_table, Tensor seq_lens, ScalarType dtype, Tensor? k_open=None, Tensor? k_sink=None, "
      "Tensor? v_sink=None, Tensor? seq_ids=None, Tensor(a!)? error_count=None) -> (Tensor, Tensor)");
  m.def(
      "decode_attention(Tensor q, Tensor k_codes, Tensor v_codes, Tensor k_scales, Tensor v_scales, str layout, "
      "str scheme, Tensor block_table, Tensor seq_lens, float sm_scale, int max_seq_len, Tensor? k_open=None, "
      "Tensor? k_sink=None, Tensor? v_sink=None, Tensor? seq_ids=None, Tensor(a!)? error_count=None) -> (Tensor, Tensor)");
}

// For CPU too: tensors on the wrong device then reach the op's own checks (a RuntimeError naming
// the argument) rather than the dispatcher's "could not run with arguments from the CPU backend".
namespace {
void impl_ops(torch::Library& m) {
  m.impl("append_kv", &append_kv);
  m.impl("gather_kv", &gather_kv);
  m.impl("decode_attention", &decode_attention);
}
}  // namespace

TORCH_LIBRARY_IMPL(kvq, CUDA, m) { impl_ops(m); }
TORCH_LIBRARY_IMPL(kvq, CPU, m) { impl_ops(m); }

}  // namespace kvq_torch
