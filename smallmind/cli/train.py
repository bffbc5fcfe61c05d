"""train.py - `smallmind demo` and `smallmind train`: the corpus read from files, folders or the
built-in one, the progress line, Ctrl-C that saves and prints the command continuing the run, and
--resume, which continues the same run (its text, folder and options, recorded in the
checkpoint's metadata)."""
import dataclasses
import os
import shlex
import signal
import sys
import threading
import time
import warnings

import numpy as np

from .. import __version__, build_info
from ._common import MODEL_FLAGS, UserError, settings_for, shown

# ---- demo ---------------------------------------------------------------------------------------

def cmd_demo(args):
    """Train a small model on the built-in corpus, then generate from it."""
    from ..model.checkpoint import LAST_FILE, save_checkpoint
    from ..model.corpus import builtin_corpus
    from ..model.tokenizer import Tokenizer
    from ..model.training import Training
    from ..model.transformer import ModelConfig, TransformerModel

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
    from ..generation.sampling import Sampling
    model.eval()
    print("\n--- generated ---")
    print(args.prompt, end="", flush=True)
    # 0.7: more real words than 0.8 without the repetition of 0.6 (measured on 15 samples)
    for piece in Sampling(model, tok).stream(args.prompt, args.tokens, temperature=0.7,
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

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


def _read_corpus(paths):
    """(text, description, sources): the files given, every text file under the folders given
    (sorted, so the order is deterministic), or the built-in corpus when nothing is given.
    `sources` is what a checkpoint records to read the same text again: the files' absolute
    paths, or None for the built-in corpus."""
    if not paths:
        from ..model.corpus import builtin_corpus
        return (builtin_corpus(), "the built-in corpus (the Python standard library's "
                "documentation)", None)
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    if not files:
        raise UserError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {', '.join(paths)}")
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
    what = shown(files[0]) if len(files) == 1 else f"{len(files)} files"
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


def _cancel_on_sigint(source, also_sigterm=False):
    """Ctrl-C cancels `source` (training stops after the step in flight and saves) instead of
    raising KeyboardInterrupt at an arbitrary point; a second Ctrl-C interrupts at once.
    also_sigterm: SIGTERM too (under mpirun, which passes both on to every rank: the ranks then
    agree on the step to stop at)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    sigs = (signal.SIGINT, signal.SIGTERM) if also_sigterm else (signal.SIGINT,)
    previous = {sig: signal.getsignal(sig) for sig in sigs}

    def handler(signum, frame):
        if source.is_cancelled:
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        source.cancel("interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated")
        if sys.stdout is sys.__stdout__:        # rank 0 (or a plain run) says it once
            print("\nsmallmind: stopping after this step (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)

    for sig in sigs:
        signal.signal(sig, handler)

    def restore():
        for sig, h in previous.items():
            signal.signal(sig, h)
    return restore


# What a checkpoint written by `smallmind train` records of the run's options, so that
# `--resume` alone continues the same run (not threads: they belong to the machine; not
# checkpoint_dir: the run lives where its checkpoint is; not batch_size and seed: the
# checkpoint's training state has them).
_RUN_OPTIONS = ("steps", "learning_rate", "warmup_steps", "min_lr", "lr_decay_steps",
                "weight_decay", "beta1", "beta2", "eps", "grad_clip", "grad_accum_steps",
                "log_every", "eval_every", "eval_batches", "save_every")


def _claim_folder(folder, overwrite):
    """A new run must not overwrite another run's checkpoints without being told to: that would
    lose the other run without a word. With --overwrite, the old run's files go first (so no
    stale model_cancelled can be taken for this run's later)."""
    from ..model.checkpoint import BEST_FILE, CANCELLED_FILE, LAST_FILE
    found = [n for n in (LAST_FILE, CANCELLED_FILE, BEST_FILE)
             if os.path.isfile(os.path.join(folder, n))]
    if not found:
        return
    if not overwrite:
        raise UserError(f"{folder} already holds a run ({found[0]}): continue it with "
                        f"`smallmind train --resume {shlex.quote(folder)}`, or start this one in "
                        f"another --checkpoint-dir, or add --overwrite to replace it")
    for name in found:
        os.remove(os.path.join(folder, name))


def _new_run(args, comm=None):
    """(trainer, settings, description, path None) for a run that starts from scratch, or from
    the weights of --init."""
    from ..model.training import Training
    if args.new_data:
        raise UserError("--new-data goes with --resume (continuing a run on other text)")
    st = settings_for(args)
    t = st.training
    if t.steps < 1:
        raise UserError(f"--steps must be at least 1 for a new run (0 trains nothing), got {t.steps}")
    if args.init is not None:
        start = _init_model(args)               # checked before a folder is claimed
    if comm is None or comm.rank == 0:          # rank 0 owns the folder and writes the files
        _claim_folder(t.checkpoint_dir, args.overwrite)
    text, what, sources = _read_corpus(args.data)
    if args.init is not None:
        model, tok, origin = start
        described = f"fine-tuning {model} from {shown(origin)} on {len(text):,} characters of {what}"
    else:
        model, tok, described = _fresh_model(st, args, text, what)
    try:
        trainer = Training(model, tok, text, batch_size=t.batch_size, seed=t.seed,
                           block_size=args.block_size if args.init is not None else None,
                           metadata=_run_record(sources, t, args.init),
                           precision=args.precision or "float32", comm=comm)
    except BaseException:
        model.close()
        raise
    return trainer, st, described, None


def _fresh_model(st, args, text, what):
    """(model, tokenizer, description): the tokenizer the settings name, built from the text,
    and a model with random weights."""
    from ..model.bpe import BPETokenizer
    from ..model.tokenizer import Tokenizer
    from ..model.transformer import ModelConfig, TransformerModel
    m, t = st.model, st.training
    if m.tokenizer == "bpe":
        t0 = time.perf_counter()
        tok = BPETokenizer.train(text, m.vocab_size)
        learnt = (f"; a BPE vocabulary of {tok.vocab_size:,} ids learnt in "
                  f"{time.perf_counter() - t0:.2f} s")
        if tok.vocab_size < m.vocab_size:
            learnt += (f" (not {m.vocab_size:,}: no pair of tokens occurs twice more in the "
                       f"text)")
    else:
        if args.vocab_size is not None:
            raise UserError("--vocab-size is the size of a BPE vocabulary: it goes with "
                            "--tokenizer bpe (the character tokenizer has one id per character)")
        tok, learnt = Tokenizer(text), ""
    if m.preset:
        sizes = {k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd")
                 if getattr(args, k) is not None}
        cfg = ModelConfig.preset(m.preset, tok.vocab_size, seed=t.seed, **sizes)
    else:
        cfg = ModelConfig(tok.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd,
                          dropout=m.dropout, seed=t.seed)
    model = TransformerModel(cfg)
    return model, tok, f"training {model} on {len(text):,} characters of {what}{learnt}"


def _init_model(args):
    """(model in train mode, tokenizer, where) for --init: a Hugging Face GPT-2 folder or a
    smallmind checkpoint. Its sizes and tokenizer are the run's, so flags that would choose
    others are refused rather than ignored (--block-size may shorten the training windows)."""
    given = [f"--{k.replace('_', '-')}" for k in ("preset", "n_layer", "n_head", "n_embd",
                                                  "tokenizer", "vocab_size")
             if getattr(args, k) is not None]
    if given:
        raise UserError(f"{given[0]} does not go with --init: the model and its tokenizer come "
                        f"from {args.init}")
    if args.resume:
        raise UserError("--init starts a new run from a model's weights; --resume continues a "
                        "run (give one of them)")
    from .use import load_model
    model, tok, path = load_model(args.init, "--init")
    if model.dtype != "float32":
        model.close()
        raise UserError(f"--init {path} holds a quantized ({model.dtype}) inference model: it "
                        f"cannot train (start from the float32 model it was made from)")
    if args.block_size is not None and not 1 <= args.block_size <= model.config.block_size:
        model.close()
        raise UserError(f"--block-size {args.block_size} must be between 1 and the model's "
                        f"context, {model.config.block_size}")
    return model.train(), tok, path


def _run_record(sources, t, init=None):
    """The metadata `smallmind train` keeps in every checkpoint of a run."""
    record = {"command": "smallmind train", "data": sources,
              "options": {k: getattr(t, k) for k in _RUN_OPTIONS}}
    if init is not None:
        record["init"] = os.path.abspath(init)
    return record


def _resume(args, comm=None):
    """(trainer, settings, description, path) for --resume: the same run, continued - its data,
    its folder and its options unless flags say otherwise."""
    from ..config import check_training_option
    from ..errors import CheckpointError
    from ..model.checkpoint import find_checkpoint, read_checkpoint
    from ..model.training import Training, data_digest
    if args.overwrite:
        raise UserError("--overwrite is for a new run; it does not go with --resume")
    try:
        path = find_checkpoint(args.resume, latest=True)
    except CheckpointError as e:
        raise UserError(f"nothing to resume: {e}") from None
    ck = read_checkpoint(path)
    state = ck.training
    if state is None or ck.exp_avg is None or ck.tokenizer is None:
        raise UserError(f"{path} is a model-only checkpoint (no optimizer state or tokenizer): "
                        f"it can be generated from, not resumed")
    _check_same_model(args, ck, path)
    record = state.get("metadata") if isinstance(state.get("metadata"), dict) else {}
    hparams = state.get("hparams") if isinstance(state.get("hparams"), dict) else {}
    run = {k: hparams[k] for k in _RUN_OPTIONS if k in hparams}
    if isinstance(record.get("options"), dict):
        run.update({k: v for k, v in record["options"].items() if k in _RUN_OPTIONS})
    for name, value in run.items():
        # checked here, so a bad recorded value is reported as the file's, not as a flag's
        try:
            check_training_option(name, value)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: the run's recorded options are invalid ({e})") from None
    # The run lives where its checkpoint is: keep writing there unless told otherwise.
    run["checkpoint_dir"] = os.path.dirname(path) or "."
    st = settings_for(args, base={"training": run})

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
    trainer = Training.resume(ck, text, batch_size=args.batch_size, new_data=args.new_data,
                              precision=args.precision, comm=comm)
    trainer.metadata = _run_record(sources, t)
    return trainer, st, f"resuming {path} at step {trainer.step} of {t.steps}, on {what}", path


def _check_same_model(args, ck, path):
    """Model flags and --seed on --resume: the model and the run's random state come from the
    checkpoint, so a flag may only say what it already holds (a restart script that always
    passes the same command, with --resume added once a checkpoint exists, keeps working); one
    that says otherwise is refused rather than silently ignored."""
    from ..model.bpe import BPETokenizer
    from ..model.transformer import PRESETS
    wanted = {}
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
        wanted.update({k: v for k, v in PRESETS[args.preset].items()
                       if k in ("block_size", "n_layer", "n_head", "n_embd")})
    wanted.update({k: getattr(args, k) for k in MODEL_FLAGS[1:] if getattr(args, k) is not None})
    for name, value in wanted.items():
        if getattr(ck.config, name) != value:
            given = getattr(args, name) is not None           # else the preset said it
            flag = f"--{name.replace('_', '-')} {value}" if given else f"--preset {args.preset}"
            raise UserError(f"{flag} does not match the run being resumed ({path} has {name} "
                            f"{getattr(ck.config, name)}): the model comes from the checkpoint")
    if args.init is not None:
        raise UserError("--init starts a new run from a model's weights; --resume continues a "
                        "run (give one of them)")
    kind = "bpe" if isinstance(ck.tokenizer, BPETokenizer) else "char"
    if args.tokenizer is not None and args.tokenizer != kind:
        raise UserError(f"--tokenizer {args.tokenizer} does not match the run being resumed "
                        f"({path} has a {kind} tokenizer)")
    if args.vocab_size is not None and (kind != "bpe" or args.vocab_size != ck.tokenizer.vocab_size):
        raise UserError(f"--vocab-size {args.vocab_size} does not match the run being resumed "
                        f"({path} has a {kind} tokenizer of {ck.tokenizer.vocab_size} ids)")
    seed = (ck.training or {}).get("seed")
    if args.seed is not None and args.seed != seed:
        raise UserError(f"--seed {args.seed} does not match the run being resumed ({path} has "
                        f"seed {seed}): the run's random state comes from the checkpoint")


def _communicator():
    """The ranks when started by mpirun/mpiexec with more than one process, else None (and MPI
    is not loaded at all)."""
    from ..distributed import launched_by_mpi
    if launched_by_mpi() <= 1:
        return None
    from ..distributed import Communicator, DistributedError
    try:
        comm = Communicator()
    except DistributedError as e:
        raise UserError(str(e)) from None
    return comm if comm.size > 1 else None


def _set_up(args, comm):
    """_resume or _new_run; under MPI every rank learns whether every other one started, so a
    rank that cannot (a bad flag, a missing file) ends the job instead of leaving the others
    waiting for it."""
    if comm is None:
        return _resume(args) if args.resume else _new_run(args)
    error, result = None, None
    try:
        result = _resume(args, comm) if args.resume else _new_run(args, comm)
    except Exception as e:
        error = e
    if comm.any(error is not None, "starting"):
        if result is not None:
            result[0].model.close()
        if error is not None:
            raise error
        raise UserError("another rank could not start (its message says why)")
    return result


def cmd_train(args):
    from ..cancellation import CancellationTokenSource
    from ..errors import CancelledError
    from ..model.checkpoint import BEST_FILE, CANCELLED_FILE, LAST_FILE

    comm = _communicator()
    if comm is not None and comm.rank > 0:
        sys.stdout = open(os.devnull, "w")      # rank 0 speaks for the run
    trainer, st, description, resumed = _set_up(args, comm)
    t = st.training
    model = trainer.model
    if comm is not None:
        threads = t.threads if t.threads is not None else comm.default_threads()
        st = dataclasses.replace(st, training=dataclasses.replace(t, threads=threads))
        t = st.training
        description += (f"; {comm.size} ranks x {threads} thread{'s' if threads > 1 else ''} "
                        f"({comm.local_size} ranks on this machine)")
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
        print(f"smallmind {__version__}: {description}; checkpoints in {ckdir}", flush=True)
        source = CancellationTokenSource()
        restore = _cancel_on_sigint(source, also_sigterm=comm is not None)
        progress = _Progress(t.steps, t.log_every, start=trainer.step)
        try:
            # log_every=0: the progress line reports instead of log records
            run = dataclasses.replace(t, warmup_steps=min(t.warmup_steps, t.steps), log_every=0)
            hist = trainer.train(**run.train_arguments(), cancel=source.token, callback=progress)
        except CancelledError:
            progress.end()
            path = os.path.join(ckdir, CANCELLED_FILE)
            if comm is not None and comm.rank > 0:
                return 130
            print(f"smallmind: interrupted at step {trainer.step} of {t.steps}; saved {path}\n"
                  f"  continue with: smallmind train --resume {shlex.quote(path)}",
                  file=sys.stderr)
            return 130
        finally:
            restore()
        progress.end()
        png = _plot_losses(hist, ckdir) if comm is None or comm.rank == 0 else None
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
