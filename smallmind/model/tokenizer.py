"""tokenizer.py - BaseTokenizer (what generation, training and checkpoints need of any
tokenizer) and the character-level Tokenizer; the byte-level BPETokenizer is in bpe.py.

Ids are positions in an ordered vocabulary of single characters (Unicode code points). Built
from text, the vocabulary is the text's distinct characters sorted by code point, as nanoGPT's
char model does, so the same text always gives the same ids. The vocabulary serialises to a
small JSON object for checkpoints (`to_json` / `from_json`). What it leaves out: merges,
special tokens and byte fallback - an unknown character has no id and is skipped or refused.
"""
from __future__ import annotations

import abc
import codecs
import json
import sys
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import ValidationError

__all__ = ["BaseTokenizer", "PieceDecoder", "Tokenizer", "UnknownCharacterWarning"]

_ERRORS = ("skip", "strict")
_JSON_TYPE = "char"
_JSON_VERSION = 1
# encode switches to the vectorised path from this length (below it numpy's per-call
# overhead outweighs the per-character dict look-up).
_ARRAY_PATH_MIN = 256
_MAX_LISTED = 10        # distinct unknown characters named in one warning
# Code points >= this go through a binary search instead of the dense lookup table, so one
# emoji in a vocabulary does not cost a 4 MB table (the table covers the BMP at most: 256 KB).
_TABLE_LIMIT = 0x10000


class UnknownCharacterWarning(UserWarning):
    """Tokenizer.encode skipped characters that are not in the vocabulary (errors="skip")."""


def _is_surrogate(c: str) -> bool:
    return 0xD800 <= ord(c) <= 0xDFFF


def _check_errors(errors, name="errors"):
    if not isinstance(errors, str) or errors not in _ERRORS:
        raise ValidationError(f"{name} must be one of {_ERRORS}, got {errors!r}")
    return str(errors)


def _describe_unknown(distinct_sorted, count):
    shown = ", ".join(repr(c) for c in distinct_sorted[:_MAX_LISTED])
    more = len(distinct_sorted) - _MAX_LISTED
    if more > 0:
        shown += f" and {more} more"
    n = len(distinct_sorted)
    return (f"skipped {count} unknown character{'s' if count != 1 else ''} "
            f"({n} distinct, not in the vocabulary): {shown}")


def _caller_level():
    # stacklevel for warnings.warn called from a function of this module: 1 is that function.
    f = sys._getframe(2)
    level = 2
    while f is not None and f.f_globals.get("__name__") == __name__:
        f = f.f_back
        level += 1
    return level


def _restore(chars, errors):
    # pickle support (multiprocessing, copy): rebuilds through the validating constructor.
    return Tokenizer.from_chars(chars, errors=errors)


class PieceDecoder:
    """Text of a growing sequence of token ids, one piece per token, for streaming: `push(ids)`
    returns each id's piece, `end()` what is left when the sequence ends. The pieces joined,
    then end(), equal tokenizer.decode(all ids) (invalid UTF-8 as U+FFFD). A token that stops
    inside a multi-byte character gives "" and the token that completes it the character: text
    is never split inside a character. One per sequence; not thread-safe."""

    __slots__ = ("_bytes", "_dec", "_hidden")

    def __init__(self, token_bytes, hidden: Iterable[int] = ()):
        self._bytes = token_bytes
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._hidden = frozenset(hidden)

    def push(self, ids: Iterable[int]) -> list[str]:
        """The text each of `ids` adds, in order; ids in `hidden` (an end-of-text token) add ""."""
        dec, tb, hidden = self._dec.decode, self._bytes, self._hidden
        return ["" if i in hidden else dec(tb(i)) for i in ids]

    def end(self) -> str:
        """The sequence is over: bytes still waiting for the rest of a character, as U+FFFD."""
        return self._dec.decode(b"", True)


class _CharPieces(PieceDecoder):
    """A character tokenizer's pieces: one character per id, nothing ever waits."""

    __slots__ = ("_chars",)

    def __init__(self, chars, hidden: Iterable[int] = ()):
        super().__init__(None, hidden)
        self._chars = chars

    def push(self, ids: Iterable[int]) -> list[str]:
        chars, hidden = self._chars, self._hidden
        return ["" if i in hidden else chars[i] for i in ids] if hidden else [chars[i] for i in ids]

    def end(self) -> str:
        return ""


