"""fp32, fp16 and bf16 inputs: loss and gradients vs float64 (of the same rounded inputs), within 2x
the error of naive PyTorch fed the same dtype (GEMM in that dtype, fp32 softmax) plus the floor.
Gradients come back in the inputs' dtype."""
import pytest
import torch

import reference as R

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", R.FORMS)
def test_dtype(kd, form, dtype):
    for i, divergence in enumerate(R.DIVERGENCES):
        if R.rejected(form, divergence):
            continue
        T = (2.0, 1.0, 0.5)[i % 3]
        case = kd.make_case(form, n=19, v=131, k=12, temperature=T, seed=11 + i,
                            dtype=DTYPES[dtype], bias=(i % 2 == 0))
        labels = kd.make_labels(case.n, case.v, "some")
        opts = dict(divergence=divergence, temperature=T, labels=labels, ce_weight=0.25,
                    chunk_bytes=3 * 131 * 4 * 12, reduction=("mean", "none", "sum")[i % 3])
        try:
            loss, _ = kd.check(case, opts, kd.upstream(opts["reduction"], (case.n,)))
        except AssertionError as e:
            raise AssertionError(f"divergence={divergence} T={T}: {e}") from None
        assert loss.dtype == torch.float32, "the loss is accumulated and returned in fp32"
