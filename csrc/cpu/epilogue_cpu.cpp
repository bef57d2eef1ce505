// CPU epilogues (csrc/epilogue.h): one OpenMP thread per row, `omp simd` loops over the row's
// columns calling the shared math of include/kdkernels/ (the same code the CUDA kernels run).
//
// Per row of a (N, W) chunk: the max pass and the exp-sum pass read the row twice (it stays in the
// core's cache); the terms pass reads it a third time. Writes: O(1) state per row, or the (N, W)
// gradient chunk. Numbers: float32 accumulation (float64 for float64 inputs).
#include <omp.h>

#include <ATen/Parallel.h>

#include "../dispatch.h"
#include "../epilogue.h"
#include "kdkernels/topk.cuh"

namespace kdkernels {
namespace {

template <class Fn>
void for_rows(int64_t n, Fn&& fn) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < n; ++r) fn(r);
}

// Softcap resolved at compile time: an `omp simd` loop cannot skip tanh with a runtime branch.
template <bool CAP, class F>
inline F cap_(F x, F c) {
  if constexpr (CAP) return softcap(x, c);
  else return x;
}
template <bool CAP, class F>
inline F cap_grad_(F z, F c) {
  if constexpr (CAP) return softcap_grad(z, c);
  else return F(1);
}

template <class Fn>
void with_cap(double cap, Fn&& fn) {
  if (cap > 0) fn(std::true_type{});
  else fn(std::false_type{});
}

template <class T, class F>
F row_max(const T* x, int64_t n) {
  F m = neg_inf<F>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const F v = static_cast<F>(x[j]);
    m = v > m ? v : m;
  }
  return m;
}

// Sums over a row run as `omp simd` loops over blocks of kBlock columns (a few dozen terms per
// vector lane) whose results are added in double: the error stays near float32 rounding of the
// terms even for V in the hundreds of thousands.
constexpr int64_t kBlock = 1024;

// sum_j exp(softcap(x_j) * scale - shift)
template <class T, class F>
F row_sumexp(const T* x, int64_t n, F cap, F scale, F shift) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    F s = F(0);
    if (cap > F(0)) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e; ++j) s += exp_(softcap(static_cast<F>(x[j]), cap) * scale - shift);
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e; ++j) s += exp_(static_cast<F>(x[j]) * scale - shift);
    }
    total += static_cast<double>(s);
  }
  return static_cast<F>(total);
}

// Merge a chunk row into a running LSE of softcap(x) * scale (scale > 0 keeps the max at the max).
template <class T, class F>
void merge_row(F& m, F& s, const T* x, int64_t n, F cap, F scale, F xmax) {
  if (!(xmax > neg_inf<F>())) return;  // empty chunk row, or all -inf
  const F shift = softcap(xmax, cap) * scale;
  Lse<F> l{m, s};
  l.merge(shift, row_sumexp<T, F>(x, n, cap, scale, shift));
  m = l.m;
  s = l.s;
}

template <class T>
const T* row_ptr(const Tensor& x, int64_t r) {
  return x.data_ptr<T>() + r * x.stride(0);
}


template <int DIV, bool CS, bool CT, class T, class F>
void row_terms(const T* x, const T* t, int64_t w, F inv_t, F cap_s, F cap_t, F lse_b, F lse_a,
               const Mix<F>& mix, F& d_out, F& s_out) {
  double dt = 0.0, st = 0.0;
  for (int64_t b = 0; b < w; b += kBlock) {
    const int64_t e = std::min(w, b + kBlock);
    F d = F(0), s = F(0);
#pragma omp simd reduction(+ : d, s)
    for (int64_t j = b; j < e; ++j) {
      const F lq = cap_<CS>(static_cast<F>(x[j]), cap_s) * inv_t - lse_b;
      const F lp = cap_<CT>(static_cast<F>(t[j]), cap_t) * inv_t - lse_a;
      const Terms<F> el = element_terms<DIV, F>(lp, lq, mix);
      d += el.f;
      s += el.qh;
    }
    dt += static_cast<double>(d);
    st += static_cast<double>(s);
  }
  d_out = static_cast<F>(dt);
  s_out = static_cast<F>(st);
}

