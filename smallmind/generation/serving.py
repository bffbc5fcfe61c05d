"""serving.py - two ways to share one model between many callers: a bounded pool of Sampling
objects shared by threads (SamplerPool) and an asyncio service that throttles concurrent
generations (ThrottledInferenceService), both over one shared model.

Thread budget policy: every request runs its C calls with a small budget, `threads_per_request`
(default: the cores divided by the concurrency, at least 1), so that N concurrent requests use
about the machine's cores instead of N times them. One big request alone is better served by a
larger budget (Sampling(model, tok, threads=...)).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import os
import queue
import threading

from .._lifecycle import Closeable
from .._validate import check_int, check_number
from ..errors import ObjectDisposedError
from ..model.tokenizer import Tokenizer
from ..model.transformer import TransformerModel
from .sampling import Sampling, _generate_async, _stream_async

__all__ = ["SamplerPool", "ThrottledInferenceService", "default_threads_per_request"]


def default_threads_per_request(concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


class SamplerPool(Closeable):
    """A bounded pool of `size` Sampling objects over one model (thread-safe).

        with pool.get() as sampler:        # blocks while all are lent (timeout= to give up)
            text = sampler.generate(prompt, 50)

    close() (or leaving ``with pool:``) refuses further get() calls; lent samplers finish.
    """

    def __init__(self, model: TransformerModel, tokenizer: Tokenizer, size: int = 4, *,
                 threads_per_request: int | None = None):
        size = check_int(size, "size", 1)
        threads = (default_threads_per_request(size) if threads_per_request is None
                   else check_int(threads_per_request, "threads_per_request", 1))
        self._free: queue.Queue = queue.Queue()
        for _ in range(size):
            self._free.put(Sampling(model, tokenizer, threads=threads))
        self.size = size

    @contextlib.contextmanager
    def get(self, timeout: float | None = None):
        """Borrow a Sampling for the `with` block; TimeoutError if none frees up in time."""
        self.check_open()
        # queue.Queue.get would raise a bare ValueError for a negative timeout, a TypeError from
        # a comparison for a str, and wait forever for NaN: check it here, naming it.
        if timeout is not None:
            check_number(timeout, "timeout", 0.0, math.inf, hi_open=True)
        try:
            sampler = self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no sampler became free within {timeout} s") from None
        try:
            yield sampler
        finally:
            self._free.put(sampler)

    @property
    def available(self) -> int:
        return self._free.qsize()

    def _close(self) -> None:
        pass                     # the samplers own nothing until they generate


class ThrottledInferenceService(Closeable):
    """Serves generations to asyncio code over one shared model, at most `max_concurrency` at
    a time (an asyncio semaphore; waiting callers queue), each in a worker thread with its own
    Sampling and KV cache and a `threads_per_request` budget. `timeout` (seconds, per call,
    None for none) cancels a generation that runs too long (asyncio.TimeoutError); cancelling
    the calling task stops decoding before the next token.

    close() (or leaving ``with`` / ``async with``; aclose() from a coroutine) refuses new calls
    and waits for the worker threads."""

    def __init__(self, model: TransformerModel, tokenizer: Tokenizer, max_concurrency: int = 4,
                 *, threads_per_request: int | None = None, timeout: float | None = None):
        self.max_concurrency = check_int(max_concurrency, "max_concurrency", 1)
        self.threads_per_request = (default_threads_per_request(self.max_concurrency)
                                    if threads_per_request is None
                                    else check_int(threads_per_request, "threads_per_request", 1))
        if timeout is not None:
            timeout = check_number(timeout, "timeout", 0.0, math.inf, lo_open=True)
        self.timeout = timeout
        self._model, self._tokenizer = model, tokenizer
        Sampling(model, tokenizer)                      # validates the pair now
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.max_concurrency, thread_name_prefix="smallmind-infer")
        self._sem: asyncio.Semaphore | None = None     # made on first use, in the running loop
        self._lock = threading.Lock()
        self._active = 0

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._sem

    @property
    def active(self) -> int:
        """Generations running now."""
        return self._active

    def _sampler(self) -> Sampling:
        self.check_open()
        return Sampling(self._model, self._tokenizer, threads=self.threads_per_request)

    async def generate(self, prompt: str, max_new_tokens: int = 100, **kwargs) -> str:
        """Sampling.generate, throttled (same arguments)."""
        sampler = self._sampler()
        async with self._semaphore():
            self.check_open()          # closed while this call waited for a slot?
            with self._count(), self._closed_guard():
                coro = _generate_async(sampler, prompt, dict(kwargs, max_new_tokens=max_new_tokens),
                                       self._executor)
                if self.timeout is None:
                    return await coro
                return await asyncio.wait_for(coro, self.timeout)

    async def stream(self, prompt: str, max_new_tokens: int = 100, **kwargs):
        """Sampling.stream as an async iterator, throttled (the slot is held while it runs)."""
        sampler = self._sampler()
        async with self._semaphore():
            self.check_open()          # closed while this call waited for a slot?
            with self._count(), self._closed_guard():
                agen = _stream_async(sampler, prompt, dict(kwargs, max_new_tokens=max_new_tokens),
                                     self._executor)
                try:
                    loop = asyncio.get_running_loop()
                    deadline = None if self.timeout is None else loop.time() + self.timeout
                    while True:
                        left = None if deadline is None else deadline - loop.time()
                        try:
                            piece = await asyncio.wait_for(agen.__anext__(), left)
                        except StopAsyncIteration:
                            break
                        yield piece
                finally:
                    await agen.aclose()

    @contextlib.contextmanager
    def _count(self):
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    @contextlib.contextmanager
    def _closed_guard(self):
        # A call that passed the checks above can still reach the executor after close() shut
        # it down (the service closed between two steps of the event loop): the executor says
        # RuntimeError("cannot schedule new futures after shutdown"); say what happened.
        try:
            yield
        except RuntimeError as e:
            if self._closed and not isinstance(e, ObjectDisposedError):
                raise ObjectDisposedError("this ThrottledInferenceService was closed (disposed)") from None
            raise

    def close(self) -> None:
        """Refuse new calls and wait for the worker threads to finish. Idempotent."""
        self._closed = True                 # first: calls arriving while we wait are refused
        self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        """close() for coroutines: waits for the worker threads without blocking the event
        loop. That matters: a task cancelled just before still needs the loop to run to tell its
        worker to stop; a blocking close() at that point waited for the whole generation
        (found under AddressSanitizer, where the asyncio example of docs/generation.md took minutes)."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self._executor.shutdown, wait=True))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
