"""test_checkpoint.py - model checkpoints: round trips, Hugging Face names readable by other
safetensors readers and PyTorch, and a CheckpointError (never a crash) for every bad file."""
import json
import os
import struct

import numpy as np
import pytest

import smallmind as sm
from smallmind import safetensors as _safetensors
from smallmind.model.checkpoint import read_checkpoint

TEXT = "to be, or not to be: that is the question.\n" * 20
TOK = sm.Tokenizer(TEXT)


def _model(seed=3, **kw):
    fields = dict(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=8, seed=seed)
    fields.update(kw)
    return sm.TransformerModel(sm.ModelConfig(**fields))


def test_round_trip_model_and_tokenizer(tmp_path):
    m = _model()
    path = tmp_path / "m.safetensors"
    m.save(path, TOK)
    m2, tok = sm.load_checkpoint(path)
    assert tok == TOK and m2.config == m.config and not m2.training
    assert np.array_equal(m2.flat_params, m.flat_params)
    idx = np.array([TOK.encode("to be")], dtype=np.int32)
    assert np.array_equal(m2.eval().forward(idx), m.eval().forward(idx))
    m3 = sm.TransformerModel.load(str(path))
    assert np.array_equal(m3.flat_params, m.flat_params)
    m.save(tmp_path / "notok.safetensors")
    assert sm.load_checkpoint(tmp_path / "notok.safetensors")[1] is None
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_file_holds_hf_names_readable_elsewhere(tmp_path):
    m = _model()
    path = tmp_path / "m.safetensors"
    m.save(path, TOK)
    tensors, meta = _safetensors.load_file(path)
    assert list(m.state_dict()) == sorted(tensors, key=list(m.state_dict()).index)
    assert set(tensors) == set(m.state_dict())
    assert json.loads(meta["model_config"])["n_embd"] == 8
    st = pytest.importorskip("safetensors.numpy")
    other = st.load_file(str(path))
    for k, v in m.state_dict().items():
        assert np.array_equal(other[k], v)


def test_checkpoint_loads_into_torch_gpt(tmp_path):
    torch = pytest.importorskip("torch")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from torch_gpt import from_numpy_state
    m = _model().eval()
    path = tmp_path / "m.safetensors"
    m.save(path)
    tensors, _ = _safetensors.load_file(path)
    tm = from_numpy_state(m.config, tensors).eval()
    idx = np.array([TOK.encode("or not to be")], dtype=np.int32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(idx.astype(np.int64)))[0].numpy()
    np.testing.assert_allclose(m.forward(idx), ref, rtol=1e-4, atol=1e-5)


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = _safetensors.load_file(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    _safetensors.save_file(tensors, dst, meta)


@pytest.mark.parametrize("case, match", [
    ("format", "not a smallmind checkpoint"),
    ("version", "format_version"),
    ("config_json", "model_config"),
    ("config_value", "n_embd"),
    ("config_missing", "model_config metadata is missing"),
    ("missing_tensor", "missing"),
    ("extra_tensor", "unexpected"),
    ("shape", "must be float32"),
    ("dtype", "must be float32"),
    ("nan", "NaN"),
    ("tokenizer", "tokenizer"),
    ("tokenizer_too_big", "symbols"),
    ("training_json", "training metadata"),
    ("half_optimizer", "optimizer state"),
])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, case, match):
    good = tmp_path / "good.safetensors"
    m = _model()
    m.save(good, TOK)
    bad = tmp_path / "bad.safetensors"
    w = "transformer.h.0.attn.c_attn.weight"
    edits = {
        "format": dict(edit_meta=lambda d: d.update(format="other")),
        "version": dict(edit_meta=lambda d: d.update(format_version="99")),
        "config_json": dict(edit_meta=lambda d: d.update(model_config="{nope")),
        "config_value": dict(edit_meta=lambda d: d.update(model_config=json.dumps(
            dict(json.loads(d["model_config"]), n_embd=7)))),
        "config_missing": dict(edit_meta=lambda d: d.pop("model_config")),
        "missing_tensor": dict(edit_tensors=lambda t: t.pop(w)),
        "extra_tensor": dict(edit_tensors=lambda t: t.update(foo=np.zeros(2, np.float32))),
        "shape": dict(edit_tensors=lambda t: t.update({w: t[w][:, :5].copy()})),
        "dtype": dict(edit_tensors=lambda t: t.update({w: t[w].astype(np.float64)})),
        "nan": dict(edit_tensors=lambda t: t[w].__setitem__((0, 0), np.nan)),
        "tokenizer": dict(edit_meta=lambda d: d.update(tokenizer='{"type": "bpe"}')),
        "tokenizer_too_big": dict(edit_meta=lambda d: d.update(
            tokenizer=sm.Tokenizer(TEXT + "XYZQW").to_json())),
        "training_json": dict(edit_meta=lambda d: d.update(training="[1, 2")),
        "half_optimizer": dict(edit_tensors=lambda t: t.update(
            {"optimizer.exp_avg." + k: v for k, v in m.state_dict().items()})),
    }
    _rewrite(good, bad, **edits[case])
    with pytest.raises(sm.CheckpointError, match=match) as e:
        sm.load_checkpoint(bad)
    assert str(bad) in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
    good = tmp_path / "good.safetensors"
    _model().save(good, TOK)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for n in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(sm.CheckpointError):
            sm.load_checkpoint(bad)
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(sm.CheckpointError):
        sm.load_checkpoint(bad)
    with pytest.raises(sm.CheckpointError, match="missing.safetensors"):
        sm.load_checkpoint(tmp_path / "missing.safetensors")


