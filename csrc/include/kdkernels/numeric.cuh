// Scalar numerics shared by the CPU build and the CUDA kernels (torch-free, header-only).
//
//   exp_(x)          e^x; on the host a branch-free polynomial so `#pragma omp simd` loops vectorize
//                    (|rel err| <= 2 ulp, exact 0 for x <= -87, +inf for x >= 88.72, NaN kept)
//   logaddexp(x, y)  log(e^x + e^y), -inf when both are -inf
//   log1mexp(x)      log(1 - e^x) for x <= 0, accurate on both sides of -log 2
//   softcap(x, c)    c tanh(x / c) (c <= 0 means no cap); softcap_grad(z, c) = 1 - (z / c)^2
//   Lse              a running log-sum-exp as (max m, sum s of e^(x - m)); merge() is associative
//
// Memory: none; every function works on registers.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline __attribute__((always_inline))
#endif

namespace kdkernels {

using std::exp;
using std::expm1;
using std::log;
using std::log1p;
using std::tanh;

template <class F>
KD_HD F neg_inf() { return -std::numeric_limits<F>::infinity(); }

KD_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // e^x = 2^k e^r, k = round(x / ln 2), r = x - k ln 2 (two-constant Cody-Waite), |r| <= ln2 / 2;
  // e^r by the Cephes minimax polynomial. 2^k is built in the exponent bits as 2 * 2^(k-1) so that
  // k = 128 (x near 88.7) still has a representable factor.
  const float xc = x < -87.0f ? -87.0f : (x > 88.7f ? 88.7f : x);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = std::fma(k, -0.693359375f, xc);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<std::int32_t>(k) + 126) << 23);
  float y = p * scale * 2.0f;
  y = x <= -87.0f ? 0.0f : y;
  y = x >= 88.72283905206835f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
#endif
}

KD_HD double exp_(double x) { return exp(x); }

KD_HD float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
KD_HD double log_(double x) { return log(x); }

template <class F>
KD_HD F max_(F a, F b) { return a > b ? a : b; }  // NaN in a propagates only through sums, by design

template <class F>
KD_HD F logaddexp(F x, F y) {
  const F m = max_(x, y);
  if (m == neg_inf<F>()) return m;
  const F d = x > y ? y - x : x - y;                // -|x - y|, -inf when one side is -inf
  return m + log1p(exp_(d));
}

template <class F>
KD_HD F log1mexp(F x) {
  x = x > F(0) ? F(0) : x;
  return x > F(-0.6931471805599453) ? log(-expm1(x)) : log1p(-exp_(x));
}

template <class F>
KD_HD F softcap(F x, F cap) { return cap > F(0) ? cap * tanh(x / cap) : x; }

template <class F>
KD_HD F softcap_grad(F z, F cap) {
  if (cap <= F(0)) return F(1);
  const F u = z / cap;
  return F(1) - u * u;
}

// Running log-sum-exp over a stream of values, as (max, sum e^(x - max)).
template <class F>
struct Lse {
  F m;
  F s;
  KD_HD static Lse empty() { return {neg_inf<F>(), F(0)}; }
  // Combine with another partial result (e.g. a chunk's); exact in real arithmetic.
  KD_HD void merge(F m2, F s2) {
    if (m2 == neg_inf<F>()) return;
    if (m == neg_inf<F>() || m2 > m) {
      s = s * exp_(m - m2) + s2;  // exp_(-inf) = 0 when this side was empty
      m = m2;
    } else {
      s = s + s2 * exp_(m2 - m);
    }
  }
  KD_HD F value() const { return m == neg_inf<F>() ? m : m + log_(s); }
};

}  // namespace kdkernels
