"""kernels.py - the compute kernels of the C core as plain functions on numpy float32 arrays.

Every function validates its arguments (TypeError for a wrong type or dtype, ValidationError -
a ValueError - for a wrong shape or value, each naming the argument), then runs in C without
the GIL, so calls from several Python threads run in parallel. Each takes `threads=` (None:
`smallmind.get_num_threads()`); results are bitwise identical for any thread count. Forward
kernels write their outputs; backward kernels ACCUMULATE into the gradient arrays given.
Every optimized kernel has a `*_naive` twin (plain loops) that the tests compare against.
"""
# matrix products (csrc/sm_gemm.h)
# elementwise and row kernels of a GPT step (csrc/sm_ops.h)
# causal attention and the KV cache (csrc/sm_attention.h)
from ._core import (
    ATTENTION_BLOCK,
    adamw_step,
    adamw_step_naive,
    attention_backward,
    attention_backward_naive,
    attention_decode,
    attention_decode_naive,
    attention_dropout_mask,
    attention_forward,
    attention_forward_naive,
    bf16_backend,
    bias_add,
    bias_add_naive,
    bias_backward,
    bias_backward_naive,
    clip_grad_norm,
    clip_grad_norm_naive,
    cross_entropy_backward,
    cross_entropy_backward_naive,
    cross_entropy_forward,
    cross_entropy_forward_backward,
    cross_entropy_forward_naive,
    encoder_backward,
    encoder_backward_naive,
    encoder_forward,
    encoder_forward_naive,
    gelu_backward,
    gelu_backward_naive,
    gelu_forward,
    gelu_forward_naive,
    gemm_bf16,
    grad_norm,
    kv_cache_append,
    kv_cache_new,
    kv_cache_prefill,
    layernorm_backward,
    layernorm_backward_naive,
    layernorm_forward,
    layernorm_forward_naive,
    linear,
    matmul,
    residual_backward,
    residual_backward_naive,
    residual_forward,
    residual_forward_naive,
    sgemm,
    sgemm_naive,
    softmax,
    softmax_naive,
)

__all__ = [
    "matmul", "sgemm", "sgemm_naive", "gemm_bf16", "bf16_backend", "linear",
    "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
    "gelu_forward", "gelu_backward", "softmax", "cross_entropy_forward", "cross_entropy_backward",
    "cross_entropy_forward_backward", "residual_forward", "residual_backward", "bias_add",
    "bias_backward", "adamw_step", "grad_norm", "clip_grad_norm",
    "encoder_forward_naive", "encoder_backward_naive", "layernorm_forward_naive",
    "layernorm_backward_naive", "gelu_forward_naive", "gelu_backward_naive", "softmax_naive",
    "cross_entropy_forward_naive", "cross_entropy_backward_naive", "residual_forward_naive",
    "residual_backward_naive", "bias_add_naive", "bias_backward_naive", "adamw_step_naive",
    "clip_grad_norm_naive",
    "attention_forward", "attention_forward_naive", "attention_backward",
    "attention_backward_naive", "attention_decode", "attention_decode_naive",
    "attention_dropout_mask",
    "kv_cache_new", "kv_cache_prefill", "kv_cache_append", "ATTENTION_BLOCK",
]
