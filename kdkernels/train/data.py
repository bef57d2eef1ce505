"""Batches for the training loop: collation and a resumable (stateless) sampler.

Alignment (the contract of kdkernels.cache.collate): for a sequence x_0..x_{L-1}, row t holds the
student's hidden state after reading x_0..x_t, `labels[t] = x_{t+1}` (ignore_index at the last
position and at padding), and the teacher slots at row t describe the teacher's distribution over
x_{t+1}. No further shift happens anywhere in the loop.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def collate(examples: Sequence[dict], pad_id: int = 0, ignore_index: int = -100) -> dict:
    """Pad a list of examples (dicts with `input_ids` (L,), optional `teacher_ids`/`teacher_values`
    (L, k) and `teacher_logprob_next` (L,), optional int `domain`) into a batch with next-token
    `labels`; the same layout as kdkernels.cache.collate, plus `domain` (B,)."""
    lengths = [int(e["input_ids"].shape[0]) for e in examples]
    b, length = len(examples), max(lengths)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), ignore_index, dtype=torch.long)
    has_teacher = "teacher_ids" in examples[0]
    has_next = "teacher_logprob_next" in examples[0]   # cache readers store log p_teacher(x_{t+1})
    if has_teacher:
        k = max(int(e["teacher_ids"].shape[-1]) for e in examples)
        t_ids = torch.full((b, length, k), -1, dtype=torch.long)
        t_vals = torch.zeros((b, length, k), dtype=torch.float32)
    if has_next:
        t_next = torch.full((b, length), float("nan"), dtype=torch.float32)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        x = torch.as_tensor(e["input_ids"]).long()
        ids[i, :n], mask[i, :n] = x, 1
        labels[i, :n - 1] = x[1:]
        if has_teacher:
            ki = e["teacher_ids"].shape[-1]
            t_ids[i, :n, :ki] = torch.as_tensor(e["teacher_ids"]).long()
            t_vals[i, :n, :ki] = torch.as_tensor(e["teacher_values"]).float()
        if has_next:
            t_next[i, :n] = torch.as_tensor(e["teacher_logprob_next"]).float()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if has_teacher:
        batch["teacher_ids"], batch["teacher_values"] = t_ids, t_vals
    if has_next:
        batch["teacher_logprob_next"] = t_next
    if "domain" in examples[0]:
        batch["domain"] = torch.tensor([int(e["domain"]) for e in examples], dtype=torch.long)
    return batch


class StepSampler:
    """Which examples form micro-batch `m` of optimizer step `s`, as a pure function of
    (seed, s, m, weights): resuming at step s needs no sampler state beyond the weights.

    Uniform (weights None): epoch-wise shuffling, each epoch a fresh permutation seeded by
    (seed, epoch); every example is seen once per epoch. Weighted (DDK): each micro-batch draws
    `batch_size` examples without replacement with probability proportional to `weights`.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int = 0):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def indices(self, step: int, micro: int, weights: Optional[torch.Tensor] = None) -> list[int]:
        if weights is not None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 131 + micro)
            k = min(self.batch_size, int((weights > 0).sum()))
            return torch.multinomial(weights.double(), k, replacement=False, generator=g).tolist()
        start = (step * self.grad_accum + micro) * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - pos)
            out += self._perm(epoch)[pos:pos + take].tolist()
        return out

    def epochs(self, steps: int) -> float:
        return steps * self.grad_accum * self.batch_size / self.n if self.n else math.inf
