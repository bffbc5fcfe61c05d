"""test_attention.py - causal attention forward/backward, KV cache and decode against float64
numpy references (explicit masked softmax, analytic gradient, finite differences) over odd
shapes and every SIMD level; thread-count and concurrent-call bitwise determinism; validation."""
import threading

import numpy as np
import pytest
from conftest import assert_close

import smallmind as sm

K = sm.kernels


# ---- float64 references ----------------------------------------------------------------------

def _heads(x, NH):
    """(B, T, 3C) -> q, k, v as (B, NH, T, hs) float64."""
    B, T, C3 = x.shape
    C = C3 // 3
    x = np.asarray(x, np.float64).reshape(B, T, 3, NH, C // NH)
    return (x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def ref_forward(qkv, NH):
    """out (B, T, C), lse (B, NH, T), P (B, NH, T, T) in float64."""
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, NH)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    s = np.where(np.tri(T, dtype=bool), s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    e = np.exp(s - mx)
    den = e.sum(axis=-1, keepdims=True)
    p = e / den
    out = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)
    return out, (mx + np.log(den))[..., 0], p


def ref_backward(dout, qkv, NH):
    """d(sum(out * dout))/d(qkv) in float64, by the analytic softmax gradient."""
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, NH)
    hs = q.shape[-1]
    _, _, p = ref_forward(qkv, NH)
    do = np.asarray(dout, np.float64).reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / np.sqrt(hs)
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    g = np.stack([t.transpose(0, 2, 1, 3) for t in (dq, dk, dv)], axis=2)  # (B, T, 3, NH, hs)
    return g.reshape(B, T, C3)


def rand_qkv(rng, B, T, NH, hs, scale=1.0):
    return (scale * rng.standard_normal((B, T, 3 * NH * hs))).astype(np.float32)


def check_forward(qkv, NH, out, lse, what=""):
    ro, rl, _ = ref_forward(qkv, NH)
    assert_close(out, ro, rtol=5e-6, what=f"out {what}")
    assert_close(lse, rl, atol=5e-6 * max(1.0, np.abs(rl).max()), what=f"lse {what}")


# (B, T, NH, hs): T over 1, 3, 17, 65, 257 and tile edges; NH over 1..6; hs odd, 48, 64, > 64
SHAPES = [(1, 1, 1, 1), (2, 3, 2, 5), (1, 17, 3, 7), (2, 65, 4, 16), (1, 257, 6, 64),
          (1, 257, 1, 48), (3, 65, 6, 33), (2, 17, 4, 64), (1, 130, 2, 80), (2, 64, 3, 1),
          (1, 128, 2, 17), (1, 129, 1, 128)]


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64(simd, rng, shape):
    B, T, NH, hs = shape
    qkv = rand_qkv(rng, B, T, NH, hs)
    out, lse = K.attention_forward(qkv, NH)
    assert out.shape == (B, T, NH * hs) and lse.shape == (B, NH, T)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    check_forward(qkv, NH, out, lse, str(shape))


def test_forward_every_head_size(simd, rng):
    # hs = 1..64 hits every lane-padding case of the 16-wide rows; T = 70 spans two blocks
    for hs in range(1, 65):
        qkv = rand_qkv(rng, 1, 70, 2, hs)
        out, lse = K.attention_forward(qkv, 2)
        check_forward(qkv, 2, out, lse, f"hs={hs}")


def test_forward_large_scores_are_stable(simd, rng):
    # scores of several hundred: a softmax without max subtraction would overflow
    qkv = rand_qkv(rng, 2, 65, 2, 16, scale=12.0)
    out, lse = K.attention_forward(qkv, 2)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    ro, rl, _ = ref_forward(qkv, 2)
    assert_close(out, ro, rtol=2e-5)
    assert_close(lse, rl, rtol=2e-6)


def test_forward_naive_matches_float64(rng):
    for shape in [(2, 17, 3, 7), (1, 65, 2, 64)]:
        B, T, NH, hs = shape
        qkv = rand_qkv(rng, B, T, NH, hs)
        out, lse = K.attention_forward_naive(qkv, NH)
        ro, rl, _ = ref_forward(qkv, NH)
        assert_close(out, ro, rtol=1e-6)
        assert_close(lse, rl, rtol=1e-6)


