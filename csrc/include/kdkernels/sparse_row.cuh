// One row of the cached sparse teacher (docs/semantics.md, "Sparse (cached) teacher", "Tail modes").
//
// With K the valid slots (id >= 0), b = z / T and lse the student's full-vocabulary LSE(b):
//   lp_i   = v_i (values="logprobs") or log v_i (values="weights"), minus lnorm = LSE_K(lp) when the
//            tail mode renormalizes the teacher (renorm_teacher, renorm_both)
//   log P  = max(log1mexp(LSE_K(lp)), log 1e-30) for bucket + logprobs, in float64 (O(k)): when the
//            k values hold nearly all the mass, P is below float32's resolution of 1 and terms like
//            Q log(Q / P) (reverse KL) would amplify its rounding; P = 0 otherwise
//   lq_i   = b_i - lse (lse = LSE_K(b) for renorm_both)
//   log Q  = log1mexp(LSE_K(lq)) while that is >= log(1/2); below, LSE_{j not in K}(b_j) - lse
//            (1 - sum_K q cancels once Q is small); clamped at log 1e-30. No tail outcome for
//            renorm_both or when K = V
//   D = sum_K f(p_i, q_i) + f(P, Q),   S = sum_K qh_i + qh(P, Q),   hQ = qh(P, Q) / Q
// Backward, per element j of the row:
//   dD/db_j = q_j (hQ - S) outside K, qh_j - q_j S at j in K   (bucket, renorm_teacher)
//   dD/db_j = qh_j - q_j S at j in K, 0 outside                 (renorm_both)
// The value at K is computed directly: dense + correction would cancel when |hQ| >> 1.
//
// AKL (sparse_row_akl): the same outcomes, p and q evaluated for forward KL, reverse KL and TVD:
//   fkl = D_fkl, rkl = D_rkl (= S_rkl), tv = 2 D_tvd = sum |P - Q| over K and the tail outcome,
//   plus S_fkl, hQ_fkl, hQ_rkl: the backward's S and hQ are w_h (.)_fkl + w_t (.)_rkl, which is
//   what sparse_row<kAKL> with Mix::weights(w_h, w_t) computes (every term is linear in the weights).
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
// lse_out: LSE of b over the tokens outside K (used when Q < 1/2).
template <int DIV, class F, class VT>
KD_HD SparseRow<F> sparse_row(int64_t k, const int64_t* ids, const VT* vals, const F* zK, F inv_t,
                              F lse_full, F lse_out, int64_t vocab, int tail, bool weights,
                              const Mix<F>& mix) {
  const F ninf = neg_inf<F>();
  const F floor_ = F(kLogTailFloor);
  Lse<F> lse_p = Lse<F>::empty(), lse_b = Lse<F>::empty();
  Lse<double> lse_p64 = Lse<double>::empty();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (ids[i] < 0) continue;
    ++n_valid;
    lse_p.merge(teacher_log_value<F>(vals[i], weights), F(1));
    lse_p64.merge(teacher_log_value<double>(vals[i], weights), 1.0);
    lse_b.merge(zK[i] * inv_t, F(1));
  }
  SparseRow<F> out;
  out.lnorm = F(0);
  F log_p_tail = ninf;
  if (tail != kBucket) {
    const F l = lse_p.value();
    out.lnorm = l > F(-1e30) ? l : F(-1e30);
  } else if (!weights) {
    const double l = log1mexp(lse_p64.value());
    log_p_tail = static_cast<F>(l > kLogTailFloor ? l : kLogTailFloor);
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
    if (log_q_tail < F(-0.6931471805599453)) log_q_tail = lse_out - out.lse;
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

// dD/db at a valid slot: qh_i - q_i S (every tail mode).
template <int DIV, class F, class VT>
KD_HD F sparse_grad_at_id(F b_i, VT v_i, F lse, F lnorm, F S, bool weights, const Mix<F>& mix) {
  const F lq = b_i - lse;
  const F lp = teacher_log_value<F>(v_i, weights) - lnorm;
  const Terms<F> t = element_terms<DIV, F>(lp, lq, mix);
  return t.qh - exp_(lq) * S;
}

template <class F>
struct SparseAklRow {
  F fkl, rkl, tv, S_fkl, hQ_fkl, hQ_rkl, lse, lnorm;
};

template <class F, class VT>
KD_HD SparseAklRow<F> sparse_row_akl(int64_t k, const int64_t* ids, const VT* vals, const F* zK, F inv_t,
                                     F lse_full, F lse_out, int64_t vocab, int tail, bool weights) {
  const Mix<F> unused = Mix<F>::weights(F(1), F(0));
  const SparseRow<F> f = sparse_row<kForwardKL, F, VT>(k, ids, vals, zK, inv_t, lse_full, lse_out, vocab,
                                                       tail, weights, unused);
  const SparseRow<F> r = sparse_row<kReverseKL, F, VT>(k, ids, vals, zK, inv_t, lse_full, lse_out, vocab,
                                                       tail, weights, unused);
  const SparseRow<F> t = sparse_row<kTVD, F, VT>(k, ids, vals, zK, inv_t, lse_full, lse_out, vocab, tail,
                                                 weights, unused);
  return {f.D, r.D, F(2) * t.D, f.S, f.hQ, r.hQ, f.lse, f.lnorm};
}

}  // namespace kdkernels
