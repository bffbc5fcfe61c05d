"""bench_train.py - whole-model training benchmark, smallmind against PyTorch on the same GPT-2:
tokens/s of a full training step, peak memory of each library (one subprocess per library and
model), and the validation loss nanoGPT's CPU Shakespeare recipe reaches, in one run.

    python bench/bench_train.py --json bench/results/train.json     # full run (~10-15 min, 2 cores)
    python bench/bench_train.py --quick                              # smoke run (< 60 s)
    python bench/bench_train.py --only quality --quality-steps 500 --threads 2

Throughput: a step is forward + mean cross-entropy + backward + global-norm clipping (1.0) +
AdamW, on the same initial weights (smallmind's GPT-2 initialisation copied into the PyTorch
model) and the same batches. The two libraries are timed alternately (round robin, an idle gap
before each so the other's OpenMP/MKL workers are asleep) and the median step is reported. The
first two steps' losses of the two are compared as a sanity check: the first checks the forward
pass, the second also the backward pass, clipping and AdamW.

Memory: a fresh interpreter per (library, model) runs a few steps and reports its peak resident
set (VmHWM on Linux; getrusage's ru_maxrss elsewhere - on Linux ru_maxrss carries the parent's
peak across exec), the RSS after imports, and the RSS after imports and model creation; "peak - model" is what training added on top of the created model. Note
smallmind allocates its gradient block when the model is created and PyTorch on the first
backward, so the absolute peak is the fairer comparison.

Quality: nanoGPT's CPU recipe for shakespeare-char (4 layers, 4 heads, 128 wide, block 64,
batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas
0.9/0.99, weight decay 0.1, clip 1.0, dropout 0), trained by sm.Training and by a plain PyTorch
loop from the same initial weights, each with its own batch sampling from the same 90/10
split. The two runs are interleaved in chunks so that a busy spell of a shared machine does not
land on one library only. Both final models are scored on the same 200 validation batches.
Difference from nanoGPT: weight decay applies to the blocks' weight matrices only in both
libraries here (nanoGPT also decays the embeddings).

Leaves out: GPU comparisons, torch.compile, mixed precision, data loading costs.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg, write_json  # noqa: E402

# smallmind and torch are imported lazily so that each memory child imports only its library.
sm = None
torch = None

VOCAB = 65
# name -> (n_layer, n_head, n_embd, block_size, batch_size)
CONFIGS = {
    "2/4/64": (2, 4, 64, 64, 32),
    "4/4/128": (4, 4, 128, 128, 32),
    "shakespeare-char": (6, 6, 384, 256, 64),
}
QUICK_CONFIGS = ("2/4/64", "4/4/128")
# Steps timed per library in the full run: (rounds, min seconds of steps per round). The big
# model gets one step per round (a step takes seconds), the small ones a batch per round.
TIMING = {"2/4/64": (7, 0.6), "4/4/128": (5, 1.0), "shakespeare-char": (3, 0.0)}
MEMORY_STEPS = {"2/4/64": 3, "4/4/128": 3, "shakespeare-char": 2}
LR = 1e-3
IDLE_GAP_S = 0.5

QUALITY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3,
               warmup_steps=100, min_lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.99,
               grad_clip=1.0, eval_batches=200, val_fraction=0.1)


def import_sm():
    """The installed smallmind, else the repository's in-place build (python setup.py
    build_ext --inplace). Never the bare source tree in front of an installed package."""
    global sm
    if sm is None:
        try:
            import smallmind
        except ImportError:
            sys.path.insert(0, REPO)
            import smallmind
        sm = smallmind
    return sm


def import_torch():
    global torch
    if torch is None:
        try:
            import torch as t
        except ImportError:
            return None
        torch = t
    return torch


def rss_mb():
    """Current resident set size in MB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb():
    """Peak resident set size of this process image in MB. On Linux this is VmHWM: getrusage's
    ru_maxrss survives execve, so in a child started by fork/vfork + exec it reports the parent's
    peak when that is larger (the benchmark's parent holds both libraries and every model)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "cores": os.cpu_count()}
    if cpu_model():
        info["cpu"] = cpu_model()
    import_sm()
    info["smallmind"] = sm.__version__
    info["build"] = sm.build_info()
    if import_torch() is not None:
        info["torch"] = torch.__version__
    return info


def model_config(name):
    L, H, C, T, _ = CONFIGS[name]
    return sm.ModelConfig(VOCAB, T, L, H, C, dropout=0.0, seed=42)


def random_batches(n, B, T, seed):
    """n (x, y) pairs of int32 (B, T) ids drawn uniformly from the vocabulary."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = rng.integers(0, VOCAB, size=(B, T + 1), dtype=np.int32)
        out.append((np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])))
    return out


