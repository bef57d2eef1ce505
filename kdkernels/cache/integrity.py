"""`kdkernels cache verify`: every listed shard present, of its recorded size and sha256, and
structurally sound (header, index and per-sequence checksums, counts equal to the manifest's)."""
from __future__ import annotations

from pathlib import Path

from . import manifest as M
from .shard import CorruptShard, Shard, file_sha256


def verify(directory) -> list[str]:
    """Problems found in the cache at `directory` (empty list: the cache is sound and complete).
    Each problem names the shard file it concerns."""
    directory = Path(directory)
    try:
        m = M.read(directory)
    except (ValueError, OSError) as e:
        return [f"manifest.json: {e}"]
    if m is None:
        return [f"manifest.json: missing in {directory}"]
    problems = []
    if not m["complete"]:
        listed = {s["index"] for s in m["shards"]}
        missing = [M.shard_name(j) for j in range(m["num_shards"]) if j not in listed]
        problems.append(f"incomplete build: {len(m['shards'])} of {m['num_shards']} shards listed; "
                        f"not listed: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for s in m["shards"]:
        path = directory / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{s['name']}: {size} bytes, manifest says {s['bytes']} (truncated or "
                            "extended)")
            continue
        if file_sha256(path) != s["sha256"]:
            problems.append(f"{s['name']}: sha256 mismatch (corrupted)")
            continue
        try:
            shard = Shard(path, s["bytes"]).open()
            h = shard.header
            for key in ("sequences", "tokens", "entries", "max_id"):
                if h[key] != s[key]:
                    raise CorruptShard(f"header {key}={h[key]} but manifest says {s[key]}")
            if h["shard"] != s["index"]:
                raise CorruptShard(f"header says shard {h['shard']}, manifest index {s['index']}")
            shard.check_all()
        except CorruptShard as e:
            problems.append(f"{s['name']}: {e}")
    return problems
