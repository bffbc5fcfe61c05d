# _gemm.pxi - Python wrappers of sm_gemm.h: matmul and the general sgemm with transposes.


_ONE = 1.0
_ZERO = 0.0


cdef object _gemm_call(object a, object b, object out, bint trans_a, bint trans_b,
                       object alpha, object beta, object threads, bint naive, bint bf16=False):
    _check_f32(a, "a", 2)
    _check_f32(b, "b", 2)
    cdef cnp.npy_intp *da = cnp.PyArray_DIMS(<cnp.ndarray>a)
    cdef cnp.npy_intp *db = cnp.PyArray_DIMS(<cnp.ndarray>b)
    cdef int64_t M = da[1] if trans_a else da[0]
    cdef int64_t K = da[0] if trans_a else da[1]
    cdef int64_t KB = db[1] if trans_b else db[0]
    cdef int64_t N = db[0] if trans_b else db[1]
    if K != KB:
        ta = "a.T" if trans_a else "a"
        tb = "b.T" if trans_b else "b"
        raise ValidationError(f"inner dimensions differ: {ta} is ({M}, {K}) but {tb} is ({KB}, {N})")
    cdef float fa = 1.0
    cdef float fb = 0.0
    if alpha is not _ONE:
        fa = _check_float32(alpha, "alpha")
    if beta is not _ZERO:
        fb = _check_float32(beta, "beta")
    cdef int nt = _threads(threads)
    if out is None:
        if fb != 0.0:
            raise ValidationError("beta != 0 needs an `out` array to accumulate into")
        _check_alloc((M, N), "out")
        out = np.empty((M, N), dtype=np.float32)
    else:
        _check_f32(out, "out", 2, True)
        if cnp.PyArray_DIMS(<cnp.ndarray>out)[0] != M or cnp.PyArray_DIMS(<cnp.ndarray>out)[1] != N:
            _check_shape(out, "out", (M, N))
        _check_no_overlap(out, "out", a, "a")
        _check_no_overlap(out, "out", b, "b")
    cdef const float *pa = _fptr(a)
    cdef const float *pb = _fptr(b)
    cdef float *pc = _fptr(out)
    cdef int64_t lda = da[1], ldb = db[1], ldc = N
    cdef int rc = SM_OK
    cdef int ta_ = trans_a, tb_ = trans_b
    if M == 0 or N == 0:
        return out
    with nogil:
        if naive:
            sm_sgemm_naive(ta_, tb_, M, N, K, fa, pa, lda, pb, ldb, fb, pc, ldc)
        elif bf16:
            rc = sm_gemm_bf16(ta_, tb_, M, N, K, fa, pa, lda, pb, ldb, fb, pc, ldc, nt)
        else:
            rc = sm_sgemm(ta_, tb_, M, N, K, fa, pa, lda, pb, ldb, fb, pc, ldc, nt)
    _raise_for(rc, "sgemm")
    return out


def matmul(a, b, out=None, threads=None):
    """(M, K) @ (K, N) -> (M, N) for float32 C-contiguous arrays, computed without the GIL.

    `out`, if given, must be a writeable float32 (M, N) array that does not overlap `a` or `b`.
    `threads` is the OpenMP thread budget (None: `get_num_threads()`). Results are bitwise
    identical for any thread count.
    """
    return _gemm_call(a, b, out, False, False, _ONE, _ZERO, threads, False)


def sgemm(a, b, out=None, trans_a=False, trans_b=False, alpha=_ONE, beta=_ZERO, threads=None):
    """out = alpha * op(a) @ op(b) + beta * out, where op(x) is x or x.T (no copy is made).

    With beta == 0 `out` is only written; beta != 0 needs `out`. Shapes: op(a) (M, K),
    op(b) (K, N), out (M, N). The layouts a GPT's backward pass needs are a @ b.T
    (trans_b=True) and a.T @ b (trans_a=True), with beta=1 to accumulate gradients.
    """
    return _gemm_call(a, b, out, bool(trans_a), bool(trans_b), alpha, beta, threads, False)


def gemm_bf16(a, b, out=None, trans_a=False, trans_b=False, alpha=_ONE, beta=_ZERO, threads=None):
    """`sgemm` with bf16 inputs: a and b are rounded to bf16 (round to nearest even) on the way
    in, the products are exact and summed in float32, out stays float32. Runs on AMX tiles
    where `bf16_backend()` says "amx", else as the same arithmetic on the float32 kernels."""
    return _gemm_call(a, b, out, bool(trans_a), bool(trans_b), alpha, beta, threads, False, True)


