"""bench_generate.py - text generation benchmark, smallmind against PyTorch eager on the same GPT-2
weights, greedy decoding: tokens/s at batch 1 (PyTorch with its own static KV cache, and
nanoGPT-style without a cache), time to first token, batched decoding and concurrent streams.

    python bench/bench_generate.py --json bench/results/generate.json   # full run (~10 min, 2 cores)
    python bench/bench_generate.py --quick                               # smoke run (< 60 s)
    python bench/bench_generate.py --only decode,ttft --models small --threads 2

What is timed (every variant decodes greedily - argmax - from the same random prompt ids):
- decode: `new` tokens at batch 1 after a `prompt`-token prompt, the whole call (prefill
  included), tokens/s = new / seconds. smallmind at the `_core` level (GPTCache + gpt_prefill +
  gpt_decode + numpy argmax: the token-id loop Sampling runs, without the tokenizer), and for the
  65-symbol models also end to end through `sm.Sampling.generate` (a Tokenizer over 65 distinct
  characters, so ids map 1:1). PyTorch: `generate_with_cache` (preallocated per-layer K/V,
  written in place, one single-token step per token) and `generate_nocache` (nanoGPT: the full
  forward over the cropped context for every token). All of them slide the window the same way
  once prompt + new tokens pass block_size (the last block_size tokens are prefilled again,
  positions restart at 0), so on the 128/256-block models the later tokens cost a prefill each.
- ttft: a fresh cache, prefill of the prompt and the argmax of the first logits.
- step: one decode step inside the window (no sliding), batch 1: (a run of block - prompt
  tokens - time to first token) / (tokens - 1); also as GB/s of float32 weights read per step.
- batch: the decode run with 8 sequences at once (one prefill, one decode call per token).
- streams: 1, 2 and 4 Python threads decoding concurrently, each with its own cache and one
  library thread (smallmind threads=1; torch.set_num_threads(1) called in every worker thread,
  because PyTorch's OpenMP thread count is a per-thread setting that a new thread does not
  inherit); aggregate tokens/s = all streams' tokens / wall time from a common start.
The libraries are timed alternately (round robin, an idle gap before each so that the other's
OpenMP workers are asleep); medians are reported. Greedy tokens of smallmind and PyTorch-with-
cache are compared: the first index where they differ is reported (random weights make near-ties
common, so small float differences may flip a token; this is reported, not a failure).

Leaves out: sampling with temperature (a numpy softmax per token in both), torch.compile,
bf16/int8 weights, the GPU.
"""
import argparse
import json
import os
import platform
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg  # noqa: E402

sm = None
torch = None

# name -> (vocab, block, n_layer, n_head, n_embd)
MODELS = {
    "small": (65, 128, 4, 4, 128),
    "shakespeare-char": (65, 256, 6, 6, 384),
    "gpt2-124M": (50257, 1024, 12, 12, 768),
}
# name -> dict(prompt, new (decode), nocache_new, batch_new, stream_new, rounds)
PLAN = {
    "small": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=256, rounds=5),
    "shakespeare-char": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=128,
                             rounds=3),
    "gpt2-124M": dict(prompt=64, new=64, nocache_new=16, batch_new=64, stream_new=32, rounds=3),
}
QUICK_PLAN = dict(prompt=64, new=16, nocache_new=16, batch_new=8, stream_new=8, rounds=1)
PARTS = ("decode", "ttft", "step", "batch", "streams")
BATCH = 8
STREAMS = (1, 2, 4)
IDLE_GAP_S = 0.3


def import_libs():
    global sm, torch
    try:
        import smallmind
    except ImportError:
        sys.path.insert(0, REPO)
        import smallmind
    sm = smallmind
    import torch as t
    torch = t


def idle(quick):
    if not quick:
        time.sleep(IDLE_GAP_S)


def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "cores": os.cpu_count(),
            "smallmind": sm.__version__, "build": sm.build_info(), "torch": torch.__version__}
    if cpu_model():
        info["cpu"] = cpu_model()
    return info


# ---- the generators (each returns the new tokens as a numpy (B, n) int64 array) -----------------

