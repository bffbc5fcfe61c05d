"""torch_gpt.py - a PyTorch GPT-2 (Hugging Face GPT2LMHeadModel semantics, nanoGPT-style code)
whose state_dict() keys and layouts are exactly smallmind's: the model the benchmarks time
against and the parity tests load smallmind's parameters into. Only imported where torch exists.

Weights are (in, out) as GPT-2's Conv1D (y = x @ W + b); the LM head is tied to wte and has no
parameter of its own. Greedy generation (generate_with_cache, generate_nocache) is here for
bench_generate.py (generate_with_cache imports smallmind for its window rule); leaves out
sampling, checkpoint files and anything past one training step.

    python bench/torch_gpt.py      # smoke run: a few steps of a tiny model on random ids
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TorchGPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0


def _as_config(cfg):
    """Accept a TorchGPTConfig, any object with the same attributes (sm.ModelConfig) or a dict."""
    if isinstance(cfg, TorchGPTConfig):
        return cfg
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    return TorchGPTConfig(int(get("vocab_size")), int(get("block_size")), int(get("n_layer")),
                          int(get("n_head")), int(get("n_embd")), float(get("dropout", 0.0)))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        # addmm fuses the bias into the GEMM; the same math as x @ W + b
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], self.weight.shape[1])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): head h owns columns h*hs:(h+1)*hs of q, k and v
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg = _as_config(cfg)
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5),
        ))
        gpt2_init_(self, 0)

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> (logits (B, T, V), mean cross-entropy over targets != -1 or None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # tied head: x @ wte.T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss


def gpt2_init_(model, seed):
    """GPT-2 initialisation in place: N(0, 0.02) for every weight matrix and both embeddings,
    zero biases, LayerNorm weight 1 / bias 0, and the two residual projections (attn.c_proj,
    mlp.c_proj weights) N(0, 0.02 / sqrt(2 n_layer)). Deterministic for a given seed."""
    g = torch.Generator().manual_seed(int(seed))
    resid_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:  # ln_1, ln_2 and ln_f
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.copy_(torch.empty(p.shape).normal_(0.0, resid_std, generator=g))
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=g))
    return model


def from_numpy_state(cfg, state, dtype=torch.float32):
    """A TorchGPT (in `dtype`) holding copies of the numpy arrays in `state` (GPT-2 names)."""
    model = TorchGPT(cfg).to(dtype)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(f"state keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    tensors = {}
    for name, ref in own.items():
        a = np.asarray(state[name])
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {a.shape} != expected {tuple(ref.shape)}")
        tensors[name] = torch.tensor(a, dtype=dtype)
    model.load_state_dict(tensors, strict=True)
    return model


def to_numpy_state(model):
    """name -> numpy copy of every parameter (GPT-2 names, model's dtype)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


DECAY_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, flavour=None):
    """AdamW with weight decay on the four weight matrices of each block only (not biases,
    LayerNorm or the embeddings). `flavour`: "fused", "foreach" or "for-loop". The default is
    fused, the fastest on CPU: for the 6-layer/6-head/384 model (10.8 M parameters, torch 2.13,
    2 threads, shared 2-core machine) one step took 6.3 ms fused, 15.8 ms for-loop and 30 ms
    foreach (medians of 7) - all small beside the ~12 s forward+backward at batch 64 x 256."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.endswith(DECAY_SUFFIXES) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    flavour = flavour or "fused"
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True},
          "for-loop": {"foreach": False, "fused": False}}[flavour]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def train_step(model, opt, x, y, grad_clip=1.0):
    """One AdamW step on batch (x, y); returns the loss as a float (before the step)."""
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()



# ---- greedy generation (for bench_generate.py) ----------------------------------------------------

def _last_logits(model, x):
    """ln_f and the tied head on the last position only (nanoGPT's inference shortcut)."""
    return F.linear(model.transformer.ln_f(x[:, -1, :]), model.transformer.wte.weight)


def _cached_step(model, idx, kv, start):
    """Run idx (B, t) at positions start..start+t-1 through the model, writing each layer's keys
    and values into the preallocated kv[layer] = (K, V), each (B, nh, capacity, hs), and
    attending to positions 0..start+t-1. Returns the last position's logits (B, V). With
    start == 0 this is a prefill (causal mask); with t == 1 a decode step (no mask needed)."""
    B, t = idx.shape
    tr = model.transformer
    pos = torch.arange(start, start + t)
    x = tr.wte(idx) + tr.wpe(pos)
    end = start + t
    for block, (K, V) in zip(tr.h, kv):
        a = block.attn
        C = x.shape[-1]
        hs = C // a.n_head
        q, k, v = a.c_attn(block.ln_1(x)).split(C, dim=2)
        q = q.view(B, t, a.n_head, hs).transpose(1, 2)
        K[:, :, start:end] = k.view(B, t, a.n_head, hs).transpose(1, 2)
        V[:, :, start:end] = v.view(B, t, a.n_head, hs).transpose(1, 2)
        if start == 0:
            y = F.scaled_dot_product_attention(q, K[:, :, :end], V[:, :, :end], is_causal=True)
        else:
            assert t == 1, "a cached step past position 0 takes one token"
            y = F.scaled_dot_product_attention(q, K[:, :, :end], V[:, :, :end])
        y = y.transpose(1, 2).contiguous().view(B, t, C)
        x = x + a.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    return _last_logits(model, x)


def sample_next(logits, temperature, top_k, generator):
    """nanoGPT's sampling: logits / temperature, all but the top_k set to -inf, softmax, one
    torch.multinomial draw per row from `generator`."""
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def generate_with_cache(model, idx, n, window="shift", sample=None):
    """Greedy decoding (or, with sample = dict(temperature, top_k, seed), nanoGPT's sampling:
    sample_next) of n tokens after idx (B, T0) int64 with a static KV cache per layer
    (preallocated (B, nh, block_size, hs) keys and values, written in place): one prefill of the
    prompt, then one single-token step per new token. When the window is full it moves as
    smallmind's Sampling(window=...) does: the last window_keep(block_size, window) tokens
    (the newer half for "shift", Sampling's default; all block_size for "slide", nanoGPT's exact
    window) are prefilled again, positions from 0, and decoding goes on. Returns the new tokens
    (B, n) int64. The math of forward() on the same windows, up to float rounding."""
    # the rule is smallmind's own (Sampling uses it), so the two loops cannot drift apart
    from smallmind.generation.sampling import WINDOWS, window_keep
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    cfg = model.config
    B = idx.shape[0]
    Tb = cfg.block_size
    keep = window_keep(Tb, window)
    hs = cfg.n_embd // cfg.n_head
    out = torch.empty(B, n, dtype=torch.long)
    if n == 0:
        return out
    with torch.inference_mode():
        kv = [(torch.empty(B, cfg.n_head, Tb, hs), torch.empty(B, cfg.n_head, Tb, hs))
              for _ in range(cfg.n_layer)]
        P = idx.shape[1]
        seq = torch.empty(B, P + n, dtype=torch.long)   # prompt and new tokens: the window's source
        seq[:, :P] = idx
        ctx = idx[:, -Tb:]
        logits = _cached_step(model, ctx, kv, 0)
        length = ctx.shape[1]
        gen = None
        if sample is not None:
            gen = torch.Generator().manual_seed(sample["seed"])
        for i in range(n):
            if gen is None:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = sample_next(logits, sample["temperature"], sample["top_k"], gen)
            out[:, i] = nxt
            seq[:, P + i] = nxt
            if i == n - 1:
                break
            if length < Tb:
                logits = _cached_step(model, nxt.view(B, 1), kv, length)
                length += 1
            else:   # full: the last `keep` tokens (ending with nxt) again, positions from 0
                logits = _cached_step(model, seq[:, P + i + 1 - keep:P + i + 1], kv, 0)
                length = keep
        return out


def generate_nocache(model, idx, n):
    """nanoGPT's greedy generate: every new token runs the full forward over the context cropped
    to the last block_size tokens (no KV cache), the head on the last position only. Returns the
    new tokens (B, n) int64."""
    cfg = model.config
    tr = model.transformer
    out = torch.empty(idx.shape[0], n, dtype=torch.long)
    with torch.inference_mode():
        ctx = idx
        for i in range(n):
            c = ctx[:, -cfg.block_size:]
            x = tr.wte(c) + tr.wpe(torch.arange(c.shape[1]))
            for block in tr.h:
                x = block(x)
            nxt = _last_logits(model, x).argmax(dim=-1)
            out[:, i] = nxt
            ctx = torch.cat([ctx, nxt.view(-1, 1)], dim=1)
    return out

if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = TorchGPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = TorchGPT(cfg)
    gpt2_init_(model, 1)
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.1)
    # a fixed batch: the loss must fall as the model memorises it
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size))
    y = torch.roll(x, -1, dims=1)
    t0 = time.perf_counter()
    for step in range(10):
        print(f"step {step}: loss {train_step(model, opt, x, y):.4f}")
    print(f"{(time.perf_counter() - t0) / 10 * 1e3:.1f} ms/step, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
