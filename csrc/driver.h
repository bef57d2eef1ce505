// Device-generic op drivers: vocabulary-chunked GEMMs through ATen (cuBLAS on GPU, MKL/OpenBLAS on
// CPU), one epilogue per chunk from `Epi` (CpuEpi or CudaEpi, csrc/epilogue.h).
//
// A chunk holds all N rows and W vocabulary columns, W chosen so the chunk's logits (and gradient)
// fit Params::chunk_bytes (never below 32 columns). Per chunk [v0, v0 + W):
//   forward   z_c = h @ W_c^T + b_c              epilogue: running LSE / gathered ids / top-k / terms
//   backward  z_c recomputed, g_c = epilogue     dh += g_c @ W_c,  dW_c = g_c^T @ h,  db_c = sum g_c
// The dense-teacher forward needs the final LSEs before the terms: a second pass over the chunks
// recomputes the logits, unless one chunk covers the vocabulary (then it is reused).
// Memory: the chunk buffers, O(N) (O(N k) sparse / top-k) row state, an fp32 dh accumulator when
// there are several chunks and the inputs are not fp32. Saved for backward: the stats only.
//
// Divergence akl (docs/backends.md): the forward returns loss = the CE part only and stats whose
// last five columns are public, [lse_p, lse_q, fkl, rkl, tv]:
//   dense  (N, 7): [LSE(z), S_fkl, LSE(a), LSE(b), fkl, rkl, tv]
//   sparse (N, 9): [LSE(z), hQ_fkl, hQ_rkl, S_fkl, lnorm, lse, fkl, rkl, tv]
// (S_rkl = rkl exactly: reverse KL's f and qh are the same terms). The backward takes the weights
// (N, 2) [w_h, w_t] and forms the gradient epilogues' state with S = w_h S_fkl + w_t rkl and
// hQ = w_h hQ_fkl + w_t hQ_rkl (tensor ops on the device: no host sync).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "dispatch.h"
#include "epilogue.h"
#include "kdkernels/topk.cuh"

namespace kdkernels {
namespace driver {

using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;

inline at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ",
              t.scalar_type());
}

inline void check_rows(const char* op, const char* name, const Tensor& t, int64_t n, const Tensor& ref) {
  TORCH_CHECK(t.size(0) == n, op, ": ", name, " must have ", n, " rows, got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              ref.device());
}

inline void check_labels(const char* op, const Tensor& labels, int64_t n, const Tensor& ref) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must have shape (", n, "), got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  check_rows(op, "labels", labels, n, ref);
}

inline void check_head(const char* op, const char* h_name, const Tensor& h, const char* w_name,
                       const Tensor& w, const char* b_name, const c10::optional<Tensor>& b) {
  check_matrix(op, h_name, h);
  check_matrix(op, w_name, w);
  TORCH_CHECK(h.size(1) == w.size(1), op, ": ", h_name, " ", h.sizes(), " and ", w_name, " ", w.sizes(),
              " must share the hidden size");
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), op, ": ", w_name, " must have the dtype of ", h_name,
              " (", h.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK(w.device() == h.device(), op, ": ", w_name, " is on ", w.device(), ", ", h_name, " on ",
              h.device());
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": ", b_name, " must have shape (",
                w.size(0), "), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == h.scalar_type(), op, ": ", b_name, " must have dtype ", h.scalar_type());
    TORCH_CHECK(b->device() == h.device(), op, ": ", b_name, " is on ", b->device());
  }
}

// The two logits of kd_loss: 2-D, floating, one shape, one device.
inline void check_logit_pair(const char* op, const Tensor& zs, const Tensor& zt) {
  check_matrix(op, "student_logits", zs);
  check_matrix(op, "teacher_logits", zt);
  TORCH_CHECK(zs.sizes() == zt.sizes(), op, ": student_logits ", zs.sizes(),
              " and teacher_logits ", zt.sizes(), " must have the same shape");
  check_rows(op, "teacher_logits", zt, zs.size(0), zs);
}

// The two LM heads of fused_linear_kd_loss: each a valid head, one vocabulary, one set of rows.
inline void check_head_pair(const char* op, const Tensor& hs, const Tensor& ws,
                            const c10::optional<Tensor>& bs, const Tensor& ht, const Tensor& wt,
                            const c10::optional<Tensor>& bt) {
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  check_head(op, "teacher_hidden", ht, "teacher_weight", wt, "teacher_bias", bt);
  TORCH_CHECK(wt.size(0) == ws.size(0), op, ": teacher_weight has ", wt.size(0),
              " rows, student_weight ", ws.size(0));
  check_rows(op, "teacher_hidden", ht, hs.size(0), hs);
}

