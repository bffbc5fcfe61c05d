# _model.pxi - wrappers of sm_model.h: the GPT parameter layout, the training state, and the
# whole-model forward / backward / AdamW calls that smallmind/model/transformer.py builds TransformerModel on.
# Each call validates with the GIL, then runs the entire pass in C without it.

import threading as _threading

_SEED_MAX = 2 ** 63 - 1  # seeds and streams are taken as non-negative int64


cdef int _gpt_config(object cfg, sm_gpt_config *c) except -1:
    """Fill c from a (vocab_size, block_size, n_layer, n_head, n_embd) tuple."""
    if not isinstance(cfg, tuple) or len(cfg) != 5:
        raise TypeError("cfg must be a (vocab_size, block_size, n_layer, n_head, n_embd) tuple")
    names = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    for v, name in zip(cfg, names):
        _check_int(v, name, 1, 2 ** 31)
    c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd = [int(v) for v in cfg]
    if sm_gpt_config_check(c) != SM_OK:
        raise ValidationError(f"invalid GPT configuration {cfg}: n_embd must be a multiple of "
                              f"n_head and every size within the core's limits")
    return 0


_INIT_NAMES = {SM_INIT_NORMAL: "normal", SM_INIT_RESIDUAL: "residual", SM_INIT_ONES: "ones",
               SM_INIT_ZEROS: "zeros"}


