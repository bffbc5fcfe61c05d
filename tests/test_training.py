"""test_training.py - Training: learning, determinism (seeds, thread counts, concurrent trainers),
bit-exact resume in a fresh process, cancellation, checkpoints kept, logging and bad arguments."""
import json
import logging
import math
import os
import threading

import numpy as np
import pytest
from conftest import CountdownEvent, run_python

import smallmind as sm
from smallmind.model.training import BEST_FILE, CANCELLED_FILE, LAST_FILE

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")


def _text(n=6000):
    if os.path.exists(CORPUS):
        with open(CORPUS, encoding="utf-8") as f:
            return f.read()[:n]
    # Fallback: a deterministic pseudo-English text with structure a model can learn.
    rng = np.random.default_rng(0)
    words = ["the", "king", "shall", "speak", "to", "my", "lord", "and", "good", "night"]
    return " ".join(words[i] for i in rng.integers(0, len(words), n // 4))[:n]


TEXT = _text()
TOK = sm.Tokenizer(TEXT)


def _trainer(seed=42, dropout=0.0, block=16, batch=4, n_embd=16, model_seed=1, **kw):
    cfg = sm.ModelConfig(TOK.vocab_size, block, 2, 2, n_embd, dropout=dropout, seed=model_seed)
    return sm.Training(sm.TransformerModel(cfg), TOK, TEXT, block, batch, seed=seed, **kw)


def test_loss_falls_far_below_unigram_entropy():
    ids = TOK.encode_array(TEXT)
    p = np.bincount(ids) / len(ids)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    tr = _trainer(block=32, batch=16, n_embd=64)
    hist = tr.train(600, 3e-3, warmup_steps=10, log_every=0)
    assert hist.train_loss[0] > 0.9 * unigram            # starts near chance
    late = float(np.mean(hist.train_loss[-20:]))
    assert late < 0.6 * unigram, (late, unigram)
    assert tr.estimate_loss(5)["val"] < 0.85 * unigram    # and generalises somewhat


def test_same_seed_same_history_and_different_seed_differs():
    a = _trainer().train(8, 1e-2, log_every=0)
    b = _trainer().train(8, 1e-2, log_every=0)
    c = _trainer(seed=7).train(8, 1e-2, log_every=0)
    assert a.train_loss == b.train_loss and a.grad_norm == b.grad_norm
    assert a.train_loss != c.train_loss


def test_thread_count_does_not_change_bits():
    runs = []
    for threads in (1, 2):
        tr = _trainer(dropout=0.1, block=40, batch=6, n_embd=32)
        h = tr.train(5, 1e-2, grad_accum_steps=2, log_every=0, threads=threads)
        runs.append((h.train_loss, tr.model.flat_params.copy()))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])