class BaseTokenizer(abc.ABC):
    """What the rest of smallmind needs of a tokenizer: Tokenizer (characters) and BPETokenizer
    (byte-level BPE) both are one, so Sampling, BatchEngine, the server, Training and
    checkpoints take either. Token i stands for `token_bytes(i)` (UTF-8); `eos_id` is the
    end-of-text token, which ends a generation, or None."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids are below this."""

    @abc.abstractmethod
    def encode(self, text: str) -> list:
        """The ids of `text`."""

    @abc.abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a numpy integer array."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of `ids`."""

    @abc.abstractmethod
    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token i stands for."""

    @abc.abstractmethod
    def to_json(self) -> str:
        """The tokenizer as an ASCII JSON object with a "type" field (checkpoints)."""

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token's id (generation stops when it is drawn), or None."""
        return None

    def token_text(self, i: int) -> str:
        """Token i on its own, as text (log-probability listings): bytes that are not whole
        characters show as U+FFFD; token_bytes(i) gives them exactly."""
        return self.token_bytes(i).decode("utf-8", "replace")

    def piece_decoder(self, hide_eos: bool = True) -> PieceDecoder:
        """A PieceDecoder for one generated sequence (the end-of-text token adds no text unless
        hide_eos is False)."""
        eos = self.eos_id
        return PieceDecoder(self.token_bytes, () if eos is None or not hide_eos else (eos,))


