"""pretrained.py - Hugging Face GPT-2 folders in: config.json, model.safetensors (or shards listed
in model.safetensors.index.json) and the tokenizer files, read into a TransformerModel and a
BPETokenizer. Weights stream from the file straight into the model's parameter block (no second
copy of the weights in memory); nothing is unpickled (a folder with only pytorch_model.bin is
refused). Options smallmind's GPT-2 does not compute raise CheckpointError naming the field,
rather than giving a different model.

smallmind's tensor names are GPT-2's (transformer.h.0.attn.c_attn.weight, ...), weights laid out
(in, out) as GPT-2's Conv1D; files saved from GPT2Model (no "transformer." prefix) load too, the
attention-mask buffers some files carry are skipped, and an lm_head.weight must be the tied
token embedding.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import safetensors as _safetensors
from ..errors import CheckpointError, ValidationError
from .bpe import BPETokenizer
from .transformer import ModelConfig, TransformerModel

__all__ = ["load_pretrained", "save_pretrained", "config_from_hf"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LN_EPS = 1e-5                      # the C core's LayerNorm epsilon (csrc/sm_model.c)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # GPT-2's tanh approximation
_BUFFERS = (".attn.bias", ".attn.masked_bias")                 # causal-mask buffers, not weights


def _fail(path, what) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


def config_from_hf(obj: dict, path="config.json") -> ModelConfig:
    """The ModelConfig of a GPT-2 config.json's contents; CheckpointError naming the first field
    that smallmind's GPT-2 does not compute as written."""
    if not isinstance(obj, dict):
        raise _fail(path, "must be a JSON object")
    if obj.get("model_type") != "gpt2":
        raise _fail(path, f"model_type is {obj.get('model_type')!r}; only 'gpt2' is supported")

    def need(field, ok, why):
        if field in obj and not ok(obj[field]):
            raise _fail(path, f"{field} = {obj[field]!r} is not supported ({why})")

    need("n_inner", lambda v: v is None or v == 4 * obj.get("n_embd", -1), "the MLP is 4 x n_embd")
    need("activation_function", lambda v: v in _TANH_GELU, "GELU's tanh form")
    need("layer_norm_epsilon", lambda v: v == _LN_EPS, f"LayerNorm epsilon is {_LN_EPS}")
    need("scale_attn_weights", lambda v: v is True, "attention is scaled by 1/sqrt(head size)")
    need("scale_attn_by_inverse_layer_idx", lambda v: v is False, "not implemented")
    need("add_cross_attention", lambda v: v is False, "a decoder-only model")
    need("tie_word_embeddings", lambda v: v is True, "the LM head is the token embedding")
    try:
        dropout = float(obj.get("resid_pdrop", 0.0) or 0.0)
        return ModelConfig(vocab_size=obj["vocab_size"], block_size=obj["n_positions"],
                           n_layer=obj["n_layer"], n_head=obj["n_head"], n_embd=obj["n_embd"],
                           dropout=dropout)
    except KeyError as e:
        raise _fail(path, f"the field {e.args[0]!r} is missing") from None
    except (ValidationError, TypeError, ValueError) as e:
        raise _fail(path, f"invalid model shape: {e}") from None


def _weight_files(folder) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _fail(index, f"not a safetensors index ({e!r})") from None
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise _fail(index, f"shard {name!r} is not a file name in the folder")
        return [os.path.join(folder, name) for name in files]
    if os.path.isfile(single):
        return [single]
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("pytorch_model.bin", "tf_model.h5")):
        raise _fail(folder, f"only pickled or TensorFlow weights: smallmind reads {WEIGHTS_FILE} "
                            f"(pickle can run code; convert with transformers' "
                            f"save_pretrained(..., safe_serialization=True))")
    raise _fail(folder, f"no {WEIGHTS_FILE} or {INDEX_FILE}")


def _read_config(folder) -> ModelConfig:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise _fail(folder, f"no {CONFIG_FILE}: not a Hugging Face model folder") from None
    except (OSError, ValueError, RecursionError) as e:
        raise _fail(path, f"not JSON ({e})") from None
    return config_from_hf(obj, path)


