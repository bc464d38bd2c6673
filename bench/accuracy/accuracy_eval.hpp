// accuracy_eval.hpp: what each int8 scheme costs on a captured K/V cache (CPU reference only).
//
// Shared by bench/accuracy/kvq_accuracy.cpp (the study) and tests/accuracy_data_test.cpp (the CI
// check on the committed extract), so both compute the same numbers the same way.
//
// Input: files written by bench/accuracy/capture_kv.py, one per (layer, tensor, head):
//   "KVQCAP01", uint32 n (little-endian), n bytes of JSON header, fp16 data [tokens, head_dim].
// A layer's K and V are assembled into the vLLM-style cache layout (tokens, kv_heads, head_dim) and
// quantized through the strided view {kv_heads, tokens, head_dim, head_dim, kv_heads * head_dim}:
// one scale set per KV head, as engines keep them. Dequantized values are rounded back to fp16, the
// type an fp16 attention kernel would read.
//
// Metrics per layer, for a configuration (K scheme or exact, V scheme or exact):
//   reconstruction  max |x - x_hat| and ||x - x_hat|| / ||x|| over the layer's whole K (or V);
//   score error     the paper's mean_t |q . k_t - q . k_hat_t| (unscaled dot products), averaged over
//                   the sampled real queries of every query head, each over the keys it can see;
//   output error    ||O - O_hat|| / ||O|| with O = softmax(q K^T / sqrt(d)) V per sampled query and
//                   query head (GQA: query head h reads KV head h / (heads / kv_heads)), accumulated
//                   over the layer; causal for a decoder (query t sees keys 0..t), full for an encoder.
//   sink            attention mass on token 0 (exact), and the relative error of row 0 of K and V.
#pragma once

#include <kvq/metrics.hpp>
#include <kvq/reference.hpp>
#include <kvq/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvq_accuracy {

// ---------------------------------------------------------------------------------------------
// Capture files
// ---------------------------------------------------------------------------------------------

/// One captured head: data (tokens, dim), fp16, plus the fields of its JSON header used here.
struct Capture {
  std::string header;  // the JSON text, as written
  std::string tensor;  // "key", "value" or "query"
  std::string model;
  int layer = -1, head = -1, kv_head = -1;
  bool causal = true;
  std::int64_t tokens = 0, dim = 0;
  std::vector<__half> data;  // (tokens, dim)
};

namespace detail {

/// Position just after `"key":` in a flat JSON object written by json.dumps (sort_keys), or npos.
inline std::size_t find_value(const std::string& json, const std::string& key) {
  const std::string pattern = "\"" + key + "\":";
  std::size_t p = json.find(pattern);
  if (p == std::string::npos) return p;
  p += pattern.size();
  while (p < json.size() && json[p] == ' ') ++p;
  return p;
}

}  // namespace detail

/// The string value of `key` (JSON escapes other than \" and \\ are kept as written).
inline std::string json_string(const std::string& json, const std::string& key) {
  std::size_t p = detail::find_value(json, key);
  if (p == std::string::npos || json[p] != '"') throw std::runtime_error("header has no string field " + key);
  std::string out;
  for (++p; p < json.size() && json[p] != '"'; ++p) {
    if (json[p] == '\\' && p + 1 < json.size()) ++p;
    out += json[p];
  }
  return out;
}

inline long long json_int(const std::string& json, const std::string& key) {
  std::size_t p = detail::find_value(json, key);
  if (p == std::string::npos) throw std::runtime_error("header has no field " + key);
  return std::stoll(json.substr(p, 32));
}

inline bool json_bool(const std::string& json, const std::string& key) {
  std::size_t p = detail::find_value(json, key);
  if (p == std::string::npos) throw std::runtime_error("header has no field " + key);
  return json.compare(p, 4, "true") == 0;
}

inline std::vector<long long> json_int_array(const std::string& json, const std::string& key) {
  std::size_t p = detail::find_value(json, key);
  if (p == std::string::npos || json[p] != '[') throw std::runtime_error("header has no array field " + key);
  const std::size_t end = json.find(']', p);
  std::vector<long long> out;
  std::size_t i = p + 1;
  while (i < end) {
    std::size_t used = 0;
    out.push_back(std::stoll(json.substr(i, end - i), &used));
    i += used;
    while (i < end && (json[i] == ',' || json[i] == ' ')) ++i;
  }
  return out;
}

