"""tools/memcheck_job.py - a short train / checkpoint / generate / index / pool job, small enough
to run under valgrind memcheck (tools/memcheck.sh) in a few minutes: every C entry point that the
main job uses runs at least once, on 1 and 2 OpenMP threads."""
import os
import sys
import tempfile

import numpy as np

import smallmind as sm


def main():
    text = sm.corpus.builtin_corpus(20_000)
    tok = sm.Tokenizer(text)
    cfg = sm.ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = sm.TransformerModel(cfg)
    trainer = sm.Training(model, tok, text, block_size=16, batch_size=4, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.train(6, learning_rate=1e-3, eval_every=3, eval_batches=1, checkpoint_dir=tmp,
                      threads=2)
        model, tok = sm.load_checkpoint(os.path.join(tmp, "model_last.safetensors"))
    sampler = sm.Sampling(model, tok, threads=1)
    a = sampler.generate("The ", max_new_tokens=20, temperature=0.8, top_k=10, seed=3)
    b = sm.Sampling(model, tok, threads=2).generate("The ", max_new_tokens=20, temperature=0.8,
                                                    top_k=10, seed=3)
    assert a == b, (a, b)
    # Past block_size: both window policies.
    for window in ("shift", "slide"):
        sm.Sampling(model, tok, window=window).generate("Th", max_new_tokens=24, temperature=0, seed=1)
    batch = sampler.generate_batch(["The ", "A", "And so"], 12, temperature=0.9, top_p=0.9, seed=5)
    assert len(batch) == 3

    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 19)).astype(np.float32)
    y = rng.standard_normal((19, 23)).astype(np.float32)
    np.testing.assert_allclose(sm.kernels.matmul(x, y, threads=2), x @ y, rtol=1e-4, atol=1e-4)

    with sm.VectorIndex(24, metric="cosine") as index:
        vecs = rng.standard_normal((300, 24)).astype(np.float32)
        index.add(vecs, ids=list(range(300)))
        index.remove([5, 6])
        ids, scores = index.search(vecs[:3], 4, threads=2)
        assert ids[0][0] == 0
        with tempfile.TemporaryDirectory() as tmp:
            index.save(os.path.join(tmp, "i.safetensors"))
            again = sm.VectorIndex.load(os.path.join(tmp, "i.safetensors"))
            assert len(again) == 298
            again.dispose()

    with sm.MemoryPool(max_buffer_size=1 << 16) as pool:
        for n in (1, 100, 4096):
            with pool.rent(n) as buf:
                view = np.asarray(buf)
                view[:] = 1.0
                del view
    model.dispose()
    print("memcheck job finished", file=sys.stderr)


if __name__ == "__main__":
    main()
