"""bench_generate.py - text generation benchmark, smallmind against PyTorch eager on the same GPT-2
weights, greedy decoding: tokens/s at batch 1 (PyTorch with its own static KV cache, and
nanoGPT-style without a cache), time to first token, one decode step against the machine's
memory bandwidth, batched decoding and concurrent streams.

    python bench/bench_generate.py --json bench/results/generate.json   # full run (~12 min, 2 cores)
    python bench/bench_generate.py --quick                               # smoke run (< 60 s)
    python bench/bench_generate.py --only decode,ttft --models 4/4/128 --threads 2

PyTorch is optional: without it every part still runs for smallmind alone (CI's smoke run has
no torch), one line says so, and the PyTorch values and the ratios are left out of the rows and
read "-" in the printout and the tables.

Window policy: past block_size (the model's positions) both cached loops move the window as
`sm.Sampling(window=...)` does, by the one rule `smallmind.generation.sampling.window_keep` (used by
Sampling itself, sm_generate and torch_gpt.generate_with_cache): when the cache is full and a
token must be fed, the last `keep` tokens of the sequence (ending with that token) are
prefilled again, positions from 0, and decoding goes on one step per token. window="shift"
(Sampling's default; keep = block/2): one prefill of block/2 tokens per block/2 new tokens.
window="slide" (keep = block, nanoGPT's exact window): past block_size every token costs a
prefill of the whole window. nanoGPT's no-cache loop is always the exact slide.

What is timed (every variant decodes greedily - argmax - from the same random prompt ids):
- bandwidth (once, before the models): this machine's streaming read bandwidth, measured in the
  run: 1 and 2 Python threads, released together, each reduce their own 256 MiB float32 array
  4 times (numpy releases the GIL inside; np.maximum.reduce, because numpy's float32 sum is
  bound by its own arithmetic at about the memory's speed), best of 5 after a warm-up. It is
  the ceiling of batch-1 decoding, which reads every weight once per token. The row also keeps
  CPU/wall: near 2 when the two threads really ran together, near 1 when the other core was
  busy.
- decode: `new` tokens at batch 1 after a `prompt`-token prompt, the whole call (prefill
  included), tokens/s = new / seconds. smallmind at the `_core` level (GPTCache + gpt_prefill +
  gpt_decode + numpy argmax: the token-id loop Sampling runs, without the tokenizer), and for the
  65-symbol models also end to end through `sm.Sampling.generate` (a Tokenizer over 65 distinct
  characters, so ids map 1:1). PyTorch: `generate_with_cache` (preallocated per-layer K/V,
  written in place, one single-token step per token) and `generate_nocache` (nanoGPT: the full
  forward over the cropped context for every token). window="shift" in both cached loops and
  in Sampling (constructed with the same window).
- slide: the same batch-1 run with window="slide" (nanoGPT's exact window: past block_size
  every token costs a prefill of the whole window), smallmind core and PyTorch with cache.
- ttft: a fresh cache, prefill of the prompt and the argmax of the first logits.
- prefill: prompts of 16-512 tokens (up to the block): the prefill's FLOP/s as a share of the
  SGEMM's on the same linear shapes, and the time to first token against PyTorch.
- step: one decode step inside the window (no sliding), batch 1: the difference of a run of
  n = block - prompt tokens (at most `new`) and one of n // 4 from the same prompt, over the
  difference in tokens; also as GB/s of float32 weights read per step and, when the bandwidth
  part ran, as a fraction of the read bandwidth on the same number of threads, measured again
  in the same rounds (the machine is shared and its bandwidth moves), with limit_tokens_per_s
  = bandwidth / weight bytes (the batch-1 limit; exceeded where the weights stay in cache).
  The goal it reports on: a GPT-2-124M-shaped decode step at >= 95% of that limit.
- batch: the decode run with 8 sequences at once (one prefill, one decode call per token),
  window="shift".
- streams: 1, 2 and 4 Python threads decoding concurrently, each with its own cache and one
  library thread (smallmind threads=1; torch.set_num_threads(1) called in every worker thread,
  because PyTorch's OpenMP thread count is a per-thread setting that a new thread does not
  inherit); aggregate tokens/s = all streams' tokens / wall time from a common start;
  window="shift".
The libraries are timed alternately (round robin, an idle gap before each so that the other's
OpenMP workers are asleep); medians are reported. Greedy tokens of smallmind and PyTorch-with-
cache are compared: the first index where they differ is reported (random weights make near-ties
common, so small float differences may flip a token; this is reported, not a failure).

Leaves out: sampling with temperature (a numpy softmax per token in both), torch.compile,
bf16/int8 weights, the GPU.
"""

import argparse
import os
import platform
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg, write_json  # noqa: E402

sm = None
torch = None

