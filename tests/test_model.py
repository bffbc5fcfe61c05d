"""test_model.py - proves smallmind's GPT-2 (csrc/sm_model.c through smallmind/core/_model.pxi and
smallmind/model/transformer.py) right: ModelConfig validation and presets; the parameter block's layout
(Hugging Face names, zero-copy views, zero padding) and GPT-2 initialisation; logits, loss and
EVERY parameter's gradient against the float64 numpy reference (tests/reference_model.py), its
analytic backward and its central finite differences, and against PyTorch where installed;
dropout (mask rate and scale, and an exact gradient of the fixed-mask loss); bitwise
determinism across thread counts, Python threads and SIMD levels; the GIL being released; every
bad input; and what the MemoryPool holds before, during and after training.

Shapes are tiny so the file runs in a few seconds on two cores. T = 70 and T = block_size cover
the attention's tiles past the first 64 positions."""
import dataclasses
import gc
import json
import math
import os
import sys
import threading

import numpy as np
import pytest
from conftest import assert_close

import smallmind as sm
from smallmind.core import _core
from smallmind.errors import ObjectDisposedError, SmallMindError, ValidationError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_model as ref  # noqa: E402

# The model most numerical tests use: block 72 allows T = 70 (> 64, not a multiple of 64).
V, BLK, L, NH, C = 13, 72, 2, 2, 16

LAYER_SUFFIXES = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                  "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                  "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
WEIGHT_KINDS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                "mlp.c_proj.weight")


