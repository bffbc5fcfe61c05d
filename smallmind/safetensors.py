"""safetensors.py - read and write the safetensors format with numpy alone (no pickle, no
`safetensors` package).

Format (Hugging Face): 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping
tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data section
that follows the header) plus an optional "__metadata__" object of str -> str; tensors are
little-endian, C order, and tile the data section exactly. The writer lays tensors out as the
reference implementation does (dtype by decreasing alignment, then name, header padded with
spaces to 8 bytes), so every tensor is aligned to its item size and, with at most one metadata
key, the bytes equal the reference's. The reader validates every field and raises
CheckpointError, naming the file, for anything a corrupt or hostile file can hold.

load_file reads the file once and copies each tensor out; read_into streams a file tensor by
tensor into arrays the caller gives (Hugging Face weights into a model's parameter block). Left
out: memory mapping, and the 8-bit / 4-bit float dtypes numpy cannot hold. numpy has no bfloat16:
load_file widens BF16 exactly to float32, load_typed keeps its bits as uint16 (with each tensor's
file dtype), and save_file writes the uint16 arrays its `bf16` argument names as BF16.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sys
import threading
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError, ValidationError

__all__ = ["save_file", "load_file", "load_typed", "read_into", "read_metadata", "MAX_HEADER_SIZE"]

MAX_HEADER_SIZE = 100_000_000      # the reference's limit on the JSON header

# safetensors dtype -> numpy dtype (little-endian). The rank is the position in the reference's
# Dtype enum; it writes tensors in decreasing rank (which is decreasing alignment), then by name.
_DTYPES = {
    "BOOL": ("|b1", 0), "U8": ("|u1", 1), "I8": ("|i1", 2), "I16": ("<i2", 3),
    "U16": ("<u2", 4), "F16": ("<f2", 5), "BF16": ("<u2", 6), "I32": ("<i4", 7),
    "U32": ("<u4", 8), "F32": ("<f4", 9), "F64": ("<f8", 10), "I64": ("<i8", 11),
    "U64": ("<u8", 12),
}
_NP_TO_ST = {np.dtype(v[0]): k for k, v in _DTYPES.items() if k != "BF16"}
_ITEMSIZE = {k: (2 if k == "BF16" else np.dtype(v[0]).itemsize) for k, v in _DTYPES.items()}
_MAX_NDIM = 64                     # numpy's limit on dimensions
_MAX_DIM = 2**63 - 1


# ---- writing ---------------------------------------------------------------------------------
def _st_dtype(name, a):
    # Byte order is not part of the type: a big-endian array is written little-endian.
    dt = a.dtype
    st = _NP_TO_ST.get(dt.newbyteorder("<")) if dt.fields is None and dt.subdtype is None else None
    if st is None:
        raise ValidationError(
            f"tensors[{name!r}] has dtype {dt}, which safetensors cannot store here "
            "(supported: float64, float32, float16, int64, int32, int16, int8, uint64, uint32, "
            "uint16, uint8, bool)")
    return st


def _check_utf8(s, what):
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} contains a lone surrogate and cannot be written as UTF-8") from None


def _build_header(tensors, metadata, bf16=frozenset()):
    """Validate the inputs; return (header bytes, [(name, array)] in file order)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str -> numpy array, got {type(tensors).__name__}")
    for name in bf16:
        if name not in tensors:
            raise ValidationError(f"bf16 names {name!r}, which is not one of the tensors")
    entries = []
    for name, a in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
        if not name:
            raise ValidationError("tensor names must be non-empty")
        if name == "__metadata__":
            raise ValidationError("'__metadata__' is reserved and cannot name a tensor")
        _check_utf8(name, f"tensor name {name!r}")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensors[{name!r}] must be a numpy array, got {type(a).__name__}")
        st = _st_dtype(name, a)
        if name in bf16:
            if st != "U16":
                raise ValidationError(f"tensors[{name!r}] is listed in bf16, so it must hold the "
                                      f"bfloat16 bits as uint16; got {a.dtype}")
            st = "BF16"
        entries.append((-_DTYPES[st][1], name, st, a))
    meta = None
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of str -> str or None, got {type(metadata).__name__}")
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata keys must be str, got {k!r} ({type(k).__name__})")
            if not isinstance(v, str):
                raise TypeError(f"metadata[{k!r}] must be str, got {type(v).__name__}")
            _check_utf8(k, f"metadata key {k!r}")
            _check_utf8(v, f"metadata[{k!r}]")
            meta[str(k)] = str(v)
    entries.sort(key=lambda e: (e[0], e[1]))
    header = {}
    if meta is not None:
        header["__metadata__"] = {k: meta[k] for k in sorted(meta)}
    offset = 0
    order = []
    for _, name, st, a in entries:
        nbytes = a.size * a.dtype.itemsize
        header[name] = {"dtype": st, "shape": [int(d) for d in a.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append((name, a))
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)      # data section starts 8-byte aligned
    if len(raw) > MAX_HEADER_SIZE:
        raise ValidationError(f"the safetensors header would be {len(raw)} bytes, over the "
                              f"{MAX_HEADER_SIZE}-byte limit readers enforce (too many tensors or metadata)")
    return len(raw).to_bytes(8, "little") + raw, order


def _write_array(f, a):
    # One tensor at a time: a contiguous little-endian array is written from its own memory;
    # anything else (strided, big-endian) is converted first, costing one tensor's copy at most.
    if a.size == 0:
        return
    f.write(_le_contiguous(a).reshape(-1).view(np.uint8).data)


def _fsync_dir(directory):
    if not hasattr(os, "O_DIRECTORY"):
        return                          # Windows: directories cannot be opened for fsync
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


CHECKSUM_KEY = "smallmind.sha256"


def _digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _metadata_digest(meta) -> str:
    """The checksum of a metadata dict (its checksum entry left out), independent of key order."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    return _digest(json.dumps(body, sort_keys=True, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8"))


def _le_contiguous(a):
    """The array as the file stores it: C order, little-endian (a copy only when it is not)."""
    le = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
    return np.ascontiguousarray(a, dtype=le)


def _with_checksums(tensors, metadata):
    """metadata plus CHECKSUM_KEY: the SHA-256 of the other metadata and of each tensor's bytes,
    so an edit or bit rot anywhere in the file is refused on load."""
    if not isinstance(tensors, Mapping) or not (metadata is None or isinstance(metadata, Mapping)):
        return metadata                      # _build_header names what is wrong
    meta = dict(metadata or {})
    sums = {}
    for name, a in tensors.items():
        if isinstance(a, np.ndarray) and isinstance(name, str):
            sums[name] = _digest(_le_contiguous(a).reshape(-1).view(np.uint8).data)
    try:
        meta_sum = _metadata_digest(meta)
    except (TypeError, ValueError):
        return metadata                      # not str -> str: _build_header says so
    meta[CHECKSUM_KEY] = json.dumps({"metadata": meta_sum, "tensors": sums}, sort_keys=True)
    return meta


def _verify(path, metadata, buf=None, base=0, infos=None):
    """Check (and remove) the checksum entry of a file's metadata; with the data (buf, base,
    infos), each tensor's too. A file without the entry (written elsewhere) passes as it is."""
    raw = metadata.pop(CHECKSUM_KEY, None)
    if raw is None:
        return
    try:
        sums = json.loads(raw)
        meta_sum, tensor_sums = sums["metadata"], sums["tensors"]
        if not isinstance(tensor_sums, dict):
            raise TypeError("tensors is not an object")
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise _fail(path, f"its checksum entry is malformed ({e})") from None
    if meta_sum != _metadata_digest(metadata):
        raise _fail(path, "its metadata does not match their checksum (the file was edited or "
                          "is corrupted)")
    if infos is None:
        return
    if set(tensor_sums) != set(infos):
        raise _fail(path, "its tensors are not those its checksums were made for")
    view = memoryview(buf)
    for name, (_, _, begin, end) in infos.items():
        if tensor_sums[name] != _digest(view[base + begin:base + end]):
            raise _fail(path, f"tensor {name!r} does not match its checksum (the file was "
                              f"edited or is corrupted)")


