"""test_cli.py - the `smallmind` command: `info` reports the build; bad subcommands fail cleanly."""
import pytest

import smallmind as sm
from smallmind import cli


def test_info_prints_build_facts(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"smallmind {sm.__version__}" in out
    for key in ("compiler", "openmp", "simd", "num_threads"):
        assert key in out


def test_unknown_subcommand_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_trains_then_generates(capsys, tmp_path):
    rc = cli.main(["demo", "--checkpoint-dir", str(tmp_path / "demo"), "--steps", "30", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                   "--block-size", "16", "--batch-size", "4", "--log-every", "10", "--tokens", "25",
                   "--prompt", "def "])
    assert rc == 0
    out = capsys.readouterr().out
    assert "step 30/30 | loss" in out and "| val " in out and "ETA" in out
    gen = out.split("--- generated ---\n", 1)[1].split("\n--- end ---")[0]
    assert gen.startswith("def ") and len(gen) >= 4 + 25 - 1
    # the demo keeps the model only (no optimizer state): small, and generate takes the folder
    saved = tmp_path / "demo" / "model_last.safetensors"
    assert os.listdir(tmp_path / "demo") == ["model_last.safetensors"]
    ck = sm.read_checkpoint(saved)
    assert ck.exp_avg is None and ck.training is None and ck.tokenizer is not None
    assert saved.stat().st_size < 4 * ck.config.num_parameters() + 65536
    assert f"smallmind generate {tmp_path / 'demo'}" in out


def test_demo_bad_option_is_one_clear_line(capsys):
    assert cli.main(["demo", "--n-embd", "30", "--n-head", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error:") and "n_embd" in err and "Traceback" not in err


def test_builtin_corpus_is_deterministic_and_large():
    from smallmind.model.corpus import builtin_corpus
    a = builtin_corpus()
    assert len(a) > 1_000_000
    assert builtin_corpus(1000) == a[:1000]
    assert "Abstract Base Classes" in a


# ---- train / generate / chat ---------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

SMALL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
         "--batch-size", "4", "--warmup", "2"]


def _corpus(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the cat sat on the mat. " * 100)
    (folder / "sub" / "b.md").write_text("a dog ran in the fog. " * 100)
    (folder / "skip.bin").write_bytes(b"\xff\xfe")
    return folder


def test_train_generate_chat_round_trip(tmp_path, capsys, monkeypatch):
    folder, ck = _corpus(tmp_path), tmp_path / "ck"
    rc = cli.main(["train", str(folder), "--steps", "30", "--eval-every", "15", "--log-every", "10",
                   "--checkpoint-dir", str(ck)] + SMALL)
    out = capsys.readouterr().out
    assert rc == 0 and "of 2 files" in out and "step 30/30" in out and "val" in out
    assert {"model_last.safetensors", "model_best.safetensors"} <= set(os.listdir(ck))
    rc = cli.main(["generate", str(ck / "model_last.safetensors"), "--prompt", "the ",
                   "--max-tokens", "20", "--seed", "3"])
    gen = capsys.readouterr().out
    # the prompt, 20 characters (newlines among them, possibly) and the line's end
    assert rc == 0 and gen.startswith("the ") and gen.endswith("\n") and len(gen) == 4 + 20 + 1
    # from a pipe: each prompt is echoed before its continuation, blank lines are skipped,
    # /quit ends
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("the cat\n\nthe dog\n/quit\nignored\n"))
    rc = cli.main(["chat", str(ck / "model_best.safetensors"), "--max-tokens", "8",
                   "--temperature", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[0::2] == ["> the cat", "> the dog"] and len(lines) == 4
    assert all(len(line) == 8 for line in lines[1::2])


@pytest.mark.parametrize("argv,match", [
    (["train", "no/such/file.txt"], "no such file or folder"),
    (["train", "{empty}"], "no text files"),
    (["train", "{blank}"], "corpus is empty"),
    (["train", "{corpus}", "--steps", "-1"], "steps"),
    (["train", "{corpus}", "--n-embd", "30", "--n-head", "4"], "n_embd"),
    (["train", "{corpus}", "--preset", "huge"], "preset"),
    (["train", "{corpus}", "--resume", "{corpus}/nothing"], "nothing to resume"),
    (["train", "{corpus}", "--resume", "{corpus}"], "holds no checkpoint"),
    (["train", "{corpus}", "--steps", "0"], "at least 1"),
    (["generate", "missing.safetensors"], "no such checkpoint"),
    (["generate", "{corpus}"], "holds no checkpoint"),
    (["generate", "{corpus}/a.txt"], "safetensors"),
    (["serve", "missing.safetensors"], "no such checkpoint"),
    (["serve", "missing.safetensors", "--port", "70000"], "server.port"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, match):
    folder = _corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("  \n ")
    argv = [a.format(corpus=folder, empty=tmp_path / "empty", blank=tmp_path / "blank.txt")
            for a in argv]
    assert cli.main(argv + ["--checkpoint-dir", str(tmp_path / "ck")] if argv[0] == "train"
                    else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error:") and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
    folder, ck = _corpus(tmp_path), tmp_path / "ck"
    here = os.path.dirname(os.path.dirname(os.path.abspath(sm.__file__)))
    code = ("import sys; from smallmind import cli; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "train", str(folder), "--steps", "100000",
                             "--log-every", "1", "--eval-every", "0", "--checkpoint-dir", str(ck)]
                            + SMALL, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        seen = 0
        for line in proc.stdout:                 # wait until a few steps have run
            seen += "step" in line
            if seen >= 3:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    assert (ck / "model_cancelled.safetensors").exists()
    step = int(err.split("interrupted at step ")[1].split(" ")[0])
    assert step >= 3
    rc = cli.main(["train", str(folder), "--resume", str(ck), "--steps", str(step + 5),
                   "--eval-every", "0", "--log-every", "1", "--checkpoint-dir", str(ck)])
    out = capsys.readouterr().out
    assert rc == 0 and "resuming" in out and f"step {step + 5}/{step + 5}" in out


def test_bench_prints_kernel_and_generation_tables(capsys):
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "smallmind GFLOP/s" in out and "first token ms" in out
    rows = [line for line in out.splitlines() if line.split()[:1] == ["4/4/128"] or "(6/6/384)" in line]
    assert len(rows) == 2 and all(float(r.split()[-1]) > 0 for r in rows)


def test_train_writes_a_loss_curve_when_matplotlib_is_there(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder, ck = _corpus(tmp_path), tmp_path / "ck"
    assert cli.main(["train", str(folder), "--steps", "10", "--eval-every", "5", "--log-every", "5",
                     "--checkpoint-dir", str(ck)] + SMALL) == 0
    png = (ck / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "loss curve in" in capsys.readouterr().out


def test_progress_bar_on_a_terminal():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    infos = [{"step": i, "loss": 3.0 - i / 10, "tokens_per_sec": 1000.0} for i in range(1, 6)]
    infos[2] = dict(infos[2], val_loss=2.5)
    pytest.importorskip("tqdm")
    for use_tqdm in (True, False):
        out = Tty()
        p = cli.train._Progress(5, 1, out)
        assert p.bar is not None                 # tqdm is installed: it draws the bar
        if not use_tqdm:                         # the built-in line, as without tqdm
            p.bar.close()
            p.bar = None
            out.seek(0)
            out.truncate()
        for info in infos:
            p(info)
        p.end()
        text = out.getvalue()
        if use_tqdm:
            assert "5/5" in text and "val=2.500" in text and "loss=2.500" in text
        else:
            assert "\r[####" in text and "step 5/5 | loss 2.500 | val 2.500" in text
            assert text.endswith("\n") and not text.endswith("\n\n")
