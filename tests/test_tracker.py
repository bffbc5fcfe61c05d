"""test_tracker.py - MemoryTracker: a forward pass, a generation and an index search leave
nothing outstanding in the pool; peaks and snapshots record what happened in between; models,
indexes and pools report nbytes."""
import numpy as np
import pytest

import smallmind as sm


def test_work_leaves_nothing_outstanding_and_peaks_see_it():
    tok = sm.Tokenizer("abcdefgh ")
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 32, 2, 2, 32)).eval()
    index = sm.VectorIndex(32)
    index.add(np.random.default_rng(0).standard_normal((5000, 32)))
    with sm.MemoryTracker() as mt:
        model.forward(np.zeros((4, 32), np.int32))
        fwd = mt.snapshot("forward")
        text = sm.Sampling(model, tok).generate("abc", 40, temperature=0)
        gen = mt.snapshot("generate")
        index.search(np.ones((3, 32)), 5)
        mt.snapshot("search")
        assert mt.active_allocations == (0, 0)
        held = sm.default_pool().rent(1000)
        assert mt.active_allocations[0] == 1 and mt.active_allocations[1] >= 4000
        held.release()
        assert mt.active_allocations == (0, 0)
    assert len(text) == 40
    assert [s.phase for s in mt.snapshots] == ["start", "forward", "generate", "search", "end"]
    assert fwd.peak_outstanding_bytes > 0 and gen.peak_outstanding_bytes > 0
    assert all(s.outstanding_bytes == mt.snapshots[0].outstanding_bytes for s in mt.snapshots)
    assert mt.peak_outstanding_bytes >= fwd.peak_outstanding_bytes
    assert mt.snapshots[-1].rss_bytes > 0 and mt.snapshots[-1].peak_rss_bytes >= mt.snapshots[-1].rss_bytes // 2
    report = mt.report()
    assert "forward" in report and "generate" in report and len(report.splitlines()) == 6
    assert model.nbytes >= 4 * model.config.num_parameters()
    assert index.nbytes >= 5000 * 32 * 4 and sm.default_pool().nbytes >= 0
    with pytest.raises(sm.ValidationError, match="phase"):
        mt.snapshot(3)
    with pytest.raises(sm.ValidationError, match="pool"):
        sm.MemoryTracker(pool="default")


def test_tracker_on_its_own_pool():
    with sm.MemoryPool() as pool:
        mt = sm.MemoryTracker(pool).start()
        bufs = [pool.rent(256) for _ in range(3)]
        s = mt.snapshot("rented")
        assert (s.outstanding_buffers, mt.active_allocations[0]) == (3, 3)
        for b in bufs:
            b.release()
        assert mt.active_allocations == (0, 0) and mt.snapshot().phase == "#2"
