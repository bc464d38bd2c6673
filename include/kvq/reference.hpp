// kvq/reference.hpp: the CPU reference of every operation.
//
// The oracle the GPU tests compare against bit for bit, and the CPU baseline the benchmark reports
// speedups over. Plain C++17 (g++ or nvcc's host pass); loops run in memory order, parallel over
// independent rows or channel blocks when the translation unit is built with OpenMP. The two
// builds are different functions (reference::parallel:: and reference::serial::, an inline
// namespace chosen by _OPENMP), so TUs built with and without OpenMP can be linked together without
// two meanings for one inline function; their results are the same, element for element.
//
// Same signatures, argument order, validation and error codes as the GPU API in quantize.cuh and
// paged.cuh, with host pointers; `spec.nonfinite_count` and the paged operations' `error_count`,
// when set, are host counters.
#pragma once

#include <kvq/version.hpp>

#include <kvq/attention.hpp>
#include <kvq/numerics.hpp>
#include <kvq/paged.hpp>
#include <kvq/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

KVQ_NAMESPACE_BEGIN
namespace reference {
// OpenMP is optional: without it the loops run serially and no pragma warning is raised.
#if defined(_OPENMP)
inline namespace parallel {
#define KVQ_OMP_FOR _Pragma("omp parallel for schedule(static)")
#define KVQ_OMP_FOR_COUNT _Pragma("omp parallel for reduction(+ : nonfinite) schedule(static)")
#else
inline namespace serial {
#define KVQ_OMP_FOR
#define KVQ_OMP_FOR_COUNT
#endif
namespace detail {

/// Channels processed together by one thread in the per-channel reductions: a block of columns
/// that is read row by row (memory order), small enough to keep its amax in L1.
constexpr std::int64_t kChannelBlock = 256;

inline std::int64_t rows_of(const KvView& v) { return v.batch * v.tokens; }

/// Per-token amax of row (b, t), group by group, into `scales` (scale values, not amax).
template <class T>
unsigned long long per_token_row_scales(const T* row, std::int64_t channels, std::int64_t group, float* scales) {
  unsigned long long nonfinite = 0;
  for (std::int64_t c0 = 0, g = 0; c0 < channels; c0 += group, ++g) {
    const std::int64_t c1 = std::min(c0 + group, channels);
    std::uint32_t amax = 0;
    for (std::int64_t c = c0; c < c1; ++c) {
      const float x = to_float(row[c]);
      nonfinite += !is_finite(x);
      amax = std::max(amax, finite_abs_bits(x));
    }
    scales[g] = scale_from_amax(bits_to_float(amax));
  }
  return nonfinite;
}

template <class T>
unsigned long long compute_scales(const T* x, const KvView& v, const QuantSpec& spec, float* scales) {
  unsigned long long nonfinite = 0;
  if (spec.granularity == Granularity::kPerToken) {
    const std::int64_t group = group_length(v.channels, spec.group);
    const std::int64_t rows = rows_of(v);
KVQ_OMP_FOR_COUNT
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t b = r / v.tokens, t = r % v.tokens;
      nonfinite += per_token_row_scales(x + v.offset(b, t, 0), v.channels, group, scales + scale_offset(v, spec, b, t, 0));
    }
    return nonfinite;
  }
  // Per-channel: each (batch, token group, channel block) reduces its rows top to bottom.
  const std::int64_t group = group_length(v.tokens, spec.group);
  const std::int64_t tgroups = group_count(v.tokens, spec.group);
  const std::int64_t cblocks = (v.channels + kChannelBlock - 1) / kChannelBlock;
  const std::int64_t items = v.batch * tgroups * cblocks;
KVQ_OMP_FOR_COUNT
  for (std::int64_t i = 0; i < items; ++i) {
    const std::int64_t cb = i % cblocks, tg = (i / cblocks) % tgroups, b = i / (cblocks * tgroups);
    const std::int64_t c0 = cb * kChannelBlock, c1 = std::min(c0 + kChannelBlock, v.channels);
    const std::int64_t t0 = tg * group, t1 = std::min(t0 + group, v.tokens);
    std::uint32_t amax[kChannelBlock] = {};
    for (std::int64_t t = t0; t < t1; ++t) {
      const T* row = x + v.offset(b, t, 0);
      for (std::int64_t c = c0; c < c1; ++c) {
        const float xv = to_float(row[c]);
        nonfinite += !is_finite(xv);
        amax[c - c0] = std::max(amax[c - c0], finite_abs_bits(xv));
      }
    }
    float* srow = scales + scale_offset(v, spec, b, tg, 0);
    for (std::int64_t c = c0; c < c1; ++c) srow[c] = scale_from_amax(bits_to_float(amax[c - c0]));
  }
  return nonfinite;
}

template <class T>
unsigned long long quantize_with_scales(const T* x, const float* scales, const KvView& v, const QuantSpec& spec,
                                        std::int8_t* q) {
  unsigned long long nonfinite = 0;
  const std::int64_t rows = rows_of(v);
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const std::int64_t group = per_token ? group_length(v.channels, spec.group) : group_length(v.tokens, spec.group);
KVQ_OMP_FOR_COUNT
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t b = r / v.tokens, t = r % v.tokens;
    const T* xr = x + v.offset(b, t, 0);
    std::int8_t* qr = q + v.offset(b, t, 0);
    if (per_token) {
      const float* srow = scales + scale_offset(v, spec, b, t, 0);
      for (std::int64_t c0 = 0, g = 0; c0 < v.channels; c0 += group, ++g) {
        const float s = sanitize_scale(srow[g]);
        const std::int64_t c1 = std::min(c0 + group, v.channels);
        for (std::int64_t c = c0; c < c1; ++c) {
          const float xv = to_float(xr[c]);
          nonfinite += !is_finite(xv);
          qr[c] = quantize_value(xv, s);
        }
      }
    } else {
      const float* srow = scales + scale_offset(v, spec, b, t / group, 0);
      for (std::int64_t c = 0; c < v.channels; ++c) {
        const float xv = to_float(xr[c]);
        nonfinite += !is_finite(xv);
        qr[c] = quantize_value(xv, sanitize_scale(srow[c]));
      }
    }
  }
  return nonfinite;
}

template <class T>
void dequantize(const std::int8_t* q, const float* scales, const KvView& v, const QuantSpec& spec, T* y) {
  const std::int64_t rows = rows_of(v);
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const std::int64_t group = per_token ? group_length(v.channels, spec.group) : group_length(v.tokens, spec.group);
KVQ_OMP_FOR
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t b = r / v.tokens, t = r % v.tokens;
    const std::int8_t* qr = q + v.offset(b, t, 0);
    T* yr = y + v.offset(b, t, 0);
    if (per_token) {
      const float* srow = scales + scale_offset(v, spec, b, t, 0);
      for (std::int64_t c0 = 0, g = 0; c0 < v.channels; c0 += group, ++g) {
        const float s = sanitize_scale(srow[g]);
        const std::int64_t c1 = std::min(c0 + group, v.channels);
        for (std::int64_t c = c0; c < c1; ++c) yr[c] = dequantize_value<T>(qr[c], s);
      }
    } else {
      const float* srow = scales + scale_offset(v, spec, b, t / group, 0);
      for (std::int64_t c = 0; c < v.channels; ++c) yr[c] = dequantize_value<T>(qr[c], sanitize_scale(srow[c]));
    }
  }
}

inline void add_count(const QuantSpec& spec, unsigned long long n) {
  if (spec.nonfinite_count != nullptr) *spec.nonfinite_count += n;
}

}  // namespace detail

