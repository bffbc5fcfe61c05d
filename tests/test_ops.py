"""test_ops.py - the sm_ops kernels (embedding, layernorm, GELU, softmax, cross-entropy,
residual, bias, AdamW, gradient clipping): float64 numpy references over random and odd shapes
at every SIMD level, finite-difference checks of every backward (in float64, on a numpy version
of the math, whose analytic gradient the C backward is then compared with), 1/2/4 threads and
8 concurrent Python threads bitwise equal to serial, and every bad-input path."""
import threading

import numpy as np
import pytest
from conftest import SIMD_LEVELS, assert_close

import smallmind as sm

k = sm.kernels
F32 = np.float32

GELU_K = np.sqrt(2.0 / np.pi)


# ---- float64 references ------------------------------------------------------------------------

def ln_ref(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    rs = 1.0 / np.sqrt(v + eps)
    return (x - m) * rs * w + b, m[..., 0], rs[..., 0]


def ln_bwd_ref(dout, x, w, eps=1e-5):
    """Analytic layernorm gradients (float64): dx, dw, db."""
    dout = dout.astype(np.float64)
    _, m, rs = ln_ref(x, w, np.zeros_like(w), eps)
    xh = (x - m[..., None]) * rs[..., None]
    dn = dout * w
    dx = (dn - dn.mean(-1, keepdims=True) - xh * (dn * xh).mean(-1, keepdims=True)) * rs[..., None]
    C = x.shape[-1]
    return dx, (dout * xh).reshape(-1, C).sum(0), dout.reshape(-1, C).sum(0)


def _gelu_parts(x):
    """x and s = 0.5 (1 + tanh(u)) written as 1 / (1 + exp(-2u)): the same function, without
    the cancellation 1 + tanh(u) suffers in float64 for x << 0 (which would make the reference,
    not the kernel, wrong there)."""
    x = x.astype(np.float64)
    u = GELU_K * (x + 0.044715 * x ** 3)
    with np.errstate(over="ignore"):
        e = np.exp(-2 * u)
    return x, u, e, 1.0 / (1.0 + e)


def gelu_ref(x):
    x, _, _, s = _gelu_parts(x)
    return x * s


def gelu_grad_ref(x):
    # d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u', 0.5 (1 - tanh^2) = 2 s (1 - s)
    x, _, e, s = _gelu_parts(x)
    with np.errstate(invalid="ignore"):
        one_minus_s = np.where(np.isinf(e), 1.0, e * s)
    return s + x * 2 * s * one_minus_s * GELU_K * (1 + 3 * 0.044715 * x ** 2)


def test_gelu_reference_is_the_tanh_formula(rng):
    x = rng.standard_normal(1000) * 3
    th = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    np.testing.assert_allclose(gelu_ref(x), 0.5 * x * (1 + th), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gelu_grad_ref(x), 0.5 * (1 + th) + 0.5 * x * (1 - th ** 2) * GELU_K
                               * (1 + 3 * 0.044715 * x ** 2), rtol=1e-9, atol=1e-12)


def softmax_ref(x, temperature=1.0):
    z = x.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def lse_ref(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def ce_ref(logits, targets):
    lse = lse_ref(logits)
    t = np.where(targets < 0, 0, targets)
    picked = np.take_along_axis(logits.astype(np.float64), t[..., None], -1)[..., 0]
    return np.where(targets < 0, 0.0, lse - picked)


def ce_grad_ref(logits, targets, dloss):
    g = softmax_ref(logits)
    V = logits.shape[-1]
    onehot = (np.arange(V) == targets[..., None]).astype(np.float64)
    g = (g - onehot) * np.asarray(dloss, np.float64)[..., None]
    return np.where((targets < 0)[..., None], 0.0, g)


def adamw_ref(p, g, m, v, lr, b1, b2, eps, wd, t):
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p - lr * (upd + wd * p), m, v


def fd_grad(f, x, h=1e-6):
    """Central differences of a scalar float64 function at every entry of x."""
    g = np.zeros_like(x)
    for i in range(x.size):
        xp = x.copy()
        xm = x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        g.flat[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


ODD = [(1, 1), (1, 3), (3, 17), (2, 65), (5, 257), (70, 33), (4, 768)]


# ---- finite differences of the float64 math --------------------------------------------------------

def test_fd_layernorm_reference(rng):
    x = rng.standard_normal((3, 7))
    w = rng.standard_normal(7)
    b = rng.standard_normal(7)
    R = rng.standard_normal((3, 7))
    dx, dw, db = ln_bwd_ref(R, x, w)
    np.testing.assert_allclose(fd_grad(lambda z: (ln_ref(z, w, b)[0] * R).sum(), x), dx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fd_grad(lambda z: (ln_ref(x, z, b)[0] * R).sum(), w), dw, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fd_grad(lambda z: (ln_ref(x, w, z)[0] * R).sum(), b), db, rtol=1e-6, atol=1e-8)


def test_fd_gelu_reference(rng):
    x = np.concatenate([rng.standard_normal(20) * 3, [0.0, -6.0, 6.0]])
    R = rng.standard_normal(x.size)
    g = fd_grad(lambda z: (gelu_ref(z) * R).sum(), x)
    np.testing.assert_allclose(g, gelu_grad_ref(x) * R, rtol=1e-6, atol=1e-8)


def test_fd_cross_entropy_reference(rng):
    logits = rng.standard_normal((4, 9)) * 2
    targets = np.array([3, -1, 0, 8])
    dloss = rng.standard_normal(4)
    g = fd_grad(lambda z: (ce_ref(z, targets) * dloss).sum(), logits)
    np.testing.assert_allclose(g, ce_grad_ref(logits, targets, dloss), rtol=1e-6, atol=1e-8)


def test_fd_encoder_residual_bias_reference(rng):
    # linear maps: the gradient of sum(out * R) w.r.t. an input is the adjoint applied to R
    V, P, C, B, T = 5, 6, 4, 2, 3
    idx = rng.integers(0, V, (B, T))
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((P, C))
    R = rng.standard_normal((B, T, C))
    dwte = np.zeros((V, C))
    np.add.at(dwte, idx, R)
    dwpe = np.zeros((P, C))
    dwpe[:T] = R.sum(0)
    np.testing.assert_allclose(fd_grad(lambda z: ((z[idx] + wpe[:T]) * R).sum(), wte), dwte, atol=1e-8)
    np.testing.assert_allclose(fd_grad(lambda z: ((wte[idx] + z[:T]) * R).sum(), wpe), dwpe, atol=1e-8)
    bias = rng.standard_normal(C)
    np.testing.assert_allclose(fd_grad(lambda z: ((R + z) * R).sum(), bias), R.reshape(-1, C).sum(0), atol=1e-7)
    a = rng.standard_normal((B, T, C))
    np.testing.assert_allclose(fd_grad(lambda z: ((z + a) * R).sum(), a), R, atol=1e-7)


# ---- forward and backward against float64, every SIMD level -----------------------------------------

@pytest.mark.parametrize("B,T,C,V", [(1, 1, 1, 1), (2, 3, 17, 5), (3, 7, 65, 257), (1, 33, 768, 65)])
def test_encoder(simd, rng, B, T, C, V):
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = rand(rng, V, C), rand(rng, T + 2, C)
    out = k.encoder_forward(idx, wte, wpe)
    assert np.array_equal(out, wte[idx] + wpe[:T])  # one float32 add: exact
    assert np.array_equal(k.encoder_forward(idx[0], wte, wpe), out[0])  # (T,) ids
    dout = rand(rng, B, T, C)
    dwte, dwpe = rand(rng, V, C), rand(rng, T + 2, C)
    dwte0, dwpe0 = dwte.copy(), dwpe.copy()
    k.encoder_backward(dwte, dwpe, dout, idx)
    ref_te = dwte0.astype(np.float64)
    np.add.at(ref_te, idx, dout.astype(np.float64))
    ref_pe = dwpe0.astype(np.float64)
    ref_pe[:T] += dout.astype(np.float64).sum(0)
    assert_close(dwte, ref_te, rtol=1e-6)
    assert_close(dwpe, ref_pe, rtol=1e-6)
    # same accumulation order as the naive loop: identical bits
    nte, npe = dwte0.copy(), dwpe0.copy()
    k.encoder_backward_naive(nte, npe, dout, idx)
    assert np.array_equal(nte, dwte) and np.array_equal(npe, dwpe)


@pytest.mark.parametrize("shape", ODD + [(2, 3, 48)])
def test_layernorm(simd, rng, shape):
    C = shape[-1]
    x = rand(rng, *shape, scale=2.0) + F32(0.5)
    w, b = rand(rng, C), rand(rng, C)
    out, mean, rstd = k.layernorm_forward(x, w, b)
    ref, rm, rr = ln_ref(x, w, b)
    assert out.shape == x.shape and mean.shape == shape[:-1] and rstd.shape == shape[:-1]
    assert_close(out, ref, rtol=2e-6)
    assert_close(mean, rm, atol=1e-6 * np.abs(x).max())
    assert_close(rstd, rr, rtol=1e-6)
    dout = rand(rng, *shape)
    dx, dw, db = rand(rng, *shape), rand(rng, C), rand(rng, C)
    d0 = (dx.copy(), dw.copy(), db.copy())
    k.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)
    rdx, rdw, rdb = ln_bwd_ref(dout, x, w)
    assert_close(dx - d0[0], rdx, rtol=1e-5, what="dx")
    assert_close(dw - d0[1].astype(np.float64), rdw, rtol=1e-5, what="dweight")
    assert_close(db - d0[2].astype(np.float64), rdb, rtol=1e-5, what="dbias")


def test_layernorm_naive_twins(rng):
    x, w, b = rand(rng, 9, 31), rand(rng, 31), rand(rng, 31)
    out, mean, rstd = k.layernorm_forward_naive(x, w, b, eps=1e-3)
    ref, rm, rr = ln_ref(x, w, b, 1e-3)
    assert_close(out, ref, rtol=1e-6)
    assert_close(rstd, rr, rtol=1e-6)
    dout = rand(rng, 9, 31)
    dx, dw, db = np.zeros_like(x), np.zeros(31, F32), np.zeros(31, F32)
    k.layernorm_backward_naive(dx, dw, db, dout, x, w, mean, rstd)
    rdx, rdw, rdb = ln_bwd_ref(dout, x, w, 1e-3)
    assert_close(dx, rdx, rtol=1e-6)
    assert_close(dw, rdw, rtol=1e-6)
    assert_close(db, rdb, rtol=1e-6)


def test_layernorm_constant_rows_and_out_buffers(rng):
    x = np.full((3, 40), 2.5, F32)
    w, b = rand(rng, 40), rand(rng, 40)
    out, mean, rstd = np.empty_like(x), np.empty(3, F32), np.empty(3, F32)
    res = k.layernorm_forward(x, w, b, out=out, mean=mean, rstd=rstd, eps=1e-5)
    assert res[0] is out and res[1] is mean and res[2] is rstd
    assert np.array_equal(out, np.broadcast_to(b, x.shape))  # (x - mean) == 0 exactly
    assert_close(rstd, np.full(3, 1 / np.sqrt(1e-5)), rtol=1e-6)


def test_gelu(simd, rng):
    x = np.concatenate([rand(rng, 3001, scale=3.0), np.array([0, -0.0, 1e-30, -1e-30, 5, -5, 10, -10, 20,
                                                             -20, 100, -100, 1e4, -1e4], F32)])
    y = k.gelu_forward(x)
    ref = gelu_ref(x)
    # far in the negative tail the float32 rounding of u, amplified by exp, dominates (|gelu| < 1e-12)
    np.testing.assert_allclose(y, ref, rtol=3e-6, atol=1e-12)
    assert_close(k.gelu_forward_naive(x), ref, rtol=1e-7)
    dout = rand(rng, x.size)
    dx0 = rand(rng, x.size)
    dx = dx0.copy()
    k.gelu_backward(dx, x, dout)
    gref = gelu_grad_ref(x) * dout
    np.testing.assert_allclose(dx - dx0.astype(np.float64), gref, rtol=1e-5, atol=2e-7)
    dn = dx0.copy()
    k.gelu_backward_naive(dn, x, dout)
    np.testing.assert_allclose(dn - dx0.astype(np.float64), gref, rtol=1e-6, atol=2e-7)


@pytest.mark.parametrize("shape", [(1,), (3,), (17,), (4, 65), (3, 2, 257)])
def test_gelu_shapes_and_out(simd, rng, shape):
    x = rand(rng, *shape)
    out = np.empty_like(x)
    assert k.gelu_forward(x, out=out) is out
    assert_close(out, gelu_ref(x), rtol=3e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 65), (5, 1000), (2, 3, 257)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_softmax(simd, rng, shape, temperature):
    x = rand(rng, *shape, scale=3.0)
    p = k.softmax(x, temperature=temperature)
    ref = softmax_ref(x, temperature)
    assert_close(p, ref, rtol=3e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=2e-6)
    assert_close(k.softmax_naive(x, temperature), ref, rtol=1e-6)


def test_softmax_masked_and_tiny_temperature(simd):
    x = np.array([[0.0, -np.inf, 1.0, -np.inf, -1000.0, 2.0]], F32)
    p = k.softmax(x)
    assert p[0, 1] == 0 and p[0, 3] == 0 and p[0, 4] == 0
    assert_close(p, softmax_ref(np.where(np.isinf(x), -1e30, x)), rtol=3e-6)
    q = k.softmax(np.array([[1.0, 3.0, 2.0]], F32), temperature=1e-30)
    assert np.array_equal(q, [[0.0, 1.0, 0.0]])


@pytest.mark.parametrize("N,V", [(1, 1), (3, 2), (5, 17), (64, 65), (7, 1000), (2, 50257)])
def test_cross_entropy(simd, rng, N, V):
    logits = rand(rng, N, V, scale=2.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    if N > 2:
        targets[1] = -1
    lse = np.empty(N, F32)
    losses = k.cross_entropy_forward(logits, targets, lse=lse)
    assert_close(losses, ce_ref(logits, targets), atol=2e-6 * np.log(V) + 2e-6)
    assert_close(lse, lse_ref(logits), rtol=1e-6)
    if N > 2:
        assert losses[1] == 0
    assert_close(k.cross_entropy_forward_naive(logits, targets), ce_ref(logits, targets), rtol=1e-6)
    dloss = rand(rng, N)
    g0 = rand(rng, N, V)
    ref = ce_grad_ref(logits, targets, dloss)
    for use_lse in (None, lse):
        g = g0.copy()
        k.cross_entropy_backward(g, logits, targets, dloss, lse=use_lse)
        assert_close(g - g0.astype(np.float64), ref, atol=2e-6 * np.abs(dloss).max())
    gn = g0.copy()
    k.cross_entropy_backward_naive(gn, logits, targets, dloss)
    assert_close(gn - g0.astype(np.float64), ref, atol=1e-6 * np.abs(dloss).max())
    # fused: the same bits as forward then backward
    g_sep = g0.copy()
    k.cross_entropy_backward(g_sep, logits, targets, dloss)
    g_fused = g0.copy()
    l_fused = k.cross_entropy_forward_backward(g_fused, logits, targets, dloss)
    assert np.array_equal(g_fused, g_sep) and np.array_equal(l_fused, losses)


def test_cross_entropy_scalar_dloss_leading_shape_and_nan(rng):
    logits = rand(rng, 2, 3, 11)
    targets = rng.integers(0, 11, (2, 3)).astype(np.int32)
    targets[0, 2] = -1
    losses = k.cross_entropy_forward(logits, targets)
    assert losses.shape == (2, 3)
    g = np.zeros_like(logits)
    k.cross_entropy_backward(g, logits, targets, 0.25)
    assert_close(g, ce_grad_ref(logits, targets, np.full((2, 3), 0.25)), atol=1e-6)
    assert not g[0, 2].any()
    out = np.empty((2, 3), F32)
    assert k.cross_entropy_forward_backward(np.zeros_like(logits), logits, targets, 0.25, out=out) is out
    bad = logits.copy()
    bad[1, 1, 4] = np.nan
    assert np.isnan(k.cross_entropy_forward(bad, targets)[1, 1])  # divergence is visible


def test_cross_entropy_masked_leading_chunk(simd, rng):
    # a long row whose first few thousand logits are -inf (masked) must not give NaN
    logits = rand(rng, 2, 5000)
    logits[:, :3000] = -np.inf
    targets = np.array([4000, 4999], np.int32)
    ref = ce_ref(logits[:, 3000:], targets - 3000)
    assert_close(k.cross_entropy_forward(logits, targets), ref, atol=2e-5)
    g = np.zeros_like(logits)
    k.cross_entropy_backward(g, logits, targets, 1.0)
    assert (g[:, :3000] == 0).all()
    assert_close(g[:, 3000:], ce_grad_ref(logits[:, 3000:], targets - 3000, np.ones(2)), atol=1e-6)


def test_residual_and_bias(simd, rng):
    for shape in [(1,), (3, 17), (5, 65), (2, 3, 257)]:
        a, b = rand(rng, *shape), rand(rng, *shape)
        assert np.array_equal(k.residual_forward(a, b), a + b)
        assert np.array_equal(k.residual_forward_naive(a, b), a + b)
        da, db, dout = rand(rng, *shape), rand(rng, *shape), rand(rng, *shape)
        ea, eb = da + dout, db + dout
        k.residual_backward(da, db, dout)
        assert np.array_equal(da, ea) and np.array_equal(db, eb)
        C = shape[-1]
        bias = rand(rng, C)
        o = a.copy()
        assert k.bias_add(o, bias) is o
        assert np.array_equal(o, a + bias)
        dbias0 = rand(rng, C)
        for fn in (k.bias_backward, k.bias_backward_naive):
            dbias = dbias0.copy()
            fn(dbias, dout)
            assert_close(dbias, dbias0.astype(np.float64) + dout.astype(np.float64).reshape(-1, C).sum(0),
                         rtol=1e-6)


def _with_poison(a, rng):
    """A copy of a with NaN, +-inf, -0 and a denormal at random places (where it is big enough)."""
    a = a.copy()
    flat = a.reshape(-1)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-40], F32)
    n = min(special.size, flat.size // 4)
    flat[rng.choice(flat.size, n, replace=False)] = special[:n]
    return a


def test_single_rounding_kernels_same_bits_on_every_level():
    # These kernels round each element once (an add, or a multiply by one scalar), so every SIMD
    # level must give exactly the bits of the generic path, tails and NaN / inf included. (Their
    # vector loops are one plain C loop compiled per level: SM_EACH_LEVEL in sm_runtime.h.)
    def run():
        rng = np.random.default_rng(7)
        out = []
        for n in (1, 7, 15, 16, 17, 63, 65, 1000, 4099):
            a, b = _with_poison(rand(rng, n), rng), rand(rng, n)
            out.append(k.residual_forward(a, b))
            da, db = rand(rng, n), rand(rng, n)
            k.residual_backward(da, db, a)
            out += [da, db]
        for N, C in ((1, 1), (3, 17), (5, 65), (130, 33), (70, 400)):
            x, bias = _with_poison(rand(rng, N, C), rng), rand(rng, C)
            k.bias_add(x, bias)
            dbias = rand(rng, C)
            k.bias_backward(dbias, x)  # row blocks summed by the vector add, then in double
            out += [x, dbias]
            # a uniform row: exp(0) = 1 on every path, so this checks the scaling pass alone
            out.append(k.softmax(np.zeros((N, C), F32)))
        for B, T, C, V in ((1, 1, 1, 1), (2, 3, 17, 5), (3, 7, 65, 257)):
            idx = rng.integers(0, V, (B, T)).astype(np.int32)
            wte, wpe = rand(rng, V, C), rand(rng, T, C)
            out.append(k.encoder_forward(idx, wte, wpe))
            k.encoder_backward(wte, wpe, _with_poison(rand(rng, B, T, C), rng), idx)
            out += [wte, wpe]
        return out

    results = {}
    try:
        for level in SIMD_LEVELS:
            assert sm.set_simd_level(level) == level
            results[level] = run()
    finally:
        sm.set_simd_level(None)
    ref = results["generic"]
    for level, got in results.items():
        for i, (x, y) in enumerate(zip(got, ref)):
            assert x.tobytes() == y.tobytes(), f"output {i} differs between {level} and generic"


def test_bias_backward_many_rows(simd, rng):
    dout = rand(rng, 1000, 37)  # several row blocks, a partial last one
    dbias = np.zeros(37, F32)
    k.bias_backward(dbias, dout)
    assert_close(dbias, dout.astype(np.float64).sum(0), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 16, 1001])
def test_adamw(simd, rng, n):
    p, g, m = rand(rng, n), rand(rng, n), rand(rng, n, scale=0.1)
    v = np.abs(rand(rng, n, scale=0.01))
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    for t in (1, 2, 3):
        k.adamw_step(p, g, m, v, step=t, **hp)
        rp, rm, rv = adamw_ref(rp, g, rm, rv, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                               hp["weight_decay"], t)
    assert_close(m, rm, rtol=1e-6)
    assert_close(v, rv, rtol=1e-6)
    assert_close(p, rp, rtol=2e-6)
    # the naive twin, and weight decay off leaves a zero-gradient, zero-moment entry alone
    q, qm, qv = p.copy(), m.copy(), v.copy()
    k.adamw_step_naive(q, g, qm, qv, step=4, **hp)
    rq = adamw_ref(p, g, m, v, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], 4)
    assert_close(q, rq[0], rtol=1e-6)
    z = np.ones(n, F32)
    k.adamw_step(z, np.zeros(n, F32), np.zeros(n, F32), np.zeros(n, F32), lr=0.1)
    assert (z == 1).all()
    k.adamw_step(z, np.zeros(n, F32), np.zeros(n, F32), np.zeros(n, F32), lr=0.1, weight_decay=0.5)
    assert_close(z, np.full(n, 0.95), rtol=1e-7)


