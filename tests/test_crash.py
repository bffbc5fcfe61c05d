"""test_crash.py - crash consistency of checkpoints: a training process killed with SIGKILL
while it saves every step leaves only complete checkpoints (each loads in full), never goes
backwards, resumes, and its next run removes the half-written temporaries (the driver is
tools/crash_consistency.py; docs/reliability.md quotes a longer run). Truncated checkpoints are
rejected at every length."""
import os
import sys

import numpy as np
import pytest

import smallmind as sm

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.skipif(not os.path.isdir(TOOLS), reason="tools/ is not in this checkout")
def test_kill_9_while_saving_never_loses_a_checkpoint(tmp_path):
    sys.path.insert(0, TOOLS)
    import crash_consistency
    st = crash_consistency.run(kills=8, seed=1, workdir=str(tmp_path), verbose=False)
    assert st["kills"] == 8 and st["resumes"] == 7
    assert st["files_verified"] >= 8
    assert st["rollbacks"] == 0
    assert st["final_step"] == st["expected_final_step"]
    assert st["temporaries_left"] == 0 and st["temporaries_not_removed"] == 0
    assert len(st["generated"]) == 20


def test_truncated_checkpoint_is_never_taken_for_a_good_one(tmp_path):
    tok = sm.Tokenizer("abcdef ")
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 8, 1, 2, 8, seed=0))
    path = tmp_path / "m.safetensors"
    sm.save_checkpoint(path, model, tok, training={"step": 1})
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    rng = np.random.default_rng(0)
    lengths = sorted(set(range(0, 64)) | set(rng.integers(64, len(data), 200).tolist()))
    for n in lengths:
        cut.write_bytes(data[:n])
        with pytest.raises(sm.CheckpointError):
            sm.read_checkpoint(cut)
    # A stray tail of bytes after the last tensor is rejected too.
    cut.write_bytes(data + b"\0")
    with pytest.raises(sm.CheckpointError):
        sm.read_checkpoint(cut)


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    from smallmind import safetensors as _safetensors
    dead = 2 ** 22 + 12345          # above Linux's default pid_max: no such process
    stale = tmp_path / f".model_last.safetensors.{dead}.1.0badcafe.tmp"
    live = tmp_path / f".model_last.safetensors.{os.getpid()}.1.0badcafe.tmp"
    other = tmp_path / ".notes.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert _safetensors.remove_stale_temporaries(tmp_path) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()
