"""cli.py - the `smallmind` command (also `python -m smallmind`): `demo` (what a bare `smallmind`
runs: train a small GPT on the built-in corpus, then generate), `train`, `generate`, `chat`,
`serve`, `info` and `bench`. docs/cli.md is the user's guide to it.

What the user sees, by design:
- a mistake the user can fix (a missing file, an empty corpus, a checkpoint that is not one, a
  bad option value) prints one line, "smallmind: error: ...", and exits with status 2;
- anything else is a bug in smallmind: its traceback is printed with a line asking for a
  report, and the status is 1 (a bug must not look like the user's mistake);
- warnings print as one "smallmind: warning: ..." line; Ctrl-C exits with status 130 (`train`
  saves first and prints the command that continues the same run).
"""
import argparse
import dataclasses
import difflib
import logging
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
import traceback
import warnings

import numpy as np

from . import __version__, build_info
from .core import kernels

_SHAPES = [(4096, 128, 384), (4096, 512, 128), (1024, 1024, 1024), (1, 768, 2304)]


class UserError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


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


# ---- info / bench -------------------------------------------------------------------------------

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
        model.close()


# ---- demo ---------------------------------------------------------------------------------------

def cmd_demo(args):
    """Train a small model on the built-in corpus, then generate from it."""
    from .model.checkpoint import LAST_FILE, save_checkpoint
    from .model.corpus import builtin_corpus
    from .model.tokenizer import Tokenizer
    from .model.training import Training
    from .model.transformer import ModelConfig, TransformerModel

    # Checked before the corpus is read and the model built: the demo ends by printing the
    # validation loss of its last step, which 0 steps do not have.
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1 for the demo, got {args.steps}")
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
                         eval_every=args.steps, eval_batches=20, log_every=0, callback=progress)
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
    print("\n--- end ---")
    if args.checkpoint_dir:
        # The model alone (3 MB for the default): the optimizer state a resumable checkpoint
        # carries would triple it, and the demo's model is there to be generated from.
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        save_checkpoint(os.path.join(args.checkpoint_dir, LAST_FILE), model, tok)
        where = shlex.quote(args.checkpoint_dir)
        print(f"\nsaved the model in {args.checkpoint_dir}/; next:\n"
              f"  smallmind generate {where} --prompt 'def '\n"
              f"  smallmind chat {where}\n"
              f"  smallmind train --help          (train on your own text)")
    model.close()
    return 0


# ---- train --------------------------------------------------------------------------------------

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


def _read_corpus(paths):
    """(text, description, sources): the files given, every text file under the folders given
    (sorted, so the order is deterministic), or the built-in corpus when nothing is given.
    `sources` is what a checkpoint records to read the same text again: the files' absolute
    paths, or None for the built-in corpus."""
    if not paths:
        from .model.corpus import builtin_corpus
        return (builtin_corpus(), "the built-in corpus (the Python standard library's "
                "documentation)", None)
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
    what = files[0] if len(files) == 1 else f"{len(files)} files"
    return text, what, [os.path.abspath(f) for f in files]


class _Progress:
    """Training progress: a tqdm bar on a terminal when tqdm is installed (smallmind[progress]),
    else one line per update (rewritten in place on a terminal, appended otherwise)."""

    def __init__(self, total, every, stream=None, start=0):
        stream = sys.stdout if stream is None else stream
        self.total, self.every, self.stream = total, max(1, every), stream
        self.start = start              # the step a resumed run starts from (for the ETA)
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.val = None
        self.pending = False         # a terminal line not yet ended
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", file=stream,
                                dynamic_ncols=True, leave=True)
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
        span = self.total - self.start
        done = (step - self.start) / span if span > 0 else 1.0
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * int(20 * step / self.total) if self.total else "#" * 20
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


_MODEL_FLAGS = ("preset", "n_layer", "n_head", "n_embd", "block_size")
_TRAINING_FLAGS = ("steps", "batch_size", "learning_rate", "warmup_steps", "eval_every",
                   "eval_batches", "save_every", "checkpoint_dir", "seed", "threads", "log_every")
