"""bench_attention.py - smallmind's causal attention (forward, backward, KV-cache decode) against
a straightforward numpy implementation and, when installed, PyTorch's
scaled_dot_product_attention, measured side by side in one run.

    python bench/bench_attention.py            # full table, 1 and 2 threads
    python bench/bench_attention.py --quick    # tiny shapes, one repetition (smoke run)
    python bench/bench_attention.py --threads 1,4

numpy does what a numpy GPT would: batched np.matmul on (B, NH, T, hs) views of qkv, an
explicitly masked softmax, and for the backward pass the (B, NH, T, T) probabilities saved by its
forward (smallmind saves only the (B, NH, T) log-sum-exp and recomputes them, so numpy is given
the easier job). PyTorch: scaled_dot_product_attention(is_causal=True) forward, its autograd
backward (torch.autograd.grad on a retained graph), and a one-query SDPA over a (B, NH, L, hs)
cache for decode. Medians of repeated calls; `cases()` is what bench_kernels.py collects.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _timing

from _timing import idle, numpy_threads, timeit  # noqa: E402

import smallmind as sm  # noqa: E402

try:
    import torch  # noqa: E402
except ImportError:  # torch is optional: rows then lack the torch_s column
    torch = None

# (B, T, C, NH)
TRAIN_SHAPES = [(8, 256, 384, 6), (16, 64, 128, 4), (4, 1024, 768, 12)]
QUICK_TRAIN_SHAPES = [(2, 17, 48, 3)]
# (B, L, C, NH): one new query per sequence against L cached positions
DECODE_SHAPES = [(1, 256, 384, 6), (8, 256, 384, 6), (1, 1024, 768, 12)]
QUICK_DECODE_SHAPES = [(2, 9, 48, 3)]


# ---- numpy reference implementation ----------------------------------------------------------

def _heads(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    x = qkv.reshape(B, T, 3, NH, C // NH)
    return x[:, :, 0].transpose(0, 2, 1, 3), x[:, :, 1].transpose(0, 2, 1, 3), x[:, :, 2].transpose(0, 2, 1, 3)


def np_forward(qkv, NH):
    """(out (B, T, C), probabilities (B, NH, T, T)) with np.matmul and a masked softmax."""
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, NH)
    hs = q.shape[-1]
    s = np.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hs))
    s[..., ~np.tri(T, dtype=bool)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = np.matmul(s, v)
    return o.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3), s


def np_backward(dout, qkv, p, NH):
    """dqkv (B, T, 3C) from the saved probabilities p."""
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, NH)
    hs = q.shape[-1]
    do = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    dv = np.matmul(p.transpose(0, 1, 3, 2), do)
    dp = np.matmul(do, v.transpose(0, 1, 3, 2))
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * np.float32(1.0 / np.sqrt(hs))
    dq = np.matmul(ds, k)
    dk = np.matmul(ds.transpose(0, 1, 3, 2), q)
    g = np.empty((B, T, 3, NH, hs), np.float32)
    g[:, :, 0] = dq.transpose(0, 2, 1, 3)
    g[:, :, 1] = dk.transpose(0, 2, 1, 3)
    g[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return g.reshape(B, T, C3)


def np_decode(q, k, v, L):
    """out (B, C): q (B, C) against positions 0..L-1 of a numpy cache k, v (B, NH, T_max, hs)."""
    B, NH, _, hs = k.shape
    qh = q.reshape(B, NH, 1, hs)
    s = np.matmul(qh, k[:, :, :L].transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(hs))  # (B, NH, 1, L)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v[:, :, :L]).reshape(B, NH * hs)


# ---- cases -----------------------------------------------------------------------------------

def _row(name, shape, t_sm, t_np, t_torch=None):
    r = {"name": name, "shape": shape, "smallmind_s": t_sm, "numpy_s": t_np, "ratio": t_np / t_sm}
    if t_torch is not None:
        r["torch_s"] = t_torch
        r["torch_ratio"] = t_torch / t_sm
    return r


def _train_rows(B, T, C, NH, threads, quick, rng):
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    out, lse = sm.kernels.attention_forward(qkv, NH, threads=threads)
    dqkv = np.zeros_like(qkv)
    shape = f"B{B} T{T} C{C} NH{NH}"

    idle(quick)
    t_f = timeit(lambda: sm.kernels.attention_forward(qkv, NH, out=out, lse=lse, threads=threads), quick)
    idle(quick)
    t_b = timeit(lambda: sm.kernels.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv,
                                                       threads=threads), quick)
    idle(quick)
    with numpy_threads(threads):
        _, p = np_forward(qkv, NH)
        n_f = timeit(lambda: np_forward(qkv, NH), quick)
        idle(quick)
        n_b = timeit(lambda: np_backward(dout, qkv, p, NH), quick)  # noqa: F821 (p is bound above; ruff misreads the del below)
    del p
    tt_f = tt_b = None
    if torch is not None:
        torch.set_num_threads(threads)
        hs = C // NH
        x = torch.from_numpy(qkv).view(B, T, 3, NH, hs).permute(2, 0, 3, 1, 4)
        q, k, v = (x[i].detach().clone().requires_grad_(True) for i in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            idle(quick)
            tt_f = timeit(lambda: sdpa(q, k, v, is_causal=True), quick)
        o = sdpa(q, k, v, is_causal=True)
        go = torch.from_numpy(dout).view(B, T, NH, hs).transpose(1, 2)
        idle(quick)
        tt_b = timeit(lambda: torch.autograd.grad(o, (q, k, v), go, retain_graph=True), quick)
    return [_row("attention forward", shape, t_f, n_f, tt_f),
            _row("attention backward", shape, t_b, n_b, tt_b)]


def _decode_row(B, L, C, NH, threads, quick, rng):
    hs = C // NH
    qkv = rng.standard_normal((B, L, 3 * C), dtype=np.float32)
    k_cache, v_cache = sm.kernels.kv_cache_new(B, NH, L, hs)
    sm.kernels.kv_cache_prefill(k_cache, v_cache, qkv)
    q = np.ascontiguousarray(qkv[:, -1, :C])
    out = np.empty((B, C), np.float32)
    idle(quick)
    t_sm = timeit(lambda: sm.kernels.attention_decode(q, k_cache, v_cache, L, out=out, threads=threads), quick)
    idle(quick)
    # numpy and torch keep their caches in the plain (B, NH, L, hs) layout
    k = np.ascontiguousarray(qkv[:, :, C:2 * C].reshape(B, L, NH, hs).transpose(0, 2, 1, 3))
    v = np.ascontiguousarray(qkv[:, :, 2 * C:].reshape(B, L, NH, hs).transpose(0, 2, 1, 3))
    with numpy_threads(threads):
        t_np = timeit(lambda: np_decode(q, k, v, L), quick)
    t_t = None
    if torch is not None:
        torch.set_num_threads(threads)
        kt, vt = torch.from_numpy(k), torch.from_numpy(v)
        qt = torch.from_numpy(q).view(B, NH, 1, hs)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            idle(quick)
            t_t = timeit(lambda: sdpa(qt, kt, vt), quick)
    return _row("attention decode", f"B{B} L{L} C{C} NH{NH}", t_sm, t_np, t_t)


def cases(quick: bool = False, threads: int = 1) -> list:
    """Benchmark rows: name, shape, smallmind_s, numpy_s, ratio (= numpy_s / smallmind_s, >1 means
    smallmind is faster), and torch_s, torch_ratio when PyTorch is installed."""
    rng = np.random.default_rng(0)
    rows = []
    for (B, T, C, NH) in (QUICK_TRAIN_SHAPES if quick else TRAIN_SHAPES):
        rows += _train_rows(B, T, C, NH, threads, quick, rng)
    for (B, L, C, NH) in (QUICK_DECODE_SHAPES if quick else DECODE_SHAPES):
        rows.append(_decode_row(B, L, C, NH, threads, quick, rng))
    for r in rows:
        r["threads"] = threads
    return rows


def _print(rows):
    has_torch = any("torch_s" in r for r in rows)
    head = f"{'kernel':20s} {'shape':>22s} {'thr':>3s} {'smallmind ms':>12s} {'numpy ms':>10s} {'np/sm':>6s}"
    if has_torch:
        head += f" {'torch ms':>10s} {'torch/sm':>8s}"
    print(head)
    for r in rows:
        line = (f"{r['name']:20s} {r['shape']:>22s} {r['threads']:3d} {1e3 * r['smallmind_s']:12.3f}"
                f" {1e3 * r['numpy_s']:10.3f} {r['ratio']:6.2f}")
        if has_torch and "torch_s" in r:
            line += f" {1e3 * r['torch_s']:10.3f} {r['torch_ratio']:8.2f}"
        print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repetition (smoke run)")
    ap.add_argument("--threads", default="1,2", help="thread counts to measure (default 1,2)")
    args = ap.parse_args(argv)
    info = sm.build_info()
    print(f"smallmind {sm.__version__} | simd {info['simd']} | openmp {info['openmp']} | "
          f"cpus {info['cpu_count']} | numpy {np.__version__} | "
          + (f"torch {torch.__version__}" if torch is not None else "torch not installed"))
    rows = []
    for nt in [int(x) for x in args.threads.split(",")]:
        rows += cases(quick=args.quick, threads=nt)
    _print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
