// CUDA epilogues (csrc/epilogue.h): one thread block per row of a (N, W) logits chunk, the same
// per-element math as the CPU build (include/kdkernels/), block reductions from block.cuh.
//
// Per chunk: the LSE and terms kernels read the chunk twice (max, then exp sums) and write O(1) per
// row; the gradient kernels read it once and write the (N, W) gradient chunk in the input dtype;
// sparse gather/finalize touch O(k) per row; top-k reads the chunk row once per selected entry.
// All launches go to the current stream; nothing synchronizes with the host.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../dispatch.h"
#include "../epilogue.h"
#include "block.cuh"
#include "kdkernels/topk.cuh"

namespace kdkernels {
namespace {

using cuda::kThreads;

template <class T>
__device__ __forceinline__ const T* row_of(const T* base, int64_t ld, int64_t r) {
  return base + r * ld;
}

// Running LSE of softcap(x) * scale over the row segment, merged into (m, s). Block-wide.
template <class T, class F>
__device__ void merge_row(F* m, F* s, const T* x, int64_t w, F cap, F scale, F* smem) {
  F mx = neg_inf<F>();
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F v = static_cast<F>(x[j]);
    mx = v > mx ? v : mx;
  }
  mx = cuda::block_max(mx, smem);
  if (!(mx > neg_inf<F>())) return;  // uniform across the block
  const F shift = softcap(mx, cap) * scale;
  F acc = F(0);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) acc += exp_(softcap(static_cast<F>(x[j]), cap) * scale - shift);
  acc = cuda::block_sum(acc, smem);
  if (threadIdx.x == 0) {
    Lse<F> l{*m, *s};
    l.merge(shift, acc);
    *m = l.m;
    *s = l.s;
  }
}

template <class T, class F>
__global__ void lse_update_kernel(const T* xs, int64_t lds, const T* xt, int64_t ldt, int64_t w,
                                  int64_t v0, const int64_t* labels, F* state, F inv_t, F cap_s,
                                  F cap_t, bool ce) {
  __shared__ F smem[32];
  const int64_t r = blockIdx.x;
  F* st = state + r * 8;
  const T* x = row_of(xs, lds, r);
  merge_row<T, F>(st + 0, st + 4, x, w, cap_s, inv_t, smem);
  if (ce) {
    merge_row<T, F>(st + 1, st + 5, x, w, cap_s, F(1), smem);
    const int64_t y = labels[r];
    if (threadIdx.x == 0 && y >= v0 && y < v0 + w) st[3] = softcap(static_cast<F>(x[y - v0]), cap_s);
  }
  if (xt != nullptr) merge_row<T, F>(st + 2, st + 6, row_of(xt, ldt, r), w, cap_t, inv_t, smem);
}

template <int DIV, class T, class F>
__global__ void dense_terms_kernel(const T* xs, int64_t lds, const T* xt, int64_t ldt, int64_t w,
                                   const F* stats, F* acc, F inv_t, F cap_s, F cap_t, Mix<F> mix) {
  __shared__ F smem[32];
  const int64_t r = blockIdx.x;
  const T* x = row_of(xs, lds, r);
  const T* t = row_of(xt, ldt, r);
  const F lse_b = stats[r * 4 + 0], lse_a = stats[r * 4 + 2];
  F d = F(0), s = F(0);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F lq = softcap(static_cast<F>(x[j]), cap_s) * inv_t - lse_b;
    const F lp = softcap(static_cast<F>(t[j]), cap_t) * inv_t - lse_a;
    const Terms<F> e = element_terms<DIV, F>(lp, lq, mix);
    d += e.f;
    s += e.qh;
  }
  d = cuda::block_sum(d, smem);
  s = cuda::block_sum(s, smem);
  if (threadIdx.x == 0) {
    acc[r * 2 + 0] += d;
    acc[r * 2 + 1] += s;
  }
}