def gpt_layout(tuple cfg):
    """The parameter table of csrc/sm_model.c for `cfg`: a dict with num_params and decay_size
    (floats) and tensors, a list in block order of dicts with name (Hugging Face GPT-2 name),
    shape, offset (floats), layer (-1 for a tensor that exists once), hf_rank and init
    ("normal", "residual", "ones", "zeros"). smallmind/model/layout.py builds on it."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    tensors = []
    cdef int kind
    cdef int64_t layer
    for kind in range(SM_GPT_NUM_KINDS):
        info = sm_gpt_kinds[kind]
        suffix = info.name.decode("ascii")
        shape = (sm_gpt_dim(&c, info.rows),)
        if info.cols:
            shape += (sm_gpt_dim(&c, info.cols),)
        layers = range(c.n_layer) if info.per_layer else (-1,)
        for layer in layers:
            name = (f"transformer.h.{layer}.{suffix}" if layer >= 0 else f"transformer.{suffix}")
            tensors.append({"name": name, "shape": shape, "layer": layer,
                            "offset": sm_gpt_tensor_offset(&c, kind, layer if layer >= 0 else 0),
                            "hf_rank": info.hf_rank, "init": _INIT_NAMES[info.init]})
    return {"num_params": sm_gpt_num_params(&c), "decay_size": sm_gpt_decay_size(&c),
            "tensors": tensors}


PRECISIONS = ("float32", "bf16")


cdef int _precision_code(object precision) except -1:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValidationError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return SM_PRECISION_BF16 if precision == "bf16" else SM_PRECISION_FLOAT32


cdef class GPTState:
    """The saved activations and scratch of training steps of one batch shape, in one block
    rented from the default MemoryPool (kept across steps, returned by close() or when the
    object goes away). Calls that use it hold its lock, so close() never pulls memory from
    under a running pass."""
    cdef sm_gpt_state *s
    cdef sm_gpt_config cfg
    cdef object lock

    def __cinit__(self, tuple cfg, B, T, precision="float32"):
        self.s = NULL
        self.lock = _threading.Lock()
        _gpt_config(cfg, &self.cfg)
        _check_int(B, "B", 1, 2 ** 30)
        _check_int(T, "T", 1, self.cfg.block_size)
        cdef int prec = _precision_code(precision)
        cdef int64_t b = B, t = T
        cdef int rc
        with nogil:
            rc = sm_gpt_state_create(&self.s, &self.cfg, b, t)
        _raise_for(rc, "GPTState")
        sm_gpt_state_set_precision(self.s, prec)

    def __dealloc__(self):
        if self.s != NULL:
            sm_gpt_state_free(self.s)
            self.s = NULL

    def close(self):
        """Return the block to the pool now (idempotent)."""
        with self.lock:
            if self.s != NULL:
                sm_gpt_state_free(self.s)
                self.s = NULL

    @property
    def closed(self):
        return self.s == NULL

    @property
    def nbytes(self):
        return sm_gpt_state_nbytes(self.s) if self.s != NULL else 0

    @property
    def shape(self):
        if self.s == NULL:
            return None
        return (sm_gpt_state_B(self.s), sm_gpt_state_T(self.s))

    @property
    def precision(self):
        """"float32" or "bf16": the linear layers' matrix products in this state's passes."""
        if self.s == NULL:
            return None
        return "bf16" if sm_gpt_state_precision(self.s) == SM_PRECISION_BF16 else "float32"

    @property
    def ready(self):
        """True between a forward pass with targets and the backward pass that uses it."""
        return self.s != NULL and sm_gpt_state_ready(self.s) != 0


def gpt_forward(params, tuple cfg, idx, targets=None, logits=None, GPTState state=None,
                dropout=0.0, seed=0, threads=None):
    """One whole-model forward pass (see sm_gpt_forward). params: the float32 block; idx and
    targets: int32 (B, T); logits: float32 (B, T, V) to fill, or None. Returns (loss, n_valid),
    loss None without targets."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx", 2)
    cdef int64_t B = idx.shape[0], T = idx.shape[1]
    if B < 1 or T < 1:
        raise ValidationError(f"idx must have at least one row and one column, got shape {idx.shape}")
    if T > c.block_size:
        raise ValidationError(f"idx has {T} positions, more than block_size = {c.block_size}")
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
        _check_no_overlap(logits, "logits", params, "params")
        pl = _fptr(logits)
    cdef float p = _check_float32(dropout, "dropout")
    if not (0.0 <= p < 1.0):
        raise ValidationError(f"dropout must be in [0, 1), got {dropout}")
    _check_int(seed, "seed", 0, _SEED_MAX)
    cdef uint64_t sd = <uint64_t>int(seed)
    cdef int nt = _threads(threads)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef float loss = 0.0
    cdef int64_t n_valid = 0
    cdef int rc = SM_OK
    if state is None:
        with nogil:
            rc = sm_gpt_forward(pl, &loss, &n_valid, NULL, pp, &c, pi, pt, B, T, p, sd, nt)
    else:
        with state.lock:
            if state.s == NULL:
                raise ObjectDisposedError("the training state was closed (freed)")
            if sm_gpt_state_B(state.s) != B or sm_gpt_state_T(state.s) != T:
                raise ValidationError(f"idx shape {(B, T)} differs from the training state's "
                                      f"{state.shape}")
            if (state.cfg.vocab_size, state.cfg.block_size, state.cfg.n_layer, state.cfg.n_head,
                    state.cfg.n_embd) != cfg:
                raise ValidationError("the training state belongs to another configuration")
            with nogil:
                rc = sm_gpt_forward(pl, &loss, &n_valid, state.s, pp, &c, pi, pt, B, T, p, sd, nt)
    _raise_for(rc, "gpt_forward")
    return (float(loss) if targets is not None else None), int(n_valid)


def gpt_backward(grads, GPTState state, params, loss_scale=1.0, threads=None):
    """grads += loss_scale * d(mean loss)/d(params) from the state's last forward with targets."""
    _check_f32(grads, "grads", 1, True)
    _check_f32(params, "params", 1)
    if grads.shape != params.shape:
        raise ValidationError(f"grads must have the shape of params {params.shape}, got {grads.shape}")
    _check_no_overlap(grads, "grads", params, "params")
    cdef float sc = _check_float32(loss_scale, "loss_scale")
    cdef int nt = _threads(threads)
    cdef float *pg = _fptr(grads)
    cdef const float *pp = _fptr(params)
    cdef int rc = SM_OK
    with state.lock:
        if state.s == NULL:
            raise ObjectDisposedError("the training state was closed (freed)")
        if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&state.cfg):
            raise ValidationError(f"params must hold {sm_gpt_num_params(&state.cfg)} floats")
        if not sm_gpt_state_ready(state.s):
            raise ValidationError("backward() needs a forward pass with targets first "
                                  "(each such forward allows one backward)")
        with nogil:
            rc = sm_gpt_backward(pg, state.s, pp, sc, nt)
    _raise_for(rc, "gpt_backward")


