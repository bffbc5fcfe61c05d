"""cli.py - the `python -m smallmind` command. For now it reports the build and measures the
compute core against numpy on a few GPT-shaped products; training and generation subcommands
arrive with the model (see the open issues)."""
import argparse
import sys
import time

import numpy as np

from . import __version__, build_info, kernels

_SHAPES = [(4096, 128, 384), (4096, 512, 128), (1024, 1024, 1024), (1, 768, 2304)]


def _median_time(fn, min_reps=5, min_time=0.25):
    """Median seconds per call, over at least `min_reps` calls and `min_time` seconds."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cmd_info(args):
    info = build_info()
    print(f"smallmind {__version__}")
    for key, value in info.items():
        print(f"  {key:14s} {value}")
    return 0


def cmd_bench(args):
    """A quick side-by-side of smallmind's matmul and numpy's on a few shapes."""
    rng = np.random.default_rng(0)
    print(f"{'shape (M,K,N)':>20s} {'smallmind GFLOP/s':>18s} {'numpy GFLOP/s':>14s} {'ratio':>6s}")
    for (M, K, N) in _SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = np.empty((M, N), np.float32)
        # OpenBLAS and OpenMP keep their worker threads spinning for a while after a call:
        # let the other library's go idle before timing each one.
        time.sleep(0.3)
        t_sm = _median_time(lambda: kernels.matmul(a, b, out=c))
        time.sleep(0.3)
        t_np = _median_time(lambda: np.matmul(a, b, out=c))
        fl = 2.0 * M * K * N
        print(f"{str((M, K, N)):>20s} {fl / t_sm / 1e9:18.1f} {fl / t_np / 1e9:14.1f} {t_np / t_sm:5.2f}x")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="smallmind", description="smallmind: small GPT models on the CPU")
    sub = ap.add_subparsers(dest="command")
    sub.add_parser("info", help="version, build facts, SIMD level, threads")
    sub.add_parser("bench", help="a quick matmul table against numpy")
    args = ap.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    cmd_info(args)
    print()
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
