"""The shapes of artifacts: dataset manifests, index entries, lineage, errors; and atomic file writes.

The store that keeps them is `schema/artifact_store.py`. Its layout under the root
(``Settings.artifacts_path``, i.e. ``JETBOX_HOME/artifacts``)::

    objects/ab/abcdef...   one file per object, named by the sha256 of its bytes
    index/<id>.json        one small entry per *recorded* artifact (manifests, checkpoints, ...)
    tmp/                   temp files of writes in progress; never read as objects

Writes are atomic: bytes go to a temp file under ``tmp/`` (same file system as ``objects/``),
are fsynced, then renamed into place, and the directory is fsynced. A failed write removes
its temp file, so a reader sees either the whole object or nothing.

This module handles bytes and files only (stdlib + pydantic): it never imports numpy or torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CHUNK = 1 << 20
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_KIND: Final = "dataset"


class ArtifactError(Exception):
    """Base class of store errors (unknown or ambiguous id, corrupt object)."""


class UnknownArtifactError(ArtifactError, KeyError):
    """No object matches the id or prefix."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown artifact"


class AmbiguousArtifactError(ArtifactError):
    """A prefix matches several objects."""


class CorruptArtifactError(ArtifactError):
    """An object's bytes no longer hash to its id (altered, truncated or missing)."""


# ---------------------------------------------------------------------------------------------
# Models


class Lineage(BaseModel):
    """Who produced an artifact and from what."""

    model_config = ConfigDict(extra="forbid")

    ticket: str | None = None
    task: str | None = None
    attempt: int | None = Field(default=None, ge=1)
    inputs: list[str] = Field(default_factory=list)

    @field_validator("inputs")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if not HEX64.match(item):
                raise ValueError(f"input artifact id must be 64 hex characters, got {item!r}")
        return value


class FieldSpec(BaseModel):
    """One array of a dataset: dtype and per-example shape (the leading N is implied)."""

    model_config = ConfigDict(extra="forbid")

    dtype: str
    shape: list[int]
    description: str = ""


class ShardInfo(BaseModel):
    """One shard file of a dataset, as stored."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    id: str
    size: int = Field(ge=0)
    count: int = Field(ge=0)
    format: Literal["npz", "safetensors"] = "npz"

    @field_validator("id")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not HEX64.match(value):
            raise ValueError(f"shard id must be 64 hex characters, got {value!r}")
        return value


class Manifest(BaseModel):
    """Everything needed to find, check and regenerate a dataset bit for bit."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    kind: Literal["dataset"] = MANIFEST_KIND
    generator: str
    generator_version: str
    params: dict[str, Any]
    seed: int = Field(ge=0)
    count: int = Field(ge=0)
    shard_size: int = Field(ge=1)
    shards: list[ShardInfo]
    label_schema: dict[str, FieldSpec]
    split: str | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    created_at: datetime

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the bytes that are stored and hashed."""
        data = self.model_dump(mode="json")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def manifest_id(self) -> str:
        """The id this manifest has (or will have) in the store."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def object_ids(self) -> list[str]:
        """Ids of every object the manifest lists (its shards)."""
        return [s.id for s in self.shards]


# The fields of a manifest every shard subtask knows (all but its shards, lineage and time): each
# reports them, so that the step's manifest is joined from the subtasks' outputs without a job.
HEAD_FIELDS: Final = (
    "generator", "generator_version", "params", "seed", "count", "shard_size", "label_schema", "split"
)  # fmt: skip


class JoinError(ValueError):
    """The subtasks' reports do not make the planned dataset (a shard missing, twice, or miscounted)."""


def planned_counts(count: int, shard_size: int) -> list[int]:
    """How many examples each shard file holds: full files, then the remainder."""
    full, rest = divmod(count, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def join_manifest(
    heads: list[dict[str, Any]], shards: list[dict[str, Any]], lineage: Lineage, created_at: datetime
) -> Manifest:
    """The dataset's manifest from its shard subtasks' reports (pure: no store, no clock): byte for
    byte what one job writes for the same step, lineage and time. Raises JoinError naming the fault."""
    if not heads or any(h != heads[0] for h in heads[1:]):
        raise JoinError("the shard subtasks describe different datasets (generator, version or parameters)")
    head = {k: heads[0].get(k) for k in HEAD_FIELDS}
    ordered = sorted((ShardInfo.model_validate(s) for s in shards), key=lambda s: s.index)
    plan = planned_counts(int(head["count"] or 0), max(1, int(head["shard_size"] or 1)))
    if [s.index for s in ordered] != list(range(len(plan))):
        raise JoinError(f"expected shard files 0..{len(plan) - 1}, the subtasks reported {[s.index for s in ordered]}")
    for shard, want in zip(ordered, plan, strict=True):
        if shard.count != want:
            raise JoinError(f"shard file {shard.index} holds {shard.count} examples, the plan says {want}")
    return Manifest.model_validate(head | {"shards": ordered, "lineage": lineage, "created_at": created_at})


class ArtifactEntry(BaseModel):
    """An index entry: a recorded artifact with its kind and lineage, for listing and gc."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    name: str = ""
    size: int = 0
    count: int | None = None
    split: str | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    created_at: datetime | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class Problem(BaseModel):
    """One defect found by `verify`."""

    id: str
    problem: Literal["corrupt", "truncated", "missing", "bad-manifest", "stray"]
    detail: str = ""
    path: str = ""


class GcReport(BaseModel):
    """What `gc` removed (or would remove, on a dry run)."""

    dry_run: bool
    removed: list[str]
    freed_bytes: int
    kept: int
    temp_files: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Low-level atomic writing


def fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not supported everywhere (e.g. Windows), hence suppress.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(dest: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `dest` atomically: temp file, fsync, rename, fsync the directory."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tmp_dir or dest.parent
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