def test_adamw_first_step_is_sign_like(rng):
    # with m = v = 0 the first bias-corrected update is lr * g / (|g| + eps)
    g = rand(rng, 100)
    p = np.zeros(100, F32)
    k.adamw_step(p, g, np.zeros(100, F32), np.zeros(100, F32), lr=0.5, eps=1e-12)
    assert_close(p, -0.5 * np.sign(g), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 5, 16384, 16385, 50000])
def test_grad_norm_and_clip(simd, rng, n):
    g = rand(rng, n)
    ref = np.sqrt((g.astype(np.float64) ** 2).sum())
    assert abs(k.grad_norm(g) - ref) <= 1e-12 * ref
    big = g.copy()
    norm = k.clip_grad_norm(big, max_norm=0.5 * ref)
    assert abs(norm - ref) <= 1e-12 * ref
    assert_close(big, g * (0.5 * ref / (ref + 1e-6)), rtol=1e-6)
    assert abs(np.linalg.norm(big.astype(np.float64)) - 0.5 * ref) <= 1e-5 * ref
    small = g.copy()
    assert abs(k.clip_grad_norm(small, max_norm=2 * ref) - ref) <= 1e-12 * ref
    assert np.array_equal(small, g)  # under the limit: untouched
    nv = g.copy()
    assert abs(k.clip_grad_norm_naive(nv, 0.5 * ref) - ref) <= 1e-12 * ref
    assert_close(nv, big, rtol=1e-6)


