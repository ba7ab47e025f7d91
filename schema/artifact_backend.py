"""Where artifact bytes live: the `ArtifactBackend` protocol and its local-directory implementation.

`ArtifactStore` (`schema/artifact_store.py`) does everything that is about *content*: hashing,
prefix lookup, the index, manifests, verification and gc decisions. A backend only keeps immutable
blobs named by their id. The store stages every write as a complete local file (hashed while it
is written), then hands it to `put`, so a backend never sees a partial object and never hashes.

The index entries (`ArtifactEntry` JSON, one small document per recorded artifact) go through the
backend too, so that every host that shares an object store also shares its catalogue: `gc` on one
host must see the manifests another host wrote, or it would delete their shards.

`S3Backend` (`schema/artifact_s3.py`, an object store with a worker-local read cache behind `path`)
implements this protocol and is chosen by `JETBOX_ARTIFACTS_URL`; no caller changes.

Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from schema.artifacts import HEX64, UnknownArtifactError, atomic_write_bytes, fsync_dir


@runtime_checkable
class ArtifactBackend(Protocol):
    """Immutable blobs by id (64 hex characters, already checked by the store)."""

    def exists(self, artifact_id: str) -> bool:
        """True if the object is present (its content is not checked)."""
        ...

    def size(self, artifact_id: str) -> int | None:
        """The object's size in bytes, or None when it is absent."""
        ...

    def put(self, artifact_id: str, staged: Path) -> None:
        """Install the complete file `staged` as the object, atomically: a reader sees the whole
        object or none. `staged` is consumed (moved or deleted). Replaces a damaged copy."""
        ...

    def get(self, artifact_id: str) -> bytes:
        """All of the object's bytes; UnknownArtifactError when absent."""
        ...

    def open(self, artifact_id: str) -> BinaryIO:
        """The object opened for reading (a context manager); UnknownArtifactError when absent."""
        ...

    def path(self, artifact_id: str) -> Path:
        """A local file holding the object, for readers that need one (memory-mapped datasets,
        `torch.load`). Local backends return where it lives whether or not it exists; a remote one
        would fetch it into its cache first."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """The ids present that start with `prefix`, in sorted order."""
        ...

    def delete(self, artifact_id: str) -> None:
        """Remove the object if present."""
        ...

    def strays(self) -> Iterator[tuple[str, str]]:
        """(name, location) of whatever sits among the objects without being one (for verify)."""
        ...

    def where(self, artifact_id: str) -> str:
        """Where the object lives, for messages (a file path, an s3:// URL)."""
        ...

    def put_entry(self, artifact_id: str, data: bytes) -> None:
        """Write (or replace) the index entry of an object, atomically."""
        ...

    def get_entry(self, artifact_id: str) -> bytes | None:
        """The index entry's bytes, or None when there is none."""
        ...

    def entry_ids(self) -> Iterator[str]:
        """The ids that have an index entry (their objects may be gone)."""
        ...

    def delete_entry(self, artifact_id: str) -> None:
        """Remove the index entry if present."""
        ...


class LocalDirBackend:
    """Objects as files `root/ab/abcdef...` (the first two hex characters name the folder); index
    entries as `index/<id>.json` beside `root` (by default `root/../index`).

    `put` renames a staged file into place and fsyncs the folder, so the staged file must be on the
    same file system (the store stages under its own `tmp/`, beside `objects/`).
    """

    def __init__(self, root: Path | str, index: Path | str | None = None) -> None:
        self.root = Path(root)
        self.index = Path(index) if index is not None else self.root.parent / "index"

    def path(self, artifact_id: str) -> Path:
        return self.root / artifact_id[:2] / artifact_id

    def exists(self, artifact_id: str) -> bool:
        return self.path(artifact_id).is_file()

    def size(self, artifact_id: str) -> int | None:
        try:
            return self.path(artifact_id).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, artifact_id: str, staged: Path) -> None:
        dest = self.path(artifact_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        fsync_dir(dest.parent)

    def get(self, artifact_id: str) -> bytes:
        try:
            return self.path(artifact_id).read_bytes()
        except FileNotFoundError:
            raise UnknownArtifactError(f"no artifact {artifact_id}") from None

    def open(self, artifact_id: str) -> BinaryIO:
        try:
            return self.path(artifact_id).open("rb")
        except FileNotFoundError:
            raise UnknownArtifactError(f"no artifact {artifact_id}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return
        if len(prefix) >= 2:
            subs = [self.root / prefix[:2]]
        else:
            subs = sorted(s for s in self.root.iterdir() if s.name.startswith(prefix))
        for sub in subs:
            if not sub.is_dir():
                continue
            for item in sorted(sub.glob(prefix + "*") if prefix else sub.iterdir()):
                if HEX64.match(item.name) and item.name[:2] == sub.name and item.is_file():
                    yield item.name

    def delete(self, artifact_id: str) -> None:
        self.path(artifact_id).unlink(missing_ok=True)

    def where(self, artifact_id: str) -> str:
        return str(self.path(artifact_id))

    def put_entry(self, artifact_id: str, data: bytes) -> None:
        atomic_write_bytes(self.index / f"{artifact_id}.json", data, tmp_dir=self.root.parent / "tmp")

    def get_entry(self, artifact_id: str) -> bytes | None:
        try:
            return (self.index / f"{artifact_id}.json").read_bytes()
        except FileNotFoundError:
            return None

    def entry_ids(self) -> Iterator[str]:
        if not self.index.is_dir():
            return
        for item in sorted(self.index.glob("*.json")):
            if HEX64.match(item.stem):
                yield item.stem

    def delete_entry(self, artifact_id: str) -> None:
        (self.index / f"{artifact_id}.json").unlink(missing_ok=True)

    def strays(self) -> Iterator[tuple[str, str]]:
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            for item in sub.iterdir() if sub.is_dir() else [sub]:
                if not (HEX64.match(item.name) and item.name[:2] == sub.name):
                    yield item.name, str(item)
