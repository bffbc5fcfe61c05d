"""quant_quality.py - what compact weights cost in quality: a model trained here (float32) is
quantized to bf16, int8 (one scale per output column) and int8 with a scale per 32 rows, and
each is scored on the same held-out text (mean cross-entropy over the same windows) and decoded
greedily for 256 tokens from the same prompts (the first token where it leaves float32's
output). Also the logit error of each format on a GPT-2-124M-shaped model with random weights.

    python bench/quant_quality.py --json bench/results/quant_quality.json    # ~5 min
    python bench/quant_quality.py --quick                                    # smoke run

The trained models:
- Tiny Shakespeare, nanoGPT's CPU recipe for shakespeare-char (bench_train.QUALITY: 4 layers, 4
  heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps and
  cosine decay to 1e-4, AdamW betas 0.9/0.99, weight decay 0.1, clip 1.0, dropout 0); the
  held-out text is the last 10% (nanoGPT's split), scored on 200 batches of 12 windows as
  bench_train scores it. Skipped when the text is not found (--data).
- the built-in corpus, 4/4/128 (context 128), 600 steps of batch 16 (--steps), AdamW at 2e-3
  with smallmind's default schedule; the held-out text is the last 10% of the corpus
  (Training's own split), scored on 64 windows of 128 tokens.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import basic_machine, loadavg, write_json  # noqa: E402
from bench_train import QUALITY, find_data  # noqa: E402

try:
    import smallmind as sm
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    import smallmind as sm
from smallmind.model.corpus import builtin_corpus  # noqa: E402

FORMATS = [("bf16", None), ("int8", None), ("int8", 32)]


def name(dtype, group):
    return dtype if group is None else f"{dtype}/g{group}"


def val_loss(model, val, T, windows, batch=16, seed=0):
    """Mean cross-entropy over `windows` windows of T tokens of val drawn with `seed` (the same
    windows for every format), scored `batch` at a time."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - T - 1, windows)
    x = np.stack([val[s:s + T] for s in starts])
    y = np.stack([val[s + 1:s + T + 1] for s in starts])
    losses = [model.forward(x[i:i + batch], y[i:i + batch])[1] for i in range(0, windows, batch)]
    return float(np.mean(losses))


def greedy(model, tok, prompt, n):
    return sm.Sampling(model, tok).generate(prompt, n, temperature=0, return_details=True).tokens


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


QUALITY_STEPS = 2000      # nanoGPT's max_iters for the CPU recipe


def format_rows(model, tok, val, T, windows, batch, prompts, n, row):
    """Score `model` (float32) and each format on the same windows and greedy prompts."""
    model.eval()
    base = val_loss(model, val, T, windows, batch)
    ref = [greedy(model, tok, p, n) for p in prompts]
    row.update(float32_val_loss=base, windows=windows, greedy_tokens=n, prompts=prompts, formats={})
    print(f"  val loss float32 {base:.4f}")
    for d, g in FORMATS:
        q = model.quantize(d, group=g)
        loss = val_loss(q, val, T, windows, batch)
        div = [first_divergence(greedy(q, tok, p, n), r) for p, r in zip(prompts, ref)]
        row["formats"][name(d, g)] = {"val_loss": loss, "increase": loss / base - 1,
                                      "first_divergence": div}
        print(f"  {name(d, g):<9} val loss {loss:.4f} ({100 * (loss / base - 1):+.3f}%), greedy "
              f"first divergence over {n} tokens: {div}")
        q.close()
    return row


