"""test_fuzz.py - the fuzz harnesses of fuzz/ inside the test suite: every saved regression input
(inputs a fuzzer once broke the library with) replays cleanly, and a short seeded run of the
built-in mutation engine passes for every target. Long runs: fuzz/run.py (see docs/reliability.md)."""
import os
import sys

import pytest

FUZZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
pytestmark = pytest.mark.skipif(not os.path.isdir(FUZZ), reason="fuzz/ is not in this checkout")
sys.path.insert(0, FUZZ)

NAMES = ["checkpoint", "index", "tokenizer", "bpe", "http"]


@pytest.fixture(scope="module")
def fuzz():
    import run
    import targets
    return run, targets


@pytest.mark.parametrize("name", NAMES)
def test_regressions_replay(fuzz, name):
    run, targets = fuzz
    folder = os.path.join(FUZZ, "regressions", name)
    n = targets.replay(name, folder)
    assert n == len(os.listdir(folder)) if os.path.isdir(folder) else n == 0


def test_regression_corpus_is_not_empty(fuzz):
    # The bugs found so far: NaN logits chosen from, deep JSON nesting in three parsers.
    found = sum(len(os.listdir(os.path.join(FUZZ, "regressions", d)))
                for d in os.listdir(os.path.join(FUZZ, "regressions")))
    assert found >= 5


@pytest.mark.parametrize("name", NAMES)
def test_short_random_run(fuzz, name, tmp_path):
    run, targets = fuzz
    assert run.run_random(name, runs=400, seconds=None, seed=7, timeout=30.0,
                          out_dir=str(tmp_path), quiet=True) == 400
    assert not os.listdir(tmp_path)          # nothing saved: no failure


def test_a_failing_target_is_caught_and_saved(fuzz, tmp_path, monkeypatch):
    # The engine itself: an undocumented exception stops the run and keeps the input.
    run, targets = fuzz

    seeds = targets.seeds("http")

    def brittle(data):           # fails on the first input that is not a seed
        if data not in seeds:
            raise KeyError("boom")

    monkeypatch.setitem(targets.TARGETS, "http", brittle)
    with pytest.raises(SystemExit):
        run.run_random("http", runs=50, seconds=None, seed=1, timeout=30.0, out_dir=str(tmp_path),
                       quiet=True)
    saved = os.listdir(tmp_path)
    assert len(saved) == 1 and saved[0].startswith("http-")


def test_header_mutation_keeps_the_length_field_true(fuzz):
    import random
    run, targets = fuzz
    seed = targets.seeds("index")[0]
    rng = random.Random(3)
    for _ in range(50):
        out = run.structured(lambda d: d, lambda d: run.mutate(d, rng, [seed], text=True))(seed, rng)
        parts = run.split_safetensors(out)
        if parts is not None:
            assert run.join_safetensors(*parts) == out
