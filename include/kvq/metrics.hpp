// kvq/metrics.hpp: error metrics on the CPU, accumulated in double.
//
// Arrays are dense; K, V and their reconstructions are [tokens, dim] row-major, queries [nq, dim].
// Element types may be float, double, __half or __nv_bfloat16 (anything to_float accepts).
#pragma once

#include <kvq/version.hpp>

#include <kvq/numerics.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

KVQ_NAMESPACE_BEGIN
namespace metrics {
namespace detail {
inline double widen(double x) { return x; }
template <class T>
inline double widen(T x) { return static_cast<double>(to_float(x)); }
}  // namespace detail

/// max_i |a_i - b_i|.
template <class A, class B>
double max_abs_error(const A* a, const B* b, std::int64_t n) {
  double m = 0.0;
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(detail::widen(a[i]) - detail::widen(b[i])));
  return m;
}

/// ||a - b||_2.
template <class A, class B>
double l2_error(const A* a, const B* b, std::int64_t n) {
  double s = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double d = detail::widen(a[i]) - detail::widen(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

/// ||a - b||_2 / ||a||_2 (0 when both are zero; +inf when only a is zero).
template <class A, class B>
double relative_l2_error(const A* a, const B* b, std::int64_t n) {
  double num = 0.0, den = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = detail::widen(a[i]), d = x - detail::widen(b[i]);
    num += d * d;
    den += x * x;
  }
  if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
  return std::sqrt(num / den);
}

/// The paper's attention-score error: mean over tokens t of |q . k_t - q . k_hat_t|.
template <class Q, class K, class KHat>
double attention_score_error(const Q* q,                        // (dim)
                             const K* k, const KHat* k_hat,     // (tokens, dim)
                             std::int64_t tokens, std::int64_t dim) {
  if (tokens <= 0) return 0.0;
  double total = 0.0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    double s = 0.0, s_hat = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) {
      const double qd = detail::widen(q[d]);
      s += qd * detail::widen(k[t * dim + d]);
      s_hat += qd * detail::widen(k_hat[t * dim + d]);
    }
    total += std::fabs(s - s_hat);
  }
  return total / static_cast<double>(tokens);
}

/// out (nq, dim) <- softmax(q K^T / sqrt(dim)) V, in double.
template <class Q, class K, class V>
void attention(const Q* q, std::int64_t nq,                 // (nq, dim)
               const K* k, const V* v, std::int64_t tokens,  // (tokens, dim) each
               std::int64_t dim, double* out) {             // (nq, dim)
  std::vector<double> p(static_cast<std::size_t>(tokens));
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(dim));
  for (std::int64_t i = 0; i < nq; ++i) {
    double mx = -INFINITY;
    for (std::int64_t t = 0; t < tokens; ++t) {
      double s = 0.0;
      for (std::int64_t d = 0; d < dim; ++d) s += detail::widen(q[i * dim + d]) * detail::widen(k[t * dim + d]);
      p[t] = s * inv_sqrt_d;
      mx = std::max(mx, p[t]);
    }
    double sum = 0.0;
    for (std::int64_t t = 0; t < tokens; ++t) sum += (p[t] = std::exp(p[t] - mx));
    for (std::int64_t d = 0; d < dim; ++d) out[i * dim + d] = 0.0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      const double w = p[t] / sum;
      for (std::int64_t d = 0; d < dim; ++d) out[i * dim + d] += w * detail::widen(v[t * dim + d]);
    }
  }
}

/// Relative L2 error between softmax(q K^T / sqrt(d)) V and softmax(q K_hat^T / sqrt(d)) V_hat.
template <class Q, class K, class KHat, class V, class VHat>
double attention_output_error(const Q* q, std::int64_t nq,              // (nq, dim)
                              const K* k, const KHat* k_hat,            // (tokens, dim)
                              const V* v, const VHat* v_hat,            // (tokens, dim)
                              std::int64_t tokens, std::int64_t dim) {
  std::vector<double> exact(static_cast<std::size_t>(nq * dim)), approx(static_cast<std::size_t>(nq * dim));
  attention(q, nq, k, v, tokens, dim, exact.data());
  attention(q, nq, k_hat, v_hat, tokens, dim, approx.data());
  return relative_l2_error(exact.data(), approx.data(), nq * dim);
}

}  // namespace metrics
KVQ_NAMESPACE_END
