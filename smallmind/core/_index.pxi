# _index.pxi - Python face of sm_index.h: IndexStore, the C rows behind smallmind.VectorIndex.
# No locking here: VectorIndex (index.py) holds a readers-writer lock around every call, so
# searches (which run without the GIL) overlap each other but never an add, remove or close.

_METRICS = {"cosine": SM_METRIC_COSINE, "dot": SM_METRIC_DOT, "l2": SM_METRIC_L2}
_STORAGES = {"float32": SM_STORE_F32, "bf16": SM_STORE_BF16, "int8": SM_STORE_I8}


cdef class IndexStore:
    """Rows of `dim` floats in C memory with a top-k search (see sm_index.h): float32, or a
    compact bf16 / int8 copy read first (with the float32 rows kept when exact)."""
    cdef sm_index *ix

    def __cinit__(self, dim, str metric, str storage="float32", bint exact=True):
        self.ix = NULL
        _check_int(dim, "dim", 1, 1 << 24)
        if metric not in _METRICS:
            raise ValidationError(f"metric must be one of {tuple(_METRICS)}, got {metric!r}")
        if storage not in _STORAGES:
            raise ValidationError(f"storage must be one of {tuple(_STORAGES)}, got {storage!r}")
        if storage == "float32" and not exact:
            raise ValidationError("exact=False needs a compact storage (bf16 or int8): float32 "
                                  "rows are the exact ones")
        _raise_for(sm_index_create(&self.ix, dim, _METRICS[metric], _STORAGES[storage], exact),
                   "IndexStore")

    def codes(self):
        """A compact store without float32 rows: (codes (n, dim) uint16 bf16 bits or int8,
        scales float32 (n,), zeros for bf16)."""
        cdef sm_index *ix = self._alive()
        cdef int64_t n = sm_index_size(ix), dim = sm_index_dim(ix), r
        st = sm_index_storage(ix)
        if st == SM_STORE_F32 or sm_index_exact(ix):
            raise ValidationError("only a compact store without float32 rows has codes")
        codes = np.empty((n, dim), np.uint16 if st == SM_STORE_BF16 else np.int8)
        scales = np.empty(n, np.float32)
        cdef char *pc = <char *>cnp.PyArray_DATA(<cnp.ndarray>codes)
        cdef float *ps = _fptr(scales)
        cdef int64_t es = 2 if st == SM_STORE_BF16 else 1
        with nogil:
            for r in range(n):
                sm_index_get_codes(ix, r, pc + r * dim * es, ps + r)
        return codes, scales

    def row_codes(self, int64_t r):
        """(codes (dim,), scale) of row r of a compact store without float32 rows."""
        cdef sm_index *ix = self._alive()
        if r < 0 or r >= sm_index_size(ix):
            raise ValidationError(f"row {r} out of range")
        st = sm_index_storage(ix)
        codes = np.empty(sm_index_dim(ix), np.uint16 if st == SM_STORE_BF16 else np.int8)
        cdef float scale = 0.0
        sm_index_get_codes(ix, r, cnp.PyArray_DATA(<cnp.ndarray>codes), &scale)
        return codes, scale

    def add_codes(self, codes, scales):
        """Append rows given as codes and scales (what codes() returned)."""
        cdef sm_index *ix = self._alive()
        st = sm_index_storage(ix)
        dt = np.uint16 if st == SM_STORE_BF16 else np.int8
        c = np.ascontiguousarray(codes, dtype=dt)
        sc = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
        if c.ndim != 2 or c.shape[1] != sm_index_dim(ix) or sc.shape[0] != c.shape[0]:
            raise ValidationError(f"codes must be ({sc.shape[0]}, {sm_index_dim(ix)}), got "
                                  f"{c.shape}")
        cdef int rc = sm_index_add_codes(ix, cnp.PyArray_DATA(<cnp.ndarray>c), _fptr(sc), c.shape[0])
        if rc == SM_ERR_ARG:
            raise ValidationError("codes must be finite bf16 values / int8 codes in [-127, 127] "
                                  "with finite scales >= 0 (and non-zero rows for cosine)")
        _raise_for(rc, "IndexStore.add_codes")

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
