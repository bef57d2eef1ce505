"""The torch backend's temporaries stay within its chunk budget: every tensor that any aten op
allocates during forward + backward is recorded (a TorchDispatchMode sees each op's outputs), and
none may be larger than the budget or an input-sized buffer (dW, dh). An N x V buffer would be
4x the largest allowed allocation here; the test shows it catches one with the default budget."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kdkernels

pytestmark = pytest.mark.usefixtures("clean_env")

N, V, H, K = 96, 1031, 16, 16
BUDGET = 2 * V * 4 * 12          # two rows of the dense path's 12 fp32 (rows, V) temporaries


class Allocations(TorchDispatchMode):
    """Bytes of every new storage created by an aten op while active."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self._seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self._seen:   # in-place ops and views excluded
                    self._seen.add(ptr)
                    self.sizes.append(t.untyped_storage().nbytes())
        return out


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    ws = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    ht, wt = torch.randn(N, H + 3, generator=g), torch.randn(V, H + 3, generator=g) / 2
    top = torch.topk((ht @ wt.T).log_softmax(-1), K, 1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return hs, ws, ht, wt, top.indices, top.values, labels


def _run(form, chunk_bytes):
    hs, ws, ht, wt, ids, vals, labels = _case()
    with Allocations() as rec:
        if form == "linear":
            loss = kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, labels=labels, ce_weight=0.5,
                                                  divergence="jsd", backend="torch",
                                                  chunk_bytes=chunk_bytes)
        else:
            _, values, tail = form.split(":")
            if values == "weights":
                ids = ids[:, :4]
                vals = torch.full(ids.shape, 0.25)
            loss = kdkernels.fused_linear_sparse_kd_loss(hs, ws, ids, vals, values=values, tail=tail,
                                                         labels=labels, ce_weight=0.5,
                                                         backend="torch", chunk_bytes=chunk_bytes)
        loss.backward()
    return rec.sizes


def _allowed():
    """The budget, or a buffer the size of an input or its gradient (fp32 dW accumulator, dh)."""
    return max(BUDGET, V * H * 4, N * H * 4, N * K * 8)


@pytest.mark.parametrize("form", ("linear", "sparse:logprobs:bucket", "sparse:logprobs:renorm_both",
                                  "sparse:weights:bucket"))
def test_fused_losses_stay_within_budget(form):
    sizes = _run(form, BUDGET)
    assert max(sizes) <= _allowed(), (f"largest allocation {max(sizes)} B > {_allowed()} B "
                                      f"(N x V fp32 = {N * V * 4} B)")


def test_detector_sees_a_full_logits_buffer():
    """Positive control: with the default 256 MiB budget all N rows fit in one block, so (N, V)
    fp32 temporaries appear -- and the recorder reports them."""
    assert max(_run("linear", None)) >= N * V * 4


def test_kd_loss_only_the_gradient_is_n_by_v():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(N, V, generator=g, requires_grad=True)
    zt = torch.randn(N, V, generator=g)
    with Allocations() as rec:
        kdkernels.kd_loss(zs, zt, divergence="skew_forward_kl", backend="torch",
                          chunk_bytes=BUDGET).backward()
    big = [s for s in rec.sizes if s > max(BUDGET, N * 16 * 4)]
    assert big == [N * V * 4], big      # d student_logits itself, nothing else


def test_heads_stay_within_budget():
    hs, ws, *_ = _case()
    with Allocations() as rec:
        kdkernels.linear_topk(hs.detach(), ws.detach(), K, backend="torch", chunk_bytes=BUDGET)
        kdkernels.linear_sample(hs.detach(), ws.detach(), 16, backend="torch", chunk_bytes=BUDGET,
                                generator=torch.Generator().manual_seed(0))
    assert max(rec.sizes) <= _allowed()
