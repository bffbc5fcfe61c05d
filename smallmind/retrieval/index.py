"""index.py - VectorIndex: exact nearest-neighbour search over float32 vectors kept in C memory
(cosine, dot product or squared L2 distance), thread-safe and disposable, saved without pickle.

Concurrency: a readers-writer lock. Any number of searches run at once (the C search releases
the GIL); add, remove, load_state and dispose are exclusive, so a search never sees a
half-written row and memory is freed only once the searches in flight have finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, Sequence

import numpy as np

from .. import _faults
from .._lifecycle import Closeable
from .._validate import is_int
from ..core import _core
from ..errors import CheckpointError, ValidationError
from ..safetensors import load_file, save_file

__all__ = ["VectorIndex", "METRICS", "STORAGES"]

METRICS = ("cosine", "dot", "l2")
STORAGES = ("float32", "bf16", "int8")
_FORMAT = "smallmind.VectorIndex"
_VERSION = 1
_META_KEY = "smallmind.index"


class _RWLock:
    """Many readers or one writer; a waiting writer goes before readers that arrive after it
    (so a stream of searches cannot starve an add)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_id(v, where: str):
    if isinstance(v, bool) or not (isinstance(v, str) or is_int(v)):
        raise ValidationError(f"{where} must be an int or a str, got {v!r} ({type(v).__name__})")
    return v if isinstance(v, str) else int(v)


