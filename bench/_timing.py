"""_timing.py - the timing helpers every benchmark in bench/ shares: medians of repeated calls,
an idle gap between libraries, and a limit on numpy's BLAS threads (via threadpoolctl)."""
import json
import os
import time

import numpy as np

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # without it numpy uses its own default thread count
    threadpool_limits = None

# OpenBLAS and OpenMP keep their worker threads spinning for a while after a call; timing one
# library while another's workers still spin on the same cores measures the contention.
IDLE_GAP_S = 0.3


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def loadavg():
    """The 1, 5 and 15 minute load averages (rounded), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def idle(quick=False):
    """Let other libraries' worker threads go to sleep before the next measurement."""
    if not quick:
        time.sleep(IDLE_GAP_S)


def timeit(fn, quick=False, min_time=0.3, min_reps=5, max_reps=200):
    """Median seconds per call of fn(), after one warm-up call; one timed call when quick."""
    fn()
    if quick:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def interleaved(fns, rounds, quick, batch_time=0.05):
    """Median seconds per call of each fn in `fns` (a dict), measured round-robin: in each round
    every library gets an idle gap (so no other library's worker threads are still spinning),
    a warm-up call, then a batch of calls lasting at least `batch_time` (steady state: caches,
    clocks and thread teams warm). Round-robin keeps slow drifts of a shared machine from
    favouring whichever library ran first. The result is the median over all timed calls."""
    times = {name: [] for name in fns}
    for _ in range(1 if quick else rounds):
        for name, fn in fns.items():
            idle(quick)
            fn()
            start = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - start < batch_time:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                n += 1
                if quick:
                    break
    return {name: float(np.median(ts)) for name, ts in times.items()}


class numpy_threads:
    """Limit OpenBLAS (numpy's BLAS) to n threads inside the block, when threadpoolctl is here."""

    def __init__(self, n):
        self.n = n
        self.ctx = None

    def __enter__(self):
        if threadpool_limits is not None:
            self.ctx = threadpool_limits(self.n, user_api="blas")
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def basic_machine():
    """CPU, cores, Python version and load: the machine record of the smaller benchmarks."""
    import platform
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg": loadavg()}


def write_json(path, machine, quick, rows):
    """The file every benchmark writes with --json: {"machine", "quick", "rows"}, atomically (a
    temporary file renamed over the old one, so an interrupted run never leaves half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": machine, "quick": quick, "rows": rows}, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
