"""_lifecycle.py - the one lifetime convention of every smallmind object that owns a resource:
close() releases it (idempotent; any later use raises ObjectDisposedError), `with obj:` closes
on exit, and dispose() / disposed are the same under the names of the .NET-style design smallmind
follows. The compiled classes (MemoryPool, PooledBuffer) follow it by hand."""
from __future__ import annotations

from .errors import ObjectDisposedError

__all__ = ["Closeable"]


class Closeable:
    """Mixin: a subclass implements _close() (called once) and may override _what."""

    _closed: bool = False

    def _close(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what this object holds; later calls raise ObjectDisposedError. Idempotent."""
        if not self._closed:
            self._close()
            self._closed = True

    def dispose(self) -> None:
        """The same as close()."""
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def disposed(self) -> bool:
        """The same as `closed`."""
        return self._closed

    def check_open(self) -> None:
        """Raise ObjectDisposedError if this object was closed."""
        if self._closed:
            raise ObjectDisposedError(f"this {type(self).__name__} was closed (disposed)")

    def __enter__(self):
        self.check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
