"""cancellation.py - cooperative cancellation for long work (training, generation): a
CancellationTokenSource that owns the decision and the CancellationToken it hands out.

Long-running calls take `cancel=` and check it between units of work (training steps and
micro-steps, generated tokens); they never interrupt a C call midway, so whatever they leave
behind is consistent. Besides a token, `cancel=` accepts a `threading.Event` (set = cancelled)
or None.
"""
from __future__ import annotations

import threading
import time

from .errors import CancelledError, ValidationError

__all__ = ["CancellationToken", "CancellationTokenSource", "check_cancel"]


class CancellationToken:
    """A read-only view of a cancellation request. Thread-safe; obtain one from
    ``CancellationTokenSource().token`` (or ``CancellationToken.none()`` for one that never
    fires)."""

    __slots__ = ("_event", "_deadline", "_reason")

    def __init__(self, _event: threading.Event | None = None):
        self._event = _event if _event is not None else threading.Event()
        self._deadline: float | None = None
        self._reason: str | None = None

    @classmethod
    def none(cls) -> "CancellationToken":
        return cls()

    @property
    def is_cancelled(self) -> bool:
        if self._event.is_set():
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._reason = self._reason or "timed out"
            self._event.set()
            return True
        return False

    @property
    def reason(self) -> str | None:
        return self._reason if self.is_cancelled else None

    def raise_if_cancelled(self) -> None:
        if self.is_cancelled:
            raise CancelledError(f"operation cancelled ({self._reason or 'cancel requested'})")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or until timeout seconds pass (False)."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            timeout = left if timeout is None else min(timeout, left)
        return self._event.wait(timeout) or self.is_cancelled

    def __repr__(self) -> str:
        return f"CancellationToken(cancelled={self.is_cancelled})"


class CancellationTokenSource:
    """Owns a cancellation decision: ``cancel()`` (from any thread) flips its ``token``;
    ``cancel_after(seconds)`` arms a deadline. Usable as a context manager that cancels on exit."""

    __slots__ = ("_token",)

    def __init__(self, timeout: float | None = None):
        self._token = CancellationToken()
        if timeout is not None:
            self.cancel_after(timeout)

    @property
    def token(self) -> CancellationToken:
        return self._token

    @property
    def is_cancelled(self) -> bool:
        return self._token.is_cancelled

    def cancel(self, reason: str = "cancel requested") -> None:
        if not self._token._event.is_set():
            self._token._reason = reason
        self._token._event.set()

    def cancel_after(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValidationError(f"seconds must be a number >= 0, got {seconds!r}")
        self._token._deadline = time.monotonic() + float(seconds)

    def __enter__(self) -> "CancellationTokenSource":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel("scope exited")


def check_cancel(cancel, name: str = "cancel"):
    """Validate a `cancel=` argument; returns a zero-argument function telling whether it fired."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, CancellationTokenSource):
        cancel = cancel.token
    if isinstance(cancel, CancellationToken):
        return lambda: cancel.is_cancelled
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    raise TypeError(f"{name} must be a CancellationToken, CancellationTokenSource, "
                    f"threading.Event or None, got {type(cancel).__name__}")