def gpt_adamw(params, m, v, grads, tuple cfg, lr, beta1, beta2, eps, weight_decay, step,
              threads=None):
    """One AdamW step over the whole block; weight decay only on the weight matrices."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    n = sm_gpt_num_params(&c)
    for a, name in ((params, "params"), (m, "m"), (v, "v")):
        _check_f32(a, name, 1, True)
        _check_shape(a, name, (n,))
    _check_f32(grads, "grads", 1)
    _check_shape(grads, "grads", (n,))
    cdef float flr = _check_float32(lr, "lr"), b1 = _check_float32(beta1, "beta1")
    cdef float b2 = _check_float32(beta2, "beta2"), fe = _check_float32(eps, "eps")
    cdef float wd = _check_float32(weight_decay, "weight_decay")
    if not (0.0 <= b1 < 1.0) or not (0.0 <= b2 < 1.0):
        raise ValidationError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
    if flr < 0 or fe <= 0 or wd < 0:
        raise ValidationError("lr and weight_decay must be >= 0 and eps > 0")
    _check_int(step, "step", 1, 2 ** 62)
    cdef int64_t st = step
    cdef int nt = _threads(threads)
    cdef float *pp = _fptr(params)
    cdef float *pm = _fptr(m)
    cdef float *pv = _fptr(v)
    cdef const float *pg = _fptr(grads)
    with nogil:
        sm_gpt_adamw(pp, pm, pv, pg, &c, flr, b1, b2, fe, wd, st, nt)


def dropout_forward(inp, p, seed, stream=0, out=None, threads=None):
    """out = inp * keep / (1 - p) with the model's hash mask for (seed, stream); for tests."""
    _check_f32(inp, "inp")
    out = _out_f32(out, "out", inp.shape)
    cdef float fp = _check_float32(p, "p")
    if not (0.0 <= fp < 1.0):
        raise ValidationError(f"p must be in [0, 1), got {p}")
    _check_int(seed, "seed", 0, _SEED_MAX)
    _check_int(stream, "stream", 0, _SEED_MAX)
    cdef uint64_t sd = <uint64_t>int(seed), st = <uint64_t>int(stream)
    cdef int nt = _threads(threads)
    cdef int64_t n = cnp.PyArray_SIZE(<cnp.ndarray>inp)
    cdef float *po = _fptr(out)
    cdef const float *pi = _fptr(inp)
    with nogil:
        sm_dropout_forward(po, pi, n, fp, sd, st, nt)
    return out


# ---- incremental inference ---------------------------------------------------------------------

