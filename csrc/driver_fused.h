// The fused path of the fused-linear losses (docs/backends.md, "Fused path"): the loss and the
// gradients at upstream gradient 1 in one call, for scalar losses. Blocks of R rows, each seeing the
// whole vocabulary, so its log-sum-exps are final after one look at its logits:
//   z_r  = h_r @ W^T + b                      GEMM 1 (and z_t,r = h_t,r @ W_t^T: GEMM 1' for a live teacher)
//   loss_r, stats_r = the forward epilogues on z_r (one chunk covering the vocabulary)
//   g_r  = the gradient epilogue on z_r, weighted by grad_rows
//   dh_r = g_r @ W                             GEMM 2
//   dW  += g_r^T h_r,  db += sum_r g_r         GEMM 3 (skipped for a frozen head)
// Three head GEMMs for a cached teacher, four for a live one: the recompute path's fourth (fifth) GEMM
// is gone. Memory: R x V logits and gradient (input dtype) and the tail mask (bytes), R chosen from
// Params::chunk_bytes (at least 1 row). The gradients come back in the accumulation dtype (fp32 for
// fp16/bf16 inputs): dW sums over row blocks there, and the frontend rounds once after scaling.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <tuple>

#include "driver.h"

namespace kdkernels {
namespace driver {

using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

inline int64_t block_rows(int64_t n, int64_t v, int64_t bytes_per_cell, int64_t budget) {
  const int64_t per_row = std::max<int64_t>(1, v * bytes_per_cell);
  return std::max<int64_t>(1, std::min<int64_t>(n, budget / per_row));
}

#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9))
#define KDKERNELS_HAS_MM_DTYPE 1
#endif

// a @ b in the accumulation dtype `acc`, rounded once: a plain GEMM when the operands are `acc`;
// fp16/bf16 operands use the GEMM's fp32 output on CUDA (aten::mm.dtype), fp32 copies elsewhere.
inline Tensor mm_acc(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
#ifdef KDKERNELS_HAS_MM_DTYPE
  if (a.is_cuda()) return at::mm(a, b, acc);
#endif
  return at::mm(a.to(acc), b.to(acc));
}

// dh (N, H), dW and db in the accumulation dtype, dW and db summed over row blocks. The frontend scales
// them by the upstream gradient and rounds once to the inputs' dtype.
struct RowGrads {
  Tensor dh, dw, db;
  bool need_dh, need_dw, need_db;
  at::ScalarType acc;
  RowGrads(const Tensor& h, const Tensor& w, bool ndh, bool ndw, bool ndb)
      : need_dh(ndh), need_dw(ndw), need_db(ndb), acc(acc_dtype(w)) {
    if (need_dh) dh = at::empty(h.sizes(), h.options().dtype(acc));
    if (need_dw) dw = at::zeros(w.sizes(), w.options().dtype(acc));
    if (need_db) db = at::zeros({w.size(0)}, w.options().dtype(acc));
  }
  // g (R, V) of rows [r0, r0 + R); hm = those rows' hidden states with ignored rows zeroed.
  void add(const Tensor& g, const Tensor& hm, const Tensor& w, int64_t r0) {
    if (need_dh) {
      Tensor out = dh.narrow(0, r0, g.size(0));
      if (g.scalar_type() == acc) at::mm_out(out, g, w);
      else out.copy_(mm_acc(g, w, acc));
    }
    if (need_dw) {
      if (g.scalar_type() == acc) dw.addmm_(g.t(), hm);
      else dw.add_(mm_acc(g.t(), hm, acc));
    }
    if (need_db) db.add_(g.sum(0, false, acc));
  }
  std::tuple<Tensor, Tensor, Tensor> finish(const Tensor& h) {
    auto none = [&] { return at::empty({0}, h.options()); };
    return {need_dh ? dh : none(), need_dw ? dw : none(), need_db ? db : none()};
  }
};

template <class Epi>
Tensors4 linear_sparse_kd_fused(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                                const Tensor& ids_in, const Tensor& vals_in, const Tensor& labels,
                                const Tensor& grad_rows, const Params& p, bool need_dh, bool need_dw,
                                bool need_db) {
  const char* op = "kdkernels_native::linear_sparse_kd_fused";
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_sparse(op, ids_in, vals_in, n, hs);
  check_labels(op, labels, n, hs);
  check_rows(op, "grad_rows", grad_rows, n, hs);
  TORCH_CHECK(!is_akl(p), op, ": divergence akl takes the forward/backward path");
  const auto acc = acc_dtype(hs);
  const Tensor ids = ids_in.contiguous(), vals = vals_in.contiguous(), lab = labels.contiguous();
  const Tensor gr = grad_rows.to(acc).contiguous();
  const Tensor hm = need_dw ? zero_ignored(hs, gr) : hs;
  Tensor loss = at::empty({n}, hs.options().dtype(acc));
  RowGrads out(hs, ws, need_dh, need_dw, need_db && bs.has_value() && bs->defined());
  const int64_t rows = block_rows(n, v, 2 * hs.element_size() + 1, p.chunk_bytes);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const Tensor h = hs.narrow(0, r0, r), id = ids.narrow(0, r0, r), va = vals.narrow(0, r0, r);
    const Tensor lb = lab.narrow(0, r0, r);
    Tensor z = head_logits(h, ws, bs, 0, v);
    auto fwd = linear_sparse_kd_forward<Epi>(h, ws, bs, id, va, lb, p, z);
    loss.narrow(0, r0, r).copy_(std::get<0>(fwd));
    Tensor g = at::empty({r, v}, hs.options());
    Epi::sparse_grad(z, 0, id, va, lb, std::get<1>(fwd).to(acc).contiguous(), gr.narrow(0, r0, r), g, p);
    out.add(g, hm.narrow(0, r0, r), ws, r0);
  }
  auto grads = out.finish(hs);
  return {loss, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

template <class Epi>
Tensors4 linear_kd_fused(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                         const Tensor& ht, const Tensor& wt, const c10::optional<Tensor>& bt,
                         const Tensor& labels, const Tensor& grad_rows, const Params& p, bool need_dh,
                         bool need_dw, bool need_db) {
  const char* op = "kdkernels_native::linear_kd_fused";
  check_head_pair(op, hs, ws, bs, ht, wt, bt);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_labels(op, labels, n, hs);
  check_rows(op, "grad_rows", grad_rows, n, hs);
  TORCH_CHECK(!is_akl(p), op, ": divergence akl takes the forward/backward path");
  const bool kd = p.kd_scale != 0.0;
  const auto acc = acc_dtype(hs);
  const Tensor lab = labels.contiguous();
  const Tensor gr = grad_rows.to(acc).contiguous();
  const Tensor hm = need_dw ? zero_ignored(hs, gr) : hs;
  Tensor loss = at::empty({n}, hs.options().dtype(acc));
  RowGrads out(hs, ws, need_dh, need_dw, need_db && bs.has_value() && bs->defined());
  const int64_t rows =
      block_rows(n, v, 2 * hs.element_size() + (kd ? ht.element_size() : 0), p.chunk_bytes);
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const Tensor h = hs.narrow(0, r0, r), t = ht.narrow(0, r0, r), lb = lab.narrow(0, r0, r);
    Tensor zs = head_logits(h, ws, bs, 0, v);
    Tensor zt = kd ? head_logits(t, wt, bt, 0, v) : Tensor();
    match_dtypes(zs, zt);
    auto fwd = linear_kd_forward<Epi>(h, ws, bs, t, wt, bt, lb, p, zs, zt);
    loss.narrow(0, r0, r).copy_(std::get<0>(fwd));
    Tensor g = at::empty({r, v}, hs.options());
    const Tensor st = std::get<1>(fwd).to(acc).contiguous(), gw = gr.narrow(0, r0, r);
    if (zs.scalar_type() == hs.scalar_type()) {
      Epi::dense_grad(zs, zt, 0, lb, st, gw, g, p);
    } else {
      Tensor g32 = at::empty({r, v}, zs.options());
      Epi::dense_grad(zs, zt, 0, lb, st, gw, g32, p);
      g.copy_(g32);
    }
    out.add(g, hm.narrow(0, r0, r), ws, r0);
  }
  auto grads = out.finish(hs);
  return {loss, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace driver
}  // namespace kdkernels
