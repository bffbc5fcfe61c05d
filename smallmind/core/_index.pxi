# _index.pxi - Python face of sm_index.h: IndexStore, the C rows behind smallmind.VectorIndex.
# No locking here: VectorIndex (index.py) holds a readers-writer lock around every call, so
# searches (which run without the GIL) overlap each other but never an add, remove or close.

_METRICS = {"cosine": SM_METRIC_COSINE, "dot": SM_METRIC_DOT, "l2": SM_METRIC_L2}


cdef class IndexStore:
    """float32 rows of `dim` floats in C memory with an exact top-k search (see sm_index.h)."""
    cdef sm_index *ix

    def __cinit__(self, dim, str metric):
        self.ix = NULL
        _check_int(dim, "dim", 1, 1 << 24)
        if metric not in _METRICS:
            raise ValidationError(f"metric must be one of {tuple(_METRICS)}, got {metric!r}")
        _raise_for(sm_index_create(&self.ix, dim, _METRICS[metric]), "IndexStore")

    def __dealloc__(self):
        if self.ix != NULL:
            sm_index_free(self.ix)
            self.ix = NULL

    cdef sm_index *_alive(self) except NULL:
        if self.ix == NULL:
            raise ObjectDisposedError("this index was closed (disposed)")
        return self.ix

    def close(self):
        """Free the rows now (idempotent)."""
        if self.ix != NULL:
            sm_index_free(self.ix)
            self.ix = NULL

    @property
    def size(self):
        return sm_index_size(self._alive())

    @property
    def nbytes(self):
        return sm_index_nbytes(self.ix) if self.ix != NULL else 0

    def add(self, x):
        """Append the rows of x, float32 (n, dim), C-contiguous. ValidationError (nothing added)
        for a non-finite value or, with cosine, an all-zero row."""
        cdef sm_index *ix = self._alive()
        _check_f32(x, "vectors", 2)
        if x.shape[1] != sm_index_dim(ix):
            raise ValidationError(f"vectors must have {sm_index_dim(ix)} columns, got {x.shape[1]}")
        cdef int64_t n = x.shape[0], ld = x.shape[1]
        cdef const float *px = _fptr(x)
        cdef int rc
        with nogil:
            rc = sm_index_add(ix, px, n, ld)
        if rc == SM_ERR_ARG:
            raise ValidationError("vectors must be finite" + (" and non-zero (cosine)" if
                                  sm_index_metric(ix) == SM_METRIC_COSINE else ""))
        _raise_for(rc, "VectorIndex.add")

    def remove_row(self, int64_t r):
        """Remove row r; returns the old position of the row moved into its place, or -1."""
        cdef sm_index *ix = self._alive()
        if r < 0 or r >= sm_index_size(ix):
            raise ValidationError(f"row {r} out of range")
        return sm_index_remove(ix, r)

    def get_row(self, int64_t r):
        cdef sm_index *ix = self._alive()
        if r < 0 or r >= sm_index_size(ix):
            raise ValidationError(f"row {r} out of range")
        out = np.empty(sm_index_dim(ix), np.float32)
        sm_index_get(ix, r, _fptr(out))
        return out

    def rows(self):
        """Every stored row, float32 (n, dim) (a copy)."""
        cdef sm_index *ix = self._alive()
        cdef int64_t n = sm_index_size(ix), dim = sm_index_dim(ix), r
        out = np.empty((n, dim), np.float32)
        cdef float *po = _fptr(out)
        with nogil:
            for r in range(n):
                sm_index_get(ix, r, po + r * dim)
        return out

    def search(self, q, k, threads=None, bint naive=False):
        """(rows int64 (nq, k), scores float32 (nq, k)) for queries q, float32 (nq, dim)."""
        cdef sm_index *ix = self._alive()
        _check_f32(q, "queries", 2)
        if q.shape[1] != sm_index_dim(ix):
            raise ValidationError(f"queries must have {sm_index_dim(ix)} columns, got {q.shape[1]}")
        _check_int(k, "k", 1, 1 << 40)
        cdef int64_t nq = q.shape[0], ld = q.shape[1], kk = k
        cdef int nt = _threads(threads)
        rows = np.empty((nq, kk), np.int64)
        scores = np.empty((nq, kk), np.float32)
        cdef const float *pq = _fptr(q)
        cdef int64_t *pr = <int64_t *>cnp.PyArray_DATA(<cnp.ndarray>rows)
        cdef float *ps = _fptr(scores)
        cdef int rc
        with nogil:
            if naive:
                rc = sm_index_search_naive(ix, pq, nq, ld, kk, pr, ps)
            else:
                rc = sm_index_search(ix, pq, nq, ld, kk, pr, ps, nt)
        if rc == SM_ERR_ARG:
            raise ValidationError("queries must be finite" + (" and non-zero (cosine)" if
                                  sm_index_metric(ix) == SM_METRIC_COSINE else ""))
        _raise_for(rc, "VectorIndex.search")
        return rows, scores
