"""test_disposal.py - one contract for everything that owns C memory (MemoryPool, VectorIndex,
TransformerModel): dispose() and `with`, idempotent, every later call raises
ObjectDisposedError, and disposing while other threads use the object is safe (their calls
finish or raise ObjectDisposedError; nothing crashes, nothing is freed under a running call)."""
import threading

import numpy as np
import pytest

import smallmind as sm


def _pool():
    pool = sm.MemoryPool()

    def use():
        with pool.rent(4096) as buf:
            a = np.asarray(buf)
            a[:] = 1.0
            s = float(a.sum())
            del a
        return s
    return pool, use, [lambda: pool.rent(1), lambda: pool.stats(), lambda: pool.trim()]


def _index():
    index = sm.VectorIndex(32)
    index.add(np.random.default_rng(0).standard_normal((20000, 32)))
    q = np.ones(32, np.float32)
    return index, (lambda: index.search(q, 5)), [lambda: index.search(q, 1), lambda: index.add(q),
                                                  lambda: len(index)]


def _model():
    model = sm.TransformerModel(sm.ModelConfig(17, 32, 2, 2, 32)).eval()
    idx = np.zeros((2, 32), np.int32)
    return model, (lambda: model.forward(idx)), [lambda: model.forward(idx), lambda: model.train(),
                                                  lambda: model.state_dict()]


@pytest.mark.parametrize("make", [_pool, _index, _model], ids=["MemoryPool", "VectorIndex",
                                                               "TransformerModel"])
def test_dispose_contract_under_threads(make):
    obj, use, later = make()
    use()                                   # works before
    outcomes, start = [], threading.Barrier(5)

    def worker():
        start.wait()
        try:
            for _ in range(200):
                use()
            outcomes.append("done")
        except sm.ObjectDisposedError:
            outcomes.append("disposed")

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    start.wait()
    obj.dispose()                           # while the workers run
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert len(outcomes) == 4 and set(outcomes) <= {"done", "disposed"}
    obj.dispose()                           # idempotent
    for call in later:
        with pytest.raises(sm.ObjectDisposedError):
            call()
    obj2, use2, _ = make()
    with obj2 as same:                      # `with` disposes on exit
        assert same is obj2
        use2()
    with pytest.raises(sm.ObjectDisposedError):
        use2()
