# _core.pyi - type stub of the compiled core, smallmind.core._core (built from _core.pyx and the
# _*.pxi files it includes; keep the two in step). Arrays are numpy arrays of the dtype the
# wrappers check at run time: float32 for data, int32 for token ids and targets; every wrapper
# also checks C-contiguity and shapes, which types cannot say. `threads=None` is the library's
# default thread budget. The cdef classes are @disjoint_base (a C layout of their own: no class
# can derive from two of them); those built by __cinit__ declare __new__. Checked against the
# built module by mypy's stubtest: see tools/check_wheel.sh and tools/stubtest-allowlist.txt.
from types import TracebackType
from typing import Any, Literal, TypedDict, overload, type_check_only

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, TypeAlias, disjoint_base

_F32: TypeAlias = npt.NDArray[np.float32]
_I32: TypeAlias = npt.NDArray[np.int32]
# (vocab_size, block_size, n_layer, n_head, n_embd)
_Config: TypeAlias = tuple[int, int, int, int, int]
# Numbers as the wrappers accept them: Python or numpy integers (not bool), real numbers.
_Int: TypeAlias = int | np.integer[Any]
_Float: TypeAlias = float | np.integer[Any] | np.floating[Any]
# an int for every sequence, or one int per sequence (B,)
_PerRow: TypeAlias = _Int | npt.ArrayLike

# ---- _common.pxi: threads, SIMD level, build facts ---------------------------------------------

MAX_ALLOC_ELEMENTS: int
MAX_THREADS: int
_SIMD_LEVELS: dict[str, int]

@type_check_only
class _BuildInfo(TypedDict):
    compiler: str
    openmp: bool
    simd: str
    simd_detected: str
    num_threads: int
    cpu_count: int

def set_num_threads(n: _Int) -> None: ...
def get_num_threads() -> int: ...
def fork_state() -> dict[str, bool]: ...
def simd_level() -> str: ...
def simd_detected() -> str: ...
def set_simd_level(level: str | None) -> str: ...
def build_info() -> _BuildInfo: ...
def fma_peak(threads: _Int | None = None, iters: _Int = 80_000_000) -> tuple[float, float]: ...

# ---- _gemm.pxi: matrix products -----------------------------------------------------------------

_ONE: float
_ZERO: float

def matmul(a: _F32, b: _F32, out: _F32 | None = None, threads: _Int | None = None) -> _F32: ...
def sgemm(
    a: _F32,
    b: _F32,
    out: _F32 | None = None,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: _Float = 1.0,
    beta: _Float = 0.0,
    threads: _Int | None = None,
) -> _F32: ...
def gemm_bf16(
    a: _F32,
    b: _F32,
    out: _F32 | None = None,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: _Float = 1.0,
    beta: _Float = 0.0,
    threads: _Int | None = None,
) -> _F32: ...
def bf16_backend() -> str: ...
def linear(
    x: _F32,
    w: _F32,
    bias: _F32 | None = None,
    residual: _F32 | None = None,
    gelu_out: _F32 | None = None,
    out: _F32 | None = None,
    trans_b: bool = False,
    precision: str = "float32",
    threads: _Int | None = None,
) -> _F32: ...
def sgemm_naive(
    a: _F32,
    b: _F32,
    out: _F32 | None = None,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: _Float = 1.0,
    beta: _Float = 0.0,
) -> _F32: ...

# ---- _pool.pxi: MemoryPool and PooledBuffer ------------------------------------------------------

MAX_RENT_ELEMENTS: int
DEFAULT_MAX_BUFFER_SIZE: int
DEFAULT_MAX_BUFFERS_PER_BUCKET: int

@disjoint_base
class PooledBuffer:
    # Not constructible: MemoryPool.rent(n) makes them (__init__ raises TypeError).
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> npt.NDArray[Any]: ...
    # The buffer protocol (format 'f', 1-D): memoryview(buf), np.frombuffer(buf, np.float32).
    # Python 3.12+ shows it as these methods (PEP 688); declared for every version, as typeshed
    # does for bytes, so type checkers accept a PooledBuffer wherever a buffer is expected.
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def pool(self) -> MemoryPool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def released(self) -> bool: ...  # the same as closed
    @property
    def disposed(self) -> bool: ...  # the same as closed
    def close(self) -> None: ...
    def release(self) -> None: ...  # the same as close()
    def dispose(self) -> None: ...  # the same as close()
    def __enter__(self) -> Self: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]: ...
    def __reduce__(self) -> Any: ...  # raises TypeError: not picklable

