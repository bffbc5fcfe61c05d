"""test_sampling.py - Sampling: greedy decoding equals the argmax of full forward passes (with
the window sliding past block_size), seeded draws are reproducible and thread-independent, stop
strings, streaming, cancellation, pool hygiene and bad arguments."""
import asyncio
import threading
import time

import numpy as np
import pytest
from conftest import CountdownEvent

import smallmind as sm
from smallmind.generation.sampling import sample_next

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TOK = sm.Tokenizer(TEXT)


@pytest.fixture(scope="module")
def model():
    m = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 24, 2, 2, 32, seed=3))
    sm.Training(m, TOK, TEXT, 24, 8, seed=1).train(120, 1e-2, log_every=0)
    return m.eval()


def _random_model(V, T, seed=0):
    """Untrained weights, sharpened so that the context (and the window policy) matters."""
    m = sm.TransformerModel(sm.ModelConfig(V, T, 2, 2, 32, seed=seed)).eval()
    rng = np.random.default_rng(seed)
    for v in m.state_dict().values():
        v[...] += rng.standard_normal(v.shape).astype(np.float32) * 0.2
    return m


def test_nan_logits_raise_numerical_error_instead_of_picking_a_token():
    # Finite weights that overflow float32 on the way to the logits (found by fuzz/: greedy
    # decoding used to return token 0 silently, sampling failed inside numpy).
    m = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 8, 1, 2, 8, seed=0)).eval()
    sd = m.state_dict()
    w = sd["transformer.wte.weight"]            # tied: also the LM head
    w[...] = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * 1e30
    sd["transformer.ln_f.bias"][...] = 1e30     # logits: sums of +-1e60 -> inf - inf = NaN
    assert not np.isfinite(m.forward(np.zeros((1, 1), np.int32))).all()
    s = sm.Sampling(m, TOK)
    calls = [lambda: s.generate("a", 3, temperature=0), lambda: s.generate("a", 3, seed=1),
             lambda: list(s.stream("a", 3, temperature=0)),
             lambda: s.generate_batch(["a", "b"], 3, temperature=0),
             lambda: s.generate_batch(["a", "b"], 3, seed=2)]
    for call in calls:
        with pytest.raises(sm.NumericalError, match="NaN or infinity"):
            call()
    assert isinstance(sm.NumericalError("x"), FloatingPointError)


def _reference_greedy(m, ids, n, window):
    """Greedy decoding by full forward passes over the window each policy defines."""
    T = m.config.block_size
    keep = T if window == "slide" else T // 2
    ctx, vis, out = list(ids), list(ids[-T:]), []
    for _ in range(n):
        nxt = int(np.argmax(m.forward(np.array([vis], np.int32))[0, -1]))
        out.append(nxt)
        ctx.append(nxt)
        vis.append(nxt)
        if len(vis) > T:
            vis = vis[-keep:]
    return out


@pytest.mark.parametrize("window", ["shift", "slide"])
def test_greedy_equals_forward_argmax_past_block_size(window):
    m = _random_model(TOK.vocab_size, 16)
    prompt = "the quick"                  # 9 + 60 tokens: the 16-token window moves
    got = sm.Sampling(m, TOK, window=window).generate(prompt, 60, temperature=0,
                                                      return_details=True).tokens
    assert got == _reference_greedy(m, TOK.encode(prompt), 60, window)
    other = "slide" if window == "shift" else "shift"
    assert got != _reference_greedy(m, TOK.encode(prompt), 60, other)   # the policies differ
    s = sm.Sampling(m, TOK, window=window)
    prompts = ["the", "the quick brown fox jumps over", "lazy"]  # the second is cut to 16
    assert s.generate_batch(prompts, 40, temperature=0) == [s.generate(p, 40, temperature=0)
                                                           for p in prompts]
    with pytest.raises(sm.ValidationError, match="window"):
        sm.Sampling(m, TOK, window="crop")


