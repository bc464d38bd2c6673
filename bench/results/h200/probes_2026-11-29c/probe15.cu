// Dequantize (vector_apply_kernel, per-channel) with the vector store of this change: block size,
// rows in flight, blocks per SM (register cap) and passes per tile, against the plan. L2 flushed
// before each timed call, CUDA events, median of 21; output compared bit for bit with the host API.
#include "probe_common.cuh"
template <int T_, int I, int B> struct PP : WholeVectorPolicy { static constexpr int kThreads = T_, kItems = I, kMinBlocksPerSM = B; };
template <class Out, int T_, int I, int B>
void one(const std::int8_t* q, const float* s, Out* y, const Out* want, const KvView& v, int passes) {
  using P = PP<T_, I, B>; constexpr int V = 16 / sizeof(Out);
  const QuantSpec pc{Granularity::kPerChannel, 0};
  const VectorPlan p = plan_vector_apply(v, pc, T_, I, V, passes, 1);
  const long n = v.tokens * v.channels;
  auto k = vector_apply_kernel<P, V, false, std::int8_t, Out>;
  cudaFuncAttributes at; CK(cudaFuncGetAttributes(&at, k));
  auto call = [&] { k<<<grid_for(p.tiles), T_>>>(q, s, p, y, nullptr); };
  CK(cudaMemset(y, 0xff, n * sizeof(Out))); call(); CK(cudaDeviceSynchronize());
  CK(cudaMemset(g_bad, 0, 8)); diff<<<1024, 256>>>((const unsigned*)y, (const unsigned*)want, n * sizeof(Out) / 4, g_bad);
  unsigned long long bad = 0; CK(cudaMemcpy(&bad, g_bad, 8, cudaMemcpyDeviceToHost));
  const float us = time_us(call);
  printf("  threads %3d items %d minblocks %d (regs %2d spill %3d) passes %2d rows/tile %4ld tiles %7ld %9.2f us %5.1f%%copy %s\n", T_, I, B,
         at.numRegs, (int)at.localSizeBytes, passes, (long)p.rows_per_tile, (long)p.tiles, us, 100.0 * (1 + sizeof(Out)) * n / us / 1e3 / copy_gbs, bad ? "MISMATCH" : "same");
}
template <class Out>
void shape(const char* name, long tokens, long channels, const std::int8_t* q, const float* s, Out* y, Out* want) {
  const KvView v = contiguous_view(tokens, channels); const QuantSpec pc{Granularity::kPerChannel, 0};
  fills<<<64, 256>>>(const_cast<float*>(s), channels);
  CK(dequantize(q, s, v, pc, want)); CK(cudaDeviceSynchronize());
  printf("%s dequantize %ldx%ld: host API %.2f us\n", name, tokens, channels, time_us([&] { (void)dequantize(q, s, v, pc, y); }));
  for (int passes : {1, 2, 4}) {
    one<Out, 256, 4, 4>(q, s, y, want, v, passes);
    one<Out, 256, 4, 5>(q, s, y, want, v, passes);
    one<Out, 256, 4, 6>(q, s, y, want, v, passes);
    one<Out, 256, 8, 4>(q, s, y, want, v, passes);
    one<Out, 128, 4, 8>(q, s, y, want, v, passes);
    one<Out, 128, 8, 8>(q, s, y, want, v, passes);
    one<Out, 512, 4, 2>(q, s, y, want, v, passes);
  }
}
int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const long N = 131072L * 8192;
  float *y, *want, *s; std::int8_t* q;
  CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&want, N * 4)); CK(cudaMalloc(&q, N));
  CK(cudaMalloc(&s, 8192 * 4)); CK(cudaMalloc(&g_bad, 8)); CK(cudaMalloc(&g_flush, 256u << 20));
  const float copy = time_us([&] { cudaMemcpyAsync(y, want, N * 4, cudaMemcpyDeviceToDevice); }, 9);
  copy_gbs = 2.0 * N * 4 / copy / 1e3; printf("copy %.1f us %.0f GB/s\n", copy, copy_gbs);
  fillq<<<4096, 256>>>(q, N);
  shape<float>("fp32", 131072, 8192, q, s, y, want);
  shape<float>("fp32", 131072, 1024, q, s, y, want);
  shape<float>("fp32", 65536, 256, q, s, y, want);
  shape<__half>("fp16", 131072, 8192, q, s, (__half*)y, (__half*)want);
  shape<__half>("fp16", 131072, 1024, q, s, (__half*)y, (__half*)want);
  return 0;
}
