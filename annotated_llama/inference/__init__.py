"""The engine and its front ends: batched generation, streaming, speculative decoding, constraints."""
