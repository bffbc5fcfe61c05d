"""The fused linear-layer epilogue (sm_sgemm_epi / kernels.linear): bias, residual and GELU applied
tile by tile inside the GEMM must give the same bits as the product followed by the separate
element-wise kernels, on every SIMD level, product path (packed, matrix-vector, several K slices,
bf16) and thread count, and the float64 reference within float32 rounding."""
import numpy as np
import pytest
from conftest import assert_close

from smallmind.core import kernels as K
from smallmind.errors import ValidationError

# (M, K, N): packed tiles with ragged edges, the matrix-vector paths (M or N <= 4), K past one
# K slice (384 floats on AVX-512) so the epilogue must wait for the last slice, and an empty K.
SHAPES = [(37, 29, 70), (3, 50, 90), (64, 800, 48), (70, 33, 2), (128, 96, 384), (5, 0, 7)]


def separate(x, w, bias, resid, trans_b, precision, threads):
    """The unfused sequence the model ran before: product, then one pass per operation."""
    prod = K.gemm_bf16 if precision == "bf16" else K.sgemm
    out = prod(x, w, trans_b=trans_b, threads=threads)
    if bias is not None:
        K.bias_add(out, bias, threads=threads)
    if resid is not None:
        out = K.residual_forward(resid, out, threads=threads)
    return out, K.gelu_forward(out, threads=threads)


def operands(rng, M, Kd, N, trans_b):
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    w = (rng.standard_normal((N, Kd) if trans_b else (Kd, N)) / max(Kd, 1) ** 0.5).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    resid = rng.standard_normal((M, N)).astype(np.float32)
    return x, w, bias, resid


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("parts", ["bias", "bias+gelu", "bias+resid", "resid+gelu", "none"])
def test_fused_equals_separate_bit_for_bit(simd, rng, shape, trans_b, parts):
    M, Kd, N = shape
    x, w, bias, resid = operands(rng, M, Kd, N, trans_b)
    bias = bias if "bias" in parts else None
    resid = resid if "resid" in parts else None
    want, want_g = separate(x, w, bias, resid, trans_b, "float32", None)
    g = np.full((M, N), np.nan, np.float32) if "gelu" in parts else None
    got = K.linear(x, w, bias=bias, residual=resid, gelu_out=g, trans_b=trans_b)
    np.testing.assert_array_equal(got, want)
    if g is not None:
        np.testing.assert_array_equal(g, want_g)


@pytest.mark.parametrize("shape", [(37, 29, 70), (64, 800, 48), (2, 64, 96)])
def test_bf16_fused_equals_separate(simd, rng, shape):
    M, Kd, N = shape
    x, w, bias, resid = operands(rng, M, Kd, N, False)
    want, want_g = separate(x, w, bias, resid, False, "bf16", None)
    g = np.empty((M, N), np.float32)
    got = K.linear(x, w, bias=bias, residual=resid, gelu_out=g, precision="bf16")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g, want_g)


def test_matches_float64_reference(rng):
    x, w, bias, resid = operands(rng, 50, 300, 130, False)
    g = np.empty((50, 130), np.float32)
    out = K.linear(x, w, bias=bias, residual=resid, gelu_out=g)
    ref = x.astype(np.float64) @ w.astype(np.float64) + bias + resid
    assert_close(out, ref, rtol=1e-5, what="linear")
    ref_g = 0.5 * ref * (1 + np.tanh(np.sqrt(2 / np.pi) * (ref + 0.044715 * ref**3)))
    assert_close(g, ref_g, rtol=1e-5, what="gelu_out")


@pytest.mark.parametrize("shape", [(300, 384, 1536), (200, 1536, 384), (3, 100, 500)])
def test_bits_do_not_depend_on_threads(rng, shape):
    M, Kd, N = shape
    x, w, bias, resid = operands(rng, M, Kd, N, False)
    results = []
    for t in (1, 2, 3):
        g = np.empty((M, N), np.float32)
        out = K.linear(x, w, bias=bias, residual=resid, gelu_out=g, threads=t)
        results.append((out, g))
    for out, g in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(g, results[0][1])


def test_nan_and_inf_flow_through(rng):
    x, w, bias, _ = operands(rng, 20, 16, 40, False)
    x[3, 2] = np.nan
    bias[5] = np.inf
    g = np.empty((20, 40), np.float32)
    out = K.linear(x, w, bias=bias, gelu_out=g)
    assert np.isnan(out[3]).all() and np.isnan(g[3]).all()
    rows = np.arange(20) != 3
    assert np.isposinf(out[rows, 5]).all() and np.isposinf(g[rows, 5]).all()


def test_bad_arguments_name_the_argument(rng):
    x, w, bias, resid = operands(rng, 8, 6, 10, False)
    with pytest.raises(ValidationError, match="inner dimensions"):
        K.linear(x, w.T.copy())
    with pytest.raises(ValidationError, match="bias"):
        K.linear(x, w, bias=np.zeros(9, np.float32))
    with pytest.raises(ValidationError, match="residual"):
        K.linear(x, w, residual=np.zeros((8, 9), np.float32))
    with pytest.raises(TypeError, match="gelu_out"):
        K.linear(x, w, gelu_out=np.zeros((8, 10), np.float64))
    out = np.empty((8, 10), np.float32)
    with pytest.raises(ValidationError, match="gelu_out"):
        K.linear(x, w, out=out, gelu_out=out)
    with pytest.raises(ValidationError, match="residual"):
        K.linear(x, w, out=resid, residual=resid)
    with pytest.raises(ValidationError, match="precision"):
        K.linear(x, w, precision="fp8")