// AKL: acc[r] += [fkl, rkl, tv, sum qh_fkl] over the row segment (akl_terms).
template <class T, class F>
__global__ void akl_terms_kernel(const T* xs, int64_t lds, const T* xt, int64_t ldt, int64_t w,
                                 const F* stats, F* acc, F inv_t, F cap_s, F cap_t) {
  __shared__ F smem[32];
  const int64_t r = blockIdx.x;
  const T* x = row_of(xs, lds, r);
  const T* t = row_of(xt, ldt, r);
  const F lse_b = stats[r * 4 + 0], lse_a = stats[r * 4 + 2];
  F s[4] = {F(0), F(0), F(0), F(0)};
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F lq = softcap(static_cast<F>(x[j]), cap_s) * inv_t - lse_b;
    const F lp = softcap(static_cast<F>(t[j]), cap_t) * inv_t - lse_a;
    const AklTerms<F> e = akl_terms<F>(lp, lq);
    s[0] += e.fkl;
    s[1] += e.rkl;
    s[2] += e.tv;
    s[3] += e.qh_fkl;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const F total = cuda::block_sum(s[c], smem);
    if (threadIdx.x == 0) acc[r * 4 + c] += total;
  }
}

template <int DIV, class T, class F>
__global__ void dense_grad_kernel(const T* xs, int64_t lds, const T* xt, int64_t ldt, int64_t w,
                                  int64_t v0, const int64_t* labels, const F* stats, int64_t ld_st,
                                  const F* grad_rows, T* g, int64_t ldg, F inv_t, F cap_s, F cap_t, F c_kd,
                                  F ce_w, bool kd, Mix<F> mix) {
  const int64_t r = blockIdx.x;
  T* out = g + r * ldg;
  const F scale = grad_rows[r];
  if (scale == F(0)) {
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) out[j] = static_cast<T>(F(0));
    return;
  }
  const T* x = row_of(xs, lds, r);
  const T* t = kd ? row_of(xt, ldt, r) : nullptr;
  const F* st = stats + r * ld_st;  // (N, 4), or (N, 6) with AKL's [w_h, w_t]
  const F lse_b = st[0], lse_1 = st[1], lse_a = st[2], S = st[3];
  if (DIV == kAKL) mix = Mix<F>::weights(st[4], st[5]);
  const int64_t y = labels[r] - v0;
  const F ce = labels[r] >= 0 ? ce_w : F(0);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F z = softcap(static_cast<F>(x[j]), cap_s);
    F v = F(0);
    if (kd) {
      const F lq = z * inv_t - lse_b;
      const F lp = softcap(static_cast<F>(t[j]), cap_t) * inv_t - lse_a;
      const Terms<F> e = element_terms<DIV, F>(lp, lq, mix);
      v = c_kd * (e.qh - exp_(lq) * S);
    }
    if (ce != F(0)) v += ce * (exp_(z - lse_1) - (j == y ? F(1) : F(0)));  // lse_1 only valid with CE
    out[j] = static_cast<T>(v * softcap_grad(z, cap_s) * scale);
  }
}

// Running LSE of softcap(x) * inv_t over the entries whose mask is 0. Block per row.
template <class T, class F>
__global__ void lse_out_kernel(const T* xs, int64_t lds, int64_t w, const uint8_t* mask, F* state, F inv_t,
                               F cap) {
  __shared__ F smem[32];
  const int64_t r = blockIdx.x;
  const T* x = row_of(xs, lds, r);
  const uint8_t* m = mask + r * w;
  F mx = neg_inf<F>();
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F v = m[j] ? neg_inf<F>() : static_cast<F>(x[j]);
    mx = v > mx ? v : mx;
  }
  mx = cuda::block_max(mx, smem);
  if (!(mx > neg_inf<F>())) return;
  const F shift = softcap(mx, cap) * inv_t;
  F acc = F(0);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x)
    if (!m[j]) acc += exp_(softcap(static_cast<F>(x[j]), cap) * inv_t - shift);
  acc = cuda::block_sum(acc, smem);
  if (threadIdx.x == 0) {
    Lse<F> l{state[r * 2], state[r * 2 + 1]};
    l.merge(shift, acc);
    state[r * 2] = l.m;
    state[r * 2 + 1] = l.s;
  }
}

