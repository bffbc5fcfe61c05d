"""engine.py - BatchEngine: continuous batching over one model. One scheduler thread decodes
every active request in a single C call per step, admits new requests between steps and
retires finished or cancelled ones at once; each request keeps its own sampling settings and
seed, and its tokens are exactly those it would get alone (Sampling.generate with the same
arguments): a decoded row's bits do not depend on the other rows (gpt_decode(seqs=...)), each
row draws from its own generator, and the context window moves as Sampling's does.

    engine = BatchEngine(model, tokenizer, max_batch=16)
    ticket = engine.submit(tokenizer.encode("The "), SamplingParams(max_new_tokens=50, seed=1),
                           sink)                 # sink(event) is called from the engine thread
    ...
    engine.close()                               # cancels what is left, joins the thread

Events handed to the sink, in order: any number of Piece(text, tokens) and then exactly one of
Done(result) or Failed(error). Text that could be the start of a stop string is held back until
it is known not to be (as Sampling.stream). The `stream`/`generate` methods (threads) and
`stream_async`/`generate_async` (asyncio) wrap submit for callers that want an iterator.

Scheduling: a request waits in a FIFO queue until a slot (a row of the shared KV cache) is
free. Each step first prefills newly admitted prompts - at most `prefill_budget` prompt tokens
per step while other requests are decoding, so a burst of long prompts is spread over several
steps instead of stalling everyone's next token (one prompt is never split: it is at most the
model's block_size) - then samples a token for every row and decodes all the rows that continue
in one call. The KV cache is rented when work arrives and given back when the engine is idle.

Sampling extensions (the OpenAI API's): presence and frequency penalties (subtracted from the
logits of tokens already generated, per occurrence for frequency), a logit bias per token id,
and log-probabilities of the chosen token with the top-N alternatives (from the distribution
after bias and penalties, before temperature, top-k and top-p).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import metrics as _metrics
from .._lifecycle import Closeable
from .._validate import check_int, check_number, check_optional_int
from ..core import _core
from ..errors import NumericalError, ObjectDisposedError, ValidationError
from ..model.tokenizer import BaseTokenizer
from ..model.transformer import TransformerModel
from .sampling import (
    CHUNK_SECONDS,
    MAX_CHUNK,
    MAX_REMAINING,
    WINDOWS,
    GenerationResult,
    _held_back,
    _prefill_rows,
    _StepThreads,
    c_setting,
    check_pair,
    check_sampling_args,
    first_stop,
    seed_key,
    window_keep,
)

__all__ = ["BatchEngine", "PrefixCache", "SamplingParams", "TokenInfo", "Piece", "Done", "Failed",
           "prompt_logprobs", "log_softmax"]

logger = logging.getLogger("smallmind.engine")

MAX_LOGPROBS = 20        # top-N alternatives per token, as OpenAI's limit
LOGPROB_CHUNK = 64       # steps per C call while a request wants log-probabilities


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings (Sampling.generate's, plus the OpenAI API's extensions).
    Build with SamplingParams.make(...) to have every field checked and normalised."""
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()         # ((token id, bias), ...)
    logprobs: int | None = None    # None: no log-probabilities; N: the chosen token and N more

    @classmethod
    def make(cls, max_new_tokens=100, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=None,
             presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, logprobs=None,
             vocab_size: int | None = None) -> "SamplingParams":
        """Checked settings; ValidationError / TypeError name the argument. vocab_size bounds
        logit_bias's token ids."""
        temperature, top_k, top_p, stops = check_sampling_args(
            max_new_tokens, temperature, top_k, top_p, seed, stop)
        presence_penalty = check_number(presence_penalty, "presence_penalty", -2.0, 2.0)
        frequency_penalty = check_number(frequency_penalty, "frequency_penalty", -2.0, 2.0)
        bias: list = []
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise ValidationError("logit_bias must be a mapping of token id to bias")
            for k, v in logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise ValidationError(f"logit_bias keys must be token ids, got {k!r}") from None
                if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                    raise ValidationError(f"logit_bias token id {tid} is outside the vocabulary "
                                          f"[0, {(vocab_size or 1) - 1}]")
                bias.append((tid, check_number(v, f"logit_bias[{tid}]", -100.0, 100.0)))
        logprobs = check_optional_int(logprobs, "logprobs", 0, MAX_LOGPROBS)
        return cls(max_new_tokens, temperature, top_k, top_p, seed, stops, presence_penalty,
                   frequency_penalty, tuple(sorted(bias)), logprobs)


