"""bench_distributed.py - data-parallel training over MPI: 2 ranks x 1 thread against 1 process x 2
threads on this machine, against PyTorch DDP (gloo, 2 processes) on the same model and global
batch, the all-reduce alone, and a cost model of scaling out to many machines checked against
the measured all-reduce times.

    python bench/bench_distributed.py --json bench/results/distributed.json   # ~6 min, 2 cores
    python bench/bench_distributed.py --quick                                 # smoke run

Needs the smallmind[mpi] extra (mpiexec, mpi4py); PyTorch for the DDP rows (skipped without it).

Throughput: sm.Training steps (forward, backward, the gradient all-reduce, clipping, AdamW) on the
built-in corpus, global batch fixed per preset (1 process: one micro-batch of all of it; 2 ranks:
half each). Dropout is off in both libraries so that they do the same work. The median step
after one warm-up step is reported, with the median time the step spent in the all-reduce
(monolithic, and in 1 MiB buckets). PyTorch: DistributedDataParallel on the gloo backend over
loopback, each process one thread and half the global batch, fused AdamW; and one process with
2 threads. Each configuration runs in its own processes, one after the other.

All-reduce: Communicator.allreduce_sum on 2 ranks for gradient blocks the size of each preset's
(and GPT-2 124M's), beside MPI's own MPI_Allreduce on the same block.

Cost model (computed from the figures above, printed by bench/report.py): a ring all-reduce moves
2 (N-1)/N x 4 x params bytes per rank per step; at a link bandwidth b and a per-message latency
a it takes 2 (N-1) (a + 4 params / (N b)). Fitted to the loopback measurements (a and b from the
smallest and largest block), it predicts the middle sizes, which is the check. Scaled out to
N machines like this one (compute per step = the global batch's tokens / N / the measured
single-machine tokens/s), the scaling efficiency is compute / (compute + all-reduce) with no
overlap, and the tokens each machine needs per step to stay above 90% follow.

Leaves out: several machines (none here), overlap of the all-reduce with the backward pass
(the C backward has no per-layer hook yet), GPUs.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg, write_json  # noqa: E402

# preset -> global batch (windows); block sizes and shapes are the presets'
PRESETS = {"small": 32, "shakespeare-char": 64}
QUICK = {"small": 4}
STEPS = {"small": 12, "shakespeare-char": 6}
BUCKET_FLOATS = 262_144          # 1 MiB buckets for the bucketed all-reduce rows
GPT2_PARAMS = 124_439_808        # GPT-2 124M's parameters (tied head)
LINKS_GBPS = (10, 25, 100)
NODES = (2, 4, 8, 16, 32, 64)


def mpiexec():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.isfile(exe) else "mpiexec"


def worker_env(threads):
    """The workers import the smallmind this process imported (installed, or a source tree on
    PYTHONPATH) and torch_gpt from bench/."""
    import smallmind
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(smallmind.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [package_root, HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("SMALLMIND_MPI_TIMEOUT", None)
    return env


def run_worker(cmd, threads, timeout=1800):
    """Run a worker command; its last stdout line is a JSON object (rank 0's)."""
    p = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# ---- workers (run in their own processes) ---------------------------------------------------------

def sm_worker(args):
    import smallmind as sm
    from smallmind.model.corpus import builtin_corpus
    comm = None
    if args.mpi:
        from smallmind.distributed import Communicator
        comm = Communicator(bucket_floats=args.bucket_floats or None)
    text = builtin_corpus()
    tok = sm.Tokenizer(text)
    cfg = sm.ModelConfig.preset(args.preset, tok.vocab_size, dropout=0.0, seed=1,
                                **({"block_size": 32} if args.quick else {}))
    ranks = comm.size if comm else 1
    model = sm.TransformerModel(cfg)
    t = sm.Training(model, tok, text, batch_size=args.batch // ranks, seed=2, comm=comm)
    infos = []
    t.train(args.steps, learning_rate=1e-3, warmup_steps=1, grad_accum_steps=ranks,
            eval_every=0, log_every=0, threads=args.threads, callback=infos.append)
    tokens = args.batch * cfg.block_size
    step_s = [tokens / i["tokens_per_sec"] for i in infos[1:]]
    red = [i.get("allreduce_sec", 0.0) for i in infos[1:]]
    if comm is None or comm.rank == 0:
        print(json.dumps({"step_s": float(np.median(step_s)), "allreduce_s": float(np.median(red)),
                          "params": int(model.flat_params.size), "tokens": tokens,
                          "loss": infos[-1]["loss"]}), flush=True)


def torch_worker(args):
    import torch
    import torch.distributed as dist
    from torch_gpt import TorchGPT, make_optimizer

    import smallmind as sm
    from smallmind.model.corpus import builtin_corpus
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    text = builtin_corpus()
    tok = sm.Tokenizer(text)
    cfg = sm.ModelConfig.preset(args.preset, tok.vocab_size, dropout=0.0, seed=1,
                                **({"block_size": 32} if args.quick else {}))
    model = TorchGPT(cfg)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model, 1e-3, 0.1)
    ids = torch.tensor(tok.encode_array(text).astype(np.int64))
    g = torch.Generator().manual_seed(2)
    T, per = cfg.block_size, args.batch // world
    times = []
    for _ in range(args.steps):
        ix = torch.randint(0, len(ids) - T - 1, (args.batch,), generator=g)[rank * per:(rank + 1) * per]
        x = torch.stack([ids[i:i + T] for i in ix])
        y = torch.stack([ids[i + 1:i + T + 1] for i in ix])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"step_s": float(np.median(times[1:])), "tokens": args.batch * T,
                          "loss": float(loss.item())}), flush=True)


