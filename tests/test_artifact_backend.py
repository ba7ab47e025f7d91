"""The artifact store's backend seam: every object byte goes through `ArtifactBackend`, so a second
backend (a dict here, standing in for an object store with a local cache) serves the same callers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest

from schema.artifact_backend import ArtifactBackend, LocalDirBackend
from schema.artifact_store import ArtifactStore
from schema.artifacts import CorruptArtifactError, Lineage, UnknownArtifactError
from workers.synth.base import load_arrays, read_shard, synthesize


class DictBackend:
    """Blobs in a dict; `path` materialises a blob into a cache folder, as a remote backend would."""

    def __init__(self, cache: Path) -> None:
        self.blobs: dict[str, bytes] = {}
        self.cache = cache

    def exists(self, artifact_id: str) -> bool:
        return artifact_id in self.blobs

    def size(self, artifact_id: str) -> int | None:
        blob = self.blobs.get(artifact_id)
        return None if blob is None else len(blob)

    def put(self, artifact_id: str, staged: Path) -> None:
        self.blobs[artifact_id] = staged.read_bytes()
        staged.unlink()

    def get(self, artifact_id: str) -> bytes:
        if artifact_id not in self.blobs:
            raise UnknownArtifactError(f"no artifact {artifact_id}")
        return self.blobs[artifact_id]

    def open(self, artifact_id: str) -> BinaryIO:
        return io.BytesIO(self.get(artifact_id))

    def path(self, artifact_id: str) -> Path:
        local = self.cache / artifact_id
        if artifact_id in self.blobs and not local.exists():
            self.cache.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.blobs[artifact_id])
        return local

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(k for k in self.blobs if k.startswith(prefix)))

    def delete(self, artifact_id: str) -> None:
        self.blobs.pop(artifact_id, None)

    def strays(self) -> Iterator[tuple[str, str]]:
        return iter(())


def test_both_backends_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(LocalDirBackend(tmp_path), ArtifactBackend)
    assert isinstance(DictBackend(tmp_path), ArtifactBackend)
    assert isinstance(ArtifactStore(tmp_path).backend, LocalDirBackend)


def test_store_works_unchanged_over_another_backend(tmp_path: Path) -> None:
    backend = DictBackend(tmp_path / "cache")
    store = ArtifactStore(tmp_path / "store", backend=backend)
    data = b"bytes kept elsewhere"
    artifact_id = store.put_bytes(data)
    assert store.put_stream(io.BytesIO(data)) == artifact_id and list(store.ids()) == [artifact_id]
    assert store.get_bytes(artifact_id) == data and store.size(artifact_id) == len(data)
    assert store.resolve(artifact_id[:6]) == artifact_id
    with store.open(artifact_id) as fh:
        assert fh.read() == data
    # A dataset written and read back through the ordinary callers, none of them backend-aware.
    manifest = synthesize("maze", {"height": 7, "width": 9}, 3, 8, 5, store, Lineage(ticket="T-1"),
                          created_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert len(load_arrays(manifest, store)["maze"]) == 8
    first = manifest.shards[0]
    assert len(read_shard(store.path(first.id), first.format)["maze"]) == first.count  # via the local cache
    assert [e.id for e in store.list_entries(ticket="T-1")] == [manifest.manifest_id()]
    assert store.verify() == []
    # Damage is seen through the backend, and put_bytes(repair=True) heals it.
    backend.blobs[artifact_id] = b"X" * len(data)
    assert [p.problem for p in store.verify()] == ["corrupt"]
    with pytest.raises(CorruptArtifactError):
        store.get_bytes(artifact_id)
    store.put_bytes(data, repair=True)
    assert store.get_bytes(artifact_id) == data
    report = store.gc({manifest.manifest_id()}, dry_run=False)
    assert report.removed == [artifact_id] and not store.has(artifact_id)
    assert not any((tmp_path / "store" / "tmp").iterdir())  # staged writes were consumed
