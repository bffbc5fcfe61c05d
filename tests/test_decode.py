"""test_decode.py - incremental inference in C: a prefill pass over prompts fills a KV cache,
then one call per token extends it; the logits equal those of a full forward pass."""
import threading

import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core


def _model(V=13, T=150, L=2, NH=2, C=24, seed=0):
    m = sm.TransformerModel(sm.ModelConfig(V, T, L, NH, C, seed=seed)).eval()
    rng = np.random.default_rng(seed)
    for v in m.state_dict().values():   # sharper than the init, so positions matter
        v[...] += rng.standard_normal(v.shape).astype(np.float32) * 0.1
    return m


def _run(m, seq, prompt, threads=None):
    B, T = seq.shape
    cache = _core.GPTCache(m.core_config, B, T)
    out = [_core.gpt_prefill(m.flat_params, m.core_config, np.ascontiguousarray(seq[:, :prompt]), cache,
                             threads)]
    for t in range(prompt, T):
        out.append(_core.gpt_decode(m.flat_params, m.core_config, np.ascontiguousarray(seq[:, t]), cache,
                                    threads))
    assert cache.lengths == [T] * B
    return np.stack(out, axis=1)     # (B, T - prompt + 1, V): logits of positions prompt-1 ..


@pytest.mark.parametrize("V,T,L,NH,C,B,prompt", [
    (13, 150, 2, 2, 24, 3, 7),     # crosses two 64-position blocks; head size 12 (padded rows)
    (40, 70, 1, 1, 16, 1, 1),      # a one-token prompt
    (29, 80, 2, 4, 64, 20, 70),    # prefill of 1400 tokens runs in two chunks
])
def test_prefill_then_decode_equals_forward(V, T, L, NH, C, B, prompt):
    m = _model(V, T, L, NH, C)
    seq = np.random.default_rng(1).integers(0, V, (B, T)).astype(np.int32)
    got = _run(m, seq, prompt)
    want = m.forward(seq)[:, prompt - 1:]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_thread_count_and_concurrency_do_not_change_bits():
    m = _model()
    seqs = [np.random.default_rng(s).integers(0, 13, (2, 90)).astype(np.int32) for s in range(4)]
    serial = [_run(m, s, 5, threads=1) for s in seqs]
    assert np.array_equal(_run(m, seqs[0], 5, threads=2), serial[0])
    results = [None] * 4

    def work(i):
        results[i] = _run(m, seqs[i], 5, threads=1)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(r, s) for r, s in zip(results, serial))


def test_errors_and_cache_lifetime():
    m = _model(T=64)
    cfg, p = m.core_config, m.flat_params
    with pytest.raises(sm.ValidationError, match="capacity"):
        _core.GPTCache(cfg, 1, 65)
    cache = _core.GPTCache(cfg, 2, 8)
    assert cache.capacity == 8 and cache.batch == 2 and cache.lengths == [0, 0]
    with pytest.raises(sm.ValidationError, match="empty"):
        _core.gpt_decode(p, cfg, np.zeros(2, np.int32), cache)
    with pytest.raises(sm.ValidationError, match="rows"):
        _core.gpt_prefill(p, cfg, np.zeros((3, 4), np.int32), cache)
    with pytest.raises(sm.ValidationError, match="positions"):
        _core.gpt_prefill(p, cfg, np.zeros((2, 9), np.int32), cache)
    with pytest.raises(sm.ValidationError, match="idx"):
        _core.gpt_prefill(p, cfg, np.full((2, 4), 13, np.int32), cache)
    _core.gpt_prefill(p, cfg, np.zeros((2, 7), np.int32), cache)
    with pytest.raises(sm.ValidationError, match="tokens"):
        _core.gpt_decode(p, cfg, np.array([0, -1], np.int32), cache)
    with pytest.raises(sm.ValidationError, match="entries"):
        _core.gpt_decode(p, cfg, np.zeros(3, np.int32), cache)
    _core.gpt_decode(p, cfg, np.zeros(2, np.int32), cache)
    assert cache.lengths == [8, 8]
    with pytest.raises(sm.ValidationError, match="full"):
        _core.gpt_decode(p, cfg, np.zeros(2, np.int32), cache)
    other = _model(V=14, T=64)
    with pytest.raises(sm.ValidationError, match="configuration"):
        _core.gpt_decode(other.flat_params, other.core_config, np.zeros(2, np.int32), cache)
    # a new prefill starts the sequences over
    _core.gpt_prefill(p, cfg, np.zeros((2, 3), np.int32), cache)
    assert cache.lengths == [3, 3]
    before = sm.default_pool().stats()["outstanding_bytes"]
    nbytes = cache.nbytes
    assert nbytes > 0
    cache.close()
    cache.close()
    assert cache.closed and cache.nbytes == 0
    assert sm.default_pool().stats()["outstanding_bytes"] <= before - nbytes
    with pytest.raises(sm.ObjectDisposedError):
        _core.gpt_decode(p, cfg, np.zeros(2, np.int32), cache)


