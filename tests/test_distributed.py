"""Data-parallel training over MPI (smallmind.distributed, Training(comm=...)): each case starts
tests/mpi_job.py under `mpiexec -n N` on loopback and compares with one process in this one.
Skipped where the `smallmind[mpi]` extra (mpi4py + an MPI with mpiexec) is not installed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import smallmind as sm
from smallmind.distributed import launched_by_mpi, split_range

HERE = os.path.dirname(os.path.abspath(__file__))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
try:
    import mpi4py  # noqa: F401  (imported only to know it is there: MPI is never initialised here)
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

needs_mpi = pytest.mark.skipif(not (MPIEXEC and HAVE_MPI4PY),
                               reason="the smallmind[mpi] extra (mpi4py, mpiexec) is not installed")

sys.path.insert(0, HERE)
from mpi_job import corpus  # noqa: E402


def env():
    """The environment of the ranks: the same smallmind as this process (installed or the source
    tree) and this folder (mpi_job.py)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__)))
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, HERE,
                                                     os.environ.get("PYTHONPATH", "")]))
    e.pop("SMALLMIND_MPI_TIMEOUT", None)
    return e


def run_mpi(n, out, opts, timeout=120):
    """Run mpi_job.py on n ranks; (return code, its stderr and stdout, [rank results])."""
    out.mkdir(exist_ok=True)
    p = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(HERE, "mpi_job.py"),
                        str(out), json.dumps(opts)], env=env(), capture_output=True, text=True,
                       timeout=timeout, cwd=out)
    results = []
    for r in range(n):
        f = out / f"rank{r}.npz"
        results.append(dict(np.load(f)) if f.exists() else None)
    return p.returncode, p.stderr + p.stdout, results


def single(accum, steps=4, batch_size=4, dropout=0.0, eval_batches=5, checkpoint_dir=None,
           resume=None):
    """The reference: one process, grad_accum_steps = accum."""
    text = corpus()
    if resume:
        t = sm.Training.resume(resume, text)
    else:
        tok = sm.Tokenizer(text)
        model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32, dropout=dropout,
                                                   seed=7))
        t = sm.Training(model, tok, text, batch_size=batch_size, seed=3)
    h = t.train(steps, learning_rate=3e-3, warmup_steps=1, grad_accum_steps=accum, eval_every=0,
                log_every=0, threads=1, checkpoint_dir=checkpoint_dir)
    ev = t.estimate_loss(eval_batches, threads=1)
    params = t.model.flat_params.copy()
    t.model.close()
    return np.array(h.train_loss), params, np.array([ev["train"], ev["val"]])


# ---- without MPI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,parts", [(10, 3), (8, 3), (2, 3), (7, 1), (0, 2), (64, 64)])
def test_split_range_covers_in_order(n, parts):
    pieces = [split_range(n, parts, i) for i in range(parts)]
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    sizes = [b - a for a, b in pieces]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


def test_plain_process_is_not_an_mpi_launch(monkeypatch):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var, raising=False)
    assert launched_by_mpi() == 0
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launched_by_mpi() == 3


def test_plain_training_does_not_import_mpi():
    code = ("import sys, smallmind as sm\n"
            "from smallmind.cli import main\n"
            "rc = main(['train', '--steps', '1', '--n-layer', '1', '--n-embd', '16', '--n-head', '1',"
            " '--block-size', '16', '--batch-size', '2', '--checkpoint-dir', sys.argv[1]])\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n"
            "print('rc', rc)\n")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.run([sys.executable, "-c", code, d], env=env(), capture_output=True,
                           text=True, timeout=300, cwd=d)
    assert p.returncode == 0, p.stderr
    assert "rc 0" in p.stdout


def test_comm_must_be_a_communicator():
    text = corpus()
    tok = sm.Tokenizer(text)
    with sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 16, 1, 1, 16)) as model:
        with pytest.raises(TypeError, match="comm"):
            sm.Training(model, tok, text, comm="world")


def test_accumulation_adds_micro_batches_in_order():
    """One process's step gradient is ((g0 + g1) + g2): each micro-batch's gradient computed on
    its own and added, the order the ranks' sums follow."""
    text = corpus()
    tok = sm.Tokenizer(text)
    cfg = sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32, seed=5)
    t = sm.Training(sm.TransformerModel(cfg), tok, text, batch_size=4, seed=3)
    state = t._rng.bit_generator.state
    t.train(1, learning_rate=0.0, warmup_steps=0, grad_accum_steps=3, eval_every=0,
            log_every=0, threads=1, grad_clip=0.0)
    got = t.model.flat_grads.copy()
    m = sm.TransformerModel(cfg)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    parts = []
    for _ in range(3):
        x, y = t._windows(t._train_tokens, rng, 4)
        m.zero_grad()
        m.train_forward(x, y, None, 1)
        m.backward(loss_scale=1.0 / 3, threads=1)
        parts.append(m.flat_grads.copy())
    np.testing.assert_array_equal(got, (parts[0] + parts[1]) + parts[2])
    t.model.close()
    m.close()