# What a checkpoint written by `smallmind train` records of the run's options, so that
# `--resume` alone continues the same run (not threads: they belong to the machine; not
# checkpoint_dir: the run lives where its checkpoint is; not batch_size and seed: the
# checkpoint's training state has them).
_RUN_OPTIONS = ("steps", "learning_rate", "warmup_steps", "min_lr", "lr_decay_steps",
                "weight_decay", "beta1", "beta2", "eps", "grad_clip", "grad_accum_steps",
                "log_every", "eval_every", "eval_batches", "save_every")


def _settings(args, base=None):
    """The configuration: defaults < `base` (a resumed run's own options) < --config FILE <
    SMALLMIND_* < the flags given."""
    from .config import load_settings
    flags = {k: v for k, v in vars(args).items() if v is not None}
    inference = {k: flags.get(k) for k in ("max_tokens", "temperature", "top_k", "top_p",
                                           "seed", "stop", "window", "threads")}
    server = {k: flags.get(k) for k in ("host", "port", "max_concurrency", "queue_size", "timeout",
                                        "threads_per_request")}
    if args.command == "train":
        overrides = {"model": {k: flags.get(k) for k in _MODEL_FLAGS},
                     "training": {k: flags.get(k) for k in _TRAINING_FLAGS}}
    elif args.command == "serve":
        overrides = {"server": server, "inference": {"threads": flags.get("threads")}}
    else:
        overrides = {"inference": inference}
    return load_settings(getattr(args, "config", None), overrides=overrides, base=base)