def from_pretrained(folder) -> TransformerModel:
    """A TransformerModel (eval mode) from a Hugging Face GPT-2 folder (see the module doc)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder")
    cfg = _read_config(folder)
    files = _weight_files(folder)
    model = TransformerModel.empty(cfg)
    try:
        views = model.layout.views(model.flat_params)
        seen: set[str] = set()
        lm_head: dict[str, np.ndarray] = {}
        for path in files:
            def fill(name, dtype, shape, path=path):
                key = name if name.startswith("transformer.") or name == "lm_head.weight" \
                    else "transformer." + name
                if key.endswith(_BUFFERS):
                    return None
                if key == "lm_head.weight":
                    lm_head["w"] = np.empty(shape, np.float32)
                    return lm_head["w"]
                if key not in views:
                    raise _fail(path, f"unexpected tensor {name!r} (not a GPT-2 weight)")
                if key in seen:
                    raise _fail(path, f"tensor {name!r} appears twice")
                if tuple(shape) != views[key].shape:
                    raise _fail(path, f"{name} has shape {tuple(shape)}, the config needs "
                                      f"{views[key].shape}")
                seen.add(key)
                return views[key]
            _safetensors.read_into(path, fill)
        missing = [k for k in views if k not in seen]
        if missing:
            raise _fail(folder, f"weights missing: {missing[:3]}")
        if "w" in lm_head and not np.array_equal(lm_head["w"], views["transformer.wte.weight"]):
            raise _fail(folder, "lm_head.weight differs from the token embedding (an untied head "
                                "is not supported)")
        for name, v in views.items():
            if not np.isfinite(v).all():
                raise _fail(folder, f"{name} contains NaN or infinite values")
    except BaseException:
        model.close()
        raise
    return model.eval()


def load_pretrained(folder, *, dtype: str | None = None
                    ) -> tuple[TransformerModel, BPETokenizer | None]:
    """(model, tokenizer) from a Hugging Face GPT-2 folder: the tokenizer from tokenizer.json, else
    vocab.json + merges.txt, else None. dtype: "bf16" / "int8" quantize the model as it loads
    (None or "float32": as stored; TransformerModel.astype)."""
    if dtype not in (None, "float32", "bf16", "int8"):
        raise ValidationError(f"dtype must be None, 'float32', 'bf16' or 'int8', got {dtype!r}")
    folder = os.fspath(folder)
    model = from_pretrained(folder)
    try:
        tok = None
        tj = os.path.join(folder, "tokenizer.json")
        vj, mt = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(tj):
            tok = BPETokenizer.from_tokenizer_json(tj)
        elif os.path.isfile(vj) and os.path.isfile(mt):
            tok = BPETokenizer.from_hf(vj, mt)
        if tok is not None and tok.vocab_size > model.config.vocab_size:
            raise _fail(folder, f"the tokenizer has {tok.vocab_size} ids but the model only "
                                f"{model.config.vocab_size}")
    except BaseException:
        model.close()
        raise
    return model._loaded_as(dtype), tok


# ---- out ------------------------------------------------------------------------------------------

def _hf_config(cfg: ModelConfig, tokenizer) -> dict:
    eos = (tokenizer.eos_id if isinstance(tokenizer, BPETokenizer)
           else None)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": _LN_EPS,
            "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eos,
            "eos_token_id": eos, "torch_dtype": "float32"}


def _tokenizer_files(tok: BPETokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json (+ vocab.json, merges.txt, tokenizer_config.json for GPT-2's pattern), as
    Hugging Face tokenizers writes them for a byte-level BPE."""
    from .bpe import PATTERNS, byte_level_text
    if tok.merges is None:
        raise ValidationError("save_pretrained writes merge lists; this tokenizer was built from "
                              "tiktoken ranks, which have none (not supported yet)")
    specials = tok.special_tokens
    vocab = {}
    for i, t in enumerate(tok.tokens):
        if t:
            vocab[byte_level_text(t)] = i
    for s, i in specials.items():
        vocab[s] = i
    merges = [f"{byte_level_text(a)} {byte_level_text(b)}" for a, b in tok.merges or []]
    if tok.pattern == "gpt2":
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERNS[tok.pattern]}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
                           for s, i in sorted(specials.items(), key=lambda kv: kv[1])],
          "normalizer": None, "pre_tokenizer": pre, "post_processor": level, "decoder": level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None,
                    "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                    "byte_fallback": False, "ignore_merges": tok.whole_words,
                    "vocab": vocab, "merges": merges}}
    eos = "<|endoftext|>" if "<|endoftext|>" in specials else None
    files = {"tokenizer.json": json.dumps(tj, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(
                 {"tokenizer_class": "GPT2Tokenizer" if tok.pattern == "gpt2" else
                  "PreTrainedTokenizerFast", "model_max_length": block_size,
                  "bos_token": eos, "eos_token": eos, "unk_token": eos,
                  "add_prefix_space": False, "clean_up_tokenization_spaces": False})}
    if tok.pattern == "gpt2" and not tok.whole_words:
        files["vocab.json"] = json.dumps(vocab, ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    return files


def _write_text(path: str, text: str) -> None:
    """Atomically: a temporary file in the same folder, renamed over the target."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pretrained(model: TransformerModel, folder, tokenizer: BPETokenizer | None = None) -> None:
    """Write a Hugging Face GPT-2 folder that transformers' GPT2LMHeadModel (and, with a
    BPETokenizer, AutoTokenizer) loads as it is: config.json, model.safetensors (metadata format
    "pt") and the tokenizer files. Each file is written atomically."""
    if not isinstance(model, TransformerModel):
        raise TypeError(f"model must be a TransformerModel, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, BPETokenizer):
        raise ValidationError("save_pretrained writes byte-level BPE tokenizers; the character "
                              "Tokenizer has no Hugging Face form yet (pass tokenizer=None to "
                              "write the model alone)")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValidationError(f"tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {model.config.vocab_size}")
    folder = os.fspath(folder)
    files = _tokenizer_files(tokenizer, model.config.block_size) if tokenizer is not None else {}
    os.makedirs(folder, exist_ok=True)
    with model.exclusive():
        _safetensors.save_file(dict(model.state_dict()), os.path.join(folder, WEIGHTS_FILE),
                               {"format": "pt"})
    _write_text(os.path.join(folder, CONFIG_FILE),
                json.dumps(_hf_config(model.config, tokenizer), indent=2))
    for name, text in files.items():
        _write_text(os.path.join(folder, name), text)
