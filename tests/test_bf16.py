"""test_bf16.py - bf16 matrix products (AMX tiles or their float32 emulation) against float64
products of the rounded inputs, their rounding and special values, bits across thread counts,
and bf16 mixed-precision training: gradients near float32's, the precision's validation, its
record in checkpoints, the command-line flag."""
import warnings

import numpy as np
import pytest
from conftest import assert_close

import smallmind as sm
from smallmind.cli import main as cli_main
from smallmind.core import _core
from smallmind.errors import ValidationError

SHAPES = [(1, 1, 1), (3, 17, 65), (17, 3, 5), (65, 257, 33), (100, 200, 300), (4, 768, 100),
          (33, 31, 97), (200, 1100, 49), (31, 64, 32), (64, 33, 31)]


def bf16(x):
    """float32 -> nearest bf16 (ties to even) as float32; NaN stays NaN: numpy's reference."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    out = r.view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def _operands(rng, M, K, N, ta, tb):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    an, bn = (a.T if ta else a), (b.T if tb else b)
    ref = bf16(an).astype(np.float64) @ bf16(bn).astype(np.float64)
    bound = np.abs(bf16(an)).astype(np.float64) @ np.abs(bf16(bn)).astype(np.float64)
    return a, b, ref, bound


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_matches_float64_product_of_rounded_inputs(simd, rng, shape, ta, tb):
    M, K, N = shape
    a, b, ref, bound = _operands(rng, M, K, N, ta, tb)
    out = sm.kernels.gemm_bf16(a, b, trans_a=ta, trans_b=tb)
    # products of bf16 values are exact in float32; only the float32 sums round (<= K u each)
    err = np.abs(out - ref)
    assert (err <= 2 * K * 2.0 ** -24 * bound + 1e-30).all(), f"{shape} max err {err.max():.3e}"


def test_inputs_are_rounded_to_bf16_not_kept_float32(simd, rng):
    # the float32 product differs from the bf16 one by ~2^-9 relative: far above the tolerance
    a, b, ref, bound = _operands(rng, 40, 300, 50, 0, 0)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    out = sm.kernels.gemm_bf16(a, b)
    assert np.abs(out - exact).max() > 100 * np.abs(out - ref).max()


@pytest.mark.parametrize("value,rounded", [
    (1.0 + 2.0 ** -8, 1.0),                   # halfway: to the even neighbour (1.0)
    (1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -6),   # halfway: to the even neighbour (up)
    (1.0 + 2.0 ** -8 + 2.0 ** -20, 1.0 + 2.0 ** -7),  # above halfway: up
    (-(1.0 + 2.0 ** -8), -1.0),
    (3.4e38, np.inf),                         # past bf16's largest finite value: inf
    (1e-40, 1e-40),                           # a float32 subnormal with few bits survives
])
def test_rounding_is_to_nearest_even(simd, value, rounded):
    a = np.full((1, 1), value, np.float32)
    b = np.ones((1, 1), np.float32)
    out = sm.kernels.gemm_bf16(a, b)
    expect = bf16(np.float32(value))
    assert expect == np.float32(rounded) or value == 1e-40
    if value == 1e-40:   # AMX may flush bf16 subnormals: 0 or the rounded value
        assert out[0, 0] in (np.float32(0.0), expect)
    else:
        assert out[0, 0] == expect


def test_small_integers_are_exact(simd, rng):
    # bf16 holds integers up to 256 exactly; products and sums stay exact in float32
    a = rng.integers(-8, 9, (70, 96)).astype(np.float32)
    b = rng.integers(-8, 9, (96, 45)).astype(np.float32)
    assert np.array_equal(sm.kernels.gemm_bf16(a, b), (a.astype(np.int64) @ b.astype(np.int64)))


def test_nan_and_inf_propagate(simd):
    a = np.ones((5, 40), np.float32)
    b = np.ones((40, 33), np.float32)
    a[1, 7] = np.nan
    a[3, 2] = np.inf
    out = sm.kernels.gemm_bf16(a, b)
    assert np.isnan(out[1]).all() and np.isposinf(out[3]).all()
    assert (out[[0, 2, 4]] == 40).all()


def test_alpha_beta_accumulate(simd, rng):
    a, b, ref, bound = _operands(rng, 70, 130, 90, 0, 0)
    c0 = rng.standard_normal((70, 90)).astype(np.float32)
    out = c0.copy()
    sm.kernels.gemm_bf16(a, b, out=out, alpha=0.5, beta=1.0)
    assert_close(out, 0.5 * ref + c0, atol=1e-4 * np.sqrt(130))
    out1 = c0.copy()
    sm.kernels.gemm_bf16(a, b, out=out1, beta=1.0)   # whole tiles accumulate on the tile unit
    assert_close(out1, ref + c0, atol=1e-4 * np.sqrt(130))
    nan_out = np.full((70, 90), np.nan, np.float32)
    sm.kernels.gemm_bf16(a, b, out=nan_out)             # beta 0: old contents are ignored
    assert np.isfinite(nan_out).all()


@pytest.mark.parametrize("shape", [(600, 300, 200), (4096, 128, 65), (65, 4096, 384), (30, 100, 1000)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0)])
def test_bitwise_identical_across_thread_counts(simd, rng, shape, ta, tb):
    M, K, N = shape
    a, b, _, _ = _operands(rng, M, K, N, ta, tb)
    outs = [sm.kernels.gemm_bf16(a, b, trans_a=ta, trans_b=tb, threads=t) for t in (1, 2, 3)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_validation_names_the_argument():
    with pytest.raises(ValidationError, match="inner dimensions"):
        sm.kernels.gemm_bf16(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises((TypeError, ValidationError), match="a"):
        sm.kernels.gemm_bf16(np.ones((3, 4), np.float64), np.ones((4, 2), np.float32))


def test_backend_follows_the_simd_level():
    try:
        sm.set_simd_level("avx2")
        assert sm.kernels.bf16_backend() == "emulated"
    finally:
        sm.set_simd_level(None)
    assert sm.kernels.bf16_backend() in ("amx", "emulated")


# ---- training ---------------------------------------------------------------------------------

def _model():
    return sm.TransformerModel(sm.ModelConfig(30, 32, 2, 2, 32, dropout=0.0, seed=7))


def _batch(B=4, T=32, V=30, seed=0):
    r = np.random.default_rng(seed)
    return (r.integers(0, V, (B, T)).astype(np.int32), r.integers(0, V, (B, T)).astype(np.int32))


def _grads(model, precision, threads=1):
    x, y = _batch()
    model.zero_grad()
    loss = model.train_forward(x, y, None, threads, precision)
    model.backward(threads=threads)
    return loss, model.flat_grads.copy()


def test_bf16_gradients_are_near_float32_and_not_equal(simd):
    model = _model()
    try:
        l32, g32 = _grads(model, "float32")
        l16, g16 = _grads(model, "bf16")
    finally:
        model.close()
    assert abs(l16 - l32) < 1e-2 * abs(l32)
    rel = np.linalg.norm(g16.astype(np.float64) - g32) / np.linalg.norm(g32.astype(np.float64))
    assert 1e-6 < rel < 3e-2, rel      # bf16 inputs move the gradient a little, not a lot


def test_bf16_training_bits_independent_of_threads():
    model = _model()
    try:
        l1, g1 = _grads(model, "bf16", threads=1)
        l2, g2 = _grads(model, "bf16", threads=2)
    finally:
        model.close()
    assert l1 == l2 and np.array_equal(g1, g2)


def test_state_precision_is_validated_and_reported():
    cfg = _model().core_config
    with pytest.raises(ValidationError, match="precision"):
        _core.GPTState(cfg, 2, 8, "fp16")
    st = _core.GPTState(cfg, 2, 8, "bf16")
    assert st.precision == "bf16"
    st.close()
    assert st.precision is None
    assert _core.GPTState(cfg, 2, 8).precision == "float32"


TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def test_training_precision_is_validated():
    model = _model()
    tok = sm.Tokenizer(TEXT)
    with pytest.raises(ValidationError, match="precision"):
        sm.Training(model, tok, TEXT, 16, 4, precision="fp16")
    with pytest.raises(ValidationError, match="precision"):
        sm.Training(model, tok, TEXT, 16, 4, precision=None)
    model.close()


def test_bf16_training_learns_and_resumes_with_its_precision(tmp_path):
    tok = sm.Tokenizer(TEXT)
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 16, 2, 2, 32, dropout=0.0, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # no AMX: emulated, still correct
        tr = sm.Training(model, tok, TEXT, 16, 8, precision="bf16")
    hist = tr.train(40, 3e-3, log_every=0, checkpoint_dir=str(tmp_path))
    assert np.mean(hist.train_loss[-5:]) < 0.8 * hist.train_loss[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = sm.Training.resume(str(tmp_path), TEXT)
        f32 = sm.Training.resume(str(tmp_path), TEXT, precision="float32")
    assert tr.precision == "bf16" and again.precision == "bf16" and f32.precision == "float32"
    for t in (tr, again, f32):
        t.model.close()


def test_emulated_bf16_warns():
    model = _model()
    tok = sm.Tokenizer(TEXT)
    try:
        sm.set_simd_level("avx2")
        with pytest.warns(RuntimeWarning, match="no Intel AMX"):
            sm.Training(model, tok, TEXT, 16, 4, precision="bf16")
    finally:
        sm.set_simd_level(None)
        model.close()


def test_cli_train_precision_bf16(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = cli_main(["train", str(tmp_path / "a.txt"), "--steps", "3", "--precision", "bf16",
                       "--checkpoint-dir", str(tmp_path / "ck"), "--n-layer", "1", "--n-embd", "16",
                       "--n-head", "2", "--block-size", "16", "--batch-size", "4"])
    assert rc == 0
    ck = sm.model.checkpoint.read_checkpoint(str(tmp_path / "ck"), latest=True)
    assert ck.training["precision"] == "bf16"
    with pytest.raises(SystemExit):          # argparse refuses it, naming the flag
        cli_main(["train", str(tmp_path / "a.txt"), "--precision", "fp8"])
    assert "--precision" in capsys.readouterr().err