def hf_names(n_layer):
    """GPT2LMHeadModel.state_dict() order, written out independently of smallmind (no lm_head:
    it is tied to wte; no attn.bias / masked_bias buffers: they are not parameters)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.{s}" for s in LAYER_SUFFIXES]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def make_model(vocab_size=V, block_size=BLK, n_layer=L, n_head=NH, n_embd=C, **kw):
    return sm.TransformerModel(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                               n_head=n_head, n_embd=n_embd, **kw)


@pytest.fixture(scope="module")
def params64():
    # weight_std 0.3: attention is sharp, so the q and k gradients are as large as v's
    return ref.init_params(V, BLK, L, C, seed=5, weight_std=0.3)


def loaded_model(params, **kw):
    m = make_model(**kw)
    m.load_state_dict(params)
    return m


def batch(B, T, seed, ignore=()):
    """Random ids and targets (int32), with targets at the (b, t) in `ignore` set to -1 and a
    repeated token (its wte row gathers two contributions) when there is room."""
    r = np.random.default_rng(seed)
    idx = r.integers(0, V, size=(B, T)).astype(np.int32)
    targets = r.integers(0, V, size=(B, T)).astype(np.int32)
    if B * T > 3:
        idx.reshape(-1)[-1] = idx.reshape(-1)[1]
    for b, t in ignore:
        targets[b, t] = -1
    return idx, targets


def assert_grads_close(got, want, rtol, what=""):
    """Every tensor within rtol of its own gradient's largest magnitude (a float32 sum's error
    grows with the magnitude of what it sums, not with each element)."""
    assert set(got) == set(want)
    for name, w in want.items():
        scale = np.abs(w).max()
        assert scale > 0, f"{name}: the reference gradient is zero, the check would be void"
        err = np.abs(np.asarray(got[name], np.float64) - w).max()
        assert err <= rtol * scale, f"{what}{name}: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


# ==== 1. ModelConfig ==============================================================================

GOOD = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("bad", [2.0, "8", None, True, np.bool_(True), [8]])
def test_config_int_fields_reject_wrong_types(field, bad):
    with pytest.raises(TypeError, match=f"ModelConfig.{field}"):
        sm.ModelConfig(**{**GOOD, field: bad})


@pytest.mark.parametrize("field,hi", [("vocab_size", 2 ** 31), ("block_size", 2 ** 24),
                                      ("n_layer", 4096), ("n_head", 2 ** 20), ("n_embd", 2 ** 20)])
def test_config_int_fields_range(field, hi):
    for bad in (0, -1, hi + 1):
        with pytest.raises(ValidationError, match=f"ModelConfig.{field} must be in \\[1, {hi}\\]"):
            sm.ModelConfig(**{**GOOD, field: bad})
    # numpy integers are ints too, and are stored as Python ints
    cfg = sm.ModelConfig(**{**GOOD, field: np.int64(GOOD[field])})
    assert type(getattr(cfg, field)) is int and getattr(cfg, field) == GOOD[field]


def test_config_head_divides_embd_dropout_and_seed():
    with pytest.raises(ValidationError, match="n_embd must be a multiple of n_head") as e:
        sm.ModelConfig(**{**GOOD, "n_embd": 10, "n_head": 3})
    assert "n_embd=10" in str(e.value) and "n_head=3" in str(e.value)
    assert sm.ModelConfig(**{**GOOD, "n_embd": 12, "n_head": 3}).head_size == 4

    for bad in ("0.1", None, True, np.bool_(False), [0.1]):
        with pytest.raises(TypeError, match="ModelConfig.dropout"):
            sm.ModelConfig(**GOOD, dropout=bad)
    for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf"), -1e-9):
        with pytest.raises(ValidationError, match="ModelConfig.dropout must be in \\[0, 1\\)"):
            sm.ModelConfig(**GOOD, dropout=bad)
    for ok in (0, 0.0, 0.5, np.float32(0.25), 0.999):
        cfg = sm.ModelConfig(**GOOD, dropout=ok)
        assert type(cfg.dropout) is float and cfg.dropout == float(ok)

    for bad in (1.0, "1", None, True):
        with pytest.raises(TypeError, match="ModelConfig.seed"):
            sm.ModelConfig(**GOOD, seed=bad)
    for bad in (-1, 2 ** 64, 2 ** 70):
        with pytest.raises(ValidationError, match="ModelConfig.seed must be in \\[0, 18446744073709551615\\]"):
            sm.ModelConfig(**GOOD, seed=bad)
    for ok in (0, 2 ** 64 - 1, np.uint64(2 ** 64 - 1)):
        cfg = sm.ModelConfig(**GOOD, seed=ok)
        assert type(cfg.seed) is int and cfg.seed == int(ok)
    # the extreme seeds build a model (the generators accept the whole range)
    sm.TransformerModel(sm.ModelConfig(**GOOD, seed=2 ** 64 - 1))

    cfg = sm.ModelConfig(**GOOD)
    assert (cfg.dropout, cfg.seed) == (0.0, 42)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3
    with pytest.raises(TypeError):
        sm.ModelConfig(13, 8, 2, 2)  # a required field missing


def test_config_presets():
    expect = {
        "tiny": (64, 2, 2, 32, 0.0), "small": (128, 4, 4, 64, 0.1),
        "medium": (256, 6, 8, 128, 0.1), "shakespeare-char": (256, 6, 6, 384, 0.2),
    }
    assert set(sm.PRESETS) == set(expect) | {"gpt2"}
    for name, (block, n_layer, n_head, n_embd, dropout) in expect.items():
        cfg = sm.ModelConfig.preset(name, vocab_size=65)
        assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                cfg.dropout) == (65, block, n_layer, n_head, n_embd, dropout), name
        with pytest.raises(ValidationError, match=f"preset '{name}' needs a vocab_size"):
            sm.ModelConfig.preset(name)
    g = sm.ModelConfig.preset("gpt2")
    assert (g.vocab_size, g.block_size, g.n_layer, g.n_head, g.n_embd) == (50257, 1024, 12, 12, 768)
    assert g.num_parameters() == 124_439_808  # GPT-2 small without the tied lm_head
    assert sm.ModelConfig.preset("gpt2", vocab_size=100).vocab_size == 100
    cfg = sm.ModelConfig.preset("small", vocab_size=65, dropout=0.0, n_layer=3, seed=7)
    assert (cfg.n_layer, cfg.dropout, cfg.seed, cfg.n_embd) == (3, 0.0, 7, 64)
    # overrides are validated like any field, and PRESETS is not modified by them
    with pytest.raises(ValidationError, match="n_embd must be a multiple of n_head"):
        sm.ModelConfig.preset("small", vocab_size=65, n_head=3)
    assert sm.PRESETS["small"]["n_layer"] == 4
    with pytest.raises(ValidationError, match="unknown preset 'huge'") as e:
        sm.ModelConfig.preset("huge", vocab_size=65)
    assert "tiny" in str(e.value)


def test_config_dict_round_trip():
    cfg = sm.ModelConfig(**GOOD, dropout=0.25, seed=2 ** 63 + 5)
    d = cfg.to_dict()
    assert d == {**GOOD, "dropout": 0.25, "seed": 2 ** 63 + 5}
    assert sm.ModelConfig.from_dict(d) == cfg
    assert sm.ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    m = sm.TransformerModel(cfg)
    assert sm.ModelConfig.from_dict(json.loads(m.config_json())) == cfg
    with pytest.raises(ValidationError, match="unknown ModelConfig field\\(s\\): colour, n_layers"):
        sm.ModelConfig.from_dict({**d, "n_layers": 2, "colour": "red"})
    with pytest.raises(ValidationError, match="must be a mapping"):
        sm.ModelConfig.from_dict([("vocab_size", 13)])
    with pytest.raises(ValidationError, match="ModelConfig.n_embd"):
        sm.ModelConfig.from_dict({**d, "n_embd": 0})


@pytest.mark.parametrize("shape", [(13, 8, 2, 2, 16), (5, 3, 1, 1, 1), (50, 17, 3, 3, 9)])
def test_num_parameters_is_the_sum_of_state_dict_sizes(shape):
    cfg = sm.ModelConfig(*shape)
    m = sm.TransformerModel(cfg)
    total = sum(a.size for a in m.state_dict().values())
    assert cfg.num_parameters() == m.num_parameters() == total
    assert total == sum(math.prod(s) for s in
                        ref.param_shapes(shape[0], shape[1], shape[2], shape[4]).values())


# ==== 2. Layout and initialisation ==============================================================

def test_state_dict_names_shapes_and_zero_copy():
    m = make_model(vocab_size=11, block_size=9, n_layer=3, n_head=2, n_embd=8)
    sd, gd = m.state_dict(), m.grads()
    assert list(sd) == hf_names(3) == list(gd)
    assert {k: v.shape for k, v in sd.items()} == ref.param_shapes(11, 9, 3, 8)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in sd.values())
    assert m.flat_params.ctypes.data % 64 == 0 and m.flat_grads.ctypes.data % 64 == 0
    base = m.flat_params.ctypes.data
    starts = []
    for name in sd:
        assert np.shares_memory(sd[name], m.flat_params), name
        assert np.shares_memory(gd[name], m.flat_grads), name
        assert not np.shares_memory(gd[name], m.flat_params), name
        off = sd[name].ctypes.data - base
        assert off % 64 == 0, f"{name} starts off a 64-byte boundary"  # each tensor aligned
        assert gd[name].ctypes.data - m.flat_grads.ctypes.data == off  # same layout for grads
        starts.append((off, off + sd[name].nbytes, name))
    starts.sort()
    for (_, end, a), (start, _, b) in zip(starts, starts[1:]):
        assert end <= start, f"{a} overlaps {b}"
    # two calls give views of the same memory, and a write through one is seen by the other
    sd["transformer.h.1.ln_2.bias"][3] = 7.0
    assert m.state_dict()["transformer.h.1.ln_2.bias"][3] == 7.0


def test_view_writes_change_forward():
    m = make_model(vocab_size=11, block_size=9, n_layer=1, n_head=2, n_embd=8).eval()
    idx = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    before = m.forward(idx)
    sd = m.state_dict()
    # ln_f.weight = 0 makes ln_f's output its bias at every position, so with the LM head tied
    # to wte every row of logits must be wte @ bias: a closed form for the whole forward pass
    bias = np.linspace(-1, 1, 8).astype(np.float32)
    sd["transformer.ln_f.weight"][...] = 0.0
    sd["transformer.ln_f.bias"][...] = bias
    wte = sd["transformer.wte.weight"].astype(np.float64)
    got = m.forward(idx)
    assert not np.allclose(got, before)
    assert_close(got, np.broadcast_to(wte @ bias, got.shape), rtol=1e-6)
    # and the head reads wte through the same memory: scaling wte scales every logit
    sd["transformer.wte.weight"][...] *= 2.0
    assert_close(m.forward(idx), 2.0 * np.broadcast_to(wte @ bias, got.shape), rtol=1e-6)


def test_layout_decay_prefix_and_zero_padding():
    m = make_model(vocab_size=11, block_size=9, n_layer=2, n_head=3, n_embd=9)  # odd sizes
    lay = m.layout
    assert lay.num_floats == m.flat_params.size
    covered = np.zeros(m.flat_params.size, bool)
    sizes = {}
    for spec in lay:
        off, size, name = spec.offset, spec.size, spec.name
        assert off % 16 == 0
        assert not covered[off:off + size].any()
        covered[off:off + size] = True
        sizes[name] = size
        view = m.state_dict()[name]
        assert view.size == size and view.ctypes.data == m.flat_params.ctypes.data + 4 * off
        # the decayed prefix holds exactly the four weight matrices of every layer
        kind = name.split(".", 3)[-1] if ".h." in name else name[len("transformer."):]
        assert (off < lay.decay_floats) == (kind in WEIGHT_KINDS), name
    # Hugging Face's order, which hf_names spells out independently of the C table
    assert list(sizes) == list(hf_names(2))
    assert (~covered).sum() > 0  # odd sizes: there is padding to check
    assert not m.flat_params[~covered].any() and not m.flat_grads[~covered].any()
    # padding stays zero through training steps with weight decay
    mv, vv = np.zeros_like(m.flat_params), np.zeros_like(m.flat_params)
    idx, targets = np.array([[1, 2, 3]], np.int32), np.array([[2, 3, 4]], np.int32)
    for step in (1, 2, 3):
        m.zero_grad()
        m.forward(idx, targets)
        m.backward()
        _core.gpt_adamw(m.flat_params, mv, vv, m.flat_grads, m.core_config, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    assert m.flat_params[covered].any()
    assert not m.flat_params[~covered].any() and not m.flat_grads[~covered].any()


def test_gpt2_init_statistics():
    n_layer = 3
    m = make_model(vocab_size=512, block_size=128, n_layer=n_layer, n_head=4, n_embd=64)
    resid = 0.02 / math.sqrt(2 * n_layer)
    for name, a in m.state_dict().items():
        if ".ln_" in name:
            assert np.all(a == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith(".bias"):
            assert not a.any(), name
        else:
            std = resid if name.endswith("c_proj.weight") else 0.02
            x = a.astype(np.float64).ravel()
            n = x.size
            # 6 standard errors: the sample std of n normals has relative SE 1/sqrt(2n), the
            # mean SE std/sqrt(n), the fraction within one std SE sqrt(p(1-p)/n). Smallest
            # n here is 4096 (attn.c_proj), so the std bound is 6.6%; the two stds differ 2.4x.
            assert abs(x.std() / std - 1) < 6 / math.sqrt(2 * n), (name, x.std(), std)
            assert abs(x.mean()) < 6 * std / math.sqrt(n), name
            inside = np.mean(np.abs(x) < std)  # 0.6827 for a normal, 0.577 for a uniform
            p = 0.682689
            assert abs(inside - p) < 6 * math.sqrt(p * (1 - p) / n), (name, inside)
    sd = m.state_dict()
    # every tensor has its own draw, not a copy of another's
    assert not np.array_equal(sd["transformer.h.0.attn.c_attn.weight"],
                              sd["transformer.h.1.attn.c_attn.weight"])


def test_init_is_a_function_of_the_seed():
    kw = dict(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=8)
    a, b = make_model(**kw, seed=3), make_model(**kw, seed=3)
    c = make_model(**kw, seed=4)
    assert np.array_equal(a.flat_params, b.flat_params)
    for name, x in a.state_dict().items():
        if not (".ln_" in name or name.endswith(".bias")):
            assert not np.array_equal(x, c.state_dict()[name]), name
    d = make_model(**kw)  # default seed 42, deterministic as well
    assert np.array_equal(d.flat_params, make_model(**kw, seed=42).flat_params)


# ==== 3. Numerics against the float64 reference ===============================================

@pytest.mark.parametrize("B,T", [(1, 1), (3, 5), (2, 70), (1, BLK), (3, 64)])
def test_logits_loss_and_gradients_match_reference(params64, B, T):
    m = loaded_model(params64)
    sd = m.state_dict()
    assert all(np.array_equal(sd[k], params64[k].astype(np.float32)) for k in params64)
    ignore = [] if B * T == 1 else [(0, 0), (B - 1, T - 1)]
    idx, targets = batch(B, T, seed=B * 100 + T, ignore=ignore)
    want_logits, want_loss, cache = ref.forward(params64, idx, targets, n_head=NH)
    want = ref.backward(params64, cache)

    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    assert logits.shape == (B, T, V) and logits.dtype == np.float32
    assert isinstance(loss, float)
    assert_close(logits, want_logits, rtol=1e-4, what="logits")
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    m.backward()
    got = m.grads()
    if T < BLK:  # positions never seen get exactly no gradient
        assert not got["transformer.wpe.weight"][T:].any()
    # the key block of c_attn.bias (columns C:2C) has a zero gradient in exact arithmetic
    # (softmax is invariant to adding one vector to every key): check it absolutely
    for l in range(L):
        name = f"transformer.h.{l}.attn.c_attn.bias"
        scale = np.abs(want[name]).max()
        assert np.abs(want[name][C:2 * C]).max() < 1e-12 * max(scale, 1.0)
        assert np.abs(got[name][C:2 * C]).max() <= 1e-4 * scale
    assert_grads_close({k: got[k] for k in want}, want, rtol=1e-4, what=f"B={B} T={T}: ")

    # other integer dtypes and nested lists give the same logits as int32
    assert np.array_equal(m.forward(idx.astype(np.int64), threads=1),
                          m.forward(idx.tolist(), threads=1))
    # eval mode (no saved state) computes the very same numbers
    m.eval()
    e_logits, e_loss = m.forward(idx, targets)
    assert np.array_equal(e_logits, logits) and e_loss == loss
    assert np.array_equal(m.forward(idx), logits)


def test_gradients_match_finite_differences_of_reference(params64):
    """Every tensor, at its largest-gradient element and at random ones (biases, LN gains and
    both embeddings included), against central differences of the float64 reference loss."""
    B, T = 3, 9
    idx, targets = batch(B, T, seed=11, ignore=[(0, 2), (2, 8)])
    m = loaded_model(params64)
    m.zero_grad()
    m.forward(idx, targets)
    m.backward()
    got = m.grads()
    r = np.random.default_rng(0)
    for name, _p in params64.items():
        g = got[name].astype(np.float64).ravel()
        if name == "transformer.wpe.weight":
            g = g[:T * C]  # rows past T have no gradient at all (checked above)
        picks = np.unique(np.concatenate([[np.abs(g).argmax()], r.integers(0, g.size, 5)]))
        if name.endswith("c_attn.bias"):
            picks = np.union1d(picks, [C, 2 * C - 1])  # two elements of the zero key block
        fd = ref.numerical_grad(params64, idx, targets, NH, name, picks, eps=1e-6)
        scale = np.abs(fd).max()
        assert scale > 1e-4, name  # the largest element is sampled: not a void check
        err = np.abs(g[picks] - fd).max()
        assert err <= 1e-4 * scale, f"{name}: {err:.3e} vs finite differences (scale {scale:.3e})"


def test_loss_scale_and_accumulation(params64):
    m = loaded_model(params64)
    (i1, t1), (i2, t2) = batch(2, 6, seed=1, ignore=[(1, 1)]), batch(2, 6, seed=2)

    def grad_of(i, t, **kw):
        m.zero_grad()
        m.forward(i, t)
        m.backward(**kw)
        return m.flat_grads.copy()

    g1, g2 = grad_of(i1, t1), grad_of(i1, t1)
    assert np.array_equal(g1, g2)  # same inputs, same bits
    assert g1.any()
    # a power of two commutes exactly with every product and sum of the backward pass
    assert np.array_equal(grad_of(i1, t1, loss_scale=0.25), g1 * np.float32(0.25))
    assert np.array_equal(grad_of(i1, t1, loss_scale=1024.0), g1 * np.float32(1024.0))
    assert_close(grad_of(i1, t1, loss_scale=0.3), g1 * 0.3, rtol=1e-6)
    assert not grad_of(i1, t1, loss_scale=0.0).any()
    assert_close(grad_of(i1, t1, loss_scale=-1.5), -1.5 * g1.astype(np.float64), rtol=1e-6)

    gb = grad_of(i2, t2)
    # two forward+backward pairs without zero_grad accumulate: grads = g1 + gb
    m.zero_grad()
    m.forward(i1, t1)
    m.backward()
    m.forward(i2, t2)
    m.backward()
    assert_close(m.flat_grads, g1.astype(np.float64) + gb, rtol=1e-6)
    # ... on top of whatever the buffer held
    m.flat_grads[...] = 1.0
    m.forward(i1, t1)
    m.backward()
    assert_close(m.flat_grads, 1.0 + g1.astype(np.float64), rtol=1e-6)
    # zero_grad clears everything
    m.zero_grad()
    assert not m.flat_grads.any()


def test_matches_torch(params64):
    torch = pytest.importorskip("torch")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import torch_gpt

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's team stalls on tiny ops when the machine is shared
    try:
        m = loaded_model(params64)
        tm = torch_gpt.from_numpy_state(m.config, m.state_dict(), dtype=torch.float32)
        for B, T in [(3, 9), (2, 70)]:
            idx, targets = batch(B, T, seed=T, ignore=[(0, 1)])
            m.zero_grad()
            logits, loss = m.forward(idx, targets)
            m.backward()
            tm.zero_grad()
            tl, tloss = tm(torch.tensor(idx, dtype=torch.long),
                           torch.tensor(targets, dtype=torch.long))
            tloss.backward()
            assert_close(logits, tl.detach().numpy(), rtol=1e-4, what="logits")
            assert abs(loss - tloss.item()) <= 1e-5 * abs(tloss.item())
            want = {n: p.grad.numpy().astype(np.float64) for n, p in tm.named_parameters()}
            assert set(want) == set(m.grads())
            for l in range(L):  # torch's float32 noise in the zero key-bias block is not signal
                name = f"transformer.h.{l}.attn.c_attn.bias"
                scale = np.abs(want[name]).max()
                assert np.abs(m.grads()[name][C:2 * C]).max() <= 1e-4 * scale
                want[name][C:2 * C] = m.grads()[name][C:2 * C]
            if T < BLK:
                assert not want["transformer.wpe.weight"][T:].any()
                want["transformer.wpe.weight"] = want["transformer.wpe.weight"][:T]
            got = dict(m.grads())
            got["transformer.wpe.weight"] = got["transformer.wpe.weight"][:T]
            assert_grads_close(got, want, rtol=1e-4, what=f"torch B={B} T={T}: ")
    finally:
        torch.set_num_threads(saved)


# ==== 5. Dropout ================================================================================

def test_dropout_kernel_rate_scale_and_mask():
    n = 200_000
    x = np.random.default_rng(0).uniform(0.5, 2.0, n).astype(np.float32)
    for p in (0.1, 0.5, 0.9):
        out = _core.dropout_forward(x, p, seed=123, stream=4)
        dropped = out == 0
        # 6 binomial standard deviations of the dropped fraction
        assert abs(dropped.mean() - p) < 6 * math.sqrt(p * (1 - p) / n), (p, dropped.mean())
        scale = np.float32(1) / (np.float32(1) - np.float32(p))
        assert np.array_equal(out[~dropped], x[~dropped] * scale)  # exactly inp / (1 - p)
        # neighbours are independent: both dropped about p^2 of the time
        both = np.mean(dropped[1:] & dropped[:-1])
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n)
        # a pure function of (seed, stream, position): same bits for any thread count and
        # in place; another seed or stream gives another mask
        assert np.array_equal(_core.dropout_forward(x, p, 123, 4, threads=1),
                              _core.dropout_forward(x, p, 123, 4, threads=2))
        y = x.copy()
        assert _core.dropout_forward(y, p, 123, 4, out=y) is y and np.array_equal(y, out)
        assert np.mean(dropped != (_core.dropout_forward(x, p, 124, 4) == 0)) > 0.1
        assert np.mean(dropped != (_core.dropout_forward(x, p, 123, 5) == 0)) > 0.1
        # a prefix of the array gets the prefix of the mask
        assert np.array_equal(_core.dropout_forward(x[:1000].copy(), p, 123, 4), out[:1000])
    assert np.array_equal(_core.dropout_forward(x, 0.0, 1), x)
    with pytest.raises(ValidationError, match="p must be in"):
        _core.dropout_forward(x, 1.0, 1)
    with pytest.raises(ValidationError, match="seed"):
        _core.dropout_forward(x, 0.5, -1)
    with pytest.raises(TypeError, match="inp"):
        _core.dropout_forward(x.astype(np.float64), 0.5, 1)


def test_dropout_train_vs_eval_and_seeds():
    kw = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, seed=9)
    m = make_model(**kw, dropout=0.3)
    plain = make_model(**kw, dropout=0.0)  # same seed: same parameters
    assert np.array_equal(m.flat_params, plain.flat_params)
    idx, targets = batch(2, 7, seed=3)
    want = plain.eval().forward(idx)
    assert m.training
    a, b = m.forward(idx), m.forward(idx)
    assert not np.allclose(a, want) and not np.allclose(a, b)  # a fresh mask per forward
    (c, la), (d, lb) = m.forward(idx, targets), m.forward(idx, targets)
    assert not np.array_equal(c, d) and la != lb
    # the same config seed gives the same sequence of masks
    twin = make_model(**kw, dropout=0.3)
    assert np.array_equal(twin.forward(idx), a) and np.array_equal(twin.forward(idx), b)
    # eval() ignores dropout: bit for bit the dropout-free model, call after call
    m.eval()
    assert np.array_equal(m.forward(idx), want) and np.array_equal(m.forward(idx), want)
    e_logits, e_loss = m.forward(idx, targets)
    assert np.array_equal(e_logits, want)
    assert e_loss == plain.forward(idx, targets)[1]
    m.train()
    assert not np.array_equal(m.forward(idx), want)
    # the core: same seed, same result; another seed, another result
    l1, l2, l3 = (np.empty((2, 7, V), np.float32) for _ in range(3))
    r1 = _core.gpt_forward(m.flat_params, m.core_config, idx, targets, l1, None, 0.3, 77)
    r2 = _core.gpt_forward(m.flat_params, m.core_config, idx, targets, l2, None, 0.3, 77)
    r3 = _core.gpt_forward(m.flat_params, m.core_config, idx, targets, l3, None, 0.3, 78)
    assert r1 == r2 and np.array_equal(l1, l2)
    assert r1 != r3 and not np.array_equal(l1, l3)


def att_masks(B, T, p, seed):
    """The attention-probability factors of every layer (stream 2^32 + l in sm_model.c)."""
    return {("att", l): sm.kernels.attention_dropout_mask(B, NH, T, p, seed, (1 << 32) + l)
            .astype(np.float64) for l in range(L)}


def masked_reference(P, idx, targets, n_head, masks):
    """The float64 reference forward with dropout masks applied where sm_model.c applies them
    (the embedding sum, then each block's attention probabilities and its attention and MLP
    branch outputs); masks[s] is the factor (0 or 1/(1-p)) of stream s: 0 embeddings, 1 + 2l
    attention, 2 + 2l MLP of layer l; masks["att", l] (B, NH, T, T) those of layer l's
    attention probabilities. Returns (logits, loss)."""
    T = idx.shape[1]
    x = (P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][:T]) * masks[0]
    for l in range(L):
        h = f"transformer.h.{l}."
        ln1, _ = ref.layernorm(x, P[h + "ln_1.weight"], P[h + "ln_1.bias"])
        _, (q, k, v, prob, _) = ref.attention(
            ln1 @ P[h + "attn.c_attn.weight"] + P[h + "attn.c_attn.bias"], n_head)
        y = (prob * masks["att", l]) @ v                 # (B, nh, T, hs)
        atty = y.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + (atty @ P[h + "attn.c_proj.weight"] + P[h + "attn.c_proj.bias"]) * masks[1 + 2 * l]
        ln2, _ = ref.layernorm(x, P[h + "ln_2.weight"], P[h + "ln_2.bias"])
        g = ref.gelu(ln2 @ P[h + "mlp.c_fc.weight"] + P[h + "mlp.c_fc.bias"])
        x = x + (g @ P[h + "mlp.c_proj.weight"] + P[h + "mlp.c_proj.bias"]) * masks[2 + 2 * l]
    xf, _ = ref.layernorm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"])
    logits = xf @ P["transformer.wte.weight"].T
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = targets != -1
    nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return logits, nll[valid].sum() / valid.sum()


def test_dropout_gradient_is_exact_for_its_mask(params64):
    """The training forward + backward with dropout p and a fixed seed against (a) central
    differences, in float64, of the reference loss with that seed's masks applied, and (b) in
    float32, directional differences of the core's own inference forward with the same seed.
    A backward that used any other mask fails both: checked with a gradient from another seed."""
    p, seed, B, T = 0.3, 1234, 2, 7
    m = loaded_model(params64)
    cfg = m.core_config
    idx, targets = batch(B, T, seed=5, ignore=[(1, 3)])
    ones = np.ones((B, T, C), np.float32)
    masks = {s: _core.dropout_forward(ones, p, seed, s).astype(np.float64)
             for s in range(1 + 2 * L)}
    masks.update(att_masks(B, T, p, seed))
    scale = np.float32(1) / np.float32(1 - np.float32(p))
    for mk in masks.values():  # each stream drops some values and keeps the rest, scaled
        assert 0 < (mk == 0).mean() < 1 and np.all((mk == 0) | (mk == scale))
    assert not np.array_equal(masks[1], masks[2])  # streams differ
    want_logits, want_loss = masked_reference(params64, idx, targets, NH, masks)

    def train_grad(sd):
        """Gradient of the training pass with seed sd, as name -> float64 array."""
        state = _core.GPTState(cfg, B, T)
        logits = np.empty((B, T, V), np.float32)
        loss, n_valid = _core.gpt_forward(m.flat_params, cfg, idx, targets, logits, state, p, sd)
        assert n_valid == B * T - 1 and state.ready
        m.zero_grad()
        _core.gpt_backward(m.flat_grads, state, m.flat_params)
        assert not state.ready
        return logits, loss, {k: v.astype(np.float64) for k, v in m.grads().items()}

    logits, loss, got = train_grad(seed)
    # the masks the test assumes are the ones the forward pass applies
    assert_close(logits, want_logits, rtol=1e-4, what="dropout logits")
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    inf_logits = np.empty_like(logits)
    inf_loss, _ = _core.gpt_forward(m.flat_params, cfg, idx, targets, inf_logits, None, p, seed)
    assert np.array_equal(inf_logits, logits) and inf_loss == loss  # both paths, one mask
    _, _, wrong = train_grad(seed + 1)

    def masked_loss(name, j, delta):
        q = params64[name].copy()
        q.reshape(-1)[j] += delta
        return masked_reference({**params64, name: q}, idx, targets, NH, masks)[1]

    # (a) float64 central differences of the masked reference, a sample of every tensor
    r = np.random.default_rng(1)
    worst_wrong = 0.0
    for name, _prm in params64.items():
        g = got[name].ravel()
        if name == "transformer.wpe.weight":
            g = g[:T * C]
        picks = np.unique(np.concatenate([[np.abs(g).argmax()], r.integers(0, g.size, 4)]))
        fd = np.array([(masked_loss(name, j, 1e-6) - masked_loss(name, j, -1e-6)) / 2e-6
                       for j in picks])
        scale = np.abs(fd).max()
        assert scale > 1e-4, name
        err = np.abs(g[picks] - fd).max()
        assert err <= 1e-4 * scale, f"{name}: {err:.3e} vs finite differences ({scale:.3e})"
        wg = wrong[name].ravel()[:g.size]
        worst_wrong = max(worst_wrong, np.abs(wg[picks] - fd).max() / scale)
    assert worst_wrong > 1e-2, "the check cannot tell one mask from another"

    # (b) float32 directional differences of the core's inference forward with the same seed:
    # along the gradient g of each tensor, (L(w + h g/|g|) - L(w - h g/|g|)) / 2h = |g|
    def core_loss(w):
        return _core.gpt_forward(w, cfg, idx, targets, None, None, p, seed)[0]

    lay = m.layout
    h = 3e-3
    for spec in lay:
        name, off, size = spec.name, spec.offset, spec.size
        for grad, ok in ((got, True), (wrong, False)):
            d = np.zeros_like(m.flat_params)
            gv = grad[name].ravel()
            d[off:off + size] = gv / np.linalg.norm(gv)
            fd = (core_loss(m.flat_params + np.float32(h) * d) -
                  core_loss(m.flat_params - np.float32(h) * d)) / (2 * h)
            rel = abs(fd / np.linalg.norm(gv) - 1)
            if ok:  # measured <= 8e-4: float32 rounding of the loss over h, and h^2 terms
                assert rel < 1e-2, (name, fd, np.linalg.norm(gv))
            elif ".ln_f." not in name:  # ln_f sits after every mask: it only feels them
                assert rel > 0.1, name  # through its input (measured >= 0.26 elsewhere)
    # and along the whole block
    for grad, ok in ((got, True), (wrong, False)):
        gv = np.zeros_like(m.flat_params)
        for spec in lay:
            name, off, size = spec.name, spec.offset, spec.size
            gv[off:off + size] = grad[name].ravel()
        d = gv / np.linalg.norm(gv)
        fd = (core_loss(m.flat_params + np.float32(h) * d) -
              core_loss(m.flat_params - np.float32(h) * d)) / (2 * h)
        rel = abs(fd / np.linalg.norm(gv) - 1)
        assert (rel < 1e-2) if ok else (rel > 0.2), (ok, rel)


# ==== 6. Determinism and concurrency ===========================================================

MID = dict(vocab_size=67, block_size=80, n_layer=2, n_head=4, n_embd=64)


def mid_batch(B, T, seed):
    r = np.random.default_rng(seed)
    return (r.integers(0, 67, (B, T)).astype(np.int32),
            r.integers(0, 67, (B, T)).astype(np.int32))


def test_thread_counts_are_bitwise_identical():
    m = make_model(**MID, seed=1)
    idx, targets = mid_batch(3, 77, seed=0)
    results = []
    for nt in (1, 2, 4):
        m.zero_grad()
        logits, loss = m.forward(idx, targets, threads=nt)
        m.backward(threads=nt)
        results.append((nt, logits, loss, m.flat_grads.copy(), m.eval().forward(idx, threads=nt)))
        m.train()
    _, l1, loss1, g1, e1 = results[0]
    assert g1.any()
    for nt, logits, loss, g, e in results[1:]:
        assert np.array_equal(logits, l1), nt
        assert loss == loss1, nt
        assert np.array_equal(g, g1), nt
        assert np.array_equal(e, l1), nt


def test_simd_levels_match_reference(params64, simd):
    idx, targets = batch(2, 70, seed=21, ignore=[(1, 5)])
    want_logits, want_loss, cache = ref.forward(params64, idx, targets, n_head=NH)
    want = ref.backward(params64, cache)
    m = loaded_model(params64)
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    assert_close(logits, want_logits, rtol=1e-4, what=f"{simd} logits")
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    got = m.grads()
    for l in range(L):  # the zero key-bias block, absolutely
        name = f"transformer.h.{l}.attn.c_attn.bias"
        assert np.abs(got[name][C:2 * C]).max() <= 1e-4 * np.abs(want[name]).max()
    assert_grads_close(got, want, rtol=1e-4, what=f"{simd}: ")


def run_threads(n, fn):
    """Run fn(i) in n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors, out = [], [None] * n

    def body(i):
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_concurrent_eval_forwards_equal_serial():
    m = make_model(**MID, seed=2).eval()
    inputs = [mid_batch(1 + i % 3, 20 + 7 * i, seed=i) for i in range(8)]
    serial = [m.forward(i, t) for i, t in inputs]
    reps = 3

    def work(k):
        res = []
        for r in range(reps):
            j = (k + r) % 8  # every thread sees several inputs, in its own order
            res.append((j, m.forward(*inputs[j], threads=1 + (k + r) % 2)))
        return res

    for res in run_threads(8, work):
        for j, (logits, loss) in res:
            assert np.array_equal(logits, serial[j][0]) and loss == serial[j][1], j


