"""bench_ops.py - smallmind's elementwise and row kernels (sm_ops) against their straightforward
numpy equivalents, on the shapes a GPT training step uses, measured side by side in one run.

    python bench/bench_ops.py              # table for threads 1 and 2
    python bench/bench_ops.py --quick      # tiny shapes, one repetition (smoke run)
    python bench/bench_ops.py --threads 1,4

`cases(quick, threads)` returns rows {"name", "shape", "smallmind_s", "numpy_s", "ratio"} (ratio =
numpy_s / smallmind_s: how many times faster smallmind is) and is also collected by
bench_kernels.py. Times are medians of repeated calls on preallocated arrays (both sides write
into existing buffers where numpy allows it). numpy's elementwise code is single-threaded; only
its BLAS calls (np.dot in the norm, a float32 accumulation where smallmind sums in double)
follow `threads`. Benchmarks measure; they never fail.

On a machine shared with other processes, multi-thread rows that come out as whole multiples of
the scheduler tick (4 ms, 8 ms, 16 ms ...) mean a worker thread waited for a busy core: rerun
them when the machine is quiet. The memory-bound kernels (residual, bias, layernorm, AdamW, the
norm) run at memory speed on one core already; more threads help only as far as the memory
system scales.
"""
import argparse
import os
import sys

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)

import numpy as np  # noqa: E402
from _timing import numpy_threads, timeit  # noqa: E402

import smallmind as sm  # noqa: E402

k = sm.kernels
GELU_K = np.float32(np.sqrt(2.0 / np.pi))


# ---- numpy equivalents ---------------------------------------------------------------------------

def np_layernorm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x - mean) * rstd * w + b, mean, rstd


def np_layernorm_backward(dx, dw, db, dout, x, w, mean, rstd):
    xh = (x - mean) * rstd
    dn = dout * w
    dx += (dn - dn.mean(-1, keepdims=True) - xh * (dn * xh).mean(-1, keepdims=True)) * rstd
    dw += (dout * xh).sum(0)
    db += dout.sum(0)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(GELU_K * (x + np.float32(0.044715) * x * x * x)))


def np_gelu_backward(dx, x, dout):
    th = np.tanh(GELU_K * (x + np.float32(0.044715) * x * x * x))
    dx += (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * GELU_K * (1 + np.float32(3 * 0.044715) * x * x)) * dout


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_cross_entropy(logits, targets):
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def np_cross_entropy_fwd_bwd(dlogits, logits, targets, dloss):
    p = np_softmax(logits)
    rows = np.arange(len(targets))
    losses = -np.log(p[rows, targets])
    p[rows, targets] -= 1
    dlogits += p * dloss
    return losses


def np_adamw(p, g, m, v, lr, b1, b2, eps, wd, t):
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    p -= lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p)


def np_clip(g, max_norm):
    norm = float(np.sqrt(np.dot(g, g)))
    f = max_norm / (norm + 1e-6)
    if f < 1:
        g *= np.float32(f)
    return norm


# ---- cases ----------------------------------------------------------------------------------------

def _row(name, shape, t_sm, t_np):
    return {"name": name, "shape": shape, "smallmind_s": t_sm, "numpy_s": t_np, "ratio": t_np / t_sm}