def _check_writable(folder):
    """Fail now, not at the first save after all the work, when checkpoints cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".smallmind-write-test.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write checkpoints to {folder}: {e.strerror or e}") from None


def _new_run(args):
    """(trainer, settings, description, path None) for a run that starts from scratch."""
    from .model.tokenizer import Tokenizer
    from .model.training import Training
    from .model.transformer import ModelConfig, TransformerModel
    if args.new_data:
        raise UserError("--new-data goes with --resume (continuing a run on other text)")
    st = _settings(args)
    m, t = st.model, st.training
    if t.steps < 1:
        raise UserError(f"--steps must be at least 1 for a new run (0 trains nothing), got {t.steps}")
    text, what, sources = _read_corpus(args.data)
    tok = Tokenizer(text)
    if m.preset:
        sizes = {k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd")
                 if getattr(args, k) is not None}
        cfg = ModelConfig.preset(m.preset, tok.vocab_size, seed=t.seed, **sizes)
    else:
        cfg = ModelConfig(tok.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd,
                          dropout=m.dropout, seed=t.seed)
    model = TransformerModel(cfg)
    try:
        trainer = Training(model, tok, text, batch_size=t.batch_size, seed=t.seed,
                           metadata=_run_record(sources, t))
    except BaseException:
        model.close()
        raise
    return trainer, st, f"training {model} on {len(text):,} characters of {what}", None


def _run_record(sources, t):
    """The metadata `smallmind train` keeps in every checkpoint of a run."""
    return {"command": "smallmind train", "data": sources,
            "options": {k: getattr(t, k) for k in _RUN_OPTIONS}}


def _resume(args):
    """(trainer, settings, description, path) for --resume: the same run, continued - its data,
    its folder and its options unless flags say otherwise."""
    from .errors import CheckpointError
    from .model.checkpoint import find_checkpoint, read_checkpoint
    from .model.training import Training, data_digest
    given = [k for k in _MODEL_FLAGS + ("seed",) if getattr(args, k) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} cannot be used with --resume: the model and the run's random "
                        f"state come from the checkpoint")
    try:
        path = find_checkpoint(args.resume, latest=True)
    except CheckpointError as e:
        raise UserError(f"nothing to resume: {e}") from None
    ck = read_checkpoint(path)
    state = ck.training
    if state is None or ck.exp_avg is None or ck.tokenizer is None:
        raise UserError(f"{path} is a model-only checkpoint (no optimizer state or tokenizer): "
                        f"it can be generated from, not resumed")
    record = state.get("metadata") if isinstance(state.get("metadata"), dict) else {}
    hparams = state.get("hparams") if isinstance(state.get("hparams"), dict) else {}
    run = {k: hparams[k] for k in _RUN_OPTIONS if k in hparams}
    if isinstance(record.get("options"), dict):
        run.update({k: v for k, v in record["options"].items() if k in _RUN_OPTIONS})
    # The run lives where its checkpoint is: keep writing there unless told otherwise.
    run["checkpoint_dir"] = os.path.dirname(path) or "."
    st = _settings(args, base={"training": run})

    if args.data:
        text, what, sources = _read_corpus(args.data)
    elif "data" in record:
        sources = record["data"]
        if sources is not None:
            if not isinstance(sources, list) or not all(isinstance(f, str) for f in sources):
                raise UserError(f"{path}: the recorded data sources are not a list of files")
            gone = [f for f in sources if not os.path.isfile(f)]
            if gone:
                raise UserError(f"the run's text is gone: {gone[0]} no longer exists (give the "
                                f"text to train on, and --new-data if it is not the run's)")
        text, what, _ = _read_corpus(sources)
        what = f"the run's text ({what})" if sources else what
    else:
        # A checkpoint that does not record its text (written by the library): the built-in
        # corpus if it is that, else the user must say.
        text, what, sources = _read_corpus(None)
        if data_digest(ck.tokenizer, text) != state.get("data") and not args.new_data:
            raise UserError(f"{path} does not record which text it was trained on, and it is not "
                            f"the built-in corpus: give the files (and --new-data if they are "
                            f"not the run's)")
    recorded = state.get("data")
    if recorded is not None and not args.new_data:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # unknown characters: the refusal says it all
            same = data_digest(ck.tokenizer, text) == recorded
        if not same:
            if args.data:
                raise UserError(f"{what} is not the text {path} was trained on; to continue "
                                f"this run on it (fine-tuning) add --new-data")
            raise UserError(f"the run's text has changed since {path} was written ({what}); "
                            f"to continue on it as it is now, add --new-data")
    t = st.training
    trainer = Training.resume(ck, text, batch_size=args.batch_size, new_data=args.new_data)
    trainer.metadata = _run_record(sources, t)
    return trainer, st, f"resuming {path} at step {trainer.step} of {t.steps}, on {what}", path


def cmd_train(args):
    from .cancellation import CancellationTokenSource
    from .errors import CancelledError
    from .model.checkpoint import BEST_FILE, CANCELLED_FILE, LAST_FILE

    trainer, st, description, resumed = _resume(args) if args.resume else _new_run(args)
    t = st.training
    model = trainer.model
    try:
        if resumed is not None and t.steps <= trainer.step:
            # Nothing to train: said in words, and no checkpoint is rewritten.
            if t.steps < trainer.step:
                raise UserError(f"--steps {t.steps} is behind the run: {resumed} is at step "
                                f"{trainer.step} already; give a total above {trainer.step} to "
                                f"train further")
            print(f"nothing to do: {resumed} is at step {trainer.step} of {t.steps} already "
                  f"(add --steps N, N > {trainer.step}, to train further)")
            return 0
        ckdir = t.checkpoint_dir
        _check_writable(ckdir)
        print(f"smallmind {__version__}: {description}; checkpoints in {ckdir}", flush=True)
        source = CancellationTokenSource()
        restore = _cancel_on_sigint(source)
        progress = _Progress(t.steps, t.log_every, start=trainer.step)
        try:
            # log_every=0: the progress line reports instead of log records
            run = dataclasses.replace(t, warmup_steps=min(t.warmup_steps, t.steps), log_every=0)
            hist = trainer.train(**run.train_arguments(), cancel=source.token, callback=progress)
        except CancelledError:
            progress.end()
            path = os.path.join(ckdir, CANCELLED_FILE)
            print(f"smallmind: interrupted at step {trainer.step} of {t.steps}; saved {path}\n"
                  f"  continue with: smallmind train --resume {shlex.quote(path)}",
                  file=sys.stderr)
            return 130
        finally:
            restore()
        progress.end()
        png = _plot_losses(hist, ckdir)
        if hist.val_loss:
            loss = f"validation loss {hist.val_loss[-1]:.3f}"
        else:
            loss = f"training loss {hist.train_loss[-1]:.3f} (not evaluated: --eval-every 0)"
        best = os.path.join(ckdir, BEST_FILE)
        print(f"done: step {trainer.step} of {t.steps} in {hist.elapsed_sec:.1f} s, {loss}\n"
              f"  latest model: {os.path.join(ckdir, LAST_FILE)}"
              + (f"\n  best model:   {best} (validation loss {trainer.best_val_loss:.3f})"
                 if os.path.isfile(best) and trainer.best_val_loss < float("inf") else "")
              + (f"\n  loss curve:   {png}" if png else "")
              + f"\n  next: smallmind generate {shlex.quote(ckdir)} --prompt 'The '")
        return 0
    finally:
        model.close()


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


# ---- generate / chat / serve --------------------------------------------------------------------

def _load(name):
    """(model, tokenizer, path) for the model a command names: a checkpoint file or a run's
    folder (its best model; checkpoint.find_checkpoint is the one rule)."""
    from .errors import CheckpointError
    from .model.checkpoint import find_checkpoint, load_checkpoint
    try:
        path = find_checkpoint(name)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model, tok = load_checkpoint(path)
    if tok is None:
        model.close()
        raise UserError(f"{path} holds no tokenizer (a model saved without one cannot turn "
                        f"text into tokens)")
    return model, tok, path


def _sampling(args):
    """(Sampling, its generate options, InferenceOptions, path) for generate / chat."""
    from .generation.sampling import Sampling
    inf = _settings(args).inference
    model, tok, path = _load(args.model)
    return Sampling(model, tok, threads=inf.threads, window=inf.window), _sample_kwargs(inf), inf, path


def _sample_kwargs(inf):
    return dict(max_new_tokens=inf.max_tokens, temperature=inf.temperature, top_k=inf.top_k,
                top_p=inf.top_p, seed=inf.seed, stop=list(inf.stop) or None)


def cmd_generate(args):
    sampler, kwargs, _, path = _sampling(args)
    if path != args.model:
        print(f"smallmind: generating from {path}", file=sys.stderr)
    try:
        sys.stdout.write(args.prompt)
        for piece in sampler.stream(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        sampler.model.close()
    return 0


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from .generation.server import serve
    except ImportError:
        raise UserError('serve needs FastAPI and uvicorn: pip install "smallmind[serve]" (from a '
                        'checkout: pip install ".[serve]")') from None
    st = _settings(args)
    model, tok, path = _load(args.model)
    name = os.path.basename(os.path.normpath(args.model))
    name = os.path.splitext(name)[0] if os.path.isfile(args.model) else name
    print(f"smallmind {__version__}: serving {path} ({model}) as {name!r} on "
          f"http://{st.server.host}:{st.server.port} (max {st.server.max_concurrency} at once, "
          f"{st.server.queue_size} queued); Ctrl-C stops", flush=True)
    serve(model, tok, st.server, st.inference, model_name=name)
    return 0


_CHAT_HELP = """commands:
  /help               this list
  /set NAME VALUE     change a setting: temperature, top_k, top_p, max_tokens, seed
  /settings           show the settings
  /quit               leave (also /exit, or Ctrl-D)
