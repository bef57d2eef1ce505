// One row of the cached sparse teacher (docs/semantics.md, "Sparse (cached) teacher", "Tail modes").
//
// With K the valid slots (id >= 0), b = z / T and lse the student's full-vocabulary LSE(b):
//   lp_i   = v_i (values="logprobs") or log v_i (values="weights"), minus lnorm = LSE_K(lp) when the
//            tail mode renormalizes the teacher (renorm_teacher, renorm_both)
//   log P  = max(log1mexp(LSE_K(lp)), log 1e-30) for bucket + logprobs; P = 0 otherwise
//   lq_i   = b_i - lse (lse = LSE_K(b) for renorm_both)
//   log Q  = max(log1mexp(LSE_K(lq)), log 1e-30); no tail outcome for renorm_both or when K = V
//   D = sum_K f(p_i, q_i) + f(P, Q),   S = sum_K qh_i + qh(P, Q),   hQ = qh(P, Q) / Q
// Backward, per element j of the row:
//   dD/db_j = q_j (hQ - S) + [j in K] (qh_j - q_j hQ)         (bucket, renorm_teacher)
//   dD/db_j = [j in K] (qh_j - q_j S)                          (renorm_both)
//
// Memory: reads k ids, k values and k gathered student logits of the row; registers otherwise.
#pragma once

#include "divergence.cuh"

namespace kdkernels {

enum Tail : int { kBucket = 0, kRenormTeacher = 1, kRenormBoth = 2 };

constexpr double kLogTailFloor = -69.07755278982137;  // log(1e-30), options.LOG_TAIL_FLOOR

template <class F>
struct SparseRow {
  F D, S, hQ, lse, lnorm;
};

// Teacher log-probability of one valid slot before renormalization.
template <class F, class VT>
KD_HD F teacher_log_value(VT v, bool weights) {
  const F x = static_cast<F>(v);
  return weights ? log_(x) : x;
}

// zK[i] is the (softcapped) student logit at ids[i] (anything at empty slots).
template <int DIV, class F, class VT>
KD_HD SparseRow<F> sparse_row(int64_t k, const int64_t* ids, const VT* vals, const F* zK, F inv_t,
                              F lse_full, int64_t vocab, int tail, bool weights, const Mix<F>& mix) {
  const F ninf = neg_inf<F>();
  const F floor_ = F(kLogTailFloor);
  Lse<F> lse_p = Lse<F>::empty(), lse_b = Lse<F>::empty();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] < 0) continue;
    ++n_valid;
    lse_p.merge(teacher_log_value<F>(vals[i], weights), F(1));
    lse_b.merge(zK[i] * inv_t, F(1));
  }
  SparseRow<F> out;
  out.lnorm = F(0);
  F log_p_tail = ninf;
  if (tail != kBucket) {
    const F l = lse_p.value();
    out.lnorm = l > F(-1e30) ? l : F(-1e30);
  } else if (!weights) {
    const F l = log1mexp(lse_p.value());
    log_p_tail = l > floor_ ? l : floor_;
  }
  out.lse = tail == kRenormBoth ? lse_b.value() : lse_full;
  F D = F(0), S = F(0);
  Lse<F> lse_q = Lse<F>::empty();
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] < 0) continue;
    const F lq = zK[i] * inv_t - out.lse;
    const F lp = teacher_log_value<F>(vals[i], weights) - out.lnorm;
    const Terms<F> t = element_terms<DIV, F>(lp, lq, mix);
    D += t.f;
    S += t.qh;
    lse_q.merge(lq, F(1));
  }
  out.hQ = F(0);
  if (tail != kRenormBoth && n_valid < vocab) {
    F log_q_tail = log1mexp(lse_q.value());
    log_q_tail = log_q_tail > floor_ ? log_q_tail : floor_;
    const Terms<F> t = element_terms<DIV, F>(log_p_tail, log_q_tail, mix);
    D += t.f;
    S += t.qh;
    out.hQ = t.qh * exp_(-log_q_tail);
  }
  out.D = D;
  out.S = S;
  return out;
}

// The gradient correction at a valid slot: (qh_i - q_i hQ), or (qh_i - q_i S) for renorm_both.
template <int DIV, class F, class VT>
KD_HD F sparse_correction(F b_i, VT v_i, F lse, F lnorm, F S, F hQ, int tail, bool weights,
                          const Mix<F>& mix) {
  const F lq = b_i - lse;
  const F lp = teacher_log_value<F>(v_i, weights) - lnorm;
  const Terms<F> t = element_terms<DIV, F>(lp, lq, mix);
  return t.qh - exp_(lq) * (tail == kRenormBoth ? S : hQ);
}

}  // namespace kdkernels
