"""test_gemm.py - sgemm against float64 numpy over odd shapes, every layout, every SIMD level,
thread counts and concurrent Python threads (bitwise), and its argument validation."""
import threading

import numpy as np
import pytest
from conftest import assert_close, run_python

import smallmind as sm

# Odd sizes hit every edge: partial MR x NR tiles, narrow (<= 16 column) slivers, K slices with
# tails, the matrix-vector paths (M or N <= 4) including the streaming one (K * N > 2M).
SHAPES = [(1, 1, 1), (3, 17, 65), (17, 3, 5), (65, 257, 33), (100, 200, 300), (4, 768, 1000),
          (1000, 768, 3), (257, 65, 1), (2, 5, 50257), (130, 1, 70), (15, 400, 33), (29, 31, 97),
          (3, 80, 30000), (30000, 80, 2), (45, 1000, 17), (200, 385, 49), (1, 700, 1000)]


def _operands(rng, M, K, N, ta, tb):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    return a, b, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_sgemm_matches_float64(simd, rng, shape, ta, tb):
    M, K, N = shape
    a, b, ref = _operands(rng, M, K, N, ta, tb)
    out = sm.kernels.sgemm(a, b, trans_a=ta, trans_b=tb)
    # float32 accumulation error grows like sqrt(K) * eps relative to the products' size
    scale = np.sqrt(K) * (np.abs(a).max() * np.abs(b).max())
    assert_close(out, ref, atol=4e-7 * np.sqrt(K) * scale + 1e-6, what=f"{shape} ta={ta} tb={tb}")


@pytest.mark.parametrize("shape", [(1, 64, 300), (70, 130, 90), (300, 520, 65)])
def test_alpha_beta_accumulate(simd, rng, shape):
    M, K, N = shape
    a, b, ref = _operands(rng, M, K, N, 0, 0)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    out = c0.copy()
    sm.kernels.sgemm(a, b, out=out, alpha=0.5, beta=1.0)
    assert_close(out, 0.5 * ref + c0, atol=1e-4 * np.sqrt(K))
    out2 = c0.copy()
    sm.kernels.sgemm(a, b, out=out2, beta=-2.0)
    assert_close(out2, ref - 2 * c0.astype(np.float64), atol=1e-4 * np.sqrt(K))


def test_beta_zero_ignores_nan_in_out(rng):
    a, b, ref = _operands(rng, 40, 50, 60, 0, 0)
    out = np.full((40, 60), np.nan, np.float32)
    sm.kernels.matmul(a, b, out=out)
    assert np.isfinite(out).all()
    assert_close(out, ref, atol=1e-4)


def test_k_zero_gives_zeros():
    a = np.zeros((5, 0), np.float32)
    b = np.zeros((0, 7), np.float32)
    out = np.full((5, 7), np.nan, np.float32)
    sm.kernels.matmul(a, b, out=out)
    assert (out == 0).all()


def test_naive_reference_matches(rng):
    a, b, ref = _operands(rng, 33, 44, 55, 1, 1)
    assert_close(sm.kernels.sgemm_naive(a, b, trans_a=True, trans_b=True), ref, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 768, 2304), (3, 500, 4000), (600, 300, 200), (4096, 128, 65),
                                   (256, 64, 256), (2000, 40, 3), (30, 100, 1000), (2, 80, 30000),
                                   (100, 700, 500)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0)])
