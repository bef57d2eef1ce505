"""The full semantic matrix on small odd shapes (N = 13 rows, V = 37), fp32, torch backend:
every divergence x every teacher form x T in {0.5, 1, 2} x reductions (mean, sum, none, mean with a
normalizer) x ignore patterns (none, some, all), loss and every student gradient against the float64
formulas of tests/reference.py, with a non-unit upstream gradient, and rows split into several blocks.
"""
import itertools
import zlib

import pytest
import torch

import reference as R

TEMPERATURES = (0.5, 1.0, 2.0)
REDUCTIONS = ("mean", "sum", "none", "normalizer")
IGNORES = ("none", "some", "all")


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
@pytest.mark.parametrize("form", R.FORMS)
def test_matrix(kd, form, divergence):
    if R.rejected(form, divergence):
        pytest.skip("rejected combination (tested in test_errors.py)")
    for T, (reduction, ignore) in itertools.product(TEMPERATURES, itertools.product(REDUCTIONS, IGNORES)):
        case = kd.make_case(form, temperature=T, seed=zlib.crc32(f"{form}{T}".encode()) % 1000)
        labels = kd.make_labels(case.n, case.v, ignore)
        opts = dict(divergence=divergence, temperature=T, labels=labels,
                    chunk_bytes=4096 if reduction != "sum" else None)  # several row blocks
        if reduction == "normalizer":
            opts.update(reduction="mean", normalizer=29.0)
        else:
            opts["reduction"] = reduction
        go = kd.upstream(opts["reduction"], (case.n,))
        try:
            loss, grads = kd.check(case, opts, go)
        except AssertionError as e:
            raise AssertionError(f"T={T} reduction={reduction} ignore={ignore}: {e}") from None
        if ignore == "all":
            assert (loss == 0).all(), "all rows ignored: the loss must be exactly 0"
            for name, g in grads.items():
                assert (g == 0).all(), f"all rows ignored: d{name} must be exactly 0"
        elif reduction != "none":
            assert loss.ndim == 0
        if reduction == "none" and labels is not None:
            assert (loss[labels == -100] == 0).all()
