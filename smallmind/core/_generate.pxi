# _generate.pxi - the C generation loop (sm_generate.h) as a Python object: rows set up from
# Python (one per sequence of a GPTCache), then run(max_steps, max_seconds) decodes and samples
# many tokens per call without the GIL.

from libc.stdlib cimport calloc, free
from libc.stdint cimport int32_t
import math

# One generated token's log-probabilities, laid out as the C struct sm_gen_logprob.
GEN_LOGPROB_DTYPE = np.dtype([("logprob", np.float64), ("n", np.int32),
                              ("top_id", np.int32, (20,)), ("top_logprob", np.float64, (20,))],
                             align=True)


cdef class GPTGenerator:
    """The generation loop over every sequence of `cache`: row r decodes in sequence r.

    set_row(r, ...) starts a row from a prefilled sequence (its window tokens and the logits
    of its last position); run(max_steps, ...) then samples and feeds back up to max_steps
    tokens per running row in C and returns them. Between calls the caller reads the tokens
    (text, stop strings, cancellation) and may stop rows. `nv` is the number of ids that can be
    sampled (the tokenizer's vocabulary, <= the model's); `keep` the tokens kept when a full
    window moves. One caller at a time (run holds the cache's lock); interrupt() may be called
    from any thread to make a running call return after its current step."""
    cdef sm_gen_row *rows
    cdef readonly int64_t n_rows, nv, keep
    cdef sm_gpt_config cfg
    cdef object params
    cdef GPTCache cache
    cdef object windows, logits, flag
    cdef list biases, counts
    cdef object lock

    def __cinit__(self, params, tuple cfg, GPTCache cache, nv, keep):
        self.rows = NULL
        _gpt_config(cfg, &self.cfg)
        _check_f32(params, "params", 1)
        if cnp.PyArray_DIMS(<cnp.ndarray>params)[0] != sm_gpt_num_params(&self.cfg):
            raise ValidationError(f"params must hold {sm_gpt_num_params(&self.cfg)} floats, "
                                  f"got {params.shape[0]}")
        if cache.c == NULL:
            raise ObjectDisposedError("the KV cache was closed (freed)")
        _check_cache(cache, &self.cfg)
        if sm_gpt_cache_capacity(cache.c) < self.cfg.block_size:
            raise ValidationError(f"the KV cache holds {sm_gpt_cache_capacity(cache.c)} positions; "
                                  f"the generation loop needs block_size ({self.cfg.block_size})")
        _check_int(nv, "nv", 1, self.cfg.vocab_size)
        _check_int(keep, "keep", 1, self.cfg.block_size)
        self.n_rows = sm_gpt_cache_B(cache.c)
        self.nv, self.keep = nv, keep
        self.params, self.cache = params, cache
        self.windows = np.zeros((self.n_rows, self.cfg.block_size + 1), np.int32)
        self.logits = np.zeros((self.n_rows, self.nv), np.float32)
        self.flag = np.zeros(1, np.int64)
        self.biases = [None] * self.n_rows
        self.counts = [None] * self.n_rows
        self.lock = _threading.Lock()
        self.rows = <sm_gen_row *>calloc(self.n_rows, sizeof(sm_gen_row))
        if self.rows == NULL:
            raise MemoryError("GPTGenerator rows")
        cdef int64_t r
        for r in range(self.n_rows):
            self.rows[r].seq = r
            self.rows[r].top_p = 1.0
            self.rows[r].logprobs = -1
            self.rows[r].stop_token = -1
            self.rows[r].window = _iptr(self.windows) + r * (self.cfg.block_size + 1)
            self.rows[r].logits = _fptr(self.logits) + r * self.nv

    def __dealloc__(self):
        free(self.rows)
        self.rows = NULL

    def set_row(self, r, window, logits, *, temperature=0.0, top_k=0, top_p=1.0, key=0,
                presence_penalty=0.0, frequency_penalty=0.0, bias=None, logprobs=None,
                generated=0, remaining=1, stop_token=None):
        """Start row r: `window` the token ids its cache sequence holds (its length must be
        the sequence's), `logits` the next-token logits (>= nv floats; the first nv count),
        the sampler settings (c_settings' float32 clamping is the caller's), bias (nv
        float64 added to the logits, or None), logprobs (None, or the number of alternatives
        0..20), `generated` the tokens already generated (the next draw's counter) and
        `remaining` the tokens it may still generate; stop_token (an id below nv, or None): a
        drawn token equal to it is recorded and ends the row (an end-of-text token)."""
        _check_int(r, "r", 0, self.n_rows - 1)
        w = np.ascontiguousarray(window, dtype=np.int32).reshape(-1)
        T = self.cfg.block_size
        if not 1 <= w.shape[0] <= T:
            raise ValidationError(f"window must hold 1 to {T} tokens, got {w.shape[0]}")
        _check_ids(w, "window", 0, self.cfg.vocab_size - 1,
                   f"token ids in [0, {self.cfg.vocab_size - 1}]")
        z = np.asarray(logits, dtype=np.float32).reshape(-1)
        if z.shape[0] < self.nv:
            raise ValidationError(f"logits must hold at least nv ({self.nv}) values, got {z.shape[0]}")
        t = float(temperature)
        if not (t >= 0 and math.isfinite(t)):
            raise ValidationError(f"temperature must be finite and >= 0, got {temperature}")
        _check_int(top_k, "top_k", 0, 2 ** 62)
        if not 0 < float(top_p) <= 1:
            raise ValidationError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"key must be an int, got {type(key).__name__}")
        if not 0 <= int(key) < 2 ** 64:
            raise ValidationError(f"key must be in [0, 2**64 - 1], got {int(key)}")
        _check_int(generated, "generated", 0, 2 ** 63 - 1)
        _check_int(remaining, "remaining", 0, 2 ** 62)
        if logprobs is not None:
            _check_int(logprobs, "logprobs", 0, SM_GEN_MAX_TOP)
        if stop_token is not None:
            _check_int(stop_token, "stop_token", 0, self.nv - 1)
        b = None
        if bias is not None:
            b = np.array(bias, dtype=np.float64).reshape(-1)
            if b.shape[0] != self.nv:
                raise ValidationError(f"bias must hold nv ({self.nv}) values, got {b.shape[0]}")
        pres, freq = float(presence_penalty), float(frequency_penalty)
        counts = np.zeros(self.nv, np.int32) if (pres or freq) else None
        cdef sm_gen_row *row
        with self.lock:
            self.windows[r, :w.shape[0]] = w
            self.logits[r] = z[:self.nv]
            self.biases[r], self.counts[r] = b, counts
            row = &self.rows[r]
            row.held = w.shape[0]
            row.temperature = t
            row.top_k = top_k
            row.top_p = float(top_p)
            row.key = <uint64_t>int(key)
            row.presence_penalty, row.frequency_penalty = pres, freq
            row.bias = NULL
            row.counts = NULL
            if b is not None:
                row.bias = <const double *>cnp.PyArray_DATA(<cnp.ndarray>b)
            if counts is not None:
                row.counts = <int32_t *>cnp.PyArray_DATA(<cnp.ndarray>counts)
            row.logprobs = -1 if logprobs is None else logprobs
            row.generated = generated
            row.remaining = remaining
            row.stop_token = -1 if stop_token is None else stop_token
            row.failed = 0

    def stop_row(self, r):
        """Row r generates nothing more (a stop string, a cancelled request)."""
        _check_int(r, "r", 0, self.n_rows - 1)
        with self.lock:
            self.rows[r].remaining = 0

    def row(self, r):
        """Row r's state: dict(generated, remaining, held, failed)."""
        _check_int(r, "r", 0, self.n_rows - 1)
        cdef sm_gen_row *w = &self.rows[r]
        return dict(generated=w.generated, remaining=w.remaining, held=w.held,
                    failed=bool(w.failed))

    def interrupt(self):
        """Make the call in progress (or the next one) return after its current step."""
        self.flag[0] = 1

    def run(self, max_steps, max_seconds=0.0, threads=None, logprobs=False):
        """Up to max_steps tokens per running row, in C without the GIL; returns early after
        max_seconds (> 0) or an interrupt(). Returns (tokens, n, lp, first): tokens int32
        (n_rows, max_steps), n int64 (n_rows,) the tokens row r made in this call
        (tokens[r, :n[r]]), lp the GEN_LOGPROB_DTYPE records of the same shape when `logprobs`
        (rows that asked for them), else None, and `first` the seconds from the call's start to
        the end of its first step. A row whose logits held NaN or an infinity stops with
        row(r)["failed"] set."""
        _check_int(max_steps, "max_steps", 0, 2 ** 31)
        ms = float(max_seconds)
        if not (ms >= 0 and math.isfinite(ms)):
            raise ValidationError(f"max_seconds must be finite and >= 0, got {max_seconds}")
        cdef int nt = _threads(threads)
        cdef int64_t steps = max_steps, done = 0, n = self.n_rows, nv = self.nv, keep = self.keep
        cdef int64_t ld = max(steps, 1)
        cdef double secs = ms, first = 0.0
        out = np.empty((n, ld), np.int32)
        made = np.empty(n, np.int64)
        lp = np.zeros((n, ld), GEN_LOGPROB_DTYPE) if logprobs else None
        cdef int *po = _iptr(out)
        cdef int64_t *pm = <int64_t *>cnp.PyArray_DATA(<cnp.ndarray>made)
        cdef sm_gen_logprob *pl = NULL
        if logprobs:
            if lp.dtype.itemsize != sizeof(sm_gen_logprob):
                raise RuntimeError("GEN_LOGPROB_DTYPE does not match sm_gen_logprob")
            pl = <sm_gen_logprob *>cnp.PyArray_DATA(<cnp.ndarray>lp)
        cdef const float *pp = _fptr(self.params)
        cdef int64_t *pf = <int64_t *>cnp.PyArray_DATA(<cnp.ndarray>self.flag)
        cdef int rc = SM_OK
        cdef int64_t r
        with self.lock, self.cache.lock:
            _check_cache(self.cache, &self.cfg)
            for r in range(n):
                if self.rows[r].remaining > 0 and not self.rows[r].failed and \
                        sm_gpt_cache_length(self.cache.c, r) != self.rows[r].held:
                    raise ValidationError(f"row {r}'s window holds {self.rows[r].held} tokens "
                                          f"but its cache sequence {sm_gpt_cache_length(self.cache.c, r)}")
            with nogil:
                rc = sm_gpt_generate(self.cache.c, pp, &self.cfg, self.rows, n, nv, keep, steps,
                                     secs, pf, po, pl, ld, pm, &first, &done, nt)
            self.flag[0] = 0
        _raise_for(rc, "gpt_generate")
        return out, made, lp, first