// AKL: sums[0..3] = [fkl, rkl, tv, sum qh_fkl] of the row segment (akl_terms), blocked like row_terms
template <bool CS, bool CT, class T, class F>
void row_akl_terms(const T* x, const T* t, int64_t w, F inv_t, F cap_s, F cap_t, F lse_b, F lse_a,
                   F* sums) {
  double tot[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t b = 0; b < w; b += kBlock) {
    const int64_t e = std::min(w, b + kBlock);
    F s0 = F(0), s1 = F(0), s2 = F(0), s3 = F(0);
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = b; j < e; ++j) {
      const F lq = cap_<CS>(static_cast<F>(x[j]), cap_s) * inv_t - lse_b;
      const F lp = cap_<CT>(static_cast<F>(t[j]), cap_t) * inv_t - lse_a;
      const AklTerms<F> el = akl_terms<F>(lp, lq);
      s0 += el.fkl;
      s1 += el.rkl;
      s2 += el.tv;
      s3 += el.qh_fkl;
    }
    tot[0] += static_cast<double>(s0);
    tot[1] += static_cast<double>(s1);
    tot[2] += static_cast<double>(s2);
    tot[3] += static_cast<double>(s3);
  }
  for (int c = 0; c < 4; ++c) sums[c] = static_cast<F>(tot[c]);
}

template <class T, class F>
F row_max_unmasked(const T* x, const uint8_t* mask, int64_t n) {
  F m = neg_inf<F>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const F v = mask[j] ? neg_inf<F>() : static_cast<F>(x[j]);
    m = v > m ? v : m;
  }
  return m;
}

// sum over unmasked j of exp(softcap(x_j) * scale - shift), blocked like row_sumexp
template <bool CS, class T, class F>
F row_sumexp_unmasked(const T* x, const uint8_t* mask, int64_t n, F cap, F scale, F shift) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    F s = F(0);
#pragma omp simd reduction(+ : s)
    for (int64_t j = b; j < e; ++j) {
      const F t = exp_(cap_<CS>(static_cast<F>(x[j]), cap) * scale - shift);
      s += mask[j] ? F(0) : t;
    }
    total += static_cast<double>(s);
  }
  return static_cast<F>(total);
}

template <class Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) fn(std::true_type{});
  else fn(std::false_type{});
}

// Gradients are formed in a float block buffer by an `omp simd` loop, the one-hot CE term is
// subtracted at the label afterwards, and a plain loop converts to the output dtype.
template <class T, class F>
void store_block(T* out, F* buf, int64_t n, int64_t y, F onehot) {
  if (y >= 0 && y < n) buf[y] -= onehot;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(buf[j]);
}

// out_j = [kd part + ce (softmax_j - [j = y])] dz/dx_j * scale, the dense-teacher gradient
template <int DIV, bool CS, bool CT, bool KD, bool CE, class T, class F>
void row_dense_grad(const T* x, const T* t, T* out, int64_t w, F inv_t, F cap_s, F cap_t, F c_kd,
                    F lse_b, F lse_1, F lse_a, F S, F ce, int64_t y, F scale, const Mix<F>& mix_ref) {
  const Mix<F> mix = mix_ref;
  alignas(64) F buf[kBlock];
  for (int64_t b = 0; b < w; b += kBlock) {
    const int64_t n = std::min(w, b + kBlock) - b;
    const T* xb = x + b;
    const T* tb = KD ? t + b : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const F z = cap_<CS>(static_cast<F>(xb[j]), cap_s);
      F v = F(0);
      if constexpr (KD) {
        const F lq = z * inv_t - lse_b;
        const F lp = cap_<CT>(static_cast<F>(tb[j]), cap_t) * inv_t - lse_a;
        const Terms<F> e = element_terms<DIV, F>(lp, lq, mix);
        v = c_kd * (e.qh - exp_(lq) * S);
      }
      if constexpr (CE) v += ce * exp_(z - lse_1);  // (lse_1 is only meaningful with a CE term)
      buf[j] = v * cap_grad_<CS>(z, cap_s) * scale;
    }
    const int64_t yb = y - b;
    const F onehot = (yb >= 0 && yb < n) ? ce * cap_grad_<CS>(cap_<CS>(static_cast<F>(xb[yb]), cap_s), cap_s) * scale : F(0);
    store_block(out + b, buf, n, yb, onehot);
  }
}