def test_prompts_of_different_lengths_share_a_cache():
    m = _model()
    rng = np.random.default_rng(5)
    lens = [3, 11, 70]
    seqs = [rng.integers(0, 13, 90).astype(np.int32) for _ in lens]
    cache = _core.GPTCache(m.core_config, 3, 100)
    first = [_core.gpt_prefill_seq(m.flat_params, m.core_config, np.ascontiguousarray(s[:n]), cache, b)
             for b, (s, n) in enumerate(zip(seqs, lens))]
    assert cache.lengths == lens
    for b, (s, n) in enumerate(zip(seqs, lens)):
        want = m.forward(s[None, :n])[0, -1]
        np.testing.assert_allclose(first[b], want, rtol=1e-4, atol=1e-5)
    for step in range(15):     # all advance together, each at its own position
        toks = np.array([s[n + step] for s, n in zip(seqs, lens)], np.int32)
        got = _core.gpt_decode(m.flat_params, m.core_config, toks, cache)
        for b, (s, n) in enumerate(zip(seqs, lens)):
            want = m.forward(s[None, :n + step + 1])[0, -1]
            np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(sm.ValidationError, match="seq"):
        _core.gpt_prefill_seq(m.flat_params, m.core_config, seqs[0][:4], cache, 3)


@pytest.mark.parametrize("V,L,NH,C,B", [
    (300, 2, 4, 128, 11),    # rows in groups of 8 + 3; columns split over threads
    (64, 1, 12, 768, 9),     # 768 x 3072 weights: the streaming form (8 rows, then 1)
])
def test_batched_decode_rows_equal_single_rows_bit_for_bit(V, L, NH, C, B):
    m = _model(V, 24, L, NH, C)
    rng = np.random.default_rng(7)
    lens = rng.integers(1, 12, B)
    seqs = [rng.integers(0, V, 20).astype(np.int32) for _ in range(B)]

    def fill(cache, rows):
        for b, i in enumerate(rows):
            _core.gpt_prefill_seq(m.flat_params, m.core_config, seqs[i][:lens[i]], cache, b, 1)

    def steps(rows, threads):
        cache = _core.GPTCache(m.core_config, len(rows), 24)
        fill(cache, rows)
        out = [_core.gpt_decode(m.flat_params, m.core_config,
                                np.array([seqs[i][lens[i] + s] for i in rows], np.int32), cache,
                                threads) for s in range(4)]
        cache.close()
        return np.stack(out, axis=1)       # (rows, 4, V)

    batched = steps(range(B), 1)
    for threads in (2, 3):
        assert np.array_equal(steps(range(B), threads), batched)
    for i in (0, B - 1):
        assert np.array_equal(steps([i], 2)[0], batched[i])
    want = m.forward(seqs[0][None, :lens[0] + 4])[0, lens[0]:]
    np.testing.assert_allclose(batched[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("V,L,NH,C", [(300, 2, 4, 128), (64, 1, 12, 768)])
def test_decoding_a_subset_of_sequences_equals_each_alone(V, L, NH, C):
    """A server's batch changes every step: decode(seqs=...) steps only the named sequences of
    a cache, in any order, each row with the bits it has alone; the others keep their state."""
    m = _model(V, 24, L, NH, C)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, V, n).astype(np.int32) for n in (2, 7, 11, 5)]
    nxt = rng.integers(0, V, (4, 3)).astype(np.int32)

    def alone(i):
        cache = _core.GPTCache(m.core_config, 1, 24)
        _core.gpt_prefill(m.flat_params, m.core_config, prompts[i][None], cache, 1)
        out = [_core.gpt_decode(m.flat_params, m.core_config, nxt[i, s:s + 1], cache, 1)[0]
               for s in range(3)]
        cache.close()
        return out

    want = [alone(i) for i in range(4)]
    cache = _core.GPTCache(m.core_config, 6, 24)      # slots 0 and 3 stay empty
    slot = {0: 4, 1: 1, 2: 5, 3: 2}
    for i, b in slot.items():
        _core.gpt_prefill_seq(m.flat_params, m.core_config, prompts[i], cache, b, 1)
    # step 0: all four, in a shuffled order; step 1: two of them; step 2: the other two, then
    # the first two
    done = [0, 0, 0, 0]                  # steps each prompt has taken
    for group in ([2, 0, 3, 1], [1, 3], [0, 2], [3, 1], [2, 0]):
        seqs = np.array([slot[i] for i in group], np.int32)
        toks = np.array([nxt[i, done[i]] for i in group], np.int32)
        got = _core.gpt_decode(m.flat_params, m.core_config, toks, cache, 2, seqs=seqs)
        for row, i in enumerate(group):
            assert np.array_equal(got[row], want[i][done[i]]), (group, i)
            done[i] += 1
    assert done == [3, 3, 3, 3]
    assert cache.lengths == [0, 10, 8, 0, 5, 14]
    params, cfg = m.flat_params, m.core_config
    with pytest.raises(sm.ValidationError, match="twice"):
        _core.gpt_decode(params, cfg, np.array([1, 1], np.int32), cache, seqs=np.array([1, 1], np.int32))
    with pytest.raises(sm.ValidationError, match="seqs"):
        _core.gpt_decode(params, cfg, np.array([1], np.int32), cache, seqs=np.array([6], np.int32))
    with pytest.raises(sm.ValidationError, match="seqs has 2 entries"):
        _core.gpt_decode(params, cfg, np.array([1], np.int32), cache, seqs=np.array([1, 2], np.int32))
    with pytest.raises(sm.ValidationError, match="empty"):
        _core.gpt_decode(params, cfg, np.array([1], np.int32), cache, seqs=np.array([0], np.int32))
    assert cache.lengths == [0, 10, 8, 0, 5, 14]        # refused calls change nothing
    cache.close()


