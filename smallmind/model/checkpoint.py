"""checkpoint.py - one-file checkpoints in safetensors format (never pickle): the model's
parameters under their Hugging Face GPT-2 names, and in the header metadata the model
configuration, the tokenizer's vocabulary and, for training checkpoints, the optimizer state
(AdamW moments as tensors `optimizer.exp_avg.<name>` / `optimizer.exp_avg_sq.<name>`) and the
step and random-generator states needed to resume bit for bit.

Files are written atomically (temporary file, fsync, rename), so a crash never leaves a partial
file under the final name, and carry SHA-256 checksums of their header and of each tensor.
Loading verifies them and validates everything else, and raises CheckpointError saying what
is wrong: an edited `n_head` or a flipped bit is refused, never loaded as a different model.
The parameter tensors load unchanged into PyTorch / transformers' GPT-2 (lm_head tied).

A quantized (inference) model is saved compact: its weight matrices as I8 codes plus F32
`<name>_scale` tensors, or as BF16, the rest F32 (TransformerModel.quantized_state_dict gives
the layout), with metadata "quantization" = {"dtype": ..., "group": ...}; it has no optimizer
state and loads back as the same quantized model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from .. import safetensors as _safetensors
from ..errors import CheckpointError, ValidationError
from .bpe import BPETokenizer
from .layout import ParameterLayout
from .tokenizer import BaseTokenizer, Tokenizer
from .transformer import ModelConfig, TransformerModel, check_quantized_state

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "find_checkpoint", "Checkpoint",
           "tokenizer_from_json"]

FORMAT = "smallmind"
# The files a training run writes into its checkpoint folder.
BEST_FILE = "model_best.safetensors"            # lowest validation loss so far
LAST_FILE = "model_last.safetensors"            # every save_every steps and at the end
CANCELLED_FILE = "model_cancelled.safetensors"  # written when training is cancelled
FORMAT_VERSION = 1
_M = "optimizer.exp_avg."
_V = "optimizer.exp_avg_sq."


@dataclass
class Checkpoint:
    """Everything one checkpoint file holds, validated."""
    path: str
    config: ModelConfig
    params: dict            # name -> float32 array
    tokenizer: BaseTokenizer | None
    training: dict | None   # step, RNG states, hyperparameters (JSON values)
    exp_avg: dict | None    # AdamW first moments, name -> array (None without optimizer state)
    exp_avg_sq: dict | None
    # {"dtype": "int8" | "bf16", "group": int | None} for a quantized model, whose `params` are
    # then its quantized_state_dict() (codes, scales and the float32 rest); None for float32
    quantization: dict | None = None


def tokenizer_from_json(s: str) -> BaseTokenizer:
    """The tokenizer a checkpoint's JSON describes: its "type" field says which class ("char":
    Tokenizer, "bpe": BPETokenizer). ValidationError says what is wrong."""
    try:
        kind = json.loads(s).get("type")
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise ValidationError(f"tokenizer JSON: {e}") from None
    if kind == "char":
        return Tokenizer.from_json(s)
    if kind == "bpe":
        return BPETokenizer.from_json(s)
    raise ValidationError(f"tokenizer JSON: type must be one of ['bpe', 'char'], got {kind!r}")


def save_checkpoint(path, model: TransformerModel, tokenizer: BaseTokenizer | None = None, *,
                    training: dict | None = None, optimizer: tuple | None = None) -> None:
    """Write model (and optionally its tokenizer, a JSON-serialisable `training` dict and the
    optimizer moments `optimizer=(exp_avg, exp_avg_sq)` as flat blocks in the model's layout)
    to `path` atomically."""
    if not isinstance(model, TransformerModel):
        raise TypeError(f"model must be a TransformerModel, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, BaseTokenizer):
        raise TypeError(f"tokenizer must be a Tokenizer, a BPETokenizer or None, got "
                        f"{type(tokenizer).__name__}")
    bf16: list[str] = []
    if model.dtype != "float32":
        if optimizer is not None or training is not None:
            raise ValidationError(f"a quantized model ({model.dtype}) has no training state to "
                                  f"save: optimizer and training must be None")
        tensors = model.quantized_state_dict()
        if model.dtype == "bf16":
            bf16 = model.layout.compact_matrices()
    else:
        tensors = dict(model.state_dict())
    if optimizer is not None:
        for prefix, block in zip((_M, _V), optimizer):
            for name, view in model.layout.views(block).items():
                tensors[prefix + name] = view
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "model_config": json.dumps(model.config.to_dict(), sort_keys=True)}
    from .. import __version__
    meta["smallmind_version"] = __version__
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_json()
    if training is not None:
        meta["training"] = json.dumps(training, sort_keys=True)
    if model.dtype != "float32":
        meta["quantization"] = json.dumps({"dtype": model.dtype, "group": model.quant_group},
                                          sort_keys=True)
    _safetensors.save_file(tensors, os.fspath(path), meta, checksums=True, bf16=bf16)


def find_checkpoint(path, *, latest: bool = False) -> str:
    """The checkpoint file that `path` names - the one rule every command and loader uses.

    A file names itself. A folder names a run's checkpoint folder: for a model to use
    (latest=False: generate, chat, serve, load_checkpoint) its model_best.safetensors, else
    the newer of model_last / model_cancelled; to continue training (latest=True: resume) the
    newer of model_last / model_cancelled (the run's latest state), else model_best.
    CheckpointError says what is missing otherwise."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a path, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    present = [n for n in (BEST_FILE, LAST_FILE, CANCELLED_FILE)
               if os.path.isfile(os.path.join(path, n))]
    if not present:
        raise CheckpointError(f"{path} holds no checkpoint (looked for {BEST_FILE}, {LAST_FILE}, "
                              f"{CANCELLED_FILE})")
    states = [n for n in (LAST_FILE, CANCELLED_FILE) if n in present]
    # The newer of the two: an old model_cancelled must not win over a model_last written by a
    # later run (and the other way round).
    newest = max(states, key=lambda n: os.path.getmtime(os.path.join(path, n))) if states else None
    if latest or BEST_FILE not in present:
        return os.path.join(path, newest or BEST_FILE)
    return os.path.join(path, BEST_FILE)


def _fail(path, what: str) -> NoReturn:
    raise CheckpointError(f"{os.fspath(path)}: {what}")


def read_checkpoint(path, *, latest: bool = False, verify: bool | None = None) -> Checkpoint:
    """Read and validate a checkpoint (see the module docstring): a file, or a run's folder as
    find_checkpoint() resolves it (`ck.path` is the file read). For a quantized model's file the
    tensors' names, dtypes and shapes are checked here and their values (finite, scales in
    range) when model_from_checkpoint builds the model. The SHA-256 checksums the file
    carries (of its header and of each tensor) are verified unless verify=False or the
    environment sets SMALLMIND_VERIFY_CHECKSUMS=0: an edited or corrupted file is refused."""
    path = find_checkpoint(path, latest=latest)
    tensors, dtypes, meta = _safetensors.load_typed(path, verify=verify)
    if meta.get("format") != FORMAT:
        _fail(path, f"not a smallmind checkpoint (metadata format is {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        _fail(path, f"bad format_version {meta.get('format_version')!r}")
    if version != FORMAT_VERSION:
        _fail(path, f"format_version {version} is not supported (this smallmind reads {FORMAT_VERSION})")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
    except KeyError:
        _fail(path, "the model_config metadata is missing")
    except (ValueError, TypeError, RecursionError) as e:
        # RecursionError: json.loads gives up on deeply nested arrays (a hostile file).
        _fail(path, f"invalid model_config: {e}")
    tok = None
    if "tokenizer" in meta:
        try:
            tok = tokenizer_from_json(meta["tokenizer"])
        except (ValueError, TypeError) as e:
            _fail(path, f"invalid tokenizer: {e}")
        if tok.vocab_size > cfg.vocab_size:
            _fail(path, f"the tokenizer has {tok.vocab_size} symbols but the model only "
                        f"{cfg.vocab_size}")
    training = None
    if "training" in meta:
        try:
            training = json.loads(meta["training"])
        except (ValueError, RecursionError) as e:
            _fail(path, f"invalid training metadata: {e}")
        if not isinstance(training, dict):
            _fail(path, "invalid training metadata: not an object")
    if "quantization" in meta:
        return _read_quantized(path, meta, cfg, tok, tensors, dtypes)
    for name, st in dtypes.items():     # bfloat16 weights are float32 values: widened exactly
        if st == "BF16":
            tensors[name] = (tensors[name].astype(np.uint32) << 16).view(np.float32)
    # What the configuration's tensors must be, from the parameter table (no model is built).
    shapes = ParameterLayout.for_config(cfg).shapes()
    params = {k: t for k, t in tensors.items() if not k.startswith("optimizer.")}
    missing = [n for n in shapes if n not in params]
    extra = [n for n in params if n not in shapes]
    if missing or extra:
        _fail(path, f"tensors do not match the configuration "
                    f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in shapes.items():
        t = params[name]
        if t.dtype != np.float32 or t.shape != shape:
            _fail(path, f"{name} must be float32 {shape}, got {t.dtype} {t.shape}")
        if not np.isfinite(t).all():
            _fail(path, f"{name} contains NaN or infinite values")
    moments: list[dict | None] = [None, None]
    for i, prefix in enumerate((_M, _V)):
        part = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        if not part:
            continue
        if set(part) != set(shapes):
            _fail(path, f"optimizer state {prefix}* does not cover the model's tensors")
        for name, shape in shapes.items():
            if part[name].dtype != np.float32 or part[name].shape != shape:
                _fail(path, f"{prefix}{name} must be float32 {shape}")
        moments[i] = part
    if (moments[0] is None) != (moments[1] is None):
        _fail(path, "optimizer state is incomplete (one of exp_avg / exp_avg_sq is missing)")
    odd = [k for k in tensors if k.startswith("optimizer.") and not k.startswith((_M, _V))]
    if odd:
        _fail(path, f"unexpected tensor {odd[0]!r}")
    return Checkpoint(os.fspath(path), cfg, params, tok, training, moments[0], moments[1])


def _read_quantized(path, meta, cfg, tok, tensors, dtypes) -> Checkpoint:
    """The rest of read_checkpoint for a quantized model's file: its quantization metadata,
    each compact matrix's file dtype (I8 or BF16; U16 bits would arrive looking the same) and
    the tensors' names, dtypes and shapes; their values are checked as the model is built
    (model_from_checkpoint)."""
    try:
        q = json.loads(meta["quantization"])
        if not isinstance(q, dict) or set(q) != {"dtype", "group"}:
            raise ValueError("not an object with exactly dtype and group")
        if q["dtype"] not in ("int8", "bf16"):
            raise ValueError(f"dtype must be 'int8' or 'bf16', got {q['dtype']!r}")
        if q["group"] is not None and (type(q["group"]) is not int or q["group"] < 1):
            raise ValueError(f"group must be a positive int or null, got {q['group']!r}")
    except (ValueError, RecursionError) as e:
        _fail(path, f"invalid quantization metadata: {e}")
    if "training" in meta or any(k.startswith("optimizer.") for k in tensors):
        _fail(path, "a quantized model's checkpoint cannot hold training state")
    want = "I8" if q["dtype"] == "int8" else "BF16"
    for name in ParameterLayout.for_config(cfg).compact_matrices():
        if name in dtypes and dtypes[name] != want:
            _fail(path, f"{name} must be {want} in a {q['dtype']} checkpoint, got {dtypes[name]}")
    for name, st in dtypes.items():
        if st not in ("F32", "I8", "BF16"):
            _fail(path, f"{name} has dtype {st}; a {q['dtype']} checkpoint holds F32 and {want}")
    # names, dtypes and shapes here; the values (finite, scales in range) as the model is built
    try:
        check_quantized_state(cfg, tensors, q["dtype"], q["group"])
    except ValidationError as e:
        _fail(path, str(e))
    return Checkpoint(os.fspath(path), cfg, tensors, tok, None, None, None, quantization=q)


def model_from_checkpoint(ck: Checkpoint) -> TransformerModel:
    if ck.quantization is not None:
        try:
            return TransformerModel.from_quantized_state_dict(
                ck.config, ck.params, ck.quantization["dtype"], ck.quantization["group"])
        except ValidationError as e:
            _fail(ck.path, str(e))
    model = TransformerModel.empty(ck.config)
    try:
        model.load_state_dict(ck.params)
    except ValidationError as e:  # validated above; kept as a guard
        _fail(ck.path, str(e))
    return model


def load_checkpoint(path, *, verify: bool | None = None, dtype: str | None = None
                    ) -> tuple[TransformerModel, BaseTokenizer | None]:
    """(model, tokenizer) from a checkpoint file or a run's folder (its best model, see
    find_checkpoint); the tokenizer is None if none was saved. The model is returned in eval
    mode, ready for generation. verify: as read_checkpoint. dtype: the weights' format wanted
    ("float32", "bf16", "int8"; None: as stored; TransformerModel.astype's rules)."""
    if dtype not in (None, "float32", "bf16", "int8"):
        raise ValidationError(f"dtype must be None, 'float32', 'bf16' or 'int8', got {dtype!r}")
    ck = read_checkpoint(path, verify=verify)
    return model_from_checkpoint(ck).eval()._loaded_as(dtype), ck.tokenizer