def cases(quick=False, threads=1):
    """Time each kernel and its numpy equivalent; returns a list of row dicts."""
    rng = np.random.default_rng(0)
    q = quick
    rows = []

    def f32(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    nt = threads
    # shapes: rows B*T of a GPT batch, channels C, hidden 4C, vocab V
    N, C = (256, 64) if q else (16384, 384)
    N4 = (256, 256) if q else (16384, 1536)

    # embedding (char-level vocab 65, T = 256 -> 64 sequences)
    B, T, V = (4, 64, 65) if q else (64, 256, 65)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = f32(V, C), f32(T, C)
    out = np.empty((B, T, C), np.float32)
    t_sm = timeit(lambda: k.encoder_forward(idx, wte, wpe, out=out, threads=nt), q)
    t_np = timeit(lambda: np.add(wte[idx], wpe[:T], out=out), q)
    rows.append(_row("encoder_forward", f"{B}x{T}x{C} V={V}", t_sm, t_np))
    dout = f32(B, T, C)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)

    def np_enc_bwd():
        np.add.at(dwte, idx, dout)
        dwpe[:T] += dout.sum(0)

    t_sm = timeit(lambda: k.encoder_backward(dwte, dwpe, dout, idx, threads=nt), q)
    t_np = timeit(np_enc_bwd, q)
    rows.append(_row("encoder_backward", f"{B}x{T}x{C} V={V}", t_sm, t_np))

    # layernorm
    for (n, c) in ([(N, C)] if q else [(N, C), (N, 768)]):
        x, w, b = f32(n, c), f32(c), f32(c)
        o, mean, rstd = k.layernorm_forward(x, w, b)
        t_sm = timeit(lambda: k.layernorm_forward(x, w, b, out=o, mean=mean, rstd=rstd, threads=nt), q)
        t_np = timeit(lambda: np_layernorm(x, w, b), q)
        rows.append(_row("layernorm_forward", f"{n}x{c}", t_sm, t_np))
        dx, dw, db, dy = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b), f32(n, c)
        _, m_np, r_np = np_layernorm(x, w, b)
        t_sm = timeit(lambda: k.layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, threads=nt), q)
        t_np = timeit(lambda: np_layernorm_backward(dx, dw, db, dy, x, w, m_np, r_np), q)
        rows.append(_row("layernorm_backward", f"{n}x{c}", t_sm, t_np))

    # GELU on the MLP hidden layer
    h = f32(*N4)
    ho = np.empty_like(h)
    t_sm = timeit(lambda: k.gelu_forward(h, out=ho, threads=nt), q)
    t_np = timeit(lambda: np_gelu(h), q)
    rows.append(_row("gelu_forward", f"{N4[0]}x{N4[1]}", t_sm, t_np))
    dh, dho = np.zeros_like(h), f32(*N4)
    t_sm = timeit(lambda: k.gelu_backward(dh, h, dho, threads=nt), q)
    t_np = timeit(lambda: np_gelu_backward(dh, h, dho), q)
    rows.append(_row("gelu_backward", f"{N4[0]}x{N4[1]}", t_sm, t_np))

    # softmax (sampling) and cross-entropy (char-level and GPT-2 vocab)
    for (n, v) in ([(64, 65), (8, 1000)] if q else [(4096, 65), (64, 50257)]):
        lg = f32(n, v)
        p = np.empty_like(lg)
        t_sm = timeit(lambda: k.softmax(lg, out=p, threads=nt), q)
        t_np = timeit(lambda: np_softmax(lg), q)
        rows.append(_row("softmax", f"{n}x{v}", t_sm, t_np))
    for (n, v) in ([(64, 65), (8, 1000)] if q else [(4096, 65), (1024, 50257)]):
        lg = f32(n, v)
        tg = rng.integers(0, v, n).astype(np.int32)
        losses = np.empty(n, np.float32)
        t_sm = timeit(lambda: k.cross_entropy_forward(lg, tg, out=losses, threads=nt), q)
        t_np = timeit(lambda: np_cross_entropy(lg, tg), q)
        rows.append(_row("cross_entropy_forward", f"{n}x{v}", t_sm, t_np))
        dl = np.zeros_like(lg)
        dloss = np.full(n, 1.0 / n, np.float32)
        dloss_col = dloss[:, None]
        t_sm = timeit(lambda: k.cross_entropy_forward_backward(dl, lg, tg, dloss, out=losses, threads=nt), q)
        t_np = timeit(lambda: np_cross_entropy_fwd_bwd(dl, lg, tg, dloss_col), q)
        rows.append(_row("cross_entropy_fwd+bwd", f"{n}x{v}", t_sm, t_np))

    # residual and bias
    a, b_ = f32(N, C), f32(N, C)
    o = np.empty_like(a)
    t_sm = timeit(lambda: k.residual_forward(a, b_, out=o, threads=nt), q)
    t_np = timeit(lambda: np.add(a, b_, out=o), q)
    rows.append(_row("residual_forward", f"{N}x{C}", t_sm, t_np))
    da, db2, dy = np.zeros_like(a), np.zeros_like(a), f32(N, C)

    def np_res_bwd():
        da.__iadd__(dy)
        db2.__iadd__(dy)

    t_sm = timeit(lambda: k.residual_backward(da, db2, dy, threads=nt), q)
    t_np = timeit(np_res_bwd, q)
    rows.append(_row("residual_backward", f"{N}x{C}", t_sm, t_np))
    hb, bias = f32(*N4), f32(N4[1])
    t_sm = timeit(lambda: k.bias_add(hb, bias, threads=nt), q)
    t_np = timeit(lambda: hb.__iadd__(bias), q)
    rows.append(_row("bias_add", f"{N4[0]}x{N4[1]}", t_sm, t_np))
    dbias = np.zeros(N4[1], np.float32)
    t_sm = timeit(lambda: k.bias_backward(dbias, hb, threads=nt), q)
    t_np = timeit(lambda: dbias.__iadd__(hb.sum(0)), q)
    rows.append(_row("bias_backward", f"{N4[0]}x{N4[1]}", t_sm, t_np))

    # optimizer over a flat parameter buffer (~10.7M parameters: a 6-layer, 384-wide GPT)
    P = 4096 if q else 10_700_000
    prm, g = f32(P), f32(P) * np.float32(1e-3)
    m, v = np.zeros(P, np.float32), np.zeros(P, np.float32)
    t_sm = timeit(lambda: k.adamw_step(prm, g, m, v, lr=1e-4, weight_decay=0.1, step=10, threads=nt), q)
    t_np = timeit(lambda: np_adamw(prm, g, m, v, 1e-4, 0.9, 0.999, 1e-8, 0.1, 10), q)
    rows.append(_row("adamw_step", f"{P}", t_sm, t_np))
    gg = f32(P)
    with numpy_threads(nt):
        t_np = timeit(lambda: float(np.sqrt(np.dot(gg, gg))), q)
    t_sm = timeit(lambda: k.grad_norm(gg, threads=nt), q)
    rows.append(_row("grad_norm", f"{P}", t_sm, t_np))

    # clipping that scales every call: max_norm is half the current norm each time
    def clipper(fn, g_):
        state = {"norm": float(np.sqrt(np.dot(g_.astype(np.float64), g_)))}

        def run():
            state["norm"] = 0.5 * state["norm"]
            fn(g_, state["norm"])
        return run

    with numpy_threads(nt):
        t_np = timeit(clipper(np_clip, f32(P)), q)
    t_sm = timeit(clipper(lambda g_, mx: k.clip_grad_norm(g_, mx, threads=nt), f32(P)), q)
    rows.append(_row("clip_grad_norm", f"{P}", t_sm, t_np))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repetition")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    args = ap.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    print(f"smallmind {sm.__version__} | {sm.build_info()} | numpy {np.__version__}")
    print("ratio = numpy time / smallmind time (higher: smallmind faster)")
    print(f"{'kernel':24s} {'shape':>20s} {'thr':>3s} {'smallmind ms':>13s} {'numpy ms':>10s} {'ratio':>8s}")
    for nt in counts:
        for r in cases(quick=args.quick, threads=nt):
            print(f"{r['name']:24s} {r['shape']:>20s} {nt:3d} {1e3 * r['smallmind_s']:13.3f} "
                  f"{1e3 * r['numpy_s']:10.3f} {r['ratio']:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
