"""metrics.py - in-process metrics and logging set-up: counters, gauges and histograms kept in
memory (thread-safe), exported in the Prometheus text format; JSON log lines as an option.

The library records as it works (no set-up needed):

    smallmind_training_steps_total, smallmind_training_loss, smallmind_training_tokens_per_second
    smallmind_generated_tokens_total, smallmind_generations_total{finish_reason=...},
    smallmind_generation_seconds (histogram), smallmind_time_to_first_token_seconds (histogram)
    smallmind_pool_rents_total, smallmind_pool_returns_total, smallmind_pool_outstanding_bytes,
    smallmind_pool_outstanding_buffers (read from the default MemoryPool when exported)

    print(sm.metrics.render_prometheus())          # what a /metrics endpoint serves

Logger names are stable: smallmind.training, smallmind.sampling, smallmind.server.
`configure_logging(level="INFO", json=True)` prints one JSON object per record.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import sys
import threading
import time
from typing import Any

__all__ = ["Registry", "REGISTRY", "render_prometheus", "configure_logging", "JsonFormatter"]

_DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _num(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


class Registry:
    """Named metrics. Each is created on first use with its type and help text; values are kept
    per label set. All methods are thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}          # name -> (type, help)
        self._values: dict[str, dict[tuple, Any]] = {}  # number, or [counts, sum, n]
        self._buckets: dict[str, tuple] = {}
        self._collectors: list = []

    def _declare(self, name, kind, help):
        known = self._meta.get(name)
        if known is None:
            self._meta[name] = (kind, help)
            self._values[name] = {}
        elif known[0] != kind:
            raise ValueError(f"metric {name} is a {known[0]}, not a {kind}")

    def inc(self, name: str, value: float = 1.0, help: str = "", **labels) -> None:
        """Add to a counter (value >= 0)."""
        if value < 0:
            raise ValueError("a counter only goes up")
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._inc(name, value, help, key)

    def _inc(self, name, value, help, key) -> None:        # with the lock held
        self._declare(name, "counter", help)
        self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, help: str = "", *, counter: bool = False,
            **labels) -> None:
        """Set a gauge (or, with counter=True, a counter kept elsewhere, such as the pool's)."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._declare(name, "counter" if counter else "gauge", help)
            self._values[name][key] = float(value)

    def observe(self, name: str, value: float, help: str = "", buckets=_DEFAULT_BUCKETS,
                **labels) -> None:
        """Record one observation in a histogram."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._observe(name, value, help, buckets, key)

    def _observe(self, name, value, help, buckets, key) -> None:     # with the lock held
        self._declare(name, "histogram", help)
        b = self._buckets.setdefault(name, tuple(buckets))
        h = self._values[name].get(key)
        if h is None:
            h = self._values[name][key] = [[0] * (len(b) + 1), 0.0, 0]
        h[0][bisect.bisect_left(b, value)] += 1
        h[1] += value
        h[2] += 1

    def get(self, name: str, **labels):
        """A counter's or gauge's value (a histogram's count), or None."""
        with self._lock:
            v = self._values.get(name, {}).get(tuple(sorted(labels.items())))
        return v[2] if isinstance(v, list) else v

    def add_collector(self, fn) -> None:
        """fn(registry) is called before each export, to set gauges read from elsewhere."""
        with self._lock:
            self._collectors.append(fn)

    def reset(self) -> None:
        with self._lock:
            self._meta.clear()
            self._values.clear()
            self._buckets.clear()

    def render_prometheus(self) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        for fn in list(self._collectors):
            fn(self)
        out = []
        with self._lock:
            for name in sorted(self._meta):
                kind, help = self._meta[name]
                if help:
                    out.append(f"# HELP {name} {help}")
                out.append(f"# TYPE {name} {kind}")
                for key, v in sorted(self._values[name].items()):
                    labels = dict(key)
                    if kind != "histogram":
                        out.append(f"{name}{_labels(labels)} {_num(v)}")
                        continue
                    counts, total, n = v
                    acc = 0
                    for edge, c in zip(self._buckets[name] + (math.inf,), counts):
                        acc += c
                        out.append(f"{name}_bucket{_labels(dict(labels, le=_num(edge)))} {acc}")
                    out.append(f"{name}_sum{_labels(labels)} {_num(total)}")
                    out.append(f"{name}_count{_labels(labels)} {n}")
        return "\n".join(out) + "\n"


REGISTRY = Registry()


def render_prometheus() -> str:
    return REGISTRY.render_prometheus()


def _pool_collector(reg: Registry) -> None:
    from .core.memory import default_pool
    st = default_pool().stats()
    reg.set("smallmind_pool_rents_total", st["rents"], "buffers rented from the default pool",
            counter=True)
    reg.set("smallmind_pool_returns_total", st["returns"], "buffers returned to the default pool",
            counter=True)
    reg.set("smallmind_pool_outstanding_bytes", st["outstanding_bytes"], "bytes rented now")
    reg.set("smallmind_pool_outstanding_buffers", st["outstanding_buffers"], "buffers rented now")
    reg.set("smallmind_pool_pooled_bytes", st["pooled_bytes"], "idle bytes kept for reuse")


REGISTRY.add_collector(_pool_collector)


# ---- recording helpers (called by training.py and sampling.py) ------------------------------------

def record_training_step(info: dict) -> None:
    REGISTRY.inc("smallmind_training_steps_total", 1, "optimizer steps taken")
    REGISTRY.set("smallmind_training_loss", info["loss"], "loss of the last training step")
    REGISTRY.set("smallmind_training_tokens_per_second", info["tokens_per_sec"],
                 "training throughput of the last step")
    if "val_loss" in info:
        REGISTRY.set("smallmind_validation_loss", info["val_loss"], "last validation loss")


def record_generation(tokens: int, seconds: float, ttft: float, reason: str) -> None:
    r = REGISTRY
    with r._lock:          # one acquisition for the four (a short generation is ~100 us)
        r._inc("smallmind_generated_tokens_total", tokens, "tokens generated", ())
        r._inc("smallmind_generations_total", 1, "generations finished",
               (("finish_reason", reason),))
        r._observe("smallmind_generation_seconds", seconds, "wall time of a generation",
                   _DEFAULT_BUCKETS, ())
        if tokens:
            r._observe("smallmind_time_to_first_token_seconds", ttft,
                       "time from the call to the first token", _DEFAULT_BUCKETS, ())


# ---- logging ----------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, and any
    `extra=` fields given to the log call."""

    _SKIP = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for k, v in vars(record).items():
            if k not in self._SKIP and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level="INFO", json: bool = False, stream=None) -> logging.Handler:
    """Send the "smallmind" loggers to `stream` (default stderr) at `level`, as plain lines or
    JSON objects. Replaces a handler this function installed before; returns the handler."""
    logger = logging.getLogger("smallmind")
    for h in list(logger.handlers):
        if getattr(h, "_smallmind", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._smallmind = True  # type: ignore[attr-defined]  # marks the handler as ours
    handler.setFormatter(JsonFormatter() if json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