// Unit column stride (row stride free), as the epilogues expect.
inline Tensor unit_cols(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

inline int64_t chunk_cols(int64_t n, int64_t v, int64_t bytes_per_cell, int64_t budget) {
  const int64_t per_col = std::max<int64_t>(1, n * bytes_per_cell);
  int64_t w = budget / per_col;
  if (w >= v) return v;
  w = std::max<int64_t>(32, (w / 32) * 32);  // a floor that keeps GEMMs reasonable
  return std::min(w, v);
}

// z_c = h @ W_c^T + b_c in the inputs' dtype, rounded as naive PyTorch rounds it (GEMM, then the
// bias add), which is what the accuracy oracle of the tests assumes. LM heads rarely have a bias.
inline Tensor head_logits(const Tensor& h, const Tensor& w, const c10::optional<Tensor>& b, int64_t v0,
                          int64_t cols) {
  Tensor z = at::mm(h, w.narrow(0, v0, cols).t());
  if (b.has_value() && b->defined()) z.add_(b->narrow(0, v0, cols));
  return z;
}

// Same dtype for student and teacher chunks: promote both to the accumulation dtype if they differ.
inline void match_dtypes(Tensor& xs, Tensor& xt) {
  if (!xt.defined() || xs.scalar_type() == xt.scalar_type()) return;
  const auto d = (xs.scalar_type() == at::kDouble || xt.scalar_type() == at::kDouble) ? at::kDouble
                                                                                        : at::kFloat;
  xs = xs.to(d);
  xt = xt.to(d);
}

inline Tensor lse_state(int64_t n, const at::TensorOptions& o) {
  Tensor st = at::empty({n, 8}, o);
  st.narrow(1, 0, 4).fill_(-std::numeric_limits<double>::infinity());
  st.narrow(1, 4, 4).zero_();
  return st;
}

inline Tensor lse_col(const Tensor& st, int64_t which) {  // 0: b, 1: z (CE), 2: a
  return st.select(1, which) + st.select(1, 4 + which).log();
}

inline bool is_akl(const Params& p) { return p.divergence == kAKL; }

// AKL weights (N, 2) as the accumulation dtype, checked.
inline Tensor akl_weights_of(const char* op, const c10::optional<Tensor>& w, int64_t n, const Tensor& ref,
                             at::ScalarType acc) {
  TORCH_CHECK(w.has_value() && w->defined(), op, ": divergence akl needs akl_weights (N, 2) [w_h, w_t]");
  TORCH_CHECK(w->dim() == 2 && w->size(0) == n && w->size(1) == 2, op, ": akl_weights must be (", n,
              ", 2), got ", w->sizes());
  TORCH_CHECK(at::isFloatingType(w->scalar_type()), op, ": akl_weights must be floating, got ",
              w->scalar_type());
  TORCH_CHECK(w->device() == ref.device(), op, ": akl_weights is on ", w->device(), " but the inputs are on ",
              ref.device());
  return w->to(acc);
}

inline void check_stats_width(const char* op, const Tensor& stats, int64_t width) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == width, op, ": stats must be (N, ", width, "), got ",
              stats.sizes());
}

// Dense AKL: public stats from the lse stats (N, 4) and the terms acc (N, 4) [fkl, rkl, tv, S_fkl].
inline Tensor akl_dense_stats(const Tensor& st4, const Tensor& acc) {
  return at::stack({st4.select(1, 1), acc.select(1, 3), st4.select(1, 2), st4.select(1, 0), acc.select(1, 0),
                    acc.select(1, 1), acc.select(1, 2)}, 1);
}

// Dense AKL: the gradient epilogue's state (N, 6) [LSE(b), LSE(z), LSE(a), S, w_h, w_t].
inline Tensor akl_dense_grad_state(const Tensor& st, const Tensor& w) {
  const Tensor wh = w.select(1, 0), wt = w.select(1, 1);
  return at::stack({st.select(1, 3), st.select(1, 0), st.select(1, 2),
                    wh * st.select(1, 1) + wt * st.select(1, 5), wh, wt}, 1);
}

