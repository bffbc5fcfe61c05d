"""kernels.py - the compute kernels of the C core as plain functions on numpy float32 arrays.

Every function validates its arguments (TypeError for a wrong type or dtype, ValidationError -
a ValueError - for a wrong shape or value, each naming the argument), then runs in C without
the GIL, so calls from several Python threads run in parallel. Each takes `threads=` (None:
`smallmind.get_num_threads()`); results are bitwise identical for any thread count.
"""
from ._core import matmul, sgemm, sgemm_naive  # noqa: F401

__all__ = ["matmul", "sgemm", "sgemm_naive"]
from ._core import (  # noqa: F401,E402
    ATTENTION_BLOCK, attention_backward, attention_backward_naive, attention_decode,
    attention_decode_naive, attention_forward, attention_forward_naive, kv_cache_append,
    kv_cache_new, kv_cache_prefill,
)

__all__ += ["attention_forward", "attention_forward_naive", "attention_backward",
            "attention_backward_naive", "attention_decode", "attention_decode_naive",
            "kv_cache_new", "kv_cache_prefill", "kv_cache_append", "ATTENTION_BLOCK"]
