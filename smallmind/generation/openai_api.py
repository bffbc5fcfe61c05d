"""openai_api.py - the OpenAI API's request and response shapes, apart from HTTP: requests
for /v1/completions, /v1/chat/completions and /v1/embeddings are checked and turned into engine
jobs (one per choice), and engine results are turned into the JSON objects and stream chunks
OpenAI's clients read. Every refusal is an APIError carrying OpenAI's error fields (status,
message, type, param, code); the server only formats it.

Fields: those with a meaning here are checked (a bad value is a 400 naming the field); fields
real clients send routinely and that change nothing here (user, store, metadata, service_tier,
parallel_tool_calls, ...) and unknown fields are accepted and ignored; fields asking for what
smallmind does not do (suffix, best_of > n, tools, a JSON response format, image content)
are a 400 naming the field.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
import warnings
from typing import Any

import numpy as np

from ..errors import ValidationError
from .chat import ROLES
from .engine import MAX_LOGPROBS, SamplingParams

__all__ = ["APIError", "Job", "GenerationRequest", "read_json", "parse_completion", "parse_chat",
           "parse_embeddings", "MAX_TOKENS", "MAX_STOP"]

MAX_TOKENS = 4096        # the most new tokens one choice may ask for
MAX_STOP = 4             # stop strings per request, as OpenAI


class APIError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        msg = self.message.encode("utf-8", "backslashreplace").decode("utf-8")   # lone surrogates
        return {"error": {"message": msg, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def read_json(body: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:
        # RecursionError: json.loads gives up on deeply nested arrays (found by fuzz/: a 500
        # before); UnicodeDecodeError is a ValueError.
        raise _bad(None, f"the body is not valid JSON: {e}") from None  # type: ignore[arg-type]
    if not isinstance(req, dict):
        raise _bad(None, "the body must be a JSON object")  # type: ignore[arg-type]
    return req


# ---- field checks ----------------------------------------------------------------------------

def _get(req: dict, name: str, default):
    v = req.get(name)
    return default if v is None else v


def _int(req, name, default, lo, hi):
    v = _get(req, name, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(name, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _num(req, name, default, lo, hi, lo_open=False):
    v = _get(req, name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            not (lo < v if lo_open else lo <= v) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _bad(name, f"{name} must be a number in {rng}, got {v!r}")
    return float(v)


def _bool(req, name, default=False):
    v = _get(req, name, default)
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false, got {v!r}")
    return v


def _stop(req, default: tuple = ()) -> tuple:
    v = req.get("stop")
    if v is None:
        return tuple(default)
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"stop takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "stop strings must not be empty")
    return tuple(stops)


def _logit_bias(req, vocab_size: int):
    v = req.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("logit_bias", "logit_bias must be an object mapping token ids to numbers")
    out = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"logit_bias keys must be token ids, got {k!r}") from None
        if not 0 <= tid < vocab_size:
            raise _bad("logit_bias", f"logit_bias token id {tid} is outside the vocabulary "
                                     f"[0, {vocab_size - 1}]")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise _bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {b!r}")
        out[tid] = float(b)
    return out


def _refuse_unless(req, name, ok) -> None:
    if name in req and not ok(req[name]):
        raise _bad(name, f"{name}={json.dumps(req[name])[:80]} is not supported by this server")


# ---- generation requests -----------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One choice to generate: its index in the response, the prompt it continues, settings."""
    index: int
    prompt_index: int
    ids: list
    params: SamplingParams


@dataclasses.dataclass
class GenerationRequest:
    kind: str                   # "completion" or "chat"
    model: str
    jobs: list
    prompts: list               # the prompt texts (echo)
    prompt_ids: list            # their token ids
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # top-N per token, None: no logprobs