// out_j = [dense q_j + ce (softmax_j - [j = y])] dz/dx_j * scale, the sparse gradient off the ids
template <bool CS, bool DENSE, bool CE, class T, class F>
void row_sparse_dense(const T* x, T* out, int64_t w, F inv_t, F cap, F dense, F lse, F lse_1, F ce,
                      int64_t y, F scale) {
  alignas(64) F buf[kBlock];
  for (int64_t b = 0; b < w; b += kBlock) {
    const int64_t n = std::min(w, b + kBlock) - b;
    const T* xb = x + b;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const F z = cap_<CS>(static_cast<F>(xb[j]), cap);
      F v = F(0);
      if constexpr (CE) v += ce * exp_(z - lse_1);
      if constexpr (DENSE) v += dense * exp_(z * inv_t - lse);
      buf[j] = v * cap_grad_<CS>(z, cap) * scale;
    }
    const int64_t yb = y - b;
    const F onehot = (yb >= 0 && yb < n) ? ce * cap_grad_<CS>(cap_<CS>(static_cast<F>(xb[yb]), cap), cap) * scale : F(0);
    store_block(out + b, buf, n, yb, onehot);
  }
}

}  // namespace

void CpuEpi::lse_update(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,
                        const Tensor& state, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  const bool teacher = xt.defined(), ce = p.ce_weight != 0.0;
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_lse_update_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F inv_t = F(1.0 / p.temperature), cap_s = F(p.cap_s), cap_t = F(p.cap_t);
    F* st = state.data_ptr<F>();
    const int64_t* lab = labels.data_ptr<int64_t>();
    for_rows(n, [&](int64_t r) {
      F* srow = st + r * 8;
      const T* x = row_ptr<T>(xs, r);
      const F xmax = row_max<T, F>(x, w);
      merge_row<T, F>(srow[0], srow[4], x, w, cap_s, inv_t, xmax);
      if (ce) {
        merge_row<T, F>(srow[1], srow[5], x, w, cap_s, F(1), xmax);
        const int64_t y = lab[r];
        if (y >= v0 && y < v0 + w) srow[3] = softcap(static_cast<F>(x[y - v0]), cap_s);
      }
      if (teacher) {
        const T* t = row_ptr<T>(xt, r);
        merge_row<T, F>(srow[2], srow[6], t, w, cap_t, inv_t, row_max<T, F>(t, w));
      }
    });
  });
}