def _verify_default(verify):
    if verify is None:
        return os.environ.get("SMALLMIND_VERIFY_CHECKSUMS", "1").strip().lower() not in (
            "0", "false", "no", "off")
    return bool(verify)


def save_file(tensors, path, metadata=None, *, checksums: bool = False, bf16=()) -> None:
    """Write ``tensors`` (a mapping of name -> numpy array) and optional ``metadata`` (str ->
    str) to ``path`` in safetensors format, atomically: the data goes to a temporary file
    (".<name>.<pid>.<thread>.<random>.tmp") in the same directory, is flushed and fsync'ed,
    then renamed over ``path`` and the directory fsync'ed. On any failure the temporary file is
    removed and an existing ``path`` is left as it was.

    With ``checksums``, the metadata also carries the SHA-256 of the rest of the metadata and
    of every tensor's bytes (key ``smallmind.sha256``), verified by load_file: smallmind's
    checkpoints and index files are written so.

    ``bf16``: names of uint16 tensors that hold bfloat16 bits, written with dtype BF16 (what
    PyTorch and the ``safetensors`` package read as bfloat16).

    Raises TypeError / smallmind.ValidationError (naming the tensor or key) for bad inputs
    before touching the disk, and OSError for file-system failures.
    """
    if isinstance(bf16, str):
        raise TypeError("bf16 must be a collection of tensor names, not one str")
    bf16 = frozenset(bf16)
    if checksums:
        metadata = _with_checksums(tensors, metadata)
    header, order = _build_header(tensors, metadata, bf16)
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{threading.get_ident()}."
                                  f"{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber a stranger's file; 0o666 lets the umask decide, like open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for _, a in order:
                _write_array(f, a)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


