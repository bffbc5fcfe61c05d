# _attention.pxi - Python wrappers of sm_attention.h: causal multi-head attention forward and
# backward on GPT-2-layout activations, and the KV cache (allocate, prefill, append) with its
# decode step. Layouts:
#   qkv (B, T, 3C)   fused c_attn output; head h's query at [h*hs, (h+1)*hs), key at C + ..,
#                    value at 2C + ..; hs = C / n_head
#   out (B, T, C)    heads concatenated;  lse (B, n_head, T) per-row log-sum-exp (for backward)
#   k_cache (B, n_head, capacity / 64, hs, 64): keys in blocks of 64 positions, each block
#            transposed (position t, dim d at [b, h, t // 64, d, t % 64])
#   v_cache (B, n_head, capacity, hs): values by position

ATTENTION_BLOCK = SM_ATT_BLOCK

cdef int64_t _MAX_DIM = 1 << 40


cdef tuple _qkv_dims(object qkv, object n_head):
    """(B, T, C, NH) of a validated qkv (B, T, 3C) array and head count."""
    _check_f32(qkv, "qkv", 3)
    _check_int(n_head, "n_head", 1, _MAX_DIM)
    cdef int64_t B = qkv.shape[0], T = qkv.shape[1], C3 = qkv.shape[2], NH = n_head
    if C3 == 0 or C3 % 3 != 0:
        raise ValidationError(f"qkv's last dimension must be 3*C with C >= 1 (the fused q, k, v "
                              f"projections), got {C3}")
    cdef int64_t C = C3 // 3
    if C % NH != 0:
        raise ValidationError(f"n_head must divide C = {C} (qkv's last dimension / 3), got n_head={NH}")
    return B, T, C, NH


cdef int _att_dropout(sm_att_dropout *d, object dropout, object seed, object stream,
                      object batch_offset) except -1:
    """Fill d from the dropout keyword arguments (validated); returns 1 when dropout is on."""
    cdef float p = _check_float32(dropout, "dropout")
    if not (0.0 <= p < 1.0):
        raise ValidationError(f"dropout must be in [0, 1), got {dropout}")
    _check_int(seed, "seed", 0, 2 ** 63 - 1)
    _check_int(stream, "stream", 0, 2 ** 63 - 1)
    _check_int(batch_offset, "batch_offset", 0, 2 ** 40)
    d.p = p
    d.seed = <uint64_t>int(seed)
    d.stream = <uint64_t>int(stream)
    d.batch_offset = <int64_t>int(batch_offset)
    return 1 if p > 0.0 else 0


cdef object _forward_call(object qkv, object n_head, object out, object lse, object threads,
                          bint naive, object dropout=0.0, object seed=0, object stream=0,
                          object batch_offset=0):
    cdef int64_t B, T, C, NH
    B, T, C, NH = _qkv_dims(qkv, n_head)
    cdef sm_att_dropout drop
    cdef const sm_att_dropout *pdrop = &drop if _att_dropout(&drop, dropout, seed, stream, batch_offset) else NULL
    cdef int nt = _threads(threads)
    out = _out_f32(out, "out", (B, T, C))
    lse = _out_f32(lse, "lse", (B, NH, T))
    _check_no_overlap(out, "out", qkv, "qkv")
    _check_no_overlap(lse, "lse", qkv, "qkv")
    _check_no_overlap(lse, "lse", out, "out")
    cdef float *po = _fptr(out)
    cdef float *pl = _fptr(lse)
    cdef const float *pq = _fptr(qkv)
    cdef int rc = SM_OK
    if B == 0 or T == 0:
        return out, lse
    with nogil:
        if naive:
            rc = sm_attention_forward_naive_ex(po, pl, pq, B, T, C, NH, pdrop)
        else:
            rc = sm_attention_forward_ex(po, pl, pq, B, T, C, NH, pdrop, nt)
    _raise_for(rc, "attention_forward")
    return out, lse