def test_clip_nonfinite_norm_leaves_grad(rng):
    g = rand(rng, 100)
    g[3] = np.inf
    h = g.copy()
    assert k.clip_grad_norm(h, 1.0) == np.inf
    assert np.array_equal(h, g)
    g[3] = np.nan
    h = g.copy()
    assert np.isnan(k.clip_grad_norm(h, 1.0))
    assert np.array_equal(h, g, equal_nan=True)


def test_empty_inputs():
    e = np.zeros((0, 5), F32)
    assert k.gelu_forward(np.zeros(0, F32)).shape == (0,)
    assert k.layernorm_forward(e, np.ones(5, F32), np.zeros(5, F32))[0].shape == (0, 5)
    assert k.softmax(e).shape == (0, 5)
    assert k.cross_entropy_forward(e, np.zeros(0, np.int32)).shape == (0,)
    assert k.grad_norm(np.zeros(0, F32)) == 0.0
    assert k.encoder_forward(np.zeros((2, 0), np.int32), np.ones((3, 4), F32), np.ones((5, 4), F32)).shape == (2, 0, 4)
    db = np.ones(5, F32)
    k.bias_backward(db, e)
    assert (db == 1).all()


# ---- determinism: thread counts and concurrent callers ---------------------------------------------

def _cases(rng):
    """(name, fn(threads) -> tuple of arrays/floats) over shapes big enough for several threads."""
    N, C = 300, 257  # 5 row blocks, the last partial; C not a multiple of 16
    x, w, b, dout = rand(rng, N, C), rand(rng, C), rand(rng, C), rand(rng, N, C)
    out, mean, rstd = k.layernorm_forward(x, w, b, threads=1)
    idx = rng.integers(0, 7, (4, 250)).astype(np.int32)  # few distinct ids: many collisions
    wte, wpe, edout = rand(rng, 7, 100), rand(rng, 250, 100), rand(rng, 4, 250, 100)
    g = rand(rng, 50000)
    logits = rand(rng, 50, 2000)
    targets = rng.integers(-1, 2000, 50).astype(np.int32)
    dl = rand(rng, 50)
    big = rand(rng, 100000)
    bdout = rand(rng, 700, 200)
    pa = rand(rng, 40000)

    def ln_bwd(t):
        dx, dw, db = np.zeros_like(x), np.zeros(C, F32), np.zeros(C, F32)
        k.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, threads=t)
        return dx, dw, db

    def enc_bwd(t):
        dte, dpe = np.zeros((7, 100), F32), np.zeros((250, 100), F32)
        k.encoder_backward(dte, dpe, edout, idx, threads=t)
        return dte, dpe

    def gelu_bwd(t):
        d = np.zeros_like(g)
        k.gelu_backward(d, g, g, threads=t)
        return (d,)

    def ce_bwd(t):
        d = np.zeros_like(logits)
        losses = k.cross_entropy_forward_backward(d, logits, targets, dl, threads=t)
        return d, losses

    def res_bwd(t):
        da, db_ = np.zeros_like(big), np.ones_like(big)
        k.residual_backward(da, db_, big, threads=t)
        return da, db_

    def bias_bwd(t):
        d = np.zeros(200, F32)
        k.bias_backward(d, bdout, threads=t)
        return (d,)

    def adamw(t):
        p, m, v = pa.copy(), pa * F32(0.1), np.abs(pa)
        k.adamw_step(p, pa, m, v, lr=1e-3, weight_decay=0.1, step=3, threads=t)
        return p, m, v

    def clip(t):
        h = big.copy()
        return h, k.clip_grad_norm(h, 1.0, threads=t)

    return [
        ("layernorm_forward", lambda t: k.layernorm_forward(x, w, b, threads=t)),
        ("layernorm_backward", ln_bwd),
        ("encoder_forward", lambda t: (k.encoder_forward(idx, wte, wpe, threads=t),)),
        ("encoder_backward", enc_bwd),
        ("gelu_forward", lambda t: (k.gelu_forward(g, threads=t),)),
        ("gelu_backward", gelu_bwd),
        ("softmax", lambda t: (k.softmax(logits, 0.8, threads=t),)),
        ("cross_entropy_forward", lambda t: (k.cross_entropy_forward(logits, targets, threads=t),)),
        ("cross_entropy_forward_backward", ce_bwd),
        ("residual_forward", lambda t: (k.residual_forward(big, big, threads=t),)),
        ("residual_backward", res_bwd),
        ("bias_add", lambda t: (k.bias_add(bdout.copy(), bdout[0], threads=t),)),
        ("bias_backward", bias_bwd),
        ("adamw_step", adamw),
        ("grad_norm", lambda t: (k.grad_norm(big, threads=t),)),
        ("clip_grad_norm", clip),
    ]