# ---- under mpiexec -------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("n,accum,dropout", [(2, 2, 0.0), (3, 3, 0.0), (2, 2, 0.1)])
def test_ranks_equal_one_process_bit_for_bit(tmp_path, n, accum, dropout):
    """Every rank one micro-batch: the losses, weights and evaluation of one process with
    grad_accum_steps = n, bit for bit (dropout masks included)."""
    rc, err, res = run_mpi(n, tmp_path, {"accum": accum, "dropout": dropout})
    assert rc == 0, err
    losses, params, evals = single(accum, dropout=dropout)
    for r in res:
        np.testing.assert_array_equal(r["losses"], losses)
        np.testing.assert_array_equal(r["params"], params)
        np.testing.assert_array_equal(r["evals"], evals)
        assert (r["reduce"] > 0).all()


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_sums_in_rank_order_whatever_the_buckets(tmp_path, n):
    rc, err, res = run_mpi(n, tmp_path, {"allreduce_check": True})
    assert rc == 0, err
    for r in res:
        assert list(r["failures"]) == []


@needs_mpi
def test_bucketed_reduction_gives_the_same_run(tmp_path):
    rc, err, res = run_mpi(3, tmp_path, {"accum": 3, "bucket_floats": 1000})
    assert rc == 0, err
    losses, params, _ = single(3)
    np.testing.assert_array_equal(res[2]["params"], params)
    np.testing.assert_array_equal(res[2]["losses"], losses)


@needs_mpi
@pytest.mark.parametrize("n,accum", [(3, 2), (2, 4)])
def test_uneven_shares_match_within_rounding_and_repeat_exactly(tmp_path, n, accum):
    """3 ranks sharing 8 windows (3/3/2) and 2 ranks with two micro-batches each: the sums are
    grouped differently from one process's, so equal up to float32 rounding; a second run with
    the same rank count repeats the first bit for bit, and all ranks hold the same weights."""
    rc, err, res = run_mpi(n, tmp_path / "a", {"accum": accum})
    assert rc == 0, err
    rc2, err2, res2 = run_mpi(n, tmp_path / "b", {"accum": accum})
    assert rc2 == 0, err2
    losses, params, _ = single(accum)
    for r, r2 in zip(res, res2):
        np.testing.assert_array_equal(r["params"], res[0]["params"])
        np.testing.assert_array_equal(r["params"], r2["params"])
        np.testing.assert_array_equal(r["losses"], r2["losses"])
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        np.testing.assert_allclose(r["params"], params, rtol=0, atol=2e-5)


@needs_mpi
def test_resume_with_another_rank_count_keeps_the_run(tmp_path):
    """2 steps on 2 ranks, resumed on 1 rank to step 4: the run of one process doing 4 steps."""
    ck = tmp_path / "ck"
    rc, err, _ = run_mpi(2, tmp_path / "a", {"accum": 2, "steps": 2, "checkpoint_dir": str(ck)})
    assert rc == 0, err
    assert sorted(os.listdir(ck)) == ["model_last.safetensors"]
    rc, err, res = run_mpi(1, tmp_path / "b", {"resume": str(ck), "accum": 2, "steps": 4})
    assert rc == 0, err
    losses, params, _ = single(2, steps=4)
    np.testing.assert_array_equal(res[0]["params"], params)
    np.testing.assert_array_equal(res[0]["losses"], losses[2:])
    # and 3 ranks resuming the same file agree with it up to rounding (shares 3/3/2)
    rc, err, res3 = run_mpi(3, tmp_path / "c", {"resume": str(ck), "accum": 2, "steps": 4})
    assert rc == 0, err
    np.testing.assert_allclose(res3[0]["params"], params, rtol=0, atol=2e-5)


def start_job(n, out, opts):
    out.mkdir(exist_ok=True)
    return subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable,
                             os.path.join(HERE, "mpi_job.py"), str(out), json.dumps(opts)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out)


