"""_faults.py - failure points: how tests prove that a mutating method is all-or-nothing.

Code that changes an object in several steps calls `point("Class.method:step")` between
them. Outside tests nothing is armed and a point costs one truth test of an empty dict. A test
first records the points a call passes (`trace()`), then repeats the call once per point with
that point armed to raise (MemoryError, KeyboardInterrupt, ...), and checks the object is
exactly as it was before the call (tests/test_faults.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

_armed: dict[str, BaseException] = {}
_seen: list[str] | None = None


def point(name: str) -> None:
    """A step boundary of a mutation; raises what a test armed here (once)."""
    if _seen is not None:
        _seen.append(name)
    if _armed:
        exc = _armed.pop(name, None)
        if exc is not None:
            raise exc


@contextlib.contextmanager
def armed(name: str, exc: BaseException) -> Iterator[None]:
    """Raise `exc` at the next pass through point `name` inside the block."""
    _armed[name] = exc
    try:
        yield
    finally:
        _armed.pop(name, None)


@contextlib.contextmanager
def trace() -> Iterator[list[str]]:
    """The names of the points passed inside the block, in order."""
    global _seen
    previous, _seen = _seen, []
    try:
        yield _seen
    finally:
        _seen = previous