class VectorIndex(Closeable):
    """Exact top-k search over vectors of `dim` floats.

    ``metric``: "cosine" (scores in [-1, 1], larger is closer; zero vectors are refused), "dot"
    (the inner product, larger is closer) or "l2" (the squared Euclidean distance, smaller is
    closer). Each vector has a unique id (an int or a str; by default its insertion count) and
    optional metadata (anything JSON can hold). Ties between equal scores go to the vector added
    first. Results are identical for any thread count and whether queries come alone or in a
    batch.

    ``storage``: "float32" (the default), or "bf16" / "int8": a compact copy of every vector (2
    or 1 byte per value; int8 with one scale per vector) that a search reads first. With
    ``exact=True`` (the default) the float32 vectors are kept too and results are exactly the
    float32 index's, ids and score bits: the compact scores bound the float32 ones (each
    vector's quantization error norm, Cauchy-Schwarz, and the sums' rounding), and every vector
    whose bound reaches the k-th best is scored again in float32. ``exact=False`` keeps only
    the compact vectors (less memory; scores and ranking are the compact vectors', so recall is
    below 1: docs/retrieval.md gives it measured).

        with sm.VectorIndex(128) as index:
            index.add(vectors, ids=["a", "b", ...], metadata=[{...}, ...])
            ids, scores = index.search(query, k=10)
    """

    def __init__(self, dim: int, metric: str = "cosine", *, storage: str = "float32",
                 exact: bool = True):
        if not is_int(dim) or not 1 <= dim <= 1 << 24:
            raise ValidationError(f"dim must be an int in [1, 2**24], got {dim!r}")
        if metric not in METRICS:
            raise ValidationError(f"metric must be one of {METRICS}, got {metric!r}")
        if storage not in STORAGES:
            raise ValidationError(f"storage must be one of {STORAGES}, got {storage!r}")
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
        if storage == "float32" and not exact:
            raise ValidationError("exact=False needs storage='bf16' or 'int8' (float32 vectors "
                                  "are the exact ones)")
        self.dim = int(dim)
        self.metric = metric
        self.storage = storage
        self.exact = exact
        self._store = _core.IndexStore(self.dim, metric, storage, exact)
        self._ids: list = []            # row -> id
        self._meta: list = []           # row -> metadata (or None)
        self._rows: dict = {}           # id -> row
        self._next_id = 0               # default ids
        self._lock = _RWLock()

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the C memory (after any search in flight). Idempotent; every later call raises
        ObjectDisposedError. dispose() and leaving ``with index:`` do the same."""
        with self._lock.write():
            if not self._closed:
                self._closed = True
                self._store.close()
                self._ids, self._meta, self._rows = [], [], {}

    def __del__(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


    # ---- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock.read():
            self.check_open()
            return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Bytes of C memory held (the row store, including room to grow)."""
        return self._store.nbytes

    def __contains__(self, id) -> bool:
        with self._lock.read():
            self.check_open()
            return id in self._rows

    @property
    def ids(self) -> list:
        with self._lock.read():
            self.check_open()
            return list(self._ids)

    def _as_matrix(self, vectors, name: str) -> tuple[np.ndarray, bool]:
        try:
            a = np.asarray(vectors)
        except (TypeError, ValueError) as e:
            raise ValidationError(f"{name} must be an array of numbers: {e}") from None
        if a.dtype.kind not in "iuf":     # no bool, complex, object or strings
            raise ValidationError(f"{name} must hold real numbers, got dtype {a.dtype}")
        single = a.ndim == 1
        if single:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValidationError(f"{name} must have shape ({self.dim},) or (n, {self.dim}), "
                                  f"got {np.shape(vectors)}")
        with np.errstate(over="ignore", invalid="ignore"):
            a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValidationError(f"{name} must be finite (no NaN or infinity, also after "
                                  "conversion to float32)")
        return a, single

    def add(self, vectors, ids: Sequence | None = None, metadata: Sequence | None = None) -> list:
        """Add one vector (dim,) or many (n, dim). ``ids``: one per vector, unique (also against
        those stored), ints or strs; default: consecutive ints. ``metadata``: one JSON-able
        object per vector (or None). Returns the ids. Nothing is added if anything is wrong."""
        a, single = self._as_matrix(vectors, "vectors")
        n = a.shape[0]
        if ids is not None:
            if single and not isinstance(ids, (list, tuple, np.ndarray)):
                ids = [ids]
            ids = [_check_id(v, f"ids[{i}]") for i, v in enumerate(ids)]
            if len(ids) != n:
                raise ValidationError(f"ids has {len(ids)} entries for {n} vectors")
            if len(set(ids)) != n:
                raise ValidationError("ids must be unique")
        if metadata is not None:
            if single and not isinstance(metadata, (list, tuple)):
                metadata = [metadata]
            metadata = list(metadata)
            if len(metadata) != n:
                raise ValidationError(f"metadata has {len(metadata)} entries for {n} vectors")
            for i, m in enumerate(metadata):
                try:
                    json.dumps(m)
                except (TypeError, ValueError) as e:
                    raise ValidationError(f"metadata[{i}] must be JSON-serialisable: {e}") from None
        with self._lock.write():
            self.check_open()
            if ids is None:
                ids = list(range(self._next_id, self._next_id + n))
                while any(i in self._rows for i in ids):   # skip ints a caller used
                    self._next_id += n
                    ids = list(range(self._next_id, self._next_id + n))
            clash = [i for i in ids if i in self._rows]
            if clash:
                raise ValidationError(f"id {clash[0]!r} is already in the index")
            ints = [i for i in ids if not isinstance(i, str)]
            next_id = max(self._next_id, max(ints) + 1) if ints else self._next_id
            new_meta = metadata if metadata is not None else [None] * n
            base = len(self._ids)
            # All or nothing: the C rows, then the Python bookkeeping; any exception on the
            # way (MemoryError, KeyboardInterrupt) undoes what was done, so ids, rows,
            # metadata and the C store never disagree.
            self._store.add(a)
            try:
                _faults.point("VectorIndex.add:stored")
                self._ids.extend(ids)
                _faults.point("VectorIndex.add:ids")
                self._meta.extend(new_meta)
                _faults.point("VectorIndex.add:metadata")
                for j, i in enumerate(ids):
                    self._rows[i] = base + j
                _faults.point("VectorIndex.add:rows")
            except BaseException:
                self._truncate(base, ids)
                raise
            self._next_id = next_id
        return list(ids)

    def _truncate(self, base: int, added_ids) -> None:
        """Undo a partial add: back to `base` rows, without the ids it added."""
        for i in added_ids:
            if self._rows.get(i, -1) >= base:
                del self._rows[i]
        del self._ids[base:]
        del self._meta[base:]
        for r in range(self._store.size - 1, base - 1, -1):
            self._store.remove_row(r)               # the last row: nothing moves

    def remove(self, ids) -> None:
        """Remove one id or a list of ids; an unknown id raises ValidationError (nothing
        removed)."""
        if isinstance(ids, (str, int, np.integer)) and not isinstance(ids, bool):
            ids = [ids]
        ids = [_check_id(v, f"ids[{i}]") for i, v in enumerate(ids)]
        with self._lock.write():
            self.check_open()
            missing = [i for i in ids if i not in self._rows]
            if missing:
                raise ValidationError(f"unknown id {missing[0]!r}")
            # All or nothing: what is removed is kept until the end; an exception on the way
            # puts the removed rows back (at the end: row order is not part of the contract).
            removed: list = []
            try:
                for i in dict.fromkeys(ids):
                    r = self._rows[i]
                    removed.append((i, self._row_snapshot(r), self._meta[r]))
                    _faults.point("VectorIndex.remove:copied")
                    self._remove_row(i, r)
                    _faults.point("VectorIndex.remove:row")
            except BaseException:
                self._restore_rows(removed)
                raise

    def _remove_row(self, id, r: int) -> None:
        """Remove row r (of `id`): the last row moves into its place. A step that cannot be
        interrupted half-way by anything but a bug (no allocation)."""
        moved = self._store.remove_row(r)
        last_id, last_meta = self._ids.pop(), self._meta.pop()
        del self._rows[id]
        if moved >= 0:           # the last row now lives at r
            self._ids[r], self._meta[r] = last_id, last_meta
            self._rows[last_id] = r

    def _compact_only(self) -> bool:
        return self.storage != "float32" and not self.exact

    def _row_snapshot(self, r: int):
        """What re-adds row r as it is: its float32 vector, or its codes and scale."""
        return self._store.row_codes(r) if self._compact_only() else self._store.get_row(r)

    def _restore_rows(self, removed: list) -> None:
        """Put back rows a failed remove took out (those no longer present)."""
        back = [(i, v, m) for i, v, m in removed if i not in self._rows]
        if back:
            base = len(self._ids)
            if self._compact_only():
                self._store.add_codes(np.stack([v[0] for _, v, _ in back]),
                                      np.array([v[1] for _, v, _ in back], np.float32))
            else:
                self._store.add(np.stack([v for _, v, _ in back]))
            for j, (i, _, m) in enumerate(back):
                self._ids.append(i)
                self._meta.append(m)
                self._rows[i] = base + j

    def get(self, id) -> tuple[np.ndarray, Any]:
        """(vector, metadata) of an id; ValidationError if it is unknown. Without float32
        vectors (exact=False) the vector is the compact one, widened to float32."""
        with self._lock.read():
            self.check_open()
            if id not in self._rows:
                raise ValidationError(f"unknown id {id!r}")
            r = self._rows[id]
            return self._store.get_row(r), self._meta[r]

    # ---- search ---------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, threads: int | None = None,
               with_metadata: bool = False):
        """The k nearest vectors of one query (dim,) or of each of a batch (nq, dim).

        Returns (ids, scores): for one query a list of ids and a float32 array, best first;
        for a batch a list of such lists and an (nq, k') array. k larger than the index returns
        what there is (k' = min(k, len)). With ``with_metadata`` a third item holds the
        metadata of each hit."""
        if not is_int(k) or k < 1:
            raise ValidationError(f"k must be an int >= 1, got {k!r}")
        q, single = self._as_matrix(queries, "queries")
        with self._lock.read():
            self.check_open()
            n = len(self._ids)
            kk = min(int(k), n)
            if kk == 0:
                rows = np.empty((q.shape[0], 0), np.int64)
                scores = np.empty((q.shape[0], 0), np.float32)
            else:
                rows, scores = self._store.search(q, kk, threads)
            ids = [[self._ids[r] for r in row] for row in rows.tolist()]
            meta: Any = [[self._meta[r] for r in row] for row in rows.tolist()] if with_metadata else None
        if single:
            out = (ids[0], scores[0])
            return out + (meta[0],) if with_metadata else out
        return (ids, scores, meta) if with_metadata else (ids, scores)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index to `path` atomically, as a safetensors file: the vectors (n, dim)
        float32 and a JSON header entry with the format, version, metric, ids and metadata.
        No pickle; VectorIndex.load validates everything it reads."""
        with self._lock.read():
            self.check_open()
            header = {"format": _FORMAT, "version": _VERSION, "dim": self.dim,
                      "metric": self.metric, "storage": self.storage, "exact": self.exact,
                      "ids": self._ids, "metadata": self._meta}
            if self._compact_only():      # the codes themselves: read back, the same scores
                codes, scales = self._store.codes()
                tensors = {"codes": codes, "scales": scales}
            else:
                tensors = {"vectors": self._store.rows()}
        save_file(tensors, path, metadata={_META_KEY: json.dumps(header)}, checksums=True)

    @classmethod
    def load(cls, path, *, verify: bool | None = None) -> "VectorIndex":
        """Read a file written by save. CheckpointError for a missing, truncated, corrupted,
        edited (its checksums are verified unless verify=False or SMALLMIND_VERIFY_CHECKSUMS=0)
        or inconsistent file."""
        tensors, meta = load_file(path, verify=verify)
        where = os.fspath(path)
        try:
            header: Any = json.loads(meta[_META_KEY])
        except KeyError:
            raise CheckpointError(f"{where!r} is not a smallmind VectorIndex file "
                                  f"(no {_META_KEY!r} metadata)") from None
        except (TypeError, ValueError, RecursionError) as e:   # RecursionError: deep nesting
            raise CheckpointError(f"{where!r}: the index header is not valid JSON: {e}") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise CheckpointError(f"{where!r} is not a smallmind VectorIndex file")
        if header.get("version") != _VERSION:
            raise CheckpointError(f"{where!r}: index format version {header.get('version')!r} "
                                  f"is not supported (this smallmind reads {_VERSION})")
        # values from the file: anything until checked below
        dim: Any = header.get("dim")
        metric: Any = header.get("metric")
        ids: Any = header.get("ids")
        metadata: Any = header.get("metadata")
        storage: Any = header.get("storage", "float32")     # files before compact storage
        exact: Any = header.get("exact", True)
        compact = storage in ("bf16", "int8") and exact is False
        names = {"codes", "scales"} if compact else {"vectors"}
        vectors: Any = tensors.get("codes" if compact else "vectors")
        scales: Any = tensors.get("scales")
        want = {"bf16": np.uint16, "int8": np.int8}.get(storage) if compact else np.float32
        problems = []
        if not is_int(dim) or not 1 <= dim <= 1 << 24:
            problems.append(f"dim {dim!r}")
        if metric not in METRICS:
            problems.append(f"metric {metric!r}")
        if storage not in STORAGES or not isinstance(exact, bool) or (storage == "float32"
                                                                       and not exact):
            problems.append(f"storage {storage!r} with exact {exact!r}")
        if not isinstance(ids, list) or not isinstance(metadata, list):
            problems.append("ids/metadata are not lists")
        if vectors is None or vectors.dtype != want or vectors.ndim != 2:
            problems.append(f"no {np.dtype(want).name} (n, dim) {sorted(names)[0]!r} tensor")
        if compact and (scales is None or scales.dtype != np.float32 or scales.ndim != 1
                        or vectors is None or scales.shape[0] != vectors.shape[0]):
            problems.append("no float32 (n,) 'scales' tensor")
        if set(tensors) != names:
            problems.append(f"unexpected tensors {sorted(set(tensors) - names)}")
        if not problems:
            n = vectors.shape[0]
            if vectors.shape[1] != dim:
                problems.append(f"vectors have {vectors.shape[1]} columns, dim is {dim}")
            if len(ids) != n or len(metadata) != n:
                problems.append(f"{n} vectors but {len(ids)} ids and {len(metadata)} metadata")
            elif any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in ids):
                problems.append("ids must be ints or strs")
            elif len(set(ids)) != n:
                problems.append("ids are not unique")
        if problems:
            raise CheckpointError(f"{where!r}: corrupted VectorIndex file: " + "; ".join(problems))
        index = cls(dim, metric, storage=storage, exact=exact)
        try:
            if len(ids) and compact:
                index._add_codes(vectors, scales, ids, metadata)
            elif len(ids):
                index.add(vectors, ids=ids, metadata=metadata)
        except ValidationError as e:
            index.close()
            raise CheckpointError(f"{where!r}: corrupted VectorIndex file: {e}") from None
        except BaseException:
            index.close()                  # a failed load leaves no half-built index behind
            raise
        return index

    def _add_codes(self, codes, scales, ids, metadata) -> None:
        """A new index's rows from saved codes (load): the same codes and scales, so the same
        scores. ids and metadata as load checked them."""
        with self._lock.write():
            self._store.add_codes(codes, scales)
            self._ids, self._meta = list(ids), list(metadata)
            self._rows = {i: r for r, i in enumerate(self._ids)}
            ints = [i for i in self._ids if not isinstance(i, str)]
            self._next_id = max(ints) + 1 if ints else 0

    def __repr__(self):
        if self._closed:
            return "VectorIndex(disposed)"
        extra = "" if self.storage == "float32" else (f", storage={self.storage!r}"
                                                      + ("" if self.exact else ", exact=False"))
        return f"VectorIndex(dim={self.dim}, metric={self.metric!r}{extra}, len={len(self._ids)})"
