// bench/kvq_bench.cu: kvq's benchmark driver (Google Benchmark).
//
//   kvq_bench                      the default workload: a readable table (the `run_bench` target)
//   kvq_bench --paper              the paper's table on its ten shapes, then kvq's own rows
//   kvq_bench --benchmark_filter=REGEX   any of the registered cases, e.g. '^quantize/half/.*/auto/'
//   kvq_bench --benchmark_filter=. --benchmark_list_tests   every registered case
//   add --benchmark_out=FILE.json --benchmark_out_format=json for the raw numbers
//
// Cases are named op/dtype/granularity/variant/shape, e.g. quantize/half/per_token/vectorized/T131072_D8192
// or dequantize/bfloat16/per_token/auto/rows262144_D128 (Google Benchmark's console, JSON and filter
// see that name followed by /iterations:N/manual_time). Shapes are the paper's [T, D] matrices and
// the engines' ones: rows one head wide (rowsR_DD: R (token, head) rows of D channels, one scale per
// row), [T, H, D] seen per head (THD_...) and [B, H, T, D] (BHTD_...). The paged cache's cases
// are op/dtype/scheme/shape: append_kv/half/per_token_head/decode_S64_H8_D128_P16 and
// decode_attention/half/per_token_head/B8_T32768_Hq32_Hkv8_D128_P64 (paged_ops.hpp), checked
// against kvq::reference (append_kv over the whole cache, decode_attention on two sequences)
// before they are timed.
// Method, stated once here and printed at start-up:
//   - inputs: fresh random values in [-1, 1) per case (random.hpp), never zeros, generated on the GPU;
//   - before any timing, each case's output is checked: outputs are poisoned, the op runs once, no
//     poison may remain anywhere, and two windows are compared bit for bit with the CPU reference
//     (host_reference.cpp). A wrong result fails the case (no number) and the exit status;
//   - timing: the call is captured into a CUDA graph `calls` times back to back (20, fewer for calls
//     of more than 400 MB: calls_per_replay), and graph replays are timed with CUDA events, as
//     bench/compare_torch.py times PyTorch. Cold: the L2 is flushed (a read of a buffer twice its
//     size, >= 256 MB) before each replay, as for a prefill whose K/V come from HBM; hot: replays
//     back to back, as for a decode step whose K/V were just written and sit in L2. A call's time is
//     a replay's over `calls`; median_us (cold) and hot_us are medians over the replays after a
//     warm-up (lazy module loading makes first launches slow). Google Benchmark's own time column
//     is the mean of the cold replays;
//   - GB/s is decimal and counts each operand once: input read + output written + fp32 scales, at
//     the cold time. Whole-sequence per-channel quantize must read its input twice: GB/s_2reads
//     counts that;
//   - %copy compares with a device-to-device cudaMemcpyAsync of 2 GiB measured at start-up, counting
//     bytes read + written the same way;
//   - floor: an empty kernel timed the same way (cold and hot), the least any case can report;
//   - xCPU (paper shapes, paper configurations; fp32 only outside paper mode): kvq::reference on all
//     OpenMP threads, timed once per (dtype, granularity, shape) and cached.
#include "bench_case.hpp"
#include "bench_kernels.cuh"
#include "host_reference.hpp"
#include "ops.hpp"
#include "paged_ops.hpp"
#include "random.hpp"

#include <kvq/numerics.hpp>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvq_bench {
namespace {

using kvq::Granularity;
using kvq::Variant;

// --- small CUDA helpers ------------------------------------------------------------------------

void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

/// Blocks for the grid-stride helper kernels: enough to fill any GPU, few enough to stay cheap.
unsigned helper_blocks(std::int64_t n) {
  constexpr std::int64_t kMaxBlocks = 8192;
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + 255) / 256, 1, kMaxBlocks));
}
constexpr unsigned kHelperThreads = 256;

/// count += number of elements of p equal to `value` (bit patterns: used to find poison left behind).
template <class U>
__global__ void count_equal_kernel(const U* p, std::int64_t n, U value, unsigned long long* count) {
  unsigned long long local = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    local += p[i] == value;
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if (threadIdx.x % 32 == 0 && local != 0) atomicAdd(count, local);
}

void fill_uniform(DType t, void* x, std::int64_t n, std::uint64_t seed, cudaStream_t s) {
  const unsigned blocks = helper_blocks(n);
  switch (t) {
    case DType::kFloat: fill_uniform_kernel<<<blocks, kHelperThreads, 0, s>>>(static_cast<float*>(x), n, seed); break;
    case DType::kHalf: fill_uniform_kernel<<<blocks, kHelperThreads, 0, s>>>(static_cast<__half*>(x), n, seed); break;
    case DType::kBfloat16:
      fill_uniform_kernel<<<blocks, kHelperThreads, 0, s>>>(static_cast<__nv_bfloat16*>(x), n, seed);
      break;
  }
  cuda_ok(cudaPeekAtLastError(), "fill_uniform_kernel");
}

// Poison: bit patterns no correct output contains. -128 is not a code of the symmetric range;
// all-ones is a NaN in fp32, fp16 and bf16, and no finite code times a finite scale is NaN.
constexpr int kCodePoison = 0x80;
constexpr int kValuePoison = 0xff;

