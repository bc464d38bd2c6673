// tests/header_hygiene/reference_openmp_off.cpp: the CPU reference in a TU built without OpenMP
// (see reference_openmp_main.cpp).
#include <kvq/reference.hpp>

using QuantizeFn = cudaError_t (*)(const float*, const kvq::KvView&, const kvq::QuantSpec&, std::int8_t*, float*);

QuantizeFn reference_quantize_without_openmp() {
#if defined(_OPENMP)
#error "this unit must be compiled without OpenMP"
#endif
  return &kvq::reference::quantize<float>;
}
