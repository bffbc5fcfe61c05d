"""report.py - render the JSON written by bench_kernels.py / bench_scaling.py / bench_train.py /
bench_generate.py as the markdown tables docs/benchmarks.md shows, so the page is regenerated
rather than retyped. Values a run did not measure (PyTorch absent) read "-".

    python bench/report.py bench/results/full.json [bench/results/scaling_16core.json]
    python bench/report.py bench/results/train.json
    python bench/report.py bench/results/generate.json
"""
import json
import sys

# A benchmarked model is called by a preset's name (smallmind's PRESETS) only when its shape is
# exactly that preset's, otherwise by its sizes ("4/4/128").
from smallmind import PRESETS  # noqa: E402

PRESET_SHAPES = {name: (p["n_layer"], p["n_head"], p["n_embd"], p["block_size"])
                 for name, p in PRESETS.items()}


def preset_name(sh):
    """The preset whose shape `sh` (a row's "shape" dict) is, or None."""
    key = (sh["n_layer"], sh["n_head"], sh["n_embd"], sh["block_size"])
    return next((name for name, shape in PRESET_SHAPES.items() if shape == key), None)


def model_label(sh, detail):
    """"shakespeare-char (6/6/384, detail)" for a preset's shape, "4/4/128 (detail)" otherwise."""
    sizes = f"{sh['n_layer']}/{sh['n_head']}/{sh['n_embd']}"
    name = preset_name(sh)
    return f"{name} ({sizes}, {detail})" if name else f"{sizes} ({detail})"


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


