"""test_server.py - the HTTP server, started for real on a loopback port and talked to over HTTP:
completions, streaming (server-sent events), 16 concurrent requests, a full queue (429),
malformed JSON and out-of-range values (4xx with a JSON error), a client that disconnects
mid-stream (its generation stops and its memory goes back), health checks and /metrics."""
import json
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import smallmind as sm  # noqa: E402
from smallmind.config import ServerOptions  # noqa: E402
from smallmind.generation.server import create_app  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TOK = sm.Tokenizer(TEXT)


class _Server:
    def __init__(self, width=32, **opts):
        model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 32, 2, 2, width, seed=1)).eval()
        self.model = model
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = ServerOptions(host="127.0.0.1", port=port, **opts)
        self.app = create_app(model, TOK, options, model_name="test")
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


def _outstanding():
    return sm.default_pool().stats()["outstanding_buffers"]


def test_completions_streaming_health_and_metrics():
    with _Server() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health/live").json() == {"status": "ok"}
        assert c.get("/health/ready").json()["status"] == "ok"
        r = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 20,
                                             "temperature": 0})
        assert r.status_code == 200
        body = r.json()
        want = sm.Sampling(srv.model, TOK).generate("the quick", 20, temperature=0)
        assert body["choices"][0]["text"] == want and body["object"] == "text_completion"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}
        pieces, last = [], None
        with c.stream("POST", "/v1/completions", json={"prompt": "the quick", "max_tokens": 20,
                                                        "temperature": 0, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                last = json.loads(data)
                pieces.append(last["choices"][0]["text"])
        assert "".join(pieces) == want and last["choices"][0]["finish_reason"] == "length"
        stop = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 60,
                                                "temperature": 0, "stop": ["o"]}).json()
        assert stop["choices"][0]["finish_reason"] in ("stop", "length")
        assert "o" not in stop["choices"][0]["text"]
        page = c.get("/")
        assert page.status_code == 200 and "/v1/completions" in page.text
        m = c.get("/metrics").text
        assert "smallmind_generated_tokens_total" in m and "smallmind_http_requests_total" in m


def test_sixteen_concurrent_requests_equal_serial():
    with _Server(max_concurrency=4, queue_size=16) as srv, httpx.Client(base_url=srv.url,
                                                                         timeout=60) as c:
        want = [sm.Sampling(srv.model, TOK).generate("the", 30, temperature=1.0, seed=i)
                for i in range(16)]
        got = [None] * 16

        def one(i):
            got[i] = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 30,
                                                      "temperature": 1.0, "seed": i})

        ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert all(r.status_code == 200 for r in got)
        assert [r.json()["choices"][0]["text"] for r in got] == want


def test_full_queue_gets_429_and_bad_requests_get_json_errors():
    # a wider model, so that the two long generations are still running when the third comes
    with _Server(width=512, max_concurrency=1, queue_size=1, timeout=30) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        codes = []

        def long():
            codes.append(c.post("/v1/completions", json={"prompt": "the", "max_tokens": 1500,
                                                          "temperature": 0}).status_code)

        ts = [threading.Thread(target=long) for _ in range(2)]     # one runs, one waits
        for t in ts:
            t.start()
        deadline = time.time() + 20                # until both are admitted (one runs, one waits)
        while "smallmind_http_in_flight 2" not in c.get("/metrics").text:
            assert time.time() < deadline, "the two long requests were not admitted"
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 5})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        for t in ts:
            t.join(60)
        assert codes == [200, 200]
        for body, match in [(b"{not json", "JSON"), (b"[1, 2]", "object"),
                            (json.dumps({"max_tokens": 5}), "prompt"),
                            (json.dumps({"prompt": "the", "temperature": -1}), "temperature"),
                            (json.dumps({"prompt": "the", "top_p": 2}), "top_p"),
                            (json.dumps({"prompt": "the", "max_tokens": -1}), "max_tokens"),
                            (json.dumps({"prompt": "the", "max_tokens": 10 ** 6}), "max_tokens"),
                            (json.dumps({"prompt": "the", "stop": 5}), "stop"),
                            (json.dumps({"prompt": "the", "stream": "yes"}), "stream"),
                            (json.dumps({"prompt": "the", "bogus": 1}), "bogus"),
                            (json.dumps({"prompt": "\x00\x01"}), "prompt"),
                            # found by fuzz/: json.loads' RecursionError used to give a 500
                            (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "JSON")]:
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert match in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_everything():
    with _Server(max_concurrency=2) as srv:
        time.sleep(0.2)
        base = _outstanding()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 4000,
                                                            "stream": True}) as s:
                for i, _ in enumerate(s.iter_lines()):
                    if i > 5:
                        break                      # leave mid-stream: the connection closes
        deadline = time.time() + 20
        while _outstanding() != base and time.time() < deadline:
            time.sleep(0.05)
        assert _outstanding() == base
        with httpx.Client(base_url=srv.url, timeout=30) as c:   # and the slot is free again
            assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 5}).status_code == 200