def test_tiny_block_sizes_and_padded_vocab():
    for T in (1, 2, 3):                   # the smallest windows still move correctly
        m = _random_model(TOK.vocab_size + 5, T, seed=T)   # 5 ids the tokenizer lacks
        for window in ("shift", "slide"):
            s = sm.Sampling(m, TOK, window=window)
            r = s.generate("the", 12, temperature=0, return_details=True)
            assert len(r.tokens) == 12 and max(r.tokens) < TOK.vocab_size
            assert s.generate_batch(["the", "a"], 12, temperature=0)[0] == r.text
            assert len(s.generate("the", 12, temperature=1.0, seed=1)) == 12


def test_seeded_generation_is_reproducible_and_thread_independent(model):
    kw = dict(max_new_tokens=50, temperature=2.0, top_k=20, top_p=0.99, seed=7)
    a = sm.Sampling(model, TOK, threads=1).generate("the", **kw)
    b = sm.Sampling(model, TOK, threads=2).generate("the", **kw)
    c = sm.Sampling(model, TOK).generate("the", **dict(kw, seed=8))
    assert a == b and len(a) == 50 and a != c
    serial = [sm.Sampling(model, TOK).generate("the", **dict(kw, seed=s)) for s in range(8)]
    got = [None] * 8

    def work(i):
        got[i] = sm.Sampling(model, TOK, threads=1).generate("the", **dict(kw, seed=i))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == serial


def test_sample_next_filters():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -1.0, 4.8], np.float32)
    assert sample_next(logits, 0.0, 0, 1.0, rng) == 1
    draws = {sample_next(logits, 1.0, 2, 1.0, rng) for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, 0, 0.3, rng) for _ in range(200)}
    assert draws == {1}                   # the most likely token alone reaches p = 0.3


def test_stop_strings_and_streaming(model):
    s = sm.Sampling(model, TOK)
    r = s.generate("the quick", 80, temperature=0, stop=["dog", "zzz"], return_details=True)
    full = s.generate("the quick", 80, temperature=0)
    assert r.finish_reason == "stop" and "dog" not in r.text
    assert full.startswith(r.text + "dog")
    pieces = list(s.stream("the quick", 80, temperature=0, stop="dog"))
    assert "".join(pieces) == r.text and len(pieces) > 1
    assert "".join(s.stream("the", 30, temperature=0)) == s.generate("the", 30, temperature=0)
    d = s.generate("the", 10, temperature=0, return_details=True)
    assert d.finish_reason == "length" and d.new_tokens == 10 and d.prompt_tokens == 3
    assert s.generate("the", 0) == ""


def test_cancellation_and_pool_hygiene(model):
    pool = sm.default_pool()
    before = pool.stats()["outstanding_bytes"]
    s = sm.Sampling(model, TOK)
    with pytest.raises(sm.CancelledError) as e:
        s.generate("the", 10 ** 6, temperature=0, cancel=CountdownEvent(3))
    # cancel is polled before each call of the C loop (each makes at least one token and
    # returns within CHUNK_SECONDS): 3 calls ran; what they made is kept, the start of the
    # uncancelled output
    n = e.value.result.new_tokens
    assert 3 <= n < 10 ** 6
    assert e.value.result.text == s.generate("the", n, temperature=0)
    it = s.stream("the", 50, temperature=0)
    next(it)
    it.close()                            # a stream closed early gives its cache back
    src = sm.CancellationTokenSource()
    src.cancel()
    with pytest.raises(sm.CancelledError):
        list(s.stream("the", 5, cancel=src.token))
    assert pool.stats()["outstanding_bytes"] == before


