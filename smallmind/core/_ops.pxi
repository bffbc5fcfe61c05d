# _ops.pxi - Python wrappers of sm_ops.h: embedding, layernorm, GELU, softmax, cross-entropy,
# residual, bias, AdamW and gradient-norm clipping on numpy arrays.
#
# Contract shared by every function here:
#   - float32 C-contiguous arrays (int32 for token ids and targets); a wrong dtype or type raises
#     TypeError, a wrong rank/shape/contiguity/value raises smallmind.ValidationError (a
#     ValueError), each naming the argument. Ids and targets are range-checked before C runs.
#   - forward functions return new arrays, or write into `out=` (and friends) when given;
#   - backward functions ACCUMULATE (+=) into the gradient arrays the caller passes (zero them
#     first for a plain gradient) and return None;
#   - outputs must not overlap inputs or each other;
#   - `threads=None` uses smallmind.get_num_threads(); results are bitwise identical for any
#     thread count. The work runs in C without the GIL.
# The *_naive twins run the simple float64-accumulating reference loops (single-threaded), for
# tests.

cdef extern from *:
    """
    /* min and max of n int32 values (n >= 1), for the id range checks */
    static void sm__ops_minmax(const int *p, long long n, int *lo, int *hi) {
        int a = p[0], b = p[0];
        for (long long i = 1; i < n; i++) { int v = p[i]; a = v < a ? v : a; b = v > b ? v : b; }
        *lo = a; *hi = b;
    }
    """
    void sm__ops_minmax(const int *p, long long n, int *lo, int *hi) nogil


cdef enum:
    _IDS_NOGIL_MIN = 65536      # ids arrays at least this long are scanned without the GIL


cdef _check_ids(object ids, str name, long long lo, long long hi, str rule):
    """Every value of the int32 array `ids` must lie in [lo, hi]."""
    cdef long long n = ids.size
    cdef int mn = 0, mx = 0
    cdef const int *p
    if n == 0:
        return
    p = _iptr(ids)
    if n >= _IDS_NOGIL_MIN:
        with nogil:
            sm__ops_minmax(p, n, &mn, &mx)
    else:
        # A prompt's or a batch's ids scan in well under a microsecond: releasing the GIL for
        # that would cost more, and under contention each release is one more handoff to wait
        # for (the call's own release around the C work is the one that matters).
        sm__ops_minmax(p, n, &mn, &mx)
    if mn < lo or mx > hi:
        bad = mn if mn < lo else mx
        raise ValidationError(f"{name} values must be {rule}, got {bad}")


cdef _check_disjoint(list outs, list ins):
    """Each (array, name) in outs must overlap neither another output nor any input."""
    cdef Py_ssize_t i, j
    for i in range(len(outs)):
        o, on = outs[i]
        for j in range(i + 1, len(outs)):
            _check_no_overlap(o, on, outs[j][0], outs[j][1])
        for a, an in ins:
            _check_no_overlap(o, on, a, an)


cdef float _hyper(object v, str name, double lo, bint lo_open, double hi, bint hi_open) except? -1.0:
    """A finite real hyperparameter in the interval lo..hi (open ends as flagged), as float32."""
    _check_float32(v, name)  # finite once rounded to float32
    cdef double d = _check_float(v, name)
    cdef str left = "(" if lo_open else "["
    cdef str right = ")" if hi_open else "]"
    if d < lo or d > hi or (lo_open and d == lo) or (hi_open and d == hi):
        raise ValidationError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {v}")
    # C gets the float32 value: an open lower end must still hold after rounding (eps=1e-50 is
    # > 0 in double but 0.0f in float32, and then AdamW divides 0 by 0). The betas' open upper
    # end gets its own check in _adamw_step.
    cdef float f = <float>d
    if lo_open and f == <float>lo:
        raise ValidationError(f"{name} must be in {left}{lo:g}, {hi:g}{right} in float32, got {v} "
                              f"(rounds to {f:g})")
    return f


cdef int64_t _rows_of(object a, str name) except -1:
    """Rows of an (..., C) array: the product of its leading dimensions."""
    if a.ndim < 1:
        raise ValidationError(f"{name} must have at least 1 dimension, got a 0-d array")
    cdef int64_t n = 1
    for d in _lead(a):
        n *= d
    return n


