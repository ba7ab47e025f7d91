"""The job runtime: what a job sees while it runs on an RQ worker.

It implements `JobContext` with signed reports to a Redis stream (progress, checkpoints, artifacts,
the result), a heartbeat whose key expires when the worker dies, and a cancellation check.

A job costs as few round trips to Redis as it can (docs/DISPATCH.md, "Round trips"): `started` and
`progress` reports are held for up to `HOLD_S` and go out in one pipeline with the next report (or
with the first heartbeat), so a job shorter than that sends all its reports in one round trip; the
heartbeat is one thread per worker process, not one per job, and a job that ends before its first
beat never writes (nor deletes) a heartbeat key at all.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import redis

from schema.artifact_store import ArtifactStore
from schema.artifacts import ArtifactError, Lineage
from schema.wire import REPORT_STREAM, Envelope, bundle_text, cancel_key, heartbeat_key, report_text, signed_fields
from workers.context import JobCancelled

PROGRESS_INTERVAL_S = 1.0
CANCEL_CHECK_INTERVAL_S = 0.5
SEND_RETRIES_S = (0.1, 0.3, 0.6, 1.0)  # back-off between tries of a report while Redis is away
# How long a `started` or `progress` report may wait to share a round trip with the next one. The
# daemon learns of a start this much later at worst (timeouts are seconds at least); a job shorter
# than this sends started, progress and its result in one pipeline.
HOLD_S = 0.2
PULSE_RETRY_S = 0.1  # after a failed beat or flush (Redis restarting), try again this soon

Extra = Callable[[Any], None]  # adds commands to the pipeline that carries a batch of reports


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Reporter:
    """Signs and sends one attempt's reports, numbered in order (the inbox drops duplicates).

    `send` ships at once (with any held reports before it, in one round trip); `hold` keeps a report
    for the next send or the pulse's flush, whichever comes first (about `HOLD_S` later). Each report
    is encoded as it is made and signed as it is shipped. `bundles`: the daemon reads bundled reports
    (`BUNDLES_KEY` was set as the job started), so reports shipped together go out as one stream
    message with one signature; otherwise each is a message of its own, as a daemon of any release
    reads them."""

    def __init__(
        self,
        conn: redis.Redis,
        key: bytes,
        envelope: Envelope,
        worker: str,
        bundles: bool = False,
    ) -> None:
        self.conn, self.key, self.env, self.worker = conn, key, envelope, worker
        self.bundles = bundles
        self.seq = 0
        self.lock = threading.Lock()
        self.held: list[str] = []  # the held reports' canonical texts
        self.held_since: float | None = None  # monotonic time the oldest held report was made

    def _text(self, report_kind: str, body: dict[str, Any]) -> str:
        self.seq += 1
        env = self.env
        data = {
            "kind": report_kind,
            "ticket": env.ticket,
            "task": env.task,
            "attempt": env.attempt,
            "seq": self.seq,
            "worker": self.worker,
            "body": body,
        }
        return report_text(data)

    def hold(self, report_kind: str, /, **body: Any) -> None:
        with self.lock:
            self.held.append(self._text(report_kind, body))
            if self.held_since is None:
                self.held_since = time.monotonic()

    def send(self, report_kind: str, /, **body: Any) -> None:
        self.send_with(report_kind, None, **body)

    def send_with(self, report_kind: str, extra: Extra | None, /, **body: Any) -> None:
        """Send a report now, after the held ones, with `extra` commands in the same round trip."""
        with self.lock:
            self._ship([*self.held, self._text(report_kind, body)], extra)
            self.held, self.held_since = [], None

    def flush(self, extra: Extra | None = None) -> None:
        """Send the held reports (and `extra`) in one round trip; held ones stay held if it fails."""
        with self.lock:
            self._ship(list(self.held), extra)
            self.held, self.held_since = [], None

    def messages(self, texts: Sequence[str]) -> list[dict[str, str]]:
        """The stream messages that carry these reports: one bundle (one signature) where the daemon
        reads bundles and there are several, else one signed message per report."""
        if self.bundles and len(texts) > 1:
            return [signed_fields("bundle", bundle_text(list(texts)), self.key)]
        return [signed_fields("report", text, self.key) for text in texts]

    def _ship(self, texts: Sequence[str], extra: Extra | None) -> None:
        batch = self.messages(texts)
        # Ride out a Redis restart (well under a second) instead of failing the job over it; a report
        # that got through before the connection dropped and is sent again is dropped by its seq.
        for delay in (*SEND_RETRIES_S, None):
            try:
                if len(batch) == 1 and extra is None:
                    self.conn.xadd(REPORT_STREAM, batch[0])  # type: ignore[arg-type]
                    return
                if not batch and extra is None:
                    return
                # MULTI/EXEC: Redis serves a blocked reader (the daemon's inbox) only after the whole
                # transaction, so the burst reaches it in one read; a plain pipeline woke it after the first
                # report, and it had to read again for the rest.
                pipe = self.conn.pipeline(transaction=True)
                for fields in batch:
                    pipe.xadd(REPORT_STREAM, fields)  # type: ignore[arg-type]
                if extra is not None:
                    extra(pipe)
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if delay is None:
                    raise
                time.sleep(delay)


class _Beating:
    """The job the pulse beats for."""

    def __init__(self, reporter: Reporter, jid: str, every: float, ttl: float) -> None:
        self.reporter, self.key, self.every, self.ttl = reporter, heartbeat_key(jid), every, ttl
        self.next_beat = time.monotonic() + min(HOLD_S, every)
        self.beaten = False  # whether the key was ever set (a job that ended first never has one)
        self.not_before = 0.0  # after a failed try: not again before this

    def due(self) -> float:
        held = self.reporter.held_since
        due = self.next_beat if held is None else min(self.next_beat, held + HOLD_S)
        return max(due, self.not_before)

    def set_key(self, pipe: Any) -> None:
        pipe.set(self.key, str(time.time()), px=int(self.ttl * 1000))


class Pulse(threading.Thread):
    """One per worker process: the running jobs' heartbeats, and the flush of their held reports.

    The first beat comes `HOLD_S` into a job (with its held `started`), then every `every` seconds; a
    beat refreshes `jetbox:hb:<job id>` with a TTL, so if the worker dies the key expires and the
    reconciler notices. `end()` stops the beats before the job's last report, which deletes the key
    in the same pipeline when there is one. The thread wakes at least every `HOLD_S` and looks: a
    job's start costs it no signalling (a held report waits at most twice `HOLD_S`). RQ runs one job
    at a time per worker; jobs run side by side in one process are each beaten all the same."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="jetbox-pulse")
        self.lock = threading.Lock()  # held while beating: `end()` waits for a beat in flight
        self.jobs: dict[str, _Beating] = {}

    def begin(self, reporter: Reporter, jid: str, every: float, ttl: float) -> None:
        job = _Beating(reporter, jid, every, ttl)
        with self.lock:
            self.jobs[job.key] = job

    def end(self, jid: str) -> str | None:
        """No more beats for job `jid`; the heartbeat key to delete, if one was set. Waits for a beat
        in flight, so no beat can land after the job's last report."""
        with self.lock:
            job = self.jobs.pop(heartbeat_key(jid), None)
        return job.key if job is not None and job.beaten else None

    def run(self) -> None:
        while True:
            with self.lock:
                jobs = list(self.jobs.values())
            now = time.monotonic()
            wait = min([HOLD_S, *(job.due() - now for job in jobs)])
            if wait > 0:
                time.sleep(wait)
                continue
            with self.lock:
                for job in jobs:
                    if self.jobs.get(job.key) is job and job.due() <= time.monotonic():
                        self._beat(job)

    @staticmethod
    def _beat(job: _Beating) -> None:
        job.beaten = True  # before the try: deleting a key that never got set is harmless
        try:
            job.reporter.flush(job.set_key)  # held reports and the beat: one round trip
            job.next_beat = time.monotonic() + job.every
        except Exception:  # the pulse must outlive anything one beat runs into
            # Redis restarting: the reconciler decides what a missing beat means.
            job.not_before = time.monotonic() + PULSE_RETRY_S