anything else is a prompt: the model continues it. Ctrl-C stops a reply."""


def cmd_chat(args):
    """Read a line, continue it, repeat, until /quit or end of input."""
    sampler, kwargs, inf, path = _sampling(args)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    try:
        if interactive:
            out.write(f"smallmind chat with {path} ({sampler.model.num_parameters() / 1e6:.1f}M "
                      f"parameters): each line you type is continued, up to {inf.max_tokens} "
                      f"tokens.\n/help lists commands; /quit or Ctrl-D leaves.\n")
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:                                   # end of input
                if interactive:
                    out.write("\nbye\n")
                return 0
            prompt = line.rstrip("\r\n")
            command = prompt.strip()
            if command in ("/quit", "/exit"):
                if interactive:
                    out.write("bye\n")
                return 0
            if not command:
                continue                                   # nothing to continue
            if command.startswith("/"):
                inf, kwargs = _chat_command(command, inf, kwargs, out)
                continue
            if not interactive:
                out.write(f"> {prompt}\n")                 # the transcript shows what was asked
            try:
                for piece in sampler.stream(prompt, **kwargs):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                out.write(" [stopped]")
            out.write("\n")
            out.flush()
    finally:
        sampler.model.close()


def _chat_command(command, inf, kwargs, out):
    """A /command of the chat loop: (new InferenceOptions, new generate options)."""
    from .errors import ValidationError
    words = command.split()
    if words[0] == "/help":
        out.write(_CHAT_HELP + "\n")
    elif words[0] == "/settings":
        out.write(", ".join(f"{k} {getattr(inf, k)}" for k in
                            ("temperature", "top_k", "top_p", "max_tokens", "seed")) + "\n")
    elif words[0] == "/set" and len(words) == 3 and words[1] in ("temperature", "top_k", "top_p",
                                                                  "max_tokens", "seed"):
        name, raw = words[1], words[2]
        try:
            value = float(raw) if name in ("temperature", "top_p") else int(raw)
            inf = dataclasses.replace(inf, **{name: value})
        except (ValueError, ValidationError) as e:
            out.write(f"cannot set {name} to {raw}: {e}\n")
        else:
            kwargs = _sample_kwargs(inf)
            out.write(f"{name} = {value}\n")
    elif words[0] == "/set":
        out.write("usage: /set NAME VALUE, NAME one of temperature, top_k, top_p, max_tokens, "
                  "seed\n")
    else:
        out.write(f"unknown command {words[0]}; /help lists the commands\n")
    out.flush()
    return inf, kwargs


# ---- the parser ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error reported as "smallmind: error: ..." after the usage of
    the (sub)command it is about."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"smallmind: error: {message}\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the examples; wider option column."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _default(section, name):
    """The default the command starts from for [section] name (for help texts)."""
    from .config import CLI_DEFAULTS, Settings
    value = CLI_DEFAULTS.get(section, {}).get(name)
    return getattr(getattr(Settings(), section), name) if value is None else value


_EXAMPLES = {
    "demo": """example:
  smallmind demo --steps 300 --prompt 'def '""",
    "train": """examples:
  smallmind train notes/ more.txt --preset tiny --steps 2000 --checkpoint-dir ck
  # Ctrl-C saves ck/model_cancelled.safetensors and prints the command that continues the run:
  smallmind train --resume ck/model_cancelled.safetensors
  smallmind train --resume ck --steps 3000          # the same run, longer
  smallmind train new.txt --resume ck --new-data    # fine-tune the run's model on other text