cdef class GPTCache:
    """Every layer's keys and values for `B` sequences of up to `capacity` positions, in one
    block rented from the default MemoryPool (returned by close() or when the object goes away).
    Filled by gpt_prefill, extended by gpt_decode; one caller at a time (calls hold its lock)."""
    cdef sm_gpt_cache *c
    cdef sm_gpt_config cfg
    cdef object lock
    cdef readonly object weights     # GPTQWeights in use, or None

    def __cinit__(self, tuple cfg, B, capacity, weights=None):
        self.c = NULL
        self.weights = None
        self.lock = _threading.Lock()
        _gpt_config(cfg, &self.cfg)
        _check_int(B, "B", 1, 2 ** 24)
        _check_int(capacity, "capacity", 1, self.cfg.block_size)
        cdef int64_t b = B, cap = capacity
        cdef int rc
        with nogil:
            rc = sm_gpt_cache_create(&self.c, &self.cfg, b, cap)
        _raise_for(rc, "GPTCache")
        if weights is not None:
            if not isinstance(weights, GPTQWeights):
                raise TypeError(f"weights must be a GPTQWeights, got {type(weights).__name__}")
            rc = sm_gpt_cache_set_weights(self.c, &(<GPTQWeights>weights).qw)
            if rc != SM_OK:
                raise ValidationError("weights do not fit this cache's model configuration")
            self.weights = weights

    def __dealloc__(self):
        if self.c != NULL:
            sm_gpt_cache_free(self.c)
            self.c = NULL

    def close(self):
        """Return the block to the pool now (idempotent)."""
        with self.lock:
            if self.c != NULL:
                sm_gpt_cache_free(self.c)
                self.c = NULL

    @property
    def closed(self):
        return self.c == NULL

    @property
    def nbytes(self):
        return sm_gpt_cache_nbytes(self.c) if self.c != NULL else 0

    @property
    def batch(self):
        return sm_gpt_cache_B(self.c) if self.c != NULL else 0

    @property
    def capacity(self):
        return sm_gpt_cache_capacity(self.c) if self.c != NULL else 0

    @property
    def lengths(self):
        """Tokens held per sequence (a list)."""
        if self.c == NULL:
            return []
        return [sm_gpt_cache_length(self.c, b) for b in range(sm_gpt_cache_B(self.c))]


cdef int _check_cache(GPTCache cache, sm_gpt_config *c) except -1:
    if cache.c == NULL:
        raise ObjectDisposedError("the KV cache was closed (freed)")
    if (cache.cfg.vocab_size, cache.cfg.block_size, cache.cfg.n_layer, cache.cfg.n_head,
            cache.cfg.n_embd) != (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd):
        raise ValidationError("the KV cache belongs to another configuration")
    return 0


