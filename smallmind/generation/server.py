"""server.py - the HTTP server behind `smallmind serve` (the `smallmind[serve]` extra: FastAPI,
uvicorn, jinja2): the OpenAI API over one model, every generation decoded by one BatchEngine
(continuous batching: one C call per step for all running requests). This module is the thin
HTTP layer: read and authorise the request, hand it to openai_api (parse) and the engine
(generate), format the answer.

Endpoints (docs/server.md has the fields and examples):
    POST /v1/completions        prompt (string, list of strings, token ids), n, stream, logprobs,
                                echo, stop, seed, penalties, logit_bias, ...
    POST /v1/chat/completions   messages through the chat template; logprobs / top_logprobs
    POST /v1/embeddings         mean-pooled final hidden states (ModelEmbedder)
    GET  /v1/models, /v1/models/{id}
    GET  /health/live, /health/ready, /metrics (Prometheus), / (the playground page)

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 (the field is
named in param), 401 (no or a wrong API key), 404, 405, 408 (body too slow), 413 (body too
big), 429 (queue full, with Retry-After), 500 (the model produced NaN), 503 (shutting down),
504 (the request ran past timeout).

Against hostile clients: the body is read in pieces and refused as soon as it passes
max_body_bytes (or its Content-Length says it will); parsing and prompt encoding run in a worker
thread, so that /health/live answers meanwhile; a connection that has not sent a whole request
head within header_timeout is closed (_header_timeout_protocol); uvicorn refuses connections
beyond max_connections with 503. On SIGTERM / Ctrl-C, `serve` refuses new requests (503), lets
running ones go on for shutdown_timeout seconds less a margin, then cancels the rest (each gets
an answer: 503, or an error event in its stream) and returns with exit status 0.
"""
import asyncio
import collections
import contextlib
import hmac
import json
import logging
import queue
import signal
import threading
import time
import uuid

from .. import metrics as _metrics
from ..config import InferenceOptions, ServerOptions
from ..errors import SmallMindError, ValidationError
from ..model.tokenizer import BaseTokenizer
from ..model.transformer import TransformerModel
from . import openai_api as api
from .chat import ChatTemplate, find_template
from .engine import BatchEngine, Done, Failed, Piece, prompt_logprobs
from .playground import PLAYGROUND

logger = logging.getLogger("smallmind.server")
access_logger = logging.getLogger("smallmind.server.access")


class _Refused(Exception):
    """A request refused before its body is parsed: (status, message, type)."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _json(status: int, body: dict, headers: dict | None = None):
    from fastapi.responses import JSONResponse
    return JSONResponse(body, status_code=status, headers=headers)


def _api_error(e: "api.APIError"):
    _metrics.REGISTRY.inc("smallmind_http_errors_total", 1, "HTTP error responses",
                          status=str(e.status))
    return _json(e.status, e.body(), e.headers)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def _merge_pieces(batch: list) -> list:
    """A batch's events grouped by choice, each choice's consecutive Pieces as one (text and
    tokens joined): under load the engine runs ahead of the event loop, and one chunk per token
    would cost a JSON encoding and a write each. Each choice keeps its own order."""
    groups: dict = {}
    for i, ev in batch:
        evs = groups.setdefault(i, [])
        if isinstance(ev, Piece) and evs and isinstance(evs[-1], Piece):
            evs[-1] = Piece(evs[-1].text + ev.text, evs[-1].tokens + ev.tokens)
        else:
            evs.append(ev)
    return [(i, ev) for i, evs in groups.items() for ev in evs]


class _Inbox:
    """One request's events (index of the choice, event), filled by the _Mailbox."""

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()

    async def get(self) -> list:
        """Every event that has arrived (waits for at least one)."""
        while not self.items:
            self.ready.clear()
            if self.items:
                break
            await self.ready.wait()
        out = list(self.items)
        self.items.clear()
        return out