// Sparse AKL: public stats from the finalize output (N, 8) [fkl, rkl, tv, S_fkl, hQ_fkl, hQ_rkl, lse,
// lnorm] and LSE(z).
inline Tensor akl_sparse_stats(const Tensor& r, const Tensor& lse_1) {
  return at::stack({lse_1, r.select(1, 4), r.select(1, 5), r.select(1, 3), r.select(1, 7), r.select(1, 6),
                    r.select(1, 0), r.select(1, 1), r.select(1, 2)}, 1);
}

// Sparse AKL: the gradient epilogue's state (N, 7) [lse, LSE(z), hQ, S, lnorm, w_h, w_t].
inline Tensor akl_sparse_grad_state(const Tensor& st, const Tensor& w) {
  const Tensor wh = w.select(1, 0), wt = w.select(1, 1);
  return at::stack({st.select(1, 5), st.select(1, 0), wh * st.select(1, 1) + wt * st.select(1, 2),
                    wh * st.select(1, 3) + wt * st.select(1, 7), st.select(1, 4), wh, wt}, 1);
}

// CE term per row: ce_weight * (LSE(z) - z[label]), 0 where label < 0.
inline Tensor ce_rows(const Tensor& st, const Tensor& lse1, const Tensor& labels, const Params& p) {
  return at::where(labels >= 0, (lse1 - st.select(1, 3)) * p.ce_weight, at::zeros_like(lse1));
}

// The hidden states as the weight gradient reads them: rows whose upstream gradient is 0 (ignored rows)
// zeroed, since they may hold NaN and 0 * NaN is NaN in dW = g^T h (docs/backends.md: such rows
// contribute exactly 0). An (N, H) copy, next to GEMMs of N x V x H.
inline Tensor zero_ignored(const Tensor& h, const Tensor& grad_rows) {
  return at::where((grad_rows != 0).unsqueeze(1), h, at::zeros({}, h.options()));
}

struct HeadGrads {
  Tensor dh, dh_acc, dw, db;
  bool need_dh, need_dw, need_db, single;
  // partial (Params::dh_partial, the shard protocol): dh stays the accumulation-dtype sum, uncast
  bool partial;
  HeadGrads(const Tensor& h, const Tensor& w, bool ndh, bool ndw, bool ndb, bool one, bool part = false)
      : need_dh(ndh), need_dw(ndw), need_db(ndb), single(one && !part), partial(part) {
    const auto acc = acc_dtype(h);
    if (need_dh && !single) {
      dh_acc = at::zeros(h.sizes(), h.options().dtype(acc));
    }
    if (need_dw) dw = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
    if (need_db) db = at::empty({w.size(0)}, w.options());
  }
  void add(const Tensor& g, const Tensor& h, const Tensor& w, int64_t v0, int64_t cols) {
    const Tensor wc = w.narrow(0, v0, cols);
    if (need_dh) {
      if (single) dh = at::mm(g, wc);
      else if (dh_acc.scalar_type() == g.scalar_type()) dh_acc.addmm_(g, wc);
      else dh_acc.add_(at::mm(g, wc));
    }
    if (need_dw) {
      Tensor out = dw.narrow(0, v0, cols);
      at::mm_out(out, g.t(), h);
    }
    if (need_db) db.narrow(0, v0, cols).copy_(g.sum(0, false, acc_dtype(g)));
  }
  Tensors3 finish(const Tensor& h) {
    if (need_dh && !single) dh = partial ? dh_acc : dh_acc.to(h.scalar_type());
    auto none = [&] { return at::empty({0}, h.options()); };
    return {need_dh ? dh : none(), need_dw ? dw : none(), need_db ? db : none()};
  }
};

// ---------------------------------------------------------------------------------------------
// kd_loss: logits given; the whole input is one chunk.