def gpt_prefill(params, tuple cfg, idx, GPTCache cache, threads=None):
    """Run the prompts idx (B, T) int32 (B = the cache's batch, T <= its capacity) through the
    model, refill the cache with their keys and values, and return the logits of each prompt's
    last position, float32 (B, V)."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx", 2)
    cdef int64_t B = idx.shape[0], T = idx.shape[1]
    _check_ids(idx, "idx", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef int nt = _threads(threads)
    logits = np.empty((B, c.vocab_size), dtype=np.float32)
    cdef float *pl = _fptr(logits)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef int rc = SM_OK
    with cache.lock:
        _check_cache(cache, &c)
        if B != sm_gpt_cache_B(cache.c):
            raise ValidationError(f"idx has {B} rows but the cache holds {sm_gpt_cache_B(cache.c)} sequences")
        if T < 1 or T > sm_gpt_cache_capacity(cache.c):
            raise ValidationError(f"idx has {T} positions; the cache holds 1 to {sm_gpt_cache_capacity(cache.c)}")
        with nogil:
            rc = sm_gpt_prefill(pl, cache.c, pp, &c, pi, T, nt)
    _raise_for(rc, "gpt_prefill")
    return logits


def gpt_embed(params, tuple cfg, idx, threads=None):
    """Mean over positions of the final layer norm's output for each sequence of idx, int32
    (B, T): float32 (B, C)."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx", 2)
    cdef int64_t B = idx.shape[0], T = idx.shape[1]
    if B < 1 or T < 1 or T > c.block_size:
        raise ValidationError(f"idx must be (B, T) with B >= 1 and 1 <= T <= {c.block_size}, got {idx.shape}")
    _check_ids(idx, "idx", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef int nt = _threads(threads)
    out = np.empty((int(B), int(c.n_embd)), dtype=np.float32)
    cdef float *po = _fptr(out)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef int rc
    with nogil:
        rc = sm_gpt_embed(po, pp, &c, pi, B, T, nt)
    _raise_for(rc, "gpt_embed")
    return out


def gpt_prefill_seq(params, tuple cfg, idx, GPTCache cache, seq, threads=None):
    """Prefill sequence `seq` of the cache alone with the prompt idx, int32 (T,), and return the
    logits of its last position, float32 (V,); or, with idx (n, T), sequences seq .. seq+n-1
    (equal lengths, one pass) and logits (n, V). The other sequences are untouched."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx")
    if idx.ndim not in (1, 2):
        raise ValidationError(f"idx must be 1-D (T,) or 2-D (n, T), got shape {idx.shape}")
    cdef int64_t nb = 1 if idx.ndim == 1 else idx.shape[0]
    cdef int64_t T = idx.shape[idx.ndim - 1]
    if nb < 1:
        raise ValidationError("idx holds no sequence")
    _check_ids(idx, "idx", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef int nt = _threads(threads)
    shape = (int(c.vocab_size),) if idx.ndim == 1 else (int(nb), int(c.vocab_size))
    logits = np.empty(shape, dtype=np.float32)
    cdef float *pl = _fptr(logits)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef int rc = SM_OK
    cdef int64_t b
    with cache.lock:
        _check_cache(cache, &c)
        _check_int(seq, "seq", 0, sm_gpt_cache_B(cache.c) - nb)
        b = seq
        if T < 1 or T > sm_gpt_cache_capacity(cache.c):
            raise ValidationError(f"idx has {T} positions; the cache holds 1 to {sm_gpt_cache_capacity(cache.c)}")
        with nogil:
            rc = sm_gpt_prefill_seq(pl, cache.c, pp, &c, b, nb, pi, T, nt)
    _raise_for(rc, "gpt_prefill_seq")
    return logits


def gpt_decode(params, tuple cfg, tokens, GPTCache cache, threads=None, seqs=None):
    """Append one token per sequence (tokens: int32 (B,)) to the cache and return the
    next-token logits, float32 (B, V). Every sequence must hold 1 to capacity-1 tokens.
    With seqs (int32 (n,), distinct sequence numbers of the cache), tokens (n,) go to those
    sequences only, logits (n, V) in that order; the other sequences are untouched and each
    row's bits are those it would have decoded alone."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(tokens, "tokens", 1)
    _check_ids(tokens, "tokens", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef int64_t B = tokens.shape[0]
    cdef int nt = _threads(threads)
    logits = np.empty((B, c.vocab_size), dtype=np.float32)
    cdef float *pl = _fptr(logits)
    cdef const float *pp = _fptr(params)
    cdef const int *pt = _iptr(tokens)
    cdef const int *ps = NULL
    cdef int rc = SM_OK
    with cache.lock:
        _check_cache(cache, &c)
        nseq = sm_gpt_cache_B(cache.c)
        if seqs is None:
            if B != nseq:
                raise ValidationError(f"tokens has {B} entries but the cache holds {nseq} sequences")
            rows = range(B)
        else:
            _check_i32(seqs, "seqs", 1)
            if seqs.shape[0] != B:
                raise ValidationError(f"seqs has {seqs.shape[0]} entries but tokens has {B}")
            if B < 1:
                raise ValidationError("seqs must name at least one sequence")
            _check_ids(seqs, "seqs", 0, nseq - 1, f"sequence numbers in [0, {nseq - 1}]")
            rows = seqs.tolist()
            if len(set(rows)) != B:
                raise ValidationError("seqs must not name a sequence twice")
            ps = _iptr(seqs)
        lengths = [sm_gpt_cache_length(cache.c, b) for b in rows]
        if min(lengths) < 1:
            raise ValidationError("the KV cache is empty: call gpt_prefill first")
        if max(lengths) >= sm_gpt_cache_capacity(cache.c):
            raise ValidationError(f"the KV cache is full ({sm_gpt_cache_capacity(cache.c)} positions)")
        with nogil:
            if ps == NULL:
                rc = sm_gpt_decode(pl, cache.c, pp, &c, pt, nt)
            else:
                rc = sm_gpt_decode_seqs(pl, cache.c, pp, &c, ps, B, pt, nt)
    _raise_for(rc, "gpt_decode")
    return logits


def gpt_cache_copy(GPTCache dst, dst_seq, GPTCache src, src_seq, n):
    """Copy the first n cached positions of sequence src_seq of src into sequence dst_seq of
    dst (same configuration; n <= src's length and dst's capacity); dst's sequence then holds
    those n tokens. A prefix cache keeps prompts' first tokens this way."""
    if dst is src:
        with dst.lock:
            return _cache_copy(dst, dst_seq, src, src_seq, n)
    with dst.lock, src.lock:
        return _cache_copy(dst, dst_seq, src, src_seq, n)


cdef _cache_copy(GPTCache dst, dst_seq, GPTCache src, src_seq, n):
    if dst.c == NULL or src.c == NULL:
        raise ObjectDisposedError("the KV cache was closed (freed)")
    if (dst.cfg.vocab_size, dst.cfg.block_size, dst.cfg.n_layer, dst.cfg.n_head, dst.cfg.n_embd) != \
            (src.cfg.vocab_size, src.cfg.block_size, src.cfg.n_layer, src.cfg.n_head, src.cfg.n_embd):
        raise ValidationError("the two KV caches belong to different configurations")
    _check_int(dst_seq, "dst_seq", 0, sm_gpt_cache_B(dst.c) - 1)
    _check_int(src_seq, "src_seq", 0, sm_gpt_cache_B(src.c) - 1)
    if dst is src and dst_seq == src_seq:
        raise ValidationError("cannot copy a sequence onto itself")
    _check_int(n, "n", 1, min(sm_gpt_cache_length(src.c, src_seq), sm_gpt_cache_capacity(dst.c)))
    cdef int64_t db = dst_seq, sb = src_seq, nn = n
    cdef int rc
    with nogil:
        rc = sm_gpt_cache_copy(dst.c, db, src.c, sb, nn)
    _raise_for(rc, "gpt_cache_copy")


def gpt_prefill_extend(params, tuple cfg, idx, GPTCache cache, seq, prefix, threads=None):
    """Finish the prefill of sequence `seq`, whose cache holds the keys and values of the
    prompt's first `prefix` tokens (a multiple of 64; more than 4 tokens must follow): idx is
    the whole prompt, int32 (T,). Returns the logits of its last position, float32 (V,), with
    the bits gpt_prefill_seq of the whole prompt gives, and leaves the same cache contents."""
    cdef sm_gpt_config c
    _gpt_config(cfg, &c)
    _check_f32(params, "params", 1)
    if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&c):
        raise ValidationError(f"params must hold {sm_gpt_num_params(&c)} floats, got {params.shape[0]}")
    _check_i32(idx, "idx", 1)
    _check_ids(idx, "idx", 0, c.vocab_size - 1,
               f"token ids in [0, {c.vocab_size - 1}] (vocab_size is {c.vocab_size})")
    cdef int64_t T = idx.shape[0]
    cdef int nt = _threads(threads)
    logits = np.empty(int(c.vocab_size), dtype=np.float32)
    cdef float *pl = _fptr(logits)
    cdef const float *pp = _fptr(params)
    cdef const int *pi = _iptr(idx)
    cdef int rc = SM_OK
    cdef int64_t b, pre
    with cache.lock:
        _check_cache(cache, &c)
        _check_int(seq, "seq", 0, sm_gpt_cache_B(cache.c) - 1)
        b = seq
        _check_int(prefix, "prefix", 64, max(64, T - 5))
        if prefix % 64:
            raise ValidationError(f"prefix must be a multiple of 64, got {prefix}")
        pre = prefix
        if T > sm_gpt_cache_capacity(cache.c):
            raise ValidationError(f"idx has {T} positions; the cache holds at most {sm_gpt_cache_capacity(cache.c)}")
        if sm_gpt_cache_length(cache.c, b) < pre:
            raise ValidationError(f"sequence {b} holds {sm_gpt_cache_length(cache.c, b)} tokens, fewer than the prefix ({pre})")
        with nogil:
            rc = sm_gpt_prefill_extend(pl, cache.c, pp, &c, b, pi, pre, T, nt)
    _raise_for(rc, "gpt_prefill_extend")
    return logits
