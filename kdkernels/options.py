"""The options every loss carries, as one frozen dataclass read by every backend.

Field meanings are specified in docs/semantics.md. Construction validates names and ranges, so a
backend may assume a well-formed `KDOptions`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl")
TAILS = ("bucket", "renorm_teacher", "renorm_both")
VALUES = ("logprobs", "weights")
REDUCTIONS = ("mean", "sum", "none")

# Tail masses are clamped below at this value in log space (docs/semantics.md, "Tail modes").
LOG_TAIL_FLOOR = math.log(1e-30)


def default_chunk_bytes() -> int:
    """Budget for the torch backend's temporaries: env KDKERNELS_CHUNK_MB, default 256 MiB."""
    mb = os.environ.get("KDKERNELS_CHUNK_MB", "256")
    try:
        value = float(mb)
    except ValueError:
        raise ValueError(f"KDKERNELS_CHUNK_MB must be a number of MiB, got {mb!r}") from None
    if value <= 0:
        raise ValueError(f"KDKERNELS_CHUNK_MB must be > 0, got {mb!r}")
    return int(value * 2**20)


def _check_open_unit(name: str, value: float, divergence: str) -> None:
    if not (0.0 < value < 1.0):
        hint = ""
        if divergence == "jsd" and value in (0.0, 1.0):
            hint = (" (jsd is identically 0 at beta=0 or 1; use divergence='forward_kl' or "
                    "'reverse_kl' by name)")
        raise ValueError(f"{name} must be in the open interval (0, 1) for divergence="
                         f"{divergence!r}, got {value}{hint}")


@dataclass(frozen=True)
class KDOptions:
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5          # jsd mixing weight
    alpha: float = 0.1         # skew mixing weight
    mu: float = 0.5            # akl: teacher head mass
    akl_head_max: int = 256    # akl: at most this many tokens in the head set
    scale_by_temperature_squared: bool = True
    ignore_index: int = -100
    ce_weight: float = 0.0
    kd_weight: float = 1.0
    vocab_size: Optional[int] = None
    # sparse teacher only
    values: str = "logprobs"
    tail: str = "bucket"
    # fused linear only
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    # torch backend memory budget in bytes
    chunk_bytes: int = field(default_factory=default_chunk_bytes)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.divergence == "jsd":
            _check_open_unit("beta", self.beta, "jsd")
        if self.divergence in ("skew_forward_kl", "skew_reverse_kl"):
            _check_open_unit("alpha", self.alpha, self.divergence)
        if self.divergence == "akl":
            _check_open_unit("mu", self.mu, "akl")
            m = self.akl_head_max
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise ValueError(f"akl_head_max must be an int >= 1, got {m!r}")
        for name in ("ce_weight", "kd_weight"):
            w = getattr(self, name)
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if self.values not in VALUES:
            raise ValueError(f"values must be one of {VALUES}, got {self.values!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        for name in ("student_softcap", "teacher_softcap"):
            c = getattr(self, name)
            if c is not None and (not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {c!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise ValueError(f"vocab_size must be None or a positive int, got {self.vocab_size!r}")
        if not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {self.chunk_bytes}")

    def check_sparse(self) -> None:
        """Combinations that are meaningless for a sparse teacher (docs/semantics.md)."""
        if self.divergence in ("reverse_kl", "akl"):
            d = self.divergence
            if self.tail == "renorm_teacher":
                raise ValueError(f"divergence={d!r} with tail='renorm_teacher' is infinite: the "
                                 "renormalized teacher has no mass outside its ids; use tail='bucket' "
                                 "or 'renorm_both'")
            if self.values == "weights" and self.tail != "renorm_both":
                raise ValueError(f"divergence={d!r} with values='weights' is infinite: a sampled "
                                 "teacher has no mass outside its support; use tail='renorm_both' or "
                                 "a forward divergence")

    @property
    def kd_scale(self) -> float:
        """kd_weight * T^2 (or kd_weight): the factor in front of the divergence."""
        s = self.temperature ** 2 if self.scale_by_temperature_squared else 1.0
        return self.kd_weight * s