template <class Epi>
Tensors2 kd_forward(const Tensor& zs_in, const Tensor& zt_in, const Tensor& labels, const Params& p) {
  const char* op = "kdkernels_native::kd_forward";
  check_logit_pair(op, zs_in, zt_in);
  const int64_t n = zs_in.size(0);
  check_labels(op, labels, n, zs_in);
  Tensor zs = unit_cols(zs_in), zt = unit_cols(zt_in);
  match_dtypes(zs, zt);
  const auto o = zs.options().dtype(acc_dtype(zs));
  const bool akl = is_akl(p);
  const bool kd = p.kd_scale != 0.0 || akl, ce = p.ce_weight != 0.0;  // akl: stats even at kd_weight 0
  Tensor st = lse_state(n, o);
  const Tensor lab = labels.contiguous();
  Epi::lse_update(zs, kd ? zt : Tensor(), 0, lab, st, p);
  Tensor lse_b = lse_col(st, 0), lse_1 = ce ? lse_col(st, 1) : at::zeros({n}, o);
  Tensor lse_a = lse_col(st, 2);
  Tensor stats = at::stack({lse_b, lse_1, lse_a, at::zeros({n}, o)}, 1);
  Tensor loss = at::zeros({n}, o);
  if (kd) {
    Tensor acc = at::zeros({n, akl ? 4 : 2}, o);
    Epi::dense_terms(zs, zt, stats, acc, p);
    if (akl) {
      stats = akl_dense_stats(stats, acc);
    } else {
      stats.select(1, 3).copy_(acc.select(1, 1));
      loss = acc.select(1, 0) * p.kd_scale;
    }
  }
  if (ce) loss = loss + ce_rows(st, lse_1, lab, p);
  return {loss, stats};
}

template <class Epi>
Tensor kd_backward(const Tensor& zs_in, const Tensor& zt_in, const Tensor& labels, const Tensor& stats,
                   const Tensor& grad_rows, const Params& p, const c10::optional<Tensor>& akl_weights) {
  const char* op = "kdkernels_native::kd_backward";
  check_matrix(op, "student_logits", zs_in);
  check_matrix(op, "teacher_logits", zt_in);
  const int64_t n = zs_in.size(0);
  check_labels(op, labels, n, zs_in);
  check_rows(op, "stats", stats, n, zs_in);
  check_rows(op, "grad_rows", grad_rows, n, zs_in);
  Tensor zs = unit_cols(zs_in), zt = unit_cols(zt_in);
  const auto out_dtype = zs.scalar_type();
  match_dtypes(zs, zt);
  const auto acc = acc_dtype(zs);
  Tensor st = stats.to(acc);
  if (is_akl(p)) {
    check_stats_width(op, stats, 7);
    st = akl_dense_grad_state(st, akl_weights_of(op, akl_weights, n, zs_in, acc));
  }
  Tensor g = at::empty(zs.sizes(), zs.options());
  Epi::dense_grad(zs, zt, 0, labels.contiguous(), st.contiguous(), grad_rows.to(acc).contiguous(), g, p);
  return g.scalar_type() == out_dtype ? g : g.to(out_dtype);
}

// ---------------------------------------------------------------------------------------------
// fused_linear_kd_loss: two LM heads, dense teacher.

// zs_all, zt_all: both heads' logits of every column, already computed (the fused path,
// driver_fused.h); else none.
template <class Epi>
Tensors2 linear_kd_forward(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                           const Tensor& ht, const Tensor& wt, const c10::optional<Tensor>& bt,
                           const Tensor& labels, const Params& p, const Tensor& zs_all = Tensor(),
                           const Tensor& zt_all = Tensor()) {
  const char* op = "kdkernels_native::linear_kd_forward";
  check_head_pair(op, hs, ws, bs, ht, wt, bt);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_labels(op, labels, n, hs);
  const bool akl = is_akl(p);
  const bool kd = p.kd_scale != 0.0 || akl, ce = p.ce_weight != 0.0;  // akl: stats even at kd_weight 0
  const auto o = hs.options().dtype(acc_dtype(hs));
  const Tensor lab = labels.contiguous();
  const bool given = zs_all.defined();
  const int64_t cols =
      given ? v : chunk_cols(n, v, hs.element_size() + (kd ? ht.element_size() : 0), p.chunk_bytes);
  const bool single = cols == v;
  Tensor st = lse_state(n, o);
  Tensor zs1, zt1;
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor zs = given ? zs_all : head_logits(hs, ws, bs, v0, w);
    Tensor zt = !kd ? Tensor() : given ? zt_all : head_logits(ht, wt, bt, v0, w);
    match_dtypes(zs, zt);
    Epi::lse_update(zs, zt, v0, lab, st, p);
    if (single) { zs1 = zs; zt1 = zt; }
  }
  Tensor lse_1 = ce ? lse_col(st, 1) : at::zeros({n}, o);
  Tensor stats = at::stack({lse_col(st, 0), lse_1, lse_col(st, 2), at::zeros({n}, o)}, 1);
  Tensor loss = at::zeros({n}, o);
  if (kd) {
    Tensor acc = at::zeros({n, akl ? 4 : 2}, o);
    for (int64_t v0 = 0; v0 < v; v0 += cols) {
      const int64_t w = std::min(cols, v - v0);
      Tensor zs = single ? zs1 : head_logits(hs, ws, bs, v0, w);
      Tensor zt = single ? zt1 : head_logits(ht, wt, bt, v0, w);
      match_dtypes(zs, zt);
      Epi::dense_terms(zs, zt, stats, acc, p);
    }
    if (akl) {
      stats = akl_dense_stats(stats, acc);
    } else {
      stats.select(1, 3).copy_(acc.select(1, 1));
      loss = acc.select(1, 0) * p.kd_scale;
    }
  }
  if (ce) loss = loss + ce_rows(st, lse_1, lab, p);
  return {loss, stats};
}