def test_restore_rejects_other_model_and_model_only_files(tmp_path):
    tr = sm.Training(_model(), TOK, TEXT, 16, 2)
    tr.train(1, log_every=0, checkpoint_dir=tmp_path)
    other = sm.Training(_model(n_embd=16), TOK, TEXT, 16, 2)
    with pytest.raises(sm.CheckpointError, match="not this model"):
        other.restore(tmp_path / "model_last.safetensors")
    _model().save(tmp_path / "plain.safetensors", TOK)
    with pytest.raises(sm.CheckpointError, match="no training state"):
        tr.restore(tmp_path / "plain.safetensors")
    with pytest.raises(sm.CheckpointError, match="tokenizer differs"):
        sm.Training(_model(), sm.Tokenizer.from_chars(TOK.chars[::-1]), TEXT, 16, 2).restore(
            tmp_path / "model_last.safetensors")


def test_training_checkpoint_contents(tmp_path):
    tr = sm.Training(_model(), TOK, TEXT, 16, 2)
    tr.train(3, log_every=0, checkpoint_dir=tmp_path)
    ck = read_checkpoint(tmp_path / "model_last.safetensors")
    assert ck.training["step"] == 3 and ck.training["adam_t"] == 3
    assert set(ck.exp_avg) == set(tr.model.state_dict())
    for name in ck.exp_avg:
        assert np.array_equal(ck.exp_avg[name], tr.model.layout.view(tr._m, name))
        assert np.array_equal(ck.exp_avg_sq[name], tr.model.layout.view(tr._v, name))


