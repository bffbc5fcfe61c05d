"""test_quantized_model.py - TransformerModel.quantize("bf16" | "int8"): an inference model whose
weight matrices are compact. Its forward pass is the float32 pass of the weights its codes stand
for (dequantize()), bit for bit; its prefill and decode steps agree with that model to float32
rounding; decoding does not depend on the thread count or on the other rows of a batch; and
everything that would train or read float32 weights refuses it. (Its checkpoint files:
test_quantized_checkpoint.py.)"""
import numpy as np
import pytest

import smallmind as sm
from smallmind.core import _core

FORMATS = [("bf16", None), ("int8", None), ("int8", 32)]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TOK = sm.Tokenizer(TEXT)


def _model(C=64, L=2, V=None, T=64, seed=1):
    return sm.TransformerModel(sm.ModelConfig(V or TOK.vocab_size, T, L, 4, C, seed=seed)).eval()


@pytest.mark.parametrize("dtype,group", FORMATS)
def test_forward_is_the_dequantized_models_bit_for_bit(dtype, group):
    m = _model()
    q = m.quantize(dtype, group=group)
    d = q.dequantize()
    assert q.dtype == dtype and d.dtype == "float32" and not q.training
    idx = np.random.default_rng(0).integers(0, m.config.vocab_size, (3, 40))
    np.testing.assert_array_equal(q.forward(idx), d.eval().forward(idx))
    lq, loss_q = q.forward(idx[:, :-1], idx[:, 1:])
    ld, loss_d = d.forward(idx[:, :-1], idx[:, 1:])
    assert loss_q == loss_d
    # and close to the float32 model it came from
    lf = m.forward(idx)
    assert np.abs(q.forward(idx) - lf).max() < (0.02 if dtype == "int8" else 0.01)


@pytest.mark.parametrize("dtype,group", FORMATS)
def test_prefill_and_decode_agree_with_the_dequantized_model(dtype, group):
    m = _model(C=128, L=3)                  # > 8 MB? no: the column split; see the next test
    q = m.quantize(dtype, group=group)
    d = q.dequantize().eval()
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, (1, 20)).astype(np.int32)
    outs = []
    for model in (q, d):
        cache = model.new_cache(1, 64)
        first = _core.gpt_prefill(model.flat_params, model.core_config, ids, cache, 1)
        step = _core.gpt_decode(model.flat_params, model.core_config, np.array([5], np.int32),
                                cache, 1)
        outs.append((first, step))
        cache.close()
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,group", FORMATS)
@pytest.mark.parametrize("width", [64, 256])     # 256: weights > 8 MB, the row-block split
def test_decoding_is_the_same_for_any_thread_count_and_batch(dtype, group, width):
    m = _model(C=width, L=2 if width == 64 else 4, T=128)
    q = m.quantize(dtype, group=group)
    s = sm.Sampling(q, TOK)
    want = [s.generate(p, 40, temperature=0.9, seed=3, return_details=True).tokens
            for p in ("the quick", "lazy dog. the")]
    for threads in (1, 2, 3):
        got = sm.Sampling(q, TOK, threads=threads).generate(
            "the quick", 40, temperature=0.9, seed=3, return_details=True).tokens
        assert got == want[0]
    batch = s.generate_batch(["the quick", "lazy dog. the"], 40, temperature=0.9, seed=3,
                             return_details=True)
    assert batch[0].tokens == want[0]
    # generate_batch gives prompt i the seed seed + i
    assert batch[1].tokens == s.generate("lazy dog. the", 40, temperature=0.9, seed=4,
                                         return_details=True).tokens


def test_the_batch_engine_serves_a_quantized_model():
    from smallmind.generation.engine import BatchEngine
    q = _model().quantize("int8")
    want = sm.Sampling(q, TOK).generate("the lazy", 30, temperature=0.8, seed=11)
    eng = BatchEngine(q, TOK, max_batch=4)
    try:
        assert eng.generate("the lazy", max_new_tokens=30, temperature=0.8, seed=11).text == want
    finally:
        eng.close()


def test_memory_is_the_compact_matrices():
    m = _model(C=256, L=4, T=128)
    i8, bf = m.quantize("int8"), m.quantize("bf16")
    weights = 4 * m.config.num_parameters()
    assert i8.nbytes < 0.3 * weights and bf.nbytes < 0.55 * weights


def test_what_needs_float32_weights_refuses_a_quantized_model(tmp_path):
    q = _model().quantize("bf16")
    for call, name in ((lambda: q.train(), "training"), (q.state_dict, "state_dict"),
                       (q.grads, "grads"), (lambda: q.save_pretrained(tmp_path), "save_pretrained"),
                       (lambda: q.load_state_dict({}), "load_state_dict"),
                       (lambda: q.quantize("int8"), "quantize"),
                       (lambda: sm.Training(q, TOK, TEXT, 16, 2), "training")):
        with pytest.raises(sm.ValidationError, match=name):
            call()
    q.eval()                                   # eval() is fine: it already is
    m = _model()
    with pytest.raises(sm.ValidationError, match="dtype"):
        m.quantize("int4")
    with pytest.raises(sm.ValidationError, match="divide"):
        m.quantize("int8", group=48)
    with pytest.raises(sm.ValidationError, match="group goes with"):
        m.quantize("bf16", group=32)
    assert "int8" in repr(m.quantize("int8"))


def test_the_server_reports_the_dtype_and_the_command_line_quantizes(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from smallmind import cli
    from smallmind.generation.server import create_app
    m = _model()
    q = m.quantize("int8")
    with TestClient(create_app(q, TOK, model_name="q8")) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["smallmind"]["dtype"] == "int8"
        assert 'dtype="int8"' in c.get("/metrics").text
        want = sm.Sampling(q, TOK).generate("the quick", 12, temperature=0)
        got = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 12,
                                               "temperature": 0}).json()
        assert got["choices"][0]["text"] == want
    path = tmp_path / "m.safetensors"
    m.save(path, TOK)
    for dtype in ("int8", "bf16"):
        assert cli.main(["generate", str(path), "--prompt", "the quick", "--max-tokens", "12",
                         "--temperature", "0", "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        want = sm.Sampling(m.quantize(dtype), TOK).generate("the quick", 12, temperature=0)
        assert out == "the quick" + want + "\n"
    with pytest.raises(SystemExit) as e:                  # argparse: not one of the choices
        cli.main(["generate", str(path), "--dtype", "int4"])
    assert e.value.code == 2