On --resume, the run's text, folder and options come from its checkpoint; flags given
override them. Options are read from (highest first): flags, SMALLMIND_TRAINING_* /
SMALLMIND_MODEL_* variables, --config FILE, the resumed run's own, the defaults shown.""",
    "generate": """examples:
  smallmind generate ck --prompt 'def ' --max-tokens 200
  smallmind generate ck/model_last.safetensors --temperature 0 --stop '\\n\\n'""",
    "chat": """example:
  smallmind chat ck --temperature 0.7
  echo 'The cat' | smallmind chat ck      # from a pipe: one prompt per line""",
    "serve": """example:
  smallmind serve ck --port 8000 --max-concurrency 4
  curl localhost:8000/v1/completions -d '{"prompt": "The ", "max_tokens": 20}'""",
    "info": """examples:
  smallmind info
  smallmind info --config smallmind.toml""",
    "bench": """example:
  smallmind bench          # bench/ in the source has the full comparisons with PyTorch""",
}

_MODEL_ARG = ("a checkpoint: a .safetensors file written by train, or a run's folder (its "
              "model_best, else the newest of model_last / model_cancelled)")
_CONFIG_HELP = ("a TOML file of options, in sections [model] [training] [inference] [server] "
                "(docs/cli.md lists them; `smallmind info --config FILE` shows the result)")


def _sub(sub, name, helptext, description):
    return sub.add_parser(name, help=helptext, description=textwrap.fill(description, 88),
                          epilog=_EXAMPLES[name], formatter_class=_Help)


