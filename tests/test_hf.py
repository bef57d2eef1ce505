"""kdkernels.hf.KDTrainer on CPU: one accumulated Trainer step equals the full-logit reference
(global normalizer via num_items_in_batch), and the LM head is never called."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_train import (V, assert_as_accurate_as_one_call, one_call_grads,  # noqa: E402
                        ragged, reference_grads, tiny_llama, with_topk)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=1, learning_rate=1.0, optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1,
                use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("teacher_form", ["cached", "online"])
def test_kdtrainer_step_matches_reference(tmp_path, teacher_form):
    from kdkernels.hf import KDTrainer, kd_collator
    from kdkernels.train import TrainConfig
    teacher, student = tiny_llama(h=48, seed=1), tiny_llama(seed=2)
    data = ragged(4)          # one step = all 4 examples (2 micro-batches of 2, any order)
    if teacher_form == "cached":
        data = with_topk(data, teacher, k=16)
    kw = dict(kd_weight=1.0, ce_weight=0.5, temperature=1.0)
    ref_loss, ref = reference_grads(student, teacher, data, cached=teacher_form == "cached", **kw)
    one_loss, one = one_call_grads(student, teacher if teacher_form == "online" else None, data,
                                   TrainConfig(backend="torch", **kw))
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    trainer = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data,
                        data_collator=kd_collator(pad_id=0), backend="torch",
                        teacher=teacher if teacher_form == "online" else None, **kw)
    out = trainer.train()
    # SGD with lr = 1: the applied update is exactly minus the accumulated gradient
    got = {k: before[k] - p.detach() for k, p in student.named_parameters()}
    assert_as_accurate_as_one_call(got, one, ref, None, float(one_loss), float(ref_loss))
    # the Trainer accumulates its reported loss in float32: agreement to fp32 rounding
    assert out.training_loss == pytest.approx(float(ref_loss), rel=1e-6)


def test_kdtrainer_never_calls_the_lm_head(tmp_path, monkeypatch):
    from kdkernels.hf import KDTrainer, kd_collator
    teacher = tiny_llama(h=48, seed=1, dtype=torch.float32)
    student = tiny_llama(seed=2, dtype=torch.float32)
    data = with_topk(ragged(4), teacher, k=8)

    def boom(*a, **k):
        raise AssertionError("the full logits were computed")
    monkeypatch.setattr(student.lm_head, "forward", boom)
    trainer = KDTrainer(model=student, args=_args(tmp_path, learning_rate=1e-3, optim="adamw_torch"),
                        train_dataset=data, data_collator=kd_collator(), ce_weight=0.5)
    assert math.isfinite(trainer.train().training_loss)
    assert V == student.config.vocab_size
