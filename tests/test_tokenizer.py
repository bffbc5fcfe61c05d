"""test_tokenizer.py - the character-level Tokenizer: ids, round trips (unicode, astral, NUL),
both encode paths against an independent dict reference, the unknown-character policy,
decode validation, immutability, concurrent use, and JSON serialisation."""
import copy
import json
import os
import pickle
import threading
import warnings

import numpy as np
import pytest

from smallmind.errors import ValidationError
from smallmind.model.tokenizer import Tokenizer, UnknownCharacterWarning

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
WEIRD = "a\x00\nZ \t\"\\é漢字\u2028\ud7ff\ue000\uffff😀𝄞\U0010ffff"


def ref_ids(vocab_text, s):
    """Independent reference: a dict over sorted unique characters."""
    idx = {c: i for i, c in enumerate(sorted(set(vocab_text)))}
    return [idx[c] for c in s]


def random_text(rng, pool, n):
    return "".join(rng.choice(list(pool), size=n))


def both(tok, s, **kw):
    """encode and encode_array must agree; returns the list."""
    a = tok.encode(s, **kw)
    b = tok.encode_array(s, **kw)
    assert isinstance(a, list) and all(type(i) is int for i in a)
    assert b.dtype == np.int32 and b.ndim == 1 and b.flags.c_contiguous and b.flags.writeable
    assert a == b.tolist()
    return a


# ---- vocabulary and ids ---------------------------------------------------------------------
def test_sorted_ids_and_properties():
    tok = Tokenizer("hello world")
    assert tok.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert tok.vocab_size == len(tok) == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.errors == "skip"
    assert "h" in tok and "x" not in tok and "he" not in tok and 1 not in tok and None not in tok


def test_vocab_sorted_by_code_point():
    tok = Tokenizer(WEIRD)
    assert list(tok.chars) == sorted(set(WEIRD), key=ord)
    assert tok.chars[0] == "\x00" and tok.chars[-1] == "\U0010ffff"


@pytest.mark.parametrize("reps", [1, 1000])      # short (list) and long (array) encode paths
def test_round_trip_unicode(reps):
    s = WEIRD * reps
    tok = Tokenizer(WEIRD)
    ids = both(tok, s)
    assert ids == ref_ids(WEIRD, s)
    assert tok.decode(ids) == s
    assert tok.decode(tuple(ids)) == s
    assert tok.decode(np.array(ids)) == s
    assert tok.encode("") == [] and tok.encode_array("").shape == (0,)
    assert tok.decode([]) == "" and tok.decode(np.zeros(0, np.int64)) == ""


@pytest.mark.parametrize("pool", [
    "abc\n",
    [chr(c) for c in range(0, 0x3000, 7)],                       # wide BMP table
    ["😀", "𝄞", "\U0010ffff", "\U00010000"],                     # astral only: no table entries
    ["a", "\uffff", "\U00010000", "😀", "\x00", "\U0010fffe"],     # table edge and astral mixed
])
def test_random_text_matches_reference(rng, pool):
    for n in (1, 5, 255, 256, 3000):
        s = random_text(rng, pool, n)
        tok = Tokenizer(s)
        ids = both(tok, s)
        assert ids == ref_ids(s, s)
        assert tok.decode(ids) == s
        assert tok.decode(np.asarray(ids, np.int32)) == s


def test_astral_unknowns_next_to_known_astral(rng):
    # Code points between / beyond the known astral ones must not borrow a neighbour's id.
    tok = Tokenizer("a😀𝄞")
    s = "a😀\U0001f601𝄞\U0001d11d\U0010ffff\U00010000a"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = both(tok, s)
    assert ids == ref_ids("a😀𝄞", "a😀𝄞a")
    assert len(w) == 2   # one per call (encode, encode_array)


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="tinyshakespeare not present")
def test_tinyshakespeare():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer(text)
    assert tok.vocab_size == len(set(text)) == 65
    ids = both(tok, text)
    assert ids == ref_ids(text, text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_array(text)) == text


# ---- unknown characters -------------------------------------------------------------------------
@pytest.mark.parametrize("reps", [1, 200])
@pytest.mark.parametrize("method", ["encode", "encode_array"])
def test_skip_warns_once_and_drops_exactly_unknowns(reps, method):
    tok = Tokenizer("abc ")
    s = ("ab?c x\ud800é a" * reps)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = getattr(tok, method)(s)
    out = list(out)
    assert out == ref_ids("abc ", "".join(c for c in s if c in "abc "))
    assert len(w) == 1
    assert w[0].category is UnknownCharacterWarning
    assert w[0].filename == __file__          # points at the caller
    msg = str(w[0].message)
    assert f"skipped {4 * reps} unknown characters (4 distinct" in msg
    for c in "?x\ud800é":
        assert repr(c) in msg


