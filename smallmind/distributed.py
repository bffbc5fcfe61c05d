"""distributed.py - data-parallel training over MPI (mpi4py, the `smallmind[mpi]` extra): the
gradient all-reduce with a fixed summation order, the start-up check that every rank runs the same
model on the same data, the per-step agreement on stopping, and the timeout that turns a dead or
hung rank into an error instead of a hang.

Training(..., comm=Communicator()) (or `mpirun -n N smallmind train ...`) uses it; nothing else in
smallmind imports mpi4py, so a plain run never loads MPI.

Every collective here is non-blocking and waited on with a deadline: MPI's blocking calls would
wait forever for a rank that died or hangs. A rank that misses the deadline is reported by the
ones still waiting, which then abort the whole job (MPI_Abort), so `mpirun` always ends.
"""
import json
import os
import sys
import threading
import time

import numpy as np

from .errors import SmallMindError

# Seconds a collective may wait for the other ranks before the job is aborted. A training step
# of the biggest preset takes seconds, a checkpoint save about as long; 300 s is far beyond both.
DEFAULT_TIMEOUT = 300.0
TIMEOUT_ENV = "SMALLMIND_MPI_TIMEOUT"
_BUCKETS_AHEAD = 4       # bucketed all-reduce: reduce-scatters posted ahead of the summing
# How long abort() waits between printing its message and ending the job. MPICH's launcher
# (hydra) may tear the job down as soon as a process ends, before it has forwarded what that
# process last wrote to stderr: a CI run once lost the "no answer from the other ranks" line.
_FORWARD_GRACE_S = 1.0

# Environment variables the MPI launchers set in the processes they start: a process started by
# mpirun/mpiexec has one of them (MPICH/Hydra: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; PMIx).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class DistributedError(SmallMindError, RuntimeError):
    """The ranks of a distributed run disagree (configuration, data) or stopped answering."""