/// scales (see scale_shape) <- the scale of every group of x.
template <class T>
cudaError_t compute_scales(const T* x,  // view over (batch, tokens, channels)
                           const KvView& view, const QuantSpec& spec,
                           float* scales) {  // scale_shape(view, spec), at spec.scale_strides
  if (cudaError_t err = validate_compute_scales(x, view, spec, scales); err != cudaSuccess || view.empty()) return err;
  detail::add_count(spec, detail::compute_scales(x, view, spec, scales));
  return cudaSuccess;
}

/// scales <- computed from x, then q <- codes of x under them. NaN/Inf are counted once.
template <class T>
cudaError_t quantize(const T* x,  // view over (batch, tokens, channels)
                     const KvView& view, const QuantSpec& spec,
                     std::int8_t* q,  // same view as x
                     float* scales) {  // scale_shape(view, spec), at spec.scale_strides
  if (cudaError_t err = validate_quantize(x, view, spec, q, scales); err != cudaSuccess || view.empty()) return err;
  detail::add_count(spec, detail::compute_scales(x, view, spec, scales));
  detail::quantize_with_scales(x, scales, view, spec, q);
  return cudaSuccess;
}

/// q <- codes of x under given (calibrated) scales: the paper's path.
template <class T>
cudaError_t quantize_with_scales(const T* x,  // view over (batch, tokens, channels)
                                 const float* scales,  // scale_shape(view, spec), at spec.scale_strides
                                 const KvView& view, const QuantSpec& spec,
                                 std::int8_t* q) {  // same view as x
  if (cudaError_t err = validate_quantize_with_scales(x, scales, view, spec, q); err != cudaSuccess || view.empty()) return err;
  detail::add_count(spec, detail::quantize_with_scales(x, scales, view, spec, q));
  return cudaSuccess;
}