class Context:
    """What parsing needs from the server: the engine (its tokenizer and model), the default
    sampling settings (InferenceOptions), the limits (ServerOptions) and the chat template."""

    def __init__(self, engine, inference, options, template, model_name: str):
        self.engine, self.inference, self.options = engine, inference, options
        self.template, self.model_name = template, model_name
        self.vocab = engine.tokenizer.vocab_size

    def encode(self, text: str, param: str) -> list:
        if len(text) > self.options.max_prompt_chars:
            raise _bad(param, f"{param} is {len(text)} characters, more than the limit of "
                              f"{self.options.max_prompt_chars} (max_prompt_chars)")
        with warnings.catch_warnings():        # unknown characters: dropped, as documented
            warnings.simplefilter("ignore")
            ids = self.engine.tokenizer.encode(text)
        if not ids:
            raise _bad(param, f"{param} has no character the model knows")
        return ids


def _sampling(req: dict, ctx: Context, max_tokens, stop: tuple, logprobs) -> SamplingParams:
    d = ctx.inference
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_num(req, "temperature", d.temperature, 0.0, 1e6),
        top_k=_int(req, "top_k", d.top_k, 0, 1 << 30),
        top_p=_num(req, "top_p", d.top_p, 0.0, 1.0, lo_open=True),
        seed=_int(req, "seed", d.seed, 0, 2 ** 128 - 1),
        stop=stop,
        presence_penalty=_num(req, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(req, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=tuple(sorted((_logit_bias(req, ctx.vocab) or {}).items())),
        logprobs=logprobs)


def _stream_flags(req) -> tuple:
    stream = _bool(req, "stream")
    so = req.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options", "stream_options must be an object")
    include = False
    if so:
        include = so.get("include_usage") or False
        if not isinstance(include, bool):
            raise _bad("stream_options", "stream_options.include_usage must be true or false")
    return stream, include and stream


def _jobs(req, ctx, prompt_ids, params: SamplingParams) -> list:
    n = _int(req, "n", 1, 1, ctx.options.max_n)
    if len(prompt_ids) * n > ctx.options.max_n:
        raise _bad("n", f"{len(prompt_ids)} prompts x n={n} choices is more than the limit of "
                        f"{ctx.options.max_n} (max_n)")
    jobs = []
    for p, ids in enumerate(prompt_ids):
        for i in range(n):
            k = p * n + i
            seed = None if params.seed is None else params.seed + k    # choice k: seed + k
            jobs.append(Job(k, p, ids, dataclasses.replace(params, seed=seed)))
    return jobs


def parse_completion(req: dict, ctx: Context) -> GenerationRequest:
    """POST /v1/completions."""
    prompt = req.get("prompt")
    texts: list[Any]
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        texts = [prompt]                     # one prompt as token ids
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in p) for p in prompt):
        texts = list(prompt)                 # several prompts as token ids
    else:
        raise _bad("prompt", "prompt must be a string, a non-empty list of strings, or token ids")
    ids = []
    for i, t in enumerate(texts):
        where = "prompt" if len(texts) == 1 else f"prompt[{i}]"
        if isinstance(t, str):
            ids.append(ctx.encode(t, where))
        else:
            if not all(0 <= x < ctx.vocab for x in t):
                raise _bad("prompt", f"{where}: token ids must be in [0, {ctx.vocab - 1}]")
            ids.append(list(t))
    texts = [t if isinstance(t, str) else ctx.engine.tokenizer.decode(t) for t in texts]
    _refuse_unless(req, "suffix", lambda v: v is None or v == "")
    n = _int(req, "n", 1, 1, ctx.options.max_n)
    _refuse_unless(req, "best_of", lambda v: v is None or v == n)
    logprobs = _int(req, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _int(req, "max_tokens", ctx.inference.max_tokens, 0, MAX_TOKENS)
    params = _sampling(req, ctx, max_tokens, _stop(req, ctx.inference.stop), logprobs)
    stream, include = _stream_flags(req)
    return GenerationRequest("completion", _model(req, ctx), _jobs(req, ctx, ids, params), texts,
                             ids, stream, include, echo=_bool(req, "echo"), logprobs=logprobs)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        if m.get("role") == "assistant":
            return ""
        raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", f"messages[{i}].content[{j}] must be a "
                           "text part ({\"type\": \"text\", \"text\": ...}); this model reads text only")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of "
                                         "text parts")


