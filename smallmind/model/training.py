"""training.py - Training: the loop that fits a TransformerModel to a text (random windows of a
90/10 train/validation split, AdamW with warmup and cosine decay, gradient clipping and
accumulation, periodic evaluation, atomic checkpoints, cooperative cancellation).

Each micro-step is two C calls (forward with loss, backward) and each step one more (AdamW over
the whole parameter block), all without the GIL; Python only samples batches and keeps the
history. A checkpoint holds the optimizer moments and every random-generator state, so training
N steps equals training k, saving, resuming in a fresh process and training to N - bit for bit.

Thread safety: a Training object belongs to one thread at a time. Independent Training objects
(each with its own model) may run concurrently in separate threads; give each a `threads=`
budget so that together they do not oversubscribe the cores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from typing import Callable

import numpy as np

from .. import _faults
from .. import metrics as _metrics
from .. import safetensors as _safetensors
from .._validate import check_int, check_number
from ..cancellation import check_cancel
from ..config import TrainingOptions, check_training_option
from ..core import _core
from ..errors import CancelledError, CheckpointError, ValidationError
from .checkpoint import (
    BEST_FILE,
    CANCELLED_FILE,
    LAST_FILE,
    Checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .tokenizer import BaseTokenizer
from .transformer import TransformerModel

__all__ = ["Training", "History", "data_digest", "BEST_FILE", "LAST_FILE", "CANCELLED_FILE"]

logger = logging.getLogger("smallmind.training")


def data_digest(tokenizer: BaseTokenizer, text: str) -> str:
    """The identity of a training text as a checkpoint records it: the first 16 hex digits of
    the SHA-256 of its token ids under `tokenizer`."""
    return hashlib.sha256(tokenizer.encode_array(text).tobytes()).hexdigest()[:16]


@dataclasses.dataclass
class History:
    """What one `train()` call did. Per optimizer step: `steps` (1-based step numbers), the
    mean training loss of its batch, the learning rate used, the gradient norm before clipping
    and tokens/s. Per evaluation: `val_steps`, `val_loss`, `train_eval_loss` (the same number of
    batches from the training split). `skipped_steps` lists steps whose gradient was not
    finite (no update was made)."""
    steps: list = dataclasses.field(default_factory=list)
    train_loss: list = dataclasses.field(default_factory=list)
    lr: list = dataclasses.field(default_factory=list)
    grad_norm: list = dataclasses.field(default_factory=list)
    tokens_per_sec: list = dataclasses.field(default_factory=list)
    val_steps: list = dataclasses.field(default_factory=list)
    val_loss: list = dataclasses.field(default_factory=list)
    train_eval_loss: list = dataclasses.field(default_factory=list)
    skipped_steps: list = dataclasses.field(default_factory=list)
    best_val_loss: float = math.inf
    elapsed_sec: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __len__(self) -> int:
        return len(self.steps)


def _prepare_folder(folder: str) -> None:
    """Create the checkpoint folder and prove it can be written, before any work: a read-only
    or missing folder found at the first save would lose everything trained until then."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise ValidationError(f"checkpoint_dir {folder!r} cannot be written: "
                              f"{e.strerror or e}") from None


_D = TrainingOptions     # the defaults of train()'s options


def _as_communicator(comm):
    """None, a smallmind.distributed.Communicator, or an mpi4py communicator (wrapped)."""
    if comm is None:
        return None
    from ..distributed import Communicator
    if isinstance(comm, Communicator):
        return comm
    if hasattr(comm, "Get_rank") and hasattr(comm, "Ialltoallv"):
        return Communicator(comm)
    raise TypeError(f"comm must be a smallmind.distributed.Communicator or an mpi4py "
                    f"communicator, got {type(comm).__name__}")