def test_bitwise_identical_across_thread_counts(simd, rng, shape, ta, tb):
    M, K, N = shape
    a, b, _ = _operands(rng, M, K, N, ta, tb)
    outs = [sm.kernels.sgemm(a, b, trans_a=ta, trans_b=tb, threads=t) for t in (1, 2, 3, 4)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_concurrent_python_threads_bitwise_equal_serial(rng):
    cases = [_operands(rng, M, K, N, 0, 0)[:2] for (M, K, N) in
             [(300, 200, 100), (1, 768, 2304), (513, 129, 65), (64, 64, 64)]]
    serial = [sm.kernels.matmul(a, b, threads=1) for a, b in cases]
    results = {}
    errors = []

    def worker(w):
        try:
            for it in range(20):
                i = (w + it) % len(cases)
                a, b = cases[i]
                out = sm.kernels.matmul(a, b, threads=1 + (w % 2))
                if not np.array_equal(out, serial[i]):
                    results[(w, it)] = False
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not results, f"{len(results)} concurrent results differ from serial"


def test_matmul_validation():
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    with pytest.raises(TypeError, match="a must have dtype float32"):
        sm.kernels.matmul(a.astype(np.float64), b)
    with pytest.raises(TypeError, match="b must be a numpy.ndarray"):
        sm.kernels.matmul(a, [[1.0]])
    with pytest.raises(ValueError, match="a must be 2-D"):
        sm.kernels.matmul(np.ones(3, np.float32), b)
    with pytest.raises(ValueError, match="inner dimensions"):
        sm.kernels.matmul(a, np.ones((5, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        sm.kernels.matmul(np.ones((4, 3), np.float32).T, b)
    with pytest.raises(ValueError, match="out must have shape"):
        sm.kernels.matmul(a, b, out=np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="out must be writeable"):
        o = np.empty((3, 5), np.float32)
        o.flags.writeable = False
        sm.kernels.matmul(a, b, out=o)
    with pytest.raises(ValueError, match="out must not overlap a"):
        sq = np.ones((4, 4), np.float32)
        sm.kernels.matmul(sq, np.ones((4, 4), np.float32), out=sq)
    with pytest.raises(ValueError, match="threads"):
        sm.kernels.matmul(a, b, threads=0)
    with pytest.raises(TypeError, match="threads"):
        sm.kernels.matmul(a, b, threads=1.5)
    with pytest.raises(ValueError, match="beta"):
        sm.kernels.sgemm(a, b, beta=1.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        sm.kernels.sgemm(a, b, alpha=float("nan"))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        sm.kernels.matmul(a, b, out=np.empty((3, 5), np.float64))
    with pytest.raises(sm.ValidationError):
        sm.kernels.matmul(a, np.ones((5, 5), np.float32))


def test_scratch_comes_from_default_pool_and_is_returned(rng):
    pool = sm.default_pool()
    cases = [_operands(rng, M, K, N, 0, 0)[:2] for (M, K, N) in [(300, 200, 100), (2, 64, 40000)]]
    for a, b in cases:
        sm.kernels.matmul(a, b, threads=2)  # warm the pool's size classes
    before = pool.stats()
    for _ in range(3):
        for a, b in cases:
            sm.kernels.matmul(a, b, threads=2)
    after = pool.stats()
    # the packed path always rents; the matrix-vector case only streams (and rents) on AVX-512
    rents = 3 * (1 + (sm.simd_level() == "avx512"))
    assert after["rents"] - before["rents"] == rents
    assert after["returns"] - before["returns"] == rents
    assert after["misses"] == before["misses"], "steady state must not allocate"
    assert after["outstanding_buffers"] == before["outstanding_buffers"]


# ---- regression tests from the adversarial review -------------------------------------------

_TEAM_SCRIPT = r"""
import numpy as np, smallmind as sm
rng = np.random.default_rng(7)
# (700, 300, 700): 4 row blocks planned, 2 threads granted -> each thread twice the rows its
# packing scratch was sized for. (50, 64, 2048): 8 column blocks planned -> a thread packed all
# of B into a slot sized for 1/8 of it, past the end of the scratch block (heap overflow).
for M, K, N in [(700, 300, 700), (50, 64, 2048), (120, 300, 3000)]:
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    one = sm.kernels.matmul(a, b, threads=1)
    assert np.abs(one - ref).max() < 1e-3, (M, K, N)
    for t in (3, 4, 8):
        got = sm.kernels.matmul(a, b, threads=t)
        assert np.array_equal(got, one), (M, K, N, t, float(np.abs(got - one).max()))
print("OK")
"""


def test_openmp_team_smaller_than_requested():
    """OpenMP may grant fewer threads than `threads=` (OMP_THREAD_LIMIT, nesting, dynamic
    teams). The packed path used to re-split C over the threads it got while its scratch was
    sized for the planned grid: wrong results, and writes past the scratch block."""
    if not sm.build_info()["openmp"]:
        pytest.skip("build without OpenMP")
    r = run_python(_TEAM_SCRIPT, OMP_THREAD_LIMIT="2", OMP_DYNAMIC="false")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_portable_build_compiles(tmp_path):
    """The portable (non-x86: arm64, ...) build of every C file must compile cleanly, with and
    without OpenMP. sm_gemm.c once used a macro defined only inside the x86 block, so it did
    not compile at all there."""
    import glob
    import os
    import shutil
    import subprocess

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    cc = shutil.which("gcc") or shutil.which("cc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.c")))
    if not sources or cc is None:
        pytest.skip("needs the csrc/ sources and a C compiler")
    for f in glob.glob(os.path.join(csrc, "*.h")) + sources:
        shutil.copy(f, tmp_path)
    common = (tmp_path / "sm_common.h").read_text()
    patched = common.replace("defined(__x86_64__)", "0").replace("defined(_M_X64)", "0")
    assert patched != common
    (tmp_path / "sm_common.h").write_text(patched)
    for src in sources:
        name = os.path.basename(src)
        (tmp_path / f"portable_{name}").write_text(
            f'#include "{name}"\n_Static_assert(SM_X86_KERNELS == 0, "portable path");\n')
        base = [cc, "-std=gnu11", "-O1", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unused-function",
                "-Wno-unknown-pragmas", "-I", str(tmp_path), str(tmp_path / f"portable_{name}")]
        for extra in ([], ["-fopenmp", "-DSM_HAVE_OPENMP"]):
            r = subprocess.run(base + extra, capture_output=True, text=True)
            if extra and "omp.h" in r.stderr:
                continue  # compiler without OpenMP headers
            assert r.returncode == 0, f"{name} {extra}: {r.stderr}"


def test_alpha_beta_must_be_finite_in_float32():
    """alpha=1e39 is a finite double but inf as the float the kernel gets: it used to pass
    validation and fill `out` with inf/NaN."""
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    for v in (1e39, -1e300, 3.5e38):
        with pytest.raises(sm.ValidationError, match="alpha must be finite in float32"):
            sm.kernels.sgemm(a, b, alpha=v)
        with pytest.raises(sm.ValidationError, match="beta must be finite in float32"):
            sm.kernels.sgemm(a, b, out=np.ones((3, 5), np.float32), beta=v)
    out = sm.kernels.sgemm(a, b, alpha=np.float64(3e37))  # 4 * 3e37 fits in float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("shape", [(3, 5, 2), (40, 30, 50)])
def test_alpha_zero_does_not_read_operands_naive_too(simd, shape):
    """alpha == 0 means C = beta * C with A and B unread (sgemm did this; the naive reference
    computed 0 * inf = NaN, so the two disagreed)."""
    M, K, N = shape
    a = np.full((M, K), np.inf, np.float32)
    b = np.full((K, N), np.nan, np.float32)
    c0 = np.arange(M * N, dtype=np.float32).reshape(M, N) - 7
    for fn in (sm.kernels.sgemm, sm.kernels.sgemm_naive):
        out = c0.copy()
        fn(a, b, out=out, alpha=0.0, beta=-0.5)
        assert np.array_equal(out, c0 * np.float32(-0.5)), fn.__name__
        out = np.full((M, N), np.nan, np.float32)
        fn(a, b, out=out, alpha=0.0)
        assert (out == 0).all(), fn.__name__


def test_unaligned_arrays_rejected():
    """A float32 array at an odd byte offset is C-contiguous but misaligned; the C core
    dereferenced it as float * (undefined behaviour, flagged by UBSan). Now a ValidationError."""
    buf = np.zeros(4 * 20 + 8, np.uint8)
    odd = buf[1:1 + 4 * 20].view(np.float32).reshape(4, 5)
    assert not odd.flags.aligned and odd.flags.c_contiguous
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    with pytest.raises(sm.ValidationError, match="b must be aligned"):
        sm.kernels.matmul(a, odd)
    with pytest.raises(sm.ValidationError, match="a must be aligned"):
        sm.kernels.sgemm(odd, np.ones((4, 2), np.float32), trans_a=True)
    out = buf[1:1 + 4 * 15].view(np.float32).reshape(3, 5)
    with pytest.raises(sm.ValidationError, match="out must be aligned"):
        sm.kernels.matmul(a, b, out=out)
    fixed = np.require(odd, requirements="CA")
    assert_close(sm.kernels.matmul(a, fixed), a.astype(np.float64) @ fixed, rtol=1e-6)


@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1)])
def test_bitwise_when_column_split_reads_a_in_place(simd, rng, ta, tb):
    """M small and N moderate: threads split columns, and a thread's narrow block (N <= 96)
    reads A in place where one thread packs it (AVX-512): the bits must not change."""
    a, b, ref = _operands(rng, 30, 1000, 200, ta, tb)
    c0 = rng.standard_normal((30, 200)).astype(np.float32)
    outs = []
    for t in (1, 2, 3, 4):
        out = c0.copy()
        sm.kernels.sgemm(a, b, out=out, trans_a=ta, trans_b=tb, alpha=0.7, beta=-1.3, threads=t)
        outs.append(out)
    assert_close(outs[0], 0.7 * ref - 1.3 * c0.astype(np.float64), atol=1e-3)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])