template <class T, class F>
__global__ void sparse_gather_kernel(const T* xs, int64_t lds, int64_t n, int64_t w, int64_t v0,
                                     const int64_t* ids, int64_t k, F* zK, F cap) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * k) return;
  const int64_t c = ids[e] - v0;
  if (c >= 0 && c < w) zK[e] = softcap(static_cast<F>(row_of(xs, lds, e / k)[c]), cap);
}

template <int DIV, class F, class VT>
__global__ void sparse_finalize_kernel(int64_t n, int64_t k, const int64_t* ids, const VT* vals,
                                       const F* zK, const F* lse_b, const F* lse_out, F* out,
                                       int64_t vocab, F inv_t, int tail, bool weights, Mix<F> mix) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const SparseRow<F> s = sparse_row<DIV, F, VT>(k, ids + r * k, vals + r * k, zK + r * k, inv_t,
                                                lse_b[r], lse_out[r], vocab, tail, weights, mix);
  F* o = out + r * 5;
  o[0] = s.D; o[1] = s.S; o[2] = s.hQ; o[3] = s.lse; o[4] = s.lnorm;
}

template <class F, class VT>
__global__ void sparse_finalize_akl_kernel(int64_t n, int64_t k, const int64_t* ids, const VT* vals,
                                           const F* zK, const F* lse_b, const F* lse_out, F* out,
                                           int64_t vocab, F inv_t, int tail, bool weights) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const SparseAklRow<F> s = sparse_row_akl<F, VT>(k, ids + r * k, vals + r * k, zK + r * k, inv_t, lse_b[r],
                                                  lse_out[r], vocab, tail, weights);
  F* o = out + r * 8;
  o[0] = s.fkl; o[1] = s.rkl; o[2] = s.tv; o[3] = s.S_fkl;
  o[4] = s.hQ_fkl; o[5] = s.hQ_rkl; o[6] = s.lse; o[7] = s.lnorm;
}

template <int DIV, class T, class F, class VT>
__global__ void sparse_grad_kernel(const T* xs, int64_t lds, int64_t w, int64_t v0, const int64_t* ids,
                                   const VT* vals, int64_t k, const int64_t* labels, const F* stats,
                                   int64_t ld_st, const F* grad_rows, T* g, int64_t ldg, F inv_t, F cap,
                                   F c_kd, F ce_w, bool kd, int tail, bool weights, Mix<F> mix) {
  const int64_t r = blockIdx.x;
  T* out = g + r * ldg;
  const F scale = grad_rows[r];
  if (scale == F(0)) {
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) out[j] = static_cast<T>(F(0));
    return;
  }
  const T* x = row_of(xs, lds, r);
  const F* st = stats + r * ld_st;  // (N, 5), or (N, 7) with AKL's [w_h, w_t]
  const F lse = st[0], lse_1 = st[1], hQ = st[2], S = st[3], lnorm = st[4];
  if (DIV == kAKL) mix = Mix<F>::weights(st[5], st[6]);
  const bool dense_tail = kd && tail != kRenormBoth;
  const F dense = dense_tail ? c_kd * (hQ - S) : F(0);
  const int64_t y = labels[r] - v0;
  const F ce = labels[r] >= 0 ? ce_w : F(0);
  for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
    const F z = softcap(static_cast<F>(x[j]), cap);
    const F q = dense_tail ? exp_(z * inv_t - lse) : F(0);
    F val = dense * q;
    if (ce != F(0)) val += ce * (exp_(z - lse_1) - (j == y ? F(1) : F(0)));
    out[j] = static_cast<T>(val * softcap_grad(z, cap) * scale);
  }
  if (!kd) return;
  __syncthreads();  // the values above are rewritten at the k ids with qh - q S
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t id = ids[r * k + i], j = id - v0;
    if (id < 0 || j < 0 || j >= w) continue;
    const F z = softcap(static_cast<F>(x[j]), cap);
    F val = c_kd * sparse_grad_at_id<DIV, F, VT>(z * inv_t, vals[r * k + i], lse, lnorm, S, weights, mix);
    if (ce != F(0)) val += ce * (exp_(z - lse_1) - (j == y ? F(1) : F(0)));
    out[j] = static_cast<T>(val * softcap_grad(z, cap) * scale);
  }
}

