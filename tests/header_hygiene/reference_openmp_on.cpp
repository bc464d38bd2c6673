// tests/header_hygiene/reference_openmp_on.cpp: the CPU reference in a TU built with OpenMP
// (see reference_openmp_main.cpp).
#include <kvq/reference.hpp>

using QuantizeFn = cudaError_t (*)(const float*, const kvq::KvView&, const kvq::QuantSpec&, std::int8_t*, float*);

QuantizeFn reference_quantize_with_openmp() {
#if !defined(_OPENMP)
#error "this unit must be compiled with OpenMP"
#endif
  return &kvq::reference::quantize<float>;
}
