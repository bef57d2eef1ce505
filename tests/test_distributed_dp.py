"""Data-parallel distillation steps on CPU (gloo), 2 and 4 processes: DDP and FSDP2 (fully_shard)
training steps equal single-process steps on the same global batch.

Each rank takes a contiguous slice of the global batch (token counts differ per rank on purpose:
the normalizer must be global), splits it into 2 micro-batches (gradient accumulation), and runs the
objective of kdkernels.train (micro_batch_loss: body -> hidden -> fused sparse KD + CE) with
normalizer = kdkernels.distributed.data_parallel_normalizer(...). Two SGD steps.

Oracle on the parameter updates u = theta_2 - theta_0: max |u_dp - u_64| <= 2 max |u_single32 - u_64|
+ 32 ulp(fp32) of max |u_64|, with u_64 the single-process run in float64 (the torch backend keeps
float64 inputs in float64).
FSDP2 configurations: (a) the head in the root group, the loss via call_as_forward(model, ...);
(b) the head sharded on its own (reshard_after_forward=True), so its weight is a DTensor shard
outside a forward: the loss via call_as_forward(model.lm_head, ...) must gather it (no crash).
"""
from __future__ import annotations

import traceback

import pytest
import torch

EPS32 = torch.finfo(torch.float32).eps
V, H, L, B, K = 257, 16, 9, 8, 6      # vocab, hidden, sequence length, global batch, cache slots
STEPS, LR, MICRO = 2, 0.5, 2


class _Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.mix = torch.nn.Linear(H, H)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        e = self.embed(input_ids)
        return (e + torch.tanh(self.mix(e)),)


class TinyLM(torch.nn.Module):
    """The accessors kdkernels.train.lm_parts reads: get_output_embeddings and the body `model`."""
    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = _Body()
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def _global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[: B // 4, 2:] = -100              # the first ranks' sequences count far fewer tokens
    t_logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    lp, tid = torch.log_softmax(t_logits, -1).topk(K, -1)
    tid[:, ::2, -1] = -1                     # some empty cache slots
    return dict(input_ids=ids, labels=labels, teacher_ids=tid, teacher_values=lp.float())


def _slice(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def _objective():
    from kdkernels.train import Objective
    return Objective(kd_weight=1.0, ce_weight=0.5, divergence="forward_kl", backend="torch")


def _new_model(dtype):
    torch.manual_seed(0)
    return TinyLM().to(dtype)


def _batch_to(b, dtype):
    return {k: (v.to(dtype) if k == "teacher_values" and dtype == torch.float64 else v)
            for k, v in b.items()}


def _loss(model, b, normalizer):
    from kdkernels.train import lm_parts, micro_batch_loss
    loss, _ = micro_batch_loss(lm_parts(model), b, _objective(), normalizer=normalizer)
    return loss


def _single(dtype):
    """Reference: the whole global batch in one micro-batch, one process; returns the updates."""
    model = _new_model(dtype)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batch = _batch_to(_global_batch(), dtype)
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model, batch, None).backward()
        opt.step()
    return {k: (p.detach() - theta0[k]) for k, p in model.named_parameters()}


def _local_micro(rank, world):
    glob = _global_batch()
    per = B // world
    mine = _slice(glob, slice(rank * per, (rank + 1) * per))
    step = per // MICRO
    return [_slice(mine, slice(i * step, (i + 1) * step)) for i in range(MICRO)]


def _ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from kdkernels.distributed import LossForward, data_parallel_normalizer
    model = _new_model(torch.float32)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    ddp = DDP(LossForward(model))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    micro = _local_micro(rank, world)
    for _ in range(STEPS):
        opt.zero_grad()
        norm = data_parallel_normalizer(*[m["labels"] for m in micro])
        for i, m in enumerate(micro):
            if i < MICRO - 1:
                with ddp.no_sync():
                    ddp(_loss, m, norm).backward()
            else:
                ddp(_loss, m, norm).backward()
        opt.step()
    return {k: (p.detach() - theta0[k]) for k, p in model.named_parameters()}


def _fsdp(rank, world, head_apart: bool):
    import warnings
    # FSDP2 warns that the head's "forward" (the loss) returns a view; the loss is never modified
    # in place, so its pre-backward hook stays (the gradients are checked below).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    from torch.distributed.fsdp import fully_shard
    from kdkernels.distributed import call_as_forward, data_parallel_normalizer
    from kdkernels.train import final_hidden, lm_parts
    from kdkernels import fused_linear_sparse_kd_loss
    model = _new_model(torch.float32)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    call_as_forward(model, lambda m: None)   # a call before fully_shard must not stick as plain
    fully_shard(model.model.mix)
    if head_apart:
        fully_shard(model.lm_head, reshard_after_forward=True)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    micro = _local_micro(rank, world)
    obj = _objective()
    for _ in range(STEPS):
        opt.zero_grad()
        norm = data_parallel_normalizer(*[m["labels"] for m in micro])
        for i, m in enumerate(micro):
            model.set_requires_gradient_sync(i == MICRO - 1)
            if not head_apart:
                loss = call_as_forward(model, _loss, m, norm)
            else:
                assert type(model.lm_head.weight).__name__ == "DTensor"   # sharded outside forward
                hs = call_as_forward(model, lambda mod, ids: final_hidden(lm_parts(mod), ids), m["input_ids"])
                n = m["labels"].numel()
                loss = call_as_forward(
                    model.lm_head,
                    lambda head, h: fused_linear_sparse_kd_loss(
                        h.reshape(n, H), head.weight, m["teacher_ids"].reshape(n, K),
                        m["teacher_values"].reshape(n, K), labels=m["labels"].reshape(n),
                        ce_weight=obj.ce_weight, normalizer=norm, backend="torch"),
                    hs)
            loss.backward()
        opt.step()
    return {k: (p.full_tensor() - theta0[k]).detach() for k, p in model.named_parameters()}


def _compare(got, single, ref):
    out = {}
    for k, r in ref.items():
        scale = float(r.abs().max())
        err = float((got[k].double() - r).abs().max())
        base = float((single[k].double() - r).abs().max())
        out[k] = (err, 2 * base + 32 * EPS32 * scale, scale)
    return out


def suite(rank, world, pg):
    """Every check of this module on one rank of a `world`-process group (test_distributed_harness)."""
    ref, single = _single(torch.float64), _single(torch.float32)
    res = {}
    for name, fn in (("ddp", lambda: _ddp(rank, world)),
                     ("fsdp_root_head", lambda: _fsdp(rank, world, False)),
                     ("fsdp_sharded_head", lambda: _fsdp(rank, world, True))):
        try:
            res[name] = _compare(fn(), single, ref)
        except Exception:
            res[name] = traceback.format_exc()
    return res


def _results(world):
    from test_distributed_harness import results
    return results(world, "test_distributed_dp")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["ddp", "fsdp_root_head", "fsdp_sharded_head"])
def test_data_parallel_steps_equal_single_process(world, mode):
    for rank, res in enumerate(_results(world)):
        meas = res[mode]
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        assert set(meas) == {"model.embed.weight", "model.mix.weight", "model.mix.bias",
                             "lm_head.weight"}
        for k, (err, tol, scale) in meas.items():
            assert scale > 0, f"{k}: the reference update is 0 (the test would prove nothing)"
            assert err <= tol, f"rank {rank} {k}: |dp - ref64| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
