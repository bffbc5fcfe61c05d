"""bench_quant.py - decoding with compact weights: a GPT-2-124M-shaped model in float32, bf16 and
int8 (one scale per output column, and per 32 rows), greedy decode tokens/s at batch 1 on 1 and 2
threads against each format's read-bandwidth limit measured in the same rounds, against PyTorch
(float32, and its dynamic int8 quantization of the same weights), the 512-token prefill per
format, and the serving batch (8 and 32 rows decoded together).

    python bench/bench_quant.py --json bench/results/quant.json   # GPT-2 124M shape, ~5 min
    python bench/bench_quant.py --quick                             # smoke run, tiny shape

What is timed:
- decode: a 16-token prompt, then `new` greedy tokens (64; 8 with --quick), the whole call:
  smallmind's C generation loop on a cache with the model's weights (model.new_cache). PyTorch:
  bench/torch_gpt.py's generate_with_cache on the same float32 weights, and on a copy whose
  linear layers (Conv1D turned into nn.Linear, and the tied LM head as an nn.Linear) went
  through torch.ao.quantization.quantize_dynamic(..., dtype=torch.qint8) - PyTorch's own int8
  for CPU inference. torch.set_num_threads(t).
- limit: the streaming read bandwidth on t threads (bench_generate's numpy max-reductions over
  256 MiB per thread) measured in the same rounds, over the bytes one token reads in that format
  (matrices at 4, 2 or 1 byte a weight plus int8 scales; the float32 rest) - the batch-1 ceiling.
- prefill: a 512-token prompt into a fresh cache (quantized formats widen one matrix at a time).
- batch: 8 and 32 prompts prefilled, then `new` tokens each, decoded together; tokens/s over all.
Medians of the rounds (3; 1 with --quick); the formats alternate, an idle gap before each call.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_generate as bg  # noqa: E402
from _timing import basic_machine, loadavg, write_json  # noqa: E402

GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
TINY = dict(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)
FORMATS = [("float32", None), ("bf16", None), ("int8", None), ("int8", 32)]


def fmt_name(dtype, group):
    return dtype if group is None else f"{dtype}/g{group}"


def token_bytes(model, dtype, group):
    """Bytes one decode step reads at batch 1: every weight matrix and the token embedding in
    the format, everything else float32."""
    cfg = model.config
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    mats = L * 12 * C * C + V * C
    rest = 4 * (cfg.num_parameters() - mats)
    if dtype == "float32":
        return 4 * mats + rest
    if dtype == "bf16":
        return 2 * mats + rest
    scales = (L * (3 * C + C + 4 * C + C) + V) if group is None else mats // group
    return mats + 4 * scales + rest


def sm_generate(model, prompt, n, threads):
    """Greedy tokens (B, n) from prompt (B, P) int64: prefill, then the C loop for every row."""
    sm = bg.sm
    cfg, V, T = model.core_config, model.config.vocab_size, model.config.block_size
    B = prompt.shape[0]
    cache = model.new_cache(B, T)
    try:
        ctx = np.ascontiguousarray(prompt, dtype=np.int32)
        logits = sm._core.gpt_prefill(model.flat_params, cfg, ctx, cache, threads)
        gen = sm._core.GPTGenerator(model.flat_params, cfg, cache, V, T // 2)
        for b in range(B):
            gen.set_row(b, ctx[b], logits[b], remaining=n)
        out, made, _, _ = gen.run(n, 0.0, threads)
    finally:
        cache.close()
    return out.astype(np.int64)


def torch_int8(tmodel):
    """A copy of the torch model with every Conv1D as nn.Linear and the tied head as an
    nn.Linear, then PyTorch's dynamic int8 quantization of the Linear layers."""
    import copy

    import torch
    import torch_gpt
    m = copy.deepcopy(tmodel).eval()

    def linear(conv):
        lin = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        return lin
    for block in m.transformer.h:
        block.attn.c_attn = linear(block.attn.c_attn)
        block.attn.c_proj = linear(block.attn.c_proj)
        block.mlp.c_fc = linear(block.mlp.c_fc)
        block.mlp.c_proj = linear(block.mlp.c_proj)
    head = torch.nn.Linear(m.config.n_embd, m.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(m.transformer.wte.weight)
    m.lm_head = head
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    plain = torch_gpt._last_logits
    if not getattr(torch_gpt, "_quant_head", False):      # the head through lm_head when there
        torch_gpt._last_logits = lambda model, x: (model.lm_head(model.transformer.ln_f(x[:, -1, :]))
                                                   if hasattr(model, "lm_head") else plain(model, x))
        torch_gpt._quant_head = True
    return q


def decode_row(models, tmodels, threads, new, rounds, quick, arrs):
    torch = bg.torch
    rng = np.random.default_rng(9)
    ref = models["float32"]
    prompt = rng.integers(0, ref.config.vocab_size, size=(1, 16)).astype(np.int64)
    fns = {name: (lambda m=m: sm_generate(m, prompt, new, threads)) for name, m in models.items()}
    if tmodels:
        from torch_gpt import generate_with_cache
        pt = torch.from_numpy(prompt)
        for name, tm in tmodels.items():
            fns[name] = lambda tm=tm: generate_with_cache(tm, pt, new).numpy()
    bw = []
    if arrs is not None and threads <= len(arrs):
        fns["bandwidth"] = lambda: bw.append(bg.read_bandwidth(threads, arrs))
    secs, res = bg.run_rounds(fns, rounds, quick)
    gbs = float(np.median([g for g, _ in (bw[1:] or bw)])) if bw else None
    row = {"kind": "quant", "part": "decode", "threads": threads, "prompt_tokens": 16,
           "new_tokens": new, "read_gb_per_s": gbs, "loadavg_1min": (loadavg() or [None])[0]}
    f32 = new / secs["float32"]
    for name, m in models.items():
        tps = new / secs[name]
        dt, g = (name.split("/g") + [None])[:2]
        nbytes = token_bytes(m, dt, None if g is None else int(g))
        row[name] = {"tokens_per_s": tps, "vs_float32": tps / f32, "bytes_per_token": nbytes,
                     "diverge_vs_float32": bg.first_divergence(res[name], res["float32"])}
        if gbs:
            row[name]["limit_tokens_per_s"] = gbs * 1e9 / nbytes
            row[name]["share_of_limit"] = tps / row[name]["limit_tokens_per_s"]
    for name in tmodels or {}:
        row[name] = {"tokens_per_s": new / secs[name]}
    if "torch_int8" in row:
        row["int8_vs_torch_int8"] = row["int8"]["tokens_per_s"] / row["torch_int8"]["tokens_per_s"]
    cells = " | ".join(
        f"{n} {row[n]['tokens_per_s']:6.1f} tok/s"
        + (f" ({row[n]['vs_float32']:.2f}x, {100 * row[n]['share_of_limit']:.0f}% of limit)"
           if "share_of_limit" in row[n] else "") for n in list(models) + list(tmodels or {}))
    print(f"  decode t={threads}: {cells}", flush=True)
    return row


def prefill_row(models, threads, P, quick):
    sm = bg.sm
    rng = np.random.default_rng(5)
    ref = models["float32"]
    prompt = rng.integers(0, ref.config.vocab_size, size=(1, P)).astype(np.int32)
    caches = {n: m.new_cache(1, ref.config.block_size) for n, m in models.items()}
    fns = {n: (lambda n=n, m=m: sm._core.gpt_prefill(m.flat_params, m.core_config, prompt,
                                                     caches[n], threads)) for n, m in models.items()}
    secs, _ = bg.run_many(fns, 1 if quick else 2, quick)
    for c in caches.values():
        c.close()
    row = {"kind": "quant", "part": "prefill", "threads": threads, "prompt_tokens": P,
           "loadavg_1min": (loadavg() or [None])[0]}
    for n in models:
        row[n] = {"ms": 1e3 * secs[n], "vs_float32": secs["float32"] / secs[n]}
    print(f"  prefill t={threads} {P} tokens: " + " | ".join(
        f"{n} {row[n]['ms']:.1f} ms ({row[n]['vs_float32']:.2f}x)" for n in models), flush=True)
    return row


def batch_row(models, threads, B, new, rounds, quick):
    rng = np.random.default_rng(7)
    ref = models["float32"]
    prompt = rng.integers(0, ref.config.vocab_size, size=(B, 16)).astype(np.int64)
    fns = {n: (lambda m=m: sm_generate(m, prompt, new, threads)) for n, m in models.items()}
    secs, _ = bg.run_rounds(fns, rounds, quick)
    row = {"kind": "quant", "part": "batch", "threads": threads, "rows": B, "new_tokens": new,
           "loadavg_1min": (loadavg() or [None])[0]}
    for n in models:
        row[n] = {"tokens_per_s": B * new / secs[n], "vs_float32": secs["float32"] / secs[n]}
    print(f"  batch {B} t={threads}: " + " | ".join(
        f"{n} {row[n]['tokens_per_s']:.1f} tok/s ({row[n]['vs_float32']:.2f}x)" for n in models),
        flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round (smoke run)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default: 1,2)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    bg.import_libs()
    sm, torch = bg.sm, bg.torch
    threads = [int(t) for t in args.threads.split(",")]
    machine = basic_machine()
    machine.update(smallmind=sm.__version__, simd=sm.build_info()["simd"],
                   torch=getattr(torch, "__version__", None))
    print(f"bench_quant: {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg']}")
    shape = TINY if args.quick else GPT2
    base = sm.TransformerModel(sm.ModelConfig(**shape, seed=1)).eval()
    models = {fmt_name(d, g): (base if d == "float32" else base.quantize(d, group=g))
              for d, g in FORMATS}
    tmodels = None
    if torch is not None:
        import torch_gpt
        tm = torch_gpt.from_numpy_state(base.config, base.state_dict()).eval()
        tmodels = {"torch_float32": tm, "torch_int8": torch_int8(tm)}
    arrs = None if args.quick else bg.bandwidth_arrays()
    new, rounds = (8, 1) if args.quick else (64, 3)
    rows = []
    for t in threads:
        if torch is not None:
            torch.set_num_threads(t)
        rows.append(decode_row(models, tmodels, t, new, rounds, args.quick, arrs))
        rows.append(prefill_row(models, t, min(512, shape["block_size"]), args.quick))
        for B in (8, 32):
            rows.append(batch_row(models, t, B, 8 if args.quick else 32, rounds, args.quick))
    for r in rows:
        r["shape"] = shape
    machine["loadavg_end"] = loadavg()
    if args.json:
        write_json(args.json, machine, args.quick, rows)


if __name__ == "__main__":
    main()
