"""test_readme.py - the README's Python examples run as written (so the README stays true)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    if not os.path.exists(README):
        return []
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("i", range(len(_python_blocks())) or [pytest.param(0, marks=pytest.mark.skip("no README"))])
def test_readme_python_block_runs(i, capsys, tmp_path, monkeypatch):
    import smallmind as sm

    monkeypatch.chdir(tmp_path)   # the examples write checkpoints to relative paths

    before = sm.get_num_threads()
    try:
        exec(compile(_python_blocks()[i], f"README.md python block {i}", "exec"), {})
    finally:
        sm.set_num_threads(before)
