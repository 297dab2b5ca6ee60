"""annotated-llama: the LLaMA model family in readable PyTorch."""

from .core.config import ModelArgs
from .core.model import Transformer
from .core.tokenizer import Tokenizer

__version__ = "0.1.0"


def load_model(path, dtype=None, device="cpu", lora=None):
    """(model, tokenizer or None) from anything `weights.load_model` reads: a Meta, HF or our own
    checkpoint dir or a .gguf file. `lora`: a PEFT-format adapter dir applied to the loaded model
    (transforms/lora.py)."""
    # imported on use: `import annotated_llama` loads only the core (tests/test_layers.py)
    from .weights import load_model as load_weights

    model, tokenizer = load_weights(path, dtype=dtype, device=device)
    if lora is not None:
        from .transforms.lora import load_adapter
        model = load_adapter(model, lora) or model
    return model, tokenizer


def __getattr__(name):
    # The heavier front ends import lazily, so `import annotated_llama` stays fast.
    if name == "Llama":
        from .inference.generation import Llama
        return Llama
    if name == "save_model":
        from .weights import save_model
        return save_model
    raise AttributeError(f"module 'annotated_llama' has no attribute {name!r}")


__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Llama", "load_model", "save_model"]
