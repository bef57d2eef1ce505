"""backend="triton" under process_group= (vocabulary-parallel losses) in the CPU interpreter.

(1) Each pass of the triton shard protocol (kdkernels/backends/triton/shard.py) against the torch
    reference passes (kdkernels/distributed/shard_torch.py) on the same shard inputs: local labels
    (target here, -1 no CE, -2 target on another shard), local ids, and global per-row stats given.
    Single process, no group. Oracle (tests/_triton_util.assert_close_to_reference): the triton error
    against the reference passes run in float64 on the same (rounded) inputs is at most twice the
    torch passes' error plus a few fp32 ulps of the scale. fp32 and fp16 inputs; V = 1031 cut into
    [0, 400) + [400, 1031), N = 37; ignored rows with NaN hidden states / logits in backward, non-unit
    per-row upstream gradients; empty and one-column shards.
(2) End to end: a 2-process gloo group runs the three public losses with backend="triton" and
    process_group=; loss and every gradient equal the single-process triton result, by the oracle of
    tests/test_distributed_vocab.py (|vp - ref64| <= 2 |single - ref64| + a floor of a few ulps of
    the scale); an all-ignored batch gives exact zeros.
"""
from __future__ import annotations

import os
import tempfile
import traceback
import zlib
from datetime import timedelta

os.environ["TRITON_INTERPRET"] = "1"   # before the backend's kernels load (see _triton_util)

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_util as U  # noqa: E402
from kdkernels.options import KDOptions  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy log(0) in the interpreter

N, H, HT, V, K = 37, 32, 24, 1031, 8
CUT = 400                     # two shards: [0, 400) and [400, 1031)
IGNORED = torch.arange(N) % 5 == 0


def _shard_labels(ce: torch.Tensor, start: int, size: int) -> torch.Tensor:
    from kdkernels.distributed.vocab_parallel import _local_labels
    return _local_labels(ce, start, size)


def _local_ids(ids: torch.Tensor, start: int, size: int) -> torch.Tensor:
    loc = ids - start
    return torch.where((ids >= 0) & (loc >= 0) & (loc < size), loc, -1)


