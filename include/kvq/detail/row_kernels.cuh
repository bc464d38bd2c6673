// kvq/detail/row_kernels.cuh: the vectorized strategy's per-token kernels for rows one head wide.
//
// Engines quantize rows of one attention head (64 to 256 channels) with one scale per row:
// `[T, H, D]` with a scale per (token, head), or `[B, H, T, D]`, from one decode step (a few dozen
// rows) to a long prefill (a million). Such a row is 4 to 64 16-byte units. Here a power of two of
// `lanes` neighbouring threads (at most a warp) share a row, and each holds kUnits of its units
// (units lane, lane + lanes, ...; a warp's access to one unit index is then contiguous across each
// row it touches). So:
//   - a row's amax meets in log2(lanes) shuffles, and each thread computes the scale and its
//     reciprocal once for its kUnits * V elements;
//   - the grid is one thread per (row, lane), no more: a decode step of 64 rows is a few blocks,
//     each thread one unit, so the call is one load, a short reduction and one store deep;
//   - a large call gives each thread up to 4 units (plan_rows), which amortizes the per-row work
//     and keeps 64 bytes per thread in flight.
// The rows must be whole-vector (vector_kernels.cuh) and their groups whole rows; anything else
// takes the kernels of vector_kernels.cuh or tile_kernels.cuh.
//
//   row_scales_kernel  scales (and codes, when q is not null) of each row, in one pass
//   row_apply_kernel   codes under given per-row scales, or values of codes
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/vector_kernels.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

KVQ_NAMESPACE_BEGIN
namespace detail {

/// What a row kernel does with a row: its plan depends on it (plan_rows).
enum class RowOp {
  kScales,  ///< scales from the row (and codes under them): row_scales_kernel
  kCodes,   ///< codes under a given scale: row_apply_kernel
  kValues,  ///< values of codes: row_apply_kernel
};

/// How the rows of a view are shared among threads: 2^lanes_log2 threads per row, each holding
/// units lane + j * lanes (j < units_per_thread) of it.
struct RowPlan {
  std::int64_t rows;  // batch * tokens (<= INT32_MAX)
  std::int64_t batch_stride, token_stride;
  int units;             // units per row: channels / V
  int lanes_log2;        // threads per row, a power of two <= 32
  int units_per_thread;  // the kernel's kUnits: 1, 2 or 4
  bool flat;             // row r starts at r * token_stride (one batch, or batches back to back)
  FastDivmod token_div;  // flattened row -> (batch, token), where not flat
  ScaleRows scale_rows;  // where row r's scale lives: scale_rows.base(r)

  std::int64_t threads() const { return rows << lanes_log2; }

  __device__ std::int64_t row_offset(std::uint32_t r) const {
    if (flat) return static_cast<std::int64_t>(r) * token_stride;
    std::uint32_t b, t;
    token_div.divmod(r, b, t);
    return static_cast<std::int64_t>(b) * batch_stride + static_cast<std::int64_t>(t) * token_stride;
  }
};

/// Plans `view` (whole-vector at width V, one group per row) for `op` on the row kernels of Policy;
/// false when its rows are too wide for them. Takes the most units per thread (less per-row work
/// per element) that keeps at least Policy::min_lanes(op, V) threads on a row (a warp's access to
/// one unit index then covers enough contiguous bytes of each row) and leaves
/// Policy::kTargetThreads threads; a call too small for that takes fewer units per thread (more
/// threads, each with less to do), down to one, or to what fits a row in a warp.
template <class Policy>
inline bool plan_rows(const KvView& view, const QuantSpec& spec, int V, RowOp op, RowPlan& p) {
  const std::int64_t units = view.channels / V;
  const std::int64_t rows = view.batch * view.tokens;
  if (units > Policy::kMaxRowUnits || rows > INT32_MAX) return false;
  int chosen = 0;
  for (int u = Policy::max_units(op); u >= 1; u /= 2) {
    const std::int64_t lanes = pow2_ceil(ceil_div<std::int64_t>(units, u));
    if (lanes > kWarpSize) break;  // fewer units per thread would need more than a warp per row
    chosen = u;
    if (lanes >= std::min<std::int64_t>(Policy::min_lanes(op, V), pow2_ceil(units)) &&
        rows * lanes >= Policy::kTargetThreads)
      break;
  }
  if (chosen == 0) return false;
  p.rows = rows;
  p.batch_stride = view.batch_stride;
  p.token_stride = view.token_stride;
  p.units = static_cast<int>(units);
  p.units_per_thread = chosen;
  p.lanes_log2 = log2_exact(pow2_ceil(ceil_div<std::int64_t>(units, chosen)));
  p.flat = view.batch == 1 || view.batch_stride == view.tokens * view.token_stride;
  p.token_div = FastDivmod(static_cast<std::uint32_t>(view.tokens));
  p.scale_rows = ScaleRows(view, spec);
  return true;
}

/// One thread's place: its row and its lane in the row's group of threads.
struct RowThread {
  std::uint32_t row;
  int lane, lanes;
  unsigned row_mask;  // the lanes of this warp that share the row
  bool valid;         // row < rows: threads past the last row still take part in the row reductions

