"""bench_contention.py - generation speed when another process keeps one of the cores busy:
fixed thread counts against the adaptive step threads of Sampling (a decode step falls back to
1 thread when its OpenMP barriers start waiting for the scheduler, see sampling._StepThreads).

    python bench/bench_contention.py --json bench/results/contention.json
    python bench/bench_contention.py --quick      # smoke run (seconds)

Each row: milliseconds per generated token (median of --reps runs) on an idle machine and with
one busy process (a Python loop spinning) started before the timed runs and stopped after.
"fixed" rows replace the adaptive choice with the given count for every step.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import basic_machine, write_json  # noqa: E402

try:
    import smallmind as sm
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    import smallmind as sm
from smallmind.generation import sampling  # noqa: E402


def _spin(stop):
    while not stop.is_set():
        for _ in range(10000):
            pass


class _Fixed(sampling._StepThreads):
    """Every step on the count given (the behaviour before adaptive step threads)."""

    def run(self, fn, *args):
        return fn(*args, self.multi)


def per_token_ms(model, tok, threads, tokens, reps, fixed):
    original = sampling._StepThreads
    sampling._StepThreads = _Fixed if fixed else original
    try:
        times = []
        for _r in range(reps):
            s = sm.Sampling(model, tok, threads=threads)
            t0 = time.perf_counter()
            s.generate("The ", tokens, temperature=0)
            times.append((time.perf_counter() - t0) / tokens * 1e3)
        return statistics.median(times)
    finally:
        sampling._StepThreads = original


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    tokens = 20 if a.quick else 200
    text = sm.corpus.builtin_corpus(50_000)
    tok = sm.Tokenizer(text)
    presets = ["small"] if a.quick else ["small", "shakespeare-char"]
    rows = []
    for preset in presets:
        model = sm.TransformerModel(sm.ModelConfig.preset(preset, tok.vocab_size)).eval()
        for busy in (False, True):
            stop = mp.Event()
            spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
            if spinner:
                spinner.start()
                time.sleep(0.5)
            try:
                for threads, fixed in ((1, True), (2, True), (2, False)):
                    ms = per_token_ms(model, tok, threads, tokens, 1 if a.quick else a.reps, fixed)
                    row = {"preset": preset, "busy_process": busy, "threads": threads,
                           "steps": "fixed" if fixed else "adaptive", "ms_per_token": round(ms, 4)}
                    rows.append(row)
                    print(f"{preset:16s} {'busy' if busy else 'idle'}  threads {threads} "
                          f"{row['steps']:8s} {ms:9.3f} ms/token", flush=True)
            finally:
                if spinner:
                    stop.set()
                    spinner.join()
        model.dispose()
    if a.json:
        write_json(a.json, basic_machine(), a.quick, rows)


if __name__ == "__main__":
    main()
