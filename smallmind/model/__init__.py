"""smallmind.model - the model and its training: the parameter table (`layout`), ModelConfig and
TransformerModel (`transformer`), the character tokenizer, the built-in corpus, checkpoints and
the training loop."""
from .transformer import PRESETS, ModelConfig, TransformerModel

__all__ = ["PRESETS", "ModelConfig", "TransformerModel"]
