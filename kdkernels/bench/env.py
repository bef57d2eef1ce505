"""What every benchmark row records: device, library versions, git SHA, threads."""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def git_sha() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=None)
def environment(device_type: str) -> dict:
    if device_type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    from .. import __version__
    return {"device": device, "torch": torch.__version__, "triton": _version("triton"),
            "kdkernels": __version__, "liger_kernel": _version("liger-kernel"),
            "cut_cross_entropy": _version("cut-cross-entropy"), "git_sha": git_sha(),
            "python": platform.python_version()}