  __device__ explicit RowThread(const RowPlan& p) {
    const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    lanes = 1 << p.lanes_log2;
    lane = static_cast<int>(t & (lanes - 1));
    const int warp_lane = static_cast<int>(threadIdx.x) % kWarpSize;  // blocks are whole warps
    row_mask = (lanes == kWarpSize ? kFullMask : (1u << lanes) - 1) << (warp_lane - lane);
    const std::int64_t r = t >> p.lanes_log2;
    valid = r < p.rows;
    row = static_cast<std::uint32_t>(valid ? r : 0);
  }
  /// Whether unit j of this thread exists (the last lanes of a row may hold fewer units).
  __device__ bool owns(int j, const RowPlan& p) const { return valid && lane + j * lanes < p.units; }
  __device__ int unit(int j) const { return lane + j * lanes; }
};

/// The largest finite |x| over the units a thread holds (held[j] where owns(j)), as fp32 bits, and
/// the number of NaN/Inf among them added to `nonfinite`: raw |x| bits first (exact, two 16-bit
/// values per instruction); only a NaN or Inf (bits >= kNonfinite) takes the exact rule (finite
/// values only) and the count.
template <int V, int kUnits, class T, class Owns>
__device__ inline std::uint32_t held_amax_bits(const device::Bits<V, T> (&held)[kUnits], Owns owns,
                                               unsigned long long& nonfinite) {
  constexpr int kWords = V * sizeof(T) / 4;
  std::uint32_t raw[kWords] = {};
#pragma unroll
  for (int j = 0; j < kUnits; ++j)
    if (owns(j)) device::raw_abs_max_into(raw, device::unpack<T, V>(held[j]));
  const std::uint32_t m = device::raw_abs_fold<T>(raw);
  if (m < device::RawAbs<T>::kNonfinite) return float_bits(device::RawAbs<T>::value(m));
  std::uint32_t exact = 0;
#pragma unroll
  for (int j = 0; j < kUnits; ++j)
    if (owns(j)) exact = max(exact, device::amax_bits(device::unpack<T, V>(held[j]), nonfinite));
  return exact;
}

/// Scales of each row of a whole-vector view, and its codes when q is not null, in one pass.
template <class Policy, int V, int kUnits, class T>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, Policy::kMinBlocksPerSM)
    row_scales_kernel(const T* __restrict__ x,  // view (batch, tokens, channels)
                      RowPlan p,
                      float* __restrict__ scales,   // (batch * tokens), at p.scale_rows
                      std::int8_t* __restrict__ q,  // same view as x, or null
                      unsigned long long* nonfinite) {  // optional counter
  const RowThread t(p);
  const std::int64_t offset = t.valid ? p.row_offset(t.row) : 0;
  device::Bits<V, T> v[kUnits];
#pragma unroll
  for (int j = 0; j < kUnits; ++j)
    if (t.owns(j, p)) v[j] = device::load_bits<V>(x + offset + t.unit(j) * V);
  // The scale's address while the loads are in flight: it takes a branch (ScaleRows::base) that
  // would otherwise sit between the row's reduction and its codes.
  float* const scale_at = scales + p.scale_rows.base(t.row);

  unsigned long long bad = 0;
  std::uint32_t m = held_amax_bits<V, kUnits, T>(v, [&](int j) { return t.owns(j, p); }, bad);
  // Across the row's lanes (one redux per row on sm_80 and later): bits of non-negative floats
  // order as the floats do.
  m = device::warp_max_bits(m, t.row_mask);
  const float amax = bits_to_float(m), scale = scale_from_amax(amax);
  if (t.valid && t.lane == 0) *scale_at = scale;

  if (q != nullptr && t.valid) {
    const float inv = reciprocal(scale);
    Fragment<float, V> s, rs;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      s[e] = scale;
      rs[e] = inv;
    }
    // This thread's values are finite and the row's scale came from them: 16-bit data may take
    // the lean arithmetic when the scale is in the fast range.
    const bool within_amax = bad == 0 && lean_codes_apply(amax);
    std::int8_t* q_row = q + offset;
    with_codes_path<T>(within_amax, [&](auto lean) {
#pragma unroll
      for (int j = 0; j < kUnits; ++j)
        if (t.owns(j, p))
          device::store<V>(q_row + t.unit(j) * V, codes<decltype(lean)::value>(device::unpack<T, V>(v[j]), s, rs));
    });
  }
  if (bad != 0 && nonfinite != nullptr) atomicAdd(nonfinite, bad);
}

