// bench/host_reference.cpp: correctness checks, CPU baseline and accuracy (see host_reference.hpp).
#include "host_reference.hpp"

#include "random.hpp"

#include <kvq/metrics.hpp>
#include <kvq/reference.hpp>

#include <cuda_runtime_api.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <vector>

namespace kvq_bench {
namespace {

using kvq::Granularity;

template <class F>
void parallel_for(std::int64_t n, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

/// Elements per parallel work item of the host loops: large enough to amortize scheduling.
constexpr std::int64_t kChunk = std::int64_t{1} << 20;

/// Calls f(begin, end) on consecutive chunks of [0, n), in parallel.
template <class F>
void parallel_chunks(std::int64_t n, F&& f) {
  parallel_for((n + kChunk - 1) / kChunk, [&](std::int64_t k) { f(k * kChunk, std::min(n, (k + 1) * kChunk)); });
}

/// An uninitialized host array (a multi-GB std::vector would zero it on one thread). Outputs are
/// touched in parallel before anything is timed, so the CPU reference never pays for page faults.
template <class E>
class HostArray {
 public:
  explicit HostArray(std::int64_t n)
      : data_(static_cast<E*>(std::malloc(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(E)))),
        size_(n) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  E* get() const { return data_.get(); }
  std::int64_t size() const { return size_; }
  void touch() {
    parallel_chunks(size_, [&](std::int64_t b, std::int64_t e) {
      std::memset(static_cast<void*>(data_.get() + b), 0, static_cast<std::size_t>(e - b) * sizeof(E));
    });
  }

 private:
  struct Free {
    void operator()(E* p) const { std::free(p); }
  };
  std::unique_ptr<E, Free> data_;
  std::int64_t size_;
};

template <class T>
void generate(T* x, std::int64_t n, std::uint64_t seed) {
  parallel_chunks(n, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) x[i] = kvq::from_float<T>(uniform_pm1(seed, static_cast<std::uint64_t>(i)));
  });
}

double value_of(std::int8_t v) { return v; }
template <class T>
double value_of(T v) {
  return kvq::to_float(v);
}

/// Rows [r0, r0 + rows) x columns [c0, c0 + cols) of matrix b of a batch of row-major matrices.
struct Window {
  std::int64_t b, r0, rows, c0, cols;
  std::int64_t size() const { return rows * cols; }
};

/// Copies a window of a batch of device matrices (`ld` elements per row, `batch_stride` per matrix)
/// into a dense host array.
template <class E>
std::string copy_window(const void* device, std::int64_t batch_stride, std::int64_t ld, const Window& w, E* host) {
  const E* src = static_cast<const E*>(device) + w.b * batch_stride + w.r0 * ld + w.c0;
  const cudaError_t err = cudaMemcpy2D(host, static_cast<std::size_t>(w.cols) * sizeof(E), src,
                                       static_cast<std::size_t>(ld) * sizeof(E),
                                       static_cast<std::size_t>(w.cols) * sizeof(E),
                                       static_cast<std::size_t>(w.rows), cudaMemcpyDeviceToHost);
  return err == cudaSuccess ? std::string() : std::string("cudaMemcpy2D: ") + cudaGetErrorString(err);
}

/// "" when gpu and ref (window w of the named tensor) are equal bit for bit, else the first
/// difference in the tensor's own coordinates (batch, row, column) and how many elements differ.
template <class E>
std::string compare(const char* what, const E* gpu, const E* ref, const Window& w) {
  std::int64_t first = -1, count = 0;
  for (std::int64_t i = 0; i < w.size(); ++i) {
    if (std::memcmp(&gpu[i], &ref[i], sizeof(E)) == 0) continue;
    if (first < 0) first = i;
    ++count;
  }
  if (count == 0) return {};
  std::ostringstream os;
  os.precision(9);  // enough digits to tell two fp32 values apart
  os << what << "[" << w.b << ", " << w.r0 + first / w.cols << ", " << w.c0 + first % w.cols << "]: GPU "
     << value_of(gpu[first]) << ", CPU reference " << value_of(ref[first]) << " (" << count << " of " << w.size()
     << " compared elements differ)";
  return os.str();
}

std::string reference_failed(cudaError_t err) {
  return err == cudaSuccess ? std::string() : std::string("the CPU reference rejected the arguments: ") +
                                                  cudaGetErrorName(err);
}

/// Elements per sampled window of a per-token case (whole rows, at least one).
constexpr std::int64_t kSampleElements = std::int64_t{1} << 18;
/// Channels per sampled window of a per-channel case (all tokens of them).
constexpr std::int64_t kSampleChannels = 64;

template <class T>
std::string check_as(const Case& c, const DeviceTensors& d) {
  const kvq::QuantSpec spec = c.spec();
  const kvq::KvView view = c.view();
  const std::int64_t B = view.batch, T_ = view.tokens, D = view.channels;
  const bool per_token = spec.granularity == Granularity::kPerToken;
  const kvq::ScaleShape ss = kvq::scale_shape(view, spec);  // (batch, rows, cols)

  // Two windows, in the first and the last matrix of the batch, at the two ends of the axis the
  // groups do not span, each holding whole groups.
  const std::int64_t h = std::clamp<std::int64_t>(kSampleElements / D, 1, T_);
  const std::int64_t cw = std::min(D, kSampleChannels);
  const Window windows[2] = {per_token ? Window{0, 0, h, 0, D} : Window{0, 0, T_, 0, cw},
                             per_token ? Window{B - 1, T_ - h, h, 0, D} : Window{B - 1, 0, T_, D - cw, cw}};
  const bool one_window =
      windows[0].b == windows[1].b && windows[0].r0 == windows[1].r0 && windows[0].c0 == windows[1].c0;

  for (int i = 0; i < (one_window ? 1 : 2); ++i) {
    const Window& w = windows[i];
    const Window sw = per_token ? Window{w.b, w.r0, w.rows, 0, ss.cols} : Window{w.b, 0, ss.rows, w.c0, w.cols};
    const std::int64_t scale_batch_stride = ss.rows * ss.cols;
    const kvq::KvView wv = kvq::contiguous_view(w.rows, w.cols);
    HostArray<T> x(w.size()), y(w.size()), y_ref(w.size());
    HostArray<std::int8_t> q(w.size()), q_ref(w.size());
    HostArray<float> s(sw.size()), s_ref(sw.size());

    // Read back what the op read and wrote (scales and codes are one or the other, by op).
    std::string err;
    if (c.op != Op::kDequantize) err += copy_window(d.x, view.batch_stride, view.token_stride, w, x.get());
    err += copy_window(d.scales, scale_batch_stride, ss.cols, sw, s.get());
    if (c.op != Op::kComputeScales) err += copy_window(d.q, view.batch_stride, view.token_stride, w, q.get());
    if (c.op == Op::kDequantize) err += copy_window(d.y, view.batch_stride, view.token_stride, w, y.get());
    if (!err.empty()) return err;

    std::string diff;
    switch (c.op) {
      case Op::kComputeScales:
        if ((err = reference_failed(kvq::reference::compute_scales(x.get(), wv, spec, s_ref.get()))).empty())
          diff = compare("scales", s.get(), s_ref.get(), sw);
        break;
      case Op::kQuantize:
        if ((err = reference_failed(kvq::reference::quantize(x.get(), wv, spec, q_ref.get(), s_ref.get()))).empty()) {
          diff = compare("scales", s.get(), s_ref.get(), sw);
          if (diff.empty()) diff = compare("codes", q.get(), q_ref.get(), w);
        }
        break;
      case Op::kQuantizeWithScales:
        if ((err = reference_failed(kvq::reference::quantize_with_scales(x.get(), s.get(), wv, spec, q_ref.get())))
                .empty())
          diff = compare("codes", q.get(), q_ref.get(), w);
        break;
      case Op::kDequantize:
        if ((err = reference_failed(kvq::reference::dequantize(q.get(), s.get(), wv, spec, y_ref.get()))).empty())
          diff = compare("values", y.get(), y_ref.get(), w);
        break;
    }
    if (!err.empty()) return err;
    if (!diff.empty()) return diff;
  }
  return {};
}

/// Seconds of one run of f: the median of several when one run is too short to time well (the
/// first run of a small case also pays for starting the OpenMP threads).
template <class F>
double time_host(F&& f) {
  constexpr double kEnoughSeconds = 0.2;
  constexpr std::size_t kMaxRuns = 11;
  std::vector<double> t;
  double total = 0;
  do {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    total += t.back();
  } while (total < kEnoughSeconds && t.size() < kMaxRuns);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// kvq::metrics on chunks in parallel (they are serial loops), combined exactly as one pass would.
template <class T>
Accuracy accuracy_of(const T* x, const T* y, Shape shape) {
  const std::int64_t n = shape.elements(), D = shape.channels;
  const std::int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> max_abs(static_cast<std::size_t>(nchunks)), sq(static_cast<std::size_t>(nchunks));
  parallel_for(nchunks, [&](std::int64_t k) {
    const std::int64_t b = k * kChunk, len = std::min(n, b + kChunk) - b;
    max_abs[k] = kvq::metrics::max_abs_error(x + b, y + b, len);
    const double l2 = kvq::metrics::l2_error(x + b, y + b, len);
    sq[k] = l2 * l2;
  });

  // The paper's attention-score error with one random query, mean over tokens.
  std::vector<float> query(static_cast<std::size_t>(D));
  std::mt19937 gen(2601);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (float& v : query) v = dist(gen);
  const std::int64_t tokens_per_chunk = std::max<std::int64_t>(1, kChunk / D);
  const std::int64_t tchunks = (shape.tokens + tokens_per_chunk - 1) / tokens_per_chunk;
  std::vector<double> score(static_cast<std::size_t>(tchunks));
  parallel_for(tchunks, [&](std::int64_t k) {
    const std::int64_t t0 = k * tokens_per_chunk, len = std::min(shape.tokens, t0 + tokens_per_chunk) - t0;
    score[k] = kvq::metrics::attention_score_error(query.data(), x + t0 * D, y + t0 * D, len, D) *
               static_cast<double>(len);
  });

  Accuracy a;
  for (double m : max_abs) a.max_abs = std::max(a.max_abs, m);
  double total_sq = 0, total_score = 0;
  for (double s : sq) total_sq += s;
  for (double s : score) total_score += s;
  a.l2 = std::sqrt(total_sq);
  a.attention_score = total_score / static_cast<double>(shape.tokens);
  return a;
}

template <class T>
ReferenceRun run_reference_as(Shape shape, const kvq::QuantSpec& spec, std::uint64_t seed, const void* y_device) {
  ReferenceRun r;
  const kvq::KvView v = kvq::contiguous_view(shape.tokens, shape.channels);
  const std::int64_t n = shape.elements();
  HostArray<T> x(n), y(n);
  HostArray<std::int8_t> q(n);
  HostArray<float> scales(kvq::scale_count(v, spec));
  generate(x.get(), n, seed);
  y.touch();
  q.touch();
  scales.touch();

  cudaError_t err = cudaSuccess;
  auto keep = [&err](cudaError_t e) { err = err != cudaSuccess ? err : e; };
  r.cpu.compute_scales = time_host([&] { keep(kvq::reference::compute_scales(x.get(), v, spec, scales.get())); });
  r.cpu.quantize_with_scales =
      time_host([&] { keep(kvq::reference::quantize_with_scales(x.get(), scales.get(), v, spec, q.get())); });
  r.cpu.dequantize = time_host([&] { keep(kvq::reference::dequantize(q.get(), scales.get(), v, spec, y.get())); });
  if (err != cudaSuccess) {
    r.mismatch = reference_failed(err);
    return r;
  }
  if (y_device == nullptr) return r;

  HostArray<T> y_gpu(n);
  y_gpu.touch();
  err = cudaMemcpy(y_gpu.get(), y_device, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    r.mismatch = std::string("cudaMemcpy: ") + cudaGetErrorString(err);
    return r;
  }
  // The whole tensor, bit for bit; then the first difference in detail.
  std::vector<char> differs(static_cast<std::size_t>((n + kChunk - 1) / kChunk), 0);
  parallel_chunks(n, [&](std::int64_t b, std::int64_t e) {
    differs[b / kChunk] = std::memcmp(y_gpu.get() + b, y.get() + b, static_cast<std::size_t>(e - b) * sizeof(T)) != 0;
  });
  if (std::find(differs.begin(), differs.end(), 1) != differs.end()) {
    r.mismatch = compare("values", y_gpu.get(), y.get(), Window{0, 0, shape.tokens, 0, shape.channels});
    return r;
  }
  r.has_accuracy = true;
  r.accuracy = accuracy_of(x.get(), y_gpu.get(), shape);
  return r;
}

}  // namespace

int cpu_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

double CpuTimes::of(Op op) const {
  switch (op) {
    case Op::kComputeScales: return compute_scales;
    case Op::kQuantize: return compute_scales + quantize_with_scales;
    case Op::kQuantizeWithScales: return quantize_with_scales;
    case Op::kDequantize: return dequantize;
  }
  return 0;
}

std::string check_against_reference(const Case& c, const DeviceTensors& d) {
  switch (c.dtype) {
    case DType::kFloat: return check_as<float>(c, d);
    case DType::kHalf: return check_as<__half>(c, d);
    case DType::kBfloat16: return check_as<__nv_bfloat16>(c, d);
  }
  return "unknown dtype";
}

ReferenceRun run_reference(DType dtype, Shape shape, const kvq::QuantSpec& spec, std::uint64_t seed,
                           const void* y_device) {
  switch (dtype) {
    case DType::kFloat: return run_reference_as<float>(shape, spec, seed, y_device);
    case DType::kHalf: return run_reference_as<__half>(shape, spec, seed, y_device);
    case DType::kBfloat16: return run_reference_as<__nv_bfloat16>(shape, spec, seed, y_device);
  }
  return {};
}

}  // namespace kvq_bench
