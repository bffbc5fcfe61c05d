"""cli.py - the `smallmind` command (also `python -m smallmind`). With no subcommand it runs the
demo: train a small GPT on the built-in corpus (the standard library's own documentation), then
generate text from it. `info` reports the build, `bench` times the core against numpy. The full
train / generate / serve commands arrive with their issues."""
import argparse
import sys
import time

import numpy as np

from . import __version__, build_info, kernels

_SHAPES = [(4096, 128, 384), (4096, 512, 128), (1024, 1024, 1024), (1, 768, 2304)]


def _median_time(fn, min_reps=5, min_time=0.25):
    """Median seconds per call, over at least `min_reps` calls and `min_time` seconds."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cmd_info(args):
    info = build_info()
    print(f"smallmind {__version__}")
    for key, value in info.items():
        print(f"  {key:14s} {value}")
    return 0


def cmd_bench(args):
    """A quick side-by-side of smallmind's matmul and numpy's on a few shapes."""
    rng = np.random.default_rng(0)
    print(f"{'shape (M,K,N)':>20s} {'smallmind GFLOP/s':>18s} {'numpy GFLOP/s':>14s} {'ratio':>6s}")
    for (M, K, N) in _SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        # OpenBLAS and OpenMP keep their worker threads spinning for a while after a call:
        # let the other library's go idle before timing each one.
        time.sleep(0.3)
        t_sm = _median_time(lambda: kernels.matmul(a, b, out=c))
        time.sleep(0.3)
        t_np = _median_time(lambda: np.matmul(a, b, out=c))
        fl = 2.0 * M * K * N
        print(f"{str((M, K, N)):>20s} {fl / t_sm / 1e9:18.1f} {fl / t_np / 1e9:14.1f} {t_np / t_sm:5.2f}x")
    return 0


def cmd_demo(args):
    """Train a small model on the built-in corpus, then generate from it."""
    from .corpus import builtin_corpus
    from .model import ModelConfig, TransformerModel
    from .tokenizer import Tokenizer
    from .training import Training

    text = builtin_corpus()
    tok = Tokenizer(text)
    cfg = ModelConfig(tok.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd,
                      seed=args.seed)
    model = TransformerModel(cfg)
    print(f"smallmind {__version__}: training {model} on {len(text):,} characters of the "
          f"Python standard library's documentation ({build_info()['simd']}, "
          f"{build_info()['num_threads']} threads)")
    trainer = Training(model, tok, text, args.block_size, args.batch_size, seed=args.seed)

    def progress(info):
        if info["step"] % args.log_every == 0 or info["step"] == args.steps:
            extra = f", val loss {info['val_loss']:.3f}" if "val_loss" in info else ""
            print(f"  step {info['step']:5d}/{args.steps}: loss {info['loss']:.3f}{extra}, "
                  f"{info['tokens_per_sec']:,.0f} tokens/s", flush=True)

    t0 = time.perf_counter()
    hist = trainer.train(args.steps, args.learning_rate, warmup_steps=min(100, args.steps // 10),
                         eval_every=args.steps, eval_batches=20, log_every=0, callback=progress)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s; validation loss "
          f"{hist.val_loss[-1]:.3f} (a uniform guess scores {np.log(tok.vocab_size):.3f})")
    from .sampling import Sampling
    model.eval()
    print("\n--- generated ---")
    print(args.prompt, end="", flush=True)
    for piece in Sampling(model, tok).stream(args.prompt, args.tokens, temperature=0.8,
                                             top_k=20, seed=args.seed):
        print(piece, end="", flush=True)
    print()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="smallmind", description="smallmind: small GPT models on the CPU")
    sub = ap.add_subparsers(dest="command")
    sub.add_parser("info", help="version, build facts, SIMD level, threads")
    sub.add_parser("bench", help="a quick matmul table against numpy")
    demo = sub.add_parser("demo", help="train on the built-in corpus, then generate (the default)")
    for p in (ap, demo):
        p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--block-size", type=int, default=64)
        p.add_argument("--n-layer", type=int, default=4)
        p.add_argument("--n-head", type=int, default=4)
        p.add_argument("--n-embd", type=int, default=128)
        p.add_argument("--learning-rate", type=float, default=2e-3)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--log-every", type=int, default=100)
        p.add_argument("--tokens", type=int, default=300, help="characters to generate")
        p.add_argument("--prompt", default="The ", help="text to continue")
    args = ap.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    try:
        return cmd_demo(args)
    except (ValueError, TypeError) as e:  # bad option values: one clear line, no traceback
        print(f"smallmind: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