template <class Epi>
Tensors3 linear_kd_backward(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                            const Tensor& ht, const Tensor& wt, const c10::optional<Tensor>& bt,
                            const Tensor& labels, const Tensor& stats, const Tensor& grad_rows,
                            const Params& p, bool need_dh, bool need_dw, bool need_db,
                            const c10::optional<Tensor>& akl_weights) {
  const char* op = "kdkernels_native::linear_kd_backward";
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  check_head(op, "teacher_hidden", ht, "teacher_weight", wt, "teacher_bias", bt);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_labels(op, labels, n, hs);
  check_rows(op, "stats", stats, n, hs);
  check_rows(op, "grad_rows", grad_rows, n, hs);
  const bool kd = p.kd_scale != 0.0;
  const auto acc = acc_dtype(hs);
  Tensor st = stats.to(acc);
  if (is_akl(p)) {
    check_stats_width(op, stats, 7);
    st = akl_dense_grad_state(st, akl_weights_of(op, akl_weights, n, hs, acc));
  }
  st = st.contiguous();
  const Tensor lab = labels.contiguous();
  const Tensor gr = grad_rows.to(acc).contiguous();
  const int64_t cols =
      chunk_cols(n, v, 2 * hs.element_size() + (kd ? ht.element_size() : 0), p.chunk_bytes);
  HeadGrads out(hs, ws, need_dh, need_dw, need_db, cols == v, p.dh_partial);
  if (!(need_dh || need_dw || need_db)) return out.finish(hs);
  const Tensor hm = need_dw ? zero_ignored(hs, gr) : hs;
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor zs = head_logits(hs, ws, bs, v0, w);
    Tensor zt = kd ? head_logits(ht, wt, bt, v0, w) : Tensor();
    match_dtypes(zs, zt);
    Tensor g = at::empty({n, w}, hs.options());
    if (zs.scalar_type() == hs.scalar_type()) {
      Epi::dense_grad(zs, zt, v0, lab, st, gr, g, p);
    } else {
      Tensor g32 = at::empty({n, w}, zs.options());
      Epi::dense_grad(zs, zt, v0, lab, st, gr, g32, p);
      g.copy_(g32);
    }
    out.add(g, hm, ws, v0, w);
  }
  return out.finish(hs);
}

// ---------------------------------------------------------------------------------------------
// fused_linear_sparse_kd_loss: one LM head, cached sparse teacher (ids, values).

inline void check_sparse(const char* op, const Tensor& ids, const Tensor& vals, int64_t n, const Tensor& ref) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, op,
              ": teacher_ids must be a 2-D int64 tensor, got ", ids.sizes(), " ", ids.scalar_type());
  TORCH_CHECK(vals.sizes() == ids.sizes(), op, ": teacher_values ", vals.sizes(),
              " must have the shape of teacher_ids ", ids.sizes());
  TORCH_CHECK(at::isFloatingType(vals.scalar_type()), op, ": teacher_values must be floating");
  check_rows(op, "teacher_ids", ids, n, ref);
  check_rows(op, "teacher_values", vals, n, ref);
}