def train_tables(rows):
    """Markdown for bench_train.py's rows: a throughput + memory table and a quality table."""
    out = []
    tp = [r for r in rows if r.get("kind") == "throughput"]
    mem = {r["config"]: r for r in rows if r.get("kind") == "memory"}
    if tp:
        has_torch = any("torch_ms" in r for r in tp)
        out += ["| model (layers/heads/width, block x batch) | threads | smallmind ms/step | "
                "smallmind tokens/s" + (" | torch ms/step | torch tokens/s | vs torch | "
                                        "step-1 / step-2 loss diff" if has_torch else "") + " |",
                "|---|---|---|---" + ("|---|---|---|---" if has_torch else "") + "|"]
        for r in tp:
            sh = r["shape"]
            model = model_label(sh, f"{sh['block_size']} x {sh['batch_size']}")
            cells = [model, str(r["threads"]), f"{r['smallmind_ms']:.1f}",
                     f"{r['smallmind_tokens_per_s']:,.0f}"]
            if has_torch:
                if "torch_ms" in r:
                    cells += [f"{r['torch_ms']:.1f}", f"{r['torch_tokens_per_s']:,.0f}",
                              f"**{r['speed_vs_torch']:.2f}x**",
                              f"{r['loss_diff_step1']:.0e} / {r['loss_diff_step2']:.0e}"]
                else:
                    cells += ["-"] * 4
            out.append("| " + " | ".join(cells) + " |")
    bf = [r for r in tp if "smallmind_bf16_ms" in r]
    if bf:
        out += ["", "Share of the FMA peak (measured in the same run, per row) and bf16 mixed "
                "precision (smallmind: `Training(precision=\"bf16\")`, on "
                f"{bf[0]['bf16_backend']}; PyTorch: `torch.autocast(\"cpu\", torch.bfloat16)`):", "",
                "| model | threads | FMA peak GFLOP/s | float32 GFLOP/s (share of peak) | bf16 ms/step "
                "| bf16 GFLOP/s | bf16 vs our float32 | torch bf16 ms/step | torch bf16 vs its "
                "float32 | our bf16 vs torch bf16 | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bf:
            sh = r["shape"]
            cells = [preset_name(sh) or f"{sh['n_layer']}/{sh['n_head']}/{sh['n_embd']}",
                     str(r["threads"]), f"{r['fma_peak_gflops']:.0f}",
                     f"{r['smallmind_gflops']:.0f} ({100 * r['smallmind_share_of_peak']:.0f}%)",
                     f"{r['smallmind_bf16_ms']:.1f}", f"{r['smallmind_bf16_gflops']:.0f}",
                     f"**{r['bf16_speedup']:.2f}x**"]
            if "torch_bf16_ms" in r:
                cells += [f"{r['torch_bf16_ms']:.1f}", f"{r['torch_bf16_speedup']:.2f}x",
                          f"**{r['bf16_vs_torch_bf16']:.2f}x**"]
            else:
                cells += ["-"] * 3
            cells.append(f"{r.get('loadavg_1min')}")
            out.append("| " + " | ".join(cells) + " |")
    if mem:
        libs = [lib for lib in ("smallmind", "torch") if any(f"{lib}_peak_mb" in r for r in mem.values())]
        threads = next(iter(mem.values()))["threads"]
        out += ["", f"Peak resident memory of a training process ({threads} threads, one fresh "
                "process per library and model; in brackets: the growth after imports and model "
                "creation):", "",
                "| model | " + " | ".join(f"{lib} peak MB (training)" for lib in libs)
                + (" | torch / smallmind peak" if len(libs) == 2 else "") + " |",
                "|---" + "|---" * len(libs) + ("|---" if len(libs) == 2 else "") + "|"]
        shapes = {r["config"]: r["shape"] for r in tp}
        for name, r in mem.items():
            sh = shapes.get(name)
            cells = [name if sh is None else
                     preset_name(sh) or f"{sh['n_layer']}/{sh['n_head']}/{sh['n_embd']}"]
            for lib in libs:
                cells.append(f"{r[lib + '_peak_mb']:.0f} ({r[lib + '_training_mb']:+.0f})"
                             if f"{lib}_peak_mb" in r else "-")
            if len(libs) == 2:
                ok = "smallmind_peak_mb" in r and "torch_peak_mb" in r
                cells.append(f"{r['torch_peak_mb'] / r['smallmind_peak_mb']:.1f}x" if ok else "-")
            out.append("| " + " | ".join(cells) + " |")
    for r in (r for r in rows if r.get("kind") == "quality"):
        c, h = r["config"], r["hparams"]
        out += ["", f"Quality, {r['recipe']} recipe ({c['n_layer']} layers, {c['n_head']} heads, "
                f"{c['n_embd']} wide, block {c['block_size']}, batch {c['batch_size']}, "
                f"{r['steps']} steps, lr {h['learning_rate']:g} warmup {h['warmup_steps']} cosine to "
                f"{h['min_lr']:g}, betas {h['beta1']}/{h['beta2']}, weight decay "
                f"{h['weight_decay']}, clip {h['grad_clip']}; {r['threads']} threads; losses over "
                f"the same {r['eval_batches']} batches of each split; nanoGPT reports "
                f"~{r['nanogpt_reported_val_loss']} validation loss):", "",
                "| library | val loss | train loss | wall time s | ms/step | tokens/s |",
                "|---|---|---|---|---|---|"]
        for lib in ("smallmind", "smallmind_bf16", "torch"):
            if f"{lib}_val_loss" in r:
                name = "smallmind, bf16" if lib == "smallmind_bf16" else lib
                out.append(f"| {name} | {r[lib + '_val_loss']:.4f} | {r[lib + '_train_loss']:.4f} | "
                           f"{r[lib + '_wall_s']:.1f} | {r[lib + '_ms_per_step']:.1f} | "
                           f"{r[lib + '_tokens_per_s']:,.0f} |")
        if "speed_vs_torch" in r:
            out.append(f"\nsmallmind trains this recipe **{r['speed_vs_torch']:.2f}x** as fast as PyTorch.")
        if "bf16_val_loss_rel_diff" in r:
            out.append(f"In bf16 the validation loss differs from the float32 run's (same weights "
                       f"and batches) by {100 * r['bf16_val_loss_rel_diff']:+.2f}%; the bf16 run is "
                       f"{r['smallmind_wall_s'] / r['smallmind_bf16_wall_s']:.2f}x as fast.")
    return "\n".join(out)


def generate_table(rows):
    """Markdown for bench_generate.py's rows ("kind" == "generate"): memory bandwidth, decoding at
    batch 1 (both window policies), time to first token, one decode step, batched decoding and
    concurrent streams, one table each. Values a run did not measure (no torch) read "-"."""
    rows = [r for r in rows if r.get("kind") == "generate"]
    out = []

    def model_cell(r):
        sh = r["shape"]
        return model_label(sh, f"block {sh['block_size']}, vocab {sh['vocab_size']}")

    def div(r, key="diverge_vs_torch_cache"):
        if key not in r:
            return "-"
        return "none" if r[key] is None else str(r[key])

    def num(v, fmt=",.1f"):
        return "-" if v is None else format(v, fmt)

    def times(v, fmt=".2f"):
        return "-" if v is None else f"**{v:{fmt}}x**"

    bw = [r for r in rows if r["part"] == "bandwidth"]
    if bw:
        # runs before the method was recorded summed the arrays
        how = bw[0].get("method", "numpy sum, one float32 array per Python thread")
        out += [f"Streaming read bandwidth of the machine in this run ({how}, "
                f"{bw[0].get('mib_per_thread', 256)} MiB each, best of 5): the ceiling of batch-1 "
                "decoding, which reads every weight once per token. CPU/wall near the thread "
                "count: the threads ran at once; near 1: another tenant held a core.",
                "", "| threads | read GB/s | CPU/wall |", "|---|---|---|"]
        out += [f"| {r['threads']} | {r['read_gb_per_s']:.1f} | "
                f"{num(r.get('cpu_per_wall'), '.2f')} |" for r in bw]
        out.append("")
    for part, what in (("decode", "Greedy decoding"),
                       ("sampled", "Sampled decoding (temperature 0.8, top-k 40; torch: nanoGPT's "
                                   "softmax + multinomial)")):
        dec = [r for r in rows if r["part"] == part]
        if not dec:
            continue
        out += [f"{what} at batch 1 after a 64-token prompt (tokens/s, whole call incl. prefill; "
                "window past block_size: `shift`, Sampling's default, in both libraries; "
                "smallmind = the C generation loop at the `_core` level, Sampling = "
                "`sm.Sampling.generate` end to end, and its fraction of the C loop):", "",
                "| model | threads | new tokens | smallmind C loop | Sampling (of C loop) | "
                "torch + KV cache | C loop vs torch | Sampling vs torch | torch no cache (nanoGPT) "
                "| vs no cache | first divergence sm / torch |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            nc = r.get("torch_nocache_tokens_per_s")
            smp = r.get("smallmind_sampling_tokens_per_s")
            out.append("| " + " | ".join([
                model_cell(r), str(r["threads"]), str(r["new_tokens"]),
                num(r["smallmind_tokens_per_s"]),
                "-" if smp is None else f"{smp:,.1f} ({r['sampling_vs_core']:.3f})",
                num(r.get("torch_cache_tokens_per_s")), times(r.get("vs_torch_cache")),
                times(r.get("sampling_vs_torch_cache")),
                "-" if nc is None else f"{nc:,.1f} ({r['nocache_new_tokens']} new)",
                times(r.get("vs_torch_nocache"), ".1f"),
                div(r) if part == "decode" else "(different draws)"]) + " |")
        out.append("")
    sl = [r for r in rows if r["part"] == "slide"]
    if sl:
        out += ["", "The same with `window=\"slide\"` (nanoGPT's exact window: past block_size every "
                "token costs a prefill of the whole window, in both libraries):", "",
                "| model | threads | new tokens | smallmind | torch + KV cache | vs torch | "
                "first divergence |", "|---|---|---|---|---|---|---|"]
        for r in sl:
            out.append(f"| {model_cell(r)} | {r['threads']} | {r['new_tokens']} | "
                       f"{num(r['smallmind_tokens_per_s'])} | {num(r.get('torch_cache_tokens_per_s'))} | "
                       f"{times(r.get('vs_torch_cache'))} | {div(r)} |")
    tt = [r for r in rows if r["part"] == "ttft"]
    if tt:
        out += ["", "Time to first token (fresh cache, prefill of a 64-token prompt, argmax):", "",
                "| model | threads | smallmind ms | torch ms | smallmind faster by | same first token |",
                "|---|---|---|---|---|---|"]
        for r in tt:
            out.append(f"| {model_cell(r)} | {r['threads']} | {r['smallmind_ms']:.2f} | "
                       f"{num(r.get('torch_ms'), '.2f')} | {times(r.get('vs_torch'))} | "
                       f"{r.get('same_first_token', '-')} |")
    pf = [r for r in rows if r["part"] == "prefill"]
    if pf:
        out += ["", "Prefill at batch 1: its useful FLOP/s (linear layers, causal attention, the LM "
                "head on the last position) as a share of the SGEMM's on the same products (every "
                "layer's four, with the model's weights) timed alone; time to first token (fresh cache, prefill, argmax) against "
                "PyTorch with its cache:", "",
                "| model | threads | prompt | prefill ms | prefill GFLOP/s | SGEMM GFLOP/s | share "
                "of SGEMM | TTFT ms | torch TTFT ms | TTFT vs torch | same first token |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pf:
            out.append(f"| {model_cell(r)} | {r['threads']} | {r['prompt_tokens']} | "
                       f"{r['prefill_ms']:.2f} | {r['prefill_gflops']:.1f} | {r['sgemm_gflops']:.1f} | "
                       f"**{100 * r['share_of_sgemm']:.0f}%** | {r['ttft_ms']:.2f} | "
                       f"{num(r.get('torch_ttft_ms'), '.2f')} | {times(r.get('ttft_vs_torch'))} | "
                       f"{r.get('same_first_token', '-')} |")
    sp = [r for r in rows if r["part"] == "step"]
    if sp:
        out += ["", "One decode step at batch 1 inside the window (no sliding). GB/s = float32 "
                "weights read per step; % = of the read bandwidth measured in the same rounds on "
                "the same number of threads (above 100%: the weights stay in cache); limit = the "
                "tokens/s that bandwidth allows:", "",
                "| model | threads | tokens | smallmind ms/token (GB/s, %) | torch + KV cache "
                "ms/token (GB/s, %) | vs torch | limit tok/s | smallmind tok/s | first divergence |",
                "|---|---|---|---|---|---|---|---|---|"]

        def cell(r, lib):
            ms = r.get(f"{lib}_step_ms")
            if ms is None:
                return "-"
            fr = r.get(f"{lib}_bandwidth_fraction")
            pct = "" if fr is None else f", {100 * fr:.0f}%"
            return f"{ms:.3f} ({r[f'{lib}_weight_gb_per_s']:.1f}{pct})"

        for r in sp:
            out.append(f"| {model_cell(r)} | {r['threads']} | {r['new_tokens']} | "
                       f"{cell(r, 'smallmind')} | {cell(r, 'torch_cache')} | "
                       f"{times(r.get('vs_torch_cache'))} | {num(r.get('limit_tokens_per_s'))} | "
                       f"{r['smallmind_tokens_per_s']:,.1f} | {div(r)} |")
    bt = [r for r in rows if r["part"] == "batch"]
    if bt:
        out += ["", "Batched greedy decoding (tokens/s over all sequences, prefill included):", "",
                "| model | threads | batch | new tokens each | smallmind | torch + KV cache | "
                "vs torch | first divergence |", "|---|---|---|---|---|---|---|---|"]
        for r in bt:
            out.append(f"| {model_cell(r)} | {r['threads']} | {r['batch']} | {r['new_tokens']} | "
                       f"{num(r['smallmind_tokens_per_s'])} | {num(r.get('torch_cache_tokens_per_s'))} | "
                       f"{times(r.get('vs_torch_cache'))} | {div(r)} |")
    st = [r for r in rows if r["part"] == "streams"]
    if st:
        out += ["", "Concurrent streams (Python threads, each its own cache and 1 library thread; "
                "aggregate tokens/s, in brackets: vs 1 stream):", "",
                "| model | streams | new tokens each | smallmind | torch + KV cache | vs torch |",
                "|---|---|---|---|---|---|"]
        for r in st:
            tc = r.get("torch_cache_tokens_per_s")
            out.append(f"| {model_cell(r)} | {r['streams']} | {r['new_tokens']} | "
                       f"{r['smallmind_tokens_per_s']:,.1f} ({r['smallmind_scaling']:.2f}x) | "
                       + ("-" if tc is None else f"{tc:,.1f} ({r['torch_cache_scaling']:.2f}x)")
                       + f" | {times(r.get('vs_torch_cache'))} |")
    fw = [r for r in rows if r["part"] == "forward"]
    if fw:
        out += ["", "Concurrent forward calls (Python threads, each `model.forward` at batch 1 on a "
                "whole window with 1 library thread; calls/s over all threads, in brackets: vs 1 "
                "thread):", "", "| model | Python threads | tokens per call | smallmind calls/s | "
                "torch calls/s | vs torch |", "|---|---|---|---|---|---|"]
        for r in fw:
            tc = r.get("torch_calls_per_s")
            out.append(f"| {model_cell(r)} | {r['python_threads']} | {r['tokens']} | "
                       f"{r['smallmind_calls_per_s']:,.1f} ({r['smallmind_scaling']:.2f}x) | "
                       + ("-" if tc is None else f"{tc:,.1f} ({r['torch_scaling']:.2f}x)")
                       + f" | {times(r.get('vs_torch'))} |")
    return "\n".join(out)


def machine_line(m):
    """One line naming the machine and build a training or generation run measured on."""
    return (f"Machine: {m.get('cpu', '?')}, {m.get('cores', m['build']['cpu_count'])} cores; "
            f"{m['build']['compiler']}, SIMD {m['build']['simd']}; numpy {m['numpy']}"
            + (f", torch {m['torch']}" if m.get("torch") else ", no torch")
            + (f"; load average {m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at end"
               if m.get("loadavg_start") and m.get("loadavg_end") else ""))


def distributed_tables(rows, machine):
    """bench_distributed.py: throughput on this machine, the all-reduce and the cost model."""
    ms = lambda s: f"{1e3 * s:,.1f}"  # noqa: E731
    out = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; smallmind "
           f"{machine.get('smallmind')}, torch {machine.get('torch')}; load average "
           f"{machine.get('load_start')} at start, {machine.get('load_end')} at end", "",
           "| preset (global batch) | 1 process x 2 threads ms/step | 2 ranks x 1 thread ms/step "
           "| of which all-reduce | 2 ranks, 1 MiB buckets ms/step (all-reduce) | 2 ranks vs 1 "
           "process | torch DDP gloo 2 x 1 ms/step | torch 1 x 2 ms/step | our 2 ranks vs torch DDP |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "throughput"):
        ddp = r.get("torch_ddp_2x1_step_s")
        p = PRESETS[r["preset"]]
        out.append(
            f"| {r['preset']} ({p['n_layer']}/{p['n_head']}/{p['n_embd']}, {r['global_batch']} x "
            f"{r['tokens_per_step'] // r['global_batch']}) "
            f"| {ms(r['sm_1x2_step_s'])} | {ms(r['sm_2x1_step_s'])} | {ms(r['sm_2x1_allreduce_s'])} "
            f"| {ms(r['sm_2x1_bucketed_step_s'])} ({ms(r['sm_2x1_bucketed_allreduce_s'])}) "
            f"| {r['sm_1x2_step_s'] / r['sm_2x1_step_s']:.2f}x "
            f"| {ms(ddp) if ddp else '-'} | {ms(r['torch_1x2_step_s']) if ddp else '-'} "
            f"| {'**%.2fx**' % (ddp / r['sm_2x1_step_s']) if ddp else '-'} |")
    fit = next(r for r in rows if r["part"] == "link_fit")
    out += ["", f"All-reduce of a float32 block on 2 ranks (loopback, shared memory); the model "
            f"2 (a + 4n / (2b)) fitted through the smallest and largest block: a = "
            f"{1e6 * fit['latency_s']:.1f} us, b = {fit['bandwidth_Bps'] / 1e9:.2f} GB/s", "",
            "| floats | smallmind (rank order) ms | 1 MiB buckets ms | MPI_Allreduce ms | model ms "
            "| model / measured |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "allreduce"):
        out.append(f"| {r['floats']:,} | {1e3 * r['ours_s']:.3f} | {1e3 * r['bucketed_s']:.3f} "
                   f"| {1e3 * r['mpi_s']:.3f} | {1e3 * r['model_s']:.3f} "
                   f"| {r['model_s'] / r['ours_s']:.2f} |")
    cost = [r for r in rows if r["part"] == "cost"]
    for preset in dict.fromkeys(r["preset"] for r in cost):
        sub = [r for r in cost if r["preset"] == preset]
        out += ["", f"Scaling out {preset} (global batch {sub[0]['global_batch_tokens']:,} tokens "
                f"per step, split over the nodes; efficiency = compute / (compute + ring "
                f"all-reduce), no overlap; in brackets: tokens per node per step for 90%)", "",
                "| nodes | " + " | ".join(f"{g} Gb/s" for g in LINKS) + " |",
                "|---|" + "---|" * len(LINKS)]
        for n in dict.fromkeys(r["nodes"] for r in sub):
            cells = []
            for g in LINKS:
                r = next(r for r in sub if r["nodes"] == n and r["gbps"] == g)
                cells.append(f"{100 * r['efficiency']:.0f}% ({r['tokens_per_node_for_90']:,.0f})")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


LINKS = (10, 25, 100)


def tokenizer_tables(rows, machine):
    """bench_tokenizer.py: encode MB/s against tiktoken and HF tokenizers, and training time."""
    f = lambda v: f"{v:,.1f}" if v is not None else "-"  # noqa: E731
    out = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; smallmind "
           f"{machine.get('smallmind')}, tiktoken {machine.get('tiktoken')}, tokenizers "
           f"{machine.get('tokenizers')}; text {machine.get('text_mb', 0):.2f} MB in "
           f"{machine.get('documents')} documents; load average {machine.get('load_start')} at "
           f"start, {machine.get('load_end')} at end", "",
           "| vocabulary | threads | smallmind MB/s | tiktoken MB/s | HF tokenizers MB/s | vs tiktoken "
           "| vs HF | same ids |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "encode"):
        same = [k for k in ("tiktoken", "hf") if f"same_as_{k}" in r]
        ok = "yes" if all(r[f"same_as_{k}"] for k in same) else "NO"
        for t, key in (("1", "1t"), (f"all ({machine.get('cores')})", "all")):
            ours, tk, h = r[f"sm_{key}_mbs"], r.get(f"tiktoken_{key}_mbs"), r.get(f"hf_{key}_mbs")
            out.append(f"| {r['vocabulary']} | {t} | {f(ours)} | {f(tk)} | {f(h)} "
                       f"| {'**%.2fx**' % (ours / tk) if tk else '-'} "
                       f"| {'**%.2fx**' % (ours / h) if h else '-'} | {ok} |")
    out += ["", "| vocabulary | " + " | ".join(f"encode_batch {n} thread(s) MB/s" for n in
                                                next(r for r in rows if r['part'] == 'encode')['scaling'])
            + " |", "|---|" + "---|" * len(next(r for r in rows if r['part'] == 'encode')['scaling'])]
    for r in (r for r in rows if r["part"] == "encode"):
        out.append(f"| {r['vocabulary']} | " + " | ".join(f(v) for v in r["scaling"].values()) + " |")
    for r in (r for r in rows if r["part"] == "train"):
        hf_s = r.get("hf_s")
        out += ["", f"Training a {r['vocab_size']:,}-token vocabulary on {r['text_mb']:.2f} MB: "
                f"smallmind {1e3 * r['sm_s']:.0f} ms"
                + (f", HF tokenizers {1e3 * hf_s:.0f} ms (**{hf_s / r['sm_s']:.1f}x**)" if hf_s else "")]
    return "\n".join(out)


def pretrained_tables(rows, machine):
    """bench_pretrained.py: a GPT-2 folder loaded, prefilled and decoded, against transformers."""
    f = lambda v, fmt=",.1f": "-" if v is None else format(v, fmt)  # noqa: E731
    shape = rows[0].get("shape", {})
    out = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; smallmind "
           f"{machine.get('smallmind')} ({machine.get('simd')}), torch {machine.get('torch')}, "
           f"transformers {machine.get('transformers')}; load average {machine.get('loadavg')} at "
           f"start. Model: {shape.get('n_layer')}/{shape.get('n_head')}/{shape.get('n_embd')}, "
           f"{shape.get('block_size')} positions, {shape.get('vocab_size'):,} ids", "",
           "| load | seconds | peak resident memory added | over the weights |", "|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "load"):
        out.append(f"| {r['library']} | {r['load_s']:.2f} | {r['peak_growth_mb']:,.0f} MB "
                   f"| {r['growth_over_weights']:.2f}x |")
    out += ["", "| threads | prefill tokens | ms | GFLOP/s | share of the SGEMM's | transformers ms "
            "| vs transformers |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "prefill"):
        out.append(f"| {r['threads']} | {r['prompt_tokens']} | {r['prefill_ms']:,.1f} | {r['prefill_gflops']:.1f} "
                   f"| {100 * r['share_of_sgemm']:.0f}% of {r['sgemm_gflops']:.1f} "
                   f"| {f(r.get('transformers_ms'))} | {f(r.get('vs_transformers'), '.2f')}x |")
    out += ["", "| threads | decode tokens/s | read-bandwidth limit tokens/s (GB/s) | share of the "
            "limit | transformers tokens/s | vs transformers | first divergence |",
            "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "decode"):
        lim = r.get("limit_tokens_per_s")
        out.append(f"| {r['threads']} | {r['smallmind_tokens_per_s']:,.1f} "
                   f"| {f(lim)} ({f(r.get('read_gb_per_s'))}) "
                   f"| {f(r.get('smallmind_share_of_limit') and 100 * r['smallmind_share_of_limit'], '.0f')}% "
                   f"| {f(r.get('transformers_tokens_per_s'))} "
                   f"| **{f(r.get('vs_transformers'), '.2f')}x** | {r.get('diverge_vs_transformers')} |")
    return "\n".join(out)


def quant_tables(rows, machine):
    """bench_quant.py: decode / prefill / batch per weight format."""
    shape = rows[0].get("shape", {})
    fmts = [k for k in ("float32", "bf16", "int8", "int8/g32") if k in rows[0]]
    out = [f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores; smallmind "
           f"{machine.get('smallmind')} ({machine.get('simd')}), torch {machine.get('torch')}; load "
           f"average {machine.get('loadavg')} at start, {machine.get('loadavg_end')} at end. Model: "
           f"{shape.get('n_layer')}/{shape.get('n_head')}/{shape.get('n_embd')}, "
           f"{shape.get('vocab_size'):,} ids", "",
           "| threads | format | MB read per token | decode tokens/s | vs float32 | limit tokens/s "
           "| share of limit | first divergence from float32 |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["part"] == "decode"):
        for f in fmts:
            c = r[f]
            lim = c.get("limit_tokens_per_s")
            share = "-" if lim is None else f"{100 * c['share_of_limit']:.0f}%"
            out.append(f"| {r['threads']} | {f} | {c['bytes_per_token'] / 1e6:.0f} "
                       f"| {c['tokens_per_s']:.1f} | **{c['vs_float32']:.2f}x** "
                       f"| {'-' if lim is None else f'{lim:.1f}'} | {share} "
                       f"| {c['diverge_vs_float32']} |")
        for t in ("torch_float32", "torch_int8"):
            if t in r:
                out.append(f"| {r['threads']} | {t.replace('_', ' ')} | - | "
                           f"{r[t]['tokens_per_s']:.1f} | - | - | - | - |")
        if "int8_vs_torch_int8" in r:
            out.append(f"| {r['threads']} | int8 vs torch int8 | | **{r['int8_vs_torch_int8']:.2f}x** "
                       f"| | | | |")
    out += ["", "| threads | " + " | ".join(f"prefill {f} ms (vs float32)" for f in fmts) + " |",
            "|---|" + "---|" * len(fmts)]
    for r in (r for r in rows if r["part"] == "prefill"):
        out.append(f"| {r['threads']} | " + " | ".join(
            f"{r[f]['ms']:.1f} ({r[f]['vs_float32']:.2f}x)" for f in fmts) + " |")
    out += ["", "| threads | rows | " + " | ".join(f"{f} tokens/s (vs float32)" for f in fmts)
            + " |", "|---|---|" + "---|" * len(fmts)]
    for r in (r for r in rows if r["part"] == "batch"):
        out.append(f"| {r['threads']} | {r['rows']} | " + " | ".join(
            f"{r[f]['tokens_per_s']:.1f} ({r[f]['vs_float32']:.2f}x)" for f in fmts) + " |")
    return "\n".join(out)


def main(argv):
    full = json.load(open(argv[0]))
    if any(r.get("kind") == "quant" for r in full["rows"]):
        print(quant_tables(full["rows"], full["machine"]))
        return
    if any(r.get("kind") == "pretrained" for r in full["rows"]):
        print(pretrained_tables(full["rows"], full["machine"]))
        return
    if any(r.get("part") == "train" and "vocab_size" in r for r in full["rows"]):
        print(tokenizer_tables(full["rows"], full["machine"]))
        return
    if any(r.get("part") == "link_fit" for r in full["rows"]):
        print(distributed_tables(full["rows"], full["machine"]))
        return
    if any(r.get("kind") == "generate" for r in full["rows"]):
        print(machine_line(full["machine"]))
        print()
        print(generate_table(full["rows"]))
        return
    if any(r.get("kind") in ("throughput", "memory", "quality") for r in full["rows"]):
        print(machine_line(full["machine"]))
        print()
        print(train_tables(full["rows"]))
        return
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
