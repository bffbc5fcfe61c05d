"""bench_server.py - the HTTP server under concurrent streaming clients: aggregate tokens/s,
time to first token (TTFT) and inter-token latency (ITL) percentiles for 1, 4, 16 and 64
clients, against offline Sampling.generate_batch of the same prompts in the same run.

    python bench/bench_server.py --json bench/results/server.json        # full (~6 min, 2 cores)
    python bench/bench_server.py --quick                                  # smoke run (< 60 s)
    python bench/bench_server.py --pythonpath /tmp/old-tree --label baseline --json base.json
    python bench/bench_server.py --shared-prefix 192 --prefix-cache 0     # then 4: TTFT effect

The server is `python -m smallmind serve CHECKPOINT` in a subprocess (the smallmind this script
imports, or the source tree given by --pythonpath: that is how the previous server, a checkout
of an older commit built in place, is measured as the baseline with the same clients). Models:
the presets with random weights over the built-in corpus's characters (speed does not depend
on the weights). Each client is an asyncio task with its own connection that sends
`requests` streaming completions one after another (prompt: 32 characters of the corpus, a
different seed per request, temperature 0.8, max_tokens new tokens); all clients start
together. TTFT: request sent to the first text chunk; ITL: the gaps between later chunks, the
time a client waits between updates (a chunk holds every token generated since the last one
was sent: one when the event loop keeps up, several when the engine runs ahead; the mean is
reported as tokens_per_chunk). Aggregate tokens/s: all tokens over the wall time.
Offline: generate_batch of min(clients, 16) prompts at once, in this process, while the server
is idle. --shared-prefix N puts the same N characters before every prompt (a system prompt):
run it with --prefix-cache 0 and with the default to see what the prefix cache does to TTFT.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import cpu_model, loadavg  # noqa: E402

import smallmind as sm  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ck, port, pythonpath, max_concurrency, queue_size, extra=()):
    env = dict(os.environ, PYTHONPATH=pythonpath or os.pathsep.join(p for p in sys.path if p))
    p = subprocess.Popen([sys.executable, "-m", "smallmind", "serve", ck, "--port", str(port),
                          "--max-concurrency", str(max_concurrency), "--queue-size",
                          str(queue_size), "--timeout", "600", *extra], env=env,
                         cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    import httpx
    deadline = time.time() + 60
    while True:
        if p.poll() is not None:
            raise RuntimeError(f"the server exited with status {p.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return p
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            p.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.1)


async def _client(url, prompts, seeds, max_tokens, start, out):
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await start.wait()
        for prompt, seed in zip(prompts, seeds):
            t0 = time.perf_counter()
            times, tokens = [], 0
            async with c.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
                    "stream": True}) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ch = json.loads(line[6:])
                    text = ch["choices"][0]["text"] if ch.get("choices") else ""
                    if text:
                        times.append(time.perf_counter())
                        tokens += len(text)
            out.append({"ttft": times[0] - t0, "itl": list(np.diff(times)), "tokens": tokens,
                        "chunks": len(times)})


async def _load(url, clients, requests, prompts, max_tokens):
    start = asyncio.Event()
    out: list = []
    tasks = [asyncio.create_task(_client(url, [prompts[(k * requests + j) % len(prompts)]
                                               for j in range(requests)],
                                         [k * requests + j for j in range(requests)],
                                         max_tokens, start, out)) for k in range(clients)]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    ttft = [o["ttft"] for o in out]
    itl = [x for o in out for x in o["itl"]]
    tokens = sum(o["tokens"] for o in out)
    itl = itl or [float("nan")]           # every answer came in one chunk
    return {"clients": clients, "requests": len(out), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * float(np.percentile(ttft, 50)), 2),
            "ttft_p99_ms": round(1e3 * float(np.percentile(ttft, 99)), 2),
            "itl_p50_ms": round(1e3 * float(np.percentile(itl, 50)), 3),
            "itl_p99_ms": round(1e3 * float(np.percentile(itl, 99)), 3),
            "tokens_per_chunk": round(tokens / sum(o["chunks"] for o in out), 2)}


def _offline(model, tok, prompts, max_tokens, batch):
    s = sm.Sampling(model, tok)
    ps = prompts[:batch]
    s.generate_batch(ps, 8, temperature=0.8, seed=0)          # warm-up
    t0 = time.perf_counter()
    res = s.generate_batch(ps, max_tokens, temperature=0.8, seed=0, return_details=True)
    wall = time.perf_counter() - t0
    return round(sum(len(r.tokens) for r in res) / wall, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: small, 1 and 4 clients")
    ap.add_argument("--presets", default="small,shakespeare-char")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--pythonpath", help="run the server from this source tree (the baseline)")
    ap.add_argument("--label", default="batch-engine")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                    help="every prompt starts with the same N characters (a system prompt)")
    ap.add_argument("--prefix-cache", type=int, help="the server's --prefix-cache")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.quick:
        args.presets, args.clients, args.requests, args.max_tokens = "small", "1,4", 1, 16
    text = sm.corpus.builtin_corpus()
    tok = sm.Tokenizer(text)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(text) - 40, 256)
    prompts = [text[:args.shared_prefix] + text[i:i + 32] for i in starts]
    rows = []
    print(f"# {cpu_model()}, {os.cpu_count()} cores, load average {loadavg()}, server: {args.label}")
    print(f"{'preset':<17} {'clients':>7} {'tok/s':>9} {'offline':>9} {'ratio':>6} "
          f"{'TTFT p50':>9} {'p99':>9} {'ITL p50':>8} {'p99':>8} {'tok/chunk':>9}  (ms)")
    for preset in args.presets.split(","):
        model = sm.TransformerModel(sm.ModelConfig.preset(preset, vocab_size=tok.vocab_size)).eval()
        with tempfile.TemporaryDirectory() as d:
            ck = os.path.join(d, "model.safetensors")
            sm.save_checkpoint(ck, model, tok)
            port = _free_port()
            extra = () if args.prefix_cache is None else ("--prefix-cache", str(args.prefix_cache))
            p = _start(ck, port, args.pythonpath, args.max_concurrency, 256, extra)
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(_load(url, 1, 1, prompts, 8))        # warm-up
                for n in map(int, args.clients.split(",")):
                    row = asyncio.run(_load(url, n, args.requests, prompts, args.max_tokens))
                    row["offline_batch_tokens_per_s"] = _offline(model, tok, prompts,
                                                                 args.max_tokens, min(n, 16))
                    row["ratio_to_offline"] = round(row["tokens_per_s"] /
                                                    row["offline_batch_tokens_per_s"], 3)
                    row.update(preset=preset, server=args.label, load=loadavg(),
                               shared_prefix=args.shared_prefix, prefix_cache=args.prefix_cache)
                    rows.append(row)
                    print(f"{preset:<17} {n:>7} {row['tokens_per_s']:>9.0f} "
                          f"{row['offline_batch_tokens_per_s']:>9.0f} {row['ratio_to_offline']:>6.2f} "
                          f"{row['ttft_p50_ms']:>9.1f} {row['ttft_p99_ms']:>9.1f} "
                          f"{row['itl_p50_ms']:>8.2f} {row['itl_p99_ms']:>8.2f} "
                          f"{row['tokens_per_chunk']:>9.2f}", flush=True)
            finally:
                p.terminate()
                p.wait(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load": loadavg()},
                       "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
