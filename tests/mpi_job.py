"""mpi_job.py - the program tests/test_distributed.py starts under `mpiexec -n N`: trains a small
model on a slice of the built-in corpus with Training(comm=...) and writes what the test compares
(losses, evaluation, final parameters) to OUT/rank<r>.npz. Options come as JSON in argv[2], so
one script serves every case (resume, cancellation, mismatches, a rank that dies)."""
import json
import os
import signal
import sys
import time

import numpy as np

import smallmind as sm
from smallmind.distributed import Communicator
from smallmind.model.corpus import builtin_corpus


def corpus():
    return builtin_corpus()[:60_000]


def build(opts, comm):
    text = corpus()
    if opts.get("rank_text") is not None and comm.rank == opts["rank_text"]:
        text = text[:-10]                     # a rank with other data
    tok = sm.Tokenizer(corpus())
    cfg = sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32, dropout=opts.get("dropout", 0.0),
                         seed=opts.get("model_seed", 7))
    if opts.get("rank_model_seed") is not None and comm.rank == opts["rank_model_seed"]:
        cfg = sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32, dropout=opts.get("dropout", 0.0),
                             seed=99)
    if opts.get("resume"):
        return sm.Training.resume(opts["resume"], text, comm=comm)
    model = sm.TransformerModel(cfg)
    return sm.Training(model, tok, text, batch_size=opts.get("batch_size", 4), seed=3, comm=comm)


def allreduce_check(out, comm):
    """Communicator.allreduce_sum against the rank-order sum every rank can recompute, for odd
    sizes (shorter than the rank count, not a multiple of it) and bucket sizes."""
    failures = []
    for n in (1, 2, 7, 1000, 100_003):
        blocks = [np.random.default_rng([n, r]).standard_normal(n).astype(np.float32)
                  for r in range(comm.size)]
        want = blocks[0].copy()
        for b in blocks[1:]:
            want = want + b
        for bucket in (None, 1, 3, 4096):
            if bucket is not None and n // bucket > 2000:
                continue                       # (a bucket of one float over 100k: slow, not new)
            comm.bucket_floats = bucket
            got = blocks[comm.rank].copy()
            comm.allreduce_sum(got)
            if not np.array_equal(got, want):
                failures.append(f"n={n} bucket={bucket}")
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), failures=np.array(failures, dtype=str),
             step=0, code=0)


def main():
    out, opts = sys.argv[1], json.loads(sys.argv[2])
    comm = Communicator(timeout=opts.get("timeout"), bucket_floats=opts.get("bucket_floats"))
    if opts.get("allreduce_check"):
        allreduce_check(out, comm)
        return
    trainer = build(opts, comm)
    source = sm.CancellationTokenSource()
    if opts.get("signals"):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: source.cancel("signal"))
    losses, reduce_times = [], []

    def callback(info):
        losses.append(info["loss"])
        reduce_times.append(info["allreduce_sec"])
        if opts.get("ready_file") and comm.rank == 0 and info["step"] == 2:
            open(opts["ready_file"], "w").close()
        if opts.get("die_at") == info["step"] and comm.rank == opts.get("die_rank", 1):
            os.kill(os.getpid(), signal.SIGKILL)
        if opts.get("hang_at") == info["step"] and comm.rank == opts.get("hang_rank", 1):
            time.sleep(3600)
        if opts.get("slow"):
            time.sleep(opts["slow"])

    code = 0
    try:
        trainer.train(opts.get("steps", 4), learning_rate=3e-3, warmup_steps=1,
                      grad_accum_steps=opts.get("accum", 2), eval_every=opts.get("eval_every", 0),
                      eval_batches=opts.get("eval_batches", 5), log_every=0,
                      checkpoint_dir=opts.get("checkpoint_dir"), cancel=source.token,
                      callback=callback, threads=1)
    except sm.CancelledError:
        code = 130
    except sm.SmallMindError as e:
        print(f"rank {comm.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 2
    evals = trainer.estimate_loss(opts.get("eval_batches", 5), threads=1) if code == 0 else {}
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), losses=np.array(losses),
             params=trainer.model.flat_params, step=trainer.step, code=code,
             reduce=np.array(reduce_times),
             evals=np.array([evals.get("train", np.nan), evals.get("val", np.nan)]))
    sys.exit(code)


if __name__ == "__main__":
    main()
