"""tools/crash_consistency.py - kill -9 a `smallmind train` process again and again while it
writes a checkpoint every step, and check after every kill that each checkpoint file in the
folder loads completely, that training never went backwards, and that `--resume` continues
from the last complete checkpoint; at the end a resumed run finishes and its model generates.

    python tools/crash_consistency.py --kills 50     # prints the figures (docs/reliability.md)

tests/test_crash.py runs it with a few kills. Why it holds: save_file writes a hidden temporary
file, fsyncs it, renames it over the old name and fsyncs the folder, so a reader sees the old
file or the new one, never a mix; loaders validate every byte count; a new run deletes the
temporaries of killed runs."""
import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import smallmind as sm
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    import smallmind as sm


def _step(path):
    ck = sm.read_checkpoint(path)          # raises CheckpointError for any partial file
    assert ck.exp_avg is not None, f"{path}: no optimizer state"
    return int(ck.training["step"])


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def run(kills=10, seed=0, workdir=None, verbose=True):
    rng = random.Random(seed)
    work = workdir or tempfile.mkdtemp(prefix="sm-crash-")
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(sm.corpus.builtin_corpus(100_000))
    ck = os.path.join(work, "ck")
    last = os.path.join(ck, "model_last.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__)))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))

    def train_cmd(steps):
        cmd = [sys.executable, "-m", "smallmind", "train", corpus, "--preset", "tiny",
               "--steps", str(steps), "--save-every", "1", "--eval-every", "7", "--eval-batches", "1",
               "--batch-size", "4", "--warmup", "2", "--checkpoint-dir", ck, "--threads", "1",
               "--seed", "3"]
        return cmd + (["--resume", ck] if os.path.exists(last) else [])

    stats = {"kills": 0, "kills_with_a_temporary_file": 0, "files_verified": 0,
             "temporaries_removed_by_next_run": 0, "resumes": 0, "rollbacks": 0}
    prev_step = 0
    pending = set()         # temporaries left by the previous kill: the next run must remove them
    for i in range(kills):
        resumed = os.path.exists(last)
        # cwd=work: `python -m` puts the working folder first on sys.path, and a source
        # checkout there (without its compiled core) would shadow the installed package.
        p = subprocess.Popen(train_cmd(10 ** 6), env=env, cwd=work, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        # Wait for this run's first checkpoint (start-up and resume are not what we test), then
        # kill at a random moment among the saves that follow.
        m0, t0 = _mtime(last), time.monotonic()
        while _mtime(last) == m0:
            if p.poll() is not None:
                raise RuntimeError(f"training exited early: {p.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > 120:
                p.kill()
                raise RuntimeError("no checkpoint written within 120 s")
            time.sleep(0.005)
        stats["resumes"] += resumed
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        stats["kills"] += 1
        temps = set(glob.glob(os.path.join(ck, ".*.tmp")))
        stats["kills_with_a_temporary_file"] += bool(temps)
        stats["temporaries_removed_by_next_run"] += len(pending - temps)
        stats["temporaries_not_removed"] = len(pending & temps)
        pending = temps
        # Every visible checkpoint must load in full; the last one must not go backwards.
        for path in sorted(glob.glob(os.path.join(ck, "*.safetensors"))):
            step = _step(path)
            stats["files_verified"] += 1
            if path == last:
                if step < prev_step:
                    stats["rollbacks"] += 1
                prev_step = step
        if verbose:
            print(f"kill {i + 1}: at step {prev_step}, {len(temps)} temporary file(s) left")
    final = prev_step + 3
    done = subprocess.run(train_cmd(final), env=env, cwd=work, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the final resumed run failed: {done.stderr[-2000:]}")
    stats["temporaries_removed_by_next_run"] += len(pending - set(glob.glob(os.path.join(ck, ".*.tmp"))))
    stats["temporaries_left"] = len(glob.glob(os.path.join(ck, ".*.tmp")))
    stats["final_step"] = _step(last)
    model, tok = sm.load_checkpoint(last)
    stats["generated"] = sm.Sampling(model, tok).generate("The ", 20, temperature=0)
    stats["expected_final_step"] = final
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    t0 = time.monotonic()
    stats = run(a.kills, a.seed)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(stats, indent=1))
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f, indent=1)
        os.replace(tmp, a.json)
    ok = stats["rollbacks"] == 0 and stats["final_step"] == stats["expected_final_step"] \
        and stats["temporaries_left"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
