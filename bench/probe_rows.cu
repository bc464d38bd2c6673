// bench/probe_rows.cu: the tuning sweep behind RowPolicy (detail/vectorized.cuh), on the H200.
//
//   kvq_probe_rows            per-token quantize, quantize_with_scales and dequantize of rows one
//                             head wide (D 64, 128, 256; 2048 to 1M rows; fp32, fp16, bf16), with
//                             the row kernels at every units-per-thread and two block sizes forced
//                             (about 3 minutes on an H200; `kvq_probe_rows 64` runs one head dim),
//                             and the whole-vector kernels they replaced (token_scales_kernel,
//                             vector_apply_kernel), each timed as kvq_bench times a case (a CUDA graph
//                             of 20 calls, cold and hot) and its output compared byte for byte with
//                             what kvq's host API returns (which the GPU tests compare with the CPU).
//
// Not part of the default workload: it reaches into kvq::detail to force plans.
#include "bench_kernels.cuh"

#include <kvq/kvq.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace kvq_probe {
/// RowPolicy with blocks of 256 threads (outside the anonymous namespace: the kernels it
/// instantiates have external linkage).
struct Rows256 : kvq::detail::RowPolicy {
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocksPerSM = 4;
};
}  // namespace kvq_probe

namespace {

using namespace kvq::detail;
using kvq_probe::Rows256;

void ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "kvq_probe_rows: %s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

struct Gpu {
  cudaStream_t stream;
  cudaEvent_t start, stop;
  uint4* flush;
  std::int64_t flush_words;
  unsigned* sink;
  double copy_gbps;
};
Gpu g;

/// Per call, cold (L2 flushed before each replay) and hot, of a graph of 20 calls: medians of 30.
struct Times {
  double cold_us, hot_us;
};
Times time_calls(const std::function<void()>& call) {
  constexpr int kCalls = 20, kReplays = 30;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ok(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeThreadLocal), "capture");
  for (int i = 0; i < kCalls; ++i) call();
  ok(cudaStreamEndCapture(g.stream, &graph), "capture");
  ok(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  Times t{};
  for (bool cold : {true, false}) {
    std::vector<float> ms;
    for (int i = 0; i < kReplays + 1; ++i) {
      if (cold)
        kvq_bench::read_flush_kernel<><<<4096, 256, 0, g.stream>>>(g.flush, g.flush_words, g.sink);
      else
        kvq_bench::spin_kernel<><<<1, 1, 0, g.stream>>>(kvq_bench::kSpinCycles);
      ok(cudaEventRecord(g.start, g.stream), "event");
      ok(cudaGraphLaunch(exec, g.stream), "replay");
      ok(cudaEventRecord(g.stop, g.stream), "event");
      ok(cudaEventSynchronize(g.stop), "sync");
      float m = 0;
      ok(cudaEventElapsedTime(&m, g.start, g.stop), "elapsed");
      if (i > 0) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    (cold ? t.cold_us : t.hot_us) = ms[ms.size() / 2] * 1e3 / kCalls;
  }
  ok(cudaGraphExecDestroy(exec), "destroy");
  ok(cudaGraphDestroy(graph), "destroy");
  return t;
}

template <class E>
bool same_on_device(const E* a, const E* b, std::int64_t n) {
  std::vector<E> ha(n), hb(n);
  ok(cudaMemcpy(ha.data(), a, n * sizeof(E), cudaMemcpyDeviceToHost), "copy");
  ok(cudaMemcpy(hb.data(), b, n * sizeof(E), cudaMemcpyDeviceToHost), "copy");
  return std::memcmp(ha.data(), hb.data(), n * sizeof(E)) == 0;
}

const char* name_of(float*) { return "float"; }
const char* name_of(__half*) { return "half"; }
const char* name_of(__nv_bfloat16*) { return "bfloat16"; }

int failures = 0;

void report(const char* op, const char* dtype, std::int64_t rows, std::int64_t dim, const std::string& config,
            double bytes, Times t, bool same) {
  const double gbps = bytes / (t.cold_us * 1e-6) * 1e-9;
  std::printf("%-22s %-8s rows%-8lld D%-4lld %-18s cold %9.2f us  hot %9.2f us  %6.0f GB/s %6.1f%%  %s\n", op, dtype,
              static_cast<long long>(rows), static_cast<long long>(dim), config.c_str(), t.cold_us, t.hot_us, gbps,
              100.0 * gbps / g.copy_gbps, same ? "" : "OUTPUT DIFFERS");
  failures += !same;
}

/// Forces `units` units per thread onto the plan kvq would make; false when a row would need more
/// than a warp at that many.
bool force_units(RowPlan& p, int units) {
  const std::int64_t lanes = pow2_ceil(ceil_div<std::int64_t>(p.units, units));
  if (lanes > kWarpSize) return false;
  p.units_per_thread = units;
  p.lanes_log2 = log2_exact(lanes);
  return true;
}

template <class Policy, int U, class T>
void row_configs(const char* tag, const T* x, const kvq::KvView& view, std::int8_t* q, float* s, T* y,
                 const std::int8_t* q_ref, const float* s_ref, const T* y_ref, double qbytes, double dbytes) {
  constexpr int V = 16 / sizeof(T);
  RowPlan p{};
  if (!plan_rows<RowPolicy>(view, kvq::QuantSpec{kvq::Granularity::kPerToken, 0}, V, RowOp::kScales, p) || !force_units(p, U)) return;
  const unsigned blocks = static_cast<unsigned>(ceil_div<std::int64_t>(p.threads(), Policy::kThreads));
  const std::int64_t n = view.size(), rows = p.rows;
  const std::string config = std::string(tag) + " U" + std::to_string(U) + " L" + std::to_string(1 << p.lanes_log2);
  auto quantize = [&] { row_scales_kernel<Policy, V, U><<<blocks, Policy::kThreads, 0, g.stream>>>(x, p, s, q, nullptr); };
  auto given = [&] {
    row_apply_kernel<Policy, V, U><<<blocks, Policy::kThreads, 0, g.stream>>>(x, s_ref, p, q, nullptr);
  };
  auto dequantize = [&] {
    row_apply_kernel<Policy, V, U><<<blocks, Policy::kThreads, 0, g.stream>>>(q_ref, s_ref, p, y, nullptr);
  };
  const char* dt = name_of(static_cast<T*>(nullptr));
  ok(cudaMemset(q, 0x80, n), "poison");
  ok(cudaMemset(s, 0xff, rows * 4), "poison");
  quantize();
  ok(cudaStreamSynchronize(g.stream), "quantize");
  report("quantize", dt, rows, view.channels, config, qbytes, time_calls(quantize),
         same_on_device(q, q_ref, n) && same_on_device(s, s_ref, rows));
  ok(cudaMemset(q, 0x80, n), "poison");
  given();
  ok(cudaStreamSynchronize(g.stream), "given");
  report("quantize_with_scales", dt, rows, view.channels, config, qbytes, time_calls(given), same_on_device(q, q_ref, n));
  ok(cudaMemset(y, 0xff, n * sizeof(T)), "poison");
  dequantize();
  ok(cudaStreamSynchronize(g.stream), "dequantize");
  report("dequantize", dt, rows, view.channels, config, dbytes, time_calls(dequantize), same_on_device(y, y_ref, n));
}

/// The whole-vector kernels that ran these shapes before the row kernels.
template <class T>
void replaced_kernels(const T* x, const kvq::KvView& view, std::int8_t* q, float* s, T* y, const std::int8_t* q_ref,
                      const float* s_ref, const T* y_ref, double qbytes, double dbytes) {
  using S = VectorizedStrategy;
  using P = WholeVectorPolicy;
  constexpr int V = 16 / sizeof(T);
  const kvq::QuantSpec spec{kvq::Granularity::kPerToken, 0};
  const std::int64_t n = view.size(), rows = view.batch * view.tokens;
  const char* dt = name_of(static_cast<T*>(nullptr));
  bool fits = false;
  const VectorPlan tp = plan_token_scales<P>(view, spec, V, fits);
  if (!fits) return;
  auto quantize = [&] {
    if (tp.col_items == 1) (void)S::launch_token_scales<1>(x, tp, s, q, nullptr, g.stream);
    else if (tp.col_items == 2) (void)S::launch_token_scales<2>(x, tp, s, q, nullptr, g.stream);
    else if (tp.col_items == 4) (void)S::launch_token_scales<4>(x, tp, s, q, nullptr, g.stream);
    else (void)S::launch_token_scales<8>(x, tp, s, q, nullptr, g.stream);
  };
  const VectorPlan gp = plan_vector_apply(view, spec, P::kThreads, P::kItems, V,
                                          sizeof(T) == 2 ? P::kApplyPasses16BitQuantize : P::kApplyPasses,
                                          P::kApplyTargetTiles);
  const VectorPlan dp = plan_vector_apply(view, spec, P::kThreads, P::kItems, V, P::kApplyPassesDequantizePerToken,
                                          P::kApplyTargetTiles);
  auto given = [&] {
    vector_apply_kernel<P, V, true><<<grid_for(gp.tiles), P::kThreads, 0, g.stream>>>(x, s_ref, gp, q, nullptr);
  };
  auto dequantize = [&] {
    vector_apply_kernel<P, V, true><<<grid_for(dp.tiles), P::kThreads, 0, g.stream>>>(q_ref, s_ref, dp, y, nullptr);
  };
  ok(cudaMemset(q, 0x80, n), "poison");
  quantize();
  ok(cudaStreamSynchronize(g.stream), "quantize");
  report("quantize", dt, rows, view.channels, "replaced", qbytes, time_calls(quantize),
         same_on_device(q, q_ref, n) && same_on_device(s, s_ref, rows));
  ok(cudaMemset(q, 0x80, n), "poison");
  given();
  ok(cudaStreamSynchronize(g.stream), "given");
  report("quantize_with_scales", dt, rows, view.channels, "replaced", qbytes, time_calls(given),
         same_on_device(q, q_ref, n));
  ok(cudaMemset(y, 0xff, n * sizeof(T)), "poison");
  dequantize();
  ok(cudaStreamSynchronize(g.stream), "dequantize");
  report("dequantize", dt, rows, view.channels, "replaced", dbytes, time_calls(dequantize), same_on_device(y, y_ref, n));
}

template <class T>
void sweep(std::int64_t rows, std::int64_t dim) {
  const kvq::KvView view = kvq::contiguous_view(rows, dim);
  const kvq::QuantSpec spec{kvq::Granularity::kPerToken, 0};
  const std::int64_t n = view.size();
  T *x, *y, *y_ref;
  std::int8_t *q, *q_ref;
  float *s, *s_ref;
  ok(cudaMalloc(&x, n * sizeof(T)), "malloc");
  ok(cudaMalloc(&y, n * sizeof(T)), "malloc");
  ok(cudaMalloc(&y_ref, n * sizeof(T)), "malloc");
  ok(cudaMalloc(&q, n), "malloc");
  ok(cudaMalloc(&q_ref, n), "malloc");
  ok(cudaMalloc(&s, rows * 4), "malloc");
  ok(cudaMalloc(&s_ref, rows * 4), "malloc");
  kvq_bench::fill_uniform_kernel<<<4096, 256, 0, g.stream>>>(x, n, 12345 + rows + dim);
  ok(kvq::quantize(x, view, spec, q_ref, s_ref, g.stream), "kvq::quantize");
  ok(kvq::dequantize(q_ref, s_ref, view, spec, y_ref, g.stream), "kvq::dequantize");
  ok(cudaStreamSynchronize(g.stream), "reference run");
  const double qbytes = n * (sizeof(T) + 1.0) + rows * 4.0, dbytes = qbytes;
  replaced_kernels(x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<RowPolicy, 1>("rows128", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<RowPolicy, 2>("rows128", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<RowPolicy, 4>("rows128", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<Rows256, 1>("rows256", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<Rows256, 2>("rows256", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  row_configs<Rows256, 4>("rows256", x, view, q, s, y, q_ref, s_ref, y_ref, qbytes, dbytes);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(y), static_cast<void*>(y_ref), static_cast<void*>(q),
                  static_cast<void*>(q_ref), static_cast<void*>(s), static_cast<void*>(s_ref)})
    ok(cudaFree(p), "free");
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("kvq_probe_rows: no usable CUDA GPU\n");
    return 0;
  }
  ok(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking), "stream");
  ok(cudaEventCreate(&g.start), "event");
  ok(cudaEventCreate(&g.stop), "event");
  const std::size_t flush_bytes = std::size_t{256} << 20;
  ok(cudaMalloc(&g.flush, flush_bytes), "malloc");
  ok(cudaMemset(g.flush, 0, flush_bytes), "memset");
  ok(cudaMalloc(&g.sink, 4), "malloc");
  g.flush_words = static_cast<std::int64_t>(flush_bytes / sizeof(uint4));
  ok(kvq_bench::measure_copy_gbps(g.stream, g.start, g.stop, 10, &g.copy_gbps), "the device-to-device copy");
  std::printf("kvq_probe_rows: copy %.0f GB/s; per call in graphs of 20, cold / hot, medians of 30\n", g.copy_gbps);
  const std::int64_t only_dim = argc > 1 ? std::atoll(argv[1]) : 0;
  for (std::int64_t dim : {64, 128, 256}) {
    if (only_dim != 0 && dim != only_dim) continue;
    for (std::int64_t rows : {2048, 16384, 65536, 262144, 1048576}) {
      sweep<float>(rows, dim);
      sweep<__half>(rows, dim);
      sweep<__nv_bfloat16>(rows, dim);
      std::fflush(stdout);
    }
  }
  if (failures != 0) std::printf("kvq_probe_rows: %d configurations gave different output\n", failures);
  return failures == 0 ? 0 : 1;
}
