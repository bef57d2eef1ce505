"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): the student writes
continuations of prompts taken from the data, the live teacher scores the student's own sequence,
and the student is trained to match the teacher at every generated position. docs/onpolicy.md.

Rollout (no grad). Prompt x = x_0..x_{P-1}, the first P = min(prompt_len, shortest example of the
micro-batch) tokens of each example. For g = 0..G-1 (G = max_new_tokens):

    y_g ~ softmax(softcap(h_s(x, y_<g) @ W_s^T + b_s) / tau)          (kdkernels.linear_sample)

with a KV cache, so one step reads one position; after a sequence's first EOS its tokens are pad.

Score (with grad). s = (x, y), length P + G. Row t of s predicts s_{t+1}; the counted rows are the
generated positions t = P-1 .. P+G-2 up to and including the row that predicts the first EOS, and

    loss_row(t) = kd_weight * T^2 * D(p_t, q_t)        p_t: teacher, q_t: student, both at T
    loss        = sum over counted rows / normalizer   (the step's global token count)

with D = reverse_kl, jsd(beta), ... from fused_linear_kd_loss (docs/semantics.md). No gradient
flows through the sampling (GKD's choice); the prompt rows are ignored (no loss, no direct gradient).

Memory: the rollout touches (B, V) logits of ONE position per step inside linear_sample's blocks
(never a (B, L, V) tensor); the score streams both heads through fused_linear_kd_loss. Neither model
is ever called with its LM head.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Optional, Sequence, Union

import torch

from ..heads import linear_sample
from ..losses import fused_linear_kd_loss
from .model_parts import LMParts, final_hidden
from .objective import _match


def _seed(seed: int, step: int, micro: int, what: str) -> int:
    """A 63-bit generator seed, a pure function of (seed, step, micro, what): resumable, and
    independent of the global RNG and of the loop's other generators."""
    key = f"kdkernels.onpolicy:{what}:{seed}:{step}:{micro}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def is_on_policy(fraction: float, seed: int, step: int, micro: int) -> bool:
    """Micro-batch `micro` of optimizer step `step` is on-policy iff u < fraction, u ~ U[0, 1) from a
    CPU generator seeded by _seed(seed, step, micro, "coin"). fraction 0: never, 1: always."""
    if fraction <= 0:
        return False
    g = torch.Generator().manual_seed(_seed(seed, step, micro, "coin"))
    return float(torch.rand((), generator=g, dtype=torch.float64)) < fraction


def rollout_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    """The generator of the rollout of micro-batch `micro` of step `step` (on the model's device)."""
    return torch.Generator(device=device).manual_seed(_seed(seed, step, micro, "sample"))


def eos_ids(model: torch.nn.Module) -> list[int]:
    """The EOS id(s) of a Hugging Face model (generation_config, else config); [] when none."""
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            return [int(e)] if isinstance(e, int) else [int(i) for i in e]
    return []


def prompts_from(batch: dict, prompt_len: int) -> torch.Tensor:
    """(B, P) prompts: the first P = min(prompt_len, shortest example) tokens of every example of a
    right-padded batch (one common length, so generation needs no left padding)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    shortest = int(mask.sum(1).min()) if mask is not None else ids.shape[1]
    if shortest < 1:
        raise ValueError("an example of the batch is empty: no prompt to continue")
    return ids[:, :min(prompt_len, shortest)]


def _cache_kwarg(body: torch.nn.Module) -> Optional[str]:
    # transformers >= 5.2x calls the KV cache `cache`; earlier versions `past_key_values`.
    params = inspect.signature(body.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _cache_of(out) -> Optional[object]:
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    return None


def _last(out) -> torch.Tensor:
    # (B, H) final hidden state of the last position, contiguous for the sampling kernels
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[:, -1].contiguous()


@torch.no_grad()
def rollout(student: LMParts, prompts: torch.Tensor, max_new_tokens: int, *,
            temperature: float = 1.0, generator: Optional[torch.Generator] = None,
            eos_token_id: Union[int, Sequence[int], None] = None, pad_id: int = 0,
            ignore_index: int = -100, backend: Optional[str] = None) -> dict:
    """Sample `max_new_tokens` tokens per prompt from the student and return the scored batch:
    `input_ids` (B, P+G'), `attention_mask` (0 after a sequence's first EOS), `labels` (the
    generated token at rows P-1..P+G'-2 while the sequence is live, ignore_index elsewhere),
    `prompt_len` P and `on_policy` True. G' <= G: generation stops early once every sequence has
    emitted EOS. One uniform per sequence per step is drawn from `generator` (linear_sample)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be (B, P) with P >= 1, got {tuple(prompts.shape)}")
    b, p = prompts.shape
    dev = prompts.device
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    body = student.body
    was_training = body.training
    body.eval()                       # no dropout while sampling: the policy is the model itself
    kw = _cache_kwarg(body)
    try:
        out = body(input_ids=prompts, use_cache=kw is not None)
        cache = _cache_of(out) if kw is not None else None
        h = _last(out)
        tokens, live = [], []
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for g in range(max_new_tokens):
            w = _match(student.weight, h)
            bias = None if student.bias is None else _match(student.bias, h)
            y = linear_sample(h, w, 1, temperature=temperature, generator=generator, bias=bias,
                              softcap=student.softcap, backend=backend).ids[:, 0]
            live.append(~done)
            y = torch.where(done, torch.full_like(y, pad_id), y)
            tokens.append(y)
            if eos:
                done = done | torch.isin(y, eos_t)
            if g == max_new_tokens - 1 or (eos and bool(done.all())):
                break
            if cache is not None:
                out = body(input_ids=y[:, None], use_cache=True, **{kw: cache})
                cache = _cache_of(out)
            else:                      # no KV cache support: re-read the whole sequence
                out = body(input_ids=torch.cat([prompts, torch.stack(tokens, 1)], 1), use_cache=False)
            h = _last(out)
    finally:
        body.train(was_training)
    gen, live = torch.stack(tokens, 1), torch.stack(live, 1)
    g_len = gen.shape[1]
    input_ids = torch.cat([prompts, gen], 1)
    attention_mask = torch.cat([torch.ones_like(prompts), live.long()], 1)
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, p - 1:p - 1 + g_len] = torch.where(live, gen, torch.full_like(gen, ignore_index))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_len": p, "on_policy": True}


def on_policy_loss(student: LMParts, teacher: LMParts, batch: dict, *,
                   divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                   kd_weight: float = 1.0, ignore_index: int = -100,
                   normalizer: Union[float, torch.Tensor, None] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """sum over the counted (generated) rows of kd_weight * T^2 * D(p_teacher, q_student) / normalizer
    (default: the batch's counted rows). Teacher hidden states under no_grad; no logits formed."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    hs = final_hidden(student, ids, mask)
    hs = hs.reshape(-1, hs.shape[-1])
    with torch.no_grad():
        ht = final_hidden(teacher, ids, mask)
        ht = ht.reshape(-1, ht.shape[-1])
    return fused_linear_kd_loss(
        hs, _match(student.weight, hs), ht, _match(teacher.weight, ht),
        student_bias=None if student.bias is None else _match(student.bias, hs),
        teacher_bias=None if teacher.bias is None else _match(teacher.bias, ht),
        student_softcap=student.softcap, teacher_softcap=teacher.softcap,
        divergence=divergence, beta=beta, temperature=temperature,
        labels=batch["labels"].reshape(-1), ignore_index=ignore_index, reduction="mean",
        normalizer=normalizer, ce_weight=0.0, kd_weight=kd_weight, backend=backend)


def check_teacher(student: LMParts, teacher: Optional[LMParts]) -> None:
    """On-policy distillation needs a live teacher over the student's vocabulary."""
    if teacher is None:
        raise ValueError("on_policy_fraction > 0 needs the live teacher model (train(..., "
                         "teacher=model)): the student's own samples have no cached teacher slots")
    vs, vt = student.weight.shape[0], teacher.weight.shape[0]
    if vs != vt:
        raise ValueError(f"on-policy distillation needs one vocabulary: the student's LM head has "
                         f"{vs} rows, the teacher's {vt} (the teacher must score the ids the "
                         "student samples)")


class OnPolicy:
    """The training loop's on-policy part, built from TrainConfig.on_policy_* (docs/onpolicy.md).

    prepare(): replaces the chosen micro-batches of a step by rollouts of the current student.
    loss(): the on-policy micro-batch loss. offline_teacher(): the teacher of the other batches
    (their cached slots when the batch has them, else the live teacher)."""

    def __init__(self, cfg, model: torch.nn.Module, student: LMParts, teacher: Optional[LMParts]):
        f = cfg.on_policy_fraction
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {f}")
        if cfg.on_policy_max_new_tokens < 1:
            raise ValueError(f"on_policy_max_new_tokens must be >= 1, got {cfg.on_policy_max_new_tokens}")
        if cfg.on_policy_prompt_len < 1:
            raise ValueError(f"on_policy_prompt_len must be >= 1, got {cfg.on_policy_prompt_len}")
        if not cfg.on_policy_temperature > 0:
            raise ValueError(f"on_policy_temperature must be > 0, got {cfg.on_policy_temperature}")
        if cfg.domain_reweight:
            raise NotImplementedError("domain_reweight with on-policy batches is not supported "
                                      "(a rollout has no domain statistics)")
        check_teacher(student, teacher)
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.eos = eos_ids(model)

    def prepare(self, micro: list, step: int, micro_ids: Sequence[int], device,
                use_bf16: bool) -> list:
        c = self.cfg
        out = []
        for b, m in zip(micro, micro_ids):
            if not is_on_policy(c.on_policy_fraction, c.seed, step, m):
                out.append(b)
                continue
            prompts = prompts_from(b, c.on_policy_prompt_len).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out.append(rollout(self.student, prompts, c.on_policy_max_new_tokens,
                                   temperature=c.on_policy_temperature,
                                   generator=rollout_generator(c.seed, step, m, device),
                                   eos_token_id=self.eos, pad_id=c.pad_id,
                                   ignore_index=c.ignore_index, backend=c.backend))
        return out

    def loss(self, batch: dict, normalizer) -> torch.Tensor:
        c = self.cfg
        return on_policy_loss(self.student, self.teacher, batch, divergence=c.on_policy_divergence,
                              beta=c.on_policy_beta, temperature=c.temperature,
                              kd_weight=c.kd_weight, ignore_index=c.ignore_index,
                              normalizer=normalizer, backend=c.backend)

    def offline_teacher(self, batch: dict) -> Optional[LMParts]:
        return None if "teacher_ids" in batch else self.teacher
