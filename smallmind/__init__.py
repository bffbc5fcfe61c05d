"""smallmind - train and serve small GPT-style language models on the CPU.

The compute core is C (csrc/) with OpenMP, reached through a thin Cython layer that releases
the GIL; this package holds the readable Python classes on top. Start at README.md.
"""
# The public API, by area (the folder tree follows the same split).
# errors
from .errors import (CancelledError, CheckpointError, DTypeError, NumericalError,
                     ObjectDisposedError, SmallMindError, ValidationError)
# the compiled core: kernels, memory, process-wide settings
from .core import _core, kernels  # noqa: F401  (_core: sm._core for tests and tools)
from .core._core import (build_info, get_num_threads, set_num_threads, set_simd_level,
                         simd_detected, simd_level)
from .core.memory import MemoryPool, PooledBuffer, default_pool
from .core.tracker import MemorySnapshot, MemoryTracker
# the model and its training
from .model import corpus
from .model.transformer import PRESETS, ModelConfig, TransformerModel
from .model.tokenizer import BaseTokenizer, Tokenizer, UnknownCharacterWarning
from .model.bpe import BPETokenizer
from .model.pretrained import load_pretrained
from .model.checkpoint import find_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .model.training import History, Training, data_digest
# generation and serving
from .cancellation import CancellationToken, CancellationTokenSource
from .generation.sampling import GenerationResult, Sampling
from .generation.serving import SamplerPool, ThrottledInferenceService
# retrieval
from .retrieval.index import VectorIndex
from .retrieval.rag import (Answer, Answerer, ModelEmbedder, Passage, PromptBuilder, Retriever,
                            TfidfEmbedder)
from . import metrics

__version__ = "0.1.0"

from .core import _threadpool  # noqa: E402, F401  (registers with threadpoolctl when installed)

__all__ = [
    "__version__", "build_info", "get_num_threads", "set_num_threads", "set_simd_level",
    "simd_detected", "simd_level", "kernels", "metrics", "corpus",
    "SmallMindError", "ValidationError", "DTypeError", "ObjectDisposedError", "CheckpointError",
    "CancelledError", "NumericalError",
]
__all__ += ["MemoryPool", "PooledBuffer", "default_pool"]
__all__ += ["ModelConfig", "TransformerModel", "PRESETS", "Tokenizer", "BPETokenizer", "BaseTokenizer",
            "UnknownCharacterWarning",
            "CancellationToken", "CancellationTokenSource", "load_checkpoint", "read_checkpoint",
            "save_checkpoint", "find_checkpoint", "load_pretrained", "Training", "data_digest",
            "History", "Sampling", "GenerationResult",
            "SamplerPool", "ThrottledInferenceService", "VectorIndex",
            "MemoryTracker", "MemorySnapshot", "TfidfEmbedder", "ModelEmbedder", "Retriever",
            "Passage", "PromptBuilder", "Answer", "Answerer"]
