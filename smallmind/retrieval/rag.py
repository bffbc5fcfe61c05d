"""rag.py - text embedders and retrieval-augmented generation over a VectorIndex: a TF-IDF
embedder, Retriever, PromptBuilder and Answerer, plus an embedder that uses
a TransformerModel's own hidden states.

    embedder = sm.TfidfEmbedder(max_features=512).fit(passages)
    retriever = sm.Retriever(sm.VectorIndex(embedder.dim), embedder, k=3)
    retriever.add_documents(passages)
    answer = sm.Answerer(retriever, sm.PromptBuilder(), sm.Sampling(model, tok)).answer(question)
    print(answer.text, [c.id for c in answer.citations])

Thread safety: embedders are read-only once fitted; a Retriever is as safe as its index (many
retrieve() at once, add_documents exclusive); an Answerer uses one Sampling, so it belongs to
one thread (give each thread its own Answerer over a shared Retriever).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from .._validate import is_int
from ..core import _core
from ..errors import ValidationError
from ..generation.sampling import Sampling
from ..model.tokenizer import BaseTokenizer
from ..model.transformer import TransformerModel
from .index import VectorIndex

__all__ = ["TfidfEmbedder", "ModelEmbedder", "Retriever", "Passage", "PromptBuilder",
           "Answer", "Answerer"]

_WORD = re.compile(r"\w+", re.UNICODE)


def _texts(texts, name="texts") -> list:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise ValidationError(f"{name} must be a str or a sequence of str")
    return list(texts)


class TfidfEmbedder:
    """TF-IDF vectors over a vocabulary of words (runs of letters, digits and underscores,
    lower-cased): the `max_features` words found in the most documents (ties: alphabetical),
    idf = ln((1 + N) / (1 + df)) + 1, rows L2-normalised. A text with no known word embeds as
    zeros."""

    def __init__(self, max_features: int = 512):
        if not is_int(max_features) or max_features < 1:
            raise ValidationError(f"max_features must be an int >= 1, got {max_features!r}")
        self.max_features = int(max_features)
        self.vocabulary: dict[str, int] = {}
        self.idf = np.zeros(0, np.float32)

    @staticmethod
    def _words(text: str) -> list:
        return _WORD.findall(text.lower())

    def fit(self, documents) -> "TfidfEmbedder":
        docs = _texts(documents, "documents")
        if not docs:
            raise ValidationError("documents must not be empty")
        df: Counter[str] = Counter()
        for d in docs:
            df.update(set(self._words(d)))
        if not df:
            raise ValidationError("documents contain no words")
        terms = sorted(df, key=lambda w: (-df[w], w))[:self.max_features]
        self.vocabulary = {w: i for i, w in enumerate(sorted(terms))}
        n = len(docs)
        self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(terms)],
                            np.float32)
        return self

    @property
    def dim(self) -> int:
        if not self.vocabulary:
            raise ValidationError("the embedder is not fitted: call fit(documents) first")
        return len(self.vocabulary)

    def embed(self, texts) -> np.ndarray:
        """float32 (n, dim), one L2-normalised row per text."""
        dim = self.dim
        texts = _texts(texts)
        out = np.zeros((len(texts), dim), np.float32)
        for i, t in enumerate(texts):
            counts = Counter(w for w in self._words(t) if w in self.vocabulary)
            for w, c in counts.items():
                j = self.vocabulary[w]
                out[i, j] = c * self.idf[j]
            norm = np.linalg.norm(out[i])
            if norm > 0:
                out[i] /= norm
        return out

    def fit_embed(self, documents) -> np.ndarray:
        return self.fit(documents).embed(documents)


class ModelEmbedder:
    """The mean over positions of a TransformerModel's final hidden states (after ln_f, what the
    LM head reads), computed in C. Texts longer than block_size are cut into windows of
    block_size tokens whose embeddings are averaged, weighted by length; a text with no
    character of the tokenizer embeds as zeros."""

    def __init__(self, model: TransformerModel, tokenizer: BaseTokenizer, *, threads: int | None = None):
        if not isinstance(model, TransformerModel):
            raise TypeError(f"model must be a TransformerModel, got {type(model).__name__}")
        if not isinstance(tokenizer, BaseTokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer or a BPETokenizer, got "
                            f"{type(tokenizer).__name__}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValidationError(f"tokenizer has {tokenizer.vocab_size} symbols but the model's "
                                  f"vocab_size is {model.config.vocab_size}")
        self.model, self.tokenizer, self.threads = model, tokenizer, threads

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    def embed(self, texts) -> np.ndarray:
        texts = _texts(texts)
        m = self.model
        m.check_open()
        T, C = m.config.block_size, m.config.n_embd
        out = np.zeros((len(texts), C), np.float32)
        # every window, grouped by length so that each group is one C call
        groups: dict[int, list] = {}
        for i, t in enumerate(texts):
            ids = self.tokenizer.encode(t)
            for s in range(0, len(ids), T):
                w = ids[s:s + T]
                groups.setdefault(len(w), []).append((i, w))
        weight = np.zeros(len(texts), np.float64)
        for n, items in groups.items():
            idx = np.asarray([w for _, w in items], np.int32)
            emb = _core.gpt_embed(m.flat_params, m.core_config, idx, self.threads)
            for (i, _), e in zip(items, emb):
                out[i] += n * e
                weight[i] += n
        nz = weight > 0
        out[nz] /= weight[nz, None].astype(np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class Passage:
    """A retrieved document: its id, text, score (the index's metric) and metadata."""
    id: Any
    text: str
    score: float
    metadata: Any = None


class Retriever:
    """Documents embedded into `index` (whose dim must be the embedder's); retrieve() returns the
    k best passages for a query. Texts are kept in the index's metadata."""

    def __init__(self, index: VectorIndex, embedder, k: int = 3):
        if not isinstance(index, VectorIndex):
            raise TypeError(f"index must be a VectorIndex, got {type(index).__name__}")
        if not hasattr(embedder, "embed") or not hasattr(embedder, "dim"):
            raise TypeError("embedder must have embed(texts) and dim (TfidfEmbedder, ModelEmbedder)")
        if embedder.dim != index.dim:
            raise ValidationError(f"the embedder makes {embedder.dim}-dimensional vectors but the "
                                  f"index holds {index.dim}")
        if not is_int(k) or k < 1:
            raise ValidationError(f"k must be an int >= 1, got {k!r}")
        self.index, self.embedder, self.k = index, embedder, int(k)

    def add_documents(self, documents, ids: Sequence | None = None,
                      metadata: Sequence | None = None) -> list:
        docs = _texts(documents, "documents")
        if metadata is not None and len(metadata) != len(docs):
            raise ValidationError(f"metadata has {len(metadata)} entries for {len(docs)} documents")
        vecs = self.embedder.embed(docs)
        empty = [i for i in range(len(docs)) if not np.any(vecs[i])]
        if empty and self.index.metric == "cosine":
            raise ValidationError(f"documents[{empty[0]}] has nothing the embedder knows "
                                  "(an all-zero vector cannot be ranked by cosine)")
        meta = [{"text": d, "metadata": None if metadata is None else metadata[i]}
                for i, d in enumerate(docs)]
        return self.index.add(vecs, ids=ids, metadata=meta)

    def retrieve(self, query: str, k: int | None = None) -> list:
        """The best passages for `query`, best first (fewer if the index holds fewer; none if
        the query has nothing the embedder knows)."""
        if not isinstance(query, str):
            raise ValidationError(f"query must be a str, got {type(query).__name__}")
        k = self.k if k is None else k
        q = self.embedder.embed([query])[0]
        if not np.any(q) and self.index.metric == "cosine":
            return []
        ids, scores, meta = self.index.search(q, k, with_metadata=True)
        return [Passage(i, m["text"], float(s), m["metadata"]) for i, s, m in zip(ids, scores, meta)]


class PromptBuilder:
    """Puts retrieved passages and a question into one prompt:

        Context:
        [1] first passage
        [2] second passage

        Question: ...
        Answer:

    Passages are added best first while the prompt stays within `max_chars` (a passage that
    does not fit is cut at the limit, the rest dropped)."""

    def __init__(self, max_chars: int = 2000, *, header: str = "Context:",
                 question_prefix: str = "Question: ", answer_prefix: str = "Answer:"):
        if not is_int(max_chars) or max_chars < 1:
            raise ValidationError(f"max_chars must be an int >= 1, got {max_chars!r}")
        self.max_chars = int(max_chars)
        self.header, self.question_prefix, self.answer_prefix = header, question_prefix, answer_prefix

    def build(self, question: str, passages: Sequence[Passage]) -> str:
        if not isinstance(question, str):
            raise ValidationError(f"question must be a str, got {type(question).__name__}")
        tail = f"\n{self.question_prefix}{question}\n{self.answer_prefix}"
        room = self.max_chars - len(tail) - len(self.header) - 1
        lines = []
        for i, p in enumerate(passages, 1):
            line = f"[{i}] {' '.join(p.text.split())}"
            if room <= len(f"[{i}] ") + 1:
                break
            if len(line) + 1 > room:
                line = line[:room - 1]
            lines.append(line)
            room -= len(line) + 1
        return "\n".join([self.header] + lines) + "\n" + tail if lines else tail.lstrip("\n")


@dataclasses.dataclass(frozen=True)
class Answer:
    """The generated text, the passages it was given (citations, numbered as in the prompt)
    and the prompt itself."""
    text: str
    citations: list
    prompt: str


class Answerer:
    """retrieve -> build the prompt -> generate. Generation options (max_new_tokens,
    temperature, top_k, top_p, seed, stop, cancel) go to Sampling.generate."""

    def __init__(self, retriever: Retriever, prompt_builder: PromptBuilder, sampling: Sampling,
                 **generate_kwargs):
        if not isinstance(retriever, Retriever):
            raise TypeError(f"retriever must be a Retriever, got {type(retriever).__name__}")
        if not isinstance(prompt_builder, PromptBuilder):
            raise TypeError(f"prompt_builder must be a PromptBuilder, got {type(prompt_builder).__name__}")
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        self.retriever, self.prompt_builder, self.sampling = retriever, prompt_builder, sampling
        self.generate_kwargs = dict(dict(max_new_tokens=100, stop="\n"), **generate_kwargs)

    def answer(self, question: str, k: int | None = None, **generate_kwargs) -> Answer:
        passages = self.retriever.retrieve(question, k)
        prompt = self.prompt_builder.build(question, passages)
        text = self.sampling.generate(prompt, **dict(self.generate_kwargs, **generate_kwargs))
        return Answer(text.strip(), passages, prompt)