def attention_forward(qkv, n_head, out=None, lse=None, threads=None, *, dropout=0.0, seed=0,
                      stream=0, batch_offset=0):
    """Causal multi-head self-attention: returns (out, lse).

    qkv: float32 (B, T, 3C), the fused c_attn projection (queries, keys, values side by side,
    each split into n_head heads of C / n_head values). out: (B, T, C), each position attending
    to itself and earlier positions with scores q.k / sqrt(head_size). lse: (B, n_head, T), the
    log-sum-exp of each row's scores: all that `attention_backward` needs besides `out` (the
    (T, T) attention matrix is never stored). `out` / `lse`, if given, are overwritten.

    dropout > 0 drops attention probabilities (kept ones scaled by 1 / (1 - dropout)) with the
    hash mask of (seed, stream) (see `attention_dropout_mask`); give the backward pass the same
    arguments. lse stays that of the undropped probabilities.
    """
    return _forward_call(qkv, n_head, out, lse, threads, False, dropout, seed, stream, batch_offset)


def attention_forward_naive(qkv, n_head, out=None, lse=None, *, dropout=0.0, seed=0, stream=0,
                            batch_offset=0):
    """Reference loops (double accumulation) with the contract of `attention_forward` (slow)."""
    return _forward_call(qkv, n_head, out, lse, None, True, dropout, seed, stream, batch_offset)


def attention_dropout_mask(B, n_head, T, dropout, seed, stream=0, batch_offset=0):
    """The (B, n_head, T, T) float32 factors (0 or 1 / (1 - dropout)) that attention dropout
    multiplies the probabilities of query t, key j by (entries j > t are never used). For tests
    and references: the kernels compute these on the fly and never store them."""
    cdef sm_att_dropout d
    _check_int(B, "B", 0, 2 ** 20)
    _check_int(n_head, "n_head", 1, 2 ** 20)
    _check_int(T, "T", 0, 2 ** 16)
    _att_dropout(&d, dropout, seed, stream, batch_offset)
    # the entry numbers below are uint64: a mask of more entries would wrap them
    _check_alloc((B, n_head, T, T), "the mask")
    e = ((np.arange(B, dtype=np.uint64)[:, None, None, None] + np.uint64(d.batch_offset))
         * np.uint64(n_head) + np.arange(n_head, dtype=np.uint64)[None, :, None, None])
    e = (e * np.uint64(T) + np.arange(T, dtype=np.uint64)[None, None, :, None]) * np.uint64(T) \
        + np.arange(T, dtype=np.uint64)[None, None, None, :]
    flat = np.ascontiguousarray(e.reshape(-1))
    out = np.empty(flat.shape, dtype=np.float32)
    cdef const uint64_t[::1] ev = flat
    cdef float[::1] ov = out
    cdef sm_drop_mask m = sm_drop_mask_make(d.p, d.seed, d.stream)
    cdef Py_ssize_t i, n = flat.shape[0]
    with nogil:
        for i in range(n):
            ov[i] = sm_drop_factor(&m, ev[i])
    return out.reshape((B, n_head, T, T))