class _Mailbox:
    """Hands events from the engine's thread to the event loop in batches: the engine thread
    appends to one queue, and only the first append after a delivery wakes the loop (one
    self-pipe write per batch, not per token per request: under load a batch holds a whole
    engine step, or several). The loop then sorts the events into each request's _Inbox."""

    def __init__(self, loop):
        self.loop = loop
        self.queue: collections.deque = collections.deque()
        self.armed = False

    def sink(self, inbox: _Inbox, index: int):
        def put(ev):
            self.queue.append((inbox, index, ev))
            if not self.armed:
                self.armed = True
                self.loop.call_soon_threadsafe(self._deliver)
        return put

    def _deliver(self):
        self.armed = False                   # first: an append from now on schedules again
        q = self.queue
        while q:
            inbox, index, ev = q.popleft()
            inbox.items.append((index, ev))
            inbox.ready.set()


class _Front:
    """ASGI middleware in front of the app: the API key check (constant-time, every key
    compared) on /v1 routes (and /metrics with metrics_auth), and one access-log line per
    request (logger smallmind.server.access: JSON with --log-json)."""

    def __init__(self, app, keys: tuple, metrics_auth: bool):
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys]
        self.metrics_auth = metrics_auth

    def _authorized(self, scope) -> bool:
        given = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                if v[:7].lower() == b"bearer ":
                    given = v[7:].strip()
                break
        ok = False
        for key in self.keys:                # no early exit: the time does not depend on which
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        path = scope.get("path", "")
        try:
            guarded = path.startswith("/v1/") or path == "/v1" or (
                self.metrics_auth and path == "/metrics")
            if self.keys and guarded and not self._authorized(scope):
                err = api.APIError(401, "no or an incorrect API key: send 'Authorization: Bearer "
                                   "KEY'", "invalid_request_error", None, "invalid_api_key",
                                   {"WWW-Authenticate": "Bearer"})
                await _api_error(err)(scope, receive, send_)
                return
            await self.app(scope, receive, send_)
        finally:
            client = scope.get("client") or ("-", 0)
            ms = 1e3 * (time.perf_counter() - t0)
            access_logger.info('%s "%s %s" %d %.1f ms', client[0], scope.get("method"), path,
                               status[0], ms, extra={"client": client[0], "method": scope.get("method"),
                                                     "path": path, "status": status[0],
                                                     "duration_ms": round(ms, 3)})


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


