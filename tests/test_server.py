"""test_server.py - the HTTP server, started for real on a loopback port and talked to over HTTP:
completions, streaming (server-sent events), 16 concurrent requests, a full queue (429),
malformed JSON and out-of-range values (4xx with a JSON error), a client that disconnects
mid-stream (its generation stops and its memory goes back), health checks and /metrics; and
hostile clients: bodies too big (413), prompts too long, JSON names that cannot be encoded,
clients that leave mid-body (no traceback), connections that stall half-way (closed), too many
connections (503), and SIGTERM on `smallmind serve` (bounded drain, exit status 0)."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import smallmind as sm  # noqa: E402
from smallmind.config import ServerOptions  # noqa: E402
from smallmind.generation.server import create_app, uvicorn_config  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TOK = sm.Tokenizer(TEXT)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The app on a loopback port, in a thread, with the uvicorn configuration `serve` uses."""

    def __init__(self, width=32, tokenizer=TOK, model=None, model_name="test", **opts):
        if model is None:
            model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 32, 2, 2, width, seed=1)).eval()
        self.model = model
        port = self.port = _free_port()
        self.options = options = ServerOptions(host="127.0.0.1", port=port, **opts)
        self.app = create_app(model, tokenizer, options, model_name=model_name)
        self.server = uvicorn.Server(uvicorn_config(self.app, options, log_level="error"))
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
        assert r.headers["retry-after"] == "1"
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
                            (json.dumps({"prompt": "\x00\x01"}), "prompt"),
                            # found by fuzz/: json.loads' RecursionError used to give a 500
                            (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "JSON")]:
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert match in err["message"]
            assert set(err) == {"message", "type", "param", "code"}      # OpenAI's shape
            if match not in ("JSON", "object"):
                assert err["param"] == match
        # fields a client sends that mean nothing here are accepted, never "unknown field"
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "bogus": 1,
                                            "user": "u1", "logprobs": None, "echo": False,
                                            "presence_penalty": 0, "stream_options": None})
        assert r.status_code == 200, r.text


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


