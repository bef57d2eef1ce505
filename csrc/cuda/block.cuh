// Block-wide reductions for the CUDA epilogues (one block per row). Warp shuffles, then one value
// per warp through shared memory. Every thread of the block must call them; all get the result.
// Memory: 32 values of shared memory per call site.
#pragma once

#include <cuda_runtime.h>

namespace kdkernels {
namespace cuda {

constexpr int kThreads = 256;

template <class F>
__device__ __forceinline__ F warp_sum(F v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class F>
__device__ __forceinline__ F warp_max(F v) {
  for (int o = 16; o > 0; o >>= 1) {
    const F u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

template <class F, bool kMax>
__device__ __forceinline__ F block_reduce(F v, F* smem /* >= 32 entries */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = lane < n_warps ? smem[lane] : (kMax ? -std::numeric_limits<F>::infinity() : F(0));
  return kMax ? warp_max(v) : warp_sum(v);
}

template <class F>
__device__ __forceinline__ F block_sum(F v, F* smem) { return block_reduce<F, false>(v, smem); }

template <class F>
__device__ __forceinline__ F block_max(F v, F* smem) { return block_reduce<F, true>(v, smem); }

}  // namespace cuda
}  // namespace kdkernels