def test_prefill_of_several_rows_in_one_pass_equals_row_by_row():
    m = _model()
    rng = np.random.default_rng(9)
    idx = rng.integers(0, 13, (3, 11)).astype(np.int32)
    one = _core.GPTCache(m.core_config, 5, 40)
    rows = [_core.gpt_prefill_seq(m.flat_params, m.core_config, idx[i], one, 1 + i) for i in range(3)]
    together = _core.GPTCache(m.core_config, 5, 40)
    got = _core.gpt_prefill_seq(m.flat_params, m.core_config, idx, together, 1)
    assert got.shape == (3, 13) and np.array_equal(got, np.stack(rows))
    assert together.lengths == [0, 11, 11, 11, 0]
    step = np.array([0, 1, 2, 3, 4], np.int32)
    for c in (one, together):               # fill rows 0 and 4 so the whole batch can decode
        _core.gpt_prefill_seq(m.flat_params, m.core_config, idx[0, :4], c, 0)
        _core.gpt_prefill_seq(m.flat_params, m.core_config, idx[1, :4], c, 4)
    assert np.array_equal(_core.gpt_decode(m.flat_params, m.core_config, step, one),
                          _core.gpt_decode(m.flat_params, m.core_config, step, together))
    with pytest.raises(sm.ValidationError, match="seq"):
        _core.gpt_prefill_seq(m.flat_params, m.core_config, idx, together, 3)     # rows 3..5 of 5
    with pytest.raises(sm.ValidationError, match="idx"):
        _core.gpt_prefill_seq(m.flat_params, m.core_config, idx[None], together, 0)