@dataclasses.dataclass
class TokenInfo:
    """A generated token: its id, its text, its log-probability and the `top` alternatives
    [(id, text, logprob), ...] (most likely first), when log-probabilities were asked for."""
    id: int
    text: str
    logprob: float | None = None
    top: list | None = None


@dataclasses.dataclass
class Piece:
    """Text released to the caller, and the tokens that completed since the last piece."""
    text: str
    tokens: list


@dataclasses.dataclass
class Done:
    """The request ended: its GenerationResult (finish_reason "length", "stop" or "cancelled")
    and every TokenInfo of the text it kept."""
    result: GenerationResult
    tokens: list


@dataclasses.dataclass
class Failed:
    """The request ended with an error (e.g. NumericalError for NaN logits)."""
    error: BaseException


class Ticket:
    """A submitted request. cancel() stops it before its next token (thread-safe, idempotent);
    the engine then frees its slot and sends Done with finish_reason "cancelled"."""

    def __init__(self, ids: list, params: SamplingParams, sink: Callable,
                 wake: Callable | None = None):
        self.ids, self.params, self.sink, self._wake = ids, params, sink, wake
        self.cancelled = False
        self.finished = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._wake is not None and not self.finished:
                self._wake()            # the engine's C loop returns after its current step


class _Row:
    """A request decoding in slot `slot` of the KV cache (and row `slot` of the C loop)."""

    def __init__(self, ticket: Ticket, slot: int, window: list, vocab: int, pieces):
        p = ticket.params
        self.pieces = pieces                     # the tokenizer's PieceDecoder for the text
        self.ticket, self.slot, self.p = ticket, slot, p
        self.context = list(window)
        self.prompt_tokens = len(window)
        self.filled: int | None = None           # while prefilled in chunks: tokens so far
        self.started = False                     # its prompt is in, the C loop has the row
        self.new: list[int] = []
        self.infos: list[TokenInfo] = []         # one per token of `new`
        self.text = ""
        self.starts: list[int] = []              # where each token's text starts in `text`
        self.emitted = 0                         # characters released
        self.released = 0                        # tokens released with a piece
        self.ttft = 0.0
        self.bias = None
        if p.logit_bias:
            self.bias = np.zeros(vocab, np.float64)
            for tid, b in p.logit_bias:
                if tid < vocab:
                    self.bias[tid] = b


