"""The bottom layer: the model, its cache, tokenizers, chat formats and sampling."""