# name -> (vocab, block, n_layer, n_head, n_embd)
MODELS = {
    "tiny": (65, 64, 2, 2, 32),                  # the presets' shapes (sm.PRESETS)
    "small": (65, 128, 4, 4, 64),
    "4/4/128": (65, 128, 4, 4, 128),
    "shakespeare-char": (65, 256, 6, 6, 384),
    "gpt2-124M": (50257, 1024, 12, 12, 768),
}
# name -> dict(prompt, new (decode), nocache_new, batch_new, stream_new, rounds)
PLAN = {
    "tiny": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=4096, rounds=7),
    "small": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=4096, rounds=7),
    "4/4/128": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=256, rounds=5),
    "shakespeare-char": dict(prompt=64, new=256, nocache_new=256, batch_new=256, stream_new=128,
                             rounds=3),
    "gpt2-124M": dict(prompt=64, new=64, nocache_new=16, batch_new=64, stream_new=32, rounds=3),
}
QUICK_PLAN = dict(prompt=64, new=16, nocache_new=16, batch_new=8, stream_new=8, rounds=1)
PARTS = ("bandwidth", "decode", "sampled", "slide", "ttft", "prefill", "step", "batch", "streams",
         "forward")
PREFILL_LENGTHS = (16, 64, 128, 256, 512)   # prompt lengths of the prefill part (up to the block)
# the sampled part's settings, the same in both libraries (nanoGPT's sample.py defaults)
SAMPLED = dict(temperature=0.8, top_k=40, seed=1)
WINDOW = "shift"         # Sampling's default; the "slide" part times the exact window
BATCH = 8
BW_MIB = 256             # bandwidth part: MiB per thread
BW_REPS = 5
BW_PASSES = 4            # reads of its array per thread in one repetition
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
    try:
        import torch as t
    except ImportError:
        print("torch is not installed: smallmind alone (PyTorch columns read '-')")
        return
    torch = t


def idle(quick):
    if not quick:
        time.sleep(IDLE_GAP_S)


def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "cores": os.cpu_count(),
            "smallmind": sm.__version__, "build": sm.build_info(),
            "torch": torch.__version__ if torch else None}
    if cpu_model():
        info["cpu"] = cpu_model()
    return info


# ---- the generators (each returns the new tokens as a numpy (B, n) int64 array) -----------------

def sm_generate(model, prompt, n, threads, window=WINDOW, sample=None):
    """Decoding at the _core level: prefill, then the C generation loop (GPTGenerator) runs all
    n tokens of every row in one call, moving the window as Sampling(window=window) does once
    the cache is full. Greedy, or `sample` = dict(temperature, top_k, seed) (row b: seed + b)."""
    if window not in sm.generation.sampling.WINDOWS:
        raise ValueError(f"window must be one of {sm.generation.sampling.WINDOWS}, got {window!r}")
    cfg, prm = model.core_config, model.flat_params
    V, T = model.config.vocab_size, model.config.block_size
    B = prompt.shape[0]
    if n == 0:
        return np.empty((B, 0), np.int64)
    cache = sm._core.GPTCache(cfg, B, T)
    try:
        ctx = np.ascontiguousarray(prompt[:, -T:], dtype=np.int32)
        logits = sm._core.gpt_prefill(prm, cfg, ctx, cache, threads)
        gen = sm._core.GPTGenerator(prm, cfg, cache, V, sm.generation.sampling.window_keep(T, window))
        for b in range(B):
            if sample is None:
                gen.set_row(b, ctx[b], logits[b], remaining=n)
            else:
                gen.set_row(b, ctx[b], logits[b], temperature=sample["temperature"],
                            top_k=sample["top_k"], key=sample["seed"] + b, remaining=n)
        out, made, _, _ = gen.run(n, 0.0, threads)
        assert (made == n).all()
    finally:
        cache.close()
    return out.astype(np.int64)


def sm_ttft(model, prompt, threads):
    cache = sm._core.GPTCache(model.core_config, prompt.shape[0], model.config.block_size)
    try:
        logits = sm._core.gpt_prefill(model.flat_params, model.core_config,
                                      np.ascontiguousarray(prompt, dtype=np.int32), cache, threads)
        return logits.argmax(axis=1)
    finally:
        cache.close()


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


def fx(v, fmt, none="-"):
    """v formatted, or `none` where a value is missing (no torch)."""
    return none if v is None else format(v, fmt)


def times(v, fmt=".2f"):
    """A ratio as "2.50x", or "-" where it was not measured (no torch)."""
    return "-" if v is None else f"{v:{fmt}}x"


def with_ratio(row, key, ratio_key, what=""):
    """row[key] with its ratio in brackets ("  812.3 (2.50x)"), or "-" where not measured."""
    if key not in row:
        return "-"
    return f"{row[key]:8.1f} ({times(row.get(ratio_key))}{what})"


