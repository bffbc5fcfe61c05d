"""test_index_compact.py - VectorIndex with compact storage: bf16 and int8 rows read first, then
an exact float32 re-rank of every row the error bound cannot rule out. Exact stores must give
the float32 index's ids and score bits on every metric (ties included, near-duplicates that the
compact rows cannot tell apart, every SIMD level, thread count and batch); exact=False stores
give the compact rows' own top-k; both survive save / load and remove."""
import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core

METRICS = ("cosine", "dot", "l2")
COMPACT = ("bf16", "int8")


def _pair(X, metric, storage, exact=True):
    a = sm.VectorIndex(X.shape[1], metric)
    b = sm.VectorIndex(X.shape[1], metric, storage=storage, exact=exact)
    a.add(X)
    b.add(X)
    return a, b


def _same(a, b, Q, k, threads=None):
    ia, sa = a.search(Q, k, threads=threads)
    ib, sb = b.search(Q, k, threads=threads)
    assert ia == ib
    np.testing.assert_array_equal(sa.view(np.uint32), sb.view(np.uint32))


def _datasets():
    rng = np.random.default_rng(7)
    gauss = rng.standard_normal((3000, 48)).astype(np.float32)
    # near-duplicates: copies of 20 vectors moved by less than bf16 / int8 can see
    base = rng.standard_normal((20, 40)).astype(np.float32)
    near = np.repeat(base, 40, axis=0) * (1 + rng.uniform(-1e-5, 1e-5, (800, 40))).astype(np.float32)
    # exact ties: small integers (every float32 sum exact) and duplicated rows
    ints = rng.integers(-3, 4, (1000, 17)).astype(np.float32)
    ints[ints.sum(axis=1) == 0, 0] = 5              # no zero rows (cosine)
    ints = np.concatenate([ints, ints[:200]])
    wide = (rng.standard_normal((500, 131)) * np.exp(rng.uniform(-8, 8, (500, 1)))).astype(np.float32)
    return {"gauss": gauss, "near": near.astype(np.float32), "ints": ints, "wide": wide}


DATA = _datasets()


@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", list(DATA))
def test_exact_compact_equals_float32_bit_for_bit(name, metric, storage):
    X = DATA[name]
    rng = np.random.default_rng(len(name))
    Q = np.concatenate([rng.standard_normal((5, X.shape[1])).astype(np.float32), X[[3, len(X) - 1]]])
    a, b = _pair(X, metric, storage)
    for k in (1, 7, 64):
        _same(a, b, Q, k)
        _same(a, b, Q[2], k)                          # one query alone


@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.parametrize("metric", ("dot", "l2"))
def test_exact_compact_equals_the_float64_reference_with_ties(metric, storage):
    """Small integers: float32 and float64 agree exactly, so the reference's order (ties to the
    earlier row) is the one answer."""
    X = DATA["ints"]
    b = sm.VectorIndex(X.shape[1], metric, storage=storage)
    b.add(X)
    Q = np.random.default_rng(3).integers(-3, 4, (6, X.shape[1])).astype(np.float32)
    rows, scores = b._store.search(Q, 25, naive=True)
    ids, got = b.search(Q, 25)
    assert ids == rows.tolist()
    np.testing.assert_array_equal(got, scores)
    if metric == "l2":            # a duplicated row ties at distance 0: the earlier one first
        assert b.search(X[5], 2)[0] == [5, 1005]


@pytest.mark.parametrize("storage", COMPACT)
def test_threads_batches_and_simd_levels_do_not_change_results(storage, simd):
    X = DATA["gauss"]
    Q = np.random.default_rng(11).standard_normal((9, X.shape[1])).astype(np.float32)
    for metric in METRICS:
        a, b = _pair(X, metric, storage)
        want = a.search(Q, 10, threads=1)
        for t in (1, 2, 3):
            got = b.search(Q, 10, threads=t)
            assert got[0] == want[0]
            np.testing.assert_array_equal(got[1], want[1])
        for i in range(0, 9, 4):
            assert b.search(Q[i], 10)[0] == want[0][i]
        approx = sm.VectorIndex(X.shape[1], metric, storage=storage, exact=False)
        approx.add(X)
        one = approx.search(Q, 10, threads=1)
        for t in (2, 3):
            got = approx.search(Q, 10, threads=t)
            assert got[0] == one[0]
            np.testing.assert_array_equal(got[1], one[1])
        assert approx.search(Q[4], 10)[0] == one[0][4]


