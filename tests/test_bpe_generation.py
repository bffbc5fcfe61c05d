"""test_bpe_generation.py - the byte-level BPE tokenizer through generation, serving, training
and checkpoints: streamed text equals decode() and never splits a character, the end-of-text
token ends a generation on every path (Sampling, generate_batch, BatchEngine), and a
checkpoint keeps the tokenizer's class."""
import codecs

import numpy as np
import pytest

import smallmind as sm
from smallmind.generation.engine import BatchEngine, SamplingParams
from smallmind.generation.openai_api import chat_logprobs
from smallmind.model.checkpoint import tokenizer_from_json

TEXT = ("naïve café – ünïcödé 日本語のテキスト and emoji 🎉🐍 mixed with plain English words. " * 30
        + "the quick brown fox jumps over the lazy dog. " * 30)
BPE = sm.BPETokenizer.train(TEXT, 320, special_tokens=["<|endoftext|>"])
EOS = BPE.eos_id


def _model(V=None, seed=1, T=64):
    return sm.TransformerModel(sm.ModelConfig(V or BPE.vocab_size, T, 2, 2, 32, seed=seed)).eval()


def _eos_model(strength: float, seed=1):
    """A model whose every logit row favours the end-of-text token by `strength` (its final
    LayerNorm outputs a constant vector e, and wte[eos] is a multiple of e)."""
    m = _model(seed=seed)
    sd = m.state_dict()
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(32).astype(np.float32)
    sd["transformer.ln_f.weight"][:] = 0.2
    sd["transformer.ln_f.bias"][:] = e
    sd["transformer.wte.weight"][EOS] = e * (strength / float(e @ e))
    return m


def test_the_tokenizer_has_the_end_of_text_token():
    assert EOS is not None and BPE.token_bytes(EOS) == b"<|endoftext|>"
    assert sm.Tokenizer("abc").eos_id is None


@pytest.mark.parametrize("seed", range(5))
def test_pieces_join_to_decode_and_never_split_a_character(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BPE.vocab_size, 200).tolist()
    ids = [i for i in ids if i != EOS]
    dec = BPE.piece_decoder()
    pieces = dec.push(ids[:70]) + dec.push(ids[70:])
    end = dec.end()
    assert len(pieces) == len(ids)
    assert "".join(pieces) + end == BPE.decode(ids)
    # every piece is the text of whole UTF-8 characters: what an incremental decoder gives
    ref = codecs.getincrementaldecoder("utf-8")("replace")
    assert pieces == [ref.decode(BPE.token_bytes(i)) for i in ids]


def test_a_character_split_over_tokens_arrives_whole():
    raw = "🐍".encode()
    single = [BPE.tokens.index(bytes([b])) for b in raw]
    dec = BPE.piece_decoder()
    assert dec.push(single) == ["", "", "", "🐍"] and dec.end() == ""
    dec = BPE.piece_decoder()
    assert dec.push(single[:2]) == ["", ""] and dec.end() == "\ufffd"
    assert sm.Tokenizer("ab").piece_decoder().push([1, 0]) == ["b", "a"]


def test_the_end_of_text_token_adds_no_text_unless_asked():
    ids = BPE.encode("the fox") + [EOS]
    assert BPE.piece_decoder().push(ids)[-1] == ""
    assert BPE.piece_decoder(hide_eos=False).push(ids)[-1] == "<|endoftext|>"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_text_is_the_decoded_tokens_and_streams_whole(seed):
    m = _model(seed=seed)
    s = sm.Sampling(m, BPE)
    r = s.generate("naïve café", 60, temperature=1.0, seed=seed, return_details=True)
    assert r.finish_reason in ("length", "stop")
    toks = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
    assert r.text == BPE.decode(toks)
    pieces = list(s.stream("naïve café", 60, temperature=1.0, seed=seed))
    assert "".join(pieces) == r.text
    assert all(p for p in pieces)
    batch = s.generate_batch(["naïve café", "日本語"], 60, temperature=1.0, seed=seed,
                             return_details=True)
    assert batch[0].text == r.text and batch[0].tokens == r.tokens


def test_greedy_end_of_text_stops_at_once():
    m = _eos_model(50.0)
    r = sm.Sampling(m, BPE).generate("the fox", 30, temperature=0, return_details=True)
    assert r.tokens == [EOS] and r.text == "" and r.finish_reason == "stop"