def test_forward_releases_the_gil():
    """While one thread is inside forward, the main thread polls the default pool: it can see
    the call's rented activations only if it runs Python while the call is in C, because the
    rent and the return both happen inside the one C call. Counted, not timed."""
    m = make_model(**MID, seed=3).eval()
    idx, _ = mid_batch(4, 64, seed=1)
    m.forward(idx)  # warm the pool
    pool = sm.default_pool()
    gc.collect()
    base = pool.stats()["outstanding_buffers"]
    seen = threading.Event()
    calls = [0]

    def worker():
        while not seen.is_set() and calls[0] < 2000:
            m.forward(idx, threads=1)
            calls[0] += 1

    t = threading.Thread(target=worker)
    t.start()
    inside = polls = 0
    while t.is_alive():
        polls += 1
        if pool.stats()["outstanding_buffers"] > base:
            inside += 1
            seen.set()
    t.join()
    assert inside >= 1, f"no poll ran during a forward ({polls} polls, {calls[0]} calls)"
    assert pool.stats()["outstanding_buffers"] == base


def train_steps(m, seed, steps=3, threads=2):
    r = np.random.default_rng(seed)
    mv, vv = np.zeros_like(m.flat_params), np.zeros_like(m.flat_params)
    losses = []
    for step in range(1, steps + 1):
        idx = r.integers(0, m.config.vocab_size, (2, 33)).astype(np.int32)
        m.zero_grad()
        losses.append(m.forward(idx, np.roll(idx, -1, 1), threads=threads)[1])
        m.backward(threads=threads)
        _core.gpt_adamw(m.flat_params, mv, vv, m.flat_grads, m.core_config, 1e-2, 0.9, 0.95, 1e-8, 0.1, step,
                        threads=threads)
    return losses, m.flat_params.copy()