@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.parametrize("metric", METRICS)
def test_inexact_search_ranks_the_compact_vectors(metric, storage):
    X = DATA["gauss"]
    Q = np.random.default_rng(5).standard_normal((6, X.shape[1])).astype(np.float32)
    a, b = _pair(X, metric, storage, exact=False)
    ids, scores = b.search(Q, 10)
    # against the float64 reference over the compact vectors themselves
    rows, ref = b._store.search(Q, 10, naive=True)
    np.testing.assert_allclose(scores, ref, rtol=2e-5, atol=2e-5)
    exact_ids, _ = a.search(Q, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ids, exact_ids)])
    assert recall >= 0.8, recall
    # get() gives the compact vector widened: bf16 within 2^-8 relative, int8 within a step
    v, _ = b.get(17)
    tol = np.abs(X[17]).max() / 127 / 2 * 1.0001 if storage == "int8" else np.abs(X[17]) * 2 ** -8
    assert (np.abs(v - X[17]) <= tol).all()


def test_memory_per_vector():
    X = DATA["gauss"][:1024]
    sizes = {}
    for storage, exact in (("float32", True), ("bf16", True), ("int8", True), ("bf16", False),
                           ("int8", False)):
        ix = sm.VectorIndex(48, "dot", storage=storage, exact=exact)
        ix.add(X)
        sizes[storage, exact] = ix.nbytes
    f32 = sizes["float32", True]
    assert sizes["int8", False] < 0.35 * f32
    assert sizes["bf16", False] < 0.6 * f32
    assert sizes["bf16", True] > f32 and sizes["int8", True] > f32     # both copies


@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.parametrize("exact", (True, False))
def test_save_load_remove_keep_the_results(tmp_path, storage, exact):
    X = DATA["gauss"][:600]
    Q = np.random.default_rng(2).standard_normal((4, X.shape[1])).astype(np.float32)
    ix = sm.VectorIndex(X.shape[1], "cosine", storage=storage, exact=exact)
    ix.add(X, ids=[f"v{i}" for i in range(600)], metadata=[{"i": i} for i in range(600)])
    ix.remove(["v3", "v100"])
    want = ix.search(Q, 12, with_metadata=True)
    path = tmp_path / "ix.safetensors"
    ix.save(path)
    back = sm.VectorIndex.load(path)
    assert (back.storage, back.exact) == (storage, exact)
    got = back.search(Q, 12, with_metadata=True)
    assert got[0] == want[0] and got[2] == want[2]
    np.testing.assert_array_equal(got[1], want[1])
    from smallmind.safetensors import load_file
    tensors, _ = load_file(path)
    if exact:
        assert set(tensors) == {"vectors"} and tensors["vectors"].dtype == np.float32
    else:
        assert set(tensors) == {"codes", "scales"}
        assert tensors["codes"].dtype == (np.uint16 if storage == "bf16" else np.int8)
    assert "v3" not in back and "v100" not in back and len(back) == 598


def test_compact_codes_are_validated_on_load(tmp_path):
    X = DATA["gauss"][:50]
    ix = sm.VectorIndex(X.shape[1], "dot", storage="int8", exact=False)
    ix.add(X)
    path = tmp_path / "ix.safetensors"
    ix.save(path)
    from smallmind.safetensors import load_file, save_file
    tensors, meta = load_file(path)
    bad = dict(tensors, codes=tensors["codes"].astype(np.int16))
    save_file(bad, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(sm.CheckpointError, match="codes"):
        sm.VectorIndex.load(tmp_path / "bad.safetensors")
    worse = dict(tensors, scales=np.full(50, np.nan, np.float32))
    save_file(worse, tmp_path / "worse.safetensors", metadata=meta)
    with pytest.raises(sm.CheckpointError, match="scales"):
        sm.VectorIndex.load(tmp_path / "worse.safetensors")


def test_bad_arguments_name_themselves():
    with pytest.raises(sm.ValidationError, match="storage"):
        sm.VectorIndex(8, storage="fp16")
    with pytest.raises(sm.ValidationError, match="exact=False"):
        sm.VectorIndex(8, storage="float32", exact=False)
    with pytest.raises(TypeError, match="exact"):
        sm.VectorIndex(8, storage="int8", exact="no")
    with pytest.raises(sm.ValidationError, match="exact=False"):
        _core.IndexStore(8, "dot", "float32", False)
    ix = sm.VectorIndex(4, "cosine", storage="int8", exact=False)
    with pytest.raises(sm.ValidationError, match="non-zero"):
        ix.add(np.zeros((1, 4), np.float32))
    assert "storage='int8', exact=False" in repr(ix)
