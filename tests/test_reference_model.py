"""test_reference_model.py - proves tests/reference_model.py (the float64 numpy GPT-2 that the C
model is tested against) right: its analytic backward matches central finite differences on
every element of every parameter of a tiny model (with some targets ignored), the model is
causal, the loss is the mean negative log-softmax at the counted targets, and - where torch is
installed - logits, loss and every gradient match bench/torch_gpt.py in float64."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_model as ref  # noqa: E402

V, BLOCK, N_LAYER, N_HEAD, C = 11, 8, 2, 2, 8
B, T = 2, 5


@pytest.fixture(scope="module")
def setup():
    # weight_std 0.3: sharp attention, so q and k gradients are as large as v's (see init_params)
    params = ref.init_params(V, BLOCK, N_LAYER, C, seed=7, weight_std=0.3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, V, size=(B, T))
    idx[1, 3] = idx[0, 1]  # a repeated token: its wte rows must accumulate, not overwrite
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 2] = -1
    targets[1, 0] = -1
    targets[1, 4] = -1
    return params, idx, targets


def test_param_shapes_order_and_init():
    shapes = ref.param_shapes(V, BLOCK, N_LAYER, C)
    names = list(shapes)
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert names[2] == "transformer.h.0.ln_1.weight"
    assert names[13] == "transformer.h.0.mlp.c_proj.bias"
    assert names[14] == "transformer.h.1.ln_1.weight"
    assert len(names) == 2 + 12 * N_LAYER + 2
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (C, 3 * C)
    assert shapes["transformer.h.1.mlp.c_proj.weight"] == (4 * C, C)
    p = ref.init_params(V, BLOCK, N_LAYER, C, seed=1)
    assert {k: v.shape for k, v in p.items()} == shapes
    assert all(v.dtype == np.float64 for v in p.values())
    # biases and LN parameters are off their GPT-2 init values so gradient checks see them
    assert np.all(p["transformer.h.0.attn.c_attn.bias"] != 0)
    assert np.all(p["transformer.ln_f.weight"] != 1)
    q = ref.init_params(V, BLOCK, N_LAYER, C, seed=1)
    assert all(np.array_equal(p[k], q[k]) for k in p)


def test_backward_matches_finite_differences_every_element(setup):
    params, idx, targets = setup
    _, loss, cache = ref.forward(params, idx, targets, n_head=N_HEAD)
    grads = ref.backward(params, cache)
    assert set(grads) == set(params)
    for name, g in grads.items():
        assert g.shape == params[name].shape
        # eps 1e-5 balances truncation (~eps^2) against rounding (~1e-16 / eps) for this model
        num = ref.numerical_grad(params, idx, targets, N_HEAD, name, np.arange(g.size), eps=1e-5)
        num = num.reshape(g.shape)
        if name == "transformer.wpe.weight":  # positions >= T never take part
            assert np.all(g[T:] == 0) and np.all(num[T:] == 0)
            g, num = g[:T], num[:T]
        # c_attn's q, k and v columns are checked each against its own scale
        parts = np.split(np.arange(g.shape[-1]), 3) if "c_attn" in name else [slice(None)]
        for which, part in enumerate(parts):
            gp, nump = g[..., part], num[..., part]
            err = np.abs(gp - nump)
            if name.endswith("c_attn.bias") and which == 1:
                # the key bias adds q . b_k to every score of a query row: softmax ignores it,
                # so its gradient is exactly zero (analytically up to rounding)
                assert np.abs(gp).max() < 1e-14 and np.abs(nump).max() < 1e-9
                continue
            scale = np.abs(nump).max()
            assert scale > 1e-4, f"{name}: gradient is (nearly) zero, the check would prove nothing"
            assert err.max() <= 1e-6 * scale, f"{name}: max err {err.max():.3e}, scale {scale:.3e}"
            # element by element, with an absolute floor for the finite-difference error
            assert np.all(err <= 1e-6 * np.abs(nump) + 1e-8), f"{name}: element error too large"


def test_ignored_targets_do_not_contribute(setup):
    params, idx, targets = setup
    _, loss, cache = ref.forward(params, idx, targets, n_head=N_HEAD)
    g = ref.backward(params, cache)
    # -1 is "ignore", not numpy's "last class": counting those positions as class V-1 differs
    as_last = np.where(targets == -1, V - 1, targets)
    _, loss_last, cache_last = ref.forward(params, idx, as_last, n_head=N_HEAD)
    assert loss_last != loss
    g_last = ref.backward(params, cache_last)
    assert not np.allclose(g["transformer.ln_f.bias"], g_last["transformer.ln_f.bias"])
    # the mean is over counted positions only: dropping row 1 (ignore all of it) gives the
    # mean over row 0's counted positions
    row0 = targets.copy()
    row0[1] = -1
    _, loss0, _ = ref.forward(params, idx, row0, n_head=N_HEAD)
    _, loss0b, _ = ref.forward(params, idx[:1], targets[:1], n_head=N_HEAD)
    assert abs(loss0 - loss0b) < 1e-14
    all_ignored = np.full((B, T), -1)
    assert np.isnan(ref.forward(params, idx, all_ignored, n_head=N_HEAD)[1])


def test_loss_is_mean_negative_log_softmax(setup):
    params, idx, targets = setup
    logits, loss, _ = ref.forward(params, idx, targets, n_head=N_HEAD)
    assert logits.shape == (B, T, V) and logits.dtype == np.float64
    terms = []
    for b in range(B):
        for t in range(T):
            if targets[b, t] == -1:
                continue
            row = logits[b, t]
            terms.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[b, t]])
    assert len(terms) == B * T - 3
    assert abs(loss - np.mean(terms)) < 1e-12
    logits2, loss2, _ = ref.forward(params, idx, None, n_head=N_HEAD)
    assert loss2 is None and np.array_equal(logits, logits2)


def test_causality(setup):
    params, idx, targets = setup
    logits, _, _ = ref.forward(params, idx, n_head=N_HEAD)
    for t in range(T):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1) % V
        l2, _, _ = ref.forward(params, changed, n_head=N_HEAD)
        assert np.array_equal(l2[:, :t], logits[:, :t]), f"position < {t} changed"
        assert not np.allclose(l2[:, t:], logits[:, t:]), f"position {t} did not change"


def test_attention_is_causal_per_head_and_layout():
    # q/k/v at column offsets 0, C, 2C, head h at columns h*hs:(h+1)*hs: a numpy loop
    # over heads and positions gives the same result as the batched version
    rng = np.random.default_rng(5)
    nh, hs = 3, 4
    Cc = nh * hs
    qkv = rng.standard_normal((2, 6, 3 * Cc))
    y, _ = ref.attention(qkv, nh)
    want = np.zeros((2, 6, Cc))
    for b in range(2):
        for h in range(nh):
            cols = slice(h * hs, (h + 1) * hs)
            q, k, v = qkv[b, :, cols], qkv[b, :, Cc:][:, cols], qkv[b, :, 2 * Cc:][:, cols]
            for t in range(6):
                s = q[t] @ k[:t + 1].T / np.sqrt(hs)
                p = np.exp(s - s.max())
                want[b, t, cols] = (p / p.sum()) @ v[:t + 1]
    assert np.allclose(y, want, rtol=1e-12, atol=1e-14)


def test_bad_inputs(setup):
    params, idx, targets = setup
    with pytest.raises(TypeError):
        ref.forward(params, idx, targets)
    with pytest.raises(ValueError):
        ref.forward(params, np.zeros((1, BLOCK + 1), dtype=int), n_head=N_HEAD)
    with pytest.raises(ValueError):
        ref.forward(params, np.full((1, 2), V), n_head=N_HEAD)
    with pytest.raises(ValueError):
        ref.forward(params, idx, np.full((B, T), V), n_head=N_HEAD)
    with pytest.raises(ValueError):
        ref.backward(params, ref.forward(params, idx, n_head=N_HEAD)[2])


@pytest.fixture
def torch_gpt():
    """bench/torch_gpt.py with torch on one thread: on a shared machine torch's OpenMP team
    stalls on tiny ops when another process holds a core (seconds instead of milliseconds)."""
    torch = pytest.importorskip("torch")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import torch_gpt as module
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(saved)


def test_matches_torch_float64(setup, torch_gpt):
    import torch

    params, idx, targets = setup
    cfg = torch_gpt.TorchGPTConfig(V, BLOCK, N_LAYER, N_HEAD, C)
    model = torch_gpt.from_numpy_state(cfg, params, dtype=torch.float64)
    assert list(model.state_dict()) == list(ref.param_shapes(V, BLOCK, N_LAYER, C))
    back = torch_gpt.to_numpy_state(model)
    assert all(np.array_equal(back[k], params[k]) for k in params)

    logits, loss, cache = ref.forward(params, idx, targets, n_head=N_HEAD)
    grads = ref.backward(params, cache)
    tl, tloss = model(torch.tensor(idx), torch.tensor(targets))
    tloss.backward()
    assert np.allclose(tl.detach().numpy(), logits, rtol=1e-10, atol=1e-12)
    assert abs(tloss.item() - loss) < 1e-12
    for name, p in model.named_parameters():
        assert np.allclose(p.grad.numpy(), grads[name], rtol=1e-9, atol=1e-13), name


def test_torch_model_init_and_optimizer_groups(torch_gpt):
    import torch

    cfg = torch_gpt.TorchGPTConfig(V, BLOCK, 4, N_HEAD, 64)
    m = torch_gpt.gpt2_init_(torch_gpt.TorchGPT(cfg), seed=3)
    sd = m.state_dict()
    assert "lm_head.weight" not in sd
    assert torch.all(sd["transformer.h.0.ln_1.weight"] == 1)
    assert torch.all(sd["transformer.h.0.attn.c_attn.bias"] == 0)
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std().item() - 0.02) < 0.002
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std().item()
               - 0.02 / np.sqrt(8)) < 0.0008
    m2 = torch_gpt.gpt2_init_(torch_gpt.TorchGPT(cfg), seed=3)
    assert all(torch.equal(sd[k], m2.state_dict()[k]) for k in sd)
    opt = torch_gpt.make_optimizer(m, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in decay}
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert len(names) == 4 * 4 and all(n.endswith("weight") and ".ln_" not in n for n in names)
    assert "transformer.wte.weight" not in names
    x = torch.randint(0, V, (2, BLOCK))
    l0 = torch_gpt.train_step(m, opt, x, x)
    for _ in range(5):
        l1 = torch_gpt.train_step(m, opt, x, x)
    assert isinstance(l0, float) and l1 < l0
