# _pool.pxi - Python faces of sm_pool.h: MemoryPool, PooledBuffer (buffer protocol, zero-copy
# numpy views) and the shared default pool. The C pool is internally synchronized; this layer
# adds what C cannot know: which Python objects still see a block (buffer exports), so a block
# is never returned - and never freed - while a memoryview or numpy array can reach it.
#
# Atomicity: every check-then-act on a PooledBuffer or MemoryPool field below runs with the GIL
# held and without calling back into Python between the check and the act, so two Python
# threads can never both return one buffer, or rent from a pool another thread just disposed.
# When a C call on a pool runs without the GIL (trim, the C stress test), the pool is first
# retained, so a dispose on another thread cannot free the pool object under the call; a
# block's return needs no such care, as an outstanding block keeps its pool object alive.

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES
from ..errors import ObjectDisposedError, SmallMindError

# Largest rent(n) accepted, in float32 elements (4 TiB): beyond it a request is surely a bug.
MAX_RENT_ELEMENTS = 1 << 40
# The bound rent() enforces, as a C constant: the Python name above is informative only (it can
# be reassigned), and the check runs again on the converted C value (see rent).
cdef Py_ssize_t _MAX_RENT_N = <Py_ssize_t>1 << 40
# Returning an oversize block at least this big releases the GIL: it is always freed, and
# unmapping megabytes of touched pages takes long enough to stall other Python threads. Every
# other rent and return keeps the GIL: a hit is a pop under the pool's mutex (~50 ns), a miss
# costs one malloc (an mmap at most; pages are faulted in later, by whoever writes them), and
# handing the GIL to another thread and waiting to get it back costs far more than either -
# releasing it for 1 MiB rents made them 5x slower from 2 threads (bench/bench_pool.py).
cdef size_t _NOGIL_BYTES = <size_t>1 << 20

DEFAULT_MAX_BUFFER_SIZE = 1 << 24       # elements (64 MiB)
DEFAULT_MAX_BUFFERS_PER_BUCKET = 16


