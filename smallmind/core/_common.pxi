# _common.pxi - shared plumbing for every wrapper: argument validation, raw pointers from numpy
# arrays, the thread budget, SIMD level control and build facts.

import operator

import numpy as np
cimport numpy as cnp
from ..errors import ValidationError

from libc.stdint cimport int64_t, uintptr_t
from libc.float cimport FLT_MAX

cnp.import_array()

# Read SMALLMIND_SIMD and CPUID once at import, before any thread can race on it.
sm_simd_active()

_SIMD_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}


# ---- validation ------------------------------------------------------------------------------
# These run on every kernel call, so they use numpy's C API (a few ns each) rather than Python
# attribute lookups (a microsecond each): small products are dominated by call overhead.

cdef inline int _check_array(object a, str name, int typenum, str tname, int ndim,
                             bint writable) except -1:
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray of {tname}, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must have dtype {tname}, got {a.dtype}")
    if ndim >= 0 and cnp.PyArray_NDIM(arr) != ndim:
        raise ValidationError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValidationError(f"{name} must be C-contiguous (use np.ascontiguousarray({name}))")
    if not cnp.PyArray_ISALIGNED(arr):
        # e.g. np.frombuffer(buf, np.float32, offset=1): C would dereference misaligned floats
        raise ValidationError(f"{name} must be aligned to its dtype "
                              f"(use np.require({name}, requirements='CA'))")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValidationError(f"{name} must be writeable")
    return 0


cdef object _check_f32(object a, str name, int ndim=-1, bint writable=False):
    """Return `a` if it is a C-contiguous float32 ndarray of rank `ndim` (any rank if -1)."""
    _check_array(a, name, cnp.NPY_FLOAT32, "float32", ndim, writable)
    return a


cdef object _check_i32(object a, str name, int ndim=-1):
    """Return `a` if it is a C-contiguous int32 ndarray of rank `ndim`."""
    _check_array(a, name, cnp.NPY_INT32, "int32", ndim, False)
    return a


cdef object _check_shape(object a, str name, tuple shape):
    if a.shape != shape:
        raise ValidationError(f"{name} must have shape {shape}, got {a.shape}")
    return a


# Most elements of an array a wrapper allocates for its result (2**60: 4 EiB of float32).
# Shapes beyond it come only from hostile sizes (a (2**31, 0) @ (0, 2**31) product): their
# byte count overflows, and numpy would refuse with a bare ValueError ("array is too big")
# instead of an error naming the argument. Below it, a shape too big for the machine raises
# MemoryError, as any allocation does.
MAX_ALLOC_ELEMENTS = 1 << 60


cdef int _check_alloc(tuple shape, str name) except -1:
    """Refuse to allocate an array of `shape` whose element count exceeds MAX_ALLOC_ELEMENTS."""
    cdef object n = 1
    for d in shape:
        n *= int(d)
    if n > MAX_ALLOC_ELEMENTS:
        raise ValidationError(f"{name} would have shape {shape}: {n} elements, more than any "
                              f"machine can hold (2**60)")
    return 0


cdef object _out_f32(object out, str name, tuple shape):
    """Allocate `out` when it is None, else check it is a writeable float32 array of `shape`."""
    if out is None:
        _check_alloc(shape, name)
        return np.empty(shape, dtype=np.float32)
    _check_f32(out, name, len(shape), True)
    _check_shape(out, name, shape)
    return out


cdef _check_no_overlap(object out, str out_name, object other, str other_name):
    """Both arrays are C-contiguous (checked before), so each spans exactly [data, data+nbytes)."""
    cdef char *p = <char *>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef char *q = <char *>cnp.PyArray_DATA(<cnp.ndarray>other)
    cdef Py_ssize_t np_ = cnp.PyArray_NBYTES(<cnp.ndarray>out), nq = cnp.PyArray_NBYTES(<cnp.ndarray>other)
    if np_ > 0 and nq > 0 and p < q + nq and q < p + np_:
        raise ValidationError(f"{out_name} must not overlap {other_name}")


cdef inline float *_fptr(object a) except? NULL:
    """Data pointer of a C-contiguous float32 array (checked by the caller). NULL when empty."""
    if cnp.PyArray_SIZE(<cnp.ndarray>a) == 0:
        return NULL
    return <float *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int *_iptr(object a) except? NULL:
    if cnp.PyArray_SIZE(<cnp.ndarray>a) == 0:
        return NULL
    return <int *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef int _check_int(object v, str name, long long lo, long long hi) except -1:
    """Validate an integer argument in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    # Compare the plain integer value, never the object: an int subclass may override its
    # comparisons, but C reads the real value.
    cdef object iv = int.__index__(v) if isinstance(v, int) else operator.index(v)
    if iv < lo or iv > hi:
        raise ValidationError(f"{name} must be in [{lo}, {hi}], got {iv}")
    return 0


cdef double _check_float(object v, str name) except? -1.0:
    """Validate a finite real number argument."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    cdef double d = float(v)
    if d != d or d == float("inf") or d == float("-inf"):
        raise ValidationError(f"{name} must be finite, got {v}")
    return d


cdef float _check_float32(object v, str name) except? -1.0:
    """Validate a real number the C core takes as a float: finite, and finite once rounded to
    float32 (1e39 passes `_check_float` but would reach C as inf)."""
    cdef double d = _check_float(v, name)
    if d > FLT_MAX or d < -FLT_MAX:
        raise ValidationError(f"{name} must be finite in float32 (|{name}| <= {FLT_MAX:.7g}), got {v}")
    return <float>d


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

    Also raises OpenMP's own limit for the calling thread to `n`. The default is always capped
    by OpenMP's limit of the calling thread (OMP_NUM_THREADS, or threadpoolctl's limits), so a
    value above that limit only applies in the thread that set it.
    """
    _check_int(n, "n", 1, MAX_THREADS)
    smallmind_set_num_threads(<int>n)
    sm_omp_set_num_threads(<int>n)


def get_num_threads():
    """The default thread budget of compute calls: the value given to `set_num_threads`, or
    OpenMP's default (OMP_NUM_THREADS, or the processor count) when none was set. Always 1 in a
    build without OpenMP."""
    return sm_resolve_threads(0)


def fork_state():
    """{"team_used": this process (or the one it was forked from) ran a team of more than one
    thread, "forked_child": this process is a fork() of such a one, so every call here runs on
    one thread - OpenMP's threads do not survive fork(), and a team started here would wait for
    them forever}."""
    return {"team_used": bool(smallmind_team_used()),
            "forked_child": bool(smallmind_forked_child())}


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


def fma_peak(threads=None, iters=80_000_000):
    """(FLOP/s, seconds): the arithmetic peak of `threads` threads, each running `iters` rounds
    of 16 independent FMA chains in registers at the active SIMD level. Benchmarks quote their
    kernels as a share of it, measured in the same run (clocks move with load and heat)."""
    _check_int(iters, "iters", 1, 2 ** 40)
    cdef int nt = _threads(threads)
    cdef int64_t n = iters
    cdef double secs = 0.0, flops
    with nogil:
        flops = sm_fma_peak(nt, n, &secs)
    return flops, secs


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