// z_all: the logits of every column, already computed (the fused path, driver_fused.h); else none.
template <class Epi>
Tensors2 linear_sparse_kd_forward(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                                  const Tensor& ids_in, const Tensor& vals_in, const Tensor& labels,
                                  const Params& p, const Tensor& z_all = Tensor()) {
  const char* op = "kdkernels_native::linear_sparse_kd_forward";
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_sparse(op, ids_in, vals_in, n, hs);
  check_labels(op, labels, n, hs);
  const bool akl = is_akl(p);
  const bool kd = p.kd_scale != 0.0 || akl, ce = p.ce_weight != 0.0;  // akl: stats even at kd_weight 0
  const auto o = hs.options().dtype(acc_dtype(hs));
  const Tensor ids = ids_in.contiguous(), vals = vals_in.contiguous(), lab = labels.contiguous();
  const int64_t k = ids.size(1);
  const bool tail_out = kd && p.tail != kRenormBoth;  // needs LSE of b over the tokens outside K
  const int64_t cols =
      z_all.defined() ? v : chunk_cols(n, v, hs.element_size() + (tail_out ? 1 : 0), p.chunk_bytes);
  Tensor st = lse_state(n, o);
  Tensor st_out = at::empty({n, 2}, o);
  st_out.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  st_out.select(1, 1).zero_();
  Tensor zK = at::zeros({n, k}, o);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor z = z_all.defined() ? z_all : head_logits(hs, ws, bs, v0, w);
    Epi::lse_update(z, Tensor(), v0, lab, st, p);
    if (kd) Epi::sparse_gather(z, v0, ids, zK, p);
    if (tail_out) {  // mask (N, W) of the chunk's columns that are valid ids of the row
      const Tensor in = (ids >= v0) & (ids < v0 + w);
      Tensor mask = at::zeros({n, w}, hs.options().dtype(at::kByte));
      mask.scatter_reduce_(1, at::where(in, ids - v0, at::zeros_like(ids)), in.to(at::kByte), "amax");
      Epi::lse_out_update(z, mask, st_out, p);
    }
  }
  Tensor lse_1 = ce ? lse_col(st, 1) : at::zeros({n}, o);
  Tensor loss = at::zeros({n}, o);
  Tensor stats;
  if (kd) {
    Tensor r = at::empty({n, akl ? 8 : 5}, o);
    const Tensor lse_out = (st_out.select(1, 0) + st_out.select(1, 1).log()).contiguous();
    Epi::sparse_finalize(ids, vals, zK, lse_col(st, 0).contiguous(), lse_out, r, v, p);
    if (akl) {
      stats = akl_sparse_stats(r, lse_1);
    } else {
      stats = at::stack({r.select(1, 3), lse_1, r.select(1, 2), r.select(1, 1), r.select(1, 4)}, 1);
      loss = r.select(1, 0) * p.kd_scale;
    }
  } else {
    stats = at::stack({lse_col(st, 0), lse_1, at::zeros({n}, o), at::zeros({n}, o), at::zeros({n}, o)}, 1);
  }
  if (ce) loss = loss + ce_rows(st, lse_1, lab, p);
  return {loss, stats};
}

template <class Epi>
Tensors3 linear_sparse_kd_backward(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                                   const Tensor& ids_in, const Tensor& vals_in, const Tensor& labels,
                                   const Tensor& stats, const Tensor& grad_rows, const Params& p,
                                   bool need_dh, bool need_dw, bool need_db,
                                   const c10::optional<Tensor>& akl_weights) {
  const char* op = "kdkernels_native::linear_sparse_kd_backward";
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_sparse(op, ids_in, vals_in, n, hs);
  check_labels(op, labels, n, hs);
  check_rows(op, "stats", stats, n, hs);
  check_rows(op, "grad_rows", grad_rows, n, hs);
  const bool akl = is_akl(p);
  check_stats_width(op, stats, akl ? 9 : 5);
  const auto acc = acc_dtype(hs);
  const Tensor ids = ids_in.contiguous(), vals = vals_in.contiguous(), lab = labels.contiguous();
  Tensor st = stats.to(acc);
  if (akl) st = akl_sparse_grad_state(st, akl_weights_of(op, akl_weights, n, hs, acc));
  st = st.contiguous();
  const Tensor gr = grad_rows.to(acc).contiguous();
  const int64_t cols = chunk_cols(n, v, 2 * hs.element_size(), p.chunk_bytes);
  HeadGrads out(hs, ws, need_dh, need_dw, need_db, cols == v, p.dh_partial);
  if (!(need_dh || need_dw || need_db)) return out.finish(hs);
  const Tensor hm = need_dw ? zero_ignored(hs, gr) : hs;
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor z = head_logits(hs, ws, bs, v0, w);
    Tensor g = at::empty({n, w}, hs.options());
    Epi::sparse_grad(z, v0, ids, vals, lab, st, gr, g, p);
    out.add(g, hm, ws, v0, w);
  }
  return out.finish(hs);
}

