"""test_stress.py - 16 Python threads mixing forward passes, generations (single, batch,
streamed), vector searches with concurrent adds and removes on a second index, matrix products,
softmax and pool traffic, for a fixed number of operations each; every result must equal, bit
for bit, the same call made serially first, the pools must end where they started, and a
watchdog fails the test (with every thread's stack) instead of letting a deadlock hang CI."""
import faulthandler
import sys
import threading

import numpy as np
import pytest

import smallmind as sm

THREADS = 16
OPS_PER_THREAD = 150
WATCHDOG_S = 600

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness.\n") * 3


def _jobs():
    """(name, callable) pairs; each callable is deterministic and returns something comparable."""
    tok = sm.Tokenizer(TEXT)
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32, seed=5)).eval()
    rng = np.random.default_rng(0)
    for v in model.state_dict().values():      # sharpen: the context matters to every token
        v[...] += rng.standard_normal(v.shape).astype(np.float32) * 0.1
    index = sm.VectorIndex(32, metric="cosine")
    vecs = rng.standard_normal((3000, 32)).astype(np.float32)
    index.add(vecs, ids=list(range(3000)))
    queries = rng.standard_normal((8, 32)).astype(np.float32)
    a = rng.standard_normal((67, 45)).astype(np.float32)
    b = rng.standard_normal((45, 83)).astype(np.float32)
    x = rng.standard_normal((9, 130)).astype(np.float32)
    ids = [rng.integers(0, tok.vocab_size, (B, T)).astype(np.int32)
           for B, T in ((1, 1), (2, 17), (4, 32), (3, 5))]
    prompts = ["It was", "the age", "of wis", "best "]

    def forward(i, threads):
        return lambda: model.forward(ids[i], threads=threads)

    def generate(p, seed, threads):
        return lambda: sm.Sampling(model, tok, threads=threads).generate(
            prompts[p], 40, temperature=0.9, top_k=8, seed=seed)

    def batch(seed):
        return lambda: sm.Sampling(model, tok, threads=1).generate_batch(
            prompts, 12, temperature=1.0, top_p=0.9, seed=seed)

    def stream(p):
        return lambda: "".join(sm.Sampling(model, tok, threads=1).stream(prompts[p], 48, temperature=0))

    def search(q, k, threads):
        return lambda: index.search(queries[q:q + 2], k, threads=threads)

    jobs = []
    for i in range(len(ids)):
        jobs += [(f"forward{i}/1", forward(i, 1)), (f"forward{i}/2", forward(i, 2))]
    for p in range(len(prompts)):
        jobs += [(f"generate{p}", generate(p, 100 + p, 1)), (f"stream{p}", stream(p))]
    jobs += [("generate/2", generate(0, 7, 2)), ("batch", batch(3))]
    jobs += [(f"search{q}/{t}", search(q, 10 + q, t)) for q in (0, 3, 6) for t in (1, 2)]
    jobs += [("matmul/2", lambda: sm.kernels.matmul(a, b, threads=2)),
             ("matmul/1", lambda: sm.kernels.matmul(a, b, threads=1)),
             ("softmax", lambda: sm.kernels.softmax(x))]
    return jobs, (model, index)


def _same(x, y):
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    return x == y


def test_sixteen_threads_mixing_everything_equal_serial():
    jobs, (model, index) = _jobs()
    serial = {name: fn() for name, fn in jobs}          # the references
    pool = sm.MemoryPool(max_buffer_size=1 << 20)
    default_before = sm.default_pool().stats()["outstanding_buffers"]
    mismatches, errors, done = [], [], [0] * THREADS
    side = sm.VectorIndex(8, metric="l2")               # mutated while others search it
    side_rng = np.random.default_rng(1)
    initial = side.add(side_rng.standard_normal((500, 8)).astype(np.float32))
    # each removing thread (t % 4 == 1) removes its own share of the first ids: two threads
    # reading side.ids[:1] at once would both try to remove the same id
    removable = {t: list(initial[t // 4::4]) for t in range(THREADS) if t % 4 == 1}
    side_q = np.zeros(8, np.float32)
    start = threading.Barrier(THREADS)

    def worker(t):
        rng = np.random.default_rng(1000 + t)
        order = rng.permutation(len(jobs))
        try:
            start.wait()
            for n in range(OPS_PER_THREAD):
                name, fn = jobs[order[n % len(jobs)]]
                got = fn()
                if not _same(got, serial[name]):
                    mismatches.append((t, name))
                # Pool traffic: a buffer is private to its renter while rented.
                size = int(rng.integers(1, 5000))
                with pool.rent(size) as buf:
                    view = np.asarray(buf)
                    view[:] = t * 1000 + n
                    sm.kernels.softmax(x=np.ones((2, 4), np.float32))   # let others run
                    if not (view == t * 1000 + n).all():
                        mismatches.append((t, "pool buffer shared"))
                    del view
                # A second index changes under concurrent searches: every answer is a top-k
                # of some consistent state (sorted distances, ids present at the time).
                if t % 4 == 0:
                    side.add(rng.standard_normal((3, 8)).astype(np.float32))
                elif t % 4 == 1 and n % 3 == 0:
                    side.remove([removable[t].pop(0)])
                else:
                    ids, scores = side.search(side_q, 5, threads=1 + n % 2)
                    if list(scores) != sorted(scores) or len(ids) != 5:   # l2: nearest first
                        mismatches.append((t, "side index search"))
                done[t] += 1
        except BaseException as e:         # reported below, not lost in the thread
            errors.append((t, repr(e)))

    ths = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(WATCHDOG_S)
    alive = [th for th in ths if th.is_alive()]
    if alive:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"watchdog: {len(alive)} threads still running after {WATCHDOG_S} s "
                    f"(deadlock?); completed operations per thread: {done}")
    assert not errors, errors[:5]
    assert not mismatches, mismatches[:10]
    assert done == [OPS_PER_THREAD] * THREADS
    # Nothing leaked from either pool; the shared objects still answer as before.
    assert pool.stats()["outstanding_buffers"] == 0
    assert sm.default_pool().stats()["outstanding_buffers"] == default_before
    for name, fn in jobs[:4]:
        assert _same(fn(), serial[name])
    assert len(side) == 500 + 3 * sum(OPS_PER_THREAD for t in range(THREADS) if t % 4 == 0) \
        - sum(len(range(0, OPS_PER_THREAD, 3)) for t in range(THREADS) if t % 4 == 1)
    pool.dispose()
    side.dispose()
    index.dispose()
