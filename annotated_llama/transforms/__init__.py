"""Transforms of a finished model: quantization and LoRA adapters."""