/// Reads one capture file; throws std::runtime_error when it is missing or malformed.
/// `max_tokens` > 0 keeps only the first max_tokens rows.
inline Capture read_capture(const std::string& path, std::int64_t max_tokens = 0) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  std::uint32_t n = 0;
  unsigned char len[4];
  if (!f.read(magic, 8) || std::memcmp(magic, "KVQCAP01", 8) != 0) throw std::runtime_error(path + ": not a kvq capture");
  if (!f.read(reinterpret_cast<char*>(len), 4)) throw std::runtime_error(path + ": truncated");
  n = std::uint32_t(len[0]) | std::uint32_t(len[1]) << 8 | std::uint32_t(len[2]) << 16 | std::uint32_t(len[3]) << 24;
  Capture c;
  c.header.resize(n);
  if (!f.read(c.header.data(), n)) throw std::runtime_error(path + ": truncated header");
  if (json_string(c.header, "dtype") != "float16") throw std::runtime_error(path + ": dtype is not float16");
  const std::vector<long long> shape = json_int_array(c.header, "shape");
  if (shape.size() != 2 || shape[0] <= 0 || shape[1] <= 0) throw std::runtime_error(path + ": bad shape");
  c.tensor = json_string(c.header, "tensor");
  c.model = json_string(c.header, "model");
  c.layer = static_cast<int>(json_int(c.header, "layer"));
  c.head = static_cast<int>(json_int(c.header, "head"));
  c.kv_head = static_cast<int>(json_int(c.header, "kv_head"));
  c.causal = json_bool(c.header, "causal");
  c.dim = shape[1];
  const std::int64_t stored = shape[0];
  c.tokens = max_tokens > 0 ? std::min<std::int64_t>(stored, max_tokens) : stored;
  // fp16 little-endian on disk; this code assumes a little-endian host (x86-64, AArch64).
  c.data.resize(static_cast<std::size_t>(c.tokens * c.dim));
  if (!f.read(reinterpret_cast<char*>(c.data.data()), static_cast<std::streamsize>(c.data.size() * sizeof(__half))))
    throw std::runtime_error(path + ": truncated data");
  return c;
}

inline std::string capture_path(const std::string& dir, int layer, const char* tensor, int head) {
  char name[64];
  std::snprintf(name, sizeof(name), "/layer%02d_%s_head%d.kvqcap", layer, tensor, head);
  return dir + name;
}

inline bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

// ---------------------------------------------------------------------------------------------
// A layer's cache and queries
// ---------------------------------------------------------------------------------------------

struct Layer {
  std::string model;
  int index = -1;
  bool causal = true;
  std::int64_t tokens = 0, dim = 0;
  int kv_heads = 0;
  std::vector<__half> k, v;       // (tokens, kv_heads, dim): the cache layout
  std::vector<int> q_head;        // the query heads present (an extract may keep a subset)
  std::vector<int> q_kv_head;     // the KV head each reads
  std::vector<__half> q;          // (q_head.size(), tokens, dim)

  kvq::KvView view() const { return kvq::KvView{kv_heads, tokens, dim, dim, kv_heads * dim}; }
};

/// Layer indices present in a capture folder (an extract may keep a subset), in order.
inline std::vector<int> list_layers(const std::string& dir, int max_layer = 256) {
  std::vector<int> out;
  for (int l = 0; l < max_layer; ++l)
    if (file_exists(capture_path(dir, l, "key", 0))) out.push_back(l);
  return out;
}

inline Layer load_layer(const std::string& dir, int layer, std::int64_t max_tokens = 0) {
  Layer L;
  L.index = layer;
  std::vector<Capture> ks, vs;
  for (int h = 0; file_exists(capture_path(dir, layer, "key", h)); ++h) {
    ks.push_back(read_capture(capture_path(dir, layer, "key", h), max_tokens));
    vs.push_back(read_capture(capture_path(dir, layer, "value", h), max_tokens));
  }
  if (ks.empty()) throw std::runtime_error("no key files for layer " + std::to_string(layer) + " in " + dir);
  L.kv_heads = static_cast<int>(ks.size());
  L.tokens = ks[0].tokens;
  L.dim = ks[0].dim;
  L.causal = ks[0].causal;
  L.model = ks[0].model;
  const std::int64_t T = L.tokens, D = L.dim, H = L.kv_heads;
  L.k.resize(static_cast<std::size_t>(T * H * D));
  L.v.resize(L.k.size());
  for (int h = 0; h < H; ++h) {
    for (const Capture* c : {&ks[h], &vs[h]})
      if (c->tokens != T || c->dim != D) throw std::runtime_error("layer " + std::to_string(layer) + ": shapes differ");
    for (std::int64_t t = 0; t < T; ++t) {
      std::copy_n(&ks[h].data[t * D], D, &L.k[(t * H + h) * D]);
      std::copy_n(&vs[h].data[t * D], D, &L.v[(t * H + h) * D]);
    }
  }
  for (int h = 0; h < 256; ++h) {
    const std::string p = capture_path(dir, layer, "query", h);
    if (!file_exists(p)) continue;
    Capture c = read_capture(p, max_tokens);
    if (c.tokens != T || c.dim != D || c.kv_head < 0 || c.kv_head >= H)
      throw std::runtime_error(p + ": shape or kv_head does not match the layer");
    L.q_head.push_back(h);
    L.q_kv_head.push_back(c.kv_head);
    L.q.insert(L.q.end(), c.data.begin(), c.data.end());
  }
  if (L.q_head.empty()) throw std::runtime_error("no query files for layer " + std::to_string(layer));
  return L;
}

