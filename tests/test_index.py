"""test_index.py - VectorIndex: exact top-k against float64 numpy for every metric, identical
results for any thread count and for single or batched queries, ids / metadata / removal,
validation, save / load (and corrupted files), and the readers-writer contract under threads
(concurrent searches equal serial bit for bit, adds never expose half-written rows; after
dispose everything raises ObjectDisposedError - dispose under threads: test_disposal.py)."""
import threading

import numpy as np
import pytest

import smallmind as sm

METRICS = ["cosine", "dot", "l2"]


def _reference(X, Q, metric, k):
    """float64 scores and the top-k row order (ties: lower row first)."""
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    if metric == "cosine":
        S = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    elif metric == "dot":
        S = Q @ X.T
    else:
        S = -((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(X.shape[0]), S.shape), -S), axis=1)[:, :k]
    top = np.take_along_axis(S, order, 1)
    return order, (-top if metric == "l2" else top), S


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,dim", [(1, 3), (257, 16), (3000, 37), (700, 128)])
def test_search_matches_float64_numpy(metric, n, dim):
    rng = np.random.default_rng(n + dim)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    Q = rng.standard_normal((9, dim)).astype(np.float32)
    k = min(10, n)
    with sm.VectorIndex(dim, metric) as index:
        index.add(X)
        ids, scores = index.search(Q, 10)
        order, want, S = _reference(X, Q, metric, k)
        assert scores.shape == (9, k)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5 * np.abs(S).max())
        for i in range(9):        # the same rows, unless two scores are within rounding
            for j in range(k):
                if ids[i][j] != order[i, j]:
                    assert abs(S[i, ids[i][j]] - S[i, order[i, j]]) < 1e-5 * np.abs(S).max()


@pytest.mark.parametrize("metric", METRICS)
def test_threads_and_batching_do_not_change_results(metric):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5000, 48)).astype(np.float32)
    Q = rng.standard_normal((7, 48)).astype(np.float32)
    index = sm.VectorIndex(48, metric)
    index.add(X)
    base = index.search(Q, 25, threads=1)
    for threads in (2, 3, 4):
        got = index.search(Q, 25, threads=threads)
        assert got[0] == base[0] and np.array_equal(got[1], base[1])
    for i in range(7):          # one query alone: the same ids and the same bits
        ids, sc = index.search(Q[i], 25, threads=2)
        assert ids == base[0][i] and np.array_equal(sc, base[1][i])


def test_ties_go_to_the_earlier_vector_and_k_beyond_the_index():
    index = sm.VectorIndex(4, "dot")
    v = np.array([1, 2, 3, 4], np.float32)
    index.add(np.stack([v, v * 0.5, v, v]), ids=["c", "x", "a", "b"])
    ids, scores = index.search(v, 3)
    assert ids == ["c", "a", "b"] and np.all(scores == scores[0])
    ids, scores = index.search(v, 100)      # k larger than the index: what there is
    assert ids == ["c", "a", "b", "x"] and scores.shape == (4,)
    empty = sm.VectorIndex(4)
    assert empty.search(v, 5) == ([], pytest.approx(np.empty(0, np.float32)))


def test_ids_metadata_get_and_remove():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 8)).astype(np.float32)
    index = sm.VectorIndex(8, "l2")
    assert index.add(X[:20]) == list(range(20))
    assert index.add(X[20:30], ids=[f"s{i}" for i in range(10)],
                     metadata=[{"i": i} for i in range(10)]) == [f"s{i}" for i in range(10)]
    assert index.add(X[30]) == [20]                      # default ids go on from the ints
    assert index.add(X[31], ids=100, metadata={"one": True}) == [100]
    assert index.add(X[32:34]) == [101, 102]
    assert len(index) == 34 and "s3" in index and 5 in index
    vec, meta = index.get("s3")
    assert np.array_equal(vec, X[23]) and meta == {"i": 3}
    assert index.get(100)[1] == {"one": True} and index.get(0)[1] is None
    index.remove([0, "s3", 100])
    index.remove(7)
    assert len(index) == 30 and "s3" not in index and 0 not in index
    kept = [i for i in range(34) if i not in (0, 23, 31, 7)]
    ids_of = {r: i for r, i in zip(range(34), list(range(20)) + [f"s{i}" for i in range(10)]
                                   + [20, 100, 101, 102])}
    q = rng.standard_normal((3, 8)).astype(np.float32)
    got, _ = index.search(q, 30, with_metadata=False)
    order, _, _ = _reference(X[kept], q, "l2", 30)
    assert got == [[ids_of[kept[r]] for r in row] for row in order]
    _, _, meta = index.search(q[0], 3, with_metadata=True)
    assert len(meta) == 3
    for bad, match in [(lambda: index.remove("nope"), "unknown id"),
                       (lambda: index.get(999), "unknown id"),
                       (lambda: index.add(X[0], ids="s0"), "already"),
                       (lambda: index.add(X[:2], ids=["u", "u"]), "unique"),
                       (lambda: index.add(X[:2], ids=["u"]), "ids has 1"),
                       (lambda: index.add(X[:2], ids=[True, 3]), "ids\\[0\\]"),
                       (lambda: index.add(X[:2], metadata=[{1}, None]), "metadata\\[0\\]")]:
        with pytest.raises(sm.ValidationError, match=match):
            bad()
    assert len(index) == 30                               # nothing added or removed by those


