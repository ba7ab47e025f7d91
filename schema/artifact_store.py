"""The content-addressed artifact store: objects named by their sha256, an index describing them.

The data it keeps (manifests, index entries, lineage) and its errors are in `schema/artifacts.py`;
the layout on disk is described there. The bytes of objects go through an `ArtifactBackend`
(`schema/artifact_backend.py`; `LocalDirBackend` under `root/objects/` by default): this class never
touches an object file itself, so another backend (S3) slots in without changing a caller.

Which artifacts a ticket produced is recorded by the event log (`ArtifactRecorded`, the `artifacts`
projection), not here: the index under `root/index/` is a catalogue of descriptive data (name, size,
count, split, lineage) that `jbctl artifacts` joins to the log's rows, and the record only for a
store that has no log (a `LocalContext` run, a bare store in a benchmark).

This module handles bytes and files only (stdlib + pydantic): it never imports numpy or torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from schema.artifact_backend import ArtifactBackend, LocalDirBackend
from schema.artifacts import (
    CHUNK,
    HEX64,
    MANIFEST_KIND,
    AmbiguousArtifactError,
    ArtifactEntry,
    ArtifactError,
    CorruptArtifactError,
    GcReport,
    Lineage,
    Manifest,
    Problem,
    UnknownArtifactError,
)

_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class ArtifactStore:
    """A content-addressed store of immutable objects under `root` (bytes kept by `backend`)."""

    def __init__(self, root: Path | str, backend: ArtifactBackend | None = None) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.index = self.root / "index"
        self.tmp = self.root / "tmp"  # writes are staged here, complete and hashed, before `backend.put`
        self.backend: ArtifactBackend = (
            backend if backend is not None else LocalDirBackend(self.objects, index=self.index)
        )

    @classmethod
    def from_settings(cls, settings: Any) -> ArtifactStore:
        """The store a `schema.settings.Settings` names: the local folder `artifacts_path` by default, or
        the object store of `artifacts_url` (then `artifacts_path` only stages writes, and the read cache
        lives under `artifacts_cache_path`)."""
        url = getattr(settings, "artifacts_url", None)
        if not url:
            return cls(settings.artifacts_path)
        from schema.artifact_s3 import S3Backend  # boto3: only where an object store is configured
        from schema.settings import ENV_FILE_NAME, read_env_file

        # The endpoint and keys may sit in jetbox.env beside JETBOX_ARTIFACTS_URL, where the services'
        # EnvironmentFile= reads them: `jbctl` and a hand-started worker see them too.
        aws = {
            key: value
            for key, value in read_env_file(settings.home / ENV_FILE_NAME).items()
            if key.startswith("AWS_") and key not in os.environ
        }
        if any(k in os.environ for k in _AWS_KEYS):  # a key pair comes whole from one place
            aws = {k: v for k, v in aws.items() if k not in _AWS_KEYS}
        backend = S3Backend(
            url, cache_dir=settings.artifacts_cache_path, cache_bytes=settings.artifacts_cache_limit, aws=aws
        )
        return cls(settings.artifacts_path, backend=backend)

    def where(self, artifact_id: str) -> str:
        """Where the object lives, for messages (a file path, an s3:// URL)."""
        return self.backend.where(artifact_id)

    # -- paths and lookup -----------------------------------------------------------------

    def path(self, artifact_id: str) -> Path:
        """A local file with the object's bytes (for a local backend: where it lives, whether or not
        it exists)."""
        return self.backend.path(self._checked(artifact_id))

    @staticmethod
    def _checked(artifact_id: str) -> str:
        if not HEX64.match(artifact_id):
            raise UnknownArtifactError(f"not an artifact id: {artifact_id!r} (expected 64 hex characters)")
        return artifact_id

    def has(self, artifact_id: str) -> bool:
        """True if the object exists (its content is not checked)."""
        return HEX64.match(artifact_id) is not None and self.backend.exists(artifact_id)

    def size(self, artifact_id: str) -> int | None:
        """The object's size in bytes, or None when it is absent."""
        return self.backend.size(self._checked(artifact_id))

    def open(self, artifact_id: str) -> BinaryIO:
        """The object opened for reading (its content is not checked)."""
        return self.backend.open(self._checked(artifact_id))

    def ids(self) -> Iterator[str]:
        """Every object id present, in sorted order."""
        return self.backend.list()

    def resolve(self, prefix: str) -> str:
        """The full id for a unique prefix (at least 4 hex characters)."""
        prefix = prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise UnknownArtifactError(f"not an artifact id or prefix: {prefix!r} (need 4-64 hex characters)")
        if len(prefix) == 64:
            if self.has(prefix):
                return prefix
            raise UnknownArtifactError(f"no artifact {prefix}")
        matches = sorted(self.backend.list(prefix))
        if not matches:
            raise UnknownArtifactError(f"no artifact matches {prefix!r}")
        if len(matches) > 1:
            shown = ", ".join(m[:16] for m in matches[:5])
            raise AmbiguousArtifactError(f"prefix {prefix!r} matches {len(matches)} artifacts: {shown}")
        return matches[0]

    # -- writing --------------------------------------------------------------------------

    def _install(self, tmp: Path, artifact_id: str) -> None:
        self.backend.put(artifact_id, tmp)

    def _new_tmp(self) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{uuid.uuid4().hex}.tmp"

    def _needs_write(self, artifact_id: str, size: int, repair: bool) -> bool:
        have = self.backend.size(artifact_id)
        if have is None:
            return True
        if have != size:  # truncated copy: replace it
            return True
        return repair and self._digest(artifact_id)[0] != artifact_id

    def _digest(self, artifact_id: str) -> tuple[str, int]:
        """(sha256, size) of the stored bytes, read in chunks."""
        h = hashlib.sha256()
        size = 0
        with self.backend.open(artifact_id) as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def put_bytes(self, data: bytes, repair: bool = False) -> str:
        """Store `data`; returns its sha256 id. Existing objects are kept unless damaged.

        A same-sized existing object is trusted unless `repair` is set, which re-hashes it and
        replaces it if it was altered.
        """
        artifact_id = hashlib.sha256(data).hexdigest()
        if not self._needs_write(artifact_id, len(data), repair):
            return artifact_id
        tmp = self._new_tmp()
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._install(tmp, artifact_id)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return artifact_id

    def put_stream(self, source: BinaryIO, repair: bool = False) -> str:
        """Store everything read from `source`, hashing while copying; returns the id."""
        tmp = self._new_tmp()
        try:
            h = hashlib.sha256()
            size = 0
            with tmp.open("wb") as fh:
                while chunk := source.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            artifact_id = h.hexdigest()
            if self._needs_write(artifact_id, size, repair):
                self._install(tmp, artifact_id)
            else:
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return artifact_id

    def put_file(self, path: Path | str, repair: bool = False) -> str:
        """Store a copy of the file at `path`; returns its sha256 id."""
        with Path(path).open("rb") as fh:
            return self.put_stream(fh, repair=repair)

    # -- reading --------------------------------------------------------------------------

    def get_bytes(self, artifact_id: str, verify: bool = True) -> bytes:
        """The object's bytes; with `verify`, raises CorruptArtifactError if they do not match the id."""
        data = self.backend.get(self._checked(artifact_id))
        if verify and hashlib.sha256(data).hexdigest() != artifact_id:
            raise CorruptArtifactError(
                f"artifact {artifact_id} is corrupt: its content hash changed ({self.where(artifact_id)})"
            )
        return data

    def check(self, artifact_id: str, expected_size: int | None = None) -> None:
        """Raise CorruptArtifactError unless the object exists, has the size given and hashes to its id."""
        path = self.where(self._checked(artifact_id))
        if not self.has(artifact_id):
            raise CorruptArtifactError(f"artifact {artifact_id} is missing ({path})")
        digest, size = self._digest(artifact_id)
        if expected_size is not None and size != expected_size:
            raise CorruptArtifactError(
                f"artifact {artifact_id} is truncated or altered: {size} bytes, expected {expected_size} ({path})"
            )
        if digest != artifact_id:
            raise CorruptArtifactError(f"artifact {artifact_id} is corrupt: content hashes to {digest[:16]} ({path})")

    # -- index and manifests --------------------------------------------------------------

    def record(self, entry: ArtifactEntry) -> None:
        """Add (or replace) the index entry of an existing object (descriptive data, not the log's record)."""
        if not self.has(entry.id):
            raise UnknownArtifactError(f"cannot record {entry.id}: no such object")
        self.backend.put_entry(entry.id, entry.model_dump_json(indent=None).encode())

    def put_artifact(
        self,
        path: Path | str,
        kind: str,
        name: str = "",
        lineage: Lineage | None = None,
        created_at: datetime | None = None,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a file and record it in the index with its kind and lineage; returns its id."""
        artifact_id = self.put_file(path)
        entry = ArtifactEntry(
            id=artifact_id,
            kind=kind,
            name=name,
            size=self.size(artifact_id) or 0,
            lineage=lineage or Lineage(),
            created_at=created_at,
            meta=meta or {},
        )
        self.record(entry)
        return artifact_id

    def put_manifest(self, manifest: Manifest, require_shards: bool = True) -> str:
        """Store a manifest (after checking its shards are present, unless told not to) and index it;
        returns its id."""
        for shard in manifest.shards if require_shards else []:
            if not self.has(shard.id):
                raise UnknownArtifactError(f"manifest lists shard {shard.index} ({shard.id}) that is not in the store")
        manifest_id = self.put_bytes(manifest.to_bytes())
        self.record(
            ArtifactEntry(
                id=manifest_id,
                kind=MANIFEST_KIND,
                name=manifest.generator,
                size=sum(s.size for s in manifest.shards),
                count=manifest.count,
                split=manifest.split,
                lineage=manifest.lineage,
                created_at=manifest.created_at,
                meta={
                    "generator_version": manifest.generator_version,
                    "seed": manifest.seed,
                    "shards": len(manifest.shards),
                },
            )
        )
        return manifest_id

    def load_manifest(self, artifact_id: str) -> Manifest:
        """Read and validate a stored manifest (a prefix is accepted)."""
        full = self.resolve(artifact_id)
        data = self.get_bytes(full)
        try:
            return Manifest.model_validate_json(data)
        except ValueError as exc:
            raise ArtifactError(f"artifact {full} is not a dataset manifest: {exc}") from None

    def entries(self) -> list[ArtifactEntry]:
        """Every index entry, oldest first (then by id)."""
        out: list[ArtifactEntry] = []
        for artifact_id in self.backend.entry_ids():
            entry = self.entry(artifact_id)
            if entry is not None:  # a damaged entry is never fatal for listing
                out.append(entry)
        return sorted(out, key=lambda e: (e.created_at.isoformat() if e.created_at else "", e.id))

    def entry(self, artifact_id: str) -> ArtifactEntry | None:
        """The index entry of a full id, if recorded."""
        try:
            data = self.backend.get_entry(artifact_id)
        except OSError:
            return None
        if data is None:
            return None
        try:
            return ArtifactEntry.model_validate_json(data)
        except ValueError:
            return None

    def manifests(self) -> list[tuple[str, Manifest]]:
        """(id, manifest) for every indexed dataset whose manifest can be read."""
        out = []
        for entry in self.entries():
            if entry.kind != MANIFEST_KIND:
                continue
            try:
                out.append((entry.id, self.load_manifest(entry.id)))
            except ArtifactError:
                continue
        return out

    def list_entries(self, ticket: str | None = None, kind: str | None = None) -> list[ArtifactEntry]:
        """Index entries filtered by lineage ticket and by kind (matches the kind or the name)."""
        out = []
        for entry in self.entries():
            if ticket is not None and entry.lineage.ticket != ticket:
                continue
            if kind is not None and kind not in (entry.kind, entry.name):
                continue
            out.append(entry)
        return out

    # -- maintenance ----------------------------------------------------------------------

    def verify(self) -> list[Problem]:
        """Re-hash every object; check every manifest's shards exist with the listed size.

        Returns the problems found (empty when the store is sound).
        """
        problems: list[Problem] = []
        expected_sizes: dict[str, int] = {}
        for entry in self.entries():
            if not self.has(entry.id):
                problems.append(
                    Problem(
                        id=entry.id,
                        problem="missing",
                        detail=f"indexed {entry.kind} has no object",
                        path=self.where(entry.id),
                    )
                )
                continue
            if entry.kind == MANIFEST_KIND:
                try:
                    manifest = Manifest.model_validate_json(self.backend.get(entry.id))
                except ValueError as exc:
                    problems.append(
                        Problem(
                            id=entry.id,
                            problem="bad-manifest",
                            detail=str(exc).splitlines()[0],
                            path=self.where(entry.id),
                        )
                    )
                    continue
                for shard in manifest.shards:
                    expected_sizes[shard.id] = shard.size
                    if not self.has(shard.id):
                        problems.append(
                            Problem(
                                id=shard.id,
                                problem="missing",
                                detail=f"shard {shard.index} of dataset {entry.id[:12]}",
                                path=self.where(shard.id),
                            )
                        )
        for artifact_id in self.ids():
            path = self.where(artifact_id)
            digest, size = self._digest(artifact_id)
            if digest == artifact_id:
                continue
            want = expected_sizes.get(artifact_id)
            if want is not None and size < want:
                problems.append(
                    Problem(id=artifact_id, problem="truncated", detail=f"{size} bytes, expected {want}", path=path)
                )
            else:
                problems.append(
                    Problem(id=artifact_id, problem="corrupt", detail=f"content hashes to {digest[:16]}", path=path)
                )
        for name, where in self.backend.strays():
            problems.append(Problem(id=name, problem="stray", detail="not an object file", path=where))
        return problems

    def referenced(self) -> set[str]:
        """The default set kept by gc: every manifest and all it lists, plus anything with a lineage ticket."""
        keep: set[str] = set()
        for entry in self.entries():
            if entry.kind == MANIFEST_KIND or entry.lineage.ticket:
                keep.add(entry.id)
        return self.closure(keep)

    def closure(self, ids: set[str]) -> set[str]:
        """`ids` plus every object listed by the manifests among them."""
        out = set(ids)
        for artifact_id in ids:
            entry = self.entry(artifact_id)
            if entry is None or entry.kind != MANIFEST_KIND or not self.has(artifact_id):
                continue
            try:
                manifest = Manifest.model_validate_json(self.backend.get(artifact_id))
            except ValueError:
                continue
            out.update(manifest.object_ids())
        return out

    def gc(self, keep: set[str], dry_run: bool = True, temp_age_s: float = 3600.0) -> GcReport:
        """Remove every object not in `keep` (expanded with what kept manifests list).

        Also removes temp files older than `temp_age_s` (left by crashed writers). Dry run by default.
        """
        keep = self.closure(keep)
        removed: list[str] = []
        freed = 0
        kept = 0
        for artifact_id in list(self.ids()):
            if artifact_id in keep:
                kept += 1
                continue
            freed += self.backend.size(artifact_id) or 0
            removed.append(artifact_id)
            if not dry_run:
                self.backend.delete_entry(artifact_id)
                self.backend.delete(artifact_id)
        temps: list[str] = []
        if self.tmp.is_dir():
            now = time.time()
            for item in self.tmp.iterdir():
                if now - item.stat().st_mtime >= temp_age_s:
                    temps.append(str(item))
                    if not dry_run:
                        item.unlink(missing_ok=True)
        if not dry_run:
            # Index entries whose object is gone would list phantom artifacts.
            for artifact_id in list(self.backend.entry_ids()):
                if not self.has(artifact_id):
                    self.backend.delete_entry(artifact_id)
        return GcReport(dry_run=dry_run, removed=removed, freed_bytes=freed, kept=kept, temp_files=temps)
