"""fuzz/targets.py - the fuzz targets: each takes arbitrary bytes and feeds them to one parser of
untrusted input (checkpoint files, index files, the tokenizer, HTTP completion requests). A
target returns normally or raises one of the exceptions that parser documents; anything else -
another exception, a crash, a hang, a wrong round trip - is a bug. fuzz/run.py drives them."""
import dataclasses
import json
import os
import tempfile
import warnings

import numpy as np

import smallmind as sm
from smallmind import safetensors as _safetensors
from smallmind.config import InferenceOptions, ServerOptions
from smallmind.generation import openai_api
from smallmind.generation.chat import ChatTemplate
from smallmind.generation.engine import BatchEngine
from smallmind.model.checkpoint import model_from_checkpoint

# Files go to RAM when the machine has /dev/shm: thousands of loads a second, no disk wear.
_TMP = tempfile.mkdtemp(prefix="sm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
_PATH = os.path.join(_TMP, "input.safetensors")


def _write(data: bytes) -> str:
    with open(_PATH, "wb") as f:
        f.write(data)
    return _PATH


# ---- the small model every target shares (a checkpoint seed, generation in the HTTP target) ---
_TEXT = "To be, or not to be, that is the question.\n"
_TOK = sm.Tokenizer(_TEXT)
_MODEL = sm.TransformerModel(sm.ModelConfig(vocab_size=_TOK.vocab_size, block_size=8, n_layer=1,
                                            n_head=2, n_embd=8, seed=0)).eval()


def checkpoint(data: bytes) -> None:
    """read_checkpoint + building the model; a file that loads must give a usable model: a
    forward pass of the right shape and, with its tokenizer, a generation. Finite weights can
    still overflow float32 on the way to the logits (a fuzzer found one); generation must then
    raise NumericalError, never pick a token from NaN."""
    path = _write(data)
    try:                        # the checksums: verified, or a CheckpointError
        _safetensors.load_file(path, verify=True)
    except sm.CheckpointError:
        pass
    try:                        # behind them (verify=False), the validation of everything else
        ck = sm.read_checkpoint(path, verify=False)
        model = model_from_checkpoint(ck).eval()
    except sm.CheckpointError:
        return
    logits = model.forward(np.zeros((1, 1), np.int32))
    assert logits.shape == (1, 1, ck.config.vocab_size)
    # Without a saved tokenizer, one of printable characters that fits the model's vocabulary.
    tok = ck.tokenizer or sm.Tokenizer.from_chars([chr(33 + i) for i in range(min(ck.config.vocab_size, 90))])
    if tok.vocab_size:
        ids = np.asarray([tok.encode(tok.chars[0])], np.int32)
        finite = np.isfinite(model.forward(ids)[0, -1, :tok.vocab_size]).all()
        try:
            sm.Sampling(model, tok).generate(tok.chars[0], 1, temperature=0)
            assert finite, "a token was chosen from NaN or infinite logits"
        except sm.NumericalError:       # the documented outcome for overflowing weights
            pass
    model.dispose()


def index(data: bytes) -> None:
    """VectorIndex.load; a file that loads must answer a search over everything it holds."""
    path = _write(data)
    try:
        _safetensors.load_file(path, verify=True)
    except sm.CheckpointError:
        pass
    try:
        idx = sm.VectorIndex.load(path, verify=False)
    except sm.CheckpointError:
        return
    with idx:
        if len(idx):
            ids, scores = idx.search(np.ones(idx.dim, np.float32), min(3, len(idx)))
            assert len(ids) == min(3, len(idx)) and all(i in idx for i in ids)


def tokenizer(data: bytes) -> None:
    """Tokenizer construction, encode/decode round trips, from_json of the raw bytes."""
    text = data.decode("utf-8", "replace")
    half = len(text) // 2
    try:
        tok = sm.Tokenizer(text[:half] or "a")
    except sm.ValidationError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.UnknownCharacterWarning)
        known = "".join(c for c in text if c in tok)
        assert tok.decode(tok.encode(known)) == known
        assert tok.encode(text) == tok.encode_array(text).tolist()     # both paths agree
        ids = np.frombuffer(data[: len(data) // 4 * 4], dtype="<i4")
        try:
            out = tok.decode(ids)
            assert len(out) == len(ids)
        except sm.ValidationError:
            assert ((ids < 0) | (ids >= tok.vocab_size)).any()
    again = sm.Tokenizer.from_json(tok.to_json())
    assert again == tok
    try:
        sm.Tokenizer.from_json(data)
    except (sm.ValidationError, TypeError):
        pass


_BPE = {"gpt2": sm.BPETokenizer.train(_TEXT * 20 + " éé 你好 😀 123 'll", 300),
        "cl100k": sm.BPETokenizer.train(_TEXT * 20 + " éé 你好 😀 123 'll", 300, pattern="cl100k")}


def bpe(data: bytes) -> None:
    """BPETokenizer: round trips of any text under both patterns, a batch equal to its documents
    one by one, decode of arbitrary ids, and every file parser (its JSON, a tiktoken rank file,
    vocab.json + merges.txt, tokenizer.json) on the raw bytes."""
    text = data.decode("utf-8", "replace")
    for tok in _BPE.values():
        ids = tok.encode(text, disallowed_special=())
        assert tok.decode(ids) == text
        half = text[: len(text) // 2]
        assert tok.encode_batch([text, half], threads=2, disallowed_special=()) == \
            [ids, tok.encode(half, disallowed_special=())]
        raw = np.frombuffer(data[: len(data) // 4 * 4], dtype="<i4").tolist()
        try:
            tok.decode(raw)
        except sm.ValidationError:
            assert any(not 0 <= i < tok.vocab_size for i in raw) or raw
    try:
        sm.BPETokenizer.from_json(data)
    except (sm.ValidationError, TypeError):
        pass
    path = _write(data)
    for load in (sm.BPETokenizer.from_tiktoken, sm.BPETokenizer.from_tokenizer_json,
                 lambda p: sm.BPETokenizer.from_hf(p, p)):
        try:
            tok = load(path)
        except sm.CheckpointError:
            continue
        assert tok.decode(tok.encode(text, disallowed_special=())) == text


_ENGINE = BatchEngine(_MODEL, _TOK, max_batch=2, threads=1)
_CTX = openai_api.Context(_ENGINE, InferenceOptions(), ServerOptions(), ChatTemplate.default(),
                          "fuzz")


def http(data: bytes) -> None:
    """The server's parsing and validation of a POST /v1/completions or /v1/chat/completions
    body (what decides 400: APIError, or ValidationError from the chat template), then a short
    generation of the first choice with what was accepted. Anything else would be a 500."""
    try:
        req = openai_api.read_json(data)
        parse = openai_api.parse_chat if "messages" in req else openai_api.parse_completion
        parsed = parse(req, _CTX)
    except (openai_api.APIError, sm.ValidationError):
        return
    job = parsed.jobs[0]
    params = dataclasses.replace(job.params, max_new_tokens=min(job.params.max_new_tokens, 3))
    _ENGINE.generate_ids(job.ids, params)


TARGETS = {"checkpoint": checkpoint, "index": index, "tokenizer": tokenizer, "bpe": bpe,
           "http": http}


# ---- seeds: valid inputs the mutations start from ---------------------------------------------
def _file_bytes(save) -> bytes:
    path = os.path.join(_TMP, "seed.safetensors")
    save(path)
    with open(path, "rb") as f:
        return f.read()


def seeds(name: str) -> list:
    """A few valid (and nearly valid) inputs for target `name`."""
    if name == "checkpoint":
        return [_file_bytes(lambda p: sm.save_checkpoint(p, _MODEL, _TOK, training={"step": 3})),
                _file_bytes(lambda p: sm.save_checkpoint(p, _MODEL))]
    if name == "index":
        out = []
        for metric in ("cosine", "l2"):
            idx = sm.VectorIndex(4, metric=metric)
            idx.add(np.arange(12, dtype=np.float32).reshape(3, 4) + 1, ids=[1, "b", 7],
                    metadata=[{"t": "x"}, None, [1, 2]])
            out.append(_file_bytes(idx.save))
            idx.dispose()
        out.append(_file_bytes(lambda p: _safetensors.save_file(
            {"vectors": np.zeros((0, 4), np.float32)}, p)))
        return out
    if name == "tokenizer":
        return [_TEXT.encode(), "héllo wörld ∑ 😀\n\t".encode(), _TOK.to_json().encode(), b"\x00\xff"]
    if name == "bpe":
        import base64
        tok = _BPE["gpt2"]
        ranks = b"".join(base64.b64encode(tok.token_bytes(i)) + f" {i}\n".encode()
                         for i in range(tok.vocab_size) if i not in tok.special_tokens.values())
        hf = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]},
              "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
              "added_tokens": [{"id": 2, "content": "<|endoftext|>", "special": True}]}
        return [_TEXT.encode(), "héllo wörld ∑ 😀\n\t 'S 123456".encode(), tok.to_json().encode(),
                ranks, json.dumps(hf).encode(), b"\x00\xff"]
    if name == "http":
        return [json.dumps(r).encode() for r in (
            {"prompt": "To be", "max_tokens": 4},
            {"prompt": "not", "max_tokens": 2, "temperature": 0.5, "top_k": 3, "top_p": 0.9,
             "seed": 7, "stop": ["q", "x"], "stream": True},
            {"prompt": "the", "temperature": 0, "n": 1, "model": "smallmind", "stop": "e"})]
    raise KeyError(name)


def replay(name: str, directory: str) -> int:
    """Run target `name` on every file under `directory` (the regression corpus); return the
    number of files."""
    count = 0
    if not os.path.isdir(directory):
        return 0
    for entry in sorted(os.listdir(directory)):
        with open(os.path.join(directory, entry), "rb") as f:
            TARGETS[name](f.read())
        count += 1
    return count