def allreduce_worker(args):
    from mpi4py import MPI

    from smallmind.distributed import Communicator
    comm = Communicator()

    def timed(block, run, bucket=None):
        """Seconds of run() on a fresh copy of the block, the ranks starting together."""
        comm.bucket_floats = bucket
        b = block.copy()
        comm.barrier()
        t0 = time.perf_counter()
        run(b)
        return time.perf_counter() - t0

    rows = []
    for n in args.sizes:
        block = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32)
        out = np.empty_like(block)
        times: dict[str, list[float]] = {"ours_s": [], "bucketed_s": [], "mpi_s": []}
        for _ in range(3 if n > 10_000_000 else 7):
            times["ours_s"].append(timed(block, comm.allreduce_sum))
            times["bucketed_s"].append(timed(block, comm.allreduce_sum, BUCKET_FLOATS))
            times["mpi_s"].append(timed(block, lambda b, o=out: comm.comm.Allreduce(b, o, op=MPI.SUM)))
        rows.append({"floats": n, **{k: float(np.median(v)) for k, v in times.items()}})
    comm.bucket_floats = None
    if comm.rank == 0:
        print(json.dumps({"rows": rows}), flush=True)


# ---- the cost model ------------------------------------------------------------------------------

def fit_link(rows, ranks=2):
    """(latency a, bandwidth b in bytes/s) of t = 2 (N-1) (a + 4 n / (N b)) through the smallest
    and the largest measured block."""
    lo, hi = rows[0], rows[-1]
    k = 2 * (ranks - 1)
    per_byte = (hi["ours_s"] - lo["ours_s"]) / (k * 4 * (hi["floats"] - lo["floats"]) / ranks)
    a = lo["ours_s"] / k - per_byte * 4 * lo["floats"] / ranks
    return max(a, 0.0), 1.0 / per_byte


def ring_time(params, nodes, gbps, latency=20e-6):
    """Seconds of a ring all-reduce of `params` float32 gradients over `nodes` at `gbps`."""
    if nodes <= 1:
        return 0.0
    b = gbps * 1e9 / 8
    return 2 * (nodes - 1) * (latency + 4 * params / (nodes * b))


def cost_model(single, presets):
    """Scaling efficiency rows: preset x nodes x link, from the measured single-machine step."""
    rows = []
    for name, s in presets.items():
        tok_s = s["tokens"] / s["step_s"]           # one machine (2 threads) tokens/s
        for nodes in NODES:
            for gbps in LINKS_GBPS:
                comp = s["tokens"] / nodes / tok_s
                comm = ring_time(s["params"], nodes, gbps)
                eff = comp / (comp + comm)
                need = 9 * comm * tok_s              # tokens per node per step for 90%
                rows.append({"preset": name, "nodes": nodes, "gbps": gbps, "compute_s": comp,
                             "allreduce_s": comm, "efficiency": eff,
                             "tokens_per_node_for_90": need,
                             "global_batch_tokens": s["tokens"]})
    return rows


