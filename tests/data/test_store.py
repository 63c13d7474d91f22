"""Token store: exact round trip; corruption of a chunk or of the manifest is a DataError."""

import json
import pathlib

import numpy as np
import pytest

from horizon.data.corpus import build_store
from horizon.data.store import open_store, write_store
from horizon.errors import DataError


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=n).astype(np.uint16) for n in (5, 1, 300, 17)]


def test_round_trip_is_exact(tmp_path):
    docs = _docs()
    write_store(tmp_path / "s", docs)
    store = open_store(tmp_path / "s")
    assert store.n_docs == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(store.document(i), d)
    assert store.manifest["n_tokens"] == sum(len(d) for d in docs)


def test_corrupted_chunk_is_detected(tmp_path):
    write_store(tmp_path / "s", _docs())
    chunk = next((tmp_path / "s" / "tokens" / "c").iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DataError, match="rebuild"):
        open_store(tmp_path / "s")


@pytest.mark.parametrize("mutate", [
    lambda m: "{not json",
    lambda m: json.dumps({**m, "sha256": "0" * 64}),
    lambda m: json.dumps({k: v for k, v in m.items() if k != "n_docs"}),
])
def test_corrupted_manifest_is_detected(tmp_path, mutate):
    write_store(tmp_path / "s", _docs())
    path = tmp_path / "s" / "manifest.json"
    path.write_text(mutate(json.loads(path.read_text())))
    with pytest.raises(DataError):
        open_store(tmp_path / "s")


def test_missing_store_and_existing_output_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="horizon data build"):
        open_store(tmp_path / "nope")
    write_store(tmp_path / "s", _docs())
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(DataError, match="already exists"):
        write_store(tmp_path / "s", _docs()[:1])
    assert (tmp_path / "s" / "manifest.json").read_text() == before  # nothing overwritten


def test_build_from_source_directory(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.py").write_text("print('hé')\n")
    (src / "c.bin").write_bytes(b"\x00\x01")
    store = build_store(tmp_path / "out", source=str(src))
    texts = sorted(bytes(store.document(i).astype(np.uint8)).decode() for i in range(store.n_docs))
    assert texts == ["hello", "print('hé')\n"]
    with pytest.raises(DataError, match="not a directory"):
        build_store(tmp_path / "out2", source=str(pathlib.Path(tmp_path / "missing")))
