// linear_sample on the CPU: an inverse-CDF sampler streamed over each row right after its LM-head GEMM.
//
// For row i, z_j = softcap(h_i . w_j + b_j) / T, and sorted uniforms u_1 <= ... <= u_D (float64):
//   pass 1   m = max_j z_j
//   pass 2   e_j = exp(z_j - m)  (float32 for 16/32-bit inputs; e_j = p_j Z)
//            E_b = sum of e_j over column block b (kBlock columns),  C_b = C_(b-1) + E_b in float64
//            Z = C_(nb-1) = CDF(V-1),  LSE = m + log Z
//   pass 3   t_r = u_r Z, ascending: one walk over the blocks; the draws with C_(b-1) <= t_r < C_b fall
//            in block b, where a float64 running sum from C_(b-1) over its e_j advances to the first j
//            with sum > t_r (the smallest j with CDF(j) > u_r CDF(V-1), docs/semantics.md). Should
//            rounding leave t_r past the block's running sum, the draw is the block's last token of
//            positive probability, so a token of probability 0 is never drawn.
//   Work per row: O(V) for passes 1-2, O(V / kBlock + D * kBlock) for pass 3. Draws may differ from a
//   float64 reference only where t_r lies within float32 rounding of the e_j (~1e-7 relative) of a
//   CDF step; the torch backend (kdkernels/backends/torch/topk.py) uses the same two-level scheme.
//
// Memory: reads N*H + V*H (+ V bias) + N*D; writes N*D int64 + N floats. The logits of R rows at a
// time live in one (R, V) buffer in the inputs' dtype (R from chunk_bytes, at most kMaxRows), reused
// for every block of rows; each thread keeps V floats of e_j and V / kBlock doubles of C_b.
// Rows run in parallel (OpenMP); the GEMM is ATen's (MKL / OpenBLAS), rounded like naive PyTorch
// (GEMM in the inputs' dtype, then the bias add).
#include <omp.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../dispatch.h"
#include "../driver.h"
#include "../ops.h"

namespace kdkernels {
namespace {

constexpr int64_t kBlock = 64;     // columns per partial sum E_b
constexpr int64_t kMaxRows = 512;  // rows per GEMM (a larger output buffer only adds page faults)

template <bool CAP, class F>
inline F logit_(F x, F cap, F temp) {
  if constexpr (CAP) return softcap(x, cap) / temp;
  else return x / temp;
}

template <bool CAP, class T, class F>
void sample_row(const T* x, int64_t v, F cap, F temp, const double* u, int64_t d, F* e, double* c,
                int64_t* out, float* lse) {
  F m = neg_inf<F>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) {
    const F z = logit_<CAP>(static_cast<F>(x[j]), cap, temp);
    m = z > m ? z : m;
  }
  if (m == neg_inf<F>()) m = F(0);  // every logit -inf: all e_j = 0, Z = 0, LSE = -inf

  const int64_t nb = (v + kBlock - 1) / kBlock;
  double run = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j1 = std::min(v, (b + 1) * kBlock);
    F s = F(0);
#pragma omp simd reduction(+ : s)
    for (int64_t j = b * kBlock; j < j1; ++j) {
      const F ej = exp_(logit_<CAP>(static_cast<F>(x[j]), cap, temp) - m);
      e[j] = ej;
      s += ej;
    }
    run += static_cast<double>(s);
    c[b] = run;
  }
  const double total = run;
  *lse = static_cast<float>(static_cast<double>(m) + std::log(total));

  int64_t r = 0;
  for (int64_t b = 0; b < nb && r < d; ++b) {
    if (!(u[r] * total < c[b])) continue;  // no draw in this block
    int64_t j = b * kBlock;
    const int64_t end = std::min(v, j + kBlock);
    double acc = b > 0 ? c[b - 1] : 0.0;
    int64_t last = -1;  // last token of positive probability passed in this block
    for (; r < d; ++r) {
      const double t = u[r] * total;
      if (!(t < c[b])) break;
      while (j < end && !(acc + static_cast<double>(e[j]) > t)) {
        if (e[j] > F(0)) last = j;
        acc += static_cast<double>(e[j]);
        ++j;
      }
      out[r] = j < end ? j : (last >= 0 ? last : end - 1);
    }
  }
  if (r < d) {  // t_r >= Z: only for u >= 1, NaN or all -inf logits; as a rounding miss in the last block
    int64_t last = v - 1;
    while (last > (nb - 1) * kBlock && !(e[last] > F(0))) --last;
    if (!(e[last] > F(0))) last = v - 1;
    for (; r < d; ++r) out[r] = last;
  }
}

template <class T>
void sample_block(const at::Tensor& z, const at::Tensor& u, int64_t r0, const Params& p,
                  const at::Tensor& out, const at::Tensor& lse) {
  using F = acc_t<T>;
  const int64_t rows = z.size(0), v = z.size(1), d = u.size(1);
  const int64_t nb = (v + kBlock - 1) / kBlock;
  const F cap = F(p.cap_s), temp = F(p.temperature);
  const T* zp = z.data_ptr<T>();
  const double* up = u.data_ptr<double>() + r0 * d;
  int64_t* op = out.data_ptr<int64_t>() + r0 * d;
  float* lp = lse.data_ptr<float>() + r0;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<F> e(static_cast<size_t>(v));
    std::vector<double> c(static_cast<size_t>(nb));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = zp + r * v;
      if (cap > F(0))
        sample_row<true, T, F>(x, v, cap, temp, up + r * d, d, e.data(), c.data(), op + r * d, lp + r);
      else
        sample_row<false, T, F>(x, v, cap, temp, up + r * d, d, e.data(), c.data(), op + r * d, lp + r);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_sample_cpu(const at::Tensor& h, const at::Tensor& w,
                                                     const OptTensor& b, const at::Tensor& u_in,
                                                     const Params& p) {
  const char* op = "kdkernels_native::linear_sample";
  driver::check_head(op, "hidden", h, "weight", w, "bias", b);
  const int64_t n = h.size(0), v = w.size(0);
  TORCH_CHECK(u_in.dim() == 2 && u_in.size(0) == n, op, ": uniforms must be (", n, ", draws), got ",
              u_in.sizes());
  driver::check_rows(op, "uniforms", u_in, n, h);
  TORCH_CHECK(v >= 1, op, ": weight must have at least one row");
  const at::Tensor u = u_in.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(u.sizes(), h.options().dtype(at::kLong));
  at::Tensor lse = at::empty({n}, h.options().dtype(at::kFloat));
  if (n == 0) return {out, lse};
  const int64_t fit = p.chunk_bytes / std::max<int64_t>(1, v * h.element_size());
  const int64_t rows = std::max<int64_t>(1, std::min({fit, kMaxRows, n}));
  at::Tensor buf = at::empty({rows, v}, h.options());
  const at::Tensor wt = w.t();
  const bool bias = b.has_value() && b->defined();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t cnt = std::min(rows, n - r0);
    at::Tensor z = buf.narrow(0, 0, cnt);
    at::mm_out(z, h.narrow(0, r0, cnt), wt);
    if (bias) z.add_(*b);
    KD_DISPATCH_FLOAT(z.scalar_type(), "kd_linear_sample_cpu",
                      [&] { sample_block<scalar_t>(z, u, r0, p, out, lse); });
  }
  return {out, lse};
}

}  // namespace kdkernels