def test_skip_lists_at_most_ten():
    tok = Tokenizer("a")
    unknown = "".join(chr(0x100 + i) for i in range(25))
    for s in (unknown, unknown * 20):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert tok.encode("a" + s + "a") == [0, 0]
        assert len(w) == 1
        msg = str(w[0].message)
        assert "and 15 more" in msg
        assert repr(chr(0x100)) in msg and repr(chr(0x109)) in msg and repr(chr(0x10A)) not in msg


def test_no_warning_when_all_known():
    tok = Tokenizer("abc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode("cab" * 300) == [2, 0, 1] * 300
        assert tok.encode_array("cab").tolist() == [2, 0, 1]


@pytest.mark.parametrize("method", ["encode", "encode_array"])
@pytest.mark.parametrize("n", [3, 1000])
def test_strict_names_char_and_position(method, n):
    s = "a" * n + "☃" + "é"
    for tok, kw in ((Tokenizer("a", errors="strict"), {}), (Tokenizer("a"), {"errors": "strict"})):
        with pytest.raises(ValidationError, match=rf"'☃' \(U\+2603\) at position {n}"):
            getattr(tok, method)(s, **kw)
    # A strict tokenizer can still skip per call.
    with pytest.warns(UnknownCharacterWarning):
        assert list(getattr(Tokenizer("a", errors="strict"), method)(s, errors="skip")) == [0] * n


def test_strict_lone_surrogate_in_input():
    with pytest.raises(ValidationError, match=r"'\\ud800' \(U\+D800\) at position 1"):
        Tokenizer("ab").encode_array("a\ud800b", errors="strict")


def test_errors_argument_validated():
    for bad in ("ignore", "", None, 1, b"skip"):
        if bad is not None:
            with pytest.raises(ValidationError, match="errors"):
                Tokenizer("a", errors=bad)
            with pytest.raises(ValidationError, match="errors"):
                Tokenizer("a").encode("a", errors=bad)
            with pytest.raises(ValidationError, match="errors"):
                Tokenizer("a").encode_array("a", errors=bad)
            with pytest.raises(ValidationError, match="errors"):
                Tokenizer.from_chars("a", errors=bad)
    assert Tokenizer("a").encode("a", errors=None) == [0]


def test_encode_rejects_non_str():
    tok = Tokenizer("a")
    for bad in (b"a", ["a"], None, 1):
        with pytest.raises(TypeError, match="s must be a str"):
            tok.encode(bad)
        with pytest.raises(TypeError, match="s must be a str"):
            tok.encode_array(bad)


# ---- construction ---------------------------------------------------------------------------------
def test_constructor_validation():
    with pytest.raises(TypeError, match="text"):
        Tokenizer(b"abc")
    with pytest.raises(TypeError, match="text"):
        Tokenizer(["a"])
    with pytest.raises(ValidationError, match="text"):
        Tokenizer("")
    with pytest.raises(ValidationError, match=r"text contains a lone surrogate '\\udc80' at position 2"):
        Tokenizer("ab\udc80c\ud800")


def test_from_chars_keeps_order():
    tok = Tokenizer.from_chars("cba\x00")
    assert tok.chars == ("c", "b", "a", "\x00")
    assert tok.encode("abc\x00") == [2, 1, 0, 3]
    assert tok.encode_array("abc\x00" * 100).tolist() == [2, 1, 0, 3] * 100
    assert tok.decode([0, 1, 2, 3]) == "cba\x00"
    assert Tokenizer.from_chars(["😀", "a"]).encode("a😀") == [1, 0]
    assert Tokenizer.from_chars(Tokenizer("hello").chars) == Tokenizer("hello")


@pytest.mark.parametrize("bad, exc, match", [
    ("", ValidationError, "non-empty"),
    ([], ValidationError, "non-empty"),
    (["a", "bc"], ValidationError, r"chars\[1\] must be a single character"),
    (["a", ""], ValidationError, r"chars\[1\] must be a single character"),
    (["a", 1], ValidationError, r"chars\[1\] must be a single character"),
    (["a", "b", "a"], ValidationError, r"chars\[2\] = 'a' repeats chars\[0\]"),
    ("aba", ValidationError, "repeats"),
    (["a", "\udfff"], ValidationError, r"chars\[1\] is a lone surrogate"),
    ({"a", "b"}, TypeError, "chars"),
    (None, TypeError, "chars"),
])
def test_from_chars_validation(bad, exc, match):
    with pytest.raises(exc, match=match):
        Tokenizer.from_chars(bad)


# ---- decode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32",
                                   "int64", "uint64", ">i4", ">u8"])
