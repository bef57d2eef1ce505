"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only` collects benchmarks/bench_*.py.

Shapes are small on CPU (a couple of minutes) and training-sized on CUDA; the device is checked
inside each benchmark, never at collection. For the sweep with plots use `kdkernels bench`.
"""
from __future__ import annotations

import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
