"""test_cli_session.py - the `smallmind` command driven as a user drives it: the installed command
in a subprocess (a pseudo-terminal where the terminal matters), in a folder of the user's own,
with the hint it prints followed to the letter. One test per defect of the command-line issue."""
import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import smallmind as sm
from smallmind import cli

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# A model small enough that a step takes milliseconds; one thread, so a busy machine does not
# slow the OpenMP team down (the results are the same with any thread count).
SMALL = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
         "--batch-size", "8", "--threads", "1"]


def command():
    """The installed `smallmind` command when smallmind is installed (as CI and users have it);
    `python -m smallmind` when the tests run against the source tree (PYTHONPATH)."""
    script = os.path.join(os.path.dirname(sys.executable), "smallmind")
    installed = not os.path.abspath(sm.__file__).startswith(REPO + os.sep)
    return [script] if installed and os.path.isfile(script) else [sys.executable, "-m", "smallmind"]


def env():
    e = dict(os.environ)
    if not os.path.abspath(sm.__file__).startswith(os.path.join(REPO, "")):
        return e
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(args, cwd, **kw):
    return subprocess.run(command() + args, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


def user_text(folder, name="mytext.txt", seed=1, n=12000):
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while a dog ran far in the fog and rain".split()
    path = folder / name
    path.write_text(" ".join(rng.choice(words, n)) + "\n")
    return path


def state_of(path):
    return sm.read_checkpoint(path).training


def interrupt_after(args, cwd, lines=3):
    """Start `smallmind train ...`, let `lines` progress lines pass, press Ctrl-C; the finished
    process and its stderr."""
    proc = subprocess.Popen(command() + args, cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("[")
            if seen >= lines:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc, err


def test_ctrl_c_hint_continues_the_same_run_in_its_folder_on_its_text(tmp_path):
    """The whole path after Ctrl-C: the printed command, followed exactly, continues the run on
    the user's text, in the user's folder, with the run's options - and ends bit for bit where
    the uninterrupted run ends."""
    user_text(tmp_path)
    # enough steps that Ctrl-C lands in the middle however fast the machine
    opts = ["--steps", "2000", "--learning-rate", "0.003", "--warmup", "7", "--eval-every", "500",
            "--log-every", "1"] + SMALL
    proc, err = interrupt_after(["train", "mytext.txt", "--checkpoint-dir", "ckc"] + opts,
                                tmp_path)
    assert proc.returncode == 130, err
    hint = re.search(r"continue with: (.*)", err).group(1)
    assert hint == "smallmind train --resume ckc/model_cancelled.safetensors"
    stopped = state_of(tmp_path / "ckc" / "model_cancelled.safetensors")["step"]
    assert 0 < stopped < 2000

    argv = shlex.split(hint)
    assert argv[0] == "smallmind"
    done = run(argv[1:] + ["--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming ckc/model_cancelled.safetensors at step {stopped} of 2000" in done.stdout
    assert "the run's text (mytext.txt)" in done.stdout and "checkpoints in ckc" in done.stdout
    assert "warning" not in done.stderr and "different" not in done.stderr
    assert not (tmp_path / "checkpoints").exists()            # nothing in the default folder
    last = tmp_path / "ckc" / "model_last.safetensors"
    state = state_of(last)
    assert state["step"] == 2000
    assert state["metadata"]["data"] == [str(tmp_path / "mytext.txt")]
    assert state["hparams"]["learning_rate"] == 0.003 and state["hparams"]["warmup_steps"] == 7

    # the same run without the interruption ends with the same weights, bit for bit
    straight = run(["train", "mytext.txt", "--checkpoint-dir", "straight"] + opts, tmp_path)
    assert straight.returncode == 0, straight.stderr
    a = sm.read_checkpoint(last).params
    b = sm.read_checkpoint(tmp_path / "straight" / "model_last.safetensors").params
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _finished_run(tmp_path, steps=40):
    user_text(tmp_path)
    r = run(["train", "mytext.txt", "--checkpoint-dir", "ck", "--steps", str(steps),
             "--eval-every", "20", "--log-every", "20"] + SMALL, tmp_path)
    assert r.returncode == 0, r.stderr
    return tmp_path / "ck"


def _snapshot(folder):
    return {n: (os.stat(folder / n).st_mtime_ns, (folder / n).read_bytes())
            for n in sorted(os.listdir(folder))}


def test_resume_on_other_text_needs_new_data(tmp_path):
    ck = _finished_run(tmp_path)
    user_text(tmp_path, "other.txt", seed=2)
    before = _snapshot(ck)
    r = run(["train", "other.txt", "--resume", "ck", "--steps", "60"], tmp_path)
    assert r.returncode == 2 and "--new-data" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("smallmind: error: other.txt is not the text")
    assert _snapshot(ck) == before
    # changed on disk since: refused too, saying so
    user_text(tmp_path, "mytext.txt", seed=3)
    r = run(["train", "--resume", "ck", "--steps", "60"], tmp_path)
    assert r.returncode == 2 and "has changed" in r.stderr and "--new-data" in r.stderr
    # explicitly asked for: fine-tuning on the other text, recorded as the run's text from now
    r = run(["train", "other.txt", "--resume", "ck", "--steps", "60", "--new-data",
             "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    state = state_of(ck / "model_last.safetensors")
    assert state["step"] == 60 and state["metadata"]["data"] == [str(tmp_path / "other.txt")]
    # --new-data without --resume is a mistake, not silently ignored
    r = run(["train", "other.txt", "--new-data"], tmp_path)
    assert r.returncode == 2 and "--new-data goes with --resume" in r.stderr


def test_nothing_to_do_is_said_in_words_and_rewrites_nothing(tmp_path):
    ck = _finished_run(tmp_path)
    before = _snapshot(ck)
    behind = run(["train", "--resume", "ck", "--steps", "10"], tmp_path)
    assert behind.returncode == 2
    assert "--steps 10 is behind the run" in behind.stderr and "step 40" in behind.stderr
    assert "nan" not in behind.stdout + behind.stderr and "done" not in behind.stdout
    again = run(["train", "--resume", "ck"], tmp_path)           # the finished run, once more
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert "nan" not in again.stdout
    assert _snapshot(ck) == before                                # no checkpoint rewritten
    zero = run(["train", "mytext.txt", "--steps", "0", "--checkpoint-dir", "zero"], tmp_path)
    assert zero.returncode == 2 and "at least 1" in zero.stderr
    assert not (tmp_path / "zero").exists()


def test_done_message_names_only_files_that_exist(tmp_path):
    user_text(tmp_path)
    r = run(["train", "mytext.txt", "--checkpoint-dir", "ck", "--steps", "20", "--eval-every", "0",
             "--log-every", "10"] + SMALL, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "not evaluated" in r.stdout and "nan" not in r.stdout
    assert "model_best" not in r.stdout and not (tmp_path / "ck" / "model_best.safetensors").exists()
    assert "ck/model_last.safetensors" in r.stdout


def test_model_and_seed_flags_on_resume_must_match_the_run(tmp_path):
    _finished_run(tmp_path)
    before = _snapshot(tmp_path / "ck")
    for flag in (["--n-layer", "3"], ["--preset", "tiny"], ["--seed", "5"],
                 ["--block-size", "64"]):
        r = run(["train", "--resume", "ck", "--steps", "50"] + flag, tmp_path)
        assert r.returncode == 2 and f"{' '.join(flag)} does not match the run" in r.stderr
    assert _snapshot(tmp_path / "ck") == before
    # the run's own values are accepted: a restart script may always pass the same command
    r = run(["train", "mytext.txt", "--resume", "ck", "--steps", "50", "--seed", "42"] + SMALL,
            tmp_path)
    assert r.returncode == 0, r.stderr
    assert state_of(tmp_path / "ck" / "model_last.safetensors")["step"] == 50


def test_options_before_the_command_are_not_dropped(tmp_path):
    user_text(tmp_path)
    r = run(["--steps", "7", "train", "mytext.txt"], tmp_path)
    assert r.returncode == 2 and not (tmp_path / "checkpoints").exists()
    assert "--steps goes after the command: smallmind train ... --steps" in r.stderr
    # a misspelled flag of a command: that command's usage, and the flag meant
    r = run(["train", "mytext.txt", "--step", "7"], tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("usage: smallmind train")
    assert "did you mean --steps?" in r.stderr
    # a file where the command goes: the command that trains on it
    r = run(["mytext.txt"], tmp_path)
    assert r.returncode == 2 and "smallmind train mytext.txt" in r.stderr


def test_bare_options_run_the_demo_with_them(tmp_path):
    r = run(["--steps", "3", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size",
             "16", "--batch-size", "2", "--tokens", "5", "--checkpoint-dir", ""], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trained 3 steps" in r.stdout and os.listdir(tmp_path) == []


def test_generate_chat_serve_and_resume_take_a_run_folder(tmp_path, monkeypatch):
    ck = _finished_run(tmp_path)
    r = run(["generate", "ck", "--prompt", "the ", "--max-tokens", "10", "--seed", "1"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("the ") and len(r.stdout) == 4 + 10 + 1
    assert "ck/model_best.safetensors" in r.stderr
    # the folder means its best model: the same text as naming the file
    f = run(["generate", "ck/model_best.safetensors", "--prompt", "the ", "--max-tokens", "10",
             "--seed", "1"], tmp_path)
    assert f.stdout == r.stdout
    r = run(["chat", "ck", "--max-tokens", "5"], tmp_path, input="the cat\n")
    assert r.returncode == 0 and r.stdout.startswith("> the cat\n")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import smallmind.generation.server as server
    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, tok, *a, **kw: seen.update(
        model=model, name=kw["model_name"]))
    assert cli.main(["serve", str(ck), "--port", "0"]) == 0
    assert seen["name"] == "ck" and seen["model"].config.n_layer == 2
    # the library's loader follows the same rule
    model, tok = sm.load_checkpoint(ck)
    assert model.config == seen["model"].config and tok is not None


def _pty_session(args, cwd, script, timeout=120):
    """Run the command on a pseudo-terminal; `script` is a list of (expected, keys): once the
    output since the last keys ends with `expected` (a str), or has reached `expected` bytes
    (an int), type `keys`. Returns (exit status,
    everything it printed)."""
    pid, fd = pty.fork()
    if pid == 0:                                        # the child: the command on a terminal
        os.chdir(cwd)
        os.execvpe(command()[0], command() + args, env())
    out, mark = b"", 0
    pending = [(e if isinstance(e, int) else e.encode(), k.encode()) for e, k in script]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:                          # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            expected = pending[0][0] if pending else None
            if pending and (len(out) - mark >= expected if isinstance(expected, int)
                            else out[mark:].endswith(expected)):
                os.write(fd, pending.pop(0)[1])
                mark = len(out)
        else:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace").replace("\r", "")


def _typed(*lines):
    """A chat script: each line typed at a fresh prompt."""
    return [("> ", line) for line in lines]


def test_chat_on_a_terminal_has_a_banner_help_and_says_goodbye(tmp_path):
    _finished_run(tmp_path)
    code, out = _pty_session(["chat", "ck", "--max-tokens", "6", "--temperature", "0"], tmp_path,
                             _typed("the cat\n", "\n", "/help\n", "/set temperature 2\n",
                                    "/nope\n", "/set top_p 5\n", "/quit\n"))
    assert code == 0, out
    assert "smallmind chat with ck/model_best.safetensors" in out
    assert "/help lists commands; /quit or Ctrl-D leaves" in out
    assert "/set NAME VALUE" in out                     # /help
    assert "temperature = 2.0" in out and "unknown command /nope" in out
    assert "cannot set top_p to 5" in out
    assert out.rstrip().endswith("bye")
    # an empty line did not end the chat: /help came after it and was answered
    assert out.index("/set NAME VALUE") > out.index("the cat")


def test_ctrl_c_in_chat_stops_the_reply_not_the_chat(tmp_path):
    _finished_run(tmp_path)
    # a reply far longer than the test waits for; Ctrl-C (the terminal's ^C) once it is flowing:
    # the echo of the line typed, then 20 characters of the reply
    code, out = _pty_session(["chat", "ck", "--max-tokens", "1000000", "--window", "slide"],
                             tmp_path, [("> ", "the cat\n"), (len("the cat\r\n") + 20, "\x03"),
                                        ("> ", "/quit\n")])
    assert code == 0, out
    assert "[stopped]" in out and out.rstrip().endswith("bye")


def test_warnings_are_one_line_in_the_commands_style(tmp_path):
    _finished_run(tmp_path)
    r = run(["generate", "ck", "--prompt", "the Ω cat", "--max-tokens", "3"], tmp_path)
    assert r.returncode == 0
    lines = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("smallmind: warning: ")
    assert "Ω" in lines[0] and ".py:" not in r.stderr and "warnings.warn" not in r.stderr


def test_internal_errors_are_not_reported_as_user_mistakes(monkeypatch, capsys):
    def broken(args):
        raise ValueError("an internal invariant failed")
    monkeypatch.setattr(cli, "cmd_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err and "please report" in err

    def user_mistake(args):
        raise sm.ValidationError("temperature must be >= 0")
    monkeypatch.setattr(cli, "cmd_info", user_mistake)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "smallmind: error: temperature must be >= 0\n"


def test_every_option_says_what_it_does_and_its_default():
    ap, parsers = cli.parser.build_parser()
    no_default = {"-h", "--help", "--config", "--resume", "--version"}
    for name, parser in parsers.items():
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and len(action.help) > 15, (name, flag)
            if action.option_strings and flag not in no_default:
                assert "default" in action.help, (name, flag)
        text = parser.format_help()
        assert "example" in text and f"smallmind {name}" in text.split("example", 1)[1], name
    assert "generation" in parsers["bench"].format_help()
    assert "config.py" not in parsers["train"].format_help()


def test_importing_the_uncompiled_source_tree_says_why(tmp_path):
    """After the set-up command the user is inside the clone: `import smallmind` there finds the
    source package, which has no compiled core. The error says so and what to do."""
    import shutil
    (tmp_path / "setup.py").write_text("# what marks a source checkout\n")
    shutil.copytree(os.path.join(REPO, "smallmind"), tmp_path / "smallmind",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import smallmind"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: smallmind's compiled core")
    assert "source tree" in last and "cd .." in last and "build_ext --inplace" in last


def test_the_demo_folder_stays_out_of_git_status():
    with open(os.path.join(REPO, ".gitignore")) as f:
        ignored = f.read().split()
    assert "/smallmind-demo/" in ignored and "/checkpoints/" in ignored


def test_every_documented_command_line_parses():
    """The commands the README and docs/ show (bash blocks, lines starting `smallmind`) are ones
    the command accepts: no option that does not exist, none in the wrong place."""
    from doc_blocks import fenced_blocks, markdown_files, rel
    checked = 0
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            blocks = fenced_blocks(f.read())
        for info, line_no, code, _ in blocks:
            if info not in ("bash", "sh", "shell"):
                continue
            for n, line in enumerate(code.splitlines()):
                if not line.startswith("smallmind "):
                    continue
                words = shlex.split(line, comments=True)
                ap, parsers = cli.parser.build_parser()
                try:
                    argv = cli.parser.with_command(words[1:], parsers)
                    args, extra = ap.parse_known_args(argv)
                except (SystemExit, cli.UserError) as e:
                    pytest.fail(f"{rel(path)}:{line_no + n}: {line!r} is refused ({e})")
                assert not extra, f"{rel(path)}:{line_no + n}: {line!r}: unknown {extra}"
                checked += 1
    assert checked >= 10                     # the README and docs/cli.md show a dozen


def test_a_new_run_does_not_overwrite_another_silently(tmp_path):
    ck = _finished_run(tmp_path)
    before = _snapshot(ck)
    r = run(["train", "mytext.txt", "--checkpoint-dir", "ck", "--steps", "5"] + SMALL, tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert "smallmind train --resume ck" in r.stderr and "--overwrite" in r.stderr
    assert _snapshot(ck) == before
    r = run(["train", "--resume", "ck", "--overwrite"], tmp_path)
    assert r.returncode == 2 and "--overwrite is for a new run" in r.stderr
    r = run(["train", "mytext.txt", "--checkpoint-dir", "ck", "--steps", "5", "--eval-every", "0",
             "--overwrite"] + SMALL, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(ck)) == ["model_last.safetensors"]         # the old run's are gone
    assert state_of(ck / "model_last.safetensors")["step"] == 5


def test_a_checkpoint_with_impossible_values_is_one_line_not_a_traceback(tmp_path):
    ck = _finished_run(tmp_path)
    ckpt = sm.read_checkpoint(ck / "model_last.safetensors")
    model, tok = sm.load_checkpoint(ck / "model_last.safetensors")
    for key, value in (("step", 10 ** 30), ("options", {"steps": 10 ** 30})):
        state = json.loads(json.dumps(ckpt.training))
        if key == "options":
            state["metadata"]["options"].update(value)
        else:
            state[key] = value
        path = tmp_path / f"edited-{key}.safetensors"
        sm.save_checkpoint(path, model, tok, training=state,
                           optimizer=(model.layout.new_block(), model.layout.new_block()))
        r = run(["train", "--resume", path.name], tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"smallmind: error: {path.name}: ") and "invalid" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    model.close()
