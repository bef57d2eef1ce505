"""Helpers for the triton-backend tests (tests/test_triton_*.py).

Importing this module turns on Triton's CPU interpreter (TRITON_INTERPRET=1) before any kernel of
the backend is loaded: Triton reads the variable when a kernel is decorated.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kdkernels.backends.torch as TORCH  # noqa: E402,F401  (re-exported for the tests)
import kdkernels.backends.triton as TRITON  # noqa: E402


def needs_interpreter_or_cuda(device: str):
    """Skip (inside the test, never at collection) when the backend cannot run on `device`."""
    why = TRITON.availability(device)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if why is not None:
        pytest.skip(f"triton backend unavailable on {device}: {why}")


def assert_close_to_reference(what: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                              ulps: float = 16.0) -> None:
    """Triton vs the torch backend, both vs float64 `truth`: the triton error may be at most twice
    the torch backend's plus a few fp32 ulps of the values' scale (a streaming LSE rounds
    differently from a materialized one, nothing more)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    got64, ref64, t64 = got.double(), ref.double(), truth.double()
    assert torch.isfinite(got64).all() == torch.isfinite(t64).all(), f"{what}: non-finite entries"
    fin = torch.isfinite(t64)
    assert torch.equal(got64[~fin], t64[~fin]), f"{what}: wrong non-finite entries"
    e_got = float((got64 - t64)[fin].abs().max()) if fin.any() else 0.0
    e_ref = float((ref64 - t64)[fin].abs().max()) if fin.any() else 0.0
    scale = float(t64[fin].abs().max()) if fin.any() else 0.0
    eps = torch.finfo(got.dtype).eps if got.is_floating_point() else 0.0
    bound = 2 * e_ref + ulps * max(eps, 2.0 ** -23) * max(scale, 1e-3)
    assert e_got <= bound, f"{what}: error {e_got:.3e} > 2 x torch backend {e_ref:.3e} + floor"


def lse_stats(stats: torch.Tensor) -> torch.Tensor:
    """The torch backend's non-AKL stats in the layout of the other backends: its LSE columns hold
    hi + lo as two numbers (kdkernels/backends/torch/common.py lse_pair), the lo parts after the first
    four columns (sparse: LSE(b), LSE(z); dense: LSE(b), LSE(z), LSE(a)). Returns the four columns
    [LSE, LSE(z), ., S] with each LSE summed."""
    out = stats[:, :4].clone()
    lo = stats[:, 4:]
    out[:, :lo.shape[1]] += lo
    return out
