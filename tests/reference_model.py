"""reference_model.py - a float64 numpy GPT-2 (Hugging Face GPT2LMHeadModel semantics) with a
hand-written backward pass and central finite differences: the reference that smallmind's C
model is tested against. Readable over fast; no smallmind import. Leaves out dropout, the KV
cache and any optimizer: it computes logits, the loss and the gradient of the loss, nothing else.

Parameters are a dict keyed by the GPT-2 names, weights laid out (in, out) as GPT-2's Conv1D, so
every projection is y = x @ W + b. The LM head is tied to the token embedding:
logits = ln_f(x) @ wte.T. Loss is the mean cross-entropy over positions whose target is not -1.
"""
import numpy as np

LN_EPS = 1e-5
GELU_K = np.sqrt(2.0 / np.pi)
GELU_C = 0.044715

_LAYER_PARAMS = [  # suffix, shape as a function of C
    ("ln_1.weight", lambda C: (C,)),
    ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)),
    ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)),
    ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)),
    ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)),
    ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)),
    ("mlp.c_proj.bias", lambda C: (C,)),
]


def param_shapes(vocab_size, block_size, n_layer, n_embd):
    """Name -> shape, in GPT-2 order: wte, wpe, then each layer's tensors, then ln_f."""
    C = n_embd
    shapes = {"transformer.wte.weight": (vocab_size, C),
              "transformer.wpe.weight": (block_size, C)}
    for i in range(n_layer):
        for suffix, shape in _LAYER_PARAMS:
            shapes[f"transformer.h.{i}.{suffix}"] = shape(C)
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def init_params(vocab_size, block_size, n_layer, n_embd, seed, weight_std=0.02):
    """Random float64 parameters for tests (NOT the GPT-2 init): weight matrices ~ N(0,
    weight_std), embeddings ~ N(0, 0.1) so activations are not all near zero, biases ~
    N(0, 0.02), LayerNorm
    weights ~ 1 + N(0, 0.1) and biases ~ N(0, 0.1), so that every term of every gradient is
    exercised (a bias of exactly 0 or a gain of exactly 1 hides mistakes). With weight_std 0.02
    and a tiny n_embd, attention scores are ~0 and the softmax nearly uniform, so the q and k
    gradients are hundreds of times smaller than v's: gradient checks should pass a larger
    weight_std (~0.3) to make attention sharp enough to test them."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(vocab_size, block_size, n_layer, n_embd).items():
        if ".ln_" in name:
            if name.endswith(".weight"):
                p = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                p = 0.1 * rng.standard_normal(shape)
        elif name.endswith("wte.weight") or name.endswith("wpe.weight"):
            p = 0.1 * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            p = weight_std * rng.standard_normal(shape)
        else:
            p = 0.02 * rng.standard_normal(shape)
        params[name] = p.astype(np.float64)
    return params


def _dims(params):
    V, C = params["transformer.wte.weight"].shape
    block_size = params["transformer.wpe.weight"].shape[0]
    n_layer = 0
    while f"transformer.h.{n_layer}.ln_1.weight" in params:
        n_layer += 1
    return V, block_size, n_layer, C


# ---- building blocks (forward returns what its backward needs) -------------------------------

def layernorm(x, w, b):
    """LayerNorm over the last axis, biased variance, eps 1e-5. Returns y and (xhat, rstd)."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = (x - mean) * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dy, w, saved):
    """dx, dw, db of y = xhat * w + b."""
    xhat, rstd = saved
    C = dy.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(0)
    db = dy.reshape(-1, C).sum(0)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dw, db


def gelu(x):
    """GELU, tanh approximation (GPT-2's "gelu_new")."""
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + GELU_C * x ** 3)))


def gelu_backward(dy, x):
    t = np.tanh(GELU_K * (x + GELU_C * x ** 3))
    dudx = GELU_K * (1.0 + 3.0 * GELU_C * x ** 2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)


