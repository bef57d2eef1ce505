"""`kdkernels cache inspect`: totals, bytes per token and per stored (id, value) entry, tail-mass
and next-token statistics, read from the manifest and the shards' fixed-width side arrays (no
stream decoding, so it is fast on large caches)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import manifest as M
from .codec import Codec
from .shard import Shard


def summarize(directory) -> dict:
    directory = Path(directory)
    m = M.read(directory)
    if m is None:
        raise FileNotFoundError(f"no kdkernels cache in {directory} (manifest.json missing)")
    t = m["totals"]
    st = m["settings"]
    codec = Codec(m["mode"], m["vocab_size"], m["k"] or m["draws"], st["lossless"],
                  m["encodings"]["value_step"] or 1.0)
    stream_bytes, tails, lpn, counts = 0, [], [], []
    for s in m["shards"]:
        sec = Shard(directory / s["name"], s["bytes"]).sections
        stream_bytes += int(sec["stream"].nbytes) + (int(sec["values"].nbytes) if "values" in sec else 0)
        if "tail" in sec:
            tails.append(codec.scalars(sec["tail"]))
        lpn.append(codec.scalars(sec["lp_next"]))
        if "count" in sec:
            counts.append(np.asarray(sec["count"], dtype=np.int64))
    out = {"directory": str(directory), "complete": m["complete"], "mode": m["mode"],
           "values": m["values"], "k": m["k"], "draws": m["draws"], "temperature": m["temperature"],
           "vocab_size": m["vocab_size"], "teacher": m["teacher"]["path"],
           "teacher_class": m["teacher"]["class"], "encodings": m["encodings"],
           "shards": f"{len(m['shards'])}/{m['num_shards']}", "sequences": t["sequences"],
           "tokens": t["tokens"], "entries": t["entries"], "bytes": t["bytes"],
           "bytes_per_token": t["bytes"] / max(t["tokens"], 1),
           "bytes_per_entry": t["bytes"] / max(t["entries"], 1),
           "entry_bytes_per_entry": stream_bytes / max(t["entries"], 1)}
    if counts:
        c = np.concatenate(counts)
        out["unique_ids_per_position"] = {"mean": float(c.mean()), "max": int(c.max())}
    if tails:
        mass = np.exp(np.concatenate(tails).astype(np.float64))
        out["tail_mass"] = {"mean": float(mass.mean()), "median": float(np.median(mass)),
                            "p90": float(np.quantile(mass, 0.9)), "p99": float(np.quantile(mass, 0.99)),
                            "max": float(mass.max())}
    lp = np.concatenate(lpn).astype(np.float64) if lpn else np.zeros(0)
    lp = lp[~np.isnan(lp)]
    if lp.size:
        out["teacher_next_token"] = {"mean_nll": float(-lp.mean()), "perplexity": float(np.exp(-lp.mean()))}
    return out


def format_summary(s: dict) -> str:
    lines = [f"cache {s['directory']}  ({'complete' if s['complete'] else 'INCOMPLETE'}, shards {s['shards']})",
             f"  teacher      {s['teacher_class']} from {s['teacher'] or '(in-memory model)'}, vocab {s['vocab_size']}",
             f"  mode         {s['mode']} ({s['values']}), " +
             (f"k={s['k']}" if s['mode'] == 'topk' else f"draws={s['draws']}") +
             f", temperature {s['temperature']}",
             f"  encodings    {s['encodings']}",
             f"  totals       {s['sequences']} sequences, {s['tokens']} tokens, {s['entries']} entries, "
             f"{s['bytes']} bytes",
             f"  size         {s['bytes_per_token']:.2f} bytes/token, {s['bytes_per_entry']:.3f} bytes/entry "
             f"({s['entry_bytes_per_entry']:.3f} for the (id, value) streams alone)"]
    if "unique_ids_per_position" in s:
        u = s["unique_ids_per_position"]
        lines.append(f"  unique ids   {u['mean']:.2f} per position on average, at most {u['max']}")
    if "tail_mass" in s:
        t = s["tail_mass"]
        lines.append(f"  tail mass    mean {t['mean']:.4f}, median {t['median']:.4f}, p90 {t['p90']:.4f}, "
                     f"p99 {t['p99']:.4f}, max {t['max']:.4f}  (1 - sum of the top-k probabilities)")
    if "teacher_next_token" in s:
        n = s["teacher_next_token"]
        lines.append(f"  next token   teacher NLL {n['mean_nll']:.4f} nats (perplexity {n['perplexity']:.2f})")
    return "\n".join(lines)
