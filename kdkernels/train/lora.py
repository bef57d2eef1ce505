"""LoRA students (LLM-Neo: knowledge distillation into low-rank adapters) for kdkernels.train.

A LoRA student keeps every base weight W0 frozen and trains, for each targeted projection,

    y = x W0^T + (alpha / r) * dropout(x) A^T B^T,    A (r, in) random, B (out, r) zero at start,

so at step 0 the student is exactly its base model. The LM head is **never** a LoRA target: the
fused losses get the head's frozen weight (V, H), autograd asks their backward for dh only
(`ctx.needs_input_grad`), and no (V, H) weight gradient, no head optimizer state and no head copy
ever exists. The body is adapted in place by peft, so kdkernels.train.lm_parts finds the same
body module and the LoRA layers are active when the loop calls it.

`peft` is an optional dependency: it is imported only by wrap_lora (clear error when missing);
the other functions here recognize a PEFT model without importing peft.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

# The linear projections of Llama-style decoder layers (Llama, Mistral, Qwen2, SmolLM2, Gemma...).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"


def _require_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA students need the optional `peft` package (pip install peft); "
                          "kdkernels itself does not depend on it") from e
    return peft


def is_peft_model(model) -> bool:
    """True for a peft.PeftModel. peft cannot have made `model` if it was never imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _head_names(model: torch.nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings())")
    return [name for name, m in model.named_modules() if m is head]


def default_targets(model: torch.nn.Module) -> Union[list[str], str]:
    """The Llama-style projection names the model has, else peft's "all-linear" (every nn.Linear of
    the body; peft leaves the output layer out of it)."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    found = [t for t in LLAMA_TARGETS if t in leaves]
    return found or "all-linear"


def wrap_lora(model: torch.nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
              target_modules: Optional[Union[Sequence[str], str]] = None):
    """A peft.PeftModel around `model` (adapted in place) with LoRA adapters of rank `rank` and
    scale alpha / rank on `target_modules` (default: default_targets(model)). Every base weight is
    frozen, the LM head included; asking for the head as a target is a ValueError."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    peft = _require_peft()
    if is_peft_model(model):
        raise ValueError("the model is already a PeftModel")
    heads = _head_names(model)
    targets = default_targets(model) if target_modules is None else target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    from peft.tuners.tuners_utils import check_target_module_exists
    for name in heads:
        if check_target_module_exists(config, name):
            raise ValueError(f"target_modules {targets!r} selects the LM head {name!r}: the head stays "
                             "frozen with kdkernels (the fused losses take its weight as is)")
    wrapped = peft.get_peft_model(model, config)
    check_student(wrapped)
    return wrapped


def check_student(model: torch.nn.Module, head: Optional[torch.nn.Module] = None) -> None:
    """Reject PEFT students the fused loop would get wrong: a LoRA-adapted LM head (the loop uses
    the head's weight, not its forward, so an adapter on it would be silently ignored) and
    prompt-learning methods (they change the model's inputs, which lm_parts' body does not see).
    A no-op for plain models."""
    if not is_peft_model(model):
        return
    cfg = model.peft_config[model.active_adapter]
    if getattr(cfg, "is_prompt_learning", False):
        raise NotImplementedError(f"PEFT method {cfg.peft_type} changes the inputs; kdkernels.train "
                                  "supports adapter methods such as LoRA")
    head = head if head is not None else model.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise NotImplementedError("the LM head carries a PEFT adapter; kdkernels.train needs a plain "
                                  "(frozen or trained) head weight: leave the head out of target_modules")


def trainable_summary(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts, and the bytes of fp32 gradients + AdamW state (3
    floats per trainable parameter) that training allocates for them."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": train, "total": total, "fraction": train / max(total, 1),
            "grad_and_adam_bytes": 12 * train}


def save_adapter(model: torch.nn.Module, out_dir) -> Optional[Path]:
    """model.save_pretrained into out_dir/adapter for a PEFT model (None otherwise).

    Written into a temporary directory first and renamed: a crash leaves either the previous
    adapter (at `adapter`, or at `adapter.old` during the instant between the two renames) or the
    new one, never a half-written directory."""
    if not is_peft_model(model):
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, tmp, old = out / ADAPTER_DIR, out / (ADAPTER_DIR + ".tmp"), out / (ADAPTER_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)            # a directory cannot be renamed over a non-empty one
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