_TMP_NAME = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)\.\d+\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(directory) -> list:
    """Delete the temporary files save_file left in `directory` when its process was killed
    mid-write (kill -9, power loss): names of save_file's pattern whose writer process no longer
    runs. A live writer's file is never touched. Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:        # gone already (another cleaner) or not ours to remove
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    # On Windows os.kill(pid, 0) would terminate the process: never probe there.
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True            # exists but not ours, or cannot tell: leave its file alone
    return True


# ---- reading ---------------------------------------------------------------------------------
def _fail(path, what):
    return CheckpointError(f"{path!r} is not a valid safetensors file: {what}")


def _is_json_int(v):
    # a JSON integer exactly (json.loads gives int; bool is excluded by the type test)
    return type(v) is int


def _parse_header(path, raw, data_size):
    """Validate the header bytes; return ({name: (st_dtype, shape, begin, end)}, metadata)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(path, f"the header is not valid UTF-8 ({err})") from None

    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                raise _fail(path, f"the header has the key {k!r} twice")
            d[k] = v
        return d

    def constant(name):
        raise _fail(path, f"the header contains {name}, which is not JSON")

    try:
        header = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as err:
        raise _fail(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the header must be a JSON object, got {type(header).__name__}")

    metadata = {}
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise _fail(path, f"__metadata__ must be an object, got {type(meta).__name__}")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise _fail(path, f"__metadata__[{k!r}] must be a string, got {type(v).__name__}")
        metadata = meta

    infos = {}
    for name, e in header.items():
        if not isinstance(e, dict):
            raise _fail(path, f"the entry for tensor {name!r} must be an object, got {type(e).__name__}")
        keys = set(e)
        if keys != {"dtype", "shape", "data_offsets"}:
            missing = sorted({"dtype", "shape", "data_offsets"} - keys)
            extra = sorted(keys - {"dtype", "shape", "data_offsets"})
            raise _fail(path, f"tensor {name!r} must have exactly the keys dtype, shape, data_offsets"
                        + (f"; missing {missing}" if missing else "")
                        + (f"; unexpected {extra}" if extra else ""))
        st = e["dtype"]
        if not isinstance(st, str) or st not in _DTYPES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {st!r} "
                        f"(supported: {', '.join(sorted(_DTYPES))})")
        shape = e["shape"]
        if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
                or not all(_is_json_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}; a shape is a list of at most "
                        f"{_MAX_NDIM} non-negative integers")
        offs = e["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_json_int, offs))):
            raise _fail(path, f"tensor {name!r} has data_offsets {offs!r}; expected [begin, end] integers")
        begin, end = offs
        if not 0 <= begin <= end:
            raise _fail(path, f"tensor {name!r} has data_offsets {offs!r}; need 0 <= begin <= end")
        if end > data_size:
            raise _fail(path, f"tensor {name!r} ends at byte {end} of the data section but the file "
                        f"holds only {data_size} data bytes (truncated?)")
        nbytes = math.prod(shape) * _ITEMSIZE[st]
        if end - begin != nbytes:
            raise _fail(path, f"tensor {name!r} spans {end - begin} bytes but shape {shape} of {st} "
                        f"needs {nbytes}")
        infos[name] = (st, tuple(shape), begin, end)

    # The tensors must tile the data section: no overlap, no gap, nothing after the last.
    at = 0
    for name, (_, _, begin, end) in sorted(infos.items(), key=lambda kv: (kv[1][2], kv[1][3], kv[0])):
        if begin != at:
            if begin < at:
                raise _fail(path, f"tensor {name!r} (bytes {begin}..{end}) overlaps another tensor")
            raise _fail(path, f"data bytes {at}..{begin} before tensor {name!r} belong to no tensor")
        at = end
    if at != data_size:
        raise _fail(path, f"data bytes {at}..{data_size} after the last tensor belong to no tensor")
    return infos, metadata


def _header_length(path, prefix, file_size):
    if len(prefix) < 8:
        raise _fail(path, f"the file is {file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(prefix[:8], "little")
    if n == 0:
        raise _fail(path, "the header length is 0")
    if n > MAX_HEADER_SIZE:
        raise _fail(path, f"the header length {n} is over the {MAX_HEADER_SIZE}-byte limit")
    if 8 + n > file_size:
        raise _fail(path, f"the header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    return n


def _open(path):
    path = os.fspath(path)
    try:
        return open(path, "rb"), path
    except OSError as e:
        raise CheckpointError(f"cannot open safetensors file {path!r}: {e}") from e


def read_into(path, fill) -> dict:
    """Read a safetensors file tensor by tensor, never holding the whole file: the header is
    validated as load_file does, then, in file order, fill(name, dtype, shape) names where each
    tensor goes - a writable C-contiguous float32 array of that shape - or None to skip it.
    F32 data is read straight into the array; F16 and BF16 are read and widened exactly. Other
    dtypes raise CheckpointError naming the tensor. Returns the metadata. (No checksums: this
    reads other tools' files, which carry none.)"""
    f, path = _open(path)
    with f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(path, f.read(8), size)
        infos, metadata = _parse_header(path, f.read(n), size - 8 - n)
        base = 8 + n
        for name, (st, shape, begin, end) in sorted(infos.items(), key=lambda kv: kv[1][2]):
            dest = fill(name, st, shape)
            if dest is None:
                continue
            if st not in ("F32", "F16", "BF16"):
                raise _fail(path, f"tensor {name!r} is {st}; weights must be F32, F16 or BF16")
            if dest.shape != shape or dest.dtype != np.float32 or not dest.flags.c_contiguous:
                raise ValueError(f"fill() gave a {dest.dtype} {dest.shape} array for {name!r}")
            f.seek(base + begin)
            if st == "F32" and sys.byteorder == "little":
                got = f.readinto(memoryview(dest).cast("B"))
            else:
                raw = f.read(end - begin)
                got = len(raw)
                if got == end - begin:
                    if st == "F32":
                        dest[...] = np.frombuffer(raw, "<f4").reshape(shape)
                    elif st == "F16":
                        dest[...] = np.frombuffer(raw, "<f2").reshape(shape)
                    else:
                        dest[...] = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(
                            np.float32).reshape(shape)
            if got != end - begin:
                raise _fail(path, f"tensor {name!r} is cut short (the file ended)")
    return metadata


def load_file(path, *, verify: bool | None = None):
    """Read a safetensors file: returns ``(tensors, metadata)``, a dict of name -> numpy array
    (writable arrays that own their memory, native byte order; BF16 is widened exactly to
    float32) and the metadata dict (empty when there is none). Raises
    smallmind.CheckpointError naming the file and the problem for a missing, truncated,
    malformed or - when it carries checksums - edited or corrupted file.

    verify: check the checksums a file written with ``checksums=True`` carries (default: yes,
    unless the environment sets SMALLMIND_VERIFY_CHECKSUMS=0; about 1 s per 1.3 GB here)."""
    tensors, dtypes, metadata = _load(path, verify, widen_bf16=True)
    return tensors, metadata


def load_typed(path, *, verify: bool | None = None):
    """As load_file, but BF16 tensors keep their bits (uint16 arrays), and each tensor's file
    dtype comes too: ``(tensors, dtypes, metadata)`` with dtypes name -> "F32", "BF16", "I8", ...
    (so a reader can tell BF16 from U16, which both arrive as uint16)."""
    return _load(path, verify, widen_bf16=False)


def _load(path, verify, widen_bf16):
    f, path = _open(path)
    try:
        with f:
            buf = f.read()                   # one read; tensors are copied out below
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e}") from e
    n = _header_length(path, buf[:8], len(buf))
    data_size = len(buf) - 8 - n
    infos, metadata = _parse_header(path, buf[8:8 + n], data_size)
    tensors, dtypes = {}, {}
    base = 8 + n
    if _verify_default(verify):
        _verify(path, metadata, buf, base, infos)
    else:
        metadata.pop(CHECKSUM_KEY, None)
    for name, (st, shape, begin, end) in infos.items():
        dt = np.dtype(_DTYPES[st][0])
        count = (end - begin) // dt.itemsize
        view = np.frombuffer(buf, dtype=dt, count=count, offset=base + begin)
        if st == "BOOL" and count and np.frombuffer(buf, np.uint8, count, base + begin).max() > 1:
            raise _fail(path, f"tensor {name!r} is BOOL but holds bytes other than 0 and 1")
        try:
            view = view.reshape(shape)
            if st == "BF16" and widen_bf16:
                # bfloat16 is the top half of a float32: widening is exact.
                arr = np.empty(shape, np.float32)
                np.left_shift(view, 16, out=arr.view(np.uint32), dtype=np.uint32)
            else:
                arr = view.astype(dt.newbyteorder("="), copy=True)   # owned, writable
        except (ValueError, MemoryError) as e:
            raise _fail(path, f"tensor {name!r} with shape {list(shape)} cannot be built: {e}") from None
        tensors[name] = arr
        dtypes[name] = st
    return tensors, dtypes, metadata


def read_metadata(path):
    """The ``__metadata__`` dict of a safetensors file (empty when there is none), reading only
    the header; the header is validated as ``load_file`` does (against the file's size)."""
    f, path = _open(path)
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = _header_length(path, prefix, size)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e}") from e
    if len(raw) != n:
        raise _fail(path, f"the header is {n} bytes but only {len(raw)} could be read (truncated?)")
    metadata = _parse_header(path, raw, size - 8 - n)[1]
    _verify(path, metadata)          # the metadata's own checksum (the tensors are not read)
    return metadata
