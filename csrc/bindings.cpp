// The CPU extension's module: the torch.library schemas of every op, their CPU and Meta kernels,
// and a small pybind11 module (build facts). The CUDA extension (bindings_cuda.cpp) adds CUDA kernels
// to these same ops. Nothing else lives here: math in include/, epilogues in cpu/ and cuda/, drivers
// in driver.h.
#include <torch/extension.h>
#include <torch/library.h>

#include "epilogue.h"
#include "ops.h"

TORCH_LIBRARY(kdkernels_native, m) {
  m.def("kd_forward(Tensor zs, Tensor zt, Tensor labels, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  m.def("kd_backward(Tensor zs, Tensor zt, Tensor labels, Tensor stats, Tensor grad_rows, float[] fopts, "
        "int[] iopts, Tensor? akl_weights=None) -> Tensor");
  m.def("linear_kd_forward(Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, "
        "Tensor labels, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  m.def("linear_kd_backward(Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, "
        "Tensor labels, Tensor stats, Tensor grad_rows, float[] fopts, int[] iopts, bool[3] need, "
        "Tensor? akl_weights=None) -> (Tensor, Tensor, Tensor)");
  m.def("linear_sparse_kd_forward(Tensor hs, Tensor ws, Tensor? bs, Tensor ids, Tensor vals, "
        "Tensor labels, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  m.def("linear_sparse_kd_backward(Tensor hs, Tensor ws, Tensor? bs, Tensor ids, Tensor vals, "
        "Tensor labels, Tensor stats, Tensor grad_rows, float[] fopts, int[] iopts, bool[3] need, "
        "Tensor? akl_weights=None) -> (Tensor, Tensor, Tensor)");
  m.def("linear_kd_fused(Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, "
        "Tensor labels, Tensor grad_rows, float[] fopts, int[] iopts, bool[3] need) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_sparse_kd_fused(Tensor hs, Tensor ws, Tensor? bs, Tensor ids, Tensor vals, "
        "Tensor labels, Tensor grad_rows, float[] fopts, int[] iopts, bool[3] need) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_topk(Tensor h, Tensor w, Tensor? b, int k, float[] fopts, int[] iopts) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_sample(Tensor h, Tensor w, Tensor? b, Tensor u, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  // Vocab-shard passes (csrc/driver_shard.h; the backward passes are the backward ops above)
  m.def("kd_shard_stats(Tensor zs, Tensor zt, Tensor labels, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  m.def("kd_shard_terms(Tensor zs, Tensor zt, Tensor glse, float[] fopts, int[] iopts) -> Tensor");
  m.def("linear_kd_shard_stats(Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, "
        "Tensor labels, float[] fopts, int[] iopts) -> (Tensor, Tensor)");
  m.def("linear_kd_shard_terms(Tensor hs, Tensor ws, Tensor? bs, Tensor ht, Tensor wt, Tensor? bt, "
        "Tensor glse, float[] fopts, int[] iopts) -> Tensor");
  m.def("linear_sparse_kd_shard_stats(Tensor hs, Tensor ws, Tensor? bs, Tensor ids, Tensor labels, "
        "float[] fopts, int[] iopts) -> (Tensor, Tensor, Tensor)");
}

#define KD_REGISTER_ALL(m, IMPL)                                          \
  m.impl("kd_forward", &IMPL::kd_forward);                                \
  m.impl("kd_backward", &IMPL::kd_backward);                              \
  m.impl("linear_kd_forward", &IMPL::linear_kd_forward);                  \
  m.impl("linear_kd_backward", &IMPL::linear_kd_backward);                \
  m.impl("linear_sparse_kd_forward", &IMPL::linear_sparse_kd_forward);    \
  m.impl("linear_sparse_kd_backward", &IMPL::linear_sparse_kd_backward);  \
  m.impl("linear_kd_fused", &IMPL::linear_kd_fused);                      \
  m.impl("linear_sparse_kd_fused", &IMPL::linear_sparse_kd_fused);        \
  m.impl("linear_topk", &IMPL::linear_topk);                              \
  m.impl("linear_sample", &IMPL::linear_sample);                          \
  m.impl("kd_shard_stats", &IMPL::kd_shard_stats);                        \
  m.impl("kd_shard_terms", &IMPL::kd_shard_terms);                        \
  m.impl("linear_kd_shard_stats", &IMPL::linear_kd_shard_stats);          \
  m.impl("linear_kd_shard_terms", &IMPL::linear_kd_shard_terms);          \
  m.impl("linear_sparse_kd_shard_stats", &IMPL::linear_sparse_kd_shard_stats);

TORCH_LIBRARY_IMPL(kdkernels_native, CPU, m) { KD_REGISTER_ALL(m, kdkernels::Ops<kdkernels::CpuEpi>) }

TORCH_LIBRARY_IMPL(kdkernels_native, Meta, m) { KD_REGISTER_ALL(m, kdkernels::MetaOps) }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "kdkernels native backend, CPU build (ops live in torch.ops.kdkernels_native)";
  module.def("omp_max_threads", [] { return at::get_num_threads(); });
}