def parse_chat(req: dict, ctx: Context) -> GenerationRequest:
    """POST /v1/chat/completions."""
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be one of "
                                              f"{', '.join(ROLES)}, got {role!r}")
        clean.append({"role": role, "content": _content(m, i)})
    _refuse_unless(req, "tools", lambda v: not v)
    _refuse_unless(req, "functions", lambda v: not v)
    _refuse_unless(req, "tool_choice", lambda v: v in (None, "none", "auto"))
    _refuse_unless(req, "response_format",
                   lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"))
    prompt = ctx.template.render(clean)
    ids = [ctx.encode(prompt, "messages")]
    want = _bool(req, "logprobs")
    top = _int(req, "top_logprobs", 0 if want else None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    mt = req.get("max_completion_tokens", req.get("max_tokens"))
    max_tokens = _int({"max_tokens": mt}, "max_tokens", ctx.inference.max_tokens, 0, MAX_TOKENS)
    stop = tuple(dict.fromkeys(_stop(req, ctx.inference.stop) + ctx.template.stop))
    params = _sampling(req, ctx, max_tokens, stop, top if want else None)
    stream, include = _stream_flags(req)
    return GenerationRequest("chat", _model(req, ctx), _jobs(req, ctx, ids, params), [prompt], ids,
                             stream, include, logprobs=top if want else None)


def _model(req, ctx) -> str:
    m = req.get("model")
    if m is not None and not isinstance(m, str):
        raise _bad("model", "model must be a string")
    return ctx.model_name          # one model is served, whatever name the client knows it by


def parse_embeddings(req: dict, ctx: Context) -> tuple:
    """POST /v1/embeddings: (texts, encoding_format, ids per text)."""
    inp = req.get("input")
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(t, str) for t in inp):
        texts = inp
    else:
        raise _bad("input", "input must be a string or a non-empty list of strings (token ids "
                            "are not accepted: send text)")
    fmt = _get(req, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", f"encoding_format must be 'float' or 'base64', got {fmt!r}")
    dims = req.get("dimensions")
    C = ctx.engine.model.config.n_embd
    if dims is not None and dims != C:
        raise _bad("dimensions", f"this model's embeddings have {C} dimensions; dimensions="
                                 f"{dims!r} is not supported")
    ids = [ctx.encode(t, "input" if len(texts) == 1 else f"input[{i}]") if t else []
           for i, t in enumerate(texts)]
    return texts, fmt, ids


# ---- responses ------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(infos: list, offset: int) -> dict:
    """OpenAI's legacy logprobs object for tokens whose text starts at `offset`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for t in infos:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.top is None else {s: lp for _, s, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def chat_logprobs(infos: list, tokenizer=None) -> dict:
    """OpenAI's chat logprobs object; "bytes" are the token's own bytes when the tokenizer is
    given (a BPE token may hold part of a character, which its text shows as U+FFFD)."""
    def one(tid, text, lp):
        try:
            raw = tokenizer.token_bytes(tid) if tokenizer is not None else None
        except ValidationError:
            raw = None
        if raw is None:
            raw = text.encode("utf-8", "surrogatepass")
        return {"token": text, "logprob": lp, "bytes": list(raw)}
    return {"content": [dict(one(t.id, t.text, t.logprob),
                             top_logprobs=[one(i, s, lp) for i, s, lp in (t.top or [])])
                        for t in infos], "refusal": None}


def chunk(rid: str, created: int, model: str, kind: str, choices: list, usage_=None) -> dict:
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if kind == "chat":
        out["system_fingerprint"] = None
    out["usage"] = usage_
    return out


def embeddings_response(vectors: np.ndarray, fmt: str, model: str, n_tokens: int) -> dict:
    data = []
    for i, v in enumerate(vectors):
        v = np.ascontiguousarray(v, dtype="<f4")
        emb: Any = base64.b64encode(v.tobytes()).decode("ascii") if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def model_card(name: str, created: int, model) -> dict:
    cfg = model.config
    return {"id": name, "object": "model", "created": created, "owned_by": "smallmind",
            "smallmind": {"dtype": model.dtype, "parameters": model.num_parameters(),
                          "context_length": cfg.block_size,
                "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}}


def now() -> int:
    return int(time.time())