@disjoint_base
class MemoryPool:
    def __init__(
        self,
        max_buffer_size: _Int = 16777216,
        max_buffers_per_bucket: _Int = 16,
        max_pooled_bytes: _Int | None = None,
    ) -> None: ...
    def rent(self, n: _Int) -> PooledBuffer: ...
    def return_buffer(self, buf: PooledBuffer) -> None: ...
    def trim(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def reset_peak(self) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def max_buffer_size(self) -> int: ...
    @property
    def max_buffers_per_bucket(self) -> int: ...
    @property
    def max_pooled_bytes(self) -> int | None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def disposed(self) -> bool: ...  # the same as closed
    @property
    def is_default(self) -> bool: ...
    def close(self) -> None: ...
    def dispose(self) -> None: ...  # the same as close()
    def __enter__(self) -> Self: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]: ...
    def __reduce__(self) -> Any: ...  # raises TypeError: not picklable

def default_pool() -> MemoryPool: ...

# test and diagnostic helpers (private, used by the tests)
def _pool_global_stats() -> dict[str, int]: ...
def _pool_size_class(nbytes: _Int) -> int: ...
def _pool_class_size(size_class: _Int) -> int: ...
def _pool_stress_c(pool: MemoryPool, threads: _Int, iters: _Int, seed: _Int = 0) -> int: ...
def _pool_hold_lock(pool: MemoryPool, seconds: float) -> None: ...

# ---- _ops.pxi: elementwise and row kernels (backward kernels accumulate and return None) ----------

def encoder_forward(
    idx: _I32, wte: _F32, wpe: _F32, out: _F32 | None = None, threads: _Int | None = None
) -> _F32: ...
def encoder_forward_naive(idx: _I32, wte: _F32, wpe: _F32, out: _F32 | None = None) -> _F32: ...
def encoder_backward(dwte: _F32, dwpe: _F32, dout: _F32, idx: _I32, threads: _Int | None = None) -> None: ...
def encoder_backward_naive(dwte: _F32, dwpe: _F32, dout: _F32, idx: _I32) -> None: ...

# (out, mean, rstd)
def layernorm_forward(
    x: _F32,
    weight: _F32,
    bias: _F32,
    out: _F32 | None = None,
    eps: _Float = 1e-5,
    mean: _F32 | None = None,
    rstd: _F32 | None = None,
    threads: _Int | None = None,
) -> tuple[_F32, _F32, _F32]: ...
def layernorm_forward_naive(
    x: _F32,
    weight: _F32,
    bias: _F32,
    out: _F32 | None = None,
    eps: _Float = 1e-5,
    mean: _F32 | None = None,
    rstd: _F32 | None = None,
) -> tuple[_F32, _F32, _F32]: ...
def layernorm_backward(
    dx: _F32,
    dweight: _F32,
    dbias: _F32,
    dout: _F32,
    x: _F32,
    weight: _F32,
    mean: _F32,
    rstd: _F32,
    threads: _Int | None = None,
) -> None: ...
def layernorm_backward_naive(
    dx: _F32, dweight: _F32, dbias: _F32, dout: _F32, x: _F32, weight: _F32, mean: _F32, rstd: _F32
) -> None: ...
def gelu_forward(x: _F32, out: _F32 | None = None, threads: _Int | None = None) -> _F32: ...
def gelu_forward_naive(x: _F32, out: _F32 | None = None) -> _F32: ...
def gelu_backward(dx: _F32, x: _F32, dout: _F32, threads: _Int | None = None) -> None: ...
def gelu_backward_naive(dx: _F32, x: _F32, dout: _F32) -> None: ...
def softmax(
    x: _F32, temperature: _Float = 1.0, out: _F32 | None = None, threads: _Int | None = None
) -> _F32: ...
def softmax_naive(x: _F32, temperature: _Float = 1.0, out: _F32 | None = None) -> _F32: ...

