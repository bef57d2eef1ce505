// Vocabulary-shard passes of the vocab-parallel losses (the shard protocol of
// kdkernels/distributed/shard_torch.py, docs/scaling.md): the local half of `process_group=`.
//
// A rank holds the columns [v0, v1) of the global vocabulary (a logits shard, or rows of the LM
// heads). With b = z_s / T, a = z_t / T over the GLOBAL vocabulary every quantity is a log-sum-exp or
// a plain sum over columns, so each splits over shards; these passes compute one shard's part and
// kdkernels/distributed/vocab_parallel.py combines them with O(N) all-reduces:
//
//   dense stats   lse (N, 3) = [LSE_shard(b), LSE_shard(z_s), LSE_shard(a)],  picked (N,) = z_s[y] where
//                 the label y is local (>= 0), else 0        (the lse epilogue over the chunks)
//   dense terms   (N, 2) = [sum f, sum qh] over the shard, given the GLOBAL LSEs glse (N, 3)
//                                                          (the dense-terms epilogue over the chunks)
//   sparse stats  lse (N, 3) = [LSE_shard(b), LSE_shard(z_s), LSE over the local ids of b], picked,
//                 bK (N, k) = b at the local ids (-inf at other slots; ids are local, -1 elsewhere)
// The backward passes are the single-process backward ops with the global stats (ops.h: iopts[4] =
// 1 returns dh as the accumulation-dtype partial sum g_shard @ W_shard, which the caller all-reduces).
//
// Labels: local column (>= 0), -1 no CE term, -2 CE target in another shard. The lse epilogue only
// reads a label that falls in its chunk, so -2 needs nothing here (the backward maps it to a column
// past the shard on the Python side: softmax part of the CE gradient, no one-hot).
// Columns of lse that the options do not need are 0 (LSE(z_s) without CE, LSE(a) with kd_weight 0).
// Memory: the chunk buffers of the single-process ops, O(N) (O(N k) sparse) row state; reads
// N*H + v*H per GEMM pass, writes O(N) (O(N k)).
#pragma once

#include "driver.h"

