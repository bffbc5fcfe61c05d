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