/// A device allocation that only grows, reused across cases (a 4 GB cudaMalloc per case is slow).
class DeviceBuffer {
 public:
  ~DeviceBuffer() { cudaFree(ptr_); }
  void* reserve(std::size_t bytes) {
    if (bytes > bytes_) {
      cuda_ok(cudaFree(ptr_), "cudaFree");
      ptr_ = nullptr;
      bytes_ = 0;
      cuda_ok(cudaMalloc(&ptr_, bytes), "cudaMalloc");
      bytes_ = bytes;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// --- the process-wide state --------------------------------------------------------------------

struct Gpu {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  void* flush = nullptr;  // read before each timed call, so no operand is left in L2
  std::size_t flush_bytes = 0;
  unsigned long long* counter = nullptr;
  double copy_gbps = 0;
  DeviceBuffer x, q, scales, y;
};
Gpu& gpu() {
  static Gpu g;
  return g;
}

/// Median time and the CPU baseline of every case that ran, by name (for the paper and summary tables).
struct Result {
  Case c;
  double median_us = 0;  // cold: L2 flushed before each replay
  double hot_us = 0;     // replays back to back
  double gbps = 0;       // at median_us
  double cpu_s = 0;  // 0 when the case has no CPU baseline
};
std::map<std::string, Result>& results() {
  static std::map<std::string, Result> r;
  return r;
}
int failures = 0;
bool paper_mode = false;

/// The paper's configuration (fp32, per-channel) and kvq's own rows (fp16/bf16, per-token).
bool is_paper_config(DType t, Scheme s) {
  if (s.group != 0) return false;
  return t == DType::kFloat ? s.granularity == Granularity::kPerChannel : s.granularity == Granularity::kPerToken;
}

std::string reference_key(DType t, Scheme s, Shape shape) {
  return std::string(to_string(t)) + "/" + to_string(s) + "/" + to_string(shape);
}
std::map<std::string, ReferenceRun>& reference_runs() {
  static std::map<std::string, ReferenceRun> r;
  return r;
}

/// The CPU reference of (dtype, scheme, shape), run once and cached.
const ReferenceRun& cpu_reference(DType t, Scheme s, Shape shape) {
  const std::string key = reference_key(t, s, shape);
  auto it = reference_runs().find(key);
  if (it == reference_runs().end()) {
    kvq::QuantSpec spec;
    spec.granularity = s.granularity;
    spec.group = s.group;
    it = reference_runs().emplace(key, run_reference(t, shape, spec, seed_of(key.c_str()), nullptr)).first;
  }
  return it->second;
}

// --- one case ----------------------------------------------------------------------------------

/// Device buffers sized for c (x always: dequantize's codes are made from it).
DeviceTensors buffers_for(const Case& c) {
  Gpu& g = gpu();
  const auto n = static_cast<std::size_t>(c.elements());
  const std::size_t wide = n * size_of(c.dtype);
  DeviceTensors d;
  d.x = g.x.reserve(wide);
  d.q = static_cast<std::int8_t*>(g.q.reserve(n));
  d.scales = static_cast<float*>(g.scales.reserve(sizeof(float) * static_cast<std::size_t>(c.scale_count())));
  if (c.op == Op::kDequantize) d.y = g.y.reserve(wide);
  return d;
}

/// Elements of p (n of them, `bytes` each) still holding the poison byte `poison`.
unsigned long long count_poison(const void* p, std::int64_t n, std::size_t bytes, int poison) {
  Gpu& g = gpu();
  cuda_ok(cudaMemsetAsync(g.counter, 0, sizeof(unsigned long long), g.stream), "cudaMemsetAsync");
  const unsigned blocks = helper_blocks(n);
  if (bytes == 1)
    count_equal_kernel<<<blocks, kHelperThreads, 0, g.stream>>>(static_cast<const std::uint8_t*>(p), n,
                                                               static_cast<std::uint8_t>(poison), g.counter);
  else if (bytes == 2)
    count_equal_kernel<<<blocks, kHelperThreads, 0, g.stream>>>(static_cast<const std::uint16_t*>(p), n,
                                                               static_cast<std::uint16_t>(poison * 0x0101u), g.counter);
  else
    count_equal_kernel<<<blocks, kHelperThreads, 0, g.stream>>>(static_cast<const std::uint32_t*>(p), n,
                                                               poison * 0x01010101u, g.counter);
  cuda_ok(cudaPeekAtLastError(), "count_equal_kernel");
  unsigned long long count = 0;
  cuda_ok(cudaMemcpyAsync(&count, g.counter, sizeof(count), cudaMemcpyDeviceToHost, g.stream), "cudaMemcpyAsync");
  cuda_ok(cudaStreamSynchronize(g.stream), "cudaStreamSynchronize");
  return count;
}

/// Enqueues a read of the flush buffer: afterwards the L2 holds clean lines of it and nothing of
/// the case's operands.
cudaError_t flush_l2() {
  Gpu& g = gpu();
  const auto words = static_cast<std::int64_t>(g.flush_bytes / sizeof(uint4));
  read_flush_kernel<><<<helper_blocks(words), kHelperThreads, 0, g.stream>>>(static_cast<const uint4*>(g.flush), words,
                                                                           reinterpret_cast<unsigned*>(g.counter));
  return cudaPeekAtLastError();
}

/// Calls per graph replay: 20 back to back (compare_torch.py uses the same rule), fewer for calls
/// so large that 20 would move more than kReplayBytes (at least one): such calls run from HBM
/// anyway, and the replay's own launch is small against them.
constexpr int kMaxCallsPerReplay = 20;
constexpr double kReplayBytes = 8e9;
int calls_per_replay(double bytes) {
  return static_cast<int>(std::clamp(std::floor(kReplayBytes / bytes), 1.0, double{kMaxCallsPerReplay}));
}

/// A CUDA graph of `calls` back-to-back launches of one call, and its timed replays.
class Replay {
 public:
  Replay() = default;
  Replay(const Replay&) = delete;
  Replay& operator=(const Replay&) = delete;
  ~Replay() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
  }

  cudaError_t capture(int calls, const std::function<cudaError_t()>& call) {
    Gpu& g = gpu();
    calls_ = calls;
    cudaError_t err = cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeThreadLocal);
    if (err != cudaSuccess) return err;
    for (int i = 0; i < calls && err == cudaSuccess; ++i) err = call();
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(g.stream, &graph);  // always ends the capture
    if (err == cudaSuccess) err = end;
    if (err == cudaSuccess) err = cudaGraphInstantiate(&exec_, graph, 0);
    if (graph != nullptr) cudaGraphDestroy(graph);
    return err;
  }

  /// Milliseconds per call of one replay; the L2 is flushed before it when `cold`. Either the flush
  /// or a spin precedes the start event, so the window holds the replay's GPU work only.
  cudaError_t time(bool cold, double* ms_per_call) const {
    Gpu& g = gpu();
    if (!cold) spin_kernel<><<<1, 1, 0, g.stream>>>(kSpinCycles);
    cudaError_t err = cold ? flush_l2() : cudaPeekAtLastError();
    if (err == cudaSuccess) err = cudaEventRecord(g.start, g.stream);
    if (err == cudaSuccess) err = cudaGraphLaunch(exec_, g.stream);
    if (err == cudaSuccess) err = cudaEventRecord(g.stop, g.stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(g.stop);
    float ms = 0;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, g.start, g.stop);
    *ms_per_call = static_cast<double>(ms) / calls_;
    return err;
  }

  int calls() const { return calls_; }

 private:
  cudaGraphExec_t exec_ = nullptr;
  int calls_ = 1;
};

/// Makes c's inputs, runs it once on poisoned outputs and checks the result.
/// Throws on any CUDA error or wrong result.
Launch prepare(const Case& c, const std::string& name) {
  Gpu& g = gpu();
  const DeviceTensors d = buffers_for(c);
  const std::int64_t n = c.elements(), ns = c.scale_count();
  const std::size_t wide = size_of(c.dtype);
  fill_uniform(c.dtype, d.x, n, seed_of(name.c_str()), g.stream);

  Launch l;
  l.tensors = d;
  l.view = c.view();
  l.spec = c.spec();
  l.stream = g.stream;
  // Inputs other than x: the scales quantize_with_scales is given, the codes dequantize reads.
  if (c.op == Op::kQuantizeWithScales || c.op == Op::kDequantize) {
    l.op = c.op == Op::kQuantizeWithScales ? Op::kComputeScales : Op::kQuantize;
    cuda_ok(launch(c.dtype, l), "preparing the inputs");
  }
  l.op = c.op;
  l.variant = c.variant;

  const bool writes_scales = c.op == Op::kComputeScales || c.op == Op::kQuantize;
  const bool writes_codes = c.op == Op::kQuantize || c.op == Op::kQuantizeWithScales;
  const bool writes_values = c.op == Op::kDequantize;
  if (writes_scales) cuda_ok(cudaMemsetAsync(d.scales, kValuePoison, sizeof(float) * ns, g.stream), "poison");
  if (writes_codes) cuda_ok(cudaMemsetAsync(d.q, kCodePoison, n, g.stream), "poison");
  if (writes_values) cuda_ok(cudaMemsetAsync(d.y, kValuePoison, wide * n, g.stream), "poison");
  cuda_ok(launch(c.dtype, l), "launch");
  cuda_ok(cudaStreamSynchronize(g.stream), "the checked run");

  unsigned long long unwritten = 0;
  if (writes_scales) unwritten += count_poison(d.scales, ns, sizeof(float), kValuePoison);
  if (writes_codes) unwritten += count_poison(d.q, n, 1, kCodePoison);
  if (writes_values) unwritten += count_poison(d.y, n, wide, kValuePoison);
  if (unwritten != 0)
    throw std::runtime_error("WRONG RESULT: " + std::to_string(unwritten) + " output elements were never written");
  const std::string diff = check_against_reference(c, d);
  if (!diff.empty()) throw std::runtime_error("WRONG RESULT: " + diff);
  return l;
}

void fail(benchmark::State& state, const std::string& name, const std::string& why) {
  ++failures;
  std::fprintf(stderr, "\nkvq_bench: FAILED %s: %s\n", name.c_str(), why.c_str());
  state.SkipWithError(why.c_str());
}

template <class E>
double median(std::vector<E> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 == 1 ? v[m] : 0.5 * (static_cast<double>(v[m - 1]) + v[m]);
}

/// Captures `calls` back-to-back calls into `replay` and replays it once cold and once hot (lazy
/// module loading makes first launches slow). Throws on a CUDA error.
void capture_and_warm(Replay& replay, int calls, const std::function<cudaError_t()>& call) {
  cuda_ok(replay.capture(calls, call), "graph capture");
  double t = 0;
  cuda_ok(replay.time(/*cold=*/true, &t), "warm-up");
  cuda_ok(replay.time(/*cold=*/false, &t), "warm-up");
}

/// One cold replay per Google Benchmark iteration, then as many hot ones (milliseconds per call).
/// False (the case failed or stopped early) when there is nothing to report.
bool time_replays(benchmark::State& state, const std::string& name, const Replay& replay, std::vector<double>& cold,
                  std::vector<double>& hot) {
  cold.reserve(static_cast<std::size_t>(state.max_iterations));
  for (auto _ : state) {
    double t = 0;
    const cudaError_t err = replay.time(/*cold=*/true, &t);
    if (err != cudaSuccess) {
      fail(state, name, std::string("timed replay: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
      return false;
    }
    state.SetIterationTime(t * 1e-3);
    cold.push_back(t);
  }
  if (cold.empty() || static_cast<benchmark::IterationCount>(cold.size()) < state.max_iterations) return false;
  for (std::size_t i = 0; i < cold.size(); ++i) {
    double t = 0;
    const cudaError_t err = replay.time(/*cold=*/false, &t);
    if (err != cudaSuccess) {
      fail(state, name, std::string("timed replay: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
      return false;
    }
    hot.push_back(t);
  }
  return true;
}

void run_case(benchmark::State& state, const Case& c) {
  const std::string name = to_string(c);
  const Bytes bytes = bytes_of(c);
  Launch l;
  Replay replay;
  try {
    l = prepare(c, name);
    capture_and_warm(replay, calls_per_replay(bytes.counted), [&] { return launch(c.dtype, l); });
  } catch (const std::exception& e) {
    fail(state, name, e.what());
    return;
  }

  std::vector<double> cold, hot;
  if (!time_replays(state, name, replay, cold, hot)) return;

  const double seconds = median(cold) * 1e-3;
  Result r{c, seconds * 1e6, median(hot) * 1e3, bytes.counted / seconds * 1e-9, 0};
  state.counters["median_us"] = r.median_us;
  state.counters["hot_us"] = r.hot_us;
  state.counters["calls_per_replay"] = replay.calls();
  state.counters["bytes"] = bytes.counted;
  state.counters["GB/s"] = r.gbps;
  const double copy = gpu().copy_gbps;
  if (copy > 0) state.counters["%copy"] = 100.0 * r.gbps / copy;
  if (c.reads_input_twice()) {
    const double moved = bytes.moved / seconds * 1e-9;
    state.counters["GB/s_2reads"] = moved;
    if (copy > 0) state.counters["%copy_2reads"] = 100.0 * moved / copy;
  }
  // The CPU reference of a 1 G-element fp16/bf16 tensor takes seconds (the host converts in
  // software): the default workload times it for fp32 only, paper mode for every row it prints.
  if (is_paper_shape(c.shape) && is_paper_config(c.dtype, c.scheme) && (paper_mode || c.dtype == DType::kFloat)) {
    try {  // the GPU numbers stand without it: a CPU that cannot run the reference only loses xCPU
      const ReferenceRun& ref = cpu_reference(c.dtype, c.scheme, c.shape);
      r.cpu_s = ref.cpu.of(c.op);
      state.counters["cpu_ms"] = r.cpu_s * 1e3;
      state.counters["xCPU"] = r.cpu_s / seconds;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kvq_bench: no CPU baseline for %s: %s\n", name.c_str(), e.what());
    }
  }
  results()[name] = r;
}

/// A paged-cache case (PagedAppend, DecodeAttention: paged_ops.cu, which make and check it), timed
/// as run_case times.
template <class Op, class C>
void run_paged_case(benchmark::State& state, const C& c) {
  const std::string name = c.name();
  std::unique_ptr<Op> op;
  Replay replay;
  try {
    op = std::make_unique<Op>(c, gpu().stream);
    capture_and_warm(replay, calls_per_replay(c.bytes()), [&] { return op->launch(gpu().stream); });
  } catch (const std::exception& e) {
    fail(state, name, e.what());
    return;
  }
  std::vector<double> cold, hot;
  if (!time_replays(state, name, replay, cold, hot)) return;
  const double seconds = median(cold) * 1e-3, gbps = c.bytes() / seconds * 1e-9;
  state.counters["median_us"] = seconds * 1e6;
  state.counters["hot_us"] = median(hot) * 1e3;
  state.counters["calls_per_replay"] = replay.calls();
  state.counters["bytes"] = c.bytes();
  state.counters["GB/s"] = gbps;
  if (gpu().copy_gbps > 0) state.counters["%copy"] = 100.0 * gbps / gpu().copy_gbps;
}

// --- which cases exist, and which run by default ----------------------------------------------

/// Head dims engines use, and the (token, head) rows of one call: from a decode step (8 sequences
/// of 8 KV heads) to a prefill of a million.
constexpr std::int64_t kHeadDims[] = {64, 80, 96, 128, 256};
constexpr std::int64_t kEngineRows[] = {64, 2048, 16384, 65536, 262144, 1048576};

constexpr Scheme kPerTokenRows{Granularity::kPerToken, 0};
constexpr Scheme kKeysPerChannel{Granularity::kPerChannel, 128};  // KIVI-style keys: groups of 128 tokens

/// The engines' cases, all with Variant::kAuto: per-token quantize, quantize_with_scales and
/// dequantize of rows one head wide; and [T, H, D] per head (8 KV heads) and [B, H, T, D], with
/// keys per channel in groups of 128 tokens (each op) and values per token.
std::vector<Case> engine_cases() {
  std::vector<Case> cases;
  constexpr Op kApplyOps[] = {Op::kQuantize, Op::kQuantizeWithScales, Op::kDequantize};
  for (DType t : kDTypes) {
    for (Op op : kApplyOps)
      for (std::int64_t dim : kHeadDims)
        for (std::int64_t rows : kEngineRows) cases.push_back(Case{op, t, kPerTokenRows, Variant::kAuto, rows_shape(rows, dim)});
    const Shape views[] = {thd_shape(128, 8, 128),   thd_shape(32768, 8, 64), thd_shape(32768, 8, 128),
                           thd_shape(32768, 8, 256), bhtd_shape(4, 8, 8192, 128)};
    for (Shape shape : views) {
      for (Op op : kApplyOps) cases.push_back(Case{op, t, kKeysPerChannel, Variant::kAuto, shape});
      cases.push_back(Case{Op::kQuantize, t, kPerTokenRows, Variant::kAuto, shape});
    }
  }
  return cases;
}

bool is_engine_shape(Shape s) { return s.layout != Layout::kMatrix; }

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (Shape shape : kPaperShapes)
    for (Op op : kOps)
      for (Scheme scheme : kSchemes)
        for (DType t : kDTypes)
          for (Variant v : kVariants) cases.push_back(Case{op, t, scheme, v, shape});
  for (const Case& c : engine_cases()) cases.push_back(c);
  return cases;
}

bool same_scheme(Scheme a, Granularity g, std::int64_t group) { return a.granularity == g && a.group == group; }

/// A few minutes on the H200: every engine case; every strategy at the paper's headline size for
/// the paper's path and for the schemes that compute scales, and the paper's anchor rows.
bool in_default_workload(const Case& c) {
  if (is_engine_shape(c.shape)) return true;
  const bool auto_only = c.variant == Variant::kAuto;
  const bool pc = same_scheme(c.scheme, Granularity::kPerChannel, 0);
  const bool pc128 = same_scheme(c.scheme, Granularity::kPerChannel, 128);
  const bool pt = same_scheme(c.scheme, Granularity::kPerToken, 0);
  if (c.shape == kHeadline) {
    switch (c.op) {
      case Op::kQuantizeWithScales:
      case Op::kDequantize: return pc;
      case Op::kQuantize: return pt || pc || pc128 || auto_only;
      case Op::kComputeScales: return auto_only && c.dtype == DType::kHalf;
    }
  }
  if (c.shape == Shape{131072, 1024}) return c.op == Op::kQuantizeWithScales && pc && c.dtype == DType::kFloat;
  return false;
}

/// The paper's table (fp32 per-channel, given scales, every variant) and kvq's rows (fp16/bf16
/// per-token quantize, auto), with dequantize for both, on the ten paper shapes.
bool in_paper_workload(const Case& c) {
  if (!is_paper_config(c.dtype, c.scheme)) return false;
  if (c.dtype == DType::kFloat) return c.op == Op::kQuantizeWithScales || c.op == Op::kDequantize;
  return c.variant == Variant::kAuto && (c.op == Op::kQuantize || c.op == Op::kDequantize);
}

/// Replays timed cold (and as many hot) per case.
benchmark::IterationCount iterations_for(const Case& c) {
  const std::int64_t n = c.elements();
  if (n >= (std::int64_t{1} << 26)) return 15;   // >= 64 M elements: milliseconds each, steady
  if (n >= (std::int64_t{1} << 22)) return 30;
  return 50;                                     // microseconds each: more samples for the median
}

void register_cases(bool (*wanted)(const Case&)) {
  for (const Case& c : all_cases()) {
    if (wanted != nullptr && !wanted(c)) continue;
    benchmark::RegisterBenchmark(to_string(c).c_str(), [c](benchmark::State& s) { run_case(s, c); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->Iterations(iterations_for(c));
  }
}

/// The paged cases belong to the default workload (and to any filter that names them); the decode
/// sweep (`every`) only to a filter.
void register_paged_cases(bool every) {
  for (const PagedCase& c : paged_cases())
    benchmark::RegisterBenchmark(c.name().c_str(), [c](benchmark::State& s) { run_paged_case<PagedAppend>(s, c); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->Iterations(c.decode ? 50 : 30);
  std::vector<DecodeCase> decode = decode_cases();
  if (every) {
    const std::vector<DecodeCase> sweep = decode_sweep_cases();
    decode.insert(decode.end(), sweep.begin(), sweep.end());
  }
  for (const DecodeCase& c : decode)
    benchmark::RegisterBenchmark(c.name().c_str(), [c](benchmark::State& s) { run_paged_case<DecodeAttention>(s, c); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->Iterations(30);
}

// --- output ------------------------------------------------------------------------------------

std::string format_time(double us) {
  char buf[32];
  if (us < 100) std::snprintf(buf, sizeof buf, "%.2f us", us);
  else if (us < 1000) std::snprintf(buf, sizeof buf, "%.1f us", us);
  else std::snprintf(buf, sizeof buf, "%.3f ms", us * 1e-3);
  return buf;
}

std::string format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

/// One line per case as it finishes, from the counters run_case set (Google Benchmark's console
/// table is wide and shows the mean; this one shows the median, and names failures).
class TableReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override {
    std::printf("%-64s %10s %10s %8s %7s %8s\n", "case", "cold", "hot", "GB/s", "%copy", "xCPU");
    std::fflush(stdout);
    return true;
  }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      const auto& k = run.counters;
      auto get = [&k](const char* key) { return k.count(key) != 0 ? k.at(key).value : -1.0; };
      // The registered name: Google Benchmark appends /iterations:N/manual_time in its own output.
      const std::string& name = run.run_name.function_name;
      if (get("median_us") < 0) {
        std::printf("%-64s FAILED (see the message above)\n", name.c_str());
        continue;
      }
      std::printf("%-64s %10s %10s %8.0f %6.1f%% %8s", name.c_str(), format_time(get("median_us")).c_str(),
                  format_time(get("hot_us")).c_str(), get("GB/s"), get("%copy"),
                  get("xCPU") < 0 ? "" : format("%.0fx", get("xCPU")).c_str());
      if (get("GB/s_2reads") >= 0)
        std::printf("   reading x twice: %.0f GB/s, %.1f%% of copy", get("GB/s_2reads"), get("%copy_2reads"));
      std::printf("\n");
    }
    std::fflush(stdout);
  }
};

const Result* find_result(Op op, DType t, Scheme s, Variant v, Shape shape) {
  const auto it = results().find(to_string(Case{op, t, s, v, shape}));
  return it == results().end() ? nullptr : &it->second;
}

std::string ms_or_dash(const Result* r) { return r ? format("%.4g", r->median_us * 1e-3) : "-"; }

/// CPU time over GPU time of quantize + dequantize, "-" when either is missing.
std::string speedup(const Result* q, const Result* dq) {
  if (!q || !dq || q->cpu_s <= 0 || dq->cpu_s <= 0) return "-";
  return format("%.0fx", (q->cpu_s + dq->cpu_s) / ((q->median_us + dq->median_us) * 1e-6));
}

std::string accuracy_cells(DType t, Scheme s, Shape shape) {
  const auto it = reference_runs().find(reference_key(t, s, shape));
  if (it == reference_runs().end() || !it->second.has_accuracy) return "- | - | -";
  const Accuracy& a = it->second.accuracy;
  return format("%.6f", a.max_abs) + " | " + format("%.4g", a.l2) + " | " + format("%.4f", a.attention_score);
}

constexpr Scheme kPerChannel{Granularity::kPerChannel, 0};
constexpr Scheme kPerToken{Granularity::kPerToken, 0};

/// The errors of the paper table come from the GPU's output (auto), compared first with the CPU
/// reference over the whole tensor: every variant's output equals it (each case checked its own).
void paper_accuracy() {
  Gpu& g = gpu();
  std::printf("paper mode: checking the GPU output against the CPU reference on every paper shape...\n");
  std::fflush(stdout);
  for (Shape shape : kPaperShapes) {
    for (DType t : kDTypes) {
      const Scheme s = t == DType::kFloat ? kPerChannel : kPerToken;
      const std::string key = reference_key(t, s, shape);
      try {
        Case c{Op::kDequantize, t, s, Variant::kAuto, shape};
        DeviceTensors d = buffers_for(c);
        fill_uniform(t, d.x, shape.elements(), seed_of(key.c_str()), g.stream);
        Launch l;
        l.tensors = d;
        l.view = c.view();
        l.spec = c.spec();
        l.stream = g.stream;
        // fp32: the paper's path (scales, then codes with those scales); fp16/bf16: one quantize.
        const std::vector<Op> ops = t == DType::kFloat
                                        ? std::vector<Op>{Op::kComputeScales, Op::kQuantizeWithScales, Op::kDequantize}
                                        : std::vector<Op>{Op::kQuantize, Op::kDequantize};
        for (Op op : ops) {
          l.op = op;
          cuda_ok(launch(t, l), to_string(op));
        }
        cuda_ok(cudaStreamSynchronize(g.stream), "paper accuracy run");
        ReferenceRun run = run_reference(t, shape, c.spec(), seed_of(key.c_str()), d.y);
        if (!run.mismatch.empty()) throw std::runtime_error("WRONG RESULT: " + run.mismatch);
        reference_runs()[key] = run;
        std::printf("  %-36s GPU == CPU reference on all %lld values\n", key.c_str(),
                    static_cast<long long>(shape.elements()));
      } catch (const std::exception& e) {
        ++failures;
        std::fprintf(stderr, "kvq_bench: FAILED accuracy %s: %s\n", key.c_str(), e.what());
      }
      std::fflush(stdout);
    }
  }
}

void print_paper_table() {
  std::printf("\n## The paper's table on this GPU: fp32 [T, D] -> int8, per-channel, scales given\n\n");
  std::printf("quantize = quantize_with_scales (the paper's path), dequantize = dequantize; median ms.\n");
  std::printf("vs CPU = kvq::reference on %d threads (quantize + dequantize) / GPU (quantize + dequantize).\n",
              cpu_threads());
  std::printf("Errors of the dequantized tensor against the input (uniform in [-1, 1)), the same for every\n"
              "variant (all match the CPU reference bit for bit); attention-score error: mean over tokens of\n"
              "|q.k - q.k_hat| for one random query q uniform in [-1, 1)^D.\n\n");
  std::printf("| T x D | variant | quantize ms | dequantize ms | vs CPU | max-abs error | L2 error | attention-score error |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (Shape shape : kPaperShapes) {
    const std::string errors = accuracy_cells(DType::kFloat, kPerChannel, shape);
    for (Variant v : kVariants) {
      const Result* q = find_result(Op::kQuantizeWithScales, DType::kFloat, kPerChannel, v, shape);
      const Result* dq = find_result(Op::kDequantize, DType::kFloat, kPerChannel, v, shape);
      std::printf("| %lld x %lld | %s | %s | %s | %s | %s |\n", static_cast<long long>(shape.tokens),
                  static_cast<long long>(shape.channels), kvq::to_string(v), ms_or_dash(q).c_str(),
                  ms_or_dash(dq).c_str(), speedup(q, dq).c_str(), errors.c_str());
    }
  }
  std::printf("\n## kvq's own rows: fp16 / bf16 inputs, per-token scales computed on the GPU (quantize), auto\n\n");
  std::printf("| dtype | T x D | quantize ms | dequantize ms | vs CPU | max-abs error | L2 error | attention-score error |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (DType t : {DType::kHalf, DType::kBfloat16}) {
    for (Shape shape : kPaperShapes) {
      const Result* q = find_result(Op::kQuantize, t, kPerToken, Variant::kAuto, shape);
      const Result* dq = find_result(Op::kDequantize, t, kPerToken, Variant::kAuto, shape);
      std::printf("| %s | %lld x %lld | %s | %s | %s | %s |\n", to_string(t), static_cast<long long>(shape.tokens),
                  static_cast<long long>(shape.channels), ms_or_dash(q).c_str(), ms_or_dash(dq).c_str(),
                  speedup(q, dq).c_str(), accuracy_cells(t, kPerToken, shape).c_str());
    }
  }
}

/// Orders engine cases by layout, op, dtype, scheme, head dim, then size; the paper's after them.
bool summary_order(const Result* a, const Result* b) {
  auto key = [](const Case& c) {
    return std::make_tuple(!is_engine_shape(c.shape), static_cast<int>(c.shape.layout), static_cast<int>(c.op),
                           static_cast<int>(c.dtype), static_cast<int>(c.scheme.granularity), c.scheme.group,
                           c.shape.channels, c.shape.batch, c.shape.heads, c.shape.tokens);
  };
  return key(a->c) < key(b->c);
}

/// Every auto case that ran, as a markdown table (the rows a results file quotes): the engines'
/// shapes first, then the paper's.
void print_auto_summary() {
  std::vector<const Result*> rows;
  for (const auto& entry : results())
    if (entry.second.c.variant == Variant::kAuto) rows.push_back(&entry.second);
  if (rows.empty()) return;
  std::sort(rows.begin(), rows.end(), summary_order);
  const double copy = gpu().copy_gbps;
  std::printf("\n## Summary: Variant::kAuto (copy = %.0f GB/s)\n\n", copy);
  std::printf("Per call, inside CUDA graphs: cold = L2 flushed before each replay, hot = replays back to back.\n\n");
  std::printf("| case | MB moved | cold | hot | GB/s (cold) | %% of copy | %% of copy, input read twice | vs CPU |\n"
              "|---|---|---|---|---|---|---|---|\n");
  for (const Result* r : rows) {
    const Bytes b = bytes_of(r->c);
    const std::string twice = r->c.reads_input_twice() && copy > 0
                                  ? format("%.1f", 100.0 * b.moved / (r->median_us * 1e-6) * 1e-9 / copy)
                                  : "";
    std::printf("| %s | %s | %s | %s | %.0f | %s | %s | %s |\n", to_string(r->c).c_str(),
                format(b.counted < 1e7 ? "%.3f" : "%.1f", b.counted * 1e-6).c_str(), format_time(r->median_us).c_str(),
                format_time(r->hot_us).c_str(), r->gbps, copy > 0 ? format("%.1f", 100.0 * r->gbps / copy).c_str() : "-",
                twice.c_str(), r->cpu_s > 0 ? format("%.0fx", r->cpu_s / (r->median_us * 1e-6)).c_str() : "");
  }
}

// --- start-up ----------------------------------------------------------------------------------

__global__ void empty_kernel() {}

/// The shortest time any case can report, per call: an empty kernel timed as every case is (graphs
/// of kMaxCallsPerReplay launches, replayed cold and hot). Decode-sized calls are read against it.
struct Floor {
  double cold_us = 0, hot_us = 0;
};
Floor measure_floor() {
  constexpr int kReplays = 20;
  Replay replay;
  cuda_ok(replay.capture(kMaxCallsPerReplay,
                         [] {
                           empty_kernel<<<1, 1, 0, gpu().stream>>>();
                           return cudaPeekAtLastError();
                         }),
          "graph capture (floor)");
  Floor f;
  for (bool cold : {true, false}) {
    std::vector<double> ms;
    for (int i = 0; i < kReplays + 2; ++i) {  // the first two are warm-up
      double t = 0;
      cuda_ok(replay.time(cold, &t), "timed replay (floor)");
      if (i >= 2) ms.push_back(t);
    }
    (cold ? f.cold_us : f.hot_us) = median(ms) * 1e3;
  }
  return f;
}

/// Stream, events, L2 flush buffer, copy bandwidth; prints what the numbers will be measured on.
void start_up() {
  Gpu& g = gpu();
  cudaDeviceProp prop{};
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  cuda_ok(cudaSetDevice(0), "cudaSetDevice");
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  cuda_ok(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda_ok(cudaEventCreate(&g.start), "cudaEventCreate");
  cuda_ok(cudaEventCreate(&g.stop), "cudaEventCreate");
  cuda_ok(cudaMalloc(reinterpret_cast<void**>(&g.counter), sizeof(unsigned long long)), "cudaMalloc");
  constexpr std::size_t kMinFlushBytes = std::size_t{256} << 20;
  g.flush_bytes = std::max(kMinFlushBytes, 2 * static_cast<std::size_t>(prop.l2CacheSize));
  cuda_ok(cudaMalloc(&g.flush, g.flush_bytes), "cudaMalloc (L2 flush buffer)");
  cuda_ok(cudaMemsetAsync(g.flush, 0, g.flush_bytes, g.stream), "cudaMemsetAsync");
  cuda_ok(measure_copy_gbps(g.stream, g.start, g.stop, 20, &g.copy_gbps), "the device-to-device copy");
  const Floor floor = measure_floor();

  std::printf("kvq_bench on %s (sm_%d%d, %d SMs, %.0f GB, L2 %d MB), driver %d.%d, runtime %d.%d\n", prop.name,
              prop.major, prop.minor, prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) * 1e-9,
              prop.l2CacheSize >> 20, driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
  std::printf("device-to-device copy: %.0f GB/s (2 GiB, bytes read + written, median of 20) = 100%% copy\n",
              g.copy_gbps);
  std::printf("floor: %.2f us cold, %.2f us hot per call for an empty kernel timed as every case is\n", floor.cold_us,
              floor.hot_us);
  std::printf("timing: each case captured %d times back to back into a CUDA graph (fewer above %.0f MB a call),\n"
              "replays timed with events: cold = L2 flushed before each replay (a %zu MB read), hot = back to back;\n"
              "medians after warm-up, per call. GB/s (at the cold time): decimal, input read + output written +\n"
              "fp32 scales, each once; xCPU: kvq::reference on %d threads\n\n",
              kMaxCallsPerReplay, kReplayBytes / kMaxCallsPerReplay * 1e-6, g.flush_bytes >> 20, cpu_threads());
  benchmark::AddCustomContext("gpu", prop.name);
  benchmark::AddCustomContext("copy_GBps", format("%.1f", g.copy_gbps));
  benchmark::AddCustomContext("floor_us", format("%.2f", floor.cold_us));
  benchmark::AddCustomContext("floor_hot_us", format("%.2f", floor.hot_us));
  benchmark::AddCustomContext("l2_bytes", std::to_string(prop.l2CacheSize));
  benchmark::AddCustomContext("l2_flush_bytes", std::to_string(g.flush_bytes));
  benchmark::AddCustomContext("cpu_reference_threads", std::to_string(cpu_threads()));
  benchmark::AddCustomContext(
      "time_counter",
      "median_us: cold (L2 flushed before each graph replay), hot_us: replays back to back; per call, a replay "
      "being calls_per_replay calls (the time column is Google Benchmark's mean of the cold replays)");
}

bool has_prefix(const char* arg, const char* prefix) { return std::strncmp(arg, prefix, std::strlen(prefix)) == 0; }

}  // namespace
}  // namespace kvq_bench

int main(int argc, char** argv) {
  using namespace kvq_bench;
  // Our flags first (Google Benchmark rejects flags it does not know).
  bool& paper = paper_mode;
  bool filtered = false, listing = false;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--paper") == 0) {
      paper = true;
      continue;
    }
    filtered |= has_prefix(argv[i], "--benchmark_filter");
    listing |= has_prefix(argv[i], "--benchmark_list_tests") && std::strstr(argv[i], "=false") == nullptr &&
               std::strstr(argv[i], "=0") == nullptr;
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0)
      std::printf("kvq_bench [--paper] [Google Benchmark flags]\n"
                  "  (no flag)   the default workload (a few minutes on an H200)\n"
                  "  --paper     the paper's table on its ten shapes, then kvq's own rows\n"
                  "  --benchmark_filter=REGEX  any registered case (--benchmark_filter=. for all)\n\n");
    argv[kept++] = argv[i];
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  // A filter chooses among every case; otherwise the mode's own list is all that is registered.
  register_cases(filtered ? nullptr : paper ? in_paper_workload : in_default_workload);
  if (filtered || !paper) register_paged_cases(filtered);

  if (!listing) {
    int devices = 0;
    const cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
      std::printf("kvq_bench: no usable CUDA GPU (%s); nothing to benchmark.\n",
                  err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount found 0 devices");
      return 0;
    }
    try {
      start_up();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kvq_bench: start-up failed: %s\n", e.what());
      return 1;
    }
    if (paper) paper_accuracy();
  }

  TableReporter table;
  benchmark::RunSpecifiedBenchmarks(&table);
  if (!listing) {
    if (paper) print_paper_table();
    else print_auto_summary();
  }
  benchmark::Shutdown();
  if (failures != 0) {
    std::fprintf(stderr, "\nkvq_bench: %d FAILED case(s); their numbers are not reported\n", failures);
    return 1;
  }
  return 0;
}
