"""test_fork.py - worker processes after smallmind has run threads: fork (multiprocessing's
default on Linux), forkserver and spawn, with the parent idle, after multi-threaded work, or
with its threads busy inside smallmind at the fork; thread budgets default and explicit. Each
case runs in a fresh interpreter under a watchdog: no hang, and every worker's generation and
matmul equal the parent's bit for bit (results do not depend on the thread count)."""
import json
import os
import subprocess
import sys

import pytest

import smallmind as sm

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [(m, p, "default") for m in ("fork", "forkserver", "spawn") for p in ("idle", "used", "busy")]
CASES += [("fork", "used", "2"), ("fork", "busy", "2")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("method,parent,threads", CASES, ids=["-".join(c) for c in CASES])
def test_workers_after_threads_never_hang_and_agree(method, parent, threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)    # the same smallmind
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "fork_job.py"), method, parent,
                            threads], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{method}/{parent}/{threads}: the workers hung (watchdog: 300 s)")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for (text, total, budget), (want_text, want_total) in zip(out["workers"], out["parent"]):
        assert text == want_text and total == want_total
        # a forked child of a process that ran a team works on one thread, and says so
        # (a build without OpenMP never runs a team: nothing to guard, nothing to say)
        forked_after_team = method == "fork" and parent != "idle" and sm.build_info()["openmp"]
        assert budget == 1 if forked_after_team else budget >= 1
    warned = r.stderr.count("forked after smallmind ran OpenMP threads")
    if method == "fork" and parent != "idle" and sm.build_info()["openmp"]:
        assert 1 <= warned <= 2                   # once per worker process (the pool has 2)
    else:
        assert warned == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("which", ["default", "own"])
def test_fork_while_another_thread_holds_a_pool_lock(which):
    """The pool mid-rent: fork while another thread holds the pool's lock; the child's rent
    must complete (the C core holds every pool's lock across fork, so the child never inherits
    one held by a thread that does not exist there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning",
                        os.path.join(HERE, "fork_pool_job.py"), which],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"
