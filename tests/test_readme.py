"""test_readme.py - the README's Python examples run as written (so the README stays true), and
its test command is the one CI runs. The pages under docs/ are checked by test_docs.py."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_blocks import README, ROOT, fenced_blocks, python_blocks, run_block  # noqa: E402

_BLOCKS = python_blocks(README) if os.path.exists(README) else []


@pytest.mark.parametrize("name,code,skip", _BLOCKS or [pytest.param("", "", None, marks=pytest.mark.skip("no README"))],
                         ids=[b[0] for b in _BLOCKS] or None)
def test_readme_python_block_runs(name, code, skip, tmp_path, monkeypatch):
    run_block(code, name, skip, tmp_path, monkeypatch)


def test_readme_has_examples():
    if not os.path.exists(README):
        pytest.skip("no README")
    assert len(_BLOCKS) >= 4, "the README lost its Python examples (or the fence parser broke)"


def test_readme_test_command_is_the_one_ci_runs():
    """The README's second set-up command is run verbatim by .ci/run."""
    ci = os.path.join(ROOT, ".ci", "run")
    if not (os.path.exists(README) and os.path.exists(ci)):
        pytest.skip("README.md or .ci/run not in this copy")
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    commands = [code.strip() for info, _, code, _ in fenced_blocks(section) if info == "bash"]
    assert len(commands) == 2, commands
    assert commands[0].endswith("pip install . && smallmind"), commands[0]
    with open(ci, encoding="utf-8") as f:
        assert commands[1] in f.read().splitlines(), f".ci/run does not run {commands[1]!r}"