// Block-wide best (value, id) under ranks_before; every thread gets the result.
template <class F>
__device__ void block_best(F& v, int64_t& id, F* sv, int64_t* si) {
  for (int o = 16; o > 0; o >>= 1) {
    const F v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, id, o);
    if (ranks_before(v2, i2, v, id)) { v = v2; id = i2; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) { sv[warp] = v; si[warp] = id; }
  __syncthreads();
  v = lane < n_warps ? sv[lane] : neg_inf<F>();
  id = lane < n_warps ? si[lane] : kNoId;
  for (int o = 16; o > 0; o >>= 1) {
    const F v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, id, o);
    if (ranks_before(v2, i2, v, id)) { v = v2; id = i2; }
  }
}

// Selection in rounds: each round takes the best chunk entry that ranks after the previous pick and
// before the current k-th entry, and inserts it (<= k rounds; usually few after the first chunk).
template <class T, class F>
__global__ void topk_update_kernel(const T* x, int64_t ld, int64_t w, int64_t v0, F* state, F* tv,
                                   int64_t* ti, int64_t k, F inv_t, F cap) {
  __shared__ F smem[32];
  __shared__ int64_t sidx[32];
  extern __shared__ __align__(8) unsigned char dyn[];
  int64_t* ri = reinterpret_cast<int64_t*>(dyn);  // ids first: 8-byte aligned
  F* rv = reinterpret_cast<F*>(ri + k);
  const int64_t r = blockIdx.x;
  const T* xr = row_of(x, ld, r);
  merge_row<T, F>(state + r * 2, state + r * 2 + 1, xr, w, cap, inv_t, smem);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) { rv[i] = tv[r * k + i]; ri[i] = ti[r * k + i]; }
  __syncthreads();
  F last_v = std::numeric_limits<F>::infinity();
  int64_t last_i = -1;
  for (int64_t round = 0; round < k; ++round) {
    const F kth_v = rv[k - 1];
    const int64_t kth_i = ri[k - 1];
    F bv = neg_inf<F>();
    int64_t bi = kNoId;
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
      const F v = softcap(static_cast<F>(xr[j]), cap) * inv_t;
      const int64_t id = v0 + j;
      if (v == v && ranks_before(last_v, last_i, v, id) && ranks_before(v, id, kth_v, kth_i) &&
          ranks_before(v, id, bv, bi)) {
        bv = v;
        bi = id;
      }
    }
    block_best(bv, bi, smem, sidx);
    if (bi == kNoId) break;  // uniform: every thread saw the same reduction
    if (threadIdx.x == 0) topk_insert<F>(rv, ri, k, bv, bi);
    last_v = bv;
    last_i = bi;
    __syncthreads();
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) { tv[r * k + i] = rv[i]; ti[r * k + i] = ri[i]; }
}

template <class T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

int64_t ld_of(const Tensor& t) { return t.defined() ? t.stride(0) : 0; }

dim3 rows_grid(int64_t n) { return dim3(static_cast<unsigned>(n)); }

}  // namespace