def _build_parser():
    """(the top-level parser, {command: its parser})."""
    ap = _Parser(prog="smallmind", formatter_class=_Help,
                 description="smallmind: small GPT models trained and served on the CPU. "
                             "With no command, runs `demo`.",
                 epilog="examples:\n  smallmind                      # the demo\n"
                        "  smallmind train mytext.txt --steps 2000 --checkpoint-dir ck\n"
                        "  smallmind generate ck --prompt 'The '\n"
                        "  smallmind COMMAND --help         # a command's options")
    ap.add_argument("--version", action="version", version=f"smallmind {__version__}")
    ap.add_argument("--log-level", default=None, metavar="LEVEL",
                    help="log the smallmind.* loggers at LEVEL: DEBUG, INFO, WARNING "
                         "(default: warnings only, one line each)")
    ap.add_argument("--log-json", action="store_true",
                    help="log as one JSON object per line (default: plain lines)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}

    p = parsers["demo"] = _sub(sub, "demo", "train on the built-in corpus, then generate "
                               "(what a bare `smallmind` runs)",
                               "Train a small GPT on the built-in corpus (the Python standard "
                               "library's documentation, no download), then generate from it.")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: 800)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    p.add_argument("--block-size", type=int, default=64, help="context length (default: 64)")
    p.add_argument("--n-layer", type=int, default=4, help="transformer layers (default: 4)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--n-embd", type=int, default=128, help="model width (default: 128)")
    p.add_argument("--learning-rate", type=float, default=2e-3,
                   help="peak learning rate (default: 0.002)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--log-every", type=int, default=100,
                   help="steps between progress lines (default: 100)")
    p.add_argument("--tokens", type=int, default=300,
                   help="characters to generate (default: 300)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: 'The ')")
    p.add_argument("--checkpoint-dir", default="smallmind-demo",
                   help="where the trained model is saved, '' for nowhere "
                        "(default: smallmind-demo)")

    p = parsers["train"] = _sub(sub, "train", "train on text files, a folder or the built-in "
                                "corpus", "Train a GPT on your text, with a progress line, "
                                "evaluation, checkpoints, and Ctrl-C that saves.")
    p.add_argument("data", nargs="*", metavar="FILE_OR_FOLDER",
                   help=f"text files, or folders of them ({', '.join(_TEXT_SUFFIXES)}); "
                        f"default: the built-in corpus, or the resumed run's text")
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    g = p.add_argument_group("the model (a new run)")
    from .model.transformer import PRESETS
    g.add_argument("--preset", metavar="NAME",
                   help=f"a model preset: {', '.join(sorted(PRESETS))} (default: none, the "
                        f"sizes below)")
    g.add_argument("--n-layer", type=int, help=f"transformer layers (default: "
                   f"{_default('model', 'n_layer')})")
    g.add_argument("--n-head", type=int, help=f"attention heads (default: "
                   f"{_default('model', 'n_head')})")
    g.add_argument("--n-embd", type=int, help=f"model width, a multiple of --n-head (default: "
                   f"{_default('model', 'n_embd')})")
    g.add_argument("--block-size", type=int, help=f"context length in characters (default: "
                   f"{_default('model', 'block_size')})")
    g = p.add_argument_group("the run")
    g.add_argument("--steps", type=int, help=f"optimizer steps in all, counting those a resumed "
                   f"run has done (default: {_default('training', 'steps')})")
    g.add_argument("--batch-size", type=int, help=f"windows per step (default: "
                   f"{_default('training', 'batch_size')})")
    g.add_argument("--learning-rate", type=float, help=f"peak learning rate, reached after the "
                   f"warm-up, then a cosine to a tenth of it (default: "
                   f"{_default('training', 'learning_rate')})")
    g.add_argument("--warmup", type=int, dest="warmup_steps", help=f"warm-up steps (default: "
                   f"{_default('training', 'warmup_steps')})")
    g.add_argument("--eval-every", type=int, help=f"steps between evaluations on the held-out "
                   f"10%%, 0 for none (default: {_default('training', 'eval_every')})")
    g.add_argument("--eval-batches", type=int, help=f"batches per evaluation (default: "
                   f"{_default('training', 'eval_batches')})")
    g.add_argument("--save-every", type=int, help=f"steps between saves of model_last, 0 for "
                   f"the end only (default: {_default('training', 'save_every')})")
    g.add_argument("--checkpoint-dir", metavar="FOLDER", help=f"where checkpoints go (default: "
                   f"{_default('training', 'checkpoint_dir')}; on --resume the run's folder)")
    g.add_argument("--seed", type=int, help=f"random seed of the weights and batches (default: "
                   f"{_default('training', 'seed')})")
    g.add_argument("--threads", type=int, help="threads to use (default: all cores)")
    g.add_argument("--log-every", type=int, help=f"steps between progress lines (default: "
                   f"{_default('training', 'log_every')})")
    g = p.add_argument_group("continuing a run")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue the run of this checkpoint, or of the newest checkpoint in "
                        "this folder: its text, folder and options unless flags are given")
    g.add_argument("--new-data", action="store_true",
                   help="allow --resume on text other than the run's (fine-tuning; default: "
                        "refused, so a run is never continued on the wrong text by mistake)")

    for name, helptext, description in (
            ("generate", "continue a prompt from a checkpoint (streamed)",
             "Continue --prompt with a trained model, streamed to the terminal."),
            ("chat", "an interactive loop: each line you type is continued",
             "Each line you type is continued by the model (it completes text; it was not "
             "trained to answer). /help lists the commands.")):
        p = parsers[name] = _sub(sub, name, helptext, description)
        p.add_argument("model", metavar="CHECKPOINT", help=_MODEL_ARG)
        p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
        if name == "generate":
            p.add_argument("--prompt", default="The ", help="text to continue (default: 'The ')")
        _sampling_flags(p)
        p.add_argument("--threads", type=int, help="threads to use (default: all cores)")

    p = parsers["serve"] = _sub(sub, "serve", "an HTTP server for a checkpoint (needs "
                                "smallmind[serve])", "An HTTP server for a trained model "
                                "(docs/server.md lists the endpoints).")
    p.add_argument("model", metavar="CHECKPOINT", help=_MODEL_ARG)
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("--host", help=f"address to listen on (default: {_default('server', 'host')}; "
                   f"0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help=f"port (default: {_default('server', 'port')})")
    p.add_argument("--max-concurrency", type=int, help=f"generations at once (default: "
                   f"{_default('server', 'max_concurrency')})")
    p.add_argument("--queue-size", type=int, help=f"requests waiting beyond those, then HTTP "
                   f"429 (default: {_default('server', 'queue_size')})")
    p.add_argument("--timeout", type=float, help=f"seconds a request may take (default: "
                   f"{_default('server', 'timeout')})")
    p.add_argument("--threads-per-request", type=int, help="threads per generation (default: "
                   "cores / --max-concurrency)")

    p = parsers["info"] = _sub(sub, "info", "version, build facts, SIMD level, threads",
                               "The version, compiler, OpenMP, SIMD level and thread count.")
    p.add_argument("--config", nargs="?", const=True, metavar="FILE",
                   help="print the effective configuration instead (defaults < FILE < "
                        "environment)")
    parsers["bench"] = _sub(sub, "bench", "a quick matmul table and a generation table",
                            "Two quick tables: smallmind's matmul against numpy's "
                            "(GFLOP/s on four shapes), then greedy generation with untrained "
                            "weights (time to first token, tokens/s) for two model sizes.")
    for parser in parsers.values():           # "--steps N" reads better than "--steps STEPS"
        for action in parser._actions:
            if action.metavar is None and action.type in (int, float):
                action.metavar = "N" if action.type is int else "X"
    return ap, parsers


def _sampling_flags(p):
    p.add_argument("--max-tokens", type=int, help=f"tokens to generate (default: "
                   f"{_default('inference', 'max_tokens')})")
    p.add_argument("--temperature", type=float, help=f"randomness, 0 for the most likely token "
                   f"(default: {_default('inference', 'temperature')})")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, 0 for all "
                   f"(default: {_default('inference', 'top_k')})")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens that make "
                   f"up this probability (default: {_default('inference', 'top_p')})")
    p.add_argument("--seed", type=int, help="makes the sampling reproducible (default: none)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable; default: none)")
    p.add_argument("--window", choices=("shift", "slide"),
                   help="past the context length: keep the newer half and refill (shift), or "
                        f"move by one token (slide) (default: {_default('inference', 'window')})")