class SmStepper:
    """One smallmind training step at the model level, exactly what sm.Training does per step
    (precision "bf16": Training(precision="bf16")'s mixed precision)."""

    def __init__(self, model, threads, lr=LR, betas=(0.9, 0.95), weight_decay=0.1,
                 precision="float32"):
        self.model, self.threads, self.lr, self.betas, self.wd = model, threads, lr, betas, weight_decay
        self.precision = precision
        self.m = np.zeros_like(model.flat_params)
        self.v = np.zeros_like(model.flat_params)
        self.t = 0

    def __call__(self, x, y):
        m, nt = self.model, self.threads
        m.zero_grad()
        loss = m.train_forward(x, y, None, nt, self.precision)
        m.backward(threads=nt)
        sm._core.clip_grad_norm(m.flat_grads, 1.0, nt)
        self.t += 1
        sm._core.gpt_adamw(m.flat_params, self.m, self.v, m.flat_grads, m.core_config, self.lr, self.betas[0],
                           self.betas[1], 1e-8, self.wd, self.t, nt)
        return loss


class TorchStepper:
    """PyTorch's step; bf16=True wraps forward and loss in torch.autocast("cpu", bfloat16), the
    mixed precision PyTorch recommends on CPU (float32 master weights, bf16 matrix products)."""

    def __init__(self, tmodel, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, bf16=False):
        from torch_gpt import make_optimizer
        self.model, self.bf16 = tmodel, bf16
        self.opt = make_optimizer(tmodel, lr, weight_decay, betas=betas)

    def __call__(self, x, y):
        from torch_gpt import train_step
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return train_step(self.model, self.opt, x, y, grad_clip=1.0)
        return train_step(self.model, self.opt, x, y, grad_clip=1.0)


def torch_batches(batches):
    return [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]


def set_threads(n):
    sm.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def idle(quick):
    if not quick:
        time.sleep(IDLE_GAP_S)


# ---- throughput ---------------------------------------------------------------------------------

def step_flops(name):
    """Useful FLOPs of one training step: 6 per parameter of the linear layers (and the tied LM
    head) per token (forward 2, backward 4), plus causal attention's 6 * n_layer * T * C per
    token (scores and weighted sum over the T/2 earlier positions on average, times three for
    backward). LayerNorm, GELU, softmax and the optimizer are left out (a few percent)."""
    L, H, C, T, B = CONFIGS[name]
    linear = L * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) + C * VOCAB
    return B * T * (6 * linear + 6 * L * T * C)


def measured_peak(threads):
    """The FMA peak of `threads` threads now (the best of three short probes)."""
    return max(sm._core.fma_peak(threads)[0] for _ in range(3))


