// Per-token dequantize (vector_apply_kernel<kPerToken>) with the vector store: passes per tile and
// blocks per SM (register cap), against the old plan (2 passes at most, 4096 target tiles, 4
// blocks). L2 flushed, CUDA events, median of 21, outputs compared bit for bit with the host API.
#include "probe_common.cuh"
template <int B> struct PD : WholeVectorPolicy { static constexpr int kMinBlocksPerSMDequantize = B; };
template <class Out, int B, bool kPerToken>
void one(const std::int8_t* q, const float* s, Out* y, const Out* want, const KvView& v, int passes, std::int64_t target) {
  constexpr int V = 16 / sizeof(Out);
  const QuantSpec spec{kPerToken ? Granularity::kPerToken : Granularity::kPerChannel, 0};
  const VectorPlan p = plan_vector_apply(v, spec, 256, 4, V, passes, target);
  const long n = v.tokens * v.channels;
  auto k = vector_apply_kernel<PD<B>, V, kPerToken, std::int8_t, Out>;
  cudaFuncAttributes at; CK(cudaFuncGetAttributes(&at, k));
  auto call = [&] { k<<<grid_for(p.tiles), 256>>>(q, s, p, y, nullptr); };
  CK(cudaMemset(y, 0xff, n * sizeof(Out))); call(); CK(cudaDeviceSynchronize());
  CK(cudaMemset(g_bad, 0, 8)); diff<<<1024, 256>>>((const unsigned*)y, (const unsigned*)want, n * sizeof(Out) / 4, g_bad);
  unsigned long long bad = 0; CK(cudaMemcpy(&bad, g_bad, 8, cudaMemcpyDeviceToHost));
  const float us = time_us(call);
  printf("  %-11s blocks %d (regs %2d) max passes %d target %4ld: rows/tile %3ld tiles %7ld %9.2f us %5.1f%%copy %s\n", kPerToken ? "per-token" : "per-channel", B,
         at.numRegs, passes, (long)target, (long)p.rows_per_tile, (long)p.tiles, us, 100.0 * (1 + sizeof(Out)) * n / us / 1e3 / copy_gbs, bad ? "MISMATCH" : "same");
}
template <class Out, bool kPerToken>
void shape(const char* name, long tokens, long channels, const std::int8_t* q, const float* s, Out* y, Out* want) {
  const KvView v = contiguous_view(tokens, channels);
  const QuantSpec spec{kPerToken ? Granularity::kPerToken : Granularity::kPerChannel, 0};
  CK(dequantize(q, s, v, spec, want)); CK(cudaDeviceSynchronize());
  printf("%s %ldx%ld: host API %.2f us\n", name, tokens, channels, time_us([&] { (void)dequantize(q, s, v, spec, y); }));
  one<Out, 4, kPerToken>(q, s, y, want, v, 2, 4096);  // ecbc568's plan
  one<Out, 4, kPerToken>(q, s, y, want, v, 1, 1);
  one<Out, 6, kPerToken>(q, s, y, want, v, 1, 1);     // 05bb8eb's
  one<Out, 6, kPerToken>(q, s, y, want, v, 2, 4096);
  one<Out, 5, kPerToken>(q, s, y, want, v, 1, 1);
  one<Out, 4, kPerToken>(q, s, y, want, v, 2, 1);
}
int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const long N = 131072L * 8192;
  float *y, *want, *s; std::int8_t* q;
  CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&want, N * 4)); CK(cudaMalloc(&q, N));
  CK(cudaMalloc(&s, 131072 * 8 * 4)); CK(cudaMalloc(&g_bad, 8)); CK(cudaMalloc(&g_flush, 256u << 20));
  const float copy = time_us([&] { cudaMemcpyAsync(y, want, N * 4, cudaMemcpyDeviceToDevice); }, 9);
  copy_gbs = 2.0 * N * 4 / copy / 1e3; printf("copy %.1f us %.0f GB/s\n", copy, copy_gbs);
  fillq<<<4096, 256>>>(q, N); fills<<<1024, 256>>>(s, 131072 * 8);
  const long shapes[][2] = {{16384, 256}, {131072, 256}, {131072, 2048}, {131072, 8192}};
  for (auto& sh : shapes) shape<__half, true>("fp16 per-token", sh[0], sh[1], q, s, (__half*)y, (__half*)want);
  for (auto& sh : shapes) shape<float, true>("fp32 per-token", sh[0], sh[1], q, s, y, want);
  for (auto& sh : shapes) shape<__half, false>("fp16 per-channel", sh[0], sh[1], q, s, (__half*)y, (__half*)want);
  return 0;
}
