// Shared by the probe drivers of this folder (they were single files when they ran; these lines
// were identical in each): error check, input fills, a bit-for-bit compare, and the timer, which
// flushes the L2 (a 256 MB memset) before each call and returns the median in microseconds.
#pragma once
#include <kvq/kvq.cuh>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <functional>
using namespace kvq;
using namespace kvq::detail;
#define CK(x) do { cudaError_t e = (x); if (e) { printf("ERR %s line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1);} } while(0)
template <class T> __global__ void fillf(T* p, long n) { for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) { unsigned h = (unsigned)i*2654435761u; h ^= h>>13; h*=0x5bd1e995; h^=h>>15; p[i] = T((h & 0xffffff) / 8388608.0f - 1.0f); } }
__global__ void fillq(std::int8_t* p, long n) { for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) { unsigned h = (unsigned)i*2654435761u; h ^= h>>13; h*=0x5bd1e995; h^=h>>15; p[i] = (std::int8_t)((int)(h % 255) - 127); } }
__global__ void fills(float* s, long n) { for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) s[i] = 1.0f / 127 * (1 + i % 7) / 4; }
__global__ void diff(const unsigned* a, const unsigned* b, long n, unsigned long long* bad) { unsigned long long k = 0; for (long i = blockIdx.x*256L+threadIdx.x; i < n; i += gridDim.x*256L) k += a[i] != b[i]; if (k) atomicAdd(bad, k); }
void* g_flush; unsigned long long* g_bad; double copy_gbs;
float time_us(std::function<void()> f, int reps = 21) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  f(); f(); CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaMemsetAsync(g_flush, i & 0xff, 256u << 20));
    cudaEventRecord(a); f(); cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end()); return 1000 * t[t.size() / 2];
}
