"""Split a causal LM into its body (token ids -> final hidden states) and its LM head.

The training loop never calls the full model: it asks the body for the final (normed) hidden
states (N, H) and hands them with the head's weight (V, H) to a fused loss, so no (N, V) logits
tensor ever exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .lora import check_student


@dataclass
class LMParts:
    body: torch.nn.Module                 # input_ids, attention_mask -> (B, L, H) final hidden states
    weight: torch.Tensor                  # (V, H) LM-head weight (a Parameter: grads flow into it)
    bias: Optional[torch.Tensor]          # (V,) or None
    softcap: Optional[float]              # final-logit softcap c (Gemma-2), None if absent


def lm_parts(model: torch.nn.Module) -> LMParts:
    """Body and head of a Hugging Face causal LM (or any module with the same accessors)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings()): "
                        "kdkernels.train needs a causal LM with a linear LM head")
    check_student(model, head)        # PEFT students: adapter methods only, never on the head
    body = None
    if hasattr(model, "get_decoder"):
        try:
            body = model.get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
    if body is None or body is model:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None or body is model:
        raise TypeError(f"cannot find the body (decoder) of {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        raise NotImplementedError("models that scale their logits (config.logit_scale) are not supported")
    softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    return LMParts(body, head.weight, getattr(head, "bias", None), softcap)


def final_hidden(parts: LMParts, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, L, H) hidden states that the LM head would multiply (after the final norm)."""
    out = parts.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