def test_decode_any_int_dtype(dtype):
    tok = Tokenizer("abcdef")
    ids = np.array([5, 0, 3, 3], dtype=dtype)
    assert tok.decode(ids) == "fadd"
    assert tok.decode(ids[::-2]) == "da"           # non-contiguous view: [3, 0]
    assert tok.decode(list(ids)) == "fadd"          # list of numpy scalars


def test_decode_out_of_range_names_position_and_value():
    tok = Tokenizer("abc")
    cases = [[0, 1, 3], [0, -1, 2], [2, 2, 2, 10**30], (1, 3)]
    for ids in cases:
        pos = next(p for p, v in enumerate(ids) if not 0 <= v < 3)
        with pytest.raises(ValidationError, match=rf"ids\[{pos}\] = {ids[pos]} is out of range"):
            tok.decode(ids)
    for ids in ([0, 1, 3], [0, -1, 2]):
        for dt in ("int64", "int8", "int32"):
            pos = next(p for p, v in enumerate(ids) if not 0 <= v < 3)
            with pytest.raises(ValidationError, match=rf"ids\[{pos}\] = {ids[pos]} is out of range"):
                tok.decode(np.array(ids, dtype=dt))
    with pytest.raises(ValidationError, match=r"ids\[1\] = 300 is out of range"):
        tok.decode(np.array([1, 300], np.uint16))
    with pytest.raises(ValidationError, match=r"ids\[0\] = 18446744073709551615"):
        tok.decode(np.array([2**64 - 1], np.uint64))
    with pytest.raises(ValidationError, match=r"ids\[1\] = 3 is out of range"):
        tok.decode([np.int64(1), np.int64(3)])
    for big in ([np.uint64(2**64 - 1)], [2**63], [-2**63 - 1], [1, np.uint64(2**63)]):
        with pytest.raises(ValidationError, match=rf"ids\[{len(big) - 1}\] = {int(big[-1])} is out"):
            tok.decode(big)


@pytest.mark.parametrize("ids, match", [
    ([0, True], r"ids\[1\] must be an integer id, got True"),
    ([False], r"ids\[0\] must be an integer id"),
    ([0, 1.0], r"ids\[1\] must be an integer id, got 1.0"),
    ([np.bool_(True)], r"ids\[0\] must be an integer id"),
    ([0, np.float32(1)], r"ids\[1\] must be an integer id"),
    ([0, "a"], r"ids\[1\] must be an integer id"),
    ([0, None], r"ids\[1\] must be an integer id"),
])
def test_decode_rejects_non_integers(ids, match):
    with pytest.raises(ValidationError, match=match):
        Tokenizer("abc").decode(ids)


def test_decode_container_and_array_checks():
    tok = Tokenizer("abc")
    for bad in ("abc", {0, 1}, iter([0]), 0, None, b"\x00"):
        with pytest.raises(TypeError, match="ids"):
            tok.decode(bad)
    for arr in (np.array([True, False]), np.array([0.0, 1.0]), np.array(["a"])):
        with pytest.raises(TypeError, match="ids must be an integer array"):
            tok.decode(arr)
    with pytest.raises(ValidationError, match=r"ids must be 1-D"):
        tok.decode(np.zeros((2, 2), np.int64))
    with pytest.raises(ValidationError, match=r"ids must be 1-D"):
        tok.decode(np.array(1))


# ---- immutability, equality, copying -------------------------------------------------------------
def test_immutable():
    tok = Tokenizer("abc")
    for name in ("vocab_size", "chars", "_chars", "_index", "_table", "x", "errors"):
        with pytest.raises(AttributeError):
            setattr(tok, name, 1)
        with pytest.raises(AttributeError):
            delattr(tok, name)
    assert not hasattr(tok, "__dict__")
    assert isinstance(tok.chars, tuple)
    for arr in (tok._cps, tok._table, tok._astral_cps, tok._astral_ids):
        assert not arr.flags.writeable
    assert tok.encode("cab") == [2, 0, 1]


def test_eq_hash_repr():
    a, b = Tokenizer("abc"), Tokenizer("cabbac")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a == Tokenizer("abc", errors="strict")          # the policy is not vocabulary
    assert a != Tokenizer.from_chars("cba") and a != Tokenizer("abcd")
    assert a != "abc" and a != ("a", "b", "c")
    big = Tokenizer("".join(chr(c) for c in range(32, 2000)))
    r = repr(big)
    assert r.startswith("Tokenizer(vocab_size=1968") and len(r) < 100 and "..." in r
    assert repr(a) == "Tokenizer(vocab_size=3, chars='abc')"


