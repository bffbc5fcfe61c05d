"""bench_pretrained.py - a Hugging Face GPT-2 folder in smallmind and in transformers: load time
and peak resident memory, prefill of 512 tokens against the SGEMM on the same products, and
greedy decode tokens/s at 1 and 2 threads against the read-bandwidth limit measured in the same
rounds and against transformers' own generate (with its KV cache) on the same weights.

    python bench/bench_pretrained.py --json bench/results/pretrained.json   # GPT-2 124M, ~5 min
    python bench/bench_pretrained.py --quick                                 # smoke run, tiny shape

The folder: a GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, 1,024 positions, 50,257
ids; 124M parameters, 498 MB of float32) with seeded random weights, written by
smallmind's save_pretrained (config.json + model.safetensors) into a temporary folder, or
--folder to use one already on disk (any GPT-2 folder; no weights are downloaded).

What is timed:
- load: a fresh Python process per load (after its imports), the file in the page cache (one
  untimed load first): smallmind's TransformerModel.from_pretrained and transformers'
  GPT2LMHeadModel.from_pretrained; median seconds of 3 processes, and the peak resident memory
  the load added (VmHWM minus the resident size before it) over the weights' bytes.
  Target (issue 15): smallmind's growth <= 1.1x the weights.
- prefill: one 512-token prompt into a fresh KV cache, the FLOPs of the prefill (linear layers,
  causal attention, LM head on the last position) per second over smallmind's SGEMM's FLOP/s on
  the same linear products with the model's weight matrices; and transformers' forward of the
  512 tokens (use_cache) as the time to first token.
- decode: a 16-token prompt, then `new` greedy tokens (64; 8 with --quick), the whole call:
  smallmind's C generation loop (GPTGenerator, as Sampling runs it) and transformers'
  model.generate(do_sample=False, use_cache=True, min_new_tokens=new), torch.set_num_threads(t).
  The read bandwidth on t threads is measured in the same rounds (numpy max-reductions of 256
  MiB per thread, bench_generate's method); limit = bandwidth / weight bytes tokens/s, the
  batch-1 ceiling. Target (issue 15): smallmind >= 2x transformers.
The libraries alternate (round robin, an idle gap before each call); medians are reported.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_generate as bg  # noqa: E402
from _timing import basic_machine, loadavg, write_json  # noqa: E402

GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)

# A load in a fresh process: prints one JSON line {seconds, base_mb, peak_mb}.
LOADER = r"""
import json, sys, time
lib, folder = sys.argv[1], sys.argv[2]
if lib == "smallmind":
    import smallmind as sm
    load = sm.TransformerModel.from_pretrained
else:
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(1)
    load = GPT2LMHeadModel.from_pretrained
