"""transformer.py - ModelConfig and TransformerModel: a GPT-2 whose whole forward and backward pass is
one C call each (csrc/sm_model.c), with parameters and gradients in two flat blocks that Python
sees as zero-copy numpy views under Hugging Face GPT-2 names (the names, shapes and offsets
come from the parameter table, smallmind/model/layout.py).

Leaves out: the KV-cache decode step (smallmind/generation/sampling.py), checkpoints' training
state (smallmind/model/training.py) and byte-level BPE.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
from typing import Any, Iterator, Mapping

import numpy as np

from .. import _faults
from .._lifecycle import Closeable
from .._validate import check_int, check_number
from ..core import _core
from ..errors import DTypeError, ValidationError
from .layout import ParameterLayout

__all__ = ["ModelConfig", "TransformerModel", "PRESETS"]

# Core limits (sm_gpt_config_check), repeated here so errors name the field.
_LIMITS = {"vocab_size": 2 ** 31, "block_size": 2 ** 24, "n_layer": 4096, "n_head": 2 ** 20,
           "n_embd": 2 ** 20}

# Named shapes. tiny/small/medium keep the sizes of the .NET SmallMind project this package
# reimplements; shakespeare-char is nanoGPT's character-level Shakespeare model; gpt2 is GPT-2
# 124M's shape (vocab 50257).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
    "small": dict(block_size=128, n_layer=4, n_head=4, n_embd=64, dropout=0.1),
    "medium": dict(block_size=256, n_layer=6, n_head=8, n_embd=128, dropout=0.1),
    "shakespeare-char": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 dropout=0.0),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2 model. Validated on construction: a bad field raises
    `ValidationError` (or `TypeError` for a wrong type) naming the field and the rule.

    vocab_size, block_size (longest context), n_layer, n_head, n_embd (n_head must divide it);
    dropout in [0, 1) is applied in train mode only; seed makes initialisation and dropout
    masks reproducible.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    seed: int = 42

    def __post_init__(self):
        for name, hi in _LIMITS.items():
            object.__setattr__(self, name, check_int(getattr(self, name), f"ModelConfig.{name}", 1, hi))
        if self.n_embd % self.n_head:
            raise ValidationError(f"ModelConfig.n_embd must be a multiple of n_head, got "
                                  f"n_embd={self.n_embd}, n_head={self.n_head}")
        object.__setattr__(self, "dropout",
                           check_number(self.dropout, "ModelConfig.dropout", 0, 1, hi_open=True))
        object.__setattr__(self, "seed", check_int(self.seed, "ModelConfig.seed", 0, 2 ** 64 - 1))

    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None, **overrides) -> "ModelConfig":
        """A named configuration (see PRESETS) with any field overridden."""
        if name not in PRESETS:
            raise ValidationError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        fields.update(overrides)
        if "vocab_size" not in fields:
            raise ValidationError(f"preset {name!r} needs a vocab_size")
        return cls(**fields)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """Distinct parameters (the LM head shares wte)."""
        V, T, L, C = self.vocab_size, self.block_size, self.n_layer, self.n_embd
        return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise ValidationError(f"a model configuration must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValidationError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def core_tuple(self) -> tuple:
        """(vocab_size, block_size, n_layer, n_head, n_embd): the configuration as the compiled
        core takes it."""
        return (self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd)

    @property
    def layout(self) -> ParameterLayout:
        """The parameter table of this shape: every tensor's name, shape and offset."""
        return ParameterLayout.for_config(self)


def _matrix_layout(name: str) -> str:
    """How a compact matrix is stored: the token embedding row by row per token ("dots", as
    the LM head reads it), the layers' (in, out) matrices along their input ("rows")."""
    return "dots" if name == "transformer.wte.weight" else "rows"