// ---------------------------------------------------------------------------------------------
// Schemes and configurations
// ---------------------------------------------------------------------------------------------

struct Scheme {
  const char* id;    // short, for CSV and the command line
  const char* name;  // for tables
  kvq::QuantSpec spec;
};

/// Every scheme kvq has, in the order the tables use.
inline std::vector<Scheme> all_schemes() {
  using kvq::Granularity;
  return {
      {"tok", "per-token", {Granularity::kPerToken, 0}},
      {"tok32", "per-token, groups of 32 ch", {Granularity::kPerToken, 32}},
      {"tok128", "per-token, groups of 128 ch", {Granularity::kPerToken, 128}},
      {"ch", "per-channel, whole sequence", {Granularity::kPerChannel, 0}},
      {"ch32", "per-channel, groups of 32 tok", {Granularity::kPerChannel, 32}},
      {"ch128", "per-channel, groups of 128 tok", {Granularity::kPerChannel, 128}},
  };
}

/// A configuration: which scheme quantizes K and which V (-1: kept exact, fp16).
struct Config {
  int k = -1, v = -1;
};

inline std::string config_name(const std::vector<Scheme>& s, const Config& c) {
  if (c.k >= 0 && c.v < 0) return std::string("K ") + s[c.k].id;
  if (c.k < 0 && c.v >= 0) return std::string("V ") + s[c.v].id;
  if (c.k >= 0 && c.v >= 0) return c.k == c.v ? std::string("KV ") + s[c.k].id
                                              : std::string("K ") + s[c.k].id + " + V " + s[c.v].id;
  return "exact";
}

inline int scheme_index(const std::vector<Scheme>& s, const std::string& id) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (id == s[i].id) return static_cast<int>(i);
  throw std::runtime_error("unknown scheme " + id);
}

/// For every scheme: K alone, V alone, both; then the mixed pairs an engine would pick.
inline std::vector<Config> default_configs(const std::vector<Scheme>& s) {
  std::vector<Config> out;
  for (int i = 0; i < static_cast<int>(s.size()); ++i) out.push_back({i, -1});
  for (int i = 0; i < static_cast<int>(s.size()); ++i) out.push_back({-1, i});
  for (int i = 0; i < static_cast<int>(s.size()); ++i) out.push_back({i, i});
  out.push_back({scheme_index(s, "ch128"), scheme_index(s, "tok")});
  out.push_back({scheme_index(s, "ch"), scheme_index(s, "tok")});
  out.push_back({scheme_index(s, "tok32"), scheme_index(s, "tok")});
  return out;
}

/// x -> quantize -> dequantize (to fp16) with kvq's CPU reference, over `view` (dense buffer of
/// the view's layout). The first `keep` tokens of every head are left exact and excluded from the
/// scales (an engine keeping its sink tokens in fp16).
inline std::vector<__half> roundtrip(const std::vector<__half>& x, const kvq::KvView& view, const kvq::QuantSpec& spec,
                                     std::int64_t keep = 0) {
  std::vector<__half> y = x;
  keep = std::min(keep, view.tokens);
  if (keep == view.tokens) return y;
  kvq::KvView sub = view;
  sub.tokens = view.tokens - keep;
  const std::int64_t off = keep * view.token_stride;
  std::vector<std::int8_t> q(x.size());
  std::vector<float> scales(static_cast<std::size_t>(kvq::scale_count(sub, spec)));
  if (kvq::reference::quantize(x.data() + off, sub, spec, q.data() + off, scales.data()) != cudaSuccess ||
      kvq::reference::dequantize(q.data() + off, scales.data(), sub, spec, y.data() + off) != cudaSuccess)
    throw std::runtime_error("kvq::reference rejected the view");
  return y;
}

