"""bench_pool.py - MemoryPool rent+return throughput against numpy's allocator (np.empty), side
by side, for a few buffer sizes, from 1 and 2 Python threads.

    python bench/bench_pool.py            # table
    python bench/bench_pool.py --quick    # smoke run (a second)

Each row times a batch of operations (aggregate over the threads) and reports seconds per
batch; ratio = numpy_s / smallmind_s (above 1: the pool is faster). Three smallmind variants:
"rent+return" (the pool's own cost), "rent+asarray+return" (what a Python user who wants an
ndarray pays), both against `np.empty(n, np.float32)` + drop, and "rent+fill+return" against
`np.empty` + fill for a 64 MiB buffer: the case a pool exists for, since glibc maps buffers
above 32 MiB fresh on every allocation and each one pays its page faults again.
`cases(quick, threads=None)` returns the rows for bench/bench_kernels.py. Medians of repeats.
"""
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _timing

import smallmind as sm  # noqa: E402

BATCH = 20_000
SIZES = [256, 16_384, 262_144, 4_194_304]        # 1 KiB, 64 KiB, 1 MiB, 16 MiB of float32
QUICK_SIZES = [256, 262_144]
FILL_N, FILL_BATCH = 16 << 20, 16                 # 64 MiB buffers, written in full


def _sm_loop(pool, n, reps, with_array):
    rent = pool.rent
    if with_array:
        asarray = np.asarray
        for _ in range(reps):
            b = rent(n)
            a = asarray(b)
            del a
            b.release()
    else:
        for _ in range(reps):
            rent(n).release()


def _np_loop(n, reps):
    empty, f32 = np.empty, np.float32
    for _ in range(reps):
        a = empty(n, f32)
        del a


def _sm_fill(pool, n, reps):
    for _ in range(reps):
        b = pool.rent(n)
        a = np.asarray(b)
        a.fill(1.0)
        del a
        b.release()


def _np_fill(n, reps):
    for _ in range(reps):
        a = np.empty(n, np.float32)
        a.fill(1.0)
        del a


def _timed(fn, nthreads, ops):
    """Wall seconds for `ops` calls of fn split over nthreads Python threads."""
    per = ops // nthreads
    if nthreads == 1:
        t = time.perf_counter()
        fn(per)
        return time.perf_counter() - t
    barrier = threading.Barrier(nthreads + 1)

    def work():
        barrier.wait()
        fn(per)

    ts = [threading.Thread(target=work) for _ in range(nthreads)]
    for th in ts:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def _median(fn, nthreads, repeats, batch=BATCH):
    fn(max(batch // 10, 2))               # warm up: fills the pool, faults pages in
    return float(np.median([_timed(fn, nthreads, batch) for _ in range(repeats)]))


def cases(quick=False, threads=None):
    """Rows {"name", "shape", "threads", "smallmind_s", "numpy_s", "ratio", ...}: seconds per
    BATCH rent+return operations (aggregate over `threads` Python threads; None: 1 and 2)."""
    sizes = QUICK_SIZES if quick else SIZES
    repeats = 1 if quick else 9
    thread_counts = [1, 2] if threads is None else [int(threads)]
    rows = []
    pool = sm.MemoryPool(max_buffer_size=max(sizes + [FILL_N]), max_buffers_per_bucket=8)
    try:
        for nt in thread_counts:
            for n in sizes:
                t_np = _median(lambda k: _np_loop(n, k), nt, repeats)
                for with_array in (False, True):
                    t_sm = _median(lambda k: _sm_loop(pool, n, k, with_array), nt, repeats)
                    name = "pool rent+asarray+return" if with_array else "pool rent+return"
                    rows.append({
                        "name": name, "kernel": name, "shape": f"n={n} x{BATCH}", "threads": nt,
                        "smallmind_s": t_sm, "numpy_s": t_np, "ratio": t_np / t_sm,
                        "smallmind_ops_per_s": BATCH / t_sm, "numpy_ops_per_s": BATCH / t_np,
                    })
            n, batch = (FILL_N // 16, 8) if quick else (FILL_N, FILL_BATCH)
            t_np = _median(lambda k: _np_fill(n, k), nt, repeats, batch)
            t_sm = _median(lambda k: _sm_fill(pool, n, k), nt, repeats, batch)
            rows.append({
                "name": "pool rent+fill+return", "kernel": "pool rent+fill+return",
                "shape": f"n={n} x{batch}", "threads": nt, "smallmind_s": t_sm, "numpy_s": t_np,
                "ratio": t_np / t_sm, "smallmind_ops_per_s": batch / t_sm,
                "numpy_ops_per_s": batch / t_np,
            })
    finally:
        pool.dispose()
    return rows


def main(argv=None):
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    print(f"smallmind {sm.__version__} | numpy {np.__version__} | {sm.build_info()}")
    print(f"{'case':26s} {'n (float32)':>12s} {'thr':>3s} {'smallmind ops/s':>16s} "
          f"{'np.empty ops/s':>15s} {'ratio':>6s}")
    for r in cases(quick=quick):
        n = r["shape"].split()[0][2:]
        print(f"{r['name']:26s} {n:>12s} {r['threads']:>3d} {r['smallmind_ops_per_s']:16,.0f} "
              f"{r['numpy_ops_per_s']:15,.0f} {r['ratio']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