def sm_generate(model, prompt, n, threads):
    """Greedy decoding at the _core level: prefill, then one gpt_decode per token for all rows,
    sliding the window as Sampling does once the cache is full."""
    cfg, prm = model._cfg, model._params
    T = model.config.block_size
    B = prompt.shape[0]
    out = np.empty((B, n), np.int64)
    if n == 0:
        return out
    cache = sm._core.GPTCache(cfg, B, T)
    try:
        P = prompt.shape[1]
        seq = np.empty((B, P + n), np.int32)   # prompt and every new token: the slide's source
        seq[:, :P] = prompt
        ctx = np.ascontiguousarray(seq[:, max(0, P - T):P])
        logits = sm._core.gpt_prefill(prm, cfg, ctx, cache, threads)
        length = ctx.shape[1]
        for i in range(n):
            nxt = logits.argmax(axis=1).astype(np.int32)
            out[:, i] = nxt
            seq[:, P + i] = nxt
            if i == n - 1:
                break
            if length < T:
                logits = sm._core.gpt_decode(prm, cfg, nxt, cache, threads)
                length += 1
            else:   # full: the last T tokens (ending with nxt) again, positions from 0
                ctx = np.ascontiguousarray(seq[:, P + i + 1 - T:P + i + 1])
                logits = sm._core.gpt_prefill(prm, cfg, ctx, cache, threads)
    finally:
        cache.free()
    return out


def sm_ttft(model, prompt, threads):
    cache = sm._core.GPTCache(model._cfg, prompt.shape[0], model.config.block_size)
    try:
        logits = sm._core.gpt_prefill(model._params, model._cfg,
                                      np.ascontiguousarray(prompt, dtype=np.int32), cache, threads)
        return logits.argmax(axis=1)
    finally:
        cache.free()


def torch_ttft(tmodel, prompt_t):
    from torch_gpt import _cached_step
    cfg = tmodel.config
    B, hs = prompt_t.shape[0], cfg.n_embd // cfg.n_head
    with torch.inference_mode():
        kv = [(torch.empty(B, cfg.n_head, cfg.block_size, hs),
               torch.empty(B, cfg.n_head, cfg.block_size, hs)) for _ in range(cfg.n_layer)]
        return _cached_step(tmodel, prompt_t, kv, 0).argmax(dim=-1)


