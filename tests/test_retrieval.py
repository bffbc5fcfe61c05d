"""test_retrieval.py - embedders and retrieval: TF-IDF against a float64 recomputation, the
model embedder against the float64 reference model's hidden states, and an end-to-end run that
indexes a small corpus, retrieves the right passage for a question, builds the prompt and
answers with citations."""
import math
import os
import sys

import numpy as np
import pytest

import smallmind as sm

sys.path.insert(0, os.path.dirname(__file__))
import reference_model as ref  # noqa: E402

PASSAGES = [
    "The kettle boils water for tea; a whistle tells you the water is ready.",
    "Bees collect nectar from flowers and turn it into honey inside the hive.",
    "A compiler translates source code into machine code before the program runs.",
    "Glaciers are slow rivers of ice that carve valleys as they move downhill.",
    "The violin has four strings tuned in fifths and is played with a bow.",
    "Sourdough bread rises because wild yeast in the starter makes the dough airy.",
]


def test_tfidf_matches_a_float64_recomputation():
    emb = sm.TfidfEmbedder(max_features=20).fit(PASSAGES)
    assert emb.dim == 20 and list(emb.vocabulary) == sorted(emb.vocabulary)
    words = [sm.TfidfEmbedder._words(p) for p in PASSAGES]
    df = {w: sum(w in set(ws) for ws in words) for w in emb.vocabulary}
    assert min(df.values()) >= max(sum(w in set(ws) for ws in words)
                                   for w in set(sum(words, [])) - set(emb.vocabulary))
    text = "The water and the honey; THE water!"
    got = emb.embed(text)[0]
    want = np.zeros(20)
    for w in sm.TfidfEmbedder._words(text):
        if w in emb.vocabulary:
            want[emb.vocabulary[w]] += math.log(7 / (1 + df[w])) + 1
    want /= np.linalg.norm(want)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not emb.embed("zzz qqq").any()
    with pytest.raises(sm.ValidationError, match="not fitted"):
        sm.TfidfEmbedder().embed("x")
    with pytest.raises(sm.ValidationError, match="max_features"):
        sm.TfidfEmbedder(0)
    with pytest.raises(sm.ValidationError, match="no words"):
        sm.TfidfEmbedder().fit(["...", "!"])


def test_model_embedder_equals_reference_hidden_states():
    tok = sm.Tokenizer("".join(PASSAGES))
    model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 16, 2, 2, 24, seed=1)).eval()
    emb = sm.ModelEmbedder(model, tok)
    texts = ["bees and honey", "a" * 40, PASSAGES[0]]     # 40 and 72 chars: several windows
    got = emb.embed(texts)
    sd = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    for t, g in zip(texts, got):
        ids = tok.encode(t)
        wins = [ids[s:s + 16] for s in range(0, len(ids), 16)]
        want = sum(len(w) * ref.forward(sd, np.array([w]), n_head=2)[2]["xf"][0].mean(0)
                   for w in wins) / len(ids)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    assert emb.dim == 24
    with pytest.warns(sm.UnknownCharacterWarning):
        assert not emb.embed("\x00\x01").any()


def test_end_to_end_retrieval_prompt_and_answer():
    emb = sm.TfidfEmbedder(max_features=256).fit(PASSAGES)
    with sm.VectorIndex(emb.dim) as index:
        retriever = sm.Retriever(index, emb, k=2)
        ids = retriever.add_documents(PASSAGES, ids=[f"p{i}" for i in range(6)],
                                      metadata=[{"n": i} for i in range(6)])
        assert ids == [f"p{i}" for i in range(6)]
        for question, want in [("How do bees make honey?", "p1"),
                               ("What does a compiler do with source code?", "p2"),
                               ("Why does sourdough bread rise?", "p5"),
                               ("how many strings does a violin have", "p4")]:
            hits = retriever.retrieve(question)
            assert hits[0].id == want and len(hits) == 2 and hits[0].score > hits[1].score
            assert hits[0].text == PASSAGES[int(want[1])] and hits[0].metadata == {"n": int(want[1])}
        assert retriever.retrieve("zzz") == []
        builder = sm.PromptBuilder(max_chars=300)
        prompt = builder.build("How do bees make honey?", retriever.retrieve("How do bees make honey?"))
        assert prompt.startswith("Context:\n[1] Bees collect nectar") and prompt.endswith(
            "Question: How do bees make honey?\nAnswer:") and len(prompt) <= 300
        short = sm.PromptBuilder(max_chars=90).build("Why?", retriever.retrieve("bees honey", 3))
        assert len(short) <= 90 and "[1]" in short and "Question: Why?" in short
        text = "".join(PASSAGES) + "\n[]?:QACWHx0123456789"
        tok = sm.Tokenizer(text)
        model = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 64, 1, 2, 16, seed=2)).eval()
        answerer = sm.Answerer(retriever, builder, sm.Sampling(model, tok), max_new_tokens=20,
                               temperature=0)
        a = answerer.answer("How do bees make honey?")
        assert [c.id for c in a.citations] == [h.id for h in retriever.retrieve("How do bees make honey?")]
        assert a.citations[0].id == "p1" and len(a.citations) == 2
        assert a.prompt == prompt and isinstance(a.text, str) and len(a.text) <= 20
        with pytest.raises(sm.ValidationError, match="dimensional"):
            sm.Retriever(sm.VectorIndex(3), emb)
        with pytest.raises(sm.ValidationError, match="documents\\[0\\]"):
            retriever.add_documents(["qqq zzz"])
