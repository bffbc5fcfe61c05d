"""test_generate_loop.py - the C generation loop (_core.GPTGenerator, sm_generate.h): its tokens
equal a one-token-at-a-time reference built from gpt_decode / gpt_prefill_seq and sample_rows
(penalties and logit bias in float64 numpy) for every sampler setting, window moves included,
whatever the chunking, thread count or the other rows; log-probabilities against a float64
log-softmax; interrupt, time budget, NaN rows, bad arguments; concurrent loops bit for bit."""
import threading

import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core
from smallmind.generation.sampling import c_settings, seed_key, window_keep

V, NV = 40, 37          # the model's vocabulary and the ids that may be sampled (a tokenizer's)


@pytest.fixture(scope="module")
def model():
    return sm.TransformerModel(sm.ModelConfig(V, 24, 2, 2, 32, seed=7)).eval()


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=3),
    dict(temperature=1.3, top_k=5, seed=4),
    dict(temperature=0.7, top_p=0.8, seed=5),
    dict(temperature=1.0, top_k=9, top_p=0.6, seed=6),
    dict(temperature=0.8, seed=8, presence_penalty=0.7, frequency_penalty=0.4),
    dict(temperature=0.0, frequency_penalty=1.5),
    dict(temperature=1.1, seed=9, bias={3: 5.0, 11: -100.0, 20: 2.5}),
    dict(temperature=0.0, bias={0: 4.0}, presence_penalty=-0.5),
]


def _bias(kw):
    if "bias" not in kw:
        return None
    b = np.zeros(NV)
    for t, v in kw["bias"].items():
        b[t] = v
    return b


def reference(model, prompt, n, kw, keep):
    """One token per step in Python: the reference the C loop must reproduce bit for bit."""
    cfg, prm, T = model.core_config, model.flat_params, model.config.block_size
    cache = _core.GPTCache(cfg, 1, T)
    ctx = list(prompt[-T:])
    logits = _core.gpt_prefill_seq(prm, cfg, np.asarray(ctx, np.int32), cache, 0, 1)[:NV]
    held = len(ctx)
    settings = c_settings([kw.get("temperature", 0.0)], [kw.get("top_k", 0)],
                          [kw.get("top_p", 1.0)], NV)
    key = [seed_key(kw.get("seed"))]
    counts = np.zeros(NV)
    bias = _bias(kw)
    pres, freq = kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0)
    out = []
    for i in range(n):
        z = logits
        if bias is not None or ((pres or freq) and out):
            z = z.astype(np.float64)
            if bias is not None:
                z += bias
            if (pres or freq) and out:
                z -= freq * counts + pres * (counts > 0)
        row = np.asarray(z, np.float32)[None]
        t = int(_core.sample_rows(row, NV, *settings, key, [i], 1)[0])
        out.append(t)
        counts[t] += 1
        if i == n - 1:
            break
        ctx, held, logits = feed(model, cache, ctx, held, t, keep)
    cache.close()
    return out


def feed(model, cache, ctx, held, t, keep):
    """Token t into sequence 0 of the cache, one step: decoded at position `held`, or, with a
    full window, its last `keep` tokens prefilled again. Returns (ctx, held, next logits)."""
    cfg, prm = model.core_config, model.flat_params
    ctx = ctx + [t]
    if held < model.config.block_size:
        return ctx, held + 1, _core.gpt_decode(prm, cfg, np.asarray([t], np.int32), cache, 1)[0, :NV]
    ctx = ctx[-keep:]
    return ctx, len(ctx), _core.gpt_prefill_seq(prm, cfg, np.asarray(ctx, np.int32), cache, 0, 1)[:NV]