def status_mb(field):
    # VmHWM, not ru_maxrss: the latter can carry the parent's peak across fork and exec
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) / 1024
base = status_mb("VmRSS")
t = time.perf_counter()
m = load(folder)
dt = time.perf_counter() - t
peak = status_mb("VmHWM")
print(json.dumps({"seconds": dt, "base_mb": base, "peak_mb": peak}))
"""


def make_folder(shape, where):
    """A seeded random model of `shape` saved as a Hugging Face folder."""
    sm = bg.sm
    model = sm.TransformerModel(sm.ModelConfig(**shape, seed=1))
    model.save_pretrained(where)
    model.close()


def load_rows(folder, weight_bytes, libs, reps):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(bg.sm.__file__))] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    rows = []
    for lib in libs:
        runs = []
        for i in range(reps + 1):          # the first: page cache warm, not counted
            out = subprocess.run([sys.executable, "-c", LOADER, lib, folder], capture_output=True,
                                 text=True, env=env, cwd=tempfile.gettempdir(), check=True)
            if i:
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        secs = float(np.median([r["seconds"] for r in runs]))
        growth = float(np.median([r["peak_mb"] - r["base_mb"] for r in runs]))
        row = {"kind": "pretrained", "part": "load", "library": lib, "load_s": secs,
               "peak_growth_mb": growth, "weights_mb": weight_bytes / 2 ** 20,
               "growth_over_weights": growth * 2 ** 20 / weight_bytes,
               "loadavg_1min": (loadavg() or [None])[0]}
        print(f"  load {lib:<12} {secs:6.2f} s; peak resident memory +{growth:,.0f} MB for "
              f"{row['weights_mb']:,.0f} MB of weights ({row['growth_over_weights']:.2f}x)",
              flush=True)
        rows.append(row)
    return rows


def prefill_row(model, hf, threads, P, quick):
    sm, torch = bg.sm, bg.torch
    cfg = model.config
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, V, size=(1, P)).astype(np.int32)
    cache = sm._core.GPTCache(model.core_config, 1, cfg.block_size)
    gemms, linear = bg.same_products(model, P, threads, rng)
    fns = {"prefill": lambda: sm._core.gpt_prefill(model.flat_params, model.core_config, prompt,
                                                   cache, threads).argmax(axis=1),
           "sgemm": gemms}
    if hf is not None:
        pt = torch.from_numpy(prompt.astype(np.int64))

        def hf_prefill():
            with torch.inference_mode():
                return hf(pt, use_cache=True).logits[:, -1].argmax(dim=-1).numpy()
        fns["transformers"] = hf_prefill
    secs, res = bg.run_many(fns, 1 if quick else 2, quick)
    cache.close()
    flops = linear + L * 2 * P * P * C + 2 * C * V
    row = {"kind": "pretrained", "part": "prefill", "threads": threads, "prompt_tokens": P,
           "prefill_ms": 1e3 * secs["prefill"], "sgemm_ms": 1e3 * secs["sgemm"],
           "prefill_gflops": flops / secs["prefill"] / 1e9,
           "sgemm_gflops": linear / secs["sgemm"] / 1e9}
    row["share_of_sgemm"] = row["prefill_gflops"] / row["sgemm_gflops"]
    if "transformers" in secs:
        row["transformers_ms"] = 1e3 * secs["transformers"]
        row["vs_transformers"] = secs["transformers"] / secs["prefill"]
        row["same_first_token"] = bool(np.array_equal(res["prefill"], res["transformers"]))
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  prefill t={threads} {P} tokens: {row['prefill_ms']:8.1f} ms, "
          f"{row['prefill_gflops']:6.1f} GFLOP/s = {100 * row['share_of_sgemm']:.0f}% of the SGEMM's "
          f"{row['sgemm_gflops']:.1f} | transformers {bg.fx(row.get('transformers_ms'), '8.1f')} ms "
          f"({bg.times(row.get('vs_transformers'))})", flush=True)
    return row


def decode_row(model, hf, threads, new, rounds, quick, arrs):
    torch = bg.torch
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, model.config.vocab_size, size=(1, 16)).astype(np.int64)
    fns = {"smallmind": lambda: bg.sm_generate(model, prompt, new, threads)}
    if hf is not None:
        pt = torch.from_numpy(prompt)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, use_cache=True,
                                  pad_token_id=0)
            return out[:, prompt.shape[1]:].numpy()
        fns["transformers"] = hf_generate
    bw = []
    if arrs is not None and threads <= len(arrs):
        fns["bandwidth"] = lambda: bw.append(bg.read_bandwidth(threads, arrs))
    secs, res = bg.run_rounds(fns, rounds, quick)
    weight_bytes = 4 * model.config.num_parameters()
    row = {"kind": "pretrained", "part": "decode", "threads": threads, "prompt_tokens": 16,
           "new_tokens": new, "smallmind_tokens_per_s": new / secs["smallmind"]}
    if bw:
        gbs = float(np.median([g for g, _ in (bw[1:] or bw)]))
        row["read_gb_per_s"] = gbs
        row["limit_tokens_per_s"] = gbs * 1e9 / weight_bytes
        row["smallmind_share_of_limit"] = row["smallmind_tokens_per_s"] / row["limit_tokens_per_s"]
    if "transformers" in secs:
        row["transformers_tokens_per_s"] = new / secs["transformers"]
        row["vs_transformers"] = secs["transformers"] / secs["smallmind"]
        row["diverge_vs_transformers"] = bg.first_divergence(res["smallmind"], res["transformers"])
    row["loadavg_1min"] = (loadavg() or [None])[0]
    print(f"  decode  t={threads} {new} tokens: smallmind {row['smallmind_tokens_per_s']:7.1f} tok/s"
          + (f" ({100 * row['smallmind_share_of_limit']:.0f}% of the {row['limit_tokens_per_s']:.1f} "
             f"tok/s read-bandwidth limit, {row['read_gb_per_s']:.1f} GB/s)" if bw else "")
          + f" | transformers {bg.fx(row.get('transformers_tokens_per_s'), '7.1f')} tok/s "
            f"({bg.times(row.get('vs_transformers'))}) | first divergence "
            f"{row.get('diverge_vs_transformers', '-')}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, one repetition (smoke run)")
    ap.add_argument("--folder", help="a GPT-2 folder on disk (default: a random 124M-shaped one)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default: 1,2)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    bg.import_libs()
    sm, torch = bg.sm, bg.torch
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        transformers = GPT2LMHeadModel = None
        print("transformers is not installed: smallmind alone (its columns read '-')")
    if torch is None:
        GPT2LMHeadModel = None
    threads = [int(t) for t in args.threads.split(",")]
    machine = basic_machine()
    machine.update(smallmind=sm.__version__, simd=sm.build_info()["simd"],
                   torch=getattr(torch, "__version__", None),
                   transformers=getattr(transformers, "__version__", None))
    print(f"bench_pretrained: {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = os.path.join(tmp, "gpt2")
            t = time.perf_counter()
            make_folder(TINY if args.quick else GPT2, folder)
            print(f"  wrote a random {'tiny' if args.quick else 'GPT-2-124M'}-shaped folder in "
                  f"{time.perf_counter() - t:.1f} s")
        model = sm.TransformerModel.from_pretrained(folder)
        weight_bytes = 4 * model.config.num_parameters()
        libs = ["smallmind"] + (["transformers"] if GPT2LMHeadModel is not None else [])
        rows += load_rows(folder, weight_bytes, libs, 1 if args.quick else 3)
        hf = None
        if GPT2LMHeadModel is not None:
            hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        arrs = bg.bandwidth_arrays() if not args.quick else None
        P = min(512, model.config.block_size)
        for t in threads:
            if torch is not None:
                torch.set_num_threads(t)
            rows.append(prefill_row(model, hf, t, P, args.quick))
            rows.append(decode_row(model, hf, t, 8 if args.quick else 64,
                                   1 if args.quick else 3, args.quick, arrs))
        model.close()
    for r in rows:
        r["shape"] = TINY if args.quick and args.folder is None else dict(
            vocab_size=model.config.vocab_size, block_size=model.config.block_size,
            n_layer=model.config.n_layer, n_head=model.config.n_head, n_embd=model.config.n_embd)
    if args.json:
        write_json(args.json, machine, args.quick, rows)


if __name__ == "__main__":
    main()
