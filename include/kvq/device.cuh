// kvq/device.cuh: device-side building blocks for engines that quantize inside their own kernels
// (cache writes) and dequantize inside their own attention kernels.
//
// Same numeric contract as the host API, bit for bit. Two levels:
//   - fragment blocks (load/store, quantize, quantize_within_amax, dequantize, amax_bits,
//     warp_max_bits): the host API's kernels are built from these;
//   - row blocks (RowLanes, quantize_row, dequantize_row and their _warp forms): one row with one
//     scale by a group of 1 to 32 lanes, built from the fragment blocks, for an engine's cache
//     writes and reads (tests/gpu_device_test.cu checks each against the CPU reference).
// Everything here is __device__ and header-only; nothing allocates or synchronizes beyond the
// lanes it is called from.
#pragma once

#include <kvq/version.hpp>

#include <kvq/detail/config.cuh>
#include <kvq/numerics.hpp>

#include <cstdint>

KVQ_NAMESPACE_BEGIN
namespace detail {
/// The machine type of an access of `Bytes` bytes. Accessing through it (rather than the struct)
/// is what makes nvcc emit one 4/8/16-byte instruction instead of one per int8 element.
template <int Bytes>
struct AccessType;
template <> struct AccessType<1> { using type = std::uint8_t; };
template <> struct AccessType<2> { using type = std::uint16_t; };
template <> struct AccessType<4> { using type = std::uint32_t; };
template <> struct AccessType<8> { using type = uint2; };
template <> struct AccessType<16> { using type = uint4; };
}  // namespace detail

namespace device {

/// N elements of E with the alignment of the whole array (capped at 16 bytes, the widest access),
/// so that a load or store of it is one N * sizeof(E)-byte access (N * sizeof(E) in
/// {1, 2, 4, 8, 16}). Wider fragments (the fp32 scales of 8 channels) only live in registers.
template <class E, int N>
struct alignas(sizeof(E) * N < 16 ? sizeof(E) * N : 16) Fragment {
  E v[N];
  __host__ __device__ E& operator[](int i) { return v[i]; }
  __host__ __device__ const E& operator[](int i) const { return v[i]; }
};

/// One vector load; `p` must be aligned to sizeof(E) * N.
template <int N, class E>
__device__ inline Fragment<E, N> load(const E* p) {
  using Access = typename detail::AccessType<sizeof(E) * N>::type;
  const Access a = *reinterpret_cast<const Access*>(p);
  Fragment<E, N> f;
  memcpy(&f, &a, sizeof(f));
  return f;
}

/// One vector store; `p` must be aligned to sizeof(E) * N.
template <int N, class E>
__device__ inline void store(E* p, const Fragment<E, N>& f) {
  using Access = typename detail::AccessType<sizeof(E) * N>::type;
  Access a;
  memcpy(&a, &f, sizeof(a));
  if constexpr (sizeof(Access) == 16) {
    // nvcc may split a 16-byte store into four 4-byte ones although the access type promises the
    // alignment; it did for dequantize's stores at a row offset times a runtime stride, which on
    // the H200 gave fp32 / fp16 dequantize 4x the store instructions and 4-7% more L2 write sectors than torch.compile's one vector store
    // per 16 bytes (bench/results/h200.md). The instruction below is one vector store whatever
    // the address arithmetic; __isGlobal folds away where the pointer is known to be global.
    if (__isGlobal(p)) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w)
                   : "memory");
      return;
    }
  }
  *reinterpret_cast<Access*>(p) = a;
}

/// The bits of a fragment of N elements of E as one machine word or vector (uint32_t, uint2, uint4).
/// Kernels that hold 16-bit data across a long stretch (several rows in flight, a reduction) hold it
/// as Bits and unpack() it where it is used: held as a Fragment of __half / __nv_bfloat16, nvcc
/// gives every element a 32-bit register of its own, which doubles the register cost and spills.
template <int N, class E>
using Bits = typename detail::AccessType<sizeof(E) * N>::type;

template <int N, class E>
__device__ inline Bits<N, E> load_bits(const E* p) {
  return *reinterpret_cast<const Bits<N, E>*>(p);
}

