"""test_safetensors.py - the pickle-free safetensors reader/writer: round trips of every dtype,
the byte layout against the spec (hand-built files) and the reference package when installed,
CheckpointError for every corruption (every truncation, header byte flips, crafted headers),
and atomic writes (failure mid-write leaves the old file and no temporary file)."""
import json
import os
import struct
import threading

import numpy as np
import pytest

from smallmind import safetensors as st
from smallmind.errors import CheckpointError, ValidationError
from smallmind.safetensors import load_file, read_metadata, save_file

try:
    import safetensors.numpy as ref
except ImportError:      # the reference implementation is optional
    ref = None

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8",
          "uint64", "uint32", "uint16", "uint8", "bool"]


def sample(rng, dtype, shape):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        a = rng.standard_normal(shape)
    elif dt.kind == "b":
        a = rng.random(shape) < 0.5
    else:
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return np.asarray(a, dtype=dt).reshape(shape)


def raw_file(header, data=b"", n=None):
    """A safetensors file built by hand: <u64 header length> <header> <data>."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def write(tmp_path, blob, name="t.safetensors"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def parse_header(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return n, json.loads(blob[8:8 + n])


def assert_same(got, want):
    assert set(got) == set(want)
    for k, a in want.items():
        g = got[k]
        assert g.dtype == a.dtype.newbyteorder("=") and g.dtype.isnative, k
        assert g.shape == a.shape, k
        np.testing.assert_array_equal(g, a, err_msg=k)
        assert g.flags.writeable and g.flags.owndata and g.base is None, k


# ---- round trips ---------------------------------------------------------------------------------
def test_round_trip_every_dtype(tmp_path, rng):
    tensors = {}
    for i, d in enumerate(DTYPES):
        tensors[f"{d}.vec"] = sample(rng, d, (5 + i,))
        tensors[f"{d}.mat"] = sample(rng, d, (3, 4, 2))
        tensors[f"{d}.scalar"] = sample(rng, d, ())
        tensors[f"{d}.empty"] = sample(rng, d, (0,))
        tensors[f"{d}.empty3"] = sample(rng, d, (2, 0, 3))
    tensors["f32.nan_inf"] = np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)
    p = tmp_path / "all.safetensors"
    save_file(tensors, p)
    got, meta = load_file(p)
    assert meta == {}
    assert_same(got, tensors)
    assert np.signbit(got["f32.nan_inf"][3])
    assert read_metadata(str(p)) == {}


def test_round_trip_non_contiguous_and_big_endian(tmp_path, rng):
    base = rng.standard_normal((6, 8))
    tensors = {
        "t": base.T,                                  # F-order
        "s": base[::2, 1::3].astype(np.float32),      # strided
        "be32": base.astype(">f4"),
        "bei64": np.arange(7, dtype=">i8"),
        "beu16": np.arange(5, dtype=">u2") * 1000,
        "neg": np.flip(np.arange(10, dtype=np.int16)),
        "ro": np.broadcast_to(np.arange(3, dtype=np.uint8), (4, 3)),   # read-only, 0-stride
        "intc": np.arange(4, dtype=np.intc), "longlong": np.arange(4, dtype=np.longlong),
    }
    p = tmp_path / "nc.safetensors"
    save_file(tensors, p)
    got, _ = load_file(p)
    assert_same(got, tensors)
    assert got["be32"].dtype == np.float32


def test_metadata_round_trip(tmp_path):
    meta = {"config": json.dumps({"n_layer": 2}), "é漢😀": "line\nbreak \"quoted\" \\ \x00 \x1f",
            "": "empty key", "z": ""}
    p = tmp_path / "m.safetensors"
    save_file({"w": np.ones(3, np.float32)}, p, metadata=meta)
    got, m = load_file(p)
    assert m == meta and read_metadata(p) == meta
    save_file({}, p, metadata={"only": "metadata"})
    assert load_file(p) == ({}, {"only": "metadata"})
    save_file({}, p)
    assert load_file(p) == ({}, {})
    assert p.read_bytes() == raw_file(b"{}      ")


def test_layout_follows_reference_order_and_alignment(tmp_path, rng):
    tensors = {"b": sample(rng, "uint8", (3,)), "a": sample(rng, "float64", (2,)),
               "c": sample(rng, "float16", ()), "aa": sample(rng, "int32", (0,)),
               "x": sample(rng, "bool", (5,)), "y": sample(rng, "float32", (3,))}
    p = tmp_path / "l.safetensors"
    save_file(tensors, p, metadata={"k": "v"})
    blob = p.read_bytes()
    n, header = parse_header(blob)
    assert n % 8 == 0 and blob[8:8 + n].endswith(b"}" + b" " * (n - len(blob[8:8 + n].rstrip())))
    assert list(header) == ["__metadata__", "a", "y", "aa", "c", "b", "x"]
    offsets = [header[k]["data_offsets"] for k in list(header)[1:]]
    assert offsets == [[0, 16], [16, 28], [28, 28], [28, 30], [30, 33], [33, 38]]
    for k in list(header)[1:]:
        assert header[k]["data_offsets"][0] % tensors[k].dtype.itemsize == 0
    assert len(blob) == 8 + n + 38
    # The data bytes are the little-endian C-order bytes of each tensor.
    base = 8 + n
    for k in list(header)[1:]:
        b, e = header[k]["data_offsets"]
        assert blob[base + b:base + e] == tensors[k].astype(tensors[k].dtype.newbyteorder("<")).tobytes()


def test_hand_built_file_loads(tmp_path):
    # Written from the format description alone, not by save_file.
    w = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    ids = np.array([-1, 2**40], dtype="<i8")
    flags = np.array([1, 0, 1], dtype=np.uint8).tobytes()
    header = {"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
              "w": {"shape": [2, 3], "data_offsets": [16, 40], "dtype": "F32"},
              "flags": {"dtype": "BOOL", "shape": [3], "data_offsets": [40, 43]},
              "e": {"dtype": "U16", "shape": [0, 4], "data_offsets": [43, 43]},
              "__metadata__": {"format": "pt"}}
    blob = raw_file(json.dumps(header).encode() + b"   ", ids.tobytes() + w.tobytes() + flags)
    got, meta = load_file(write(tmp_path, blob))
    assert meta == {"format": "pt"}
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(got["ids"], ids)
    assert got["flags"].dtype == np.bool_ and got["flags"].tolist() == [True, False, True]
    assert got["e"].shape == (0, 4) and got["e"].dtype == np.uint16


def test_bf16_is_read_as_float32(tmp_path):
    vals = np.array([1.0, -2.5, 3.140625, np.inf, 0.0, -0.0], np.float32)
    bits = (vals.view(np.uint32) >> 16).astype("<u2")          # exact in bfloat16
    blob = raw_file({"b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}, bits.tobytes())
    got, _ = load_file(write(tmp_path, blob))
    assert got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], vals.reshape(2, 3))
    assert np.signbit(got["b"][1, 2])


@pytest.mark.skipif(ref is None, reason="safetensors package not installed")
def test_reference_cross_read(tmp_path, rng):
    tensors = {f"{d}.{i}": sample(rng, d, shape) for d in DTYPES
               for i, shape in enumerate([(3,), (2, 5), (), (0, 2)])}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(tensors, ours, metadata={"format": "np"})
    ref.save_file(tensors, str(theirs), metadata={"format": "np"})
    assert ours.read_bytes() == theirs.read_bytes()             # identical bytes
    back = ref.load_file(str(ours))
    assert set(back) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
        assert back[k].dtype == tensors[k].dtype
    got, meta = load_file(theirs)
    assert meta == {"format": "np"}
    assert_same(got, tensors)
    # Many metadata keys: the reference orders them arbitrarily; the contents still agree.
    many = {f"k{i}": f"v{i}\n" for i in range(20)}
    ref.save_file({"a": np.ones(2)}, str(theirs), metadata=many)
    assert read_metadata(theirs) == many
    from safetensors import safe_open
    save_file({"a": np.ones(2)}, ours, metadata=many)
    with safe_open(str(ours), "np") as f:
        assert f.metadata() == many


# ---- writer validation -----------------------------------------------------------------------
@pytest.mark.parametrize("tensors, meta, exc, match", [
    ([("a", np.ones(1))], None, TypeError, "tensors must be a mapping"),
    ({1: np.ones(1)}, None, TypeError, "tensor names must be str"),
    ({"": np.ones(1)}, None, ValidationError, "non-empty"),
    ({"__metadata__": np.ones(1)}, None, ValidationError, "reserved"),
    ({"a\ud800": np.ones(1)}, None, ValidationError, "lone surrogate"),
    ({"a": [1.0]}, None, TypeError, r"tensors\['a'\] must be a numpy array"),
    ({"a": np.float32(1)}, None, TypeError, r"tensors\['a'\] must be a numpy array"),
    ({"ok": np.ones(1), "c": np.ones(1, np.complex64)}, None, ValidationError, r"tensors\['c'\].*complex64"),
    ({"o": np.array([1, None])}, None, ValidationError, r"tensors\['o'\]"),
    ({"s": np.array(["a"])}, None, ValidationError, r"tensors\['s'\]"),
    ({"d": np.zeros(1, "datetime64[s]")}, None, ValidationError, r"tensors\['d'\]"),
    ({"r": np.zeros(1, [("x", "f4")])}, None, ValidationError, r"tensors\['r'\]"),
    ({"ld": np.zeros(1, np.longdouble)}, None, ValidationError, r"tensors\['ld'\]"),
    ({"a": np.ones(1)}, [("k", "v")], TypeError, "metadata must be a mapping"),
    ({"a": np.ones(1)}, {"k": 1}, TypeError, r"metadata\['k'\] must be str"),
    ({"a": np.ones(1)}, {2: "v"}, TypeError, "metadata keys must be str"),
    ({"a": np.ones(1)}, {"k": "\udc00"}, ValidationError, "lone surrogate"),
])
def test_save_validation(tmp_path, tensors, meta, exc, match):
    p = tmp_path / "v.safetensors"
    with pytest.raises(exc, match=match):
        save_file(tensors, p, metadata=meta)
    assert os.listdir(tmp_path) == []


# ---- reader validation -----------------------------------------------------------------------
GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
DATA = np.array([1.5, -2], "<f4").tobytes()


def entry(**kw):
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    e.update(kw)
    return {"a": e}


CORRUPT = [
    (b"", "shorter than the 8-byte"),
    (b"\x05\x00\x00", "shorter than the 8-byte"),
    (raw_file(b"", b"{}"), "header length is 0"),
    (raw_file(b"{}", n=3), "runs past the end"),
    (raw_file(b"{}", n=2**64 - 1), "over the 100000000-byte limit"),
    (raw_file(b"{}" + b" " * 10, n=100_000_001), "over the 100000000-byte limit"),
    (raw_file(b'{"\xff":1}'), "not valid UTF-8"),
    (raw_file(b"{not json}"), "not valid JSON"),
    (raw_file(b"{}extra"), "not valid JSON"),
    (raw_file(b"[" * 50000 + b"]" * 50000), "not valid JSON"),
    (raw_file(b'{"a": NaN}'), "NaN"),
    (raw_file(b"[]"), "must be a JSON object"),
    (raw_file(b"null"), "must be a JSON object"),
    (raw_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{}}', DATA), "key 'a' twice"),
    (raw_file(b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA), "key 'dtype' twice"),
    (raw_file({"a": [1]}), "entry for tensor 'a' must be an object"),
    (raw_file({"a": {"dtype": "F32", "shape": [2]}}, DATA), r"missing \['data_offsets'\]"),
    (raw_file(entry(extra=1), DATA), r"unexpected \['extra'\]"),
    (raw_file(entry(dtype="F8_E4M3"), DATA), "unsupported dtype 'F8_E4M3'"),
    (raw_file(entry(dtype="f32"), DATA), "unsupported dtype"),
    (raw_file(entry(dtype=5), DATA), "unsupported dtype 5"),
    (raw_file(entry(shape="2"), DATA), "has shape '2'"),
    (raw_file(entry(shape=[-2]), DATA), "has shape"),
    (raw_file(entry(shape=[2.0]), DATA), "has shape"),
    (raw_file(entry(shape=[True, 2]), DATA), "has shape"),
    (raw_file(entry(shape=[1] * 65), DATA), "at most 64"),
    (raw_file(entry(shape=[0, 2**63]), DATA), "has shape"),
    (raw_file(entry(data_offsets=[0]), DATA), "expected \\[begin, end\\]"),
    (raw_file(entry(data_offsets=[0, 8, 8]), DATA), "expected \\[begin, end\\]"),
    (raw_file(entry(data_offsets=[0, 8.0]), DATA), "expected \\[begin, end\\]"),
    (raw_file(entry(data_offsets=[False, 8]), DATA), "expected \\[begin, end\\]"),
    (raw_file(entry(data_offsets={"0": 8}), DATA), "expected \\[begin, end\\]"),
    (raw_file(entry(data_offsets=[8, 0]), DATA), "0 <= begin <= end"),
    (raw_file(entry(data_offsets=[-8, 0]), DATA), "0 <= begin <= end"),
    (raw_file(entry(data_offsets=[0, 16]), DATA + DATA[:4]), "holds only 12 data bytes"),
    (raw_file(GOOD, DATA[:7]), "truncated"),
    (raw_file(entry(shape=[3]), DATA), "spans 8 bytes but shape \\[3\\] of F32 needs 12"),
    (raw_file(entry(shape=[2], dtype="F64"), DATA), "needs 16"),
    (raw_file({"a": GOOD["a"], "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, DATA),
     "overlaps"),
    (raw_file({"a": GOOD["a"], "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, DATA),
     "overlaps"),
    (raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, DATA), "data bytes 0..4"),
    (raw_file(GOOD, DATA + b"\x00"), "data bytes 8..9 after the last tensor"),
    (raw_file({}, b"\x00"), "data bytes 0..1 after the last tensor"),
    (raw_file({"__metadata__": ["x"]}), "__metadata__ must be an object"),
    (raw_file({"__metadata__": {"k": 1}}), r"__metadata__\['k'\] must be a string"),
    (raw_file({"__metadata__": {"k": None}}), r"__metadata__\['k'\] must be a string"),
    (raw_file({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
     "bytes other than 0 and 1"),
    (raw_file({"z": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}),
     "cannot be built"),
]


@pytest.mark.parametrize("blob, match", CORRUPT, ids=[f"c{i}" for i in range(len(CORRUPT))])
def test_corrupt_files_raise_checkpoint_error(tmp_path, blob, match):
    p = write(tmp_path, blob, "bad.safetensors")
    with pytest.raises(CheckpointError, match=match) as ei:
        load_file(p)
    assert str(p) in str(ei.value)
    # read_metadata validates the same header, except the data bytes themselves.
    if "cannot be built" in match or "other than 0 and 1" in match:
        read_metadata(p)
    else:
        with pytest.raises(CheckpointError, match=match):
            read_metadata(p)


def test_missing_file_and_directory(tmp_path):
    for fn in (load_file, read_metadata):
        with pytest.raises(CheckpointError, match="nope.safetensors") as ei:
            fn(tmp_path / "nope.safetensors")
        assert isinstance(ei.value.__cause__, FileNotFoundError)
        with pytest.raises(CheckpointError) as ei:
            fn(tmp_path)
        assert isinstance(ei.value.__cause__, OSError)


def _valid_blob(tmp_path, rng):
    p = tmp_path / "ok.safetensors"
    save_file({"w": sample(rng, "float32", (3, 2)), "b": sample(rng, "bool", (3,)),
               "i": sample(rng, "int64", (2,)), "e": sample(rng, "float16", (0,)),
               "s": sample(rng, "uint8", ())}, p, metadata={"cfg": '{"a": 1}'})
    return p.read_bytes()


def test_every_truncation_raises(tmp_path, rng):
    blob = _valid_blob(tmp_path, rng)
    p = tmp_path / "trunc.safetensors"
    for cut in range(len(blob)):
        p.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError):
            load_file(p)
        with pytest.raises(CheckpointError):
            read_metadata(p)
    p.write_bytes(blob)
    load_file(p)


def test_header_byte_flips_never_escape(tmp_path, rng):
    # A flipped byte may still leave a valid file (a renamed tensor); anything else must be
    # CheckpointError - never another exception type.
    blob = _valid_blob(tmp_path, rng)
    n = struct.unpack("<Q", blob[:8])[0]
    p = tmp_path / "flip.safetensors"
    failures = 0
    for pos in range(8 + n):
        for mask in (0x01, 0x20, 0x80):
            b = bytearray(blob)
            b[pos] ^= mask
            p.write_bytes(bytes(b))
            try:
                load_file(p)
            except CheckpointError:
                failures += 1
    assert failures > 2 * (8 + n)          # nearly every flip is detected


# ---- atomic writes ----------------------------------------------------------------------------
def _old_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"old": np.arange(4, dtype=np.float32)}, p, metadata={"v": "1"})
    return p, p.read_bytes()


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    p, old = _old_file(tmp_path)
    real = st._write_array
    calls = []

    def failing(f, a):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x00" * 5)
            raise OSError(28, "No space left on device")
        real(f, a)

    monkeypatch.setattr(st, "_write_array", failing)
    with pytest.raises(OSError, match="No space"):
        save_file({"a": np.ones(100), "b": np.ones(100), "c": np.ones(3)}, p)
    assert p.read_bytes() == old and os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("where", ["fsync", "replace", "interrupt"])
def test_failure_at_commit_keeps_old_file(tmp_path, monkeypatch, where):
    p, old = _old_file(tmp_path)
    if where == "interrupt":
        def boom(f, a):
            raise KeyboardInterrupt
        monkeypatch.setattr(st, "_write_array", boom)
        exc = KeyboardInterrupt
    else:
        def boom(*a):
            raise OSError(5, f"{where} failed")
        monkeypatch.setattr(st.os, where, boom)
        exc = OSError
    with pytest.raises(exc):
        save_file({"new": np.ones(3, np.float32)}, p)
    monkeypatch.undo()
    assert p.read_bytes() == old and os.listdir(tmp_path) == ["model.safetensors"]
    assert load_file(p)[1] == {"v": "1"}


def test_success_leaves_no_temp_and_overwrites(tmp_path):
    p, _ = _old_file(tmp_path)
    save_file({"new": np.ones(3, np.float32)}, str(p), metadata={"v": "2"})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    got, meta = load_file(p)
    assert list(got) == ["new"] and meta == {"v": "2"}
    with pytest.raises(OSError):
        save_file({"a": np.ones(1)}, tmp_path / "missing_dir" / "x.safetensors")
    with pytest.raises(OSError):
        save_file({"a": np.ones(1)}, tmp_path)            # a directory as the target
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_file({"a": np.ones(1)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_concurrent_saves(tmp_path):
    # 8 threads writing the same path: every write is whole, the survivor is one of them.
    p = tmp_path / "same.safetensors"
    payloads = [{"w": np.full((50, 40), k, np.float32), "k": np.array(k)} for k in range(8)]
    barrier = threading.Barrier(8)
    errors = []

    def work(k):
        try:
            barrier.wait()
            for _ in range(3):
                save_file(payloads[k], p, metadata={"k": str(k)})
                save_file(payloads[k], tmp_path / f"own{k}.safetensors")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got, meta = load_file(p)
    k = int(meta["k"])
    assert_same(got, payloads[k])
    for k in range(8):
        assert_same(load_file(tmp_path / f"own{k}.safetensors")[0], payloads[k])
    assert sorted(os.listdir(tmp_path)) == sorted(["same.safetensors"] + [f"own{k}.safetensors" for k in range(8)])
