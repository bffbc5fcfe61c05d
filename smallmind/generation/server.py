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

Errors are JSON: {"error": {"message": ..., "type": ...}} with 400 (malformed JSON, bad values),
429 (queue full), 504 (timeout).
"""
import asyncio
import json
import logging
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


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse
    _metrics.REGISTRY.inc("smallmind_http_errors_total", 1, "HTTP error responses", status=str(status))
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _parse_request(body: bytes, defaults) -> dict:
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        # RecursionError: json.loads gives up on a body of deeply nested arrays; without this
        # catch such a request got a 500 instead of a 400. (UnicodeDecodeError is a ValueError.)
        raise ValidationError(f"the body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ValidationError("the body must be a JSON object")
    unknown = set(req) - _FIELDS
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
    prompt = req.get("prompt")
    if not isinstance(prompt, str):
        raise ValidationError("prompt must be a string")
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

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            req = _parse_request(await request.body(), inference)
            sampler = validate(req)
        except (ValidationError, TypeError) as e:
            return _error(400, str(e), "invalid_request_error")
        g = gate()
        if not g.admit():
            return _error(429, f"the server is busy ({g.slots} running, {g.queue} queued)",
                          "rate_limit_error")
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(g._sem.acquire(), options.timeout)
        except asyncio.TimeoutError:
            g.leave()
            return _error(504, "timed out waiting for a free slot", "timeout")
        _metrics.REGISTRY.inc("smallmind_http_requests_total", 1, "completion requests",
                              stream=str(req["stream"]).lower())

        def release():
            g._sem.release()
            g.leave()

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
                except CancelledError:
                    pass
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


def serve(model, tokenizer, options: "ServerOptions", inference=None, model_name="smallmind"):
    """Run the server until interrupted (uvicorn)."""
    import uvicorn
    app = create_app(model, tokenizer, options, inference, model_name)
    logger.info("serving %s on http://%s:%d", model_name, options.host, options.port)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
