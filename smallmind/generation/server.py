"""server.py - the HTTP server behind `smallmind serve` (the `smallmind[serve]` extra: FastAPI and
uvicorn). One model, loaded once and shared read-only; a Sampling per request; at most
`max_concurrency` generations at once, `queue_size` more waiting, HTTP 429 beyond that; a
per-request timeout; a client that disconnects mid-stream stops its generation.

Endpoints:
    POST /v1/completions   OpenAI-style subset: prompt, max_tokens, temperature, top_p, top_k,
                           stop, seed, stream (server-sent events)
    GET  /health/live      the process answers
    GET  /health/ready     a tiny forward pass runs
    GET  /metrics          Prometheus text format (smallmind.metrics plus the server's counters)
    GET  /                 a playground page: a prompt box that streams the answer

Errors are JSON: {"error": {"message": ..., "type": ...}} with 400 (malformed JSON, bad values,
a prompt over max_prompt_chars), 408 (the body took longer than body_timeout), 413 (a body over
max_body_bytes), 429 (queue full), 503 (shutting down), 504 (timeout).

Against hostile clients: the body is read in pieces and refused as soon as it passes
max_body_bytes (or its Content-Length says it will); parsing and validation run in a worker
thread, so that /health/live answers meanwhile; a connection that has not sent a whole request
head within header_timeout is closed (_header_timeout_protocol); uvicorn refuses connections
beyond max_connections with 503; and `serve` stops running generations on SIGTERM / Ctrl-C,
waits at most shutdown_timeout for the rest, and returns (exit status 0, not the signal's).
"""
import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
import uuid
import warnings

from .. import metrics as _metrics
from ..config import ServerOptions
from ..errors import CancelledError, SmallMindError, ValidationError
from ..model.tokenizer import Tokenizer
from ..model.transformer import TransformerModel
from .sampling import Sampling
from .serving import default_threads_per_request

logger = logging.getLogger("smallmind.server")

_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
           "model", "n"}

_PLAYGROUND = """<!doctype html><html><head><meta charset="utf-8"><title>smallmind</title>
<style>body{font-family:sans-serif;max-width:48em;margin:2em auto}textarea{width:100%;height:6em}
pre{white-space:pre-wrap;background:#f4f4f4;padding:1em}</style></head><body>
<h1>smallmind playground</h1><textarea id="p">The </textarea><br>
max tokens <input id="n" type="number" value="200"> temperature
<input id="t" type="number" step="0.1" value="0.8"> <button onclick="go()">Generate</button>
<pre id="out"></pre><script>
async function go(){const out=document.getElementById('out');out.textContent='';
const r=await fetch('/v1/completions',{method:'POST',headers:{'Content-Type':'application/json'},
body:JSON.stringify({prompt:document.getElementById('p').value,stream:true,
max_tokens:+document.getElementById('n').value,temperature:+document.getElementById('t').value})});
if(!r.ok){out.textContent=(await r.json()).error.message;return}
const rd=r.body.getReader(),dec=new TextDecoder();let buf='';
for(;;){const {done,value}=await rd.read();if(done)break;buf+=dec.decode(value,{stream:true});
let i;while((i=buf.indexOf('\\n\\n'))>=0){const ev=buf.slice(0,i);buf=buf.slice(i+2);
const d=ev.replace(/^data: /,'');if(d==='[DONE]')return;
out.textContent+=JSON.parse(d).choices[0].text}}}</script></body></html>"""


class _Gate:
    """Admission: `slots` generations at once and `queue` more waiting; beyond, refuse."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self._sem = asyncio.Semaphore(slots)
        self.inside = 0          # running or waiting

    def admit(self) -> bool:
        if self.inside >= self.slots + self.queue:
            return False
        self.inside += 1
        return True

    def leave(self):
        self.inside -= 1


def _safe(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates from a JSON body's escapes) as
    backslash escapes: an error message that echoes the client's input can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, message: str, kind: str, close: bool = False):
    from fastapi.responses import JSONResponse
    _metrics.REGISTRY.inc("smallmind_http_errors_total", 1, "HTTP error responses", status=str(status))
    # close: the client may still be sending a body that nobody will read
    return JSONResponse({"error": {"message": _safe(message), "type": kind}}, status_code=status,
                        headers={"Connection": "close"} if close else None)


class _Refused(Exception):
    """A request refused before its body is parsed: (status, message, type)."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The request's body, read piece by piece: _Refused 413 as soon as its Content-Length or
    the bytes received pass `limit` (nothing beyond the limit is kept), 408 when it has not
    all arrived within `timeout` seconds. starlette's ClientDisconnect passes through."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _Refused(413, f"the request body is {int(length)} bytes, more than the limit of "
                            f"{limit} (max_body_bytes)", "invalid_request_error")
    chunks: list[bytes] = []
    size = 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"the request body is more than the limit of {limit} bytes "
                                    f"(max_body_bytes)", "invalid_request_error")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise _Refused(408, f"the request body did not arrive within {timeout:g} s (body_timeout)",
                       "timeout") from None
    return b"".join(chunks)