cdef tuple _lead(object a):
    """Leading dimensions of an (..., C) array: its shape without the last axis."""
    cdef tuple s = tuple(a.shape)
    return s[:len(s) - 1]


# ---- token + position embedding ---------------------------------------------------------------

cdef object _encoder_forward(object idx, object wte, object wpe, object out, object threads,
                             bint naive):
    _check_i32(idx, "idx")
    if idx.ndim not in (1, 2):
        raise ValidationError(f"idx must be 1-D (T,) or 2-D (B, T), got shape {idx.shape}")
    _check_f32(wte, "wte", 2)
    _check_f32(wpe, "wpe", 2)
    cdef int64_t V = wte.shape[0], C = wte.shape[1]
    if wpe.shape[1] != C:
        raise ValidationError(f"wpe must have shape (positions, {C}) to match wte {wte.shape}, got {wpe.shape}")
    cdef int64_t B = 1 if idx.ndim == 1 else idx.shape[0]
    cdef int64_t T = idx.shape[idx.ndim - 1]
    if T > wpe.shape[0]:
        raise ValidationError(f"idx has {T} positions but wpe only {wpe.shape[0]} (block size)")
    _check_ids(idx, "idx", 0, V - 1, f"token ids in [0, {V - 1}] (wte has {V} rows)")
    out = _out_f32(out, "out", tuple(idx.shape) + (C,))
    _check_disjoint([(out, "out")], [(idx, "idx"), (wte, "wte"), (wpe, "wpe")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef const int *pi = _iptr(idx)
    cdef const float *pte = _fptr(wte)
    cdef const float *ppe = _fptr(wpe)
    if B * T * C == 0:
        return out
    with nogil:
        if naive:
            sm_encoder_forward_naive(po, pi, pte, ppe, B, T, C, V)
        else:
            sm_encoder_forward(po, pi, pte, ppe, B, T, C, V, nt)
    return out


def encoder_forward(idx, wte, wpe, out=None, threads=None):
    """Token + position embedding: out[b, t, :] = wte[idx[b, t]] + wpe[t].

    idx: int32 (B, T) or (T,), ids in [0, V); wte: float32 (V, C); wpe: float32 (P, C) with
    P >= T. Returns out of shape idx.shape + (C,) (written into `out` when given).
    """
    return _encoder_forward(idx, wte, wpe, out, threads, False)


def encoder_forward_naive(idx, wte, wpe, out=None):
    """Reference loop for encoder_forward (tests)."""
    return _encoder_forward(idx, wte, wpe, out, None, True)


cdef object _encoder_backward(object dwte, object dwpe, object dout, object idx, object threads,
                              bint naive):
    _check_f32(dwte, "dwte", 2, True)
    _check_f32(dwpe, "dwpe", 2, True)
    _check_i32(idx, "idx")
    if idx.ndim not in (1, 2):
        raise ValidationError(f"idx must be 1-D (T,) or 2-D (B, T), got shape {idx.shape}")
    _check_f32(dout, "dout")
    cdef int64_t V = dwte.shape[0], C = dwte.shape[1]
    if dwpe.shape[1] != C:
        raise ValidationError(f"dwpe must have shape (positions, {C}) to match dwte {dwte.shape}, got {dwpe.shape}")
    cdef int64_t B = 1 if idx.ndim == 1 else idx.shape[0]
    cdef int64_t T = idx.shape[idx.ndim - 1]
    if T > dwpe.shape[0]:
        raise ValidationError(f"idx has {T} positions but dwpe only {dwpe.shape[0]}")
    _check_shape(dout, "dout", tuple(idx.shape) + (C,))
    _check_ids(idx, "idx", 0, V - 1, f"token ids in [0, {V - 1}] (dwte has {V} rows)")
    _check_disjoint([(dwte, "dwte"), (dwpe, "dwpe")], [(dout, "dout"), (idx, "idx")])
    cdef int nt = _threads(threads)
    cdef float *pte = _fptr(dwte)
    cdef float *ppe = _fptr(dwpe)
    cdef const float *pd = _fptr(dout)
    cdef const int *pi = _iptr(idx)
    if B * T * C == 0:
        return None
    with nogil:
        if naive:
            sm_encoder_backward_naive(pte, ppe, pd, pi, B, T, C, V)
        else:
            sm_encoder_backward(pte, ppe, pd, pi, B, T, C, V, nt)
    return None


def encoder_backward(dwte, dwpe, dout, idx, threads=None):
    """Backward of encoder_forward, ACCUMULATING: dwte[idx[b, t]] += dout[b, t];
    dwpe[t] += dout[b, t]. dwte (V, C), dwpe (P, C), dout idx.shape + (C,), idx int32.

    Repeated tokens are summed in (b, t) order whatever the thread count (deterministic).
    """
    _encoder_backward(dwte, dwpe, dout, idx, threads, False)


def encoder_backward_naive(dwte, dwpe, dout, idx):
    """Reference loop for encoder_backward (tests)."""
    _encoder_backward(dwte, dwpe, dout, idx, None, True)


# ---- layernorm --------------------------------------------------------------------------------

cdef object _layernorm_forward(object x, object weight, object bias, object out, object eps,
                               object mean, object rstd, object threads, bint naive):
    _check_f32(x, "x")
    cdef int64_t N = _rows_of(x, "x")
    cdef int64_t C = x.shape[x.ndim - 1]
    if C < 1:
        raise ValidationError(f"x must have at least 1 channel in its last dimension, got shape {x.shape}")
    _check_f32(weight, "weight", 1)
    _check_shape(weight, "weight", (C,))
    _check_f32(bias, "bias", 1)
    _check_shape(bias, "bias", (C,))
    cdef float feps = _hyper(eps, "eps", 0.0, True, 1e30, False)
    lead = _lead(x)
    out = _out_f32(out, "out", tuple(x.shape))
    mean = _out_f32(mean, "mean", lead)
    rstd = _out_f32(rstd, "rstd", lead)
    _check_disjoint([(out, "out"), (mean, "mean"), (rstd, "rstd")],
                    [(x, "x"), (weight, "weight"), (bias, "bias")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef float *pm = _fptr(mean)
    cdef float *pr = _fptr(rstd)
    cdef const float *px = _fptr(x)
    cdef const float *pw = _fptr(weight)
    cdef const float *pb = _fptr(bias)
    if N > 0:
        with nogil:
            if naive:
                sm_layernorm_forward_naive(po, pm, pr, px, pw, pb, N, C, feps)
            else:
                sm_layernorm_forward(po, pm, pr, px, pw, pb, N, C, feps, nt)
    return out, mean, rstd


def layernorm_forward(x, weight, bias, out=None, eps=1e-5, mean=None, rstd=None, threads=None):
    """Layer normalization over the last axis: out = (x - mean) * rstd * weight + bias with
    rstd = 1 / sqrt(var + eps) (biased variance). x: float32 (..., C); weight, bias: (C,).

    Returns (out, mean, rstd), mean and rstd of shape x.shape[:-1], saved for the backward.
    `out`, `mean`, `rstd` may be given to write into. eps must be > 0.
    """
    return _layernorm_forward(x, weight, bias, out, eps, mean, rstd, threads, False)


def layernorm_forward_naive(x, weight, bias, out=None, eps=1e-5, mean=None, rstd=None):
    """Reference loop for layernorm_forward, float64 accumulation (tests)."""
    return _layernorm_forward(x, weight, bias, out, eps, mean, rstd, None, True)


cdef object _layernorm_backward(object dx, object dweight, object dbias, object dout, object x,
                                object weight, object mean, object rstd, object threads,
                                bint naive):
    _check_f32(x, "x")
    cdef int64_t N = _rows_of(x, "x")
    cdef int64_t C = x.shape[x.ndim - 1]
    if C < 1:
        raise ValidationError(f"x must have at least 1 channel in its last dimension, got shape {x.shape}")
    shape = tuple(x.shape)
    lead = _lead(x)
    _check_f32(dx, "dx", -1, True)
    _check_shape(dx, "dx", shape)
    _check_f32(dweight, "dweight", 1, True)
    _check_shape(dweight, "dweight", (C,))
    _check_f32(dbias, "dbias", 1, True)
    _check_shape(dbias, "dbias", (C,))
    _check_f32(dout, "dout")
    _check_shape(dout, "dout", shape)
    _check_f32(weight, "weight", 1)
    _check_shape(weight, "weight", (C,))
    _check_f32(mean, "mean")
    _check_shape(mean, "mean", lead)
    _check_f32(rstd, "rstd")
    _check_shape(rstd, "rstd", lead)
    _check_disjoint([(dx, "dx"), (dweight, "dweight"), (dbias, "dbias")],
                    [(dout, "dout"), (x, "x"), (weight, "weight"), (mean, "mean"), (rstd, "rstd")])
    cdef int nt = _threads(threads)
    cdef float *pdx = _fptr(dx)
    cdef float *pdw = _fptr(dweight)
    cdef float *pdb = _fptr(dbias)
    cdef const float *pdo = _fptr(dout)
    cdef const float *px = _fptr(x)
    cdef const float *pw = _fptr(weight)
    cdef const float *pm = _fptr(mean)
    cdef const float *pr = _fptr(rstd)
    cdef int rc = SM_OK
    if N == 0:
        return None
    with nogil:
        if naive:
            sm_layernorm_backward_naive(pdx, pdw, pdb, pdo, px, pw, pm, pr, N, C)
        else:
            rc = sm_layernorm_backward(pdx, pdw, pdb, pdo, px, pw, pm, pr, N, C, NULL, nt)
    _raise_for(rc, "layernorm_backward")
    return None


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd, threads=None):
    """Backward of layernorm_forward, ACCUMULATING into dx (..., C), dweight (C,), dbias (C,).

    dout, x: (..., C); weight: (C,); mean, rstd: x.shape[:-1] as returned by the forward.
    dweight and dbias are sums over rows made in a fixed order (deterministic).
    """
    _layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd, threads, False)


def layernorm_backward_naive(dx, dweight, dbias, dout, x, weight, mean, rstd):
    """Reference loop for layernorm_backward, float64 accumulation (tests)."""
    _layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd, None, True)


# ---- GELU -------------------------------------------------------------------------------------

cdef object _gelu_forward(object x, object out, object threads, bint naive):
    _check_f32(x, "x")
    out = _out_f32(out, "out", tuple(x.shape))
    _check_disjoint([(out, "out")], [(x, "x")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef const float *px = _fptr(x)
    cdef int64_t n = x.size
    if n == 0:
        return out
    with nogil:
        if naive:
            sm_gelu_forward_naive(po, px, n)
        else:
            sm_gelu_forward(po, px, n, nt)
    return out


def gelu_forward(x, out=None, threads=None):
    """GELU, tanh approximation, elementwise: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Any shape; returns a new array or writes `out` (same shape, not overlapping x).
    """
    return _gelu_forward(x, out, threads, False)


def gelu_forward_naive(x, out=None):
    """Reference (libm tanh in double) for gelu_forward (tests)."""
    return _gelu_forward(x, out, None, True)


cdef object _gelu_backward(object dx, object x, object dout, object threads, bint naive):
    _check_f32(x, "x")
    _check_f32(dx, "dx", -1, True)
    _check_shape(dx, "dx", tuple(x.shape))
    _check_f32(dout, "dout")
    _check_shape(dout, "dout", tuple(x.shape))
    _check_disjoint([(dx, "dx")], [(x, "x"), (dout, "dout")])
    cdef int nt = _threads(threads)
    cdef float *pdx = _fptr(dx)
    cdef const float *px = _fptr(x)
    cdef const float *pd = _fptr(dout)
    cdef int64_t n = x.size
    if n == 0:
        return None
    with nogil:
        if naive:
            sm_gelu_backward_naive(pdx, px, pd, n)
        else:
            sm_gelu_backward(pdx, px, pd, n, nt)
    return None


def gelu_backward(dx, x, dout, threads=None):
    """Backward of gelu_forward, ACCUMULATING: dx += gelu'(x) * dout (all the same shape)."""
    _gelu_backward(dx, x, dout, threads, False)


def gelu_backward_naive(dx, x, dout):
    """Reference (double) for gelu_backward (tests)."""
    _gelu_backward(dx, x, dout, None, True)


# ---- softmax and cross-entropy ----------------------------------------------------------------

cdef object _softmax(object x, object temperature, object out, object threads, bint naive):
    _check_f32(x, "x")
    cdef int64_t N = _rows_of(x, "x")
    cdef int64_t V = x.shape[x.ndim - 1]
    cdef float temp = _hyper(temperature, "temperature", 0.0, True, 3.0e38, False)
    out = _out_f32(out, "out", tuple(x.shape))
    _check_disjoint([(out, "out")], [(x, "x")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef const float *px = _fptr(x)
    if N * V == 0:
        return out
    with nogil:
        if naive:
            sm_softmax_forward_naive(po, px, N, V, temp)
        else:
            sm_softmax_forward(po, px, N, V, temp, nt)
    return out


def softmax(x, temperature=1.0, out=None, threads=None):
    """Softmax over the last axis of x / temperature (temperature > 0): probabilities (..., V),
    e.g. for sampling. Returns a new array or writes `out`."""
    return _softmax(x, temperature, out, threads, False)


def softmax_naive(x, temperature=1.0, out=None):
    """Reference (double) for softmax (tests)."""
    return _softmax(x, temperature, out, None, True)


cdef tuple _ce_check(object logits, object targets):
    """Validate logits (..., V) float32 and targets (...) int32 in [0, V) or -1."""
    _check_f32(logits, "logits")
    cdef int64_t N = _rows_of(logits, "logits")
    cdef int64_t V = logits.shape[logits.ndim - 1]
    if V < 1:
        raise ValidationError(f"logits must have at least 1 class in its last dimension, got shape {logits.shape}")
    _check_i32(targets, "targets")
    _check_shape(targets, "targets", _lead(logits))
    _check_ids(targets, "targets", -1, V - 1, f"class ids in [0, {V - 1}] or -1 (ignored)")
    return N, V


cdef object _dloss_array(object dloss, tuple shape):
    """dloss as a float32 array of `shape`: an array is checked, a real number is broadcast."""
    if isinstance(dloss, np.ndarray):
        _check_f32(dloss, "dloss")
        _check_shape(dloss, "dloss", shape)
        return dloss
    cdef double d = _check_float32(dloss, "dloss")
    return np.full(shape, d, dtype=np.float32)


cdef object _cross_entropy_forward(object logits, object targets, object out, object lse,
                                   object threads, bint naive):
    cdef int64_t N, V
    N, V = _ce_check(logits, targets)
    lead = _lead(logits)
    out = _out_f32(out, "out", lead)
    if lse is not None:
        lse = _out_f32(lse, "lse", lead)
        _check_disjoint([(out, "out"), (lse, "lse")], [(logits, "logits"), (targets, "targets")])
    else:
        _check_disjoint([(out, "out")], [(logits, "logits"), (targets, "targets")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef float *pl = _fptr(lse) if lse is not None else NULL
    cdef const float *px = _fptr(logits)
    cdef const int *pt = _iptr(targets)
    if N == 0:
        return out
    with nogil:
        if naive:
            sm_crossentropy_forward_naive(po, pl, px, pt, N, V)
        else:
            sm_crossentropy_forward(po, pl, px, pt, N, V, nt)
    return out


def cross_entropy_forward(logits, targets, out=None, lse=None, threads=None):
    """Per-row cross-entropy: losses[i] = logsumexp(logits[i]) - logits[i, targets[i]].

    logits: float32 (..., V); targets: int32 of shape logits.shape[:-1], each in [0, V) or -1.
    A target of -1 marks padding: its loss is 0 (and cross_entropy_backward gives it no
    gradient); average over the non-ignored rows yourself. Returns losses (shape of targets).
    `lse`, if given (shape of targets), receives logsumexp per row for cross_entropy_backward.
    """
    return _cross_entropy_forward(logits, targets, out, lse, threads, False)


def cross_entropy_forward_naive(logits, targets, out=None, lse=None):
    """Reference (double) for cross_entropy_forward (tests)."""
    return _cross_entropy_forward(logits, targets, out, lse, None, True)


cdef object _cross_entropy_backward(object dlogits, object logits, object targets, object dloss,
                                    object lse, object losses, bint fused, object threads,
                                    bint naive):
    cdef int64_t N, V
    N, V = _ce_check(logits, targets)
    lead = _lead(logits)
    _check_f32(dlogits, "dlogits", -1, True)
    _check_shape(dlogits, "dlogits", tuple(logits.shape))
    dloss = _dloss_array(dloss, lead)
    ins = [(logits, "logits"), (targets, "targets"), (dloss, "dloss")]
    if lse is not None:
        _check_f32(lse, "lse")
        _check_shape(lse, "lse", lead)
        ins.append((lse, "lse"))
    outs = [(dlogits, "dlogits")]
    if fused:
        losses = _out_f32(losses, "out", lead)
        outs.append((losses, "out"))
    _check_disjoint(outs, ins)
    cdef int nt = _threads(threads)
    cdef float *pdl = _fptr(dlogits)
    cdef float *plo = _fptr(losses) if fused else NULL
    cdef const float *px = _fptr(logits)
    cdef const float *plse = _fptr(lse) if lse is not None else NULL
    cdef const int *pt = _iptr(targets)
    cdef const float *pd = _fptr(dloss)
    if N == 0:
        return losses
    with nogil:
        if fused:
            sm_crossentropy_forward_backward(plo, pdl, px, pt, pd, N, V, nt)
        elif naive:
            sm_crossentropy_backward_naive(pdl, px, plse, pt, pd, N, V)
        else:
            sm_crossentropy_backward(pdl, px, plse, pt, pd, N, V, nt)
    return losses


def cross_entropy_backward(dlogits, logits, targets, dloss, lse=None, threads=None):
    """Backward of cross_entropy_forward, ACCUMULATING:
    dlogits[i] += (softmax(logits[i]) - onehot(targets[i])) * dloss[i], computed straight
    from the logits. Rows whose target is -1 get nothing.

    dloss: float32 array shaped like targets, or one number for every row (e.g. 1 / count for
    a mean loss). lse: the forward's logsumexp per row, or None to recompute it.
    """
    _cross_entropy_backward(dlogits, logits, targets, dloss, lse, None, False, threads, False)


def cross_entropy_backward_naive(dlogits, logits, targets, dloss, lse=None):
    """Reference (double) for cross_entropy_backward (tests)."""
    _cross_entropy_backward(dlogits, logits, targets, dloss, lse, None, False, None, True)


def cross_entropy_forward_backward(dlogits, logits, targets, dloss, out=None, threads=None):
    """Fused cross_entropy_forward + cross_entropy_backward in one pass over each row: returns
    the per-row losses (written into `out` when given) and ACCUMULATES the gradient into
    dlogits exactly as cross_entropy_backward does (same bits)."""
    return _cross_entropy_backward(dlogits, logits, targets, dloss, None, out, True, threads, False)


# ---- residual and bias ------------------------------------------------------------------------

cdef object _residual_forward(object a, object b, object out, object threads, bint naive):
    _check_f32(a, "a")
    _check_f32(b, "b")
    _check_shape(b, "b", tuple(a.shape))
    out = _out_f32(out, "out", tuple(a.shape))
    _check_disjoint([(out, "out")], [(a, "a"), (b, "b")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef const float *pa = _fptr(a)
    cdef const float *pb = _fptr(b)
    cdef int64_t n = a.size
    if n == 0:
        return out
    with nogil:
        if naive:
            sm_residual_forward_naive(po, pa, pb, n)
        else:
            sm_residual_forward(po, pa, pb, n, nt)
    return out


def residual_forward(a, b, out=None, threads=None):
    """out = a + b for float32 arrays of the same shape (new array, or written into `out`)."""
    return _residual_forward(a, b, out, threads, False)


def residual_forward_naive(a, b, out=None):
    """Reference loop for residual_forward (tests)."""
    return _residual_forward(a, b, out, None, True)


cdef object _residual_backward(object da, object db, object dout, object threads, bint naive):
    _check_f32(dout, "dout")
    shape = tuple(dout.shape)
    _check_f32(da, "da", -1, True)
    _check_shape(da, "da", shape)
    _check_f32(db, "db", -1, True)
    _check_shape(db, "db", shape)
    _check_disjoint([(da, "da"), (db, "db")], [(dout, "dout")])
    cdef int nt = _threads(threads)
    cdef float *pa = _fptr(da)
    cdef float *pb = _fptr(db)
    cdef const float *pd = _fptr(dout)
    cdef int64_t n = dout.size
    if n == 0:
        return None
    with nogil:
        if naive:
            sm_residual_backward_naive(pa, pb, pd, n)
        else:
            sm_residual_backward(pa, pb, pd, n, nt)
    return None


def residual_backward(da, db, dout, threads=None):
    """Backward of residual_forward, ACCUMULATING: da += dout; db += dout."""
    _residual_backward(da, db, dout, threads, False)


def residual_backward_naive(da, db, dout):
    """Reference loop for residual_backward (tests)."""
    _residual_backward(da, db, dout, None, True)


cdef object _bias_add(object out, object bias, object threads, bint naive):
    _check_f32(out, "out", -1, True)
    cdef int64_t N = _rows_of(out, "out")
    cdef int64_t C = out.shape[out.ndim - 1]
    _check_f32(bias, "bias", 1)
    _check_shape(bias, "bias", (C,))
    _check_disjoint([(out, "out")], [(bias, "bias")])
    cdef int nt = _threads(threads)
    cdef float *po = _fptr(out)
    cdef const float *pb = _fptr(bias)
    if N * C == 0:
        return out
    with nogil:
        if naive:
            sm_bias_add_naive(po, pb, N, C)
        else:
            sm_bias_add(po, pb, N, C, nt)
    return out


def bias_add(out, bias, threads=None):
    """In place: out[..., :] += bias, for out (..., C) and bias (C,). Returns out."""
    return _bias_add(out, bias, threads, False)


def bias_add_naive(out, bias):
    """Reference loop for bias_add (tests)."""
    return _bias_add(out, bias, None, True)


cdef object _bias_backward(object dbias, object dout, object threads, bint naive):
    _check_f32(dout, "dout")
    cdef int64_t N = _rows_of(dout, "dout")
    cdef int64_t C = dout.shape[dout.ndim - 1]
    _check_f32(dbias, "dbias", 1, True)
    _check_shape(dbias, "dbias", (C,))
    _check_disjoint([(dbias, "dbias")], [(dout, "dout")])
    cdef int nt = _threads(threads)
    cdef float *pb = _fptr(dbias)
    cdef const float *pd = _fptr(dout)
    cdef int rc = SM_OK
    if N * C == 0:
        return None
    with nogil:
        if naive:
            sm_bias_backward_naive(pb, pd, N, C)
        else:
            rc = sm_bias_backward(pb, pd, N, C, NULL, nt)
    _raise_for(rc, "bias_backward")
    return None


def bias_backward(dbias, dout, threads=None):
    """Backward of bias_add, ACCUMULATING: dbias += dout summed over all leading axes
    (dout (..., C), dbias (C,)), in a fixed order (deterministic)."""
    _bias_backward(dbias, dout, threads, False)


def bias_backward_naive(dbias, dout):
    """Reference (double) for bias_backward (tests)."""
    _bias_backward(dbias, dout, None, True)


# ---- AdamW and gradient clipping --------------------------------------------------------------

cdef object _adamw_step(object param, object grad, object m, object v, object lr, object beta1,
                        object beta2, object eps, object weight_decay, object step,
                        object threads, bint naive):
    _check_f32(param, "param", -1, True)
    shape = tuple(param.shape)
    _check_f32(grad, "grad")
    _check_shape(grad, "grad", shape)
    _check_f32(m, "m", -1, True)
    _check_shape(m, "m", shape)
    _check_f32(v, "v", -1, True)
    _check_shape(v, "v", shape)
    cdef float flr = _hyper(lr, "lr", 0.0, False, 3.0e38, False)
    cdef float fb1 = _hyper(beta1, "beta1", 0.0, False, 1.0, True)
    cdef float fb2 = _hyper(beta2, "beta2", 0.0, False, 1.0, True)
    cdef float feps = _hyper(eps, "eps", 0.0, True, 3.0e38, False)
    cdef float fwd = _hyper(weight_decay, "weight_decay", 0.0, False, 3.0e38, False)
    _check_int(step, "step", 1, 2**62)
    # float32 rounding must not turn beta < 1 into 1 (bias correction 1 - beta^t = 0)
    if fb1 >= 1.0 or fb2 >= 1.0:
        raise ValidationError(f"beta1 and beta2 must stay below 1 in float32, got {beta1}, {beta2}")
    _check_disjoint([(param, "param"), (m, "m"), (v, "v")], [(grad, "grad")])
    cdef int nt = _threads(threads)
    cdef float *pp = _fptr(param)
    cdef float *pm = _fptr(m)
    cdef float *pv = _fptr(v)
    cdef const float *pg = _fptr(grad)
    cdef int64_t n = param.size
    cdef int64_t t = step
    if n == 0:
        return None
    with nogil:
        if naive:
            sm_adamw_step_naive(pp, pm, pv, pg, n, flr, fb1, fb2, feps, fwd, t)
        else:
            sm_adamw_step(pp, pm, pv, pg, n, flr, fb1, fb2, feps, fwd, t, nt)
    return None


def adamw_step(param, grad, m, v, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               step=1, threads=None):
    """One AdamW update in place over a flat (any-shape) parameter buffer:

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        param -= lr * (m / (1 - beta1^step) / (sqrt(v / (1 - beta2^step)) + eps)
                       + weight_decay * param)

    param, m, v are updated in place (float32, writeable, same shape as grad). Decoupled
    weight decay: call once per parameter group with weight_decay=0 for biases, layernorm
    weights and embeddings if you want them undecayed. lr >= 0, 0 <= beta1, beta2 < 1,
    eps > 0, weight_decay >= 0, step >= 1 (the 1-based count of updates so far, this one
    included).
    """
    _adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, threads, False)


def adamw_step_naive(param, grad, m, v, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     step=1):
    """Reference (double) for adamw_step (tests)."""
    _adamw_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, None, True)


def grad_norm(grad, threads=None):
    """L2 norm of a float32 array of any shape, accumulated in double over fixed blocks
    (deterministic for any thread count). Returns a Python float."""
    _check_f32(grad, "grad")
    cdef int nt = _threads(threads)
    cdef const float *pg = _fptr(grad)
    cdef int64_t n = grad.size
    cdef double s = 0.0
    if n == 0:
        return 0.0
    with nogil:
        s = sm_sumsq(pg, n, nt)
    return s ** 0.5


cdef double _clip(object grad, object max_norm, object threads, bint naive) except? -1.0:
    _check_f32(grad, "grad", -1, True)
    cdef float mx = _hyper(max_norm, "max_norm", 0.0, True, 3.0e38, False)
    cdef int nt = _threads(threads)
    cdef float *pg = _fptr(grad)
    cdef int64_t n = grad.size
    cdef double norm = 0.0
    if n == 0:
        return 0.0
    with nogil:
        if naive:
            norm = sm_clip_grad_norm_naive(pg, n, mx)
        else:
            norm = sm_clip_grad_norm(pg, n, mx, nt)
    return norm


def clip_grad_norm(grad, max_norm, threads=None):
    """Global gradient-norm clipping in place: with norm = ||grad||_2 (double, deterministic),
    grad *= min(1, max_norm / (norm + 1e-6)). Returns the norm BEFORE clipping (a Python
    float). A NaN or infinite norm leaves grad untouched: check the returned value and skip the
    step. grad: float32, any shape, writeable (one flat buffer for a global norm)."""
    return _clip(grad, max_norm, threads, False)


def clip_grad_norm_naive(grad, max_norm):
    """Reference (double) for clip_grad_norm (tests)."""
    return _clip(grad, max_norm, None, True)
