"""report.py - render the JSON written by bench_kernels.py / bench_scaling.py as the markdown
tables README.md shows, so the README is regenerated rather than retyped.

    python bench/report.py bench/results/full.json [bench/results/scaling_16core.json]
"""
import json
import sys


def gemm_table(rows):
    by = {}
    for r in rows:
        if r.get("kernel") == "sgemm":
            by.setdefault(r["shape"], {})[r["threads"]] = r
    threads = sorted({t for d in by.values() for t in d})
    head = "| (M, K, N) | " + " | ".join(
        f"{t} thr: smallmind / numpy / torch GFLOP/s | vs numpy | vs torch" for t in threads) + " |"
    out = [head, "|---" * (1 + 3 * len(threads)) + "|"]
    for shape, d in by.items():
        cells = [shape.replace("x", " x ")]
        for t in threads:
            r = d.get(t)
            if r is None:
                cells += ["", "", ""]
                continue
            tg = r.get("torch_gflops")
            cells.append(f"{r['smallmind_gflops']:.0f} / {r['numpy_gflops']:.0f} / "
                         + (f"{tg:.0f}" if tg else "-"))
            cells.append(f"**{r['smallmind_gflops'] / r['numpy_gflops']:.2f}x**")
            cells.append(f"{r['smallmind_gflops'] / tg:.2f}x" if tg else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def other_table(rows):
    by = {}
    for r in rows:
        if r.get("kernel") in ("sgemm",) or "smallmind_s" not in r:
            continue
        by.setdefault((r["kernel"], str(r.get("shape", ""))), {})[r["threads"]] = r
    threads = sorted({t for d in by.values() for t in d})
    out = ["| kernel | shape | " + " | ".join(f"{t} thr: smallmind ms | vs numpy" for t in threads) + " |",
           "|---|---" + "|---|---" * len(threads) + "|"]
    for (k, shape), d in by.items():
        cells = [k, shape]
        for t in threads:
            r = d.get(t)
            cells += ([f"{1e3 * r['smallmind_s']:.3f}", f"{r['ratio']:.2f}x"] if r else ["", ""])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def concurrency_lines(rows):
    out = []
    for r in rows:
        if "speedup_2_threads" in r:
            out.append(f"- 2 Python threads, each `matmul(threads=1)` on {r['shape']}: "
                       f"**{r['speedup_2_threads']:.2f}x** the throughput of one thread")
    return "\n".join(out)


def scaling_tables(rows):
    g = [r for r in rows if r["kernel"] == "sgemm"]
    out = ["| (M, K, N) | threads | smallmind | numpy | torch | vs numpy | vs torch |",
           "|---|---|---|---|---|---|---|"]
    for r in g:
        out.append(f"| {r['shape'].replace('x', ' x ')} | {r['threads']} | {r['smallmind_gflops']:.0f} | "
                   f"{r['numpy_gflops']:.0f} | {r['torch_gflops']:.0f} | "
                   f"{r['smallmind_gflops'] / r['numpy_gflops']:.2f}x | {r['smallmind_gflops'] / r['torch_gflops']:.2f}x |")
    a = [r for r in rows if r["kernel"] == "attention"]
    out += ["", "| attention | threads | smallmind fwd ms | torch SDPA fwd ms | smallmind fwd+bwd ms | torch fwd+bwd ms | fwd+bwd vs torch |",
            "|---|---|---|---|---|---|---|"]
    for r in a:
        s = r["smallmind_fwd_ms"] + r["smallmind_bwd_ms"]
        out.append(f"| {r['shape']} | {r['threads']} | {r['smallmind_fwd_ms']:.2f} | {r['torch_fwd_ms']:.2f} | "
                   f"{s:.2f} | {r['torch_fwd_bwd_ms']:.2f} | {r['torch_fwd_bwd_ms'] / s:.2f}x |")
    c = [r for r in rows if "aggregate_speedup" in r]
    if c:
        out += ["", "Concurrent Python threads, each `matmul(threads=1)` on " + c[0]["shape"] + ": "
                + ", ".join(f"{r['python_threads']} -> {r['aggregate_speedup']:.1f}x" for r in c)]
    return "\n".join(out)


def main(argv):
    full = json.load(open(argv[0]))
    m = full["machine"]
    print(f"Machine: {m.get('cpu', '?')}, {m['build']['cpu_count']} cores; {m['build']['compiler']}, "
          f"SIMD {m['build']['simd']}; numpy {m['numpy']}" + (f", torch {m['torch']}" if "torch" in m else ""))
    print()
    print(gemm_table(full["rows"]))
    print()
    print(concurrency_lines(full["rows"]))
    print()
    print(other_table(full["rows"]))
    if len(argv) > 1:
        sc = json.load(open(argv[1]))
        mm = sc["machine"]
        print()
        print(f"Scaling machine: {mm.get('cpu', '?')}, {mm['build']['cpu_count']} cores; "
              f"{mm['build']['compiler']}; numpy {mm['numpy']}" + (f", torch {mm['torch']}" if "torch" in mm else ""))
        print()
        print(scaling_tables(sc["rows"]))


if __name__ == "__main__":
    main(sys.argv[1:])