_GLOBAL_FLAGS = {"--log-json": 0, "--log-level": 1}     # flag -> values it takes


def _with_command(argv, commands):
    """argv with the command made explicit: `smallmind [--log-...] --steps 7` runs the demo with
    its options; an option put before a command (`smallmind --steps 7 train f`) is an error
    saying where it goes, never silently dropped."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in commands or a in ("-h", "--help", "--version"):
            return argv
        flag = a.split("=", 1)[0]
        if flag in _GLOBAL_FLAGS:
            i += 1 + (_GLOBAL_FLAGS[flag] if "=" not in a else 0)
            continue
        if not a.startswith("-"):
            if os.path.exists(a):
                raise UserError(f"{a!r} is not a command; to train on it: smallmind train {a}")
            return argv                   # argparse names the bad command and the choices
        later = next((x for x in argv[i + 1:] if x in commands), None)
        if later is not None:
            raise UserError(f"{a} goes after the command: smallmind {later} ... {a}")
        return argv[:i] + ["demo"] + argv[i:]
    return argv + ["demo"]


def _unrecognised(parser, extra):
    """The error for arguments a command does not take, with the nearest option it does."""
    options = [s for action in parser._actions for s in action.option_strings]
    first = extra[0].split("=", 1)[0]
    near = difflib.get_close_matches(first, options, n=1) if first.startswith("-") else []
    parser.error(f"unrecognized arguments: {' '.join(extra)}"
                 + (f" (did you mean {near[0]}?)" if near else ""))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command: one line in its own style, no source line."""
    print(f"smallmind: warning: {message}", file=sys.stderr if file is None else file)