def test_forward_overwrites_given_outputs(rng):
    qkv = rand_qkv(rng, 2, 70, 2, 8)
    out = np.full((2, 70, 16), np.nan, np.float32)
    lse = np.full((2, 2, 70), np.nan, np.float32)
    o, l = K.attention_forward(qkv, 2, out=out, lse=lse)
    assert o is out and l is lse
    check_forward(qkv, 2, out, lse)


def test_forward_is_causal(rng):
    # changing a later position never changes an earlier output
    qkv = rand_qkv(rng, 1, 100, 2, 16)
    out, _ = K.attention_forward(qkv, 2)
    qkv2 = qkv.copy()
    qkv2[:, 70:] = rng.standard_normal(qkv2[:, 70:].shape).astype(np.float32)
    out2, _ = K.attention_forward(qkv2, 2)
    assert np.array_equal(out[:, :70], out2[:, :70])
    assert not np.array_equal(out[:, 70:], out2[:, 70:])


def test_nan_query_stays_in_its_row(rng):
    qkv = rand_qkv(rng, 1, 40, 2, 8)
    qkv[0, 30, 3] = np.nan  # query of head 0 at position 30
    out, lse = K.attention_forward(qkv, 2)
    assert np.isnan(out[0, 30, :8]).all() and np.isnan(lse[0, 0, 30])
    assert np.isfinite(out[0, :30]).all() and np.isfinite(out[0, 31:]).all()


def test_empty_batch_or_time():
    for shape in [(0, 5, 12), (3, 0, 12)]:
        out, lse = K.attention_forward(np.zeros(shape, np.float32), 2)
        assert out.shape == shape[:2] + (4,) and lse.shape == (shape[0], 2, shape[1])
        g = K.attention_backward(np.zeros(shape[:2] + (4,), np.float32), np.zeros(shape, np.float32),
                                 out, lse, 2)
        assert g.shape == shape


# ---- backward --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_float64(simd, rng, shape):
    B, T, NH, hs = shape
    qkv = rand_qkv(rng, B, T, NH, hs)
    dout = rng.standard_normal((B, T, NH * hs)).astype(np.float32)
    out, lse = K.attention_forward(qkv, NH)
    g = K.attention_backward(dout, qkv, out, lse, NH)
    assert g.shape == qkv.shape and g.dtype == np.float32
    ref = ref_backward(dout, qkv, NH)
    assert_close(g, ref, rtol=2e-5, what=str(shape))


def test_backward_every_head_size(simd, rng):
    for hs in (1, 2, 3, 5, 8, 13, 16, 24, 31, 32, 40, 47, 48, 63, 64):
        qkv = rand_qkv(rng, 1, 70, 2, hs)
        dout = rng.standard_normal((1, 70, 2 * hs)).astype(np.float32)
        out, lse = K.attention_forward(qkv, 2)
        g = K.attention_backward(dout, qkv, out, lse, 2)
        assert_close(g, ref_backward(dout, qkv, 2), rtol=2e-5, what=f"hs={hs}")


def test_backward_accumulates(simd, rng):
    qkv = rand_qkv(rng, 2, 33, 3, 8)
    dout = rng.standard_normal((2, 33, 24)).astype(np.float32)
    out, lse = K.attention_forward(qkv, 3)
    base = rng.standard_normal(qkv.shape).astype(np.float32)
    g = base.copy()
    got = K.attention_backward(dout, qkv, out, lse, 3, dqkv=g)
    assert got is g
    assert_close(g, base + ref_backward(dout, qkv, 3), rtol=2e-5)


def test_backward_naive_matches_float64(rng):
    qkv = rand_qkv(rng, 2, 20, 2, 6)
    dout = rng.standard_normal((2, 20, 12)).astype(np.float32)
    out, lse = K.attention_forward_naive(qkv, 2)
    g = K.attention_backward_naive(dout, qkv, out, lse, 2)
    assert_close(g, ref_backward(dout, qkv, 2), rtol=1e-6)


