# _bpe.pxi - Python face of sm_bpe.h: BPECore, the C vocabulary and merge loop behind
# smallmind.BPETokenizer (which splits off special tokens and turns str into UTF-8 first).
# Encoding runs without the GIL; the core is read-only once built, so threads share it.

_BPE_PATTERNS = {"gpt2": SM_BPE_PAT_GPT2, "cl100k": SM_BPE_PAT_CL100K}


def unicode_version():
    """The Unicode version of the pre-tokenizers' letter / number / space tables."""
    return sm_unicode_version().decode()


def unicode_class(cp):
    """The class of code point cp as the pre-tokenizers see it: "letter", "number", "space" or
    "other"."""
    _check_int(cp, "cp", 0, 0x10FFFF)
    c = sm_uc_class(cp)
    return {1: "letter", 2: "number", 4: "space"}.get(c, "other")


def bpe_train(list docs, str pattern, max_merges, min_count=2):
    """Learn byte-level BPE merges from UTF-8 documents (see sm_bpe_train): (left ids, right
    ids), int32 arrays, merge k making id 256 + k."""
    if pattern not in _BPE_PATTERNS:
        raise ValidationError(f"pattern must be one of {tuple(_BPE_PATTERNS)}, got {pattern!r}")
    _check_int(max_merges, "max_merges", 0, 1 << 30)
    _check_int(min_count, "min_count", 1, 1 << 62)
    cdef int64_t nd = len(docs), mm = max_merges, mc = min_count
    starts = np.zeros(nd + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(d) for d in docs), dtype=np.int64, count=nd), out=starts[1:])
    text = b"".join(docs)
    ma = np.zeros(max(mm, 1), np.int32)
    mb = np.zeros(max(mm, 1), np.int32)
    cdef cnp.ndarray cs = starts, ca = ma, cb = mb
    cdef const uint8_t *p = <const uint8_t *><char *>text
    cdef int pat = _BPE_PATTERNS[pattern]
    cdef int64_t got
    with nogil:
        got = sm_bpe_train(p, <const int64_t *>cnp.PyArray_DATA(cs), nd, pat, mm, mc,
                           <int32_t *>cnp.PyArray_DATA(ca), <int32_t *>cnp.PyArray_DATA(cb))
    if got < 0:
        raise MemoryError("bpe_train: out of memory")
    return ma[:got].copy(), mb[:got].copy()


cdef class BPECore:
    """A byte-level BPE vocabulary in C (see sm_bpe.h). tokens: a list of bytes, token i's bytes
    (b"" for an id no token has). merges: None for tiktoken ranks (merge priority = the merged
    token's id), else a pair of int32 arrays (left ids, right ids) in priority order."""
    cdef sm_bpe *b
    cdef readonly int64_t n_tokens
    cdef readonly str pattern

    def __cinit__(self, tokens, str pattern, merges=None, bint whole_words=False):
        self.b = NULL
        if pattern not in _BPE_PATTERNS:
            raise ValidationError(f"pattern must be one of {tuple(_BPE_PATTERNS)}, got {pattern!r}")
        self.pattern = pattern
        n = len(tokens)
        if n == 0:
            raise ValidationError("tokens is empty")
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.frombuffer(b"".join(tokens) or b"\0", dtype=np.uint8)
        cdef int64_t nm = -1
        cdef cnp.ndarray ma = np.zeros(1, np.int32), mb = np.zeros(1, np.int32)
        if merges is not None:
            ma = np.ascontiguousarray(merges[0], dtype=np.int32)
            mb = np.ascontiguousarray(merges[1], dtype=np.int32)
            if ma.shape[0] != mb.shape[0]:
                raise ValidationError("merges: the left and right id arrays differ in length")
            nm = ma.shape[0]
        cdef cnp.ndarray cblob = blob, coff = offsets
        cdef int err = 0, pat = _BPE_PATTERNS[pattern], ww = whole_words
        cdef int64_t nn = n
        with nogil:
            self.b = sm_bpe_new(nn, <const uint8_t *>cnp.PyArray_DATA(cblob),
                                <const int64_t *>cnp.PyArray_DATA(coff), nm,
                                <const int32_t *>cnp.PyArray_DATA(ma),
                                <const int32_t *>cnp.PyArray_DATA(mb), ww, pat, &err)
        if self.b == NULL:
            if err == SM_ERR_ARG:
                raise ValidationError("invalid vocabulary: every byte must be a token, token bytes "
                                      "must be distinct, and each merge's pieces and result must "
                                      "be tokens")
            raise MemoryError("BPECore: out of memory")
        self.n_tokens = n

    def __dealloc__(self):
        if self.b != NULL:
            sm_bpe_free(self.b)
            self.b = NULL

    def encode(self, bytes data):
        """int32 ids of UTF-8 `data` (ordinary text: no special tokens)."""
        cdef int64_t n = len(data)
        out = np.empty(max(n, 1), dtype=np.int32)
        cdef cnp.ndarray co = out
        cdef const uint8_t *p = <const uint8_t *><char *>data
        cdef int64_t got
        with nogil:
            got = sm_bpe_encode(self.b, p, n, <int32_t *>cnp.PyArray_DATA(co), n)
        if got < 0:
            raise MemoryError("BPECore.encode: out of memory")
        return out[:got].copy()

    def encode_batch(self, list docs, threads=None):
        """[encode(d) for d in docs], the documents shared among threads."""
        cdef int nt = _threads(threads)
        cdef int64_t nd = len(docs)
        starts = np.zeros(nd + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(d) for d in docs), dtype=np.int64, count=nd), out=starts[1:])
        text = b"".join(docs)
        out = np.empty(max(int(starts[nd]), 1), dtype=np.int32)
        counts = np.zeros(max(nd, 1), dtype=np.int64)
        cdef cnp.ndarray cs = starts, co = out, cc = counts
        cdef const uint8_t *p = <const uint8_t *><char *>text
        with nogil:
            sm_bpe_encode_batch(self.b, p, <const int64_t *>cnp.PyArray_DATA(cs), nd,
                                <int32_t *>cnp.PyArray_DATA(co), <int64_t *>cnp.PyArray_DATA(cc),
                                nt)
        if nd and counts[:nd].min() < 0:
            raise MemoryError("BPECore.encode_batch: out of memory")
        return [out[starts[d]:starts[d] + counts[d]].copy() for d in range(nd)]

    def pretokenize(self, bytes data):
        """The pre-tokens of UTF-8 `data` as (start, end) byte offsets."""
        cdef int64_t n = len(data), at = 0, end
        cdef const uint8_t *p = <const uint8_t *><char *>data
        cdef int pat = _BPE_PATTERNS[self.pattern]
        spans = []
        while at < n:
            end = sm_bpe_pretoken_end(pat, p, n, at)
            spans.append((at, end))
            at = end
        return spans

    def token_bytes(self, int32_t id):
        """The bytes of token `id`, or None if no token has it."""
        cdef int64_t ln = 0
        cdef const uint8_t *p = sm_bpe_token_bytes(self.b, id, &ln)
        if p == NULL:
            return None
        return (<const char *>p)[:ln]
