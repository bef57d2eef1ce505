"""manifest.json: what a cache holds and which shards are complete (docs/cache-format.md).

The manifest is a pure function of the build settings and of the complete shards (no time stamps,
no process counts), written atomically (tmp, fsync, rename, fsync dir). It only ever lists shards
whose files were complete under their final name before the manifest was written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .shard import atomic_write

FORMAT = "kdkernels-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class SettingsMismatch(ValueError):
    """A build into a directory that holds a cache built with different settings."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.kdc"


def read(directory: Path) -> Optional[dict]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdkernels cache manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has cache format version {m.get('format_version')}; this kdkernels "
                         f"reads version {FORMAT_VERSION}")
    return m


def write(directory: Path, manifest: dict) -> None:
    blob = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(Path(directory) / MANIFEST, blob, point="manifest_before_rename")


def compose(settings: dict, teacher: dict, encodings: dict, num_shards: int,
            shards: list[dict], kdk_version: str) -> dict:
    shards = sorted(shards, key=lambda s: s["index"])
    totals = {key: sum(s[key] for s in shards) for key in ("sequences", "tokens", "entries", "bytes")}
    totals["max_id"] = max((s["max_id"] for s in shards), default=-1)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdkernels_version": kdk_version,
        "complete": len(shards) == num_shards,
        "mode": settings["mode"],
        "values": "logprobs" if settings["mode"] == "topk" else "weights",
        "k": settings["k"],
        "draws": settings["draws"],
        "temperature": settings["temperature"],
        "vocab_size": teacher["vocab_size"],
        "encodings": encodings,
        "teacher": teacher,
        "settings": settings,
        "num_shards": num_shards,
        "shards": shards,
        "totals": totals,
    }


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {a!r}, this build asks for {b!r}")
    return out
