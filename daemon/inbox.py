"""The report inbox: a reactor that reads workers' signed reports and turns them into commands.

Reports arrive on a Redis stream read through a consumer group. A message is acknowledged only after
the events it produced are committed, so delivery is at-least-once; the decider drops duplicates by
the attempt's report sequence number. A report whose signature fails becomes a SafetyViolation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

import redis
from pydantic import ValidationError

from daemon import commands as cmd
from daemon.dispatcher import redis_connection
from daemon.handler import CommandHandler
from schema.events import GpuCard
from schema.settings import Settings
from schema.wire import (
    BUNDLES_KEY,
    BUNDLES_TTL_S,
    REPORT_GROUP,
    REPORT_STREAM,
    Advert,
    Report,
    load_secret,
    verify,
    verify_text,
)

log = logging.getLogger("jetbox.inbox")
BATCH = 500
COALESCE_S = 0.003
STREAM_MAXLEN = 100_000


def ensure_group(conn: redis.Redis) -> None:
    """Create the stream and its consumer group (again, after Redis lost them)."""
    try:
        conn.xgroup_create(REPORT_STREAM, REPORT_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def to_command(report: Report, now: datetime) -> cmd.Command:
    """The decider command a verified report stands for."""
    base: dict[str, Any] = {
        "now": now,
        "ticket": report.ticket,
        "task": report.task,
        "attempt": report.attempt,
        "report_seq": report.seq,
        "sender": report.worker,
    }
    b = report.body
    if report.kind == "started":
        return cmd.RecordJobStarted(**base, worker=report.worker)
    if report.kind == "progress":
        return cmd.RecordProgress(**base, step=b.get("step", 0), total=b.get("total"), metrics=b.get("metrics", {}))
    if report.kind == "checkpoint":
        return cmd.RecordCheckpoint(**base, path=b["path"], step=b.get("step", 0))
    if report.kind == "artifact":
        return cmd.RecordArtifact(**base, artifact=b["artifact"], kind=b["kind"], meta=b.get("meta", {}))
    if report.kind == "succeeded":
        return cmd.RecordJobSucceeded(**base, metrics=b.get("metrics", {}), outputs=b.get("outputs", {}))
    if report.kind == "failed":
        return cmd.RecordJobFailed(
            **base,
            error=str(b.get("error", "unknown error")),
            retryable=bool(b.get("retryable", True)),
            violation=b.get("violation"),
            cause=b.get("cause", "job"),  # anything but job/infrastructure: a malformed report
        )
    return cmd.RecordViolation(now=now, what=str(b.get("what", "violation")), detail=str(b.get("detail", "")))


TERMINAL = frozenset({"succeeded", "failed"})


def _stream_id(mid: bytes) -> tuple[int, int]:
    ms, _, n = mid.partition(b"-")
    return int(ms), int(n or 0)


def burst_over(fields: dict[bytes, bytes]) -> bool:
    """Whether a stream message is (or, for a bundle, ends with) a job's result (`succeeded`/`failed`):
    the last of its burst. Only a hint for batching (the signature is checked later, in `parse`);
    unreadable is False."""
    bundled = b"bundle" in fields
    try:
        data = json.loads(fields.get(b"bundle" if bundled else b"report", b""))
    except (ValueError, UnicodeDecodeError):
        return False
    if bundled:
        data = data[-1] if isinstance(data, list) and data else None
    return isinstance(data, dict) and data.get("kind") in TERMINAL


class Inbox:
    """Reactor: stream of signed reports → commands → events, then XACK."""

    name = "inbox"

    def __init__(
        self, handler: CommandHandler, settings: Settings, conn: redis.Redis | None = None, consumer: str = "daemon"
    ) -> None:
        self.handler = handler
        self.conn = conn or redis_connection(settings)
        self.key = load_secret(settings.secret_path, create=True)
        self.consumer = consumer
        self.applied = 0
        self._watching = False
        self._recover = True  # read our own pending messages first (start-up, or after a failure)
        self._recovered_upto: tuple[int, int] | None = None  # the last id a recovery read returned
        self._lock = threading.Lock()
        self._unacked: list[bytes] = []  # committed, acknowledged with the next read
        self._taken: list[tuple[bytes, dict[bytes, bytes]]] = []  # read by the watcher, not yet applied
        self._watcher: threading.Thread | None = None
        self._wakeup: threading.Event | None = None
        self._caps_at = 0.0  # when `BUNDLES_KEY` was last set (monotonic; 0: never)
        ensure_group(self.conn)
        self._renew_caps(self.conn)

    def commands_of(self, fields: dict[bytes, bytes], now: datetime) -> list[cmd.Command]:
        """The commands one stream message stands for: a bundle's reports in order, else one."""
        if b"bundle" in fields:
            return self.parse_bundle(fields, now)
        return [self.parse(fields, now)]

    def _renew_caps(self, conn: Any, force: bool = True) -> None:
        """Tell workers that this daemon reads bundled reports (`BUNDLES_KEY`, with a TTL renewed every
        third of it: a Redis restarted empty has it again within seconds, and a daemon gone without
        `close` stops vouching once it expires). `conn` may be a pipeline: it rides with that round trip."""
        mono = time.monotonic()
        if force or mono - self._caps_at >= BUNDLES_TTL_S / 3:
            conn.set(BUNDLES_KEY, "1", ex=BUNDLES_TTL_S)
            self._caps_at = mono

    def parse_bundle(self, fields: dict[bytes, bytes], now: datetime) -> list[cmd.Command]:
        """A job's reports sent together as one message (docs/DISPATCH.md, "Bundled reports"): one
        signature over the JSON list of them. Each report then becomes the very command it would as a
        message of its own (a report that does not parse: a violation of its own); a bad signature
        makes the whole bundle one `forged_report`."""
        raw = fields.get(b"bundle", b"")
        sig = fields.get(b"sig", b"").decode(errors="replace")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return [cmd.RecordViolation(now=now, what="forged_report", detail=f"unreadable bundle: {raw[:200]!r}")]
        if not isinstance(data, list) or not (verify_text(raw, sig, self.key) or verify(data, sig, self.key)):
            first = data[0] if isinstance(data, list) and data else None
            claimed = first.get("ticket") if isinstance(first, dict) else None
            return [
                cmd.RecordViolation(
                    now=now,
                    what="forged_report",
                    detail=f"bad signature on bundled reports {str(data)[:300]}",
                    ticket=claimed if isinstance(claimed, str) and self.handler.known(claimed) else None,
                )
            ]
        return [self._command(item, now) for item in data]

    def _command(self, data: Any, now: datetime) -> cmd.Command:
        """The command a report whose signature verified stands for."""
        try:
            return to_command(Report.model_validate(data), now)
        except (ValidationError, KeyError, TypeError) as exc:
            return cmd.RecordViolation(
                now=now, what="malformed_report", detail=f"signed report does not parse: {str(exc)[:300]}"
            )

    def parse(self, fields: dict[bytes, bytes], now: datetime) -> cmd.Command:
        if b"advert" in fields:
            return self.parse_advert(fields, now)
        raw = fields.get(b"report", b"")
        sig = fields.get(b"sig", b"").decode(errors="replace")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return cmd.RecordViolation(now=now, what="forged_report", detail=f"unreadable report: {raw[:200]!r}")
        # The signature checked on the bytes received (what workers send), else on the data encoded
        # again (a report encoded otherwise): the same reports pass either way, the first costs no encoding.
        if not isinstance(data, dict) or not (verify_text(raw, sig, self.key) or verify(data, sig, self.key)):
            claimed = data.get("ticket") if isinstance(data, dict) else None
            return cmd.RecordViolation(
                now=now,
                what="forged_report",
                detail=f"bad signature on report {str(data)[:300]}",
                ticket=claimed if isinstance(claimed, str) and self.handler.known(claimed) else None,
            )
        return self._command(data, now)

    def parse_advert(self, fields: dict[bytes, bytes], now: datetime) -> cmd.Command:
        """A worker's advert (what it has) or farewell, signed like a report."""
        raw = fields.get(b"advert", b"")
        sig = fields.get(b"sig", b"").decode(errors="replace")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return cmd.RecordViolation(now=now, what="forged_report", detail=f"unreadable advert: {raw[:200]!r}")
        if not isinstance(data, dict) or not (verify_text(raw, sig, self.key) or verify(data, sig, self.key)):
            return cmd.RecordViolation(
                now=now, what="forged_report", detail=f"bad signature on advert {str(data)[:300]}"
            )
        try:
            advert = Advert.model_validate(data)
            if advert.kind == "departed":
                return cmd.RecordWorkerGone(now=now, worker=advert.worker, reason="departed", detail="it stopped")
            return cmd.RecordWorkerAdvertised(
                now=now,
                worker=advert.worker,
                node=advert.node,
                queues=advert.queues,
                gpus=[GpuCard.model_validate(g) for g in advert.gpus],
                cpus=advert.cpus,
                memory=advert.memory,
                detected=advert.detected,
            )
        except ValidationError as exc:
            return cmd.RecordViolation(
                now=now, what="malformed_report", detail=f"signed advert does not parse: {str(exc)[:300]}"
            )

    def _read(self, start: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Read after `start`; acknowledgements still owed ride in the same round trip."""
        acks = self._owed()
        if acks:
            pipe = self.conn.pipeline(transaction=False)
            pipe.xack(REPORT_STREAM, REPORT_GROUP, *acks)
            pipe.xreadgroup(REPORT_GROUP, self.consumer, {REPORT_STREAM: start}, count=BATCH)
            found = pipe.execute()[1]
        else:
            found = self.conn.xreadgroup(REPORT_GROUP, self.consumer, {REPORT_STREAM: start}, count=BATCH)
        return list(found[0][1]) if found else []

    def _owed(self) -> list[bytes]:
        with self._lock:
            acks, self._unacked = self._unacked, []
        return acks

    def _take(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """What the watcher read for us (at most a batch), less what a recovery read already applied."""
        with self._lock:
            taken, self._taken = self._taken[:BATCH], self._taken[BATCH:]
            more = bool(self._taken)
        if more and self._wakeup is not None:
            self._wakeup.set()  # the rest next time round
        if self._recovered_upto is not None:
            taken = [m for m in taken if _stream_id(m[0]) > self._recovered_upto]
        return taken

    def _fresh(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        watched = self._watcher is not None and self._watcher.is_alive()
        read = self._take if watched else (lambda: self._read(">"))
        messages = read()
        # (The watcher has read the rest of a burst already: the loop does not wait for it.)
        if not watched and messages and len(messages) < BATCH and not burst_over(messages[-1][1]):
            # A job's reports come in bursts (started, progress, result): wait a moment and take
            # the rest of the burst into the same commit. Not after a result: that ends its burst,
            # and what waits on it (the next step, a join, the ticket's end) would wait for nothing.
            time.sleep(COALESCE_S)
            messages += read()
        return messages

    def poll(self, now: datetime) -> bool:
        try:
            messages: list[tuple[bytes, dict[bytes, bytes]]] = []
            if self._recover:
                # Our own unacknowledged messages first (left by a crash, or by a commit that failed).
                pending = self._read("0")
                trimmed = [mid for mid, fields in pending if not fields]
                if trimmed:  # trimmed away before we acknowledged them: nothing left to apply
                    self.conn.xack(REPORT_STREAM, REPORT_GROUP, *trimmed)
                messages = [m for m in pending if m[1]]
                if pending:  # the watcher may hold some of these too: it must not apply them again
                    self._recovered_upto = max(_stream_id(mid) for mid, _ in pending)
                self._recover = bool(messages)  # until none is left
            if not messages:
                messages = self._fresh()
            if self._watcher is None:  # (the watcher renews it itself, in its reads' round trips)
                self._renew_caps(self.conn, force=False)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis was flushed or restarted empty
                ensure_group(self.conn)
                self._owed()
                return False
            raise
        if not messages:
            return False
        commands = [c for _, fields in messages for c in self.commands_of(fields, now)]
        try:
            self.handler.handle_many(commands, meta={"source": "worker-report"})
        except BaseException:
            self._recover = True  # read them again from the pending list, next poll
            raise
        # Committed: acknowledged with the next read (at-least-once either way; a crash before
        # then redelivers them, and the decider drops what it has seen by the report's seq). A
        # violation has no seq to be dropped by: acknowledged at once, as before.
        with self._lock:
            self._unacked.extend(mid for mid, _ in messages)
        if any(isinstance(c, cmd.RecordViolation) for c in commands):
            acks = self._owed()
            self.conn.xack(REPORT_STREAM, REPORT_GROUP, *acks)
        self.applied += len(messages)
        if self.applied % 5000 < len(messages):
            self.conn.xtrim(REPORT_STREAM, maxlen=STREAM_MAXLEN, approximate=True)
        return True

    def attach_wakeup(self, wakeup: threading.Event) -> None:
        """Read new reports in a thread of their own, blocked on the stream, and wake the daemon's
        loop the moment some arrive: the loop then takes them from memory, with no read of its own.
        Acknowledgements owed ride with the thread's next read."""
        self._watching = True
        self._wakeup = wakeup

        def watch() -> None:
            conn = redis.Redis(connection_pool=self.conn.connection_pool)
            while self._watching:
                acks = self._owed()
                try:
                    pipe = conn.pipeline(transaction=False)
                    if acks:
                        pipe.xack(REPORT_STREAM, REPORT_GROUP, *acks)
                    self._renew_caps(pipe, force=False)
                    pipe.xreadgroup(REPORT_GROUP, self.consumer, {REPORT_STREAM: ">"}, count=BATCH, block=1000)
                    found = pipe.execute()[-1]
                except redis.ResponseError as exc:
                    if not self._watching:
                        return
                    if "NOGROUP" in str(exc):  # Redis was flushed or restarted empty
                        with contextlib.suppress(redis.RedisError):
                            ensure_group(conn)
                    else:
                        self._give_back(acks)
                    time.sleep(0.5)
                    continue
                except (redis.RedisError, OSError, ValueError):
                    # ValueError/OSError: `close()` pulled the socket from under this read at shutdown.
                    if not self._watching:
                        return
                    self._give_back(acks)
                    time.sleep(0.5)
                    continue
                if found:
                    messages = list(found[0][1])
                    if len(messages) < BATCH and not burst_over(messages[-1][1]):
                        # Workers send a burst in one transaction, which arrives whole; a burst sent
                        # as a plain pipeline (an older worker) wakes this read after its first
                        # report, and the rest is already there, one quick read away.
                        with contextlib.suppress(redis.RedisError, OSError, ValueError):
                            more = conn.xreadgroup(REPORT_GROUP, self.consumer, {REPORT_STREAM: ">"}, count=BATCH)
                            messages += list(more[0][1]) if more else []
                    with self._lock:
                        self._taken.extend(messages)
                    wakeup.set()

        self._watcher = threading.Thread(target=watch, name="inbox-watch", daemon=True)
        self._watcher.start()

    def _give_back(self, acks: list[bytes]) -> None:
        """Acknowledgements that did not get through: owed again (they may well have, harmlessly)."""
        with self._lock:
            self._unacked[:0] = acks

    def close(self) -> None:
        self._watching = False
        acks = self._owed()
        with contextlib.suppress(redis.RedisError):
            if acks:
                self.conn.xack(REPORT_STREAM, REPORT_GROUP, *acks)
            # Workers send one message per report from their next job on: whatever daemon reads the
            # stream next (an earlier release, after a downgrade) reads those.
            self.conn.delete(BUNDLES_KEY)
        self.conn.close()