def test_schedule_warmup_cosine_and_floor():
    lr = [sm.Training.lr_at(s, 1.0, 4, 14, 0.1) for s in range(16)]
    assert lr[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr[4] == pytest.approx(1.0)
    assert lr[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(x >= y for x, y in zip(lr[4:14], lr[5:15]))
    assert lr[14] == lr[15] == 0.1
    hist = _trainer().train(6, 0.5, warmup_steps=2, min_lr=0.05, log_every=0)
    assert hist.lr == pytest.approx([sm.Training.lr_at(s, 0.5, 2, 6, 0.05) for s in range(6)])


def test_weight_decay_skips_biases_layernorm_and_embeddings():
    tr = _trainer()
    model = tr.model
    before = {k: v.copy() for k, v in model.state_dict().items()}
    # lr > 0 with zero gradients (learning_rate tiny, decay huge) isolates the decay term
    model.zero_grad()
    sm._core.gpt_adamw(model.flat_params, tr._m, tr._v, model.flat_grads, model.core_config, 0.1, 0.9, 0.95,
                       1e-8, 1.0, 1)
    after = model.state_dict()
    for name, old in before.items():
        decayed = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        if decayed:
            np.testing.assert_allclose(after[name], old * (1 - 0.1), rtol=1e-6)
        else:
            assert np.array_equal(after[name], old), name


def test_resume_in_fresh_process_is_bit_exact(tmp_path):
    kw = dict(warmup_steps=2, grad_accum_steps=2, log_every=0, eval_every=3, eval_batches=2)
    full = _trainer(dropout=0.1)
    h_full = full.train(10, 1e-2, **kw)

    part = _trainer(dropout=0.1)
    h_part = part.train(4, 1e-2, lr_decay_steps=10, checkpoint_dir=tmp_path, **kw)
    assert h_part.train_loss == h_full.train_loss[:4]
    ck = tmp_path / LAST_FILE
    script = f"""
import json, numpy as np, smallmind as sm
text = open({str(tmp_path / 'text.txt')!r}, encoding='utf-8').read()
tr = sm.Training.resume({str(ck)!r}, text)
h = tr.train(10, 1e-2, **{kw!r})
np.save({str(tmp_path / 'params.npy')!r}, tr.model.flat_params)
print(json.dumps({{"loss": h.train_loss, "val": h.val_loss, "step": tr.step}}))
"""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    r = run_python(script)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["step"] == 10
    assert out["loss"] == h_full.train_loss[4:]
    assert out["val"] == h_full.val_loss[1:]           # evaluations at steps 6, 9, 10
    assert np.array_equal(np.load(tmp_path / "params.npy"), full.model.flat_params)


# Polls come before each step and before each extra micro-step (two per step here): with 2
# polls allowed the third (start of step 2) cancels; with 3 the fourth (inside step 2) does.
@pytest.mark.parametrize("polls", [2, 3])
def test_cancel_saves_consistent_checkpoint_and_resumes_exactly(tmp_path, polls):
    kw = dict(grad_accum_steps=2, log_every=0)
    ref = _trainer(dropout=0.1)
    h_ref = ref.train(6, 1e-2, **kw)

    tr = _trainer(dropout=0.1)
    # polls: one before each step and one before each extra micro-step -> 2 per step
    with pytest.raises(sm.CancelledError, match="cancelled at step 1"):
        tr.train(6, 1e-2, cancel=CountdownEvent(polls), checkpoint_dir=tmp_path, **kw)
    assert tr.step == 1
    one = _trainer(dropout=0.1)
    one.train(1, 1e-2, lr_decay_steps=6, **kw)
    assert np.array_equal(tr.model.flat_params, one.model.flat_params)   # last completed step kept
    path = tmp_path / CANCELLED_FILE
    assert path.exists() and not (tmp_path / LAST_FILE).exists()
    resumed = sm.Training.resume(path, TEXT)
    h = resumed.train(6, 1e-2, **kw)
    assert h.train_loss == h_ref.train_loss[1:]
    assert np.array_equal(resumed.model.flat_params, ref.model.flat_params)


def test_cancel_with_token_and_event_without_checkpoint_dir():
    src = sm.CancellationTokenSource()
    tr = _trainer()
    seen = []

    def cb(info):
        seen.append(info["step"])
        if info["step"] == 2:
            src.cancel()

    with pytest.raises(sm.CancelledError):
        tr.train(10, 1e-2, cancel=src.token, callback=cb, log_every=0)
    assert seen == [1, 2] and tr.step == 2
    ev = threading.Event()
    ev.set()
    with pytest.raises(sm.CancelledError):
        tr.train(10, 1e-2, cancel=ev, log_every=0)
    assert tr.step == 2
    with pytest.raises(TypeError, match="cancel"):
        tr.train(10, cancel=True)


def test_best_and_last_checkpoints(tmp_path):
    tr = _trainer()
    hist = tr.train(9, 1e-2, eval_every=3, eval_batches=2, log_every=0, checkpoint_dir=tmp_path)
    assert hist.val_steps == [3, 6, 9]
    best = tmp_path / BEST_FILE
    ck = sm.read_checkpoint(best)
    assert ck.training["best_val_loss"] == pytest.approx(min(hist.val_loss))
    assert ck.training["step"] == hist.val_steps[int(np.argmin(hist.val_loss))]
    last = sm.read_checkpoint(tmp_path / LAST_FILE)
    assert last.training["step"] == 9
    model, tok = sm.load_checkpoint(tmp_path / LAST_FILE)
    assert tok == TOK and not model.training
    assert np.array_equal(model.flat_params, tr.model.flat_params)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_save_every_writes_last(tmp_path):
    tr = _trainer()
    steps = []
    tr.train(4, 1e-2, save_every=2, checkpoint_dir=tmp_path, log_every=0,
             callback=lambda i: steps.append(sm.read_checkpoint(tmp_path / LAST_FILE).training["step"])
             if (tmp_path / LAST_FILE).exists() else steps.append(None))
    assert steps == [None, 2, 2, 4]


def test_non_finite_gradient_skips_the_update(caplog):
    tr = _trainer()
    sd = tr.model.state_dict()
    sd["transformer.ln_f.bias"][0] = np.inf
    before = tr.model.flat_params.copy()
    with caplog.at_level(logging.WARNING, logger="smallmind.training"):
        hist = tr.train(2, 1e-2, log_every=0)
    assert hist.skipped_steps == [1, 2]
    assert np.array_equal(tr.model.flat_params, before, equal_nan=True)
    assert "update skipped" in caplog.text


def test_logging_and_history(caplog):
    tr = _trainer()
    with caplog.at_level(logging.INFO, logger="smallmind.training"):
        hist = tr.train(4, 1e-2, log_every=2, eval_every=4, eval_batches=1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "smallmind.training"]
    assert any(m.startswith("step 2/4: loss") for m in msgs)
    assert any("val loss" in m for m in msgs)
    assert hist.steps == [1, 2, 3, 4] and len(hist) == 4
    assert all(t > 0 for t in hist.tokens_per_sec)
    assert set(hist.as_dict()) >= {"train_loss", "val_loss", "lr", "tokens_per_sec"}
    assert tr.train(4).steps == []                     # already at step 4: nothing to do


def test_independent_trainers_in_threads_equal_serial():
    serial = [_trainer(seed=s, model_seed=s).train(5, 1e-2, log_every=0).train_loss for s in (1, 2, 3)]
    results = {}

    def work(s):
        results[s] = _trainer(seed=s, model_seed=s).train(5, 1e-2, log_every=0, threads=1).train_loss

    ts = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [results[s] for s in (1, 2, 3)] == serial


def test_get_batch_shapes_and_shift():
    tr = _trainer(block=10, batch=3)
    x, y = tr.get_batch()
    assert x.shape == y.shape == (3, 10) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])
    xv, _ = tr.get_batch("val")
    text_ids = TOK.encode_array(TEXT)
    n_val = int(len(text_ids) * 0.1)
    val = text_ids[len(text_ids) - n_val:]
    row = xv[0]
    assert any(np.array_equal(val[i:i + 10], row) for i in range(len(val) - 10))
    with pytest.raises(sm.ValidationError, match="split"):
        tr.get_batch("test")


