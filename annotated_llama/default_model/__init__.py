"""The embedded default model: a small LLaMA and its tokenizer, trained by this project on the
World English Bible (public domain). `annotated-llama generate` uses it when no --model is given.
How it was made: see README ("The default model") and docs/annotated.
"""

from pathlib import Path


def default_model_dir() -> Path:
    here = Path(__file__).resolve().parent
    if not (here / "params.json").is_file():
        raise FileNotFoundError(f"{here}: the embedded default model is missing (params.json not found); "
                                "pass --model PATH")
    return here