def test_failed_save_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    m = _model()
    m.save(path, TOK)
    before = path.read_bytes()
    m.state_dict()["transformer.wte.weight"][0, 0] += 1.0

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save(path, TOK)
    assert path.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_find_checkpoint_is_the_one_rule_for_naming_a_model(tmp_path):
    """A file names itself; a run's folder names its best model for use and its newest state
    for resuming; anything else is a CheckpointError saying what is missing."""
    from smallmind.model.checkpoint import BEST_FILE, CANCELLED_FILE, LAST_FILE
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(sm.CheckpointError, match="holds no checkpoint"):
        sm.find_checkpoint(run)
    with pytest.raises(sm.CheckpointError, match="no such checkpoint"):
        sm.find_checkpoint(tmp_path / "missing")
    with pytest.raises(TypeError, match="path"):
        sm.find_checkpoint(3.5)
    for i, name in enumerate((CANCELLED_FILE, LAST_FILE)):
        (run / name).write_bytes(b"x")
        os.utime(run / name, (1000 + i, 1000 + i))         # model_last is the newer
    assert sm.find_checkpoint(run) == str(run / LAST_FILE)           # no best: the newest
    assert sm.find_checkpoint(run, latest=True) == str(run / LAST_FILE)
    os.utime(run / CANCELLED_FILE, (2000, 2000))                     # now the cancel is newer
    assert sm.find_checkpoint(run, latest=True) == str(run / CANCELLED_FILE)
    (run / BEST_FILE).write_bytes(b"x")
    assert sm.find_checkpoint(run) == str(run / BEST_FILE)           # for use: the best
    assert sm.find_checkpoint(run, latest=True) == str(run / CANCELLED_FILE)
    assert sm.find_checkpoint(run / LAST_FILE) == str(run / LAST_FILE)
    only_best = tmp_path / "only_best"
    only_best.mkdir()
    (only_best / BEST_FILE).write_bytes(b"x")
    assert sm.find_checkpoint(only_best, latest=True) == str(only_best / BEST_FILE)


# ---- integrity: checksums of the header and of every tensor ---------------------------------

def _rewrite_header(path, edit):
    """Apply edit(header dict) to a safetensors file's JSON header, keeping the data as it is."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _saved_model(tmp_path):
    tok = sm.Tokenizer("abcdefgh ")
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 8, 1, 2, 8, seed=2))
    path = tmp_path / "m.safetensors"
    sm.save_checkpoint(path, model, tok)
    return path, model


def test_an_edited_header_field_that_shapes_cannot_reveal_is_refused(tmp_path, monkeypatch):
    """n_head 2 -> 4 keeps every tensor shape valid and changes the logits: only the checksum
    of the header can tell."""
    path, model = _saved_model(tmp_path)

    def more_heads(h):
        cfg = json.loads(h["__metadata__"]["model_config"])
        cfg["n_head"] = 4
        h["__metadata__"]["model_config"] = json.dumps(cfg, sort_keys=True)
    _rewrite_header(path, more_heads)
    with pytest.raises(sm.CheckpointError, match="metadata does not match their checksum"):
        sm.read_checkpoint(path)
    with pytest.raises(sm.CheckpointError, match="checksum"):
        sm.safetensors.read_metadata(path)
    # the documented opt-out loads it as it now says (a different model: the edit took effect)
    assert sm.read_checkpoint(path, verify=False).config.n_head == 4
    monkeypatch.setenv("SMALLMIND_VERIFY_CHECKSUMS", "0")
    assert sm.load_checkpoint(path)[0].config.n_head == 4
    model.close()


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_a_flipped_bit_in_any_tensor_is_refused(tmp_path, where):
    path, model = _saved_model(tmp_path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    data = 8 + n
    pos = {0: data, 0.5: data + (len(raw) - data) // 2, -1: len(raw) - 1}[where]
    raw[pos] ^= 0x01                           # one bit: still a finite float32, still loads
    path.write_bytes(bytes(raw))
    with pytest.raises(sm.CheckpointError, match="does not match its checksum"):
        sm.load_checkpoint(path)
    sm.read_checkpoint(path, verify=False)     # the opt-out reads it
    model.close()


def test_index_files_are_checked_too(tmp_path):
    ix = sm.VectorIndex(4)
    ix.add(np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"])
    path = tmp_path / "ix.safetensors"
    ix.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(sm.CheckpointError, match="'vectors' does not match its checksum"):
        sm.VectorIndex.load(path)


def test_files_without_checksums_still_load(tmp_path):
    """A checkpoint written before checksums (or by another tool) carries none: it loads."""
    path, model = _saved_model(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].pop("smallmind.sha256"))
    assert sm.read_checkpoint(path).config == model.config
    model.close()
