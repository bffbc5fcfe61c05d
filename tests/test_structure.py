"""test_structure.py - the conventions the package's structure rests on: one lifetime convention
for every owner of a resource, one parameter table (the C one) that agrees with Hugging Face
GPT-2, private names that stay inside their module, and generation metrics for every entry point.
"""
import ast
import math
import pathlib

import numpy as np
import pytest

import smallmind as sm
from smallmind.generation.engine import BatchEngine, SamplingParams
from smallmind.metrics import REGISTRY

PKG = pathlib.Path(sm.__file__).parent
TOK = sm.Tokenizer("abcdefgh ")


def _model():
    return sm.TransformerModel(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=8).eval()


# (factory, a call that uses the object); each owner of a resource follows one convention
OWNERS = {
    "TransformerModel": (_model, lambda m: m.forward(np.zeros((1, 2), np.int32))),
    "VectorIndex": (lambda: sm.VectorIndex(4), lambda ix: ix.add(np.ones((1, 4), np.float32))),
    "MemoryPool": (lambda: sm.MemoryPool(), lambda p: p.rent(16)),
    "PooledBuffer": (lambda: sm.default_pool().rent(16), lambda b: b.nbytes),
    "SamplerPool": (lambda: sm.SamplerPool(_model(), TOK, 1),
                    lambda p: p.get().__enter__()),
    "ThrottledInferenceService": (lambda: sm.ThrottledInferenceService(_model(), TOK, 1),
                                  lambda s: s._prepare(TOK.chars[0], 1, {})),
    "BatchEngine": (lambda: BatchEngine(_model(), TOK, max_batch=1),
                    lambda e: e.submit([1], SamplingParams(max_new_tokens=1), lambda ev: None)),
}


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_every_owner_closes_the_same_way(name):
    make, use = OWNERS[name]
    obj = make()
    use(obj) if name != "PooledBuffer" else None
    assert obj.closed is False and obj.disposed is False
    obj.close()
    obj.close()                                   # idempotent
    assert obj.closed is True and obj.disposed is True
    with pytest.raises(sm.ObjectDisposedError, match="closed|disposed|returned"):
        use(obj)
    obj.dispose()                                 # the same verb under the design's name
    with make() as inside:                        # and `with` closes on exit
        assert not inside.closed
    assert inside.closed
    other = make()
    other.dispose()
    assert other.closed


# Shapes written out here from GPT-2's definition, independently of the C table.
def _gpt2_shapes(V, T, L, C):
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    per = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C)),
           ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
           ("ln_2.weight", (C,)), ("ln_2.bias", (C,)), ("mlp.c_fc.weight", (C, 4 * C)),
           ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))]
    for layer in range(L):
        for k, s in per:
            shapes[f"transformer.h.{layer}.{k}"] = s
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def test_the_parameter_table_is_gpt2():
    cfg = sm.ModelConfig(vocab_size=11, block_size=7, n_layer=3, n_head=3, n_embd=12)
    lay = cfg.layout
    want = _gpt2_shapes(11, 7, 3, 12)
    assert list(lay.shapes().items()) == list(want.items())       # names, shapes and HF order
    assert sum(s.size for s in lay) == cfg.num_parameters()
    assert lay.num_floats >= cfg.num_parameters() and lay.num_floats % 16 == 0
    assert sm.model.layout.ParameterLayout.for_config(cfg) is lay  # cached per configuration
    # the initialisation rule of each tensor, as a fresh model applies it
    m = sm.TransformerModel(cfg)
    sd = m.state_dict()
    for spec in lay:
        v = sd[spec.name]
        if spec.init == "ones":
            assert np.all(v == 1) and ".ln_" in spec.name
        elif spec.init == "zeros":
            assert np.all(v == 0) and spec.name.endswith(".bias")
        else:
            std = 0.02 if spec.init == "normal" else 0.02 / math.sqrt(2 * cfg.n_layer)
            assert spec.name.endswith("weight")
            assert (spec.init == "residual") == spec.name.endswith("c_proj.weight")
            assert abs(float(v.std()) - std) < 0.35 * std, spec.name
    with pytest.raises(KeyError, match="no tensor named"):
        lay.spec("lm_head.weight")


def test_layout_views_fill_and_new_block():
    cfg = sm.ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    lay = cfg.layout
    block = lay.new_block()
    assert block.ctypes.data % 64 == 0 and block.size == lay.num_floats and not block.any()
    values = {s.name: np.full(s.shape, i + 1, np.float32) for i, s in enumerate(lay)}
    lay.fill(block, values)
    for name, v in lay.views(block).items():
        assert np.array_equal(v, values[name])
        assert np.shares_memory(v, block)
    assert block.sum() == sum(float(v.sum()) for v in values.values())   # padding untouched


def _imports_of_private_names(path):
    """(module, name) of every `from <smallmind module> import _name` in a source file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("smallmind")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((node.module, alias.name))
    return found


def test_private_names_stay_in_their_module():
    # Modules whose whole purpose is to be shared inside the package are private as modules
    # (a leading underscore on the module), not by their names: _core, _validate, _lifecycle,
    # _threadpool, _faults. Any other underscore name imported from another module is a leak.
    shared_modules = {"_core", "_validate", "_lifecycle", "_threadpool", "_faults"}
    leaks = []
    for path in PKG.rglob("*.py"):
        for module, name in _imports_of_private_names(path):
            if name in shared_modules:
                continue
            # the generation services drive Sampling's private async helpers (one subpackage)
            if path.parent.name == "generation" and module == "sampling":
                continue
            leaks.append(f"{path.relative_to(PKG)}: from {module} import {name}")
    assert leaks == []


def test_no_module_reaches_into_the_model():
    # The model's internals are reached through its documented surface only.
    private = ("._params", "._cfg", "._grads", "._lock", "._view(", "._names", "._forward_train",
               "._dropout_rng", "._check_alive")
    for path in PKG.rglob("*.py"):
        if path.name == "transformer.py":
            continue
        text = path.read_text()
        for attr in private:
            for line in text.splitlines():
                if "model" in line and attr in line:
                    pytest.fail(f"{path.relative_to(PKG)}: {line.strip()}")


def _generations():
    total = 0.0
    for line in REGISTRY.render_prometheus().splitlines():
        if line.startswith("smallmind_generations_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_generate_batch_records_each_sequence():
    s = sm.Sampling(_model(), TOK)
    before = _generations()
    s.generate_batch(["ab", "abc", "h"], 3, temperature=0)
    assert _generations() - before == 3
    s.generate("ab", 2, temperature=0)
    assert _generations() - before == 4