@needs_mpi
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_mpiexec_stops_every_rank_at_one_step(tmp_path, sig):
    ck, ready = tmp_path / "ck", tmp_path / "ready"
    p = start_job(2, tmp_path / "out", {"accum": 2, "steps": 500, "signals": True, "slow": 0.05,
                                         "ready_file": str(ready), "checkpoint_dir": str(ck)})
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), p.communicate()[1]
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    steps = [int(np.load(tmp_path / "out" / f"rank{r}.npz")["step"]) for r in range(2)]
    assert steps[0] == steps[1] and 2 <= steps[0] < 500
    assert "model_cancelled.safetensors" in os.listdir(ck)
    ck_step = sm.read_checkpoint(str(ck / "model_cancelled.safetensors")).training["step"]
    assert ck_step == steps[0]


@needs_mpi
def test_killed_rank_ends_the_job(tmp_path):
    t0 = time.monotonic()
    rc, err, _ = run_mpi(2, tmp_path, {"accum": 2, "steps": 50, "die_at": 2}, timeout=60)
    assert rc != 0
    assert time.monotonic() - t0 < 60
    assert "signal 9" in err or "Killed" in err or "terminated" in err.lower(), err


@needs_mpi
def test_hung_rank_is_reported_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    rc, err, _ = run_mpi(2, tmp_path, {"accum": 2, "steps": 50, "hang_at": 2, "timeout": 3},
                         timeout=60)
    elapsed = time.monotonic() - t0
    assert rc != 0
    assert "rank 0 of 2: no answer from the other ranks within 3 s" in err, err
    assert elapsed < 40


@needs_mpi
@pytest.mark.parametrize("opts,field", [({"rank_model_seed": 1}, "model"),
                                        ({"rank_text": 1}, "data")])
def test_mismatched_ranks_are_refused_naming_the_difference(tmp_path, opts, field):
    rc, err, res = run_mpi(2, tmp_path, dict(opts, accum=2))
    assert rc == 2, err
    assert f"the ranks disagree on the run (model, data, options, state): {field} is" in err, err
    assert err.count("DistributedError") == 2          # both ranks say it
    assert all(int(r["step"]) == 0 for r in res)


@needs_mpi
def test_global_batch_smaller_than_the_ranks_is_refused(tmp_path):
    rc, err, _ = run_mpi(3, tmp_path, {"accum": 1, "batch_size": 2})
    assert rc == 2
    assert "fewer windows than the 3 ranks" in err


@needs_mpi
def test_cli_under_mpiexec(tmp_path):
    """`mpiexec -n 2 smallmind train`: one checkpoint, rank 0's output only, the ranks and
    threads printed, and the model equal to a single process's run of the same command."""
    ck1, ck2 = tmp_path / "one", tmp_path / "two"
    args = ["train", "--steps", "3", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--block-size", "32", "--batch-size", "4", "--grad-accum-steps", "2",
            "--eval-every", "0", "--threads", "1"]
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "smallmind", *args,
                        "--checkpoint-dir", str(ck2)], env=env(), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "2 ranks x 1 thread" in p.stdout
    assert p.stdout.count("done: step 3 of 3") == 1
    q = subprocess.run([sys.executable, "-m", "smallmind", *args, "--checkpoint-dir", str(ck1)],
                       env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    a = sm.read_checkpoint(str(ck1 / "model_last.safetensors"))
    b = sm.read_checkpoint(str(ck2 / "model_last.safetensors"))
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


@needs_mpi
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_every_rank_on_a_signal_to_mpiexec(tmp_path, sig):
    """`mpiexec -n 2 smallmind train` and Ctrl-C (or kill -TERM) to mpiexec: one
    model_cancelled checkpoint at the step every rank stopped at, exit status 130."""
    ck = tmp_path / "ck"
    p = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "smallmind", "train",
                          "--steps", "100000", "--n-layer", "2", "--n-embd", "64", "--n-head", "2",
                          "--block-size", "64", "--batch-size", "8", "--grad-accum-steps", "2",
                          "--eval-every", "0", "--log-every", "1", "--threads", "1",
                          "--checkpoint-dir", str(ck)],
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    seen = ""
    while "step 3/" not in seen:
        line = p.stdout.readline()
        assert line, p.communicate()[1]
        seen += line
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert os.listdir(ck) == ["model_cancelled.safetensors"]
    step = sm.read_checkpoint(str(ck / "model_cancelled.safetensors")).training["step"]
    assert 3 <= step < 100000
    assert err.count("interrupted at step") == 1, err       # rank 0 says it, once
    assert f"interrupted at step {step} of 100000" in err