# dloss: float32 shaped like targets, or one number for every row
def cross_entropy_forward(
    logits: _F32, targets: _I32, out: _F32 | None = None, lse: _F32 | None = None, threads: _Int | None = None
) -> _F32: ...
def cross_entropy_forward_naive(
    logits: _F32, targets: _I32, out: _F32 | None = None, lse: _F32 | None = None
) -> _F32: ...
def cross_entropy_backward(
    dlogits: _F32,
    logits: _F32,
    targets: _I32,
    dloss: _F32 | _Float,
    lse: _F32 | None = None,
    threads: _Int | None = None,
) -> None: ...
def cross_entropy_backward_naive(
    dlogits: _F32, logits: _F32, targets: _I32, dloss: _F32 | _Float, lse: _F32 | None = None
) -> None: ...
def cross_entropy_forward_backward(
    dlogits: _F32,
    logits: _F32,
    targets: _I32,
    dloss: _F32 | _Float,
    out: _F32 | None = None,
    threads: _Int | None = None,
) -> _F32: ...
def residual_forward(a: _F32, b: _F32, out: _F32 | None = None, threads: _Int | None = None) -> _F32: ...
def residual_forward_naive(a: _F32, b: _F32, out: _F32 | None = None) -> _F32: ...
def residual_backward(da: _F32, db: _F32, dout: _F32, threads: _Int | None = None) -> None: ...
def residual_backward_naive(da: _F32, db: _F32, dout: _F32) -> None: ...

# in place; returns `out`
def bias_add(out: _F32, bias: _F32, threads: _Int | None = None) -> _F32: ...
def bias_add_naive(out: _F32, bias: _F32) -> _F32: ...
def bias_backward(dbias: _F32, dout: _F32, threads: _Int | None = None) -> None: ...
def bias_backward_naive(dbias: _F32, dout: _F32) -> None: ...
def adamw_step(
    param: _F32,
    grad: _F32,
    m: _F32,
    v: _F32,
    lr: _Float,
    beta1: _Float = 0.9,
    beta2: _Float = 0.999,
    eps: _Float = 1e-8,
    weight_decay: _Float = 0.0,
    step: _Int = 1,
    threads: _Int | None = None,
) -> None: ...
def adamw_step_naive(
    param: _F32,
    grad: _F32,
    m: _F32,
    v: _F32,
    lr: _Float,
    beta1: _Float = 0.9,
    beta2: _Float = 0.999,
    eps: _Float = 1e-8,
    weight_decay: _Float = 0.0,
    step: _Int = 1,
) -> None: ...
def grad_norm(grad: _F32, threads: _Int | None = None) -> float: ...

# the norm before clipping
def clip_grad_norm(grad: _F32, max_norm: _Float, threads: _Int | None = None) -> float: ...
def clip_grad_norm_naive(grad: _F32, max_norm: _Float) -> float: ...

# ---- _attention.pxi: causal attention and the KV cache -------------------------------------------

ATTENTION_BLOCK: int

# (out (B, T, C), lse (B, n_head, T))
def attention_forward(
    qkv: _F32,
    n_head: _Int,
    out: _F32 | None = None,
    lse: _F32 | None = None,
    threads: _Int | None = None,
    *,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    stream: _Int = 0,
    batch_offset: _Int = 0,
) -> tuple[_F32, _F32]: ...
def attention_forward_naive(
    qkv: _F32,
    n_head: _Int,
    out: _F32 | None = None,
    lse: _F32 | None = None,
    *,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    stream: _Int = 0,
    batch_offset: _Int = 0,
) -> tuple[_F32, _F32]: ...
def attention_dropout_mask(
    B: _Int, n_head: _Int, T: _Int, dropout: _Float, seed: _Int, stream: _Int = 0, batch_offset: _Int = 0
) -> _F32: ...

# dqkv (accumulated into, or a new zero array)
def attention_backward(
    dout: _F32,
    qkv: _F32,
    out: _F32,
    lse: _F32,
    n_head: _Int,
    dqkv: _F32 | None = None,
    threads: _Int | None = None,
    *,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    stream: _Int = 0,
    batch_offset: _Int = 0,
) -> _F32: ...
def attention_backward_naive(
    dout: _F32,
    qkv: _F32,
    out: _F32,
    lse: _F32,
    n_head: _Int,
    dqkv: _F32 | None = None,
    *,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    stream: _Int = 0,
    batch_offset: _Int = 0,
) -> _F32: ...

# (k_cache, v_cache)
def kv_cache_new(batch: _Int, n_head: _Int, capacity: _Int, head_size: _Int) -> tuple[_F32, _F32]: ...
def kv_cache_prefill(
    k_cache: _F32, v_cache: _F32, qkv: _F32, start: _Int = 0, threads: _Int | None = None
) -> None: ...
def kv_cache_append(
    k_cache: _F32, v_cache: _F32, qkv_row: _F32, positions: _PerRow, threads: _Int | None = None
) -> None: ...
def attention_decode(
    q: _F32, k_cache: _F32, v_cache: _F32, lengths: _PerRow, out: _F32 | None = None, threads: _Int | None = None
) -> _F32: ...
def attention_decode_naive(
    q: _F32, k_cache: _F32, v_cache: _F32, lengths: _PerRow, out: _F32 | None = None
) -> _F32: ...