def test_bad_arguments(model):
    s = sm.Sampling(model, TOK)
    for kw, exc, match in [(dict(max_new_tokens=-1), sm.ValidationError, "max_new_tokens"),
                           (dict(temperature=-0.1), sm.ValidationError, "temperature"),
                           (dict(top_k=-1), sm.ValidationError, "top_k"),
                           (dict(top_p=0.0), sm.ValidationError, "top_p"),
                           (dict(top_p=1.5), sm.ValidationError, "top_p"),
                           (dict(seed=-3), sm.ValidationError, "seed"),
                           (dict(stop=[""]), sm.ValidationError, "stop"),
                           (dict(stop=3), TypeError, "stop"),
                           (dict(cancel="no"), TypeError, "cancel")]:
        with pytest.raises(exc, match=match):
            s.generate("the", **kw)
    with pytest.raises(sm.ValidationError, match="prompt"):
        s.generate("")
    with pytest.raises(TypeError, match="prompt"):
        s.generate(b"the")
    with pytest.raises(sm.ValidationError, match="vocab_size"):
        sm.Sampling(sm.TransformerModel(sm.ModelConfig(3, 8, 1, 1, 4)), TOK)
    with pytest.raises(TypeError, match="model"):
        sm.Sampling("m", TOK)


# ---- asyncio and the concurrency patterns ------------------------------------------------------

