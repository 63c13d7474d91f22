"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocab 256); needs no files."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, tokens) -> str:
        return bytes(int(t) & 0xFF for t in np.asarray(tokens).ravel()).decode("utf-8", errors="replace")


TOKENIZERS = {"bytes": ByteTokenizer}


def get_tokenizer(name: str = "bytes") -> ByteTokenizer:
    from horizon.errors import DataError

    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; available: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