class _WarningLines(logging.Handler):
    """Log records of WARNING and above from smallmind.* as "smallmind: warning: ..." lines,
    when the user has not asked for logging (--log-level)."""

    def emit(self, record):
        try:
            kind = "warning" if record.levelno < logging.ERROR else "error"
            sys.stderr.write(f"smallmind: {kind}: {record.getMessage()}\n")
        except Exception:
            self.handleError(record)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, parsers = _build_parser()
    try:
        argv = _with_command(argv, parsers)
    except UserError as e:
        ap.error(str(e))
    args, extra = ap.parse_known_args(argv)
    if extra:
        _unrecognised(parsers.get(args.command, ap), extra)
    logger = logging.getLogger("smallmind")
    handler = None
    if args.log_level or args.log_json:
        from .metrics import configure_logging
        try:
            configure_logging(args.log_level.upper() if args.log_level else "INFO", json=args.log_json)
        except ValueError as e:
            print(f"smallmind: error: --log-level: {e}", file=sys.stderr)
            return 2
    elif not logger.handlers:
        handler = _WarningLines(logging.WARNING)
        logger.addHandler(handler)
    commands = {"demo": cmd_demo, "info": cmd_info, "bench": cmd_bench, "train": cmd_train,
                "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}
    from .errors import SmallMindError
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return commands[args.command](args)
    except (UserError, SmallMindError) as e:
        # a mistake the user can fix: one clear line, no traceback
        print(f"smallmind: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system or the network said no (a read-only folder, a full disk, a port in
        # use): the user's to fix, said with the path it is about
        where = f"{e.filename}: " if e.filename else ""
        print(f"smallmind: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        # a model or batch too big for this machine (--n-embd 65536, say) is a user mistake
        # too: numpy's "Unable to allocate ..." says how much was asked for
        print(f"smallmind: error: out of memory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsmallmind: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Anything else is smallmind's bug, not the user's mistake: say so, with what a report
        # needs.
        traceback.print_exc()
        print(f"smallmind: internal error (a bug in smallmind {__version__}, not in what you "
              f"typed): please report it with the traceback above", file=sys.stderr)
        return 1
    finally:
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
