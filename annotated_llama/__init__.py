"""annotated-llama: the LLaMA model family in readable PyTorch."""

from .config import ModelArgs
from .model import Transformer
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def __getattr__(name):
    # The heavier front ends import lazily, so `import annotated_llama` stays fast.
    if name == "Llama":
        from .generation import Llama
        return Llama
    if name in ("load_model", "save_model"):
        from . import weights
        return getattr(weights, name)
    raise AttributeError(f"module 'annotated_llama' has no attribute {name!r}")


__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Llama", "load_model", "save_model"]
