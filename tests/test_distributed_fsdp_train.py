"""kdkernels.train.train with an FSDP2 student (fully_shard per decoder layer and at the root), 2 gloo
processes on CPU, a tiny Llama (hidden 32, 2 layers, V = 301) and a cached top-k teacher. Two
layouts: "root_head" (tied head, in the root group) and "head_apart" (untied head sharded on its own,
reshard_after_forward, so the loss must run as a forward of the head).

- Three AdamW steps of 2 micro-batches per rank equal the single-process run with 4 micro-batches
  (the same global batch): the sampler, the global token normalizer (n / world, since FSDP averages
  its reduce-scattered gradients), gradient clipping of DTensor gradients, the optimizer on the
  shards, the logged loss. Ragged sequences, so the ranks' token counts differ.
  Oracle on the updates u = theta_3 - theta_0 (and on the logged losses): |u_fsdp - u_64| <=
  2 |u_single32 - u_64| + 32 ulp(fp32) of max |u_64|, u_64 the single-process run in float64.
  The same bound on the gradients of one unclipped step (train() leaves them in .grad): those
  differ by rounding only, and a gradient off by a constant factor shows there (clipping and
  AdamW's scale invariance hide it from the updates).
- Resume: a run stopped after 2 steps (checkpoint: full state dicts written by rank 0) and resumed
  from a different initialization reproduces the uninterrupted run bitwise, and the checkpoint loads
  into a plain (unsharded) model.
- fully_shard on submodules but not on the root is rejected with a ValueError before any collective.
"""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch

from test_distributed_harness import _free_port

transformers = pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps
V, K, WORLD, ACCUM, STEPS = 301, 6, 2, 2, 3


LAYOUTS = ("root_head", "head_apart")