void CudaEpi::lse_update(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,
                         const Tensor& state, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_lse_update_cuda", [&] {
    using F = acc_t<scalar_t>;
    lse_update_kernel<scalar_t, F><<<rows_grid(n), kThreads, 0, stream>>>(
        xs.data_ptr<scalar_t>(), xs.stride(0), ptr_or_null<scalar_t>(xt), ld_of(xt), w, v0,
        labels.data_ptr<int64_t>(), state.data_ptr<F>(), F(1.0 / p.temperature), F(p.cap_s), F(p.cap_t),
        p.ce_weight != 0.0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaEpi::dense_terms(const Tensor& xs, const Tensor& xt, const Tensor& stats, const Tensor& acc,
                          const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_dense_terms_cuda", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    if (p.divergence == kAKL) {
      akl_terms_kernel<T, F><<<rows_grid(n), kThreads, 0, stream>>>(
          xs.data_ptr<T>(), xs.stride(0), xt.data_ptr<T>(), xt.stride(0), w, stats.data_ptr<F>(),
          acc.data_ptr<F>(), F(1.0 / p.temperature), F(p.cap_s), F(p.cap_t));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    with_divergence(p.divergence, [&](auto tag) {
      constexpr int DIV = decltype(tag)::value;
      dense_terms_kernel<DIV, T, F><<<rows_grid(n), kThreads, 0, stream>>>(
          xs.data_ptr<T>(), xs.stride(0), xt.data_ptr<T>(), xt.stride(0), w, stats.data_ptr<F>(),
          acc.data_ptr<F>(), F(1.0 / p.temperature), F(p.cap_s), F(p.cap_t), Mix<F>::make(p.mix));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaEpi::dense_grad(const Tensor& xs, const Tensor& xt, int64_t v0, const Tensor& labels,
                         const Tensor& stats, const Tensor& grad_rows, const Tensor& g, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool kd = p.kd_scale != 0.0;
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_dense_grad_cuda", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    with_divergence(p.divergence, [&](auto tag) {
      constexpr int DIV = decltype(tag)::value;
      dense_grad_kernel<DIV, T, F><<<rows_grid(n), kThreads, 0, stream>>>(
          xs.data_ptr<T>(), xs.stride(0), kd ? xt.data_ptr<T>() : nullptr, kd ? xt.stride(0) : 0, w, v0,
          labels.data_ptr<int64_t>(), stats.data_ptr<F>(), stats.size(1), grad_rows.data_ptr<F>(),
          g.data_ptr<T>(), g.stride(0), F(1.0 / p.temperature), F(p.cap_s), F(p.cap_t), F(p.kd_scale / p.temperature),
          F(p.ce_weight), kd, Mix<F>::make(p.mix));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaEpi::lse_out_update(const Tensor& xs, const Tensor& mask, const Tensor& state, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_lse_out_update_cuda", [&] {
    using F = acc_t<scalar_t>;
    lse_out_kernel<scalar_t, F><<<rows_grid(n), kThreads, 0, stream>>>(
        xs.data_ptr<scalar_t>(), xs.stride(0), w, mask.data_ptr<uint8_t>(), state.data_ptr<F>(),
        F(1.0 / p.temperature), F(p.cap_s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaEpi::sparse_gather(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& zK,
                            const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1), k = ids.size(1);
  if (n * k == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n * k + kThreads - 1) / kThreads;
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_sparse_gather_cuda", [&] {
    using F = acc_t<scalar_t>;
    sparse_gather_kernel<scalar_t, F><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xs.data_ptr<scalar_t>(), xs.stride(0), n, w, v0, ids.data_ptr<int64_t>(), k, zK.data_ptr<F>(),
        F(p.cap_s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaEpi::sparse_finalize(const Tensor& ids, const Tensor& vals, const Tensor& zK,
                              const Tensor& lse_b, const Tensor& lse_out, const Tensor& out, int64_t vocab,
                              const Params& p) {
  const int64_t n = ids.size(0), k = ids.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(ids.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((n + 127) / 128);
  const bool f64 = zK.scalar_type() == at::kDouble;
  KD_DISPATCH_FLOAT(vals.scalar_type(), "kd_sparse_finalize_cuda", [&] {
    using VT = scalar_t;
    auto run = [&](auto f_tag) {
      using F = decltype(f_tag);
      if (p.divergence == kAKL) {
        sparse_finalize_akl_kernel<F, VT><<<blocks, 128, 0, stream>>>(
            n, k, ids.data_ptr<int64_t>(), vals.data_ptr<VT>(), zK.data_ptr<F>(), lse_b.data_ptr<F>(),
            lse_out.data_ptr<F>(), out.data_ptr<F>(), vocab, F(1.0 / p.temperature), static_cast<int>(p.tail),
            p.weights);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      with_divergence(p.divergence, [&](auto tag) {
        constexpr int DIV = decltype(tag)::value;
        sparse_finalize_kernel<DIV, F, VT><<<blocks, 128, 0, stream>>>(
            n, k, ids.data_ptr<int64_t>(), vals.data_ptr<VT>(), zK.data_ptr<F>(), lse_b.data_ptr<F>(),
            lse_out.data_ptr<F>(), out.data_ptr<F>(), vocab, F(1.0 / p.temperature), static_cast<int>(p.tail), p.weights,
            Mix<F>::make(p.mix));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (f64) run(double{}); else run(float{});
  });
}

void CudaEpi::sparse_grad(const Tensor& xs, int64_t v0, const Tensor& ids, const Tensor& vals,
                          const Tensor& labels, const Tensor& stats, const Tensor& grad_rows,
                          const Tensor& g, const Params& p) {
  const int64_t n = xs.size(0), w = xs.size(1), k = ids.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xs.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_FLOAT(xs.scalar_type(), "kd_sparse_grad_cuda", [&] {
    using T = scalar_t;
    using F = acc_t<T>;
    // teacher values: float32 or the logits dtype (others are converted by the caller)
    const Tensor v = vals.scalar_type() == xs.scalar_type() ? vals : vals.to(at::kFloat);
    auto run = [&](auto v_tag) {
      using VT = decltype(v_tag);
      with_divergence(p.divergence, [&](auto tag) {
        constexpr int DIV = decltype(tag)::value;
        sparse_grad_kernel<DIV, T, F, VT><<<rows_grid(n), kThreads, 0, stream>>>(
            xs.data_ptr<T>(), xs.stride(0), w, v0, ids.data_ptr<int64_t>(), v.data_ptr<VT>(), k,
            labels.data_ptr<int64_t>(), stats.data_ptr<F>(), stats.size(1), grad_rows.data_ptr<F>(),
            g.data_ptr<T>(), g.stride(0), F(1.0 / p.temperature), F(p.cap_s), F(p.kd_scale / p.temperature),
            F(p.ce_weight), p.kd_scale != 0.0, static_cast<int>(p.tail), p.weights, Mix<F>::make(p.mix));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (v.scalar_type() == xs.scalar_type()) run(T{}); else run(float{});
  });
}

void CudaEpi::topk_update(const Tensor& x, int64_t v0, const Tensor& state, const Tensor& tv,
                          const Tensor& ti, const Params& p) {
  const int64_t n = x.size(0), w = x.size(1), k = tv.size(1);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  KD_DISPATCH_FLOAT(x.scalar_type(), "kd_topk_update_cuda", [&] {
    using F = acc_t<scalar_t>;
    const size_t smem = static_cast<size_t>(k) * (sizeof(F) + sizeof(int64_t));
    TORCH_CHECK(smem <= 48 * 1024, "kdkernels_native::linear_topk: k=", k, " is too large for the CUDA "
                "kernel (at most ", 48 * 1024 / (sizeof(F) + sizeof(int64_t)), ")");
    topk_update_kernel<scalar_t, F><<<rows_grid(n), kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), w, v0, state.data_ptr<F>(), tv.data_ptr<F>(),
        ti.data_ptr<int64_t>(), k, F(1.0 / p.temperature), F(p.cap_s));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace kdkernels