def bf16_backend():
    """"amx" if bf16 matrix products run on Intel AMX tiles now, "emulated" otherwise (no AMX,
    not Linux, or the SIMD level capped below avx512)."""
    return "amx" if sm_gemm_bf16_backend() else "emulated"


def linear(x, w, bias=None, residual=None, gelu_out=None, out=None, trans_b=False,
           precision="float32", threads=None):
    """A linear layer's forward product with its epilogue fused: out = x @ op(w) (+ bias)
    (+ residual), and, if `gelu_out` is given, gelu_out = GELU(out) (tanh form).

    x: (M, K); op(w): w (K, N), or w.T with w (N, K) when trans_b; bias: (N,); residual, out and
    gelu_out: (M, N). The bias, the residual and GELU are applied to each tile of `out` as soon as
    the product has finished it, while it is still in cache, instead of in three more passes
    over memory; the bits equal those of `sgemm` followed by `bias_add`, `residual_forward` and
    `gelu_forward` (the model's forward pass uses this). precision "bf16" rounds x and w to bf16
    as `gemm_bf16` does.
    """
    _check_f32(x, "x", 2)
    _check_f32(w, "w", 2)
    if precision not in ("float32", "bf16"):
        raise ValidationError(f"precision must be 'float32' or 'bf16', got {precision!r}")
    cdef int64_t M = x.shape[0], K = x.shape[1]
    cdef int64_t KB = w.shape[1] if trans_b else w.shape[0]
    cdef int64_t N = w.shape[0] if trans_b else w.shape[1]
    if K != KB:
        tw = "w.T" if trans_b else "w"
        raise ValidationError(f"inner dimensions differ: x is ({M}, {K}) but {tw} is ({KB}, {N})")
    cdef sm_gemm_epilogue e
    e.bias = NULL
    e.resid = NULL
    e.gelu = NULL
    e.ldr = N
    e.ldg = N
    if bias is not None:
        _check_f32(bias, "bias", 1)
        _check_shape(bias, "bias", (N,))
        e.bias = _fptr(bias)
    if residual is not None:
        _check_f32(residual, "residual", 2)
        _check_shape(residual, "residual", (M, N))
        e.resid = _fptr(residual)
    if out is None:
        _check_alloc((M, N), "out")
        out = np.empty((M, N), dtype=np.float32)
    else:
        _check_f32(out, "out", 2, True)
        _check_shape(out, "out", (M, N))
        _check_no_overlap(out, "out", x, "x")
        _check_no_overlap(out, "out", w, "w")
        if residual is not None:
            _check_no_overlap(out, "out", residual, "residual")
    if gelu_out is not None:
        _check_f32(gelu_out, "gelu_out", 2, True)
        _check_shape(gelu_out, "gelu_out", (M, N))
        for other, name in ((out, "out"), (x, "x"), (w, "w")):
            _check_no_overlap(gelu_out, "gelu_out", other, name)
        if residual is not None:
            _check_no_overlap(gelu_out, "gelu_out", residual, "residual")
        e.gelu = _fptr(gelu_out)
    cdef int nt = _threads(threads)
    cdef int tb = bool(trans_b), bf = precision == "bf16", rc = SM_OK
    cdef const float *px = _fptr(x)
    cdef const float *pw = _fptr(w)
    cdef float *po = _fptr(out)
    cdef int64_t ldw = w.shape[1]
    if M == 0 or N == 0:
        return out
    with nogil:
        if bf:
            rc = sm_gemm_bf16_epi(0, tb, M, N, K, px, K, pw, ldw, po, N, &e, nt)
        else:
            rc = sm_sgemm_epi(0, tb, M, N, K, px, K, pw, ldw, po, N, &e, nt)
    _raise_for(rc, "linear")
    return out


def sgemm_naive(a, b, out=None, trans_a=False, trans_b=False, alpha=_ONE, beta=_ZERO):
    """Reference triple loop with the same contract as `sgemm` (for tests, slow)."""
    return _gemm_call(a, b, out, bool(trans_a), bool(trans_b), alpha, beta, None, True)
