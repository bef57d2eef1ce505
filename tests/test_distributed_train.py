"""kdkernels.train.train under torch.distributed (gloo, 2 processes on CPU): the parameters after
two optimizer steps equal the single-process run with grad_accum * world micro-batches, on ragged
sequences (per-rank token counts differ, so the normalizer must be global) with a cached teacher."""
from __future__ import annotations


import pytest
import torch

from test_distributed_harness import _free_port

transformers = pytest.importorskip("transformers")

V, STEPS = 97, 2


def _model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg)


def _data():
    g = torch.Generator().manual_seed(3)
    out = []
    for length in [2, 17, 5, 11, 3, 20, 9, 14]:
        ids = torch.randint(1, V, (length,), generator=g)
        lp, tid = torch.log_softmax(torch.randn(length, V, generator=g) * 2, -1).topk(5, -1)
        out.append({"input_ids": ids, "teacher_ids": tid, "teacher_values": lp})
    return out


def _cfg(grad_accum):
    from kdkernels.train import TrainConfig
    return TrainConfig(steps=STEPS, batch_size=2, grad_accum=grad_accum, lr=1e-2, ce_weight=0.5,
                       device="cpu", log_every=1, seed=0, max_grad_norm=1.0, backend="torch")


def _worker(rank, world, port, q):
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=world)
        from kdkernels.train import train
        model = _model(seed=rank)            # different on purpose: rank 0's weights must win
        res = train(model, _data(), _cfg(grad_accum=1), log=None)
        if rank == 0:
            q.put(([p.detach().numpy().copy() for p in model.parameters()], res.history))  # by value
        torch.distributed.destroy_process_group()
    except BaseException as e:  # report instead of hanging the parent
        q.put(e)
        raise



def test_two_ranks_equal_single_process_with_doubled_accumulation():
    from kdkernels.train import train
    torch.set_num_threads(1)
    single = _model(seed=0)
    hist1 = train(single, _data(), _cfg(grad_accum=2), log=None).history

    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = q.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
    if isinstance(got, BaseException):
        raise got
    params, hist2 = got
    for a, b in zip(single.parameters(), params):
        # Summing two ranks' gradients adds the same two partial sums as one process accumulating
        # them, so the steps agree to fp32 rounding of the optimizer's arithmetic.
        torch.testing.assert_close(torch.from_numpy(b), a.detach(), rtol=1e-5, atol=1e-6)
    assert [h["tokens"] for h in hist2] == [h["tokens"] for h in hist1]
    for h1, h2 in zip(hist1, hist2):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