class Tokenizer(BaseTokenizer):
    """Character-level tokenizer: ``Tokenizer(text)`` gives every distinct character of
    ``text`` an id, in code-point order (ids 0 .. vocab_size-1).

    Thread safety: immutable; share one instance across threads. Every attribute is fixed at
    construction (setting or deleting one raises AttributeError) and encode/decode only read
    shared state, so concurrent calls need no lock.

    Unknown characters (policy of ``encode``/``encode_array``): with ``errors="skip"`` (the
    default) characters outside the vocabulary are dropped and each call that drops any emits
    ONE ``UnknownCharacterWarning`` naming the distinct characters and how many were skipped;
    with ``errors="strict"`` the call raises ``smallmind.ValidationError`` naming the first
    unknown character and its position. The constructor's ``errors`` is the default; each
    call may override it.

    Text holding lone surrogates (U+D800..U+DFFF, e.g. from ``surrogateescape`` decoding) is
    refused at construction: they are not characters, cannot be written as UTF-8 and so could
    not be stored in a checkpoint. In text passed to ``encode`` they are unknown characters.

    Serialisation: ``to_json()`` / ``Tokenizer.from_json(s)``; ``chars`` (the vocabulary in id
    order) with ``Tokenizer.from_chars`` also round-trips. The ``errors`` policy is a usage
    default, not part of the vocabulary: it is not serialised and plays no part in ``==``.
    """

    __slots__ = ("_chars", "_errors", "_index", "_cps", "_table", "_astral_cps",
                 "_astral_ids", "_hash")
    _chars: tuple
    _errors: str
    _index: dict

    def __init__(self, text: str, *, errors: str = "skip"):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValidationError("text must be non-empty (the vocabulary is its distinct characters)")
        chars = sorted(set(text))
        bad = [c for c in chars if _is_surrogate(c)]
        if bad:
            pos = min(text.index(c) for c in bad)
            raise ValidationError(
                f"text contains a lone surrogate {text[pos]!r} at position {pos}; lone "
                "surrogates are not characters and cannot be stored as UTF-8")
        self._setup(tuple(chars), _check_errors(errors))

    @classmethod
    def from_chars(cls, chars: Sequence[str] | str, *, errors: str = "skip") -> Tokenizer:
        """Build from an explicit vocabulary: ``chars[i]`` gets id ``i`` (any order, so a
        vocabulary restored from a checkpoint keeps its ids). Each entry must be a single
        character, none repeated, no lone surrogates, at least one entry."""
        if isinstance(chars, str):
            seq = tuple(chars)
        elif isinstance(chars, (list, tuple)):
            seq = tuple(chars)
        else:
            raise TypeError(f"chars must be a str or a list/tuple of str, got {type(chars).__name__}")
        if not seq:
            raise ValidationError("chars must be non-empty")
        seen: dict[str, int] = {}
        for i, c in enumerate(seq):
            if not isinstance(c, str) or len(c) != 1:
                raise ValidationError(f"chars[{i}] must be a single character (str of length 1), got {c!r}")
            if _is_surrogate(c):
                raise ValidationError(f"chars[{i}] is a lone surrogate {c!r}, which cannot be stored as UTF-8")
            if c in seen:
                raise ValidationError(f"chars[{i}] = {c!r} repeats chars[{seen[c]}]; characters must be unique")
            seen[c] = i
        self = cls.__new__(cls)
        self._setup(tuple(str(c) for c in seq), _check_errors(errors))
        return self

    def _setup(self, chars, errors):
        init = object.__setattr__
        n = len(chars)
        cps = np.fromiter((ord(c) for c in chars), dtype=np.uint32, count=n)  # (V,) by id
        # Dense table over code points 0..max BMP code point, plus one trailing -1 entry that
        # every larger code point is clamped onto (one np.minimum instead of a mask pass).
        bmp = cps < _TABLE_LIMIT
        tlen = (int(cps[bmp].max()) + 2) if bmp.any() else 1
        table = np.full(tlen, -1, dtype=np.int32)
        ids = np.arange(n, dtype=np.int32)
        table[cps[bmp]] = ids[bmp]
        order = np.argsort(cps[~bmp], kind="stable")
        astral_cps = np.ascontiguousarray(cps[~bmp][order])
        astral_ids = np.ascontiguousarray(ids[~bmp][order])
        cps_le = cps.astype("<u4")          # decode gathers these and reads them as UTF-32-LE
        for a in (cps_le, table, astral_cps, astral_ids):
            a.flags.writeable = False
        init(self, "_chars", chars)
        init(self, "_errors", errors)
        init(self, "_index", {c: i for i, c in enumerate(chars)})
        init(self, "_cps", cps_le)
        init(self, "_table", table)
        init(self, "_astral_cps", astral_cps)
        init(self, "_astral_ids", astral_ids)
        init(self, "_hash", hash(chars))

    # ---- immutability --------------------------------------------------------------------
    def __setattr__(self, name, value):
        raise AttributeError(f"Tokenizer is immutable (cannot set {name!r})")

    def __delattr__(self, name):
        raise AttributeError(f"Tokenizer is immutable (cannot delete {name!r})")

    def __reduce__(self):
        return (_restore, (self._chars, self._errors))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # ---- properties and protocol -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of characters in the vocabulary (ids are 0 .. vocab_size-1)."""
        return len(self._chars)

    @property
    def chars(self) -> tuple:
        """The vocabulary in id order: ``chars[i]`` is the character with id ``i``."""
        return self._chars

    @property
    def errors(self) -> str:
        """The default unknown-character policy of encode: "skip" or "strict"."""
        return self._errors

    def __len__(self):
        return len(self._chars)

    def __contains__(self, c):
        return isinstance(c, str) and c in self._index

    def __eq__(self, other):
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self._chars == other._chars

    def __hash__(self):
        return self._hash

    def __repr__(self):
        s = "".join(self._chars)
        shown = repr(s if len(s) <= 24 else s[:24]) + ("..." if len(s) > 24 else "")
        return f"Tokenizer(vocab_size={len(self._chars)}, chars={shown})"

    # ---- encode ------------------------------------------------------------------------------
    def _policy(self, errors):
        return self._errors if errors is None else _check_errors(errors)

    def encode(self, s: str, errors: str | None = None) -> list:
        """Ids of the characters of ``s`` as a list of ints. ``errors`` ("skip"/"strict",
        default: the tokenizer's) decides what happens to characters outside the vocabulary
        (see the class docstring). ``encode_array`` returns the same ids as a numpy array."""
        if not isinstance(s, str):
            raise TypeError(f"s must be a str, got {type(s).__name__}")
        policy = self._policy(errors)
        if len(s) >= _ARRAY_PATH_MIN:
            # Vectorised look-up + tolist is ~3x faster than a dict look-up per character.
            return self._encode_np(s, policy).tolist()
        index = self._index
        try:
            return [index[c] for c in s]
        except KeyError:
            pass
        # Slow path only when something is unknown: find it all, then apply the policy.
        out = []
        unknown = set()
        count = 0
        for pos, c in enumerate(s):
            i = index.get(c)
            if i is None:
                if policy == "strict":
                    self._raise_unknown(c, pos)
                unknown.add(c)
                count += 1
            else:
                out.append(i)
        self._warn_unknown(sorted(unknown), count)
        return out

    def encode_array(self, s: str, errors: str | None = None) -> np.ndarray:
        """Like ``encode`` but returns a new 1-D int32 numpy array, computed with vectorised
        table look-ups over the code points (the fast path for large text: about 10x faster
        than ``encode`` on a megabyte). Same unknown-character policy and same ids."""
        if not isinstance(s, str):
            raise TypeError(f"s must be a str, got {type(s).__name__}")
        return self._encode_np(s, self._policy(errors))

    def _encode_np(self, s, policy):
        # UTF-32 gives one uint32 per str index; surrogatepass keeps lone surrogates (unknown).
        cps = np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype="<u4")   # (n,)
        table = self._table
        ids = table[np.minimum(cps, np.uint32(table.shape[0] - 1))]                  # (n,) int32
        if self._astral_cps.shape[0]:
            big = np.flatnonzero(cps >= _TABLE_LIMIT)
            if big.shape[0]:
                acp = self._astral_cps
                v = cps[big]
                pos = np.minimum(np.searchsorted(acp, v), acp.shape[0] - 1)
                ids[big] = np.where(acp[pos] == v, self._astral_ids[pos], -1)
        bad = ids < 0
        if not bad.any():
            return ids
        first = int(np.argmax(bad))
        if policy == "strict":
            self._raise_unknown(s[first], first)
        distinct = [chr(int(c)) for c in np.unique(cps[bad])]
        self._warn_unknown(distinct, int(np.count_nonzero(bad)))
        return np.ascontiguousarray(ids[~bad])

    @staticmethod
    def _raise_unknown(c, pos):
        raise ValidationError(
            f"s contains {c!r} (U+{ord(c):04X}) at position {pos}, which is not in the "
            "tokenizer's vocabulary (errors='strict'; use errors='skip' to drop unknown characters)")

    @staticmethod
    def _warn_unknown(distinct_sorted, count):
        # Point the warning at the first frame outside this module (the caller of encode).
        warnings.warn(_describe_unknown(distinct_sorted, count), UnknownCharacterWarning,
                      stacklevel=_caller_level())

    # ---- decode ------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        """The text for ``ids``: a list/tuple of ints or a 1-D integer numpy array (any integer
        dtype). Every id must be an integer in [0, vocab_size); bools are not ids. Anything
        else raises ``smallmind.ValidationError`` naming the offending position and value
        (TypeError for a container or array dtype that cannot hold ids)."""
        n = len(self._chars)
        if isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
            if ids.ndim != 1:
                raise ValidationError(f"ids must be 1-D, got shape {ids.shape}")
            return self._decode_np(ids)
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"ids must be a list/tuple of ints or a 1-D integer numpy array, "
                            f"got {type(ids).__name__}")
        if not ids:
            return ""
        # Fast path: only plain ints / numpy integers (checked by type, so bools and floats
        # never get here) go through one numpy conversion and the array path.
        if all(t is int or (issubclass(t, np.integer)) for t in set(map(type, ids))):
            try:
                arr = np.array(ids, dtype=np.int64)
            except OverflowError:
                arr = None                 # an id beyond int64: the loop below reports it
            if arr is not None:
                return self._decode_np(arr)
        chars = self._chars
        n = len(chars)
        out = []
        for pos, v in enumerate(ids):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValidationError(f"ids[{pos}] must be an integer id, got {v!r} "
                                      f"({type(v).__name__})")
            i = int(v)
            if not 0 <= i < n:
                raise ValidationError(self._range_msg(pos, i))
            out.append(chars[i])
        return "".join(out)

    def token_bytes(self, i: int) -> bytes:
        """Character i in UTF-8."""
        return self._chars[self._check_id(i)].encode("utf-8")

    def token_text(self, i: int) -> str:
        """Character i."""
        return self._chars[self._check_id(i)]

    def _check_id(self, i) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) \
                or not 0 <= int(i) < len(self._chars):
            raise ValidationError(f"id {i!r} is not a token of this vocabulary "
                                  f"(ids are in [0, {len(self._chars)}))")
        return int(i)

    def piece_decoder(self, hide_eos: bool = True) -> PieceDecoder:
        """One character per id (there is no end-of-text token)."""
        return _CharPieces(self._chars)

    def _decode_np(self, ids):
        n = len(self._chars)
        if ids.shape[0] == 0:
            return ""
        if ids.min() < 0 or ids.max() >= n:
            pos = int(np.flatnonzero((ids < 0) | (ids >= n))[0])
            raise ValidationError(self._range_msg(pos, int(ids[pos])))
        # Gather code points and let the UTF-32 codec build the str in one C loop.
        return self._cps[ids].tobytes().decode("utf-32-le")

    def _range_msg(self, pos, v):
        return (f"ids[{pos}] = {v} is out of range: ids must be in [0, {len(self._chars)}) "
                f"(vocab_size {len(self._chars)})")

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        """The vocabulary as an ASCII JSON object ``{"type": "char", "version": 1, "chars":
        [...]}`` (every character escaped as needed, so it is safe in safetensors metadata)."""
        return json.dumps({"type": _JSON_TYPE, "version": _JSON_VERSION, "chars": list(self._chars)},
                          ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s, *, errors: str = "skip") -> Tokenizer:
        """Rebuild a tokenizer written by ``to_json``; validates everything and raises
        ``smallmind.ValidationError`` saying what is wrong (bad JSON, duplicate keys, wrong
        type or version, missing/extra keys, bad characters)."""
        errors = _check_errors(errors)
        if isinstance(s, (bytes, bytearray)):
            try:
                s = bytes(s).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValidationError(f"tokenizer JSON is not valid UTF-8: {e}") from None
        if not isinstance(s, str):
            raise TypeError(f"s must be a str (tokenizer JSON), got {type(s).__name__}")

        def pairs(kv):
            d = {}
            for k, v in kv:
                if k in d:
                    raise ValidationError(f"tokenizer JSON has duplicate key {k!r}")
                d[k] = v
            return d

        def constant(name):
            raise ValidationError(f"tokenizer JSON contains {name}, which is not JSON")

        try:
            obj = json.loads(s, object_pairs_hook=pairs, parse_constant=constant)
        except (ValueError, RecursionError) as e:
            if isinstance(e, ValidationError):
                raise
            raise ValidationError(f"tokenizer JSON is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValidationError(f"tokenizer JSON must be an object, got {type(obj).__name__}")
        want = {"type", "version", "chars"}
        if set(obj) != want:
            missing = sorted(want - set(obj))
            extra = sorted(set(obj) - want)
            raise ValidationError(f"tokenizer JSON must have exactly the keys {sorted(want)}"
                                  + (f"; missing {missing}" if missing else "")
                                  + (f"; unexpected {extra}" if extra else ""))
        if obj["type"] != _JSON_TYPE or not isinstance(obj["type"], str):
            raise ValidationError(f"tokenizer JSON type must be {_JSON_TYPE!r}, got {obj['type']!r}")
        if type(obj["version"]) is not int or obj["version"] != _JSON_VERSION:
            raise ValidationError(f"tokenizer JSON version must be {_JSON_VERSION}, got "
                                  f"{obj['version']!r} (written by a newer smallmind?)")
        chars = obj["chars"]
        if not isinstance(chars, list):
            raise ValidationError(f"tokenizer JSON chars must be a list, got {type(chars).__name__}")
        try:
            return cls.from_chars(chars, errors=errors)
        except ValidationError as e:
            raise ValidationError(f"tokenizer JSON: {e}") from None