cdef object _backward_call(object dout, object qkv, object out, object lse, object n_head,
                           object dqkv, object threads, bint naive, object dropout=0.0,
                           object seed=0, object stream=0, object batch_offset=0):
    cdef int64_t B, T, C, NH
    B, T, C, NH = _qkv_dims(qkv, n_head)
    cdef sm_att_dropout drop
    cdef const sm_att_dropout *pdrop = &drop if _att_dropout(&drop, dropout, seed, stream, batch_offset) else NULL
    _check_f32(dout, "dout", 3)
    _check_shape(dout, "dout", (B, T, C))
    _check_f32(out, "out", 3)
    _check_shape(out, "out", (B, T, C))
    _check_f32(lse, "lse", 3)
    _check_shape(lse, "lse", (B, NH, T))
    cdef int nt = _threads(threads)
    if dqkv is None:
        dqkv = np.zeros((B, T, 3 * C), dtype=np.float32)
    else:
        _check_f32(dqkv, "dqkv", 3, True)
        _check_shape(dqkv, "dqkv", (B, T, 3 * C))
        _check_no_overlap(dqkv, "dqkv", dout, "dout")
        _check_no_overlap(dqkv, "dqkv", qkv, "qkv")
        _check_no_overlap(dqkv, "dqkv", out, "out")
        _check_no_overlap(dqkv, "dqkv", lse, "lse")
    cdef float *pg = _fptr(dqkv)
    cdef const float *pd = _fptr(dout)
    cdef const float *pq = _fptr(qkv)
    cdef const float *po = _fptr(out)
    cdef const float *pl = _fptr(lse)
    cdef int rc = SM_OK
    if B == 0 or T == 0:
        return dqkv
    with nogil:
        if naive:
            rc = sm_attention_backward_naive_ex(pg, pd, pq, po, pl, B, T, C, NH, pdrop)
        else:
            rc = sm_attention_backward_ex(pg, pd, pq, po, pl, B, T, C, NH, pdrop, nt)
    _raise_for(rc, "attention_backward")
    return dqkv


def attention_backward(dout, qkv, out, lse, n_head, dqkv=None, threads=None, *, dropout=0.0,
                       seed=0, stream=0, batch_offset=0):
    """Gradient of `attention_forward` with respect to qkv, ACCUMULATED into dqkv.

    dout: float32 (B, T, C), the gradient of the loss with respect to `out`; qkv, out, lse: the
    forward's input and results. dqkv: float32 (B, T, 3C) that receives += the gradient (a new
    zero array when None); returned. Probabilities are recomputed tile by tile from lse. The
    dropout arguments must be those of the forward pass.
    """
    return _backward_call(dout, qkv, out, lse, n_head, dqkv, threads, False, dropout, seed,
                          stream, batch_offset)


def attention_backward_naive(dout, qkv, out, lse, n_head, dqkv=None, *, dropout=0.0, seed=0,
                             stream=0, batch_offset=0):
    """Reference loops (double accumulation, softmax recomputed exactly; out and lse are only
    checked, not used) with the contract of `attention_backward` (slow)."""
    return _backward_call(dout, qkv, out, lse, n_head, dqkv, None, True, dropout, seed, stream,
                          batch_offset)


# ---- KV cache and decode ---------------------------------------------------------------------

def kv_cache_new(batch, n_head, capacity, head_size):
    """A zeroed KV cache for one layer: (k_cache, v_cache), float32, holding at least
    `capacity` positions per sequence (rounded up to a multiple of ATTENTION_BLOCK = 64; the
    capacity is v_cache.shape[2]).

    k_cache (batch, n_head, capacity / 64, head_size, 64): keys in blocks of 64 positions, each
    block transposed, so the decode step reads the scores of consecutive positions as vectors
    and streams each block in order (key of position t, dim d: k_cache[b, h, t // 64, d, t % 64]).
    v_cache (batch, n_head, capacity, head_size): values by position.
    """
    _check_int(batch, "batch", 0, _MAX_DIM)
    _check_int(n_head, "n_head", 1, _MAX_DIM)
    _check_int(capacity, "capacity", 1, _MAX_DIM)
    _check_int(head_size, "head_size", 1, _MAX_DIM)
    nblk = (capacity + SM_ATT_BLOCK - 1) // SM_ATT_BLOCK
    _check_alloc((batch, n_head, nblk * SM_ATT_BLOCK, head_size), "the cache")
    return (np.zeros((batch, n_head, nblk, head_size, SM_ATT_BLOCK), dtype=np.float32),
            np.zeros((batch, n_head, nblk * SM_ATT_BLOCK, head_size), dtype=np.float32))