def _problem(seed: int, dtype, bias: bool, kd_fixture=None, opts: KDOptions = None):
    """Global inputs (rounded to dtype, held in float32), CE labels (-1 at ignored rows) and the
    per-row upstream gradient (0 at ignored rows)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda t: t.to(dtype).float()  # noqa: E731
    d = dict(hs=r(torch.randn(N, H, generator=g)), ws=r(torch.randn(V, H, generator=g) * 0.6),
             bs=r(torch.randn(V, generator=g)) if bias else None,
             ht=r(torch.randn(N, HT, generator=g)), wt=r(torch.randn(V, HT, generator=g) * 0.7))
    d["zs"], d["zt"] = r(d["hs"] @ d["ws"].T * 0.5), r(d["ht"] @ d["wt"].T * 0.5)
    ce = torch.randint(0, V, (N,), generator=g)
    d["ce"] = torch.where(IGNORED, -1, ce)
    d["grad_rows"] = torch.where(IGNORED, 0.0, torch.rand(N, generator=g) + 0.5)
    if opts is not None and kd_fixture is not None:
        zt64 = (d["ht"] @ d["wt"].T).double()
        ids, vals = kd_fixture.sparse_teacher(zt64, opts.values, K, opts.temperature, g)
        d["ids"], d["vals"] = ids, vals
    return d


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


def _check(what, got, ref, truth):
    for i, (a, b, c) in enumerate(zip(got, ref, truth)):
        if a is None:
            assert b is None and c is None, f"{what}[{i}]: None where the reference has a tensor"
            continue
        U.assert_close_to_reference(f"{what}[{i}]", a, b, c)


ST = "stat"


def _three(fn, args, dtype, casts):
    """fn run by triton on dtype inputs, by the torch passes on the same, and by the torch passes in
    float64 (the truth). casts[i]: True for model inputs (the run's dtype), ST for given per-row
    statistics (float32, float64 in the truth run), False for anything else."""
    import kdkernels.backends.triton as TRITON
    from kdkernels.distributed import shard_torch
    out = []
    for mod, dt in ((TRITON, dtype), (shard_torch, dtype), (shard_torch, torch.float64)):
        st = torch.float64 if dt == torch.float64 else torch.float32
        a = [_cast(x, dt) if c is True else _cast(x, st) if c == ST else x for x, c in zip(args, casts)]
        res = getattr(mod, fn)(*a)
        out.append(res if isinstance(res, tuple) else (res,))
    return out


# --------------------------------------------------------------------------------------------------
# (1) pass by pass against shard_torch


DENSE = {
    "logits-jsd-T2-ce": ("logits", torch.float32, dict(divergence="jsd", beta=0.3, temperature=2.0,
                                                       ce_weight=0.5)),
    "logits-rkl-fp16": ("logits", torch.float16, dict(divergence="reverse_kl")),
    "linear-fkl-ce-bias-cap": ("linear", torch.float32, dict(divergence="forward_kl", ce_weight=0.5,
                                                             student_softcap=6.0, teacher_softcap=8.0),
                               ),
    "linear-skewr-fp16-T05-ce": ("linear", torch.float16, dict(divergence="skew_reverse_kl", alpha=0.3,
                                                               temperature=0.5, ce_weight=1.0)),
}


def _dense_args(form, d, start, size, with_nan=False):
    s = slice(start, start + size)
    if form == "logits":
        zs = d["zs"][:, s].clone()
        if with_nan:
            zs[0] = float("nan")          # row 0 is ignored: grad_rows 0
        return (zs, d["zt"][:, s]), (True, True)
    hs = d["hs"].clone()
    if with_nan:
        hs[0] = float("nan")
    bs = d["bs"][s] if d["bs"] is not None else None
    return (hs, d["ws"][s], bs, d["ht"], d["wt"][s], None), (True, True, True, True, True, False)


DENSE_RUNS = [(c, "hi") for c in DENSE] + [("logits-jsd-T2-ce", "lo"), ("linear-fkl-ce-bias-cap", "lo")]


@pytest.mark.parametrize("case,which", DENSE_RUNS, ids=[f"{w}-{c}" for c, w in DENSE_RUNS])
def test_dense_passes_match_torch_passes(case, which):
    shard = (CUT, V - CUT) if which == "hi" else (0, CUT)
    from kdkernels.distributed import shard_torch
    form, dtype, kw = DENSE[case]
    opts = KDOptions(**kw)
    d = _problem(zlib.crc32(case.encode()), dtype, bias=form == "linear")
    pre = "" if form == "logits" else "linear_"
    start, size = shard
    labels = _shard_labels(d["ce"], start, size)
    assert (labels == -2).any() and (labels >= 0).any() and (labels == -1).any()
    args, casts = _dense_args(form, d, start, size)

    got = _three(pre + "kd_shard_stats", (*args, labels, opts), dtype, (*casts, False, False))
    _check("stats", *got)
    # the global statistics: the reference passes over the whole vocabulary, in float64
    full, _ = _dense_args(form, d, 0, V)
    full = tuple(_cast(x, torch.float64) for x in full)
    glse, _ = getattr(shard_torch, pre + "kd_shard_stats")(*full, d["ce"], opts)
    glse = glse.float()
    got = _three(pre + "kd_shard_terms", (*args, glse, opts), dtype, (*casts, ST, False))
    _check("terms", *got)
    S = getattr(shard_torch, pre + "kd_shard_terms")(*full, glse.double(), opts)[:, 1]
    stats = torch.stack([glse[:, 0], glse[:, 1], glse[:, 2], S.float()], 1)

    args, casts = _dense_args(form, d, start, size, with_nan=True)
    if form == "logits":
        got = _three("kd_shard_backward", (*args, labels, stats, d["grad_rows"], opts), dtype,
                     (*casts, False, ST, ST, False))
        assert torch.equal(got[0][0][0], torch.zeros_like(got[0][0][0])), "ignored row: not exactly 0"
    else:
        need = (True, True, args[2] is not None)
        got = _three("linear_kd_shard_backward",
                     (*args, labels, stats, d["grad_rows"], opts, need), dtype,
                     (*casts, False, ST, ST, False, False))
        assert got[0][0].dtype == torch.float32, "dh must be the fp32 partial"
        assert torch.equal(got[0][0][0], torch.zeros(H)), "ignored (NaN) row: dh not exactly 0"
    assert float(got[2][0].abs().max()) > 0
    _check("backward", *got)


SPARSE = {
    "bucket-fkl-ce-bias": (torch.float32, dict(divergence="forward_kl", ce_weight=0.5)),
    "bucket-jsd-fp16-T2": (torch.float16, dict(divergence="jsd", beta=0.4, temperature=2.0)),
    "renorm_both-skewf-ce": (torch.float32, dict(divergence="skew_forward_kl", alpha=0.2,
                                                 tail="renorm_both", ce_weight=0.3)),
    "renorm_teacher-tvd-fp16": (torch.float16, dict(divergence="tvd", tail="renorm_teacher")),
    "weights-rkl-renorm_both-cap": (torch.float32, dict(divergence="reverse_kl", values="weights",
                                                        tail="renorm_both", student_softcap=5.0)),
}


@pytest.mark.parametrize("case", list(SPARSE))
def test_sparse_passes_match_torch_passes(kd, case):
    from kdkernels.backends.torch import sparse as torch_sparse
    from kdkernels.distributed.vocab_parallel import _local_teacher
    dtype, kw = SPARSE[case]
    opts = KDOptions(**kw)
    d = _problem(zlib.crc32(case.encode()), dtype, bias="bias" in case, kd_fixture=kd, opts=opts)
    start, size = CUT, V - CUT
    s = slice(start, start + size)
    labels = _shard_labels(d["ce"], start, size)
    ids = _local_ids(d["ids"], start, size)
    assert (ids >= 0).any() and ((ids < 0) & (d["ids"] >= 0)).any()
    bs = d["bs"][s] if d["bs"] is not None else None
    args, casts = (d["hs"], d["ws"][s], bs), (True, True, True)

    got = _three("linear_sparse_kd_shard_stats", (*args, ids, labels, opts), dtype,
                 (*casts, False, False, False))
    _check("stats", *got)
    # global stats [LSE, LSE(z_s), h_Q, S]: the torch backend's single-process forward, float64
    full = tuple(_cast(x, torch.float64) for x in (d["hs"], d["ws"], d["bs"]))
    _, st = torch_sparse.linear_sparse_kd_forward(*full, d["ids"], d["vals"].double(), d["ce"], opts)
    stats = U.lse_stats(st).float()
    lpK, _ = _local_teacher(d["ids"], d["vals"], ids, opts)
    hs = d["hs"].clone()
    hs[0] = float("nan")                  # row 0 is ignored
    need = (True, True, bs is not None)
    got = _three("linear_sparse_kd_shard_backward",
                 (hs, d["ws"][s], bs, ids, lpK, labels, stats, d["grad_rows"], opts, need), dtype,
                 (True, True, True, False, ST, False, ST, ST, False, False))
    assert torch.equal(got[0][0][0], torch.zeros(H)), "ignored (NaN) row: dh not exactly 0"
    assert float(got[2][0].abs().max()) > 0
    _check("backward", *got)


@pytest.mark.parametrize("size", [0, 1])
def test_empty_and_one_column_shards(kd, size):
    """A rank may hold no column (LSE -inf, zero sums, empty gradients) or a single one."""
    from kdkernels.distributed.vocab_parallel import _local_teacher
    opts = KDOptions(divergence="jsd", ce_weight=0.5, temperature=1.5)
    d = _problem(5 + size, torch.float32, bias=True, kd_fixture=kd, opts=opts)
    start = V - size
    d["ce"][1] = V - 1                                   # a target in the one-column shard
    labels = _shard_labels(d["ce"], start, size)
    args, casts = _dense_args("linear", d, start, size)
    got = _three("linear_kd_shard_stats", (*args, labels, opts), torch.float32, (*casts, False, False))
    _check("stats", *got)
    glse = torch.stack([got[2][0][:, 0].float() + 0.5, got[2][0][:, 1].float() + 1.0,
                        got[2][0][:, 2].float() + 0.25], 1)   # global LSEs exceed the shard's
    glse = torch.where(torch.isfinite(glse), glse, 2.0)
    _check("terms", *_three("linear_kd_shard_terms", (*args, glse, opts), torch.float32,
                            (*casts, ST, False)))
    stats = torch.cat([glse, torch.full((N, 1), 0.3)], 1)
    _check("backward", *_three("linear_kd_shard_backward",
                               (*args, labels, stats, d["grad_rows"], opts, (True, True, True)),
                               torch.float32, (*casts, False, ST, ST, False, False)))
    zs, zt = d["zs"][:, start:], d["zt"][:, start:]
    _check("logits stats", *_three("kd_shard_stats", (zs, zt, labels, opts), torch.float32,
                                   (True, True, False, False)))
    _check("logits backward", *_three("kd_shard_backward", (zs, zt, labels, stats, d["grad_rows"], opts),
                                      torch.float32, (True, True, False, ST, ST, False)))
    ids = _local_ids(d["ids"], start, size)
    sargs = (d["hs"], d["ws"][start:], d["bs"][start:], ids, labels, opts)
    _check("sparse stats", *_three("linear_sparse_kd_shard_stats", sargs, torch.float32,
                                   (True, True, True, False, False, False)))
    lpK, _ = _local_teacher(d["ids"], d["vals"], ids, opts)
    _check("sparse backward", *_three(
        "linear_sparse_kd_shard_backward",
        (*sargs[:4], lpK, labels, stats, d["grad_rows"], opts, (True, True, True)),
        torch.float32, (True, True, True, False, ST, False, ST, ST, False, False)))


def test_shard_check_module_in_the_interpreter():
    """kdkernels.backends.triton.shard_check (the GPU command) on tiny shapes: every comparison
    (5 cases x 2 shards x passes x outputs) runs and passes."""
    from kdkernels.backends.triton import shard_check
    lines = []
    assert shard_check.check(n=13, v=37, h=16, k=4, dtype=torch.float32, device="cpu",
                             report=lambda line, ok: lines.append((line, ok))) == 0, lines
    assert len(lines) == 56 and all(ok for _, ok in lines)


@pytest.mark.gpu
def test_shard_passes_on_cuda_bf16():
    """The shard passes compiled on a CUDA GPU in bf16 (not in the interpreter: its bf16 tl.dot is
    wrong), N = 1029, V = 32007, H = 512, k = 64; a fresh process without TRITON_INTERPRET."""
    import subprocess
    import sys
    from pathlib import Path
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "kdkernels.backends.triton.shard_check"], env=env,
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0 and "shard_check: 0 failure(s)" in res.stdout, \
        res.stdout[-6000:] + res.stderr[-3000:]


def test_triton_exports_the_shard_protocol():
    import kdkernels.backends.triton as TRITON
    from kdkernels.distributed.shard_dispatch import SHARD_OPS, resolve_shard
    for op, fns in SHARD_OPS.items():
        assert all(callable(getattr(TRITON, f, None)) for f in fns), op
        assert resolve_shard("triton", "cpu", op) is TRITON


# --------------------------------------------------------------------------------------------------
# (2) end to end: 2 gloo processes, backend="triton", against the single-process triton result

WORLD = 2
E2E = {
    "linear_rkl_T2_ce_fp16": ("linear", dict(divergence="reverse_kl", temperature=2.0, ce_weight=0.5,
                                             bias=True, dtype=torch.float16)),
    "logits_jsd_ce_none": ("logits", dict(divergence="jsd", temperature=1.5, ce_weight=0.5,
                                          reduction="none")),
    "sparse_bucket_jsd_bias": ("sparse", dict(divergence="jsd", bias=True, reduction="sum",
                                              ce_weight=0.2)),
    "sparse_renorm_both_skewr": ("sparse", dict(divergence="skew_reverse_kl", tail="renorm_both",
                                                reduction="none")),
    "sparse_weights_fkl_softcap": ("sparse", dict(divergence="forward_kl", values="weights",
                                                  student_softcap=6.0)),
}


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    import test_distributed_vocab as TDV
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=180))
    res = {}
    try:
        for name, (op, kw) in E2E.items():
            try:
                res[name] = TDV._check_case(name, op, kw, dist.group.WORLD, WORLD, rank,
                                            backend="triton")
            except Exception:
                res[name] = traceback.format_exc()
        try:
            res["all_ignored"] = TDV._check_all_ignored("linear", dist.group.WORLD, WORLD, rank,
                                                        backend="triton")
        except Exception:
            res["all_ignored"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def e2e():
    import torch.multiprocessing as mp
    from test_distributed_harness import _free_port
    with tempfile.TemporaryDirectory() as tmp:
        why = "no result file"
        try:
            mp.start_processes(_worker, args=(WORLD, _free_port(), tmp), nprocs=WORLD,
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            why = str(e)
        files = [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD)]
        return [torch.load(f) if os.path.exists(f) else {"why": why} for f in files]


@pytest.mark.parametrize("case", list(E2E))
def test_vocab_parallel_triton_equals_single_process(e2e, case):
    for rank, res in enumerate(e2e):
        meas = res.get(case, res.get("why"))
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (err, tol, scale) in meas.items():
            assert err <= tol, f"rank {rank} {k}: |vp - ref64| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
            assert scale > 0 or k == "dbs", f"rank {rank} {k}: all zero, the comparison proves nothing"


def test_vocab_parallel_triton_all_ignored_is_exactly_zero(e2e):
    for rank, res in enumerate(e2e):
        meas = res.get("all_ignored", res.get("why"))
        assert not isinstance(meas, str), f"rank {rank} raised:\n{meas}"
        for k, (mx, finite) in meas.items():
            assert finite and mx == 0.0, f"rank {rank} {k}: max |.| = {mx}, finite = {finite}"