def test_reference_gradient_matches_finite_differences(rng):
    # the float64 analytic gradient the kernels are held to, checked by central differences
    B, T, NH, hs = 1, 5, 2, 3
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    w = rng.standard_normal((B, T, NH * hs))
    grad = ref_backward(w, qkv, NH)
    num = np.zeros_like(qkv)
    eps = 1e-6
    for i in np.ndindex(qkv.shape):
        x = qkv.copy()
        x[i] += eps
        fp = (ref_forward(x, NH)[0] * w).sum()
        x[i] -= 2 * eps
        fm = (ref_forward(x, NH)[0] * w).sum()
        num[i] = (fp - fm) / (2 * eps)
    assert np.abs(num - grad).max() < 1e-7 * max(1.0, np.abs(grad).max())


def test_kernel_gradient_matches_finite_differences(simd, rng):
    # differences of the float32 kernel itself (loss summed in float64), on a small shape
    B, T, NH, hs = 2, 9, 2, 5
    qkv = rand_qkv(rng, B, T, NH, hs)
    w = rng.standard_normal((B, T, NH * hs)).astype(np.float32)
    out, lse = K.attention_forward(qkv, NH)
    g = K.attention_backward(w, qkv, out, lse, NH)
    eps = 1e-2
    idx = [tuple(int(rng.integers(0, n)) for n in qkv.shape) for _ in range(40)]
    for i in idx:
        x = qkv.copy()
        x[i] += eps
        fp = (K.attention_forward(x, NH)[0].astype(np.float64) * w).sum()
        x[i] -= 2 * eps
        fm = (K.attention_forward(x, NH)[0].astype(np.float64) * w).sum()
        num = (fp - fm) / (2 * eps)
        assert abs(num - g[i]) < 3e-3 * max(1.0, abs(num)), f"{i}: numeric {num} vs kernel {g[i]}"


# ---- KV cache and decode ---------------------------------------------------------------------

def keys_t(kc):
    """The key cache (B, NH, cap/64, hs, 64) as (B, NH, hs, cap): keys transposed, by position."""
    B, NH, nb, hs, blk = kc.shape
    return kc.transpose(0, 1, 3, 2, 4).reshape(B, NH, hs, nb * blk)


def test_kv_cache_layout(rng):
    B, T, NH, hs = 2, 70, 3, 5
    assert K.ATTENTION_BLOCK == 64
    qkv = rand_qkv(rng, B, T, NH, hs)
    kc, vc = K.kv_cache_new(B, NH, 75, hs)  # capacity rounds up to 128
    assert kc.shape == (B, NH, 2, hs, 64) and vc.shape == (B, NH, 128, hs)
    K.kv_cache_prefill(kc, vc, qkv, start=2)
    C = NH * hs
    k = qkv[:, :, C:2 * C].reshape(B, T, NH, hs)
    v = qkv[:, :, 2 * C:].reshape(B, T, NH, hs)
    kt = keys_t(kc)
    assert np.array_equal(kt[..., 2:2 + T], k.transpose(0, 2, 3, 1))
    assert np.array_equal(kc[1, 2, 1, 4, 3], k[1, 64 + 3 - 2, 2, 4])  # documented indexing
    assert np.array_equal(vc[:, :, 2:2 + T], v.transpose(0, 2, 1, 3))
    assert (kt[..., :2] == 0).all() and (kt[..., 2 + T:] == 0).all()
    assert (vc[:, :, :2] == 0).all() and (vc[:, :, 2 + T:] == 0).all()
    row = rand_qkv(rng, B, 1, NH, hs)[:, 0]
    K.kv_cache_append(kc, vc, row, np.array([0, 127]))
    kt = keys_t(kc)
    assert np.array_equal(kt[0, :, :, 0], row[0, C:2 * C].reshape(NH, hs))
    assert np.array_equal(kt[1, :, :, 127], row[1, C:2 * C].reshape(NH, hs))
    assert np.array_equal(vc[0, :, 0], row[0, 2 * C:].reshape(NH, hs))
    assert np.array_equal(vc[1, :, 127], row[1, 2 * C:].reshape(NH, hs))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 2, 5), (2, 17, 3, 64), (1, 65, 4, 48),
                                   (2, 257, 6, 16), (1, 130, 2, 80), (2, 64, 1, 7)])