@pytest.mark.parametrize("seed", range(4))
def test_end_of_text_ends_every_path_at_the_same_token(seed):
    m = _eos_model(4.0, seed=seed)
    s = sm.Sampling(m, BPE)
    runs = [s.generate("the quick", 80, temperature=1.0, seed=100 + k, return_details=True)
            for k in range(6)]
    stopped = [r for r in runs if r.finish_reason == "stop"]
    assert stopped, "the end-of-text token was never drawn"
    for r in runs:
        if r.finish_reason == "stop":
            assert r.tokens[-1] == EOS and EOS not in r.tokens[:-1]
            assert r.text == BPE.decode(r.tokens[:-1])
        else:
            assert EOS not in r.tokens and len(r.tokens) == 80
    batch = s.generate_batch(["the quick"] * 6, 80, temperature=1.0, seed=100,
                             return_details=True)
    assert [(b.tokens, b.text, b.finish_reason) for b in batch] == \
        [(r.tokens, r.text, r.finish_reason) for r in runs]
    with BatchEngine(m, BPE, max_batch=4) as eng:
        for k, r in enumerate(runs):
            got = eng.generate("the quick", max_new_tokens=80, temperature=1.0, seed=100 + k)
            assert (got.tokens, got.text, got.finish_reason) == (r.tokens, r.text,
                                                                 r.finish_reason)
            streamed = "".join(eng.stream("the quick", max_new_tokens=80, temperature=1.0,
                                          seed=100 + k))
            assert streamed == r.text


def test_engine_logprobs_give_each_tokens_own_bytes():
    m = _model(seed=4)
    with BatchEngine(m, BPE, max_batch=2) as eng:
        ids = eng.encode("日本語")
        res = eng.generate_ids(ids, SamplingParams.make(max_new_tokens=1, temperature=0,
                                                        logprobs=3, vocab_size=BPE.vocab_size))
    tid = res.tokens[0]
    from smallmind.generation.engine import TokenInfo
    info = TokenInfo(tid, BPE.token_text(tid), -1.0, [(tid, BPE.token_text(tid), -1.0)])
    out = chat_logprobs([info], BPE)["content"][0]
    assert out["bytes"] == list(BPE.token_bytes(tid))
    assert out["top_logprobs"][0]["bytes"] == list(BPE.token_bytes(tid))


def test_training_and_checkpoints_keep_a_bpe_tokenizer(tmp_path):
    m = sm.TransformerModel(sm.ModelConfig(BPE.vocab_size, 32, 1, 2, 32, seed=2))
    tr = sm.Training(m, BPE, TEXT, 32, 4, seed=3)
    h = tr.train(3, 1e-3, warmup_steps=0, eval_every=0, log_every=0, checkpoint_dir=tmp_path)
    assert len(h.steps) == 3 and all(np.isfinite(h.train_loss))
    model, tok = sm.load_checkpoint(tmp_path)
    assert isinstance(tok, sm.BPETokenizer) and tok == BPE
    np.testing.assert_array_equal(model.flat_params, m.flat_params)
    again = sm.Training.resume(tmp_path / "model_last.safetensors", TEXT)
    assert again.tokenizer == BPE
    assert isinstance(tokenizer_from_json(sm.Tokenizer("abc").to_json()), sm.Tokenizer)
    with pytest.raises(sm.ValidationError, match="type must be one of"):
        tokenizer_from_json('{"type": "wordpiece"}')
    with pytest.raises(sm.ValidationError, match="tokenizer JSON"):
        tokenizer_from_json("{not json")


def test_other_objects_are_refused_as_tokenizers():
    m = _model()
    with pytest.raises(TypeError, match="Tokenizer or a BPETokenizer"):
        sm.Sampling(m, "gpt2")
    with pytest.raises(sm.ValidationError, match="symbols but the model"):
        sm.Sampling(_model(V=100), BPE)


def test_the_server_speaks_bpe():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from smallmind.generation.server import create_app
    m = _eos_model(4.0, seed=0)
    want = sm.Sampling(m, BPE).generate("the quick", 80, temperature=1.0, seed=100,
                                         return_details=True)
    assert want.finish_reason == "stop"
    with TestClient(create_app(m, BPE, model_name="bpe")) as c:
        r = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 80,
                                             "temperature": 1.0, "seed": 100}).json()
        assert r["choices"][0]["text"] == want.text
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == len(want.tokens)
        bad = c.post("/v1/completions", json={"prompt": "a <|endoftext|> b", "max_tokens": 2})
        assert bad.status_code == 400 and "endoftext" in bad.json()["error"]["message"]
