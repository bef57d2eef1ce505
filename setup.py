"""Build hook: the package is pure Python; the optional csrc extension is added when
KDKERNELS_BUILD_CUDA allows (auto|0|1, default auto: only where nvcc and a CUDA build of torch exist).
The native backend otherwise compiles itself on first use (kdkernels/backends/native/)."""
from setuptools import setup

setup()