def test_two_models_trained_in_two_threads_equal_serial():
    kw = dict(MID, dropout=0.1)
    serial = [train_steps(make_model(**kw, seed=10 + i), seed=i) for i in range(2)]
    models = [make_model(**kw, seed=10 + i) for i in range(2)]
    concurrent = run_threads(2, lambda i: train_steps(models[i], seed=i))
    for (ls, ps), (lc, pc) in zip(serial, concurrent):
        assert ls == lc and ls[0] != ls[-1]
        assert np.array_equal(ps, pc)
    assert not np.array_equal(serial[0][1], serial[1][1])


# ==== 7. Errors =================================================================================

@pytest.fixture
def tiny():
    return make_model(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8)


def test_bad_ids(tiny):
    ok = np.zeros((2, 4), np.int32)
    cases = [
        (dict(idx=np.full((2, 4), V, np.int32)), ValidationError, "idx"),
        (dict(idx=np.full((2, 4), -1, np.int32)), ValidationError, "idx"),
        (dict(idx=np.full((2, 4), 2 ** 32, np.int64)), ValidationError, "idx"),  # wraps to 0
        (dict(idx=np.full((2, 4), -(2 ** 32) + 3, np.int64)), ValidationError, "idx"),
        (dict(idx=np.full((2, 4), 2 ** 64 - 1, np.uint64)), ValidationError, "idx"),
        (dict(idx=ok, targets=np.full((2, 4), -2, np.int32)), ValidationError, "targets"),
        (dict(idx=ok, targets=np.full((2, 4), V, np.int32)), ValidationError, "targets"),
        (dict(idx=ok, targets=np.full((2, 4), 2 ** 32 - 1, np.int64)), ValidationError, "targets"),
        (dict(idx=np.zeros((1, 17), np.int32)), ValidationError, "idx.*block_size = 16"),
        (dict(idx=np.zeros(4, np.int32)), ValidationError, "idx must be 2-D"),
        (dict(idx=np.zeros((2, 2, 2), np.int32)), ValidationError, "idx must be 2-D"),
        (dict(idx=np.zeros((), np.int32)), ValidationError, "idx must be 2-D"),
        (dict(idx=np.zeros((2, 4), np.float32)), TypeError, "idx"),
        (dict(idx=np.zeros((2, 4), bool)), TypeError, "idx"),
        (dict(idx=[["a", "b"]]), TypeError, "idx"),
        (dict(idx=[[1, 2], [3]]), ValidationError, "idx"),  # ragged
        (dict(idx=ok, targets=np.zeros((2, 4), np.float64)), TypeError, "targets"),
        (dict(idx=ok, targets=np.zeros((2, 4), bool)), TypeError, "targets"),
        (dict(idx=np.zeros((0, 4), np.int32)), ValidationError, "idx must have at least one"),
        (dict(idx=np.zeros((2, 0), np.int64)), ValidationError, "idx must have at least one"),
        (dict(idx=ok, targets=np.zeros((2, 3), np.int32)), ValidationError, "targets must have"),
        (dict(idx=ok, targets=np.zeros((4, 2), np.int32)), ValidationError, "targets must have"),
        (dict(idx=ok, targets=np.zeros(8, np.int32)), ValidationError, "targets must be 2-D"),
        (dict(idx=ok, targets=np.full((2, 4), -1, np.int32)), ValidationError,
         "targets has no position"),
    ]
    for mode in ("train", "eval"):
        tiny.train(mode == "train")
        for kw, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                tiny.forward(**kw)
        with pytest.raises(ValidationError, match="threads"):
            tiny.forward(ok, threads=0)
    # a failed forward leaves nothing for backward
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        tiny.train().backward()