def throughput_rows(names, thread_counts, quick):
    rows = []
    for name in names:
        cfg = model_config(name)
        B, T = CONFIGS[name][4], cfg.block_size
        nb = 4
        batches = random_batches(nb, B, T, seed=1)
        for nt in thread_counts:
            set_threads(nt)
            model = sm.TransformerModel(cfg)
            model16 = sm.TransformerModel(cfg)    # the same seed: the same initial weights
            state = {k: v.copy() for k, v in model.state_dict().items()}
            steppers = {"smallmind": (SmStepper(model, nt), batches),
                        "smallmind_bf16": (SmStepper(model16, nt, precision="bf16"), batches)}
            if torch is not None:
                from torch_gpt import from_numpy_state  # needs torch
                tb = torch_batches(batches)
                steppers["torch"] = (TorchStepper(from_numpy_state(cfg, state)), tb)
                steppers["torch_bf16"] = (TorchStepper(from_numpy_state(cfg, state), bf16=True), tb)
            peak = measured_peak(nt)
            # Sanity: the first two steps on the same batches from the same weights. These are
            # also each library's warm-up steps.
            losses = {}
            for lib, (step, bs) in steppers.items():
                idle(quick)
                losses[lib] = [float(step(*bs[0])), float(step(*bs[1]))]
            counters = {lib: 2 for lib in steppers}
            times = {lib: [] for lib in steppers}
            rounds, min_time = TIMING[name]
            if quick:
                rounds, min_time = 1, 0.0
            for _ in range(rounds):
                for lib, (step, bs) in steppers.items():
                    idle(quick)
                    start = time.perf_counter()
                    n = 0
                    while n < 1 or time.perf_counter() - start < min_time:
                        x, y = bs[counters[lib] % nb]
                        counters[lib] += 1
                        t0 = time.perf_counter()
                        step(x, y)
                        times[lib].append(time.perf_counter() - t0)
                        n += 1
            row = {"kind": "throughput", "config": name, "threads": nt,
                   "shape": dict(zip(("n_layer", "n_head", "n_embd", "block_size", "batch_size"),
                                     CONFIGS[name])),
                   "params": cfg.num_parameters(), "tokens_per_step": B * T,
                   "flops_per_step": step_flops(name), "fma_peak_gflops": peak / 1e9,
                   "bf16_backend": sm.kernels.bf16_backend()}
            for lib, ts in times.items():
                med = float(np.median(ts))
                row[f"{lib}_ms"] = 1e3 * med
                row[f"{lib}_best_ms"] = 1e3 * float(np.min(ts))
                row[f"{lib}_tokens_per_s"] = B * T / med
                row[f"{lib}_steps_timed"] = len(ts)
                row[f"{lib}_loss_step1"] = losses[lib][0]
                row[f"{lib}_loss_step2"] = losses[lib][1]
                row[f"{lib}_gflops"] = row["flops_per_step"] / med / 1e9
                row[f"{lib}_share_of_peak"] = row["flops_per_step"] / med / peak
            row["bf16_speedup"] = row["smallmind_ms"] / row["smallmind_bf16_ms"]
            row["bf16_loss_diff_step2"] = abs(losses["smallmind_bf16"][1] - losses["smallmind"][1])
            if "torch_bf16" in times:
                row["bf16_vs_torch_bf16"] = row["torch_bf16_ms"] / row["smallmind_bf16_ms"]
                row["torch_bf16_speedup"] = row["torch_ms"] / row["torch_bf16_ms"]
            if "torch" in times:
                row["speed_vs_torch"] = row["torch_ms"] / row["smallmind_ms"]
                row["loss_diff_step1"] = abs(losses["smallmind"][0] - losses["torch"][0])
                row["loss_diff_step2"] = abs(losses["smallmind"][1] - losses["torch"][1])
            row["loadavg_1min"] = (loadavg() or [None])[0]
            rows.append(row)
            print(fmt_throughput(row), flush=True)
            del steppers
            model.close()
            model16.close()
    return rows


def fmt_throughput(r):
    s = (f"  {r['config']:<17} t={r['threads']}  smallmind {r['smallmind_ms']:9.1f} ms "
         f"{r['smallmind_tokens_per_s']:9.0f} tok/s ({100 * r['smallmind_share_of_peak']:.0f}% of "
         f"the {r['fma_peak_gflops']:.0f} GFLOP/s FMA peak)")
    if "torch_ms" in r:
        s += (f"  torch {r['torch_ms']:9.1f} ms {r['torch_tokens_per_s']:9.0f} tok/s"
              f"  sm/torch {r['speed_vs_torch']:.2f}x"
              f"  |dloss| step1 {r['loss_diff_step1']:.1e} step2 {r['loss_diff_step2']:.1e}")
    s += (f"\n  {'':<17}      bf16 ({r['bf16_backend']}) {r['smallmind_bf16_ms']:9.1f} ms = "
          f"{r['bf16_speedup']:.2f}x our float32 ({r['smallmind_bf16_gflops']:.0f} GFLOP/s)"
          f"  |dloss| step2 vs float32 {r['bf16_loss_diff_step2']:.1e}")
    if "torch_bf16_ms" in r:
        s += (f"  torch bf16 autocast {r['torch_bf16_ms']:9.1f} ms ({r['torch_bf16_speedup']:.2f}x "
              f"its float32)  sm bf16/torch bf16 {r['bf16_vs_torch_bf16']:.2f}x")
    return s + f"  (load {r.get('loadavg_1min')})"


# ---- memory (one child process per library and model) --------------------------------------------