def start(model, prompts, n, kws, keep, B=None):
    """A cache with every prompt prefilled (row b: prompts[b]) and a generator over it."""
    cfg, prm, T = model.core_config, model.flat_params, model.config.block_size
    cache = _core.GPTCache(cfg, B or len(prompts), T)
    gen = _core.GPTGenerator(prm, cfg, cache, NV, keep)
    for b, (p, kw) in enumerate(zip(prompts, kws)):
        w = p[-T:]
        logits = _core.gpt_prefill_seq(prm, cfg, np.asarray(w, np.int32), cache, b, 1)
        t, k, tp = c_settings([kw.get("temperature", 0.0)], [kw.get("top_k", 0)],
                              [kw.get("top_p", 1.0)], NV)
        gen.set_row(b, w, logits, temperature=float(t[0]), top_k=int(k[0]), top_p=float(tp[0]),
                    key=seed_key(kw.get("seed")), presence_penalty=kw.get("presence_penalty", 0.0),
                    frequency_penalty=kw.get("frequency_penalty", 0.0), bias=_bias(kw),
                    logprobs=kw.get("logprobs"), remaining=n)
    return cache, gen


def drain(gen, rows, chunk, threads=1, logprobs=False):
    toks = {r: [] for r in rows}
    lps = {r: [] for r in rows}
    while any(gen.row(r)["remaining"] and not gen.row(r)["failed"] for r in rows):
        out, made, lp, _ = gen.run(chunk, 0.0, threads, logprobs)
        for r in rows:
            toks[r] += out[r, :made[r]].tolist()
            if logprobs:
                lps[r] += list(lp[r, :made[r]])
    return toks, lps


PROMPTS = [[1, 2, 3], list(range(5, 25)), [30, 4, 4, 9, 12, 0, 36]]


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("window", ["shift", "slide"])
def test_tokens_equal_the_one_step_reference(model, kw, window):
    keep = window_keep(model.config.block_size, window)
    n = 70                                          # past the 24-token window, more than once
    for p in PROMPTS:
        want = reference(model, p, n, kw, keep)
        for chunk in (1, 7, 1000):
            cache, gen = start(model, [p], n, [kw], keep)
            got, _ = drain(gen, [0], chunk)
            cache.close()
            assert got[0] == want, (p, chunk)


def test_rows_together_threads_and_chunking_do_not_change_a_row(model):
    keep = window_keep(model.config.block_size, "shift")
    kws = SETTINGS[:3] + SETTINGS[5:8]
    prompts = [PROMPTS[i % 3] for i in range(len(kws))]
    # rows of different lengths: each stops when its own budget is spent
    want = [reference(model, p, 30 + 9 * i, kw, keep) for i, (p, kw) in enumerate(zip(prompts, kws))]
    for threads, chunk in ((1, 1), (2, 5), (2, 10 ** 4)):
        cache, gen = start(model, prompts, 0, kws, keep, B=len(kws) + 2)
        for b in range(len(kws)):                   # per-row budgets
            w = prompts[b][-24:]
            logits = _core.gpt_prefill_seq(model.flat_params, model.core_config,
                                           np.asarray(w, np.int32), cache, b, 1)
            kw = kws[b]
            t, k, tp = c_settings([kw.get("temperature", 0.0)], [kw.get("top_k", 0)],
                                  [kw.get("top_p", 1.0)], NV)
            gen.set_row(b, w, logits, temperature=float(t[0]), top_k=int(k[0]),
                        top_p=float(tp[0]), key=seed_key(kw.get("seed")),
                        presence_penalty=kw.get("presence_penalty", 0.0),
                        frequency_penalty=kw.get("frequency_penalty", 0.0), bias=_bias(kw),
                        remaining=30 + 9 * b)
        got, _ = drain(gen, list(range(len(kws))), chunk, threads)
        cache.close()
        assert [got[b] for b in range(len(kws))] == want, (threads, chunk)


def test_stopping_a_row_leaves_the_others_alone(model):
    keep = window_keep(24, "shift")
    kws = [SETTINGS[1], SETTINGS[2]]
    want = reference(model, PROMPTS[1], 50, kws[1], keep)
    cache, gen = start(model, [PROMPTS[0], PROMPTS[1]], 50, kws, keep)
    out, made, _, _ = gen.run(5)
    assert made.tolist() == [5, 5]
    gen.stop_row(0)
    got = out[1, :5].tolist()
    rest, _ = drain(gen, [0, 1], 8)
    assert rest[0] == [] and gen.row(0)["generated"] == 5
    assert got + rest[1] == want
    cache.close()