def test_backward_needs_one_train_forward_with_targets(tiny):
    idx, targets = np.array([[1, 2, 3]], np.int32), np.array([[2, 3, 4]], np.int32)
    with pytest.raises(ValidationError, match="backward\\(\\) needs a train-mode forward"):
        tiny.backward()
    tiny.forward(idx)  # no targets: nothing to differentiate
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        tiny.backward()
    tiny.forward(idx, targets)
    tiny.backward()
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        tiny.backward()  # twice after one forward
    g = tiny.flat_grads.copy()
    fresh = make_model(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8).eval()
    fresh.forward(idx, targets)
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        fresh.backward()  # eval-mode forward keeps no state
    # an all -1 training forward drops its state: backward cannot use a stale one
    tiny.forward(idx, targets)
    with pytest.raises(ValidationError, match="targets"):
        tiny.forward(idx, np.full_like(targets, -1))
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        tiny.backward()
    assert np.array_equal(tiny.flat_grads, g)  # failed calls added nothing
    tiny.forward(idx, targets)
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValidationError, match="loss_scale"):
            tiny.backward(loss_scale=bad)
    with pytest.raises(TypeError, match="loss_scale"):
        tiny.backward(loss_scale="1")
    tiny.backward(loss_scale=2.0)  # the failed calls did not use up the forward
    assert_close(tiny.flat_grads, 3.0 * g, rtol=1e-6)


