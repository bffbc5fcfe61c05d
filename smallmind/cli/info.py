"""info.py - `smallmind info` (version, build facts, the effective configuration) and
`smallmind bench` (a quick matmul table against numpy and a generation table)."""
import time

import numpy as np

from .. import __version__, build_info
from ..core import kernels

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
    if getattr(args, "config", None):
        from ..config import load_settings
        settings = load_settings(None if args.config is True else args.config)
        print(f"# effective configuration ({' < '.join(settings.sources)})")
        print(settings.to_toml())
        return 0
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
        t_sm = _median_time(lambda a=a, b=b, c=c: kernels.matmul(a, b, out=c))
        time.sleep(0.3)
        t_np = _median_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c))
        fl = 2.0 * M * K * N
        print(f"{str((M, K, N)):>20s} {fl / t_sm / 1e9:18.1f} {fl / t_np / 1e9:14.1f} {t_np / t_sm:5.2f}x")
    _bench_generation()
    return 0


def _bench_generation():
    """Greedy generation with untrained weights: time to first token after a 64-token prompt
    and tokens/s over 256 new tokens, for two model sizes (bench/bench_generate.py has the full
    comparison with PyTorch)."""
    from ..generation.sampling import Sampling
    from ..model.tokenizer import Tokenizer
    from ..model.transformer import ModelConfig, TransformerModel
    tok = Tokenizer("".join(chr(48 + i) for i in range(65)))
    prompt = "".join(chr(48 + (7 * i) % 65) for i in range(64))
    print(f"\n{'model (layers/heads/width)':>28s} {'params':>8s} {'first token ms':>15s} "
          f"{'tokens/s':>9s}")
    # the 4/4/128 shape of the benchmark tables (no preset has it) and the shakespeare-char preset
    shapes = {"4/4/128": ModelConfig(65, 128, 4, 4, 128),
              "shakespeare-char": ModelConfig.preset("shakespeare-char", 65, dropout=0.0)}
    for name, cfg in shapes.items():
        L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
        model = TransformerModel(cfg).eval()
        sampler = Sampling(model, tok)
        sampler.generate(prompt, 8, temperature=0)                # warm-up
        r = min((sampler.generate(prompt, 256, temperature=0, return_details=True)
                 for _ in range(3)), key=lambda r: r.elapsed_sec)
        label = name if name == f"{L}/{H}/{C}" else f"{name} ({L}/{H}/{C})"
        print(f"{label:>28s} {model.num_parameters() / 1e6:7.1f}M "
              f"{1e3 * r.time_to_first_token_sec:15.2f} {r.tokens_per_sec:9.0f}")
        model.close()
