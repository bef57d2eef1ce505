"""The pure-Python parts of benchmarks/gpu_kernels.py (the GPU runs happen only on a GPU machine):
argument parsing, percentile summary, floor ratios, CSV + Markdown writing. Importing the script
must not need a GPU."""
import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_kernels", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_parse_args(bench):
    a = bench.parse_args([])
    assert (a.rows, a.hidden, a.vocab, a.k, a.dtype) == (16384, 4096, 128256, 64, "bf16")
    q = bench.parse_args(["--quick", "--ops", "sparse,topk", "--providers", "triton,gemm", "--vocab", "1031"])
    assert (q.rows, q.vocab, q.ops, q.providers, q.repeat) == (4096, 1031, ("sparse", "topk"), ("triton", "gemm"), 5)
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "nope"])


def test_summarize(bench):
    assert bench.summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, 1.0, 4.0)
    assert all(math.isnan(x) for x in bench.summarize([]))


def test_tables(bench, tmp_path):
    rows = [bench.Row("sparse", "gemm", "N=1", "bf16", 10.0, 9.0, 11.0, 5.0),
            bench.Row("sparse", "triton", "N=1", "bf16", 12.5, 12.0, 13.0, 7.0),
            bench.Row("sparse", "liger", "N=1", "bf16", note="OOM")]
    bench.add_floor_ratios(rows)
    assert rows[1].vs_floor == 1.25 and math.isnan(rows[2].vs_floor)
    meta = {"gpu": "NVIDIA H200", "git": "abc"}
    csv_path, md_path = bench.write_results(rows, meta, tmp_path / "out")
    got = list(csv.DictReader(open(csv_path)))
    assert [r["provider"] for r in got] == ["gemm", "triton", "liger"] and got[0]["gpu"] == "NVIDIA H200"
    md = md_path.read_text()
    assert "| sparse | triton | N=1 | bf16 | 12.50 |" in md and "OOM" in md
    assert bench.slug("NVIDIA H200 (SXM)") == "nvidia-h200-sxm"


def test_main_without_gpu_says_so(bench, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: main() would run the benchmark")
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
