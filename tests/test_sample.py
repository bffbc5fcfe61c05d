"""test_sample.py - next-token sampling in C (sm_sample.h): each draw equals a float64 reference
written from the definition (softmax of logits / temperature, top-k, top-p, inverse CDF over
the kept tokens in id order with the counter-based uniform), the empirical distribution matches
the softmax, NaN rows are reported, and a row's token depends on its own inputs only."""
import math

import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core
from smallmind.generation.sampling import seed_key


def _reference(row, temperature, top_k, top_p, u):
    """The definition, in float64 with math.exp (the C library's exp)."""
    V = len(row)
    best = int(np.argmax(row))
    if temperature == 0:
        return best
    m = float(row[best])
    p = [math.exp((float(x) - m) / float(np.float32(temperature))) for x in row]
    if 0 < top_k < V:
        kth = sorted(p, reverse=True)[top_k - 1]
        p = [x if x >= kth else 0.0 for x in p]
    if np.float32(top_p) < 1:
        order = sorted((i for i in range(V) if p[i] > 0), key=lambda i: (-p[i], i))
        need = float(np.float32(top_p)) * sum(p)
        cum, keep = 0.0, len(order)
        for j, i in enumerate(order):
            cum += p[i]
            if cum >= need:
                keep = j + 1
                break
        for i in order[keep:]:
            p[i] = 0.0
    target, acc, last = u * sum(p), 0.0, best
    for i, x in enumerate(p):
        if x <= 0:
            continue
        acc += x
        last = i
        if acc > target:
            return i
    return last


@pytest.mark.parametrize("V", [7, 65, 300])
def test_draws_equal_the_definition(V, rng):
    logits = (rng.standard_normal((40, V + 3)) * 3).astype(np.float32)
    logits[5, :V] = logits[5, 0]                       # a row of ties
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 3, 0.8),
                (1e-30, 0, 1.0), (50.0, 0, 0.95), (1.0, V, 1.0), (1.0, 1, 1.0), (2.0, 0, 1e-6)]
    for t, k, p in settings:
        keys = rng.integers(0, 2 ** 63, 40).astype(np.uint64)
        counters = rng.integers(0, 10 ** 6, 40).astype(np.uint64)
        got = _core.sample_rows(logits, V, np.full(40, t), np.full(40, k), np.full(40, p),
                                keys, counters)
        for r in range(40):
            u = _core.sample_uniform(int(keys[r]), int(counters[r]))
            assert 0.0 <= u < 1.0
            assert got[r] == _reference(logits[r, :V], t, k, p, u), (t, k, p, r)


def test_the_empirical_distribution_is_the_softmax():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(12) * 1.5).astype(np.float32)
    n = 60000
    rows = np.repeat(logits[None], n, axis=0)
    draws = _core.sample_rows(rows, 12, np.full(n, 0.8), np.zeros(n), np.ones(n),
                              np.full(n, 99, np.uint64), np.arange(n, dtype=np.uint64))
    z = logits.astype(np.float64) / np.float64(np.float32(0.8))
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(draws, minlength=12)
    chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
    assert chi2 < 40.0          # 11 degrees of freedom: p < 1e-4 of a false alarm


def test_rows_are_independent_and_nan_rows_are_reported():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((9, 30)).astype(np.float32)
    args = (np.full(9, 1.0), np.full(9, 4), np.full(9, 0.9), np.arange(9, dtype=np.uint64),
            np.arange(9, dtype=np.uint64))
    whole = _core.sample_rows(logits, 30, *args)
    for r in range(9):
        one = _core.sample_rows(logits[r:r + 1].copy(), 30, *(a[r:r + 1] for a in args))
        assert one[0] == whole[r]
    for threads in (1, 2, 3):
        assert np.array_equal(_core.sample_rows(logits, 30, *args, threads), whole)
    bad = logits.copy()
    bad[4, 7] = np.nan
    bad[6, 0] = np.inf
    got = _core.sample_rows(bad, 30, *args)
    assert got[4] == -1 and got[6] == -1 and np.array_equal(np.delete(got, [4, 6]), np.delete(whole, [4, 6]))


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=[-1.0]), "temperature"), (dict(temperature=[np.nan]), "temperature"),
    (dict(top_k=[-1]), "top_k"), (dict(top_p=[0.0]), "top_p"), (dict(top_p=[1.5]), "top_p"),
    (dict(key=[1, 2]), "key"), (dict(V=11), "V"),
])
def test_bad_arguments_name_themselves(kw, match):
    args = dict(logits=np.zeros((1, 10), np.float32), V=10, temperature=[1.0], top_k=[0],
                top_p=[1.0], key=[0], counter=[0])
    args.update(kw)
    with pytest.raises(sm.ValidationError, match=match):
        _core.sample_rows(**args)


def test_seed_keys():
    assert seed_key(5) == 5 and seed_key(2 ** 64 - 1) == 2 ** 64 - 1
    assert seed_key(2 ** 70) == seed_key(2 ** 70) != seed_key(2 ** 70 + 1)
    assert 0 <= seed_key(2 ** 70) < 2 ** 64
    assert seed_key(None) != seed_key(None)
