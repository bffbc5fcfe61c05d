"""kernels.py - the compute kernels of the C core as plain functions on numpy float32 arrays.

Every function validates its arguments (TypeError for a wrong type or dtype, ValidationError -
a ValueError - for a wrong shape or value, each naming the argument), then runs in C without
the GIL, so calls from several Python threads run in parallel. Each takes `threads=` (None:
`smallmind.get_num_threads()`); results are bitwise identical for any thread count.
"""
from ._core import matmul, sgemm, sgemm_naive  # noqa: F401

__all__ = ["matmul", "sgemm", "sgemm_naive"]
