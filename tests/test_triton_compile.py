"""The triton backend's kernels compile for NVIDIA GPUs (PTX + cubin, Triton's bundled toolchain)
on a machine without one: the CPU interpreter accepts code the compiler rejects, so this is the
CPU-side guard for the GPU path. Runs kdkernels.backends.triton.compile_check in a fresh process
without TRITON_INTERPRET (the interpreter tests set it for this one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(*args: str, timeout: int = 900) -> str:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "kdkernels.backends.triton.compile_check", *args],
                         env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def test_core_kernels_compile_for_sm90():
    out = _check("--kernels", "_lse_kernel,_sparse_grad_kernel,_topk_kernel")
    assert out.count("ok ") >= 3


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80():
    _check("--arch", "90,80", timeout=3000)


@pytest.mark.slow
def test_every_variant_compiles_for_sm90():
    _check("--all", timeout=6000)