_pulse: Pulse | None = None
_pulse_lock = threading.Lock()


def pulse() -> Pulse:
    """This process's pulse thread, started on first use."""
    global _pulse
    with _pulse_lock:
        if _pulse is None or not _pulse.is_alive():
            _pulse = Pulse()
            _pulse.start()
        return _pulse


class RuntimeContext:
    """`JobContext` for a job running on a worker. Its work directory and log file are made on first
    use: a job that writes nothing costs no file-system calls."""

    def __init__(
        self,
        envelope: Envelope,
        reporter: Reporter,
        conn: redis.Redis,
        workdir: Path,
        artifacts: ArtifactStore | Path,
        cancel_seen: bool | None = None,
    ) -> None:
        self.envelope = envelope
        self.ticket, self.task, self.attempt = envelope.ticket, envelope.task, envelope.attempt
        self._workdir = workdir
        self._artifacts = artifacts
        self.reporter = reporter
        self.conn = conn
        self.network: str = envelope.network
        self._last_progress = 0.0
        # `cancel_seen`: the worker looked at the cancel key as the job started (in RQ's own round trip),
        # so the next look is due one interval later; None: nobody did, the first `cancelled()` asks.
        self._last_cancel_check = 0.0 if cancel_seen is None else time.monotonic()
        self._cancelled = bool(cancel_seen)
        self._log: IO[str] | None = None
        # A store that cannot be reached now is the attempt's failure (reported, retried), raised by
        # the entry point once the attempt has started: starting over would throw the progress away.
        self.resume_error: ArtifactError | None = None
        try:
            self.resume_from = self._resume_path(envelope.resume_checkpoint)
        except ArtifactError as exc:
            self.resume_from, self.resume_error = None, exc

    @property
    def workdir(self) -> Path:
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @cached_property
    def store(self) -> ArtifactStore:
        found = self._artifacts
        return found if isinstance(found, ArtifactStore) else ArtifactStore(found)

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
        self.reporter.hold("progress", step=int(step), total=total, metrics=clean)

    def checkpoint(self, path: Path, step: int) -> None:
        # Into the artifact store: a retry on another host (sharing an object store) resumes from it.
        try:
            artifact_id = self.store.put_file(path)
        except ArtifactError as exc:
            # An object store away for a moment must not end hours of training: the next checkpoint tries
            # again, and a retry meanwhile resumes from the last one that was stored.
            self.log(f"checkpoint at step {step} not stored, training goes on: {exc}")
            return
        # Sent at once (not held): a worker that dies next must leave this checkpoint to resume from.
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
        if self._log is None:
            self._log = (self.workdir / "job.log").open("a", buffering=1)
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
        if self._log is not None:
            self._log.close()