def _quantized_tensor_specs(config: ModelConfig, dtype: str, group: int | None
                            ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (numpy dtype, shape) of every tensor of a quantized model's state
    (TransformerModel.quantized_state_dict): the float32 tensors, each compact matrix's codes
    (int8, or uint16 bfloat16 bits) and, for int8, its `<name>_scale`."""
    layout = ParameterLayout.for_config(config)
    shapes = layout.shapes()
    want = {n: ("float32", s) for n, s in shapes.items()}
    for n in layout.compact_matrices():
        want[n] = ("int8" if dtype == "int8" else "uint16", shapes[n])
        if dtype == "int8":
            rows = _matrix_layout(n) == "rows"
            K, N = shapes[n] if rows else shapes[n][::-1]
            G = K if group is None else group
            want[n + "_scale"] = ("float32", (K // G, N) if rows else (N, K // G))
    return want


def _check_quantization(config: ModelConfig, dtype: Any, group: Any) -> int | None:
    if dtype not in ("bf16", "int8"):
        raise ValidationError(f"dtype must be 'bf16' or 'int8', got {dtype!r}")
    if group is not None:
        if dtype != "int8":
            raise ValidationError("group goes with dtype='int8' (bf16 has no scales)")
        check_int(group, "group", 1, config.n_embd)
        if config.n_embd % group:
            raise ValidationError(f"group must divide n_embd ({config.n_embd}), got {group}")
    return group


def check_quantized_state(config: ModelConfig, tensors: Mapping[str, Any], dtype: Any,
                          group: Any) -> int | None:
    """Check that `tensors` has the names, dtypes and shapes of a `dtype` / `group` quantized
    model's state (TransformerModel.quantized_state_dict) for `config`; returns the group.
    ValidationError names the first thing wrong. (The values are checked as the model is
    built: TransformerModel.from_quantized_state_dict.)"""
    group = _check_quantization(config, dtype, group)
    want = _quantized_tensor_specs(config, dtype, group)
    missing = [n for n in want if n not in tensors]
    extra = [n for n in tensors if n not in want]
    if missing or extra:
        raise ValidationError(f"tensors do not match a {dtype} model of this configuration "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for n, (dt, shape) in want.items():
        t = tensors[n]
        if not isinstance(t, np.ndarray) or t.dtype != dt or t.shape != shape:
            got = f"{t.dtype} {t.shape}" if isinstance(t, np.ndarray) else type(t).__name__
            raise ValidationError(f"tensors[{n!r}] must be {dt} {shape}, got {got}")
    return group


class TransformerModel(Closeable):
    """A GPT-2 language model on the CPU.

    ``TransformerModel(config)`` or ``TransformerModel(vocab_size=..., block_size=..., ...)``.
    A new model is in train mode (dropout on), like a PyTorch module; ``eval()`` switches it off.

    Thread safety: in eval mode ``forward`` may be called from any number of threads at once
    (each call rents its own activations; the parameters are only read), and the calls run in
    parallel because the GIL is released for the whole pass. Training calls (train-mode forward
    with targets, backward, optimizer steps, load_state_dict) are serialised by a lock and must
    not overlap eval-mode forwards of the same model from other threads.

    Lifetime: ``close()`` (or leaving ``with model:``; ``dispose()`` is the same) frees the
    training state and makes every later call raise ObjectDisposedError.

    Besides the user API, a small documented surface serves smallmind's own modules (training,
    generation, checkpoints, retrieval) and anyone writing their own loop: ``layout``,
    ``flat_params`` / ``flat_grads`` (the flat blocks the C core reads), ``core_config``,
    ``check_open()``, ``train_forward()``, ``dropout_rng_state`` and ``exclusive()``.
    """

    def __init__(self, config: ModelConfig | None = None, **kwargs):
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ModelConfig or keyword arguments, not both")
        self._setup(config)
        self._init_weights()

    @classmethod
    def empty(cls, config: ModelConfig) -> TransformerModel:
        """A model of `config` whose parameters are zeros, for a loader to fill (no random
        initialisation: the zeroed block costs no memory until written, so loading a 124M model
        does not first draw 124M random numbers)."""
        model = cls.__new__(cls)
        model._setup(config)
        return model

    def _setup(self, config) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self._cfg = config.core_tuple()
        self._layout = config.layout
        self._params = self._layout.new_block()
        self._grad_block: np.ndarray | None = None   # allocated on first use: inference never needs it
        self._training = True
        self._state: Any = None       # _core.GPTState of the last training batch shape
        self._backward_ready = False  # the latest forward was a train-mode one with targets
        self._lock = threading.RLock()
        # Dropout masks: one 64-bit seed per training forward, drawn from this generator.
        self._dropout_rng = np.random.Generator(np.random.PCG64([config.seed, 0x5EED_D409]))
        self._qweights: Any = None    # _core.GPTQWeights of a quantized (inference) model
        self._dtype = "float32"
        self._quant_group: int | None = None

    # ---- the surface smallmind's own modules use -----------------------------------------------

    @property
    def dtype(self) -> str:
        """How the weight matrices are stored: "float32", or "bf16" / "int8" after quantize()."""
        return self._dtype

    def new_cache(self, B: int, capacity: int):
        """A KV cache (_core.GPTCache) for B sequences of up to `capacity` positions that decodes
        with this model's weights (its compact matrices when quantized)."""
        return _core.GPTCache(self._cfg, B, capacity, weights=self._qweights)

    def _float_only(self, what: str) -> None:
        if self._qweights is not None:
            raise ValidationError(f"{what} needs float32 weights; this model is quantized "
                                  f"({self._dtype}, for inference): dequantize() gives a float32 "
                                  f"model with the same weights")

    @property
    def layout(self) -> ParameterLayout:
        """The parameter table: each tensor's name, shape and offset in flat_params."""
        return self._layout

    @property
    def flat_params(self) -> np.ndarray:
        """All parameters as one flat float32 block in `layout` (the C core's view of them; the
        state_dict() tensors are views into it)."""
        return self._params

    @property
    def flat_grads(self) -> np.ndarray:
        """The flat gradient block (same layout), allocated zeroed the first time training
        needs it, so a model that only serves does not carry a second copy of its parameters."""
        if self._grad_block is None:
            with self._lock:
                if self._grad_block is None:
                    self._grad_block = self._layout.new_block()
        return self._grad_block

    @property
    def core_config(self) -> tuple:
        """config.core_tuple(): what the compiled core's model calls take."""
        return self._cfg

    @property
    def dropout_rng_state(self) -> dict[str, Any]:
        """The state of the generator that draws dropout masks (saved by training checkpoints so
        a resumed run draws the same masks)."""
        with self._lock:
            return dict(self._dropout_rng.bit_generator.state)

    @dropout_rng_state.setter
    def dropout_rng_state(self, state: dict) -> None:
        gen = np.random.Generator(np.random.PCG64())
        gen.bit_generator.state = state      # raises on a malformed state, before any change
        with self._lock:
            self._dropout_rng = gen

    @contextlib.contextmanager
    def exclusive(self) -> Iterator["TransformerModel"]:
        """Hold the model's training lock for the block: no training call (train-mode forward,
        backward, load_state_dict) of another thread runs meanwhile."""
        with self._lock:
            self.check_open()
            yield self

    # ---- parameters ---------------------------------------------------------------------------

    def _init_weights(self) -> None:
        """GPT-2 initialisation, as the parameter table says per tensor (see TensorSpec.init),
        drawn in Hugging Face name order from the config's seed, so the same seed always gives
        the same model."""
        rng = np.random.Generator(np.random.PCG64(self.config.seed))
        std = {"normal": 0.02, "residual": 0.02 / math.sqrt(2 * self.config.n_layer)}
        for spec in self._layout:
            v = self._layout.view(self._params, spec.name)
            if spec.init == "ones":
                v[...] = 1.0
            elif spec.init == "zeros":
                v[...] = 0.0
            else:
                v[...] = rng.standard_normal(v.shape, dtype=np.float32) * np.float32(std[spec.init])

    # ---- quantized inference ------------------------------------------------------------------

    def quantize(self, dtype: str, *, group: int | None = None) -> TransformerModel:
        """A new inference model whose weight matrices (attention, MLP, and the token embedding
        that is also the LM head) are stored as "bf16" (2 bytes a weight) or "int8" (1 byte, with
        a float32 scale per output and per `group` rows of the reduction axis; None: one scale
        per output, over the whole axis). LayerNorms, biases and the position embedding stay
        float32. Decoding reads the compact matrices (fewer bytes per token); the prefill widens
        each matrix to float32 for its product. The model is in eval mode and cannot train:
        train(), train_forward() and backward() raise ValidationError. save() writes it compact
        (load() gives it back as it is). This model is unchanged."""
        self.check_open()
        self._float_only("quantize()")
        group = _check_quantization(self.config, dtype, group)
        views = self.state_dict()
        with self._lock:
            mats = {name: _core.QMatrix(np.ascontiguousarray(views[name]), dtype, group,
                                        _matrix_layout(name))
                    for name in self._layout.compact_matrices()}
            return TransformerModel._compact(self.config, dtype, group, mats, views)

    @classmethod
    def _compact(cls, config: ModelConfig, dtype: str, group: int | None, mats: dict,
                 rest: Mapping[str, Any]) -> TransformerModel:
        """An inference model from its compact matrices (name -> QMatrix) and the float32
        tensors of `rest` (the matrices' entries in it are not read)."""
        q = cls.empty(config)
        for name, dest in q._layout.views(q._params).items():
            if name not in mats:      # the float32 rest; the matrices' floats stay zeros
                dest[...] = rest[name]
        order = q._layout.compact_matrices()
        q._qweights = _core.GPTQWeights([mats[n] for n in order[:-1]], mats[order[-1]])
        q._dtype = dtype
        q._quant_group = group
        q._training = False
        return q

    def quantized_state_dict(self) -> dict[str, np.ndarray]:
        """A quantized model's tensors as its checkpoint stores them: the float32 tensors
        (LayerNorms, biases, wpe) under their Hugging Face names, and for each compact matrix
        its codes under the matrix's name, in the float32 matrix's shape (int8, or bfloat16
        bits as uint16), plus for int8 `<name>_scale`, float32: matrix[k, n] = code[k, n] *
        scale[k // group, n] for the (in, out) matrices, and wte[v, c] = code[v, c] *
        scale[v, c // group] for the token embedding. Copies, not views."""
        self.check_open()
        if self._qweights is None:
            raise ValidationError("quantized_state_dict() is for a quantized model; this one is "
                                  "float32: state_dict() gives its tensors")
        names = self._layout.compact_matrices()
        mats = list(self._qweights.layers) + [self._qweights.wte]
        out = {name: v.copy() for name, v in self._layout.views(self._params).items()
               if name not in names}
        for name, m in zip(names, mats):
            out[name] = m.codes.copy()
            if self._dtype == "int8":
                out[name + "_scale"] = m.scales_2d().copy()
        return out

    @property
    def quant_group(self) -> int | None:
        """The int8 scale group along the reduction axis (None: one scale per output, over the
        whole axis); None for bf16 and float32."""
        return self._quant_group

    @classmethod
    def from_quantized_state_dict(cls, config: ModelConfig, tensors: Mapping[str, Any],
                                  dtype: str, group: int | None = None) -> TransformerModel:
        """The quantized model whose quantized_state_dict() is `tensors` (the inverse: the same
        codes, scales and float32 tensors; bit for bit the same outputs). Every tensor is
        validated - present, nothing extra, dtype, shape, finite values, scales >= 0 - and
        ValidationError names the first that is wrong."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        group = check_quantized_state(config, tensors, dtype, group)
        names = ParameterLayout.for_config(config).compact_matrices()
        for n, t in tensors.items():
            if t.dtype == np.float32 and not np.isfinite(t).all():
                raise ValidationError(f"tensors[{n!r}] contains NaN or infinite values")
        mats = {}
        for n in names:
            try:
                mats[n] = _core.QMatrix(None, dtype, group, _matrix_layout(n), codes=tensors[n],
                                        scales=tensors.get(n + "_scale"))
            except ValidationError as e:
                raise ValidationError(f"tensors[{n!r}]: {e}") from None
        return cls._compact(config, dtype, group, mats, tensors)

    def astype(self, dtype: str, *, group: int | None = None) -> TransformerModel:
        """This model with its weight matrices in `dtype`: "float32" (a quantized model's
        dequantize(); a float32 model itself), "bf16" or "int8" (quantize(dtype, group=group)
        of a float32 model; a model already in that format itself). A quantized model is not
        quantized again into the other compact format: ValidationError (its rounding would
        add to the first)."""
        self.check_open()
        if dtype not in ("float32", "bf16", "int8"):
            raise ValidationError(f"dtype must be 'float32', 'bf16' or 'int8', got {dtype!r}")
        if dtype == self._dtype and (dtype != "int8" or group == self._quant_group):
            return self
        if dtype == "float32":
            return self.dequantize()
        if self._dtype != "float32":
            raise ValidationError(f"this model is {self._dtype} already: astype({dtype!r}) would "
                                  f"quantize its rounded weights again; start from the float32 "
                                  f"model")
        return self.quantize(dtype, group=group)

    def _loaded_as(self, dtype: str | None) -> TransformerModel:
        """For loaders: this freshly loaded model in `dtype` (None, or the format it is stored
        in - any int8 grouping: as stored), closing this one when a converted copy is returned."""
        if dtype is None or dtype == self._dtype:
            return self
        try:
            out = self.astype(dtype)
        except BaseException:
            self.close()
            raise
        if out is not self:
            self.close()
        return out

    def dequantize(self) -> TransformerModel:
        """A float32 model whose weights are the values this model's compact matrices stand
        for (a float32 model: a copy)."""
        self.check_open()
        out = TransformerModel.empty(self.config)
        if self._qweights is None:
            out._params[...] = self._params
        else:
            views = out._layout.views(out._params)
            mats = dict(zip(self._layout.compact_matrices(),
                            list(self._qweights.layers) + [self._qweights.wte]))
            for name, v in self._layout.views(self._params).items():
                views[name][...] = mats[name].dequantize() if name in mats else v
        out._training = self._training
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters as zero-copy float32 views, Hugging Face GPT-2 names and (in, out) layout.
        Writing into a view changes the model. The LM head is tied to transformer.wte.weight."""
        self.check_open()
        self._float_only("state_dict()")
        return self._layout.views(self._params)

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients, same names and shapes as state_dict(), as zero-copy views."""
        self.check_open()
        self._float_only("grads()")
        return self._layout.views(self.flat_grads)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy parameters in from a mapping of name -> array (numpy, or anything np.asarray
        takes, such as CPU torch tensors). Shapes must match; values must be finite. With
        strict, the names must be exactly those of state_dict() (an `lm_head.weight` equal to
        wte is accepted, as Hugging Face checkpoints carry one). Nothing is changed on error."""
        self.check_open()
        self._float_only("load_state_dict()")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of name -> array, got {type(state).__name__}")
        layout = self._layout
        extra = [k for k in state if k not in layout and k != "lm_head.weight"]
        missing = [k for k in layout.names if k not in state]
        if strict and (extra or missing):
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
            raise ValidationError("state_dict does not match the model: " + "; ".join(parts))
        staged = {}
        for name in layout.names:
            if name not in state:
                continue
            try:
                a = np.asarray(state[name])
            except Exception as e:  # e.g. a torch tensor that needs .detach()
                raise ValidationError(f"{name}: cannot be read as an array ({e})") from None
            shape = layout.spec(name).shape
            if a.shape != shape:
                raise ValidationError(f"{name} must have shape {shape}, got {a.shape}")
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise ValidationError(f"{name} must hold real numbers, got dtype {a.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):  # 1e39 -> inf, refused below
                a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise ValidationError(f"{name} contains NaN or infinite values")
            staged[name] = a
        if "lm_head.weight" in state:
            try:   # "abc" or object(): a bare ValueError / TypeError from numpy otherwise
                head = np.asarray(state["lm_head.weight"], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise ValidationError(f"lm_head.weight: cannot be read as an array ({e})") from None
            wte = staged.get("transformer.wte.weight", layout.view(self._params, "transformer.wte.weight"))
            if head.shape != wte.shape or not np.array_equal(head, wte):
                raise ValidationError("lm_head.weight differs from transformer.wte.weight; "
                                      "smallmind ties the LM head to the token embedding")
        with self._lock:
            # All or nothing: an exception between two tensors (KeyboardInterrupt) puts back
            # the ones already copied.
            done: list = []
            try:
                for name, a in staged.items():
                    view = layout.view(self._params, name)
                    done.append((view, view.copy()))
                    view[...] = a
                    _faults.point("TransformerModel.load_state_dict:tensor")
            except BaseException:
                for view, old in done:
                    view[...] = old
                raise

    def num_parameters(self) -> int:
        return self.config.num_parameters()

    @property
    def nbytes(self) -> int:
        """Bytes this model holds: parameters, gradients (once training has used them) and any
        training state."""
        st = self._state
        g = self._grad_block
        if self._qweights is not None:   # the compact matrices and the float32 rest (the
            # block's matrix regions are never written, so they take no memory)
            compact = set(self._layout.compact_matrices())
            rest = sum(v.nbytes for n, v in self._layout.views(self._params).items()
                       if n not in compact)
            return self._qweights.nbytes + rest
        return (self._params.nbytes + (g.nbytes if g is not None else 0)
                + (st.nbytes if st is not None else 0))

    # ---- modes --------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self._training

    def train(self, mode: bool = True) -> "TransformerModel":
        self.check_open()
        if mode:
            self._float_only("training")
        self._training = bool(mode)
        return self

    def eval(self) -> "TransformerModel":
        return self.train(False)

    # ---- forward / backward -------------------------------------------------------------------

    def _ids(self, a, name: str) -> np.ndarray:
        """A (B, T) int32 array from any integer array-like, with a clear error otherwise."""
        if isinstance(a, np.ndarray):
            arr = a
        else:
            try:
                arr = np.asarray(a)
            except Exception as e:
                raise ValidationError(f"{name} must be a (B, T) integer array ({e})") from None
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            # both a ValidationError (the model's bad-input contract) and a TypeError (convention)
            raise DTypeError(f"{name} must be a (B, T) array of integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValidationError(f"{name} must be 2-D (B, T), got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValidationError(f"{name} must have at least one row and one position, got shape {arr.shape}")
        if arr.shape[1] > self.config.block_size:
            raise ValidationError(f"{name} has {arr.shape[1]} positions, more than "
                                  f"block_size = {self.config.block_size}")
        if arr.dtype != np.int32:
            lo, hi = arr.min(), arr.max()
            if lo < -(2 ** 31) or hi >= 2 ** 31:
                bad = lo if lo < -(2 ** 31) else hi
                raise ValidationError(f"{name} values must be token ids in [0, "
                                      f"{self.config.vocab_size - 1}], got {bad}")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def forward(self, idx, targets=None, *, threads: int | None = None):
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T) also the mean
        cross-entropy: returns (logits, loss). Targets of -1 are ignored. In train mode with
        targets the pass keeps what backward() needs."""
        self.check_open()
        idx = self._ids(idx, "idx")
        B, T = idx.shape
        if not (self._training and targets is not None):
            self._backward_ready = False   # backward() refers to the latest forward only
        logits = np.empty((B, T, self.config.vocab_size), dtype=np.float32)
        if self._qweights is not None:       # a quantized model: eval mode always
            tg = None if targets is None else self._ids(targets, "targets")
            if tg is not None and tg.shape != idx.shape:
                raise ValidationError(f"targets must have the shape of idx {idx.shape}, got {tg.shape}")
            loss, n_valid = _core.gpt_forward_q(self._params, self._cfg, self._qweights, idx, tg,
                                                logits, threads)
            if tg is None:
                return logits
            self._check_valid(n_valid)
            return logits, loss
        if targets is None:
            if self._training and self.config.dropout > 0.0:
                with self._lock:
                    seed = self._next_dropout_seed()
                _core.gpt_forward(self._params, self._cfg, idx, None, logits, None,
                                  self.config.dropout, seed, threads)
            else:
                _core.gpt_forward(self._params, self._cfg, idx, None, logits, threads=threads)
            return logits
        targets = self._ids(targets, "targets")
        if targets.shape != idx.shape:
            raise ValidationError(f"targets must have the shape of idx {idx.shape}, got {targets.shape}")
        if self._training:
            loss = self.train_forward(idx, targets, logits, threads)
        else:
            loss, n_valid = _core.gpt_forward(self._params, self._cfg, idx, targets, logits,
                                              threads=threads)
            self._check_valid(n_valid)
        return logits, loss

    __call__ = forward

    def _check_valid(self, n_valid: int) -> None:
        if n_valid == 0:
            raise ValidationError("targets has no position to score: every target is -1")

    def _next_dropout_seed(self) -> int:
        return int(self._dropout_rng.integers(0, 2 ** 63))

    def next_dropout_seed(self) -> int | None:
        """Draw the seed the next train-mode forward would use (None when dropout is off)."""
        if self.config.dropout <= 0.0:
            return None
        with self._lock:
            return self._next_dropout_seed()

    def train_forward(self, idx: np.ndarray, targets: np.ndarray, logits: np.ndarray | None = None,
                      threads: int | None = None, precision: str = "float32",
                      dropout_seed: int | None = None) -> float:
        """The training forward pass (dropout on, the loss gradient kept for backward()) on ids
        already validated as C-contiguous int32 (B, T) arrays (forward() validates first).
        Returns the mean loss; fills logits (B, T, V) when given. precision "bf16" runs the
        linear layers' matrix products, here and in the backward() that follows, on bf16
        inputs with float32 sums (see Training's precision). dropout_seed: the seed of this
        pass's dropout masks, drawn by the caller with next_dropout_seed() (distributed training
        draws every micro-batch's seed on every rank); None draws the next one here."""
        with self._lock:
            self.check_open()
            self._float_only("train_forward()")
            B, T = idx.shape
            created = False
            if (self._state is None or self._state.shape != (B, T)
                    or self._state.precision != precision):
                if self._state is not None:
                    self._state.close()
                    self._state = None
                self._state = _core.GPTState(self._cfg, B, T, precision)
                created = True
            p = self.config.dropout
            if p <= 0.0:
                seed = 0
            elif dropout_seed is None:
                seed = self._next_dropout_seed()
            else:
                seed = dropout_seed
            try:
                loss, n_valid = _core.gpt_forward(self._params, self._cfg, idx, targets, logits,
                                                  self._state, p, seed, threads)
            except BaseException:
                # gpt_forward refuses bad ids (targets == vocab_size) before any C runs; a
                # state rented for that refused batch would stay rented from the pool
                if created:
                    self._state.close()
                    self._state = None
                raise
            if n_valid == 0:
                self._state.close()
                self._state = None
                self._check_valid(0)
            self._backward_ready = True
            return loss

    def backward(self, *, loss_scale: float = 1.0, threads: int | None = None,
                 into: np.ndarray | None = None) -> None:
        """Accumulate loss_scale * d(loss)/d(parameters) into grads() (or into `into`, a float32
        block in the parameters' layout) for the last train-mode forward with targets. Call
        zero_grad() first unless you mean to accumulate."""
        with self._lock:
            self.check_open()
            self._float_only("backward()")
            if self._state is None or not self._state.ready or not self._backward_ready:
                raise ValidationError("backward() needs a train-mode forward(idx, targets) first "
                                      "(each such forward allows one backward, and only until "
                                      "the next forward)")
            target = self.flat_grads if into is None else into
            _core.gpt_backward(target, self._state, self._params, loss_scale, threads)
            self._backward_ready = False

    def zero_grad(self) -> None:
        self.check_open()
        with self._lock:
            if self._grad_block is not None:   # a block not yet allocated is zero already
                self._grad_block.fill(0.0)

    # ---- files --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, *, dtype: str | None = None) -> "TransformerModel":
        """A model (eval mode) from a Hugging Face GPT-2 folder: config.json and
        model.safetensors (or its shards). Unsupported options raise CheckpointError naming the
        field. dtype: "bf16" / "int8" quantize it as it loads (see astype). sm.load_pretrained
        (folder) also returns its tokenizer."""
        from .pretrained import from_pretrained
        return from_pretrained(folder)._loaded_as(dtype)

    def save_pretrained(self, folder, tokenizer=None) -> None:
        """Write a Hugging Face GPT-2 folder (config.json, model.safetensors and, for a
        BPETokenizer, its tokenizer files) that transformers loads as it is."""
        self._float_only("save_pretrained()")
        from .pretrained import save_pretrained
        save_pretrained(self, folder, tokenizer)

    def save(self, path, tokenizer=None) -> None:
        """Write a safetensors checkpoint (atomically): parameters under Hugging Face names,
        the config and, if given, the tokenizer in its metadata. A quantized model is written
        compact (int8 codes and scales, or bf16; see quantized_state_dict) and load() gives it
        back quantized."""
        from .checkpoint import save_checkpoint
        self.check_open()
        with self._lock:
            save_checkpoint(path, self, tokenizer)

    @classmethod
    def load(cls, path, *, dtype: str | None = None) -> "TransformerModel":
        """The model of a checkpoint file, in eval mode (CheckpointError if the file is bad);
        quantized if it was saved quantized. dtype: the weights' format wanted (None: as
        stored; see astype)."""
        from .checkpoint import load_checkpoint
        return load_checkpoint(path, dtype=dtype)[0]

    # ---- lifetime -----------------------------------------------------------------------------

    def free_training_state(self) -> None:
        """Give the saved activations of training steps back to the MemoryPool now."""
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None

    def _close(self) -> None:
        with self._lock:
            self.free_training_state()

    def __repr__(self) -> str:
        c = self.config
        return (f"TransformerModel(vocab_size={c.vocab_size}, block_size={c.block_size}, "
                f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"params={self.num_parameters():,}, "
                + (f"{self._dtype}, " if self._qweights is not None else "")
                + f"{'train' if self._training else 'eval'})")

    def config_json(self) -> str:
        return json.dumps(self.config.to_dict(), sort_keys=True)
