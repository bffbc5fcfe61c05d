"""test_quant_kernels.py - bf16 / int8 weight matrices (sm_quant.c): the codes and scales against
numpy references, and the decode products that read them against float64 on the dequantized
matrix; a column split, a batched row and a k-range split give the bits the whole call gives."""
import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core


def _bf16_ref(W):
    u = W.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _int8_ref(W, group, layout):
    """codes and scales as sm_quantize computes them (float32 division, round half to even)."""
    A = W if layout == "rows" else W.T                    # (K, N): groups down the columns
    K, N = A.shape
    g = A.reshape(K // group, group, N)
    scales = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)        # (K/G, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scales[:, None, :] > 0, np.rint(g / scales[:, None, :]), 0)
    codes = np.clip(q, -127, 127).astype(np.int8).reshape(K, N)
    if layout == "dots":
        return codes.T, scales.T.reshape(-1)
    return codes, scales.reshape(-1)


def _mat(K, N, seed=0, outliers=False):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    if outliers:
        W[rng.integers(0, K, 20), rng.integers(0, N, 20)] *= 40
    return W


@pytest.mark.parametrize("layout", ("rows", "dots"))
@pytest.mark.parametrize("group", (None, 32, 64))
def test_codes_and_scales_match_the_numpy_reference(layout, group):
    W = _mat(128, 96, outliers=True) if layout == "rows" else _mat(96, 128, outliers=True)
    b = _core.QMatrix(W, "bf16", layout=layout)
    np.testing.assert_array_equal(b.codes, _bf16_ref(W))
    q = _core.QMatrix(W, "int8", group, layout)
    K = 128                                   # the reduction length in both layouts
    codes, scales = _int8_ref(W, group or K, layout)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scales, scales)
    # every value within half a step of its group's scale
    deq = q.dequantize()
    step = np.repeat(scales.reshape((-1, 96) if layout == "rows" else (96, -1)),
                     group or K, axis=0 if layout == "rows" else 1)
    assert (np.abs(deq - W) <= step / 2 * 1.0001 + 1e-30).all()
    assert (np.abs(b.dequantize() - W) <= np.abs(W) * 2.0 ** -8).all()


@pytest.mark.parametrize("fmt,group", [("bf16", None), ("int8", None), ("int8", 32)])
@pytest.mark.parametrize("layout", ("rows", "dots"))
def test_products_against_float64(fmt, group, layout, simd):
    K, N = 192, 200            # N not a multiple of 16: the masked tail
    W = _mat(K, N, 1) if layout == "rows" else _mat(N, K, 1)
    q = _core.QMatrix(W, fmt, group, layout)
    deq = q.dequantize().astype(np.float64)
    A = deq if layout == "rows" else deq.T
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    y = q.matvec(x)
    ref = x.astype(np.float64) @ A
    bound = np.abs(x).astype(np.float64) @ np.abs(A) * (K + 2) * 2.0 ** -24
    assert (np.abs(y - ref) <= bound).all()


@pytest.mark.parametrize("fmt,group", [("bf16", None), ("int8", None), ("int8", 64)])
@pytest.mark.parametrize("layout", ("rows", "dots"))
def test_splits_and_batches_keep_the_bits(fmt, group, layout, simd):
    K, N = 256, 300
    W = _mat(K, N, 3) if layout == "rows" else _mat(N, K, 3)
    q = _core.QMatrix(W, fmt, group, layout)
    x = np.random.default_rng(4).standard_normal((7, K)).astype(np.float32)
    whole = q.matvec(x)
    for i in range(7):                                   # a row alone: the bits of the batch
        np.testing.assert_array_equal(q.matvec(x[i:i + 1]), whole[i:i + 1])
    parts = [q.matvec(x, n0=a, n1=b) for a, b in ((0, 64), (64, 192), (192, 300))]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)   # any column split
    if layout == "rows":
        np.testing.assert_array_equal(q.matvec(x, 0, K), whole)
        g = q.group if fmt == "int8" else 1             # bf16: any k range
        if g < K:
            cut = K // 2 // g * g
            halves = q.matvec(x, 0, cut) + q.matvec(x, cut, K)
            np.testing.assert_allclose(halves, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ("bf16", "int8"))
def test_the_rows_form_is_the_same_on_every_simd_level(fmt):
    """Per column, FMAs over k in order and the group scale applied by FMA: the generic and the
    AVX-512 paths compute the same thing."""
    W = _mat(128, 80, 5)
    q = _core.QMatrix(W, fmt, 32 if fmt == "int8" else None)
    x = np.random.default_rng(6).standard_normal((3, 128)).astype(np.float32)
    outs = []
    try:
        for level in ("generic", "avx512"):
            if sm.set_simd_level(level) != level:
                pytest.skip("no AVX-512 here")
            outs.append(q.matvec(x))
    finally:
        sm.set_simd_level(None)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_bad_arguments():
    W = _mat(64, 32)
    with pytest.raises(sm.ValidationError, match="fmt"):
        _core.QMatrix(W, "int4")
    with pytest.raises(sm.ValidationError, match="group must divide"):
        _core.QMatrix(W, "int8", 24)
    bad = W.copy()
    bad[3, 4] = np.nan
    with pytest.raises(sm.ValidationError, match="finite"):
        _core.QMatrix(bad, "int8")
    q = _core.QMatrix(W, "int8", 16)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(sm.ValidationError, match="bad ranges"):
        q.matvec(x, 30, 20)
    part = q.matvec(x, 8, 40)                 # a range across group edges: each group's share
    np.testing.assert_allclose(part, x[:, 8:40] @ q.dequantize()[8:40], rtol=1e-5, atol=1e-6)
    with pytest.raises(sm.ValidationError, match="columns"):
        q.matvec(np.ones((1, 63), np.float32))
    with pytest.raises(sm.ValidationError, match="no k range"):
        _core.QMatrix(W, "bf16", layout="dots").matvec(np.ones((1, 32), np.float32), 0, 16)


@pytest.mark.parametrize("fmt,group", [("bf16", None), ("int8", None), ("int8", 8)])
@pytest.mark.parametrize("K,N,k0,k1,n0,n1", [
    (64, 300, 0, 64, 0, 300),        # streamed: wider than a tile; 300 = 9 x 32 + 12
    (67, 211, 3, 66, 5, 211),        # odd k range (not a multiple of 4), odd columns
    (16, 4200, 0, 16, 0, 4200),      # past one streaming chunk of 4096 columns
    (40, 130, 8, 40, 1, 97),         # 96 columns from an odd start
])
def test_streamed_ranges_are_the_generic_bits(fmt, group, K, N, k0, k1, n0, n1):
    """The streamed AVX-512 rows form (bf16 reads 32 codes per load, evens and odds apart)
    against the generic loop, for ranges that end inside a 32-column chunk or a 4-row step."""
    if fmt == "int8" and group is not None and (K % group or k0 % group or k1 % group):
        k0, k1, K = 0, 64, 64
    W = _mat(K, N, 11)
    q = _core.QMatrix(W, fmt, group)
    x = np.random.default_rng(12).standard_normal((5, K)).astype(np.float32)
    outs = []
    try:
        for level in ("generic", "avx512"):
            if sm.set_simd_level(level) != level:
                pytest.skip("no AVX-512 here")
            outs.append(q.matvec(x, k0, k1, n0, n1))
    finally:
        sm.set_simd_level(None)
    np.testing.assert_array_equal(outs[0], outs[1])