/// (tokens, heads, dim) cache layout -> (heads, tokens, dim) float, one dense matrix per head.
inline std::vector<float> head_major(const std::vector<__half>& x, std::int64_t T, int H, std::int64_t D) {
  std::vector<float> out(x.size());
  for (int h = 0; h < H; ++h)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t d = 0; d < D; ++d) out[(h * T + t) * D + d] = __half2float(x[(t * H + h) * D + d]);
  return out;
}

/// `n` query positions spread evenly over [0, tokens), always including the last (0: all).
inline std::vector<std::int64_t> query_positions(std::int64_t tokens, std::int64_t n) {
  std::vector<std::int64_t> out;
  if (n <= 0 || n >= tokens) {
    for (std::int64_t t = 0; t < tokens; ++t) out.push_back(t);
    return out;
  }
  for (std::int64_t j = 1; j <= n; ++j) out.push_back(j * tokens / n - 1);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

struct Options {
  std::int64_t queries = 64;  // sampled query positions per query head (0: every position)
  std::int64_t keep = 0;      // leading tokens kept exact (sink tokens), excluded from the scales
};

struct Result {
  Config config;
  double k_max_abs = 0, k_rel_l2 = 0, v_max_abs = 0, v_rel_l2 = 0;
  double k_sink_rel = 0, v_sink_rel = 0;  // ||x_hat[0] - x[0]|| / ||x[0]|| over all KV heads
  double score_error = 0;                 // the paper's metric (0 when K is exact)
  double output_error = 0;                // relative L2 of the attention output over the layer
  std::vector<double> output_error_head;  // per query head present
};

struct LayerEval {
  int layer = -1;
  double sink_attention = 0;  // mean attention probability on token 0 (exact), sampled queries
  std::vector<Result> results;
};

namespace detail {

inline double row0_rel(const std::vector<__half>& x, const std::vector<__half>& y, std::int64_t n) {
  return kvq::metrics::relative_l2_error(x.data(), y.data(), n);
}

}  // namespace detail

/// Evaluates every configuration on one layer.
inline LayerEval evaluate_layer(const Layer& L, const std::vector<Scheme>& schemes, const std::vector<Config>& configs,
                                const Options& opt) {
  const std::int64_t T = L.tokens, D = L.dim, n = T * L.kv_heads * D;
  const int H = L.kv_heads, NQ = static_cast<int>(L.q_head.size());
  const kvq::KvView view = L.view();

  // Reconstructions, only of what the configurations use. Index 0: exact; 1 + s: scheme s.
  const std::size_t S = schemes.size();
  std::vector<char> need_k(S, 0), need_v(S, 0);
  for (const Config& c : configs) {
    if (c.k >= 0) need_k[c.k] = 1;
    if (c.v >= 0) need_v[c.v] = 1;
  }
  std::vector<std::vector<__half>> k_hat(S), v_hat(S);
  std::vector<std::vector<float>> kf(S + 1), vf(S + 1);
  kf[0] = head_major(L.k, T, H, D);
  vf[0] = head_major(L.v, T, H, D);
  for (std::size_t s = 0; s < S; ++s) {
    if (need_k[s]) {
      k_hat[s] = roundtrip(L.k, view, schemes[s].spec, opt.keep);
      kf[s + 1] = head_major(k_hat[s], T, H, D);
    }
    if (need_v[s]) {
      v_hat[s] = roundtrip(L.v, view, schemes[s].spec, opt.keep);
      vf[s + 1] = head_major(v_hat[s], T, H, D);
    }
  }
  std::vector<float> qf(L.q.size());
  for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = __half2float(L.q[i]);

  const std::vector<std::int64_t> pos = query_positions(T, opt.queries);
  const std::int64_t P = static_cast<std::int64_t>(pos.size());
  const std::int64_t items = NQ * P;
  auto visible = [&](std::int64_t t) { return L.causal ? t + 1 : T; };

  // Exact outputs and the attention on token 0, once per (query head, position).
  std::vector<double> exact(static_cast<std::size_t>(items * D));
  std::vector<double> sink(static_cast<std::size_t>(items));
#pragma omp parallel for schedule(dynamic, 4)
  for (std::int64_t it = 0; it < items; ++it) {
    const int h = static_cast<int>(it / P);
    const std::int64_t t = pos[it % P], nk = visible(t);
    const float* q = &qf[(h * T + t) * D];
    const std::int64_t kvo = static_cast<std::int64_t>(L.q_kv_head[h]) * T * D;
    kvq::metrics::attention(q, 1, &kf[0][kvo], &vf[0][kvo], nk, D, &exact[it * D]);
    // p_0 = exp(s_0 - m) / sum exp(s_t - m), recomputed here (metrics::attention keeps p private).
    const double inv = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<double> s(static_cast<std::size_t>(nk));
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < nk; ++j) {
      double acc = 0.0;
      for (std::int64_t d = 0; d < D; ++d) acc += double(q[d]) * double(kf[0][kvo + j * D + d]);
      s[j] = acc * inv;
      mx = std::max(mx, s[j]);
    }
    double sum = 0.0;
    for (std::int64_t j = 0; j < nk; ++j) sum += std::exp(s[j] - mx);
    sink[it] = std::exp(s[0] - mx) / sum;
  }

  LayerEval out;
  out.layer = L.index;
  for (double p : sink) out.sink_attention += p;
  out.sink_attention /= static_cast<double>(items);

  const std::int64_t row = H * D;  // token 0 of every KV head: the first row of the cache layout
  for (const Config& c : configs) {
    Result r;
    r.config = c;
    if (c.k >= 0) {
      r.k_max_abs = kvq::metrics::max_abs_error(L.k.data(), k_hat[c.k].data(), n);
      r.k_rel_l2 = kvq::metrics::relative_l2_error(L.k.data(), k_hat[c.k].data(), n);
      r.k_sink_rel = detail::row0_rel(L.k, k_hat[c.k], row);
    }
    if (c.v >= 0) {
      r.v_max_abs = kvq::metrics::max_abs_error(L.v.data(), v_hat[c.v].data(), n);
      r.v_rel_l2 = kvq::metrics::relative_l2_error(L.v.data(), v_hat[c.v].data(), n);
      r.v_sink_rel = detail::row0_rel(L.v, v_hat[c.v], row);
    }
    const std::vector<float>& ka = kf[c.k + 1];
    const std::vector<float>& va = vf[c.v + 1];
    std::vector<double> num(static_cast<std::size_t>(items)), den(static_cast<std::size_t>(items)),
        score(static_cast<std::size_t>(items));
#pragma omp parallel for schedule(dynamic, 4)
    for (std::int64_t it = 0; it < items; ++it) {
      const int h = static_cast<int>(it / P);
      const std::int64_t t = pos[it % P], nk = visible(t);
      const float* q = &qf[(h * T + t) * D];
      const std::int64_t kvo = static_cast<std::int64_t>(L.q_kv_head[h]) * T * D;
      std::vector<double> o(static_cast<std::size_t>(D));
      kvq::metrics::attention(q, 1, &ka[kvo], &va[kvo], nk, D, o.data());
      double a = 0.0, b = 0.0;
      for (std::int64_t d = 0; d < D; ++d) {
        const double e = exact[it * D + d];
        a += (e - o[d]) * (e - o[d]);
        b += e * e;
      }
      num[it] = a;
      den[it] = b;
      score[it] = c.k >= 0 ? kvq::metrics::attention_score_error(q, &kf[0][kvo], &ka[kvo], nk, D) : 0.0;
    }
    double tn = 0, td = 0, ts = 0;
    r.output_error_head.assign(static_cast<std::size_t>(NQ), 0.0);
    for (int h = 0; h < NQ; ++h) {
      double hn = 0, hd = 0;
      for (std::int64_t j = 0; j < P; ++j) {
        hn += num[h * P + j];
        hd += den[h * P + j];
        ts += score[h * P + j];
      }
      r.output_error_head[h] = hd > 0 ? std::sqrt(hn / hd) : 0.0;
      tn += hn;
      td += hd;
    }
    r.output_error = td > 0 ? std::sqrt(tn / td) : 0.0;
    r.score_error = ts / static_cast<double>(items);
    out.results.push_back(std::move(r));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Summaries across layers
// ---------------------------------------------------------------------------------------------

struct Summary {
  double mean = 0, p99 = 0, worst = 0;
  int worst_layer = -1;
};

/// Mean, 99th percentile (linear interpolation between order statistics) and maximum.
inline Summary summarize(const std::vector<double>& values, const std::vector<int>& layers) {
  Summary s;
  if (values.empty()) return s;
  std::vector<double> v = values;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  std::sort(v.begin(), v.end());
  const double r = 0.99 * static_cast<double>(v.size() - 1);
  const std::size_t lo = static_cast<std::size_t>(r);
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  s.p99 = v[lo] + (r - static_cast<double>(lo)) * (v[hi] - v[lo]);
  const auto it = std::max_element(values.begin(), values.end());
  s.worst = *it;
  s.worst_layer = layers[static_cast<std::size_t>(it - values.begin())];
  return s;
}

}  // namespace kvq_accuracy
