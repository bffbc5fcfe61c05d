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


def test_demo_trains_then_generates(capsys):
    rc = cli.main(["demo", "--steps", "30", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                   "--block-size", "16", "--batch-size", "4", "--log-every", "10", "--tokens", "25",
                   "--prompt", "def "])
    assert rc == 0
    out = capsys.readouterr().out
    assert "step    30/30: loss" in out and "val loss" in out
    gen = out.split("--- generated ---\n", 1)[1]
    assert gen.startswith("def ") and len(gen.rstrip("\n")) >= 4 + 25 - 1


def test_demo_bad_option_is_one_clear_line(capsys):
    assert cli.main(["demo", "--n-embd", "30", "--n-head", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smallmind: error:") and "n_embd" in err and "Traceback" not in err


def test_builtin_corpus_is_deterministic_and_large():
    from smallmind.corpus import builtin_corpus
    a = builtin_corpus()
    assert len(a) > 1_000_000
    assert builtin_corpus(1000) == a[:1000]
    assert "Abstract Base Classes" in a