cdef tuple _cache_dims(object k_cache, object v_cache):
    """(B, NH, T_max, hs) of a validated, writeable-or-not pair of cache arrays."""
    _check_f32(k_cache, "k_cache", 5)
    _check_f32(v_cache, "v_cache", 4)
    cdef int64_t B = k_cache.shape[0], NH = k_cache.shape[1], hs = k_cache.shape[3]
    cdef int64_t T_max = k_cache.shape[2] * SM_ATT_BLOCK
    if NH == 0 or hs == 0 or T_max == 0 or k_cache.shape[4] != SM_ATT_BLOCK:
        raise ValidationError(f"k_cache must have shape (batch, n_head, capacity / {SM_ATT_BLOCK}, "
                              f"head_size, {SM_ATT_BLOCK}) with n_head, head_size, capacity >= 1 "
                              f"(see kv_cache_new), got {k_cache.shape}")
    if v_cache.shape != (B, NH, T_max, hs):
        raise ValidationError(f"v_cache must have shape (batch, n_head, capacity, head_size) = "
                              f"{(B, NH, T_max, hs)} to match k_cache {k_cache.shape}, got {v_cache.shape}")
    _check_no_overlap(k_cache, "k_cache", v_cache, "v_cache")
    return B, NH, T_max, hs


