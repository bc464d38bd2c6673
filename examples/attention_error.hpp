// examples/attention_error.hpp: how far int8 rounding may move attention's output, for the
// examples' check against attention over the K and V before quantization.
#pragma once

#include <kvq/numerics.hpp>

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace example {

/// The int8 error of the attention output, per channel, from the numeric contract: an element
/// quantized under scale s is off by at most s/2 (times 1 + 1e-4 for the fp32 roundings of x/s and
/// q*s), and the rounding error of an element is spread evenly over [-s/2, s/2] (variance s^2/12)
/// and independent of the others'. To first order in those errors, an error D_t in score t moves
/// the output by sum_t p_t D_t (v_t - o), and an error e_t in row t of V by sum_t p_t e_t, so
///   sigma_d^2 = sum_t p_t^2 [ (s_K[t]^2 / 12) (|q|_2^2 / D) (v_td - o_d)^2 + s_V[t]^2 / 12 ].
/// The worst case over all error signs is also returned: a score moves by at most
/// e = max_t (s_K[t]/2) |q|_1 / sqrt(D), a softmax weight by a factor in [e^-2e, e^2e], so the
/// output by at most (e^2e - 1) max|v| + max_t s_V[t]/2. It always holds, but |q|_1 assumes that
/// all D errors of a row line up with the signs of q: here it is hundreds of times the actual error.
struct Int8Error {
  std::vector<double> sigma;  // (dim)
  double worst_case = 0.0;
};
inline Int8Error int8_error(const float* q,         // (dim)
                            const __half* k,        // (len, dim), before quantization
                            const __half* v,        // (len, dim), before quantization
                            const float* k_scales,  // (len)
                            const float* v_scales,  // (len)
                            int len, int dim) {
  constexpr double kHalfStep = 0.5 * (1.0 + 1e-4);
  const double inv_sqrt_dim = 1.0 / std::sqrt(static_cast<double>(dim));
  double q_l1 = 0.0, q_l2_sq = 0.0;
  for (int d = 0; d < dim; ++d) {
    q_l1 += std::fabs(static_cast<double>(q[d]));
    q_l2_sq += static_cast<double>(q[d]) * q[d];
  }
  // Softmax weights and output of the exact attention.
  std::vector<double> p(len), o(dim, 0.0);
  double max_score = -INFINITY, sum = 0.0;
  for (int t = 0; t < len; ++t) {
    double s = 0.0;
    for (int d = 0; d < dim; ++d) s += static_cast<double>(q[d]) * kvq::to_float(k[t * dim + d]);
    p[t] = s * inv_sqrt_dim;
    max_score = std::max(max_score, p[t]);
  }
  for (double& x : p) sum += (x = std::exp(x - max_score));
  for (int t = 0; t < len; ++t) {
    p[t] /= sum;
    for (int d = 0; d < dim; ++d) o[d] += p[t] * kvq::to_float(v[t * dim + d]);
  }
  Int8Error e{std::vector<double>(dim, 0.0), 0.0};
  double max_k_scale = 0.0, max_v_scale = 0.0, max_abs_v = 0.0;
  for (int t = 0; t < len; ++t) {
    const double sk = k_scales[t], sv = v_scales[t];
    const double score_var = sk * sk / 12.0 * q_l2_sq / dim;
    for (int d = 0; d < dim; ++d) {
      const double dv = kvq::to_float(v[t * dim + d]) - o[d];
      e.sigma[d] += p[t] * p[t] * (score_var * dv * dv + sv * sv / 12.0);
      max_abs_v = std::max(max_abs_v, std::fabs(static_cast<double>(kvq::to_float(v[t * dim + d]))));
    }
    max_k_scale = std::max(max_k_scale, sk);
    max_v_scale = std::max(max_v_scale, sv);
  }
  for (double& x : e.sigma) x = std::sqrt(x);
  const double score_bound = kHalfStep * max_k_scale * q_l1 * inv_sqrt_dim;
  // max|v_hat| <= max|v| + max s_V / 2.
  e.worst_case = std::expm1(2.0 * score_bound) * (max_abs_v + kHalfStep * max_v_scale) + kHalfStep * max_v_scale;
  return e;
}

}  // namespace example