def test_bad_arguments():
    model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 1, 8))
    with pytest.raises(TypeError, match="model"):
        sm.Training("model", TOK, TEXT)
    with pytest.raises(TypeError, match="tokenizer"):
        sm.Training(model, "tok", TEXT)
    with pytest.raises(TypeError, match="text"):
        sm.Training(model, TOK, 42)
    with pytest.raises(sm.ValidationError, match="block_size"):
        sm.Training(model, TOK, TEXT, block_size=17)
    with pytest.raises(sm.ValidationError, match="batch_size"):
        sm.Training(model, TOK, TEXT, batch_size=0)
    with pytest.raises(sm.ValidationError, match="val_fraction"):
        sm.Training(model, TOK, TEXT, val_fraction=0.9)
    with pytest.raises(sm.ValidationError, match="too short"):
        sm.Training(model, TOK, TEXT[:100], block_size=16)
    with pytest.raises(sm.ValidationError, match="vocab_size"):
        small = sm.TransformerModel(sm.ModelConfig(3, 16, 1, 1, 8))
        sm.Training(small, TOK, TEXT)
    tr = sm.Training(model, TOK, TEXT, 16, 2)
    for kwargs, match in [(dict(steps=-1), "steps"), (dict(steps=2, learning_rate=-1), "learning_rate"),
                          (dict(steps=2, learning_rate=math.nan), "learning_rate"),
                          (dict(steps=2, grad_accum_steps=0), "grad_accum_steps"),
                          (dict(steps=2, save_every=1), "checkpoint_dir"),
                          (dict(steps=2, min_lr=1.0), "min_lr"),
                          (dict(steps=2, beta2=1.0), "beta2")]:
        with pytest.raises((sm.ValidationError, TypeError), match=match):
            tr.train(**kwargs)
    with pytest.raises(TypeError, match="steps"):
        tr.train(2.5)
    no_val = sm.Training(model, TOK, TEXT, 16, 2, val_fraction=0)
    with pytest.raises(sm.ValidationError, match="validation"):
        no_val.train(2, eval_every=1)
    model.dispose()
    with pytest.raises(sm.ObjectDisposedError):
        tr.train(2)


# ---- a run's identity: its text and metadata travel with its checkpoints ----------------------

def test_metadata_is_saved_and_restored_with_the_run(tmp_path):
    tr = _trainer()
    tr.metadata = {"data": ["/somewhere/notes.txt"], "options": {"steps": 6}}
    tr.train(3, checkpoint_dir=tmp_path, log_every=0)
    resumed = sm.Training.resume(tmp_path, TEXT)        # a run's folder: its latest state
    assert resumed.metadata == tr.metadata and resumed.step == 3
    state = sm.read_checkpoint(tmp_path / LAST_FILE).training
    assert state["hparams"]["steps"] == 3 and state["metadata"] == tr.metadata
    resumed.model.close()
    tr.model.close()
    with pytest.raises(sm.ValidationError, match="metadata must be JSON"):
        sm.Training(sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 2, 16)), TOK, TEXT,
                    metadata={"x": float("nan")})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        sm.Training(sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 16, 1, 2, 16)), TOK, TEXT,
                    metadata=["not", "a", "dict"])


