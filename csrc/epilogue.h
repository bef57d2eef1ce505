// The per-chunk epilogues, one interface per device (CpuEpi in cpu/, CudaEpi in cuda/).
//
// A chunk is a (N, W) block of logits (all N rows, vocabulary columns [v0, v0 + W)), in the input
// dtype, unit column stride, any row stride: the whole input for kd_loss, a GEMM output for the
// fused linear ops. Student logits are softcapped inside the epilogue (z = softcap(x)), b = z / T.
// Every epilogue reads its chunk once (twice from cache for the max and the exp sums) and touches
// O(1) (O(k) for sparse/top-k) per-row state; nothing of size N x V is ever allocated.
//
// Per-row state layouts (accumulation dtype: float64 for float64 inputs, float32 otherwise):
//   lse state (N, 8): [m_b, m_1, m_a, z_label, s_b, s_1, s_a, 0]  running LSE of b, of z (CE, T=1),
//                     of a = z_t / T (teacher), and the student's logit at the CE label
//   dense stats (N, 4): [LSE(b), LSE(z), LSE(a), S]
//   sparse stats (N, 5): [lse (LSE_K(b) for renorm_both), LSE(z), hQ, S, lnorm]
// Divergence akl (docs/backends.md): the forward epilogues produce AKL's statistics instead (below);
// the gradient epilogues read the stats above with the row's weights appended, (N, 6) dense /
// (N, 7) sparse: [..., w_h, w_t], S and hQ already combined as w_h (.)_fkl + w_t (.)_rkl.
#pragma once

#include <ATen/ATen.h>

#include "kdkernels/divergence.cuh"
#include "kdkernels/sparse_row.cuh"

namespace kdkernels {

using at::Tensor;

// Validated options (kdkernels.options.KDOptions) as plain numbers.
struct Params {
  int64_t divergence = kForwardKL;
  double temperature = 1.0;
  double mix = 0.5;          // beta (jsd) or alpha (skews)
  double kd_scale = 1.0;     // kd_weight * T^2 (or kd_weight)
  double ce_weight = 0.0;
  double cap_s = 0.0;        // student softcap, 0 = none
  double cap_t = 0.0;        // teacher softcap, 0 = none
  int64_t tail = kBucket;
  bool weights = false;      // values="weights"
  int64_t chunk_bytes = 256ll << 20;
  bool dh_partial = false;   // linear backward ops: dh as the uncast accumulation-dtype sum (shards)
};

#define KD_EPILOGUES                                                                                 \
  /* state (lse layout) += the chunk's LSE of b, z (if CE) and a (if xt is defined); z at labels */  \
  static void lse_update(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,      \
                         const Tensor& state, const Params& p);                                     \
  /* acc (N, 2) += [sum f, sum qh] over the chunk, from dense stats;                                  \
     akl: acc (N, 4) += [fkl, rkl, tv, sum qh_fkl] */                                                \
  static void dense_terms(const Tensor& xs, const Tensor& xt, const Tensor& stats,                  \
                          const Tensor& acc, const Params& p);                                      \
  /* g (N, W) = grad_rows * d(loss)/d(x) of the chunk (dense teacher) */                             \
  static void dense_grad(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,      \
                         const Tensor& stats, const Tensor& grad_rows, const Tensor& g,             \
                         const Params& p);                                                          \
  /* state (N, 2) += running [m, s] of b over the chunk entries whose mask (N, W) uint8 is 0 */     \
  static void lse_out_update(const Tensor& xs, const Tensor& mask, const Tensor& state,             \
                             const Params& p);                                                      \
  /* zK (N, k) = softcap(x) at the ids that fall in the chunk */                                     \
  static void sparse_gather(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& zK,      \
                            const Params& p);                                                       \
  /* out (N, 5) = [D, S, hQ, lse, lnorm] per row;                                                   \
     akl: out (N, 8) = [fkl, rkl, tv, S_fkl, hQ_fkl, hQ_rkl, lse, lnorm] */                          \
  static void sparse_finalize(const Tensor& ids, const Tensor& vals, const Tensor& zK,              \
                              const Tensor& lse_b, const Tensor& lse_out, const Tensor& out,        \
                              int64_t vocab, const Params& p);                                      \
  /* g (N, W) = grad_rows * d(loss)/d(x) of the chunk (sparse teacher) */                            \
  static void sparse_grad(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& vals,      \
                          const Tensor& labels, const Tensor& stats, const Tensor& grad_rows,       \
                          const Tensor& g, const Params& p);                                        \
  /* state (N, 2) = running [m, s] of z / T; (tv, ti) (N, k) = running top-k of z / T */            \
  static void topk_update(const Tensor& x, int64_t v0, const Tensor& state, const Tensor& tv,       \
                          const Tensor& ti, const Params& p);

struct CpuEpi {
  KD_EPILOGUES
};

struct CudaEpi {
  KD_EPILOGUES
};

}  // namespace kdkernels
