"""kernels.py - the compute kernels of the C core as plain functions on numpy float32 arrays.

Every function validates its arguments (TypeError for a wrong type or dtype, ValidationError -
a ValueError - for a wrong shape or value, each naming the argument), then runs in C without
the GIL, so calls from several Python threads run in parallel. Each takes `threads=` (None:
`smallmind.get_num_threads()`); results are bitwise identical for any thread count.
"""
from ._core import matmul, sgemm, sgemm_naive  # noqa: F401

__all__ = ["matmul", "sgemm", "sgemm_naive"]
from ._core import (  # noqa: F401,E402  (elementwise and row kernels, sm_ops.h)
    adamw_step, adamw_step_naive, bias_add, bias_add_naive, bias_backward, bias_backward_naive,
    clip_grad_norm, clip_grad_norm_naive, cross_entropy_backward, cross_entropy_backward_naive,
    cross_entropy_forward, cross_entropy_forward_backward, cross_entropy_forward_naive,
    encoder_backward, encoder_backward_naive, encoder_forward, encoder_forward_naive,
    gelu_backward, gelu_backward_naive, gelu_forward, gelu_forward_naive, grad_norm,
    layernorm_backward, layernorm_backward_naive, layernorm_forward, layernorm_forward_naive,
    residual_backward, residual_backward_naive, residual_forward, residual_forward_naive,
    softmax, softmax_naive,
)
__all__ += [
    "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
    "gelu_forward", "gelu_backward", "softmax", "cross_entropy_forward", "cross_entropy_backward",
    "cross_entropy_forward_backward", "residual_forward", "residual_backward", "bias_add",
    "bias_backward", "adamw_step", "grad_norm", "clip_grad_norm",
    "encoder_forward_naive", "encoder_backward_naive", "layernorm_forward_naive",
    "layernorm_backward_naive", "gelu_forward_naive", "gelu_backward_naive", "softmax_naive",
    "cross_entropy_forward_naive", "cross_entropy_backward_naive", "residual_forward_naive",
    "residual_backward_naive", "bias_add_naive", "bias_backward_naive", "adamw_step_naive",
    "clip_grad_norm_naive",
]
