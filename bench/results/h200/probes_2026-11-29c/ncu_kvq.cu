// kvq's fp32 quantize_with_scales and dequantize, and fp16 dequantize, at 131072 x 8192, one call
// each inside cudaProfilerStart/Stop (for ncu --profile-from-start off).
#include <kvq/kvq.cuh>
#include <cuda_profiler_api.h>
#include <cstdio>
using namespace kvq;
#define CK(x) do { cudaError_t e = (x); if (e) { printf("ERR %s line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1);} } while(0)
template <class T> __global__ void fillf(T* p, long n) { for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) { unsigned h = (unsigned)i*2654435761u; h ^= h>>13; h*=0x5bd1e995; h^=h>>15; p[i] = T((h & 0xffffff) / 8388608.0f - 1.0f); } }
__global__ void fills(float* s, long n) { for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) s[i] = 1.0f / 127 * (1 + i % 7) / 4; }
int main() {
  const long T = 131072, D = 8192, N = T * D;
  float *x, *y, *s; __half* yh; std::int8_t* q;
  CK(cudaMalloc(&x, N * 4)); CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&yh, N * 2)); CK(cudaMalloc(&q, N)); CK(cudaMalloc(&s, D * 4));
  fillf<<<4096, 256>>>(x, N); fills<<<64, 256>>>(s, D);
  const KvView v = contiguous_view(T, D); const QuantSpec pc{Granularity::kPerChannel, 0};
  for (int i = 0; i < 2; ++i) { CK(quantize_with_scales(x, s, v, pc, q)); CK(dequantize(q, s, v, pc, y)); CK(dequantize(q, s, v, pc, yh)); }
  CK(cudaDeviceSynchronize());
  cudaProfilerStart();
  CK(quantize_with_scales(x, s, v, pc, q)); CK(dequantize(q, s, v, pc, y)); CK(dequantize(q, s, v, pc, yh));
  CK(cudaDeviceSynchronize());
  cudaProfilerStop();
  printf("kvq driver done\n");
  return 0;
}
