"""Time (pytest-benchmark) and peak memory (extra_info) of every op x provider, fwd+bwd and fwd.

Providers and inputs are those of `kdkernels bench` (kdkernels/bench/providers.py); each row's
extra_info holds the peak extra memory in MiB and the time of one N x H x V GEMM on the device.
"""
from __future__ import annotations

import pytest
import torch

from kdkernels.bench.harness import time_ms
from kdkernels.bench.memory import peak_bytes
from kdkernels.bench.providers import GEMMS, Case, gemm_runner, make_inputs, providers, runner

SHAPES = {"cpu": [(256, 32000, 128), (256, 50257, 128)],
          "cuda": [(8192, 128256, 2048), (8192, 151936, 2048)]}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
PROVIDERS = ("naive", "naive_compile", "kdkernels-torch", "kdkernels-triton", "kdkernels-native",
             "liger", "cce")
OPS = ("sparse_kd", "linear_kd", "linear_ce")


def _provider(name: str, device: str):
    for p in providers(device):
        if p.name == name:
            return p
    raise KeyError(name)


@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd"])
@pytest.mark.parametrize("shape", [0, 1], ids=["shape0", "shape1"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loss(benchmark, device, op, provider, shape, mode):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if provider == "naive_compile" and device == "cpu":
        pytest.skip("torch.compile on CPU: slow to compile; use `kdkernels bench --compile`")
    p = _provider(provider, device)
    if op not in p.ops:
        pytest.skip(f"{provider} has no {op}")
    why = p.why_not(device)
    if why is not None:
        pytest.skip(why)
    n, v, h = SHAPES[device][shape]
    case = Case(op, n, v, h, 64, DTYPE[device])
    inp = make_inputs(case, device)
    fn = runner(case, inp, p, backward=mode == "fwd_bwd")
    peak = peak_bytes(fn, device)          # also the warm-up (and a compile, if any)
    gemm = time_ms(gemm_runner(case, inp), device, reps=3)["median"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        fn()
        sync()
    benchmark.extra_info.update(device=device, n=n, v=v, h=h, dtype=case.dtype,
                                peak_mib=peak / 2 ** 20, gemm_ms=gemm,
                                floor_ms=gemm * GEMMS[op][mode == "fwd_bwd"])
    benchmark.pedantic(call, rounds=3 if device == "cpu" else 10, iterations=1, warmup_rounds=0)
