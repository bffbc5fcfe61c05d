"""fork_job.py - run by test_fork.py in a fresh interpreter: worker processes started with a
given method after the parent did (or did not) run multi-threaded work, optionally while the
parent's threads are busy inside smallmind; prints what the workers computed and what the
parent computes for the same inputs, as JSON. Not a test module itself."""
import json
import multiprocessing as mp
import sys
import threading

import numpy as np

import smallmind as sm

METHOD, PARENT, THREADS = sys.argv[1], sys.argv[2], sys.argv[3]
A = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)
TEXT = "the cat sat on the mat. the dog ran in the fog. " * 20


def make():
    tok = sm.Tokenizer(TEXT)
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 32, 2, 2, 64, seed=3)).eval()
    return model, tok


def work(i):
    threads = None if THREADS == "default" else int(THREADS)
    model, tok = make()
    text = sm.Sampling(model, tok, threads=threads).generate("the ", 40, temperature=0.8,
                                                            seed=i)
    m = sm.kernels.matmul(A, A, threads=threads)
    pool = sm.default_pool()
    buf = pool.rent(1 << 16)
    buf.close()
    return text, float(m.astype(np.float64).sum()), sm.get_num_threads()


if __name__ == "__main__":
    stop = threading.Event()
    busy = []
    if PARENT in ("used", "busy"):
        work(99)                               # the parent runs a team of threads first
    if PARENT == "busy":
        def spin():                            # threads inside smallmind while the fork happens
            while not stop.is_set():
                sm.kernels.matmul(A, A, threads=2)
                sm.default_pool().rent(1 << 12).close()
        busy = [threading.Thread(target=spin) for _ in range(2)]
        for t in busy:
            t.start()
    with mp.get_context(METHOD).Pool(2) as p:
        got = p.map(work, range(4))
    stop.set()
    for t in busy:
        t.join()
    want = [work(i)[:2] for i in range(4)]
    print(json.dumps({"workers": got, "parent": want,
                      "fork_state": sm.core._core.fork_state()}))