def put_ratio(row, key, a, b):
    """row[key] = a / b where both were measured; without torch the key stays out of the row."""
    if a is not None and b is not None:
        row[key] = a / b


def _read(a):
    # A max-reduction, not a sum: numpy's float32 sum (pairwise summation) runs at ~25 GB/s on
    # one AVX-512 core of the benchmark machine (docs/benchmarks.md) even from L2, so from memory it measures its own
    # arithmetic; the max runs at ~70 GB/s from L2 and ~30 GB/s from memory (the sum: ~25).
    np.maximum.reduce(a)


def read_bandwidth(k, arrs):
    """(GB/s, CPU seconds per wall second) of k Python threads each reading its own array of
    `arrs` BW_PASSES times, released together. numpy releases the GIL inside the reduction, so
    the threads run at once where there are free cores; the CPU/wall ratio (~k when they did)
    tells where they could not. Several passes per thread so that starting and an uneven finish
    (one thread reading alone at the end) weigh little."""
    barrier = threading.Barrier(k + 1)

    def body(a):
        barrier.wait()
        for _ in range(BW_PASSES):
            _read(a)

    ths = [threading.Thread(target=body, args=(a,)) for a in arrs[:k]]
    for t in ths:
        t.start()
    barrier.wait()
    c0, t0 = time.process_time(), time.perf_counter()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    nbytes = BW_PASSES * sum(a.nbytes for a in arrs[:k])
    return nbytes / wall / 1e9, (time.process_time() - c0) / wall


def bandwidth_arrays():
    # 256 MiB per thread: 8x the 32 MiB L3 of the benchmark machine, so the reads come from memory
    arrs = [np.ones(BW_MIB * 2 ** 18, np.float32) for _ in range(2)]
    for a in arrs:
        _read(a)                                     # warm-up: pages touched, code loaded
    return arrs


def bandwidth_rows(arrs):
    """Streaming read bandwidth on 1 and 2 threads, best of BW_REPS after the warm-up: each
    thread reads its own 256 MiB float32 array BW_PASSES times (~40 ms a repetition, so --quick
    measures it too)."""
    rows = []
    for k in (1, 2):
        best, cpu = max(read_bandwidth(k, arrs) for _ in range(BW_REPS))
        rows.append({"kind": "generate", "part": "bandwidth", "threads": k,
                     "read_gb_per_s": best, "mib_per_thread": arrs[0].nbytes >> 20,
                     "method": f"numpy maximum.reduce, one float32 array per Python thread "
                               f"read {BW_PASSES} times",
                     "cpu_per_wall": cpu, "loadavg_1min": (loadavg() or [None])[0]})
        print(f"  bandwidth {k} thread(s): {best:.1f} GB/s streaming read (numpy max-reductions, "
              f"{arrs[0].nbytes >> 20} MiB per thread, best of {BW_REPS}; CPU/wall {cpu:.2f})",
              flush=True)
    # on a shared machine the threads may not get their cores: then the figure is a lower bound
    for r in rows:
        if r["cpu_per_wall"] < 0.85 * r["threads"]:
            print(f"  note: {r['threads']} thread(s) ran on {r['cpu_per_wall']:.2f} cores on average "
                  f"(other load on the machine): a lower bound of its bandwidth", flush=True)
    one, two = rows[0]["read_gb_per_s"], rows[1]["read_gb_per_s"]
    rows[1]["vs_1_thread"] = two / one
    if two < 1.15 * one and rows[1]["cpu_per_wall"] >= 0.85 * 2:
        print(f"  note: 2 threads read only {two / one:.2f}x as fast as 1 although both ran at "
              f"once: one core already draws most of what the memory gives", flush=True)
    return rows


