// The CUDA extension's module: CUDA kernels for the ops that the CPU extension (bindings.cpp)
// defines. Load the CPU extension first (the Python loader does).
#include <torch/extension.h>
#include <torch/library.h>

#include "epilogue.h"
#include "ops.h"

TORCH_LIBRARY_IMPL(kdkernels_native, CUDA, m) {
  using Impl = kdkernels::Ops<kdkernels::CudaEpi>;
  m.impl("kd_forward", &Impl::kd_forward);
  m.impl("kd_backward", &Impl::kd_backward);
  m.impl("linear_kd_forward", &Impl::linear_kd_forward);
  m.impl("linear_kd_backward", &Impl::linear_kd_backward);
  m.impl("linear_sparse_kd_forward", &Impl::linear_sparse_kd_forward);
  m.impl("linear_sparse_kd_backward", &Impl::linear_sparse_kd_backward);
  m.impl("linear_kd_fused", &Impl::linear_kd_fused);
  m.impl("linear_sparse_kd_fused", &Impl::linear_sparse_kd_fused);
  m.impl("linear_topk", &Impl::linear_topk);
  m.impl("linear_sample", &Impl::linear_sample);
  m.impl("kd_shard_stats", &Impl::kd_shard_stats);
  m.impl("kd_shard_terms", &Impl::kd_shard_terms);
  m.impl("linear_kd_shard_stats", &Impl::linear_kd_shard_stats);
  m.impl("linear_kd_shard_terms", &Impl::linear_kd_shard_terms);
  m.impl("linear_sparse_kd_shard_stats", &Impl::linear_sparse_kd_shard_stats);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "kdkernels native backend, CUDA build (adds CUDA kernels to torch.ops.kdkernels_native)";
}