def attention(qkv, n_head):
    """Causal multi-head self-attention. qkv (B, T, 3C) -> y (B, T, C) before c_proj."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head

    def heads(a):  # (B, T, C) -> (B, nh, T, hs)
        return a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)

    q, k, v = heads(qkv[..., :C]), heads(qkv[..., C:2 * C]), heads(qkv[..., 2 * C:])
    scale = 1.0 / np.sqrt(hs)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale            # (B, nh, T, T)
    mask = np.tril(np.ones((T, T), dtype=bool))
    s = np.where(mask, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)                        # (B, nh, T, T), 0 above the diagonal
    y = p @ v                                            # (B, nh, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return y, (q, k, v, p, scale)


def attention_backward(dy, saved):
    """dqkv (B, T, 3C) from dy (B, T, C)."""
    q, k, v, p, scale = saved
    B, nh, T, hs = q.shape
    C = nh * hs
    dy = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dp = dy @ v.transpose(0, 1, 3, 2)                    # (B, nh, T, T)
    # softmax backward; masked entries have p = 0, so they get ds = 0 as well
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = (ds @ k) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q) * scale

    def merge(a):  # (B, nh, T, hs) -> (B, T, C)
        return a.transpose(0, 2, 1, 3).reshape(B, T, C)

    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)


# ---- the model ---------------------------------------------------------------------------------

def forward(params, idx, targets=None, n_head=None):
    """logits (B, T, V) float64, loss (mean cross-entropy over targets != -1, or None without
    targets; nan when every target is -1, as PyTorch) and the cache backward() needs."""
    if n_head is None:
        raise TypeError("forward() needs n_head")
    V, block_size, n_layer, C = _dims(params)
    idx = np.asarray(idx)
    B, T = idx.shape
    if T > block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {block_size}")
    if C % n_head:
        raise ValueError(f"n_embd {C} is not a multiple of n_head {n_head}")
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= V:
        raise ValueError("token id out of range")
    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}

    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][:T]  # (B, T, C)
    layers = []
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        ln1, ln1_saved = layernorm(x, P[h + "ln_1.weight"], P[h + "ln_1.bias"])
        qkv = ln1 @ P[h + "attn.c_attn.weight"] + P[h + "attn.c_attn.bias"]    # (B, T, 3C)
        atty, att_saved = attention(qkv, n_head)                                # (B, T, C)
        x = x + atty @ P[h + "attn.c_proj.weight"] + P[h + "attn.c_proj.bias"]
        ln2, ln2_saved = layernorm(x, P[h + "ln_2.weight"], P[h + "ln_2.bias"])
        fch = ln2 @ P[h + "mlp.c_fc.weight"] + P[h + "mlp.c_fc.bias"]           # (B, T, 4C)
        fcg = gelu(fch)
        x = x + fcg @ P[h + "mlp.c_proj.weight"] + P[h + "mlp.c_proj.bias"]
        layers.append(dict(ln1=ln1, ln1_saved=ln1_saved, att_saved=att_saved, atty=atty,
                           ln2=ln2, ln2_saved=ln2_saved, fch=fch, fcg=fcg))
    xf, lnf_saved = layernorm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"])
    logits = xf @ P["transformer.wte.weight"].T                                 # (B, T, V)

    loss = None
    probs = None
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != (B, T):
            raise ValueError(f"targets shape {targets.shape} != idx shape {(B, T)}")
        valid = targets != -1
        if np.any(targets[valid] < 0) or np.any(targets[valid] >= V):
            raise ValueError("target id out of range (use -1 to ignore a position)")
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))                    # (B, T, V)
        probs = np.exp(logp)
        nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
        n_valid = int(valid.sum())
        loss = float(nll[valid].sum() / n_valid) if n_valid else float("nan")

    cache = dict(P=P, idx=idx, targets=targets, n_head=n_head, layers=layers, xf=xf,
                 lnf_saved=lnf_saved, probs=probs, dims=(V, block_size, n_layer, C))
    return logits, loss, cache


def backward(params, cache):
    """Gradient of the mean loss w.r.t. every parameter (same names and shapes as params).
    Needs a cache from forward() called with targets. wte gets both its embedding and its
    tied LM-head contribution."""
    if cache["targets"] is None:
        raise ValueError("backward() needs a forward() with targets")
    P = cache["P"]
    V, block_size, n_layer, C = cache["dims"]
    idx, targets = cache["idx"], cache["targets"]
    B, T = idx.shape
    grads = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in params.items()}

    # d loss / d logits = (softmax - onehot) / n_valid on counted positions, 0 on ignored ones
    valid = targets != -1
    n_valid = max(int(valid.sum()), 1)
    dlogits = cache["probs"].copy()
    bi, ti = np.nonzero(valid)
    dlogits[bi, ti, targets[bi, ti]] -= 1.0
    dlogits *= valid[..., None] / n_valid                                        # (B, T, V)

    xf = cache["xf"]
    grads["transformer.wte.weight"] += dlogits.reshape(-1, V).T @ xf.reshape(-1, C)
    dxf = dlogits @ P["transformer.wte.weight"]                                 # (B, T, C)
    dx, dw, db = layernorm_backward(dxf, P["transformer.ln_f.weight"], cache["lnf_saved"])
    grads["transformer.ln_f.weight"] += dw
    grads["transformer.ln_f.bias"] += db

    for i in reversed(range(n_layer)):
        h = f"transformer.h.{i}."
        L = cache["layers"][i]
        # MLP branch: x = x + gelu(ln2 @ Wfc + bfc) @ Wp + bp
        grads[h + "mlp.c_proj.weight"] += L["fcg"].reshape(-1, 4 * C).T @ dx.reshape(-1, C)
        grads[h + "mlp.c_proj.bias"] += dx.reshape(-1, C).sum(0)
        dfcg = dx @ P[h + "mlp.c_proj.weight"].T
        dfch = gelu_backward(dfcg, L["fch"])
        grads[h + "mlp.c_fc.weight"] += L["ln2"].reshape(-1, C).T @ dfch.reshape(-1, 4 * C)
        grads[h + "mlp.c_fc.bias"] += dfch.reshape(-1, 4 * C).sum(0)
        dln2 = dfch @ P[h + "mlp.c_fc.weight"].T
        dxl, dw, db = layernorm_backward(dln2, P[h + "ln_2.weight"], L["ln2_saved"])
        grads[h + "ln_2.weight"] += dw
        grads[h + "ln_2.bias"] += db
        dx = dx + dxl
        # attention branch: x = x + attention(ln1 @ Wattn + battn) @ Wproj + bproj
        grads[h + "attn.c_proj.weight"] += L["atty"].reshape(-1, C).T @ dx.reshape(-1, C)
        grads[h + "attn.c_proj.bias"] += dx.reshape(-1, C).sum(0)
        datty = dx @ P[h + "attn.c_proj.weight"].T
        dqkv = attention_backward(datty, L["att_saved"])
        grads[h + "attn.c_attn.weight"] += L["ln1"].reshape(-1, C).T @ dqkv.reshape(-1, 3 * C)
        grads[h + "attn.c_attn.bias"] += dqkv.reshape(-1, 3 * C).sum(0)
        dln1 = dqkv @ P[h + "attn.c_attn.weight"].T
        dxl, dw, db = layernorm_backward(dln1, P[h + "ln_1.weight"], L["ln1_saved"])
        grads[h + "ln_1.weight"] += dw
        grads[h + "ln_1.bias"] += db
        dx = dx + dxl

    # embeddings: a token id may repeat, so scatter with add.at (not fancy-index +=)
    np.add.at(grads["transformer.wte.weight"], idx.reshape(-1), dx.reshape(-1, C))
    grads["transformer.wpe.weight"][:T] += dx.sum(0)
    return grads


def loss_only(params, idx, targets, n_head):
    return forward(params, idx, targets, n_head)[1]


def numerical_grad(params, idx, targets, n_head, name, indices, eps=1e-6):
    """Central finite differences (L(p + eps) - L(p - eps)) / (2 eps) of the loss for the given
    flat indices of parameter `name`; returns a float64 array shaped like `indices`. params is
    left unchanged (the perturbed tensor is a float64 copy)."""
    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    base = P[name].copy()
    flat_idx = np.asarray(indices, dtype=np.int64)
    out = np.empty(flat_idx.shape, dtype=np.float64)
    for n, j in enumerate(flat_idx.reshape(-1)):
        p = base.copy()
        p.reshape(-1)[j] += eps
        P[name] = p
        lp = loss_only(P, idx, targets, n_head)
        p = base.copy()
        p.reshape(-1)[j] -= eps
        P[name] = p
        lm = loss_only(P, idx, targets, n_head)
        out.reshape(-1)[n] = (lp - lm) / (2.0 * eps)
    return out