def memory_child(lib, name, threads, steps):
    """Runs in a fresh interpreter: imports one library, builds the model, takes `steps` steps,
    prints one JSON line."""
    base = rss_mb()
    if lib == "smallmind":
        import_sm()
        sm.set_num_threads(threads)
    else:
        if import_torch() is None:
            print(json.dumps({"error": "torch is not installed"}))
            return
        torch.set_num_threads(threads)
    after_import = rss_mb()
    L, H, C, T, B = CONFIGS[name]
    batches = random_batches(2, B, T, seed=1)
    if lib == "smallmind":
        model = sm.TransformerModel(sm.ModelConfig(VOCAB, T, L, H, C, dropout=0.0, seed=42))
        after_model = rss_mb()
        step = SmStepper(model, threads)
    else:
        from torch_gpt import TorchGPT, TorchGPTConfig
        model = TorchGPT(TorchGPTConfig(VOCAB, T, L, H, C))
        batches = torch_batches(batches)
        after_model = rss_mb()
        step = TorchStepper(model)
    for i in range(steps):
        step(*batches[i % 2])
    peak = peak_rss_mb()
    print(json.dumps({"interpreter_mb": base, "after_import_mb": after_import,
                      "after_model_mb": after_model, "peak_mb": peak,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "end_rss_mb": rss_mb()}))