/// Codes under given per-row scales (In = T, Out = int8), or values of codes (In = int8, Out = T),
/// of a whole-vector view. A scale that is not positive and finite is read as 1.
template <class Policy, int V, int kUnits, class In, class Out>
KVQ_KERNEL void __launch_bounds__(Policy::kThreads, Policy::kMinBlocksPerSM)
    row_apply_kernel(const In* __restrict__ in,        // view (batch, tokens, channels)
                     const float* __restrict__ scales,  // (batch * tokens), at p.scale_rows
                     RowPlan p,
                     Out* __restrict__ out,  // same view
                     unsigned long long* nonfinite) {  // optional counter (quantize only)
  constexpr bool kDequantize = std::is_same_v<In, std::int8_t>;
  const RowThread t(p);
  if (!t.valid) return;  // no reduction here, so threads past the last row can leave
  // The scale is requested first and looked at only after the row's loads are issued, so that the
  // two latencies overlap: a decode-sized call is one load of each deep.
  const float given_scale = scales[p.scale_rows.base(t.row)];
  const std::int64_t offset = p.row_offset(t.row);
  device::Bits<V, In> v[kUnits];
#pragma unroll
  for (int j = 0; j < kUnits; ++j)
    if (t.owns(j, p)) v[j] = device::load_bits<V>(in + offset + t.unit(j) * V);
  const float scale = sanitize_scale(given_scale);

  Fragment<float, V> s, rs;
  const float inv = kDequantize ? 0.0f : reciprocal(scale);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    s[e] = scale;
    rs[e] = inv;
  }
  unsigned long long bad = 0;
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    if (!t.owns(j, p)) continue;
    Out* dst = out + offset + t.unit(j) * V;
    if constexpr (kDequantize) {
      device::store<V>(dst, device::dequantize<Out, V>(device::unpack<In, V>(v[j]), s));
    } else {
      const Fragment<In, V> f = device::unpack<In, V>(v[j]);
      if (nonfinite != nullptr) bad += device::count_nonfinite(f);
      device::store<V>(dst, device::quantize<V>(f, s, rs));
    }
  }
  if (bad != 0) atomicAdd(nonfinite, bad);
}

}  // namespace detail
KVQ_NAMESPACE_END
