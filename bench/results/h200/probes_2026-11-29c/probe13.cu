// Next session: per-channel apply (kvq's vector_apply_kernel) at the paper's shapes, fp32 given
// scales and fp32 dequantize: rows per tile (passes of 4 rows at the plan's lanes) against the
// plan, the L2 flushed (256 MB memset) before each timed call as kvq_bench does, CUDA events,
// median of 21. Output compared bit for bit with kvq's host API on the device.
#include "probe_common.cuh"
template <int V, class In, class Out>
void sweep(const char* op, const In* in, const float* s, Out* out, const Out* want, const KvView& v, int max_passes) {
  const QuantSpec pc{Granularity::kPerChannel, 0};
  const VectorPlan plan = plan_vector_apply(v, pc, 256, 4, V, max_passes);
  const long n = v.tokens * v.channels; const double bytes = double(sizeof(In) + sizeof(Out)) * n;
  const long rows_per_pass = (256 >> plan.lanes_log2) * 4;
  for (long passes : {0L, 1L, 2L, 4L, 8L, 16L, 32L}) {
    VectorPlan p = plan;
    if (passes > 0) {
      p.rows_per_tile = std::min<long>(rows_per_pass * passes, p.group);
      p.sub_tiles = (p.group + p.rows_per_tile - 1) / p.rows_per_tile; p.tiles = p.col_tiles * p.groups * p.sub_tiles;
      if (p.rows_per_tile == plan.rows_per_tile) continue;
    }
    auto call = [&] { vector_apply_kernel<WholeVectorPolicy, V, false, In, Out><<<grid_for(p.tiles), 256>>>(in, s, p, out, nullptr); };
    CK(cudaMemset(out, 0x55, n * sizeof(Out))); call(); CK(cudaDeviceSynchronize());
    CK(cudaMemset(g_bad, 0, 8)); diff<<<1024, 256>>>((const unsigned*)out, (const unsigned*)want, n * sizeof(Out) / 4, g_bad);
    unsigned long long bad = 0; CK(cudaMemcpy(&bad, g_bad, 8, cudaMemcpyDeviceToHost));
    const float us = time_us(call);
    printf("  %-14s %6ldx%-5ld lanes %3d rows/tile %5ld%s tiles %6ld %9.2f us %5.1f%%copy %s\n", op, (long)v.tokens, (long)v.channels,
           1 << p.lanes_log2, (long)p.rows_per_tile, passes == 0 ? " (plan)" : "       ", (long)p.tiles, us, 100.0 * bytes / us / 1e3 / copy_gbs, bad ? "MISMATCH" : "same");
  }
}
template <class T>
void shape_run(const char* name, const long* sh, T* x, T* y, T* yw, std::int8_t* q, std::int8_t* qw, float* s) {
  constexpr int V = 16 / sizeof(T);
  const KvView v = contiguous_view(sh[0], sh[1]); const QuantSpec pc{Granularity::kPerChannel, 0};
  fillf<<<4096, 256>>>(x, sh[0] * sh[1]); fills<<<64, 256>>>(s, sh[1]);
  CK(quantize_with_scales(x, s, v, pc, qw)); CK(dequantize(qw, s, v, pc, yw)); CK(cudaDeviceSynchronize());
  printf("%s %ldx%ld: quantize_with_scales %.2f us, dequantize %.2f us (host API, flushed)\n", name, sh[0], sh[1],
         time_us([&] { (void)quantize_with_scales(x, s, v, pc, q); }), time_us([&] { (void)dequantize(qw, s, v, pc, y); }));
  sweep<V, T, std::int8_t>(sizeof(T) == 4 ? "quantize" : "quantize16", x, s, q, qw, v,
                           sizeof(T) == 4 ? WholeVectorPolicy::kApplyPasses : WholeVectorPolicy::kApplyPasses16BitQuantize);
  sweep<V, std::int8_t, T>(sizeof(T) == 4 ? "dequantize" : "dequantize16", qw, s, y, yw, v, WholeVectorPolicy::kApplyPassesDequantize);
}
int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const long N = 131072L * 8192;
  float *x, *y, *yw; std::int8_t *q, *qw; float* s;
  CK(cudaMalloc(&x, N * 4)); CK(cudaMalloc(&y, N * 4)); CK(cudaMalloc(&yw, N * 4)); CK(cudaMalloc(&q, N)); CK(cudaMalloc(&qw, N));
  CK(cudaMalloc(&s, 8192 * 4)); CK(cudaMalloc(&g_bad, 8)); CK(cudaMalloc(&g_flush, 256u << 20));
  const float copy = time_us([&] { cudaMemcpyAsync(y, x, N * 4, cudaMemcpyDeviceToDevice); }, 9);
  copy_gbs = 2.0 * N * 4 / copy / 1e3; printf("copy %.1f us %.0f GB/s\n", copy, copy_gbs);
  const long shapes[][2] = {{1024, 64}, {2048, 128}, {16384, 256}, {65536, 256}, {131072, 256}, {262144, 128}, {131072, 1024}, {131072, 8192}};
  for (auto& sh : shapes) shape_run<float>("fp32", sh, x, y, yw, q, qw, s);
  for (auto& sh : shapes) shape_run<__half>("fp16", sh, (__half*)x, (__half*)y, (__half*)yw, q, qw, s);
  return 0;
}
