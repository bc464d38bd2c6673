// A/B of this change, built twice: against HEAD's headers (-I.scratch/old_include, tag "old") and
// the working tree's (-Iinclude -DNEW, tag "new"). Host API dequantize and quantize_with_scales,
// per-channel, L2 flushed (256 MB memset) before each timed call, CUDA events, median of 21.
// NEW only: per-token quantize_with_scales through vector_apply_kernel with 4096 against 1024
// target tiles, outputs compared bit for bit.
#include "probe_common.cuh"
#ifdef NEW
const char* kTag = "new";
#else
const char* kTag = "old";
#endif
template <class T>
void host_api(const char* name, long tokens, long channels, T* x, T* y, std::int8_t* q, float* s) {
  const KvView v = contiguous_view(tokens, channels); const QuantSpec pc{Granularity::kPerChannel, 0};
  const long n = tokens * channels;
  fillf<<<4096, 256>>>(x, n); fills<<<64, 256>>>(s, channels);
  CK(quantize_with_scales(x, s, v, pc, q)); CK(cudaDeviceSynchronize());
  const float qu = time_us([&] { (void)quantize_with_scales(x, s, v, pc, q); });
  const float de = time_us([&] { (void)dequantize(q, s, v, pc, y); });
  const double bytes = (sizeof(T) + 1.0) * n;
  printf("%s %-5s %7ldx%-5ld quantize_with_scales %9.2f us %5.1f%%copy   dequantize %9.2f us %5.1f%%copy\n", kTag, name,
         tokens, channels, qu, 100 * bytes / qu / 1e3 / copy_gbs, de, 100 * bytes / de / 1e3 / copy_gbs);
}
#ifdef NEW
template <class T>
void per_token(const char* name, long tokens, long channels, T* x, std::int8_t* q, std::int8_t* q2, float* s) {
  constexpr int V = 16 / sizeof(T);
  const KvView v = contiguous_view(tokens, channels); const QuantSpec pt{Granularity::kPerToken, 0};
  const long n = tokens * channels;
  fillf<<<4096, 256>>>(x, n); fills<<<4096, 256>>>(s, tokens);
  using P = WholeVectorPolicy;
  const int mp = sizeof(T) == 2 ? P::kApplyPasses16BitQuantize : P::kApplyPasses;
  float us[2]; long rows[2];
  for (int i = 0; i < 2; ++i) {
    const VectorPlan p = plan_vector_apply(v, pt, 256, 4, V, mp, i == 0 ? 4096 : 1024);
    std::int8_t* out = i == 0 ? q : q2;
    auto call = [&] { vector_apply_kernel<P, V, true, T, std::int8_t><<<grid_for(p.tiles), 256>>>(x, s, p, out, nullptr); };
    CK(cudaMemset(out, 0x80, n)); call(); CK(cudaDeviceSynchronize());
    us[i] = time_us(call); rows[i] = p.rows_per_tile;
  }
  CK(cudaMemset(g_bad, 0, 8)); diff<<<1024, 256>>>((const unsigned*)q, (const unsigned*)q2, n / 4, g_bad);
  unsigned long long bad = 0; CK(cudaMemcpy(&bad, g_bad, 8, cudaMemcpyDeviceToHost));
  printf("per-token given %-5s %7ldx%-5ld 4096 tiles (%4ld rows) %8.2f us   1024 tiles (%4ld rows) %8.2f us  %s\n", name,
         tokens, channels, rows[0], us[0], rows[1], us[1], bad ? "MISMATCH" : "same codes");
}
#endif
int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const long N = 131072L * 8192;
  float *x, *y, *s; std::int8_t *q, *q2;
  CK(cudaMalloc(&x, N * 4)); CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&q, N)); CK(cudaMalloc(&q2, N));
  CK(cudaMalloc(&s, 262144 * 4)); CK(cudaMalloc(&g_bad, 8)); CK(cudaMalloc(&g_flush, 256u << 20));
  const float copy = time_us([&] { cudaMemcpyAsync(y, x, N * 4, cudaMemcpyDeviceToDevice); }, 9);
  copy_gbs = 2.0 * N * 4 / copy / 1e3; printf("%s copy %.1f us %.0f GB/s\n", kTag, copy, copy_gbs);
  const long shapes[][2] = {{16384, 256}, {65536, 256}, {131072, 256}, {262144, 128}, {131072, 1024}, {131072, 8192}};
  for (auto& sh : shapes) host_api<float>("fp32", sh[0], sh[1], x, y, q, s);
  for (auto& sh : shapes) host_api<__half>("fp16", sh[0], sh[1], (__half*)x, (__half*)y, q, s);
  for (auto& sh : shapes) host_api<__nv_bfloat16>("bf16", sh[0], sh[1], (__nv_bfloat16*)x, (__nv_bfloat16*)y, q, s);
#ifdef NEW
  for (auto& sh : shapes) per_token<float>("fp32", sh[0], sh[1], x, q, q2, s);
  for (auto& sh : shapes) per_token<__half>("fp16", sh[0], sh[1], (__half*)x, q, q2, s);
#endif
  return 0;
}