void CpuEpi::dense_terms(const Tensor& xs, const Tensor& xt, const Tensor& stats, const Tensor& acc,
                         const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_dense_terms_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F inv_t = F(1.0 / p.temperature), cap_s = F(p.cap_s), cap_t = F(p.cap_t);
    const Mix<F> mix = Mix<F>::make(p.mix);
    const F* sts = stats.data_ptr<F>();
    F* out = acc.data_ptr<F>();
    if (p.divergence == kAKL) {
      for_rows(n, [&](int64_t r) {
        F sums[4];
        with_cap(p.cap_s, [&](auto cs) {
          with_cap(p.cap_t, [&](auto ct) {
            row_akl_terms<decltype(cs)::value, decltype(ct)::value, T, F>(
                row_ptr<T>(xs, r), row_ptr<T>(xt, r), w, inv_t, cap_s, cap_t, sts[r * 4 + 0], sts[r * 4 + 2],
                sums);
          });
        });
        for (int c = 0; c < 4; ++c) out[r * 4 + c] += sums[c];
      });
      return;
    }
    with_divergence(p.divergence, [&](auto tag) {
      constexpr int DIV = decltype(tag)::value;
      for_rows(n, [&](int64_t r) {
        const T* x = row_ptr<T>(xs, r);
        const T* t = row_ptr<T>(xt, r);
        const F lse_b = sts[r * 4 + 0], lse_a = sts[r * 4 + 2];
        F d = F(0), s = F(0);
        with_cap(p.cap_s, [&](auto cs) {
          with_cap(p.cap_t, [&](auto ct) {
            row_terms<DIV, decltype(cs)::value, decltype(ct)::value, T, F>(x, t, w, inv_t, cap_s, cap_t,
                                                                           lse_b, lse_a, mix, d, s);
          });
        });
        out[r * 2 + 0] += d;
        out[r * 2 + 1] += s;
      });
    });
  });
}

void CpuEpi::dense_grad(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,
                        const Tensor& stats, const Tensor& grad_rows, const Tensor& g,
                        const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_dense_grad_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F inv_t = F(1.0 / p.temperature), cap_s = F(p.cap_s), cap_t = F(p.cap_t);
    const F c_kd = F(p.kd_scale / p.temperature), ce_w = F(p.ce_weight);
    const bool kd = p.kd_scale != 0.0;
    const Mix<F> mix = Mix<F>::make(p.mix);
    const F* sts = stats.data_ptr<F>();
    const int64_t ld = stats.size(1);  // 4, or 6 with AKL's [w_h, w_t]
    const F* gr = grad_rows.data_ptr<F>();
    const int64_t* lab = labels.data_ptr<int64_t>();
    with_divergence(p.divergence, [&](auto tag) {
      constexpr int DIV = decltype(tag)::value;
      for_rows(n, [&](int64_t r) {
        T* out = g.data_ptr<T>() + r * g.stride(0);
        const F scale = gr[r];
        if (scale == F(0)) {  // exactly 0, whatever the logits hold
          for (int64_t j = 0; j < w; ++j) out[j] = T(0);
          return;
        }
        const T* x = row_ptr<T>(xs, r);
        const T* t = kd ? row_ptr<T>(xt, r) : nullptr;
        const F* st = sts + r * ld;
        const F lse_b = st[0], lse_1 = st[1], lse_a = st[2], S = st[3];
        const Mix<F> mix_r = DIV == kAKL ? Mix<F>::weights(st[4], st[5]) : mix;
        const int64_t y = lab[r] - v0;  // label column in this chunk (may be outside)
        const F ce = lab[r] >= 0 ? ce_w : F(0);
        with_cap(p.cap_s, [&](auto cs) {
          with_cap(p.cap_t, [&](auto ct) {
            with_flag(kd, [&](auto has_kd) {
              with_flag(ce != F(0), [&](auto has_ce) {
                row_dense_grad<DIV, decltype(cs)::value, decltype(ct)::value, decltype(has_kd)::value,
                               decltype(has_ce)::value>(x, t, out, w, inv_t, cap_s, cap_t, c_kd, lse_b,
                                                        lse_1, lse_a, S, ce, y, scale, mix_r);
              });
            });
          });
        });
      });
    });
  });
}

void CpuEpi::lse_out_update(const Tensor& xs, const Tensor& mask, const Tensor& state, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_lse_out_update_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F inv_t = F(1.0 / p.temperature), cap = F(p.cap_s);
    F* st = state.data_ptr<F>();
    const uint8_t* mk = mask.data_ptr<uint8_t>();
    for_rows(n, [&](int64_t r) {
      const T* x = row_ptr<T>(xs, r);
      const uint8_t* m = mk + r * w;
      const F xmax = row_max_unmasked<T, F>(x, m, w);
      if (!(xmax > neg_inf<F>())) return;
      const F shift = softcap(xmax, cap) * inv_t;
      Lse<F> l{st[r * 2], st[r * 2 + 1]};
      with_cap(p.cap_s, [&](auto cs) {
        l.merge(shift, row_sumexp_unmasked<decltype(cs)::value, T, F>(x, m, w, cap, inv_t, shift));
      });
      st[r * 2] = l.m;
      st[r * 2 + 1] = l.s;
    });
  });
}

