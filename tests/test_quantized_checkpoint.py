"""test_quantized_checkpoint.py - a quantized model's checkpoint: save() writes it compact (I8
codes with F32 scales, or BF16) and load() gives back the same model, bit for bit; the file is
standard safetensors that the `safetensors` package (and PyTorch, for BF16) reads to the same
values; broken or edited files are refused naming the tensor; nothing trains from one; and
`smallmind quantize IN OUT` writes one that generate, chat and serve use as it is."""
import json
import os

import numpy as np
import pytest

import smallmind as sm
from smallmind import safetensors as st
from smallmind.core import _core

FORMATS = [("bf16", None), ("int8", None), ("int8", 16)]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40
TOK = sm.Tokenizer(TEXT)


def _model(C=64, L=2, T=64, seed=1):
    return sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, T, L, 4, C, seed=seed)).eval()


def _idx(m, shape=(2, 30), seed=0):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, shape)


@pytest.mark.parametrize("dtype,group", FORMATS)
def test_save_and_load_give_back_the_same_model(tmp_path, dtype, group):
    q = _model().quantize(dtype, group=group)
    path = tmp_path / "q.safetensors"
    q.save(path, TOK)
    r, tok = sm.load_checkpoint(path)
    assert (r.dtype, r.quant_group, tok) == (dtype, group, TOK)
    assert not r.training and r.config == q.config
    idx = _idx(q)
    np.testing.assert_array_equal(r.forward(idx), q.forward(idx))
    s_q, s_r = sm.Sampling(q, TOK), sm.Sampling(r, TOK)
    assert s_r.generate("the quick", 40, temperature=0) == s_q.generate("the quick", 40,
                                                                        temperature=0)
    a, b = q.quantized_state_dict(), r.quantized_state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])
    assert sm.TransformerModel.load(path).dtype == dtype
    # saving the loaded model again writes the same bytes
    r.save(tmp_path / "again.safetensors", TOK)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_the_file_is_compact(tmp_path):
    m = _model(C=256, L=4, T=128)
    sizes = {}
    for name, model in (("float32", m), ("bf16", m.quantize("bf16")), ("int8", m.quantize("int8"))):
        model.save(tmp_path / f"{name}.safetensors")
        sizes[name] = os.path.getsize(tmp_path / f"{name}.safetensors")
    assert sizes["bf16"] < 0.55 * sizes["float32"]
    assert sizes["int8"] < 0.3 * sizes["float32"]


