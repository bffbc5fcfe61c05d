"""cli.py - the `smallmind` command (also `python -m smallmind`). With no subcommand it runs the
demo: train a small GPT on the built-in corpus (the standard library's own documentation), then
generate text from it. `train` trains on text files, a folder or the built-in corpus with a
progress line, checkpoints, Ctrl-C that saves and exits, and --resume; `generate` and `chat`
continue text from a checkpoint; `info` reports the build, `bench` times the core against numpy.

A mistake a user can make (a missing file, an empty corpus, a checkpoint that is not one, a bad
option value) prints one line, "smallmind: error: ...", and exits with status 2; never a
traceback. Ctrl-C exits with status 130.
"""
import argparse
import dataclasses
import os
import signal
import sys
import threading
import time

import numpy as np

from . import __version__, build_info
from .core import kernels

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
    if getattr(args, "config", None):
        from .config import load_settings
        settings = load_settings(None if args.config is True else args.config)
        print(f"# effective configuration ({' < '.join(settings.sources)})")
        print(settings.to_toml())
        return 0
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
        t_sm = _median_time(lambda a=a, b=b, c=c: kernels.matmul(a, b, out=c))
        time.sleep(0.3)
        t_np = _median_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c))
        fl = 2.0 * M * K * N
        print(f"{str((M, K, N)):>20s} {fl / t_sm / 1e9:18.1f} {fl / t_np / 1e9:14.1f} {t_np / t_sm:5.2f}x")
    _bench_generation()
    return 0


def _bench_generation():
    """Greedy generation with untrained weights: time to first token after a 64-token prompt
    and tokens/s over 256 new tokens, for two model sizes (bench/bench_generate.py has the full
    comparison with PyTorch)."""
    from .generation.sampling import Sampling
    from .model.tokenizer import Tokenizer
    from .model.transformer import ModelConfig, TransformerModel
    tok = Tokenizer("".join(chr(48 + i) for i in range(65)))
    prompt = "".join(chr(48 + (7 * i) % 65) for i in range(64))
    print(f"\n{'model (layers/heads/width)':>28s} {'params':>8s} {'first token ms':>15s} "
          f"{'tokens/s':>9s}")
    # the 4/4/128 shape of the benchmark tables (no preset has it) and the shakespeare-char preset
    shapes = {"4/4/128": ModelConfig(65, 128, 4, 4, 128),
              "shakespeare-char": ModelConfig.preset("shakespeare-char", 65, dropout=0.0)}
    for name, cfg in shapes.items():
        L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
        model = TransformerModel(cfg).eval()
        sampler = Sampling(model, tok)
        sampler.generate(prompt, 8, temperature=0)                # warm-up
        r = min((sampler.generate(prompt, 256, temperature=0, return_details=True)
                 for _ in range(3)), key=lambda r: r.elapsed_sec)
        label = name if name == f"{L}/{H}/{C}" else f"{name} ({L}/{H}/{C})"
        print(f"{label:>28s} {model.num_parameters() / 1e6:7.1f}M "
              f"{1e3 * r.time_to_first_token_sec:15.2f} {r.tokens_per_sec:9.0f}")
        model.dispose()


def cmd_demo(args):
    """Train a small model on the built-in corpus, then generate from it."""
    from .model.corpus import builtin_corpus
    from .model.tokenizer import Tokenizer
    from .model.training import Training
    from .model.transformer import ModelConfig, TransformerModel

    # Checked before the corpus is read and the model built: the demo ends by printing the
    # validation loss of its last step, which 0 steps do not have (an IndexError traceback).
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 for the demo, got {args.steps}")
    if args.tokens < 0:
        raise UserError(f"--tokens must be >= 0, got {args.tokens}")
    text = builtin_corpus()
    tok = Tokenizer(text)
    cfg = ModelConfig(tok.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd,
                      seed=args.seed)
    model = TransformerModel(cfg)
    print(f"smallmind {__version__}: training {model} on {len(text):,} characters of the "
          f"Python standard library's documentation ({build_info()['simd']}, "
          f"{build_info()['num_threads']} threads)")
    trainer = Training(model, tok, text, args.block_size, args.batch_size, seed=args.seed)

    progress = _Progress(args.steps, args.log_every)
    t0 = time.perf_counter()
    hist = trainer.train(args.steps, args.learning_rate, warmup_steps=min(100, args.steps // 10),
                         eval_every=args.steps, eval_batches=20, log_every=0, callback=progress,
                         checkpoint_dir=args.checkpoint_dir or None)
    progress.end()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s; validation loss "
          f"{hist.val_loss[-1]:.3f} (a uniform guess scores {np.log(tok.vocab_size):.3f})")
    from .generation.sampling import Sampling
    model.eval()
    print("\n--- generated ---")
    print(args.prompt, end="", flush=True)
    for piece in Sampling(model, tok).stream(args.prompt, args.tokens, temperature=0.8,
                                             top_k=20, seed=args.seed):
        print(piece, end="", flush=True)
    print()
    if args.checkpoint_dir:
        last = os.path.join(args.checkpoint_dir, "model_last.safetensors")
        print(f"\nsaved {last}; next: smallmind generate {last} --prompt 'def '  |  "
              f"smallmind serve {last}  (pip install \"smallmind[serve]\")")
    return 0