def shakespeare_row(path, steps, quick):
    """nanoGPT's CPU shakespeare-char recipe trained in float32, then quantized."""
    q = QUALITY
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tok = sm.Tokenizer(text)
    T, B = q["block_size"], q["batch_size"]
    cfg = sm.ModelConfig(tok.vocab_size, T, q["n_layer"], q["n_head"], q["n_embd"], dropout=0.0,
                         seed=42)
    model = sm.TransformerModel(cfg)
    tr = sm.Training(model, tok, text, T, B, seed=42, val_fraction=q["val_fraction"])
    hist = tr.train(steps, learning_rate=q["learning_rate"], warmup_steps=q["warmup_steps"],
                    min_lr=q["min_lr"], weight_decay=q["weight_decay"], beta1=q["beta1"],
                    beta2=q["beta2"], grad_clip=q["grad_clip"], lr_decay_steps=steps,
                    eval_every=0, log_every=0)
    tokens = tok.encode_array(text)
    val = tokens[len(tokens) - int(len(tokens) * q["val_fraction"]):]
    print(f"Tiny Shakespeare, nanoGPT CPU recipe, {steps} steps:")
    row = {"kind": "quant_quality", "part": "shakespeare", "recipe": "nanoGPT shakespeare-char CPU",
           "steps": steps, "train_loss_last": hist.train_loss[-1], "shape": cfg.to_dict(),
           "nanogpt_reported_val_loss": 1.88}
    windows = 20 * B if quick else q["eval_batches"] * B
    return format_rows(model, tok, val, T, windows, B, ["ROMEO:", "First Citizen:\n", "KING ",
                                                        "\n"], 32 if quick else 256, row)


def builtin_row(steps, quick):
    """The 4/4/128 model on the built-in corpus."""
    text = builtin_corpus(200_000 if quick else None)
    tok = sm.Tokenizer(text)
    T = 32 if quick else 128
    cfg = sm.ModelConfig(tok.vocab_size, T, 2 if quick else 4, 4, 32 if quick else 128, seed=1)
    model = sm.TransformerModel(cfg)
    tr = sm.Training(model, tok, text, T, 16, seed=1)
    hist = tr.train(steps, 2e-3, warmup_steps=min(100, steps // 10), eval_every=0, log_every=0)
    tokens = tok.encode_array(text)            # Training's split: the last 10% is held out
    val = tokens[len(tokens) - int(len(tokens) * 0.1):]
    print(f"built-in corpus, {steps} steps:")
    row = {"kind": "quant_quality", "part": "trained", "steps": steps,
           "train_loss_last": hist.train_loss[-1], "shape": cfg.to_dict()}
    return format_rows(model, tok, val, T, 16 if quick else 64, 16,
                       ["The ", "def ", "import ", "class A"], 32 if quick else 256, row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps, small shapes (smoke run)")
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--data", help="Tiny Shakespeare text (default ../shared/data/"
                                   "tinyshakespeare.txt next to the repository)")
    args = ap.parse_args(argv)
    machine = basic_machine()
    rows = []
    path = find_data(args.data)
    if path is None:
        print("Tiny Shakespeare skipped: not found (pass --data PATH to tinyshakespeare.txt)")
    else:
        rows.append(shakespeare_row(path, 30 if args.quick else QUALITY_STEPS, args.quick))
    rows.append(builtin_row(20 if args.quick else args.steps, args.quick))

    # logit error on a GPT-2-124M-shaped model (random weights): relative to the logits' spread
    shape = (512, 64, 2, 2, 64) if args.quick else (50257, 1024, 12, 12, 768)
    g2 = sm.TransformerModel(sm.ModelConfig(*shape, seed=2)).eval()
    idx = np.random.default_rng(3).integers(0, shape[0], (1, 64))
    ref_logits = g2.forward(idx).astype(np.float64)
    spread = float(ref_logits.std())
    lrow = {"kind": "quant_quality", "part": "logits", "shape": list(shape), "logit_std": spread,
            "formats": {}}
    for d, g in FORMATS:
        lq = g2.quantize(d, group=g).forward(idx).astype(np.float64)
        err = np.abs(lq - ref_logits)
        top_same = float(np.mean(lq.argmax(-1) == ref_logits.argmax(-1)))
        lrow["formats"][name(d, g)] = {"max_abs": float(err.max()), "rms": float(np.sqrt((err ** 2).mean())),
                                       "rms_over_std": float(np.sqrt((err ** 2).mean())) / spread,
                                       "same_argmax": top_same}
        print(f"  GPT-2 shape {name(d, g):<9} logit error: rms {lrow['formats'][name(d, g)]['rms']:.2e} "
              f"({100 * lrow['formats'][name(d, g)]['rms_over_std']:.2f}% of the logits' std), max "
              f"{err.max():.2e}; same argmax at {100 * top_same:.1f}% of positions")
    rows.append(lrow)
    machine["loadavg_end"] = loadavg()
    if args.json:
        write_json(args.json, machine, args.quick, rows)


if __name__ == "__main__":
    main()