@pytest.mark.parametrize("V,T,L,NH,C", [(65, 256, 2, 4, 64), (40, 200, 2, 2, 24), (64, 320, 1, 12, 768)])
def test_a_prefill_finished_from_a_cached_prefix_equals_the_whole_prefill(V, T, L, NH, C):
    """The prefix cache's two calls: gpt_cache_copy moves a prompt's first positions between
    caches, gpt_prefill_extend computes the rest; logits, cache contents (seen through the
    next decode steps) and lengths equal a prefill of the whole prompt, bit for bit (head sizes
    16, 12 - padded - and 64; 1 and 2 threads)."""
    m = _model(V, T, L, NH, C)
    prm, cfg = m.flat_params, m.core_config
    rng = np.random.default_rng(5)
    for n, pre in [(69, 64), (133, 128), (T - 1, 64), (T - 1, (T - 6) // 64 * 64)]:
        ids = rng.integers(0, V, n).astype(np.int32)
        full = _core.GPTCache(cfg, 1, T)
        want = _core.gpt_prefill_seq(prm, cfg, ids, full, 0, 1)
        other = np.concatenate([ids[:pre], rng.integers(0, V, 5).astype(np.int32)])
        store = _core.GPTCache(cfg, 2, T)        # a different prompt with the same beginning
        _core.gpt_prefill_seq(prm, cfg, other, store, 1, 2)
        cache = _core.GPTCache(cfg, 3, T)
        _core.gpt_cache_copy(cache, 1, store, 1, pre)
        assert cache.lengths == [0, pre, 0]
        for threads in (1, 2):
            if threads == 2:
                _core.gpt_cache_copy(cache, 1, store, 1, pre)
            got = _core.gpt_prefill_extend(prm, cfg, ids, cache, 1, pre, threads)
            assert np.array_equal(got, want) and cache.lengths == [0, n, 0]
        nxt = rng.integers(0, V, 1).astype(np.int32)
        a = _core.gpt_decode(prm, cfg, nxt, full, 1)[0]
        b = _core.gpt_decode(prm, cfg, nxt, cache, 1, seqs=np.array([1], np.int32))[0]
        assert np.array_equal(a, b)
        for c in (full, store, cache):
            c.close()
    ids = rng.integers(0, V, 170).astype(np.int32)
    cache = _core.GPTCache(cfg, 2, T)
    _core.gpt_prefill_seq(prm, cfg, ids[:80], cache, 0, 1)
    for bad, match in [(dict(prefix=32), "prefix"), (dict(prefix=96), "multiple of 64"),
                       (dict(prefix=128), "prefix"), (dict(seq=1), "fewer than the prefix"),
                       (dict(seq=2), "seq")]:
        kw = dict(seq=0, prefix=64)
        kw.update(bad)
        with pytest.raises(sm.ValidationError, match=match):
            _core.gpt_prefill_extend(prm, cfg, ids, cache, **kw)
    with pytest.raises(sm.ValidationError, match="n"):
        _core.gpt_cache_copy(cache, 1, cache, 0, 81)          # more than sequence 0 holds
    with pytest.raises(sm.ValidationError, match="itself"):
        _core.gpt_cache_copy(cache, 0, cache, 0, 10)
    with pytest.raises(sm.ValidationError, match="configurations"):
        _core.gpt_cache_copy(_core.GPTCache(_model(V + 1, T, L, NH, C).core_config, 1, T), 0,
                             cache, 0, 10)
    assert cache.lengths == [80, 0]                           # refused calls change nothing