def test_copy_and_pickle():
    tok = Tokenizer(WEIRD, errors="strict")
    assert copy.copy(tok) is tok and copy.deepcopy(tok) is tok
    back = pickle.loads(pickle.dumps(tok))
    assert back == tok and back.errors == "strict" and back.chars == tok.chars
    assert back.encode(WEIRD) == tok.encode(WEIRD)


# ---- threads ------------------------------------------------------------------------------------
def test_eight_threads_equal_serial(rng):
    pool = list("abcdefgh \n") + ["é", "😀", "\x00"]
    tok = Tokenizer("".join(pool))
    texts = [random_text(rng, pool, n) for n in (10, 300, 5000, 20000) for _ in range(2)]
    serial = [(tok.encode(t), tok.encode_array(t).tolist(), tok.decode(tok.encode_array(t)))
              for t in texts]
    barrier = threading.Barrier(8)
    results = [None] * 8
    errors = []

    def work(k):
        try:
            barrier.wait()
            out = []
            for _rep in range(5):
                for t in texts[k:] + texts[:k]:
                    out.append((t, tok.encode(t), tok.encode_array(t).tolist(),
                                tok.decode(tok.encode_array(t)), tok.decode(tok.encode(t))))
            results[k] = out
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ref = {t: s for t, s in zip(texts, serial)}
    for out in results:
        assert len(out) == 5 * len(texts)
        for t, a, b, d1, d2 in out:
            assert (a, b, d1) == ref[t] and d2 == t


# ---- JSON -----------------------------------------------------------------------------------------
def test_json_round_trip():
    for tok in (Tokenizer(WEIRD), Tokenizer.from_chars("zyx\x00\u2028😀")):
        s = tok.to_json()
        assert s.isascii()
        obj = json.loads(s)
        assert obj == {"type": "char", "version": 1, "chars": list(tok.chars)}
        back = Tokenizer.from_json(s)
        assert back == tok and back.chars == tok.chars
        assert Tokenizer.from_json(s.encode()) == tok
        assert Tokenizer.from_json(s, errors="strict").errors == "strict"
    # Non-ASCII JSON written by someone else reads too.
    assert Tokenizer.from_json('{"type":"char","version":1,"chars":["é","a"]}').chars == ("é", "a")


@pytest.mark.parametrize("text, match", [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ("[" * 100000, "not valid JSON"),
    ('["a"]', "must be an object"),
    ('"abc"', "must be an object"),
    ('{"type":"char","version":1,"chars":["a"],"chars":["b"]}', "duplicate key 'chars'"),
    ('{"type":"char","version":1}', r"missing \['chars'\]"),
    ('{"type":"char","version":1,"chars":["a"],"extra":1}', r"unexpected \['extra'\]"),
    ('{"type":"bpe","version":1,"chars":["a"]}', "type must be 'char'"),
    ('{"type":["char"],"version":1,"chars":["a"]}', "type must be 'char'"),
    ('{"type":"char","version":2,"chars":["a"]}', "version must be 1"),
    ('{"type":"char","version":"1","chars":["a"]}', "version must be 1"),
    ('{"type":"char","version":true,"chars":["a"]}', "version must be 1"),
    ('{"type":"char","version":1.0,"chars":["a"]}', "version must be 1"),
    ('{"type":"char","version":NaN,"chars":["a"]}', "NaN"),
    ('{"type":"char","version":1,"chars":"ab"}', "chars must be a list"),
    ('{"type":"char","version":1,"chars":[]}', "non-empty"),
    ('{"type":"char","version":1,"chars":["a","bc"]}', r"chars\[1\] must be a single character"),
    ('{"type":"char","version":1,"chars":["a",1]}', r"chars\[1\] must be a single character"),
    ('{"type":"char","version":1,"chars":["a","a"]}', "repeats"),
    ('{"type":"char","version":1,"chars":["a","\\ud800"]}', "lone surrogate"),
    (b'{"type":"char","version":1,"chars":["\xff"]}', "not valid UTF-8"),
])
def test_from_json_validation(text, match):
    with pytest.raises(ValidationError, match=match):
        Tokenizer.from_json(text)


def test_from_json_type_errors():
    for bad in (None, 1, {"type": "char"}):
        with pytest.raises(TypeError):
            Tokenizer.from_json(bad)
    with pytest.raises(ValidationError, match="errors"):
        Tokenizer.from_json(Tokenizer("a").to_json(), errors="nope")