/// y <- float(q) * scale, rounded to T.
template <class T>
cudaError_t dequantize(const std::int8_t* q,  // view over (batch, tokens, channels)
                       const float* scales,  // scale_shape(view, spec), at spec.scale_strides
                       const KvView& view, const QuantSpec& spec,
                       T* y) {  // same view as q
  if (cudaError_t err = validate_dequantize(q, scales, view, spec, y); err != cudaSuccess || view.empty()) return err;
  detail::dequantize(q, scales, view, spec, y);
  return cudaSuccess;
}

namespace detail {

/// x[i] of a cache's full-precision buffer, as float.
inline float full_value(const void* p, ElementType t, std::int64_t i) {
  switch (t) {
    case ElementType::kFloat: return static_cast<const float*>(p)[i];
    case ElementType::kHalf: return to_float(static_cast<const __half*>(p)[i]);
    default: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

/// Whether token j is one append_kv writes under kKeysPerChannelPage: a slot in the pool, a
/// sequence id below max_seqs, a position >= 0 whose offset in its page is the slot's.
inline bool valid_token(const PagedCache& c, const std::int64_t* slots, const TokenPositions& tp, std::int64_t j) {
  const std::int64_t slot = slots[j], seq = tp.seq_ids[j], pos = tp.positions[j];
  return slot >= 0 && slot < c.slots() && seq >= 0 && seq < c.max_seqs && pos >= 0 && pos % c.page_size == slot % c.page_size;
}

/// The run of valid token t: the consecutive rows around it that are valid tokens of the same
/// sequence at consecutive positions.
struct TokenRun {
  std::int64_t first_row, first_pos, last_pos;
};
inline TokenRun run_of(const PagedCache& c, const std::int64_t* slots, const TokenPositions& tp, std::int64_t tokens,
                       std::int64_t t) {
  const std::int32_t seq = tp.seq_ids[t];
  const std::int64_t pos = tp.positions[t];
  auto member = [&](std::int64_t j) {
    return j >= 0 && j < tokens && valid_token(c, slots, tp, j) && tp.seq_ids[j] == seq && tp.positions[j] == pos + (j - t);
  };
  std::int64_t a = t, b = t;
  while (member(a - 1)) --a;
  while (member(b + 1)) ++b;
  return TokenRun{a, pos - (t - a), pos + (b - t)};
}

}  // namespace detail

/// The paged cache's write path (kvq::append_kv): every (token, head) row of K and V quantized
/// into its slot; under kKeysPerChannelPage keys per channel when their page fills. Same skipping
/// and counting of untrusted slots (and ids and positions) as the GPU.
template <class T>
cudaError_t append_kv(const T* k_new,  // rows (tokens, kv_heads, head_dim)
                      const T* v_new,  // rows
                      const TokenRows& rows,
                      const std::int64_t* slot_mapping,  // (tokens)
                      const TokenPositions& positions,   // (tokens) each; kKeysPerChannelPage only
                      const PagedCache& cache,
                      unsigned long long* error_count = nullptr) {
  if (cudaError_t err = validate_append_kv(k_new, v_new, rows, slot_mapping, positions, cache); err != cudaSuccess)
    return err;
  const std::int64_t d = cache.head_dim, ps = cache.page_size, heads = cache.kv_heads;
  const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
  auto code_at = [&](const PageStrides& s, std::int8_t* pool, std::int64_t page, std::int64_t offset, std::int64_t h) {
    return pool + page * s.page_stride + offset * s.token_stride + h * s.head_stride;
  };
  auto row_of = [&](const T* x, std::int64_t t, std::int64_t h) { return x + t * rows.token_stride + h * rows.head_stride; };
  auto quantize_row = [&](const T* x, std::int8_t* q, float* scale) {
    detail::per_token_row_scales(x, d, d, scale);  // one group: the whole row
    for (std::int64_t c = 0; c < d; ++c) q[c] = quantize_value(to_float(x[c]), *scale);
  };
  for (std::int64_t t = 0; t < rows.tokens; ++t) {
    const std::int64_t slot = slot_mapping[t];
    if (slot < 0) continue;  // padding
    const bool valid = by_page ? detail::valid_token(cache, slot_mapping, positions, t) : slot < cache.slots();
    if (!valid) {
      if (error_count != nullptr) ++*error_count;
      continue;
    }
    const std::int64_t page = slot / ps, offset = slot % ps;
    for (std::int64_t h = 0; h < heads; ++h) {
      quantize_row(row_of(v_new, t, h), code_at(cache.v_strides, cache.v_codes, page, offset, h),
                   cache.v_scales + cache.scale_offset(slot, h));
      if (!by_page)
        quantize_row(row_of(k_new, t, h), code_at(cache.k_strides, cache.k_codes, page, offset, h),
                     cache.k_scales + cache.scale_offset(slot, h));
    }
  }
  if (!by_page) return cudaSuccess;

  // Keys per channel per page. As the GPU: every closing page reads the open-page buffer as it was
  // before the call, then the open pages the call leaves are written to it; sinks are copied.
  T* open = static_cast<T*>(cache.k_open);
  std::vector<T> staged;  // the rows written to `open`, after every page is closed
  std::vector<std::int64_t> staged_at;
  for (std::int64_t t = 0; t < rows.tokens; ++t) {
    if (slot_mapping[t] < 0 || !detail::valid_token(cache, slot_mapping, positions, t)) continue;
    const std::int64_t seq = positions.seq_ids[t], pos = positions.positions[t], slot = slot_mapping[t];
    const detail::TokenRun run = detail::run_of(cache, slot_mapping, positions, rows.tokens, t);
    const std::int64_t page_index = pos / ps, last_page = run.last_pos / ps;
    const bool closes = page_index < last_page || (run.last_pos + 1) % ps == 0;
    // An open run followed by another row of its sequence (a skipped token, or a position that
    // breaks the run): the sequence goes on past it, so this page is not its open page after the
    // call and its keys are not kept (the open-page buffer holds one page a sequence).
    const std::int64_t after = run.first_row + (run.last_pos - run.first_pos) + 1;
    const bool superseded = !closes && after < rows.tokens && slot_mapping[after] >= 0 && positions.seq_ids[after] == seq;
    for (std::int64_t h = 0; h < heads; ++h) {
      if (pos < cache.sink_tokens) {
        for (std::int64_t c = 0; c < d; ++c) {
          static_cast<T*>(cache.k_sink)[cache.sink_offset(seq, pos, h, c)] = row_of(k_new, t, h)[c];
          static_cast<T*>(cache.v_sink)[cache.sink_offset(seq, pos, h, c)] = row_of(v_new, t, h)[c];
        }
      }
      if (!closes) {  // the open page after the call
        if (superseded) continue;
        for (std::int64_t c = 0; c < d; ++c) {
          staged.push_back(row_of(k_new, t, h)[c]);
          staged_at.push_back(cache.open_offset(seq, pos % ps, h, c));
        }
        continue;
      }
      if (pos % ps != ps - 1) continue;  // only the page's last token closes it
      const std::int64_t page = slot / ps, start = page_index * ps;
      const std::int64_t old_end = page_index == run.first_pos / ps ? run.first_pos : start;  // [start, old_end): open buffer
      auto key = [&](std::int64_t q, std::int64_t c) {
        return q < old_end ? to_float(open[cache.open_offset(seq, q % ps, h, c)])
                           : to_float(row_of(k_new, run.first_row + (q - run.first_pos), h)[c]);
      };
      for (std::int64_t c = 0; c < d; ++c) {
        std::uint32_t amax = 0;
        for (std::int64_t q = std::max(start, cache.sink_tokens); q <= pos; ++q) amax = std::max(amax, finite_abs_bits(key(q, c)));
        const float scale = scale_from_amax(bits_to_float(amax));
        cache.k_scales[cache.channel_scale_offset(page, h, c)] = scale;
        for (std::int64_t q = start; q <= pos; ++q)
          code_at(cache.k_strides, cache.k_codes, page, q % ps, h)[c] = quantize_value(key(q, c), scale);
      }
    }
  }
  for (std::size_t i = 0; i < staged.size(); ++i) open[staged_at[i]] = staged[i];
  return cudaSuccess;
}

/// append_kv under kPerTokenHead (no positions needed).
template <class T>
cudaError_t append_kv(const T* k_new, const T* v_new, const TokenRows& rows, const std::int64_t* slot_mapping,
                      const PagedCache& cache, unsigned long long* error_count = nullptr) {
  return reference::append_kv<T>(k_new, v_new, rows, slot_mapping, TokenPositions{}, cache, error_count);
}

namespace detail {

/// Row (token t of a sequence of length len and id seq, on `page`; head h; K or V) of the cache as
/// gather_kv returns it, rounded to T.
template <class T>
void token_values(const PagedCache& cache, std::int64_t seq, std::int64_t len, std::int64_t t, std::int64_t page,
                  std::int64_t h, bool is_v, T* y) {
  const std::int64_t ps = cache.page_size, offset = t % ps, slot = page * ps + offset;
  const bool by_page = cache.scheme == PagedScheme::kKeysPerChannelPage;
  const PageStrides& s = is_v ? cache.v_strides : cache.k_strides;
  const std::int8_t* q = (is_v ? cache.v_codes : cache.k_codes) + page * s.page_stride + offset * s.token_stride +
                         h * s.head_stride;
  for (std::int64_t c = 0; c < cache.head_dim; ++c) {
    if (by_page && t < cache.sink_tokens)
      y[c] = from_float<T>(full_value(is_v ? cache.v_sink : cache.k_sink, cache.open_type, cache.sink_offset(seq, t, h, c)));
    else if (by_page && !is_v && t >= len / ps * ps)
      y[c] = from_float<T>(full_value(cache.k_open, cache.open_type, cache.open_offset(seq, offset, h, c)));
    else if (by_page && !is_v)
      y[c] = dequantize_value<T>(q[c], sanitize_scale(cache.k_scales[cache.channel_scale_offset(page, h, c)]));
    else
      y[c] = dequantize_value<T>(q[c], sanitize_scale((is_v ? cache.v_scales : cache.k_scales)[cache.scale_offset(slot, h)]));
  }
}

/// Sequence b of a table: its id and length, or false (the sequence is skipped) when the length
/// is below 0 or past the table's pages, or, under kKeysPerChannelPage, the id is outside the cache.
inline bool table_sequence(const PagedCache& cache, const SequenceTable& seqs, std::int64_t b, std::int64_t& seq,
                           std::int64_t& len) {
  len = seqs.seq_lens[b];
  seq = seqs.seq_ids != nullptr ? seqs.seq_ids[b] : b;
  return len >= 0 && len <= seqs.max_pages_per_seq * cache.page_size &&
         (cache.scheme != PagedScheme::kKeysPerChannelPage || (seq >= 0 && seq < cache.max_seqs));
}

/// Page of token t of sequence b, or -1 when the table's entry is outside the pool.
inline std::int64_t table_page(const PagedCache& cache, const SequenceTable& seqs, std::int64_t b, std::int64_t t) {
  const std::int64_t page = seqs.block_table[b * seqs.max_pages_per_seq + t / cache.page_size];
  return page >= 0 && page < cache.num_pages ? page : -1;
}

}  // namespace detail

/// The paged cache's read path (kvq::gather_kv): the sequences' tokens dequantized to dense rows;
/// under kKeysPerChannelPage the open page's keys and the sinks come from their full-precision
/// buffers. Same skipping and counting of untrusted table data as the GPU.
template <class T>
cudaError_t gather_kv(const PagedCache& cache, const SequenceTable& seqs,
                      T* k_out,  // out (tokens, kv_heads, head_dim)
                      T* v_out,  // out
                      const TokenRows& out,
                      unsigned long long* error_count = nullptr) {
  if (cudaError_t err = validate_gather_kv(cache, seqs, k_out, v_out, out); err != cudaSuccess) return err;
  if (seqs.batch == 0 || seqs.max_pages_per_seq == 0 || out.tokens == 0) return cudaSuccess;
  const std::int64_t max_tokens = seqs.max_pages_per_seq * cache.page_size;
  auto count = [&] {
    if (error_count != nullptr) ++*error_count;
  };
  for (std::int64_t b = 0; b < seqs.batch; ++b) {
    std::int64_t seq = 0, len = 0;
    if (!detail::table_sequence(cache, seqs, b, seq, len)) {
      count();
      continue;
    }
    const std::int64_t start = seqs.out_start != nullptr ? seqs.out_start[b] : b * max_tokens;
    for (std::int64_t t = 0; t < len; ++t) {
      const std::int64_t page = detail::table_page(cache, seqs, b, t), row = start + t;
      if (page < 0 || row < 0 || row >= out.tokens) {
        count();
        continue;
      }
      for (std::int64_t h = 0; h < cache.kv_heads; ++h)
        for (int kv = 0; kv < 2; ++kv)
          detail::token_values(cache, seq, len, t, page, h, kv == 1,
                               (kv ? v_out : k_out) + row * out.token_stride + h * out.head_stride);
    }
  }
  return cudaSuccess;
}

/// Decode attention (kvq::decode_attention's oracle): for each sequence b and query head qh,
/// softmax(sm_scale * q K^T) V over the sequence's keys and values of KV head qh / group, as
/// gather_kv dequantizes them to fp32, accumulated in float64 and rounded to T; lse (optional)
/// the natural log of sum(exp(sm_scale * q k)). A sequence of length 0 gives 0 and lse -inf. Table
/// data is skipped and counted as gather_kv skips it (a skipped sequence gives 0 and -inf).
template <class T>
cudaError_t decode_attention(const T* q, const QueryRows& q_rows,  // (batch, q_heads, head_dim)
                             const PagedCache& cache, const SequenceTable& seqs, float sm_scale,
                             T* out, const QueryRows& out_rows,  // (batch, q_heads, head_dim)
                             float* lse = nullptr,               // (batch, q_heads) or null
                             unsigned long long* error_count = nullptr) {
  if (cudaError_t err = validate_decode_attention(q, q_rows, cache, seqs, out, out_rows, lse); err != cudaSuccess)
    return err;
  const std::int64_t d = cache.head_dim, group = q_rows.q_heads / cache.kv_heads;
  std::vector<float> k(static_cast<std::size_t>(d)), v(static_cast<std::size_t>(d));
  std::vector<double> scores, acc(static_cast<std::size_t>(d));
  std::vector<std::int64_t> pages;
  for (std::int64_t b = 0; b < q_rows.batch; ++b) {
    std::int64_t seq = 0, len = 0;
    const bool valid = detail::table_sequence(cache, seqs, b, seq, len);
    if (!valid) {
      if (error_count != nullptr) ++*error_count;
      len = 0;
    }
    pages.assign(static_cast<std::size_t>(len), -1);
    for (std::int64_t t = 0; t < len; ++t) {
      pages[t] = detail::table_page(cache, seqs, b, t);
      if (pages[t] < 0 && error_count != nullptr) ++*error_count;  // skipped: no part in the softmax
    }
    for (std::int64_t qh = 0; qh < q_rows.q_heads; ++qh) {
      const std::int64_t h = qh / group;
      const T* qr = q + b * q_rows.batch_stride + qh * q_rows.head_stride;
      scores.assign(static_cast<std::size_t>(len), 0.0);
      double m = -INFINITY;
      for (std::int64_t t = 0; t < len; ++t) {
        if (pages[t] < 0) continue;
        detail::token_values(cache, seq, len, t, pages[t], h, false, k.data());
        double dot = 0;
        for (std::int64_t c = 0; c < d; ++c) dot += static_cast<double>(to_float(qr[c])) * k[c];
        scores[t] = static_cast<double>(sm_scale) * dot;
        m = std::max(m, scores[t]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0;
      for (std::int64_t t = 0; t < len; ++t) {
        if (pages[t] < 0) continue;
        const double p = std::exp(scores[t] - m);
        sum += p;
        detail::token_values(cache, seq, len, t, pages[t], h, true, v.data());
        for (std::int64_t c = 0; c < d; ++c) acc[c] += p * v[c];
      }
      T* o = out + b * out_rows.batch_stride + qh * out_rows.head_stride;
      for (std::int64_t c = 0; c < d; ++c) o[c] = from_float<T>(sum > 0 ? static_cast<float>(acc[c] / sum) : 0.0f);
      if (lse != nullptr) lse[b * q_rows.q_heads + qh] = sum > 0 ? static_cast<float>(m + std::log(sum)) : -INFINITY;
    }
  }
  return cudaSuccess;
}

}  // namespace parallel or serial
}  // namespace reference
KVQ_NAMESPACE_END

#undef KVQ_OMP_FOR
#undef KVQ_OMP_FOR_COUNT