def test_logprobs_equal_a_float64_log_softmax(model):
    keep = window_keep(24, "shift")
    kw = dict(temperature=0.9, seed=2, presence_penalty=0.3, frequency_penalty=0.2,
              bias={1: 3.0, 2: 3.0, 5: -1.0}, logprobs=5)
    cache, gen = start(model, [PROMPTS[2]], 40, [kw], keep)
    toks, lps = drain(gen, [0], 6, logprobs=True)
    cache.close()
    assert toks[0] == reference(model, PROMPTS[2], 40, kw, keep)
    # replay: the adjusted logits before each token, and their float64 log-softmax
    cfg, prm = model.core_config, model.flat_params
    cache = _core.GPTCache(cfg, 1, 24)
    ctx = list(PROMPTS[2])
    z = _core.gpt_prefill_seq(prm, cfg, np.asarray(ctx, np.int32), cache, 0, 1)[:NV]
    held, counts, bias = len(ctx), np.zeros(NV), _bias(kw)
    for i, (t, rec) in enumerate(zip(toks[0], lps[0])):
        a = z.astype(np.float64) + bias
        if i:
            a -= 0.2 * counts + 0.3 * (counts > 0)
        ls = a - a.max() - np.log(np.exp(a - a.max()).sum())
        assert rec["logprob"] == pytest.approx(ls[t], abs=1e-12)
        order = sorted(range(NV), key=lambda j: (-ls[j], j))[:5]
        assert rec["n"] == 5 and rec["top_id"][:5].tolist() == order
        np.testing.assert_allclose(rec["top_logprob"][:5], ls[order], atol=1e-12)
        counts[t] += 1
        ctx, held, z = feed(model, cache, ctx, held, t, keep)
    cache.close()


def test_logprob_ties_list_the_lower_id_first(model):
    """Equal biased logits (a huge bias on three ids makes them the only likely ones, equal
    in float64 up to the logits' own differences; here the logits are replaced outright)."""
    cfg, prm = model.core_config, model.flat_params
    cache = _core.GPTCache(cfg, 1, 24)
    _core.gpt_prefill_seq(prm, cfg, np.asarray([1, 2], np.int32), cache, 0, 1)
    gen = _core.GPTGenerator(prm, cfg, cache, NV, 12)
    z = np.zeros(NV, np.float32)
    z[[9, 4, 30]] = 2.0
    gen.set_row(0, [1, 2], z, temperature=0.0, logprobs=4, remaining=1)
    out, made, lp, _ = gen.run(1, logprobs=True)
    cache.close()
    assert out[0, 0] == 4                            # the first of the equal maxima
    assert lp[0, 0]["top_id"][:4].tolist() == [4, 9, 30, 0]


def test_interrupt_time_budget_and_zero_steps(model):
    keep = window_keep(24, "shift")
    cache, gen = start(model, [PROMPTS[0]], 10 ** 6, [SETTINGS[0]], keep)
    out, made, _, _ = gen.run(0)
    assert made.tolist() == [0]
    gen.interrupt()                     # set before the call: it returns after one step
    out, made, _, _ = gen.run(500)
    assert made.tolist() == [1]
    out, made, _, _ = gen.run(500)         # the flag was cleared
    assert made.tolist() == [500]
    out, made, _, _ = gen.run(10 ** 6, 1e-9)   # the budget is spent after the first step
    assert made.tolist() == [1]

    # interrupt from another thread ends an unbounded call
    timer = threading.Timer(0.05, gen.interrupt)
    timer.start()
    out, made, _, _ = gen.run(10 ** 7)
    timer.join()
    assert 1 <= made[0] < 10 ** 7
    cache.close()


