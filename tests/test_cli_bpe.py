"""test_cli_bpe.py - the command line with byte-level BPE and Hugging Face folders: `train
--tokenizer bpe --vocab-size N`, generate / chat / serve from a GPT-2 folder, fine-tuning with
`train --init FOLDER`, and the flags that do not go together refused in one line."""
import io
import json
import os
import sys

import numpy as np
import pytest

import smallmind as sm
from smallmind import cli
from smallmind.config import InferenceOptions

SMALL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
         "--batch-size", "4", "--warmup", "2"]
from smallmind.model.corpus import builtin_corpus  # noqa: E402

TEXT = builtin_corpus(20000) + "the café sat on the mat; 日本語 and 🐍 too. " * 50


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A BPE run trained by the command, and its model exported as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("bpe-cli")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    ck = root / "run"
    rc = cli.main(["train", str(root / "text.txt"), "--tokenizer", "bpe", "--vocab-size", "300",
                   "--steps", "12", "--eval-every", "6", "--log-every", "6", "--checkpoint-dir",
                   str(ck)] + SMALL)
    assert rc == 0
    model, tok = sm.load_checkpoint(ck)
    model.save_pretrained(root / "hf", tok)
    return root, ck, model, tok


def test_train_learns_a_bpe_vocabulary_of_the_size_asked(runs):
    root, ck, model, tok = runs
    assert isinstance(tok, sm.BPETokenizer) and tok.vocab_size == 300
    assert model.config.vocab_size == 300
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # the learnt vocabulary is the library's, from the same text: the command adds nothing
    assert tok == sm.BPETokenizer.train(TEXT, 300)


def test_generate_from_a_run_and_from_its_hugging_face_folder_agree(runs, capsys):
    root, ck, model, tok = runs
    outs = []
    for where in (ck, root / "hf"):
        assert cli.main(["generate", str(where), "--prompt", "the café", "--max-tokens", "25",
                         "--seed", "5"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    inf = InferenceOptions()          # the command's defaults
    want = sm.Sampling(model.eval(), tok).generate("the café", 25, seed=5,
                                                    temperature=inf.temperature,
                                                    top_k=inf.top_k, top_p=inf.top_p)
    assert outs[0] == "the café" + want + "\n"


def test_chat_from_a_hugging_face_folder(runs, capsys, monkeypatch):
    root, _, model, tok = runs
    monkeypatch.setattr(sys, "stdin", io.StringIO("the mat\n/quit\n"))
    assert cli.main(["chat", str(root / "hf"), "--max-tokens", "6", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = sm.Sampling(model.eval(), tok).generate("the mat", 6, temperature=0)
    assert lines[0] == "> the mat" and "\n".join(lines[1:]) == want


def test_init_fine_tunes_the_folder_model(runs, capsys):
    root, _, model, tok = runs
    out = root / "tuned"
    rc = cli.main(["train", str(root / "text.txt"), "--init", str(root / "hf"), "--steps", "4",
                   "--batch-size", "2", "--block-size", "8", "--eval-every", "4",
                   "--checkpoint-dir", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "fine-tuning" in text
    tuned, tuned_tok = sm.load_checkpoint(out)
    assert tuned_tok == tok and tuned.config == model.config
    assert not np.array_equal(tuned.flat_params, model.flat_params)     # it did train
    ck = sm.read_checkpoint(out / "model_last.safetensors")
    assert ck.training["metadata"]["init"] == os.path.abspath(root / "hf")
    # it started from the folder's weights: they are the exported model's, bit for bit
    np.testing.assert_array_equal(sm.load_pretrained(root / "hf")[0].flat_params,
                                  model.flat_params)


@pytest.mark.parametrize("extra,match", [
    (["--init", "{hf}", "--n-layer", "2"], "--n-layer does not go with --init"),
    (["--init", "{hf}", "--tokenizer", "bpe"], "--tokenizer does not go with --init"),
    (["--init", "{hf}", "--block-size", "999"], "--block-size 999 must be between 1"),
    (["--init", "{root}/nothing"], "--init"),
    (["--vocab-size", "400"], "goes with --tokenizer bpe"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "vocab_size"),
    (["--resume", "{run}", "--tokenizer", "char"], "--tokenizer char does not match"),
    (["--resume", "{run}", "--vocab-size", "512"], "--vocab-size 512 does not match"),
    (["--resume", "{run}", "--init", "{hf}"], "--init starts a new run"),
])
def test_flags_that_do_not_go_together_are_one_line(runs, tmp_path, capsys, extra, match):
    root, ck, _, _ = runs
    argv = ["train", str(root / "text.txt"), "--checkpoint-dir", str(tmp_path / "x")]
    argv += [a.format(hf=root / "hf", root=root, run=ck) for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error:") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_broken_folder_is_one_line(runs, tmp_path, capsys):
    root = runs[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(root / "hf"):
        (bad / name).write_bytes((root / "hf" / name).read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["generate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error:") and "model_type" in err
    assert len(err.strip().splitlines()) == 1
