"""A Hugging Face causal LM as a teacher: its body's final hidden states and its LM head, so that
`linear_topk` / `linear_sample` see the logits one row block at a time and the (N, V) logits of a
batch are never materialized.

For every supported model the teacher's logits are

    z = softcap_c( s * (h W^T + b) )        h = final (normed) hidden state of the body,
                                            W = output embedding (the input embedding when tied),
                                            b = LM-head bias or none, s = logit scale, c = softcap

with s = config.logit_scale (Cohere), 1 / config.logits_scaling (Granite), else 1, and
c = config.final_logit_softcapping (Gemma 2/3) or none. `TeacherHead.hidden(h)` returns s * h and the
head keeps s * b, so (s h) W^T + s b is exactly s (h W^T + b). transformers is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .heads import linear_sample, linear_topk


@dataclass
class TeacherHead:
    weight: torch.Tensor            # (V, H), the model's dtype
    bias: Optional[torch.Tensor]    # (V,) already multiplied by `scale`, or None
    scale: float                    # logit scale s (multiplies h)
    softcap: Optional[float]        # final logit softcap c, or None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.scale == 1.0 else h * self.scale

    def topk(self, h: torch.Tensor, k: int, temperature: float = 1.0, backend=None):
        return linear_topk(self.hidden(h), self.weight, k, temperature=temperature, bias=self.bias,
                           softcap=self.softcap, backend=backend)

    def sample(self, h: torch.Tensor, draws: int, temperature: float = 1.0, generator=None,
               backend=None):
        return linear_sample(self.hidden(h), self.weight, draws, temperature=temperature,
                             generator=generator, bias=self.bias, softcap=self.softcap,
                             backend=backend)

    def logprob_of(self, h: torch.Tensor, ids: torch.Tensor, logsumexp: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
        """log p(ids[r] | row r) = z_r[ids[r]] / T - LSE_r, float32; only the rows' own columns of W
        are read. `logsumexp` is the LSE of z/T that linear_topk / linear_sample return."""
        hs = self.hidden(h).float()
        z = (hs * self.weight[ids].float()).sum(-1)
        if self.bias is not None:
            z = z + self.bias[ids].float()
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / temperature - logsumexp.float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The full (..., V) logits z in float32 (tests and small inputs only)."""
        z = self.hidden(h).float() @ self.weight.float().T
        if self.bias is not None:
            z = z + self.bias.float()
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def teacher_head(model) -> TeacherHead:
    """The LM head of a transformers causal LM (tied or not), with its logit scale and softcap."""
    out = model.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head)")
    cfg = _text_config(model.config)
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:          # Cohere: logits * logit_scale
        scale = float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):  # Granite: logits / logits_scaling
        scale = 1.0 / float(cfg.logits_scaling)
    bias = getattr(out, "bias", None)
    if bias is not None:
        bias = bias.detach() * scale if scale != 1.0 else bias.detach()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return TeacherHead(out.weight.detach(), bias, scale, float(softcap) if softcap else None)


def body(model):
    """The decoder stack without the LM head (its output is the final, normed hidden state)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get = getattr(model, "get_decoder", None)
        base = get() if callable(get) else None
    if base is None or base is model:
        raise ValueError(f"cannot find the body of {type(model).__name__} (no base_model/get_decoder)")
    return base


@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, L, H) final hidden states of the body for right-padded `input_ids`."""
    out = body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h


def _split_gguf(path: Path, gguf_file: Optional[str]) -> tuple[Path, Optional[str]]:
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        return path.parent, path.name
    if gguf_file is None and path.is_dir() and not (path / "config.json").exists():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) == 1:
            return path, found[0]
    return path, gguf_file


def resolve_source(path: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """(directory, gguf file name or None) for a model directory, a .gguf path, or a directory
    holding exactly one .gguf file and no config.json."""
    return _split_gguf(Path(path).expanduser().resolve(), gguf_file)


def load_teacher(path: Union[str, os.PathLike], *, gguf_file: Optional[str] = None,
                 dtype: Union[str, torch.dtype] = torch.float32, device="cpu"):
    """(model, tokenizer) from a local directory or GGUF file, offline (no hub access).

    Loading a GGUF file needs the `gguf` package (and `accelerate` with a CUDA build of torch)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve_source(path, gguf_file)
    if not directory.exists():
        raise FileNotFoundError(f"teacher not found: {directory}")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kw)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def config_hash(model) -> str:
    """sha256 of the model config (sorted JSON, without the transformers version)."""
    d = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                "_attn_implementation_autoset", "_attn_implementation"):
        d.pop(key, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tokenizer_hash(tokenizer) -> Optional[str]:
    """sha256 of a tokenizer's vocabulary (token -> id, added tokens included) and special-token
    ids; None for no tokenizer. Equal hashes mean the same text -> ids mapping table."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    specials = {name: getattr(tokenizer, name, None) for name in
                ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    blob = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), specials], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