@pytest.mark.parametrize("dtype,group", FORMATS)
def test_the_safetensors_package_reads_the_same_values(tmp_path, dtype, group):
    safetensors = pytest.importorskip("safetensors")
    q = _model().quantize(dtype, group=group)
    path = tmp_path / "q.safetensors"
    q.save(path, TOK)
    mats = q.layout.compact_matrices()
    d = q.dequantize().state_dict()
    with safetensors.safe_open(str(path), "np") as f:
        meta = f.metadata()
        assert json.loads(meta["quantization"]) == {"dtype": dtype, "group": group}
        for name in f.keys():
            want = ("I8" if dtype == "int8" else "BF16") if name in mats else "F32"
            assert f.get_slice(name).get_dtype() == want, name
        if dtype == "int8":
            for name in mats:
                codes = f.get_tensor(name).astype(np.float32)
                scale = f.get_tensor(name + "_scale")
                # the documented meaning: scales apply per output, per `group` of the input axis
                if name == "transformer.wte.weight":       # (vocab, width): groups along width
                    w = codes * np.repeat(scale, codes.shape[1] // scale.shape[1], axis=1)
                else:                                       # (in, out): groups along in
                    w = codes * np.repeat(scale, codes.shape[0] // scale.shape[0], axis=0)
                np.testing.assert_array_equal(w, d[name])
        for name in f.keys():
            if name not in mats and not name.endswith("_scale"):
                np.testing.assert_array_equal(f.get_tensor(name), d[name])


def test_pytorch_reads_the_bf16_matrices(tmp_path):
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    q = _model().quantize("bf16")
    q.save(tmp_path / "q.safetensors", TOK)
    tensors = load_file(str(tmp_path / "q.safetensors"))
    d = q.dequantize().state_dict()
    for name in q.layout.compact_matrices():
        assert tensors[name].dtype == torch.bfloat16
        np.testing.assert_array_equal(tensors[name].float().numpy(), d[name])


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "q.safetensors"
    _model(seed=1).quantize("int8").save(path, TOK)
    before = path.read_bytes()

    def broken(f, a):
        raise OSError("disk full")
    monkeypatch.setattr(st, "_write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        _model(seed=2).quantize("int8").save(path, TOK)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["q.safetensors"]       # no temporary left behind


def _tamper(tmp_path, dtype="int8", group=None, edit=None, meta_edit=None, bf16=None):
    """A file as save() writes it, changed by edit(tensors) / meta_edit(meta) and written
    without checksums (so the loader's own checks are what refuse it)."""
    q = _model().quantize(dtype, group=group)
    tensors = q.quantized_state_dict()
    meta = {"format": "smallmind", "format_version": "1",
            "model_config": json.dumps(q.config.to_dict()),
            "quantization": json.dumps({"dtype": dtype, "group": group})}
    if edit:
        edit(tensors)
    if meta_edit:
        meta_edit(meta)
    if bf16 is None:
        bf16 = q.layout.compact_matrices() if dtype == "bf16" else []
    path = tmp_path / "bad.safetensors"
    st.save_file(tensors, path, meta, bf16=[n for n in bf16 if n in tensors])
    return path


C_ATTN = "transformer.h.0.attn.c_attn.weight"


def _set(name, value):
    def edit(t):
        t[name] = value(t[name])
    return edit


@pytest.mark.parametrize("case,kw,match", [
    ("scale < 0", dict(edit=_set(C_ATTN + "_scale", lambda s: -s)), "scales must be finite, >= 0"),
    ("scale huge", dict(edit=_set(C_ATTN + "_scale", lambda s: np.full_like(s, 3e37))),
     "<= 2.6e36"),
    ("scale NaN", dict(edit=_set(C_ATTN + "_scale", lambda s: s * np.nan)), "_scale.. contains NaN"),
    ("no scale", dict(edit=lambda t: t.pop(C_ATTN + "_scale")), "missing"),
    ("scale shape", dict(edit=_set(C_ATTN + "_scale", lambda s: np.concatenate([s, s]))),
     C_ATTN + "_scale"),
    ("codes dtype", dict(edit=_set(C_ATTN, lambda c: c.astype(np.int16))), "I8"),
    ("codes shape", dict(edit=_set(C_ATTN, lambda c: c[:-1].copy())), C_ATTN),
    ("float NaN", dict(edit=_set("transformer.ln_f.weight", lambda w: w * np.nan)),
     "transformer.ln_f.weight"),
    ("extra", dict(edit=lambda t: t.update(extra=np.zeros(3, np.float32))), "unexpected"),
    ("bf16 as U16", dict(dtype="bf16", bf16=[]), "must be BF16"),
    ("bf16 NaN", dict(dtype="bf16", edit=_set(C_ATTN, lambda c: c | np.uint16(0x7FC0))),
     "NaN or infinite"),
    ("bf16 with scales", dict(dtype="bf16", edit=lambda t: t.update(
        {C_ATTN + "_scale": np.ones((1, 192), np.float32)})), "unexpected"),
    ("dtype int4", dict(meta_edit=lambda m: m.update(quantization='{"dtype": "int4", "group": null}')),
     "int4"),
    ("group str", dict(meta_edit=lambda m: m.update(quantization='{"dtype": "int8", "group": "8"}')),
     "group"),
    ("group mismatch", dict(group=16, meta_edit=lambda m: m.update(
        quantization='{"dtype": "int8", "group": 8}')), "_scale"),
    ("metadata JSON", dict(meta_edit=lambda m: m.update(quantization="{")), "quantization"),
    ("training state", dict(meta_edit=lambda m: m.update(training="{}")), "training state"),
])
def test_broken_files_are_refused_naming_what_is_wrong(tmp_path, case, kw, match):
    path = _tamper(tmp_path, **kw)
    with pytest.raises(sm.CheckpointError, match=match):
        sm.load_checkpoint(path)


def test_the_untampered_file_of_the_tamper_helper_loads(tmp_path):
    for dtype in ("int8", "bf16"):
        assert sm.load_checkpoint(_tamper(tmp_path, dtype))[0].dtype == dtype


def test_an_edited_byte_is_refused_by_the_checksums(tmp_path):
    path = tmp_path / "q.safetensors"
    _model().quantize("int8").save(path, TOK)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(sm.CheckpointError, match="checksum"):
        sm.load_checkpoint(path)


def test_nothing_trains_from_a_quantized_checkpoint(tmp_path):
    q = _model().quantize("int8")
    path = tmp_path / "q.safetensors"
    q.save(path, TOK)
    with pytest.raises(sm.CheckpointError, match="cannot train"):
        sm.Training.resume(path, TEXT)
    t = sm.Training(_model().train(), TOK, TEXT, 16, 2)
    with pytest.raises(sm.CheckpointError, match="cannot train"):
        t.restore(path)
    with pytest.raises(sm.ValidationError, match="training state"):
        sm.save_checkpoint(tmp_path / "x.safetensors", q, TOK, training={"step": 1})


def test_from_quantized_state_dict_checks_its_arguments():
    q = _model().quantize("int8", group=16)
    t = q.quantized_state_dict()
    r = sm.TransformerModel.from_quantized_state_dict(q.config, t, "int8", 16)
    np.testing.assert_array_equal(r.forward(_idx(q)), q.forward(_idx(q)))
    with pytest.raises(sm.ValidationError, match="dtype"):
        sm.TransformerModel.from_quantized_state_dict(q.config, t, "int4")
    with pytest.raises(sm.ValidationError, match="_scale"):      # group 16 scales, group None
        sm.TransformerModel.from_quantized_state_dict(q.config, t, "int8", None)
    with pytest.raises(sm.ValidationError, match="is for a quantized model"):
        _model().quantized_state_dict()
    with pytest.raises(TypeError, match="config"):
        sm.TransformerModel.from_quantized_state_dict({}, t, "int8", 16)


def test_qmatrix_from_codes_validates_them():
    W = np.random.default_rng(0).standard_normal((32, 24)).astype(np.float32)
    q = _core.QMatrix(W, "int8", 8)
    for group, err in ((True, TypeError), (2.5, TypeError), (2**70, sm.ValidationError), (0, sm.ValidationError)):
        with pytest.raises(err, match="group"):
            _core.QMatrix(None, "int8", group, codes=q.codes, scales=q.scales_2d())
    with pytest.raises(TypeError, match="W must be a numpy array"):
        _core.QMatrix([[1.0]], "int8")
    with pytest.raises(sm.ValidationError, match="either W"):
        _core.QMatrix(W, "int8", 8, codes=q.codes)
    with pytest.raises(sm.ValidationError, match="codes must be int8"):
        _core.QMatrix(None, "int8", 8, codes=q.codes.astype(np.int16), scales=q.scales_2d())
    with pytest.raises(sm.ValidationError, match="scales must be float32"):
        _core.QMatrix(None, "int8", 8, codes=q.codes, scales=q.scales)   # flat, not (4, 24)
    with pytest.raises(sm.ValidationError, match="bf16 has no scales"):
        _core.QMatrix(None, "bf16", None, codes=np.zeros((4, 4), np.uint16),
                      scales=np.ones(1, np.float32))
    with pytest.raises(sm.ValidationError, match="scales go with codes"):
        _core.QMatrix(W, "int8", 8, scales=q.scales_2d())
    r = _core.QMatrix(None, "int8", 8, codes=q.codes, scales=q.scales_2d())
    np.testing.assert_array_equal(r.dequantize(), q.dequantize())
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(r.matvec(x), q.matvec(x))


def test_a_float32_checkpoint_may_hold_bf16_weights(tmp_path):
    """Other tools write bfloat16 weights: a float32 checkpoint file with BF16 tensors loads
    them widened (exactly) to float32."""
    m = _model()
    tensors = {}
    for name, v in m.state_dict().items():
        bits = (v.view(np.uint32) >> 16).astype(np.uint16)          # truncated to bf16
        tensors[name] = bits
    meta = {"format": "smallmind", "format_version": "1",
            "model_config": json.dumps(m.config.to_dict())}
    st.save_file(tensors, tmp_path / "b.safetensors", meta, bf16=list(tensors))
    r, _ = sm.load_checkpoint(tmp_path / "b.safetensors")
    for name, v in r.state_dict().items():
        np.testing.assert_array_equal(v, (tensors[name].astype(np.uint32) << 16).view(np.float32))


def test_bf16_tensors_in_the_safetensors_writer(tmp_path):
    bits = np.array([0x3F80, 0xC000], np.uint16)              # 1.0, -2.0
    st.save_file({"b": bits, "u": bits}, tmp_path / "b.safetensors", bf16=["b"])
    tensors, dtypes, _ = st.load_typed(tmp_path / "b.safetensors")
    assert dtypes == {"b": "BF16", "u": "U16"}
    np.testing.assert_array_equal(tensors["b"], bits)
    widened, _ = st.load_file(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(widened["b"], [1.0, -2.0])
    with pytest.raises(sm.ValidationError, match="must hold the bfloat16 bits as uint16"):
        st.save_file({"f": np.ones(2, np.float32)}, tmp_path / "x.safetensors", bf16=["f"])
    with pytest.raises(sm.ValidationError, match="not one of the tensors"):
        st.save_file({"f": bits}, tmp_path / "x.safetensors", bf16=["g"])
    with pytest.raises(TypeError, match="not one str"):
        st.save_file({"f": bits}, tmp_path / "x.safetensors", bf16="f")


# ---- the command line -------------------------------------------------------------------------

def test_smallmind_quantize_writes_what_generate_uses(tmp_path, capsys):
    from smallmind import cli
    m = _model()
    src = tmp_path / "m.safetensors"
    m.save(src, TOK)
    for dtype, group in FORMATS:
        out = tmp_path / f"{dtype}{group}.safetensors"
        args = ["quantize", str(src), str(out), "--dtype", dtype]
        assert cli.main(args + (["--group", str(group)] if group else [])) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        q, tok = sm.load_checkpoint(out)
        assert (q.dtype, q.quant_group, tok) == (dtype, group, TOK)
        np.testing.assert_array_equal(q.forward(_idx(m)), m.quantize(dtype, group=group).forward(_idx(m)))
        assert cli.main(["generate", str(out), "--prompt", "the quick", "--max-tokens", "12",
                         "--temperature", "0"]) == 0
        want = sm.Sampling(m.quantize(dtype, group=group), TOK).generate("the quick", 12,
                                                                        temperature=0)
        assert capsys.readouterr().out == "the quick" + want + "\n"


@pytest.mark.parametrize("extra,match", [
    (["--dtype", "bf16", "--group", "16"], "--group goes with --dtype int8"),
    (["--group", "7"], "--group: group must divide n_embd"),
])
def test_smallmind_quantize_refuses_bad_flags(tmp_path, capsys, extra, match):
    from smallmind import cli
    src = tmp_path / "m.safetensors"
    _model().save(src, TOK)
    assert cli.main(["quantize", str(src), str(tmp_path / "o.safetensors")] + extra) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_smallmind_quantize_keeps_files_and_refuses_a_second_quantization(tmp_path, capsys):
    from smallmind import cli
    src, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    _model().save(src, TOK)
    assert cli.main(["quantize", str(src), str(out)]) == 0
    before = out.read_bytes()
    assert cli.main(["quantize", str(src), str(out), "--dtype", "bf16"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli.main(["quantize", str(src), str(out), "--dtype", "bf16", "--overwrite"]) == 0
    assert sm.load_checkpoint(out)[0].dtype == "bf16"
    capsys.readouterr()
    for args, match in ((["quantize", str(out), str(tmp_path / "x.safetensors")], "already"),
                        (["generate", str(out), "--dtype", "int8"], "a second time"),
                        (["train", "--init", str(out), "--steps", "1"], "cannot train"),
                        (["quantize", str(src), str(tmp_path)], "is a folder")):
        assert cli.main(args) == 2, args
        assert match in capsys.readouterr().err


def test_loaders_take_a_dtype(tmp_path):
    """dtype= at load: quantize a float32 file or folder as it loads, dequantize a quantized
    one to float32, keep a file as stored (None or its own format), and refuse to quantize a
    quantized file into the other compact format."""
    m = _model()
    f32, q8 = tmp_path / "f.safetensors", tmp_path / "q8.safetensors"
    m.save(f32, TOK)
    m.quantize("int8").save(q8, TOK)
    idx = _idx(m)
    for dtype in ("bf16", "int8"):
        got, tok = sm.load_checkpoint(f32, dtype=dtype)
        assert got.dtype == dtype and tok == TOK
        np.testing.assert_array_equal(got.forward(idx), m.quantize(dtype).forward(idx))
    assert sm.TransformerModel.load(f32, dtype="float32").dtype == "float32"
    assert sm.TransformerModel.load(q8).dtype == "int8"
    assert sm.TransformerModel.load(q8, dtype="int8").dtype == "int8"
    q16 = tmp_path / "q16.safetensors"
    m.quantize("int8", group=16).save(q16, TOK)
    assert sm.TransformerModel.load(q16, dtype="int8").quant_group == 16   # as stored
    back = sm.TransformerModel.load(q8, dtype="float32")
    assert back.dtype == "float32"
    np.testing.assert_array_equal(back.forward(idx), m.quantize("int8").dequantize().forward(idx))
    with pytest.raises(sm.ValidationError, match="int8 already"):
        sm.load_checkpoint(q8, dtype="bf16")
    with pytest.raises(sm.ValidationError, match="dtype must be"):
        sm.load_checkpoint(f32, dtype="int4")
    q = m.quantize("int8", group=16)
    assert q.astype("int8", group=16) is q and m.astype("float32") is m
    with pytest.raises(sm.ValidationError, match="int8 already"):
        q.astype("int8")                                     # another grouping: a second rounding


def test_load_pretrained_takes_a_dtype(tmp_path):
    bpe = sm.BPETokenizer.train(TEXT, 300)
    big = sm.TransformerModel(sm.ModelConfig(bpe.vocab_size, 64, 2, 4, 64, seed=3)).eval()
    big.save_pretrained(tmp_path / "hf", bpe)
    got, tok = sm.load_pretrained(tmp_path / "hf", dtype="int8")
    assert got.dtype == "int8" and tok == bpe
    idx = np.arange(20)[None] % bpe.vocab_size
    np.testing.assert_array_equal(got.forward(idx), big.quantize("int8").forward(idx))
    assert sm.TransformerModel.from_pretrained(tmp_path / "hf", dtype="bf16").dtype == "bf16"
