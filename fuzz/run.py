"""fuzz/run.py - runs a fuzz target of fuzz/targets.py, with atheris (coverage-guided libFuzzer,
`pip install atheris`) or, without it, a built-in seeded mutation fuzzer.

    python fuzz/run.py checkpoint --runs 2000            # a fixed number of inputs (CI smoke)
    python fuzz/run.py http --time 3600                  # an hour, coverage-guided if atheris is there
    python fuzz/run.py all --runs 500 --engine random    # every target, the built-in engine
    python fuzz/run.py index --replay                    # only replay fuzz/regressions/index/

Targets: checkpoint, index, tokenizer, bpe, http. A failure (an undocumented exception, a failed
round-trip assertion, a crash or an input taking over --timeout seconds) saves the input under
fuzz/crashes/ and exits non-zero. Copy it to fuzz/regressions/<target>/ once fixed: the test suite
replays that folder (tests/test_fuzz.py). The built-in engine is deterministic for a given --seed.
"""
import argparse
import hashlib
import os
import random
import signal
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
NAMES = ["checkpoint", "index", "tokenizer", "bpe", "http"]
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"0", b"-1", b"1e999", b"NaN", b"4294967296",
               b"18446744073709551616", b"\"", b"{", b"}", b"[", b"]", b",", b":", b"null",
               b"\xed\xa0\x80", b"\xf0\x9f\x98\x80",
               # deep nesting: json.loads and tomllib raise RecursionError past ~1000 levels
               b"[" * 3000, b"{\"a\":" * 1500]


JSONISH = b'{}[]:,"0123456789.-eE truefalsnul\\'