def decode_row(name, model, tmodel, prompt, plan, threads, quick, window=WINDOW, sampled=False):
    n, nn_ = plan["new"], plan["nocache_new"]
    slide = window == "slide"
    sample = dict(SAMPLED) if sampled else None
    fns = {"smallmind": lambda: sm_generate(model, prompt, n, threads, window, sample)}
    if tmodel is not None:
        from torch_gpt import generate_with_cache
        pt = torch.from_numpy(prompt)
        fns["torch_cache"] = lambda: generate_with_cache(tmodel, pt, n, window, sample).numpy()
    V = MODELS[name][0]
    if V <= 65 and not slide:
        # end to end through Sampling: ids 0..64 are the 65 characters below, sorted
        tok = sm.Tokenizer("".join(chr(48 + i) for i in range(V)))
        text = tok.decode([int(i) for i in prompt[0]])
        sampler = sm.Sampling(model, tok, threads=threads, window=window)
        kw = dict(temperature=0) if sample is None else sample
        fns["smallmind_sampling"] = lambda: np.asarray(
            [sampler.generate(text, n, return_details=True, **kw).tokens], np.int64)
    secs, res = run_rounds(fns, plan["rounds"], quick)
    part = "slide" if slide else "sampled" if sampled else "decode"
    row = base_row(part, name, plan, threads, model.config.num_parameters())
    row.update(new_tokens=n, batch=1, window=window)
    if sampled:
        row["sampling"] = dict(SAMPLED)
    for lib, sec in secs.items():
        row[f"{lib}_s"] = sec
        row[f"{lib}_tokens_per_s"] = n / sec
    if tmodel is not None and not slide and not sampled:
        from torch_gpt import generate_nocache
        # nanoGPT without a cache is slow: fewer tokens, fewer rounds
        nsecs, nres = run_rounds({"torch_nocache": lambda: generate_nocache(tmodel, pt, nn_).numpy()},
                                 max(1, plan["rounds"] - 1) if nn_ < n else plan["rounds"], quick)
        row["nocache_new_tokens"] = nn_
        row["torch_nocache_s"] = nsecs["torch_nocache"]
        row["torch_nocache_tokens_per_s"] = nn_ / nsecs["torch_nocache"]
        row["vs_torch_nocache"] = row["smallmind_tokens_per_s"] / row["torch_nocache_tokens_per_s"]
    put_ratio(row, "vs_torch_cache", row["smallmind_tokens_per_s"],
              row.get("torch_cache_tokens_per_s"))
    if "smallmind_sampling" in secs:
        put_ratio(row, "sampling_vs_torch_cache", row["smallmind_sampling_tokens_per_s"],
                  row.get("torch_cache_tokens_per_s"))
        # Sampling end to end against the raw C loop (target >= 0.97)
        row["sampling_vs_core"] = secs["smallmind"] / secs["smallmind_sampling"]
    if "torch_cache" in res and not sampled:   # sampled: the two draw differently
        row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    if "smallmind_sampling" in res:
        row["diverge_sampling_vs_core"] = first_divergence(res["smallmind"], res["smallmind_sampling"])
    row["weight_mb"] = 4 * model.config.num_parameters() / 1e6
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(fmt_decode(row), flush=True)
    return row


def fmt_decode(r):
    s = (f"  {r['part']:<6} {r['model']:<16} t={r['threads']} {r['new_tokens']} new, window "
         f"{r['window']}: smallmind {r['smallmind_tokens_per_s']:8.1f} tok/s")
    if "smallmind_sampling_tokens_per_s" in r:
        s += (f" (Sampling {r['smallmind_sampling_tokens_per_s']:8.1f}, "
              f"{r['sampling_vs_core']:.3f} of the C loop)")
    s += f" | torch cache {with_ratio(r, 'torch_cache_tokens_per_s', 'vs_torch_cache')}"
    if "torch_nocache_tokens_per_s" in r:
        s += (f" | torch no cache {r['torch_nocache_tokens_per_s']:8.1f} "
              f"({r['vs_torch_nocache']:.1f}x, {r['nocache_new_tokens']} new)")
    div = []
    if "diverge_vs_torch_cache" in r:
        div.append(f"sm/torch {r['diverge_vs_torch_cache']}")
    if "diverge_sampling_vs_core" in r:
        div.append(f"Sampling/core {r['diverge_sampling_vs_core']}")
    if div:
        s += " | first divergence " + ", ".join(div)
    return s + f"  (load {r['loadavg_1min']})"


def ttft_row(name, model, tmodel, prompt, plan, threads, quick):
    reps = 3 if name == "gpt2-124M" else 10
    fns = {"smallmind": lambda: sm_ttft(model, prompt, threads)}
    if tmodel is not None:
        pt = torch.from_numpy(prompt)
        fns["torch_cache"] = lambda: torch_ttft(tmodel, pt).numpy()
    secs, res = run_many(fns, reps, quick)
    row = base_row("ttft", name, plan, threads, model.config.num_parameters())
    row["batch"] = 1
    row["smallmind_ms"] = 1e3 * secs["smallmind"]
    if "torch_cache" in secs:
        row["torch_ms"] = 1e3 * secs["torch_cache"]
        row["vs_torch"] = row["torch_ms"] / row["smallmind_ms"]
    if "torch_cache" in res:
        row["same_first_token"] = bool(np.array_equal(res["smallmind"], res["torch_cache"]))
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  ttft   {name:<16} t={threads} prompt {plan['prompt']}: smallmind "
          f"{row['smallmind_ms']:8.2f} ms | torch {fx(row.get('torch_ms'), '8.2f')} ms | "
          f"sm {times(row.get('vs_torch'))} faster | same first token "
          f"{row.get('same_first_token', '-')}", flush=True)
    return row


