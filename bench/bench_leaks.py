"""bench_leaks.py - memory held after many forward passes and generations in one process: the
resident set (RSS) and the C allocator's live blocks after a warm-up, and again at the end, with
the pool's outstanding buffers (which must be back to zero). tests/test_leaks.py runs the same
workload with generous bounds; this prints the precise figures.

    python bench/bench_leaks.py --json bench/results/leaks.json   # 10,000 forwards + 2,000 generations
    python bench/bench_leaks.py --quick                            # smoke run (seconds)

The workload mixes shapes (batch 1-4, 1..block_size tokens), a training step every 50 forwards,
and generations of every kind: single, batch, streamed, cancelled midway, and past block_size
(the window moves). Threads 2 runs the same calls from two Python threads sharing the model.
"""
import argparse
import gc
import os
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import basic_machine, write_json  # noqa: E402

try:
    import smallmind as sm
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    import smallmind as sm
from smallmind.core.tracker import process_rss  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "You are all resolved rather to die than to famish?\n") * 4


def build(preset="tiny", seed=0):
    tok = sm.Tokenizer(TEXT)
    model = sm.TransformerModel(sm.ModelConfig.preset(preset, vocab_size=tok.vocab_size, seed=seed))
    return model, tok


def shapes(block_size):
    """The (batch, tokens) shapes the forwards cycle through. A fixed cycle, so the warm-up sees
    every one: the pool keeps idle blocks of each size class it has served (by design, up to
    its limits), and random shapes would let that cache grow long after the warm-up."""
    return [(b, t) for b in (1, 2, 4) for t in sorted({1, 7, block_size // 2, block_size})]


def forwards(model, n, rng, train=True):
    """n forward passes of mixed shapes; with train, every 50th is a training step (forward +
    backward; only in single-threaded runs, since train mode is not shared between threads)."""
    cfg = model.config
    cycle = shapes(cfg.block_size)
    for i in range(n):
        B, T = cycle[i % len(cycle)]
        idx = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
        if train and i % 50 == 49:
            model.train()
            model.forward(idx, idx)
            model.zero_grad()
            model.backward()
            model.eval()
        else:
            model.forward(idx)


def generations(model, tok, n, rng):
    """n generations: single, batch, streamed, cancelled midway, past block_size."""
    sampler = sm.Sampling(model, tok)
    prompts = ["First ", "All:\n", "Speak", "You are all "]
    for i in range(n):
        kind = i % 5
        p = prompts[i % len(prompts)]
        seed = int(rng.integers(0, 1 << 31))
        if kind == 0:
            sampler.generate(p, 16, temperature=0.8, top_k=10, seed=seed)
        elif kind == 1:
            sampler.generate_batch(prompts[: 1 + i % 4], 8, temperature=0.9, top_p=0.9, seed=seed)
        elif kind == 2:                     # streamed; every other one left after 3 pieces
            for j, _ in enumerate(sampler.stream(p, 12, temperature=0)):
                if i % 2 and j == 3:
                    break
        elif kind == 3:                     # cancelled after 5 tokens
            cancel = threading.Event()
            try:
                for j, _ in enumerate(sampler.stream(p, 40, seed=seed, cancel=cancel)):
                    if j == 5:
                        cancel.set()
            except sm.CancelledError:
                pass
        else:
            sampler.generate(p, model.config.block_size + 8, temperature=0.7, seed=seed)


def _state(trim=False):
    """RSS, pool and allocator counts now; trim=True first frees the pool's idle blocks, so
    live blocks are those something still holds."""
    gc.collect()
    if trim:
        sm.default_pool().trim()
    pool = sm.default_pool().stats()
    g = sm._core._pool_global_stats()
    return {"rss": process_rss(), "outstanding": pool["outstanding_buffers"],
            "pooled_bytes": pool["pooled_bytes"],
            "live_blocks": g["live_blocks"], "live_bytes": g["live_bytes"],
            "objects": len(gc.get_objects())}


def measure(n_forward=10_000, n_generate=2_000, warmup=0.1, threads=1, preset="tiny", seed=0,
            samples=5):
    """Run the workload in `threads` Python threads (each its share); return the state after the
    warm-up (the first `warmup` fraction of both counts) and at `samples` points after it."""
    before = _state(trim=True)
    model, tok = build(preset, seed)
    rngs = [np.random.default_rng(seed + t) for t in range(threads)]

    def run(nf, ng):
        def work(t):
            forwards(model, nf // threads, rngs[t], train=threads == 1)
            generations(model, tok, ng // threads, rngs[t])
        ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()

    t0 = time.perf_counter()
    run(int(n_forward * warmup), int(n_generate * warmup))
    start = _state()
    points = []
    rest_f, rest_g = n_forward - int(n_forward * warmup), n_generate - int(n_generate * warmup)
    for _s in range(samples):
        run(rest_f // samples, rest_g // samples)
        points.append(_state())
    end = points[-1]
    model.dispose()
    model = None            # the last reference: the model and its buffers go now
    after = _state(trim=True)   # the model gone: every block back and freed
    return {"preset": preset, "threads": threads, "forwards": n_forward, "generations": n_generate,
            "warmup_fraction": warmup, "seconds": round(time.perf_counter() - t0, 1),
            "after_warmup": start, "points": points,
            "rss_growth_bytes": end["rss"] - start["rss"],
            "max_rss_growth_bytes": max(p["rss"] for p in points) - start["rss"],
            "live_blocks_growth": end["live_blocks"] - start["live_blocks"],
            "live_bytes_growth": end["live_bytes"] - start["live_bytes"],
            "objects_growth": end["objects"] - start["objects"],
            "outstanding_end": end["outstanding"],
            "outstanding_after_dispose": after["outstanding"] - before["outstanding"],
            "live_blocks_after_dispose": after["live_blocks"] - before["live_blocks"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 forwards, 100 generations")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    nf, ng = (500, 100) if a.quick else (10_000, 2_000)
    rows = []
    for preset, threads in [("tiny", 1), ("tiny", 2), ("small", 1)]:
        if a.quick and preset == "small":
            continue
        r = measure(nf, ng, threads=threads, preset=preset)
        rows.append(r)
        print(f"{preset:6s} threads {threads}: {nf} forwards + {ng} generations in {r['seconds']} s; "
              f"RSS growth after warm-up {r['rss_growth_bytes'] / 1024:+.0f} KiB "
              f"(max {r['max_rss_growth_bytes'] / 1024:+.0f} KiB); live C blocks "
              f"{r['live_blocks_growth']:+d} ({r['live_bytes_growth']:+d} bytes); Python objects "
              f"{r['objects_growth']:+d}; pool outstanding after dispose {r['outstanding_after_dispose']}")
    if a.json:
        write_json(a.json, basic_machine(), a.quick, rows)


if __name__ == "__main__":
    main()
