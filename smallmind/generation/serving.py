"""serving.py - two ways to share one model between many callers: a bounded pool of Sampling
objects shared by threads (SamplerPool) and an asyncio service over the batch engine
(ThrottledInferenceService), both over one shared model.

Thread budget policy: a SamplerPool's requests each run their C calls with a small budget,
`threads_per_request` (default: the cores divided by the pool's size, at least 1), so that N
concurrent requests use about the machine's cores instead of N times them. The service decodes
all its requests together, so each of its steps takes every core by default.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue

from .._lifecycle import Closeable
from .._validate import check_int, check_number
from ..cancellation import check_cancel
from ..errors import CancelledError, ObjectDisposedError
from ..model.tokenizer import BaseTokenizer
from ..model.transformer import TransformerModel
from .engine import BatchEngine, Piece, SamplingParams
from .sampling import Sampling

__all__ = ["SamplerPool", "ThrottledInferenceService", "default_threads_per_request"]


def default_threads_per_request(concurrency: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


class SamplerPool(Closeable):
    """A bounded pool of `size` Sampling objects over one model (thread-safe).

        with pool.get() as sampler:        # blocks while all are lent (timeout= to give up)
            text = sampler.generate(prompt, 50)

    close() (or leaving ``with pool:``) refuses further get() calls; lent samplers finish.
    """

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, size: int = 4, *,
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
    """Serves generations to asyncio code over one shared model, through a BatchEngine (the
    server's): at most `max_concurrency` generations are decoded together, in one C call per
    step, and further calls wait in its queue (FIFO). `threads_per_request`: library threads of
    each step (default: all cores). `timeout` (seconds, per call, None for none) cancels a
    generation that runs too long (asyncio.TimeoutError); cancelling the calling task, closing
    a stream early or a `cancel=` token that fires stops the generation before its next token
    and frees its slot. Each call's text equals Sampling.generate's with the same arguments.

    close() (or leaving ``with`` / ``async with``; aclose() from a coroutine) refuses new calls,
    cancels the ones still running and stops the engine's thread."""

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, max_concurrency: int = 4,
                 *, threads_per_request: int | None = None, timeout: float | None = None):
        self.max_concurrency = check_int(max_concurrency, "max_concurrency", 1)
        self.threads_per_request = (None if threads_per_request is None
                                    else check_int(threads_per_request, "threads_per_request", 1))
        if timeout is not None:
            timeout = check_number(timeout, "timeout", 0.0, math.inf, lo_open=True)
        self.timeout = timeout
        self._engine = BatchEngine(model, tokenizer, max_batch=self.max_concurrency,
                                   threads=self.threads_per_request)

    @property
    def active(self) -> int:
        """Generations being decoded now."""
        return 0 if self._closed else self._engine.active

    def _prepare(self, prompt, max_new_tokens, kwargs):
        self.check_open()
        cancel = kwargs.pop("cancel", None)
        is_cancelled = check_cancel(cancel)
        params = SamplingParams.make(max_new_tokens=max_new_tokens,
                                     vocab_size=self._engine.tokenizer.vocab_size, **kwargs)
        return self._engine.encode(prompt), params, is_cancelled

    async def _pieces(self, ids, params, is_cancelled):
        try:
            agen = self._engine.events_async(ids, params)
        except ObjectDisposedError:
            raise ObjectDisposedError("this ThrottledInferenceService was closed (disposed)") from None
        try:
            async for ev in agen:
                if is_cancelled():
                    raise CancelledError("generation cancelled")
                if isinstance(ev, Piece):
                    yield ev.text
                elif ev.result.finish_reason == "cancelled":
                    if self._closed:
                        raise ObjectDisposedError("this ThrottledInferenceService was closed "
                                                  "(disposed)")
                    raise CancelledError("generation cancelled")
        finally:
            await agen.aclose()

    async def generate(self, prompt: str, max_new_tokens: int = 100, **kwargs) -> str:
        """Sampling.generate, throttled (same arguments)."""
        ids, params, is_cancelled = self._prepare(prompt, max_new_tokens, kwargs)

        async def run():
            return "".join([p async for p in self._pieces(ids, params, is_cancelled)])

        if self.timeout is None:
            return await run()
        return await asyncio.wait_for(run(), self.timeout)

    async def stream(self, prompt: str, max_new_tokens: int = 100, **kwargs):
        """Sampling.stream as an async iterator, throttled (the slot is held while it runs)."""
        ids, params, is_cancelled = self._prepare(prompt, max_new_tokens, kwargs)
        agen = self._pieces(ids, params, is_cancelled)
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

    def _close(self) -> None:
        self._engine.close()

    async def aclose(self) -> None:
        """close() for coroutines: stops the engine without blocking the event loop."""
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(None, self._engine.close)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
