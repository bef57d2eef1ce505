"""The minimal distillation loop: AdamW, gradient accumulation with a global normalizer, bf16
autocast on GPU, logging (loss, tokens/s, peak memory), checkpoint save/resume, optional DDK.

One optimizer step of `grad_accum` micro-batches minimizes

    L = (1 / n) * sum over micro-batches m, counted rows t of loss_row(m, t),
    n = number of counted (label != ignore_index) tokens of all micro-batches of the step,

so accumulating gives the same gradient as one big batch (each micro-batch's mean uses the same
denominator n, passed as `normalizer=`).

Under torch.distributed (a process group initialized by the caller, e.g. torchrun), each of the W
ranks takes micro-batches m * W + rank of the step, n is all-reduced over the ranks, and the
gradients are summed over the ranks after the step's backward passes: every rank then holds the
gradient of the single-process step with grad_accum * W micro-batches (docs/scaling.md).
A student sharded with FSDP2 (fully_shard per layer and at the root) runs each loss as a forward of
the root (the LM head is gathered), with normalizer n / W because FSDP averages its reduce-scattered
gradients, and checkpoints full state dicts (kdkernels/distributed/fsdp.py).
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import ddk as D
from . import onpolicy as OP
from .data import StepSampler, collate
from .lora import save_adapter
from .model_parts import LMParts, lm_parts
from .objective import Objective, micro_batch_loss, teacher_ce_rows


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8               # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    max_grad_norm: Optional[float] = 1.0
    # objective (docs/semantics.md)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    divergence: str = "forward_kl"
    akl_mu: float = 0.5               # the head mass of divergence="akl"
    temperature: float = 1.0          # must equal a cache's temperature
    tail: str = "bucket"
    values: str = "logprobs"          # a cache's value kind
    ignore_index: int = -100
    pad_id: int = 0
    backend: Optional[str] = None
    # runtime
    seed: int = 0
    device: str = "auto"              # "auto": cuda if available, else cpu
    bf16: Optional[bool] = None       # None: bf16 autocast on CUDA only
    log_every: int = 10
    out_dir: Optional[str] = None     # checkpoints go here
    save_every: int = 0               # 0: save only at the end (when out_dir is set)
    resume: bool = True
    # DDK (kdkernels/train/ddk.py)
    domain_reweight: bool = False
    reweight_every: int = 10
    reweight_tau: float = 1.0
    reweight_mix: float = 0.2
    reweight_momentum: float = 0.5
    # on-policy distillation (kdkernels/train/onpolicy.py, docs/onpolicy.md): this fraction of the
    # micro-batches are student rollouts scored by the live teacher (train(..., teacher=))
    on_policy_fraction: float = 0.0
    on_policy_max_new_tokens: int = 32
    on_policy_prompt_len: int = 32    # prompt = first min(this, shortest example) tokens
    on_policy_temperature: float = 1.0   # sampling temperature (the loss uses `temperature`)
    on_policy_divergence: str = "reverse_kl"
    on_policy_beta: float = 0.5       # jsd's beta

    def objective(self) -> Objective:
        return Objective(kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                         divergence=self.divergence, temperature=self.temperature, tail=self.tail,
                         values=self.values, ignore_index=self.ignore_index, backend=self.backend,
                         mu=self.akl_mu)


@dataclass
class TrainResult:
    step: int
    history: list = field(default_factory=list)     # one dict per logged step
    domain_weights: Optional[list] = None
    domain_stats: Optional[dict] = None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to min_lr_ratio over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: torch.cuda.max_memory_allocated. CPU: the process's RSS high-water mark (ru_maxrss),
    which includes everything the process ever held, not only tensors."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _domains(data: Sequence[dict]) -> list[int]:
    try:
        return [int(data[i]["domain"]) for i in range(len(data))]
    except KeyError:
        raise ValueError("domain_reweight=True needs an int 'domain' in every example") from None


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sync_start(model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, src=0)


def _fsdp_helpers(model: torch.nn.Module):
    """kdkernels.distributed.fsdp when fully_shard (FSDP2) was applied to the student, else None.
    Imported here; it imports FSDP only when the caller already did."""
    from ..distributed import fsdp
    return fsdp if fsdp.is_fsdp2(model) else None


def _sum_grads(params) -> None:
    """Sum the step's gradients over the ranks (a parameter unused on a rank contributes 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def train(model: torch.nn.Module, data: Sequence[dict], cfg: TrainConfig, *,
          teacher: Optional[torch.nn.Module] = None,
          collate_fn: Optional[Callable] = None,
          log: Optional[Callable[[dict], None]] = print) -> TrainResult:
    """Distill into `model` (a causal LM, trained in place) from cached teacher slots in `data`
    (examples with teacher_ids/teacher_values) or from a live `teacher` model.

    `data[i]` is a dict with `input_ids` (L,) and optionally `teacher_ids`/`teacher_values` (L, k)
    and an int `domain`; `collate_fn(list_of_examples)` makes a batch (default: data.collate).
    With cfg.on_policy_fraction > 0, `teacher` (required) scores the student's rollouts and the
    other micro-batches use their cached slots when they have them (docs/onpolicy.md).
    """
    FS = _fsdp_helpers(model)            # FSDP2 student (docs/scaling.md), else None
    fsdp = FS is not None
    device = FS.train_device(model, cfg.device) if fsdp else _device(cfg.device)
    use_bf16 = (device.type == "cuda") if cfg.bf16 is None else cfg.bf16
    collate_fn = collate_fn or (lambda ex: collate(ex, cfg.pad_id, cfg.ignore_index))
    obj = cfg.objective()
    torch.manual_seed(cfg.seed)
    (model if fsdp else model.to(device)).train()     # FSDP2 placed its shards already
    student = lm_parts(model)        # under FSDP2 the head is read inside call_as_forward instead
    t_parts: Optional[LMParts] = None
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        t_parts = lm_parts(teacher)
    if fsdp and (cfg.on_policy_fraction != 0 or cfg.domain_reweight):
        raise NotImplementedError("on-policy batches and domain_reweight are not supported with an "
                                  "FSDP2 student yet")
    onp = OP.OnPolicy(cfg, model, student, t_parts) if cfg.on_policy_fraction != 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    world, rank = _world()
    sampler = StepSampler(len(data), cfg.batch_size, cfg.grad_accum * world, cfg.seed)

    ddk_on = cfg.domain_reweight
    if ddk_on and world > 1:
        raise NotImplementedError("domain_reweight under torch.distributed is not supported yet "
                                  "(the per-domain statistics are per rank)")
    domains = _domains(data) if ddk_on else None
    n_dom = max(domains) + 1 if ddk_on else 0
    dom_w = D.initial_weights(domains, n_dom) if ddk_on else None
    stats = D.DomainStats(n_dom) if ddk_on else None
    last_means = stats.means() if ddk_on else None

    step, history = 0, []
    if cfg.out_dir and cfg.resume:
        restored = ckpt.load(cfg.out_dir, model=model, optimizer=opt, scheduler=sched,
                             map_location="cpu" if fsdp else device,
                             set_state=(lambda ms, os_: FS.load_full_state(model, opt, ms, os_))
                             if fsdp else None)
        if restored is not None:
            step, extra = restored
            history = extra.get("history", [])
            if ddk_on:
                dom_w = extra["domain_weights"].clone()
                stats.load_state_dict(extra["domain_stats"])

    if world > 1:
        FS.sync_start(model) if fsdp else _sync_start(model)

    def save():
        full = FS.full_state(model, opt) if fsdp else (None, None)   # a collective: every rank
        if rank != 0:
            torch.distributed.barrier()
            return
        extra = {"history": history, "config": asdict(cfg)}
        if ddk_on:
            extra.update(domain_weights=dom_w, domain_stats=stats.state_dict())
        ckpt.save(cfg.out_dir, model=model, optimizer=opt, scheduler=sched, step=step, extra=extra,
                  model_state=full[0], optimizer_state=full[1])
        save_adapter(model, cfg.out_dir)      # PEFT students: out_dir/adapter (docs/lora.md)
        if world > 1:
            torch.distributed.barrier()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_last, tok_since = time.perf_counter(), 0
    while step < cfg.steps:
        ex_w = D.example_weights(dom_w, domains) if ddk_on else None
        micro = [collate_fn([data[i] for i in sampler.indices(step, m * world + rank, ex_w)])
                 for m in range(cfg.grad_accum)]
        if onp is not None:   # the chosen micro-batches become rollouts of the current student
            micro = onp.prepare(micro, step, [m * world + rank for m in range(cfg.grad_accum)],
                                device, use_bf16)
        counts = [int((b["labels"] != cfg.ignore_index).sum()) for b in micro]  # CPU tensors: no sync
        n_tokens = sum(counts)
        if world > 1:   # the global count: every rank's mean uses the same denominator
            n_all = torch.tensor([n_tokens], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(n_all)
            n_tokens = int(n_all)
        # FSDP2 averages gradients over the ranks: each rank's losses use n / world (fsdp.py)
        normalizer = torch.tensor(float(max(n_tokens, 1)) / (world if fsdp else 1), device=device)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, b in enumerate(micro):
            b = _to(b, device)
            if fsdp:   # one reduce-scatter per step, in the last micro-batch's backward
                model.set_requires_gradient_sync(i == len(micro) - 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if onp is not None and b.get("on_policy", False):
                    loss, rows = onp.loss(b, normalizer), None
                elif fsdp:   # inside FSDP forwards, so that the LM head is gathered
                    loss, rows = FS.micro_batch_loss(model, b, obj, teacher=t_parts,
                                                     normalizer=normalizer), None
                else:
                    loss, rows = micro_batch_loss(
                        student, b, obj, teacher=t_parts if onp is None else onp.offline_teacher(b),
                        normalizer=normalizer, per_row=ddk_on)
            loss.backward()
            loss_sum += loss.detach()
            if ddk_on:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    tce = teacher_ce_rows(b, obj, t_parts)
                labels = b["labels"].reshape(-1)
                row_dom = b["domain"][:, None].expand_as(b["labels"]).reshape(-1)
                stats.add(rows, tce, labels != cfg.ignore_index, row_dom)
        if fsdp:   # FSDP averaged its (DTensor) gradients; each rank's loss is world x its share
            FS.average_unsharded_grads(params, world)
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= world
        elif world > 1:
            _sum_grads(params)
            torch.distributed.all_reduce(loss_sum)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                     if cfg.max_grad_norm else None)
        opt.step()
        sched.step()
        step += 1
        tok_since += n_tokens
        if ddk_on and step % cfg.reweight_every == 0:
            target = D.target_weights(stats, cfg.reweight_tau, cfg.reweight_mix)
            dom_w = (1 - cfg.reweight_momentum) * dom_w + cfg.reweight_momentum * target
            last_means = stats.means()
            stats.reset()
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            rec = {"step": step, "loss": float(loss_sum), "lr": sched.get_last_lr()[0],
                   "tokens": n_tokens, "tokens_per_s": tok_since / max(now - t_last, 1e-9),
                   "peak_mem_bytes": peak_memory_bytes(device)}
            if grad_norm is not None:
                rec["grad_norm"] = FS.scalar(grad_norm) if fsdp else float(grad_norm)
            if onp is not None:
                rec["on_policy_micro_batches"] = sum(bool(b.get("on_policy", False)) for b in micro)
            if ddk_on:
                kd, tce = stats.means() if stats.tokens.sum() > 0 else last_means
                rec.update(domain_weights=dom_w.tolist(), domain_kd=kd.tolist(),
                           domain_teacher_ce=tce.tolist())
            history.append(rec)
            if log is not None and rank == 0:
                log(rec)
            t_last, tok_since = now, 0
        if cfg.out_dir and cfg.save_every and step % cfg.save_every == 0:
            save()
    if cfg.out_dir:
        save()
    return TrainResult(step, history, dom_w.tolist() if ddk_on else None,
                       stats.state_dict() if ddk_on else None)
