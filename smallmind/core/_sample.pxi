# _sample.pxi - next-token sampling in C (sm_sample.h): the rows of a logits block in one call,
# each with its own temperature, top-k, top-p and counter-based draw, without the GIL.

def sample_uniform(key, counter):
    """The uniform draw in [0, 1) number `counter` of stream `key` (both uint64)."""
    for name, v in (("key", key), ("counter", counter)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= int(v) < 2 ** 64:
            raise ValidationError(f"{name} must be in [0, 2**64 - 1], got {int(v)}")
    return sm_sample_uniform(<uint64_t>int(key), <uint64_t>int(counter))


def sample_rows(logits, V, temperature, top_k, top_p, key, counter, threads=None):
    """Next token of each row of logits (float32 (n, >= V); the first V columns count):
    int32 (n,), -1 for a row holding NaN or an infinity. temperature (n,) >= 0 (0: argmax),
    top_k (n,) >= 0 (0: all), top_p (n,) in (0, 1], key and counter (n,) uint64: row r draws
    sample_uniform(key[r], counter[r])."""
    _check_f32(logits, "logits", 2)
    cdef int64_t n = logits.shape[0], ld = logits.shape[1]
    _check_int(V, "V", 1, max(1, ld))
    t = np.ascontiguousarray(temperature, dtype=np.float32).reshape(-1)
    k = np.ascontiguousarray(top_k, dtype=np.int64).reshape(-1)
    p = np.ascontiguousarray(top_p, dtype=np.float32).reshape(-1)
    ky = np.ascontiguousarray(key, dtype=np.uint64).reshape(-1)
    c = np.ascontiguousarray(counter, dtype=np.uint64).reshape(-1)
    for name, a in (("temperature", t), ("top_k", k), ("top_p", p), ("key", ky), ("counter", c)):
        if a.shape[0] != n:
            raise ValidationError(f"{name} must have one entry per row ({n}), got {a.shape[0]}")
    if n and not (np.isfinite(t).all() and (t >= 0).all()):
        raise ValidationError("temperature must be finite and >= 0")
    if n and (k < 0).any():
        raise ValidationError("top_k must be >= 0")
    if n and not ((p > 0) & (p <= 1)).all():
        raise ValidationError("top_p must be in (0, 1]")
    out = np.empty(n, dtype=np.int32)
    cdef int nt = _threads(threads)
    cdef int64_t vv = V
    cdef int rc
    cdef int *po = _iptr(out)
    cdef const float *pl = _fptr(logits)
    cdef const float *pt = <const float *>cnp.PyArray_DATA(<cnp.ndarray>t)
    cdef const int64_t *pk = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>k)
    cdef const float *pp = <const float *>cnp.PyArray_DATA(<cnp.ndarray>p)
    cdef const uint64_t *pky = <const uint64_t *>cnp.PyArray_DATA(<cnp.ndarray>ky)
    cdef const uint64_t *pc = <const uint64_t *>cnp.PyArray_DATA(<cnp.ndarray>c)
    with nogil:
        rc = sm_sample_rows(po, pl, ld, n, vv, pt, pk, pp, pky, pc, nt)
    _raise_for(rc, "sample_rows")
    return out
