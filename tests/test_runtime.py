"""test_runtime.py - build facts, SIMD level selection (CPUID, SMALLMIND_SIMD, set_simd_level),
the thread budget (set_num_threads, OMP_NUM_THREADS, threadpoolctl) and the error hierarchy."""
import numpy as np
import pytest
from conftest import run_python

import smallmind as sm


def _run(code, **env):
    """Run `code` in a fresh interpreter (see conftest.run_python); return its stdout."""
    out = run_python(code, **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_build_info_keys():
    info = sm.build_info()
    assert set(info) >= {"compiler", "openmp", "simd", "simd_detected", "num_threads", "cpu_count"}
    assert isinstance(info["openmp"], bool)
    assert info["simd"] in ("generic", "avx2", "avx512")
    assert info["compiler"] and info["compiler"] != "unknown"
    assert info["num_threads"] >= 1
    assert sm.__version__


def test_simd_level_can_be_lowered_and_restored():
    top = sm.set_simd_level(None)  # the highest level allowed (SMALLMIND_SIMD may cap it)
    try:
        assert sm.set_simd_level("generic") == "generic"
        assert sm.simd_level() == "generic"
        assert sm.build_info()["simd"] == "generic"
    finally:
        assert sm.set_simd_level(None) == top
    with pytest.raises(ValueError, match="level must be one of"):
        sm.set_simd_level("sse9")


def test_simd_environment_variable_caps_the_level():
    assert _run("import smallmind as sm; print(sm.simd_level())", SMALLMIND_SIMD="generic") == "generic"
    # even set_simd_level(None) stays under the environment's cap
    assert _run("import smallmind as sm; print(sm.set_simd_level(None))", SMALLMIND_SIMD="generic") == "generic"


def test_set_num_threads_and_validation():
    before = sm.get_num_threads()
    try:
        sm.set_num_threads(1)
        assert sm.get_num_threads() == 1
    finally:
        sm.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be in"):
        sm.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        sm.set_num_threads("2")


@pytest.mark.skipif(not sm.build_info()["openmp"], reason="built without OpenMP")
def test_omp_num_threads_is_the_default():
    assert _run("import smallmind as sm; print(sm.get_num_threads())", OMP_NUM_THREADS="3") == "3"


@pytest.mark.skipif(not sm.build_info()["openmp"], reason="built without OpenMP")
def test_threadpoolctl_sees_and_limits_smallmind():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    apis = {d["user_api"] for d in threadpoolctl.threadpool_info()}
    assert "smallmind" in apis and "openmp" in apis
    before = sm.get_num_threads()
    with threadpoolctl.threadpool_limits(1):
        assert sm.get_num_threads() == 1
    assert sm.get_num_threads() == before
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert sm.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(1, user_api="smallmind"):
        assert sm.get_num_threads() == 1
    assert sm.get_num_threads() == before


def test_error_hierarchy():
    assert issubclass(sm.ValidationError, ValueError)
    assert issubclass(sm.ValidationError, sm.SmallMindError)
    assert issubclass(sm.ObjectDisposedError, sm.SmallMindError)
    assert issubclass(sm.CheckpointError, sm.SmallMindError)
    assert issubclass(sm.CancelledError, sm.SmallMindError)


def test_integer_arguments_are_checked_by_value_not_by_comparison():
    """An int subclass whose comparisons lie must not slip an out-of-range value into C."""

    class Lying(int):
        def __lt__(self, other):
            return False

        def __gt__(self, other):
            return False

    with pytest.raises(ValueError, match="threads must be in"):
        sm.kernels.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), threads=Lying(10**6))
    with pytest.raises(ValueError, match="n must be in"):
        sm.set_num_threads(Lying(0))
