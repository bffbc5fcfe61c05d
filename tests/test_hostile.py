"""test_hostile.py - systematic bad input for every public entry point: wrong Python types and
dtypes, non-contiguous, misaligned and zero-sized arrays, negative / huge / NaN / infinite
values, out-of-range token ids, sizes whose products overflow, use after dispose(), hostile
files, command lines and HTTP bodies. Each case expects the documented exception (naming the
argument where the message does) and then checks that nothing was corrupted: the pool's
outstanding count, a model's logits, an index's search results are what they were before.

Cases that could crash the interpreter if a check were missing (kernels with bad shapes,
layouts or huge sizes, token ids reaching C, buffers used after they went back) run in child
processes (see the `risky_results` fixture), so a segfault or a hang fails its own case
instead of killing pytest. About 2500 cases, most generated from the tables below; ids read
`<entry point>-<argument>-<what is wrong>`.
"""
import asyncio
import json
import mmap
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import smallmind as sm
from smallmind import kernels as K
from smallmind import safetensors as st
from smallmind.config import InferenceOptions, ModelOptions, ServerOptions, TrainingOptions, load_settings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__)))
f32, i32 = np.float32, np.int32

TEXT = "the quick brown fox jumps over the lazy dog. " * 30
TOK = sm.Tokenizer(TEXT)
V = TOK.vocab_size
DEEP_JSON = "[" * 100_000 + "]" * 100_000      # nested past Python's recursion limit


def _outstanding():
    return sm.default_pool().stats()["outstanding_buffers"]


def _tiny_model(seed=1):
    return sm.TransformerModel(sm.ModelConfig(V, 16, 1, 2, 8, seed=seed)).eval()


_IDS = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], i32)


# ==== the risky cases: run in child processes ==================================================
# Each entry: id -> (thunk, expected exception class, regex the message must match or None).
RISKY = {}


def _risky(cid, thunk, exc, match=None):
    assert cid not in RISKY, cid
    RISKY[cid] = (thunk, exc, match)


def _ones(shape, dtype=f32):
    return np.ones(shape, dtype)


def _strided(shape, dtype=f32):
    """Same shape, every other element of the last axis: not C-contiguous."""
    return np.ones(tuple(shape[:-1]) + (2 * shape[-1],), dtype)[..., ::2]


def _transposed(shape, dtype=f32):
    """Same shape, Fortran order (None for 1-D: a transposed vector is contiguous)."""
    return np.ones(tuple(shape)[::-1], dtype).T if len(shape) > 1 else None


def _reversed(shape, dtype=f32):
    """Same shape, negative stride on the first axis."""
    return np.ones(shape, dtype)[::-1]


def _misaligned(shape, dtype=f32):
    n = int(np.prod(shape))
    raw = np.zeros(n * 4 + 1, np.uint8)
    return np.frombuffer(raw.data, dtype, n, 1).reshape(shape)


def _readonly(shape, dtype=f32):
    a = np.ones(shape, dtype)
    a.flags.writeable = False
    return a


_BAD_TYPES = {"str": lambda s, d: "x", "None": lambda s, d: None,
              "list": lambda s, d: np.ones(s).tolist(), "dict": lambda s, d: {"a": 1},
              "object": lambda s, d: object(), "scalar": lambda s, d: d(1)}
_BAD_DTYPES = {"float64": np.float64, "int8": np.int8, "bool": np.bool_, "complex64": np.complex64,
               "object": object, "bigendian": np.dtype(">f4")}
_BAD_LAYOUTS = {"strided": _strided, "transposed": _transposed, "reversed": _reversed,
                "misaligned": _misaligned}

# kernel -> (function, valid keyword arguments, {array argument: (shape, dtype, is an output)})
_A, _B = (4, 6), (6, 5)
_X, _C = (3, 4, 8), (8,)
_QKV = (2, 4, 12)          # B=2, T=4, C=4 with n_head=2


def _cache():
    return K.kv_cache_new(2, 2, 64, 2)


def _specs():
    k, v = _cache()
    return {
        "matmul": (K.matmul, dict(a=_ones(_A), b=_ones(_B)),
                   {"a": (_A, f32, False), "b": (_B, f32, False), "out": ((4, 5), f32, True)}),
        "sgemm": (K.sgemm, dict(a=_ones(_A), b=_ones(_B), trans_a=False),
                  {"a": (_A, f32, False), "b": (_B, f32, False), "out": ((4, 5), f32, True)}),
        "sgemm_naive": (K.sgemm_naive, dict(a=_ones(_A), b=_ones(_B)),
                        {"a": (_A, f32, False), "out": ((4, 5), f32, True)}),
        "layernorm_forward": (K.layernorm_forward, dict(x=_ones(_X), weight=_ones(_C), bias=_ones(_C)),
                              {"x": (_X, f32, False), "weight": (_C, f32, False),
                               "bias": (_C, f32, False), "out": (_X, f32, True),
                               "mean": ((3, 4), f32, True)}),
        "layernorm_backward": (K.layernorm_backward,
                               dict(dx=_ones(_X), dweight=_ones(_C), dbias=_ones(_C), dout=_ones(_X),
                                    x=_ones(_X), weight=_ones(_C), mean=_ones((3, 4)),
                                    rstd=_ones((3, 4))),
                               {"dx": (_X, f32, True), "dweight": (_C, f32, True),
                                "dout": (_X, f32, False), "rstd": ((3, 4), f32, False)}),
        "gelu_forward": (K.gelu_forward, dict(x=_ones(_X)),
                         {"x": (_X, f32, False), "out": (_X, f32, True)}),
        "gelu_backward": (K.gelu_backward, dict(dx=_ones(_X), x=_ones(_X), dout=_ones(_X)),
                          {"dx": (_X, f32, True), "x": (_X, f32, False), "dout": (_X, f32, False)}),
        "softmax": (K.softmax, dict(x=_ones(_X)), {"x": (_X, f32, False), "out": (_X, f32, True)}),
        "cross_entropy_forward": (K.cross_entropy_forward,
                                  dict(logits=_ones(_X), targets=np.zeros((3, 4), i32)),
                                  {"logits": (_X, f32, False), "targets": ((3, 4), i32, False),
                                   "lse": ((3, 4), f32, True)}),
        "cross_entropy_backward": (K.cross_entropy_backward,
                                   dict(dlogits=_ones(_X), logits=_ones(_X),
                                        targets=np.zeros((3, 4), i32), dloss=1.0),
                                   {"dlogits": (_X, f32, True), "targets": ((3, 4), i32, False),
                                    "dloss": ((3, 4), f32, False)}),
        "cross_entropy_forward_backward": (K.cross_entropy_forward_backward,
                                           dict(dlogits=_ones(_X), logits=_ones(_X),
                                                targets=np.zeros((3, 4), i32), dloss=1.0),
                                           {"logits": (_X, f32, False)}),
        "encoder_forward": (K.encoder_forward,
                            dict(idx=np.zeros((2, 3), i32), wte=_ones((10, 8)), wpe=_ones((4, 8))),
                            {"idx": ((2, 3), i32, False), "wte": ((10, 8), f32, False),
                             "wpe": ((4, 8), f32, False), "out": ((2, 3, 8), f32, True)}),
        "encoder_backward": (K.encoder_backward,
                             dict(dwte=_ones((10, 8)), dwpe=_ones((4, 8)), dout=_ones((2, 3, 8)),
                                  idx=np.zeros((2, 3), i32)),
                             {"dwte": ((10, 8), f32, True), "dout": ((2, 3, 8), f32, False),
                              "idx": ((2, 3), i32, False)}),
        "residual_forward": (K.residual_forward, dict(a=_ones(_X), b=_ones(_X)),
                             {"a": (_X, f32, False), "b": (_X, f32, False)}),
        "residual_backward": (K.residual_backward, dict(da=_ones(_X), db=_ones(_X), dout=_ones(_X)),
                              {"da": (_X, f32, True), "dout": (_X, f32, False)}),
        "bias_add": (K.bias_add, dict(out=_ones(_X), bias=_ones(_C)),
                     {"out": (_X, f32, True), "bias": (_C, f32, False)}),
        "bias_backward": (K.bias_backward, dict(dbias=_ones(_C), dout=_ones(_X)),
                          {"dbias": (_C, f32, True), "dout": (_X, f32, False)}),
        "adamw_step": (K.adamw_step, dict(param=_ones(_X), grad=_ones(_X), m=_ones(_X), v=_ones(_X),
                                          lr=0.1),
                       {"param": (_X, f32, True), "grad": (_X, f32, False), "v": (_X, f32, True)}),
        "grad_norm": (K.grad_norm, dict(grad=_ones(_X)), {"grad": (_X, f32, False)}),
        "clip_grad_norm": (K.clip_grad_norm, dict(grad=_ones(_X), max_norm=1.0),
                           {"grad": (_X, f32, True)}),
        "attention_forward": (K.attention_forward, dict(qkv=_ones(_QKV), n_head=2),
                              {"qkv": (_QKV, f32, False), "out": ((2, 4, 4), f32, True),
                               "lse": ((2, 2, 4), f32, True)}),
        "attention_backward": (K.attention_backward,
                               dict(dout=_ones((2, 4, 4)), qkv=_ones(_QKV), out=_ones((2, 4, 4)),
                                    lse=_ones((2, 2, 4)), n_head=2),
                               {"dout": ((2, 4, 4), f32, False), "qkv": (_QKV, f32, False),
                                "lse": ((2, 2, 4), f32, False), "dqkv": (_QKV, f32, True)}),
        "attention_decode": (K.attention_decode, dict(q=_ones((2, 4)), k_cache=k, v_cache=v, lengths=3),
                             {"q": ((2, 4), f32, False), "k_cache": (k.shape, f32, False),
                              "v_cache": (v.shape, f32, False), "out": ((2, 4), f32, True)}),
        "kv_cache_append": (K.kv_cache_append,
                            dict(k_cache=k.copy(), v_cache=v.copy(), qkv_row=_ones((2, 12)), positions=3),
                            {"k_cache": (k.shape, f32, True), "qkv_row": ((2, 12), f32, False)}),
        "kv_cache_prefill": (K.kv_cache_prefill,
                             dict(k_cache=k.copy(), v_cache=v.copy(), qkv=_ones(_QKV)),
                             {"v_cache": (v.shape, f32, True), "qkv": (_QKV, f32, False)}),
    }


_SPEC_NAMES = list(_specs())


def _kernel_call(name, **change):
    fn, kw, _ = _specs()[name]
    kw = dict(kw, **change)
    return lambda: fn(**kw)


_OPTIONAL_OUTPUTS = {"out", "mean", "lse", "dqkv"}     # None means "allocate it"
ACCEPTED_OR_VALIDATION = None   # expectation: either runs (valid input) or a ValidationError


def _register_kernels():
    for name in _SPEC_NAMES:
        _, _, arrays = _specs()[name]
        for arg, (shape, dtype, is_out) in arrays.items():
            for tname, make in _BAD_TYPES.items():
                if (tname == "None" and arg in _OPTIONAL_OUTPUTS) or (arg == "dloss" and tname == "scalar"):
                    continue            # valid: None allocates, a number is a valid dloss
                _risky(f"{name}-{arg}-type-{tname}",
                       (lambda n=name, a=arg, s=shape, d=dtype, m=make: _kernel_call(n, **{a: m(s, np.dtype(d).type)})()),
                       TypeError, arg)
            for dname, dt in list(_BAD_DTYPES.items()) + [("int32", i32), ("float32", f32)]:
                if np.dtype(dt) == np.dtype(dtype):
                    continue
                _risky(f"{name}-{arg}-dtype-{dname}",
                       (lambda n=name, a=arg, s=shape, d=dt: _kernel_call(n, **{a: np.ones(s, d)})()),
                       TypeError, arg)
            for lname, make in _BAD_LAYOUTS.items():
                if make(shape, dtype) is None:
                    continue
                _risky(f"{name}-{arg}-layout-{lname}",
                       (lambda n=name, a=arg, s=shape, d=dtype, m=make: _kernel_call(n, **{a: m(s, d)})()),
                       sm.ValidationError, arg)
            if is_out:
                _risky(f"{name}-{arg}-readonly",
                       (lambda n=name, a=arg, s=shape, d=dtype: _kernel_call(n, **{a: _readonly(s, d)})()),
                       sm.ValidationError, arg)
            # a zero-sized array with a dimension of 2**31: valid for some kernels (nothing to
            # do), a shape mismatch for others; never a crash or an allocation
            if len(shape) > 1:
                huge = (0,) + tuple(shape[1:-1]) + (2 ** 31,)
                _risky(f"{name}-{arg}-shape-0x2**31",
                       (lambda n=name, a=arg, h=huge, d=dtype: _kernel_call(n, **{a: np.ones(h, d)})()),
                       ACCEPTED_OR_VALIDATION, None)
            # the first axis one longer than the rest of the call expects
            if arg not in ("a", "x", "logits", "qkv", "idx", "param", "grad", "dout", "out", "q", "wte", "wpe",
                           "dwte") or name in (
                    "gelu_backward", "residual_backward", "layernorm_backward", "bias_add"):
                wrong = (shape[0] + 1,) + tuple(shape[1:])
                if not (name == "bias_add" and arg == "out"):
                    _risky(f"{name}-{arg}-shape-mismatch",
                           (lambda n=name, a=arg, w=wrong, d=dtype: _kernel_call(n, **{a: np.ones(w, d)})()),
                           sm.ValidationError, None)
        if name != "sgemm_naive":
            for tval, tid, exc in ((0, "0", sm.ValidationError), (-1, "-1", sm.ValidationError),
                                   (2 ** 31, "2**31", sm.ValidationError), (2 ** 63, "2**63", sm.ValidationError),
                                   (10 ** 30, "1e30", sm.ValidationError), ("2", "str", TypeError),
                                   (1.5, "float", TypeError), (True, "bool", TypeError)):
                _risky(f"{name}-threads-{tid}", (lambda n=name, t=tval: _kernel_call(n, threads=t)()),
                       exc, "threads")


_register_kernels()