def same_products(model, P, threads, rng):
    """(gemms, linear FLOPs): a function running the SGEMM on the four linear products of every
    layer for P positions (P x C @ C x 3C, C x C, C x 4C; P x 4C @ 4C x C) with the model's own
    weight matrices - what a prefill of P tokens multiplies - and their FLOP count."""
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    shapes = [(P, C, 3 * C), (P, C, C), (P, C, 4 * C), (P, 4 * C, C)]
    sd = model.state_dict()
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    xs = [rng.standard_normal((m, k)).astype(np.float32) for m, k, n in shapes]
    ops = [(xs[i], sd[f"transformer.h.{layer}.{nm}.weight"])
           for layer in range(L) for i, nm in enumerate(names)]
    outs = [np.empty((a.shape[0], w.shape[1]), np.float32) for a, w in ops]

    def gemms():
        for (a, b), o in zip(ops, outs):
            sm.kernels.matmul(a, b, out=o, threads=threads)
    return gemms, 2 * P * sum(k * n for m, k, n in shapes) * L


def prefill_rows(name, model, tmodel, plan, threads, quick):
    """Prefill of prompts of PREFILL_LENGTHS tokens at batch 1 against the SGEMM on the same
    shapes: the prefill's useful FLOPs (the linear layers on every position, causal attention,
    the LM head on the last position) per second over the SGEMM's FLOP/s on the four linear
    products of every layer (P x C @ C x 3C, C x C, C x 4C; P x 4C @ 4C x C) with the model's own
    weight matrices (the same bytes to read as the prefill), timed alone with the same threads. Also the time to first token (a fresh cache, the prefill, the argmax) against
    PyTorch with its cache."""
    V, T, L, H, C = MODELS[name]
    rows = []
    rng = np.random.default_rng(5)
    for P in (PREFILL_LENGTHS[:2] if quick else PREFILL_LENGTHS):
        if P > T:
            continue
        prompt = rng.integers(0, V, size=(1, P)).astype(np.int64)
        p32 = prompt.astype(np.int32)
        cache = sm._core.GPTCache(model.core_config, 1, T)
        gemms, linear = same_products(model, P, threads, rng)
        fns = {"prefill": lambda: sm._core.gpt_prefill(model.flat_params, model.core_config, p32,
                                                       cache, threads),
               "ttft": lambda: sm_ttft(model, prompt, threads),
               "sgemm": gemms}
        if tmodel is not None:
            pt = torch.from_numpy(prompt)
            fns["torch_ttft"] = lambda: torch_ttft(tmodel, pt).numpy()
        reps = 3 if P * C >= 256 * 768 else 10
        secs, res = run_many(fns, reps, quick)
        cache.close()
        flops = linear + L * 2 * P * P * C + 2 * C * V                # + attention, LM head
        row = base_row("prefill", name, plan, threads, model.config.num_parameters())
        row.update(prompt_tokens=P, batch=1, prefill_ms=1e3 * secs["prefill"],
                   ttft_ms=1e3 * secs["ttft"], sgemm_ms=1e3 * secs["sgemm"],
                   prefill_gflops=flops / secs["prefill"] / 1e9,
                   sgemm_gflops=linear / secs["sgemm"] / 1e9)
        row["share_of_sgemm"] = row["prefill_gflops"] / row["sgemm_gflops"]
        if "torch_ttft" in secs:
            row["torch_ttft_ms"] = 1e3 * secs["torch_ttft"]
            row["ttft_vs_torch"] = row["torch_ttft_ms"] / row["ttft_ms"]
            row["same_first_token"] = bool(np.array_equal(res["ttft"], res["torch_ttft"]))
        row["loadavg_1min"] = (loadavg() or [None])[0]
        print(f"  prefill {name:<16} t={threads} prompt {P:4d}: {row['prefill_ms']:8.2f} ms "
              f"{row['prefill_gflops']:6.1f} GFLOP/s = {100 * row['share_of_sgemm']:3.0f}% of the "
              f"SGEMM's {row['sgemm_gflops']:.1f} | ttft {row['ttft_ms']:8.2f} ms, torch "
              f"{fx(row.get('torch_ttft_ms'), '8.2f')} ms ({times(row.get('ttft_vs_torch'))})",
              flush=True)
        rows.append(row)
    return rows


