"""errors.py - smallmind's exception hierarchy: every error the library raises on purpose
derives from SmallMindError, and also from the built-in it refines (ValueError, ...), so
callers can catch either."""

from typing import Any


class SmallMindError(Exception):
    """Base class of every exception smallmind raises on purpose."""


class ValidationError(SmallMindError, ValueError):
    """An argument or input is outside what the operation accepts; the message names it."""


class DTypeError(ValidationError, TypeError):
    """An array has the wrong dtype (float ids, say). Both a ValidationError and a TypeError,
    so it is caught as either: the model API promises ValidationError for bad input, Python
    convention says TypeError for a wrong type."""


class ObjectDisposedError(SmallMindError, RuntimeError):
    """A method was called on an object after its dispose()."""


class CheckpointError(SmallMindError):
    """A checkpoint or index file is missing, truncated, corrupted or does not match."""


class NumericalError(SmallMindError, FloatingPointError):
    """A computation produced NaN or infinity where a number is needed (a model whose weights
    overflow float32 gives NaN logits: no token can be sampled from them)."""


class CancelledError(SmallMindError):
    """Long-running work stopped because its cancellation token was set. A cancelled generation
    leaves what it had made in `result` (a GenerationResult; `results`, a list of them, for
    generate_batch)."""

    result: Any = None
    results: Any = None
