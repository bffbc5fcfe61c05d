"""test_openai_api.py - the server as OpenAI's own Python client sees it (completions, streaming,
n, logprobs, echo, chat, chat streaming, embeddings, models, API keys), every malformed field
through raw HTTP, and continuous batching through HTTP: concurrent seeded requests of mixed
lengths and settings equal the same requests sent alone, while the engine decoded them together.
Also the batch engine and the chat template on their own."""
import json
import queue
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("jinja2")

from test_server import TOK, _outstanding, _Server  # noqa: E402

import smallmind as sm  # noqa: E402
from smallmind.config import ServerOptions  # noqa: E402
from smallmind.generation.chat import ChatTemplate, find_template  # noqa: E402
from smallmind.generation.engine import BatchEngine, SamplingParams  # noqa: E402

KEY = "sk-test-0123"


class _Served(_Server):
    """test_server's loopback server with an API key; .client is an openai.OpenAI and .engine
    the app's BatchEngine once started."""

    def __init__(self, width=32, block=48, **opts):
        opts.setdefault("api_key", (KEY,))
        model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, block, 2, 2, width, seed=3)).eval()
        super().__init__(model=model, model_name="tiny-test", **opts)

    def __enter__(self):
        super().__enter__()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)
        self.engine = self.app.state.smallmind_engine
        return self

    def solo(self, prompt, **kw):
        kw.setdefault("temperature", 0.8)       # the server's default (InferenceOptions)
        return sm.Sampling(self.model, TOK).generate(prompt, return_details=True, **kw)


@pytest.fixture(scope="module")
def served():
    with _Served() as s:
        yield s


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_completions_through_the_official_client(served):
    c = served.client
    r = c.completions.create(model="anything", prompt="the quick", max_tokens=25, seed=5,
                             temperature=0.9, top_p=0.95, user="u-1")
    want = served.solo("the quick", max_new_tokens=25, seed=5, temperature=0.9, top_p=0.95)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.model == "tiny-test" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 25)
    # streamed: the same text, chunks carry usage null, the usage chunk comes last when asked
    chunks = list(c.completions.create(model="x", prompt="the quick", max_tokens=25, seed=5,
                                       temperature=0.9, top_p=0.95, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 25
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # stop strings: the text ends before the first of them
    r = c.completions.create(model="x", prompt="the", max_tokens=60, seed=2, stop=["o", "e"])
    want = served.solo("the", max_new_tokens=60, seed=2, stop=["o", "e"])
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason


def test_n_choices_and_a_list_of_prompts_are_each_reproducible_from_the_seed(served):
    c = served.client
    r = c.completions.create(model="x", prompt="the", max_tokens=12, seed=40, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):       # choice i draws from seed + i
        assert ch.text == served.solo("the", max_new_tokens=12, seed=40 + i).text
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 36   # the prompt once
    r = c.completions.create(model="x", prompt=["the", "lazy dog"], max_tokens=8, seed=7, n=2)
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    want = [served.solo(p, max_new_tokens=8, seed=7 + k).text
            for k, p in enumerate(["the", "the", "lazy dog", "lazy dog"])]
    assert texts == want


def test_logprobs_and_echo_match_the_model(served):
    c = served.client
    r = c.completions.create(model="x", prompt="the fox", max_tokens=6, temperature=0,
                             logprobs=3, echo=True)
    ch = r.choices[0]
    gen = served.solo("the fox", max_new_tokens=6, temperature=0)
    assert ch.text == "the fox" + gen.text
    lp = ch.logprobs
    assert lp.tokens == list("the fox" + gen.text)
    assert lp.text_offset == list(range(len(ch.text)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = TOK.encode("the fox" + gen.text)
    logits = served.model.forward(np.asarray([ids[:-1]], np.int32))[0, :, :TOK.vocab_size]
    for t in range(1, len(ids)):           # every position, prompt and generated, in float64
        ref = _log_softmax(logits[t - 1])
        assert lp.token_logprobs[t] == pytest.approx(ref[ids[t]], abs=2e-5)
        top = lp.top_logprobs[t]
        assert len(top) == 3
        best = np.argsort(-ref, kind="stable")[:3]
        assert sorted(top) == sorted(TOK.chars[i] for i in best)
        # greedy: the chosen token is the most likely one
        if t >= len("the fox"):
            assert lp.token_logprobs[t] == pytest.approx(max(top.values()))


@pytest.mark.filterwarnings("ignore::smallmind.UnknownCharacterWarning")
def test_chat_completions_streaming_and_logprobs(served):
    c = served.client
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=20, seed=9, logprobs=True,
                                  top_logprobs=2)
    prompt = ChatTemplate.default().render(msgs)
    assert prompt == "System: be brief\nUser: the dog\nAssistant:"
    want = served.solo(prompt, max_new_tokens=20, seed=9, stop=["\nUser:", "\nSystem:"])
    m = r.choices[0]
    assert m.message.role == "assistant" and m.message.content == want.text
    assert r.object == "chat.completion" and m.finish_reason == want.finish_reason
    assert [t.token for t in m.logprobs.content] == list(want.text)
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in m.logprobs.content)
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=20, seed=9,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    # content as a list of text parts, as newer clients send it
    r2 = c.chat.completions.create(model="x", max_tokens=20, seed=9, messages=[
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "dog"}]}])
    assert r2.choices[0].message.content == want.text


