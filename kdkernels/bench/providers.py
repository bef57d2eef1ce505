"""The benchmarked ops, their inputs, and every implementation ("provider") of each.

ops (forward KL, T = 1, mean over rows):
    sparse_kd  cached top-k teacher: fused_linear_sparse_kd_loss(h, W, ids, logprobs)  [bucket tail]
    linear_kd  online teacher:       fused_linear_kd_loss(h_s, W_s, h_t, W_t)
    linear_ce  hard-label CE only:   fused_linear_sparse_kd_loss with ce_weight=1, no teacher slots
    kd         logits level:         kd_loss(z_s, z_t)   (the (N, V) logits are inputs here)
providers:
    naive            materialized logits + log_softmax (kdkernels/bench/naive.py)
    naive_compile    torch.compile of naive (skipped with the reason if compiling fails)
    kdkernels-<b>    our backends that kdkernels.available_backends(device) lists
    liger            Liger-Kernel's closest op (FusedLinearJSD beta=0 / FusedLinearCrossEntropy)
    cce              cut-cross-entropy's linear_cross_entropy (linear_ce only)
Inputs are scaled like a trained model's (logit std ~3, teacher correlated with student), not
random-normal logits, which give near-uniform softmaxes.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import naive

OPS = ("sparse_kd", "linear_kd", "linear_ce", "kd")
# GEMMs of shape N x H x V that the op needs at least: (forward, forward + backward).
GEMMS = {"sparse_kd": (1, 3), "linear_kd": (2, 4), "linear_ce": (1, 3), "kd": (0, 0)}


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    v: int
    h: int = 256
    k: int = 64
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = case.torch_dtype
    scale = 3.0 / case.h ** 0.5

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    hs = rn(case.n, case.h)
    ws = rn(case.v, case.h) * scale
    labels = torch.randint(0, case.v, (case.n,), generator=g)
    out = {"labels": labels.to(device)}
    ht, wt = hs + 0.5 * rn(case.n, case.h), ws + 0.3 * scale * rn(case.v, case.h)
    if case.op == "kd":
        out["zs"] = (hs.to(device) @ ws.to(device).T).to(dt)
        out["zt"] = (ht.to(device) @ wt.to(device).T).to(dt)
        return out
    out["hs"], out["ws"] = hs.to(device, dt), ws.to(device, dt)
    if case.op == "linear_kd":
        out["ht"], out["wt"] = ht.to(device, dt), wt.to(device, dt)
    if case.op == "sparse_kd":
        from ..heads import linear_topk
        top = linear_topk(ht.to(device, dt), wt.to(device, dt), case.k)
        out["ids"], out["vals"] = top.ids, top.logprobs
    return out


def _grad_inputs(case: Case, inp: dict) -> dict:
    """Fresh leaves that require grad (so providers never share autograd state)."""
    inp = dict(inp)
    for name in (("zs",) if case.op == "kd" else ("hs", "ws")):
        inp[name] = inp[name].detach().clone().requires_grad_(True)
    return inp


def _naive_loss(case: Case, inp: dict) -> Callable[[], torch.Tensor]:
    if case.op == "sparse_kd":
        return lambda: naive.linear_sparse_kd_loss(inp["hs"], inp["ws"], inp["ids"], inp["vals"],
                                                   inp["labels"])
    if case.op == "linear_kd":
        return lambda: naive.linear_kd_loss(inp["hs"], inp["ws"], inp["ht"], inp["wt"], inp["labels"])
    if case.op == "linear_ce":
        return lambda: naive.linear_ce_loss(inp["hs"], inp["ws"], inp["labels"])
    return lambda: naive.kd_loss(inp["zs"], inp["zt"], inp["labels"])


def _ours_loss(backend: str):
    def build(case: Case, inp: dict) -> Callable[[], torch.Tensor]:
        import kdkernels as K
        if case.op == "sparse_kd":
            return lambda: K.fused_linear_sparse_kd_loss(inp["hs"], inp["ws"], inp["ids"], inp["vals"],
                                                         labels=inp["labels"], backend=backend)
        if case.op == "linear_kd":
            return lambda: K.fused_linear_kd_loss(inp["hs"], inp["ws"], inp["ht"], inp["wt"],
                                                  labels=inp["labels"], backend=backend)
        if case.op == "linear_ce":
            empty = (torch.full((case.n, 1), -1, device=inp["hs"].device),
                     torch.zeros((case.n, 1), device=inp["hs"].device))
            return lambda: K.fused_linear_sparse_kd_loss(inp["hs"], inp["ws"], *empty,
                                                         labels=inp["labels"], ce_weight=1.0,
                                                         kd_weight=0.0, backend=backend)
        return lambda: K.kd_loss(inp["zs"], inp["zt"], labels=inp["labels"], backend=backend)
    return build


_COMPILED: dict = {}


def _compile_loss(case: Case, inp: dict) -> Callable[[], torch.Tensor]:
    fns = {"sparse_kd": naive.linear_sparse_kd_loss, "linear_kd": naive.linear_kd_loss,
           "linear_ce": naive.linear_ce_loss, "kd": naive.kd_loss}
    if case.op not in _COMPILED:
        _COMPILED[case.op] = torch.compile(fns[case.op], dynamic=False)
    f = _COMPILED[case.op]
    args = {"sparse_kd": ("hs", "ws", "ids", "vals", "labels"),
            "linear_kd": ("hs", "ws", "ht", "wt", "labels"), "linear_ce": ("hs", "ws", "labels"),
            "kd": ("zs", "zt", "labels")}[case.op]
    return lambda: f(*(inp[a] for a in args))


def _liger_loss(case: Case, inp: dict) -> Callable[[], torch.Tensor]:
    if case.op == "linear_kd":
        from liger_kernel.transformers import LigerFusedLinearJSD
        mod = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)   # beta = 0: forward KL
        return lambda: mod(inp["hs"], inp["ws"], inp["ht"], inp["wt"], inp["labels"])
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    mod = LigerFusedLinearCrossEntropyLoss()
    return lambda: mod(inp["ws"], inp["hs"], inp["labels"])


def _cce_loss(case: Case, inp: dict) -> Callable[[], torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy
    return lambda: linear_cross_entropy(inp["hs"], inp["ws"], inp["labels"])


@dataclass(frozen=True)
class Provider:
    name: str
    ops: tuple
    build: Callable[[Case, dict], Callable[[], torch.Tensor]]
    why_not: Callable[[str], Optional[str]]     # device_type -> None (usable) or the reason


def _importable(module: str, cuda_only: bool):
    def why(device_type: str) -> Optional[str]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if cuda_only and device_type != "cuda":
            return f"{module} runs on CUDA only"
        return None
    return why


def providers(device_type: str) -> list[Provider]:
    from ..dispatch import BACKENDS, _reason
    out = [Provider("naive", OPS, _naive_loss, lambda d: None),
           Provider("naive_compile", OPS, _compile_loss, lambda d: None)]
    for b in BACKENDS:
        out.append(Provider(f"kdkernels-{b}", OPS, _ours_loss(b),
                            lambda d, b=b: _reason(b, d)))
    out.append(Provider("liger", ("linear_kd", "linear_ce"), _liger_loss,
                        _importable("liger_kernel", cuda_only=True)))
    out.append(Provider("cce", ("linear_ce",), _cce_loss, _importable("cut_cross_entropy", False)))
    return out


def runner(case: Case, inp: dict, provider: Provider, backward: bool) -> Callable[[], object]:
    """A no-argument callable doing one forward (no_grad) or forward + backward of the op."""
    if not backward:
        loss = provider.build(case, inp)

        def fwd():
            with torch.no_grad():
                return loss()
        return fwd
    ginp = _grad_inputs(case, inp)
    loss = provider.build(case, ginp)
    wrt = [ginp["zs"]] if case.op == "kd" else [ginp["hs"], ginp["ws"]]
    return lambda: torch.autograd.grad(loss(), wrt)


def gemm_runner(case: Case, inp: dict) -> Callable[[], object]:
    """One (N, H) x (H, V) GEMM in the case's dtype: the unit of the floor."""
    if case.op == "kd":
        return None
    hs, ws = inp["hs"], inp["ws"]
    return lambda: hs @ ws.T
