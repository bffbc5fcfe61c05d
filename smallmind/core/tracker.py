"""tracker.py - MemoryTracker: what smallmind's C memory and the process look like, phase by
phase.

    with sm.MemoryTracker() as mt:
        model.forward(ids)
        mt.snapshot("forward")
        sampler.generate("def ", 50)
        mt.snapshot("generate")
    print(mt.report())
    assert mt.active_allocations == (0, 0)   # everything rented was given back

Figures: buffers and bytes rented from the default MemoryPool and not yet returned (the
scratch of every forward pass, KV cache and search comes from there), the peak of those since
the tracker started or since the last snapshot, the pool's idle bytes, every pool's live
blocks (process-wide), and the process's resident set size (RSS) and its peak.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from ..errors import ValidationError
from . import _core
from .memory import MemoryPool, default_pool

__all__ = ["MemoryTracker", "MemorySnapshot", "process_rss", "process_peak_rss"]


def process_rss() -> int:
    """Resident set size of this process in bytes (0 where the platform does not say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or refused: no figure rather than an error
        return 0


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes (0 where unknown)."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError):
        return 0


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """One observation (bytes unless named otherwise)."""
    phase: str
    time_sec: float                 # since the tracker started
    outstanding_buffers: int        # rented from the pool, not returned
    outstanding_bytes: int
    peak_outstanding_bytes: int     # since the previous snapshot (or the start)
    pooled_bytes: int               # idle in the pool, ready for reuse
    live_blocks: int                # every pool in the process
    live_bytes: int
    rss_bytes: int
    peak_rss_bytes: int


class MemoryTracker:
    """Observes `pool` (default: the shared pool the C kernels rent from) and the process.
    Usable as a context manager (start on enter, a final "end" snapshot on exit) or with
    start() / snapshot() by hand. Thread-safe to read; snapshots are appended in call order."""

    def __init__(self, pool: MemoryPool | None = None):
        if pool is not None and not isinstance(pool, MemoryPool):
            raise ValidationError(f"pool must be a MemoryPool or None, got {type(pool).__name__}")
        self.pool = pool if pool is not None else default_pool()
        self.snapshots: list[MemorySnapshot] = []
        self._t0: float | None = None
        self._base: MemorySnapshot | None = None

    def start(self) -> "MemoryTracker":
        """Begin (again): clears the snapshots, restarts the peak, records a "start" snapshot."""
        self.snapshots = []
        self._t0 = time.perf_counter()
        self.pool.reset_peak()
        self._base = self.snapshot("start")
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.snapshot("end")

    def _observe(self, phase: str) -> MemorySnapshot:
        st = self.pool.stats()
        g = _core._pool_global_stats()
        return MemorySnapshot(
            phase=phase, time_sec=time.perf_counter() - (self._t0 or time.perf_counter()),
            outstanding_buffers=st["outstanding_buffers"],
            outstanding_bytes=st["outstanding_bytes"],
            peak_outstanding_bytes=st["peak_outstanding_bytes"], pooled_bytes=st["pooled_bytes"],
            live_blocks=g["live_blocks"], live_bytes=g["live_bytes"], rss_bytes=process_rss(),
            peak_rss_bytes=process_peak_rss())

    def snapshot(self, phase: str = "") -> MemorySnapshot:
        """Record (and return) the figures now under the name `phase`; the pool's peak restarts,
        so each snapshot's peak covers the time since the previous one."""
        if not isinstance(phase, str):
            raise ValidationError(f"phase must be a str, got {type(phase).__name__}")
        if self._t0 is None:
            self._t0 = time.perf_counter()
        s = self._observe(phase or f"#{len(self.snapshots)}")
        self.pool.reset_peak()
        self.snapshots.append(s)
        return s

    @property
    def active_allocations(self) -> tuple[int, int]:
        """(buffers, bytes) rented from the pool now and not returned, beyond those outstanding
        when the tracker started: (0, 0) once everything since then was given back."""
        st = self.pool.stats()
        b0 = self._base.outstanding_buffers if self._base else 0
        y0 = self._base.outstanding_bytes if self._base else 0
        return st["outstanding_buffers"] - b0, st["outstanding_bytes"] - y0

    @property
    def peak_outstanding_bytes(self) -> int:
        """The highest pool bytes outstanding over every snapshot so far (and now)."""
        now = self.pool.stats()["peak_outstanding_bytes"]
        return max([now] + [s.peak_outstanding_bytes for s in self.snapshots])

    def report(self) -> str:
        """A table of the snapshots (MiB)."""
        mib = 1 / (1 << 20)
        lines = [f"{'phase':<16} {'t (s)':>8} {'rented':>8} {'MiB':>9} {'peak MiB':>9} "
                 f"{'idle MiB':>9} {'RSS MiB':>9} {'peak RSS':>9}"]
        for s in self.snapshots:
            lines.append(f"{s.phase[:16]:<16} {s.time_sec:8.3f} {s.outstanding_buffers:8d} "
                         f"{s.outstanding_bytes * mib:9.2f} {s.peak_outstanding_bytes * mib:9.2f} "
                         f"{s.pooled_bytes * mib:9.2f} {s.rss_bytes * mib:9.1f} "
                         f"{s.peak_rss_bytes * mib:9.1f}")
        return "\n".join(lines)
