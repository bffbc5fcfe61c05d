# _quant.pxi - Python face of sm_quant.h: bf16 / int8 copies of weight matrices and the
# matrix-vector products of decoding that read them. The arrays are the caller's (QMatrix keeps
# its codes and scales alive); products release the GIL.

from libc.stdlib cimport malloc, free

_QFORMATS = {"bf16": SM_QBF16, "int8": SM_QI8}


cdef class QMatrix:
    """A compact copy of a float32 matrix. layout "rows": W (K, N), int8 groups of `group` rows
    per column (scales (K / group, N)); layout "dots": Wt (N, K) stored row by row (the LM
    head's token embedding), groups of `group` values along each row (scales (N, K / group)).
    group=None: the whole reduction axis (one scale per output)."""
    cdef sm_qmat q
    cdef readonly object codes, scales
    cdef readonly str fmt, layout

    def __cinit__(self, W, str fmt, group=None, str layout="rows", codes=None, scales=None):
        """W: the float32 matrix to quantize; or W=None with `codes` (int8 or uint16 bf16 bits,
        in W's shape) and, for int8, `scales` (rows: (K / group, N); dots: (N, K / group)), a
        compact matrix as a file stores it (copied; validated: bf16 codes must be finite,
        scales finite, >= 0 and at most FLT_MAX / 128)."""
        if fmt not in _QFORMATS:
            raise ValidationError(f"fmt must be one of {tuple(_QFORMATS)}, got {fmt!r}")
        if layout not in ("rows", "dots"):
            raise ValidationError(f"layout must be 'rows' or 'dots', got {layout!r}")
        if (W is None) == (codes is None):
            raise ValidationError("give either W (to quantize) or codes (stored values)")
        cdef object src = W if codes is None else codes
        what = "W" if codes is None else "codes"
        if not isinstance(src, np.ndarray):
            raise TypeError(f"{what} must be a numpy array, got {type(src).__name__}")
        if src.ndim != 2:
            raise ValidationError(f"{what} must be 2-D, got {src.ndim}-D")
        cdef int64_t R = src.shape[0], C = src.shape[1]
        cdef int64_t K = R if layout == "rows" else C, N = C if layout == "rows" else R
        if group is not None:         # checked as given: True, 2.5 or 2**70 are refused
            _check_int(group, "group", 1, K)
        cdef int64_t G = K if group is None else group
        if fmt == "int8" and K % G:
            raise ValidationError(f"group must divide the reduction length {K}, got {G}")
        cdef int64_t ns = (K // G) * N if fmt == "int8" else 0
        if codes is not None:
            self._adopt(codes, scales, fmt, layout, K, N, G)
        else:
            if scales is not None:
                raise ValidationError("scales go with codes, not with W")
            _check_f32(W, "W", 2)
            self.codes = np.empty((R, C), np.uint16 if fmt == "bf16" else np.int8)
            self.scales = np.empty(ns, np.float32)
        cdef int f = _QFORMATS[fmt], rc
        cdef void *pc = cnp.PyArray_DATA(<cnp.ndarray>self.codes)
        cdef float *ps = _fptr(self.scales) if fmt == "int8" else NULL
        cdef const float *pw
        cdef bint rows = layout == "rows"
        if codes is None:
            pw = _fptr(W)
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

    cdef _adopt(self, codes, scales, str fmt, str layout, int64_t K, int64_t N, int64_t G):
        want = np.int8 if fmt == "int8" else np.uint16
        if codes.dtype != want:
            raise ValidationError(f"codes must be {np.dtype(want)} for {fmt}, got {codes.dtype}")
        self.codes = np.array(codes, dtype=want, order="C", copy=True)
        if fmt == "bf16":
            if scales is not None:
                raise ValidationError("bf16 has no scales")
            if np.any((self.codes & 0x7F80) == 0x7F80):
                raise ValidationError("codes hold NaN or infinite bf16 values")
            self.scales = np.empty(0, np.float32)
            return
        shape = (K // G, N) if layout == "rows" else (N, K // G)
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or \
                tuple(scales.shape) != shape:
            got = (f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, np.ndarray)
                   else type(scales).__name__)
            raise ValidationError(f"scales must be float32 {shape} for group {G}, got {got}")
        # <= FLT_MAX / 128: a code times its scale stays finite
        if not (np.isfinite(scales).all() and (scales >= 0).all()
                and (scales <= np.float32(3.4028234e38 / 128)).all()):
            raise ValidationError("scales must be finite, >= 0 and <= 2.6e36 (so that 127 "
                                  "times a scale is a float32)")
        self.scales = np.array(scales, dtype=np.float32, order="C", copy=True).reshape(-1)

    @property
    def shape(self):
        return self.codes.shape

    @property
    def group(self):
        return self.q.group

    def scales_2d(self):
        """The scales in the shape they apply in: rows (K / group, N), dots (N, K / group);
        None for bf16."""
        if self.fmt != "int8":
            return None
        G = self.q.group
        if self.layout == "rows":
            return self.scales.reshape(self.q.K // G, self.q.N)
        return self.scales.reshape(self.q.N, self.q.K // G)

    def dequantize(self):
        """The matrix the codes stand for, float32, in W's shape."""
        out = np.empty(self.codes.shape, np.float32)
        sm_dequantize(&self.q, self.layout == "dots", _fptr(out))
        return out

    def matvec(self, x, k0=None, k1=None, n0=None, n1=None):
        """x (M, K) float32 times the matrix: (M, n1 - n0) over the reduction range [k0, k1)
        (rows layout) and the output range [n0, n1)."""
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
                                  f"matrix")
        _raise_for(rc, "QMatrix.matvec")
        return y[:, c:d]


cdef class GPTQWeights:
    """The compact matrices of an inference model (sm_gpt_qweights): `layers`, 4 per layer
    (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; QMatrix in the rows layout) and `wte` (the
    token embedding, QMatrix in the dots layout). Keeps them alive while caches use them."""
    cdef sm_gpt_qweights qw
    cdef sm_qmat *mats
    cdef readonly list layers
    cdef readonly QMatrix wte

    def __cinit__(self, list layers, QMatrix wte):
        self.mats = NULL
        if not layers or len(layers) % 4:
            raise ValidationError("layers must hold 4 matrices per layer")
        if wte.layout != "dots":
            raise ValidationError("wte must be in the dots layout")
        for i, m in enumerate(layers):
            if not isinstance(m, QMatrix) or (<QMatrix>m).layout != "rows":
                raise ValidationError(f"layers[{i}] must be a QMatrix in the rows layout")
        self.mats = <sm_qmat *>malloc(len(layers) * sizeof(sm_qmat))
        if self.mats == NULL:
            raise MemoryError("GPTQWeights")
        for i, m in enumerate(layers):
            self.mats[i] = (<QMatrix>m).q
        self.layers, self.wte = list(layers), wte
        self.qw.layer = self.mats
        self.qw.wte = &wte.q

    def __dealloc__(self):
        free(self.mats)
        self.mats = NULL

    @property
    def nbytes(self):
        """Bytes of codes and scales."""
        return sum(m.codes.nbytes + m.scales.nbytes for m in self.layers + [self.wte])


def gpt_forward_q(params, tuple cfg, GPTQWeights qw, idx, targets=None, logits=None,
                  threads=None):
    """gpt_forward in eval mode with compact matrices (sm_gpt_forward_q). Returns (loss,
    n_valid), loss None without targets."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx", 2)
    cdef int64_t B = idx.shape[0], T = idx.shape[1]
    if B < 1 or T < 1 or T > c.block_size:
        raise ValidationError(f"idx must be (B, T) with 1 <= T <= {c.block_size}, got {idx.shape}")
    _check_ids(idx, "idx", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef const int *pt = NULL
    if targets is not None:
        _check_i32(targets, "targets", 2)
        _check_shape(targets, "targets", (B, T))
        _check_ids(targets, "targets", -1, c.vocab_size - 1,
                   f"token ids in [0, {c.vocab_size - 1}] or -1 (ignored)")
        pt = _iptr(targets)
    cdef float *pl = NULL
    if logits is not None:
        _out_f32(logits, "logits", (B, T, c.vocab_size))
        pl = _fptr(logits)
    cdef int nt = _threads(threads)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef float loss = 0.0
    cdef int64_t n_valid = 0
    cdef int rc
    with nogil:
        rc = sm_gpt_forward_q(pl, &loss if pt != NULL else NULL, &n_valid, pp, &qw.qw, &c, pi, pt,
                              B, T, nt)
    _raise_for(rc, "gpt_forward_q")
    return (float(loss) if targets is not None else None), int(n_valid)