void CpuEpi::sparse_gather(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& zK,
                           const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1), k = ids.size(1);
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_sparse_gather_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F cap = F(p.cap_s);
    const int64_t* id = ids.data_ptr<int64_t>();
    F* out = zK.data_ptr<F>();
    for_rows(n, [&](int64_t r) {
      const T* x = row_ptr<T>(xs, r);
      for (int64_t i = 0; i < k; ++i) {
        const int64_t c = id[r * k + i] - v0;
        if (c >= 0 && c < w) out[r * k + i] = softcap(static_cast<F>(x[c]), cap);
      }
    });
  });
}

void CpuEpi::sparse_finalize(const Tensor& ids, const Tensor& vals, const Tensor& zK,
                             const Tensor& lse_b, const Tensor& lse_out, const Tensor& out, int64_t vocab,
                             const Params& p) {
  const int64_t n = ids.size(0), k = ids.size(1);
  const bool f64 = zK.scalar_type() == at::kDouble;
  KD_DISPATCH_FLOAT(vals.scalar_type(), "kd_sparse_finalize_cpu", [&] {
    using VT = scalar_t;
    auto run = [&](auto f_tag) {
      using F = decltype(f_tag);
      const F inv_t = F(1.0 / p.temperature);
      const Mix<F> mix = Mix<F>::make(p.mix);
      const int64_t* id = ids.data_ptr<int64_t>();
      const VT* v = vals.data_ptr<VT>();
      const F* z = zK.data_ptr<F>();
      const F* lse = lse_b.data_ptr<F>();
      const F* lse_o = lse_out.data_ptr<F>();
      F* o = out.data_ptr<F>();
      if (p.divergence == kAKL) {
        for_rows(n, [&](int64_t r) {
          const SparseAklRow<F> s = sparse_row_akl<F, VT>(k, id + r * k, v + r * k, z + r * k, inv_t, lse[r],
                                                          lse_o[r], vocab, static_cast<int>(p.tail), p.weights);
          F* row = o + r * 8;
          row[0] = s.fkl; row[1] = s.rkl; row[2] = s.tv; row[3] = s.S_fkl;
          row[4] = s.hQ_fkl; row[5] = s.hQ_rkl; row[6] = s.lse; row[7] = s.lnorm;
        });
        return;
      }
      with_divergence(p.divergence, [&](auto tag) {
        constexpr int DIV = decltype(tag)::value;
        for_rows(n, [&](int64_t r) {
          const SparseRow<F> s = sparse_row<DIV, F, VT>(k, id + r * k, v + r * k, z + r * k, inv_t,
                                                        lse[r], lse_o[r], vocab, static_cast<int>(p.tail),
                                                        p.weights, mix);
          F* row = o + r * 5;
          row[0] = s.D; row[1] = s.S; row[2] = s.hQ; row[3] = s.lse; row[4] = s.lnorm;
        });
      });
    };
    if (f64) run(double{}); else run(float{});
  });
}