def test_load_state_dict_errors_change_nothing(tiny):
    good = {k: v.copy() + 0.5 for k, v in tiny.state_dict().items()}
    before = tiny.flat_params.copy()
    last = "transformer.ln_f.bias"  # staged after every other tensor: a late failure
    cases = [
        ({k: v for k, v in good.items() if k != "transformer.h.0.ln_1.bias"},
         ValidationError, "missing.*transformer.h.0.ln_1.bias"),
        ({**good, "transformer.h.0.attn.bias": np.zeros(3)}, ValidationError,
         "unexpected.*transformer.h.0.attn.bias"),
        ({**good, last: np.zeros(9, np.float32)}, ValidationError,
         f"{last} must have shape \\(8,\\)"),
        ({**good, last: np.zeros((8, 1), np.float32)}, ValidationError, f"{last} must have shape"),
        ({**good, last: np.full(8, np.nan, np.float32)}, ValidationError, f"{last} contains NaN"),
        ({**good, last: np.full(8, np.inf)}, ValidationError, f"{last} contains NaN or infinite"),
        ({**good, last: np.full(8, 1e39)}, ValidationError, f"{last} contains NaN or infinite"),
        ({**good, last: np.zeros(8, complex)}, ValidationError, f"{last} must hold real numbers"),
        ({**good, last: np.array(["x"] * 8)}, ValidationError, f"{last} must hold real numbers"),
        ({**good, "lm_head.weight": good["transformer.wte.weight"] + 1}, ValidationError,
         "lm_head.weight differs"),
        ({**good, "lm_head.weight": tiny.state_dict()["transformer.wte.weight"]}, ValidationError,
         "lm_head.weight differs"),  # equal to the OLD wte, not to the one being loaded
    ]
    for state, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            tiny.load_state_dict(state)
        assert np.array_equal(tiny.flat_params, before), msg
    with pytest.raises(TypeError, match="state must be a mapping"):
        tiny.load_state_dict([("a", 1)])
    # lm_head equal to wte is accepted; float64 and integer arrays convert
    head = good["transformer.wte.weight"].astype(np.float64)
    tiny.load_state_dict({**good, "lm_head.weight": head})
    assert all(np.array_equal(tiny.state_dict()[k], good[k]) for k in good)
    tiny.load_state_dict({"transformer.ln_f.bias": np.arange(8)}, strict=False)
    assert np.array_equal(tiny.state_dict()["transformer.ln_f.bias"], np.arange(8))
    assert np.array_equal(tiny.state_dict()["transformer.ln_f.weight"],
                          good["transformer.ln_f.weight"])


