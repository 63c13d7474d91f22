"""Build a token store from local text files. The default corpus is the running interpreter's
standard library `.py` files (real code, present on every machine; no downloads)."""

from __future__ import annotations

import os
import pathlib
import sys
import sysconfig

from horizon.data.store import TokenStore, open_store, write_store
from horizon.data.tokenizer import get_tokenizer
from horizon.errors import DataError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".toml", ".cfg", ".html")


def stdlib_files() -> list[pathlib.Path]:
    """The stdlib's .py files, without site-packages and test suites, in a stable order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted((f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)),
                  key=lambda f: str(f.relative_to(root)))


def text_files(source: str | os.PathLike) -> list[pathlib.Path]:
    src = pathlib.Path(source)
    if not src.is_dir():
        raise DataError(f"--source {src} is not a directory; pass a folder of text files")
    return sorted(f for f in src.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)


def build_store(out: str | os.PathLike, *, source: str | None = None, tokenizer: str = "bytes",
                overwrite: bool = False) -> TokenStore:
    """Tokenize every text file under `source` (default: the stdlib) as one document each."""
    tok = get_tokenizer(tokenizer)
    files = stdlib_files() if source is None else text_files(source)
    docs, names = [], []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files are not documents
        if text:
            docs.append(tok.encode(text))
            names.append(str(f))
    return write_store(out, docs, tokenizer=tokenizer, sources=names, overwrite=overwrite)


def default_store_path() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("HORIZON_CACHE", pathlib.Path.home() / ".cache" / "horizon"))
    return cache / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-bytes"


def load_store(path: str | None) -> TokenStore:
    """Open `path`, or the default stdlib corpus (built on first use into the cache)."""
    if path is not None:
        return open_store(path)
    p = default_store_path()
    if not (p / "manifest.json").exists():
        try:
            return build_store(p)
        except DataError:
            pass  # built concurrently by another process: open theirs
    return open_store(p)