# ---- _model.pxi: the whole GPT in C ---------------------------------------------------------------

_SEED_MAX: int
_INIT_NAMES: dict[int, str]

@type_check_only
class _GPTTensor(TypedDict):
    name: str  # Hugging Face GPT-2 name, e.g. "transformer.h.0.attn.c_attn.weight"
    shape: tuple[int, ...]
    layer: int  # -1 for a tensor that exists once
    offset: int  # in floats, into the parameter block
    hf_rank: int
    init: str  # "normal", "residual", "ones" or "zeros"

@type_check_only
class _GPTLayout(TypedDict):
    num_params: int
    decay_size: int
    tensors: list[_GPTTensor]  # in block order

def gpt_layout(cfg: _Config) -> _GPTLayout: ...

PRECISIONS: tuple[str, ...]

@disjoint_base
class GPTState:
    def __new__(cls, cfg: _Config, B: _Int, T: _Int, precision: str = "float32") -> Self: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def shape(self) -> tuple[int, int] | None: ...
    @property
    def precision(self) -> str | None: ...
    @property
    def ready(self) -> bool: ...

@disjoint_base
class GPTCache:
    weights: GPTQWeights | None
    def __new__(cls, cfg: _Config, B: _Int, capacity: _Int,
                weights: GPTQWeights | None = None) -> Self: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def lengths(self) -> list[int]: ...

# (mean loss, number of non-ignored targets); the loss is None without targets
@overload
def gpt_forward(
    params: _F32,
    cfg: _Config,
    idx: _I32,
    targets: None = None,
    logits: _F32 | None = None,
    state: GPTState | None = None,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    threads: _Int | None = None,
) -> tuple[None, int]: ...
@overload
def gpt_forward(
    params: _F32,
    cfg: _Config,
    idx: _I32,
    targets: _I32,
    logits: _F32 | None = None,
    state: GPTState | None = None,
    dropout: _Float = 0.0,
    seed: _Int = 0,
    threads: _Int | None = None,
) -> tuple[float, int]: ...
def gpt_backward(
    grads: _F32, state: GPTState, params: _F32, loss_scale: _Float = 1.0, threads: _Int | None = None
) -> None: ...
def gpt_adamw(
    params: _F32,
    m: _F32,
    v: _F32,
    grads: _F32,
    cfg: _Config,
    lr: _Float,
    beta1: _Float,
    beta2: _Float,
    eps: _Float,
    weight_decay: _Float,
    step: _Int,
    threads: _Int | None = None,
) -> None: ...
def dropout_forward(
    inp: _F32, p: _Float, seed: _Int, stream: _Int = 0, out: _F32 | None = None, threads: _Int | None = None
) -> _F32: ...

# logits of the last position: (B, V); gpt_prefill_seq: (V,) for idx (T,), (n, V) for idx (n, T)
def gpt_prefill(params: _F32, cfg: _Config, idx: _I32, cache: GPTCache, threads: _Int | None = None) -> _F32: ...
def gpt_prefill_seq(
    params: _F32, cfg: _Config, idx: _I32, cache: GPTCache, seq: _Int, threads: _Int | None = None
) -> _F32: ...
def gpt_decode(params: _F32, cfg: _Config, tokens: _I32, cache: GPTCache, threads: _Int | None = None,
               seqs: _I32 | None = None) -> _F32: ...

# mean over positions of the final layer norm's output: (B, C)
def gpt_embed(params: _F32, cfg: _Config, idx: _I32, threads: _Int | None = None) -> _F32: ...

# ---- _index.pxi: the C rows behind VectorIndex ---------------------------------------------------

_METRICS: dict[str, int]
_STORAGES: dict[str, int]
_QFORMATS: dict[str, int]

@disjoint_base
class IndexStore:
    def __new__(cls, dim: _Int, metric: str, storage: str = "float32", exact: bool = True) -> Self: ...
    def close(self) -> None: ...
    # a compact store without float32 rows: (codes (n, dim) uint16 or int8, scales float32 (n,))
    def codes(self) -> tuple[npt.NDArray[Any], _F32]: ...
    def row_codes(self, r: _Int) -> tuple[npt.NDArray[Any], float]: ...
    def add_codes(self, codes: Any, scales: Any) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def add(self, x: _F32) -> None: ...
    # the old position of the row moved into r's place, or -1
    def remove_row(self, r: _Int) -> int: ...
    def get_row(self, r: _Int) -> _F32: ...
    def rows(self) -> _F32: ...
    # (rows int64 (nq, k), scores float32 (nq, k))
    def search(
        self, q: _F32, k: _Int, threads: _Int | None = None, naive: bool = False
    ) -> tuple[npt.NDArray[np.int64], _F32]: ...

