"""sampling.py - Sampling: text generation from a TransformerModel with a KV cache in C (the
prompt is prefilled in one call, then one call per token, all without the GIL), temperature /
top-k / top-p sampling, stop strings, streaming and cooperative cancellation.

generate_batch decodes many prompts together: one C call per token for the whole batch.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import os
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

from .. import metrics as _metrics
from .._validate import check_int, check_number, check_optional_int
from ..cancellation import check_cancel
from ..core import _core
from ..errors import CancelledError, NumericalError, ValidationError
from ..model.tokenizer import BaseTokenizer
from ..model.transformer import TransformerModel

__all__ = ["Sampling", "GenerationResult"]

WINDOWS = ("shift", "slide")


def window_keep(block_size: int, window: str) -> int:
    """Tokens kept (and prefilled again, positions from 0) when a full window of `block_size`
    moves to take one more token: all of them for "slide", the newer half for "shift" (at
    least 2 where the block allows, so a batch row can prefill all but the newest)."""
    if window == "slide":
        return block_size
    return max(min(block_size, 2), block_size // 2)

logger = logging.getLogger("smallmind.sampling")

# The C loop (GPTGenerator.run) returns to Python at least this often, to stream text, check
# stop strings and honour cancellation; and after at most MAX_CHUNK tokens.
CHUNK_SECONDS = 0.004
MAX_CHUNK = 4096
MAX_REMAINING = 1 << 62     # a row's token budget in C (max_new_tokens may be larger: never reached)


@dataclasses.dataclass
class GenerationResult:
    """One generation: the continuation `text` and its `tokens`, why it ended
    (`finish_reason`: "length", "stop", or "cancelled" on the `result` of a CancelledError),
    the prompt's token count as the model saw it, and
    timings (seconds; tokens_per_sec counts generated tokens over the whole call)."""
    text: str
    tokens: list
    finish_reason: str
    prompt_tokens: int
    elapsed_sec: float
    time_to_first_token_sec: float

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_sec(self) -> float:
        return len(self.tokens) / self.elapsed_sec if self.elapsed_sec > 0 else float("inf")


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, seed, stop):
    """The sampling arguments every generation entry point takes (Sampling's methods, the
    services and the HTTP server), checked; returns (temperature, top_k, top_p, stop strings)."""
    check_int(max_new_tokens, "max_new_tokens", 0)
    temperature = check_number(temperature, "temperature", 0.0, math.inf, hi_open=True)
    top_k = check_int(top_k, "top_k", 0)
    top_p = check_number(top_p, "top_p", 0.0, 1.0, lo_open=True)
    check_optional_int(seed, "seed", 0)
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise TypeError("stop must be a str, a sequence of str, or None")
    if any(s == "" for s in stops):
        raise ValidationError("stop strings must not be empty")
    return temperature, top_k, top_p, stops


class _StepThreads:
    """The thread count of each call of the C generation loop (a few ms of decode steps, all
    on one count) of one generation. Times are kept per step (a call's time over its steps);
    the counts below ("steps", "after 8 steps", ...) count calls.

    A decode step is a few dozen OpenMP barriers. When another process holds one of the cores,
    each barrier can wait for the scheduler to give a preempted thread its time slice, and a
    2-thread step becomes several times slower than a 1-thread one (up to ~100 ms instead of
    ~0.1 ms in one measurement; a 1-thread step is barely affected). And for a small model one
    thread can simply be faster. So each count keeps a moving average of its step times: the
    first four steps alternate (threads, 1, threads, 1), then the faster count is used. While
    on `threads`, its average follows every step and decoding falls back to 1 thread when it
    gets 25% slower than the single-threaded average (a margin, so that one step delayed by an
    interrupt does not flip it); while on 1 thread, two multi-threaded steps
    are tried after 8 steps and win back when their mean is faster. Under contention the
    multi-threaded steps come fast and slow in streaks (as the other process is scheduled in
    and out), so every retry that loses, and every fallback after less than 64 steps, doubles
    the wait before the next retry (up to 4096 steps); 64 steps in a row on `threads` reset it.
    A fallback also leaves a process-wide hint for BUSY_HINT_S seconds: generations that start
    meanwhile (a server's next requests) begin on 1 thread, prompt prefill included, and only
    retry `threads` after 8 steps - the prefill and the probes would otherwise stall first.
    Results never depend on the thread count (tested bit for bit), so switching never shows in
    the output. `clock` is replaceable for tests."""

    FIRST_RETRY, LAST_RETRY, ALPHA, SETTLED, MARGIN = 8, 4096, 0.125, 64, 1.25
    BUSY_HINT_S = 2.0
    _busy_until = float("-inf")             # the hint, shared by every generation
    _PROBE = 4                               # the alternating steps at the start

    def __init__(self, threads: int | None, clock=time.perf_counter):
        self.multi = _core.get_num_threads() if threads is None else threads
        self.clock = clock
        self.avg: dict[int, Any] = {self.multi: None, 1: None}   # seconds per step, once timed
        self.current = self.multi        # the count for steps that are not timed (prefills)
        self.steps = 0
        self.retry_after = self.FIRST_RETRY
        self.countdown = 0
        self.retry: list[float] = []     # times of the multi-threaded retry in progress
        self.held = 0                    # steps on `threads` since it last won
        if self.multi > 1 and clock() < _StepThreads._busy_until:
            self.current, self.steps, self.countdown = 1, self._PROBE, self.FIRST_RETRY

    def run(self, fn, *args):
        """fn(*args, threads) with the chosen count, for a call of the C generation loop
        (GPTGenerator.run: it returns (tokens, made, ...)), timed per step: the call's time
        over the most tokens a row made."""
        multi = self.multi
        if multi == 1:
            return fn(*args, 1)
        settled = self.current == multi and self.steps >= self._PROBE
        t = multi if settled else self.choose()
        t0 = self.clock()
        out = fn(*args, t)
        dt = (self.clock() - t0) / max(1, int(out[1].max()))
        if settled:
            self._settled(dt)
        else:
            self.record(t, dt)
        return out

    def _settled(self, dt: float) -> None:
        """A step on `threads` while settled there: its average follows."""
        multi = self.multi
        self.steps += 1
        avg = self.avg[multi] + self.ALPHA * (dt - self.avg[multi])
        self.avg[multi] = avg
        self.held += 1
        if self.held == self.SETTLED:
            self.retry_after = self.FIRST_RETRY
        if avg > self.MARGIN * self.avg[1]:
            self._fall_back()

    def choose(self) -> int:
        if self.steps < self._PROBE:
            return self.multi if self.steps % 2 == 0 else 1
        if self.current == 1 and (self.countdown <= 0 or self.retry):
            return self.multi
        return self.current

    def record(self, t: int, dt: float) -> None:
        self.steps += 1
        if self.steps <= self._PROBE:
            # The smaller of the two probe times: the first step after a prefill runs on cold
            # caches and is no measure of the next hundred.
            self.avg[t] = dt if self.avg[t] is None else min(self.avg[t], dt)
            if self.steps == self._PROBE:
                self.current = self.multi if self.avg[self.multi] <= self.avg[1] else 1
                self.countdown = self.retry_after
            return
        if t == 1:
            self.avg[1] = dt if self.avg[1] is None else self.avg[1] + self.ALPHA * (dt - self.avg[1])
            self.countdown -= 1
        else:
            # A retry of the multi-threaded step while on 1 thread (steps on `threads` while
            # settled there are recorded by run() itself).
            self.retry.append(dt)
            if len(self.retry) == 2:
                self.avg[self.multi] = sum(self.retry) / 2       # a fresh estimate
                self.retry = []
                if self.avg[self.multi] < self.avg[1]:
                    self.current, self.held = self.multi, 0
                else:
                    self.retry_after = min(2 * self.retry_after, self.LAST_RETRY)
                    self.countdown = self.retry_after

    def _fall_back(self) -> None:
        """Multi-threaded steps got slower than one thread: contention. Go to 1 thread."""
        if self.held < self.SETTLED:
            self.retry_after = min(2 * self.retry_after, self.LAST_RETRY)
        self.current, self.countdown = 1, self.retry_after
        _StepThreads._busy_until = self.clock() + self.BUSY_HINT_S


def _check_finite(logits: np.ndarray, step: int) -> None:
    """NaN or infinite logits have no argmax or softmax worth the name: greedy decoding would
    silently return token 0 and sampling would fail inside numpy. Say what happened instead."""
    if not np.isfinite(logits).all():
        raise NumericalError(f"the model's logits for new token {step + 1} contain NaN or infinity "
                             "(its weights or activations overflow float32); no token can be chosen")


def check_pair(model: TransformerModel, tokenizer: BaseTokenizer) -> None:
    """The model and tokenizer a generator gets: their types, the model open, and a
    vocabulary the model can hold (ValidationError / TypeError naming the argument)."""
    if not isinstance(model, TransformerModel):
        raise TypeError(f"model must be a TransformerModel, got {type(model).__name__}")
    if not isinstance(tokenizer, BaseTokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer or a BPETokenizer, got "
                        f"{type(tokenizer).__name__}")
    model.check_open()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValidationError(f"tokenizer has {tokenizer.vocab_size} symbols but the model's "
                              f"vocab_size is {model.config.vocab_size}")


def seed_key(seed: int | None) -> int:
    """The 64-bit key of a sampling stream: the seed itself below 2**64, a hash of it above,
    fresh randomness for None. Draw t of the stream is a pure function of (key, t)
    (sm_sample.h), so a seeded stream does not depend on the batch or the thread count."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    if seed < 2 ** 64:
        return int(seed)
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def c_settings(temperature, top_k, top_p, nv: int) -> tuple:
    """Sampling settings as the C sampler takes them (float32 and int64), keeping what each
    extreme means: a temperature too small for float32 is the greedy limit (0) and one too
    large the largest float32 (all but uniform); top_k >= the vocabulary is no limit (0); a
    top_p too small for float32 keeps just the most likely token."""
    t = np.minimum(np.asarray(temperature, np.float64), _F32_MAX)
    t = np.where((t > 0) & (t < _F32_TINY), 0.0, t)    # below float32's smallest: greedy
    k = [0 if int(x) >= nv else int(x) for x in np.atleast_1d(top_k)]
    p = np.maximum(np.asarray(top_p, np.float64), _F32_TINY)
    return t.astype(np.float32), np.asarray(k, np.int64), p.astype(np.float32)


def c_setting(temperature, top_k, top_p, nv: int) -> tuple:
    """c_settings for one row, as Python numbers (the C side rounds them to float32, as
    c_settings' arrays are rounded): a generation's settings in a microsecond."""
    t = min(float(temperature), _F32_MAX)
    if 0.0 < t < _F32_TINY:
        t = 0.0
    return t, (0 if int(top_k) >= nv else int(top_k)), max(float(top_p), _F32_TINY)


def sample_rows(logits: np.ndarray, nv: int, settings: tuple, keys, counters) -> np.ndarray:
    """The next token of each row of logits (n, >= nv), in C (one call for every row: greedy
    at temperature 0, else temperature / top-k / top-p with draw counters[r] of stream
    keys[r]); settings: c_settings(...) for the rows, computed once per generation, not per
    token. NumericalError when a row holds NaN or an infinity."""
    t, k, p = settings
    out = _core.sample_rows(logits, nv, t, k, p, keys, counters, 1)
    if (out < 0).any():
        raise NumericalError("the model's logits contain NaN or infinity (its weights or "
                             "activations overflow float32); no token can be chosen")
    return out


def sample_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> int:
    """The next token id from one row of logits: argmax at temperature 0 (the first of equal
    maxima), else a draw from softmax(logits / temperature) restricted to the top_k largest
    (0: all) and to the smallest set of most likely tokens whose probability reaches top_p,
    with the draw's key taken from `rng`."""
    row = np.ascontiguousarray(logits, dtype=np.float32).reshape(1, -1)
    key = int(rng.integers(0, 2 ** 63)) if temperature else 0
    settings = c_settings([temperature], [top_k], [top_p], row.shape[1])
    return int(sample_rows(row, row.shape[1], settings, [key], [0])[0])


class Sampling:
    """Generates text from `model` with `tokenizer`.

    The model is only read (any number of Sampling objects may share one model, from any
    threads); it runs as in eval mode whatever its mode (no dropout). A Sampling object itself is
    not thread-safe: use one per thread or request. Each call rents a KV cache from the
    MemoryPool and returns it when the call (or the stream) ends.

    Contexts longer than the model's block_size (its positions) move the window, positions
    restarting at 0; `window` says how:

    - "shift" (default): when the window is full, its older half is dropped and the newer half
      prefilled again in one call; decoding then goes on one step per token. Every token sees
      between block_size/2 and block_size tokens of context, and the window costs one prefill
      of block_size/2 tokens per block_size/2 new tokens (as llama.cpp's context shift).
    - "slide": every token sees exactly the last block_size tokens, as nanoGPT's generate does;
      past block_size each token costs a prefill of the whole window instead of a decode step
      (~block_size times the work).

    Ids the model knows but the tokenizer does not (a vocab_size padded past the tokenizer's)
    are never sampled.
    """

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, *, threads: int | None = None,
                 window: str = "shift"):
        check_pair(model, tokenizer)
        threads = check_optional_int(threads, "threads", 1, 1024)
        if window not in WINDOWS:
            raise ValidationError(f"window must be one of {WINDOWS}, got {window!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.threads = threads
        self.window = window

    def _keep(self) -> int:
        return window_keep(self.model.config.block_size, self.window)

    def generate(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, cancel=None,
                 return_details: bool = False):
        """The continuation of `prompt` (a str), or a GenerationResult with return_details.

        max_new_tokens >= 0; temperature >= 0 (0: greedy, the argmax of forward's logits);
        top_k >= 0 (0: no limit) and top_p in (0, 1] combine; seed makes the draw reproducible
        (and independent of thread counts); generation ends early at the first of the `stop`
        strings (which is not included). Unknown prompt characters follow the tokenizer's
        policy; an empty prompt (or one with no known character) raises ValidationError.
        `cancel` is checked between calls of the C loop (at most CHUNK_SECONDS apart):
        CancelledError, whose `.result` holds what was generated so far."""
        gen = self._run(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, cancel)
        try:
            while True:
                next(gen)       # the pieces: generate() wants only the whole result
        except StopIteration as e:
            result = e.value
        if return_details:
            return result
        return result.text

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, cancel=None) -> Iterator[str]:
        """Yield the continuation piece by piece as it is produced (arguments as generate). Text
        that could be the start of a stop string is held back until it is known not to be."""
        return self._stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, cancel)

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int = 100,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       cancel=None, return_details: bool = False) -> list:
        """Continue every prompt of `prompts` (a list of str, lengths may differ) at once: each
        prompt is prefilled into its own row of one KV cache, then every step decodes one token
        for all rows in a single C call. Arguments as generate; with a seed, prompt i draws from
        seed + i. Returns a list of str (or of GenerationResult). A sequence that is finished
        (stop string or max_new_tokens) stops changing; the call returns when all are."""
        temperature, top_k, top_p, stops = check_sampling_args(
            max_new_tokens, temperature, top_k, top_p, seed, stop)
        is_cancelled = check_cancel(cancel)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValidationError("prompts must be a non-empty list of str")
        model, tok = self.model, self.tokenizer
        model.check_open()
        ids = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
            e = tok.encode(p)
            if not e:
                raise ValidationError(f"prompts[{i}] has no character of the tokenizer's vocabulary")
            ids.append(e)
        B, T, cfg, prm = len(ids), model.config.block_size, model.core_config, model.flat_params
        nv, eos = tok.vocab_size, tok.eos_id
        decoders = [tok.piece_decoder() for _ in range(B)]
        t, k, p = c_setting(temperature, top_k, top_p, nv)
        t0 = time.perf_counter()
        windows = [list(e[-T:]) for e in ids]
        prompt_tokens = [len(w) for w in windows]
        new: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        reasons: list[Any] = [None] * B          # None while a row is still generating
        if max_new_tokens == 0:
            reasons = ["length"] * B
        ttft = 0.0
        steps = _StepThreads(self.threads)
        cache = model.new_cache(B, T)
        try:
            logits = _prefill_rows(prm, cfg, cache, dict(enumerate(windows)), steps.current)
            loop = _core.GPTGenerator(prm, cfg, cache, nv, self._keep())
            for b in range(B):
                loop.set_row(b, windows[b], logits[b], temperature=t, top_k=k, top_p=p,
                             key=seed_key(None if seed is None else seed + b),
                             remaining=min(max_new_tokens, MAX_REMAINING), stop_token=eos)
            while any(r is None for r in reasons):
                if is_cancelled():
                    err = CancelledError(f"batch generation cancelled after {max(map(len, new))} tokens")
                    err.results = [GenerationResult(texts[b], new[b], reasons[b] or "cancelled",
                                                    prompt_tokens[b], time.perf_counter() - t0, ttft)
                                   for b in range(B)]
                    for r in err.results:
                        _metrics.record_generation(len(r.tokens), r.elapsed_sec, ttft,
                                                   r.finish_reason)
                    raise err
                called = time.perf_counter()
                out, made, _, first = steps.run(
                    loop.run, min(MAX_CHUNK, max_new_tokens - min(map(len, new))), CHUNK_SECONDS)
                if not ttft:
                    ttft = called + first - t0
                for b in range(B):
                    if reasons[b] is not None:
                        continue
                    got = out[b, :made[b]].tolist()
                    begin = len(texts[b])
                    new[b] += got
                    added = decoders[b].push(got)
                    texts[b] += "".join(added)
                    j, cut = first_stop(texts[b], begin, stops, list(itertools.accumulate(
                        map(len, added), initial=begin))[1:]) if stops else (-1, -1)
                    if j >= 0:
                        del new[b][len(new[b]) - len(got) + j + 1:]
                        texts[b], reasons[b] = texts[b][:cut], "stop"
                        loop.stop_row(b)
                    elif got and got[-1] == eos:
                        texts[b], reasons[b] = texts[b] + decoders[b].end(), "stop"
                    elif len(new[b]) == max_new_tokens:
                        texts[b], reasons[b] = texts[b] + decoders[b].end(), "length"
                    elif loop.row(b)["failed"]:
                        raise NumericalError(f"the model's logits for new token {len(new[b]) + 1} "
                                             f"of prompts[{b}] contain NaN or infinity (its weights "
                                             "or activations overflow float32); no token can be "
                                             "chosen")
        finally:
            cache.close()
        elapsed = time.perf_counter() - t0
        results = [GenerationResult(texts[b], new[b], reasons[b], prompt_tokens[b], elapsed, ttft)
                   for b in range(B)]
        for r in results:       # each sequence counts as one generation, as in generate()
            _metrics.record_generation(len(r.tokens), elapsed, ttft, r.finish_reason)
        return results if return_details else [r.text for r in results]

    async def generate_async(self, prompt: str, max_new_tokens: int = 100, **kwargs):
        """`generate` for asyncio: runs in a worker thread; cancelling the awaiting task stops
        decoding before the next token and returns only once the worker has let go of its KV
        cache. Other arguments (including `cancel=`) as in generate."""
        return await _generate_async(self, prompt, dict(kwargs, max_new_tokens=max_new_tokens))

    def stream_async(self, prompt: str, max_new_tokens: int = 100, **kwargs):
        """`stream` for asyncio: an async iterator of text pieces (decoding runs in a worker
        thread). Closing it early or cancelling the consuming task stops the worker."""
        return _stream_async(self, prompt, dict(kwargs, max_new_tokens=max_new_tokens))

    def _stream(self, *args):
        gen = self._run(*args, streaming=True)
        try:
            return (yield from gen)      # the GenerationResult, as StopIteration's value
        finally:
            gen.close()

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, cancel,
             streaming=False):
        temperature, top_k, top_p, stops = check_sampling_args(
            max_new_tokens, temperature, top_k, top_p, seed, stop)
        is_cancelled = check_cancel(cancel)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        model, tok = self.model, self.tokenizer
        model.check_open()
        ids = tok.encode(prompt)
        if not ids:
            raise ValidationError("prompt must contain at least one character of the "
                                  "tokenizer's vocabulary (there is no start token)")
        T, nv, eos = model.config.block_size, tok.vocab_size, tok.eos_id
        params, cfg = model.flat_params, model.core_config
        pieces = tok.piece_decoder()
        t, k, p = c_setting(temperature, top_k, top_p, nv)
        t0 = time.perf_counter()
        ttft = 0.0
        new: list[int] = []
        text = ""
        emitted = 0
        reason = "length"
        steps = _StepThreads(self.threads)
        cache = model.new_cache(1, T)
        try:
            window = ids[-T:]
            logits = _core.gpt_prefill(params, cfg, np.asarray([window], dtype=np.int32), cache,
                                       steps.current)[0]
            loop = _core.GPTGenerator(params, cfg, cache, nv, self._keep())
            loop.set_row(0, window, logits, temperature=t, top_k=k, top_p=p, key=seed_key(seed),
                         remaining=min(max_new_tokens, MAX_REMAINING), stop_token=eos)
            # Tokens per C call: as many as CHUNK_SECONDS allows (cancel is polled between
            # calls); a stream's first call makes one, so that its first piece goes out at once.
            chunk = 1 if streaming else MAX_CHUNK
            while len(new) < max_new_tokens:
                if is_cancelled():
                    err = CancelledError(f"generation cancelled after {len(new)} tokens")
                    err.result = GenerationResult(text[:], list(new), "cancelled", len(window),
                                                  time.perf_counter() - t0, ttft)
                    _metrics.record_generation(len(new), err.result.elapsed_sec, ttft, "cancelled")
                    raise err
                called = time.perf_counter()
                out, made, _, first = steps.run(
                    loop.run, min(chunk, max_new_tokens - len(new)), CHUNK_SECONDS)
                chunk = MAX_CHUNK
                got = out[0, :made[0]].tolist()
                if got and not new:
                    ttft = called + first - t0
                begin = len(text)
                new += got
                added = pieces.push(got)
                if stops:
                    ends = list(itertools.accumulate(map(len, added), initial=begin))[1:]
                text += "".join(added)
                if stops:
                    j, cut = first_stop(text, begin, stops, ends)
                    if j >= 0:
                        del new[len(new) - len(got) + j + 1:]
                        text = text[:cut]
                        reason = "stop"
                        if cut > emitted:
                            yield text[emitted:cut]
                        break
                    safe = len(text) - _held_back(text, stops)
                else:
                    safe = len(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if loop.row(0)["failed"]:
                    raise NumericalError(f"the model's logits for new token {len(new) + 1} contain "
                                         "NaN or infinity (its weights or activations overflow "
                                         "float32); no token can be chosen")
                if got and got[-1] == eos:
                    reason = "stop"             # the end-of-text token (no text of its own)
                    break
            if reason == "length" or (new and new[-1] == eos):
                text += pieces.end()            # a character cut short at the end: U+FFFD
                if len(text) > emitted:
                    yield text[emitted:]
        finally:
            cache.close()
        elapsed = time.perf_counter() - t0
        logger.debug("generated %d tokens in %.3f s (%s)", len(new), elapsed, reason)
        _metrics.record_generation(len(new), elapsed, ttft, reason)
        return GenerationResult(text, new, reason, len(window), elapsed, ttft)


def _prefill_rows(prm, cfg, cache, rows: dict, threads) -> np.ndarray:
    """Prefill cache rows {b: token ids}; runs of consecutive rows with prompts of one length go
    through the model together (one pass). Returns the last-position logits, one row per entry
    in order of b. Prompts of 4 tokens or fewer go alone: their products take the matrix-vector
    path, whose bits a batched pass would not reproduce (a row's output must not depend on
    what else is in the batch)."""
    out, order = [], sorted(rows)
    i = 0
    while i < len(order):
        j = i + 1
        n = len(rows[order[i]])
        while (n > 4 and j < len(order) and order[j] == order[j - 1] + 1
               and len(rows[order[j]]) == n):
            j += 1
        idx = np.asarray([rows[b] for b in order[i:j]], np.int32)
        out.append(_core.gpt_prefill_seq(prm, cfg, idx, cache, order[i], threads))
        i = j
    return np.concatenate(out)


def _find_stop(text: str, stops) -> int:
    """Where the first stop string starts in text, or -1. Text grows one token at a time and
    was checked before, so only its tail (the longest stop string, plus the new token) can hold
    a new match."""
    if not stops:
        return -1
    start = max(0, len(text) - max(map(len, stops)) - 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def first_stop(text: str, begin: int, stops, ends: list) -> tuple:
    """Text grew from `begin` characters by tokens whose texts end at `ends` (ascending), and
    held no stop string before. Returns (j, cut): the first of those tokens after which the text
    holds a stop string, and where the first stop string then held starts - what checking after
    every token would have found; (-1, -1) when there is none."""
    first_end = -1
    for s in stops:
        i = text.find(s, max(0, begin - len(s) + 1))
        if i >= 0 and (first_end < 0 or i + len(s) < first_end):
            first_end = i + len(s)
    if first_end < 0:
        return -1, -1
    j = bisect.bisect_left(ends, first_end)
    hits = [i for i in (text.find(s, max(0, begin - len(s) + 1), ends[j]) for s in stops) if i >= 0]
    return j, min(hits)


def _held_back(text: str, stops) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---- asyncio twins ------------------------------------------------------------------------------

class _Either(threading.Event):
    """Cancelled when its own flag is set or when the caller's `cancel` fires."""

    def __init__(self, outer):
        super().__init__()
        self._outer = check_cancel(outer)

    def is_set(self):
        return super().is_set() or self._outer()


async def _generate_async(sampler: "Sampling", prompt, kwargs, executor=None):
    loop = asyncio.get_running_loop()
    flag = _Either(kwargs.pop("cancel", None))
    fut = loop.run_in_executor(executor, functools.partial(sampler.generate, prompt, cancel=flag,
                                                           **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        flag.set()                       # the worker stops before its next token ...
        try:
            await fut                    # ... and has given its cache back when we return
        except BaseException:
            pass
        raise


async def _stream_async(sampler: "Sampling", prompt, kwargs, executor=None):
    loop = asyncio.get_running_loop()
    flag = _Either(kwargs.pop("cancel", None))
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work():
        try:
            for piece in sampler.stream(prompt, cancel=flag, **kwargs):
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", done))
        except BaseException as e:   # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    fut = loop.run_in_executor(executor, work)
    try:
        while True:
            kind, item = await queue.get()
            if kind == "piece":
                yield item
            elif kind == "end":
                break
            else:
                raise item
    finally:
        flag.set()
        try:
            await asyncio.shield(fut)
        except BaseException:
            pass
