"""Backend selection (docs/backends.md): an explicit backend that cannot run raises with the reason,
a backend that does not exist raises NotImplementedError, KDKERNELS_BACKEND is honoured and an
explicit argument overrides it, "auto" never fails on CPU, and importing kdkernels pulls in neither
Triton, the compiled extension nor a GPU query."""
import subprocess
import sys

import pytest
import torch

import kdkernels
import kdkernels.backends.torch as torch_backend
from kdkernels import dispatch

pytestmark = pytest.mark.usefixtures("clean_env")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 31, generator=g), torch.randn(5, 31, generator=g)


def _spy(monkeypatch, module, name="kd_forward"):
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(name)
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("name", ("triton", "native"))
def test_explicit_unavailable_backend_raises_with_reason(name, monkeypatch):
    """Made unavailable on purpose (whatever this machine has built), the explicit request raises
    and says why; "auto" quietly takes another backend."""
    try:
        mod = dispatch._module(name)
    except (NotImplementedError, ImportError):
        mod = None
    if mod is not None:
        monkeypatch.setattr(mod, "availability", lambda device_type: "no hardware for this test")
    zs, zt = _inputs()
    with pytest.raises((kdkernels.BackendUnavailable, NotImplementedError)) as e:
        kdkernels.kd_loss(zs, zt, backend=name)
    assert name in str(e.value)
    if mod is not None:
        assert "no hardware for this test" in str(e.value)
        assert name not in kdkernels.available_backends("cpu")
    calls = _spy(monkeypatch, torch_backend)
    if mod is not None and name == "native":
        kdkernels.kd_loss(zs, zt, backend="auto")
        assert calls == ["kd_forward"], "auto fell back to the torch backend"


def test_triton_on_cpu_without_interpreter():
    """The real check: Triton on CPU tensors needs the interpreter."""
    if "triton" in kdkernels.available_backends("cpu"):
        pytest.skip("Triton can run on CPU here (TRITON_INTERPRET=1): covered by its own tests")
    zs, zt = _inputs()
    with pytest.raises((kdkernels.BackendUnavailable, NotImplementedError)) as e:
        kdkernels.kd_loss(zs, zt, backend="triton")
    assert "triton" in str(e.value) and len(str(e.value)) > 40


def test_backend_that_does_not_exist_yet(monkeypatch):
    monkeypatch.setattr(dispatch, "BACKENDS", dispatch.BACKENDS + ("futurist",))
    zs, zt = _inputs()
    with pytest.raises(NotImplementedError, match="futurist"):
        kdkernels.kd_loss(zs, zt, backend="futurist")
    assert "futurist" not in kdkernels.available_backends("cpu")


def test_unknown_backend_name():
    zs, zt = _inputs()
    with pytest.raises(ValueError, match="backend"):
        kdkernels.kd_loss(zs, zt, backend="tpu")


def test_env_var_is_honoured_and_argument_wins(monkeypatch):
    zs, zt = _inputs()
    calls = _spy(monkeypatch, torch_backend)
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    kdkernels.kd_loss(zs, zt)
    assert calls == ["kd_forward"]
    monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        kdkernels.kd_loss(zs, zt)
    kdkernels.kd_loss(zs, zt, backend="torch")             # the argument overrides the env var
    assert calls == ["kd_forward"] * 2
    monkeypatch.setenv("KDKERNELS_BACKEND", "triton")
    if "triton" not in kdkernels.available_backends("cpu"):
        with pytest.raises((kdkernels.BackendUnavailable, NotImplementedError)):
            kdkernels.kd_loss(zs, zt)


@pytest.mark.parametrize("backend", ("auto", None))
def test_auto_never_fails_on_cpu(backend):
    zs, zt = _inputs()
    hs, ws = torch.randn(5, 8), torch.randn(31, 8)
    ref = kdkernels.kd_loss(zs, zt, backend="torch")
    got = kdkernels.kd_loss(zs, zt, backend=backend)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    ids = torch.topk(zt.log_softmax(-1), 4, 1)
    kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids.indices, ids.values, backend=backend)
    kdkernels.fused_linear_kd_loss(hs, ws, hs, ws, backend=backend)
    kdkernels.linear_topk(hs, ws, 3, backend=backend)
    kdkernels.linear_sample(hs, ws, 3, backend=backend)
    assert "torch" in kdkernels.available_backends("cpu")


def test_import_is_light():
    """`import kdkernels` imports neither triton nor the compiled extension and initializes no GPU."""
    code = ("import sys, torch, kdkernels\n"
            "heavy = [m for m in sys.modules if m == 'triton' or m.startswith('triton.')"
            " or m.startswith('kdkernels.backends.native') or m.startswith('kdkernels.backends.triton')]\n"
            "print(heavy, torch.cuda.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False", out.stdout


def test_auto_order_is_the_measured_table():
    """"auto" follows the measured table (kdkernels/dispatch.py): every op has an order ending in the
    torch backend, the head ops prefer native on CUDA (H200 figures), kd_loss prefers triton, and the
    divergence suffix of an op name does not change its entry."""
    from kdkernels import dispatch
    for op in ("kd_loss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss", "linear_topk",
               "linear_sample"):
        for dev in ("cuda", "cpu"):
            order = dispatch._auto_order(dev, op)
            assert order[-1] == "torch" and len(set(order)) == len(order), (dev, op, order)
        assert "triton" not in dispatch._auto_order("cpu", op)
    assert dispatch._auto_order("cuda", "fused_linear_sparse_kd_loss")[0] == "native"
    assert dispatch._auto_order("cuda", "fused_linear_kd_loss(divergence='akl')")[0] == "native"
    assert dispatch._auto_order("cuda", "kd_loss")[0] == "triton"
