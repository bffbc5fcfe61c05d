"""Hugging Face GPT-2 folders in (smallmind/model/pretrained.py): against transformers where it is
installed (a GPT2LMHeadModel with random weights saved by save_pretrained, since nothing can be
downloaded: logits within 1e-4, greedy tokens equal, sharded files), and against folders written
here in the conventions other tools use (no "transformer." prefix, mask buffers, a tied lm_head,
F16/BF16 weights); every broken folder raises CheckpointError naming what is wrong."""
import json
import os

import numpy as np
import pytest

import smallmind as sm
from smallmind import safetensors as st
from smallmind.errors import CheckpointError

try:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:
    torch = None

HF_CONFIG = {"model_type": "gpt2", "vocab_size": 90, "n_positions": 32, "n_embd": 32,
             "n_layer": 2, "n_head": 2, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "scale_attn_weights": True,
             "tie_word_embeddings": True}


def write_folder(folder, model, config=None, rename=None, extra=None, dtype=np.float32):
    """A GPT-2 folder from a smallmind model, written the way other tools do."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or dict(HF_CONFIG), f)
    tensors = {(rename(k) if rename else k): v.astype(dtype) for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    st.save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    return folder


@pytest.fixture
def model():
    m = sm.TransformerModel(sm.ModelConfig(90, 32, 2, 2, 32, seed=5))
    yield m
    m.close()


@pytest.mark.skipif(torch is None, reason="transformers / torch are not installed")
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, shard):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2,
                                    n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kw)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    ours = sm.TransformerModel.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    for T in (1, 7, 64):
        ids = rng.integers(0, 300, (2, T)).astype(np.int32)
        with torch.no_grad():
            want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours.forward(ids), want, rtol=0, atol=1e-4)
    prompt = rng.integers(0, 300, (1, 5))
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                           pad_token_id=0)[0, 5:].tolist()
    seq = prompt[0].astype(np.int32).tolist()
    for _ in range(20):
        seq.append(int(ours.forward(np.array([seq], np.int32))[0, -1].argmax()))
    assert seq[5:] == want
    ours.close()


@pytest.mark.parametrize("style", ["ours", "no-prefix", "buffers+lm_head", "f16", "bf16"])
def test_folders_in_other_tools_conventions(tmp_path, model, style):
    extra, rename, dtype = {}, None, np.float32
    if style == "no-prefix":
        rename = lambda k: k[len("transformer."):]  # noqa: E731
    if style == "buffers+lm_head":
        extra = {f"transformer.h.{i}.attn.bias": np.ones((1, 1, 32, 32), np.float32) for i in range(2)}
        extra["lm_head.weight"] = model.state_dict()["transformer.wte.weight"].copy()
    if style == "f16":
        dtype = np.float16
    folder = write_folder(tmp_path / "m", model, rename=rename, extra=extra, dtype=dtype)
    if style == "bf16":     # write BF16 bits by hand (numpy has no bf16): the top halves
        tensors = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in model.state_dict().items()}
        path = os.path.join(folder, "model.safetensors")
        st.save_file({k: v for k, v in tensors.items()}, path, {"format": "pt"})
        raw = open(path, "rb").read()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
        open(path, "wb").write(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    loaded = sm.TransformerModel.from_pretrained(folder)
    for k, v in model.state_dict().items():
        want = v
        if style == "f16":
            want = v.astype(np.float16).astype(np.float32)
        if style == "bf16":
            want = ((v.view(np.uint32) >> 16) << 16).view(np.float32)
        np.testing.assert_array_equal(loaded.state_dict()[k], want, err_msg=k)
    assert not loaded.training
    loaded.close()


def broken(tmp_path, model, **kw):
    return write_folder(tmp_path / "m", model, **kw)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "llama", "model_type"), ("scale_attn_by_inverse_layer_idx", True,
                                            "scale_attn_by_inverse_layer_idx"),
    ("activation_function", "relu", "activation_function"), ("n_inner", 100, "n_inner"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"), ("tie_word_embeddings", False,
                                                         "tie_word_embeddings"),
    ("add_cross_attention", True, "add_cross_attention"), ("n_head", 5, "invalid model shape")])
def test_unsupported_options_name_the_field(tmp_path, model, field, value, message):
    folder = broken(tmp_path, model, config=dict(HF_CONFIG, **{field: value}))
    with pytest.raises(CheckpointError, match=message):
        sm.TransformerModel.from_pretrained(folder)


def _nan_ln(sd):
    return dict(sd, **{"transformer.h.0.ln_1.weight": np.full(32, np.nan, np.float32)})


# each: the tensors written instead of the model's, and what the error must say
BAD_TENSORS = {
    "missing": (lambda sd: {k: v for k, v in sd.items() if "ln_f" not in k}, "missing"),
    "shape": (lambda sd: dict(sd, **{"transformer.wpe.weight": np.zeros((31, 32), np.float32)}),
              "wpe.weight has shape"),
    "dtype": (lambda sd: {k: v.astype(np.int32) for k, v in sd.items()}, "I32"),
    "untied": (lambda sd: dict(sd, **{"lm_head.weight": np.zeros((90, 32), np.float32)}), "untied"),
    "nan": (_nan_ln, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_raise_checkpoint_error(tmp_path, model, case):
    make, message = BAD_TENSORS[case]
    folder = broken(tmp_path, model)
    st.save_file(make(dict(model.state_dict())), os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        sm.TransformerModel.from_pretrained(folder)


def test_broken_folders_raise_checkpoint_error(tmp_path, model):
    folder = broken(tmp_path, model)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])                     # truncated
    with pytest.raises(CheckpointError, match="truncated|cut short"):
        sm.TransformerModel.from_pretrained(folder)
    open(path, "wb").write(b"\xff" * 8 + b"{}")              # a hostile header length
    with pytest.raises(CheckpointError):
        sm.TransformerModel.from_pretrained(folder)
    os.remove(path)
    open(os.path.join(folder, "pytorch_model.bin"), "wb").write(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        sm.TransformerModel.from_pretrained(folder)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        sm.TransformerModel.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        sm.TransformerModel.from_pretrained(tmp_path / "nowhere")


def test_load_pretrained_brings_the_tokenizer(tmp_path):
    model = sm.TransformerModel(sm.ModelConfig(300, 32, 1, 2, 32, seed=1))
    folder = write_folder(tmp_path / "m", model, config=dict(HF_CONFIG, vocab_size=300, n_layer=1))
    model.close()
    m, tok = sm.load_pretrained(folder)
    assert tok is None
    m.close()
    bpe = sm.BPETokenizer.train(sm.corpus.builtin_corpus()[:20000], 300, special_tokens=())
    assert bpe.vocab_size == 300
    from smallmind.model.bpe import byte_level_text
    vocab = {byte_level_text(bpe.token_bytes(i)): i for i in range(bpe.vocab_size)}
    json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in bpe.merges:
            f.write(byte_level_text(a) + " " + byte_level_text(b) + "\n")
    m, tok = sm.load_pretrained(folder)
    text = sm.corpus.builtin_corpus()[:3000]
    assert isinstance(tok, sm.BPETokenizer) and tok.encode(text) == bpe.encode(text)
    m.close()
    with open(os.path.join(folder, "vocab.json"), "w") as f:          # more ids than the model
        json.dump(dict(vocab, **{"<|endoftext|>": 300}), f)
    with pytest.raises(CheckpointError, match="tokenizer has"):
        sm.load_pretrained(folder)


# ---- out ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["gpt2", "cl100k"])
def trained(request):
    text = sm.corpus.builtin_corpus()
    tok = sm.BPETokenizer.train(text[:300_000], 1000, pattern=request.param)
    m = sm.TransformerModel(sm.ModelConfig(1000, 64, 2, 2, 32, seed=3))
    yield m, tok, text
    m.close()


def test_save_pretrained_round_trips(tmp_path, trained):
    m, tok, text = trained
    m.save_pretrained(tmp_path, tok)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "gpt2"
    m2, t2 = sm.load_pretrained(tmp_path)
    assert np.array_equal(m2.flat_params, m.flat_params)
    assert t2 == tok or t2.encode(text[:20000]) == tok.encode(text[:20000])
    m2.close()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.skipif(torch is None, reason="transformers / torch are not installed")
def test_transformers_loads_what_save_pretrained_writes(tmp_path, trained):
    from transformers import AutoTokenizer
    m, tok, text = trained
    m.save_pretrained(tmp_path, tok)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.array([tok.encode(text[:300])[:64]], np.int32)
    with torch.no_grad():
        want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(m.forward(ids), want, rtol=0, atol=1e-4)
    at = AutoTokenizer.from_pretrained(tmp_path)
    sample = text[5000:20000] + " 你好 😀 \t\n  x  'S"
    assert at(sample)["input_ids"] == tok.encode(sample)


def test_save_pretrained_refusals(tmp_path, model):
    with pytest.raises(sm.ValidationError, match="character"):
        model.save_pretrained(tmp_path, sm.Tokenizer("abc"))
    bpe = sm.BPETokenizer.train("abc abc", 300)
    with pytest.raises(sm.ValidationError, match=f"tokenizer has {bpe.vocab_size} ids"):
        sm.TransformerModel(sm.ModelConfig(200, 16, 1, 1, 16)).save_pretrained(tmp_path, bpe)
    ranked = sm.BPETokenizer([bytes([b]) for b in range(256)])        # tiktoken-style ranks
    with pytest.raises(sm.ValidationError, match="ranks"):
        sm.TransformerModel(sm.ModelConfig(300, 16, 1, 1, 16)).save_pretrained(tmp_path, ranked)