template <class E, int N>
__device__ inline Fragment<E, N> unpack(const Bits<N, E>& b) {
  Fragment<E, N> f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

/// The low byte of each of N words (code_word results) as N codes: four to a word with three byte
/// permutes rather than a mask, shift and merge per code.
template <int N>
__device__ inline Fragment<std::int8_t, N> low_bytes(const std::uint32_t (&word)[N]) {
  Fragment<std::int8_t, N> q;
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int w = 0; w < N / 4; ++w) {
      const std::uint32_t packed = __byte_perm(__byte_perm(word[4 * w], word[4 * w + 1], 0x0040u),
                                               __byte_perm(word[4 * w + 2], word[4 * w + 3], 0x0040u), 0x5410u);
      memcpy(&q.v[4 * w], &packed, sizeof(packed));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) q[i] = static_cast<std::int8_t>(word[i] & 0xffu);
  }
  return q;
}

/// Codes of N values under one scale (read as the host API reads given scales: sanitize_scale).
template <int N, class T>
__device__ inline Fragment<std::int8_t, N> quantize(const Fragment<T, N>& x, float scale) {
  scale = sanitize_scale(scale);
  Fragment<float, N> s, inv;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    s[i] = scale;
    inv[i] = reciprocal(scale);
  }
  return quantize<N>(x, s, inv);
}

/// Codes of N values, each under its own scale (per-channel scales of N consecutive channels),
/// given the scales and their reciprocals (reciprocal(scale)): bit-identical to quantize_value.
template <int N, class T>
__device__ inline Fragment<std::int8_t, N> quantize(const Fragment<T, N>& x, const Fragment<float, N>& scale,
                                                    const Fragment<float, N>& inv_scale) {
  std::uint32_t word[N];
  bool exact = true;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    bool e;
    word[i] = code_word(to_float(x[i]), scale[i], inv_scale[i], e);
    exact &= e;
  }
  // Rare: a NaN/Inf input, a saturating overflow, or a scale outside the fast range. The whole
  // fragment then divides (quantize_value, which the exact codes equal anyway): keeping which
  // elements were exact would cost registers and instructions on the common path.
  if (!exact) {
#pragma unroll
    for (int i = 0; i < N; ++i) word[i] = static_cast<std::uint8_t>(quantize_value(to_float(x[i]), scale[i]));
  }
  return low_bytes<N>(word);
}

/// quantize() for N fp16 / bf16 values whose scales were computed from their own groups, when every
/// value is finite and every scale is in the fast range (inv_scale not NaN; an amax of zero or at
/// least kMinFastAmax ensures it). code_word_within_amax: one correction step, no clamp, no NaN
/// test. Bit-identical to quantize_value there.
template <int N, class T>
__device__ inline Fragment<std::int8_t, N> quantize_within_amax(const Fragment<T, N>& x,
                                                                const Fragment<float, N>& scale,
                                                                const Fragment<float, N>& inv_scale) {
  static_assert(sizeof(T) == 2, "the exhaustive check behind code_word_within_amax covers fp16 and bf16");
  std::uint32_t word[N];
#pragma unroll
  for (int i = 0; i < N; ++i) word[i] = code_word_within_amax(to_float(x[i]), scale[i], inv_scale[i]);
  return low_bytes<N>(word);
}

