// kvq_accuracy: what each int8 scheme of kvq costs, on real captured K/V caches and on the paper's
// uniform data. CPU only (kvq's reference), so it runs anywhere. See bench/accuracy/README.md.
//
//   kvq_accuracy --data DIR [--tokens N] [--queries N] [--keep N] [--layers 0,5,9]
//                [--csv FILE] [--heads-csv FILE]
//       DIR holds capture_kv.py's files for one model. Prints markdown tables (reconstruction,
//       attention, per layer); the CSV has one row per (layer, configuration), the plot's input.
//   kvq_accuracy --uniform [--tokens N] [--dims 256,1024,8192] [--queries N] [--seed S]
//       The paper's experiment: fp32 [T, D] uniform in [-1, 1], per-channel over the whole
//       sequence; max-abs error and mean |q.k - q.k_hat| for random uniform queries.
#include "accuracy_eval.hpp"

#include <kvq/metrics.hpp>
#include <kvq/reference.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace kvq_accuracy;

struct Args {
  std::string data;
  bool uniform = false;
  std::int64_t tokens = 0;
  std::int64_t queries = -1;
  std::int64_t keep = 0;
  std::vector<int> layers;
  std::vector<std::int64_t> dims = {256, 1024, 8192};
  std::uint64_t seed = 2601;
  std::string csv, heads_csv;
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "error: %s\n"
               "usage: kvq_accuracy --data DIR [--tokens N] [--queries N] [--keep N] [--layers a,b,...]\n"
               "                    [--csv FILE] [--heads-csv FILE]\n"
               "       kvq_accuracy --uniform [--tokens N] [--dims 256,1024,8192] [--queries N] [--seed S]\n",
               msg);
  std::exit(2);
}

std::vector<std::int64_t> parse_list(const std::string& s) {
  std::vector<std::int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + k).c_str());
      return argv[++i];
    };
    if (k == "--data") a.data = next();
    else if (k == "--uniform") a.uniform = true;
    else if (k == "--tokens") a.tokens = std::stoll(next());
    else if (k == "--queries") a.queries = std::stoll(next());
    else if (k == "--keep") a.keep = std::stoll(next());
    else if (k == "--layers") for (auto l : parse_list(next())) a.layers.push_back(static_cast<int>(l));
    else if (k == "--dims") a.dims = parse_list(next());
    else if (k == "--seed") a.seed = std::stoull(next());
    else if (k == "--csv") a.csv = next();
    else if (k == "--heads-csv") a.heads_csv = next();
    else if (k == "-h" || k == "--help") usage("help");
    else usage(("unknown argument " + k).c_str());
  }
  if (a.uniform == !a.data.empty()) usage("give exactly one of --data DIR and --uniform");
  return a;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- the paper's uniform experiment ---------------------------------------------------------

/// Uniform float in [-1, 1) from 24 random bits (exact, independent of the standard library's
/// distribution implementation).
float uniform_pm1(std::mt19937_64& rng) {
  return static_cast<float>(static_cast<double>(rng() >> 40) * (2.0 / 16777216.0) - 1.0);
}

int run_uniform(const Args& a) {
  const std::int64_t T = a.tokens > 0 ? a.tokens : 16384;
  const std::int64_t nq = a.queries > 0 ? a.queries : 16;
  std::printf("## Uniform data in [-1, 1], per-channel over the whole sequence (the paper's scheme)\n\n");
  std::printf("fp32 [T, D] with T = %lld, seed %llu; attention-score error = mean_t |q.k_t - q.k_hat_t| for q uniform "
              "in [-1, 1]^D: the first query (the paper uses one) and the mean and standard deviation over %lld "
              "queries.\n\n",
              static_cast<long long>(T), static_cast<unsigned long long>(a.seed), static_cast<long long>(nq));
  std::printf("| D | max-abs error | 1/254 | score error, first query | score error, mean +- sd over %lld queries |\n",
              static_cast<long long>(nq));
  std::printf("|---|---|---|---|---|\n");
  for (std::int64_t D : a.dims) {
    std::mt19937_64 rng(a.seed + static_cast<std::uint64_t>(D));
    std::vector<float> x(static_cast<std::size_t>(T * D)), y(x.size());
    for (float& v : x) v = uniform_pm1(rng);
    const kvq::KvView view = kvq::contiguous_view(T, D);
    const kvq::QuantSpec spec{kvq::Granularity::kPerChannel, 0};
    std::vector<std::int8_t> q(x.size());
    std::vector<float> scales(static_cast<std::size_t>(kvq::scale_count(view, spec)));
    if (kvq::reference::quantize(x.data(), view, spec, q.data(), scales.data()) != cudaSuccess ||
        kvq::reference::dequantize(q.data(), scales.data(), view, spec, y.data()) != cudaSuccess) {
      std::fprintf(stderr, "kvq::reference failed\n");
      return 1;
    }
    const double max_abs = kvq::metrics::max_abs_error(x.data(), y.data(), T * D);
    std::vector<double> err(static_cast<std::size_t>(nq));
    std::vector<std::vector<float>> queries(static_cast<std::size_t>(nq), std::vector<float>(static_cast<std::size_t>(D)));
    for (auto& qq : queries)
      for (float& v : qq) v = uniform_pm1(rng);
#pragma omp parallel for schedule(dynamic)
    for (std::int64_t i = 0; i < nq; ++i)
      err[i] = kvq::metrics::attention_score_error(queries[i].data(), x.data(), y.data(), T, D);
    double mean = 0, sd = 0;
    for (double e : err) mean += e;
    mean /= static_cast<double>(nq);
    for (double e : err) sd += (e - mean) * (e - mean);
    sd = nq > 1 ? std::sqrt(sd / static_cast<double>(nq - 1)) : 0.0;
    std::printf("| %lld | %.6f | %.6f | %.4f | %.4f +- %.4f |\n", static_cast<long long>(D), max_abs, 1.0 / 254.0,
                err[0], mean, sd);
    std::fflush(stdout);
  }
  return 0;
}