@pytest.mark.parametrize("shift", [0, 1, 4, 15])
def test_encoder_backward_any_alignment(rng, shift):
    # channel ranges are cut on dwte's 64-byte lines, wherever the array starts
    V, C = 9, 160
    idx = rng.integers(0, V, (8, 300)).astype(np.int32)
    dout = rand(rng, 8, 300, C)
    outs = []
    for t in (1, 2, 3, 4):
        buf = np.zeros(V * C + 64, F32)
        base = (-buf.ctypes.data % 64) // 4
        dwte = buf[base + shift: base + shift + V * C].reshape(V, C)
        dwpe = np.zeros((300, C), F32)
        k.encoder_backward(dwte, dwpe, dout, idx, threads=t)
        outs.append((dwte.copy(), dwpe))
    ref_te, ref_pe = np.zeros((V, C), F32), np.zeros((300, C), F32)
    k.encoder_backward_naive(ref_te, ref_pe, dout, idx)
    for te, pe in outs:
        assert np.array_equal(te, ref_te) and np.array_equal(pe, ref_pe)


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_bitwise_identical_across_thread_counts(simd, rng):
    for name, fn in _cases(rng):
        ref = fn(1)
        for t in (2, 3, 4):
            assert _same(fn(t), ref), f"{name}: threads={t} differs from threads=1"