def launched_by_mpi() -> int:
    """The world size an MPI launcher announced in the environment (0 when not started by one).
    Read without importing MPI, so `smallmind train` can tell whether to load it."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(
            f"distributed training needs mpi4py and an MPI library ({e}); install them with "
            f"`pip install 'smallmind[mpi]'`") from None
    return MPI


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of `parts` contiguous pieces of range(n), sizes differing by at most one (the
    first n % parts pieces are the longer ones)."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


class _Watchdog(threading.Thread):
    """Calls on_expire(what) if a wait armed with arm(seconds, what) is still armed when its
    seconds have passed (then the thread ends: on_expire aborts the job)."""

    def __init__(self, on_expire):
        super().__init__(daemon=True, name="smallmind-mpi-watchdog")
        self._cv = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._on_expire = on_expire

    def arm(self, seconds: float, what: str) -> None:
        with self._cv:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._cv.notify()

    def disarm(self) -> None:
        with self._cv:
            self._deadline = None

    def run(self) -> None:
        with self._cv:
            while True:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    what = self._what
                    break
                self._cv.wait(left)
        self._on_expire(what)


def _shown(value) -> str:
    """A value for a message: itself when short, else the start of its digest."""
    text = repr(value)
    if len(text) <= 100:
        return text
    import hashlib
    return f"<{type(value).__name__} {hashlib.sha256(text.encode()).hexdigest()[:12]}>"


class Communicator:
    """The ranks of a data-parallel run: an mpi4py communicator (COMM_WORLD by default) with the
    operations training needs, each bounded by `timeout` seconds (default: $SMALLMIND_MPI_TIMEOUT,
    else 300). bucket_floats: reduce gradients in buckets of this many floats (see
    allreduce_sum; default one piece).

    allreduce_sum(block): every rank's float32 block summed in rank order, ((b0 + b1) + b2) + ...,
    on every rank: the same bits on every rank and in every run, and the bits of a single process
    accumulating the ranks' blocks in that order. (MPI_Allreduce does not fix the order: the
    algorithm it picks, and so the rounding, may change with the size, the rank count or the MPI.)
    It is a reduce-scatter and an all-gather, as a ring all-reduce: each rank sums one slice of
    the block from all ranks, in rank order, and sends its sums to all.
    """

    def __init__(self, comm=None, timeout: float | None = None, bucket_floats: int | None = None):
        MPI = _import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = _timeout_from_env() if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise DistributedError(f"timeout must be > 0 seconds, got {timeout!r}")
        # ranks sharing this machine (for the default thread count)
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if bucket_floats is not None and (not isinstance(bucket_floats, int) or bucket_floats < 1):
            raise DistributedError(f"bucket_floats must be a positive int or None, got "
                                   f"{bucket_floats!r}")
        self.bucket_floats = bucket_floats
        self._watchdog = _Watchdog(self._expired)
        self._watchdog.start()
        self.reduce_seconds = 0.0      # time spent in allreduce_sum since the last reset
        self._scratch: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Communicator(rank {self.rank} of {self.size}, {self.local_size} on this machine)"

    # ---- waiting with a deadline ------------------------------------------------------------

    def _wait(self, request, what: str) -> None:
        """Wait for a non-blocking operation; past the deadline, report and abort the job.

        The wait itself is MPI's (Wait, without the GIL): MPI moves a large message only while
        a rank is inside one of its calls, so polling with sleeps in between made a 43 MB
        all-reduce 12x slower. The deadline is kept by a watchdog thread instead."""
        if request.Test():
            return
        self._watchdog.arm(self.timeout, what)
        try:
            request.Wait()
        finally:
            self._watchdog.disarm()

    def _expired(self, what: str) -> None:
        self.abort(f"no answer from the other ranks within {self.timeout:g} s while {what}: a "
                   f"rank has died or hangs (the limit is ${TIMEOUT_ENV}); aborting the job")

    def abort(self, message: str, code: int = 3) -> None:
        """Print `message` (naming this rank) and end every process of the job."""
        print(f"smallmind: rank {self.rank} of {self.size}: {message}", file=sys.stderr,
              flush=True)
        time.sleep(_FORWARD_GRACE_S)     # let the launcher forward the line (see above)
        if threading.current_thread() is not threading.main_thread() and \
                self._MPI.Query_thread() < self._MPI.THREAD_MULTIPLE:
            os._exit(code)    # MPI calls from this thread are not allowed: the launcher ends the rest
        self.comm.Abort(code)

    # ---- collectives ----------------------------------------------------------------------------

    def barrier(self, what: str = "waiting at a barrier") -> None:
        self._wait(self.comm.Ibarrier(), what)

    def allreduce_sum(self, block: np.ndarray) -> None:
        """In place: block = sum of every rank's block, in rank order (see the class doc). With
        bucket_floats set, the block goes in buckets of that many floats: every bucket's
        reduce-scatter is posted at once, and each is summed (and its all-gather posted) as soon
        as it has arrived, so the sums of one bucket overlap the transfers of the others. The
        bits are the same either way."""
        if block.dtype != np.float32 or block.ndim != 1 or not block.flags.c_contiguous:
            raise TypeError("block must be a contiguous 1-D float32 array")
        if self.size == 1 or block.size == 0:
            return
        t0 = time.perf_counter()
        MPI, n, P = self._MPI, block.size, self.size
        step = self.bucket_floats or n
        plans, need = [], 0
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            bounds = [split_range(hi - lo, P, r) for r in range(P)]
            counts = np.array([b - a for a, b in bounds], dtype=np.int64)
            displs = np.array([a for a, _ in bounds], dtype=np.int64)
            mine = int(counts[self.rank])
            plans.append((lo, hi, counts, displs, bounds[self.rank], need, mine))
            need += P * mine
        scratch = self._scratch
        if scratch is None or scratch.size < need:
            scratch = self._scratch = np.empty(need, dtype=np.float32)

        def scatter(plan):
            """reduce-scatter: my slice of every rank's bucket, rank by rank"""
            lo, hi, counts, displs, _, at, mine = plan
            return self.comm.Ialltoallv(
                [block[lo:hi], (counts, displs), MPI.FLOAT],
                [scratch[at:at + P * mine],
                 (np.full(P, mine, dtype=np.int64), np.arange(P, dtype=np.int64) * mine),
                 MPI.FLOAT])

        # a few buckets in flight ahead of the one being summed (a flood of thousands of
        # outstanding operations would only slow MPI down)
        scatters = [scatter(plan) for plan in plans[:_BUCKETS_AHEAD]]
        gathers = []
        for i, (lo, hi, counts, displs, (a, b), at, mine) in enumerate(plans):
            self._wait(scatters[i], "summing gradients")
            if i + _BUCKETS_AHEAD < len(plans):
                scatters.append(scatter(plans[i + _BUCKETS_AHEAD]))
            out = block[lo + a:lo + b]
            np.copyto(out, scratch[at:at + mine])
            for r in range(1, P):  # ((b0 + b1) + b2) + ...: the order a single process adds in
                np.add(out, scratch[at + r * mine:at + (r + 1) * mine], out=out)
            # all-gather this bucket's summed slices
            gathers.append(self.comm.Iallgatherv(MPI.IN_PLACE,
                                                 [block[lo:hi], (counts, displs), MPI.FLOAT]))
        for req in gathers:
            self._wait(req, "sharing summed gradients")
        self.reduce_seconds += time.perf_counter() - t0

    def allgather_floats(self, values, what: str = "gathering results") -> list[np.ndarray]:
        """Every rank's float64 vector (lengths may differ), as a list indexed by rank."""
        MPI = self._MPI
        mine = np.ascontiguousarray(values, dtype=np.float64).ravel()
        lengths = np.zeros(self.size, dtype=np.int64)
        self._wait(self.comm.Iallgather([np.array([mine.size], dtype=np.int64), MPI.INT64_T],
                                        [lengths, MPI.INT64_T]), what)
        displs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out = np.empty(int(lengths.sum()), dtype=np.float64)
        self._wait(self.comm.Iallgatherv([mine, MPI.DOUBLE], [out, (lengths, displs), MPI.DOUBLE]),
                   what)
        return [out[d:d + n] for d, n in zip(displs, lengths)]

    def any(self, flag: bool, what: str = "agreeing") -> bool:
        """True on every rank if `flag` is true on any rank."""
        got = np.zeros(1, dtype=np.int32)
        self._wait(self.comm.Iallreduce(np.array([1 if flag else 0], dtype=np.int32), got,
                                        op=self._MPI.MAX), what)
        return bool(got[0])

    def check_same(self, record: dict, what: str) -> None:
        """Raise DistributedError on every rank unless every rank passed an equal `record` (a
        JSON-serialisable dict); the message names the first differing field, in the record's
        order (put the telling ones first), and its values. Exchanged as JSON bytes (never
        pickled)."""
        data = np.frombuffer(json.dumps(record, default=str).encode(), np.uint8)
        sizes = self.allgather_floats([data.size], what).copy()
        lengths = np.array([int(s[0]) for s in sizes], dtype=np.int64)
        displs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        allb = np.empty(int(lengths.sum()), dtype=np.uint8)
        self._wait(self.comm.Iallgatherv([data, self._MPI.BYTE],
                                         [allb, (lengths, displs), self._MPI.BYTE]), what)
        records = [json.loads(allb[d:d + n].tobytes()) for d, n in zip(displs, lengths)]
        first = records[0]
        for r, other in enumerate(records[1:], start=1):
            if other == first:
                continue
            for key in list(first) + [k for k in other if k not in first]:
                if first.get(key) != other.get(key):
                    raise DistributedError(
                        f"the ranks disagree on {what}: {key} is {_shown(first.get(key))} on "
                        f"rank 0 but {_shown(other.get(key))} on rank {r} (every rank must run "
                        f"the same command on the same files)")

    # ---- defaults -------------------------------------------------------------------------------

    def default_threads(self) -> int:
        """OpenMP threads per rank that fill this machine's cores without oversubscribing them:
        the cores this process may run on divided among the ranks on this machine (at least 1;
        never more in all than the cores, also where a launcher binds ranks to cores)."""
        cores = os.cpu_count() or 1
        if hasattr(os, "sched_getaffinity"):
            cores = len(os.sched_getaffinity(0)) or cores
        return max(1, cores // self.local_size)