def memory_rows(names, threads, quick):
    rows = []
    libs = ["smallmind"] + (["torch"] if torch is not None else [])
    for name in names:
        steps = 1 if quick else MEMORY_STEPS[name]
        row = {"kind": "memory", "config": name, "threads": threads, "steps": steps}
        for lib in libs:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", lib, name,
                   str(threads), str(steps)]
            # the child imports the same smallmind as this process (installed or in-place)
            pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(import_sm().__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [pkg_parent, HERE] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            try:
                res = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                print(f"  memory child {lib}/{name} failed:\n{p.stderr[-2000:]}", flush=True)
                continue
            if "error" in res:
                continue
            row[f"{lib}_peak_mb"] = res["peak_mb"]
            row[f"{lib}_after_import_mb"] = res["after_import_mb"]
            row[f"{lib}_after_model_mb"] = res["after_model_mb"]
            row[f"{lib}_training_mb"] = res["peak_mb"] - res["after_model_mb"]
            row[f"{lib}_above_import_mb"] = res["peak_mb"] - res["after_import_mb"]
        rows.append(row)
        print(fmt_memory(row), flush=True)
    return rows


def fmt_memory(r):
    s = f"  {r['config']:<17} t={r['threads']}"
    for lib in ("smallmind", "torch"):
        if f"{lib}_peak_mb" in r:
            s += (f"  {lib}: peak {r[lib + '_peak_mb']:7.1f} MB (imports {r[lib + '_after_import_mb']:6.1f}, "
                  f"+model {r[lib + '_after_model_mb'] - r[lib + '_after_import_mb']:6.1f}, "
                  f"+training {r[lib + '_training_mb']:6.1f})")
    return s


# ---- quality --------------------------------------------------------------------------------------

def find_data(path):
    if path:
        return path if os.path.exists(path) else None
    for p in (os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
              "/work/shared/data/tinyshakespeare.txt"):
        if os.path.exists(p):
            return os.path.normpath(p)
    return None


def quality_rows(data_path, steps, threads, quick):
    q = QUALITY
    with open(data_path, encoding="utf-8") as f:
        text = f.read()
    set_threads(threads)
    tok = sm.Tokenizer(text)
    cfg = sm.ModelConfig(tok.vocab_size, q["block_size"], q["n_layer"], q["n_head"], q["n_embd"],
                         dropout=0.0, seed=42)
    model = sm.TransformerModel(cfg)
    init_state = {k: v.copy() for k, v in model.state_dict().items()}
    trainer = sm.Training(model, tok, text, q["block_size"], q["batch_size"], seed=42,
                          val_fraction=q["val_fraction"])
    # The same run in bf16 mixed precision: same initial weights, same batches (same sampler seed).
    model16 = sm.TransformerModel(cfg)
    trainer16 = sm.Training(model16, tok, text, q["block_size"], q["batch_size"], seed=42,
                            val_fraction=q["val_fraction"], precision="bf16")
    # The same split as sm.Training: the last 10% of the tokens is the validation set.
    tokens = tok.encode_array(text).astype(np.int64)
    n_val = int(len(tokens) * q["val_fraction"])
    train_tok, val_tok = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    T, B = q["block_size"], q["batch_size"]

    def windows(toks, rng, n):
        ix = rng.integers(0, len(toks) - T, size=n)
        w = toks[ix[:, None] + np.arange(T + 1)]
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    sched = dict(learning_rate=q["learning_rate"], warmup_steps=q["warmup_steps"],
                 min_lr=q["min_lr"], weight_decay=q["weight_decay"], beta1=q["beta1"],
                 beta2=q["beta2"], grad_clip=q["grad_clip"])
    libs = ["smallmind", "smallmind_bf16"]
    if torch is not None:
        from torch_gpt import from_numpy_state, make_optimizer  # needs torch
        libs.append("torch")
        tmodel = from_numpy_state(cfg, init_state)
        topt = make_optimizer(tmodel, q["learning_rate"], q["weight_decay"],
                              betas=(q["beta1"], q["beta2"]))
        trng = np.random.default_rng(1337)
        tstate = {"step": 0, "losses": []}

    def torch_until(n):
        tmodel.train()
        while tstate["step"] < n:
            lr = sm.Training.lr_at(tstate["step"], q["learning_rate"], q["warmup_steps"], steps,
                                   q["min_lr"])
            for g in topt.param_groups:
                g["lr"] = lr
            x, y = windows(train_tok, trng, B)
            topt.zero_grad(set_to_none=True)
            _, loss = tmodel(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tmodel.parameters(), q["grad_clip"])
            topt.step()
            tstate["losses"].append(loss.item())
            tstate["step"] += 1

    # Interleave the two runs in chunks; the time of each is the sum of its chunks.
    chunk = max(1, steps // 8)
    wall = {lib: 0.0 for lib in libs}
    sm_losses, sm16_losses = [], []
    done = 0
    while done < steps:
        done = min(steps, done + chunk)
        idle(quick)
        t0 = time.perf_counter()
        h = trainer.train(done, lr_decay_steps=steps, log_every=0, eval_every=0, threads=threads,
                          **sched)
        wall["smallmind"] += time.perf_counter() - t0
        sm_losses += h.train_loss
        idle(quick)
        t0 = time.perf_counter()
        h = trainer16.train(done, lr_decay_steps=steps, log_every=0, eval_every=0, threads=threads,
                            **sched)
        wall["smallmind_bf16"] += time.perf_counter() - t0
        sm16_losses += h.train_loss
        if "torch" in libs:
            idle(quick)
            t0 = time.perf_counter()
            torch_until(done)
            wall["torch"] += time.perf_counter() - t0
        print(f"  quality: step {done}/{steps}  smallmind train loss {np.mean(sm_losses[-chunk:]):.4f}"
              f"  bf16 {np.mean(sm16_losses[-chunk:]):.4f}"
              + (f"  torch {np.mean(tstate['losses'][-chunk:]):.4f}" if "torch" in libs else ""),
              flush=True)

    # Score both final models on the same batches of each split.
    n_eval = 20 if quick else q["eval_batches"]
    erng = np.random.default_rng(2024)
    evals = {split: [windows(toks, erng, B) for _ in range(n_eval)]
             for split, toks in (("val", val_tok), ("train", train_tok))}
    row = {"kind": "quality", "recipe": "nanoGPT shakespeare-char CPU", "threads": threads,
           "steps": steps, "eval_batches": n_eval, "params": cfg.num_parameters(),
           "config": {k: q[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")},
           "hparams": {k: q[k] for k in ("learning_rate", "warmup_steps", "min_lr", "weight_decay",
                                         "beta1", "beta2", "grad_clip")},
           "nanogpt_reported_val_loss": 1.88}
    for lib, m, losses in (("smallmind", model, sm_losses), ("smallmind_bf16", model16, sm16_losses)):
        m.eval()      # both scored in float32 (the bf16 run's master weights)
        for split, bs in evals.items():
            row[f"{lib}_{split}_loss"] = float(np.mean([
                sm._core.gpt_forward(m.flat_params, m.core_config, x.astype(np.int32),
                                     y.astype(np.int32), threads=threads)[0] for x, y in bs]))
        row[f"{lib}_train_last_loss"] = float(np.mean(losses[-100:]))
        row[f"{lib}_wall_s"] = wall[lib]
        row[f"{lib}_ms_per_step"] = 1e3 * wall[lib] / steps
        row[f"{lib}_tokens_per_s"] = steps * B * T / wall[lib]
    row["bf16_val_loss_rel_diff"] = row["smallmind_bf16_val_loss"] / row["smallmind_val_loss"] - 1
    row["bf16_backend"] = sm.kernels.bf16_backend()
    model.close()
    model16.close()
    if "torch" in libs:
        tmodel.eval()
        with torch.no_grad():
            for split, bs in evals.items():
                row[f"torch_{split}_loss"] = float(np.mean([
                    tmodel(torch.from_numpy(x), torch.from_numpy(y))[1].item() for x, y in bs]))
        row["torch_train_last_loss"] = float(np.mean(tstate["losses"][-100:]))
        row["torch_wall_s"] = wall["torch"]
        row["torch_ms_per_step"] = 1e3 * wall["torch"] / steps
        row["torch_tokens_per_s"] = steps * B * T / wall["torch"]
        row["speed_vs_torch"] = wall["torch"] / wall["smallmind"]
    print(fmt_quality(row), flush=True)
    return [row]


def fmt_quality(r):
    s = (f"  quality ({r['steps']} steps, t={r['threads']}): smallmind val {r['smallmind_val_loss']:.4f} "
         f"train {r['smallmind_train_loss']:.4f} in {r['smallmind_wall_s']:.1f} s")
    s += (f" | bf16 val {r['smallmind_bf16_val_loss']:.4f} ({100 * r['bf16_val_loss_rel_diff']:+.2f}%) "
          f"in {r['smallmind_bf16_wall_s']:.1f} s")
    if "torch_val_loss" in r:
        s += (f" | torch val {r['torch_val_loss']:.4f} train {r['torch_train_loss']:.4f} in "
              f"{r['torch_wall_s']:.1f} s | sm/torch speed {r['speed_vs_torch']:.2f}x")
    return s + f" | nanoGPT reports ~{r['nanogpt_reported_val_loss']}"


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:
        lib, name, threads, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        memory_child(lib, name, threads, steps)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one step each (smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", default="1,2", help="thread counts for throughput (default 1,2); "
                    "memory and quality use the largest")
    ap.add_argument("--only", choices=["throughput", "memory", "quality"], help="run one part")
    ap.add_argument("--quality-steps", type=int, default=2000,
                    help="training iterations of the quality run (default 2000; 20 with --quick)")
    ap.add_argument("--data", default=None,
                    help="Tiny Shakespeare text (default ../shared/data/tinyshakespeare.txt "
                         "relative to the repository root)")
    args = ap.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if not thread_counts or min(thread_counts) < 1:
        ap.error("--threads needs positive integers, e.g. 1,2")
    import_sm()
    if import_torch() is None:
        print("torch is not installed: measuring smallmind alone (pip install torch for the "
              "comparison)")
    info = machine_info()
    print(f"smallmind {info['smallmind']} | {info.get('cpu', '?')}, {info['cores']} cores | "
          f"{info['build']}")
    print(f"numpy {info['numpy']}" + (f" | torch {info['torch']}" if "torch" in info else ""))
    names = list(QUICK_CONFIGS if args.quick else CONFIGS)
    top = max(thread_counts)
    rows = []
    load_start = loadavg()
    t_start = time.perf_counter()
    if args.only in (None, "throughput"):
        print("\nTraining step (forward + loss + backward + clip + AdamW), median per step:")
        rows += throughput_rows(names, thread_counts, args.quick)
    if args.only in (None, "memory"):
        print(f"\nPeak RSS, one process per library and model ({top} threads):")
        rows += memory_rows(names[:1] if args.quick else names, top, args.quick)
    if args.only in (None, "quality"):
        steps = 20 if args.quick else args.quality_steps
        data = find_data(args.data)
        if data is None:
            print(f"\nQuality run skipped: Tiny Shakespeare not found "
                  f"({args.data or os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt')}); "
                  f"pass --data PATH to a copy of tinyshakespeare.txt")
        else:
            print(f"\nQuality: nanoGPT's CPU shakespeare-char recipe, {steps} steps, {top} threads "
                  f"({data}):")
            rows += quality_rows(data, steps, top, args.quick)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    # A shared machine's load during the run, for judging the figures.
    info["loadavg_start"] = load_start
    info["loadavg_end"] = loadavg()
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {info['loadavg_end']}")
    if args.json:
        write_json(args.json, info, args.quick, rows)


if __name__ == "__main__":
    main()