def test_concurrent_python_threads_bitwise_equal_serial(rng):
    cases = _cases(rng)
    serial = [fn(1) for _, fn in cases]
    bad, errors = [], []

    def worker(wid):
        try:
            for it in range(2 * len(cases)):
                i = (wid + it) % len(cases)
                if not _same(cases[i][1](1 + (wid + it) % 2), serial[i]):
                    bad.append(cases[i][0])
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not bad, f"concurrent results differ from serial: {sorted(set(bad))}"


# ---- bad inputs ------------------------------------------------------------------------------------

def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _bad_cases():
    f = lambda *s: np.ones(s, F32)  # noqa: E731
    i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    VE = sm.ValidationError
    idx = i32(2, 3)
    wte, wpe = f(5, 4), f(8, 4)
    x, w = f(3, 4), f(4)
    mean, rstd = f(3), f(3)
    lg, tg = f(3, 6), i32(3)
    p = f(10)
    return [
        # encoder
        (lambda: k.encoder_forward(idx.astype(np.int64), wte, wpe), TypeError, "idx must have dtype int32"),
        (lambda: k.encoder_forward([[0]], wte, wpe), TypeError, "idx must be a numpy.ndarray"),
        (lambda: k.encoder_forward(i32(1, 2, 3), wte, wpe), VE, "idx must be 1-D"),
        (lambda: k.encoder_forward(idx + 5, wte, wpe), VE, r"idx values must be token ids in \[0, 4\]"),
        (lambda: k.encoder_forward(idx - 1, wte, wpe), VE, "idx values must be"),
        (lambda: k.encoder_forward(i32(2, 9), wte, wpe), VE, "9 positions but wpe only 8"),
        (lambda: k.encoder_forward(idx, wte, f(8, 5)), VE, "wpe must have shape"),
        (lambda: k.encoder_forward(idx, wte.astype(np.float64), wpe), TypeError, "wte must have dtype float32"),
        (lambda: k.encoder_forward(idx, f(5, 4, 1), wpe), VE, "wte must be 2-D"),
        (lambda: k.encoder_forward(idx, wte, wpe, out=f(2, 3, 5)), VE, "out must have shape"),
        (lambda: k.encoder_forward(idx, wte, wpe, out=_ro(f(2, 3, 4))), VE, "out must be writeable"),
        (lambda: k.encoder_forward(np.zeros((3, 2), np.int32).T, wte, wpe), VE, "idx must be C-contiguous"),
        (lambda: k.encoder_backward(f(5, 4), f(8, 4), f(2, 3, 5), idx), VE, "dout must have shape"),
        (lambda: k.encoder_backward(_ro(f(5, 4)), f(8, 4), f(2, 3, 4), idx), VE, "dwte must be writeable"),
        (lambda: k.encoder_backward(f(5, 4), f(8, 4), f(2, 3, 4), idx + 7), VE, "idx values must be"),
        (lambda: (lambda g: k.encoder_backward(g, g, f(2, 3, 4), idx))(f(8, 4)), VE, "dwte must not overlap dwpe"),
        # layernorm
        (lambda: k.layernorm_forward(x, f(5), w), VE, r"weight must have shape \(4,\)"),
        (lambda: k.layernorm_forward(x, w, f(4, 1)), VE, "bias must be 1-D"),
        (lambda: k.layernorm_forward(x, w, w, eps=0.0), VE, "eps must be in"),
        (lambda: k.layernorm_forward(x, w, w, eps=-1e-5), VE, "eps must be in"),
        (lambda: k.layernorm_forward(x, w, w, eps=float("nan")), VE, "eps must be finite"),
        (lambda: k.layernorm_forward(x, w, w, eps="1e-5"), TypeError, "eps must be a real number"),
        (lambda: k.layernorm_forward(f(4, 3).T, w[:3], w[:3]), VE, "x must be C-contiguous"),
        (lambda: k.layernorm_forward(np.ones((), F32), w, w), VE, "x must have at least 1 dimension"),
        (lambda: k.layernorm_forward(f(3, 0), f(0), f(0)), VE, "at least 1 channel"),
        (lambda: k.layernorm_forward(x, w, w, mean=f(4)), VE, r"mean must have shape \(3,\)"),
        (lambda: k.layernorm_forward(x, w, w, out=x), VE, "out must not overlap x"),
        (lambda: k.layernorm_backward(f(3, 4), f(4), f(4), f(3, 4), x, w, f(4), rstd), VE, "mean must have shape"),
        (lambda: k.layernorm_backward(f(3, 5), f(4), f(4), f(3, 4), x, w, mean, rstd), VE, "dx must have shape"),
        (lambda: k.layernorm_backward(f(3, 4), f(4), f(4), f(3, 4).astype(np.float16), x, w, mean, rstd),
         TypeError, "dout must have dtype float32"),
        (lambda: (lambda g: k.layernorm_backward(g, f(4), f(4), g, x, w, mean, rstd))(f(3, 4)), VE,
         "dx must not overlap dout"),
        (lambda: (lambda g: k.layernorm_backward(f(3, 4), g, g, f(3, 4), x, w, mean, rstd))(f(4)), VE,
         "dweight must not overlap dbias"),
        # gelu
        (lambda: k.gelu_forward([1.0, 2.0]), TypeError, "x must be a numpy.ndarray"),
        (lambda: k.gelu_forward(np.ones(3)), TypeError, "x must have dtype float32"),
        (lambda: k.gelu_forward(f(4, 4)[:, ::2]), VE, "x must be C-contiguous"),
        (lambda: k.gelu_forward(x, out=f(4, 3)), VE, "out must have shape"),
        (lambda: k.gelu_backward(f(3, 4), x, f(4, 3)), VE, "dout must have shape"),
        (lambda: k.gelu_backward(_ro(x), x.copy(), x.copy()), VE, "dx must be writeable"),
        (lambda: k.gelu_backward(x, x, x.copy()), VE, "dx must not overlap x"),
        # softmax
        (lambda: k.softmax(lg, temperature=0.0), VE, "temperature must be in"),
        (lambda: k.softmax(lg, temperature=-1.0), VE, "temperature must be in"),
        (lambda: k.softmax(lg, temperature=float("inf")), VE, "temperature must be finite"),
        (lambda: k.softmax(lg.astype(np.float64)), TypeError, "x must have dtype float32"),
        (lambda: k.softmax(lg, out=lg), VE, "out must not overlap x"),
        # cross-entropy
        (lambda: k.cross_entropy_forward(lg, tg + 6), VE, r"targets values must be class ids in \[0, 5\] or -1"),
        (lambda: k.cross_entropy_forward(lg, tg - 2), VE, "targets values must be"),
        (lambda: k.cross_entropy_forward(lg, i32(4)), VE, r"targets must have shape \(3,\)"),
        (lambda: k.cross_entropy_forward(lg, tg.astype(np.float32)), TypeError, "targets must have dtype int32"),
        (lambda: k.cross_entropy_forward(lg, tg.astype(np.int64)), TypeError, "targets must have dtype int32"),
        (lambda: k.cross_entropy_forward(f(3, 0), tg), VE, "at least 1 class"),
        (lambda: k.cross_entropy_forward(lg, tg, lse=f(2)), VE, "lse must have shape"),
        (lambda: k.cross_entropy_backward(f(3, 6), lg, tg, f(2)), VE, "dloss must have shape"),
        (lambda: k.cross_entropy_backward(f(3, 6), lg, tg, float("nan")), VE, "dloss must be finite"),
        (lambda: k.cross_entropy_backward(f(3, 6), lg, tg, "x"), TypeError, "dloss must be a real number"),
        (lambda: k.cross_entropy_backward(f(3, 7), lg, tg, 1.0), VE, "dlogits must have shape"),
        (lambda: k.cross_entropy_backward(lg, lg, tg, 1.0), VE, "dlogits must not overlap logits"),
        (lambda: k.cross_entropy_backward(f(3, 6), lg, tg + 9, 1.0), VE, "targets values must be"),
        (lambda: k.cross_entropy_forward_backward(f(3, 6), lg, tg, 1.0, out=f(4)), VE, "out must have shape"),
        # residual, bias
        (lambda: k.residual_forward(x, f(4, 3)), VE, "b must have shape"),
        (lambda: k.residual_forward(x, x.astype(np.int32)), TypeError, "b must have dtype float32"),
        (lambda: k.residual_forward(x, x, out=x), VE, "out must not overlap a"),
        (lambda: (lambda g: k.residual_backward(g, g, f(3, 4)))(f(3, 4)), VE, "da must not overlap db"),
        (lambda: k.residual_backward(f(3, 4), f(3, 5), f(3, 4)), VE, "db must have shape"),
        (lambda: k.bias_add(x, f(5)), VE, r"bias must have shape \(4,\)"),
        (lambda: k.bias_add(_ro(x), w), VE, "out must be writeable"),
        (lambda: k.bias_add(x, x[0]), VE, "out must not overlap bias"),
        (lambda: k.bias_backward(f(5), x), VE, r"dbias must have shape \(4,\)"),
        (lambda: k.bias_backward(_ro(w), x), VE, "dbias must be writeable"),
        # adamw
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=-1e-3), VE, "lr must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=float("nan")), VE, "lr must be finite"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, beta1=1.0), VE, "beta1 must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, beta1=-0.1), VE, "beta1 must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, beta2=1.5), VE, "beta2 must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, beta2=float("nan")), VE, "beta2 must be finite"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, beta2=0.9999999999), VE, "below 1 in float32"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, eps=0.0), VE, "eps must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, weight_decay=-0.1), VE, "weight_decay must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, step=0), VE, "step must be in"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=1e-3, step=1.0), TypeError, "step must be an int"),
        (lambda: k.adamw_step(p, p.copy(), f(10), f(10), lr=True), TypeError, "lr must be a real number"),
        (lambda: k.adamw_step(p, p.copy(), f(9), f(10), lr=1e-3), VE, r"m must have shape \(10,\)"),
        (lambda: k.adamw_step(p, p.astype(np.float64), f(10), f(10), lr=1e-3), TypeError, "grad must have dtype"),
        (lambda: k.adamw_step(f(20)[::2], f(10), f(10), f(10), lr=1e-3), VE, "param must be C-contiguous"),
        (lambda: k.adamw_step(_ro(p), f(10), f(10), f(10), lr=1e-3), VE, "param must be writeable"),
        (lambda: (lambda g: k.adamw_step(p, f(10), g, g, lr=1e-3))(f(10)), VE, "m must not overlap v"),
        (lambda: k.adamw_step(p, p, f(10), f(10), lr=1e-3), VE, "param must not overlap grad"),
        # clipping, threads
        (lambda: k.clip_grad_norm(f(10), 0.0), VE, "max_norm must be in"),
        (lambda: k.clip_grad_norm(f(10), float("nan")), VE, "max_norm must be finite"),
        (lambda: k.clip_grad_norm(_ro(f(10)), 1.0), VE, "grad must be writeable"),
        (lambda: k.grad_norm(np.ones(3)), TypeError, "grad must have dtype float32"),
        (lambda: k.gelu_forward(x, threads=0), VE, "threads"),
        (lambda: k.layernorm_forward(x, w, w, threads=2.0), TypeError, "threads"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_inputs(i):
    fn, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        fn()


def test_validation_errors_are_value_errors():
    with pytest.raises(ValueError):
        k.softmax(np.ones((2, 3), F32), temperature=0)


def test_open_interval_hyperparameters_that_round_to_zero_in_float32_are_rejected():
    # eps=1e-50 is > 0 as a Python float but 0.0 once rounded to float32, which C receives:
    # AdamW then divides 0 by 0 where grad, m and v are zero (NaN params), and layernorm gives
    # rstd = inf on a constant row (NaN output). The wrapper must refuse what C would see as 0.
    VE = sm.ValidationError
    p, z = np.ones(4, F32), np.zeros(4, F32)
    with pytest.raises(VE, match="eps"):
        k.adamw_step(p, z.copy(), z.copy(), z.copy(), lr=0.1, eps=1e-50)
    assert np.array_equal(p, np.ones(4, F32))
    x, w, b = np.ones((2, 5), F32), np.ones(5, F32), np.zeros(5, F32)
    with pytest.raises(VE, match="eps"):
        k.layernorm_forward(x, w, b, eps=1e-50)
    with pytest.raises(VE, match="max_norm"):
        k.clip_grad_norm(np.ones(3, F32), 1e-50)
    with pytest.raises(VE, match="temperature"):
        k.softmax_naive(np.ones((2, 3), F32), temperature=1e-50)
    # the smallest positive float32 (a subnormal) is still accepted and stays finite
    tiny = float(np.nextafter(F32(0), F32(1)))
    out, _, _ = k.layernorm_forward(np.arange(10, dtype=F32).reshape(2, 5), w, b, eps=tiny)
    assert np.isfinite(out).all()
    k.adamw_step(p, np.full(4, 0.5, F32), z.copy(), z.copy(), lr=0.1, eps=tiny)
    assert np.isfinite(p).all()