def test_embeddings_models_and_keys(served):
    c = served.client
    e = c.embeddings.create(model="x", input=["the fox", "a lazy dog"])    # base64 by default
    want = sm.ModelEmbedder(served.model, TOK).embed(["the fox", "a lazy dog"])
    got = np.array([d.embedding for d in e.data])
    assert got.shape == (2, 32) and np.array_equal(got.astype(np.float32), want)
    assert e.usage.prompt_tokens == len("the fox") + len("a lazy dog")
    e = c.embeddings.create(model="x", input="the fox", encoding_format="float")
    assert np.array_equal(np.float32(e.data[0].embedding), want[0])
    assert [m.id for m in c.models.list()] == ["tiny-test"]
    assert c.models.retrieve("tiny-test").id == "tiny-test"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="x", prompt="the", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "the"})   # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    for open_route in ("/health/live", "/health/ready", "/metrics", "/"):
        assert httpx.get(served.url + open_route).status_code == 200, open_route


def test_metrics_can_need_the_key_and_keys_come_from_a_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nsk-one\n\nsk-two\n")
    with _Served(api_key=(), api_key_file=str(f), metrics_auth=True) as s:
        assert httpx.get(s.url + "/metrics").status_code == 401
        for key in ("sk-one", "sk-two"):
            h = {"Authorization": f"Bearer {key}"}
            assert httpx.get(s.url + "/metrics", headers=h).status_code == 200
            assert httpx.get(s.url + "/v1/models", headers=h).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sk-one "
                                                        "x"}).status_code == 401
    with pytest.raises(sm.ValidationError, match="api_key_file"):
        ServerOptions(api_key_file=str(tmp_path / "missing")).api_keys()
    # the environment variable: keys as written (a backslash stays one), comma-separated
    from smallmind.config import load_settings
    st = load_settings(env={"SMALLMIND_SERVER_API_KEY": "sk-a\\nb, sk-two"})
    assert st.server.api_keys() == ("sk-a\\nb", "sk-two")
    assert "sk-a" not in st.to_toml() and "api_key: 2 key(s), not shown" in st.to_toml()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10 ** 6]}, "prompt"),
    ("/v1/completions", {"prompt": "the", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "the", "n": 9}, "n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n"),
    ("/v1/completions", {"prompt": "the", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "the", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "the", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "the", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "the", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "the", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "the", "frequency_penalty": "1"}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"1": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "the", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "the", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "the", "top_k": -1}, "top_k"),
    ("/v1/completions", {"prompt": "the", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "the", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "the", "stream": True, "stream_options": 1}, "stream_options"),
    ("/v1/completions", {"prompt": "the", "model": 3}, "model"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 5000}, "max_tokens"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/v1/embeddings", {"input": [[1, 2]]}, "input"),
    ("/v1/embeddings", {"input": "the", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "the", "dimensions": 7}, "dimensions"),
])
def test_malformed_fields_get_a_400_naming_them(served, path, body, param):
    r = httpx.post(served.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_unknown_routes_and_methods_get_openai_errors(served):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(served.url + "/v1/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(served.url + "/v1/completions", headers=h)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_penalties_and_logit_bias_steer_the_choice(served):
    c = served.client
    x = TOK.encode("x")[0]
    r = c.completions.create(model="m", prompt="the", max_tokens=10, temperature=0,
                             logit_bias={str(x): 100})
    assert r.choices[0].text == "x" * 10
    greedy = served.solo("the", max_new_tokens=10, temperature=0).text
    first = TOK.encode(greedy[0])[0]
    r = c.completions.create(model="m", prompt="the", max_tokens=10, temperature=0,
                             logit_bias={str(first): -100})
    assert greedy[0] not in r.choices[0].text
    # a frequency penalty of 2 on a greedy run that repeats: fewer repeats
    long = served.solo("the", max_new_tokens=40, temperature=0).text
    r = c.completions.create(model="m", prompt="the", max_tokens=40, temperature=0,
                             frequency_penalty=2.0)
    pen = r.choices[0].text
    assert max(pen.count(ch) for ch in set(pen)) < max(long.count(ch) for ch in set(long))


def test_sixteen_mixed_concurrent_requests_equal_their_solo_outputs_and_were_batched():
    """Continuous batching through HTTP: 16 seeded requests of mixed lengths and settings,
    sent at once to a server decoding at most 6 together (the rest wait and join as others
    leave), each equal to the same request sent alone; the engine ran fewer decode steps than
    tokens, so rows were decoded together."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over the lazy dog".split()
    reqs = []
    for i in range(16):
        reqs.append({"prompt": " ".join(rng.choice(words, int(rng.integers(1, 12)))),
                     "max_tokens": int(rng.integers(1, 90)), "seed": i,
                     "temperature": [0.0, 0.7, 1.0, 1.3][i % 4], "top_k": [0, 5][i % 2],
                     "top_p": [1.0, 0.9][(i // 2) % 2],
                     **({"stop": ["zz", "q"]} if i % 5 == 0 else {}),
                     **({"presence_penalty": 0.5, "frequency_penalty": 0.3} if i % 3 == 0 else {}),
                     **({"logit_bias": {"3": 2.0}} if i % 7 == 0 else {}),
                     **({"stream": True} if i % 4 == 1 else {})})
    with _Served(max_concurrency=6, queue_size=16) as s:
        def send(body):
            body = dict(body)
            extra = {"top_k": body.pop("top_k")}        # an extension: the client passes it on
            out = s.client.completions.create(model="m", extra_body=extra, **body)
            if body.get("stream"):
                return "".join(ch.choices[0].text for ch in out)
            return out.choices[0].text

        solo = [send(b) for b in reqs]              # one at a time
        steps0 = s.engine.steps
        got: list = [None] * 16
        start = threading.Barrier(16)

        def one(i):
            start.wait()
            got[i] = send(reqs[i])

        ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert got == solo
        tokens = sum(len(t) for t in solo)
        assert s.engine.steps - steps0 < tokens - 16
        # and the solo ones equal the library's Sampling (those it can express)
        for b, text in zip(reqs, solo):
            if "presence_penalty" not in b and "logit_bias" not in b:
                assert text == s.solo(b["prompt"], max_new_tokens=b["max_tokens"], seed=b["seed"],
                                      temperature=b["temperature"], top_k=b["top_k"],
                                      top_p=b["top_p"], stop=b.get("stop")).text


def test_a_client_leaving_mid_stream_frees_its_slot_and_memory():
    with _Served(max_concurrency=2) as s:
        h = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers=h, timeout=30,
                          json={"messages": [{"role": "user", "content": "the"}],
                                "max_tokens": 4000, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
        deadline = time.time() + 20
        while (s.engine.active or _outstanding() != 0) and time.time() < deadline:
            time.sleep(0.02)
        assert s.engine.active == 0 and s.engine.queued == 0
        assert _outstanding() == 0          # the KV cache went back to the pool when idle


def test_a_bounded_load_run_has_no_5xx_and_flat_memory():
    """64 streaming and plain requests from 12 threads on loopback, against 4 slots and a queue
    of 8: every answer is 200 or a 429 with Retry-After (the queue was full), memory goes back
    to where it started."""
    with _Served(max_concurrency=4, queue_size=8) as s:
        base = _outstanding()
        codes: queue.Queue = queue.Queue()
        h = {"Authorization": f"Bearer {KEY}"}

        def worker(k):
            with httpx.Client(base_url=s.url, headers=h, timeout=60) as c:
                for j in range(k, 64, 12):
                    body = {"prompt": "the dog", "max_tokens": 5 + (j * 7) % 60, "seed": j,
                            "stream": j % 2 == 0}
                    r = c.post("/v1/completions", json=body)
                    if r.status_code == 429:
                        assert r.headers["retry-after"] == "1"
                    codes.put(r.status_code)
                    if body["stream"] and r.status_code == 200:
                        assert r.text.rstrip().endswith("data: [DONE]")

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        got = [codes.get() for _ in range(codes.qsize())]
        assert len(got) == 64 and set(got) <= {200, 429} and got.count(200) >= 12
        deadline = time.time() + 10
        while _outstanding() != base and time.time() < deadline:
            time.sleep(0.02)
        assert _outstanding() == base


# ---- the pieces alone --------------------------------------------------------------------------

def test_engine_queue_limit_cancel_and_close():
    model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 32, 1, 1, 16, seed=0)).eval()
    eng = BatchEngine(model, TOK, max_batch=1, max_queue=1)
    got: queue.Queue = queue.Queue()
    p = SamplingParams.make(max_new_tokens=4000, vocab_size=TOK.vocab_size)
    t1 = eng.submit(TOK.encode("the"), p, got.put)
    eng.submit(TOK.encode("the"), p, got.put)
    with pytest.raises(queue.Full):
        eng.submit(TOK.encode("the"), p, got.put)
    t1.cancel()
    eng.close()
    ends = []
    while not got.empty():
        ev = got.get()
        if not hasattr(ev, "text"):
            ends.append(ev)
    assert len(ends) == 2 and all(type(e).__name__ in ("Done", "Failed") for e in ends)
    assert ends[0].result.finish_reason == "cancelled"
    with pytest.raises(sm.ObjectDisposedError):
        eng.submit(TOK.encode("the"), p, got.put)
    with pytest.raises(sm.ValidationError, match="presence_penalty"):
        SamplingParams.make(presence_penalty=3)
    with pytest.raises(sm.ValidationError, match="logit_bias"):
        SamplingParams.make(logit_bias={"7": 1}, vocab_size=5)


def test_chat_templates_from_the_model_folder_run_in_a_sandbox(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    t = find_template(None, str(tmp_path / "model.safetensors"))
    assert t.render([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert find_template(None, str(tmp_path)).render([{"role": "user", "content": "a"}]) == "a!"
    assert find_template(None, None).origin == "smallmind's default"
    hostile = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", origin="evil")
    with pytest.raises(sm.ValidationError, match="chat template"):
        hostile.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{{ messages.append(1) }}", origin="evil")
    with pytest.raises(sm.ValidationError, match="chat template"):
        mutating.render([{"role": "user", "content": "x"}])
    with pytest.raises(sm.ValidationError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_access_log_lines_and_timeouts(caplog):
    # wide enough that 4096 tokens take far longer than the 0.2 s timeout
    with _Served(width=512, timeout=0.2) as s:
        h = {"Authorization": f"Bearer {KEY}"}
        with caplog.at_level("INFO", logger="smallmind.server.access"):
            assert httpx.get(s.url + "/v1/models", headers=h).status_code == 200
            assert httpx.get(s.url + "/v1/models").status_code == 401
            r = httpx.post(s.url + "/v1/completions", headers=h, timeout=30,
                           json={"prompt": "the", "max_tokens": 4096, "temperature": 1})
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"

            def lines():      # a line is written once the response is sent: it may trail it
                return [x for x in caplog.records if x.name == "smallmind.server.access"]

            deadline = time.time() + 10
            while len(lines()) < 3 and time.time() < deadline:
                time.sleep(0.01)
        lines = lines()
        assert [(x.method, x.path, x.status) for x in lines] == [
            ("GET", "/v1/models", 200), ("GET", "/v1/models", 401), ("POST", "/v1/completions", 504)]
        assert all(x.duration_ms >= 0 and x.client == "127.0.0.1" for x in lines)
        deadline = time.time() + 10               # the timed-out generation's slot is freed
        while s.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert s.engine.active == 0


def test_the_prefix_cache_skips_shared_beginnings_without_changing_a_token():
    """Chat turns sharing a long system prompt: the engine's prefix cache finishes their
    prefill from the cached beginning (hits counted), and every answer equals the same request
    on a server with the prefix cache off, and the library's Sampling."""
    system = "the quick brown fox jumps over the lazy dog. " * 3        # 135 characters
    turns = ["the dog", "a lazy fox", "jumps over the quick dog", "the end"]
    answers = {}
    for entries in (0, 4):
        with _Served(block=256, prefix_cache=entries) as s:
            got = []
            for t in turns:
                r = s.client.chat.completions.create(
                    model="m", max_tokens=15, seed=3,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": t}])
                got.append(r.choices[0].message.content)
            answers[entries] = got
            hits = s.engine._prefixes.hits if entries else 0
            if entries:
                assert hits == len(turns) - 1 and s.engine._prefixes.reused >= 128 * hits
    assert answers[0] == answers[4]
    with _Served(block=256) as s:
        tmpl = ChatTemplate.default()
        for t, text in zip(turns, answers[4]):
            prompt = tmpl.render([{"role": "system", "content": system}, {"role": "user", "content": t}])
            with pytest.warns(sm.UnknownCharacterWarning):
                want = s.solo(prompt, max_new_tokens=15, seed=3, stop=["\nUser:", "\nSystem:"])
            assert text == want.text


def test_long_prompts_are_prefilled_in_chunks_between_the_others_steps():
    """prefill_budget=64: a 250-token prompt is prefilled 64 tokens per step (then the rest),
    while a running request keeps getting a token every step; every output - chunked, cached
    prefix or not - equals Sampling.generate's."""
    text = "the quick brown fox jumps over the lazy dog. " * 40
    m = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 256, 2, 2, 32, seed=4)).eval()
    eng = BatchEngine(m, TOK, max_batch=4, prefill_budget=64, prefix_cache=2)
    try:
        events: queue.Queue = queue.Queue()
        short = eng.submit(TOK.encode("the"), SamplingParams(max_new_tokens=10 ** 6, seed=1),
                           lambda ev: events.put(("short", ev)))
        got_short = 0
        while got_short < 3:                     # the short one is decoding
            who, ev = events.get(timeout=30)
            got_short += who == "short" and type(ev).__name__ == "Piece"
        at_submit = got_short
        eng.submit(TOK.encode(text[:250]), SamplingParams(max_new_tokens=5, seed=2),
                   lambda ev: events.put(("long", ev)))
        while True:
            who, ev = events.get(timeout=30)
            if who == "short":
                got_short += type(ev).__name__ == "Piece"
            elif type(ev).__name__ == "Piece":
                break
        # 250 tokens: chunks of 64 at admission and in 2 more steps, the last 58 in a third,
        # then the first token: the short request decoded in each of those steps
        assert got_short - at_submit >= 3
        short.cancel()
        prompts = [text[:250], text[3:200], text[:190] + "fox", "the lazy dog", text[:250] + "x"]
        for i, p in enumerate(prompts):
            want = sm.Sampling(m, TOK).generate(p, 12, seed=i, return_details=True)
            assert eng.generate(p, max_new_tokens=12, seed=i).tokens == want.tokens, i
        assert eng._prefixes.hits >= 2
    finally:
        eng.close()


def test_a_cancelled_request_stops_decoding_while_others_run():
    """A cancelled row leaves the C loop at once (it does not go on decoding into its slot
    while another request keeps the engine busy), and its time to first token is measured
    at the loop's first step."""
    m = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 64, 2, 2, 32, seed=4)).eval()
    eng = BatchEngine(m, TOK, max_batch=2)
    try:
        events: queue.Queue = queue.Queue()
        a = eng.submit(TOK.encode("the"), SamplingParams(max_new_tokens=10 ** 6, seed=1),
                       lambda ev: events.put(("a", ev)))
        b = eng.submit(TOK.encode("fox"), SamplingParams(max_new_tokens=10 ** 6, seed=2),
                       lambda ev: events.put(("b", ev)))
        seen = set()
        while seen != {"a", "b"}:                # both decoding
            who, ev = events.get(timeout=30)
            seen.add(who)
        a.cancel()
        while True:
            who, ev = events.get(timeout=30)
            if who == "a" and type(ev).__name__ == "Done":
                break
        assert ev.result.finish_reason == "cancelled"
        assert 0 < ev.result.time_to_first_token_sec < ev.result.elapsed_sec
        gen = eng._gen
        assert gen is not None and not b.finished          # b keeps the engine busy
        assert gen.row(0)["remaining"] == 0                # a's row (slot 0) left the loop
        made = gen.row(0)["generated"]
        time.sleep(0.05)
        assert gen.row(0)["generated"] == made
    finally:
        eng.close()