cdef class PooledBuffer:
    """A block of float32 memory rented from a MemoryPool.

    Exports the buffer protocol (format 'f', 1-D, `len(buf)` elements, writable), so
    `memoryview(buf)` and `np.asarray(buf)` are zero-copy views; the data is 64-byte aligned and
    uninitialized when rented (like `np.empty`). Give it back with `buf.release()`,
    `pool.return_buffer(buf)`, or `with pool.rent(n) as buf:`; a buffer that is dropped without
    being returned gives its block back when it is garbage-collected (reclaimed, never leaked).

    Safety: returning a buffer while a view of it is alive raises `BufferError` (as
    `memoryview.release()` does) - delete the views first. After it is returned, every access
    (`len`, `nbytes`, `pool`, new views) raises `smallmind.ObjectDisposedError`; `release()`
    again is a no-op and `released` tells the state. A buffer stays valid after its pool is
    disposed, until it is returned.

    Thread safety: a buffer may be passed between threads, and release() / return from two
    threads at once returns it exactly once; writing its data from several threads at once is
    the caller's business, as for any numpy array.
    """
    cdef void *_block
    cdef Py_ssize_t _n
    cdef Py_ssize_t _exports
    cdef object _pool
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    def __init__(self, *args, **kwargs):
        raise TypeError("PooledBuffer cannot be created directly; use MemoryPool.rent(n)")

    def __dealloc__(self):
        # No export can be alive here (each holds a reference to self). The C pool outlives
        # its outstanding blocks, so this is safe even after the pool was disposed, and during
        # a garbage-collector sweep that already cleared self._pool.
        if self._block != NULL:
            sm_pool_return(self._block)
            self._block = NULL

    cdef int _check_live(self) except -1:
        if self._block == NULL:
            raise ObjectDisposedError("this PooledBuffer was already returned to its pool")
        return 0

    def __getbuffer__(self, Py_buffer *view, int flags):
        self._check_live()
        view.buf = self._block
        view.obj = self
        view.len = self._n * 4
        view.readonly = 0
        view.itemsize = 4
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"f"
        view.ndim = 1
        view.shape = NULL
        view.strides = NULL
        if (flags & PyBUF_ND) == PyBUF_ND:
            view.shape = self._shape
        if (flags & PyBUF_STRIDES) == PyBUF_STRIDES:
            view.strides = self._strides
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self._exports -= 1

    def __array__(self, dtype=None, copy=None):
        # numpy tries the buffer protocol first and, when it fails (a released buffer), would
        # silently build a 0-d object array; this makes np.asarray raise ObjectDisposedError.
        self._check_live()
        a = np.frombuffer(self, dtype=np.float32)
        if dtype is not None and np.dtype(dtype) != a.dtype:
            if copy is False:
                raise ValueError(f"a PooledBuffer is float32; converting to {dtype} needs a copy")
            return a.astype(dtype)
        return a.copy() if copy else a

    def __len__(self):
        self._check_live()
        return self._n

    @property
    def nbytes(self):
        """Size in bytes of the data (4 * len(buf))."""
        self._check_live()
        return self._n * 4

    @property
    def pool(self):
        """The MemoryPool this buffer was rented from."""
        self._check_live()
        return self._pool

    @property
    def closed(self):
        """True once the buffer was returned to its pool (it is unusable then)."""
        return self._block == NULL

    @property
    def released(self):
        """The same as `closed` (the pool's word for it)."""
        return self._block == NULL

    @property
    def disposed(self):
        """The same as `closed`."""
        return self._block == NULL

    cdef int _give_back(self, sm_pool *expect) except -1:
        """Return the block (to `expect`, checked, or to its own pool when NULL)."""
        if self._exports > 0:
            raise BufferError(
                f"cannot return a PooledBuffer while {self._exports} view(s) of it (memoryview, "
                "numpy array) are alive; delete them first")
        cdef void *blk = self._block
        cdef int rc
        self._block = NULL
        if <size_t>self._n * 4 >= _NOGIL_BYTES and sm_pool_block_size_class(blk) < 0:
            with nogil:
                rc = sm_pool_return_to(expect, blk) if expect != NULL else sm_pool_return(blk)
        else:
            rc = sm_pool_return_to(expect, blk) if expect != NULL else sm_pool_return(blk)
        if rc != SM_OK:  # not reachable: the checks above keep C's preconditions
            self._block = blk
            raise RuntimeError(f"returning a PooledBuffer failed: internal error code {rc}")
        return 0

    def close(self):
        """Return the buffer to its pool. A no-op when it was already returned. release(),
        dispose() and leaving ``with buf:`` do the same.

        Raises BufferError while a memoryview or numpy array of it is alive.
        """
        if self._block == NULL:
            return
        self._give_back(NULL)

    def release(self):
        """The same as close()."""
        self.close()

    def dispose(self):
        """The same as close()."""
        self.close()

    def __enter__(self):
        self._check_live()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._block == NULL:
            return False
        if self._exports > 0 and exc_type is not None:
            # The views are probably held by the failing frame; raising BufferError here would
            # hide the real error. The block is reclaimed when the buffer is collected.
            return False
        self._give_back(NULL)
        return False

    def __reduce__(self):
        raise TypeError("a PooledBuffer cannot be pickled; copy it with np.array(buf)")

    def __repr__(self):
        if self._block == NULL:
            return "<PooledBuffer released>"
        return f"<PooledBuffer n={self._n} nbytes={self._n * 4} views={self._exports}>"