def first_divergence(a, b):
    """Index of the first differing token of two (B, n) arrays (over rows: the smallest), or None."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(a.shape[1], b.shape[1])
    diff = a[:, :n] != b[:, :n]
    if not diff.any():
        return None
    return int(np.min(np.where(diff.any(axis=0))[0]))


def run_rounds(fns, rounds, quick):
    """{name: fn} -> ({name: median seconds}, {name: last result}): a warm-up call each, then
    `rounds` round-robin rounds of one timed call each, an idle gap before every call."""
    res = {}
    for name, fn in fns.items():
        idle(quick)
        res[name] = fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            idle(quick)
            t0 = time.perf_counter()
            res[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, res


def run_many(fns, reps, quick):
    """Like run_rounds but for short calls: each round times `reps` calls per library."""
    res = {}
    for name, fn in fns.items():
        idle(quick)
        res[name] = fn()
    times = {name: [] for name in fns}
    for _ in range(1 if quick else 5):
        for name, fn in fns.items():
            idle(quick)
            for _ in range(1 if quick else reps):
                t0 = time.perf_counter()
                res[name] = fn()
                times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, res


# ---- parts ------------------------------------------------------------------------------------------

def base_row(part, name, plan, threads, params):
    V, T, L, H, C = MODELS[name]
    return {"kind": "generate", "part": part, "model": name, "threads": threads,
            "shape": dict(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C),
            "params": params, "prompt_tokens": plan["prompt"]}


def decode_row(name, model, tmodel, prompt, plan, threads, quick):
    from torch_gpt import generate_with_cache, generate_nocache
    n, nn_ = plan["new"], plan["nocache_new"]
    pt = torch.from_numpy(prompt)
    fns = {"smallmind": lambda: sm_generate(model, prompt, n, threads),
           "torch_cache": lambda: generate_with_cache(tmodel, pt, n).numpy()}
    V = MODELS[name][0]
    if V <= 65:
        # end to end through Sampling: ids 0..64 are the 65 characters below, sorted
        tok = sm.Tokenizer("".join(chr(48 + i) for i in range(V)))
        text = tok.decode([int(i) for i in prompt[0]])
        sampler = sm.Sampling(model, tok, threads=threads)
        fns["smallmind_sampling"] = lambda: np.asarray(
            [sampler.generate(text, n, temperature=0, return_details=True).tokens], np.int64)
    secs, res = run_rounds(fns, plan["rounds"], quick)
    # nanoGPT without a cache is slow: fewer tokens, fewer rounds
    nsecs, nres = run_rounds({"torch_nocache": lambda: generate_nocache(tmodel, pt, nn_).numpy()},
                             max(1, plan["rounds"] - 1) if nn_ < n else plan["rounds"], quick)
    row = base_row("decode", name, plan, threads, model.config.num_parameters())
    row.update(new_tokens=n, nocache_new_tokens=nn_, batch=1)
    for lib, s in secs.items():
        row[f"{lib}_s"] = s
        row[f"{lib}_tokens_per_s"] = n / s
    row["torch_nocache_s"] = nsecs["torch_nocache"]
    row["torch_nocache_tokens_per_s"] = nn_ / nsecs["torch_nocache"]
    row["vs_torch_cache"] = row["smallmind_tokens_per_s"] / row["torch_cache_tokens_per_s"]
    row["vs_torch_nocache"] = row["smallmind_tokens_per_s"] / row["torch_nocache_tokens_per_s"]
    row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    row["diverge_vs_torch_nocache"] = first_divergence(res["smallmind"], nres["torch_nocache"])
    row["diverge_cache_vs_nocache"] = first_divergence(res["torch_cache"], nres["torch_nocache"])
    if "smallmind_sampling" in res:
        row["diverge_sampling_vs_core"] = first_divergence(res["smallmind"], res["smallmind_sampling"])
    # weight bytes read per decoded token at batch 1 (float32), for the bandwidth remark
    row["weight_mb"] = 4 * model.config.num_parameters() / 1e6
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(fmt_decode(row), flush=True)
    return row


def fmt_decode(r):
    s = (f"  decode {r['model']:<16} t={r['threads']} {r['new_tokens']} new: smallmind "
         f"{r['smallmind_tokens_per_s']:8.1f} tok/s")
    if "smallmind_sampling_tokens_per_s" in r:
        s += f" (Sampling {r['smallmind_sampling_tokens_per_s']:8.1f})"
    s += (f" | torch cache {r['torch_cache_tokens_per_s']:8.1f} ({r['vs_torch_cache']:.2f}x)"
          f" | torch no cache {r['torch_nocache_tokens_per_s']:8.1f} ({r['vs_torch_nocache']:.1f}x,"
          f" {r['nocache_new_tokens']} new) | first divergence sm/torch {r['diverge_vs_torch_cache']}")
    if "diverge_sampling_vs_core" in r:
        s += f", Sampling/core {r['diverge_sampling_vs_core']}"
    return s + f"  (load {r['loadavg_1min']})"


def ttft_row(name, model, tmodel, prompt, plan, threads, quick):
    pt = torch.from_numpy(prompt)
    reps = 3 if name == "gpt2-124M" else 10
    secs, res = run_many({"smallmind": lambda: sm_ttft(model, prompt, threads),
                          "torch_cache": lambda: torch_ttft(tmodel, pt).numpy()}, reps, quick)
    row = base_row("ttft", name, plan, threads, model.config.num_parameters())
    row["batch"] = 1
    row["smallmind_ms"] = 1e3 * secs["smallmind"]
    row["torch_ms"] = 1e3 * secs["torch_cache"]
    row["vs_torch"] = secs["torch_cache"] / secs["smallmind"]
    row["same_first_token"] = bool(np.array_equal(res["smallmind"], res["torch_cache"]))
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  ttft   {name:<16} t={threads} prompt {plan['prompt']}: smallmind "
          f"{row['smallmind_ms']:8.2f} ms | torch {row['torch_ms']:8.2f} ms | "
          f"sm {row['vs_torch']:.2f}x faster | same first token {row['same_first_token']}", flush=True)
    return row


def step_row(name, model, tmodel, prompt, plan, threads, quick):
    """The cost of one decode step at batch 1 inside the window (no sliding): (time of a run of
    n tokens - time to first token) / (n - 1), n = block_size - prompt (at most `new`)."""
    from torch_gpt import generate_with_cache
    T = MODELS[name][1]
    n = min(plan["new"], T - plan["prompt"])
    pt = torch.from_numpy(prompt)
    gen, res = run_rounds({"smallmind": lambda: sm_generate(model, prompt, n, threads),
                           "torch_cache": lambda: generate_with_cache(tmodel, pt, n).numpy()},
                          plan["rounds"], quick)
    first, _ = run_many({"smallmind": lambda: sm_ttft(model, prompt, threads),
                         "torch_cache": lambda: torch_ttft(tmodel, pt).numpy()},
                        3 if name == "gpt2-124M" else 10, quick)
    row = base_row("step", name, plan, threads, model.config.num_parameters())
    row.update(batch=1, new_tokens=n)
    for lib in gen:
        step = max(gen[lib] - first[lib], 1e-9) / max(n - 1, 1)
        row[f"{lib}_step_ms"] = 1e3 * step
        row[f"{lib}_tokens_per_s"] = 1.0 / step
        # every parameter (float32) is read once per step at batch 1
        row[f"{lib}_weight_gb_per_s"] = 4 * model.config.num_parameters() / step / 1e9
    row["vs_torch_cache"] = row["torch_cache_step_ms"] / row["smallmind_step_ms"]
    row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  step   {name:<16} t={threads} {n} new, in the window: smallmind "
          f"{row['smallmind_step_ms']:8.3f} ms/token ({row['smallmind_weight_gb_per_s']:.1f} GB/s of "
          f"weights) | torch cache {row['torch_cache_step_ms']:8.3f} ms "
          f"({row['torch_cache_weight_gb_per_s']:.1f} GB/s) | sm {row['vs_torch_cache']:.2f}x faster"
          f" | first divergence {row['diverge_vs_torch_cache']}  (load {row['loadavg_1min']})",
          flush=True)
    return row


def batch_row(name, model, tmodel, plan, threads, quick):
    from torch_gpt import generate_with_cache
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, MODELS[name][0], size=(BATCH, plan["prompt"])).astype(np.int64)
    pt = torch.from_numpy(prompt)
    n = plan["batch_new"]
    secs, res = run_rounds({"smallmind": lambda: sm_generate(model, prompt, n, threads),
                            "torch_cache": lambda: generate_with_cache(tmodel, pt, n).numpy()},
                           plan["rounds"], quick)
    row = base_row("batch", name, plan, threads, model.config.num_parameters())
    row.update(batch=BATCH, new_tokens=n)
    for lib, s in secs.items():
        row[f"{lib}_s"] = s
        row[f"{lib}_tokens_per_s"] = BATCH * n / s
    row["vs_torch_cache"] = secs["torch_cache"] / secs["smallmind"]
    row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  batch  {name:<16} t={threads} B={BATCH} {n} new: smallmind "
          f"{row['smallmind_tokens_per_s']:8.1f} tok/s | torch cache "
          f"{row['torch_cache_tokens_per_s']:8.1f} ({row['vs_torch_cache']:.2f}x) | first "
          f"divergence {row['diverge_vs_torch_cache']}  (load {row['loadavg_1min']})", flush=True)
    return row


def concurrent(worker, k):
    """Run worker(i) in k Python threads released together; wall seconds from release to the last
    thread's end."""
    barrier = threading.Barrier(k + 1)
    errors = []

    def body(i):
        try:
            worker(i, barrier)
        except BaseException as e:  # reported, not swallowed
            errors.append(e)
            barrier.abort()

    ths = [threading.Thread(target=body, args=(i,)) for i in range(k)]
    for t in ths:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ths:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def streams_rows(name, model, tmodel, plan, quick):
    from torch_gpt import generate_with_cache
    n = plan["stream_new"]
    rng = np.random.default_rng(11)
    prompts = rng.integers(0, MODELS[name][0], size=(max(STREAMS), 1, plan["prompt"])).astype(np.int64)
    tprompts = [torch.from_numpy(p) for p in prompts]

    def sm_worker(i, barrier):
        barrier.wait()
        sm_generate(model, prompts[i], n, 1)

    def torch_worker(i, barrier):
        torch.set_num_threads(1)   # per thread: a new thread does not inherit the setting
        barrier.wait()
        generate_with_cache(tmodel, tprompts[i], n)

    for fn in (lambda: sm_generate(model, prompts[0], n, 1),
               lambda: generate_with_cache(tmodel, tprompts[0], n)):
        idle(quick)
        fn()   # warm-up, in this thread
    rows = []
    base = {}
    for k in STREAMS:
        fns = {"smallmind": lambda k=k: concurrent(sm_worker, k),
               "torch_cache": lambda k=k: concurrent(torch_worker, k)}
        walls = {lib: [] for lib in fns}
        for _ in range(1 if quick else max(1, plan["rounds"] - 1)):
            for lib, fn in fns.items():
                idle(quick)
                walls[lib].append(fn())
        row = base_row("streams", name, plan, 1, model.config.num_parameters())
        row.update(streams=k, new_tokens=n, batch=1)
        for lib, ws in walls.items():
            w = float(np.median(ws))
            row[f"{lib}_wall_s"] = w
            row[f"{lib}_tokens_per_s"] = k * n / w
            if k == STREAMS[0]:
                base[lib] = row[f"{lib}_tokens_per_s"]
            row[f"{lib}_scaling"] = row[f"{lib}_tokens_per_s"] / base[lib]
        row["vs_torch_cache"] = row["smallmind_tokens_per_s"] / row["torch_cache_tokens_per_s"]
        row["loadavg_1min"] = (loadavg() or [None])[0]
        print(f"  streams {name:<15} {k} x threads=1, {n} new each: smallmind "
              f"{row['smallmind_tokens_per_s']:8.1f} tok/s ({row['smallmind_scaling']:.2f}x of 1) | "
              f"torch cache {row['torch_cache_tokens_per_s']:8.1f} ({row['torch_cache_scaling']:.2f}x of 1)"
              f" | sm/torch {row['vs_torch_cache']:.2f}x  (load {row['loadavg_1min']})", flush=True)
        rows.append(row)
    return rows


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small model, few tokens (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", type=int, default=2, help="library threads (default 2); the "
                    "streams part uses 1 per stream")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {','.join(PARTS)}")
    ap.add_argument("--models", default=None, help=f"comma-separated of {','.join(MODELS)}")
    args = ap.parse_args(argv)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    names = (["small"] if args.quick else list(MODELS)) if not args.models else \
        [m.strip() for m in args.models.split(",")]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {PARTS}")
    for m in names:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {tuple(MODELS)}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    import_libs()
    from torch_gpt import from_numpy_state
    info = machine_info()
    print(f"smallmind {info['smallmind']} | {info.get('cpu', '?')}, {info['cores']} cores | "
          f"{info['build']}")
    print(f"numpy {info['numpy']} | torch {info['torch']} | greedy decoding, {args.threads} threads")
    load_start = loadavg()
    t_start = time.perf_counter()
    rows = []
    for name in names:
        V, T, L, H, C = MODELS[name]
        plan = dict(QUICK_PLAN) if args.quick else PLAN[name]
        sm.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
        model = sm.TransformerModel(sm.ModelConfig(V, T, L, H, C, dropout=0.0, seed=42)).eval()
        tmodel = from_numpy_state(model.config, model.state_dict()).eval()
        print(f"\n{name}: {L} layers, {H} heads, {C} wide, block {T}, vocab {V}, "
              f"{model.config.num_parameters() / 1e6:.1f} M parameters", flush=True)
        prompt = np.random.default_rng(3).integers(0, V, size=(1, plan["prompt"])).astype(np.int64)
        if "decode" in parts:
            rows.append(decode_row(name, model, tmodel, prompt, plan, args.threads, args.quick))
        if "ttft" in parts:
            rows.append(ttft_row(name, model, tmodel, prompt, plan, args.threads, args.quick))
        if "step" in parts:
            rows.append(step_row(name, model, tmodel, prompt, plan, args.threads, args.quick))
        if "batch" in parts:
            rows.append(batch_row(name, model, tmodel, plan, args.threads, args.quick))
        if "streams" in parts:
            rows += streams_rows(name, model, tmodel, plan, args.quick)
            torch.set_num_threads(args.threads)
        del model, tmodel
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    info["loadavg_start"] = load_start
    info["loadavg_end"] = loadavg()
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {info['loadavg_end']}")
    try:
        from report import generate_table
        print()
        print(generate_table(rows))
    except ImportError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