/// float(q) of each code, exactly. Four codes at a time go through the bits of 2^23 + (q + 128)
/// (one byte permute and one subtraction each) instead of an int-to-float conversion, whose pipe
/// runs at 1/8 of the FP32 rate on sm_90 and limited dequantization there.
template <int N>
__device__ inline Fragment<float, N> code_values(const Fragment<std::int8_t, N>& q) {
  Fragment<float, N> f;
  if constexpr (N % 4 == 0) {
    constexpr std::uint32_t kBias = 0x80808080u;      // q + 128 in every byte
    constexpr std::uint32_t kTwoTo23 = 0x4B000000u;   // 2^23: bytes 1-3 of the result
    constexpr float kOffset = 8388736.0f;             // 2^23 + 128
#pragma unroll
    for (int w = 0; w < N / 4; ++w) {
      std::uint32_t word;
      memcpy(&word, &q.v[4 * w], sizeof(word));
      word ^= kBias;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        f[4 * w + i] = sub_rn(__uint_as_float(__byte_perm(word, kTwoTo23, 0x7650u | i)), kOffset);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = static_cast<float>(q[i]);
  }
  return f;
}

/// Values of N codes under one scale, rounded to T. The scale is read as the host API reads it
/// (sanitize_scale: anything but a positive finite number is 1).
template <class T, int N>
__device__ inline Fragment<T, N> dequantize(const Fragment<std::int8_t, N>& q, float scale) {
  scale = sanitize_scale(scale);
  Fragment<T, N> y;
#pragma unroll
  for (int i = 0; i < N; ++i) y[i] = dequantize_value<T>(q[i], scale);
  return y;
}

/// Values of N codes, each under its own scale. The scales are used as given: pass scales that
/// kvq computed, or sanitize_scale() them, to stay bit-identical with the host API.
template <class T, int N>
__device__ inline Fragment<T, N> dequantize(const Fragment<std::int8_t, N>& q, const Fragment<float, N>& scale) {
  const Fragment<float, N> f = code_values(q);  // == static_cast<float>(q[i]), as dequantize_value
  Fragment<T, N> y;
#pragma unroll
  for (int i = 0; i < N; ++i) y[i] = from_float<T>(mul_rn(f[i], scale[i]));
  return y;
}

/// |x| in the raw bits of an input format: for non-negative values the order of the bits is the
/// numeric order in fp32, fp16 and bf16 alike, so a max over raw bits is an exact amax, and a
/// result at or above `kNonfinite` means some value was Inf or NaN. 16-bit data is maxed two
/// values per instruction (__vmaxu2).
template <class E>
struct RawAbs;
template <>
struct RawAbs<float> {
  static constexpr std::uint32_t kNonfinite = kInfBits;
  static constexpr std::uint32_t kMask = kAbsMask;
  __device__ static std::uint32_t max(std::uint32_t a, std::uint32_t b) { return ::max(a, b); }
  __device__ static std::uint32_t fold(std::uint32_t m) { return m; }
  __device__ static float value(std::uint32_t bits) { return __uint_as_float(bits); }
};
/// fp16 and bf16: two values per 32-bit word.
struct RawAbsPairs {
  static constexpr std::uint32_t kMask = 0x7fff7fffu;
  __device__ static std::uint32_t max(std::uint32_t a, std::uint32_t b) { return __vmaxu2(a, b); }
  __device__ static std::uint32_t fold(std::uint32_t m) { return ::max(m & 0xffffu, m >> 16); }
};
template <>
struct RawAbs<__half> : RawAbsPairs {
  static constexpr std::uint32_t kNonfinite = 0x7c00u;
  __device__ static float value(std::uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
};
template <>
struct RawAbs<__nv_bfloat16> : RawAbsPairs {
  static constexpr std::uint32_t kNonfinite = 0x7f80u;
  __device__ static float value(std::uint32_t bits) { return __uint_as_float(bits << 16); }
};

/// Element-wise max of |x| as raw words into `acc` (per-channel running amax of a unit column):
/// word w of acc holds the channels of word w of the fragment. Needs whole words.
template <int N, class T>
__device__ inline void raw_abs_max_into(std::uint32_t (&acc)[N * sizeof(T) / 4], const Fragment<T, N>& x) {
  static_assert(N * sizeof(T) % 4 == 0, "whole 32-bit words only");
  std::uint32_t w[N * sizeof(T) / 4];
  memcpy(w, &x, sizeof(w));
#pragma unroll
  for (int i = 0; i < N * static_cast<int>(sizeof(T)) / 4; ++i) acc[i] = RawAbs<T>::max(acc[i], w[i] & RawAbs<T>::kMask);
}

/// The max over the words of an accumulator of raw_abs_max_into, as one value's raw bits.
template <class T, int W>
__device__ inline std::uint32_t raw_abs_fold(const std::uint32_t (&acc)[W]) {
  std::uint32_t m = acc[0];
#pragma unroll
  for (int i = 1; i < W; ++i) m = RawAbs<T>::max(m, acc[i]);
  return RawAbs<T>::fold(m);
}

/// Max of |x| as raw bits over a fragment; compare with RawAbs<T>::kNonfinite.
template <int N, class T>
__device__ inline std::uint32_t raw_abs_max(const Fragment<T, N>& x) {
  if constexpr (N * sizeof(T) % 4 == 0) {
    std::uint32_t acc[N * sizeof(T) / 4] = {};
    raw_abs_max_into(acc, x);
    return raw_abs_fold<T>(acc);
  } else {
    constexpr std::uint32_t kElementMask = static_cast<std::uint32_t>(RawAbs<T>::kMask >> (32 - 8 * sizeof(T)));
    std::uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      std::uint32_t b = 0;
      memcpy(&b, &x.v[i], sizeof(T));
      m = ::max(m, b & kElementMask);
    }
    return m;
  }
}

/// Number of NaN/Inf values in a fragment. One raw max decides the common case (none).
template <int N, class T>
__device__ inline int count_nonfinite(const Fragment<T, N>& x) {
  if (raw_abs_max(x) < RawAbs<T>::kNonfinite) return 0;
  int n = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) n += !is_finite(to_float(x[i]));
  return n;
}

