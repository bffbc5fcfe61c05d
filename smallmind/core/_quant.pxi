# _quant.pxi - Python face of sm_quant.h: bf16 / int8 copies of weight matrices and the
# matrix-vector products of decoding that read them. The arrays are the caller's (QMatrix keeps
# its codes and scales alive); products release the GIL.

_QFORMATS = {"bf16": SM_QBF16, "int8": SM_QI8}


cdef class QMatrix:
    """A compact copy of a float32 matrix. layout "rows": W (K, N), int8 groups of `group` rows
    per column (scales (K / group, N)); layout "dots": Wt (N, K) stored row by row (the LM
    head's token embedding), groups of `group` values along each row (scales (N, K / group)).
    group=None: the whole reduction axis (one scale per output)."""
    cdef sm_qmat q
    cdef readonly object codes, scales
    cdef readonly str fmt, layout

    def __cinit__(self, W, str fmt, group=None, str layout="rows"):
        if fmt not in _QFORMATS:
            raise ValidationError(f"fmt must be one of {tuple(_QFORMATS)}, got {fmt!r}")
        if layout not in ("rows", "dots"):
            raise ValidationError(f"layout must be 'rows' or 'dots', got {layout!r}")
        _check_f32(W, "W", 2)
        cdef int64_t R = W.shape[0], C = W.shape[1]
        cdef int64_t K = R if layout == "rows" else C, N = C if layout == "rows" else R
        cdef int64_t G = K if group is None else group
        _check_int(G, "group", 1, K)
        if fmt == "int8" and K % G:
            raise ValidationError(f"group must divide the reduction length {K}, got {G}")
        self.codes = np.empty((R, C), np.uint16 if fmt == "bf16" else np.int8)
        cdef int64_t ns = (K // G) * N if fmt == "int8" else 0
        self.scales = np.empty(ns, np.float32)
        cdef int f = _QFORMATS[fmt], rc
        cdef const float *pw = _fptr(W)
        cdef void *pc = cnp.PyArray_DATA(<cnp.ndarray>self.codes)
        cdef float *ps = _fptr(self.scales) if fmt == "int8" else NULL
        cdef bint rows = layout == "rows"
        with nogil:
            if rows:
                rc = sm_quantize(f, K, N, G, pw, C, pc, ps)
            else:
                rc = sm_quantize_t(f, N, K, G, pw, C, pc, ps)
        if rc == SM_ERR_ARG:
            raise ValidationError("W must be finite")
        _raise_for(rc, "QMatrix")
        self.q.fmt, self.q.K, self.q.N = f, K, N
        self.q.group = G if fmt == "int8" else K
        self.q.codes = pc
        self.q.scales = ps
        self.fmt, self.layout = fmt, layout

    @property
    def shape(self):
        return self.codes.shape

    @property
    def group(self):
        return self.q.group

    def dequantize(self):
        """The matrix the codes stand for, float32, in W's shape."""
        out = np.empty(self.codes.shape, np.float32)
        sm_dequantize(&self.q, self.layout == "dots", _fptr(out))
        return out

    def matvec(self, x, k0=None, k1=None, n0=None, n1=None):
        """x (M, K) float32 times the matrix: (M, n1 - n0) over the reduction range [k0, k1)
        (rows layout; int8: whole groups) and the output range [n0, n1)."""
        _check_f32(x, "x", 2)
        cdef int64_t K = self.q.K, N = self.q.N, M = x.shape[0]
        if x.shape[1] != K:
            raise ValidationError(f"x must have {K} columns, got {x.shape[1]}")
        cdef int64_t a = 0 if k0 is None else k0, b = K if k1 is None else k1
        cdef int64_t c = 0 if n0 is None else n0, d = N if n1 is None else n1
        if self.layout == "dots" and (a, b) != (0, K):
            raise ValidationError("the dots layout sums over the whole row (no k range)")
        y = np.zeros((M, N), np.float32)
        cdef const float *px = _fptr(x)
        cdef float *py = _fptr(y)
        cdef int rc
        cdef bint dots = self.layout == "dots"
        with nogil:
            if dots:
                rc = sm_qgemv_dots(&self.q, M, px, K, c, d, py, N)
            else:
                rc = sm_qgemv(&self.q, M, px, K, a, b, c, d, py, N)
        if rc == SM_ERR_ARG:
            raise ValidationError(f"bad ranges: k [{a}, {b}), n [{c}, {d}) for a {K} x {N} "
                                  f"matrix (int8 k ranges in whole groups of {self.q.group})")
        _raise_for(rc, "QMatrix.matvec")
        return y[:, c:d]