def mutate(data: bytes, rng: random.Random, pool: list, text: bool = False) -> bytes:
    """One to eight random edits of `data`: flips, interesting tokens, inserts, deletes,
    duplicated ranges, splices with another seed, and tweaked little-endian integers (the
    8-byte header length of a safetensors file). text=True (a JSON header): one to three edits
    that keep to ASCII, so most inputs get past UTF-8 decoding to the parsers behind it."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 3 if text else 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(b) + 1)
        if text and op in (0, 2):
            b[pos:pos] = bytes(rng.choice(JSONISH) for _ in range(rng.randint(1, 4)))
        elif text and op in (5, 6):
            continue
        elif op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            tok = rng.choice([t for t in INTERESTING if t.isascii()] if text else INTERESTING)
            b[pos:pos + rng.randint(0, min(len(tok), 8))] = tok
        elif op == 2:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3:
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 4 and b:
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randint(1, 256)]
        elif op == 5:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            b = b[:pos] + bytearray(other[cut:])
        elif op == 6 and len(b) >= 8:
            v = int.from_bytes(b[:8], "little") + rng.choice([-9, -1, 1, 2, 1 << 31, 1 << 63])
            b[:8] = (v % (1 << 64)).to_bytes(8, "little")
        elif op == 7 and b:
            digits = [i for i, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = rng.choice([b"9" * rng.randint(1, 30), b"-", b"0", b".5", b"e9"])
    return bytes(b)


def split_safetensors(data: bytes):
    """(header, rest) of a safetensors-shaped input (8-byte little-endian length, JSON header,
    data), or None. Mutating the header alone and writing the length back reaches the JSON and
    metadata validation behind the length check, which blind edits almost never get past."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8 or data[8:9] != b"{":
        return None
    return data[8:8 + n], data[8 + n:]


def join_safetensors(header: bytes, rest: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + rest


def structured(mutator, header_mutator=None):
    """Wrap a bytes mutator: half the time a safetensors-shaped input gets its header mutated
    (by header_mutator if given) and its length field rewritten to match."""
    def mutate_input(data, rng):
        parts = split_safetensors(data)
        if parts is not None and rng.random() < 0.5:
            return join_safetensors((header_mutator or mutator)(parts[0]), parts[1])
        return mutator(data)
    return mutate_input


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def _save(target: str, data: bytes, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{target}-{hashlib.sha1(data).hexdigest()[:16]}.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path


def run_random(name, runs, seconds, seed, timeout, out_dir, quiet=False):
    """The built-in engine: returns the number of inputs tried; raises SystemExit(1) on a failure."""
    import targets
    target, pool = targets.TARGETS[name], targets.seeds(name)
    rng = random.Random(f"{name}:{seed}")
    signal.signal(signal.SIGALRM, _on_alarm)
    start, n, corpus = time.monotonic(), 0, list(pool)
    while (runs is None or n < runs) and (seconds is None or time.monotonic() - start < seconds):
        data = corpus[n] if n < len(corpus) else structured(
            lambda d: mutate(d, rng, pool), lambda d: mutate(d, rng, pool, text=True))(
            rng.choice(corpus), rng)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            target(data)
        except _Timeout:
            path = _save(name, data, out_dir)
            print(f"fuzz {name}: input {n} ran past {timeout} s; saved {path}", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception:
            path = _save(name, data, out_dir)
            traceback.print_exc()
            print(f"fuzz {name}: input {n} failed; saved {path}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        # Keep some mutants as parents: without coverage feedback, a small random share keeps
        # the search from collapsing back onto the seeds.
        if len(corpus) < 256 and rng.random() < 0.05:
            corpus.append(data)
        n += 1
    if not quiet:
        print(f"fuzz {name}: {n} inputs, no failure ({time.monotonic() - start:.1f} s, random engine)")
    return n


def run_atheris(name, runs, seconds, timeout, out_dir):
    import atheris
    with atheris.instrument_imports(include=["smallmind", "targets"]):
        import targets
    corpus = tempfile.mkdtemp(prefix=f"sm-fuzz-{name}-")
    for i, data in enumerate(targets.seeds(name)):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(data)
    os.makedirs(out_dir, exist_ok=True)
    args = [sys.argv[0], corpus, f"-timeout={int(max(1, timeout))}", "-max_len=65536",
            f"-artifact_prefix={os.path.join(out_dir, name + '-')}", "-print_final_stats=1"]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={int(seconds)}")
    def custom_mutator(data, max_size, seed):
        rng = random.Random(seed)
        return structured(lambda d: atheris.Mutate(d, max_size))(data, rng)[:max_size]

    atheris.Setup(args, targets.TARGETS[name], custom_mutator=custom_mutator)
    atheris.Fuzz()          # exits the process: 0 when done, non-zero on a failure


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=NAMES + ["all"])
    p.add_argument("--runs", type=int, default=None, help="inputs to try (per target)")
    p.add_argument("--time", type=float, default=None, help="seconds to run (per target)")
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random engine")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    p.add_argument("--out", default=os.path.join(HERE, "crashes"), help="where failures are saved")
    p.add_argument("--replay", action="store_true", help="only replay fuzz/regressions/<target>/")
    a = p.parse_args(argv)
    names = NAMES if a.target == "all" else [a.target]
    if a.replay:
        import targets
        for name in names:
            n = targets.replay(name, os.path.join(HERE, "regressions", name))
            print(f"fuzz {name}: replayed {n} regression inputs, no failure")
        return 0
    if a.runs is None and a.time is None:
        a.runs = 1000
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        if len(names) > 1:      # atheris.Fuzz() ends its process: one child per target
            import subprocess
            for name in names:
                cmd = [sys.executable, __file__, name, "--engine", "atheris", "--timeout", str(a.timeout),
                       "--out", a.out] + (["--runs", str(a.runs)] if a.runs is not None else []) \
                    + (["--time", str(a.time)] if a.time is not None else [])
                if subprocess.run(cmd).returncode != 0:
                    return 1
            return 0
        run_atheris(names[0], a.runs, a.time, a.timeout, a.out)
        return 0
    for name in names:
        run_random(name, a.runs, a.time, a.seed, a.timeout, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