# scalar hyperparameters: NaN, infinities, values that overflow float32, out of range, bad types
_NAN, _INF = float("nan"), float("inf")
_VE, _TE = sm.ValidationError, TypeError
for _name, _arg, _cases in [
    ("sgemm", "alpha", [(_NAN, _VE), (_INF, _VE), (1e39, _VE), ("1", _TE), (None, _TE)]),
    ("sgemm", "beta", [(_NAN, _VE), (-_INF, _VE), (1e39, _VE), ("1", _TE)]),
    ("layernorm_forward", "eps", [(_NAN, _VE), (_INF, _VE), (0.0, _VE), (-1e-5, _VE), (1e-50, _VE),
                                  (1e39, _VE), ("1e-5", _TE), (None, _TE)]),
    ("softmax", "temperature", [(_NAN, _VE), (_INF, _VE), (0.0, _VE), (-1.0, _VE), (1e-50, _VE), (1e39, _VE),
                                (None, _TE)]),
    ("adamw_step", "lr", [(_NAN, _VE), (_INF, _VE), (-0.1, _VE), (1e39, _VE), ("0.1", _TE)]),
    ("adamw_step", "beta1", [(_NAN, _VE), (1.0, _VE), (-0.1, _VE), (0.99999999999, _VE), (1e39, _VE)]),
    ("adamw_step", "beta2", [(_NAN, _VE), (1.0, _VE), (2.0, _VE)]),
    ("adamw_step", "eps", [(0.0, _VE), (-1.0, _VE), (1e-50, _VE), (_NAN, _VE)]),
    ("adamw_step", "weight_decay", [(-1.0, _VE), (_INF, _VE)]),
    ("adamw_step", "step", [(0, _VE), (-1, _VE), (2 ** 63, _VE), (1.5, _TE), ("1", _TE)]),
    ("clip_grad_norm", "max_norm", [(0.0, _VE), (-1.0, _VE), (_NAN, _VE), (_INF, _VE), (1e39, _VE),
                                    (1e-50, _VE), ("1", _TE)]),
    ("cross_entropy_backward", "dloss", [(_NAN, _VE), (_INF, _VE), (1e39, _VE), ("x", _TE), (None, _TE)]),
    ("attention_forward", "n_head", [(0, _VE), (-2, _VE), (3, _VE), (2 ** 63, _VE), (1.5, _TE), ("2", _TE),
                                     (None, _TE)]),
    ("attention_forward", "dropout", [(1.0, _VE), (-0.1, _VE), (_NAN, _VE), ("0.1", _TE)]),
    ("attention_forward", "seed", [(-1, _VE), (2 ** 63, _VE), (1.5, _TE)]),
    ("attention_decode", "lengths", [(0, _VE), (-1, _VE), (65, _VE), (2 ** 31, _VE), (2 ** 63, _VE),
                                     ([3], _VE), (np.array([3, 99]), _VE), (np.array([3, 0]), _VE),
                                     (np.array([3, -2 ** 31], np.int64), _VE), (np.array([3.0, 3.0]), _TE),
                                     (np.array([True, True]), _TE), ("3", _TE), (None, _TE)]),
    ("kv_cache_append", "positions", [(-1, _VE), (64, _VE), (2 ** 31, _VE), (np.array([0, 2 ** 32]), _VE),
                                      (np.array([0, 2 ** 64 - 1], np.uint64), _VE), (np.array([0.0, 1.0]), _TE),
                                      (None, _TE)]),
    ("kv_cache_prefill", "start", [(-1, _VE), (61, _VE), (2 ** 63, _VE), (1.5, _TE)]),
]:
    for _v, _exc in _cases:
        _risky(f"{_name}-{_arg}-{_v!r}"[:80].replace(" ", "").replace("\n", ""),
               _kernel_call(_name, **{_arg: _v}), _exc, _arg)

# ids out of range reach C as indices: every one must be refused first
for _name, _arg, _shape, _bad in [("encoder_forward", "idx", (2, 3), [-1, 10, 2 ** 31 - 1, -2 ** 31]),
                                  ("encoder_backward", "idx", (2, 3), [-1, 10, 2 ** 31 - 1]),
                                  ("cross_entropy_forward", "targets", (3, 4), [-2, 8, 2 ** 31 - 1, -2 ** 31]),
                                  ("cross_entropy_backward", "targets", (3, 4), [-2, 8]),
                                  ("cross_entropy_forward_backward", "targets", (3, 4), [-2, 8])]:
    for _v in _bad:
        _ids = np.zeros(_shape, i32)
        _ids.flat[-1] = _v
        _risky(f"{_name}-{_arg}-value-{_v}", _kernel_call(_name, **{_arg: _ids}), sm.ValidationError, _arg)

# sizes whose products overflow (or cannot be allocated): refused before any allocation
_risky("matmul-out-2**31x2**31", lambda: K.matmul(np.ones((2 ** 31, 0), f32), np.ones((0, 2 ** 31), f32)),
       sm.ValidationError, "out")
_risky("sgemm-trans-out-2**31x2**31",
       lambda: K.sgemm(np.ones((0, 2 ** 31), f32), np.ones((2 ** 31, 0), f32), trans_a=True, trans_b=True),
       sm.ValidationError, "out")
_risky("matmul-inner-2**31-mismatch", lambda: K.matmul(np.ones((0, 2 ** 31), f32), np.ones((2 ** 31 + 1, 0), f32)),
       sm.ValidationError, "inner")
_risky("kv_cache_new-2**40-each", lambda: K.kv_cache_new(2 ** 40, 2 ** 40, 2 ** 40, 2 ** 40),
       sm.ValidationError, "cache")
_risky("kv_cache_new-batch-too-big", lambda: K.kv_cache_new(2 ** 41, 1, 1, 1), sm.ValidationError, "batch")
for _arg, _v, _exc in [("batch", -1, sm.ValidationError), ("n_head", 0, sm.ValidationError),
                       ("capacity", 0, sm.ValidationError), ("head_size", 2 ** 63, sm.ValidationError),
                       ("capacity", 1.5, TypeError), ("head_size", "2", TypeError)]:
    _kw = dict(batch=1, n_head=1, capacity=64, head_size=2)
    _kw[_arg] = _v
    _risky(f"kv_cache_new-{_arg}-{_v!r}", (lambda kw=_kw: K.kv_cache_new(**kw)), _exc, _arg)
_risky("attention_dropout_mask-2**72-entries",
       lambda: K.attention_dropout_mask(2 ** 20, 2 ** 20, 2 ** 16, 0.1, 1), sm.ValidationError, "mask")
_risky("attention_dropout_mask-T-2**31", lambda: K.attention_dropout_mask(1, 1, 2 ** 31, 0.1, 1),
       sm.ValidationError, "T")
_risky("attention_forward-qkv-not-3C", lambda: K.attention_forward(np.ones((1, 2, 7), f32), 1),
       sm.ValidationError, "qkv")
_risky("attention_forward-qkv-zero-C", lambda: K.attention_forward(np.ones((1, 2, 0), f32), 1),
       sm.ValidationError, "qkv")
_risky("attention_decode-cache-mismatch",
       lambda: K.attention_decode(np.ones((1, 4), f32), K.kv_cache_new(1, 2, 64, 2)[0],
                                  K.kv_cache_new(1, 2, 128, 2)[1], 1), sm.ValidationError, "v_cache")
_risky("attention_decode-cache-overlap",
       lambda: (lambda k: K.attention_decode(np.ones((1, 4), f32), k[0], k[0].reshape(1, 2, 64, 2), 1))(
           K.kv_cache_new(1, 2, 64, 2)), sm.ValidationError, "overlap")
_risky("kv_cache_prefill-T-over-capacity",
       lambda: (lambda c: K.kv_cache_prefill(c[0], c[1], np.ones((1, 65, 12), f32)))(K.kv_cache_new(1, 2, 64, 2)),
       sm.ValidationError, "capacity")
_risky("layernorm_forward-x-zero-channels", lambda: K.layernorm_forward(np.ones((3, 0), f32), np.ones(0, f32),
                                                                        np.ones(0, f32)),
       sm.ValidationError, "x")
_risky("layernorm_forward-x-0d", lambda: K.layernorm_forward(np.array(1.0, f32), np.ones(1, f32), np.ones(1, f32)),
       sm.ValidationError, "x")
_risky("cross_entropy_forward-logits-zero-classes",
       lambda: K.cross_entropy_forward(np.ones((3, 0), f32), np.zeros(3, i32)), sm.ValidationError, "logits")
_risky("encoder_forward-wte-zero-rows",
       lambda: K.encoder_forward(np.zeros((1, 1), i32), np.ones((0, 4), f32), np.ones((4, 4), f32)),
       sm.ValidationError, "idx")
_risky("encoder_forward-idx-longer-than-wpe",
       lambda: K.encoder_forward(np.zeros((1, 5), i32), np.ones((10, 4), f32), np.ones((4, 4), f32)),
       sm.ValidationError, "wpe")
_risky("sgemm-beta-without-out", lambda: K.sgemm(_ones(_A), _ones(_B), beta=1.0), sm.ValidationError, "out")
_risky("matmul-out-overlaps-a", lambda: (lambda a: K.matmul(a[:, :4], np.ones((4, 4), f32), out=a[:, 4:]))(
    np.ones((4, 8), f32)), sm.ValidationError, None)
_risky("matmul-out-is-a", lambda: (lambda a: K.matmul(a, np.eye(4, dtype=f32), out=a))(np.ones((4, 4), f32)),
       sm.ValidationError, "overlap")
_risky("gelu_forward-out-is-x", lambda: (lambda a: K.gelu_forward(a, out=a))(np.ones(8, f32)),
       sm.ValidationError, "overlap")