void CpuEpi::sparse_grad(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& vals,
                         const Tensor& labels, const Tensor& stats, const Tensor& grad_rows,
                         const Tensor& g, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1), k = ids.size(1);
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_sparse_grad_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(), "kd_sparse_vals", [&] {
      using VT = scalar_t;
      const F inv_t = F(1.0 / p.temperature), cap = F(p.cap_s);
      const F c_kd = F(p.kd_scale / p.temperature), ce_w = F(p.ce_weight);
      const bool kd = p.kd_scale != 0.0, dense_tail = kd && p.tail != kRenormBoth;
      const Mix<F> mix = Mix<F>::make(p.mix);
      const F* sts = stats.data_ptr<F>();
      const int64_t ld = stats.size(1);  // 5, or 7 with AKL's [w_h, w_t]
      const F* gr = grad_rows.data_ptr<F>();
      const int64_t* lab = labels.data_ptr<int64_t>();
      const int64_t* id = ids.data_ptr<int64_t>();
      const VT* v = vals.data_ptr<VT>();
      with_divergence(p.divergence, [&](auto tag) {
        constexpr int DIV = decltype(tag)::value;
        for_rows(n, [&](int64_t r) {
          T* out = g.data_ptr<T>() + r * g.stride(0);
          const F scale = gr[r];
          if (scale == F(0)) {
            for (int64_t j = 0; j < w; ++j) out[j] = T(0);
            return;
          }
          const T* x = row_ptr<T>(xs, r);
          const F* st = sts + r * ld;
          const F lse = st[0], lse_1 = st[1], hQ = st[2], S = st[3], lnorm = st[4];
          const Mix<F> mix_r = DIV == kAKL ? Mix<F>::weights(st[5], st[6]) : mix;
          const F dense = dense_tail ? c_kd * (hQ - S) : F(0);
          const int64_t y = lab[r] - v0;
          const F ce = lab[r] >= 0 ? ce_w : F(0);
          // g_j = [c_kd (q_j (hQ - S) + corr_j) + ce (softmax_j - [j = y])] dz/dx_j * grad_row
          with_cap(p.cap_s, [&](auto cs) {
            with_flag(dense_tail, [&](auto has_dense) {
              with_flag(ce != F(0), [&](auto has_ce) {
                row_sparse_dense<decltype(cs)::value, decltype(has_dense)::value, decltype(has_ce)::value>(
                    x, out, w, inv_t, cap, dense, lse, lse_1, ce, y, scale);
              });
            });
          });
          if (!kd) return;
          for (int64_t i = 0; i < k; ++i) {  // the k valid ids: rewritten with qh - q S
            const int64_t j = id[r * k + i] - v0;
            if (id[r * k + i] < 0 || j < 0 || j >= w) continue;
            const F z = softcap(static_cast<F>(x[j]), cap);
            const F at_id = sparse_grad_at_id<DIV, F, VT>(z * inv_t, v[r * k + i], lse, lnorm, S,
                                                          p.weights, mix_r);
            F val = c_kd * at_id;
            if (ce != F(0)) val += ce * (exp_(z - lse_1) - (j == y ? F(1) : F(0)));
            out[j] = static_cast<T>(val * softcap_grad(z, cap) * scale);
          }
        });
      });
    });
  });
}

void CpuEpi::topk_update(const Tensor& x, int64_t v0, const Tensor& state, const Tensor& tv,
                         const Tensor& ti, const Params& p) {
  const int64_t n = x.size(0), w = x.size(1), k = tv.size(1);
  KD_DISPATCH_FLOAT(x.scalar_type(), "kd_topk_update_cpu", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    const F inv_t = F(1.0 / p.temperature), cap = F(p.cap_s);
    F* st = state.data_ptr<F>();
    F* vals = tv.data_ptr<F>();
    int64_t* idx = ti.data_ptr<int64_t>();
    for_rows(n, [&](int64_t r) {
      const T* xr = row_ptr<T>(x, r);
      merge_row<T, F>(st[r * 2], st[r * 2 + 1], xr, w, cap, inv_t, row_max<T, F>(xr, w));
      F* rv = vals + r * k;
      int64_t* ri = idx + r * k;
      for (int64_t j = 0; j < w; ++j) {
        const F b = softcap(static_cast<F>(xr[j]), cap) * inv_t;
        if (b >= rv[k - 1]) topk_insert<F>(rv, ri, k, b, v0 + j);
      }
    });
  });
}

}  // namespace kdkernels
