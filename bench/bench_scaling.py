"""bench_scaling.py - how smallmind's kernels scale with threads, against PyTorch and numpy in
the same run: SGEMM and causal attention at 1..N OpenMP threads, and the aggregate matmul
throughput of 1..N concurrent Python threads (threads=1 each, the GIL released).

    python bench/bench_scaling.py --threads 1,2,4,8,16 --json scaling.json

Made for many-core machines (the 2-core development machines can only show 1 and 2).
"""
import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import interleaved, machine_info, numpy_threads, torch  # noqa: E402

import smallmind as sm  # noqa: E402

GEMM_SHAPES = [(4096, 128, 384), (16384, 384, 1152), (16384, 1536, 384), (1024, 1024, 1024),
               (1, 768, 50257)]
ATTN_SHAPES = [(8, 256, 384, 6), (4, 1024, 768, 12)]  # (B, T, C, n_head)


def gemm_rows(thread_counts, rounds):
    rows = []
    rng = np.random.default_rng(0)
    for (M, K, N) in GEMM_SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        flops = 2.0 * M * K * N
        for nt in thread_counts:
            fns = {"smallmind": lambda: sm.kernels.matmul(a, b, out=c, threads=nt)}
            with numpy_threads(nt):
                fns["numpy"] = lambda: np.matmul(a, b, out=c)
                if torch is not None:
                    torch.set_num_threads(nt)
                    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
                    fns["torch"] = lambda: torch.matmul(ta, tb, out=tc)
                t = interleaved(fns, rounds, False)
            row = {"kernel": "sgemm", "shape": f"{M}x{K}x{N}", "threads": nt}
            for name, secs in t.items():
                row[f"{name}_gflops"] = flops / secs / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def attention_rows(thread_counts, rounds):
    rows = []
    rng = np.random.default_rng(1)
    for (B, T, C, NH) in ATTN_SHAPES:
        qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
        dout = rng.standard_normal((B, T, C), dtype=np.float32)
        out, lse = sm.kernels.attention_forward(qkv, NH)
        dqkv = np.zeros_like(qkv)
        for nt in thread_counts:
            fns = {
                "smallmind_fwd": lambda: sm.kernels.attention_forward(qkv, NH, out=out, lse=lse, threads=nt),
                "smallmind_bwd": lambda: sm.kernels.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv, threads=nt),
            }
            if torch is not None:
                torch.set_num_threads(nt)
                hs = C // NH
                tq = torch.from_numpy(qkv).view(B, T, 3, NH, hs).permute(2, 0, 3, 1, 4)
                q, k, v = (x.contiguous().requires_grad_(True) for x in tq)
                tdo = torch.from_numpy(dout).view(B, T, NH, hs).transpose(1, 2).contiguous()
                sdpa = torch.nn.functional.scaled_dot_product_attention

                def torch_fwd():
                    with torch.no_grad():
                        sdpa(q, k, v, is_causal=True)

                def torch_fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    sdpa(q, k, v, is_causal=True).backward(tdo)

                fns["torch_fwd"] = torch_fwd
                fns["torch_fwd_bwd"] = torch_fwd_bwd
            t = interleaved(fns, rounds, False)
            row = {"kernel": "attention", "shape": f"B{B} T{T} C{C} NH{NH}", "threads": nt}
            row.update({f"{k}_ms": 1e3 * v for k, v in t.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def concurrency_rows(thread_counts):
    """Aggregate throughput of n Python threads each calling matmul(threads=1), over 1."""
    rows = []
    M, K, N = 512, 384, 384
    rng = np.random.default_rng(2)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    per_thread = 60

    def work():
        out = np.empty((M, N), np.float32)
        for _ in range(per_thread):
            sm.kernels.matmul(a, b, out=out, threads=1)

    def run(n):
        ts = [threading.Thread(target=work) for _ in range(n)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return time.perf_counter() - t

    work()
    base = float(np.median([run(1) for _ in range(3)]))
    for n in thread_counts:
        tn = float(np.median([run(n) for _ in range(3)]))
        row = {"kernel": "concurrent matmul(threads=1)", "shape": f"{M}x{K}x{N}",
               "python_threads": n, "aggregate_speedup": n * base / tn}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--only", choices=["gemm", "attention", "concurrency"])
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.threads.split(",")]
    info = machine_info()
    print(json.dumps(info), flush=True)
    rows = []
    if args.only in (None, "concurrency"):
        rows += concurrency_rows(counts)
    if args.only in (None, "gemm"):
        rows += gemm_rows(counts, args.rounds)
    if args.only in (None, "attention"):
        rows += attention_rows(counts, args.rounds)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
