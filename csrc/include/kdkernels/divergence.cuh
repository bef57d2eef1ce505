// Element terms of every divergence (docs/semantics.md, "Divergences"), in log space.
//
//   D(p, q) = sum_i f(p_i, q_i);   qh_i = q_i * df/dq_i up to a constant times q_i, so that
//   dD/db_j = qh_j - q_j S with S = sum_i qh_i (b = student logits / T).
//
//   kForwardKL      f = p (lp - lq)                          qh = -p
//   kReverseKL      f = q (lq - lp)                          qh = q (lq - lp)
//   kJSD (beta)     f = beta p (lp - lm) + (1-beta) q (lq - lm),  m = beta p + (1-beta) q
//                                                            qh = (1-beta) q (lq - lm)
//   kSkewForwardKL  f = p (lp - lm),  m = alpha p + (1-alpha) q    qh = -(1-alpha) p q / m
//   kSkewReverseKL  f = q (lq - lm),  m = alpha q + (1-alpha) p    qh = q (lq - lm) - alpha q^2 / m
//   kTVD            f = |p - q| / 2                          qh = q sign(q - p) / 2
//   kAKL (w_h, w_t) f = w_h p (lp - lq) + w_t q (lq - lp)    qh = -w_h p + w_t q (lq - lp)
//                   (Adaptive KL with its per-row weights held in Mix: w = w_h, one_minus_w = w_t;
//                   the weights are constants for the gradient, docs/semantics.md "Adaptive KL")
//
// akl_terms(lp, lq): AKL's forward statistics of one element, [p (lp - lq), q (lq - lp), |p - q|,
// -p], i.e. the f of kForwardKL, of kReverseKL, twice the f of kTVD and the qh of kForwardKL, with the
// same expressions (the frontend forms the weights from their row sums).
//
// lm = logaddexp(log w + l_first, log(1 - w) + l_second) never underflows; 0 log 0 = 0 (a term
// whose leading probability is 0 is 0, even when the other log-probability is -inf).
// Inputs lp, lq may be -inf. Memory: registers only.
#pragma once

#include "numeric.cuh"

namespace kdkernels {

enum Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kAKL = 6,  // kdkernels.options.DIVERGENCES.index("akl")
};

// Mixing weight w (beta for jsd, alpha for the skews) in the forms the terms need.
template <class F>
struct Mix {
  F w, one_minus_w, log_w, log_one_minus_w;
  static Mix make(double w) {
    Mix m;
    m.w = F(w);
    m.one_minus_w = F(1.0 - w);
    m.log_w = w > 0 ? F(std::log(w)) : neg_inf<F>();
    m.log_one_minus_w = w < 1 ? F(std::log1p(-w)) : neg_inf<F>();
    return m;
  }
  // AKL's per-row weights (the logs are unused by kAKL).
  KD_HD static Mix weights(F w_h, F w_t) { return {w_h, w_t, F(0), F(0)}; }
};

template <class F>
struct Terms {
  F f;
  F qh;
};

template <int DIV, class F>
KD_HD Terms<F> element_terms(F lp, F lq, const Mix<F>& mix) {
  const F zero = F(0);
  if (DIV == kForwardKL) {
    const F p = exp_(lp);
    return {p > zero ? p * (lp - lq) : zero, -p};
  } else if (DIV == kReverseKL) {
    const F q = exp_(lq);
    const F t = q > zero ? q * (lq - lp) : zero;
    return {t, t};
  } else if (DIV == kJSD) {
    const F p = exp_(lp), q = exp_(lq);
    const F lm = logaddexp(lp + mix.log_w, lq + mix.log_one_minus_w);
    const F tq = q > zero ? q * (lq - lm) : zero;
    const F tp = p > zero ? p * (lp - lm) : zero;
    return {mix.w * tp + mix.one_minus_w * tq, mix.one_minus_w * tq};
  } else if (DIV == kSkewForwardKL) {
    const F p = exp_(lp);
    const F lm = logaddexp(lp + mix.log_w, lq + mix.log_one_minus_w);
    const bool has = p > zero;
    return {has ? p * (lp - lm) : zero, has ? -mix.one_minus_w * p * exp_(lq - lm) : zero};
  } else if (DIV == kSkewReverseKL) {
    const F q = exp_(lq);
    const F lm = logaddexp(lq + mix.log_w, lp + mix.log_one_minus_w);
    const bool has = q > zero;
    const F d = lq - lm;
    return {has ? q * d : zero, has ? q * (d - mix.w * exp_(d)) : zero};
  } else if (DIV == kTVD) {
    const F p = exp_(lp), q = exp_(lq);
    const F diff = q - p;
    const F sign = diff > zero ? F(1) : (diff < zero ? F(-1) : zero);
    return {F(0.5) * (diff < zero ? -diff : diff), F(0.5) * q * sign};
  } else {  // kAKL
    const F p = exp_(lp), q = exp_(lq);
    const F fkl = p > zero ? p * (lp - lq) : zero;
    const F rkl = q > zero ? q * (lq - lp) : zero;
    return {mix.w * fkl + mix.one_minus_w * rkl, -mix.w * p + mix.one_minus_w * rkl};
  }
}

template <class F>
struct AklTerms {
  F fkl, rkl, tv, qh_fkl;
};

template <class F>
KD_HD AklTerms<F> akl_terms(F lp, F lq) {
  const F zero = F(0);
  const F p = exp_(lp), q = exp_(lq);
  const F diff = q - p;
  return {p > zero ? p * (lp - lq) : zero, q > zero ? q * (lq - lp) : zero, diff < zero ? -diff : diff, -p};
}

}  // namespace kdkernels