def test_disposed_model(tiny):
    idx = np.array([[1, 2]], np.int32)
    tiny.forward(idx, idx)
    tiny.dispose()
    assert tiny.disposed and tiny._state is None
    calls = [lambda: tiny.forward(idx), lambda: tiny.forward(idx, idx), tiny.backward,
             tiny.state_dict, tiny.grads, lambda: tiny.load_state_dict({}), tiny.zero_grad,
             tiny.train, tiny.eval, lambda: tiny(idx), tiny.__enter__]
    for call in calls:
        with pytest.raises(ObjectDisposedError, match="disposed"):
            call()
    tiny.dispose()  # idempotent
    with make_model(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8) as m:
        m.forward(idx)
    assert m.disposed
    with pytest.raises(ObjectDisposedError):
        m.forward(idx)
    assert issubclass(ObjectDisposedError, SmallMindError)


def test_constructor_and_core_argument_errors(tiny):
    cfg = sm.ModelConfig(V, 16, 1, 2, 8)
    with pytest.raises(TypeError, match="either a ModelConfig or keyword"):
        sm.TransformerModel(cfg, n_layer=2)
    with pytest.raises(TypeError, match="config must be a ModelConfig"):
        sm.TransformerModel({"vocab_size": V})
    with pytest.raises(ValidationError, match="ModelConfig.n_head"):
        sm.TransformerModel(vocab_size=V, block_size=16, n_layer=1, n_head=0, n_embd=8)

    c = tiny.core_config
    params = tiny.flat_params
    idx = np.zeros((1, 3), np.int32)
    n = params.size
    with pytest.raises(ValidationError, match=f"params must hold {n} floats, got {n - 16}"):
        _core.gpt_forward(params[:-16].copy(), c, idx)
    with pytest.raises(ValidationError, match="params must hold"):
        _core.gpt_forward(np.zeros(n + 1, np.float32), c, idx)
    with pytest.raises(TypeError, match="params must have dtype float32"):
        _core.gpt_forward(params.astype(np.float64), c, idx)
    with pytest.raises(ValidationError, match="params must be 1-D"):
        _core.gpt_forward(params.reshape(1, -1), c, idx)
    with pytest.raises(TypeError, match="cfg"):
        _core.gpt_forward(params, c[:4], idx)
    with pytest.raises(ValidationError, match="invalid GPT configuration"):
        _core.gpt_forward(params, (V, 16, 1, 3, 8), idx)
    with pytest.raises(TypeError, match="idx must have dtype int32"):
        _core.gpt_forward(params, c, idx.astype(np.int64))
    with pytest.raises(ValidationError, match="logits must have shape"):
        _core.gpt_forward(params, c, idx, None, np.empty((1, 3, V + 1), np.float32))
    with pytest.raises(ValidationError, match="dropout must be in"):
        _core.gpt_forward(params, c, idx, None, None, None, 1.0)
    with pytest.raises(ValidationError, match="seed"):
        _core.gpt_forward(params, c, idx, None, None, None, 0.5, -1)
    state = _core.GPTState(c, 1, 3)
    with pytest.raises(ValidationError, match="differs from the training state"):
        _core.gpt_forward(params, c, np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32),
                          None, state)
    other = (V, 16, 1, 1, 8)
    with pytest.raises(ValidationError, match="another configuration"):
        _core.gpt_forward(np.zeros(_core.gpt_layout(other)["num_params"], np.float32), other,
                          idx, idx, None, state)
    with pytest.raises(ValidationError, match="T must be in"):
        _core.GPTState(c, 1, 17)
    with pytest.raises(ValidationError, match="B must be in"):
        _core.GPTState(c, 0, 3)
    grads = np.zeros_like(params)
    with pytest.raises(ValidationError, match="backward\\(\\) needs"):
        _core.gpt_backward(grads, state, params)
    with pytest.raises(ValidationError, match="grads must have the shape of params"):
        _core.gpt_backward(grads[:-1].copy(), state, params)
    with pytest.raises(ValidationError, match="grads must not overlap params"):
        _core.gpt_backward(params, state, params)
    state.close()
    state.close()  # idempotent
    assert state.closed and state.nbytes == 0 and state.shape is None
    with pytest.raises(ObjectDisposedError, match="freed"):
        _core.gpt_forward(params, c, idx, idx, None, state)
    with pytest.raises(ObjectDisposedError, match="freed"):
        _core.gpt_backward(grads, state, params)
    with pytest.raises(ValidationError, match="beta1 and beta2"):
        _core.gpt_adamw(params, grads, grads.copy(), grads, c, 1e-3, 1.0, 0.9, 1e-8, 0.0, 1)
    with pytest.raises(ValidationError, match="step"):
        _core.gpt_adamw(params, grads, grads.copy(), grads, c, 1e-3, 0.9, 0.9, 1e-8, 0.0, 0)