def create_app(model: TransformerModel, tokenizer: BaseTokenizer, options: "ServerOptions | None" = None,
               inference: "InferenceOptions | None" = None, model_name: str = "smallmind", *,
               template: "ChatTemplate | None" = None, model_path: "str | None" = None):
    """The ASGI application serving `model` (put in eval mode, shared by every request) with
    the OpenAI API. The batch engine starts with the application (its lifespan) and stops with
    it; app.state.smallmind_engine is the engine while it runs. model_path (the checkpoint) is
    where a chat_template.jinja is looked for."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    options = options or ServerOptions()
    inference = inference or InferenceOptions()
    model.eval()
    keys = options.api_keys()
    template = template or find_template(options.chat_template, model_path)
    name = options.model_name or model_name
    created = api.now()
    threads = options.threads_per_request or inference.threads
    state: dict = {"engine": None, "stopping": False}

    def start_engine():
        """The engine, started on first use (the lifespan's start, or the first request where
        the ASGI server runs no lifespan)."""
        if state["engine"] is None and not state["stopping"]:
            state["engine"] = app.state.smallmind_engine = BatchEngine(
                model, tokenizer, max_batch=options.max_concurrency, max_queue=options.queue_size,
                threads=threads, window=inference.window, prefill_budget=options.prefill_budget,
                prefix_cache=options.prefix_cache)
        return state["engine"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        start_engine()
        try:
            yield
        finally:
            state["stopping"] = True
            if state["engine"] is not None:
                await asyncio.get_running_loop().run_in_executor(None, state["engine"].close)

    app = FastAPI(title="smallmind", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def begin_shutdown(grace: float | None = None):
        """Refuse new requests from now on (503); cancel running generations after `grace`
        seconds (None: now)."""
        state["stopping"] = True
        engine = state["engine"]
        if engine is None:
            return
        if grace:
            threading.Timer(grace, engine.cancel_all).start()
        else:
            engine.cancel_all()

    app.state.smallmind_begin_shutdown = begin_shutdown
    app.state.smallmind_model_name = name

    def unavailable():
        what = "shutting down" if state["stopping"] else "starting"
        return api.APIError(503, f"the server is {what}", "server_error", None, "unavailable",
                            {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
        return _api_error(api.APIError(exc.status_code, msg, "invalid_request_error", None, code))

    async def body_of(request: Request) -> bytes:
        try:
            return await _read_body(request, options.max_body_bytes, options.body_timeout)
        except _Refused as e:
            err = api.APIError(e.status, e.message, e.kind)
            err.headers = {"Connection": "close"}    # the client may still be sending
            raise err from None

    async def parse(request: Request, fn):
        """(engine, parsed request), parsing and encoding in a worker thread."""
        engine = start_engine()
        if engine is None or state["stopping"]:
            raise unavailable()
        body = await body_of(request)
        ctx = api.Context(engine, inference, options, template, name)
        loop = asyncio.get_running_loop()
        try:
            return engine, await loop.run_in_executor(None, lambda: fn(api.read_json(body), ctx))
        except ValidationError as e:            # the chat template's failures
            raise api.APIError(400, str(e), "invalid_request_error", "messages") from None

    def with_errors(handler):
        async def run(request: Request):
            try:
                return await handler(request)
            except api.APIError as e:
                return _api_error(e)
            except (ClientDisconnect, ConnectionError):
                # a client that leaves mid-body: nothing to answer, nothing worth a traceback
                logger.debug("client %s left before sending its whole request", request.client)
                _metrics.REGISTRY.inc("smallmind_http_client_disconnects_total", 1,
                                      "clients that left before sending their whole request")
                from fastapi.responses import Response
                return Response(status_code=400)
        return run

    def submit(engine: BatchEngine, req: "api.GenerationRequest"):
        """Submit every choice; (_Inbox of (index, event), tickets). 429 when the queue cannot
        take them all."""
        free = engine.max_batch + (engine.max_queue or 0) - engine.active - engine.queued
        if len(req.jobs) > free:
            raise api.APIError(429, f"the server is busy ({engine.active} running, "
                               f"{engine.queued} queued)", "rate_limit_error", None,
                               "rate_limit_exceeded", {"Retry-After": "1"})
        if state.get("mailbox") is None:
            state["mailbox"] = _Mailbox(asyncio.get_running_loop())
        events = _Inbox()
        tickets = []
        try:
            for job in req.jobs:
                tickets.append(engine.submit(job.ids, job.params,
                                             state["mailbox"].sink(events, job.index)))
        except queue.Full:
            for t in tickets:
                t.cancel()
            raise api.APIError(429, "the server is busy (queue full)", "rate_limit_error", None,
                               "rate_limit_exceeded", {"Retry-After": "1"}) from None
        except SmallMindError:                   # the engine closed under us: shutdown
            for t in tickets:
                t.cancel()
            raise unavailable() from None
        _metrics.REGISTRY.inc("smallmind_http_requests_total", 1, "generation requests",
                              endpoint=req.kind, stream=str(req.stream).lower())
        return events, tickets

    async def echo_infos(req):
        """Prompt TokenInfos for echo with logprobs (one forward pass per prompt)."""
        if not (req.echo and req.logprobs is not None):
            return None
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(None, prompt_logprobs, model, tokenizer, ids,
                                           req.logprobs, threads) for ids in req.prompt_ids]

    def prompt_usage(req, results) -> int:
        # each prompt counts once, whatever n is (as OpenAI counts)
        seen = {}
        for job in req.jobs:
            r = results.get(job.index)
            if r is not None:
                seen[job.prompt_index] = r.prompt_tokens
        return sum(seen.values())

    async def generate(request: Request, kind: str):
        engine, req = await parse(request, api.parse_completion if kind == "completion"
                                  else api.parse_chat)
        echoes = await echo_infos(req)
        events, tickets = submit(engine, req)
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(stream(req, events, tickets, rid, echoes),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        t0 = time.perf_counter()
        results: dict = {}
        kept: dict = {}

        async def collect():
            while len(results) < len(req.jobs):
                for i, ev in await events.get():
                    if isinstance(ev, Done):
                        results[i], kept[i] = ev.result, ev.tokens
                    elif isinstance(ev, Failed):
                        raise ev.error

        try:
            await asyncio.wait_for(collect(), options.timeout)
        except asyncio.TimeoutError:
            raise api.APIError(504, f"the request took longer than {options.timeout:g} s "
                               "(timeout)", "timeout", None, "timeout") from None
        except SmallMindError as e:               # NaN logits: the model, not the request
            raise api.APIError(500, str(e), "server_error", None, "model_error") from None
        finally:
            for t in tickets:                     # the client left, or a timeout: stop them
                t.cancel()
        if any(r.finish_reason == "cancelled" for r in results.values()):
            raise unavailable()
        choices = []
        for job in req.jobs:
            r, infos = results[job.index], kept[job.index]
            choices.append(choice(req, job, r.text, r.finish_reason, infos, echoes))
        n_prompt = prompt_usage(req, results)
        n_new = sum(len(r.tokens) for r in results.values())
        _metrics.REGISTRY.observe("smallmind_http_request_seconds", time.perf_counter() - t0,
                                  "generation request latency")
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": api.now(), "model": name, "choices": choices,
                "usage": api.usage(n_prompt, n_new),
                **({"system_fingerprint": None} if kind == "chat" else {})}

    def choice(req, job, text, reason, infos, echoes):
        if req.kind == "completion":
            prefix = req.prompts[job.prompt_index] if req.echo else ""
            lp = None
            if req.logprobs is not None:
                pre = echoes[job.prompt_index] if echoes else []
                lp = api.completion_logprobs(pre + infos, 0)
            return {"index": job.index, "text": prefix + text, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": job.index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": api.chat_logprobs(infos, tokenizer) if req.logprobs is not None else None,
                "finish_reason": reason}

    async def stream(req, events, tickets, rid, echoes):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.timeout
        created_ = api.now()
        offsets: dict = {}                # completion: the next token's text offset per choice
        results: dict = {}

        def emit(choices, usage_=None):
            return _sse(api.chunk(rid, created_, name, req.kind, choices, usage_))

        # the common chunk - one choice's text, no logprobs - from a template: the envelope is
        # encoded once per request and only the text per chunk (a third of the cost)
        pre, post = _sse(api.chunk(rid, created_, name, req.kind, ["\0"])).split('"\\u0000"')
        if req.kind == "chat":
            def text_chunk(i, text):
                return (f'{pre}{{"index": {i}, "delta": {{"content": {json.dumps(text)}}}, '
                        f'"logprobs": null, "finish_reason": null}}{post}')
        else:
            def text_chunk(i, text):
                return (f'{pre}{{"index": {i}, "text": {json.dumps(text)}, "logprobs": null, '
                        f'"finish_reason": null}}{post}')

        try:
            for job in req.jobs:          # the opening chunk of each choice
                if req.kind == "chat":
                    yield emit([{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])
                    continue
                offsets[job.index] = 0
                if req.echo:
                    p = req.prompts[job.prompt_index]
                    lp = (api.completion_logprobs(echoes[job.prompt_index], 0)
                          if echoes else None)
                    offsets[job.index] = len(p)
                    yield emit([{"index": job.index, "text": p, "logprobs": lp,
                                 "finish_reason": None}])
            while len(results) < len(req.jobs):
                try:
                    batch = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    yield _sse(api.APIError(504, f"the request took longer than "
                                            f"{options.timeout:g} s (timeout)", "timeout", None,
                                            "timeout").body())
                    return
                out = []                  # the batch's chunks, sent in one write
                for i, ev in _merge_pieces(batch):
                    if isinstance(ev, Piece):
                        if req.logprobs is None:
                            if req.kind == "completion":
                                offsets[i] += len(ev.text)
                            out.append(text_chunk(i, ev.text))
                        elif req.kind == "chat":
                            lp = api.chat_logprobs(ev.tokens, tokenizer) if req.logprobs is not None else None
                            out.append(emit([{"index": i, "delta": {"content": ev.text},
                                              "logprobs": lp, "finish_reason": None}]))
                        else:
                            lp = (api.completion_logprobs(ev.tokens, offsets[i])
                                  if req.logprobs is not None else None)
                            offsets[i] += len(ev.text)
                            out.append(emit([{"index": i, "text": ev.text, "logprobs": lp,
                                              "finish_reason": None}]))
                    elif isinstance(ev, Done):
                        results[i] = ev.result
                        if ev.result.finish_reason == "cancelled":
                            yield "".join(out) + _sse(unavailable().body())
                            return
                        last = ({"index": i, "delta": {}, "logprobs": None} if req.kind == "chat"
                                else {"index": i, "text": "", "logprobs": None})
                        last["finish_reason"] = ev.result.finish_reason
                        out.append(emit([last]))
                    else:
                        yield "".join(out) + _sse(api.APIError(500, str(ev.error), "server_error",
                                                               None, "model_error").body())
                        return
                yield "".join(out)
            if req.include_usage:
                n_new = sum(len(r.tokens) for r in results.values())
                yield emit([], api.usage(prompt_usage(req, results), n_new))
            yield "data: [DONE]\n\n"
        finally:                          # also when the client disconnects
            for t in tickets:
                t.cancel()

    @app.post("/v1/completions")
    @with_errors
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    @with_errors
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/embeddings")
    @with_errors
    async def embeddings(request: Request):
        from ..retrieval.rag import ModelEmbedder
        engine, (texts, fmt, ids) = await parse(request, api.parse_embeddings)
        embedder = ModelEmbedder(model, tokenizer, threads=threads)
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(None, embedder.embed, texts)
        _metrics.REGISTRY.inc("smallmind_http_requests_total", 1, "generation requests",
                              endpoint="embeddings", stream="false")
        return api.embeddings_response(vectors, fmt, name, sum(map(len, ids)))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card(name, created, model)]}

    @app.get("/v1/models/{model_id:path}")
    @with_errors
    async def model_info(request: Request):
        model_id = request.path_params["model_id"]
        if model_id != name:
            raise api.APIError(404, f"the model {model_id!r} does not exist (this server has "
                               f"{name!r})", "invalid_request_error", "model", "model_not_found")
        return api.model_card(name, created, model)

    @app.get("/health/live")
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        import numpy as np
        if start_engine() is None or state["stopping"]:
            return _api_error(unavailable())
        t = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: model.forward(np.zeros((1, 1), np.int32), threads=1))
        except SmallMindError as e:
            return _api_error(api.APIError(503, f"the model cannot run: {e}", "server_error",
                                           None, "not_ready"))
        return {"status": "ok", "forward_ms": round(1e3 * (time.perf_counter() - t), 3)}

    @app.get("/metrics")
    async def metrics():
        engine = state["engine"]
        if engine is not None:
            _metrics.REGISTRY.set("smallmind_http_in_flight", engine.active + engine.queued,
                                  "requests running or queued")
            _metrics.REGISTRY.set("smallmind_engine_active", engine.active,
                                  "requests the batch engine is decoding")
            _metrics.REGISTRY.set("smallmind_engine_queued", engine.queued,
                                  "requests waiting for a slot of the batch engine")
        _metrics.REGISTRY.set("smallmind_model_info", 1, "the served model", id=name,
                              dtype=model.dtype)
        return PlainTextResponse(_metrics.render_prometheus(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground():
        return HTMLResponse(PLAYGROUND)

    app.add_middleware(_Front, keys=keys, metrics_auth=options.metrics_auth)
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
            # running requests get shutdown_timeout less a margin to finish; then they are
            # cancelled, early enough that each still gets its answer (503 or an error event)
            # before uvicorn closes what is left
            grace = config.timeout_graceful_shutdown
            begin_shutdown(None if not grace else max(0.0, grace - min(1.0, grace / 4)))
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


def serve(model, tokenizer, options: "ServerOptions", inference=None, model_name="smallmind",
          model_path=None):
    """Run the server until SIGTERM or Ctrl-C, then return (see the module's docstring)."""
    app = create_app(model, tokenizer, options, inference, model_name, model_path=model_path)
    name = app.state.smallmind_model_name
    logger.info("serving %s on http://%s:%d", name, options.host, options.port)
    make_server(uvicorn_config(app, options), app.state.smallmind_begin_shutdown).run()