# ---- driver -----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", choices=["sm", "torch", "allreduce"], help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bucket-floats", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "sm":
        return sm_worker(args)
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "allreduce":
        return allreduce_worker(args)

    import smallmind as sm
    try:
        import torch
    except ImportError:
        torch = None
    me = [sys.executable, os.path.abspath(__file__)]
    q = ["--quick"] if args.quick else []
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "smallmind": sm.__version__, "build": sm.build_info(), "numpy": np.__version__,
               "torch": torch.__version__ if torch else None, "load_start": loadavg()}
    print(f"{machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}; load {loadavg()}")
    rows = []
    presets = QUICK if args.quick else PRESETS
    single = {}
    for name, batch in presets.items():
        steps = 3 if args.quick else STEPS[name]
        common = ["--preset", name, "--batch", str(batch), "--steps", str(steps), *q]
        one = run_worker(me + ["--worker", "sm", "--threads", "2", *common], 2)
        two = run_worker([mpiexec(), "-n", "2", *me, "--worker", "sm", "--mpi", "--threads", "1",
                          *common], 1)
        buck = run_worker([mpiexec(), "-n", "2", *me, "--worker", "sm", "--mpi", "--threads",
                           "1", "--bucket-floats", str(BUCKET_FLOATS), *common], 1)
        single[name] = one
        row = {"part": "throughput", "preset": name, "global_batch": batch,
               "tokens_per_step": one["tokens"], "params": one["params"],
               "sm_1x2_step_s": one["step_s"], "sm_2x1_step_s": two["step_s"],
               "sm_2x1_allreduce_s": two["allreduce_s"], "sm_2x1_bucketed_step_s": buck["step_s"],
               "sm_2x1_bucketed_allreduce_s": buck["allreduce_s"],
               "load": loadavg()}
        if torch is not None:
            port = free_port()
            procs = []
            for r in range(2):
                env = worker_env(1)
                env.update(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
                procs.append(subprocess.Popen(me + ["--worker", "torch", "--threads", "1",
                                                    *common], env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
            outs = [p.communicate(timeout=1800) for p in procs]
            if any(p.returncode for p in procs):
                raise RuntimeError(f"torch DDP failed:\n{outs[0][1][-2000:]}\n{outs[1][1][-2000:]}")
            ddp = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1])
            p = subprocess.run(me + ["--worker", "torch", "--threads", "2", *common], env=worker_env(2),
                               capture_output=True, text=True, timeout=1800)
            t1 = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
            row.update(torch_ddp_2x1_step_s=ddp["step_s"], torch_1x2_step_s=t1["step_s"])
        rows.append(row)
        print(json.dumps(row))
    sizes = [31_000, 1_000_000, 10_800_000] if not args.quick else [1000, 100_000, 1_000_000]
    if not args.quick:
        sizes.append(GPT2_PARAMS)
    ar = run_worker([mpiexec(), "-n", "2", *me, "--worker", "allreduce", "--sizes",
                     ",".join(map(str, sizes))], 1)
    a, b = fit_link(ar["rows"])
    for r in ar["rows"]:
        r.update(part="allreduce", ranks=2, model_s=2 * (a + 4 * r["floats"] / (2 * b)))
        rows.append(r)
        print(json.dumps(r))
    model_presets = {k: dict(v) for k, v in single.items()}
    if "shakespeare-char" in single:
        # GPT-2 124M on a machine like this: its FLOPs at the shakespeare-char step's FLOP rate
        s = single["shakespeare-char"]
        rate = 6 * s["params"] * s["tokens"] / s["step_s"]
        tokens = 8 * 1024
        model_presets["gpt2"] = {"params": GPT2_PARAMS, "tokens": tokens,
                                 "step_s": 6 * GPT2_PARAMS * tokens / rate}
    for r in cost_model(single, model_presets):
        r["part"] = "cost"
        rows.append(r)
    rows.append({"part": "link_fit", "latency_s": a, "bandwidth_Bps": b})
    machine["load_end"] = loadavg()
    if args.json:
        write_json(args.json, machine, args.quick, rows)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