# ==== 8. Memory ==================================================================================

def test_pool_holds_nothing_after_eval_and_reuses_the_training_state():
    pool = sm.default_pool()
    gc.collect()
    gc.disable()  # a collection mid-test could return some other test's buffers
    try:
        base = pool.stats()
        m = make_model(**MID, seed=4)
        idx, targets = mid_batch(2, 40, seed=7)
        m.eval()
        m.forward(idx)
        m.forward(idx, targets)
        s = pool.stats()
        assert s["rents"] > base["rents"]  # the pass did rent its activations...
        assert s["outstanding_buffers"] == base["outstanding_buffers"]  # ...and returned them
        assert s["outstanding_bytes"] == base["outstanding_bytes"]

        m.train()
        m.forward(idx, targets)
        m.backward()
        state = m._state
        first = pool.stats()
        assert first["outstanding_buffers"] > base["outstanding_buffers"]
        assert first["outstanding_bytes"] - base["outstanding_bytes"] >= state.nbytes > 0
        assert m.nbytes == m.flat_params.nbytes + m.flat_grads.nbytes + state.nbytes
        for _ in range(3):  # steady state: the same state, no new allocation
            m.zero_grad()
            m.forward(idx, targets)
            m.backward()
            m.forward(idx)  # dropout-free train-mode inference in between
        s = pool.stats()
        assert m._state is state
        assert s["misses"] == first["misses"] and s["rents"] > first["rents"]
        assert s["outstanding_buffers"] == first["outstanding_buffers"]
        assert s["outstanding_bytes"] == first["outstanding_bytes"]
        # another batch shape replaces the state and gives the old one back
        i2, t2 = mid_batch(1, 9, seed=8)
        m.forward(i2, t2)
        assert m._state is not state and state.closed and m._state.shape == (1, 9)
        s = pool.stats()
        assert s["outstanding_buffers"] == first["outstanding_buffers"]
        m.free_training_state()
        assert m._state is None
        s = pool.stats()
        assert s["outstanding_buffers"] == base["outstanding_buffers"]
        assert s["outstanding_bytes"] == base["outstanding_bytes"]
        m.free_training_state()  # idempotent
        # dispose gives the state back as well
        m.forward(idx, targets)
        assert pool.stats()["outstanding_buffers"] > base["outstanding_buffers"]
        m.dispose()
        s = pool.stats()
        assert s["outstanding_buffers"] == base["outstanding_buffers"]
        assert s["outstanding_bytes"] == base["outstanding_bytes"]
        # dropping a model with a live state returns it too
        m2 = make_model(**MID, seed=5)
        m2.forward(idx, targets)
        del m2
        assert pool.stats()["outstanding_buffers"] == base["outstanding_buffers"]
    finally:
        gc.enable()


def test_wrong_dtype_is_both_validation_and_type_error():
    m = sm.TransformerModel(sm.ModelConfig(11, 8, 1, 1, 4))
    with pytest.raises(sm.DTypeError) as e:
        m.forward(np.zeros((1, 3), np.float32))
    assert isinstance(e.value, sm.ValidationError) and isinstance(e.value, TypeError)
    assert "idx" in str(e.value)


def test_backward_refers_to_the_latest_forward_only():
    m = sm.TransformerModel(sm.ModelConfig(11, 8, 1, 1, 4))
    idx = np.zeros((1, 3), np.int32)
    m.forward(idx, idx)
    m.eval().forward(idx)                      # any later forward makes the saved pass stale
    with pytest.raises(sm.ValidationError, match="backward"):
        m.backward()
    m.train().forward(idx, idx)
    m.forward(idx)                             # a train-mode forward without targets too
    with pytest.raises(sm.ValidationError, match="backward"):
        m.backward()
    m.forward(idx, idx)
    m.backward()                               # the fresh one works


def test_batches_run_in_chunks_with_the_same_results(params64):
    """sm_model.c runs a pass over chunks of ~1024 tokens (here 16 sequences of 64): a batch of
    37 sequences takes three chunks (16, 16, 5). Logits, loss and every gradient still match
    the reference, and dropout masks are indexed by position in the whole batch."""
    B, T = 37, 64
    m = loaded_model(params64)
    idx, targets = batch(B, T, seed=77, ignore=[(0, 0), (36, 63), (20, 5)])
    want_logits, want_loss, cache = ref.forward(params64, idx, targets, n_head=NH)
    want = ref.backward(params64, cache)
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    assert_close(logits, want_logits, rtol=1e-4, what="chunked logits")
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    m.backward()
    got = m.grads()
    assert_grads_close({k: got[k] for k in want}, want, rtol=1e-4, what="chunked: ")
    # dropout across chunks: the masks are those of the whole (B, T, C) tensor
    p, seed = 0.2, 99
    ones = np.ones((B, T, C), np.float32)
    masks = {s: _core.dropout_forward(ones, p, seed, s).astype(np.float64) for s in range(1 + 2 * L)}
    masks.update(att_masks(B, T, p, seed))
    d_logits, d_loss = masked_reference(params64, idx, targets, NH, masks)
    state = _core.GPTState(m.core_config, B, T)
    out = np.empty((B, T, V), np.float32)
    loss_t, _ = _core.gpt_forward(m.flat_params, m.core_config, idx, targets, out, state, p, seed)
    assert_close(out, d_logits, rtol=1e-4, what="chunked dropout logits")
    assert abs(loss_t - d_loss) <= 1e-5 * d_loss
    inf = np.empty_like(out)
    _core.gpt_forward(m.flat_params, m.core_config, idx, targets, inf, None, p, seed)
    assert np.array_equal(inf, out)


def test_dropout_mask_is_the_same_at_every_simd_level(simd):
    """sm_drop_apply hashes eight indices per step with AVX-512 and one at a time elsewhere:
    the masks must agree bit for bit (odd lengths exercise the vector tail)."""
    x = np.arange(1, 1 + 4099, dtype=np.float32)
    got = _core.dropout_forward(x, 0.37, 123456789, 5)
    sm.set_simd_level("generic")
    try:
        want = _core.dropout_forward(x, 0.37, 123456789, 5)
    finally:
        sm.set_simd_level(None)
    assert np.array_equal(got, want)
    kept = got != 0
    assert np.allclose(got[kept], x[kept] / np.float32(0.63), rtol=1e-6)
    assert abs((~kept).mean() - 0.37) < 0.05
    # a NaN input stays NaN whether its element is kept or dropped
    y = x.copy()
    y[::7] = np.nan
    assert np.isnan(_core.dropout_forward(y, 0.37, 1, 2)[::7]).all()


def test_gradient_block_is_allocated_only_for_training():
    m = sm.TransformerModel(sm.ModelConfig(50, 16, 2, 2, 16))
    params_only = m.nbytes
    assert params_only == m.flat_params.nbytes
    m.eval().forward(np.zeros((1, 4), np.int32))
    m.zero_grad()
    assert m.nbytes == params_only                  # serving never allocates gradients
    g = m.grads()
    assert m.nbytes == 2 * params_only and all(not v.any() for v in g.values())
    m.train().forward(np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))
    m.backward()
    assert any(v.any() for v in m.grads().values())
    assert np.shares_memory(m.grads()["transformer.wte.weight"], m.flat_grads)