def test_resuming_on_other_text_needs_new_data(tmp_path, caplog):
    tr = _trainer()
    tr.train(2, checkpoint_dir=tmp_path, log_every=0)
    tr.model.close()
    other = TEXT[len(TEXT) // 2:] + TEXT[:len(TEXT) // 2]          # same characters, other text
    assert sm.data_digest(TOK, other) != sm.data_digest(TOK, TEXT)
    with pytest.raises(sm.ValidationError, match="text is not the text .* new_data=True"):
        sm.Training.resume(tmp_path, other)
    with caplog.at_level(logging.WARNING, logger="smallmind.training"):
        tuned = sm.Training.resume(tmp_path, other, new_data=True)
    assert tuned.step == 2 and tuned.data_digest == sm.data_digest(TOK, other)
    assert "different text" in caplog.text
    tuned.model.close()


def test_a_call_with_nothing_to_do_writes_nothing(tmp_path):
    tr = _trainer()
    tr.train(2, checkpoint_dir=tmp_path, log_every=0)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    stamp = os.stat(tmp_path / LAST_FILE).st_mtime_ns
    for steps in (2, 1, 0):
        hist = tr.train(steps, checkpoint_dir=tmp_path, log_every=0)
        assert len(hist) == 0 and tr.step == 2
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    assert os.stat(tmp_path / LAST_FILE).st_mtime_ns == stamp
    tr.model.close()


@pytest.mark.parametrize("edit", [
    ("step", float("inf")), ("step", 10 ** 30), ("step", 3.5), ("step", "7"), ("step", -1),
    ("adam_t", 10 ** 30), ("best_val_loss", float("nan")), ("best_val_loss", 10 ** 400),
    ("rng.state", -1), ("rng.state", 2 ** 200), ("dropout_rng.state", -5),
], ids=lambda e: f"{e[0]}={str(e[1])[:8]}")
def test_resume_refuses_out_of_range_state_as_a_checkpoint_error(tmp_path, edit):
    """Values no run writes (an infinite or huge step, a negative generator state, a NaN best
    loss) are a CheckpointError naming the file - never an OverflowError from deep inside, and
    never accepted to fail later."""
    tr = _trainer()
    tr.train(1, log_every=0)
    state = json.loads(json.dumps(tr._training_state()))
    key, value = edit
    if "." in key:
        outer, inner = key.split(".")
        state[outer]["state"][inner] = value
    else:
        state[key] = value
    path = tmp_path / "edited.safetensors"
    sm.save_checkpoint(path, tr.model, TOK, training=state, optimizer=(tr._m, tr._v))
    with pytest.raises(sm.CheckpointError, match="edited.safetensors: invalid"):
        sm.Training.resume(path, TEXT)
    tr.model.close()


def test_an_unwritable_checkpoint_folder_is_found_before_any_step(tmp_path):
    tr = _trainer()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "sub"):
        with pytest.raises(sm.ValidationError, match="checkpoint_dir .* cannot be written"):
            tr.train(3, checkpoint_dir=folder, log_every=0)
        assert tr.step == 0
    tr.model.close()


def test_best_loss_moves_only_when_model_best_is_on_disk(tmp_path, monkeypatch):
    """A failed save of model_best (a full disk) leaves the best loss where the files say it is:
    model_last never carries a best that no file holds, and the next evaluation writes it."""
    tr = _trainer()
    real_save = tr._save
    fail = {"best": True}

    def save(path, state):
        if str(path).endswith(BEST_FILE) and fail["best"]:
            raise OSError(28, "No space left on device")
        real_save(path, state)
    monkeypatch.setattr(tr, "_save", save)
    with pytest.raises(OSError, match="No space left"):
        tr.train(2, eval_every=2, eval_batches=2, checkpoint_dir=tmp_path, log_every=0)
    assert tr.best_val_loss == math.inf and not (tmp_path / BEST_FILE).exists()
    fail["best"] = False
    tr.train(4, eval_every=2, eval_batches=2, checkpoint_dir=tmp_path, log_every=0)
    best = sm.read_checkpoint(tmp_path / BEST_FILE).training["best_val_loss"]
    last = sm.read_checkpoint(tmp_path / LAST_FILE).training["best_val_loss"]
    assert best == tr.best_val_loss == last and math.isfinite(best)
    tr.model.close()