def test_decode_equals_last_row_of_forward(simd, rng, shape):
    B, T, NH, hs = shape
    C = NH * hs
    qkv = rand_qkv(rng, B, T, NH, hs)
    out, _ = K.attention_forward(qkv, NH)
    kc, vc = K.kv_cache_new(B, NH, T + 5, hs)
    K.kv_cache_prefill(kc, vc, qkv)
    dec = K.attention_decode(np.ascontiguousarray(qkv[:, -1, :C]), kc, vc, T)
    assert dec.shape == (B, C)
    assert_close(dec, out[:, -1], rtol=5e-6, what=str(shape))
    ref = ref_forward(qkv, NH)[0][:, -1]
    assert_close(dec, ref, rtol=5e-6)
    # queries read straight from fused qkv rows give the same bits
    dec2 = K.attention_decode(np.ascontiguousarray(qkv[:, -1]), kc, vc, T)
    assert np.array_equal(dec, dec2)
    if simd == "generic":  # the reference loops do not depend on the SIMD level
        naive = K.attention_decode_naive(np.ascontiguousarray(qkv[:, -1, :C]), kc, vc, T)
        assert_close(naive, ref, rtol=1e-6)


def test_decode_per_sequence_lengths(simd, rng):
    B, T, NH, hs = 4, 150, 2, 24
    C = NH * hs
    qkv = rand_qkv(rng, B, T, NH, hs)
    # garbage (even NaN) past each sequence's length must never affect a result
    kc, vc = K.kv_cache_new(B, NH, T, hs)
    K.kv_cache_prefill(kc, vc, qkv)
    lengths = np.array([1, 64, 65, 150], np.int64)
    for b, L in enumerate(lengths):
        for t in range(L, kc.shape[2] * 64):
            kc[b, :, t // 64, :, t % 64] = np.nan
        vc[b, :, L:] = np.nan
    q = np.stack([qkv[b, L - 1, :C] for b, L in enumerate(lengths)])
    dec = K.attention_decode(q, kc, vc, lengths)
    for b, L in enumerate(lengths):
        ref = ref_forward(qkv[b:b + 1, :L], NH)[0][0, -1]
        assert_close(dec[b], ref, rtol=5e-6, what=f"b={b} L={L}")


def test_prefill_then_decode_equals_forward(simd, rng):
    B, T, T0, NH, hs = 2, 90, 20, 3, 16
    qkv = rand_qkv(rng, B, T, NH, hs)
    full, _ = K.attention_forward(qkv, NH)
    kc, vc = K.kv_cache_new(B, NH, T, hs)
    prompt_out, _ = K.attention_forward(np.ascontiguousarray(qkv[:, :T0]), NH)
    assert np.array_equal(prompt_out, full[:, :T0])
    K.kv_cache_prefill(kc, vc, np.ascontiguousarray(qkv[:, :T0]))
    for t in range(T0, T):
        row = np.ascontiguousarray(qkv[:, t])
        K.kv_cache_append(kc, vc, row, t)
        dec = K.attention_decode(row, kc, vc, t + 1)
        assert_close(dec, full[:, t], rtol=5e-6, what=f"t={t}")
    # the cache built token by token equals one prefill of everything, and a chunked prefill
    kc2, vc2 = K.kv_cache_new(B, NH, T, hs)
    K.kv_cache_prefill(kc2, vc2, qkv)
    assert np.array_equal(kc, kc2) and np.array_equal(vc, vc2)
    kc3, vc3 = K.kv_cache_new(B, NH, T, hs)
    K.kv_cache_prefill(kc3, vc3, np.ascontiguousarray(qkv[:, :33]))
    K.kv_cache_prefill(kc3, vc3, np.ascontiguousarray(qkv[:, 33:]), start=33)
    assert np.array_equal(kc3, kc2) and np.array_equal(vc3, vc2)


# ---- determinism -----------------------------------------------------------------------------

def test_bitwise_identical_across_thread_counts(simd, rng):
    # shapes big enough that a team is really opened
    qkv = rand_qkv(rng, 3, 200, 3, 32)
    dout = rng.standard_normal((3, 200, 96)).astype(np.float32)
    fw = [K.attention_forward(qkv, 3, threads=t) for t in (1, 2, 3, 4)]
    for o, l in fw[1:]:
        assert np.array_equal(o, fw[0][0]) and np.array_equal(l, fw[0][1])
    out, lse = fw[0]
    bw = [K.attention_backward(dout, qkv, out, lse, 3, threads=t) for t in (1, 2, 3, 4)]
    for g in bw[1:]:
        assert np.array_equal(g, bw[0])
    B, L, NH, hs = 5, 1500, 4, 32
    big = rand_qkv(rng, B, L, NH, hs)
    kcs = []
    for t in (1, 2, 4):
        kc, vc = K.kv_cache_new(B, NH, L, hs)
        K.kv_cache_prefill(kc, vc, big, threads=t)
        kcs.append((kc, vc))
    for kc, vc in kcs[1:]:
        assert np.array_equal(kc, kcs[0][0]) and np.array_equal(vc, kcs[0][1])
    kc, vc = kcs[0]
    q = np.ascontiguousarray(big[:, -1])
    lens = np.array([L, 1, 700, 64, 1001])
    dec = [K.attention_decode(q, kc, vc, lens, threads=t) for t in (1, 2, 3, 4)]
    for d in dec[1:]:
        assert np.array_equal(d, dec[0])


def test_concurrent_python_threads_bitwise_equal_serial(rng):
    qkvs = [rand_qkv(rng, 2, T, 2, hs) for T, hs in [(130, 32), (65, 48), (200, 16), (17, 64)]]
    douts = [rng.standard_normal(q.shape[:2] + (q.shape[2] // 3,)).astype(np.float32) for q in qkvs]
    caches = []
    for q in qkvs:
        kc, vc = K.kv_cache_new(q.shape[0], 2, q.shape[1], q.shape[2] // 6)
        K.kv_cache_prefill(kc, vc, q)
        caches.append((np.ascontiguousarray(q[:, -1]), kc, vc, q.shape[1]))
    serial = []
    for q, d, c in zip(qkvs, douts, caches):
        o, l = K.attention_forward(q, 2, threads=1)
        g = K.attention_backward(d, q, o, l, 2, threads=1)
        serial.append((o, l, g, K.attention_decode(*c, threads=1)))
    bad, errors = [], []

    def worker(w):
        try:
            for it in range(6):
                i = (w + it) % len(qkvs)
                nt = 1 + (w % 2)
                o, l = K.attention_forward(qkvs[i], 2, threads=nt)
                g = K.attention_backward(douts[i], qkvs[i], o, l, 2, threads=nt)
                dec = K.attention_decode(*caches[i], threads=nt)
                if not (np.array_equal(o, serial[i][0]) and np.array_equal(l, serial[i][1])
                        and np.array_equal(g, serial[i][2]) and np.array_equal(dec, serial[i][3])):
                    bad.append((w, it))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert not bad, f"{len(bad)} concurrent results differ from serial"


# ---- validation ------------------------------------------------------------------------------

def test_forward_validation():
    qkv = np.zeros((2, 5, 12), np.float32)
    with pytest.raises(TypeError, match="qkv must have dtype float32"):
        K.attention_forward(qkv.astype(np.float64), 2)
    with pytest.raises(TypeError, match="qkv must be a numpy.ndarray"):
        K.attention_forward(qkv.tolist(), 2)
    with pytest.raises(sm.ValidationError, match="qkv must be 3-D"):
        K.attention_forward(np.zeros((5, 12), np.float32), 2)
    with pytest.raises(sm.ValidationError, match="C-contiguous"):
        K.attention_forward(np.zeros((2, 12, 5), np.float32).transpose(0, 2, 1), 2)
    with pytest.raises(sm.ValidationError, match="3\\*C"):
        K.attention_forward(np.zeros((2, 5, 13), np.float32), 1)
    with pytest.raises(sm.ValidationError, match="3\\*C"):
        K.attention_forward(np.zeros((2, 5, 0), np.float32), 1)
    with pytest.raises(sm.ValidationError, match="n_head must divide C = 4"):
        K.attention_forward(qkv, 3)
    with pytest.raises(sm.ValidationError, match="n_head"):
        K.attention_forward(qkv, 0)
    with pytest.raises(TypeError, match="n_head"):
        K.attention_forward(qkv, 2.0)
    with pytest.raises(sm.ValidationError, match="out must have shape"):
        K.attention_forward(qkv, 2, out=np.zeros((2, 5, 5), np.float32))
    with pytest.raises(sm.ValidationError, match="lse must have shape"):
        K.attention_forward(qkv, 2, lse=np.zeros((2, 5, 2), np.float32))
    ro = np.zeros((2, 5, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(sm.ValidationError, match="out must be writeable"):
        K.attention_forward(qkv, 2, out=ro)
    big = np.zeros(2 * 5 * 12 + 40, np.float32)
    with pytest.raises(sm.ValidationError, match="lse must not overlap qkv"):
        K.attention_forward(big[:120].reshape(2, 5, 12), 2, lse=big[100:120].reshape(2, 2, 5))
    with pytest.raises(sm.ValidationError, match="threads"):
        K.attention_forward(qkv, 2, threads=0)


def test_backward_validation():
    qkv = np.zeros((2, 5, 12), np.float32)
    out, lse = K.attention_forward(qkv, 2)
    dout = np.zeros((2, 5, 4), np.float32)
    with pytest.raises(sm.ValidationError, match="dout must have shape"):
        K.attention_backward(np.zeros((2, 5, 3), np.float32), qkv, out, lse, 2)
    with pytest.raises(TypeError, match="dout must have dtype float32"):
        K.attention_backward(dout.astype(np.float16), qkv, out, lse, 2)
    with pytest.raises(sm.ValidationError, match="out must have shape"):
        K.attention_backward(dout, qkv, out[:, :4].copy(), lse, 2)
    with pytest.raises(sm.ValidationError, match="lse must have shape"):
        K.attention_backward(dout, qkv, out, lse[:, :1].copy(), 2)
    with pytest.raises(sm.ValidationError, match="lse must have shape"):
        K.attention_backward(dout, qkv, out, lse, 1)  # wrong head count shows in lse
    with pytest.raises(sm.ValidationError, match="dqkv must have shape"):
        K.attention_backward(dout, qkv, out, lse, 2, dqkv=np.zeros((2, 5, 4), np.float32))
    with pytest.raises(sm.ValidationError, match="dqkv must not overlap qkv"):
        K.attention_backward(dout, qkv, out, lse, 2, dqkv=qkv)
    with pytest.raises(sm.ValidationError, match="dqkv must be C-contiguous"):
        K.attention_backward(dout, qkv, out, lse, 2, dqkv=np.zeros((2, 12, 5), np.float32).transpose(0, 2, 1))


def test_cache_and_decode_validation():
    B, NH, hs, cap = 2, 2, 4, 64
    kc, vc = K.kv_cache_new(B, NH, 6, hs)
    assert vc.shape[2] == cap
    qkv = np.zeros((B, 3, 3 * NH * hs), np.float32)
    row = np.zeros((B, 3 * NH * hs), np.float32)
    q = np.zeros((B, NH * hs), np.float32)
    for bad in [dict(batch=-1), dict(n_head=0), dict(capacity=0), dict(head_size=0)]:
        args = dict(batch=1, n_head=1, capacity=1, head_size=1)
        args.update(bad)
        with pytest.raises(sm.ValidationError, match=next(iter(bad))):
            K.kv_cache_new(**args)
    with pytest.raises(sm.ValidationError, match="v_cache must have shape"):
        K.attention_decode(q, kc, vc[:, :, :63].copy(), 1)
    with pytest.raises(sm.ValidationError, match="k_cache must be 5-D"):
        K.attention_decode(q, kc[0], vc, 1)
    with pytest.raises(sm.ValidationError, match="k_cache must have shape"):
        K.attention_decode(q, np.zeros((B, NH, 0, hs, 64), np.float32), np.zeros((B, NH, 0, hs), np.float32), 1)
    with pytest.raises(sm.ValidationError, match="k_cache must have shape"):
        K.attention_decode(q, np.zeros((B, NH, 1, hs, 32), np.float32), np.zeros((B, NH, 32, hs), np.float32), 1)
    with pytest.raises(sm.ValidationError, match="k_cache must not overlap v_cache"):
        K.attention_decode(q, kc, kc.reshape(vc.shape), 1)
    with pytest.raises(sm.ValidationError, match="q must have shape"):
        K.attention_decode(np.zeros((B, 5), np.float32), kc, vc, 1)
    with pytest.raises(sm.ValidationError, match="lengths must be in \\[1, 64\\]"):
        K.attention_decode(q, kc, vc, 0)
    with pytest.raises(sm.ValidationError, match="lengths must be in \\[1, 64\\]"):
        K.attention_decode(q, kc, vc, 65)
    with pytest.raises(sm.ValidationError, match="lengths must be in \\[1, 64\\]"):
        K.attention_decode(q, kc, vc, np.array([3, 65]))
    with pytest.raises(sm.ValidationError, match="lengths must be an int or have shape \\(2,\\)"):
        K.attention_decode(q, kc, vc, np.array([3, 3, 3]))
    with pytest.raises(TypeError, match="lengths must be an int or an integer array"):
        K.attention_decode(q, kc, vc, np.array([3.0, 3.0]))
    with pytest.raises(TypeError, match="lengths"):
        K.attention_decode(q, kc, vc, True)
    with pytest.raises(sm.ValidationError, match="out must have shape"):
        K.attention_decode(q, kc, vc, 2, out=np.zeros((B, 3), np.float32))
    with pytest.raises(sm.ValidationError, match="out must not overlap q"):
        K.attention_decode(q, kc, vc, 2, out=q)
    with pytest.raises(sm.ValidationError, match="qkv must have shape"):
        K.kv_cache_prefill(kc, vc, np.zeros((B, 3, 3 * NH * hs + 3), np.float32))
    with pytest.raises(sm.ValidationError, match="qkv must have shape"):
        K.kv_cache_prefill(kc, vc, np.zeros((B + 1, 3, 3 * NH * hs), np.float32))
    with pytest.raises(sm.ValidationError, match="capacity"):
        K.kv_cache_prefill(kc, vc, np.zeros((B, cap + 1, 3 * NH * hs), np.float32))
    with pytest.raises(sm.ValidationError, match="start must be in \\[0, 61\\]"):
        K.kv_cache_prefill(kc, vc, qkv, start=62)
    with pytest.raises(sm.ValidationError, match="start"):
        K.kv_cache_prefill(kc, vc, qkv, start=-1)
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(sm.ValidationError, match="k_cache must be writeable"):
        K.kv_cache_prefill(ro, vc, qkv)
    with pytest.raises(sm.ValidationError, match="qkv_row must have shape"):
        K.kv_cache_append(kc, vc, row[:, :5].copy(), 0)
    with pytest.raises(sm.ValidationError, match="positions must be in \\[0, 63\\]"):
        K.kv_cache_append(kc, vc, row, 64)
    with pytest.raises(sm.ValidationError, match="positions must be in \\[0, 63\\]"):
        K.kv_cache_append(kc, vc, row, np.array([0, -1]))
    with pytest.raises(TypeError, match="positions"):
        K.kv_cache_append(kc, vc, row, 1.0)
    # nothing above wrote into the cache
    assert (kc == 0).all() and (vc == 0).all()


# ---- attention dropout -----------------------------------------------------------------------

def _masked_reference(qkv, nh, mask):
    """float64 out of causal attention whose probabilities are multiplied by `mask`."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // nh
    x = qkv.astype(np.float64)
    q, k, v = (x[..., i * C:(i + 1) * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return ((p * mask) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)


@pytest.mark.parametrize("shape", [(2, 70, 32, 2), (1, 130, 24, 3), (3, 5, 16, 1)])
def test_dropout_forward_backward_match_naive_and_mask(simd, rng, shape):
    B, T, C, NH = shape          # hs = 16, 8 (padded rows), 16
    K = sm.kernels
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    kw = dict(dropout=0.25, seed=11, stream=3, batch_offset=2)
    out, lse = K.attention_forward(qkv, NH, **kw)
    out_n, lse_n = K.attention_forward_naive(qkv, NH, **kw)
    assert_close(out, out_n, rtol=1e-5)
    mask = K.attention_dropout_mask(B, NH, T, 0.25, 11, 3, 2).astype(np.float64)
    kept = mask[np.broadcast_to(np.tril(np.ones((T, T), bool)), mask.shape)]
    assert set(np.unique(kept)) <= {0.0, np.float32(1 / 0.75)}
    assert_close(out, _masked_reference(qkv, NH, mask), rtol=1e-4)
    # lse is that of the undropped probabilities
    assert_close(lse, K.attention_forward(qkv, NH)[1], rtol=1e-6)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    g = K.attention_backward(dout, qkv, out, lse, NH, **kw)
    g_n = K.attention_backward_naive(dout, qkv, out, lse, NH, **kw)
    assert_close(g, g_n, rtol=1e-4)
    # the backward must use the forward's mask: another seed gives another gradient
    g_other = K.attention_backward(dout, qkv, out, lse, NH, **dict(kw, seed=12))
    assert np.abs(g_other - g_n).max() > 1e-2 * np.abs(g_n).max()


def test_dropout_naive_gradient_matches_finite_differences(rng):
    K = sm.kernels
    B, T, C, NH = 1, 9, 8, 2
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C))
    mask = K.attention_dropout_mask(B, NH, T, 0.4, 3).astype(np.float64)
    out, lse = K.attention_forward(qkv, NH, dropout=0.4, seed=3)
    g = K.attention_backward(dout.astype(np.float32), qkv, out, lse, NH, dropout=0.4, seed=3)
    x0 = qkv.astype(np.float64)
    for idx in [(0, 0, 1), (0, 4, 9), (0, 8, 17), (0, 6, 20), (0, 3, 5)]:
        e = 1e-5
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += e
        xm[idx] -= e
        num = ((_masked_reference(xp, NH, mask) - _masked_reference(xm, NH, mask)) * dout).sum() / (2 * e)
        assert abs(num - g[idx]) <= 1e-3 * max(1.0, abs(num)), (idx, num, g[idx])


def test_dropout_zero_is_plain_and_mask_is_chunk_and_thread_independent(rng):
    K = sm.kernels
    B, T, C, NH = 4, 66, 32, 2
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    plain = K.attention_forward(qkv, NH)
    zero = K.attention_forward(qkv, NH, dropout=0.0, seed=5)
    assert np.array_equal(plain[0], zero[0]) and np.array_equal(plain[1], zero[1])
    kw = dict(dropout=0.5, seed=8)
    whole = K.attention_forward(qkv, NH, **kw)[0]
    first = K.attention_forward(qkv[:1], NH, **kw)[0]
    rest = K.attention_forward(np.ascontiguousarray(qkv[1:]), NH, batch_offset=1, **kw)[0]
    assert np.array_equal(np.concatenate([first, rest]), whole)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    out, lse = K.attention_forward(qkv, NH, **kw)
    grads = [K.attention_backward(dout, qkv, out, lse, NH, threads=t, **kw) for t in (1, 2, 3)]
    assert all(np.array_equal(grads[0], g) for g in grads[1:])
    outs = [K.attention_forward(qkv, NH, threads=t, **kw)[0] for t in (1, 2, 3)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_dropout_argument_validation(rng):
    K = sm.kernels
    qkv = rng.standard_normal((1, 4, 12)).astype(np.float32)
    with pytest.raises(sm.ValidationError, match="dropout"):
        K.attention_forward(qkv, 2, dropout=1.0)
    with pytest.raises(sm.ValidationError, match="dropout"):
        K.attention_forward(qkv, 2, dropout=-0.1)
    with pytest.raises(sm.ValidationError, match="seed"):
        K.attention_forward(qkv, 2, dropout=0.1, seed=-1)
    with pytest.raises(TypeError, match="stream"):
        K.attention_backward(np.zeros((1, 4, 4), np.float32), qkv, *K.attention_forward(qkv, 2), 2,
                             dropout=0.1, stream=1.5)
