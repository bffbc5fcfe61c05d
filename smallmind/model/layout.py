"""layout.py - the parameter table of a GPT-2 as Python sees it: every tensor's Hugging Face name,
shape, initialisation and place in the model's flat float32 block.

The table itself is C (`sm_gpt_kinds` in csrc/sm_model.c), because the kernels index the block
with it; this module only reads it, so the model, checkpoints, the optimizer state and importers
of other formats never restate a name or a shape. Block order (the C enum's) puts the weight
matrices first, so weight decay is one pass over a prefix; `names` is Hugging Face's order.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from ..core import _core

if TYPE_CHECKING:  # only for annotations: transformer.py imports this module
    from .transformer import ModelConfig

__all__ = ["TensorSpec", "ParameterLayout", "aligned_zeros", "COMPACT_PER_LAYER"]

# A layer's weight matrices, in the order the C core's compact weights hold them.
COMPACT_PER_LAYER = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the block: Hugging Face name, shape, first float in the block, layer (-1
    for a tensor that exists once) and how a new model fills it ("normal": N(0, 0.02);
    "residual": N(0, 0.02 / sqrt(2 n_layer)); "ones"; "zeros")."""
    name: str
    shape: tuple[int, ...]
    offset: int
    layer: int
    init: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def aligned_zeros(n: int) -> np.ndarray:
    """A float32 array of n zeros whose data starts on a 64-byte boundary (SIMD-friendly)."""
    raw = np.zeros(n + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + n]


class ParameterLayout:
    """The tensors of a model of one configuration (immutable; shared through `for_config`).

    ``num_floats`` is the block's length (each tensor starts on a 64-byte boundary; the padding
    stays zero), ``decay_floats`` the length of its weight-decayed prefix. Iterating gives the
    TensorSpecs in Hugging Face order."""

    def __init__(self, core_config: tuple):
        raw = _core.gpt_layout(core_config)
        self.num_floats: int = raw["num_params"]
        self.decay_floats: int = raw["decay_size"]
        # Hugging Face order: wte and wpe, then each layer's tensors, then ln_f.
        def hf_key(t):
            group = 0 if t["layer"] < 0 and t["hf_rank"] < 2 else (1 if t["layer"] >= 0 else 2)
            return (group, t["layer"], t["hf_rank"])
        specs = [TensorSpec(t["name"], tuple(t["shape"]), t["offset"], t["layer"], t["init"])
                 for t in sorted(raw["tensors"], key=hf_key)]
        self._specs: dict[str, TensorSpec] = {s.name: s for s in specs}

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def for_config(config: "ModelConfig") -> "ParameterLayout":
        """The layout of `config` (cached: configurations are immutable)."""
        return ParameterLayout(config.core_tuple())

    # ---- the table ----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names in Hugging Face order."""
        return list(self._specs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.shape for n, s in self._specs.items()}

    def compact_matrices(self) -> list[str]:
        """The weight matrices a quantized model stores compactly, in the order the C core
        takes them (sm_gpt_qweights): each layer's attn.c_attn, attn.c_proj, mlp.c_fc,
        mlp.c_proj, then the token embedding (also the LM head)."""
        n_layer = 1 + max(s.layer for s in self)
        return [f"transformer.h.{l}.{m}" for l in range(n_layer) for m in COMPACT_PER_LAYER] \
            + ["transformer.wte.weight"]

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in this model") from None

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    # ---- blocks -------------------------------------------------------------------------------

    def new_block(self) -> np.ndarray:
        """A zeroed, 64-byte aligned float32 block in this layout (parameters, gradients or
        optimizer moments)."""
        return aligned_zeros(self.num_floats)

    def view(self, block: np.ndarray, name: str) -> np.ndarray:
        """Tensor `name` of a block in this layout, as a zero-copy view of its shape."""
        s = self.spec(name)
        return block[s.offset:s.offset + s.size].reshape(s.shape)

    def views(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of `block` as a zero-copy view, in Hugging Face order."""
        return {s.name: block[s.offset:s.offset + s.size].reshape(s.shape) for s in self}

    def fill(self, block: np.ndarray, tensors: Mapping[str, Any]) -> None:
        """Copy `tensors` (name -> array of the tensor's shape, every name present) into block."""
        for s in self:
            block[s.offset:s.offset + s.size].reshape(s.shape)[...] = tensors[s.name]