def test_a_row_with_nan_logits_fails_alone(model):
    cfg, prm = model.core_config, model.flat_params
    cache = _core.GPTCache(cfg, 2, 24)
    gen = _core.GPTGenerator(prm, cfg, cache, NV, 12)
    for b in range(2):
        logits = _core.gpt_prefill_seq(prm, cfg, np.asarray([1, 2, 3], np.int32), cache, b, 1)
        if b == 0:
            logits[5] = np.nan
        gen.set_row(b, [1, 2, 3], logits, remaining=6)
    out, made, _, _ = gen.run(100)
    assert made.tolist() == [0, 6]
    assert gen.row(0)["failed"] and not gen.row(1)["failed"]
    cache.close()


def test_bad_arguments(model):
    cfg, prm = model.core_config, model.flat_params
    cache = _core.GPTCache(cfg, 2, 24)
    with pytest.raises(sm.ValidationError, match="nv"):
        _core.GPTGenerator(prm, cfg, cache, V + 1, 12)
    with pytest.raises(sm.ValidationError, match="keep"):
        _core.GPTGenerator(prm, cfg, cache, NV, 25)
    with pytest.raises(sm.ValidationError, match="params"):
        _core.GPTGenerator(prm[:-1].copy(), cfg, cache, NV, 12)
    small = _core.GPTCache(cfg, 1, 8)
    with pytest.raises(sm.ValidationError, match="block_size"):
        _core.GPTGenerator(prm, cfg, small, NV, 4)
    gen = _core.GPTGenerator(prm, cfg, cache, NV, 12)
    z = np.zeros(V, np.float32)
    for kw, exc, match in [(dict(r=2), sm.ValidationError, "r"),
                           (dict(window=[]), sm.ValidationError, "window"),
                           (dict(window=list(range(25))), sm.ValidationError, "window"),
                           (dict(window=[V]), sm.ValidationError, "window"),
                           (dict(logits=z[:NV - 1]), sm.ValidationError, "logits"),
                           (dict(temperature=-1.0), sm.ValidationError, "temperature"),
                           (dict(temperature=float("nan")), sm.ValidationError, "temperature"),
                           (dict(top_k=-1), sm.ValidationError, "top_k"),
                           (dict(top_p=0.0), sm.ValidationError, "top_p"),
                           (dict(key=-1), sm.ValidationError, "key"),
                           (dict(key=2 ** 64), sm.ValidationError, "key"),
                           (dict(key=1.5), TypeError, "key"),
                           (dict(bias=np.zeros(3)), sm.ValidationError, "bias"),
                           (dict(logprobs=21), sm.ValidationError, "logprobs"),
                           (dict(remaining=-1), sm.ValidationError, "remaining")]:
        args = dict(r=0, window=[1, 2], logits=z)
        args.update(kw)
        r, w, lg = args.pop("r"), args.pop("window"), args.pop("logits")
        with pytest.raises(exc, match=match):
            gen.set_row(r, w, lg, **args)
    # a window that does not match its cache sequence (nothing prefilled there)
    gen.set_row(1, [1, 2], z, remaining=3)
    with pytest.raises(sm.ValidationError, match="row 1"):
        gen.run(3)
    with pytest.raises(sm.ValidationError, match="max_steps"):
        gen.run(-1)
    with pytest.raises(sm.ValidationError, match="max_seconds"):
        gen.run(1, -1.0)
    cache.close()
    with pytest.raises(sm.ObjectDisposedError):
        gen.run(1)
    small.close()


def test_concurrent_loops_equal_serial_bit_for_bit(model):
    keep = window_keep(24, "shift")
    jobs = [(PROMPTS[i % 3], SETTINGS[i % len(SETTINGS)]) for i in range(6)]
    want = [reference(model, p, 200, kw, keep) for p, kw in jobs]
    got: list = [None] * len(jobs)

    def work(i):
        p, kw = jobs[i]
        cache, gen = start(model, [p], 200, [kw], keep)
        got[i] = drain(gen, [0], 13)[0][0]
        cache.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