cdef class MemoryPool:
    """A pool of 64-byte aligned float32 buffers in size classes.

    pool = MemoryPool(max_buffer_size=1 << 24, max_buffers_per_bucket=16, max_pooled_bytes=None)

    `max_buffer_size` is in float32 elements: rent(n) with n up to it is served from (and
    returned to) an idle list of its size class; bigger buffers are allocated exactly and freed
    on return (counted as misses). Each class keeps at most `max_buffers_per_bucket` idle
    buffers (0 pools nothing) and the pool at most `max_pooled_bytes` idle bytes (None: no cap);
    extra returns are freed.

    Lifetime: `dispose()` (or leaving `with MemoryPool() as pool:`) frees the idle buffers at
    once; buffers still rented stay valid and are freed when they are returned. Afterwards every
    method raises `smallmind.ObjectDisposedError` (give outstanding buffers back with
    `buf.release()`, or drop them); `dispose()` again is a no-op. A pool that is garbage-collected
    is disposed.

    Thread safety: internally synchronized - rent, return, trim, stats and dispose may be called
    from any number of threads at once. The same pool is usable from C without the GIL.
    """
    cdef sm_pool *_p
    cdef bint _is_default
    cdef int64_t _max_buffer_size
    cdef int64_t _max_per_bucket
    cdef object _max_pooled_bytes
    cdef bint _inited  # set by a successful __init__, never cleared (dispose keeps it)
    cdef object __weakref__

    def __init__(self, max_buffer_size=DEFAULT_MAX_BUFFER_SIZE,
                 max_buffers_per_bucket=DEFAULT_MAX_BUFFERS_PER_BUCKET, max_pooled_bytes=None):
        # _inited, not only _p: a disposed pool has _p == NULL, and re-initializing it would
        # revive it (breaking "every method raises after dispose") under buffers still
        # outstanding from its first C pool, which then could not be returned to it.
        if self._p != NULL or self._is_default or self._inited:
            raise TypeError("MemoryPool.__init__ cannot be called on an existing pool")
        _check_int(max_buffer_size, "max_buffer_size", 1, SM_POOL_MAX_BUFFER_LIMIT // 4)
        _check_int(max_buffers_per_bucket, "max_buffers_per_bucket", 0, SM_POOL_MAX_PER_BUCKET_LIMIT)
        cdef size_t cap = SM_POOL_UNLIMITED
        if max_pooled_bytes is not None:
            _check_int(max_pooled_bytes, "max_pooled_bytes", 0, 1 << 62)
            cap = <size_t>max_pooled_bytes
        cdef sm_pool *p = NULL
        cdef int rc = sm_pool_create(&p, <size_t>max_buffer_size * 4,
                                     <int64_t>max_buffers_per_bucket, cap)
        _raise_for(rc, "MemoryPool")
        self._p = p
        self._inited = True
        self._max_buffer_size = max_buffer_size
        self._max_per_bucket = max_buffers_per_bucket
        self._max_pooled_bytes = None if max_pooled_bytes is None else int(max_pooled_bytes)

    def __dealloc__(self):
        if self._p != NULL and not self._is_default:
            sm_pool_dispose(self._p)
            self._p = NULL

    cdef sm_pool *_live(self) except NULL:
        if self._p == NULL:
            raise ObjectDisposedError("this MemoryPool was closed (disposed)")
        return self._p

    # ---- renting ---------------------------------------------------------------------------

    def rent(self, n):
        """Rent a buffer of `n` float32 elements (0 <= n <= 2**40) -> PooledBuffer.

        The contents are uninitialized. `np.asarray(buf)` is a zero-copy, writable, 64-byte
        aligned float32 view. Raises TypeError for a non-int `n`, ValidationError when it is out
        of range, MemoryError when the system cannot supply the memory.
        """
        self._live()
        _check_int(n, "n", 0, _MAX_RENT_N)
        cdef Py_ssize_t count = n
        # Check again on the C value: an int subclass whose comparisons lie passes _check_int
        # with any value, and count * 4 must not wrap (it would rent a small block under a
        # huge length: a memoryview could then write anywhere).
        if count < 0 or count > _MAX_RENT_N:
            raise ValidationError(f"n must be in [0, {_MAX_RENT_N}], got {count}")
        cdef size_t nbytes = <size_t>count * 4
        cdef void *blk = NULL
        cdef int rc
        # Re-read the handle: the validation above ran Python code, during which another
        # thread may have disposed the pool. From here to the C call nothing can switch threads,
        # and the call keeps the GIL (see _NOGIL_BYTES), so dispose() cannot run meanwhile.
        cdef sm_pool *p = self._live()
        rc = sm_pool_rent_ex(&blk, p, nbytes)
        if rc == SM_ERR_DISPOSED:
            raise ObjectDisposedError("this MemoryPool was closed (disposed)")
        if rc == SM_ERR_NOMEM:
            raise MemoryError(f"MemoryPool.rent: cannot allocate {nbytes} bytes (n={count})")
        _raise_for(rc, "MemoryPool.rent")
        cdef PooledBuffer buf = PooledBuffer.__new__(PooledBuffer)
        buf._block = blk
        buf._n = count
        buf._shape[0] = count
        buf._strides[0] = 4
        buf._pool = self
        return buf

    def return_buffer(self, buf):
        """Give `buf` back to this pool (same as `buf.release()`, but checks the pool).

        Raises TypeError if `buf` is not a PooledBuffer, ValidationError if it was rented from
        another pool, ObjectDisposedError if it was already returned, BufferError while a view
        of it is alive.
        """
        cdef sm_pool *p = self._live()
        if not isinstance(buf, PooledBuffer):
            raise TypeError(f"buf must be a PooledBuffer, got {type(buf).__name__}")
        cdef PooledBuffer pb = <PooledBuffer>buf
        if pb._block == NULL:
            raise ObjectDisposedError("buf was already returned to its pool")
        # Decide from the block's own header (its C pool), not only from the Python reference.
        if pb._pool is not self or sm_pool_block_pool(pb._block) != p:
            sm_pool_return_to(p, pb._block)  # refused (wrong pool) and counted in bad_returns
            raise ValidationError("buf was rented from a different MemoryPool; return it to that "
                                  "pool or call buf.release()")
        pb._give_back(p)

    # ---- maintenance -----------------------------------------------------------------------

    def trim(self):
        """Free every idle buffer now; returns the number of bytes given back to the system.
        Rented buffers are not affected."""
        cdef sm_pool *p = self._live()
        cdef int64_t freed = 0
        cdef int rc
        sm_pool_retain(p)
        with nogil:
            rc = sm_pool_trim(p, &freed)
            sm_pool_release(p)
        _raise_for(rc, "MemoryPool.trim")
        return freed

    def stats(self):
        """Counters, as a dict of ints (bytes are block capacities, >= the bytes asked for):

        rents, returns, hits (served from an idle buffer), misses (allocated), outstanding_buffers
        and outstanding_bytes (rented now), pooled_buffers and pooled_bytes (idle now),
        peak_outstanding_bytes, discarded (returns freed at once: oversize, class full, byte
        cap), trimmed (idle buffers freed by trim/dispose), bad_returns (refused: another pool's
        buffer), failed_rents (out of memory). One consistent snapshot.
        """
        cdef sm_pool_stats st
        _raise_for(sm_pool_get_stats(&st, self._live()), "MemoryPool.stats")
        return {
            "rents": st.rents, "returns": st.returns, "hits": st.hits, "misses": st.misses,
            "outstanding_buffers": st.outstanding_buffers,
            "outstanding_bytes": st.outstanding_bytes,
            "pooled_buffers": st.pooled_buffers, "pooled_bytes": st.pooled_bytes,
            "peak_outstanding_bytes": st.peak_outstanding_bytes,
            "discarded": st.discarded, "trimmed": st.trimmed, "bad_returns": st.bad_returns,
            "failed_rents": st.failed_rents,
        }

    def reset_peak(self):
        """Restart peak_outstanding_bytes from the bytes rented now (to measure a section)."""
        sm_pool_reset_peak(self._live())

    @property
    def nbytes(self):
        """Bytes this pool holds from the system now: rented plus idle buffers."""
        cdef sm_pool_stats st
        sm_pool_get_stats(&st, self._live())
        return st.outstanding_bytes + st.pooled_bytes

    @property
    def max_buffer_size(self):
        """Largest rent(n), in float32 elements, served from the pool's size classes."""
        self._live()
        return self._max_buffer_size

    @property
    def max_buffers_per_bucket(self):
        """Most idle buffers kept per size class."""
        self._live()
        return self._max_per_bucket

    @property
    def max_pooled_bytes(self):
        """Most idle bytes kept in all (None: no cap)."""
        self._live()
        return self._max_pooled_bytes

    # ---- lifetime --------------------------------------------------------------------------

    @property
    def closed(self):
        """True after close()."""
        return self._p == NULL

    @property
    def disposed(self):
        """The same as `closed`."""
        return self._p == NULL

    @property
    def is_default(self):
        """True for the shared process-wide pool (smallmind.default_pool())."""
        return bool(self._is_default)

    def dispose(self):
        """The same as close()."""
        self.close()

    def close(self):
        """Free idle buffers now and refuse further use; rented buffers stay valid and are
        freed when they come back. A second call is a no-op. dispose() and leaving
        ``with pool:`` do the same.

        The shared default pool cannot be disposed (the kernels of every thread rent from it):
        that raises SmallMindError; call trim() to give its idle memory back instead.
        """
        if self._is_default:
            raise SmallMindError("the shared default pool cannot be disposed (every kernel in "
                                 "the process rents from it); call trim() to free its idle memory")
        cdef sm_pool *p = self._p
        if p == NULL:
            return
        self._p = NULL  # from now on every method raises, in every thread
        with nogil:
            sm_pool_dispose(p)

    def __enter__(self):
        if self._is_default:
            raise SmallMindError("the shared default pool cannot be used as a context manager "
                                 "(leaving it would dispose it); use it directly")
        self._live()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __reduce__(self):
        raise TypeError("a MemoryPool cannot be pickled")

    def __repr__(self):
        if self._p == NULL:
            return "<MemoryPool disposed>"
        cdef sm_pool_stats st
        sm_pool_get_stats(&st, self._p)
        kind = "default " if self._is_default else ""
        return (f"<{kind}MemoryPool outstanding={st.outstanding_buffers} "
                f"({st.outstanding_bytes} B) pooled={st.pooled_buffers} ({st.pooled_bytes} B)>")


cdef MemoryPool _make_default_pool():
    cdef MemoryPool mp = MemoryPool.__new__(MemoryPool)
    cdef sm_pool *p = sm_pool_default()  # created here, at import, before any thread races
    if p == NULL:
        raise MemoryError("cannot create the default memory pool")
    mp._p = p
    mp._is_default = True
    mp._max_buffer_size = <int64_t>(SM_POOL_DEFAULT_MAX_BUFFER_SIZE // 4)
    mp._max_per_bucket = SM_POOL_DEFAULT_MAX_PER_BUCKET
    mp._max_pooled_bytes = int(SM_POOL_DEFAULT_MAX_POOLED_BYTES)
    return mp


cdef MemoryPool _DEFAULT_POOL = _make_default_pool()


def default_pool():
    """The shared process-wide MemoryPool, the same one the C kernels rent their scratch from.

    Buffers up to 2**28 float32 elements (1 GiB) are pooled, at most 16 idle per size class and
    2 GiB idle in all. It cannot be disposed (dispose() raises SmallMindError); trim() gives
    its idle memory back to the system.
    """
    return _DEFAULT_POOL


# ---- test and diagnostic helpers (private) -----------------------------------------------

def _pool_global_stats():
    """Process-wide totals over every pool: live_pools, live_blocks, live_bytes."""
    cdef sm_pool_global_stats g
    sm_pool_global_get_stats(&g)
    return {"live_pools": g.live_pools, "live_blocks": g.live_blocks, "live_bytes": g.live_bytes}


def _pool_size_class(nbytes):
    _check_int(nbytes, "nbytes", 1, 1 << 46)
    return sm_pool_size_class(<size_t>nbytes)


def _pool_class_size(size_class):
    _check_int(size_class, "size_class", 0, 200)
    return sm_pool_class_size(<int>size_class)


def _pool_stress_c(MemoryPool pool not None, threads, iters, seed=0):
    """Run sm_pool_stress_test: C threads renting and returning without the GIL. Returns the
    number of corrupted or refused blocks (0 when correct)."""
    cdef sm_pool *p = pool._live()
    _check_int(threads, "threads", 1, MAX_THREADS)
    _check_int(iters, "iters", 0, 1 << 40)
    _check_int(seed, "seed", 0, (1 << 63) - 1)
    cdef int nt = threads
    cdef int64_t it = iters
    cdef uint64_t sd = seed
    cdef int64_t res
    p = pool._live()
    sm_pool_retain(p)
    with nogil:
        res = sm_pool_stress_test(p, nt, it, sd)
        sm_pool_release(p)
    if res < 0:
        _raise_for(<int>-res, "pool stress test")
    return res


def _pool_hold_lock(MemoryPool pool not None, seconds):
    """Hold the pool's lock for `seconds` without the GIL (a test of fork safety forks then)."""
    cdef sm_pool *p = pool._live()
    cdef int64_t us = <int64_t>(float(seconds) * 1e6)
    if not 0 <= us <= 60_000_000:
        raise ValidationError(f"seconds must be in [0, 60], got {seconds!r}")
    sm_pool_retain(p)
    with nogil:
        sm_pool_hold_lock(p, us)
        sm_pool_release(p)