def _model(seed, dtype=torch.float32, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, tie_word_embeddings=tied, initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(dtype)


def _data():
    g = torch.Generator().manual_seed(3)
    out = []
    for length in [2, 17, 5, 11, 3, 20, 9, 14, 6, 19, 4, 12, 8, 16, 7, 13]:
        ids = torch.randint(1, V, (length,), generator=g)
        lp, tid = torch.log_softmax(torch.randn(length, V, generator=g) * 2, -1).topk(K, -1)
        tid[::3, -1] = -1                            # some empty cache slots
        out.append({"input_ids": ids, "teacher_ids": tid, "teacher_values": lp})
    return out


def _cfg(grad_accum, steps=STEPS, out_dir=None, clip=1.0):
    from kdkernels.train import TrainConfig
    # warm-up longer than the run: the LR schedule does not depend on `steps` (the resumed run and
    # the uninterrupted one see the same LRs); clipping at 1.0 is active (initial norms are larger)
    return TrainConfig(steps=steps, batch_size=2, grad_accum=grad_accum, lr=1e-2, warmup_steps=4,
                       ce_weight=0.5, device="cpu", log_every=1, seed=0, max_grad_norm=clip,
                       backend="torch", out_dir=out_dir, save_every=0)


def _grads(model, full=lambda t: t):
    """The last step's gradients, which train() leaves in .grad."""
    return {k: full(p.grad).detach().clone() for k, p in model.named_parameters()}


def _sharded(seed, layout="root_head"):
    from torch.distributed.fsdp import fully_shard
    model = _model(seed, tied=layout == "root_head")
    for layer in model.model.layers:
        fully_shard(layer)
    if layout == "head_apart":
        fully_shard(model.lm_head, reshard_after_forward=True)
    fully_shard(model)
    return model


def _full(model):
    return {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=120))
    res = {}
    try:
        from kdkernels.train import train
        data = _data()
        # fully_shard keeps each rank's shard of its own init: the same seed everywhere
        for layout in LAYOUTS:
            model = _sharded(seed=0, layout=layout)
            assert type(model.lm_head.weight).__name__ == "DTensor"
            res[layout, "history"] = train(model, data, _cfg(ACCUM), log=None).history
            res[layout, "params"] = _full(model)
            model = _sharded(seed=0, layout=layout)
            train(model, data, _cfg(ACCUM, steps=1, clip=None), log=None)
            res[layout, "grads"] = _grads(model, lambda t: t.full_tensor())

        ck = os.path.join(out_dir, "ckpt")
        first = _sharded(seed=0)
        res["history_first"] = train(first, data, _cfg(ACCUM, steps=2, out_dir=ck), log=None).history
        resumed = _sharded(seed=rank + 99)           # everything must come from the checkpoint
        res["history_resumed"] = train(resumed, data, _cfg(ACCUM, out_dir=ck), log=None).history
        res["params_resumed"] = _full(resumed)

        from torch.distributed.fsdp import fully_shard
        partial = _model(seed=0)
        fully_shard(partial.model.layers[0])         # not the root: the head would stay unsharded
        try:
            train(partial, data, _cfg(ACCUM, steps=1), log=None)
            res["partial"] = "no error"
        except ValueError as e:
            res["partial"] = str(e)
    except Exception:
        import traceback
        res["error"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()



def _single(dtype, layout):
    from kdkernels.train import train
    model = _model(seed=0, dtype=dtype, tied=layout == "root_head")
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    data = _data()
    if dtype == torch.float64:
        data = [{**e, "teacher_values": e["teacher_values"].double()} for e in data]
    hist = train(model, data, _cfg(ACCUM * WORLD), log=None).history
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    model = _model(seed=0, dtype=dtype, tied=layout == "root_head")
    train(model, data, _cfg(ACCUM * WORLD, steps=1, clip=None), log=None)
    return theta0, params, hist, _grads(model)


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(WORLD, _free_port(), tmp), nprocs=WORLD,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        for r, res in enumerate(ranks):
            assert "error" not in res, f"rank {r} raised:\n{res['error']}"
        ckpt = torch.load(os.path.join(tmp, "ckpt", "checkpoint.pt"), weights_only=False)
    singles = {(layout, dt): _single(dt, layout) for layout in LAYOUTS
               for dt in (torch.float32, torch.float64)}
    return ranks, ckpt, singles


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_steps_equal_single_process(runs, layout):
    ranks, _, singles = runs
    (theta0, single, hist32, _), (_, ref, hist64, _) = singles[layout, torch.float32], singles[layout, torch.float64]
    assert ("lm_head.weight" in ref) == (layout == "head_apart")    # untied: a parameter of its own
    for rank, res in enumerate(ranks):
        got = res[layout, "params"]
        assert set(got) == set(ref)
        for k in ref:
            u_ref = ref[k].double() - theta0[k].double()
            scale = float(u_ref.abs().max())
            assert scale > 0, f"{k}: the reference update is 0 (the test would prove nothing)"
            err = float((got[k].double() - theta0[k].double() - u_ref).abs().max())
            base = float((single[k].double() - theta0[k].double() - u_ref).abs().max())
            tol = 2 * base + 32 * EPS32 * scale
            assert err <= tol, f"rank {rank} {k}: |fsdp - ref64| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
        hist = res[layout, "history"]
        assert [h["step"] for h in hist] == [1, 2, 3]
        assert [h["tokens"] for h in hist] == [h["tokens"] for h in hist32]
        for h, h32, h64 in zip(hist, hist32, hist64):
            for key in ("loss", "grad_norm"):
                tol = 2 * abs(h32[key] - h64[key]) + 32 * EPS32 * abs(h64[key])
                assert abs(h[key] - h64[key]) <= tol, (rank, h["step"], key, h[key], h64[key])
    # clipping was active (the steps test clip_grad_norm_ on DTensor gradients)
    assert hist32[0]["grad_norm"] > 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_first_step_gradients_equal_single_process(runs, layout):
    """The gradients of one unclipped step, at the same point for every run: rounding only. (The
    parameters after 3 AdamW steps above also carry AdamW's response to rounding in entries whose
    gradient is near its eps; clipping and AdamW would hide a gradient off by a constant factor.)"""
    ranks, _, singles = runs
    g32, g64 = singles[layout, torch.float32][3], singles[layout, torch.float64][3]
    for rank, res in enumerate(ranks):
        got = res[layout, "grads"]
        assert set(got) == set(g64)
        for k, r in g64.items():
            r = r.double()
            scale = float(r.abs().max())
            assert scale > 0, k
            err = float((got[k].double() - r).abs().max())
            base = float((g32[k].double() - r).abs().max())
            assert err <= 2 * base + 32 * EPS32 * scale, (rank, k, err, base, scale)


def test_fsdp2_resume_reproduces_uninterrupted_run(runs):
    ranks, ckpt, _ = runs
    for rank, res in enumerate(ranks):
        assert [h["step"] for h in res["history_first"]] == [1, 2]
        for k, a in res["root_head", "params"].items():
            assert torch.equal(res["params_resumed"][k], a), (rank, k)
        assert ([h["loss"] for h in res["history_resumed"]]
                == [h["loss"] for h in res["root_head", "history"]])
    # rank 0 wrote full (unsharded) tensors: they load into a plain model as they are
    assert ckpt["step"] == STEPS
    plain = _model(seed=5)
    plain.load_state_dict(ckpt["model"])
    for k, p in plain.named_parameters():
        assert torch.equal(p.detach(), ranks[0]["root_head", "params"][k]), k


def test_fsdp2_without_root_is_rejected(runs):
    for res in runs[0]:
        assert "not to the student itself" in res["partial"]
