"""The contract between a job's code and the runtime that runs it.

Job code (synthesis, training, evaluation, inference) receives a `JobContext` and never talks to
Redis, the event store or the clock of the orchestrator directly. The RQ runtime implements it with
signed reports; `LocalContext` implements it for library use, tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from schema.artifact_store import ArtifactStore
from schema.artifacts import Lineage


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through a temp file, fsync, rename: a crash or a reader never sees a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class JobCancelled(Exception):
    """Raised by `JobContext.raise_if_cancelled` when the orchestrator asked the job to stop."""


class JobContext(Protocol):
    """What every job may use. Paths handed out live in the job's private work directory."""

    ticket: str
    task: str
    attempt: int
    resume_from: Path | None  # the last checkpoint of an earlier attempt, if any
    network: str  # the ticket's network policy: "deny" or "allow"

    @property
    def workdir(self) -> Path:
        """The job's private work directory (made on first use by the runtime)."""

    @property
    def store(self) -> ArtifactStore:
        """Datasets and checkpoints are read from it; `artifact` adds to it."""

    def progress(self, step: int, total: int | None = None, **metrics: float) -> None:
        """Report progress; rate-limited by the runtime, so calling it every step is fine."""

    def checkpoint(self, path: Path, step: int) -> None:
        """Record `path` (already written atomically) as the latest resumable checkpoint."""

    def artifact(self, path: Path, kind: str, meta: dict[str, Any] | None = None) -> str:
        """Store `path` as a content-addressed artifact; returns its id (sha256)."""

    def record(self, artifact_id: str, kind: str, meta: dict[str, Any] | None = None) -> None:
        """Report an artifact that is already in the store (e.g. a dataset manifest)."""

    def log(self, message: str) -> None:
        """A human-readable line for the job's log."""

    def cancelled(self) -> bool:
        """True once the orchestrator asked this job to stop."""

    def raise_if_cancelled(self) -> None:
        """Raise JobCancelled if the job should stop."""


@dataclass
class LocalContext:
    """An in-process context: progress goes to a list (and optionally stderr), artifacts to a real
    `ArtifactStore` (by default in `workdir/artifacts`), laid out exactly as a worker's."""

    workdir: Path
    ticket: str = "LOCAL"
    task: str = "local"
    attempt: int = 1
    resume_from: Path | None = None
    network: str = "deny"
    artifact_root: Path | None = None  # where the store lives; default: workdir/artifacts
    verbose: bool = False
    progress_log: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[tuple[Path, int]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    stop_requested: bool = False
    store: ArtifactStore = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = ArtifactStore(self.artifact_root or self.workdir / "artifacts")

    def progress(self, step: int, total: int | None = None, **metrics: float) -> None:
        entry = {"step": step, "total": total, "time": time.monotonic(), **metrics}
        self.progress_log.append(entry)
        if self.verbose:
            print(json.dumps(entry), file=sys.stderr)

    def checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append((Path(path), step))

    def artifact(self, path: Path, kind: str, meta: dict[str, Any] | None = None) -> str:
        lineage = Lineage(ticket=self.ticket, task=self.task, attempt=self.attempt)
        digest = self.store.put_artifact(Path(path), kind=kind, name=Path(path).name, lineage=lineage, meta=meta)
        self.artifacts.append({"id": digest, "kind": kind, "meta": meta or {}, "path": str(self.store.path(digest))})
        return digest

    def record(self, artifact_id: str, kind: str, meta: dict[str, Any] | None = None) -> None:
        self.artifacts.append({"id": artifact_id, "kind": kind, "meta": meta or {}, "path": None})

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr)

    def cancelled(self) -> bool:
        return self.stop_requested

    def raise_if_cancelled(self) -> None:
        if self.stop_requested:
            raise JobCancelled(f"{self.ticket}/{self.task} attempt {self.attempt} cancelled")
