"""bench_kernels.py - smallmind's kernels against numpy (OpenBLAS) and, when installed, PyTorch,
measured side by side in one run: SGEMM GFLOP/s on the shapes a GPT uses, the other kernels,
and the aggregate throughput of concurrent Python threads calling matmul.

    python bench/bench_kernels.py                 # full table
    python bench/bench_kernels.py --quick         # seconds: checks that everything runs
    python bench/bench_kernels.py --json out.json # also write the table as JSON

Medians of repeated runs; libraries are never timed while another one's worker threads are
still spinning (OpenBLAS and OpenMP keep their threads busy for a while after a call), so each
measurement is preceded by a short idle gap. Benchmarks never fail a test run: they measure.
"""
import argparse
import os
import platform
import sys
import threading
import time

# Compare against numpy at its best: an OPENBLAS_CORETYPE pointing at an older core makes
# OpenBLAS ~35% slower on this machine, so drop any such override before numpy loads.
for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import cpu_model, interleaved, numpy_threads, write_json  # noqa: E402

import smallmind as sm  # noqa: E402

try:
    import torch  # noqa: E402
except ImportError:  # torch is optional: the table just lacks its column
    torch = None

GEMM_SHAPES = [(4096, 128, 384), (4096, 128, 512), (4096, 512, 128), (4096, 128, 65),
               (16384, 384, 1152), (16384, 1536, 384), (1, 768, 2304), (1, 768, 50257),
               (1024, 1024, 1024)]
QUICK_SHAPES = [(64, 32, 48), (1, 64, 300), (33, 17, 65)]

def bench_gemm(shapes, thread_counts, quick, rounds=5):
    rows = []
    rng = np.random.default_rng(0)
    for nt in thread_counts:
        if torch is not None:
            torch.set_num_threads(nt)
        for (M, K, N) in shapes:
            a = rng.standard_normal((M, K), dtype=np.float32)
            b = rng.standard_normal((K, N), dtype=np.float32)
            c = np.empty((M, N), np.float32)
            flops = 2.0 * M * K * N
            fns = {"smallmind": lambda: sm.kernels.matmul(a, b, out=c, threads=nt)}
            with numpy_threads(nt):
                fns["numpy"] = lambda: np.matmul(a, b, out=c)
                if torch is not None:
                    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
                    fns["torch"] = lambda: torch.matmul(ta, tb, out=tc)
                t = interleaved(fns, rounds, quick)
            row = {"kernel": "sgemm", "shape": f"{M}x{K}x{N}", "threads": nt,
                   "smallmind_gflops": flops / t["smallmind"] / 1e9,
                   "numpy_gflops": flops / t["numpy"] / 1e9, "vs_numpy": t["numpy"] / t["smallmind"]}
            if "torch" in t:
                row["torch_gflops"] = flops / t["torch"] / 1e9
                row["vs_torch"] = t["torch"] / t["smallmind"]
            rows.append(row)
            print_row(row)
    return rows


def bench_concurrency(quick):
    """Aggregate matmul throughput of 2 Python threads (threads=1 each) over 1 thread: the GIL
    is released for the whole product, so two threads should get close to 2x."""
    shapes = [(64, 64, 64)] if quick else [(1024, 384, 384), (256, 128, 128)]
    rows = []
    for (M, K, N) in shapes:
        rng = np.random.default_rng(1)
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        # about 0.3 s of work per run on one core
        calls = 4 if quick else max(2, int(0.3 * 90e9 / (2.0 * M * K * N)) // 2 * 2)

        def work(n):
            out = np.empty((M, N), np.float32)
            for _ in range(n):
                sm.kernels.matmul(a, b, out=out, threads=1)

        def run(nthreads):
            ts = [threading.Thread(target=work, args=(calls // nthreads,)) for _ in range(nthreads)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            return time.perf_counter() - t

        work(2)
        reps = 1 if quick else 5
        t1 = float(np.median([run(1) for _ in range(reps)]))
        t2 = float(np.median([run(2) for _ in range(reps)]))
        rows.append({"kernel": "matmul x 2 Python threads", "shape": f"{M}x{K}x{N}", "threads": 1,
                     "speedup_2_threads": t1 / t2, "calls": calls})
        print(f"  2 Python threads x matmul(threads=1) {M}x{K}x{N} ({calls} calls): "
              f"aggregate speedup {t1 / t2:.2f}x over 1 thread")
    return rows


def other_kernel_rows(quick, thread_counts):
    """Rows from the per-area benchmark modules (ops, attention, pool) that exist."""
    rows = []
    for modname in ("bench_ops", "bench_attention", "bench_pool"):
        try:
            mod = __import__(modname)
        except ImportError:
            continue
        for nt in thread_counts:
            try:
                got = mod.cases(quick=quick, threads=nt)
            except TypeError:  # a module whose cases() takes no thread count
                if nt != thread_counts[0]:
                    continue
                got = mod.cases(quick=quick)
            for r in got:
                r.setdefault("threads", nt)
                r.setdefault("kernel", r.get("name", modname))
                rows.append(r)
                print_row(r)
    return rows


def print_row(r):
    if r.get("kernel") == "sgemm":
        extra = ""
        if "torch_gflops" in r:
            extra = f"  torch {r['torch_gflops']:7.1f}  sm/torch {r['vs_torch']:5.2f}x"
        print(f"  sgemm {r['shape']:>18s} t={r['threads']}  smallmind {r['smallmind_gflops']:7.1f} GFLOP/s"
              f"  numpy {r['numpy_gflops']:7.1f}  sm/numpy {r['vs_numpy']:5.2f}x{extra}")
    else:
        ratio = r.get("ratio")
        ratio_s = f"{ratio:5.2f}x" if isinstance(ratio, (int, float)) else "  -  "
        sm_s = r.get("smallmind_s")
        np_s = r.get("numpy_s")
        print(f"  {str(r.get('kernel')):28s} {str(r.get('shape', '')):>20s} t={r.get('threads')}"
              f"  smallmind {1e3 * sm_s if sm_s else float('nan'):9.3f} ms"
              f"  numpy {1e3 * np_s if np_s else float('nan'):9.3f} ms  sm/numpy {ratio_s}")


def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "smallmind": sm.__version__, "build": sm.build_info(), "platform": platform.platform()}
    if cpu_model():
        info["cpu"] = cpu_model()
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one repetition (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", default="1,2", help="thread counts to measure (default 1,2)")
    ap.add_argument("--only", choices=["gemm", "concurrency", "other"], help="run one part")
    args = ap.parse_args(argv)
    thread_counts = [int(x) for x in args.threads.split(",")]
    info = machine_info()
    print(f"smallmind {info['smallmind']} | {info.get('cpu', '?')} | {info['build']}")
    print(f"numpy {info['numpy']}" + (f" | torch {info['torch']}" if "torch" in info else " | torch not installed"))
    rows = []
    if args.only in (None, "gemm"):
        rows += bench_gemm(QUICK_SHAPES if args.quick else GEMM_SHAPES, thread_counts, args.quick)
    if args.only in (None, "concurrency"):
        rows += bench_concurrency(args.quick)
    if args.only in (None, "other"):
        rows += other_kernel_rows(args.quick, thread_counts)
    if args.json:
        write_json(args.json, info, args.quick, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