namespace kdkernels {
namespace driver {

inline void check_shard_params(const char* op, const Params& p) {
  TORCH_CHECK(!is_akl(p), op, ": divergence akl has no vocab-parallel form");
}

// [LSE(b), LSE(z) or 0, LSE(a) or 0] and picked from the lse state (N, 8).
inline Tensors2 shard_lse_out(const Tensor& st, const Tensor& lab, bool ce, bool teacher) {
  const int64_t n = st.size(0);
  const Tensor zero = at::zeros({n}, st.options());
  Tensor lse = at::stack({lse_col(st, 0), ce ? lse_col(st, 1) : zero, teacher ? lse_col(st, 2) : zero}, 1);
  Tensor picked = ce ? at::where(lab >= 0, st.select(1, 3), zero) : zero;
  return {lse, picked};
}

// Dense stats layout (N, 4) [LSE(b), -, LSE(a), -] that the dense-terms epilogue reads, from glse.
inline Tensor terms_state(const Tensor& glse, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(glse.dim() == 2 && glse.size(0) == n && glse.size(1) == 3,
              "kdkernels_native shard terms: glse must be (", n, ", 3), got ", glse.sizes());
  return at::cat({glse.to(acc), at::zeros({n, 1}, glse.options().dtype(acc))}, 1).contiguous();
}

template <class Epi>
Tensors2 kd_shard_stats(const Tensor& zs_in, const Tensor& zt_in, const Tensor& labels, const Params& p) {
  const char* op = "kdkernels_native::kd_shard_stats";
  check_shard_params(op, p);
  check_logit_pair(op, zs_in, zt_in);
  const int64_t n = zs_in.size(0);
  check_labels(op, labels, n, zs_in);
  Tensor zs = unit_cols(zs_in), zt = unit_cols(zt_in);
  match_dtypes(zs, zt);
  const bool kd = p.kd_scale != 0.0, ce = p.ce_weight != 0.0;
  Tensor st = lse_state(n, zs.options().dtype(acc_dtype(zs)));
  const Tensor lab = labels.contiguous();
  Epi::lse_update(zs, kd ? zt : Tensor(), 0, lab, st, p);
  return shard_lse_out(st, lab, ce, kd);
}

template <class Epi>
Tensor kd_shard_terms(const Tensor& zs_in, const Tensor& zt_in, const Tensor& glse, const Params& p) {
  const char* op = "kdkernels_native::kd_shard_terms";
  check_shard_params(op, p);
  check_logit_pair(op, zs_in, zt_in);
  const int64_t n = zs_in.size(0);
  check_rows(op, "glse", glse, n, zs_in);
  Tensor zs = unit_cols(zs_in), zt = unit_cols(zt_in);
  match_dtypes(zs, zt);
  const auto acc = acc_dtype(zs);
  Tensor out = at::zeros({n, 2}, zs.options().dtype(acc));
  if (p.kd_scale == 0.0) return out;
  Epi::dense_terms(zs, zt, terms_state(glse, n, acc), out, p);
  return out;
}

template <class Epi>
Tensors2 linear_kd_shard_stats(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                               const Tensor& ht, const Tensor& wt, const c10::optional<Tensor>& bt,
                               const Tensor& labels, const Params& p) {
  const char* op = "kdkernels_native::linear_kd_shard_stats";
  check_shard_params(op, p);
  check_head_pair(op, hs, ws, bs, ht, wt, bt);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_labels(op, labels, n, hs);
  const bool kd = p.kd_scale != 0.0, ce = p.ce_weight != 0.0;
  const Tensor lab = labels.contiguous();
  Tensor st = lse_state(n, hs.options().dtype(acc_dtype(hs)));
  const int64_t cols = chunk_cols(n, v, hs.element_size() + (kd ? ht.element_size() : 0), p.chunk_bytes);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor zs = head_logits(hs, ws, bs, v0, w);
    Tensor zt = kd ? head_logits(ht, wt, bt, v0, w) : Tensor();
    match_dtypes(zs, zt);
    Epi::lse_update(zs, zt, v0, lab, st, p);
  }
  return shard_lse_out(st, lab, ce, kd);
}

template <class Epi>
Tensor linear_kd_shard_terms(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                             const Tensor& ht, const Tensor& wt, const c10::optional<Tensor>& bt,
                             const Tensor& glse, const Params& p) {
  const char* op = "kdkernels_native::linear_kd_shard_terms";
  check_shard_params(op, p);
  check_head_pair(op, hs, ws, bs, ht, wt, bt);
  const int64_t n = hs.size(0), v = ws.size(0);
  check_rows(op, "glse", glse, n, hs);
  const auto acc = acc_dtype(hs);
  Tensor out = at::zeros({n, 2}, hs.options().dtype(acc));
  if (p.kd_scale == 0.0) return out;
  const Tensor state = terms_state(glse, n, acc);
  const int64_t cols = chunk_cols(n, v, hs.element_size() + ht.element_size(), p.chunk_bytes);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor zs = head_logits(hs, ws, bs, v0, w);
    Tensor zt = head_logits(ht, wt, bt, v0, w);
    match_dtypes(zs, zt);
    Epi::dense_terms(zs, zt, state, out, p);
  }
  return out;
}

template <class Epi>
Tensors3 linear_sparse_kd_shard_stats(const Tensor& hs, const Tensor& ws, const c10::optional<Tensor>& bs,
                                      const Tensor& ids_in, const Tensor& labels, const Params& p) {
  const char* op = "kdkernels_native::linear_sparse_kd_shard_stats";
  check_shard_params(op, p);
  check_head(op, "student_hidden", hs, "student_weight", ws, "student_bias", bs);
  const int64_t n = hs.size(0), v = ws.size(0);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.scalar_type() == at::kLong, op,
              ": ids must be a 2-D int64 tensor, got ", ids_in.sizes(), " ", ids_in.scalar_type());
  check_rows(op, "ids", ids_in, n, hs);
  check_labels(op, labels, n, hs);
  const bool ce = p.ce_weight != 0.0;
  const auto o = hs.options().dtype(acc_dtype(hs));
  const Tensor ids = ids_in.contiguous(), lab = labels.contiguous();
  Tensor st = lse_state(n, o);
  Tensor zK = at::full({n, ids.size(1)}, -std::numeric_limits<double>::infinity(), o);
  const int64_t cols = chunk_cols(n, v, hs.element_size(), p.chunk_bytes);
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t w = std::min(cols, v - v0);
    Tensor z = head_logits(hs, ws, bs, v0, w);
    Epi::lse_update(z, Tensor(), v0, lab, st, p);
    Epi::sparse_gather(z, v0, ids, zK, p);  // writes only the slots whose id falls in the chunk
  }
  Tensor bK = zK / p.temperature;
  Tensor lse, picked;
  std::tie(lse, picked) = shard_lse_out(st, lab, ce, false);
  lse.select(1, 2).copy_(at::logsumexp(bK, {1}));
  return {lse, picked, bK};
}

}  // namespace driver
}  // namespace kdkernels