def _parse_request(body: bytes, defaults, max_prompt_chars: "int | None" = None) -> dict:
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        # RecursionError: json.loads gives up on a body of deeply nested arrays; without this
        # catch such a request got a 500 instead of a 400. (UnicodeDecodeError is a ValueError.)
        raise ValidationError(f"the body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ValidationError("the body must be a JSON object")
    unknown = set(req) - _FIELDS
    if unknown:      # ascii(): a name may hold anything, lone surrogates included
        raise ValidationError(f"unknown field(s): {', '.join(ascii(k) for k in sorted(unknown))}")
    prompt = req.get("prompt")
    if not isinstance(prompt, str):
        raise ValidationError("prompt must be a string")
    if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
        raise ValidationError(f"prompt is {len(prompt)} characters, more than the limit of "
                              f"{max_prompt_chars} (max_prompt_chars)")
    if req.get("n", 1) != 1:
        raise ValidationError("n must be 1")
    stop = req.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise ValidationError("stop must be a string or a list of strings")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise ValidationError("stream must be true or false")
    kw = dict(max_new_tokens=req.get("max_tokens", defaults.max_tokens),
              temperature=req.get("temperature", defaults.temperature),
              top_k=req.get("top_k", defaults.top_k), top_p=req.get("top_p", defaults.top_p),
              seed=req.get("seed", defaults.seed), stop=stop)
    n = kw["max_new_tokens"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
        raise ValidationError(f"max_tokens must be an int in [0, 4096], got {n!r}")
    return {"prompt": prompt, "stream": stream, "kwargs": kw}


def create_app(model: TransformerModel, tokenizer: Tokenizer, options: "ServerOptions | None" = None,
               inference=None, model_name: str = "smallmind"):
    """The FastAPI application serving `model` (put in eval mode, shared by every request)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

    from ..config import InferenceOptions

    options = options or ServerOptions()
    inference = inference or InferenceOptions()
    model.eval()
    threads = options.threads_per_request or default_threads_per_request(options.max_concurrency)
    app = FastAPI(title="smallmind", docs_url=None, redoc_url=None)
    state: dict[str, _Gate | None] = {"gate": None}
    running: set[threading.Event] = set()       # the cancel events of admitted requests
    stopping = threading.Event()                # set once shutdown starts

    def begin_shutdown():
        """Stop every running generation now; requests arriving from here on get 503."""
        stopping.set()
        for ev in list(running):
            ev.set()

    app.state.smallmind_begin_shutdown = begin_shutdown

    def gate() -> _Gate:       # created inside the server's event loop
        if state["gate"] is None:
            state["gate"] = _Gate(options.max_concurrency, options.queue_size)
        return state["gate"]  # type: ignore[return-value]  # set just above

    def validate(req):
        s = Sampling(model, tokenizer, threads=threads, window=inference.window)
        # argument checks of Sampling, before any slot is taken
        from .sampling import check_sampling_args
        check_sampling_args(**req["kwargs"])
        with warnings.catch_warnings():        # unknown characters: the reply says enough
            warnings.simplefilter("ignore")
            known = tokenizer.encode(req["prompt"])
        if not known:
            raise ValidationError("prompt has no character the model knows")
        return s

    def completion(text, reason, n_prompt, n_new, rid):
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                          "total_tokens": n_prompt + n_new}}

    def prepare(body: bytes):
        req = _parse_request(body, inference, options.max_prompt_chars)
        return req, validate(req)

    def shutting_down():
        return _error(503, "the server is shutting down", "server_shutting_down")

    @app.post("/v1/completions")
    async def completions(request: Request):
        from starlette.requests import ClientDisconnect
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if stopping.is_set():
            return shutting_down()
        try:
            body = await _read_body(request, options.max_body_bytes, options.body_timeout)
            # in a worker thread: a big body's JSON and its prompt's encoding take time that
            # the event loop (and /health/live) should not wait for
            req, sampler = await loop.run_in_executor(None, prepare, body)
        except _Refused as e:
            return _error(e.status, e.message, e.kind, close=True)
        except (ValidationError, TypeError) as e:
            return _error(400, str(e), "invalid_request_error")
        except (ClientDisconnect, ConnectionError):
            # a client that leaves mid-body: nothing to answer, nothing worth a traceback
            logger.debug("client %s left before sending its whole request", request.client)
            _metrics.REGISTRY.inc("smallmind_http_client_disconnects_total", 1,
                                  "clients that left before sending their whole request")
            from fastapi.responses import Response
            return Response(status_code=400)
        g = gate()
        if not g.admit():
            return _error(429, f"the server is busy ({g.slots} running, {g.queue} queued)",
                          "rate_limit_error")
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        cancel = threading.Event()
        try:
            await asyncio.wait_for(g._sem.acquire(), options.timeout)
        except asyncio.TimeoutError:
            g.leave()
            return _error(504, "timed out waiting for a free slot", "timeout")
        running.add(cancel)

        def release():
            running.discard(cancel)
            g._sem.release()
            g.leave()

        if stopping.is_set():
            release()
            return shutting_down()
        _metrics.REGISTRY.inc("smallmind_http_requests_total", 1, "completion requests",
                              stream=str(req["stream"]).lower())

        if not req["stream"]:
            try:
                fut = loop.run_in_executor(None, lambda: sampler.generate(
                    req["prompt"], cancel=cancel, return_details=True, **req["kwargs"]))
                try:
                    r = await asyncio.wait_for(asyncio.shield(fut), options.timeout)
                except asyncio.TimeoutError:
                    cancel.set()
                    await asyncio.gather(fut, return_exceptions=True)
                    return _error(504, f"generation took longer than {options.timeout} s", "timeout")
                except asyncio.CancelledError:            # the client went away
                    cancel.set()
                    await asyncio.gather(fut, return_exceptions=True)
                    raise
                except CancelledError:                    # begin_shutdown stopped it
                    return shutting_down()
            finally:
                release()
            _metrics.REGISTRY.observe("smallmind_http_request_seconds", time.perf_counter() - t0,
                                      "completion request latency")
            return completion(r.text, r.finish_reason, r.prompt_tokens, r.new_tokens, rid)

        async def events():
            queue: asyncio.Queue = asyncio.Queue()
            done = object()

            def work():
                result = None
                try:
                    it = sampler.stream(req["prompt"], cancel=cancel, **req["kwargs"])
                    while True:
                        try:
                            piece = next(it)
                        except StopIteration as e:
                            result = e.value
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                except CancelledError as e:          # the client left, or shutdown
                    result = getattr(e, "result", None)
                except BaseException as e:        # reported in the stream
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                loop.call_soon_threadsafe(queue.put_nowait, (done, result))

            fut = loop.run_in_executor(None, work)
            deadline = loop.time() + options.timeout
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        cancel.set()
                        yield "data: " + json.dumps({"error": {"message": "timeout", "type": "timeout"}}) + "\n\n"
                        break
                    if isinstance(item, tuple) and item[0] is done:
                        r = item[1]
                        last = completion("", r.finish_reason if r else "cancelled",
                                          r.prompt_tokens if r else 0, r.new_tokens if r else 0, rid)
                        yield "data: " + json.dumps(last) + "\n\n"
                        yield "data: [DONE]\n\n"
                        break
                    if isinstance(item, BaseException):
                        yield "data: " + json.dumps({"error": {"message": str(item), "type": "server_error"}}) + "\n\n"
                        break
                    yield "data: " + json.dumps(completion(item, None, 0, 0, rid)) + "\n\n"
            finally:                                   # also when the client disconnects
                cancel.set()
                await asyncio.gather(fut, return_exceptions=True)
                release()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health/live")
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        import numpy as np
        t = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: model.forward(np.zeros((1, 1), np.int32), threads=1))
        except SmallMindError as e:
            return _error(503, f"the model cannot run: {e}", "not_ready")
        return {"status": "ok", "forward_ms": round(1e3 * (time.perf_counter() - t), 3)}

    @app.get("/metrics")
    async def metrics():
        g = gate()
        _metrics.REGISTRY.set("smallmind_http_in_flight", g.inside, "requests running or queued")
        return PlainTextResponse(_metrics.render_prometheus(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground():
        return HTMLResponse(_PLAYGROUND)

    return app


def _header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    `timeout` seconds of connecting or of its previous response (uvicorn has no such timeout:
    a client that sends half a request and stalls held its socket forever). Once a request
    has started, its body is bounded by body_timeout (_read_body). None, with a log line, where
    this uvicorn's internals are not the ones this was written against: then plain uvicorn."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError as e:
        logger.warning("no header timeout (uvicorn's h11 protocol is not available: %s)", e)
        return None
    if not all(callable(getattr(H11Protocol, name, None)) for name in
               ("connection_made", "connection_lost", "handle_events", "on_response_complete")):
        logger.warning("no header timeout (this uvicorn's H11Protocol differs from the one "
                       "smallmind knows)")
        return None

    class HeaderTimeoutProtocol(H11Protocol):
        _sm_timer: "asyncio.TimerHandle | None" = None

        def _sm_arm(self):
            self._sm_disarm()
            try:
                self._sm_timer = self.loop.call_later(timeout, self._sm_expired)
            except AttributeError:               # pragma: no cover - another uvicorn
                logger.warning("no header timeout (this uvicorn's H11Protocol has no loop)")

        def _sm_disarm(self):
            if self._sm_timer is not None:
                self._sm_timer.cancel()
                self._sm_timer = None

        def _sm_expired(self):
            self._sm_timer = None
            try:
                waiting = (self.conn.their_state is h11.IDLE
                           and (self.cycle is None or self.cycle.response_complete))
                if waiting and not self.transport.is_closing():
                    logger.debug("closing %s: no request head within %g s", self.client, timeout)
                    _metrics.REGISTRY.inc("smallmind_http_header_timeouts_total", 1,
                                          "connections closed for a request head that did not come")
                    self.transport.close()
            except AttributeError:               # pragma: no cover - another uvicorn
                logger.warning("header timeout skipped (this uvicorn's H11Protocol differs)")

        def connection_made(self, transport):
            super().connection_made(transport)
            self._sm_arm()

        def connection_lost(self, exc):
            self._sm_disarm()
            super().connection_lost(exc)

        def handle_events(self):
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:         # a request head arrived: a request started
                self._sm_disarm()

        def on_response_complete(self):
            super().on_response_complete()      # keep-alive: the next request head is due
            if self._sm_timer is None and not self.transport.is_closing() and (
                    self.cycle is None or self.cycle.response_complete):
                self._sm_arm()

    return HeaderTimeoutProtocol


def make_server(config, begin_shutdown):
    """A uvicorn.Server that stops running generations when shutdown starts (begin_shutdown)
    and, once it has stopped, returns instead of raising the signal that stopped it again
    (uvicorn does, so `smallmind serve` ended by SIGTERM with status -15)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                logger.info("signal %d: stopping (at most %g s for running requests)", sig,
                            config.timeout_graceful_shutdown or 0)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            begin_shutdown()
            await super().shutdown(sockets)

    return Server(config)


def uvicorn_config(app, options: "ServerOptions", log_level: str = "warning"):
    """The uvicorn.Config that `serve` runs `app` with: the header timeout protocol, at most
    max_connections connections, at most shutdown_timeout seconds of draining."""
    import uvicorn
    protocol = _header_timeout_protocol(options.header_timeout)
    return uvicorn.Config(app, host=options.host, port=options.port, log_level=log_level,
                          http=protocol or "auto", limit_concurrency=options.max_connections,
                          # a float works (asyncio.timeout), whatever the annotation says
                          timeout_graceful_shutdown=options.shutdown_timeout)  # type: ignore[arg-type]


def serve(model, tokenizer, options: "ServerOptions", inference=None, model_name="smallmind"):
    """Run the server until SIGTERM or Ctrl-C, then return (see the module's docstring)."""
    app = create_app(model, tokenizer, options, inference, model_name)
    logger.info("serving %s on http://%s:%d", model_name, options.host, options.port)
    make_server(uvicorn_config(app, options), app.state.smallmind_begin_shutdown).run()
