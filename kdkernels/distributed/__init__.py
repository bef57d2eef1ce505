"""Scale-out for kdkernels on torch.distributed (docs/scaling.md).

- Vocabulary (tensor) parallel losses: `kd_loss`, `fused_linear_kd_loss`,
  `fused_linear_sparse_kd_loss` with `process_group=`: each rank holds a contiguous vocabulary shard;
  per-row statistics are combined with O(N) all-reduces (vocab_parallel.py, comm.py); the local
  shard math is a backend's shard protocol (shard_torch.py is the reference).
- Data parallel (DDP / FSDP2): `data_parallel_normalizer` (the global token normalizer across ranks
  and micro-batches), `LossForward` (the loss inside DDP's forward) and `call_as_forward` (the
  loss inside an FSDP2 module's forward, so the sharded LM head is gathered) in data_parallel.py.
- kdkernels.train.train with an FSDP2 student: fsdp.py (detection, gradient averaging, full-state
  checkpoints); `torchrun -m kdkernels.distributed.train_check` checks it on a machine.

Importing this package does not initialize or query torch.distributed.
"""
from .data_parallel import LossForward, call_as_forward, data_parallel_normalizer, global_token_count
from .vocab_parallel import fused_linear_kd_loss, fused_linear_sparse_kd_loss, kd_loss

__all__ = ["kd_loss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss",
           "data_parallel_normalizer", "global_token_count", "call_as_forward", "LossForward"]
