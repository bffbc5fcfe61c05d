"""memory.py - smallmind's memory pool, seen from Python.

`MemoryPool` hands out 64-byte aligned float32 buffers in size classes and takes them back, so
code that needs the same scratch sizes again and again (a model's activations, a kernel's
packing space) allocates nothing in steady state. The pool lives in C: the kernels rent from it
without the GIL, and Python rents `PooledBuffer` objects that are zero-copy numpy views::

    import numpy as np
    import smallmind as sm

    with sm.MemoryPool(max_buffer_size=1 << 20, max_buffers_per_bucket=8) as pool:
        with pool.rent(1024) as buf:          # 1024 float32 elements
            a = np.asarray(buf)                # zero-copy, writable, 64-byte aligned
            a[:] = 1.0
            del a                              # views must be gone before the buffer goes back
        print(pool.stats())                    # rents, returns, hits, misses, outstanding, ...

Safety by construction: a buffer cannot go back (BufferError) while a memoryview or numpy array
of it is alive, so its memory is never reused or freed under a view; a buffer dropped without
being returned is reclaimed when it is collected; disposing a pool frees idle buffers now and
rented ones when they come back; after dispose every method raises ObjectDisposedError.

`default_pool()` is the shared process-wide pool the C kernels use. It cannot be disposed
(dispose() raises SmallMindError); `default_pool().trim()` gives its idle memory back.

Thread safety: MemoryPool is internally synchronized (any method from any thread, at once);
a PooledBuffer is returned exactly once even if two threads race to return it.

MemoryTracker (tracker.py) reports these counters phase by phase, with the process's RSS.
"""
from ._core import MemoryPool, PooledBuffer, default_pool

__all__ = ["MemoryPool", "PooledBuffer", "default_pool"]