def _kv_2_31():
    """A cache of 2**31 positions on lazily mapped zero pages (no memory is touched)."""
    n = 2 ** 31
    try:
        mk, mv = mmap.mmap(-1, n * 4), mmap.mmap(-1, n * 4)
    except (OSError, ValueError, OverflowError):
        return None
    return (np.frombuffer(mk, f32).reshape(1, 1, n // 64, 1, 64),
            np.frombuffer(mv, f32).reshape(1, 1, n, 1))


def _decode_2_31(lengths):
    kv = _kv_2_31()
    if kv is None:          # no room for the mapping on this machine: the case cannot be set up
        raise sm.ValidationError("lengths (skipped: cannot map 16 GiB)")
    return K.attention_decode(np.ones((1, 1), f32), kv[0], kv[1], lengths)


# C takes lengths as int: 2**31 on a cache that big used to wrap to -2**31 (decode gave NaN)
_risky("attention_decode-lengths-2**31-int-on-2**31-cache", lambda: _decode_2_31(2 ** 31),
       sm.ValidationError, "lengths")
_risky("attention_decode-lengths-2**31-array-on-2**31-cache",
       lambda: _decode_2_31(np.array([2 ** 31], np.int64)), sm.ValidationError, "lengths")


# ---- PooledBuffer / MemoryPool use after return or dispose ----------------------------------
def _released_buffer():
    pool = sm.MemoryPool(max_buffer_size=1024)
    b = pool.rent(16)
    b.release()
    return b


for _what, _fn in [("len", len), ("nbytes", lambda b: b.nbytes), ("pool", lambda b: b.pool),
                   ("asarray", np.asarray), ("memoryview", memoryview),
                   ("frombuffer", lambda b: np.frombuffer(b, f32)),
                   ("return_buffer", lambda b: b.pool.return_buffer(b))]:
    _risky(f"PooledBuffer-after-release-{_what}", (lambda f=_fn: f(_released_buffer())),
           sm.ObjectDisposedError, "returned")


def _return_twice():
    pool = sm.MemoryPool(max_buffer_size=1024)
    b = pool.rent(16)
    pool.return_buffer(b)
    pool.return_buffer(b)


_risky("MemoryPool-return_buffer-twice", _return_twice, sm.ObjectDisposedError, "returned")


def _return_with_view():
    pool = sm.MemoryPool(max_buffer_size=1024)
    b = pool.rent(16)
    view = np.asarray(b)
    try:
        b.release()
    finally:
        assert not b.released and view.shape == (16,)
        del view
        b.release()
        assert pool.stats()["outstanding_buffers"] == 0


def _raise_buffer_error_check():
    try:
        _return_with_view()
    except BufferError:
        raise
    raise AssertionError("no BufferError")


_risky("PooledBuffer-release-with-live-view", lambda: _raise_buffer_error_check(), BufferError, "view")


def _buffer_after_pool_dispose():
    pool = sm.MemoryPool(max_buffer_size=1024)
    b = pool.rent(16)
    pool.dispose()
    a = np.asarray(b)           # still valid: a buffer outlives its pool until returned
    a[:] = 3.0
    assert a.sum() == 48.0
    del a
    b.release()
    len(b)


_risky("PooledBuffer-after-pool-dispose-then-release", _buffer_after_pool_dispose,
       sm.ObjectDisposedError, "returned")
_risky("MemoryPool-rent-2**40-out-of-memory", lambda: sm.MemoryPool(max_buffer_size=1024).rent(2 ** 40),
       MemoryError, "allocate")


# ---- TransformerModel: ids reach C as embedding rows -----------------------------------------
_MODEL = {}


def _model():
    if "m" not in _MODEL:
        _MODEL["m"] = _tiny_model()
        _MODEL["logits"] = _MODEL["m"].forward(_IDS)
    return _MODEL["m"]


def _ids_with(v, dtype=np.int64):
    a = _IDS.astype(dtype)
    a[1, 2] = v
    return a


for _v in (-1, V, V + 1, 2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 63 - 1, -2 ** 63):
    _risky(f"forward-idx-value-{_v}", (lambda v=_v: _model().forward(_ids_with(v))),
           sm.ValidationError, "idx")
    if _v == -1:
        continue                    # a target of -1 is "ignored", valid
    _risky(f"forward-targets-value-{_v}", (lambda v=_v: _model().forward(_IDS, _ids_with(v))),
           sm.ValidationError, "targets")
    _risky(f"train-forward-targets-value-{_v}",
           (lambda v=_v: _model().train().forward(_IDS, _ids_with(v))), sm.ValidationError, "targets")
_risky("forward-idx-uint64-2**64-1", lambda: _model().forward(_ids_with(2 ** 64 - 1, np.uint64)),
       sm.ValidationError, "idx")
_risky("forward-idx-int32-wrapped-negative", lambda: _model().forward(_ids_with(-7, np.int32)),
       sm.ValidationError, "idx")
for _dname, _dt in [("float32", f32), ("float64", np.float64), ("bool", np.bool_),
                    ("complex", np.complex64), ("object", object), ("str", "U1")]:
    _risky(f"forward-idx-dtype-{_dname}", (lambda d=_dt: _model().forward(np.zeros((1, 2), d))),
           sm.DTypeError, "idx")
for _sname, _shape in [("0x4", (0, 4)), ("2x0", (2, 0)), ("1-D", (4,)), ("3-D", (1, 2, 2)),
                       ("0-D", ()), ("T-over-block", (1, 17))]:
    _risky(f"forward-idx-shape-{_sname}", (lambda s=_shape: _model().forward(np.zeros(s, i32))),
           sm.ValidationError, "idx")
_risky("forward-idx-2**31-positions-zero-rows",
       lambda: _model().forward(np.zeros((0, 2 ** 31), i32)), sm.ValidationError, "idx")
_risky("forward-targets-shape-mismatch", lambda: _model().forward(_IDS, _IDS[:, :3]),
       sm.ValidationError, "targets")
_risky("forward-threads-0", lambda: _model().forward(_IDS, threads=0), sm.ValidationError, "threads")
_risky("forward-threads-2**63", lambda: _model().forward(_IDS, threads=2 ** 63), sm.ValidationError, "threads")


def _backward_without_forward():
    m = _model().train()
    m.forward(_IDS)                 # no targets: nothing for backward
    m.backward()


_risky("backward-without-forward-targets", _backward_without_forward, sm.ValidationError, "forward")


def _backward_after_bad_forward():
    m = _model().train()
    m.forward(_IDS, _IDS)
    m.backward()
    with_bad = _ids_with(V)
    try:
        m.forward(_IDS, with_bad)
    except sm.ValidationError:
        pass
    try:
        m.backward()                # the refused forward must not have left a pass to replay
    finally:
        m.free_training_state()     # the valid forward's state is kept by design: give it back


def _backward_nan_scale():
    m = _model().train()
    m.forward(_IDS, _IDS)
    try:
        m.backward(loss_scale=float("nan"))
    finally:
        m.free_training_state()


_risky("backward-twice-after-refused-forward", _backward_after_bad_forward, sm.ValidationError, "forward")
_risky("backward-loss_scale-nan", _backward_nan_scale, sm.ValidationError, "loss_scale")


def _disposed_model():
    m = _tiny_model()
    m.dispose()
    return m


for _what, _fn in [("forward", lambda m: m.forward(_IDS)), ("forward-targets", lambda m: m.forward(_IDS, _IDS)),
                   ("backward", lambda m: m.backward()), ("zero_grad", lambda m: m.zero_grad()),
                   ("state_dict", lambda m: m.state_dict()), ("grads", lambda m: m.grads()),
                   ("load_state_dict", lambda m: m.load_state_dict({})), ("train", lambda m: m.train()),
                   ("eval", lambda m: m.eval()), ("enter", lambda m: m.__enter__()),
                   ("save", lambda m: m.save(os.devnull)),
                   ("Sampling", lambda m: sm.Sampling(m, TOK)),
                   ("Training", lambda m: sm.Training(m, TOK, TEXT)),
                   ("ModelEmbedder.embed", lambda m: sm.ModelEmbedder(m, TOK).embed("the"))]:
    _risky(f"TransformerModel-after-dispose-{_what}", (lambda f=_fn: f(_disposed_model())),
           sm.ObjectDisposedError, "disposed")


def _sampler_model_disposed_midway():
    m = _tiny_model()
    s = sm.Sampling(m, TOK)
    s.generate("the", 3, temperature=0)
    m.dispose()
    s.generate("the", 3, temperature=0)


_risky("Sampling-generate-after-model-dispose", _sampler_model_disposed_midway, sm.ObjectDisposedError,
       "disposed")
def _generate_batch_disposed():
    m = _tiny_model()
    s = sm.Sampling(m, TOK)
    m.dispose()
    s.generate_batch(["the", "fox"], 2)


_risky("Sampling-generate_batch-after-model-dispose", _generate_batch_disposed, sm.ObjectDisposedError,
       "disposed")


# ---- the child side ---------------------------------------------------------------------------
def _child(ids):
    """Run the risky cases `ids` in this (child) process, one line per case on stdout."""
    import re
    warnings.simplefilter("ignore")
    canary_a = np.arange(12, dtype=f32).reshape(3, 4)
    canary_b = np.arange(20, dtype=f32).reshape(4, 5)
    want = K.matmul(canary_a, canary_b)
    for cid in ids:
        thunk, exc, match = RISKY[cid]
        print("START", cid, flush=True)
        before = _outstanding()
        verdict = "OK"
        want_exc = sm.ValidationError if exc is ACCEPTED_OR_VALIDATION else exc
        try:
            thunk()
            if exc is not ACCEPTED_OR_VALIDATION:
                verdict = f"FAIL no exception (expected {exc.__name__})"
        except want_exc as e:
            if match is not None and not re.search(match, str(e)):
                verdict = f"FAIL {type(e).__name__} message {str(e)!r} does not match {match!r}"
        except BaseException as e:         # noqa: BLE001 - reported as the wrong exception
            verdict = f"FAIL wrong exception {type(e).__name__}: {e} (expected {want_exc.__name__})"
        # nothing corrupted: the pool's count, a product, and the shared model's logits
        if _outstanding() != before:
            import gc
            gc.collect()               # a buffer or state only the collector has let go of
        if verdict == "OK" and _outstanding() != before:
            verdict = f"FAIL outstanding buffers {before} -> {_outstanding()}"
        if verdict == "OK" and not np.array_equal(K.matmul(canary_a, canary_b), want):
            verdict = "FAIL matmul gives different bits after the case"
        if verdict == "OK" and "m" in _MODEL:
            m = _MODEL["m"]
            m.eval()
            if not np.array_equal(m.forward(_IDS), _MODEL["logits"]):
                verdict = "FAIL the model's logits changed"
        print("DONE", cid, verdict.replace("\n", " "), flush=True)


@pytest.fixture(scope="module")
def risky_results():
    """Run every risky case in child processes: a child that crashes or hangs is replaced by a
    fresh one for the cases after the one it died on, which is reported as CRASH / HANG."""
    remaining = list(RISKY)
    results = {}
    code = ("import sys; sys.path.insert(0, {here!r}); import test_hostile as T; "
            "T._child(sys.argv[1:])").format(here=HERE)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while remaining:
        try:
            p = subprocess.run([sys.executable, "-c", code, *remaining], capture_output=True,
                               text=True, timeout=120, cwd=ROOT, env=env)
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "timed out", "HANG"
        started = None
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "START":
                started = rest
            elif kind == "DONE":
                cid, _, verdict = rest.partition(" ")
                results[cid] = verdict
                started = None
        if started is not None:
            results[started] = f"CRASH/HANG (returncode {rc}): {err[-600:]}"
        elif rc != 0 and not set(remaining) - set(results) == set():
            for cid in remaining:
                results.setdefault(cid, f"child failed (returncode {rc}): {err[-600:]}")
        remaining = [c for c in remaining if c not in results]
    return results


@pytest.mark.parametrize("case", list(RISKY))
def test_risky(case, risky_results):
    assert risky_results[case] == "OK", risky_results[case]


# ==== MemoryPool / PooledBuffer (Python-level checks) ==========================================
@pytest.mark.parametrize("kw, exc, match", [
    (dict(max_buffer_size="1"), TypeError, "max_buffer_size"),
    (dict(max_buffer_size=None), TypeError, "max_buffer_size"),
    (dict(max_buffer_size=1.5), TypeError, "max_buffer_size"),
    (dict(max_buffer_size=True), TypeError, "max_buffer_size"),
    (dict(max_buffer_size=0), sm.ValidationError, "max_buffer_size"),
    (dict(max_buffer_size=-1), sm.ValidationError, "max_buffer_size"),
    (dict(max_buffer_size=2 ** 63), sm.ValidationError, "max_buffer_size"),
    (dict(max_buffer_size=10 ** 30), sm.ValidationError, "max_buffer_size"),
    (dict(max_buffers_per_bucket=-1), sm.ValidationError, "max_buffers_per_bucket"),
    (dict(max_buffers_per_bucket=2 ** 40), sm.ValidationError, "max_buffers_per_bucket"),
    (dict(max_buffers_per_bucket=[1]), TypeError, "max_buffers_per_bucket"),
    (dict(max_pooled_bytes=-1), sm.ValidationError, "max_pooled_bytes"),
    (dict(max_pooled_bytes=2 ** 63), sm.ValidationError, "max_pooled_bytes"),
    (dict(max_pooled_bytes=float("nan")), TypeError, "max_pooled_bytes"),
], ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__)
def test_memorypool_constructor(kw, exc, match):
    before = sm._core._pool_global_stats()["live_pools"]
    with pytest.raises(exc, match=match):
        sm.MemoryPool(**kw)
    assert sm._core._pool_global_stats()["live_pools"] == before


@pytest.mark.parametrize("n, exc", [
    ("16", TypeError), (None, TypeError), (1.5, TypeError), (True, TypeError), ([16], TypeError),
    (object(), TypeError), (np.float32(16), TypeError), (-1, sm.ValidationError),
    (2 ** 40 + 1, sm.ValidationError), (2 ** 63, sm.ValidationError), (2 ** 64, sm.ValidationError),
    (10 ** 30, sm.ValidationError), (np.uint64(2 ** 63), sm.ValidationError),
    (np.int64(-1), sm.ValidationError),
], ids=lambda v: type(v).__name__ + ":" + repr(v)[:20])
def test_memorypool_rent_bad_n(n, exc):
    with sm.MemoryPool(max_buffer_size=1024) as pool:
        keep = pool.rent(8)
        before = pool.stats()
        with pytest.raises(exc, match="n"):
            pool.rent(n)
        after = pool.stats()
        assert after["outstanding_buffers"] == before["outstanding_buffers"] == 1
        assert after["rents"] == before["rents"] and after["failed_rents"] == before["failed_rents"]
        keep.release()


def test_memorypool_rent_zero_and_return_wrong_things():
    with sm.MemoryPool(max_buffer_size=1024) as pool, sm.MemoryPool(max_buffer_size=1024) as other:
        z = pool.rent(0)
        assert len(z) == 0 and np.asarray(z).shape == (0,)
        z.release()
        for bad in (None, "buf", np.zeros(4, f32), memoryview(b"abcd"), object()):
            with pytest.raises(TypeError, match="buf"):
                pool.return_buffer(bad)
        b = other.rent(8)
        with pytest.raises(sm.ValidationError, match="different MemoryPool"):
            pool.return_buffer(b)
        assert not b.released and other.stats()["outstanding_buffers"] == 1
        assert pool.stats()["outstanding_buffers"] == 0
        other.return_buffer(b)
        assert other.stats()["outstanding_buffers"] == 0
        with pytest.raises(TypeError):
            sm.PooledBuffer()


@pytest.mark.parametrize("what", ["rent", "return_buffer", "trim", "stats", "reset_peak", "nbytes",
                                  "max_buffer_size", "max_buffers_per_bucket", "max_pooled_bytes",
                                  "enter", "init-again"])
def test_memorypool_after_dispose(what):
    pool = sm.MemoryPool(max_buffer_size=1024)
    b = pool.rent(4)
    pool.dispose()
    pool.dispose()                          # idempotent
    calls = {"rent": lambda: pool.rent(4), "return_buffer": lambda: pool.return_buffer(b),
             "trim": pool.trim, "stats": pool.stats, "reset_peak": pool.reset_peak,
             "nbytes": lambda: pool.nbytes, "max_buffer_size": lambda: pool.max_buffer_size,
             "max_buffers_per_bucket": lambda: pool.max_buffers_per_bucket,
             "max_pooled_bytes": lambda: pool.max_pooled_bytes, "enter": pool.__enter__,
             "init-again": pool.__init__}
    exc = TypeError if what == "init-again" else sm.ObjectDisposedError
    with pytest.raises(exc):
        calls[what]()
    assert pool.disposed and not b.released and len(b) == 4
    b.release()                             # the rented buffer still goes back


def test_default_pool_cannot_be_disposed():
    pool = sm.default_pool()
    before = _outstanding()
    with pytest.raises(sm.SmallMindError, match="cannot be disposed"):
        pool.dispose()
    with pytest.raises(sm.SmallMindError, match="context manager"):
        with pool:
            pass
    assert not pool.disposed and _outstanding() == before
    with pytest.raises(TypeError, match="pickled"):
        import pickle
        pickle.dumps(pool)


# ==== Tokenizer ==================================================================================
@pytest.mark.parametrize("text, exc, match", [
    (None, TypeError, "text"), (5, TypeError, "text"), (b"abc", TypeError, "text"),
    (["a", "b"], TypeError, "text"), (object(), TypeError, "text"), ("", sm.ValidationError, "text"),
    ("ab\ud800c", sm.ValidationError, "surrogate"),
])
def test_tokenizer_constructor(text, exc, match):
    with pytest.raises(exc, match=match):
        sm.Tokenizer(text)


@pytest.mark.parametrize("chars, exc, match", [
    (None, TypeError, "chars"), (5, TypeError, "chars"), ({"a": 0}, TypeError, "chars"),
    ([], sm.ValidationError, "chars"), ("", sm.ValidationError, "chars"),
    (["ab"], sm.ValidationError, r"chars\[0\]"), ([1], sm.ValidationError, r"chars\[0\]"),
    (["a", "a"], sm.ValidationError, r"chars\[1\]"), (["a", None], sm.ValidationError, r"chars\[1\]"),
    (["\udc80"], sm.ValidationError, "surrogate"),
])
def test_tokenizer_from_chars(chars, exc, match):
    with pytest.raises(exc, match=match):
        sm.Tokenizer.from_chars(chars)


@pytest.mark.parametrize("errors", ["ignore", "", None, 1, ["strict"]], ids=repr)
def test_tokenizer_bad_errors_policy(errors):
    if errors is not None:
        with pytest.raises(sm.ValidationError, match="errors"):
            sm.Tokenizer("abc", errors=errors)
        with pytest.raises(sm.ValidationError, match="errors"):
            TOK.encode("the", errors=errors)
    else:
        assert TOK.encode("the", errors=None) == TOK.encode("the")


@pytest.mark.parametrize("s", [None, 5, b"the", ["t", "h"], object(), np.array(["the"])],
                         ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("method", ["encode", "encode_array"])
def test_tokenizer_encode_bad_type(s, method):
    with pytest.raises(TypeError, match="s must be a str"):
        getattr(TOK, method)(s)


@pytest.mark.parametrize("s", ["the €", "x\ud800", "😀" * 300], ids=["euro", "surrogate", "long-astral"])
def test_tokenizer_encode_unknown_strict(s):
    with pytest.raises(sm.ValidationError, match="not in the tokenizer's vocabulary"):
        TOK.encode(s, errors="strict")
    with pytest.raises(sm.ValidationError, match="not in the tokenizer's vocabulary"):
        TOK.encode_array(s, errors="strict")
    with pytest.warns(sm.UnknownCharacterWarning):
        assert TOK.encode(s) == TOK.encode_array(s).tolist()


@pytest.mark.parametrize("ids, exc, match", [
    (None, TypeError, "ids"), ("abc", TypeError, "ids"), (5, TypeError, "ids"), ({1: 2}, TypeError, "ids"),
    ({1, 2}, TypeError, "ids"), (object(), TypeError, "ids"),
    ([1, "2"], sm.ValidationError, r"ids\[1\]"), ([1.0], sm.ValidationError, r"ids\[0\]"),
    ([True], sm.ValidationError, r"ids\[0\]"), ([None], sm.ValidationError, r"ids\[0\]"),
    ([float("nan")], sm.ValidationError, r"ids\[0\]"), ([[1]], sm.ValidationError, r"ids\[0\]"),
    ([-1], sm.ValidationError, r"ids\[0\]"), ([0, V], sm.ValidationError, r"ids\[1\]"),
    ([2 ** 31], sm.ValidationError, r"ids\[0\]"), ([2 ** 63], sm.ValidationError, r"ids\[0\]"),
    ([10 ** 30], sm.ValidationError, r"ids\[0\]"), ([-2 ** 63 - 1], sm.ValidationError, r"ids\[0\]"),
    ([np.uint64(2 ** 64 - 1)], sm.ValidationError, r"ids\[0\]"),
    (np.array([1.0]), TypeError, "ids"), (np.array([True]), TypeError, "ids"),
    (np.array([1 + 0j]), TypeError, "ids"), (np.array([1], object), TypeError, "ids"),
    (np.zeros((1, 2), i32), sm.ValidationError, "1-D"), (np.array(3), sm.ValidationError, "1-D"),
    (np.array([0, -1], np.int8), sm.ValidationError, r"ids\[1\]"),
    (np.array([2 ** 63], np.uint64), sm.ValidationError, r"ids\[0\]"),
    (np.array([2 ** 31 - 1], i32), sm.ValidationError, r"ids\[0\]"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_tokenizer_decode_bad(ids, exc, match):
    with pytest.raises(exc, match=match):
        TOK.decode(ids)
    assert TOK.decode(TOK.encode("the fox")) == "the fox"


def test_tokenizer_decode_noncontiguous_and_empty():
    a = np.array(TOK.encode("the fox") * 2, np.int64)
    assert TOK.decode(a[::2]) == ("the fox" * 2)[::2]         # strided
    assert TOK.decode(a[::-1]) == ("the fox" * 2)[::-1]       # negative stride
    assert TOK.decode(np.zeros(0, np.int8)) == "" and TOK.decode([]) == ""


@pytest.mark.parametrize("s, exc, match", [
    (None, TypeError, "s must be a str"), (5, TypeError, "s must be a str"),
    ("not json", sm.ValidationError, "not valid JSON"), (b"\xff\xfe", sm.ValidationError, "UTF-8"),
    (DEEP_JSON, sm.ValidationError, "not valid JSON"), ("[]", sm.ValidationError, "object"),
    ('{"type": "char", "version": 1}', sm.ValidationError, "chars"),
    ('{"type": "char", "version": 2, "chars": ["a"]}', sm.ValidationError, "version"),
    ('{"type": "char", "version": true, "chars": ["a"]}', sm.ValidationError, "version"),
    ('{"type": "char", "version": 1.0, "chars": ["a"]}', sm.ValidationError, "version"),
    ('{"type": "bpe", "version": 1, "chars": ["a"]}', sm.ValidationError, "type"),
    ('{"type": "char", "version": 1, "chars": "ab"}', sm.ValidationError, "list"),
    ('{"type": "char", "version": 1, "chars": ["a", "a"]}', sm.ValidationError, "unique"),
    ('{"type": "char", "version": 1, "chars": [NaN]}', sm.ValidationError, "NaN"),
    ('{"type": "char", "type": "char", "version": 1, "chars": ["a"]}', sm.ValidationError, "duplicate"),
    ('{"type": "char", "version": 1, "chars": ["a"], "x": 1}', sm.ValidationError, "unexpected"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_tokenizer_from_json_bad(s, exc, match):
    with pytest.raises(exc, match=match):
        sm.Tokenizer.from_json(s)


def test_tokenizer_is_immutable():
    with pytest.raises(AttributeError):
        TOK._chars = ("a",)
    with pytest.raises(AttributeError):
        del TOK._index
    assert TOK.decode(TOK.encode("lazy dog")) == "lazy dog"


# ==== ModelConfig / TransformerModel (Python-level) ==============================================
_CFG = dict(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8)


@pytest.mark.parametrize("field, value, exc", [
    (f, v, e) for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    for v, e in (("8", TypeError), (None, TypeError), (8.0, TypeError), (True, TypeError),
                 ([8], TypeError), (object(), TypeError), (0, sm.ValidationError), (-1, sm.ValidationError),
                 (2 ** 31 + 1, sm.ValidationError), (2 ** 63, sm.ValidationError),
                 (10 ** 30, sm.ValidationError))
] + [("n_head", 3, sm.ValidationError), ("block_size", 2 ** 24 + 1, sm.ValidationError),
     ("n_layer", 4097, sm.ValidationError), ("n_embd", 2 ** 20 + 2, sm.ValidationError),
     ("dropout", 1.0, sm.ValidationError), ("dropout", -0.1, sm.ValidationError),
     ("dropout", float("nan"), sm.ValidationError), ("dropout", float("inf"), sm.ValidationError),
     ("dropout", "0.1", TypeError), ("dropout", None, TypeError), ("dropout", True, TypeError),
     ("seed", -1, sm.ValidationError), ("seed", 2 ** 64, sm.ValidationError), ("seed", 1.0, TypeError),
     ("seed", "1", TypeError), ("seed", None, TypeError)],
    ids=lambda v: repr(v)[:20] if not isinstance(v, type) else v.__name__)
def test_modelconfig_bad_field(field, value, exc):
    with pytest.raises(exc, match=field):
        sm.ModelConfig(**dict(_CFG, **{field: value}))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: sm.ModelConfig.preset("huge", 10), sm.ValidationError, "preset"),
    (lambda: sm.ModelConfig.preset("tiny"), sm.ValidationError, "vocab_size"),
    (lambda: sm.ModelConfig.preset("tiny", 10, n_head=5), sm.ValidationError, "n_head"),
    (lambda: sm.ModelConfig.from_dict([1, 2]), sm.ValidationError, "mapping"),
    (lambda: sm.ModelConfig.from_dict(dict(_CFG, bogus=1)), sm.ValidationError, "bogus"),
    (lambda: sm.TransformerModel({"vocab_size": 3}), TypeError, "config"),
    (lambda: sm.TransformerModel(sm.ModelConfig(**_CFG), n_layer=2), TypeError, "not both"),
    (lambda: sm.TransformerModel(vocab_size=0, block_size=4, n_layer=1, n_head=1, n_embd=4),
     sm.ValidationError, "vocab_size"),
    # a valid configuration too big for any machine: refused by the allocator, not half-built
    (lambda: sm.TransformerModel(sm.ModelConfig(65, 64, 4096, 1, 2 ** 20)), MemoryError, None),
], ids=["preset-unknown", "preset-no-vocab", "preset-bad-override", "from_dict-list",
        "from_dict-unknown", "model-dict-config", "model-both", "model-kw-bad", "model-200-TiB"])
def test_model_construction(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.fixture(scope="module")
def model():
    m = _tiny_model()
    yield m
    m.dispose()


def _logits_unchanged(m, want):
    m.eval()
    assert np.array_equal(m.forward(_IDS), want)


_SD_BAD = [
    ("missing", lambda sd: {k: v for k, v in list(sd.items())[1:]}, sm.ValidationError, "missing"),
    ("unexpected", lambda sd: dict(sd, bogus=np.zeros(1)), sm.ValidationError, "unexpected"),
    ("shape", lambda sd: dict(sd, **{"transformer.wte.weight": np.zeros((V + 1, 8))}), sm.ValidationError,
     "transformer.wte.weight"),
    ("nan", lambda sd: dict(sd, **{"transformer.ln_f.bias": np.full(8, np.nan)}), sm.ValidationError,
     "transformer.ln_f.bias"),
    ("inf", lambda sd: dict(sd, **{"transformer.ln_f.bias": np.full(8, np.inf)}), sm.ValidationError,
     "transformer.ln_f.bias"),
    ("float64-overflow", lambda sd: dict(sd, **{"transformer.ln_f.bias": np.full(8, 1e39)}),
     sm.ValidationError, "transformer.ln_f.bias"),
    ("complex", lambda sd: dict(sd, **{"transformer.ln_f.bias": np.ones(8, np.complex64)}),
     sm.ValidationError, "transformer.ln_f.bias"),
    ("bool", lambda sd: dict(sd, **{"transformer.ln_f.bias": np.ones(8, bool)}), sm.ValidationError,
     "transformer.ln_f.bias"),
    ("object", lambda sd: dict(sd, **{"transformer.ln_f.bias": object()}), sm.ValidationError,
     "transformer.ln_f.bias"),
    ("str", lambda sd: dict(sd, **{"transformer.ln_f.bias": "abc"}), sm.ValidationError,
     "transformer.ln_f.bias"),
    ("lm_head-differs", lambda sd: dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] + 1}),
     sm.ValidationError, "lm_head.weight"),
    ("lm_head-str", lambda sd: dict(sd, **{"lm_head.weight": "abc"}), sm.ValidationError, "lm_head.weight"),
    ("lm_head-object", lambda sd: dict(sd, **{"lm_head.weight": object()}), sm.ValidationError,
     "lm_head.weight"),
    ("not-mapping", lambda sd: list(sd.items()), TypeError, "mapping"),
]


@pytest.mark.parametrize("case", _SD_BAD, ids=[c[0] for c in _SD_BAD])
def test_load_state_dict_bad(model, case):
    _, make, exc, match = case
    want = model.forward(_IDS)
    sd = {k: v.copy() for k, v in model.state_dict().items()}
    # the last tensor also changes: nothing may be written when any tensor is refused
    if isinstance(sd, dict):
        sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"] * 2
    with pytest.raises(exc, match=match):
        model.load_state_dict(make(sd))
    _logits_unchanged(model, want)


# ==== Training =====================================================================================
@pytest.fixture
def trainer():
    m = sm.TransformerModel(sm.ModelConfig(V, 16, 1, 2, 8, seed=3))
    t = sm.Training(m, TOK, TEXT, block_size=8, batch_size=2, seed=1)
    yield t
    m.dispose()


@pytest.mark.parametrize("kw, exc, match", [
    (dict(model="m"), TypeError, "model"), (dict(tokenizer="abc"), TypeError, "tokenizer"),
    (dict(text=None), TypeError, "text"), (dict(text=b"abc"), TypeError, "text"),
    (dict(text="the"), sm.ValidationError, "too short"), (dict(text="€€€€" * 100), sm.ValidationError, "short"),
    (dict(block_size=0), sm.ValidationError, "block_size"), (dict(block_size=17), sm.ValidationError, "block_size"),
    (dict(block_size=2 ** 63), sm.ValidationError, "block_size"), (dict(block_size=8.0), TypeError, "block_size"),
    (dict(batch_size=0), sm.ValidationError, "batch_size"), (dict(batch_size=2 ** 31), sm.ValidationError, "batch_size"),
    (dict(batch_size="2"), TypeError, "batch_size"), (dict(seed=-1), sm.ValidationError, "seed"),
    (dict(seed=2 ** 63), sm.ValidationError, "seed"), (dict(seed=None), TypeError, "seed"),
    (dict(val_fraction=float("nan")), sm.ValidationError, "val_fraction"),
    (dict(val_fraction=0.9), sm.ValidationError, "val_fraction"),
    (dict(val_fraction=-0.1), sm.ValidationError, "val_fraction"),
    (dict(val_fraction="0.1"), TypeError, "val_fraction"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_training_constructor(kw, exc, match):
    m = sm.TransformerModel(sm.ModelConfig(V, 16, 1, 2, 8, seed=3))
    args = dict(model=m, tokenizer=TOK, text=TEXT, block_size=8, batch_size=2)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.UnknownCharacterWarning)
        with pytest.raises(exc, match=match):
            sm.Training(**args)
    big = sm.Tokenizer(TEXT + "XYZ")
    small = sm.TransformerModel(sm.ModelConfig(V, 16, 1, 2, 8))
    with pytest.raises(sm.ValidationError, match="vocab_size"):
        sm.Training(small, big, TEXT)


_TRAIN_BAD = [
    (dict(steps=-1), sm.ValidationError, "steps"), (dict(steps=2 ** 63), sm.ValidationError, "steps"),
    (dict(steps=1.0), TypeError, "steps"), (dict(steps="1"), TypeError, "steps"),
    (dict(learning_rate=float("nan")), sm.ValidationError, "learning_rate"),
    (dict(learning_rate=float("inf")), sm.ValidationError, "learning_rate"),
    (dict(learning_rate=-1e-3), sm.ValidationError, "learning_rate"),
    (dict(learning_rate="1e-3"), TypeError, "learning_rate"),
    (dict(warmup_steps=-1), sm.ValidationError, "warmup_steps"),
    (dict(min_lr=1.0), sm.ValidationError, "min_lr"), (dict(min_lr=float("nan")), sm.ValidationError, "min_lr"),
    (dict(lr_decay_steps=-5), sm.ValidationError, "lr_decay_steps"),
    (dict(weight_decay=-0.1), sm.ValidationError, "weight_decay"),
    (dict(weight_decay=1e39), sm.ValidationError, "weight_decay"),
    (dict(beta1=1.0), sm.ValidationError, "beta1"), (dict(beta2=float("nan")), sm.ValidationError, "beta2"),
    (dict(eps=0.0), sm.ValidationError, "eps"), (dict(eps=-1e-8), sm.ValidationError, "eps"),
    # positive in float64, 0 in float32: the C optimizer used to refuse it mid-step
    (dict(eps=1e-50), sm.ValidationError, "eps"),
    (dict(grad_clip=-1.0), sm.ValidationError, "grad_clip"),
    # accepted here and refused mid-step by the clipping kernel (naming max_norm) before
    (dict(grad_clip=float("inf")), sm.ValidationError, "grad_clip"),
    (dict(grad_clip=1e39), sm.ValidationError, "grad_clip"),
    (dict(grad_clip=1e-50), sm.ValidationError, "grad_clip"),
    (dict(grad_clip=float("nan")), sm.ValidationError, "grad_clip"),
    (dict(grad_accum_steps=0), sm.ValidationError, "grad_accum_steps"),
    (dict(log_every=-1), sm.ValidationError, "log_every"),
    (dict(eval_every=-1), sm.ValidationError, "eval_every"),
    (dict(eval_batches=0), sm.ValidationError, "eval_batches"),
    (dict(save_every=1), sm.ValidationError, "save_every"),
    (dict(callback=5), TypeError, "callback"), (dict(cancel="stop"), TypeError, "cancel"),
    (dict(threads=0), sm.ValidationError, "threads"), (dict(threads=2 ** 31), sm.ValidationError, "threads"),
    (dict(threads="2"), TypeError, "threads"),
]


@pytest.mark.parametrize("kw, exc, match", _TRAIN_BAD,
                         ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_training_train_bad(trainer, kw, exc, match):
    m = trainer.model
    p0, m0 = m.flat_params.copy(), trainer._m.copy()
    rng0 = trainer._rng.bit_generator.state
    args = dict(steps=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        trainer.train(**args)
    assert trainer.step == 0 and trainer._adam_t == 0
    assert np.array_equal(m.flat_params, p0) and np.array_equal(trainer._m, m0)
    assert trainer._rng.bit_generator.state == rng0 and m.training


@pytest.mark.parametrize("call, exc, match", [
    (lambda t: t.estimate_loss(0), sm.ValidationError, "eval_batches"),
    (lambda t: t.estimate_loss("2"), TypeError, "eval_batches"),
    (lambda t: t.estimate_loss(1, threads=0), sm.ValidationError, "threads"),
    (lambda t: t.get_batch("test"), sm.ValidationError, "split"),
    (lambda t: t.get_batch(None), sm.ValidationError, "split"),
    (lambda t: t.restore(os.devnull), sm.CheckpointError, None),
    (lambda t: t.restore("/nonexistent/x.safetensors"), sm.CheckpointError, "no such checkpoint"),
], ids=["estimate-0", "estimate-str", "estimate-threads", "batch-split", "batch-None",
        "restore-empty", "restore-missing"])
def test_training_other_bad(trainer, call, exc, match):
    with pytest.raises(exc, match=match):
        call(trainer)
    assert trainer.step == 0


def _rewrite(src, dst, meta_change=None, tensor_change=None):
    tensors, meta = st.load_file(src)
    meta = dict(meta)
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    st.save_file(tensors, dst, meta)
    return dst


def _training_change(key, value):
    def change(meta):
        t = json.loads(meta["training"])
        t[key] = value
        meta["training"] = json.dumps(t)
    return change


_RESTORE_BAD = [("best_val_loss", "abc"), ("best_val_loss", [1]), ("best_val_loss", {"a": 1}),
                ("step", -1), ("step", "x"), ("adam_t", 99), ("rng", 5), ("rng", {"state": 1}),
                ("dropout_rng", None)]


@pytest.mark.parametrize("key, value", _RESTORE_BAD, ids=[f"{k}={v!r}" for k, v in _RESTORE_BAD])
def test_training_restore_hostile_state(trainer, tmp_path, key, value):
    trainer.train(1, log_every=0)
    good = str(tmp_path / "good.safetensors")
    trainer.save_checkpoint(good)
    bad = _rewrite(good, str(tmp_path / "bad.safetensors"), _training_change(key, value))
    other = sm.TransformerModel(sm.ModelConfig(V, 16, 1, 2, 8, seed=3))
    t2 = sm.Training(other, TOK, TEXT, block_size=8, batch_size=2, seed=1)
    p0, rng0 = other.flat_params.copy(), t2._rng.bit_generator.state
    with pytest.raises(sm.CheckpointError, match="training state|step counters"):
        t2.restore(bad)
    # nothing restored halfway: parameters, moments, counters and generators as they were
    assert np.array_equal(other.flat_params, p0) and not t2._m.any() and t2.step == 0
    assert t2._rng.bit_generator.state == rng0 and t2.best_val_loss == float("inf")
    other.dispose()


_RESUME_BAD = [("block_size", -5), ("block_size", 10 ** 6), ("block_size", 8.5), ("batch_size", 0),
               ("batch_size", "2"), ("seed", -1), ("val_fraction", "nan"), ("val_fraction", 0.9)]


@pytest.mark.parametrize("key, value", _RESUME_BAD, ids=[f"{k}={v!r}" for k, v in _RESUME_BAD])
def test_training_resume_hostile_state(trainer, tmp_path, key, value):
    good = str(tmp_path / "good.safetensors")
    trainer.save_checkpoint(good)
    bad = _rewrite(good, str(tmp_path / "bad.safetensors"), _training_change(key, value))
    with pytest.raises(sm.CheckpointError, match=key):
        sm.Training.resume(bad, TEXT)
    sm.Training.resume(good, TEXT).model.dispose()


# ==== Sampling ======================================================================================
_GEN_BAD = [
    (dict(prompt=None), TypeError, "prompt"), (dict(prompt=5), TypeError, "prompt"),
    (dict(prompt=b"the"), TypeError, "prompt"), (dict(prompt=["the"]), TypeError, "prompt"),
    (dict(prompt=""), sm.ValidationError, "prompt"), (dict(prompt="€€€"), sm.ValidationError, "prompt"),
    (dict(max_new_tokens=-1), sm.ValidationError, "max_new_tokens"),
    (dict(max_new_tokens=1.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens="5"), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=None), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=-2 ** 63), sm.ValidationError, "max_new_tokens"),
    (dict(temperature=-0.1), sm.ValidationError, "temperature"),
    (dict(temperature=float("nan")), sm.ValidationError, "temperature"),
    (dict(temperature=float("inf")), sm.ValidationError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"), (dict(temperature=None), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"), (dict(temperature=1j), TypeError, "temperature"),
    (dict(top_k=-1), sm.ValidationError, "top_k"), (dict(top_k=1.5), TypeError, "top_k"),
    (dict(top_k="3"), TypeError, "top_k"), (dict(top_k=None), TypeError, "top_k"),
    (dict(top_p=0.0), sm.ValidationError, "top_p"), (dict(top_p=1.5), sm.ValidationError, "top_p"),
    (dict(top_p=-0.5), sm.ValidationError, "top_p"), (dict(top_p=float("nan")), sm.ValidationError, "top_p"),
    (dict(top_p=float("inf")), sm.ValidationError, "top_p"), (dict(top_p="0.9"), TypeError, "top_p"),
    (dict(seed=-1), sm.ValidationError, "seed"), (dict(seed=1.5), TypeError, "seed"),
    (dict(seed="1"), TypeError, "seed"), (dict(seed=True), TypeError, "seed"),
    (dict(stop=""), sm.ValidationError, "stop"), (dict(stop=["a", ""]), sm.ValidationError, "stop"),
    (dict(stop=5), TypeError, "stop"), (dict(stop=[1]), TypeError, "stop"), (dict(stop=b"x"), TypeError, "stop"),
    (dict(cancel="x"), TypeError, "cancel"), (dict(cancel=5), TypeError, "cancel"),
]


@pytest.fixture(scope="module")
def sampler(model):
    return sm.Sampling(model, TOK)


@pytest.mark.parametrize("kw, exc, match", _GEN_BAD,
                         ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
@pytest.mark.parametrize("how", ["generate", "stream", "generate_batch"])
def test_sampling_bad_arguments(model, sampler, kw, exc, match, how):
    want = sampler.generate("the qu", 6, temperature=0)
    before = _outstanding()
    args = dict(prompt="the qu", max_new_tokens=3)
    args.update(kw)
    prompt = args.pop("prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.UnknownCharacterWarning)
        with pytest.raises(exc, match=match if how != "generate_batch" or "prompt" not in kw else "prompt"):
            if how == "generate":
                sampler.generate(prompt, **args)
            elif how == "stream":
                list(sampler.stream(prompt, **args))
            else:
                sampler.generate_batch([prompt] if "prompt" in kw else [prompt, "fox"], **args)
    assert _outstanding() == before
    assert sampler.generate("the qu", 6, temperature=0) == want


@pytest.mark.parametrize("prompts, exc, match", [
    ("the", sm.ValidationError, "prompts"), ([], sm.ValidationError, "prompts"), (None, sm.ValidationError, "prompts"),
    (5, sm.ValidationError, "prompts"), ({"a": 1}, sm.ValidationError, "prompts"),
    (["the", 5], TypeError, r"prompts\[1\]"), (["the", None], TypeError, r"prompts\[1\]"),
    (["the", ""], sm.ValidationError, r"prompts\[1\]"), (["the", "€"], sm.ValidationError, r"prompts\[1\]"),
    ((b"x",), TypeError, r"prompts\[0\]"),
], ids=lambda v: repr(v)[:20] if not isinstance(v, type) else v.__name__)
def test_generate_batch_bad_prompts(sampler, prompts, exc, match):
    before = _outstanding()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.UnknownCharacterWarning)
        with pytest.raises(exc, match=match):
            sampler.generate_batch(prompts, 2)
    assert _outstanding() == before


@pytest.mark.parametrize("kw", [dict(temperature=1e-320), dict(temperature=5e-324, top_k=3),
                                dict(temperature=1e-310, top_p=0.5), dict(temperature=1e300),
                                dict(top_k=2 ** 63), dict(top_k=10 ** 30), dict(seed=2 ** 63),
                                dict(seed=10 ** 30), dict(top_p=5e-324)],
                         ids=lambda v: repr(v)[:40])
def test_sampling_extreme_but_valid(sampler, kw):
    """Valid extremes run: a temperature so small that logits / temperature overflows used to
    make the probabilities NaN (numpy's ValueError); it is the greedy limit."""
    before = _outstanding()
    out = sampler.generate("the qu", 5, seed=kw.pop("seed", 1), **kw)
    batch = sampler.generate_batch(["the qu", "fox"], 5, seed=1, **kw)
    assert len(out) == 5 and [len(b) for b in batch] == [5, 5]
    if kw.get("temperature", 1) < 1e-300:
        assert out == sampler.generate("the qu", 5, temperature=0)
    assert _outstanding() == before


def test_sampling_huge_max_new_tokens_is_cancellable(sampler):
    src = sm.CancellationTokenSource()
    src.cancel()
    for n in (2 ** 63, 10 ** 30):
        with pytest.raises(sm.CancelledError):
            sampler.generate("the", n, cancel=src)
        with pytest.raises(sm.CancelledError):
            sampler.generate_batch(["the"], n, cancel=src.token)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m: sm.Sampling("model", TOK), TypeError, "model"),
    (lambda m: sm.Sampling(m, "tok"), TypeError, "tokenizer"),
    (lambda m: sm.Sampling(m, sm.Tokenizer(TEXT + "XYZ")), sm.ValidationError, "vocab_size"),
    (lambda m: sm.Sampling(m, TOK, threads=0), sm.ValidationError, "threads"),
    (lambda m: sm.Sampling(m, TOK, threads=2 ** 31), sm.ValidationError, "threads"),
    (lambda m: sm.Sampling(m, TOK, threads="2"), TypeError, "threads"),
    (lambda m: sm.Sampling(m, TOK, window="move"), sm.ValidationError, "window"),
    (lambda m: sm.Sampling(m, TOK, window=None), sm.ValidationError, "window"),
    (lambda m: sm.CancellationTokenSource(timeout=-1), sm.ValidationError, "seconds"),
    (lambda m: sm.CancellationTokenSource(timeout=float("nan")), sm.ValidationError, "seconds"),
    (lambda m: sm.CancellationTokenSource(timeout="1"), sm.ValidationError, "seconds"),
], ids=["model-str", "tok-str", "vocab-bigger", "threads-0", "threads-2**31", "threads-str",
        "window-bad", "window-None", "cancel-negative", "cancel-nan", "cancel-str"])
def test_sampling_constructor(model, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model)


# ==== SamplerPool / ThrottledInferenceService ==========================================================
@pytest.mark.parametrize("kw, exc, match", [
    (dict(size=0), sm.ValidationError, "size"), (dict(size=-1), sm.ValidationError, "size"),
    (dict(size=1.5), TypeError, "size"), (dict(size="2"), TypeError, "size"), (dict(size=None), TypeError, "size"),
    (dict(threads_per_request=0), sm.ValidationError, "threads_per_request"),
    (dict(threads_per_request="1"), TypeError, "threads_per_request"),
    (dict(model="m"), TypeError, "model"), (dict(tokenizer=None), TypeError, "tokenizer"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_samplerpool_constructor(model, kw, exc, match):
    args = dict(model=model, tokenizer=TOK, size=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        sm.SamplerPool(**args)


@pytest.mark.parametrize("timeout, exc", [(-1, sm.ValidationError), (float("nan"), sm.ValidationError),
                                          (float("inf"), sm.ValidationError), (-float("inf"), sm.ValidationError),
                                          ("1", TypeError), ([1], TypeError), (True, TypeError)],
                         ids=repr)
def test_samplerpool_get_bad_timeout(model, timeout, exc):
    """queue.Queue.get raised a bare ValueError / TypeError here (and would wait forever on
    NaN); the pool checks the timeout itself."""
    pool = sm.SamplerPool(model, TOK, size=1)
    with pytest.raises(exc, match="timeout"):
        with pool.get(timeout=timeout):
            pass
    assert pool.available == 1
    with pool.get(timeout=0) as s:
        assert pool.available == 0
        with pytest.raises(TimeoutError):
            with pool.get(timeout=0):
                pass
        assert s.generate("the", 2, temperature=0)
    assert pool.available == 1
    pool.close()
    with pytest.raises(sm.ObjectDisposedError):
        with pool.get():
            pass


@pytest.mark.parametrize("kw, exc, match", [
    (dict(max_concurrency=0), sm.ValidationError, "max_concurrency"),
    (dict(max_concurrency=2.0), TypeError, "max_concurrency"),
    (dict(threads_per_request=-1), sm.ValidationError, "threads_per_request"),
    (dict(timeout=0), sm.ValidationError, "timeout"), (dict(timeout=-1), sm.ValidationError, "timeout"),
    (dict(timeout=float("nan")), sm.ValidationError, "timeout"), (dict(timeout="5"), TypeError, "timeout"),
    (dict(tokenizer="t"), TypeError, "tokenizer"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_throttled_service_constructor(model, kw, exc, match):
    args = dict(model=model, tokenizer=TOK)
    args.update(kw)
    with pytest.raises(exc, match=match):
        sm.ThrottledInferenceService(**args)


def test_throttled_service_bad_calls_and_close(model):
    svc = sm.ThrottledInferenceService(model, TOK, max_concurrency=1)
    before = _outstanding()

    async def main():
        with pytest.raises(sm.ValidationError, match="temperature"):
            await svc.generate("the", 3, temperature=-1)
        with pytest.raises(TypeError, match="prompt"):
            await svc.generate(None, 3)
        with pytest.raises(sm.ValidationError, match="top_p"):
            async for _ in svc.stream("the", 3, top_p=2):
                pass
        assert svc.active == 0
        return await svc.generate("the", 3, temperature=0)

    assert asyncio.run(main()) == sm.Sampling(model, TOK).generate("the", 3, temperature=0)
    svc.close()
    svc.close()
    with pytest.raises(sm.ObjectDisposedError):
        asyncio.run(svc.generate("the", 3))
    assert _outstanding() == before


# ==== VectorIndex ==========================================================================================
_VECS = np.random.default_rng(7).standard_normal((6, 4)).astype(f32)


@pytest.fixture
def index():
    ix = sm.VectorIndex(4)
    ix.add(_VECS, ids=[f"v{i}" for i in range(6)], metadata=[{"i": i} for i in range(6)])
    yield ix
    ix.dispose()


def _search_state(ix):
    return ix.search(_VECS, 3), ix.ids, len(ix)


def _same_state(a, b):
    (ids_a, sc_a), la, na = a
    (ids_b, sc_b), lb, nb = b
    assert ids_a == ids_b and np.array_equal(sc_a, sc_b) and la == lb and na == nb


@pytest.mark.parametrize("kw, exc, match", [
    (dict(dim=0), sm.ValidationError, "dim"), (dict(dim=-1), sm.ValidationError, "dim"),
    (dict(dim=2 ** 24 + 1), sm.ValidationError, "dim"), (dict(dim=2 ** 63), sm.ValidationError, "dim"),
    (dict(dim=4.0), sm.ValidationError, "dim"), (dict(dim="4"), sm.ValidationError, "dim"),
    (dict(dim=True), sm.ValidationError, "dim"), (dict(dim=None), sm.ValidationError, "dim"),
    (dict(metric="euclid"), sm.ValidationError, "metric"), (dict(metric=None), sm.ValidationError, "metric"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_vectorindex_constructor(kw, exc, match):
    with pytest.raises(exc, match=match):
        sm.VectorIndex(**dict(dict(dim=4), **kw))


_ADD_BAD = [
    ("vectors-str", dict(vectors="abc"), sm.ValidationError, "vectors"),
    ("vectors-None", dict(vectors=None), sm.ValidationError, "vectors"),
    ("vectors-dict", dict(vectors={"a": 1}), sm.ValidationError, "vectors"),
    ("vectors-object", dict(vectors=object()), sm.ValidationError, "vectors"),
    ("vectors-list-str", dict(vectors=["a", "b", "c", "d"]), sm.ValidationError, "vectors"),
    ("vectors-ragged", dict(vectors=[[1, 2, 3, 4], [1, 2]]), sm.ValidationError, "vectors"),
    ("vectors-bool", dict(vectors=np.ones((1, 4), bool)), sm.ValidationError, "vectors"),
    ("vectors-complex", dict(vectors=np.ones((1, 4), complex)), sm.ValidationError, "vectors"),
    ("vectors-object-arr", dict(vectors=np.ones((1, 4), object)), sm.ValidationError, "vectors"),
    ("vectors-wrong-dim", dict(vectors=np.ones((1, 5))), sm.ValidationError, "vectors"),
    ("vectors-3d", dict(vectors=np.ones((1, 1, 4))), sm.ValidationError, "vectors"),
    ("vectors-0d", dict(vectors=np.float32(1)), sm.ValidationError, "vectors"),
    ("vectors-nan", dict(vectors=np.array([1, np.nan, 0, 0])), sm.ValidationError, "vectors"),
    ("vectors-inf", dict(vectors=np.array([1, np.inf, 0, 0])), sm.ValidationError, "vectors"),
    ("vectors-1e39", dict(vectors=np.array([1, 1e39, 0, 0])), sm.ValidationError, "vectors"),
    ("vectors-zero-cosine", dict(vectors=np.zeros(4)), sm.ValidationError, "non-zero"),
    ("vectors-one-bad-row", dict(vectors=np.vstack([np.ones(4), np.full(4, np.nan)])), sm.ValidationError, "vectors"),
    ("ids-dup", dict(vectors=np.ones((2, 4)), ids=["a", "a"]), sm.ValidationError, "unique"),
    ("ids-existing", dict(vectors=np.ones((1, 4)), ids=["v0"]), sm.ValidationError, "already"),
    ("ids-count", dict(vectors=np.ones((2, 4)), ids=["a"]), sm.ValidationError, "ids"),
    ("ids-float", dict(vectors=np.ones((1, 4)), ids=[1.5]), sm.ValidationError, r"ids\[0\]"),
    ("ids-bool", dict(vectors=np.ones((1, 4)), ids=[True]), sm.ValidationError, r"ids\[0\]"),
    ("ids-None", dict(vectors=np.ones((1, 4)), ids=[None]), sm.ValidationError, r"ids\[0\]"),
    ("ids-tuple", dict(vectors=np.ones((1, 4)), ids=[(1, 2)]), sm.ValidationError, r"ids\[0\]"),
    ("ids-not-iterable", dict(vectors=np.ones((2, 4)), ids=5), TypeError, None),
    ("metadata-count", dict(vectors=np.ones((2, 4)), metadata=[{}]), sm.ValidationError, "metadata"),
    ("metadata-not-json", dict(vectors=np.ones((1, 4)), metadata=[object()]), sm.ValidationError, r"metadata\[0\]"),
    ("metadata-set", dict(vectors=np.ones((1, 4)), metadata=[{1, 2}]), sm.ValidationError, r"metadata\[0\]"),
    ("metadata-circular", dict(vectors=np.ones((1, 4)), metadata=[(lambda d: (d.__setitem__("d", d), d)[1])({})]),
     sm.ValidationError, r"metadata\[0\]"),
]


@pytest.mark.parametrize("case", _ADD_BAD, ids=[c[0] for c in _ADD_BAD])
def test_vectorindex_add_bad(index, case):
    _, kw, exc, match = case
    before = _search_state(index)
    with pytest.raises(exc, match=match):
        index.add(**kw)
    _same_state(before, _search_state(index))


_SEARCH_BAD = [
    ("k-0", dict(k=0), "k"), ("k-neg", dict(k=-1), "k"), ("k-float", dict(k=1.5), "k"), ("k-str", dict(k="3"), "k"),
    ("k-bool", dict(k=True), "k"), ("k-None", dict(k=None), "k"), ("k-2**63-neg", dict(k=-2 ** 63), "k"),
    ("q-str", dict(queries="abc"), "queries"), ("q-None", dict(queries=None), "queries"),
    ("q-wrong-dim", dict(queries=np.ones(5)), "queries"), ("q-nan", dict(queries=np.full(4, np.nan)), "queries"),
    ("q-inf", dict(queries=np.full(4, -np.inf)), "queries"), ("q-zero-cosine", dict(queries=np.zeros(4)), "non-zero"),
    ("q-complex", dict(queries=np.ones(4, complex)), "queries"), ("q-3d", dict(queries=np.ones((1, 1, 4))), "queries"),
    ("threads-0", dict(threads=0), "threads"), ("threads-huge", dict(threads=2 ** 40), "threads"),
    ("threads-str", dict(threads="2"), "threads"),
]


@pytest.mark.parametrize("case", _SEARCH_BAD, ids=[c[0] for c in _SEARCH_BAD])
def test_vectorindex_search_bad(index, case):
    _, kw, match = case
    before = _search_state(index)
    args = dict(queries=np.ones(4), k=2)
    args.update(kw)
    exc = TypeError if kw.get("threads") == "2" else sm.ValidationError
    with pytest.raises(exc, match=match):
        index.search(**args)
    _same_state(before, _search_state(index))


def test_vectorindex_search_extremes(index):
    ids, scores = index.search(np.ones(4), 2 ** 63)           # k beyond the size: all of them
    assert len(ids) == 6
    ids, scores = index.search(np.ones((0, 4)), 3)             # no query, no result
    assert ids == [] and scores.shape == (0, 3)
    ids, scores = index.search(np.ones((2, 8))[:, ::2], 2)     # strided queries are copied
    assert ids == index.search(np.ones((2, 4)), 2)[0]
    assert index.add(np.ones((0, 4))) == [] and len(index) == 6


@pytest.mark.parametrize("ids, exc, match", [
    ("nope", sm.ValidationError, "unknown id"), (["v0", "nope"], sm.ValidationError, "unknown id"),
    (99, sm.ValidationError, "unknown id"), ([1.5], sm.ValidationError, r"ids\[0\]"),
    ([None], sm.ValidationError, r"ids\[0\]"), ([True], sm.ValidationError, r"ids\[0\]"),
    (None, TypeError, None), (1.5, TypeError, None),
], ids=repr)
def test_vectorindex_remove_bad(index, ids, exc, match):
    before = _search_state(index)
    with pytest.raises(exc, match=match):
        index.remove(ids)
    _same_state(before, _search_state(index))


@pytest.mark.parametrize("id_", ["nope", 99, None, -1, 2 ** 63], ids=repr)
def test_vectorindex_get_unknown(index, id_):
    with pytest.raises(sm.ValidationError, match="unknown id"):
        index.get(id_)
    assert index.get("v3")[1] == {"i": 3}


@pytest.mark.parametrize("what", ["add", "search", "remove", "get", "len", "contains", "ids", "save", "enter"])
def test_vectorindex_after_dispose(tmp_path, what):
    ix = sm.VectorIndex(4)
    ix.add(_VECS)
    ix.dispose()
    ix.dispose()
    calls = {"add": lambda: ix.add(_VECS), "search": lambda: ix.search(_VECS[0]), "remove": lambda: ix.remove(0),
             "get": lambda: ix.get(0), "len": lambda: len(ix), "contains": lambda: 0 in ix,
             "ids": lambda: ix.ids, "save": lambda: ix.save(str(tmp_path / "i.safetensors")),
             "enter": ix.__enter__}
    with pytest.raises(sm.ObjectDisposedError, match="disposed"):
        calls[what]()
    assert not os.path.exists(tmp_path / "i.safetensors")


def _write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


def _index_file_variants(good, tmp):
    tensors, meta = st.load_file(good)
    header = json.loads(meta["smallmind.index"])

    def write(name, tensors=tensors, header=header, raw_meta=None):
        p = str(tmp / f"{name}.safetensors")
        st.save_file(tensors, p, {"smallmind.index": raw_meta if raw_meta is not None else json.dumps(header)})
        return p

    out = {
        "missing": str(tmp / "nope.safetensors"),
        "directory": str(tmp),
        "empty": _write_bytes(tmp / "empty.bin", b""),
        "garbage": _write_bytes(tmp / "garbage.bin", b"\x00" * 64),
        "truncated": _write_bytes(tmp / "trunc.bin", open(good, "rb").read()[:-5]),
        "no-header": (st.save_file(tensors, str(tmp / "nometa.safetensors")), str(tmp / "nometa.safetensors"))[1],
        "deep-json": write("deep", raw_meta=DEEP_JSON),
        "not-json": write("notjson", raw_meta="{nope"),
        "header-list": write("hlist", raw_meta="[1, 2]"),
        "version": write("version", header=dict(header, version=2)),
        "format": write("format", header=dict(header, format="other")),
        "dim-float": write("dimf", header=dict(header, dim=4.0)),
        "dim-wrong": write("dimw", header=dict(header, dim=5)),
        "metric": write("metric", header=dict(header, metric="manhattan")),
        "ids-short": write("idshort", header=dict(header, ids=header["ids"][:-1])),
        "ids-dup": write("iddup", header=dict(header, ids=["a"] * len(header["ids"]))),
        "ids-lists": write("idlist", header=dict(header, ids=[[i] for i in range(len(header["ids"]))])),
        "metadata-int": write("metaint", header=dict(header, metadata=5)),
        "vectors-nan": write("vnan", tensors={"vectors": np.full((6, 4), np.nan, f32)}),
        "vectors-float64": write("v64", tensors={"vectors": tensors["vectors"].astype(np.float64)}),
        "extra-tensor": write("extra", tensors=dict(tensors, other=np.zeros(1, f32))),
    }
    return out


_INDEX_FILES = ["missing", "directory", "empty", "garbage", "truncated", "no-header", "deep-json", "not-json",
                "header-list", "version", "format", "dim-float", "dim-wrong", "metric", "ids-short", "ids-dup",
                "ids-lists", "metadata-int", "vectors-nan", "vectors-float64", "extra-tensor"]


@pytest.mark.parametrize("variant", _INDEX_FILES)
def test_vectorindex_load_hostile_file(index, tmp_path, variant):
    good = str(tmp_path / "good.safetensors")
    index.save(good)
    path = _index_file_variants(good, tmp_path)[variant]
    with pytest.raises(sm.CheckpointError):
        sm.VectorIndex.load(path)
    with sm.VectorIndex.load(good) as again:
        _same_state(_search_state(index), _search_state(again))


def test_vectorindex_save_bad_path(index, tmp_path):
    before = _search_state(index)
    with pytest.raises(OSError):
        index.save(str(tmp_path / "no" / "such" / "dir" / "i.safetensors"))
    with pytest.raises(TypeError):
        index.save(None)
    assert os.listdir(tmp_path) == []
    _same_state(before, _search_state(index))


# ==== checkpoints ===========================================================================================
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    p = str(tmp_path_factory.mktemp("ck") / "m.safetensors")
    model.save(p, TOK)
    return p


def _ck_variant(good, tmp, name):
    tensors, meta = st.load_file(good)
    cfg = json.loads(meta["model_config"])

    def m(**kw):
        return lambda meta: meta.update(kw)

    def t(fn):
        return lambda ts: fn(ts)

    spec = {
        "format": dict(meta_change=m(format="other")),
        "no-format": dict(meta_change=lambda mm: mm.pop("format")),
        "version-str": dict(meta_change=m(format_version="one")),
        "version-2": dict(meta_change=m(format_version="2")),
        "config-missing": dict(meta_change=lambda mm: mm.pop("model_config")),
        "config-not-json": dict(meta_change=m(model_config="{nope")),
        "config-deep-json": dict(meta_change=m(model_config=DEEP_JSON)),
        "config-list": dict(meta_change=m(model_config="[1]")),
        "config-null": dict(meta_change=m(model_config="null")),
        "config-vocab-str": dict(meta_change=m(model_config=json.dumps(dict(cfg, vocab_size="14")))),
        "config-vocab-huge": dict(meta_change=m(model_config=json.dumps(dict(cfg, vocab_size=2 ** 40)))),
        "config-n_head-3": dict(meta_change=m(model_config=json.dumps(dict(cfg, n_head=3)))),
        "config-layers-4096": dict(meta_change=m(model_config=json.dumps(dict(cfg, n_layer=4096)))),
        "config-unknown-field": dict(meta_change=m(model_config=json.dumps(dict(cfg, bogus=1)))),
        "config-missing-field": dict(meta_change=m(model_config=json.dumps({"vocab_size": 5}))),
        "tokenizer-bad": dict(meta_change=m(tokenizer="{nope")),
        "tokenizer-deep": dict(meta_change=m(tokenizer=DEEP_JSON)),
        "tokenizer-bigger": dict(meta_change=m(tokenizer=sm.Tokenizer(TEXT + "XYZ!?").to_json())),
        "training-deep-json": dict(meta_change=m(training=DEEP_JSON)),
        "training-not-json": dict(meta_change=m(training="{nope")),
        "training-list": dict(meta_change=m(training="[]")),
        "tensor-missing": dict(tensor_change=t(lambda ts: ts.pop("transformer.ln_f.bias"))),
        "tensor-extra": dict(tensor_change=t(lambda ts: ts.update(bogus=np.zeros(1, f32)))),
        "tensor-float64": dict(tensor_change=t(lambda ts: ts.update(
            {"transformer.ln_f.bias": ts["transformer.ln_f.bias"].astype(np.float64)}))),
        "tensor-shape": dict(tensor_change=t(lambda ts: ts.update({"transformer.ln_f.bias": np.zeros(9, f32)}))),
        "tensor-nan": dict(tensor_change=t(lambda ts: ts.update({"transformer.ln_f.bias": np.full(8, np.nan, f32)}))),
        "tensor-inf": dict(tensor_change=t(lambda ts: ts.update({"transformer.wte.weight": np.full((V, 8), np.inf, f32)}))),
        "optimizer-half": dict(tensor_change=t(lambda ts: ts.update(
            {"optimizer.exp_avg." + k: v for k, v in list(ts.items())}))),
        "optimizer-odd": dict(tensor_change=t(lambda ts: ts.update({"optimizer.other": np.zeros(1, f32)}))),
    }
    raw = {
        "missing": str(tmp / "nope.safetensors"), "directory": str(tmp),
        "empty": b"", "short": b"\x01\x02", "garbage": b"\xff" * 100,
        "header-length-huge": (2 ** 63).to_bytes(8, "little") + b"{}",
        "header-length-past-end": (100).to_bytes(8, "little") + b"{}",
        "header-not-utf8": (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc",
        "header-deep": len(DEEP_JSON).to_bytes(8, "little") + DEEP_JSON.encode(),
        "truncated": open(good, "rb").read()[:-7],
        "offsets-past-end": None,
    }
    if name in spec:
        return _rewrite(good, str(tmp / f"{name}.safetensors"), **spec[name])
    if name == "offsets-past-end":
        hdr = json.dumps({"x": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 2 ** 42]}}).encode()
        data = len(hdr).to_bytes(8, "little") + hdr
    else:
        data = raw[name]
    if isinstance(data, str):
        return data
    p = tmp / f"{name}.bin"
    p.write_bytes(data)
    return str(p)


_CK_FILES = ["missing", "directory", "empty", "short", "garbage", "header-length-huge", "header-length-past-end",
             "header-not-utf8", "header-deep", "truncated", "offsets-past-end", "format", "no-format",
             "version-str", "version-2", "config-missing", "config-not-json", "config-deep-json", "config-list",
             "config-null", "config-vocab-str", "config-vocab-huge", "config-n_head-3", "config-layers-4096",
             "config-unknown-field", "config-missing-field", "tokenizer-bad", "tokenizer-deep",
             "tokenizer-bigger", "training-deep-json", "training-not-json", "training-list", "tensor-missing",
             "tensor-extra", "tensor-float64", "tensor-shape", "tensor-nan", "tensor-inf", "optimizer-half",
             "optimizer-odd"]


@pytest.mark.parametrize("variant", _CK_FILES)
@pytest.mark.parametrize("reader", ["read_checkpoint", "load_checkpoint", "TransformerModel.load"])
def test_checkpoint_hostile_file(ckpt, tmp_path, variant, reader):
    path = _ck_variant(ckpt, tmp_path, variant)
    fn = {"read_checkpoint": sm.read_checkpoint, "load_checkpoint": sm.load_checkpoint,
          "TransformerModel.load": sm.TransformerModel.load}[reader]
    before = _outstanding()
    with pytest.raises(sm.CheckpointError):
        fn(path)
    assert _outstanding() == before
    m, tok = sm.load_checkpoint(ckpt)
    assert tok == TOK and m.config.vocab_size == V


_SAVE_BAD = [
    ("model-str", lambda m, d: sm.save_checkpoint(d / "x", "model"), TypeError, "model"),
    ("tok-str", lambda m, d: sm.save_checkpoint(d / "x", m, "tok"), TypeError, "tokenizer"),
    ("training-object", lambda m, d: sm.save_checkpoint(d / "x", m, TOK, training={"x": object()}), TypeError,
     None),
    ("path-None", lambda m, d: sm.save_checkpoint(None, m), TypeError, None),
    ("path-no-dir", lambda m, d: sm.save_checkpoint(d / "no" / "dir" / "x", m), OSError, None),
    ("path-is-dir", lambda m, d: sm.save_checkpoint(d, m), OSError, None),
    ("st-complex", lambda m, d: st.save_file({"a": np.zeros(2, np.complex64)}, d / "x"), sm.ValidationError,
     "complex64"),
    ("st-object", lambda m, d: st.save_file({"a": np.zeros(2, object)}, d / "x"), sm.ValidationError, "object"),
    ("st-reserved", lambda m, d: st.save_file({"__metadata__": np.zeros(2)}, d / "x"), sm.ValidationError,
     "__metadata__"),
    ("st-empty-name", lambda m, d: st.save_file({"": np.zeros(2)}, d / "x"), sm.ValidationError, "non-empty"),
    ("st-name-int", lambda m, d: st.save_file({1: np.zeros(2)}, d / "x"), TypeError, "names"),
    ("st-list", lambda m, d: st.save_file({"a": [1, 2]}, d / "x"), TypeError, "numpy"),
    ("st-not-mapping", lambda m, d: st.save_file([("a", np.zeros(2))], d / "x"), TypeError, "mapping"),
    ("st-meta-int", lambda m, d: st.save_file({"a": np.zeros(2)}, d / "x", {"k": 1}), TypeError, "metadata"),
    ("st-surrogate", lambda m, d: st.save_file({"a\ud800": np.zeros(2)}, d / "x"), sm.ValidationError,
     "surrogate"),
]


@pytest.mark.parametrize("case", _SAVE_BAD, ids=[c[0] for c in _SAVE_BAD])
def test_checkpoint_save_bad(model, tmp_path, case):
    _, call, exc, match = case
    want = model.forward(_IDS)
    with pytest.raises(exc, match=match):
        call(model, tmp_path)
    # nothing written: no file under the final name, no temporary left behind
    assert os.listdir(tmp_path) == []
    _logits_unchanged(model, want)


def test_model_save_disposed_or_bad_path(tmp_path):
    m = _tiny_model()
    with pytest.raises(OSError):
        m.save(str(tmp_path / "missing-dir" / "m.safetensors"))
    m.dispose()
    with pytest.raises(sm.ObjectDisposedError):
        m.save(str(tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == []


# ==== retrieval ===============================================================================================
_DOCS = ["the quick brown fox", "jumps over the lazy dog", "a fox is quick"]


@pytest.fixture
def retriever():
    emb = sm.TfidfEmbedder(64).fit(_DOCS)
    r = sm.Retriever(sm.VectorIndex(emb.dim), emb, k=2)
    r.add_documents(_DOCS)
    yield r
    r.index.dispose()


@pytest.mark.parametrize("call, exc, match", [
    (lambda r: sm.TfidfEmbedder(0), sm.ValidationError, "max_features"),
    (lambda r: sm.TfidfEmbedder("5"), sm.ValidationError, "max_features"),
    (lambda r: sm.TfidfEmbedder(True), sm.ValidationError, "max_features"),
    (lambda r: sm.TfidfEmbedder().fit([]), sm.ValidationError, "documents"),
    (lambda r: sm.TfidfEmbedder().fit(None), sm.ValidationError, "documents"),
    (lambda r: sm.TfidfEmbedder().fit([1, 2]), sm.ValidationError, "documents"),
    (lambda r: sm.TfidfEmbedder().fit(["!!!", "..."]), sm.ValidationError, "no words"),
    (lambda r: sm.TfidfEmbedder().embed("x"), sm.ValidationError, "not fitted"),
    (lambda r: r.embedder.embed(5), sm.ValidationError, "texts"),
    (lambda r: r.embedder.embed([b"x"]), sm.ValidationError, "texts"),
    (lambda r: sm.Retriever("index", r.embedder), TypeError, "index"),
    (lambda r: sm.Retriever(r.index, object()), TypeError, "embedder"),
    (lambda r: sm.Retriever(sm.VectorIndex(3), r.embedder), sm.ValidationError, "dimensional"),
    (lambda r: sm.Retriever(r.index, r.embedder, k=0), sm.ValidationError, "k"),
    (lambda r: sm.Retriever(r.index, r.embedder, k=2.0), sm.ValidationError, "k"),
    (lambda r: r.retrieve(5), sm.ValidationError, "query"),
    (lambda r: r.retrieve(None), sm.ValidationError, "query"),
    (lambda r: r.retrieve("fox", k=0), sm.ValidationError, "k"),
    (lambda r: r.retrieve("fox", k="2"), sm.ValidationError, "k"),
    (lambda r: r.add_documents(["zzz qqq"]), sm.ValidationError, "documents"),
    (lambda r: r.add_documents(["fox"], metadata=[1, 2]), sm.ValidationError, "metadata"),
    (lambda r: r.add_documents(["fox"], ids=["d0", "d0"]), sm.ValidationError, "ids"),
    (lambda r: r.add_documents(5), sm.ValidationError, "documents"),
    (lambda r: sm.PromptBuilder(0), sm.ValidationError, "max_chars"),
    (lambda r: sm.PromptBuilder(-5), sm.ValidationError, "max_chars"),
    (lambda r: sm.PromptBuilder(1.5), sm.ValidationError, "max_chars"),
    (lambda r: sm.PromptBuilder().build(5, []), sm.ValidationError, "question"),
    (lambda r: sm.Answerer("r", sm.PromptBuilder(), None), TypeError, "retriever"),
    (lambda r: sm.Answerer(r, "pb", None), TypeError, "prompt_builder"),
    (lambda r: sm.Answerer(r, sm.PromptBuilder(), "s"), TypeError, "sampling"),
    (lambda r: sm.ModelEmbedder("m", TOK), TypeError, "model"),
    (lambda r: sm.ModelEmbedder(_tiny_model(), "t"), TypeError, "tokenizer"),
    (lambda r: sm.ModelEmbedder(_tiny_model(), sm.Tokenizer(TEXT + "XYZ")), sm.ValidationError, "vocab_size"),
    (lambda r: sm.ModelEmbedder(_tiny_model(), TOK, threads=0).embed("the fox"), sm.ValidationError, "threads"),
    (lambda r: sm.ModelEmbedder(_tiny_model(), TOK).embed(None), sm.ValidationError, "texts"),
], ids=["tfidf-0", "tfidf-str", "tfidf-bool", "fit-empty", "fit-None", "fit-ints", "fit-no-words",
        "embed-unfitted", "embed-int", "embed-bytes", "retriever-index", "retriever-embedder", "retriever-dim",
        "retriever-k0", "retriever-kfloat", "retrieve-int", "retrieve-None", "retrieve-k0", "retrieve-kstr",
        "add-unknown-words", "add-metadata-count", "add-dup-ids", "add-int", "pb-0", "pb-neg", "pb-float",
        "pb-question-int", "answerer-retriever", "answerer-pb", "answerer-sampling", "modelemb-model",
        "modelemb-tok", "modelemb-vocab", "modelemb-threads", "modelemb-None"])
def test_retrieval_bad(retriever, call, exc, match):
    before = [(p.id, p.score) for p in retriever.retrieve("quick fox")]
    with pytest.raises(exc, match=match):
        call(retriever)
    assert [(p.id, p.score) for p in retriever.retrieve("quick fox")] == before
    assert len(retriever.index) == 3


# ==== MemoryTracker ===========================================================================================
@pytest.mark.parametrize("call, match", [
    (lambda: sm.MemoryTracker("pool"), "pool"), (lambda: sm.MemoryTracker(5), "pool"),
    (lambda: sm.MemoryTracker().snapshot(5), "phase"), (lambda: sm.MemoryTracker().snapshot(None), "phase"),
    (lambda: sm.MemoryTracker().start().snapshot(b"x"), "phase"),
], ids=["pool-str", "pool-int", "phase-int", "phase-None", "phase-bytes"])
def test_memorytracker_bad(call, match):
    with pytest.raises(sm.ValidationError, match=match):
        call()


def test_memorytracker_disposed_pool():
    pool = sm.MemoryPool(max_buffer_size=64)
    mt = sm.MemoryTracker(pool).start()
    pool.dispose()
    with pytest.raises(sm.ObjectDisposedError):
        mt.snapshot("after")
    assert [s.phase for s in mt.snapshots] == ["start"]


# ==== configuration ================================================================================================
@pytest.mark.parametrize("cls, field, value", [
    (ModelOptions, "preset", "huge"), (ModelOptions, "n_layer", 0), (ModelOptions, "n_head", "4"),
    (ModelOptions, "n_embd", 130), (ModelOptions, "block_size", -1), (ModelOptions, "dropout", float("nan")),
    (ModelOptions, "dropout", 1.0), (ModelOptions, "n_layer", True),
    (TrainingOptions, "steps", -1), (TrainingOptions, "batch_size", 0), (TrainingOptions, "learning_rate", -1.0),
    (TrainingOptions, "learning_rate", float("inf")), (TrainingOptions, "learning_rate", float("nan")),
    (TrainingOptions, "checkpoint_dir", ""), (TrainingOptions, "checkpoint_dir", 5),
    (TrainingOptions, "threads", 0), (TrainingOptions, "threads", 2 ** 31), (TrainingOptions, "seed", -1),
    (TrainingOptions, "log_every", -1), (TrainingOptions, "steps", 1.5), (TrainingOptions, "eps", 1e-50),
    (TrainingOptions, "min_lr", 1.0), (TrainingOptions, "save_every", 10),
    (InferenceOptions, "max_tokens", -1), (InferenceOptions, "temperature", -1.0),
    (InferenceOptions, "temperature", float("nan")), (InferenceOptions, "temperature", 1e9),
    (InferenceOptions, "top_k", -1), (InferenceOptions, "top_p", 0.0), (InferenceOptions, "top_p", 1.5),
    (InferenceOptions, "seed", -1), (InferenceOptions, "stop", [""]), (InferenceOptions, "stop", [1]),
    (InferenceOptions, "stop", 5), (InferenceOptions, "stop", None), (InferenceOptions, "window", "move"),
    (InferenceOptions, "threads", 0),
    (ServerOptions, "host", ""), (ServerOptions, "host", None), (ServerOptions, "port", -1),
    (ServerOptions, "port", 65536), (ServerOptions, "port", "80"), (ServerOptions, "max_concurrency", 0),
    (ServerOptions, "max_concurrency", 2 ** 20), (ServerOptions, "queue_size", -1), (ServerOptions, "timeout", 0),
    (ServerOptions, "timeout", float("nan")), (ServerOptions, "threads_per_request", 0),
], ids=lambda v: v.__name__ if isinstance(v, type) else repr(v)[:20])
def test_option_classes(cls, field, value):
    # a number field given another type is a TypeError (as for every smallmind argument); the
    # settings loader turns it into a ValidationError naming the section (test_config.py)
    wrong_type = field in ("n_layer", "n_head", "steps", "port") and not isinstance(value, int) or value is True
    with pytest.raises(TypeError if wrong_type else sm.ValidationError, match=field):
        cls(**{field: value})


def _toml(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


_SETTINGS_BAD = [
    ("missing-file", lambda tp: dict(config_path=str(tp / "nope.toml")), sm.ValidationError, "no such config"),
    ("directory", lambda tp: dict(config_path=str(tp)), sm.ValidationError, "cannot read"),
    ("not-utf8", lambda tp: dict(config_path=_toml(tp, b"\xff\xfe[model]\n")), sm.ValidationError, "not valid TOML"),
    ("not-toml", lambda tp: dict(config_path=_toml(tp, "[model\n")), sm.ValidationError, "not valid TOML"),
    ("path-int", lambda tp: dict(config_path=3), TypeError, "config_path"),
    ("path-list", lambda tp: dict(config_path=["a.toml"]), TypeError, "config_path"),
    ("unknown-section", lambda tp: dict(config_path=_toml(tp, "[bogus]\nx = 1\n")), sm.ValidationError, "bogus"),
    ("section-not-table", lambda tp: dict(config_path=_toml(tp, "model = 5\n")), sm.ValidationError, "model"),
    ("unknown-field", lambda tp: dict(config_path=_toml(tp, "[model]\nwidth = 5\n")), sm.ValidationError, "width"),
    ("field-type", lambda tp: dict(config_path=_toml(tp, "[training]\nsteps = \"many\"\n")), sm.ValidationError, "steps"),
    ("field-table", lambda tp: dict(config_path=_toml(tp, "[training]\nsteps = {a = 1}\n")), sm.ValidationError, "steps"),
    ("field-nan", lambda tp: dict(config_path=_toml(tp, "[inference]\ntemperature = nan\n")), sm.ValidationError,
     "temperature"),
    ("field-inf", lambda tp: dict(config_path=_toml(tp, "[training]\nlearning_rate = inf\n")), sm.ValidationError,
     "learning_rate"),
    ("stop-int", lambda tp: dict(config_path=_toml(tp, "[inference]\nstop = 5\n")), sm.ValidationError, "stop"),
    ("preset-int", lambda tp: dict(config_path=_toml(tp, "[model]\npreset = 5\n")), sm.ValidationError, "preset"),
    ("port-huge", lambda tp: dict(config_path=_toml(tp, "[server]\nport = 9223372036854775807\n")),
     sm.ValidationError, "port"),
    ("env-int", lambda tp: dict(env={"SMALLMIND_TRAINING_STEPS": "many"}), sm.ValidationError, "training.steps"),
    ("env-float", lambda tp: dict(env={"SMALLMIND_INFERENCE_TEMPERATURE": "hot"}), sm.ValidationError, "temperature"),
    ("env-nan", lambda tp: dict(env={"SMALLMIND_INFERENCE_TOP_P": "nan"}), sm.ValidationError, "top_p"),
    ("env-overflow", lambda tp: dict(env={"SMALLMIND_INFERENCE_TEMPERATURE": "1e400"}), sm.ValidationError,
     "temperature"),
    ("env-unknown", lambda tp: dict(env={"SMALLMIND_SERVER_COLOR": "red"}), sm.ValidationError, "server.color"),
    ("env-seed", lambda tp: dict(env={"SMALLMIND_INFERENCE_SEED": "1.5"}), sm.ValidationError, "seed"),
    ("env-stop-escape", lambda tp: dict(env={"SMALLMIND_INFERENCE_STOP": "\\x"}), sm.ValidationError, "stop"),
    ("env-port-negative", lambda tp: dict(env={"SMALLMIND_SERVER_PORT": "-80"}), sm.ValidationError, "port"),
    ("overrides-section", lambda tp: dict(overrides={"bogus": {"x": 1}}), sm.ValidationError, "bogus"),
    ("overrides-field", lambda tp: dict(overrides={"model": {"width": 1}}), sm.ValidationError, "width"),
    ("overrides-value", lambda tp: dict(overrides={"server": {"port": 10 ** 30}}), sm.ValidationError, "port"),
]


@pytest.mark.parametrize("case", _SETTINGS_BAD, ids=[c[0] for c in _SETTINGS_BAD])
def test_load_settings_bad(tmp_path, case):
    _, make, exc, match = case
    kw = make(tmp_path)
    kw.setdefault("env", {})
    with pytest.raises(exc, match=match):
        load_settings(**kw)
    assert load_settings(env={}).training.steps == TrainingOptions().steps


# ==== the command line =========================================================================================
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, ckpt):
    d = tmp_path_factory.mktemp("cli")
    (d / "data.txt").write_text(TEXT)
    (d / "empty.txt").write_text("   \n")
    (d / "latin1.txt").write_bytes(b"caf\xe9 " * 10)
    (d / "bad.toml").write_text("[model\n")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 100)
    notok = str(d / "notok.safetensors")
    _model().save(notok)
    return {"dir": str(d), "ckpt": ckpt, "notok": notok}


_CLI_BAD = [
    ("steps-not-int", ["--steps", "ten"], "--steps"), ("unknown-option", ["--bogus"], "bogus"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("demo-steps-0", ["--steps", "0", "--checkpoint-dir", ""], "--steps"),
    ("demo-steps-negative", ["--steps", "-5", "--checkpoint-dir", ""], "--steps"),
    ("demo-tokens-negative", ["--steps", "1", "--tokens", "-1", "--checkpoint-dir", ""], "--tokens"),
    ("demo-n_head", ["--steps", "1", "--n-head", "3", "--checkpoint-dir", ""], "n_embd"),
    ("demo-batch-0", ["--steps", "1", "--batch-size", "0", "--checkpoint-dir", ""], "batch_size"),
    ("log-level", ["--log-level", "LOUD", "info"], "log-level"),
    ("info-config-missing", ["info", "--config", "{dir}/nope.toml"], "no such config"),
    ("info-config-bad", ["info", "--config", "{dir}/bad.toml"], "not valid TOML"),
    ("info-config-dir", ["info", "--config", "{dir}"], "cannot read"),
    ("train-missing-data", ["train", "{dir}/nope.txt"], "no such file"),
    ("train-empty-data", ["train", "{dir}/empty.txt"], "empty"),
    ("train-not-utf8", ["train", "{dir}/latin1.txt"], "UTF-8"),
    ("train-steps-negative", ["train", "{dir}/data.txt", "--steps", "-1"], "steps"),
    ("train-steps-huge", ["train", "{dir}/data.txt", "--steps", "99999999999999999999", "--block-size", "8"],
     "steps"),
    ("train-lr-nan", ["train", "{dir}/data.txt", "--learning-rate", "nan"], "learning_rate"),
    ("train-lr-inf", ["train", "{dir}/data.txt", "--learning-rate", "inf"], "learning_rate"),
    ("train-preset", ["train", "{dir}/data.txt", "--preset", "huge"], "preset"),
    ("train-threads-0", ["train", "{dir}/data.txt", "--threads", "0"], "threads"),
    ("train-n-embd-2**31", ["train", "{dir}/data.txt", "--n-embd", "2147483648", "--n-head", "1"], "n_embd"),
    # a valid configuration of 12 TiB: numpy's MemoryError used to escape as a traceback
    ("train-model-too-big", ["train", "{dir}/data.txt", "--n-layer", "64", "--n-embd", "65536", "--n-head", "1"],
     "memory"),
    ("train-block-too-long-for-text", ["train", "{dir}/data.txt", "--block-size", "100000", "--n-layer", "1",
                                       "--n-embd", "8", "--n-head", "1"], "too short"),
    ("train-resume-missing", ["train", "{dir}/data.txt", "--resume", "{dir}/nope"], "resume"),
    ("train-resume-garbage", ["train", "{dir}/data.txt", "--resume", "{dir}/garbage.safetensors"], "safetensors"),
    ("generate-missing", ["generate", "{dir}/nope.safetensors"], "no such checkpoint"),
    ("generate-garbage", ["generate", "{dir}/garbage.safetensors"], "safetensors"),
    ("generate-no-tokenizer", ["generate", "{notok}"], "tokenizer"),
    ("generate-temperature", ["generate", "{ckpt}", "--temperature", "-1"], "temperature"),
    ("generate-top-p", ["generate", "{ckpt}", "--top-p", "2"], "top_p"),
    ("generate-top-k", ["generate", "{ckpt}", "--top-k", "-3"], "top_k"),
    ("generate-max-tokens", ["generate", "{ckpt}", "--max-tokens", "-1"], "max_tokens"),
    ("generate-seed", ["generate", "{ckpt}", "--seed", "-1"], "seed"),
    ("generate-stop-empty", ["generate", "{ckpt}", "--stop", ""], "stop"),
    ("generate-empty-prompt", ["generate", "{ckpt}", "--prompt", ""], "prompt"),
    ("generate-window", ["generate", "{ckpt}", "--window", "move"], "window"),
    ("generate-threads", ["generate", "{ckpt}", "--threads", "0"], "threads"),
    ("chat-missing", ["chat", "{dir}/nope.safetensors"], "no such checkpoint"),
    ("serve-port", ["serve", "{ckpt}", "--port", "70000"], "port"),
    ("serve-timeout", ["serve", "{ckpt}", "--timeout", "0"], "timeout"),
    ("serve-missing", ["serve", "{dir}/nope.safetensors"], "no such checkpoint"),
]


@pytest.mark.parametrize("case", _CLI_BAD, ids=[c[0] for c in _CLI_BAD])
def test_cli_bad(cli_files, case):
    _, argv, match = case
    argv = [a.format(**cli_files) for a in argv]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SMALLMIND_TRAINING_STEPS", None)
    p = subprocess.run([sys.executable, "-m", "smallmind", *argv], capture_output=True, text=True,
                       timeout=60, cwd=cli_files["dir"], env=env, stdin=subprocess.DEVNULL)
    errors = [line for line in p.stderr.splitlines() if line.startswith("smallmind: error:")]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and match in errors[0], p.stderr[-2000:]


# ==== the HTTP server ============================================================================================
def _post_all(app, bodies):
    import httpx as hx

    async def main():
        transport = hx.ASGITransport(app=app)
        async with hx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = []
            for body in bodies:
                if isinstance(body, (bytes, str)):
                    r = await c.post("/v1/completions", content=body,
                                     headers={"Content-Type": "application/json"})
                else:
                    r = await c.post("/v1/completions", json=body)
                out.append(r)
            return out
    return asyncio.run(main())


_HTTP_BAD = [
    ("not-json", b"{nope", "JSON"), ("deep-json", DEEP_JSON.encode(), "JSON"), ("not-utf8", b"\xff\xfe", "JSON"),
    ("empty", b"", "JSON"), ("list", [1, 2], "object"), ("null", b"null", "object"),
    ("no-prompt", {"max_tokens": 3}, "prompt"), ("prompt-int", {"prompt": 5}, "prompt"),
    ("prompt-list", {"prompt": ["the", 5]}, "prompt"), ("prompt-empty", {"prompt": ""}, "prompt"),
    ("prompt-unknown-chars", {"prompt": "€€€"}, "prompt"),
    ("max_tokens-negative", {"prompt": "the", "max_tokens": -1}, "max_tokens"),
    ("max_tokens-huge", {"prompt": "the", "max_tokens": 2 ** 63}, "max_tokens"),
    ("max_tokens-float", {"prompt": "the", "max_tokens": 1.5}, "max_tokens"),
    ("max_tokens-str", {"prompt": "the", "max_tokens": "5"}, "max_tokens"),
    ("max_tokens-bool", {"prompt": "the", "max_tokens": True}, "max_tokens"),
    ("temperature-negative", {"prompt": "the", "temperature": -1}, "temperature"),
    ("temperature-str", {"prompt": "the", "temperature": "hot"}, "temperature"),
    ("temperature-nan", b'{"prompt": "the", "temperature": NaN}', "temperature"),
    ("temperature-inf", b'{"prompt": "the", "temperature": 1e400}', "temperature"),
    ("top_p-zero", {"prompt": "the", "top_p": 0}, "top_p"), ("top_p-big", {"prompt": "the", "top_p": 2}, "top_p"),
    ("top_k-negative", {"prompt": "the", "top_k": -1}, "top_k"),
    ("top_k-float", {"prompt": "the", "top_k": 1.5}, "top_k"),
    ("seed-negative", {"prompt": "the", "seed": -1}, "seed"), ("seed-str", {"prompt": "the", "seed": "1"}, "seed"),
    ("stop-int", {"prompt": "the", "stop": 5}, "stop"), ("stop-list-int", {"prompt": "the", "stop": [1]}, "stop"),
    ("stop-empty", {"prompt": "the", "stop": [""]}, "stop"),
    ("stream-str", {"prompt": "the", "stream": "yes"}, "stream"),
    ("n-too-many", {"prompt": "the", "n": 99}, "n must be"),
]


def test_server_request_validation():
    """Every bad request is answered 400 with a JSON message naming the field; none reaches a
    generation (the pool's count is unchanged) and a good request still works afterwards."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from smallmind.generation.server import create_app
    m = _tiny_model()
    app = create_app(m, TOK, ServerOptions(max_concurrency=1, queue_size=0), model_name="t")
    before = _outstanding()
    bodies = [b for _, b, _ in _HTTP_BAD]
    good = {"prompt": "the qu", "max_tokens": 5, "temperature": 0}
    tiny = {"prompt": "the qu", "max_tokens": 5, "temperature": 1e-320, "seed": 2 ** 70}
    replies = _post_all(app, bodies + [good, tiny])
    failures = []
    for (name, _, match), r in zip(_HTTP_BAD, replies):
        try:
            body = r.json()
            msg = body["error"]["message"]
        except Exception:                   # noqa: BLE001 - reported below
            failures.append(f"{name}: {r.status_code} not a JSON error: {r.text[:200]}")
            continue
        if r.status_code != 400 or match not in msg:
            failures.append(f"{name}: {r.status_code} {msg!r} (expected 400 naming {match!r})")
    assert not failures, "\n".join(failures)
    want = sm.Sampling(m, TOK).generate("the qu", 5, temperature=0)
    assert replies[-2].status_code == 200 and replies[-2].json()["choices"][0]["text"] == want
    # the tiny temperature is the greedy limit (it used to be a 500 from numpy's NaN check)
    assert replies[-1].status_code == 200 and replies[-1].json()["choices"][0]["text"] == want
    deadline = time.time() + 10          # the batch engine gives its cache back once idle
    while _outstanding() != before and time.time() < deadline:
        time.sleep(0.01)
    assert _outstanding() == before
    m.dispose()


# ==== misc: threads, SIMD level, public constants =====================================================
@pytest.mark.parametrize("call, exc, match", [
    (lambda: sm.set_num_threads(0), sm.ValidationError, "n"), (lambda: sm.set_num_threads(-1), sm.ValidationError, "n"),
    (lambda: sm.set_num_threads(2 ** 31), sm.ValidationError, "n"), (lambda: sm.set_num_threads("2"), TypeError, "n"),
    (lambda: sm.set_num_threads(None), TypeError, "n"), (lambda: sm.set_num_threads(2.0), TypeError, "n"),
    (lambda: sm.set_simd_level("sse"), sm.ValidationError, "level"),
    (lambda: sm.set_simd_level(2), sm.ValidationError, "level"),
], ids=["threads-0", "threads-neg", "threads-2**31", "threads-str", "threads-None", "threads-float",
        "simd-unknown", "simd-int"])
def test_runtime_settings_bad(call, exc, match):
    n, level = sm.get_num_threads(), sm.simd_level()
    with pytest.raises(exc, match=match):
        call()
    assert sm.get_num_threads() == n and sm.simd_level() == level


@pytest.mark.parametrize("layout", ["strided", "transposed", "reversed", "int8", "uint64", "list"])
def test_model_forward_accepts_any_integer_layout(model, layout):
    """Any integer array-like is taken (copied C-contiguous int32): same logits as the copy."""
    base = np.arange(8).reshape(2, 4) % V
    ids = {"strided": np.repeat(base, 2, axis=1)[:, ::2], "transposed": np.asfortranarray(base),
           "reversed": base[::-1], "int8": base.astype(np.int8), "uint64": base.astype(np.uint64),
           "list": base.tolist()}[layout]
    assert np.array_equal(model.forward(ids), model.forward(np.ascontiguousarray(np.asarray(ids), i32)))
