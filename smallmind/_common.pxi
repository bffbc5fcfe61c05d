# _common.pxi - shared plumbing for every wrapper: argument validation, raw pointers from numpy
# arrays, the thread budget, SIMD level control and build facts.

import numpy as np
from .errors import ValidationError

from libc.stdint cimport int64_t, uintptr_t

# Read SMALLMIND_SIMD and CPUID once at import, before any thread can race on it.
sm_simd_active()

_SIMD_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}


# ---- validation ------------------------------------------------------------------------------

cdef object _check_f32(object a, str name, int ndim=-1, bint writable=False):
    """Return `a` if it is a C-contiguous float32 ndarray of rank `ndim` (any rank if -1)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}")
    if ndim >= 0 and a.ndim != ndim:
        raise ValidationError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValidationError(f"{name} must be C-contiguous (use np.ascontiguousarray({name}))")
    if writable and not a.flags.writeable:
        raise ValidationError(f"{name} must be writeable")
    return a


cdef object _check_i32(object a, str name, int ndim=-1):
    """Return `a` if it is a C-contiguous int32 ndarray of rank `ndim`."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of int32, got {type(a).__name__}")
    if a.dtype != np.int32:
        raise TypeError(f"{name} must have dtype int32, got {a.dtype}")
    if ndim >= 0 and a.ndim != ndim:
        raise ValidationError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValidationError(f"{name} must be C-contiguous (use np.ascontiguousarray({name}))")
    return a


cdef object _check_shape(object a, str name, tuple shape):
    if a.shape != shape:
        raise ValidationError(f"{name} must have shape {shape}, got {a.shape}")
    return a


cdef object _out_f32(object out, str name, tuple shape):
    """Allocate `out` when it is None, else check it is a writeable float32 array of `shape`."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    _check_f32(out, name, len(shape), True)
    _check_shape(out, name, shape)
    return out


cdef _check_no_overlap(object out, str out_name, object other, str other_name):
    if np.may_share_memory(out, other):
        raise ValidationError(f"{out_name} must not overlap {other_name}")


cdef inline float *_fptr(object a) except? NULL:
    """Data pointer of a C-contiguous float32 array (checked by the caller). NULL when empty."""
    if a.size == 0:
        return NULL
    return <float *><uintptr_t>a.__array_interface__["data"][0]


cdef inline int *_iptr(object a) except? NULL:
    if a.size == 0:
        return NULL
    return <int *><uintptr_t>a.__array_interface__["data"][0]


cdef int _check_int(object v, str name, long long lo, long long hi) except -1:
    """Validate an integer argument in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or v > hi:
        raise ValidationError(f"{name} must be in [{lo}, {hi}], got {v}")
    return 0


cdef double _check_float(object v, str name) except? -1.0:
    """Validate a finite real number argument."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    cdef double d = float(v)
    if d != d or d == float("inf") or d == float("-inf"):
        raise ValidationError(f"{name} must be finite, got {v}")
    return d


# ---- threads ---------------------------------------------------------------------------------

MAX_THREADS = 1024


cdef int _threads(object threads) except -1:
    """Resolve a `threads=` argument: None -> library default, else an int in [1, MAX_THREADS]."""
    if threads is None:
        return sm_resolve_threads(0)
    _check_int(threads, "threads", 1, MAX_THREADS)
    return sm_resolve_threads(<int>threads)


def set_num_threads(n):
    """Set the default number of OpenMP threads each compute call uses (when `threads=None`).

    Also sets OpenMP's own default for the calling thread, so threadpoolctl reports it.
    """
    _check_int(n, "n", 1, MAX_THREADS)
    smallmind_set_num_threads(<int>n)
    sm_omp_set_num_threads(<int>n)


def get_num_threads():
    """The default thread budget of compute calls: the value given to `set_num_threads`, or
    OpenMP's default (OMP_NUM_THREADS, or the processor count) when none was set. Always 1 in a
    build without OpenMP."""
    return sm_resolve_threads(0)


# ---- SIMD and build facts --------------------------------------------------------------------

def simd_level():
    """Name of the SIMD level kernels use now: 'avx512', 'avx2' or 'generic'."""
    return sm_simd_name(sm_simd_active()).decode()


def simd_detected():
    """Highest SIMD level this CPU supports (before SMALLMIND_SIMD or set_simd_level caps)."""
    return sm_simd_name(sm_simd_detected()).decode()


def set_simd_level(level):
    """Cap the SIMD level kernels use ('avx512', 'avx2', 'generic', or None for the highest
    allowed). A level above what the CPU supports falls back to the highest supported one.
    Returns the level now active. Meant for testing every code path on one machine."""
    if level is None:
        return sm_simd_name(sm_simd_set(-1)).decode()
    if level not in _SIMD_LEVELS:
        raise ValidationError(f"level must be one of {sorted(_SIMD_LEVELS)} or None, got {level!r}")
    return sm_simd_name(sm_simd_set(_SIMD_LEVELS[level])).decode()


def build_info():
    """Facts about this build and machine: compiler, OpenMP, SIMD detected and in use, threads."""
    return {
        "compiler": sm_compiler().decode(),
        "openmp": bool(sm_openmp_enabled()),
        "simd": sm_simd_name(sm_simd_active()).decode(),
        "simd_detected": sm_simd_name(sm_simd_detected()).decode(),
        "num_threads": sm_resolve_threads(0),
        "cpu_count": sm_cpu_count(),
    }


cdef _raise_for(int rc, str what):
    """Turn a C error code into a Python exception."""
    if rc == SM_OK:
        return
    if rc == SM_ERR_NOMEM:
        raise MemoryError(f"{what}: out of memory")
    raise RuntimeError(f"{what}: internal error code {rc}")