def step_row(name, model, tmodel, prompt, plan, threads, quick, arrs):
    """The cost of one decode step at batch 1 inside the window (no sliding): the difference of
    two runs from the same prompt, n and n // 4 tokens (n = block_size - prompt, at most `new`),
    divided by the difference in tokens; prefill and call overheads cancel."""
    T = MODELS[name][1]
    n = min(plan["new"], T - plan["prompt"])
    n0 = max(1, n // 4)
    gens = {"smallmind": lambda: sm_generate(model, prompt, n, threads),
            "smallmind_short": lambda: sm_generate(model, prompt, n0, threads)}
    if tmodel is not None:
        from torch_gpt import generate_with_cache
        pt = torch.from_numpy(prompt)
        gens["torch_cache"] = lambda: generate_with_cache(tmodel, pt, n).numpy()
        gens["torch_cache_short"] = lambda: generate_with_cache(tmodel, pt, n0).numpy()
    bw_samples = []
    if arrs is not None and threads <= len(arrs):
        # the machine's bandwidth is shared and moves: measured in the same rounds
        gens["bandwidth"] = lambda: bw_samples.append(read_bandwidth(threads, arrs))
    gen, res = run_rounds(gens, plan["rounds"] + 2, quick)
    row = base_row("step", name, plan, threads, model.config.num_parameters())
    row.update(batch=1, new_tokens=n)
    weight_bytes = 4 * model.config.num_parameters()
    bw = None
    if bw_samples:
        samples = bw_samples[1:] or bw_samples                # the warm-up call's aside
        bw = float(np.median([gbs for gbs, _ in samples]))
        row["read_gb_per_s"] = bw
        row["read_cpu_per_wall"] = float(np.median([cpu for _, cpu in samples]))
        row["limit_tokens_per_s"] = bw * 1e9 / weight_bytes
    for lib in [k for k in gen if not k.endswith("_short") and k != "bandwidth"]:
        step = max(gen[lib] - gen[lib + "_short"], 1e-9) / max(n - n0, 1)
        row[f"{lib}_step_ms"] = 1e3 * step
        row[f"{lib}_tokens_per_s"] = 1.0 / step
        # every parameter (float32) is read once per step at batch 1
        row[f"{lib}_weight_gb_per_s"] = weight_bytes / step / 1e9
        if bw:
            row[f"{lib}_bandwidth_fraction"] = row[f"{lib}_weight_gb_per_s"] / bw
    put_ratio(row, "vs_torch_cache", row.get("torch_cache_step_ms"), row["smallmind_step_ms"])
    if "torch_cache" in res:
        row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    row["loadavg_1min"] = (loadavg() or [None])[0]
    frac = lambda lib: (f", {100 * row[lib + '_bandwidth_fraction']:.0f}% of the read bandwidth"
                        if lib + "_bandwidth_fraction" in row else "")
    print(f"  step   {name:<16} t={threads} {n} new, in the window: smallmind "
          f"{row['smallmind_step_ms']:8.3f} ms/token ({row['smallmind_weight_gb_per_s']:.1f} GB/s of "
          f"weights{frac('smallmind')}) | torch cache {fx(row.get('torch_cache_step_ms'), '8.3f')} ms "
          f"({fx(row.get('torch_cache_weight_gb_per_s'), '.1f')} GB/s{frac('torch_cache')}) | "
          f"sm {times(row.get('vs_torch_cache'))} faster"
          f" | first divergence {row.get('diverge_vs_torch_cache', '-')}  (load {row['loadavg_1min']})",
          flush=True)
    if bw:
        print(f"         read bandwidth in these rounds {bw:.1f} GB/s on {threads} thread(s): limit "
              f"{row['limit_tokens_per_s']:,.1f} tok/s for {weight_bytes / 1e6:.1f} MB of weights; "
              f"smallmind {100 * row['smallmind_bandwidth_fraction']:.0f}%, torch cache "
              f"{fx(row.get('torch_cache_bandwidth_fraction'), '.0%')} of it", flush=True)
    return row


def batch_row(name, model, tmodel, plan, threads, quick):
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, MODELS[name][0], size=(BATCH, plan["prompt"])).astype(np.int64)
    n = plan["batch_new"]
    fns = {"smallmind": lambda: sm_generate(model, prompt, n, threads)}
    if tmodel is not None:
        from torch_gpt import generate_with_cache
        pt = torch.from_numpy(prompt)
        fns["torch_cache"] = lambda: generate_with_cache(tmodel, pt, n, WINDOW).numpy()
    secs, res = run_rounds(fns, plan["rounds"], quick)
    row = base_row("batch", name, plan, threads, model.config.num_parameters())
    row.update(batch=BATCH, new_tokens=n, window=WINDOW)
    for lib, sec in secs.items():
        row[f"{lib}_s"] = sec
        row[f"{lib}_tokens_per_s"] = BATCH * n / sec
    put_ratio(row, "vs_torch_cache", secs.get("torch_cache"), secs["smallmind"])
    if "torch_cache" in res:
        row["diverge_vs_torch_cache"] = first_divergence(res["smallmind"], res["torch_cache"])
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  batch  {name:<16} t={threads} B={BATCH} {n} new: smallmind "
          f"{row['smallmind_tokens_per_s']:8.1f} tok/s | torch cache "
          f"{with_ratio(row, 'torch_cache_tokens_per_s', 'vs_torch_cache')}"
          f" | first divergence {row.get('diverge_vs_torch_cache', '-')}  "
          f"(load {row['loadavg_1min']})", flush=True)
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
    n = plan["stream_new"]
    rng = np.random.default_rng(11)
    prompts = rng.integers(0, MODELS[name][0], size=(max(STREAMS), 1, plan["prompt"])).astype(np.int64)

    if MODELS[name][0] <= 65:
        # end to end through Sampling (the text a user's thread generates), as decode_row
        tok = sm.Tokenizer("".join(chr(48 + i) for i in range(MODELS[name][0])))
        texts = [tok.decode([int(t) for t in p[0]]) for p in prompts]

        def sm_one(i):
            sm.Sampling(model, tok, threads=1).generate(texts[i], n, temperature=0)
    else:
        def sm_one(i):
            sm_generate(model, prompts[i], n, 1)

    def sm_worker(i, barrier):
        barrier.wait()
        sm_one(i)

    warm = [lambda: sm_one(0)]
    if tmodel is not None:
        from torch_gpt import generate_with_cache
        tprompts = [torch.from_numpy(p) for p in prompts]

        def torch_worker(i, barrier):
            torch.set_num_threads(1)   # per thread: a new thread does not inherit the setting
            barrier.wait()
            generate_with_cache(tmodel, tprompts[i], n, WINDOW)

        warm.append(lambda: generate_with_cache(tmodel, tprompts[0], n, WINDOW))
    for fn in warm:
        idle(quick)
        fn()   # warm-up, in this thread
    rows = []
    base = {}
    for k in STREAMS:
        fns = {"smallmind": lambda k=k: concurrent(sm_worker, k)}
        if tmodel is not None:
            fns["torch_cache"] = lambda k=k: concurrent(torch_worker, k)
        walls = {lib: [] for lib in fns}
        for _ in range(1 if quick else max(1, plan["rounds"] - 1)):
            for lib, fn in fns.items():
                idle(quick)
                walls[lib].append(fn())
        row = base_row("streams", name, plan, 1, model.config.num_parameters())
        row.update(streams=k, new_tokens=n, batch=1, window=WINDOW)
        for lib, ws in walls.items():
            w = float(np.median(ws))
            row[f"{lib}_wall_s"] = w
            row[f"{lib}_tokens_per_s"] = k * n / w
            if k == STREAMS[0]:
                base[lib] = row[f"{lib}_tokens_per_s"]
            row[f"{lib}_scaling"] = row[f"{lib}_tokens_per_s"] / base[lib]
        put_ratio(row, "vs_torch_cache", row["smallmind_tokens_per_s"],
                  row.get("torch_cache_tokens_per_s"))
        row["loadavg_1min"] = (loadavg() or [None])[0]
        print(f"  streams {name:<15} {k} x threads=1, {n} new each: smallmind "
              f"{row['smallmind_tokens_per_s']:8.1f} tok/s ({row['smallmind_scaling']:.2f}x of 1) | "
              f"torch cache "
              f"{with_ratio(row, 'torch_cache_tokens_per_s', 'torch_cache_scaling', ' of 1')}"
              f" | sm/torch {times(row.get('vs_torch_cache'))}  (load {row['loadavg_1min']})",
              flush=True)
        rows.append(row)
    return rows


