// The custom ops' entry points, in the argument form of their torch.library schemas
// (csrc/bindings.cpp), for a device's epilogues (`Ops<CpuEpi>`, `Ops<CudaEpi>`) and shape-only
// meta kernels (`MetaOps`, used by FakeTensor / torch.compile).
//
// Options travel as two lists, built in one place (kdkernels/backends/native/_ops.py):
//   fopts = [temperature, mix (beta or alpha), kd_scale, ce_weight, student_softcap, teacher_softcap]
//   iopts = [divergence code, tail code, values is "weights", chunk_bytes(, dh_partial)]
// (dh_partial, optional, 1: the linear backward ops return dh as the uncast accumulation-dtype sum,
// the vocab-shard partial of the shard protocol; driver_shard.h holds the shard passes)
// (softcaps: 0 = none). The backward ops take `akl_weights` (N, 2) [w_h, w_t] for divergence akl
// (None otherwise); the forward ops' stats are then AKL's (driver.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <type_traits>

#include "driver.h"
#include "driver_fused.h"
#include "driver_shard.h"

namespace kdkernels {

using OptTensor = c10::optional<at::Tensor>;
using Need = std::array<bool, 3>;

inline Params params_from(c10::ArrayRef<double> f, c10::IntArrayRef i) {
  TORCH_CHECK(f.size() == 6, "kdkernels_native: fopts must hold 6 numbers, got ", f.size());
  TORCH_CHECK(i.size() == 4 || i.size() == 5, "kdkernels_native: iopts must hold 4 or 5 integers, got ",
              i.size());
  Params p;
  p.temperature = f[0];
  p.mix = f[1];
  p.kd_scale = f[2];
  p.ce_weight = f[3];
  p.cap_s = f[4];
  p.cap_t = f[5];
  p.divergence = i[0];
  p.tail = i[1];
  p.weights = i[2] != 0;
  p.chunk_bytes = i[3];
  p.dh_partial = i.size() == 5 && i[4] != 0;
  TORCH_CHECK(p.temperature > 0, "kdkernels_native: temperature must be > 0, got ", p.temperature);
  TORCH_CHECK(p.divergence >= kForwardKL && p.divergence <= kAKL, "kdkernels_native: bad divergence code ",
              p.divergence);
  TORCH_CHECK(p.tail >= kBucket && p.tail <= kRenormBoth, "kdkernels_native: bad tail code ", p.tail);
  TORCH_CHECK(p.chunk_bytes > 0, "kdkernels_native: chunk_bytes must be > 0, got ", p.chunk_bytes);
  return p;
}

// CPU linear_sample: the streaming sampler of cpu/sample_cpu.cpp (other devices: driver::linear_sample).
std::tuple<at::Tensor, at::Tensor> linear_sample_cpu(const at::Tensor& h, const at::Tensor& w,
                                                     const OptTensor& b, const at::Tensor& u,
                                                     const Params& p);

template <class Epi>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& zs, const at::Tensor& zt,
                                                       const at::Tensor& labels, c10::ArrayRef<double> f,
                                                       c10::IntArrayRef i) {
    return driver::kd_forward<Epi>(zs, zt, labels, params_from(f, i));
  }
  static at::Tensor kd_backward(const at::Tensor& zs, const at::Tensor& zt, const at::Tensor& labels,
                                const at::Tensor& stats, const at::Tensor& grad_rows,
                                c10::ArrayRef<double> f, c10::IntArrayRef i, const OptTensor& akl_weights) {
    return driver::kd_backward<Epi>(zs, zt, labels, stats, grad_rows, params_from(f, i), akl_weights);
  }
  static std::tuple<at::Tensor, at::Tensor> linear_kd_forward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ht,
      const at::Tensor& wt, const OptTensor& bt, const at::Tensor& labels, c10::ArrayRef<double> f,
      c10::IntArrayRef i) {
    return driver::linear_kd_forward<Epi>(hs, ws, bs, ht, wt, bt, labels, params_from(f, i));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kd_backward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ht,
      const at::Tensor& wt, const OptTensor& bt, const at::Tensor& labels, const at::Tensor& stats,
      const at::Tensor& grad_rows, c10::ArrayRef<double> f, c10::IntArrayRef i, Need need,
      const OptTensor& akl_weights) {
    return driver::linear_kd_backward<Epi>(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows,
                                           params_from(f, i), need[0], need[1], need[2], akl_weights);
  }
  static std::tuple<at::Tensor, at::Tensor> linear_sparse_kd_forward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ids,
      const at::Tensor& vals, const at::Tensor& labels, c10::ArrayRef<double> f, c10::IntArrayRef i) {
    return driver::linear_sparse_kd_forward<Epi>(hs, ws, bs, ids, vals, labels, params_from(f, i));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_backward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ids,
      const at::Tensor& vals, const at::Tensor& labels, const at::Tensor& stats,
      const at::Tensor& grad_rows, c10::ArrayRef<double> f, c10::IntArrayRef i, Need need,
      const OptTensor& akl_weights) {
    return driver::linear_sparse_kd_backward<Epi>(hs, ws, bs, ids, vals, labels, stats, grad_rows,
                                                  params_from(f, i), need[0], need[1], need[2], akl_weights);
  }
  // Fused path (driver_fused.h): (loss, dh, dw, db)
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kd_fused(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ht,
      const at::Tensor& wt, const OptTensor& bt, const at::Tensor& labels, const at::Tensor& grad_rows,
      c10::ArrayRef<double> f, c10::IntArrayRef i, Need need) {
    return driver::linear_kd_fused<Epi>(hs, ws, bs, ht, wt, bt, labels, grad_rows, params_from(f, i),
                                        need[0], need[1], need[2]);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_fused(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ids,
      const at::Tensor& vals, const at::Tensor& labels, const at::Tensor& grad_rows,
      c10::ArrayRef<double> f, c10::IntArrayRef i, Need need) {
    return driver::linear_sparse_kd_fused<Epi>(hs, ws, bs, ids, vals, labels, grad_rows, params_from(f, i),
                                               need[0], need[1], need[2]);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_topk(
      const at::Tensor& h, const at::Tensor& w, const OptTensor& b, int64_t k, c10::ArrayRef<double> f,
      c10::IntArrayRef i) {
    return driver::linear_topk<Epi>(h, w, b, k, params_from(f, i));
  }
  // Shard protocol (driver_shard.h)
  static std::tuple<at::Tensor, at::Tensor> kd_shard_stats(const at::Tensor& zs, const at::Tensor& zt,
                                                           const at::Tensor& labels, c10::ArrayRef<double> f,
                                                           c10::IntArrayRef i) {
    return driver::kd_shard_stats<Epi>(zs, zt, labels, params_from(f, i));
  }
  static at::Tensor kd_shard_terms(const at::Tensor& zs, const at::Tensor& zt, const at::Tensor& glse,
                                   c10::ArrayRef<double> f, c10::IntArrayRef i) {
    return driver::kd_shard_terms<Epi>(zs, zt, glse, params_from(f, i));
  }
  static std::tuple<at::Tensor, at::Tensor> linear_kd_shard_stats(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ht,
      const at::Tensor& wt, const OptTensor& bt, const at::Tensor& labels, c10::ArrayRef<double> f,
      c10::IntArrayRef i) {
    return driver::linear_kd_shard_stats<Epi>(hs, ws, bs, ht, wt, bt, labels, params_from(f, i));
  }
  static at::Tensor linear_kd_shard_terms(const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs,
                                          const at::Tensor& ht, const at::Tensor& wt, const OptTensor& bt,
                                          const at::Tensor& glse, c10::ArrayRef<double> f,
                                          c10::IntArrayRef i) {
    return driver::linear_kd_shard_terms<Epi>(hs, ws, bs, ht, wt, bt, glse, params_from(f, i));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_shard_stats(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor& bs, const at::Tensor& ids,
      const at::Tensor& labels, c10::ArrayRef<double> f, c10::IntArrayRef i) {
    return driver::linear_sparse_kd_shard_stats<Epi>(hs, ws, bs, ids, labels, params_from(f, i));
  }
  static std::tuple<at::Tensor, at::Tensor> linear_sample(const at::Tensor& h, const at::Tensor& w,
                                                          const OptTensor& b, const at::Tensor& u,
                                                          c10::ArrayRef<double> f, c10::IntArrayRef i) {
    if constexpr (std::is_same<Epi, CpuEpi>::value) return linear_sample_cpu(h, w, b, u, params_from(f, i));
    else return driver::linear_sample<Epi>(h, w, b, u, params_from(f, i));
  }
};

// Shapes and dtypes only (symbolic sizes allowed).
struct MetaOps {
  static at::TensorOptions acc(const at::Tensor& t) { return t.options().dtype(driver::acc_dtype(t)); }
  static at::Tensor none(const at::Tensor& t) { return at::empty_symint({c10::SymInt(0)}, t.options()); }
  // stats width: AKL's (driver.h) when iopts[0] is the akl code
  static int64_t width(c10::IntArrayRef i, int64_t plain, int64_t akl) {
    return !i.empty() && i[0] == kAKL ? akl : plain;
  }

  static std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& zs, const at::Tensor& zt,
                                                       const at::Tensor&, c10::ArrayRef<double>,
                                                       c10::IntArrayRef i) {
    const auto o = acc(zt.scalar_type() == at::kDouble ? zt : zs);
    return {at::empty_symint({zs.sym_size(0)}, o),
            at::empty_symint({zs.sym_size(0), c10::SymInt(width(i, 4, 7))}, o)};
  }
  static at::Tensor kd_backward(const at::Tensor& zs, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>,
                                c10::IntArrayRef, const OptTensor&) {
    return at::empty_symint(zs.sym_sizes(), zs.options().memory_format(at::MemoryFormat::Contiguous));
  }
  static std::tuple<at::Tensor, at::Tensor> rows_stats(const at::Tensor& hs, int64_t width) {
    const auto o = acc(hs);
    return {at::empty_symint({hs.sym_size(0)}, o),
            at::empty_symint({hs.sym_size(0), c10::SymInt(width)}, o)};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> head_grads(const at::Tensor& hs,
                                                                   const at::Tensor& ws, Need need,
                                                                   c10::IntArrayRef i) {
    const bool partial = i.size() == 5 && i[4] != 0;  // dh in the accumulation dtype
    return {need[0] ? at::empty_symint(hs.sym_sizes(), partial ? acc(hs) : hs.options()) : none(hs),
            need[1] ? at::empty_symint(ws.sym_sizes(), ws.options()) : none(hs),
            need[2] ? at::empty_symint({ws.sym_size(0)}, ws.options()) : none(hs)};
  }
  static std::tuple<at::Tensor, at::Tensor> linear_kd_forward(
      const at::Tensor& hs, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const OptTensor&, const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef i) {
    return rows_stats(hs, width(i, 4, 7));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kd_backward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>,
      c10::IntArrayRef i, Need need, const OptTensor&) {
    return head_grads(hs, ws, need, i);
  }
  static std::tuple<at::Tensor, at::Tensor> linear_sparse_kd_forward(
      const at::Tensor& hs, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef i) {
    return rows_stats(hs, width(i, 5, 9));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_backward(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef i,
      Need need, const OptTensor&) {
    return head_grads(hs, ws, need, i);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused(const at::Tensor& hs,
                                                                         const at::Tensor& ws, Need need) {
    const auto o = acc(hs);   // the fused path's gradients are in the accumulation dtype
    return {at::empty_symint({hs.sym_size(0)}, o), need[0] ? at::empty_symint(hs.sym_sizes(), o) : none(hs),
            need[1] ? at::empty_symint(ws.sym_sizes(), o) : none(hs),
            need[2] ? at::empty_symint({ws.sym_size(0)}, o) : none(hs)};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kd_fused(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const OptTensor&, const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef,
      Need need) {
    return fused(hs, ws, need);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_fused(
      const at::Tensor& hs, const at::Tensor& ws, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef, Need need) {
    return fused(hs, ws, need);
  }
  // Shard protocol: lse (N, 3) and picked (N,) in the accumulation dtype; terms (N, 2); bK (N, k)
  static std::tuple<at::Tensor, at::Tensor> shard_lse(const at::Tensor& ref) {
    return {at::empty_symint({ref.sym_size(0), c10::SymInt(3)}, acc(ref)),
            at::empty_symint({ref.sym_size(0)}, acc(ref))};
  }
  static std::tuple<at::Tensor, at::Tensor> kd_shard_stats(const at::Tensor& zs, const at::Tensor& zt,
                                                           const at::Tensor&, c10::ArrayRef<double>,
                                                           c10::IntArrayRef) {
    return shard_lse(zt.scalar_type() == at::kDouble ? zt : zs);
  }
  static at::Tensor kd_shard_terms(const at::Tensor& zs, const at::Tensor& zt, const at::Tensor&,
                                   c10::ArrayRef<double>, c10::IntArrayRef) {
    return at::empty_symint({zs.sym_size(0), c10::SymInt(2)}, acc(zt.scalar_type() == at::kDouble ? zt : zs));
  }
  static std::tuple<at::Tensor, at::Tensor> linear_kd_shard_stats(
      const at::Tensor& hs, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
      const OptTensor&, const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef) {
    return shard_lse(hs);
  }
  static at::Tensor linear_kd_shard_terms(const at::Tensor& hs, const at::Tensor&, const OptTensor&,
                                          const at::Tensor&, const at::Tensor&, const OptTensor&,
                                          const at::Tensor&, c10::ArrayRef<double>, c10::IntArrayRef) {
    return at::empty_symint({hs.sym_size(0), c10::SymInt(2)}, acc(hs));
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sparse_kd_shard_stats(
      const at::Tensor& hs, const at::Tensor&, const OptTensor&, const at::Tensor& ids, const at::Tensor&,
      c10::ArrayRef<double>, c10::IntArrayRef) {
    auto lp = shard_lse(hs);
    return {std::get<0>(lp), std::get<1>(lp), at::empty_symint(ids.sym_sizes(), acc(hs))};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_topk(
      const at::Tensor& h, const at::Tensor&, const OptTensor&, int64_t k, c10::ArrayRef<double>,
      c10::IntArrayRef) {
    const auto o = h.options().dtype(at::kFloat);
    return {at::empty_symint({h.sym_size(0), c10::SymInt(k)}, o),
            at::empty_symint({h.sym_size(0), c10::SymInt(k)}, h.options().dtype(at::kLong)),
            at::empty_symint({h.sym_size(0)}, o)};
  }
  static std::tuple<at::Tensor, at::Tensor> linear_sample(const at::Tensor& h, const at::Tensor&,
                                                          const OptTensor&, const at::Tensor& u,
                                                          c10::ArrayRef<double>, c10::IntArrayRef) {
    return {at::empty_symint(u.sym_sizes(), h.options().dtype(at::kLong)),
            at::empty_symint({h.sym_size(0)}, h.options().dtype(at::kFloat))};
  }
};

}  // namespace kdkernels
