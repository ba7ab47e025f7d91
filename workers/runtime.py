"""The job runtime: what a job sees while it runs on an RQ worker.

It implements `JobContext` with signed reports to a Redis stream (progress, checkpoints, artifacts,
the result), a heartbeat thread whose key expires when the worker dies, and a cancellation check.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from schema.artifact_store import ArtifactStore
from schema.artifacts import ArtifactError, Lineage
from schema.wire import REPORT_STREAM, Envelope, Report, cancel_key, heartbeat_key
from workers.context import JobCancelled

PROGRESS_INTERVAL_S = 1.0
CANCEL_CHECK_INTERVAL_S = 0.5
SEND_RETRIES_S = (0.1, 0.3, 0.6, 1.0)  # back-off between tries of a report while Redis is away


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Reporter:
    """Signs and sends one attempt's reports, numbered in order (the inbox drops duplicates)."""

    def __init__(self, conn: redis.Redis, key: bytes, envelope: Envelope, worker: str) -> None:
        self.conn, self.key, self.env, self.worker = conn, key, envelope, worker
        self.seq = 0
        self.lock = threading.Lock()

    def send(self, report_kind: str, /, **body: Any) -> None:
        with self.lock:
            self.seq += 1
            report = Report(
                kind=report_kind,
                ticket=self.env.ticket,
                task=self.env.task,
                attempt=self.env.attempt,  # type: ignore[arg-type]
                seq=self.seq,
                worker=self.worker,
                body=body,
            )
            fields = report.signed(self.key)
            # Ride out a Redis restart (well under a second) instead of failing the job over it; a report
            # that got through before the connection dropped and is sent again is dropped by its seq.
            for delay in SEND_RETRIES_S:
                try:
                    self.conn.xadd(REPORT_STREAM, fields)  # type: ignore[arg-type]
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(delay)
            self.conn.xadd(REPORT_STREAM, fields)  # type: ignore[arg-type]


class Heartbeat(threading.Thread):
    """Refreshes a key with a TTL: if the worker dies, the key expires and the reconciler notices."""

    def __init__(self, conn: redis.Redis, jid: str, every: float, ttl: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{jid}")
        self.conn, self.key, self.every, self.ttl = conn, heartbeat_key(jid), every, ttl
        self.stopped = threading.Event()

    def beat(self) -> None:
        self.conn.set(self.key, str(time.time()), px=int(self.ttl * 1000))

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.beat()
            except redis.RedisError:
                pass  # Redis restarting: the reconciler decides what a missing beat means

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.conn.delete(self.key)
        except redis.RedisError:
            pass


class RuntimeContext:
    """`JobContext` for a job running on a worker."""

    def __init__(
        self,
        envelope: Envelope,
        reporter: Reporter,
        conn: redis.Redis,
        workdir: Path,
        artifacts: ArtifactStore | Path,
    ) -> None:
        self.envelope = envelope
        self.ticket, self.task, self.attempt = envelope.ticket, envelope.task, envelope.attempt
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reporter = reporter
        self.conn = conn
        self.network: str = envelope.network
        self.store = artifacts if isinstance(artifacts, ArtifactStore) else ArtifactStore(artifacts)
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._log = (workdir / "job.log").open("a", buffering=1)
        # A store that cannot be reached now is the attempt's failure (reported, retried), raised by
        # the entry point once the attempt has started: starting over would throw the progress away.
        self.resume_error: ArtifactError | None = None
        try:
            self.resume_from = self._resume_path(envelope.resume_checkpoint)
        except ArtifactError as exc:
            self.resume_from, self.resume_error = None, exc

    def _resume_path(self, ref: str | None) -> Path | None:
        """A local file with the checkpoint to resume from. Checkpoints are artifacts (`sha256:<id>`), so
        any worker that shares the store can resume them; a bare path is from a log written before that."""
        if not ref:
            return None
        if not ref.startswith("sha256:"):
            return Path(ref)
        artifact_id = ref.removeprefix("sha256:")
        path = self.store.path(artifact_id)
        if path.is_file():
            return path
        # Gone (gc'd, or a store this worker does not share): starting over is slower, never wrong.
        self.log(
            f"checkpoint {artifact_id[:12]} is not in the artifact store ({self.store.where(artifact_id)}); "
            "starting from scratch"
        )
        return None

    def progress(self, step: int, total: int | None = None, **metrics: float) -> None:
        now = time.monotonic()
        final = total is not None and step >= total
        if not final and now - self._last_progress < PROGRESS_INTERVAL_S:
            return  # rate limit: a hot loop must not flood the log
        self._last_progress = now
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.reporter.send("progress", step=int(step), total=total, metrics=clean)

    def checkpoint(self, path: Path, step: int) -> None:
        # Into the artifact store: a retry on another host (sharing an object store) resumes from it.
        try:
            artifact_id = self.store.put_file(path)
        except ArtifactError as exc:
            # An object store away for a moment must not end hours of training: the next checkpoint tries
            # again, and a retry meanwhile resumes from the last one that was stored.
            self.log(f"checkpoint at step {step} not stored, training goes on: {exc}")
            return
        self.reporter.send("checkpoint", path=f"sha256:{artifact_id}", step=int(step))

    def artifact(self, path: Path, kind: str, meta: dict[str, Any] | None = None) -> str:
        lineage = Lineage(ticket=self.ticket, task=self.task, attempt=self.attempt)
        artifact_id = self.store.put_artifact(Path(path), kind=kind, name=Path(path).name, lineage=lineage, meta=meta)
        self.reporter.send("artifact", artifact=artifact_id, kind=kind, meta=meta or {})
        return artifact_id

    def record(self, artifact_id: str, kind: str, meta: dict[str, Any] | None = None) -> None:
        self.reporter.send("artifact", artifact=artifact_id, kind=kind, meta=meta or {})

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self._log.write(line + "\n")
        print(f"[{self.ticket}/{self.task}#{self.attempt}] {message}", file=sys.stderr, flush=True)

    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL_S:
            self._last_cancel_check = now
            try:
                self._cancelled = bool(self.conn.exists(cancel_key(self.envelope.job_id)))
            except redis.RedisError:
                pass
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self.cancelled():
            raise JobCancelled(f"{self.ticket}/{self.task} attempt {self.attempt} was cancelled")

    def close(self) -> None:
        self._log.close()