# ---- compact weight matrices (sm_quant.h) ----
@disjoint_base
class QMatrix:
    codes: npt.NDArray[Any]
    scales: _F32
    fmt: str
    layout: str
    def __new__(cls, W: _F32 | None, fmt: str, group: _Int | None = None, layout: str = "rows",
                codes: npt.NDArray[Any] | None = None, scales: _F32 | None = None) -> Self: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def group(self) -> int: ...
    def scales_2d(self) -> _F32 | None: ...
    def dequantize(self) -> _F32: ...
    def matvec(self, x: _F32, k0: _Int | None = None, k1: _Int | None = None,
               n0: _Int | None = None, n1: _Int | None = None) -> _F32: ...

@disjoint_base
class GPTQWeights:
    layers: list[QMatrix]
    wte: QMatrix
    def __new__(cls, layers: list[QMatrix], wte: QMatrix) -> Self: ...
    @property
    def nbytes(self) -> int: ...

# gpt_forward in eval mode with compact matrices: (loss or None, n_valid)
def gpt_forward_q(params: _F32, cfg: _Config, qw: GPTQWeights, idx: _I32, targets: Any = None,
                  logits: Any = None, threads: _Int | None = None) -> tuple[float | None, int]: ...

# ---- sampling (sm_sample.h) ----
# the uniform draw in [0, 1) number `counter` of stream `key`
def sample_uniform(key: _Int, counter: _Int) -> float: ...

# next token per row of logits (n, >= V): int32 (n,), -1 for a row with NaN / infinity
def sample_rows(logits: _F32, V: _Int, temperature: Any, top_k: Any, top_p: Any, key: Any,
                counter: Any, threads: _Int | None = None) -> _I32: ...

# copy the first n cached positions of a sequence into another cache's sequence
def gpt_cache_copy(dst: GPTCache, dst_seq: _Int, src: GPTCache, src_seq: _Int, n: _Int) -> None: ...

# finish a prefill whose first `prefix` tokens are cached: logits (V,), bits as a whole prefill
def gpt_prefill_extend(params: _F32, cfg: _Config, idx: _I32, cache: GPTCache, seq: _Int,
                       prefix: _Int, threads: _Int | None = None) -> _F32: ...

# ---- the generation loop (sm_generate.h) ----
# records of one generated token's log-probabilities (sm_gen_logprob)
GEN_LOGPROB_DTYPE: np.dtype

# the C token loop over every sequence of a cache: row r decodes in sequence r
@disjoint_base
class GPTGenerator:
    n_rows: int
    nv: int
    keep: int
    def __new__(cls, params: _F32, cfg: _Config, cache: GPTCache, nv: _Int, keep: _Int) -> Self: ...
    def set_row(self, r: _Int, window: Any, logits: Any, *, temperature: float = 0.0,
                top_k: _Int = 0, top_p: float = 1.0, key: _Int = 0,
                presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                bias: Any = None, logprobs: _Int | None = None, generated: _Int = 0,
                remaining: _Int = 1, stop_token: _Int | None = None) -> None: ...
    def stop_row(self, r: _Int) -> None: ...
    def row(self, r: _Int) -> dict[str, Any]: ...
    def interrupt(self) -> None: ...
    # (tokens int32 (n_rows, max_steps), tokens made per row int64 (n_rows,), logprob records)
    def run(self, max_steps: _Int, max_seconds: float = 0.0, threads: _Int | None = None,
            logprobs: bool = False) -> tuple[_I32, Any, Any]: ...

# ---- byte-level BPE (sm_bpe.h) ----
_BPE_PATTERNS: dict[str, int]
def unicode_version() -> str: ...
def unicode_class(cp: _Int) -> str: ...
def bpe_train(docs: list[bytes], pattern: str, max_merges: _Int,
              min_count: _Int = 2) -> tuple[_I32, _I32]: ...

@disjoint_base
class BPECore:
    n_tokens: int
    pattern: str
    def __new__(cls, tokens: Any, pattern: str, merges: Any = None,
                whole_words: bool = False) -> Self: ...
    def encode(self, data: bytes) -> _I32: ...
    def encode_batch(self, docs: list[bytes], threads: _Int | None = None) -> list[_I32]: ...
    def pretokenize(self, data: bytes) -> list[tuple[int, int]]: ...
    def token_bytes(self, id: _Int) -> bytes | None: ...
