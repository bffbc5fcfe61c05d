"""conftest.py - shared fixtures: run a test under every SIMD level this CPU supports, seeded
random generators, and comparison against float64 references."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import smallmind as sm

_ORDER = ["generic", "avx2", "avx512"]
# Every level up to the highest allowed (the CPU's, capped by SMALLMIND_SIMD if set).
SIMD_LEVELS = _ORDER[: _ORDER.index(sm.set_simd_level(None)) + 1]


@pytest.fixture(params=SIMD_LEVELS)
def simd(request):
    """Run the test with kernels capped at each SIMD level in turn (restored afterwards)."""
    got = sm.set_simd_level(request.param)
    assert got == request.param
    yield request.param
    sm.set_simd_level(None)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_close(actual, expected, rtol=1e-5, atol=None, what=""):
    """Compare a float32 result with a float64 reference, relative to the reference's scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    tol = atol if atol is not None else rtol * scale
    err = np.abs(actual - expected).max(initial=0.0)
    assert err <= tol, f"{what} max abs error {err:.3e} > {tol:.3e} (scale {scale:.3e})"


def run_python(code, timeout=120, **env):
    """Run `code` in a fresh interpreter with extra environment variables; return the completed
    process. It runs from the folder holding the smallmind these tests imported (site-packages,
    or the source tree of an in-place build), so the child imports the same build and never a
    source checkout without its compiled core."""
    full = dict(os.environ)
    full.update(env)
    here = os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__)))
    return subprocess.run([sys.executable, "-c", code], env=full, cwd=here, capture_output=True,
                          text=True, timeout=timeout)


class CountdownEvent(threading.Event):
    """An Event that reports itself set from its (n+1)-th poll on: cancels long work at a
    precise point (training steps and micro-steps, generated tokens)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def is_set(self):
        self.n -= 1
        return self.n < 0 or super().is_set()
