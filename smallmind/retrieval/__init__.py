"""smallmind.retrieval - exact vector search (VectorIndex, in `index`) and retrieval-augmented
answering on top of it (embedders, Retriever, PromptBuilder, Answerer, in `rag`)."""
from .index import VectorIndex
from .rag import Answer, Answerer, ModelEmbedder, Passage, PromptBuilder, Retriever, TfidfEmbedder

__all__ = ["VectorIndex", "Answer", "Answerer", "ModelEmbedder", "Passage", "PromptBuilder",
           "Retriever", "TfidfEmbedder"]
