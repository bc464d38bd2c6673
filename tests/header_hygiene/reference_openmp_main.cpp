// tests/header_hygiene/reference_openmp_main.cpp: the CPU reference compiled with OpenMP in one
// translation unit and without it in another, linked into one program. reference.hpp puts the two
// builds in different inline namespaces (reference::parallel, reference::serial), so they are two
// functions rather than one inline function with two definitions (an ODR violation the linker
// would silently resolve to either). Checks that they are distinct, and that both give the same
// codes, scales and count.
#include <kvq/reference.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

using QuantizeFn = cudaError_t (*)(const float*, const kvq::KvView&, const kvq::QuantSpec&, std::int8_t*, float*);
QuantizeFn reference_quantize_with_openmp();
QuantizeFn reference_quantize_without_openmp();

int main() {
  const QuantizeFn parallel = reference_quantize_with_openmp(), serial = reference_quantize_without_openmp();
  int failures = 0;
  if (parallel == serial) {
    std::printf("FAIL: the OpenMP and serial builds of kvq::reference::quantize are one function\n");
    ++failures;
  }
  constexpr int kTokens = 512, kChannels = 96;
  const kvq::KvView view = kvq::contiguous_view(kTokens, kChannels);
  std::vector<float> x(kTokens * kChannels);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 3.0f;
  x[17] = NAN;
  for (kvq::Granularity g : {kvq::Granularity::kPerToken, kvq::Granularity::kPerChannel}) {
    unsigned long long count_p = 0, count_s = 0;
    std::vector<std::int8_t> q_p(x.size(), 1), q_s(x.size(), 2);
    std::vector<float> s_p(kTokens * kChannels, -1.0f), s_s(kTokens * kChannels, -2.0f);
    const kvq::QuantSpec spec_p{g, 64, &count_p}, spec_s{g, 64, &count_s};
    failures += parallel(x.data(), view, spec_p, q_p.data(), s_p.data()) != cudaSuccess;
    failures += serial(x.data(), view, spec_s, q_s.data(), s_s.data()) != cudaSuccess;
    const std::size_t n_scales = static_cast<std::size_t>(kvq::scale_count(view, spec_p));
    if (q_p != q_s || std::memcmp(s_p.data(), s_s.data(), n_scales * sizeof(float)) != 0 || count_p != count_s ||
        count_p != 1) {
      std::printf("FAIL: the OpenMP and serial builds differ (%s)\n", kvq::to_string(g));
      ++failures;
    }
  }
  std::printf("reference with and without OpenMP: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