/// Bits (as fp32) of the largest finite |x| in a fragment (0 if none); see float_bits for why
/// bits. Adds the fragment's number of NaN/Inf values to `nonfinite`.
template <int N, class T>
__device__ inline std::uint32_t amax_bits(const Fragment<T, N>& x, unsigned long long& nonfinite) {
  const std::uint32_t raw = raw_abs_max(x);
  if (raw < RawAbs<T>::kNonfinite) return float_bits(RawAbs<T>::value(raw));
  std::uint32_t m = 0;  // rare: the exact rule, over finite values only
#pragma unroll
  for (int i = 0; i < N; ++i) {
    m = ::max(m, finite_abs_bits(to_float(x[i])));
    nonfinite += !is_finite(to_float(x[i]));
  }
  return m;
}

template <int N, class T>
__device__ inline std::uint32_t amax_bits(const Fragment<T, N>& x) {
  unsigned long long ignored = 0;
  return amax_bits(x, ignored);
}

/// Max over the lanes in `mask` of amax bits; every lane in `mask` gets the result. Exact and
/// independent of lane order.
__device__ inline std::uint32_t warp_max_bits(std::uint32_t bits, unsigned mask = detail::kFullMask) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(mask, bits);
#else  // no redux before sm_80: gather from every lane of the mask (exact, order-free)
  std::uint32_t m = bits;
  for (unsigned rest = mask; rest != 0; rest &= rest - 1) m = max(m, __shfl_sync(mask, bits, __ffs(rest) - 1));
  return m;
#endif
}

/// Warp-level amax of a row fragment: each lane passes its local amax (of finite |x|, as a float),
/// every lane gets the row's.
__device__ inline float warp_amax(float local_amax, unsigned mask = detail::kFullMask) {
  return bits_to_float(warp_max_bits(finite_abs_bits(local_amax), mask));
}

/// kLanes consecutive lanes of a warp that work on one row together (kLanes a power of two, 1 to
/// 32): a full warp for long rows, 8 or 16 lanes for head dims of 32 to 128, so that every lane
/// has work and one warp holds 2 to 4 rows. Any block shape: the lane is the hardware lane
/// (%laneid), not threadIdx.x % 32, so 2-D and 3-D blocks work, and so do warps that are not
/// full at the end of a block as long as each group is.
template <int kLanes = detail::kWarpSize>
struct RowLanes {
  static_assert(kLanes >= 1 && kLanes <= detail::kWarpSize && (kLanes & (kLanes - 1)) == 0,
                "kvq: a row group is a power of two of lanes, at most a warp");
  static constexpr int kSize = kLanes;
  int lane;       // this thread's place in its group, 0 to kLanes - 1
  unsigned mask;  // the lanes of this thread's group in its warp

  /// The group of the calling thread: lanes [g * kLanes, (g + 1) * kLanes) of its warp.
  __device__ static RowLanes this_thread() {
    unsigned warp_lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(warp_lane));
    const unsigned first = warp_lane & ~static_cast<unsigned>(kLanes - 1);
    return RowLanes{static_cast<int>(warp_lane - first),
                    kLanes == detail::kWarpSize ? detail::kFullMask : ((1u << kLanes) - 1u) << first};
  }
};

