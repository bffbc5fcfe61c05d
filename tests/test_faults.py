"""test_faults.py - every mutating method is all-or-nothing: the harness records the failure
points (smallmind/_faults.py) a successful call passes, then repeats the call with a failure
injected at each point - MemoryError and KeyboardInterrupt - and checks that the object is
exactly as before the call, and still works (the same call then succeeds)."""
import json

import numpy as np
import pytest

import smallmind as sm
from smallmind import _faults

FAILURES = [MemoryError("injected"), KeyboardInterrupt()]


def all_or_nothing(make, call, state, expect_points):
    """make() -> a fresh object; call(obj) mutates it; state(obj) -> a comparable snapshot."""
    obj = make()
    with _faults.trace() as seen:
        call(obj)
    points = list(dict.fromkeys(seen))
    assert points == expect_points, points          # the harness sees every step it should
    for name in points:
        for exc in FAILURES:
            obj = make()
            before = state(obj)
            with _faults.armed(name, exc), pytest.raises(type(exc)):
                call(obj)
            assert state(obj) == before, f"{name} / {type(exc).__name__}"
            call(obj)                                # still consistent: the call now succeeds
            assert state(obj) != before
    return points


# ---- VectorIndex -------------------------------------------------------------------------------

DIM = 8
RNG = np.random.default_rng(0)
BASE = RNG.standard_normal((6, DIM)).astype(np.float32)
NEW = RNG.standard_normal((3, DIM)).astype(np.float32)


def _index():
    ix = sm.VectorIndex(DIM, "l2")
    ix.add(BASE, ids=["a", "b", 7, "d", 9, "f"], metadata=[{"n": i} for i in range(6)])
    return ix


def _index_state(ix):
    """Everything a caller can observe: length, membership, each id's vector and metadata,
    search results, and the next default id."""
    ids = ix.ids
    rows = {json.dumps(i): (ix.get(i)[0].tobytes(), json.dumps(ix.get(i)[1])) for i in ids}
    hits = ix.search(BASE[1], k=len(ids))[0] if ids else []
    return (len(ix), sorted(rows.items()), all(i in ix for i in ids), sorted(map(json.dumps, hits)),
            ix._next_id)


def test_index_add_is_all_or_nothing():
    all_or_nothing(_index, lambda ix: ix.add(NEW, metadata=["x", "y", "z"]), _index_state,
                   ["VectorIndex.add:stored", "VectorIndex.add:ids", "VectorIndex.add:metadata",
                    "VectorIndex.add:rows"])


def test_index_add_failing_after_the_c_rows_leaves_no_phantom_id():
    """The issue's case: MemoryError after the C rows were stored. Before: len() counted an id
    that `in` and get() denied, and the id could be added twice."""
    ix = _index()
    with _faults.armed("VectorIndex.add:metadata", MemoryError()), pytest.raises(MemoryError):
        ix.add(NEW[0], ids="new")
    assert len(ix) == 6 and "new" not in ix and ix._store.size == 6
    ix.add(NEW[0], ids="new")
    assert len(ix) == 7 and ix.get("new")[0].tobytes() == NEW[0].tobytes()
    with pytest.raises(sm.ValidationError, match="already in the index"):
        ix.add(NEW[0], ids="new")


def test_index_remove_is_all_or_nothing():
    all_or_nothing(_index, lambda ix: ix.remove(["b", 9, "a"]), _index_state,
                   ["VectorIndex.remove:copied", "VectorIndex.remove:row"])


def test_index_load_failing_leaves_nothing_half_built(tmp_path):
    path = tmp_path / "ix.safetensors"
    _index().save(path)
    with _faults.armed("VectorIndex.add:rows", MemoryError()), pytest.raises(MemoryError):
        sm.VectorIndex.load(path)
    assert _index_state(sm.VectorIndex.load(path)) == _index_state(_index())


# ---- Training.restore --------------------------------------------------------------------------

TEXT = "the cat sat on the mat while the dog ran in the fog. " * 40
TOK = sm.Tokenizer(TEXT)


def _trainer():
    model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 2, 16, seed=1))
    return sm.Training(model, TOK, TEXT, 16, 4, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    tr = _trainer()
    tr.train(3, log_every=0, eval_every=3, eval_batches=1)
    tr.metadata = {"data": None}
    tr.save_checkpoint(path)
    tr.model.close()
    return path


def _training_state(tr):
    return (tr.model.flat_params.tobytes(), tr._m.tobytes(), tr._v.tobytes(),
            json.dumps(tr.model.dropout_rng_state, sort_keys=True),
            json.dumps(tr._rng.bit_generator.state, sort_keys=True), tr.step, tr._adam_t,
            tr.best_val_loss, json.dumps(tr.metadata))


def test_training_restore_is_all_or_nothing(checkpoint):
    all_or_nothing(_trainer, lambda tr: tr.restore(checkpoint), _training_state,
                   ["Training.restore:saved", "TransformerModel.load_state_dict:tensor",
                    "Training.restore:params",
                    "Training.restore:moments", "Training.restore:dropout"])


def test_faults_are_inert_unless_armed():
    with _faults.trace() as seen:
        _faults.point("x")
    assert seen == ["x"]
    with _faults.armed("x", MemoryError()):
        with pytest.raises(MemoryError):
            _faults.point("x")
        _faults.point("x")                     # armed once: passes the second time
    _faults.point("x")


# ---- TransformerModel.load_state_dict ----------------------------------------------------------

def _model():
    return sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 2, 16, seed=1))


NEW_WEIGHTS = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 2, 16, seed=9)).state_dict()


def test_load_state_dict_is_all_or_nothing():
    """One point per tensor copied: a failure after any of them puts every tensor back."""
    make, call = _model, lambda m: m.load_state_dict(NEW_WEIGHTS)
    state = lambda m: m.flat_params.tobytes()          # noqa: E731
    obj = make()
    with _faults.trace() as seen:
        call(obj)
    assert len(seen) == len(NEW_WEIGHTS)               # a point after every tensor
    for k in range(len(seen)):
        for exc in FAILURES:
            obj = make()
            before = state(obj)
            # fail after the k-th tensor: let the first k points pass
            _faults._armed.clear()
            passes = iter(range(k + 1))

            def point(name, _orig=_faults.point):
                if next(passes) == k:
                    raise exc
            _faults_point = _faults.point
            _faults.point = point
            try:
                with pytest.raises(type(exc)):
                    call(obj)
            finally:
                _faults.point = _faults_point
            assert state(obj) == before
            call(obj)
            assert state(obj) != before