def test_bad_vectors_and_queries():
    index = sm.VectorIndex(4)
    good = np.ones((2, 4), np.float32)
    for bad, match in [(np.ones((2, 5)), "shape"), (np.ones((2, 2, 4)), "shape"),
                       (np.array([[1, 2, np.nan, 4]]), "finite"), (np.array([[1e39, 0, 0, 0]]), "finite"),
                       (np.array([[np.inf, 0, 0, 0]]), "finite"), (np.zeros((1, 4)), "non-zero"),
                       (np.array([["a"] * 4]), "real numbers"), (np.ones((1, 4), complex), "real"),
                       (np.ones((1, 4), bool), "real")]:
        with pytest.raises(sm.ValidationError, match=match):
            index.add(bad)
    assert len(index) == 0
    index.add(good)
    for kw, match in [(dict(k=0), "k must"), (dict(k=-1), "k must"), (dict(k=2.5), "k must")]:
        with pytest.raises(sm.ValidationError, match=match):
            index.search(good[0], **kw)
    with pytest.raises(sm.ValidationError, match="queries"):
        index.search(np.ones(3), 1)
    with pytest.raises(sm.ValidationError, match="non-zero"):
        index.search(np.zeros(4), 1)
    with pytest.raises(sm.ValidationError, match="finite"):
        index.search(np.array([np.nan, 1, 1, 1]), 1)
    for args, match in [((0,), "dim"), ((4, "manhattan"), "metric"), ((2.0,), "dim")]:
        with pytest.raises(sm.ValidationError, match=match):
            sm.VectorIndex(*args)
    l2 = sm.VectorIndex(4, "l2")
    l2.add(np.zeros((1, 4)))                              # zero vectors are fine for l2 and dot
    assert l2.search(np.zeros(4), 1)[1][0] == 0.0


def test_save_load_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((40, 6)).astype(np.float32)
    index = sm.VectorIndex(6, "cosine")
    index.add(X[:30], ids=[f"d{i}" for i in range(30)], metadata=[{"n": i} for i in range(30)])
    index.add(X[30:])
    index.remove(["d4", 5])
    path = tmp_path / "ix.safetensors"
    index.save(path)
    back = sm.VectorIndex.load(path)
    assert (back.dim, back.metric, back.ids) == (6, "cosine", index.ids)
    q = rng.standard_normal((4, 6)).astype(np.float32)
    a, b = index.search(q, 8, with_metadata=True), back.search(q, 8, with_metadata=True)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert back.add(X[0]) == [10]                         # default ids continue after the ints
    raw = path.read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-7])
    (tmp_path / "garbage").write_bytes(b"\x00" * 64)
    from smallmind.safetensors import save_file
    save_file({"vectors": X}, tmp_path / "plain")          # safetensors, but not an index
    import json
    hdr = {"format": "smallmind.VectorIndex", "version": 1, "dim": 6, "metric": "cosine",
           "ids": [1, 1], "metadata": [None, None]}
    save_file({"vectors": X[:2]}, tmp_path / "dupes", metadata={"smallmind.index": json.dumps(hdr)})
    hdr.update(ids=[1, 2], dim=5)
    save_file({"vectors": X[:2]}, tmp_path / "dim", metadata={"smallmind.index": json.dumps(hdr)})
    hdr.update(dim=6, version=9)
    save_file({"vectors": X[:2]}, tmp_path / "version", metadata={"smallmind.index": json.dumps(hdr)})
    hdr.update(version=1)
    Z = X[:2].copy()
    Z[1] = np.nan
    save_file({"vectors": Z}, tmp_path / "nan", metadata={"smallmind.index": json.dumps(hdr)})
    for name, match in [("trunc", "trunc"), ("garbage", "garbage"), ("plain", "not a smallmind"),
                        ("dupes", "not unique"), ("dim", "columns"), ("version", "version"),
                        ("nan", "finite"), ("missing", "missing")]:
        with pytest.raises(sm.CheckpointError, match=match):
            sm.VectorIndex.load(tmp_path / name)


def test_concurrent_searches_equal_serial_and_adds_are_atomic():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20000, 32)).astype(np.float32)
    Q = rng.standard_normal((16, 32)).astype(np.float32)
    index = sm.VectorIndex(32, "dot")
    index.add(X[:10000])
    serial = [index.search(Q[i], 10) for i in range(16)]
    got = [None] * 16

    def search(i):
        got[i] = index.search(Q[i], 10, threads=1)

    ts = [threading.Thread(target=search, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert all(g[0] == s[0] and np.array_equal(g[1], s[1]) for g, s in zip(got, serial))

    # searches while rows are being added: each result is exact for the rows it saw
    stop, bad = threading.Event(), []

    def writer():
        for start in range(10000, 20000, 500):
            index.add(X[start:start + 500])
        stop.set()

    def reader(i):
        while not stop.is_set():
            ids, scores = index.search(Q[i], 5)
            want = X[ids] @ Q[i]                  # ids are rows: default ids = insertion order
            if not np.allclose(scores, want, rtol=1e-5, atol=1e-4):
                bad.append((ids, scores))

    ts = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not bad and len(index) == 20000
    assert index.search(Q[0], 10)[0] == _reference(X, Q[:1], "dot", 10)[0][0].tolist()


def test_after_dispose_everything_is_refused():
    # disposing while threads search: tests/test_disposal.py (the contract for every disposable)
    rng = np.random.default_rng(5)
    index = sm.VectorIndex(64)
    index.add(rng.standard_normal((5000, 64)).astype(np.float32))
    assert index.nbytes >= 5000 * 64 * 4
    q = rng.standard_normal(64).astype(np.float32)
    index.dispose()
    index.dispose()                        # idempotent
    assert index.disposed and index.nbytes == 0 and repr(index) == "VectorIndex(disposed)"
    for call in (lambda: index.search(q, 1), lambda: index.add(q), lambda: len(index),
                 lambda: index.get(0), lambda: index.remove(0), lambda: index.save("x"),
                 lambda: index.ids, lambda: 0 in index):
        with pytest.raises(sm.ObjectDisposedError):
            call()
