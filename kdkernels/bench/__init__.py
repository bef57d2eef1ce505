"""Benchmarks of the fused KD ops against naive PyTorch and other libraries (`kdkernels bench`).

See docs/benchmarks.md. Nothing here is imported by `import kdkernels`.
"""