def forward_rows(name, model, tmodel, plan, quick):
    """1 and 2 Python threads each calling the model's forward at batch 1 on a whole window
    (1 library thread per call, the GIL released inside): calls/s and the scaling of 2 threads
    over 1. What is left to scale is each call's own overhead (validation, pool rent, the GIL
    handoffs around the C call)."""
    T, V = MODELS[name][1], MODELS[name][0]
    idx = np.random.default_rng(5).integers(0, V, size=(1, T)).astype(np.int32)
    if quick:
        reps = 20
    else:                       # about 2 s per thread per round, whatever the model
        t0 = time.perf_counter()
        model.forward(idx, threads=1)
        reps = int(min(2000, max(20, 2.0 / max(time.perf_counter() - t0, 1e-6))))
    if torch is not None:
        tidx = torch.from_numpy(idx.astype(np.int64))

    def sm_worker(i, barrier):
        barrier.wait()
        for _ in range(reps):
            model.forward(idx, threads=1)

    def torch_worker(i, barrier):
        torch.set_num_threads(1)
        barrier.wait()
        with torch.inference_mode():
            for _ in range(reps):
                tmodel(tidx)

    fns = {"smallmind": sm_worker}
    if tmodel is not None:
        fns["torch"] = torch_worker
    rows, base = [], {}
    for k in (1, 2):
        walls = {lib: [] for lib in fns}
        for _ in range(1 if quick else 5):
            for lib, w in fns.items():
                idle(quick)
                walls[lib].append(concurrent(w, k))
        row = base_row("forward", name, plan, 1, model.config.num_parameters())
        row.update(python_threads=k, batch=1, tokens=T, calls_per_thread=reps)
        for lib, ws in walls.items():
            row[f"{lib}_calls_per_s"] = k * reps / float(np.median(ws))
            base.setdefault(lib, row[f"{lib}_calls_per_s"])
            row[f"{lib}_scaling"] = row[f"{lib}_calls_per_s"] / base[lib]
        put_ratio(row, "vs_torch", row["smallmind_calls_per_s"], row.get("torch_calls_per_s"))
        row["loadavg_1min"] = (loadavg() or [None])[0]
        print(f"  forward {name:<15} {k} Python thread(s), batch 1 x {T} tokens: smallmind "
              f"{row['smallmind_calls_per_s']:9.1f} calls/s ({row['smallmind_scaling']:.2f}x of 1) | "
              f"torch {with_ratio(row, 'torch_calls_per_s', 'torch_scaling', ' of 1')} | sm/torch "
              f"{times(row.get('vs_torch'))}  (load {row['loadavg_1min']})", flush=True)
        rows.append(row)
    if torch is not None:
        torch.set_num_threads(1)
    return rows


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small model, few tokens (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", default="1,2", help="comma-separated library thread counts "
                    "(default 1,2); the streams and forward parts use 1 per Python thread")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {','.join(PARTS)}")
    ap.add_argument("--models", default=None, help=f"comma-separated of {','.join(MODELS)}")
    args = ap.parse_args(argv)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    names = (["tiny"] if args.quick else list(MODELS)) if not args.models else \
        [m.strip() for m in args.models.split(",")]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {PARTS}")
    for m in names:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {tuple(MODELS)}")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error("--threads must be comma-separated integers")
    if min(thread_counts) < 1:
        ap.error("--threads must be >= 1")
    import_libs()
    info = machine_info()
    print(f"smallmind {info['smallmind']} | {info.get('cpu', '?')}, {info['cores']} cores | "
          f"{info['build']}")
    print(f"numpy {info['numpy']} | torch {info['torch'] or '-'} | threads {thread_counts}")
    load_start = loadavg()
    print(f"load average (1, 5, 15 min) at start {load_start}")
    t_start = time.perf_counter()
    rows = []
    arrs = None
    if "bandwidth" in parts:
        print("\nmemory", flush=True)
        arrs = bandwidth_arrays()
        rows += bandwidth_rows(arrs)
    for name in names:
        V, T, L, H, C = MODELS[name]
        plan = dict(QUICK_PLAN) if args.quick else PLAN[name]
        model = sm.TransformerModel(sm.ModelConfig(V, T, L, H, C, dropout=0.0, seed=42)).eval()
        tmodel = None
        if torch is not None:
            from torch_gpt import from_numpy_state
            tmodel = from_numpy_state(model.config, model.state_dict()).eval()
        print(f"\n{name}: {L} layers, {H} heads, {C} wide, block {T}, vocab {V}, "
              f"{model.config.num_parameters() / 1e6:.2f} M parameters", flush=True)
        prompt = np.random.default_rng(3).integers(0, V, size=(1, plan["prompt"])).astype(np.int64)
        for nt in thread_counts:
            sm.set_num_threads(nt)
            if torch is not None:
                torch.set_num_threads(nt)
            if "decode" in parts:
                rows.append(decode_row(name, model, tmodel, prompt, plan, nt, args.quick))
            if "sampled" in parts:
                rows.append(decode_row(name, model, tmodel, prompt, plan, nt, args.quick,
                                       sampled=True))
            if "slide" in parts:
                rows.append(decode_row(name, model, tmodel, prompt, plan, nt, args.quick,
                                       window="slide"))
            if "ttft" in parts:
                rows.append(ttft_row(name, model, tmodel, prompt, plan, nt, args.quick))
            if "prefill" in parts:
                rows += prefill_rows(name, model, tmodel, plan, nt, args.quick)
            if "step" in parts:
                if min(plan["new"], T - plan["prompt"]) >= 8:
                    rows.append(step_row(name, model, tmodel, prompt, plan, nt, args.quick, arrs))
                else:
                    print(f"  step   {name:<16} skipped: the prompt fills the window", flush=True)
            if "batch" in parts:
                rows.append(batch_row(name, model, tmodel, plan, nt, args.quick))
        if "streams" in parts:
            rows += streams_rows(name, model, tmodel, plan, args.quick)
        if "forward" in parts:
            rows += forward_rows(name, model, tmodel, plan, args.quick)
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
        write_json(args.json, info, args.quick, rows)


if __name__ == "__main__":
    main()