// ---- captured caches ------------------------------------------------------------------------

std::string fmt(double v, const char* f = "%.4g") {
  char b[64];
  std::snprintf(b, sizeof(b), f, v);
  return b;
}

std::string summary_cell(const Summary& s, const char* f = "%.4g") {
  return fmt(s.mean, f) + " / " + fmt(s.p99, f) + " / " + fmt(s.worst, f) + " (L" + std::to_string(s.worst_layer) + ")";
}

int run_data(const Args& a) {
  const std::vector<Scheme> schemes = all_schemes();
  const std::vector<Config> configs = default_configs(schemes);
  std::vector<int> layers = a.layers.empty() ? list_layers(a.data) : a.layers;
  if (layers.empty()) {
    std::fprintf(stderr, "no capture files in %s (run bench/accuracy/capture_kv.py first)\n", a.data.c_str());
    return 1;
  }
  Options opt;
  if (a.queries >= 0) opt.queries = a.queries;
  opt.keep = a.keep;

  std::vector<LayerEval> evals;
  Layer first;
  const auto t0 = std::chrono::steady_clock::now();
  for (int l : layers) {
    Layer L = load_layer(a.data, l, a.tokens);
    const auto t1 = std::chrono::steady_clock::now();
    evals.push_back(evaluate_layer(L, schemes, configs, opt));
    std::fprintf(stderr, "layer %2d: %lld tokens, %d kv heads, %zu query heads, dim %lld, %.1f s\n", l,
                 static_cast<long long>(L.tokens), L.kv_heads, L.q_head.size(), static_cast<long long>(L.dim),
                 seconds_since(t1));
    if (evals.size() == 1) {
      first = std::move(L);
      first.k.clear(), first.v.clear(), first.q.clear();
    }
  }
  const double total_s = seconds_since(t0);

  if (!a.csv.empty()) {
    std::ofstream f(a.csv);
    f << "layer,config,k_scheme,v_scheme,k_max_abs,k_rel_l2,v_max_abs,v_rel_l2,k_sink_rel,v_sink_rel,score_error,"
         "output_error,worst_head,worst_head_output_error,sink_attention\n";
    for (const LayerEval& e : evals)
      for (const Result& r : e.results) {
        const auto w = std::max_element(r.output_error_head.begin(), r.output_error_head.end());
        f << e.layer << ',' << config_name(schemes, r.config) << ',' << (r.config.k >= 0 ? schemes[r.config.k].id : "exact")
          << ',' << (r.config.v >= 0 ? schemes[r.config.v].id : "exact") << ',' << fmt(r.k_max_abs, "%.6g") << ','
          << fmt(r.k_rel_l2, "%.6g") << ',' << fmt(r.v_max_abs, "%.6g") << ',' << fmt(r.v_rel_l2, "%.6g") << ','
          << fmt(r.k_sink_rel, "%.6g") << ',' << fmt(r.v_sink_rel, "%.6g") << ',' << fmt(r.score_error, "%.6g") << ','
          << fmt(r.output_error, "%.6g") << ',' << first.q_head[w - r.output_error_head.begin()] << ','
          << fmt(*w, "%.6g") << ',' << fmt(e.sink_attention, "%.6g") << '\n';
      }
  }
  if (!a.heads_csv.empty()) {
    std::ofstream f(a.heads_csv);
    f << "layer,config,query_head,output_error\n";
    for (const LayerEval& e : evals)
      for (const Result& r : e.results)
        for (std::size_t h = 0; h < r.output_error_head.size(); ++h)
          f << e.layer << ',' << config_name(schemes, r.config) << ',' << first.q_head[h] << ','
            << fmt(r.output_error_head[h], "%.6g") << '\n';
  }

  const std::size_t C = configs.size();
  auto collect = [&](std::size_t c, double Result::*field) {
    std::vector<double> v;
    for (const LayerEval& e : evals) v.push_back(e.results[c].*field);
    return v;
  };

  std::printf("## %s\n\n", first.model.c_str());
  std::printf("%zu layers, %lld tokens, %d KV heads x head_dim %lld, %zu query heads; %s attention; %lld sampled "
              "query positions per head%s; %s. Cells: mean / p99 / worst (layer) over layers. %.0f s.\n\n",
              layers.size(), static_cast<long long>(first.tokens), first.kv_heads, static_cast<long long>(first.dim),
              first.q_head.size(), first.causal ? "causal" : "bidirectional",
              static_cast<long long>(query_positions(first.tokens, opt.queries).size()),
              opt.keep > 0 ? (", first " + std::to_string(opt.keep) + " tokens kept exact").c_str() : "",
              "fp16 cache, one scale set per KV head", total_s);

  std::printf("### Reconstruction\n\n| scheme | bytes per value | K max-abs | K relative L2 | V max-abs | V relative L2 |\n"
              "|---|---|---|---|---|---|\n");
  const kvq::KvView fv{first.kv_heads, first.tokens, first.dim, first.dim, first.kv_heads * first.dim};
  for (std::size_t c = 0; c < C; ++c) {
    const Config& cf = configs[c];
    if (!(cf.k >= 0 && cf.v == cf.k)) continue;
    const double bytes = 1.0 + 4.0 * static_cast<double>(kvq::scale_count(fv, schemes[cf.k].spec)) /
                                   static_cast<double>(fv.size());
    std::printf("| %s | %.3f | %s | %s | %s | %s |\n", schemes[cf.k].name, bytes,
                summary_cell(summarize(collect(c, &Result::k_max_abs), layers)).c_str(),
                summary_cell(summarize(collect(c, &Result::k_rel_l2), layers)).c_str(),
                summary_cell(summarize(collect(c, &Result::v_max_abs), layers)).c_str(),
                summary_cell(summarize(collect(c, &Result::v_rel_l2), layers)).c_str());
  }

  std::printf("\n### Attention (real queries)\n\n| configuration | score error (paper) | output relative L2 | worst head |\n"
              "|---|---|---|---|\n");
  for (std::size_t c = 0; c < C; ++c) {
    double worst = -1.0;
    int worst_layer = -1, worst_head = -1;
    for (const LayerEval& e : evals)
      for (std::size_t h = 0; h < e.results[c].output_error_head.size(); ++h)
        if (e.results[c].output_error_head[h] > worst) {
          worst = e.results[c].output_error_head[h];
          worst_layer = e.layer;
          worst_head = first.q_head[h];
        }
    const std::string score = configs[c].k >= 0 ? summary_cell(summarize(collect(c, &Result::score_error), layers)) : "-";
    std::printf("| %s | %s | %s | L%d.h%d: %s |\n", config_name(schemes, configs[c]).c_str(), score.c_str(),
                summary_cell(summarize(collect(c, &Result::output_error), layers)).c_str(), worst_layer, worst_head,
                fmt(worst).c_str());
  }

  // Per layer, a few telling configurations.
  const std::vector<std::string> shown = {"K tok", "K ch", "K ch128", "V tok", "V ch", "V ch128", "K ch128 + V tok"};
  std::vector<std::size_t> idx;
  for (const std::string& s : shown)
    for (std::size_t c = 0; c < C; ++c)
      if (config_name(schemes, configs[c]) == s) idx.push_back(c);
  std::printf("\n### Per layer: attention-output relative L2\n\n| layer | attention on token 0 |");
  for (std::size_t c : idx) std::printf(" %s |", config_name(schemes, configs[c]).c_str());
  std::printf("\n|---|---|");
  for (std::size_t i = 0; i < idx.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (const LayerEval& e : evals) {
    std::printf("| %d | %.2f |", e.layer, e.sink_attention);
    for (std::size_t c : idx) std::printf(" %.4f |", e.results[c].output_error);
    std::printf("\n");
  }
  std::printf("\n### Token 0 (the attention sink): relative L2 error of its row vs the whole cache, mean over layers\n\n"
              "| scheme | K row 0 | K all rows | V row 0 | V all rows |\n|---|---|---|---|---|\n");
  for (std::size_t c = 0; c < C; ++c) {
    const Config& cf = configs[c];
    if (!(cf.k >= 0 && cf.v == cf.k)) continue;
    std::printf("| %s | %.4f | %.4f | %.4f | %.4f |\n", schemes[cf.k].name,
                summarize(collect(c, &Result::k_sink_rel), layers).mean, summarize(collect(c, &Result::k_rel_l2), layers).mean,
                summarize(collect(c, &Result::v_sink_rel), layers).mean, summarize(collect(c, &Result::v_rel_l2), layers).mean);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    return a.uniform ? run_uniform(a) : run_data(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvq_accuracy: %s\n", e.what());
    return 1;
  }
}
