"""The benchmark machinery: naive baselines compute the same loss as kdkernels (float64), the CPU
peak-memory measurement sees torch allocations exactly, and a tiny sweep writes CSV/MD/PNG."""
from __future__ import annotations

import csv

import pytest
import torch

import kdkernels as K
from kdkernels.bench import naive
from kdkernels.bench.harness import time_ms
from kdkernels.bench.memory import cpu_peak_bytes


def _inputs(n=37, h=16, v=1031, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    hs, ws = torch.randn(n, h, generator=g, dtype=d), torch.randn(v, h, generator=g, dtype=d) * 0.7
    ht, wt = hs + 0.3 * torch.randn(n, h, generator=g, dtype=d), ws.clone()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    top = K.linear_topk(ht, wt, k, backend="torch")
    return hs, ws, ht, wt, labels, top.ids, top.logprobs.double()


@pytest.mark.parametrize("op", ["sparse_kd", "linear_kd", "linear_ce", "kd"])
def test_naive_baselines_compute_the_kdkernels_loss(op):
    # Both sides in float64: any disagreement above float64 rounding is different math.
    hs, ws, ht, wt, labels, ids, vals = _inputs()
    if op == "sparse_kd":
        a = naive.linear_sparse_kd_loss(hs, ws, ids, vals, labels, 2.0, ce_weight=0.3)
        b = K.fused_linear_sparse_kd_loss(hs, ws, ids, vals, labels=labels, temperature=2.0,
                                          ce_weight=0.3, backend="torch")
    elif op == "linear_kd":
        a = naive.linear_kd_loss(hs, ws, ht, wt, labels, 2.0, ce_weight=0.3)
        b = K.fused_linear_kd_loss(hs, ws, ht, wt, labels=labels, temperature=2.0, ce_weight=0.3,
                                   backend="torch")
    elif op == "linear_ce":
        a = naive.linear_ce_loss(hs, ws, labels)
        b = torch.nn.functional.cross_entropy(hs @ ws.T, labels, ignore_index=-100)
    else:
        a = naive.kd_loss(hs @ ws.T, ht @ wt.T, labels, 2.0, ce_weight=0.3)
        b = K.kd_loss(hs @ ws.T, ht @ wt.T, labels=labels, temperature=2.0, ce_weight=0.3,
                      backend="torch")
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_cpu_peak_bytes_sees_torch_allocations():
    mib = 2 ** 20

    def two_in_sequence():
        a = torch.empty(mib, dtype=torch.float32)       # 4 MiB, freed before the next
        del a
        b = torch.empty(2 * mib, dtype=torch.uint8)     # 2 MiB
        return b.numel()

    def overlapping():
        a = torch.empty(mib, dtype=torch.float32)
        b = torch.empty(mib, dtype=torch.float32)       # both alive: 8 MiB
        return a.numel() + b.numel()
    assert 4 * mib <= cpu_peak_bytes(two_in_sequence) < 4 * mib + 4096
    assert 8 * mib <= cpu_peak_bytes(overlapping) < 8 * mib + 4096


def test_time_ms_quantiles_are_ordered():
    t = time_ms(lambda: torch.ones(1000).sum(), "cpu", reps=7)
    assert 0 < t["p20"] <= t["median"] <= t["p80"] and t["reps"] == 7


def test_tiny_sweep_writes_csv_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from kdkernels.bench import cli
    from kdkernels.bench.report import markdown, plots, write_csv
    s = dict(device="cpu", ops=("sparse_kd", "linear_kd"), n=(16, 48), v=(1031,), h=16, k=8,
             dtype="float32", reps=2, modes=("fwd", "fwd_bwd"), providers=("naive", "kdkernels-torch"))
    rows = cli.run(s, log=lambda m: None)
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_mib"] > 0 and r["x_floor"] > 0
        assert r["device"] and r["torch"] == torch.__version__
    write_csv(rows, tmp_path / "r.csv")
    back = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(back) == len(rows) and back[0]["provider"] in ("naive", "kdkernels-torch")
    md = markdown(rows)
    assert md.count("\n| sparse_kd |") == 8
    assert {p.name for p in plots(rows, tmp_path)} == {"sparse_kd_fwd.png", "sparse_kd_fwd_bwd.png",
                                                      "linear_kd_fwd.png", "linear_kd_fwd_bwd.png"}


def test_fused_loss_peak_memory_is_below_materialized_logits():
    # The property the benchmark reports, at a small shape: naive holds ~3-4 N x V floats.
    n, h, v = 512, 32, 2048
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.2).requires_grad_(True)
    ids = torch.stack([torch.randperm(v)[:16] for _ in range(n)])
    vals = torch.log_softmax(torch.randn(n, 17), 1)[:, :16]
    labels = torch.randint(0, v, (n,))
    ours = cpu_peak_bytes(lambda: K.fused_linear_sparse_kd_loss(
        hs, ws, ids, vals, labels=labels, backend="torch", chunk_bytes=2 ** 20).backward())
    ref = cpu_peak_bytes(lambda: naive.linear_sparse_kd_loss(hs, ws, ids, vals, labels).backward())
    logits = n * v * 4
    assert ref >= 2 * logits
    assert ours < ref / 4