// ---------------------------------------------------------------------------------------------
// linear_topk

template <class Epi>
Tensors3 linear_topk(const Tensor& h, const Tensor& w, const c10::optional<Tensor>& b, int64_t k,
                     const Params& p) {
  const char* op = "kdkernels_native::linear_topk";
  check_head(op, "hidden", h, "weight", w, "bias", b);
  const int64_t n = h.size(0), v = w.size(0);
  TORCH_CHECK(k >= 1 && k <= v, op, ": k must be in [1, ", v, "], got ", k);
  const auto o = h.options().dtype(acc_dtype(h));
  Tensor st = at::empty({n, 2}, o);
  st.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
  st.select(1, 1).zero_();
  Tensor tv = at::full({n, k}, -std::numeric_limits<double>::infinity(), o);
  Tensor ti = at::full({n, k}, kNoId, h.options().dtype(at::kLong));
  const int64_t cols = chunk_cols(n, v, h.element_size(), p.chunk_bytes);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t c = std::min(cols, v - v0);
    Epi::topk_update(head_logits(h, w, b, v0, c), v0, st, tv, ti, p);
  }
  Tensor lse = st.select(1, 0) + st.select(1, 1).log();
  Tensor lp = tv - lse.unsqueeze(1);
  return {lp.to(at::kFloat), ti, lse.to(at::kFloat)};
}

// ---------------------------------------------------------------------------------------------
// linear_sample: inverse CDF of softmax(z / T) at sorted uniforms u (float64), chunk by chunk.
// Pass 1: LSE (the lse epilogue). Pass 2 per chunk: cdf_c = carry + cumsum(exp(z_c / T - LSE))
// in float64; draw r lands in the chunk when u_r < cdf_c[last]; its id is v0 + #{cdf_c <= u_r}.
// (u is compared with the CDF as is, i.e. scaled by 1 instead of the rounded total CDF(V-1).)
// ATen ops only: the sampling epilogue is a batched searchsorted.

template <class Epi>
Tensors2 linear_sample(const Tensor& h, const Tensor& w, const c10::optional<Tensor>& b, const Tensor& u_in,
                       const Params& p_in) {
  const char* op = "kdkernels_native::linear_sample";
  check_head(op, "hidden", h, "weight", w, "bias", b);
  const int64_t n = h.size(0), v = w.size(0);
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(0) == n, op, ": uniforms must be (", n, ", draws), got ",
              u_in.sizes());
  check_rows(op, "uniforms", u_in, n, h);
  Params p = p_in;
  p.ce_weight = 0.0;
  const auto o = h.options().dtype(acc_dtype(h));
  const Tensor u = u_in.to(at::kDouble).contiguous();
  const Tensor no_labels = at::full({n}, -1, h.options().dtype(at::kLong));
  const int64_t cols = chunk_cols(n, v, h.element_size() + 3 * 8, p.chunk_bytes);
  Tensor st = lse_state(n, o);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t c = std::min(cols, v - v0);
    Epi::lse_update(head_logits(h, w, b, v0, c), Tensor(), v0, no_labels, st, p);
  }
  const Tensor lse = lse_col(st, 0);
  const Tensor lse64 = lse.to(at::kDouble).unsqueeze(1);
  Tensor out = at::full(u.sizes(), v, h.options().dtype(at::kLong));
  Tensor carry = at::zeros({n, 1}, o.dtype(at::kDouble));
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t c = std::min(cols, v - v0);
    Tensor z = head_logits(h, w, b, v0, c).to(at::kDouble);
    if (p.cap_s > 0) z = at::tanh(z / p.cap_s) * p.cap_s;
    Tensor cdf = at::cumsum(at::exp(z / p.temperature - lse64), 1) + carry;
    Tensor idx = at::searchsorted(cdf, u, /*out_int32=*/false, /*right=*/true);
    out = at::where((idx < c) & (out == v), idx + v0, out);
    carry = cdf.narrow(1, c - 1, 1);
  }
  return {out.clamp_max_(v - 1), lse.to(at::kFloat)};
}

}  // namespace driver
}  // namespace kdkernels