def test_async_twins_equal_sync_and_cancel_frees_everything(model):
    s = sm.Sampling(model, TOK)
    want = s.generate("the", 30, temperature=0)
    before = sm.default_pool().stats()["outstanding_bytes"]

    async def main():
        got = await s.generate_async("the", 30, temperature=0)
        parts = [p async for p in s.stream_async("the", 30, temperature=0)]
        task = asyncio.create_task(s.generate_async("the", 10 ** 6, temperature=0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        agen = s.stream_async("the", 10 ** 6, temperature=0)
        await agen.__anext__()
        await agen.aclose()                # closing a stream mid-way stops its worker
        return got, "".join(parts)

    got, streamed = asyncio.run(main())
    assert got == want == streamed
    assert sm.default_pool().stats()["outstanding_bytes"] == before


def test_sampler_pool_is_bounded_and_shared(model):
    pool = sm.SamplerPool(model, TOK, size=2, threads_per_request=1)
    serial = [sm.Sampling(model, TOK).generate("the", 20, temperature=1.0, seed=i) for i in range(8)]
    got = [None] * 8

    def work(i):
        with pool.get() as sampler:
            got[i] = sampler.generate("the", 20, temperature=1.0, seed=i)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == serial and pool.available == 2
    with pool.get(), pool.get():
        assert pool.available == 0
        with pytest.raises(TimeoutError):
            with pool.get(timeout=0.01):
                pass
    pool.close()
    with pytest.raises(sm.ObjectDisposedError):
        with pool.get():
            pass
    with pytest.raises(sm.ValidationError, match="size"):
        sm.SamplerPool(model, TOK, size=0)


def test_throttled_service_limits_concurrency_and_times_out(model):
    svc = sm.ThrottledInferenceService(model, TOK, max_concurrency=2, threads_per_request=1)
    serial = [sm.Sampling(model, TOK).generate("the", 100, temperature=1.0, seed=i) for i in range(6)]
    peak = []

    async def one(i):
        peak.append(svc.active)
        text = await svc.generate("the", 100, temperature=1.0, seed=i)
        peak.append(svc.active)
        return text

    async def main():
        got = await asyncio.gather(*(one(i) for i in range(6)))
        streamed = "".join([p async for p in svc.stream("the", 100, temperature=1.0, seed=0)])
        slow = sm.ThrottledInferenceService(model, TOK, max_concurrency=1, timeout=0.05)
        with pytest.raises(asyncio.TimeoutError):
            await slow.generate("the", 10 ** 6, temperature=0)
        slow.close()
        return got, streamed

    stop = threading.Event()

    def watch():                           # samples the number of running generations
        while not stop.is_set():
            peak.append(svc.active)
            stop.wait(0.0005)

    watcher = threading.Thread(target=watch)
    before = sm.default_pool().stats()["outstanding_bytes"]
    watcher.start()
    try:
        got, streamed = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert got == serial and streamed == serial[0]
    assert max(peak) == 2 and svc.active == 0
    assert sm.default_pool().stats()["outstanding_bytes"] == before
    svc.close()
    with pytest.raises(sm.ObjectDisposedError):
        asyncio.run(svc.generate("the", 3))
    with pytest.raises(sm.ValidationError, match="max_concurrency"):
        sm.ThrottledInferenceService(model, TOK, max_concurrency=0)


def test_generate_batch_equals_one_by_one(model):
    s = sm.Sampling(model, TOK)
    prompts = ["the", "the quick brown fox jumps over", "lazy"]
    greedy = s.generate_batch(prompts, 40, temperature=0)       # the longest slides past 24
    assert greedy == [s.generate(p, 40, temperature=0) for p in prompts]
    det = s.generate_batch(prompts, 60, temperature=0, stop="dog", return_details=True)
    for p, r in zip(prompts, det):
        one = s.generate(p, 60, temperature=0, stop="dog", return_details=True)
        assert (r.text, r.finish_reason) == (one.text, one.finish_reason)
    sampled = s.generate_batch(prompts, 30, temperature=1.0, seed=4)
    assert sampled == s.generate_batch(prompts, 30, temperature=1.0, seed=4)
    with pytest.raises(sm.ValidationError, match="prompts"):
        s.generate_batch([])
    with pytest.raises(sm.ValidationError, match="prompts\\[1\\]"):
        s.generate_batch(["the", ""])
    with pytest.raises(sm.CancelledError) as e:
        s.generate_batch(prompts, 10 ** 6, temperature=0, cancel=CountdownEvent(3))
    # polled before each call of the C loop (3 calls, each at least one step): every row the
    # same number of tokens, the start of its uncancelled output
    counts = {r.new_tokens for r in e.value.results}
    assert len(counts) == 1 and 3 <= counts.pop() < 10 ** 6
    for p, r in zip(prompts, e.value.results):
        assert r.text == s.generate(p, r.new_tokens, temperature=0)


# ---- under load ---------------------------------------------------------------------------------

def _outstanding():
    s = sm.default_pool().stats()
    return s["outstanding_buffers"], s["outstanding_bytes"]


def test_many_threads_many_seeded_generations_equal_serial(model):
    jobs = [dict(prompt=p, max_new_tokens=40, temperature=t, top_k=k, top_p=tp, seed=seed)
            for seed, (p, t, k, tp) in enumerate(
                [("the", 1.0, 0, 1.0), ("quick", 0.7, 5, 1.0), ("lazy dog", 1.3, 0, 0.9),
                 ("fox", 0.0, 0, 1.0)] * 8)]          # 32 generations, past the 24-token window
    serial = [sm.Sampling(model, TOK).generate(**j) for j in jobs]
    got = [None] * len(jobs)

    def work(t):
        s = sm.Sampling(model, TOK, threads=1 + t % 2)   # thread counts differ too
        for i in range(t, len(jobs), 8):
            got[i] = s.generate(**jobs[i])

    ts = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert got == serial


def test_cancellation_under_load_leaves_nothing_outstanding(model):
    before = _outstanding()
    outcomes = [None] * 12
    sources = [sm.CancellationTokenSource() for _ in range(12)]

    def work(i):
        s = sm.Sampling(model, TOK, threads=1)
        try:
            if i % 3 == 0:
                for _ in s.stream("the", 10 ** 6, temperature=1.0, seed=i, cancel=sources[i].token):
                    pass
            else:
                s.generate("the", 10 ** 6 if i % 3 == 1 else 50, temperature=1.0, seed=i,
                           cancel=sources[i].token)
            outcomes[i] = "done"
        except sm.CancelledError as e:
            outcomes[i] = "cancelled" if e.result.new_tokens > 0 or i % 3 == 0 else "early"

    ts = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in ts:
        t.start()
    time.sleep(0.2)                        # everyone is decoding (or done)
    for i, src in enumerate(sources):
        if i % 3 != 2:
            src.cancel()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert outcomes == ["cancelled", "cancelled", "done"] * 4
    assert _outstanding() == before


def test_leaving_the_service_right_after_cancelling_a_task_does_not_wait_for_it(model):
    # Pattern 4 of the docs: cancel a long task, then leave `async with` at once. __aexit__ used
    # to block the event loop in executor.shutdown, so the cancellation never reached the worker
    # and the exit waited for the whole generation (10**7 tokens: many minutes). A watchdog
    # thread turns that into a failure instead of a hung suite.
    before = _outstanding()
    outcome = {}

    async def main(delay):
        async with sm.ThrottledInferenceService(model, TOK, max_concurrency=2,
                                                threads_per_request=1) as svc:
            task = asyncio.create_task(svc.generate("the", 10 ** 7, seed=1))
            await asyncio.sleep(delay)
            task.cancel()
        try:
            await task
            return "finished"
        except asyncio.CancelledError:
            return "cancelled"
        except sm.ObjectDisposedError:      # the task reached the executor after it closed
            return "closed"

    def run():
        outcome["delays"] = [asyncio.run(main(d)) for d in (0.05, 0.005, 0.0005, 0.0)]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "leaving the service waited for a cancelled generation"
    assert all(o in ("cancelled", "closed") for o in outcome["delays"]), outcome
    assert outcome["delays"][0] == "cancelled"
    assert _outstanding() == before


def test_asyncio_tasks_cancelled_mid_stream_do_not_deadlock(model):
    before = _outstanding()

    async def consume(svc, i, n_pieces):
        got = []
        stream = svc.stream("the", 10 ** 6, temperature=1.0, seed=i)
        try:
            async for piece in stream:
                got.append(piece)
                if len(got) == n_pieces:
                    break
        finally:
            await stream.aclose()          # closing the stream early frees its slot at once
        return len(got)

    async def main():
        async with sm.ThrottledInferenceService(model, TOK, max_concurrency=2,
                                                threads_per_request=1) as svc:
            # 8 endless streams on 2 slots: some are cancelled mid-stream, some while queued
            tasks = [asyncio.create_task(consume(svc, i, 10 ** 9)) for i in range(8)]
            await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            # streams that the consumer stops early, and the service still serves afterwards
            assert await asyncio.gather(*(consume(svc, i, 3) for i in range(4))) == [3] * 4
            text = await svc.generate("the", 20, temperature=0)
            assert text == sm.Sampling(model, TOK).generate("the", 20, temperature=0)
            assert svc.active == 0

    asyncio.run(asyncio.wait_for(main(), 60))   # a deadlock fails here instead of hanging CI
    assert _outstanding() == before


def test_generate_batch_rows_do_not_depend_on_the_batch():
    m = _random_model(TOK.vocab_size, 32, seed=5)
    s = sm.Sampling(m, TOK)
    prompts = ["the quick brown", "over the lazy d", "jumps over the ", "the", "dog. the quick",
               "the lazy dog. t", "brown fox jumps", "a quick fox is "]   # 6 of 15 characters
    batch = s.generate_batch(prompts, 60, temperature=0, return_details=True)  # windows move
    assert [r.tokens for r in batch] == [s.generate(p, 60, temperature=0, return_details=True).tokens
                                         for p in prompts]


@pytest.fixture(autouse=True)
def _no_busy_hint(monkeypatch):
    """Each test starts without another generation's fallback hint (it is process-wide)."""
    from smallmind.generation.sampling import _StepThreads
    monkeypatch.setattr(_StepThreads, "_busy_until", float("-inf"))


class _FakeClock:
    """A clock that a fake decode step advances by the cost of its thread count."""

    def __init__(self):
        self.now = 0.0
        self.cost = {1: 1.0, 2: 0.6}
        self.calls = []

    def __call__(self):
        return self.now

    def step(self, threads):
        """One call of the generation loop making one token, as GPTGenerator.run returns it."""
        self.calls.append(threads)
        self.now += self.cost[threads]
        return None, np.ones(1, np.int64), None, 0.0


def test_step_threads_fall_back_to_one_thread_under_contention_and_come_back():
    from smallmind.generation.sampling import _StepThreads
    clock = _FakeClock()
    st = _StepThreads(2, clock=clock)
    for _ in range(20):
        st.run(clock.step)
    assert clock.calls[:4] == [2, 1, 2, 1]              # both counts timed first
    assert clock.calls[4:] == [2] * 16                   # 2 threads were faster
    clock.cost[2] = 60.0                                 # another process takes a core
    clock.calls.clear()
    for _ in range(200):
        st.run(clock.step)
    # one slow step, then single-threaded steps with retries (pairs of 2-thread steps) at
    # growing intervals
    assert clock.calls[0] == 2 and clock.calls[1] == 1
    runs, i = [], 1
    while i < len(clock.calls):
        j = i
        while j < len(clock.calls) and clock.calls[j] == clock.calls[i]:
            j += 1
        runs.append((clock.calls[i], j - i))
        i = j
    singles = [n for t, n in runs if t == 1][:-1]        # the last run may be cut short
    assert all(n == 2 for t, n in runs if t == 2)
    assert len(singles) >= 3 and all(b == 2 * a for a, b in zip(singles, singles[1:]))
    assert clock.calls.count(2) <= 10
    clock.cost[2] = 0.6                                  # the core is free again
    clock.calls.clear()
    for _ in range(300):
        st.run(clock.step)
    assert clock.calls[-50:] == [2] * 50                 # back on 2 threads after a retry


def test_step_threads_keep_one_thread_when_it_is_faster_and_never_probe_with_one():
    from smallmind.generation.sampling import _StepThreads
    clock = _FakeClock()
    clock.cost = {1: 0.5, 2: 0.7}                        # a small model: 1 thread wins
    st = _StepThreads(2, clock=clock)
    for _ in range(40):
        st.run(clock.step)
    assert clock.calls[:5] == [2, 1, 2, 1, 1] and clock.calls.count(2) <= 6
    single = _StepThreads(1, clock=clock)
    clock.calls.clear()
    for _ in range(5):
        single.run(clock.step)
    assert clock.calls == [1] * 5


def test_generation_is_identical_whatever_the_step_threads_choose(model, monkeypatch):
    # Force a switch every few steps: the text must not change (bits never depend on threads).
    from smallmind.generation import sampling
    ref = sm.Sampling(model, TOK, threads=2).generate("the", 60, temperature=0.9, seed=4)
    ref_b = sm.Sampling(model, TOK, threads=2).generate_batch(["the", "a"], 30, seed=2)

    class Flipping(sampling._StepThreads):
        def run(self, fn, max_steps, *args):
            # calls of at most 3 steps, on 1 and 2 threads in turn
            self.steps += 1
            self.current = 1 + self.steps % 2
            return fn(min(max_steps, 3), *args, self.current)

    monkeypatch.setattr(sampling, "_StepThreads", Flipping)
    assert sm.Sampling(model, TOK, threads=2).generate("the", 60, temperature=0.9, seed=4) == ref
    assert sm.Sampling(model, TOK, threads=2).generate_batch(["the", "a"], 30, seed=2) == ref_b


def test_a_fallback_makes_the_next_generations_start_on_one_thread():
    from smallmind.generation.sampling import _StepThreads
    clock = _FakeClock()
    first = _StepThreads(2, clock=clock)
    for _ in range(10):
        first.run(clock.step)
    assert _StepThreads(2, clock=clock).current == 2          # nothing fell back yet
    clock.cost[2] = 60.0
    first.run(clock.step)                                     # a slow step: fallback + hint
    assert first.current == 1
    clock.calls.clear()
    second = _StepThreads(2, clock=clock)                     # starts within the hint
    assert second.current == 1
    for _ in range(12):
        second.run(clock.step)
    assert clock.calls[:8] == [1] * 8 and clock.calls[8:10] == [2, 2]   # then a retry
    clock.now += _StepThreads.BUSY_HINT_S + 1000              # long after: back to probing
    assert _StepThreads(2, clock=clock).current == 2