cdef object _int_per_row(object v, str name, int64_t B, int64_t lo, int64_t hi):
    """An int, or an integer array of shape (B,), with every value in [lo, hi] -> int32 (B,)."""
    # C takes these as int: a cache of 2**31 positions or more must not let 2**31 through to
    # the int32 conversion below, which wraps it to -2**31 (decode then returned NaN).
    hi = min(hi, 2 ** 31 - 1)
    if isinstance(v, (int, np.integer)):
        _check_int(v, name, lo, hi)
        return np.full(B, v, dtype=np.int32)
    arr = np.asarray(v)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int or an integer array, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValidationError(f"{name} must be an int or have shape ({B},), got shape {arr.shape}")
    if B > 0:
        vmin, vmax = int(arr.min()), int(arr.max())
        if vmin < lo or vmax > hi:
            raise ValidationError(f"{name} must be in [{lo}, {hi}], got values in [{vmin}, {vmax}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def kv_cache_prefill(k_cache, v_cache, qkv, start=0, threads=None):
    """Write the keys and values of qkv (B, T, 3C) into cache positions start .. start+T-1.

    The cache arrays are those of `kv_cache_new` (C = n_head * head_size); start + T must not
    exceed the capacity. Run `attention_forward` on the same qkv for the prompt's outputs.
    """
    cdef int64_t B, NH, T_max, hs
    B, NH, T_max, hs = _cache_dims(k_cache, v_cache)
    _check_f32(k_cache, "k_cache", 5, True)
    _check_f32(v_cache, "v_cache", 4, True)
    _check_f32(qkv, "qkv", 3)
    cdef int64_t C = NH * hs, T = qkv.shape[1]
    if qkv.shape[0] != B or qkv.shape[2] != 3 * C:
        raise ValidationError(f"qkv must have shape (batch, T, 3 * n_head * head_size) = "
                              f"({B}, T, {3 * C}) to match the cache, got {qkv.shape}")
    if T > T_max:
        raise ValidationError(f"qkv has T={T} positions, more than the cache capacity {T_max}")
    _check_int(start, "start", 0, T_max - T)
    _check_no_overlap(k_cache, "k_cache", qkv, "qkv")
    _check_no_overlap(v_cache, "v_cache", qkv, "qkv")
    cdef int nt = _threads(threads)
    cdef float *pk = _fptr(k_cache)
    cdef float *pv = _fptr(v_cache)
    cdef const float *pq = _fptr(qkv)
    cdef int64_t s0 = start
    if B == 0 or T == 0:
        return
    with nogil:
        sm_kv_cache_prefill(pk, pv, pq, s0, B, T, NH, T_max, hs, nt)


def kv_cache_append(k_cache, v_cache, qkv_row, positions, threads=None):
    """Write one new token's key and value per sequence, qkv_row (B, 3C), at cache position
    `positions` (an int for all sequences, or an integer array (B,)), each in [0, capacity).
    `threads` is accepted like everywhere else; a copy this small always runs on the calling
    thread."""
    cdef int64_t B, NH, T_max, hs
    B, NH, T_max, hs = _cache_dims(k_cache, v_cache)
    _check_f32(k_cache, "k_cache", 5, True)
    _check_f32(v_cache, "v_cache", 4, True)
    _check_f32(qkv_row, "qkv_row", 2)
    cdef int64_t C = NH * hs
    _check_shape(qkv_row, "qkv_row", (B, 3 * C))
    pos = _int_per_row(positions, "positions", B, 0, T_max - 1)
    _check_no_overlap(k_cache, "k_cache", qkv_row, "qkv_row")
    _check_no_overlap(v_cache, "v_cache", qkv_row, "qkv_row")
    cdef int nt = _threads(threads)
    cdef float *pk = _fptr(k_cache)
    cdef float *pv = _fptr(v_cache)
    cdef const float *pq = _fptr(qkv_row)
    cdef const int *pp = _iptr(pos)
    if B == 0:
        return
    with nogil:
        sm_kv_cache_append(pk, pv, pq, pp, B, NH, T_max, hs, nt)


cdef object _decode_call(object q, object k_cache, object v_cache, object lengths, object out,
                         object threads, bint naive):
    cdef int64_t B, NH, T_max, hs
    B, NH, T_max, hs = _cache_dims(k_cache, v_cache)
    cdef int64_t C = NH * hs
    _check_f32(q, "q", 2)
    if q.shape != (B, C) and q.shape != (B, 3 * C):
        raise ValidationError(f"q must have shape (batch, C) = {(B, C)}, or be fused qkv rows "
                              f"{(B, 3 * C)}, to match the cache, got {q.shape}")
    cdef int64_t q_stride = q.shape[1]
    lens = _int_per_row(lengths, "lengths", B, 1, T_max)
    cdef int nt = _threads(threads)
    out = _out_f32(out, "out", (B, C))
    _check_no_overlap(out, "out", q, "q")
    _check_no_overlap(out, "out", k_cache, "k_cache")
    _check_no_overlap(out, "out", v_cache, "v_cache")
    cdef float *po = _fptr(out)
    cdef const float *pq = _fptr(q)
    cdef const float *pk = _fptr(k_cache)
    cdef const float *pv = _fptr(v_cache)
    cdef const int *pl = _iptr(lens)
    cdef int rc = SM_OK
    if B == 0:
        return out
    with nogil:
        if naive:
            rc = sm_attention_decode_naive(po, pq, pk, pv, pl, q_stride, B, NH, T_max, hs)
        else:
            rc = sm_attention_decode(po, pq, pk, pv, pl, q_stride, B, NH, T_max, hs, nt)
    _raise_for(rc, "attention_decode")
    return out


def attention_decode(q, k_cache, v_cache, lengths, out=None, threads=None):
    """One decoding step: each sequence's new query attends to its cached positions
    0 .. lengths[b]-1 (append the new token's key and value first). Returns out (B, C).

    q: float32 (B, C) queries, or (B, 3C) fused qkv rows whose first C columns are the queries.
    lengths: an int for every sequence or an integer array (B,), each in [1, capacity].
    """
    return _decode_call(q, k_cache, v_cache, lengths, out, threads, False)


def attention_decode_naive(q, k_cache, v_cache, lengths, out=None):
    """Reference loops (double accumulation) with the contract of `attention_decode` (slow)."""
    return _decode_call(q, k_cache, v_cache, lengths, out, None, True)
