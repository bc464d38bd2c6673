// Quantizes a small [tokens, channels] matrix per channel with kvq's CPU reference, dequantizes
// it, and checks the round trip: what a C++ (non-CUDA) translation unit of an engine can use.
#include <kvq/metrics.hpp>
#include <kvq/reference.hpp>
#include <kvq/types.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  constexpr std::int64_t kTokens = 6, kChannels = 5;
  const kvq::KvView view = kvq::contiguous_view(kTokens, kChannels);
  const kvq::QuantSpec spec{kvq::Granularity::kPerChannel, 0};

  std::vector<float> x(view.size());  // (tokens, channels)
  for (std::int64_t i = 0; i < view.size(); ++i) x[i] = std::sin(0.7f * static_cast<float>(i)) * (1 + i % kChannels);

  std::vector<float> scales(kvq::scale_count(view, spec));  // (1, 1, channels)
  std::vector<std::int8_t> q(view.size());                   // (tokens, channels)
  std::vector<float> y(view.size());                         // (tokens, channels)
  if (kvq::reference::quantize(x.data(), view, spec, q.data(), scales.data()) != cudaSuccess ||
      kvq::reference::dequantize(q.data(), scales.data(), view, spec, y.data()) != cudaSuccess) {
    std::printf("FAILED: a reference call returned an error\n");
    return 1;
  }
  float max_scale = 0;
  for (float s : scales) max_scale = std::fmax(max_scale, s);
  const double err = kvq::metrics::max_abs_error(x.data(), y.data(), view.size());
  if (scales.size() != static_cast<std::size_t>(kChannels) || !(err <= max_scale / 2 * (1 + 1e-5))) {
    std::printf("FAILED: %zu scales, max-abs error %g (half a scale: %g)\n", scales.size(), err, max_scale / 2);
    return 1;
  }
  std::printf("kvq consumer OK: %lld x %lld per-channel, max-abs error %.6f\n", static_cast<long long>(kTokens),
              static_cast<long long>(kChannels), err);
  return 0;
}
