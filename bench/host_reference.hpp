// bench/host_reference.hpp: the CPU side of the benchmark.
//
// kvq::reference is both the oracle (every case's GPU output is checked against it before it is
// timed) and the baseline (the speedup counters of the paper's shapes). Compiled by the host
// compiler with OpenMP when available; the reference itself runs its loops in parallel then.
#pragma once

#include "bench_case.hpp"

#include <cstdint>
#include <string>

namespace kvq_bench {

/// Threads the CPU reference runs on (1 without OpenMP).
int cpu_threads();

/// Copies two windows of case c's device buffers to the host (whole rows at both ends of the
/// token axis for per-token, all tokens of the first and last channels for per-channel: each
/// window holds whole scale groups) and compares the op's outputs there, bit for bit, with the CPU
/// reference run on the same inputs. Returns "" when they agree, else what differs and where.
/// The op's inputs (x, given scales, codes) are read back too, so the check does not depend on how
/// they were made.
std::string check_against_reference(const Case& c, const DeviceTensors& d);

/// Seconds the CPU reference takes for each operation on one [T, D] tensor.
struct CpuTimes {
  double compute_scales = 0;
  double quantize_with_scales = 0;
  double dequantize = 0;
  /// quantize = compute_scales then quantize_with_scales, as kvq::reference::quantize runs it.
  double of(Op op) const;
};

/// The paper's error metrics (kvq::metrics) of a dequantized tensor against its input.
struct Accuracy {
  double max_abs = 0;
  double l2 = 0;
  double attention_score = 0;  // mean over tokens of |q . k - q . k_hat|, q uniform in [-1, 1)^D
};

struct ReferenceRun {
  CpuTimes cpu;
  bool has_accuracy = false;
  Accuracy accuracy;
  std::string mismatch;  // "" unless y_device differed from the reference
};

/// Generates x (shape, dtype) from `seed` on the host and times the CPU reference of every
/// operation on it (scales, codes, values). When `y_device` is given, it is the GPU's dequantized
/// output for the same x and spec: it is copied back, compared bit for bit with the reference over
/// the whole tensor, and its errors against x are measured.
ReferenceRun run_reference(DType dtype, Shape shape, const kvq::QuantSpec& spec, std::uint64_t seed,
                           const void* y_device);

}  // namespace kvq_bench