# ---- train / generate / chat ----------------------------------------------------------------------

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


class UserError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


def _read_corpus(paths):
    """The training text: the files given, every text file under the folders given (sorted, so
    the order is deterministic), or the built-in corpus when nothing is given."""
    if not paths:
        from .model.corpus import builtin_corpus
        return builtin_corpus(), "the built-in corpus (the Python standard library's documentation)"
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(_TEXT_SUFFIXES)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    if not files:
        raise UserError(f"no text files ({', '.join(_TEXT_SUFFIXES)}) under {', '.join(paths)}")
    parts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                parts.append(fh.read())
        except UnicodeDecodeError:
            raise UserError(f"{f} is not UTF-8 text") from None
    text = "\n".join(parts)
    if len(text.strip()) == 0:
        raise UserError("the corpus is empty")
    return text, f"{len(files)} file(s)"


class _Progress:
    """Training progress: a tqdm bar on a terminal when tqdm is installed (smallmind[progress]),
    else one line per update (rewritten in place on a terminal, appended otherwise)."""

    def __init__(self, total, every, stream=None):
        stream = sys.stdout if stream is None else stream
        self.total, self.every, self.stream = total, max(1, every), stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.val = None
        self.pending = False         # a terminal line not yet ended
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", file=stream, dynamic_ncols=True,
                                leave=True)
            except ImportError:
                pass

    def __call__(self, info):
        step = info["step"]
        if "val_loss" in info:
            self.val = info["val_loss"]
        if self.bar is not None:
            self.bar.n = step
            post = {"loss": f"{info['loss']:.3f}", "tok/s": f"{info['tokens_per_sec']:,.0f}"}
            if self.val is not None:
                post["val"] = f"{self.val:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
            return
        if step % self.every and step != self.total and "val_loss" not in info:
            return
        done = step / self.total if self.total else 1.0
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * int(20 * done)
        line = (f"[{bar:<20}] step {step}/{self.total} | loss {info['loss']:.3f}"
                + (f" | val {self.val:.3f}" if self.val is not None else "")
                + f" | {info['tokens_per_sec']:,.0f} tok/s | ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.pending = step != self.total
            if not self.pending:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.pending:
            self.stream.write("\n")
            self.stream.flush()
            self.pending = False


def _cancel_on_sigint(source):
    """Ctrl-C cancels `source` (training stops after the step in flight and saves) instead of
    raising KeyboardInterrupt at an arbitrary point; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if source.is_cancelled:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        source.cancel("interrupted (Ctrl-C)")
        print("\nsmallmind: stopping after this step (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def _settings(args):
    """The configuration: defaults < --config FILE < SMALLMIND_* < the flags given."""
    from .config import load_settings
    flags = {k: v for k, v in vars(args).items() if v is not None}
    model = {k: flags.get(k) for k in ("preset", "n_layer", "n_head", "n_embd", "block_size")}
    training = {k: flags.get(k) for k in ("steps", "batch_size", "learning_rate", "warmup_steps",
                                          "eval_every", "eval_batches", "save_every",
                                          "checkpoint_dir", "seed", "threads", "log_every")}
    inference = {k: flags.get(k) for k in ("max_tokens", "temperature", "top_k", "top_p",
                                           "seed", "stop", "window", "threads")}
    server = {k: flags.get(k) for k in ("host", "port", "max_concurrency", "queue_size", "timeout",
                                        "threads_per_request")}
    if args.command == "train":
        overrides = {"model": model, "training": training}
    elif args.command == "serve":
        overrides = {"server": server}
    else:
        overrides = {"inference": inference}
    return load_settings(getattr(args, "config", None), overrides=overrides)


def cmd_train(args):
    from .cancellation import CancellationTokenSource
    from .errors import CancelledError
    from .model.tokenizer import Tokenizer
    from .model.training import CANCELLED_FILE, LAST_FILE, Training
    from .model.transformer import ModelConfig, TransformerModel

    st = _settings(args)
    m, t = st.model, st.training
    text, what = _read_corpus(args.data)
    ckdir = t.checkpoint_dir
    if args.resume:
        path = args.resume
        if os.path.isdir(path):
            # The newer of the two: an old model_cancelled.safetensors must not win over a
            # model_last.safetensors written by a later run.
            found = [os.path.join(path, n) for n in (CANCELLED_FILE, LAST_FILE)
                     if os.path.isfile(os.path.join(path, n))]
            if found:
                path = max(found, key=os.path.getmtime)
        if not os.path.isfile(path):
            raise UserError(f"nothing to resume from: {args.resume}")
        trainer = Training.resume(path, text)
        model = trainer.model
        print(f"resuming {path} at step {trainer.step} of {t.steps}")
    else:
        tok = Tokenizer(text)
        if m.preset:
            sizes = {k: v for k, v in (("block_size", args.block_size), ("n_layer", args.n_layer),
                                       ("n_head", args.n_head), ("n_embd", args.n_embd)) if v}
            cfg = ModelConfig.preset(m.preset, tok.vocab_size, seed=t.seed, **sizes)
        else:
            cfg = ModelConfig(tok.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd,
                              dropout=m.dropout, seed=t.seed)
        model = TransformerModel(cfg)
        trainer = Training(model, tok, text, batch_size=t.batch_size, seed=t.seed)
    print(f"smallmind {__version__}: training {model} on {len(text):,} characters of {what}; "
          f"checkpoints in {ckdir}", flush=True)
    source = CancellationTokenSource()
    restore = _cancel_on_sigint(source)
    progress = _Progress(t.steps, t.log_every)
    try:
        # log_every=0: the progress line reports instead of log records
        run = dataclasses.replace(t, warmup_steps=min(t.warmup_steps, t.steps), log_every=0)
        hist = trainer.train(**run.train_arguments(), cancel=source.token, callback=progress)
    except CancelledError:
        progress.end()
        path = os.path.join(ckdir, CANCELLED_FILE)
        print(f"smallmind: interrupted at step {trainer.step}; saved {path}\n"
              f"  continue with: smallmind train --resume {path} --steps {t.steps}",
              file=sys.stderr)
        return 130
    finally:
        restore()
    progress.end()
    png = _plot_losses(hist, ckdir)
    last = hist.val_loss[-1] if hist.val_loss else float("nan")
    print(f"done: {trainer.step} steps, validation loss {last:.3f}; model in "
          f"{os.path.join(ckdir, LAST_FILE)} (best: model_best.safetensors)"
          + (f"; loss curve in {png}" if png else ""))
    return 0


def _plot_losses(hist, ckdir):
    """loss.png in the checkpoint folder when matplotlib is installed (smallmind[plot]), written
    atomically; None otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(hist.steps, hist.train_loss, label="train (per step)", linewidth=0.8)
    if hist.val_loss:
        ax.plot(hist.val_steps, hist.val_loss, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(ckdir, "loss.png")
    tmp = path + f".{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _load(path):
    from .model.checkpoint import load_checkpoint
    if not os.path.isfile(path):
        raise UserError(f"no such checkpoint: {path}")
    return load_checkpoint(path)


def _sampling(args):
    """(Sampling, its generate options) for generate / chat, from the settings."""
    from .generation.sampling import Sampling
    inf = _settings(args).inference
    model, tok = _load(args.checkpoint)
    if tok is None:
        raise UserError(f"{args.checkpoint} holds no tokenizer")
    kwargs = dict(max_new_tokens=inf.max_tokens, temperature=inf.temperature, top_k=inf.top_k,
                  top_p=inf.top_p, seed=inf.seed, stop=list(inf.stop) or None)
    return Sampling(model, tok, threads=inf.threads, window=inf.window), kwargs


def cmd_generate(args):
    sampler, kwargs = _sampling(args)
    sys.stdout.write(args.prompt)
    for piece in sampler.stream(args.prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from .generation.server import serve
    except ImportError:
        raise UserError('serve needs FastAPI and uvicorn: pip install "smallmind[serve]"') from None
    st = _settings(args)
    model, tok = _load(args.checkpoint)
    if tok is None:
        raise UserError(f"{args.checkpoint} holds no tokenizer")
    name = os.path.splitext(os.path.basename(args.checkpoint))[0]
    print(f"smallmind {__version__}: serving {model} on http://{st.server.host}:{st.server.port} "
          f"(max {st.server.max_concurrency} at once, {st.server.queue_size} queued)", flush=True)
    serve(model, tok, st.server, st.inference, model_name=name)
    return 0


def cmd_chat(args):
    """Read a line, continue it, repeat; an empty line, /quit or end of input ends."""
    sampler, kwargs = _sampling(args)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/quit"):
            return 0
        prompt = line.rstrip("\n")
        for piece in sampler.stream(prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error reported as "smallmind: error: ..." as the module
    docstring promises: a subcommand's own parser said "smallmind generate: error: ..."."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"smallmind: error: {message}\n")


def main(argv=None):
    ap = _Parser(prog="smallmind", description="smallmind: small GPT models on the CPU")
    ap.add_argument("--log-level", default=None, help="log the smallmind.* loggers at this level "
                    "(DEBUG, INFO, WARNING; default: off)")
    ap.add_argument("--log-json", action="store_true", help="log as one JSON object per line")
    sub = ap.add_subparsers(dest="command")
    info = sub.add_parser("info", help="version, build facts, SIMD level, threads")
    info.add_argument("--config", nargs="?", const=True, metavar="FILE",
                      help="print the effective configuration (defaults < FILE < environment)")
    sub.add_parser("bench", help="a quick matmul table against numpy and a generation table")
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
        p.add_argument("--checkpoint-dir", default="smallmind-demo",
                       help="where the demo's model is saved ('' for nowhere)")
    train = sub.add_parser("train", help="train on text files, a folder or the built-in corpus")
    train.add_argument("data", nargs="*", help="text files or folders (default: the built-in corpus)")
    train.add_argument("--config", metavar="FILE", help="a TOML file of options (see config.py)")
    train.add_argument("--preset", help="a model preset (tiny, small, medium, shakespeare-char, gpt2)")
    train.add_argument("--n-layer", type=int)
    train.add_argument("--n-head", type=int)
    train.add_argument("--n-embd", type=int)
    train.add_argument("--block-size", type=int, help="context length (default 64)")
    train.add_argument("--steps", type=int, help="optimizer steps in all (default 1000)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--warmup", type=int, dest="warmup_steps",
                       help="warm-up steps (default 100)")
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-batches", type=int)
    train.add_argument("--save-every", type=int)
    train.add_argument("--checkpoint-dir")
    train.add_argument("--resume", metavar="PATH", help="a checkpoint, or a checkpoint folder")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=int)
    train.add_argument("--log-every", type=int)
    for name, helptext in (("generate", "continue a prompt from a checkpoint (streamed)"),
                           ("chat", "an interactive loop: each line you type is continued")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="a .safetensors checkpoint written by train")
        p.add_argument("--config", metavar="FILE", help="a TOML file of options")
        if name == "generate":
            p.add_argument("--prompt", default="The ", help="text to continue")
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--top-p", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
        p.add_argument("--window", choices=("shift", "slide"))
        p.add_argument("--threads", type=int)
    serve = sub.add_parser("serve", help="an HTTP server for a checkpoint (needs smallmind[serve])")
    serve.add_argument("checkpoint", help="a .safetensors checkpoint written by train")
    serve.add_argument("--config", metavar="FILE", help="a TOML file of options")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--max-concurrency", type=int)
    serve.add_argument("--queue-size", type=int)
    serve.add_argument("--timeout", type=float)
    serve.add_argument("--threads-per-request", type=int)
    args = ap.parse_args(argv)
    if args.log_level or args.log_json:
        from .metrics import configure_logging
        try:
            configure_logging(args.log_level.upper() if args.log_level else "INFO", json=args.log_json)
        except ValueError as e:
            print(f"smallmind: error: --log-level: {e}", file=sys.stderr)
            return 2
    commands = {"info": cmd_info, "bench": cmd_bench, "train": cmd_train,
                "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}
    from .errors import SmallMindError
    try:
        return commands.get(args.command, cmd_demo)(args)
    except (UserError, SmallMindError, ValueError, TypeError, OSError) as e:
        # a mistake the user can fix: one clear line, no traceback
        print(f"smallmind: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        # a model or batch too big for this machine (--n-embd 65536, say) is a user mistake
        # too: numpy's "Unable to allocate ..." says how much was asked for
        print(f"smallmind: error: out of memory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsmallmind: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
