"""bench_index.py - exact top-10 cosine search, smallmind.VectorIndex against numpy brute force
(a normalised matrix product plus argpartition, the usual few lines), on 100,000 x 128 and
1,000,000 x 64 float32 vectors: single queries and batches of 64, 1 and 2 threads; add
throughput and memory per vector. Each storage is measured: float32, and the compact bf16 and
int8 copies read first - exact (float32 re-rank: the float32 results) and exact=False (compact
rows only, with recall@10 against the exact top-10).

    python bench/bench_index.py --json bench/results/index.json   # full run (~3 min, 2 cores)
    python bench/bench_index.py --quick                            # smoke run (seconds)

numpy's side: the stored matrix is normalised once (not timed, as an index would keep it); a
query is normalised, multiplied (OpenBLAS, its thread count set with threadpoolctl when that is
installed, else OPENBLAS_NUM_THREADS is read at start), the 10 best taken with argpartition and
sorted. smallmind's side: VectorIndex.search(..., threads=t). Both are timed alternately (round
robin, an idle gap before each block so the other's worker threads are asleep), medians
reported; the top-10 ids of both are checked to agree.
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg, write_json  # noqa: E402

try:
    import smallmind as sm
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    import smallmind as sm

SHAPES = [(100_000, 128), (1_000_000, 64)]
QUICK_SHAPES = [(20_000, 64)]
K = 10
BATCH = 64
# Before each timed block: an idle gap, so that the other library's worker threads (OpenBLAS
# spins for a good part of a second after a call) have gone to sleep and do not take the cores.
IDLE_GAP_S = 0.5


def blas_threads(n):
    """Limit numpy's BLAS to n threads for the block (threadpoolctl), if it is installed."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(n, user_api="blas")
    except ImportError:
        import contextlib
        return contextlib.nullcontext()