/// The lanes of a group quantize one row of n values with one scale of its own, and return that
/// scale (every lane of the group gets it; lane 0 also stores it to *scale_out when scale_out is
/// not null). Every lane of the group must call it with the same arguments. Rows whose x is
/// 16-byte aligned and whose q is aligned to a vector of codes (16 / sizeof(T) bytes) are read and
/// written in 16-byte vectors, the tail element by element; other rows element by element. Reads
/// the row twice (amax, then codes: the second read is served by L1/L2 at KV-cache row sizes).
/// Bit-identical to kvq::quantize per token on the row. Any alignment and any n >= 0.
template <int kLanes, class T>
__device__ inline float quantize_row(const RowLanes<kLanes>& g, const T* x,  // (n)
                                     std::int64_t n,
                                     std::int8_t* q,      // (n)
                                     float* scale_out) {  // (1) or null
  constexpr int V = 16 / sizeof(T);
  const bool vectors = reinterpret_cast<std::uintptr_t>(x) % 16 == 0 && reinterpret_cast<std::uintptr_t>(q) % V == 0;
  const std::int64_t units = vectors ? n / V : 0, tail = units * V;
  std::uint32_t m = 0;
  unsigned long long ignored = 0;
  for (std::int64_t u = g.lane; u < units; u += kLanes) m = max(m, amax_bits(load<V>(x + u * V), ignored));
  for (std::int64_t i = tail + g.lane; i < n; i += kLanes) m = max(m, finite_abs_bits(to_float(x[i])));
  const float scale = scale_from_amax(bits_to_float(warp_max_bits(m, g.mask)));
  const float inv = reciprocal(scale);
  Fragment<float, V> s, rs;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    s[e] = scale;
    rs[e] = inv;
  }
  for (std::int64_t u = g.lane; u < units; u += kLanes) store<V>(q + u * V, quantize<V>(load<V>(x + u * V), s, rs));
  for (std::int64_t i = tail + g.lane; i < n; i += kLanes) q[i] = quantize_value(to_float(x[i]), scale, inv);
  if (g.lane == 0 && scale_out != nullptr) *scale_out = scale;
  return scale;
}

/// The lanes of a group dequantize one row of n codes under one scale (read as the host API reads
/// given scales: sanitize_scale). Every lane of the group must call it. 16-byte vectors of values
/// where y is 16-byte aligned and q aligned to a vector of codes, element by element otherwise.
template <int kLanes, class T>
__device__ inline void dequantize_row(const RowLanes<kLanes>& g, const std::int8_t* q,  // (n)
                                      std::int64_t n, float scale,
                                      T* y) {  // (n)
  constexpr int V = 16 / sizeof(T);
  scale = sanitize_scale(scale);
  const bool vectors = reinterpret_cast<std::uintptr_t>(y) % 16 == 0 && reinterpret_cast<std::uintptr_t>(q) % V == 0;
  const std::int64_t units = vectors ? n / V : 0, tail = units * V;
  Fragment<float, V> s;
#pragma unroll
  for (int e = 0; e < V; ++e) s[e] = scale;
  for (std::int64_t u = g.lane; u < units; u += kLanes) store<V>(y + u * V, dequantize<T, V>(load<V>(q + u * V), s));
  for (std::int64_t i = tail + g.lane; i < n; i += kLanes) y[i] = dequantize_value<T>(q[i], scale);
}

/// quantize_row() by the calling thread's whole warp: all 32 lanes must call it.
template <class T>
__device__ inline float quantize_row_warp(const T* x,       // (n)
                                          std::int64_t n,
                                          std::int8_t* q,    // (n)
                                          float* scale_out) {  // (1) or null
  return quantize_row(RowLanes<>::this_thread(), x, n, q, scale_out);
}

/// dequantize_row() by the calling thread's whole warp: all 32 lanes must call it.
template <class T>
__device__ inline void dequantize_row_warp(const std::int8_t* q,  // (n)
                                           std::int64_t n, float scale,
                                           T* y) {  // (n)
  dequantize_row(RowLanes<>::this_thread(), q, n, scale, y);
}

}  // namespace device
KVQ_NAMESPACE_END
