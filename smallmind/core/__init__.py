"""smallmind.core - the compiled core's Python face: the Cython extension `_core` (wrappers of the
C kernels in csrc/, GIL released), the kernel functions (`kernels`), the MemoryPool (`memory`) and
the MemoryTracker (`tracker`)."""