def numpy_search(Xn, q, k):
    """Top-k cosine ids and scores with numpy: q (nq, dim); Xn rows already unit length."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    S = qn @ Xn.T
    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(S, part, 1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(top, order, 1)


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


STORAGES = [("float32", True), ("bf16", True), ("int8", True), ("bf16", False), ("int8", False)]


def run_shape(n, dim, threads_list, quick, storages):
    rows = []
    for storage, exact in storages:
        rows += run_storage(n, dim, threads_list, quick, storage, exact)
    return rows


def run_storage(n, dim, threads_list, quick, storage, exact):
    rng = np.random.default_rng(n + dim)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    Q = rng.standard_normal((BATCH, dim)).astype(np.float32)
    rows = []
    what = storage + ("" if exact else " (exact=False)")
    index = sm.VectorIndex(dim, "cosine", storage=storage, exact=exact)
    t0 = time.perf_counter()
    for s in range(0, n, 10_000):
        index.add(X[s:s + 10_000])
    add_s = time.perf_counter() - t0
    rows.append({"kind": "index", "part": "add", "n": n, "dim": dim, "storage": storage,
                 "exact": exact, "vectors_per_s": n / add_s,
                 "bytes_per_vector": index.nbytes / n})
    print(f"  add {n:>9,} x {dim} {what}: {n / add_s:12,.0f} vectors/s, {index.nbytes / n:.0f} "
          f"bytes per vector ({4 * dim} of data)", flush=True)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    reps_single = 3 if quick else 15
    reps_batch = 1 if quick else 5
    for t in threads_list:
        for label, q, reps in (("single", Q[:1], reps_single), ("batch", Q, reps_batch)):
            with blas_threads(t):
                fns = {"smallmind": lambda q=q: index.search(q, K, threads=t),
                       "numpy": lambda q=q: numpy_search(Xn, q, K)}
                times = {name: [] for name in fns}
                for fn in fns.values():
                    fn()                                   # warm-up
                for _ in range(1 if quick else 3):         # rounds, alternating
                    for name, fn in fns.items():
                        if not quick:
                            time.sleep(IDLE_GAP_S)
                        times[name].append(timed(fn, reps))
                ids_sm, _ = index.search(q, K, threads=t)
                ids_np, _ = numpy_search(Xn, q, K)
            agree = float(np.mean([set(a) == set(b.tolist()) for a, b in zip(ids_sm, ids_np)]))
            recall = float(np.mean([len(set(a) & set(b.tolist())) / K
                                    for a, b in zip(ids_sm, ids_np)]))
            med = {k: float(np.median(v)) for k, v in times.items()}
            nq = q.shape[0]
            row = {"kind": "index", "part": label, "n": n, "dim": dim, "threads": t,
                   "storage": storage, "exact": exact,
                   "queries": nq, "smallmind_qps": nq / med["smallmind"],
                   "numpy_qps": nq / med["numpy"], "vs_numpy": med["numpy"] / med["smallmind"],
                   "top10_agreement": agree, "recall_at_10": recall,
                   "bytes_per_vector": index.nbytes / n, "loadavg_1min": (loadavg() or [None])[0]}
            rows.append(row)
            print(f"  {label:<6} {n:>9,} x {dim} {what:<22} t={t}: smallmind "
                  f"{row['smallmind_qps']:10,.1f} q/s | numpy {row['numpy_qps']:10,.1f} q/s | "
                  f"{row['vs_numpy']:.2f}x | same top-10 {agree:.0%}, recall@10 {recall:.3f}  "
                  f"(load {row['loadavg_1min']})", flush=True)
    index.dispose()
    return rows


def _storage(r):
    st = r.get("storage", "float32")
    return st if r.get("exact", True) else f"{st}, exact=False"


def table(rows):
    out = ["| vectors | storage | queries | threads | smallmind q/s | numpy q/s | vs numpy "
           "| same top-10 | recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] in ("single", "batch"):
            q = "1" if r["part"] == "single" else f"batch of {r['queries']}"
            out.append(f"| {r['n']:,} x {r['dim']} | {_storage(r)} | {q} | {r['threads']} | "
                       f"{r['smallmind_qps']:,.1f} | {r['numpy_qps']:,.1f} | **{r['vs_numpy']:.2f}x** | "
                       f"{r['top10_agreement']:.0%} | {r.get('recall_at_10', 1.0):.3f} |")
    adds = [r for r in rows if r["part"] == "add"]
    if adds:
        out += ["", "| vectors | storage | add, vectors/s | bytes per vector (float32 data) |",
                "|---|---|---|---|"]
        out += [f"| {r['n']:,} x {r['dim']} | {_storage(r)} | {r['vectors_per_s']:,.0f} | "
                f"{r['bytes_per_vector']:.0f} ({4 * r['dim']}) |" for r in adds]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--storage", default=",".join(s if e else s + "-approx" for s, e in STORAGES),
                    help="comma-separated storages: float32, bf16, int8, and bf16-approx / "
                         "int8-approx for exact=False (default: all)")
    args = ap.parse_args(argv)
    storages = [(s.removesuffix("-approx"), not s.endswith("-approx"))
                for s in args.storage.split(",")]
    if any(s not in ("float32", "bf16", "int8") or (s == "float32" and not e) for s, e in storages):
        ap.error("--storage: float32, bf16, int8, bf16-approx, int8-approx")
    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads):
        ap.error("--threads must be >= 1")
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "cores": os.cpu_count(), "smallmind": sm.__version__,
            "build": sm.build_info(), "cpu": cpu_model()}
    print(f"smallmind {info['smallmind']} | {info['cpu']}, {info['cores']} cores | numpy "
          f"{info['numpy']} | exact top-{K} cosine")
    load_start = loadavg()
    rows = []
    for n, dim in (QUICK_SHAPES if args.quick else SHAPES):
        rows += run_shape(n, dim, threads, args.quick, storages)
    info["loadavg_start"], info["loadavg_end"] = load_start, loadavg()
    print()
    print(table(rows))
    if args.json:
        write_json(args.json, info, args.quick, rows)


if __name__ == "__main__":
    main()
