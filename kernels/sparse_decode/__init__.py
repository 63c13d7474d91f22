"""Sparse decode attention: one query token per sequence attends the KV-cache slots named by token or
page indices (Quest, Tang et al. 2024; paged KV cache, Kwon et al. 2023), split over the selected
keys and merged by log-sum-exp (Flash-Decoding, Dao et al. 2023). Pallas, XLA gather, reference."""

from kernels.sparse_decode.api import decode_attend, resolve_implementation  # noqa: F401
from kernels.sparse_decode.pallas_triton import DecodeConfig  # noqa: F401