def _split_seed(seed: int, offset: int) -> int:
    """The dropout seed of a rank's micro-batch that starts `offset` windows into a single
    process's micro-batch (a share boundary inside it): its own stream, not a copy of the
    micro-batch's first rows' masks."""
    h = hashlib.sha256(f"{seed}:{offset}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1
_MAX_STEP = 2 ** 62      # the largest step count TRAINING_RULES allows


def _trainable(ck: Checkpoint) -> None:
    if ck.quantization is not None:
        raise CheckpointError(f"{ck.path} holds a quantized ({ck.quantization['dtype']}) "
                              f"inference model: it cannot train (train from the float32 "
                              f"checkpoint it was made from)")


class Training:
    """Trains `model` on `text` encoded by `tokenizer`.

    block_size: context length of the training windows (default: the model's); batch_size:
    windows per micro-step; seed: the batch sampler's seed; val_fraction: the share of the text
    (its end) held out for validation (0 disables evaluation). metadata: a JSON-serialisable
    dict saved in every checkpoint and restored by resume() (the `smallmind train` command keeps
    the run's data sources and options there, so a resumed run is the same run).

    precision: "float32" (default) or "bf16", mixed precision: the linear layers' matrix
    products (forward and both gradients) take bf16 inputs and sum in float32, on Intel AMX
    tiles where the CPU has them (smallmind.core.kernels.bf16_backend() says "amx"); the weights
    (the float32 master copy AdamW updates), activations, attention, LayerNorm and the loss stay
    float32. Evaluation (estimate_loss) always runs in float32. Without AMX the bf16 products
    are computed by the float32 kernels on rounded inputs (same numbers, no speed-up; a warning
    says so).

    comm: a smallmind.distributed.Communicator (or an mpi4py communicator) for data-parallel
    training over MPI: each rank runs this same Training (same model, text and options, checked
    when train() starts), the global batch (batch_size x grad_accum_steps windows, drawn in the
    same order as one process draws them) is dealt out in contiguous shares, and the gradients
    are summed across ranks in rank order before clipping and AdamW. With one micro-batch per
    rank (grad_accum_steps == the number of ranks), N ranks give the losses and weights of one
    process with N micro-batches, bit for bit; otherwise the same up to float32 rounding (and
    bit for bit from run to run for a given N). Rank 0 writes the checkpoints; evaluation is
    split across the ranks. See docs/distributed.md.
    """

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, text: str,
                 block_size: int | None = None, batch_size: int = 16, seed: int = 42,
                 val_fraction: float = 0.1, metadata: dict | None = None,
                 precision: str = "float32", comm=None):
        if not isinstance(model, TransformerModel):
            raise TypeError(f"model must be a TransformerModel, got {type(model).__name__}")
        model.check_open()
        if model.dtype != "float32":
            raise ValidationError(f"training needs float32 weights; the model is quantized "
                                  f"({model.dtype}, for inference)")
        if not isinstance(tokenizer, BaseTokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer or a BPETokenizer, got "
                            f"{type(tokenizer).__name__}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValidationError(f"tokenizer has {tokenizer.vocab_size} symbols but the model's "
                                  f"vocab_size is {model.config.vocab_size}")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self.block_size = (model.config.block_size if block_size is None
                           else check_int(block_size, "block_size", 1, model.config.block_size))
        self.batch_size = check_training_option("batch_size", batch_size)
        self.seed = check_training_option("seed", seed)
        self.val_fraction = check_number(val_fraction, "val_fraction", 0.0, 0.5)
        if not isinstance(precision, str) or precision not in _core.PRECISIONS:
            raise ValidationError(f"precision must be one of {_core.PRECISIONS}, got {precision!r}")
        if precision == "bf16" and _core.bf16_backend() != "amx":
            warnings.warn("precision='bf16': this CPU (or the SIMD level set) has no Intel AMX, "
                          "so the bf16 products run on the float32 kernels: the same arithmetic, "
                          "no speed-up", RuntimeWarning, stacklevel=2)
        self.precision = precision
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValidationError(f"metadata must be JSON-serialisable: {e}") from None
        self.metadata = dict(metadata or {})
        self.model = model
        self.tokenizer = tokenizer
        self.comm = _as_communicator(comm)
        self._grad_scratch: np.ndarray | None = None    # micro-batches after the first

        tokens = tokenizer.encode_array(text)
        n_val = int(len(tokens) * self.val_fraction)
        self._train_tokens = tokens[:len(tokens) - n_val]
        self._val_tokens = tokens[len(tokens) - n_val:]
        need = self.block_size + 1
        if len(self._train_tokens) < need:
            raise ValidationError(f"text is too short: the training split has "
                                  f"{len(self._train_tokens)} tokens, block_size + 1 = {need} needed")
        if self.val_fraction > 0 and len(self._val_tokens) < need:
            raise ValidationError(f"text is too short for val_fraction={self.val_fraction}: the "
                                  f"validation split has {len(self._val_tokens)} tokens, "
                                  f"block_size + 1 = {need} needed (lower block_size or set "
                                  f"val_fraction=0)")
        self._data_digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]

        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.step = 0                   # optimizer steps taken so far (including skipped ones)
        self._adam_t = 0                # updates actually applied (AdamW bias correction)
        self.best_val_loss = math.inf
        self._m = model.layout.new_block()      # AdamW moments, in the parameters' layout
        self._v = model.layout.new_block()

    # ---- data ----------------------------------------------------------------------------------

    def _windows(self, tokens: np.ndarray, rng: np.random.Generator, batch: int):
        T = self.block_size
        ix = rng.integers(0, len(tokens) - T, size=batch)
        rows = ix[:, None] + np.arange(T + 1)
        w = tokens[rows]                                  # (B, T+1)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def get_batch(self, split: str = "train"):
        """A (x, y) pair of int32 (batch_size, block_size) arrays from `split` ("train" or
        "val"); y is x shifted by one token. Draws from the training sampler's generator."""
        tokens = self._split(split)
        return self._windows(tokens, self._rng, self.batch_size)

    def _split(self, split: str) -> np.ndarray:
        if split == "train":
            return self._train_tokens
        if split == "val":
            if len(self._val_tokens) <= self.block_size:
                raise ValidationError("there is no validation split (val_fraction=0)")
            return self._val_tokens
        raise ValidationError(f"split must be 'train' or 'val', got {split!r}")

    def estimate_loss(self, eval_batches: int = 20, threads: int | None = None) -> dict:
        """Mean loss over eval_batches random batches of each split, in eval mode (no dropout).
        The batches depend only on the seed and the current step, never on the training
        sampler, so evaluating does not change what training sees."""
        eval_batches = check_training_option("eval_batches", eval_batches)
        out = {}
        model = self.model
        comm = self.comm
        for split in ("train", "val"):
            if split == "val" and self.val_fraction == 0:
                continue
            rng = np.random.Generator(np.random.PCG64([self.seed, 1 + (split == "val"), self.step]))
            tokens = self._split(split)
            losses = []
            for i in range(eval_batches):
                # every rank draws every batch (cheap), so the batches do not depend on the
                # rank count; each evaluates its own share, batch i on rank i % size
                x, y = self._windows(tokens, rng, self.batch_size)
                if comm is None or i % comm.size == comm.rank:
                    loss, _ = _core.gpt_forward(model.flat_params, model.core_config, x, y,
                                                threads=threads)
                    losses.append(loss)
            if comm is not None:
                parts = comm.allgather_floats(losses, "evaluating")
                losses = [float(parts[i % comm.size][i // comm.size]) for i in range(eval_batches)]
            total = 0.0
            for loss in losses:                  # in batch order, whatever the rank count
                total += loss
            out[split] = total / eval_batches
        return out

    # ---- schedule ------------------------------------------------------------------------------

    @staticmethod
    def lr_at(step: int, learning_rate: float, warmup_steps: int, decay_steps: int,
              min_lr: float) -> float:
        """Learning rate of 0-based step `step`: linear warmup over warmup_steps, then cosine
        decay to min_lr at decay_steps, then min_lr."""
        if step < warmup_steps:
            return learning_rate * (step + 1) / (warmup_steps + 1)
        if step >= decay_steps:
            return min_lr
        ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    # ---- the loop ------------------------------------------------------------------------------

    def train(self, steps: int, learning_rate: float = _D.learning_rate, *,
              warmup_steps: int = _D.warmup_steps, min_lr: float | None = None,
              lr_decay_steps: int | None = None, weight_decay: float = _D.weight_decay,
              beta1: float = _D.beta1, beta2: float = _D.beta2, eps: float = _D.eps,
              grad_clip: float = _D.grad_clip, grad_accum_steps: int = _D.grad_accum_steps,
              log_every: int = _D.log_every, eval_every: int = _D.eval_every,
              eval_batches: int = _D.eval_batches, save_every: int = _D.save_every,
              checkpoint_dir=None, cancel=None, callback: Callable[[dict], object] | None = None,
              threads: int | None = None) -> History:
        """Train until `steps` optimizer steps have been taken in all (a Training resumed at
        step k runs steps - k more) and return this call's History.

        The learning rate warms up linearly over warmup_steps, then follows a cosine from
        learning_rate down to min_lr (default learning_rate / 10) at lr_decay_steps (default
        `steps`). AdamW's weight decay applies to the weight matrices only (not to biases,
        LayerNorm parameters or embeddings). grad_clip > 0 clips the global gradient norm; a
        step whose gradient is not finite is skipped (logged, recorded in skipped_steps).
        grad_accum_steps micro-batches are averaged per step. Every eval_every steps (and at
        the last step) the loss of eval_batches batches of each split is measured; with a
        checkpoint_dir the best model by validation loss is kept in model_best.safetensors,
        and model_last.safetensors is written every save_every steps and at the end.

        cancel (a CancellationToken, CancellationTokenSource or threading.Event) is checked
        between steps and micro-steps: the model keeps the parameters of the last completed
        step, model_cancelled.safetensors is written to checkpoint_dir (when given), and
        CancelledError is raised. callback(info) is called after every step with a dict of
        step, loss, lr, grad_norm, tokens_per_sec (and val_loss/train_eval_loss when
        evaluated). Log lines go to logging.getLogger("smallmind.training").

        The options and their rules are config.TrainingOptions' (one definition, shared with
        the command line and settings files); a bad one raises TypeError / ValidationError
        naming it, before anything changes.
        """
        opts = TrainingOptions(
            steps=steps, batch_size=self.batch_size, seed=self.seed, learning_rate=learning_rate,
            warmup_steps=warmup_steps, min_lr=min_lr, lr_decay_steps=lr_decay_steps,
            weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, grad_clip=grad_clip,
            grad_accum_steps=grad_accum_steps, log_every=log_every, eval_every=eval_every,
            eval_batches=eval_batches, save_every=save_every, checkpoint_dir=checkpoint_dir,
            threads=threads)
        steps, lr0, warmup_steps = opts.steps, opts.learning_rate, opts.warmup_steps
        min_lr, decay_steps = opts.effective_min_lr, opts.effective_lr_decay_steps
        weight_decay, beta1, beta2, eps = opts.weight_decay, opts.beta1, opts.beta2, opts.eps
        grad_clip, accum, log_every = opts.grad_clip, opts.grad_accum_steps, opts.log_every
        eval_every, eval_batches, save_every = opts.eval_every, opts.eval_batches, opts.save_every
        checkpoint_dir, threads = opts.checkpoint_dir, opts.threads
        if eval_every and self.val_fraction == 0:
            raise ValidationError("eval_every needs a validation split (val_fraction > 0)")
        comm = self.comm
        if comm is not None and self.batch_size * accum < comm.size:
            raise ValidationError(f"the global batch (batch_size {self.batch_size} x "
                                  f"grad_accum_steps {accum}) has fewer windows than the "
                                  f"{comm.size} ranks: every rank needs at least one")
        if comm is None or comm.rank == 0:
            if checkpoint_dir is not None:
                _prepare_folder(checkpoint_dir)
                # Half-written files of an earlier run that was killed mid-save (never loaded:
                # they are hidden temporaries until renamed) would otherwise pile up.
                for name in _safetensors.remove_stale_temporaries(checkpoint_dir):
                    logger.info("removed %s, left by a run killed while saving", name)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        is_cancelled = check_cancel(cancel)

        model = self.model
        model.check_open()
        if comm is not None:
            if threads is None:
                threads = comm.default_threads()     # the cores shared among this node's ranks
            comm.check_same(self._run_identity(opts), "the run (model, data, options, state)")
        hist = History(best_val_loss=self.best_val_loss)
        # What the checkpoint records of this call: the schedule and optimizer (needed to
        # continue it), and the run's length and evaluation (so a resumed run is the same run).
        hparams = dict(learning_rate=lr0, warmup_steps=warmup_steps, min_lr=min_lr,
                       lr_decay_steps=decay_steps, weight_decay=weight_decay, beta1=beta1,
                       beta2=beta2, eps=eps, grad_clip=grad_clip, grad_accum_steps=accum,
                       steps=steps, eval_every=eval_every, eval_batches=eval_batches,
                       save_every=save_every)
        was_training = model.training
        model.train()
        tokens_per_step = self.batch_size * self.block_size * accum
        t_start = time.perf_counter()
        logger.info("training %s from step %d to %d (%d tokens per step)", model, self.step,
                    steps, tokens_per_step)
        try:
            while self.step < steps:
                # Snapshot of the resumable state before this step: a cancel inside it saves
                # this, so resuming replays the interrupted step exactly.
                snapshot = self._training_state(hparams)
                stop = is_cancelled()
                if comm is not None:     # every rank stops at the same step, or none does
                    stop = comm.any(stop, "agreeing whether to stop")
                if stop:
                    self._cancelled(checkpoint_dir, snapshot, hist)
                t0 = time.perf_counter()
                lr = self.lr_at(self.step, lr0, warmup_steps, decay_steps, min_lr)
                if comm is None:
                    loss = self._local_step(accum, threads, is_cancelled, checkpoint_dir,
                                            snapshot, hist)
                else:
                    reduced = comm.reduce_seconds
                    loss = self._distributed_step(accum, threads)
                if grad_clip > 0:
                    norm = _core.clip_grad_norm(model.flat_grads, grad_clip, threads)
                else:
                    norm = _core.grad_norm(model.flat_grads, threads)
                self.step += 1
                if math.isfinite(norm) and math.isfinite(loss):
                    self._adam_t += 1
                    _core.gpt_adamw(model.flat_params, self._m, self._v, model.flat_grads,
                                    model.core_config, lr,
                                    beta1, beta2, eps, weight_decay, self._adam_t, threads)
                else:
                    hist.skipped_steps.append(self.step)
                    logger.warning("step %d: non-finite loss or gradient (loss %s, norm %s); "
                                   "update skipped", self.step, loss, norm)
                dt = time.perf_counter() - t0
                hist.steps.append(self.step)
                hist.train_loss.append(loss)
                hist.lr.append(lr)
                hist.grad_norm.append(norm)
                hist.tokens_per_sec.append(tokens_per_step / dt if dt > 0 else math.inf)
                info = {"step": self.step, "steps": steps, "loss": loss, "lr": lr,
                        "grad_norm": norm, "tokens_per_sec": hist.tokens_per_sec[-1]}
                if comm is not None:
                    info["allreduce_sec"] = comm.reduce_seconds - reduced
                if log_every and (self.step % log_every == 0 or self.step == steps):
                    logger.info("step %d/%d: loss %.4f, lr %.3g, %.0f tokens/s", self.step, steps,
                                loss, lr, hist.tokens_per_sec[-1])
                if eval_every and (self.step % eval_every == 0 or self.step == steps):
                    self._evaluate(eval_batches, threads, hist, info, checkpoint_dir, hparams)
                if save_every and self.step % save_every == 0:
                    self.save_checkpoint(os.path.join(checkpoint_dir, LAST_FILE), hparams)
                _metrics.record_training_step(info)
                if callback is not None:
                    callback(info)
            if checkpoint_dir is not None and hist.steps:
                # (a call with nothing to do - steps at or below the current step - rewrites
                # no checkpoint)
                self.save_checkpoint(os.path.join(checkpoint_dir, LAST_FILE), hparams)
        finally:
            model.train(was_training)
            hist.elapsed_sec = time.perf_counter() - t_start
        return hist

    # ---- one step's gradient --------------------------------------------------------------

    def _backward(self, first: bool, scale: float, threads) -> None:
        """The gradient of the last forward, times `scale`, added to the step's: the first
        micro-batch's straight into the (zeroed) gradient block, each later one into a scratch
        block and then added, so the step's gradient is ((g0 + g1) + g2) + ... - the order
        the ranks of a distributed run sum theirs in."""
        model = self.model
        if first:
            model.backward(loss_scale=scale, threads=threads)
            return
        if self._grad_scratch is None:
            self._grad_scratch = model.layout.new_block()
        else:
            self._grad_scratch.fill(0.0)
        model.backward(loss_scale=scale, threads=threads, into=self._grad_scratch)
        np.add(model.flat_grads, self._grad_scratch, out=model.flat_grads)

    def _local_step(self, accum, threads, is_cancelled, checkpoint_dir, snapshot, hist) -> float:
        """One process: accum micro-batches of batch_size windows; returns the mean loss."""
        model = self.model
        model.zero_grad()
        loss_sum = 0.0
        for micro in range(accum):
            if micro and is_cancelled():
                model.zero_grad()
                self._cancelled(checkpoint_dir, snapshot, hist)
            x, y = self._windows(self._train_tokens, self._rng, self.batch_size)
            loss_sum += model.train_forward(x, y, None, threads, self.precision)
            self._backward(micro == 0, 1.0 / accum, threads)
        return loss_sum / accum

    def _distributed_step(self, accum, threads) -> float:
        """This rank's share of the global batch, the gradients summed over the ranks; returns
        the global batch's mean loss (the same on every rank)."""
        from ..distributed import split_range
        comm, model, bs = self.comm, self.model, self.batch_size
        G = bs * accum
        # Every rank draws the whole global batch and every micro-batch's dropout seed, in the
        # order one process draws them: the data order does not depend on the rank count.
        batches = [self._windows(self._train_tokens, self._rng, bs) for _ in range(accum)]
        seeds = [model.next_dropout_seed() for _ in range(accum)]
        X = np.concatenate([b[0] for b in batches])
        Y = np.concatenate([b[1] for b in batches])
        w0, w1 = split_range(G, comm.size, comm.rank)
        model.zero_grad()
        pieces: list[float] = []
        a = w0
        while a < w1:
            # micro-batches never cross a single process's micro-batch boundary, so a rank
            # whose share is whole micro-batches computes exactly what one process would
            b = min(w1, (a // bs + 1) * bs)
            seed = seeds[a // bs]
            if seed is not None and a % bs:
                seed = _split_seed(seed, a % bs)
            loss = model.train_forward(X[a:b], Y[a:b], None, threads, self.precision,
                                       dropout_seed=seed)
            self._backward(a == w0, (b - a) / G, threads)
            pieces += [a, b, loss]
            a = b
        comm.allreduce_sum(model.flat_grads)
        every = np.concatenate(comm.allgather_floats(pieces, "sharing losses")).reshape(-1, 3)
        every = every[np.argsort(every[:, 0], kind="stable")]
        total = 0.0
        if all(b - a == bs and a % bs == 0 for a, b, _ in every):
            for loss in every[:, 2]:             # as _local_step adds them
                total += float(loss)
            return total / accum
        for a, b, loss in every:
            total += float(loss) * (b - a)
        return total / G

    def _run_identity(self, opts) -> dict:
        """What must be equal on every rank of a distributed run (compared by check_same)."""
        def digest(block):
            return hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()[:16]
        from .. import __version__
        return {"smallmind": __version__, "model": repr(self.model.config),
                "tokenizer": digest(np.frombuffer(self.tokenizer.to_json().encode(), np.uint8)),
                "data": self._data_digest, "block_size": self.block_size,
                "batch_size": self.batch_size, "seed": self.seed,
                "val_fraction": self.val_fraction, "precision": self.precision,
                "step": self.step, "sampler": self._rng.bit_generator.state,
                "dropout": self.model.dropout_rng_state, "parameters": digest(self.model.flat_params),
                "optimizer": digest(self._m) + digest(self._v),
                "options": {k: v for k, v in dataclasses.asdict(opts).items()
                            if k not in ("threads", "log_every")}}

    def _evaluate(self, eval_batches, threads, hist, info, checkpoint_dir, hparams):
        losses = self.estimate_loss(eval_batches, threads)
        hist.val_steps.append(self.step)
        hist.val_loss.append(losses["val"])
        hist.train_eval_loss.append(losses["train"])
        info["val_loss"] = losses["val"]
        info["train_eval_loss"] = losses["train"]
        logger.info("step %d: train loss %.4f, val loss %.4f", self.step, losses["train"],
                    losses["val"])
        if losses["val"] < self.best_val_loss:
            # The bookkeeping follows the disk: if model_best cannot be written (a full disk),
            # the best loss stays where the files say it is, and a later evaluation tries again.
            if checkpoint_dir is not None:
                state = self._training_state(hparams)
                state["best_val_loss"] = losses["val"]
                self._save(os.path.join(checkpoint_dir, BEST_FILE), state)
            self.best_val_loss = losses["val"]
            hist.best_val_loss = self.best_val_loss

    def _cancelled(self, checkpoint_dir, snapshot, hist):
        """Stop: the parameters are those of the last completed step; save and raise."""
        if checkpoint_dir is not None:
            path = os.path.join(checkpoint_dir, CANCELLED_FILE)
            self._save(path, snapshot)
            logger.info("training cancelled at step %d; saved %s", self.step, path)
            raise CancelledError(f"training cancelled at step {self.step}; checkpoint saved to {path}")
        logger.info("training cancelled at step %d", self.step)
        raise CancelledError(f"training cancelled at step {self.step}")

    # ---- checkpoints ---------------------------------------------------------------------------

    def _training_state(self, hparams: dict | None = None) -> dict:
        return {"step": self.step, "adam_t": self._adam_t, "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size,
                "val_fraction": self.val_fraction, "precision": self.precision,
                "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                "rng": self._rng.bit_generator.state,
                "dropout_rng": self.model.dropout_rng_state,
                "data": self._data_digest, "hparams": hparams or {}, "metadata": self.metadata}

    def _save(self, path, state: dict) -> None:
        comm = self.comm
        if comm is None:
            self._write(path, state)
            return
        # Rank 0 writes (every rank holds the same state); all learn whether it worked.
        error = None
        if comm.rank == 0:
            try:
                self._write(path, state)
            except Exception as e:
                error = e
        if comm.any(error is not None, f"saving {path}"):
            if error is not None:
                raise error
            from ..distributed import DistributedError
            raise DistributedError(f"rank 0 could not write {path} (its error is on rank 0's "
                                   f"output)")

    def _write(self, path, state: dict) -> None:
        with self.model.exclusive():
            save_checkpoint(path, self.model, self.tokenizer, training=state,
                            optimizer=(self._m, self._v))

    def save_checkpoint(self, path, hparams: dict | None = None) -> None:
        """Write model, tokenizer, optimizer moments, step and generator states to `path`."""
        self._save(path, self._training_state(hparams))

    @property
    def data_digest(self) -> str:
        """This Training's text identity (see data_digest()); checkpoints record it."""
        return self._data_digest

    def restore(self, source, *, new_data: bool = False) -> None:
        """Load a training checkpoint (a path, a run's folder or a read Checkpoint) into this
        Training and its model: parameters, optimizer moments, step, generator states and
        metadata. The checkpoint must be for the same model configuration and tokenizer
        (CheckpointError otherwise), and for the same text: continuing on other text
        (fine-tuning) needs new_data=True (ValidationError naming `text` otherwise)."""
        ck = source if isinstance(source, Checkpoint) else read_checkpoint(source, latest=True)
        _trainable(ck)
        if ck.config != self.model.config:
            raise CheckpointError(f"{ck.path}: the checkpoint is for {ck.config}, not this "
                                  f"model's {self.model.config}")
        if ck.tokenizer is not None and ck.tokenizer != self.tokenizer:
            raise CheckpointError(f"{ck.path}: the checkpoint's tokenizer differs from this one")
        t = ck.training
        if t is None or ck.exp_avg is None or ck.exp_avg_sq is None:
            raise CheckpointError(f"{ck.path}: no training state (a model-only checkpoint)")
        try:
            # JSON integers within the counters' range: 10**30, 1e308, 3.5 or "7" are not steps
            step = check_int(t["step"], "step", 0, _MAX_STEP)
            adam_t = check_int(t["adam_t"], "adam_t", 0, _MAX_STEP)
            rng_state, drop_state = t["rng"], t["dropout_rng"]
            metadata = t.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise TypeError("metadata is not an object")
            best = t.get("best_val_loss")
            # converted here, inside the check: "abc" raised ValueError below, after the
            # parameters, moments and step had already been replaced
            best = math.inf if best is None else float(best)
            if math.isnan(best) or best == -math.inf:
                raise ValueError(f"best_val_loss {best}")
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = rng_state
            # checked now (a malformed state raises here, before anything changes)
            np.random.Generator(np.random.PCG64()).bit_generator.state = drop_state
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            # OverflowError: a huge float (1e400 reads as inf) or a negative generator state
            raise CheckpointError(f"{ck.path}: invalid training state ({e!r})") from None
        if adam_t > step:
            raise CheckpointError(f"{ck.path}: invalid step counters ({step}, {adam_t})")
        if t.get("data") not in (None, self._data_digest):
            if not new_data:
                raise ValidationError(f"text is not the text {ck.path} was trained on (its data "
                                      f"digest is {t.get('data')}, this text's {self._data_digest});"
                                      f" pass new_data=True to continue training on other text")
            logger.warning("%s was trained on different text; continuing on this one", ck.path)
        metadata = dict(metadata)
        with self.model.exclusive():
            # All or nothing: the blocks are copied first, and any exception on the way
            # (MemoryError, KeyboardInterrupt) puts everything back as it was.
            saved = (self.model.flat_params.copy(), self._m.copy(), self._v.copy(),
                     self.model.dropout_rng_state)
            try:
                _faults.point("Training.restore:saved")
                self.model.load_state_dict(ck.params)
                _faults.point("Training.restore:params")
                self.model.layout.fill(self._m, ck.exp_avg)
                self.model.layout.fill(self._v, ck.exp_avg_sq)
                _faults.point("Training.restore:moments")
                self.model.dropout_rng_state = drop_state
                _faults.point("Training.restore:dropout")
            except BaseException:
                self.model.flat_params[...] = saved[0]
                self._m[...], self._v[...] = saved[1], saved[2]
                self.model.dropout_rng_state = saved[3]
                raise
        # plain assignments of values made above: nothing left to fail
        self._rng, self.step, self._adam_t = rng, step, adam_t
        self.best_val_loss, self.metadata = best, metadata

    @classmethod
    def resume(cls, path, text: str, *, block_size: int | None = None,
               batch_size: int | None = None, val_fraction: float | None = None,
               new_data: bool = False, precision: str | None = None,
               comm=None) -> "Training":
        """A Training rebuilt from a training checkpoint (a file, a run's folder - its latest
        state - or a read Checkpoint): its model (train mode), tokenizer, optimizer and sampler state, metadata, and
        its block_size / batch_size / seed / val_fraction / precision unless overridden. `text` must be the
        run's text unless new_data=True (see restore). `trainer.model` and `trainer.tokenizer`
        give the rebuilt objects."""
        ck = path if isinstance(path, Checkpoint) else read_checkpoint(path, latest=True)
        _trainable(ck)
        if ck.tokenizer is None:
            raise CheckpointError(f"{ck.path}: the checkpoint has no tokenizer to resume with")
        t = ck.training or {}
        # Values read from the file are checked here, so a bad one (block_size -5) is a
        # CheckpointError about the file, not a ValidationError about an argument never given.
        try:
            kw = dict(block_size=check_int(t["block_size"], "block_size", 1, ck.config.block_size)
                      if block_size is None else block_size,
                      batch_size=check_training_option("batch_size", t["batch_size"])
                      if batch_size is None else batch_size,
                      seed=check_training_option("seed", t["seed"]),
                      val_fraction=check_number(t["val_fraction"], "val_fraction", 0.0, 0.5)
                      if val_fraction is None else val_fraction,
                      precision=t.get("precision", "float32") if precision is None else precision)
            if precision is None and kw["precision"] not in _core.PRECISIONS:
                raise ValueError(f"precision {kw['precision']!r}")
        except (KeyError, TypeError, ValueError, OverflowError) as e:   # ValidationError: a ValueError
            raise CheckpointError(f"{ck.path}: invalid training state ({e!r})") from None
        model = model_from_checkpoint(ck)
        try:
            trainer = cls(model, ck.tokenizer, text, comm=comm, **kw)
            trainer.restore(ck, new_data=new_data)
        except BaseException:
            model.close()
            raise
        return trainer
