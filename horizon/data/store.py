"""Token store: tensorstore zarr3 arrays `tokens` (uint16) and `offsets` (document starts, int64,
n_docs + 1 entries) plus `manifest.json` (tokenizer, counts, sha256 checksum).

Chunks carry zstd + crc32c codecs so a damaged chunk fails to decode; the manifest's checksum
covers the whole content, so nothing corrupt is ever silently read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import tensorstore as ts

from horizon.errors import DataError

FORMAT_VERSION = 1
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """A loaded store: all tokens in memory (corpora here are tens of MB) and document offsets."""

    path: str
    tokens: np.ndarray  # uint16 [n_tokens]
    offsets: np.ndarray  # int64 [n_docs + 1], offsets[0] = 0, offsets[-1] = n_tokens
    manifest: dict

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]


def _checksum(tokens: np.ndarray, offsets: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(tokens, dtype="<u2").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return h.hexdigest()


def _spec(path: pathlib.Path, dtype: str, n: int | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if n is not None:
        spec["metadata"] = {
            "shape": [n],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, min(_CHUNK, n))]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}, {"name": "crc32c"}],
        }
    return spec


def write_store(path: str | os.PathLike, documents: list[np.ndarray], *, tokenizer: str = "bytes",
                sources: list[str] | None = None, overwrite: bool = False) -> TokenStore:
    """Write documents (token arrays) as a store at `path`, atomically (temp dir, then rename).

    An existing store is never replaced unless `overwrite=True`.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"data store {path} already exists; pass --overwrite or choose another --out")
    if not documents:
        raise DataError("no documents to write; check the --source directory holds text files")
    lengths = np.array([len(d) for d in documents], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(documents).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ts.open(_spec(tmp / "tokens", "uint16", len(tokens)), create=True).result().write(tokens).result()
        ts.open(_spec(tmp / "offsets", "int64", len(offsets)), create=True).result().write(offsets).result()
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "n_tokens": int(len(tokens)),
            "n_docs": int(len(documents)),
            "sha256": _checksum(tokens, offsets),
            "sources": sources or [],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if path.exists() and overwrite:
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished the same store first
            raise DataError(f"data store {path} already exists; pass --overwrite or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(str(path), tokens, offsets, manifest)


def open_store(path: str | os.PathLike) -> TokenStore:
    """Read and verify a store; DataError if it is missing, incomplete or corrupt."""
    path = pathlib.Path(path)
    if not (path / "manifest.json").exists():
        raise DataError(f"no token store at {path} (manifest.json missing); build one with "
                        f"`horizon data build --out {path}`")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        expected = (manifest["sha256"], int(manifest["n_tokens"]), int(manifest["n_docs"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"token store {path}: manifest.json is corrupt ({e.__class__.__name__}); rebuild the store") from None
    try:
        tokens = ts.open(_spec(path / "tokens", "uint16")).result().read().result()
        offsets = ts.open(_spec(path / "offsets", "int64")).result().read().result()
    except ValueError as e:
        raise DataError(f"token store {path}: cannot read arrays ({str(e).splitlines()[0][:160]}); rebuild the store") from None
    if (len(tokens), len(offsets) - 1) != expected[1:] or _checksum(tokens, offsets) != expected[0]:
        raise DataError(f"token store {path}: content does not match its manifest checksum (corrupt); rebuild the store")
    return TokenStore(str(path), np.asarray(tokens), np.asarray(offsets), manifest)