class PrefixCache:
    """Keys and values of recent prompts' beginnings, so that a prompt starting the same way (a
    shared system prompt, a chat's earlier turns) skips their prefill. Entries hold the first
    L tokens of a prompt, L a multiple of 64 with more than 4 tokens after it (what
    gpt_prefill_extend needs); a new prompt uses the entry sharing its longest such prefix.
    The result has exactly the bits of a full prefill (gpt_prefill_extend), so whether a prefix
    was cached never shows in any output. At most `entries` prefixes, least recently used
    evicted; the store (entries x block_size positions of keys and values) is rented with the
    first prefix kept and given back when the engine closes - not when it goes idle, so one
    user's next chat turn still finds its history. Engine thread only."""

    def __init__(self, model: TransformerModel, entries: int):
        self.model, self.entries = model, entries
        self.store: _core.GPTCache | None = None
        self.keys: list = [None] * entries     # the token ids each entry holds
        self.used = [0.0] * entries
        self.hits = 0
        self.reused = 0                         # prompt tokens not prefilled thanks to a hit

    @staticmethod
    def usable(n: int) -> int:
        """The longest cacheable prefix of an n-token prompt (0: none)."""
        return max(0, (n - 5) // 64 * 64)

    def _common(self, a: list, b: list) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i // 64 * 64

    def lookup(self, ids: list) -> tuple:
        """(entry, length) of the longest cached beginning of `ids` usable for it; (-1, 0)."""
        limit = self.usable(len(ids))
        if self.store is None or limit < 64:
            return -1, 0
        best, best_len = -1, 0
        for e, key in enumerate(self.keys):
            if key is not None:
                n = min(self._common(key, ids), limit)
                if n > best_len:
                    best, best_len = e, n
        return best, best_len

    def restore(self, entry: int, length: int, cache, slot: int) -> None:
        """Put an entry's first `length` positions into `slot` of `cache` (a hit)."""
        assert self.store is not None
        _core.gpt_cache_copy(cache, slot, self.store, entry, length)
        self.used[entry] = time.monotonic()
        self.hits += 1
        self.reused += length
        _metrics.REGISTRY.inc("smallmind_engine_prefix_hits_total", 1,
                              "prompts whose beginning came from the prefix cache")
        _metrics.REGISTRY.inc("smallmind_engine_prefix_tokens_reused_total", length,
                              "prompt tokens not prefilled thanks to the prefix cache")

    def remember(self, ids: list, cache, slot: int) -> None:
        """Keep the beginning of a prompt just prefilled into `slot` (unless an entry already
        holds it)."""
        n = self.usable(len(ids))
        if n < 64:
            return
        for key in self.keys:
            if key is not None and self._common(key, ids) >= n:
                return
        if self.store is None:
            m = self.model
            self.store = m.new_cache(self.entries, m.config.block_size)
        e = min(range(self.entries), key=lambda i: (self.keys[i] is not None, self.used[i]))
        _core.gpt_cache_copy(self.store, e, cache, slot, n)
        self.keys[e] = list(ids[:n])
        self.used[e] = time.monotonic()

    def clear(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        self.keys = [None] * self.entries


class BatchEngine(Closeable):
    """Continuous batching over `model` with `tokenizer` (see the module's docstring).

    max_batch: requests decoded together (rows of the KV cache); max_queue: requests waiting
    beyond them (submit raises queue.Full when max_batch + max_queue requests are running or
    waiting; None: no limit); threads: OpenMP threads of
    each step (None: the library default; steps fall back to 1 thread under contention, as
    Sampling's do); window: "shift" or "slide", as Sampling's; prefill_budget: prompt tokens
    prefilled per step while other requests are decoding (at least one prompt per step); a
    prompt longer than that (rounded down to a multiple of 64, at least 64) is prefilled in
    chunks of that size, one per step, with the bits of a whole prefill;
    prefix_cache: prompt prefixes kept for reuse (0: none; see PrefixCache). The KV cache is
    rented when work arrives and given back when the engine is idle; the prefix store lives
    until close().
    Thread-safe: submit, cancel and close may be called from any thread."""

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, *, max_batch: int = 16,
                 max_queue: int | None = None, threads: int | None = None, window: str = "shift",
                 prefill_budget: int = 512, prefix_cache: int = 4):
        check_pair(model, tokenizer)
        self.max_batch = check_int(max_batch, "max_batch", 1, 4096)
        self.max_queue = check_optional_int(max_queue, "max_queue", 0)
        self.threads = check_optional_int(threads, "threads", 1, 1024)
        if window not in WINDOWS:
            raise ValidationError(f"window must be one of {WINDOWS}, got {window!r}")
        self.window = window
        self.prefill_budget = check_int(prefill_budget, "prefill_budget", 1)
        # a prompt longer than this is prefilled one chunk per step (a multiple of 64: what
        # gpt_prefill_extend continues from)
        self.prefill_chunk = max(64, self.prefill_budget // 64 * 64)
        self.prefix_cache = check_int(prefix_cache, "prefix_cache", 0, 1024)
        self.model, self.tokenizer = model, tokenizer
        self._prefixes = PrefixCache(model, self.prefix_cache) if self.prefix_cache else None
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._rows: dict[int, _Row] = {}         # slot -> row (engine thread only)
        self._admitting = 0                      # taken from the queue, not yet rows
        self._cache: _core.GPTCache | None = None
        self._gen: _core.GPTGenerator | None = None   # the C loop over the cache's rows
        self._stopping = False
        self._steps = _StepThreads(self.threads)
        self.steps = 0                           # decode steps run (for tests and metrics)
        self.last_batch = 0                      # rows decoded by the last step
        self._thread = threading.Thread(target=self._loop, name="smallmind-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side -------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests decoding now (or being admitted)."""
        return len(self._rows) + self._admitting

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    def encode(self, prompt: str, name: str = "prompt") -> list:
        """The prompt's token ids (ValidationError when it has no known character)."""
        if not isinstance(prompt, str):
            raise TypeError(f"{name} must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValidationError(f"{name} has no character of the model's vocabulary")
        return ids

    def submit(self, ids: Sequence[int], params: SamplingParams, sink: Callable) -> Ticket:
        """Queue a request for prompt token ids `ids`; `sink(event)` receives its events from
        the engine's thread (it must not block; an exception from it cancels the request).
        Raises queue.Full when max_queue requests already wait, ObjectDisposedError once the
        engine is closed."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = [int(i) for i in ids]
        if not ids:
            raise ValidationError("ids must hold at least one token (there is no start token)")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValidationError(f"ids must be token ids in [0, {V - 1}]")
        ticket = Ticket(ids, params, sink, self._interrupt)
        with self._cond:
            self.check_open()
            if self._stopping:
                raise ObjectDisposedError("this BatchEngine is shutting down")
            if self.max_queue is not None and \
                    self.active + len(self._pending) >= self.max_batch + self.max_queue:
                raise queue.Full(f"{self.active} requests are running and {len(self._pending)} "
                                 f"waiting")
            self._pending.append(ticket)
            self._cond.notify()
            self._interrupt()
        return ticket

    def _interrupt(self) -> None:
        """Make the C loop return after its current step (a request to admit or cancel)."""
        gen = self._gen
        if gen is not None:
            gen.interrupt()

    def cancel_all(self) -> None:
        """Cancel every queued and running request (each gets Done, "cancelled")."""
        with self._cond:
            for t in self._pending:
                t.cancel()
            for r in list(self._rows.values()):
                r.ticket.cancel()
            self._cond.notify()

    def stream(self, prompt: str, params: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        """The continuation of `prompt` piece by piece (a blocking iterator, for threads);
        settings as SamplingParams.make's keywords. Closing the iterator cancels the request.
        Returns the GenerationResult as StopIteration's value."""
        return self._stream(prompt, params, kwargs)

    def generate(self, prompt: str, params: SamplingParams | None = None, **kwargs) -> GenerationResult:
        """The whole continuation of `prompt`, as a GenerationResult (blocking)."""
        gen = self._stream(prompt, params, kwargs)
        try:
            while True:
                next(gen)
        except StopIteration as e:
            return e.value

    def generate_ids(self, ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        """The whole continuation of the prompt token ids `ids` (blocking)."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(ids, params, q.put)
        try:
            while True:
                ev = q.get()
                if isinstance(ev, Done):
                    return ev.result
                if isinstance(ev, Failed):
                    raise ev.error
        finally:
            ticket.cancel()

    def _params(self, params, kwargs) -> SamplingParams:
        if params is None:
            return SamplingParams.make(vocab_size=self.tokenizer.vocab_size, **kwargs)
        if kwargs:
            raise TypeError("pass either params or keyword settings, not both")
        return params

    def _stream(self, prompt, params, kwargs):
        params = self._params(params, kwargs)
        q: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(self.encode(prompt), params, q.put)
        try:
            while True:
                ev = q.get()
                if isinstance(ev, Piece):
                    yield ev.text
                elif isinstance(ev, Done):
                    return ev.result
                else:
                    raise ev.error
        finally:
            ticket.cancel()

    async def events_async(self, ids: Sequence[int], params: SamplingParams):
        """An async iterator of the request's events (Piece ..., then Done; a Failed event's
        error is raised). Cancelling the consuming task or closing the iterator cancels the
        request; the engine frees its slot before its next step."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        ticket = self.submit(ids, params, sink)
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, Failed):
                    raise ev.error
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            ticket.cancel()

    async def generate_async(self, prompt: str, params: SamplingParams | None = None,
                             **kwargs) -> GenerationResult:
        """generate() for asyncio: awaits the result without blocking the event loop."""
        params = self._params(params, kwargs)
        async for ev in self.events_async(self.encode(prompt), params):
            if isinstance(ev, Done):
                return ev.result
        raise AssertionError("unreachable: the engine always ends a request with Done or Failed")

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.cancel_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- the engine thread -------------------------------------------------------------------

    def _send(self, ticket: Ticket, ev) -> None:
        try:
            ticket.sink(ev)
        except Exception:          # a consumer that went away (closed event loop, ...)
            logger.debug("a request's sink failed; cancelling it", exc_info=True)
            ticket.cancel()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._stopping:
                        if self._cache is not None:      # idle: the cache goes back to the pool
                            self._cache.close()
                            self._cache = self._gen = None
                        self._cond.wait()
                    if self._stopping and not self._pending and not self._rows:
                        break
                    admitted = self._take_pending()
                    self._admitting = len(admitted)
                try:
                    self._step(admitted)
                finally:
                    self._admitting = 0
        except BaseException:                           # pragma: no cover - a bug; say it loudly
            logger.exception("the batch engine stopped")
            raise
        finally:
            for ticket in [r.ticket for r in self._rows.values()] + list(self._pending):
                self._send(ticket, Failed(ObjectDisposedError("the BatchEngine was closed")))
            self._rows.clear()
            self._pending.clear()
            if self._cache is not None:
                self._cache.close()
                self._cache = self._gen = None
            if self._prefixes is not None:
                self._prefixes.clear()

    def _take_pending(self) -> list:
        """Requests to admit this step (called with the lock held): FIFO while slots are free,
        within the prefill budget once other requests are decoding."""
        out: list = []
        budget = self.prefill_budget
        T = self.model.config.block_size
        while self._pending and len(self._rows) + len(out) < self.max_batch:
            n = min(len(self._pending[0].ids), T)
            if out and self._rows and n > budget:
                break
            out.append(self._pending.popleft())
            budget -= n
        return out

    def _finish(self, row: _Row, reason: str) -> None:
        del self._rows[row.slot]
        if row.started and self._gen is not None:
            self._gen.stop_row(row.slot)      # a cancelled row would otherwise go on decoding
        if row.emitted < len(row.text):       # what was held back for a stop string
            self._release(row, len(row.text))
        elapsed = time.perf_counter() - row.ticket.submitted
        result = GenerationResult(row.text, list(row.new), reason, row.prompt_tokens, elapsed,
                                  row.ttft)
        _metrics.record_generation(len(row.new), elapsed, row.ttft, reason)
        row.ticket.finished = True
        kept = [info for info, start in zip(row.infos, row.starts) if start < len(row.text)]
        self._send(row.ticket, Done(result, kept))

    def _release(self, row: _Row, upto: int) -> None:
        """Send text[emitted:upto] and the tokens whose text starts before `upto`."""
        n = row.released
        while n < len(row.starts) and row.starts[n] < upto:
            n += 1
        piece = Piece(row.text[row.emitted:upto], row.infos[row.released:n])
        row.emitted, row.released = upto, n
        self._send(row.ticket, piece)

    def _start(self, row: _Row, logits: np.ndarray) -> None:
        """The row's prompt is in the cache and `logits` are its next token's: hand it to the C
        loop (its draws: sample_uniform(key, t) for its t-th token, as Sampling's)."""
        p = row.p
        t, k, tp = c_setting(p.temperature, p.top_k, p.top_p, self.tokenizer.vocab_size)
        assert self._gen is not None
        self._gen.set_row(row.slot, row.context, logits, temperature=t, top_k=k, top_p=tp,
                          key=seed_key(p.seed),
                          presence_penalty=p.presence_penalty,
                          frequency_penalty=p.frequency_penalty, bias=row.bias,
                          logprobs=p.logprobs, remaining=min(p.max_new_tokens, MAX_REMAINING),
                          stop_token=self.tokenizer.eos_id)
        row.started = True

    def _step(self, admitted: list) -> None:
        model, tok = self.model, self.tokenizer
        prm, cfg, T = model.flat_params, model.core_config, model.config.block_size
        nv = tok.vocab_size
        if self._cache is None and (admitted or self._rows):
            self._cache = model.new_cache(self.max_batch, T)
            self._gen = _core.GPTGenerator(prm, cfg, self._cache, nv, window_keep(T, self.window))
        if self._cache is None:
            return                               # nothing to do (nothing admitted or running)
        cache = self._cache
        # 1. prefill the admitted prompts into free slots
        fresh = {}
        admitted_slots: set = set()
        if admitted:
            used = set(self._rows)
            free = [s for s in range(self.max_batch) if s not in used]
            for ticket, slot in zip(admitted, free):
                if ticket.cancelled:
                    self._send(ticket, Done(GenerationResult("", [], "cancelled", 0, 0.0, 0.0), []))
                    continue
                row = _Row(ticket, slot, ticket.ids[-T:], nv, tok.piece_decoder())
                self._rows[slot] = row
                fresh[slot] = row.context
                admitted_slots.add(slot)
            self._admitting = 0                  # they are rows now (or cancelled)
            chunk, prefixes = self.prefill_chunk, self._prefixes
            for slot in sorted(fresh):
                ids = fresh[slot]
                entry, start = prefixes.lookup(ids) if prefixes is not None else (-1, 0)
                if prefixes is not None and entry >= 0:    # its beginning is cached: copy it
                    prefixes.restore(entry, start, cache, slot)
                if len(ids) - start > chunk + 4:
                    # a long prompt: one chunk now, one per step after, so that the others'
                    # tokens keep coming (gpt_prefill_extend: the bits of a whole prefill)
                    if start == 0:
                        _core.gpt_prefill_seq(prm, cfg, np.asarray(ids[:chunk], np.int32), cache,
                                              slot, self._steps.current)
                    else:
                        _core.gpt_prefill_extend(prm, cfg, np.asarray(ids[:start + chunk], np.int32),
                                                 cache, slot, start, self._steps.current)
                    self._rows[slot].filled = start + chunk
                    del fresh[slot]
                elif prefixes is not None and entry >= 0:
                    logits = _core.gpt_prefill_extend(prm, cfg, np.asarray(ids, np.int32), cache,
                                                      slot, start, self._steps.current)
                    self._start(self._rows[slot], logits)
                    prefixes.remember(ids, cache, slot)            # a longer beginning?
                    del fresh[slot]
            if fresh:
                logits = _prefill_rows(prm, cfg, cache, fresh, self._steps.current)
                for i, slot in enumerate(sorted(fresh)):
                    self._start(self._rows[slot], logits[i])
                    if self._prefixes is not None:
                        self._prefixes.remember(fresh[slot], cache, slot)
        # 1b. one more chunk of every prompt still being prefilled in chunks (not the ones
        # admitted just now: they had theirs)
        for slot in sorted(self._rows):
            row = self._rows[slot]
            if row.filled is None or slot in admitted_slots or row.ticket.cancelled:
                continue
            ids, done = row.context, row.filled
            if len(ids) - done > self.prefill_chunk + 4:
                _core.gpt_prefill_extend(prm, cfg, np.asarray(ids[:done + self.prefill_chunk],
                                                              np.int32),
                                         cache, slot, done, self._steps.current)
                row.filled = done + self.prefill_chunk
            else:                                # the last piece: the prompt's logits
                logits = _core.gpt_prefill_extend(prm, cfg, np.asarray(ids, np.int32), cache,
                                                  slot, done, self._steps.current)
                row.filled = None
                self._start(row, logits)
                if self._prefixes is not None:
                    self._prefixes.remember(ids, cache, slot)
        # 2. retire the cancelled and the empty requests
        running = []
        for slot in sorted(self._rows):
            row = self._rows[slot]
            if row.ticket.cancelled:
                self._finish(row, "cancelled")
            elif row.p.max_new_tokens == 0:
                self._finish(row, "length")
            elif row.started:
                running.append(row)
        if not running:
            self.last_batch = 0
            return
        # 3. the C loop: tokens for every running row. One step while prompts wait to be
        # admitted or prefilled in chunks (they go in between steps), else as many as fit in
        # CHUNK_SECONDS; submit() and cancel() interrupt it after its current step.
        assert self._gen is not None
        one = bool(self._pending) or any(r.filled is not None for r in self._rows.values())
        lp = any(r.p.logprobs is not None for r in running)
        run = functools.partial(self._gen.run, logprobs=lp)
        # (log-probability records are 256 bytes a token: fewer steps per call when asked for)
        most = 1 if one else LOGPROB_CHUNK if lp else MAX_CHUNK
        called = time.perf_counter()
        out, made, lps, first = self._steps.run(run, most, CHUNK_SECONDS)
        self.steps += int(made.max())
        self.last_batch = len(running)
        _metrics.REGISTRY.set("smallmind_engine_batch_rows", len(running),
                              "rows decoded by the batch engine's last step")
        # 4. each row's tokens: text, stop strings, pieces, the finished (every running row
        # made its first token of the call in the call's first step)
        first_token_at = called + first
        for row in running:
            slot = row.slot
            got = out[slot, :made[slot]].tolist()
            if got:
                if not row.new:
                    row.ttft = first_token_at - row.ticket.submitted
                self._append(row, got, None if lps is None or row.p.logprobs is None
                             else lps[slot, :len(got)])
                stops = row.p.stop
                begin = row.starts[len(row.new) - len(got)]
                j, cut = first_stop(row.text, begin, stops, row.starts[len(row.new) - len(got) + 1:]
                                    + [len(row.text)]) if stops else (-1, -1)
                if j >= 0:
                    keep_n = len(row.new) - len(got) + j + 1
                    del row.new[keep_n:], row.infos[keep_n:], row.starts[keep_n:]
                    row.text = row.text[:cut]
                    self._gen.stop_row(slot)
                    self._finish(row, "stop")
                    continue
                ended = got[-1] == tok.eos_id    # the end-of-text token: the row stopped
                if ended or len(row.new) == row.p.max_new_tokens:
                    row.text += row.pieces.end()   # a character cut short: U+FFFD
                    self._finish(row, "stop" if ended else "length")
                    continue
                safe = len(row.text) - (_held_back(row.text, stops) if stops else 0)
                if safe > row.emitted:
                    self._release(row, safe)
            if self._gen.row(slot)["failed"]:
                del self._rows[slot]
                row.ticket.finished = True
                self._send(row.ticket, Failed(NumericalError(
                    f"the model's logits for new token {len(row.new) + 1} contain NaN or "
                    "infinity (its weights or activations overflow float32); no token can be "
                    "chosen")))

    def _append(self, row: _Row, got: list, lps) -> None:
        """The row's new tokens (and their log-probabilities, records of the C loop)."""
        tok = self.tokenizer
        for i, (t, piece) in enumerate(zip(got, row.pieces.push(got))):
            info = TokenInfo(t, _token_text(tok, t))
            if lps is not None:
                rec = lps[i]
                info.logprob = float(rec["logprob"])
                info.top = [(int(a), _token_text(tok, int(a)), float(b)) for a, b in
                            zip(rec["top_id"][:rec["n"]], rec["top_logprob"][:rec["n"]])]
            row.new.append(t)
            row.infos.append(info)
            row.starts.append(len(row.text))
            row.text += piece


def _token_text(tok: BaseTokenizer, i: int) -> str:
    """Token i as text in log-probability listings ("" for an id the tokenizer lacks)."""
    try:
        return tok.token_text(i)
    except ValidationError:      # a padded id past the vocabulary, a hole in a vocabulary file
        return ""


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log(softmax(z)) in float64, stable."""
    z = np.asarray(z, np.float64)
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def _logprobs(z: np.ndarray, chosen: int, n: int, tok: BaseTokenizer):
    lp = log_softmax(z)
    top: list = []
    if n:
        idx = np.argpartition(-lp, min(n, lp.size) - 1)[:n]
        idx = idx[np.lexsort((idx, -lp[idx]))]              # most likely first, then by id
        top = [(int(i), _token_text(tok, int(i)), float(lp[i])) for i in idx]
    return float(lp[chosen]), top


def prompt_logprobs(model: TransformerModel, tok: BaseTokenizer, ids: list, n: int,
                    threads: int | None = None) -> list:
    """TokenInfo for each prompt token (OpenAI's echo with logprobs): the first has no
    log-probability (nothing precedes it); token t's is log p(ids[t] | ids[:t]) from one
    forward pass (the last block_size tokens)."""
    T = model.config.block_size
    ids = ids[-T:]
    out = [TokenInfo(ids[0], _token_text(tok, ids[0]), None, None)]
    if len(ids) > 1:
        logits = model.forward(np.asarray([ids[:-1]], np.int32), threads=threads)[0, :, :tok.vocab_size]
        for t in range(1, len(ids)):
            lp, top = _logprobs(logits[t - 1], ids[t], n, tok)
            out.append(TokenInfo(ids[t], _token_text(tok, ids[t]), lp, top))
    return out

