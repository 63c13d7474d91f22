"""Inference: KV caches, cached generation, speculative decoding, decode-time selectors."""
