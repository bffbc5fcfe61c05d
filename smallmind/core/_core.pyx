# _core.pyx - the compiled face of the C core. Each wrapper validates its arguments with the GIL
# held (clear TypeError/ValueError naming the argument), then calls C inside `with nogil:`.
# The wrappers live in .pxi files, one per C header, included here into one extension module so
# that every kernel shares one copy of the core's state (SIMD level, thread default, pools).
# cython: language_level=3

include "_common.pxi"
include "_gemm.pxi"
include "_pool.pxi"
include "_ops.pxi"
include "_attention.pxi"
include "_quant.pxi"
include "_model.pxi"
include "_index.pxi"
include "_sample.pxi"
include "_generate.pxi"
include "_bpe.pxi"