# ==== hostile clients ============================================================================
def _raw(port, data: bytes, timeout=5.0) -> socket.socket:
    """A socket to the server that has sent `data` (and nothing more)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(data)
    return sock


def _read_reply(sock, deadline=5.0) -> bytes:
    """Everything the server sends until it closes the connection (a watchdog of `deadline` s)."""
    sock.settimeout(deadline)
    out = b""
    end = time.time() + deadline
    while time.time() < end:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        out += part
    return out


def _status_and_json(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1").lower(), json.loads(body)


_HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")


def test_too_big_bodies_get_413_before_they_are_read():
    with _Server(max_body_bytes=100_000, max_prompt_chars=50) as srv, \
            httpx.Client(base_url=srv.url, timeout=5) as c:
        # Content-Length says too much: refused at once, without waiting for the 50 MB
        with _raw(srv.port, _HEAD + b"Content-Length: 50000000\r\n\r\n" + b"x" * 1000) as sock:
            status, head, body = _status_and_json(_read_reply(sock))
        assert status == 413 and body["error"]["type"] == "invalid_request_error"
        assert "max_body_bytes" in body["error"]["message"] and "connection: close" in head
        # chunked: refused once the count passes the limit; the server stops reading there
        with _raw(srv.port, _HEAD + b"Transfer-Encoding: chunked\r\n\r\n") as sock:
            chunk = b"%x\r\n" % 16384 + b" " * 16384 + b"\r\n"
            sent = 0
            try:
                while sent < 10_000_000:            # the server answers long before
                    sock.sendall(chunk)
                    sent += 16384
                    if sent > 200_000:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = _read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"max_body_bytes" in reply
        # a prompt over max_prompt_chars: 400 naming the prompt and the option
        r = c.post("/v1/completions", json={"prompt": "the " * 20, "max_tokens": 1})
        assert r.status_code == 400 and "max_prompt_chars" in r.json()["error"]["message"]
        assert "prompt" in r.json()["error"]["message"]
        # and within the limits, all is as before
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
        assert r.status_code == 200
        assert 'smallmind_http_errors_total{status="413"} 2' in c.get("/metrics").text


class _GatedTokenizer(sm.Tokenizer):
    """A tokenizer whose encode waits for `gate` on prompts that start with "the lazy": a parse that
    takes its time, for as long as the test decides."""

    gate = threading.Event()

    def encode(self, text, *args, **kwargs):
        if text.startswith("the lazy"):
            assert self.gate.wait(30), "the test never opened the gate"
        return super().encode(text, *args, **kwargs)


def test_parsing_runs_off_the_event_loop():
    """While a request's parsing and encoding is under way, /health/live answers (they used to
    run on the event loop: a 50 MB body froze the server for seconds)."""
    tok = _GatedTokenizer(TEXT)
    tok.gate.clear()
    with _Server(tokenizer=tok) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        replies = []
        t = threading.Thread(target=lambda: replies.append(httpx.post(
            srv.url + "/v1/completions", json={"prompt": "the lazy", "max_tokens": 2}, timeout=30)))
        t.start()
        try:
            time.sleep(0.3)                     # the request is inside encode by now
            assert not replies
            assert c.get("/health/live").json() == {"status": "ok"}   # not blocked behind it
        finally:
            tok.gate.set()
            t.join(30)
        assert replies and replies[0].status_code == 200


def test_field_names_that_cannot_be_encoded_get_a_400():
    """A JSON name holding a lone surrogate used to give a 500 (the error message echoing it
    could not be encoded)."""
    with _Server() as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        for body, match in [(b'{"prompt": "a", "max_tokens": "\\ud800"}', "\\ud800"),
                            (b'{"prompt": "a", "stop": 7, "x": "\\udfff\\ud800x"}', "stop"),
                            (b'{"prompt": "a", "messages": 1, "temperature": "\\ud800"}', "\\ud800")]:
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert match in r.json()["error"]["message"], r.text
        # an unknown name, even one that cannot be encoded, is ignored like any unknown field
        r = c.post("/v1/completions", content=b'{"\\ud800": 1, "prompt": "a", "max_tokens": 2}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    # and whatever a message echoes, it can be sent
    from smallmind.generation.openai_api import APIError
    from smallmind.generation.server import _api_error
    r = _api_error(APIError(400, "bad \ud800 name", param="x"))
    assert r.status_code == 400 and b"\\ud800" in r.body


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record):
        self.texts.append(logging.Formatter().format(record))


def test_a_client_leaving_mid_body_logs_no_traceback():
    with _Server(max_concurrency=1) as srv:
        rec = _Records()
        names = ["", "uvicorn", "uvicorn.error", "smallmind", "asyncio"]
        for name in names:
            logging.getLogger(name).addHandler(rec)
        try:
            for _ in range(5):
                sock = _raw(srv.port, _HEAD + b"Content-Length: 1000\r\n\r\n" + b"0123456789")
                time.sleep(0.05)
                sock.close()
            time.sleep(0.5)
            with httpx.Client(base_url=srv.url, timeout=5) as c:   # the server is fine
                assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200
                assert "smallmind_http_client_disconnects_total 5" in c.get("/metrics").text
        finally:
            for name in names:
                logging.getLogger(name).removeHandler(rec)
        logged = "\n".join(rec.texts)
        assert "Traceback" not in logged, logged[-3000:]


def test_stalled_connections_are_closed_and_the_server_stays_live():
    """50 connections that send half a request head and stall are closed after header_timeout;
    a body that stalls gets 408 after body_timeout; /health/live answers meanwhile."""
    with _Server(header_timeout=0.5, body_timeout=0.5) as srv:
        # a new connection per request: an idle keep-alive one is closed after 0.5 s too
        def get(path):
            return httpx.get(srv.url + path, timeout=5)
        socks = [_raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n") for _ in range(50)]
        try:
            assert get("/health/live").json() == {"status": "ok"}
            closed = 0
            deadline = time.time() + 10          # a watchdog: they are closed after 0.5 s
            for sock in socks:
                sock.settimeout(max(0.01, deadline - time.time()))
                try:
                    closed += sock.recv(100) == b""
                except ConnectionResetError:
                    closed += 1
                except socket.timeout:
                    break
            assert closed == 50
            assert get("/health/live").json() == {"status": "ok"}
        finally:
            for sock in socks:
                sock.close()
        # an idle keep-alive connection after a response is bounded too
        with _raw(srv.port, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\nGET /heal") as sock:
            reply = _read_reply(sock, deadline=10)
        assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1
        # a body that stalls: 408
        with _raw(srv.port, _HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt"') as sock:
            status, head, body = _status_and_json(_read_reply(sock, deadline=10))
        assert status == 408 and body["error"]["type"] == "timeout"
        assert "body_timeout" in body["error"]["message"]
        m = get("/metrics").text
        assert "smallmind_http_header_timeouts_total" in m


def test_connections_beyond_max_connections_get_503():
    with _Server(max_connections=4, header_timeout=30) as srv:
        socks = [_raw(srv.port, b"GET /health/live HTTP/1.1\r\nHost: t\r\n") for _ in range(4)]
        try:
            with httpx.Client(base_url=srv.url, timeout=5) as c:
                assert c.get("/health/live").status_code == 503
        finally:
            for sock in socks:
                sock.close()
        deadline = time.time() + 10
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            while c.get("/health/live").status_code != 200:
                assert time.time() < deadline, "the closed connections were never let go"
                time.sleep(0.05)


def test_sigterm_drains_briefly_and_exits_0(tmp_path):
    """`smallmind serve` with a long streamed generation running: SIGTERM refuses new requests,
    lets the running one go on for shutdown_timeout less a margin, then stops it (the stream
    ends with an error event saying the server is shutting down), and the process exits with
    status 0 within shutdown_timeout and a few seconds (it used to wait for whole generations,
    then die by the signal, status -15)."""
    # big enough that 4096 tokens take far longer than the 2 s of shutdown_timeout
    model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 64, 4, 4, 768, seed=1)).eval()
    ck = tmp_path / "m.safetensors"
    sm.save_checkpoint(str(ck), model, TOK)
    port = _free_port()
    # the smallmind this test imported (installed in CI, the source tree in development), run
    # from a folder where `python -m` cannot find the uncompiled source tree first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    p = subprocess.Popen([sys.executable, "-m", "smallmind", "serve", str(ck), "--port", str(port),
                          "--shutdown-timeout", "2"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert p.poll() is None, p.communicate()
            try:
                if httpx.get(url + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.1)
        events = []
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "the", "max_tokens": 4096, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 5:
                    t0 = time.time()
                    p.send_signal(signal.SIGTERM)
                if events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])):
                    break
        code = p.wait(2 + 10)                   # shutdown_timeout + a generous margin
        elapsed = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
        out, err = p.communicate()
    assert code == 0, err.decode()[-3000:]
    err = json.loads(events[-1])["error"]
    assert err["code"] == "unavailable" and "shutting down" in err["message"]
    assert len(events) < 4096
    assert b"Traceback" not in err, err.decode()[-3000:]
    print(f"SIGTERM to exit: {elapsed:.2f} s")
