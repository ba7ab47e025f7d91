"""The reconciler: compares what the log says is running with what RQ and the heartbeats say.

Redis is a transport, never the source of truth. An attempt still waiting whose RQ job vanished
(Redis flushed or restarted empty) is enqueued again under the same id, from its `AttemptScheduled`
as recorded in the log and through the dispatcher's own path (`dispatch`); an attempt whose worker
stopped beating, whose RQ job died, or that ran past its timeout is failed, and the decider's retry
policy takes it from there (resuming from the last checkpoint). Each failure says whose it is
(`cause`): the infrastructure's (a lost worker or job, a timeout with no live worker) or the job's
(it ran past its timeout on a live worker); only the job's count towards loop detection.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from daemon import commands as cmd
from daemon.dispatcher import dispatch, redis_connection
from daemon.handler import CommandHandler
from daemon.state import TaskState, TicketState
from schema import events as ev
from schema.events import FailureCause
from schema.plan import LIVE
from schema.settings import Settings
from schema.wire import cancel_key, heartbeat_key, job_id, load_secret, worker_key

log = logging.getLogger("jetbox.reconciler")
DEAD_JOB_STATES = {"failed", "stopped", "canceled"}


class Reconciler:
    """Reactor that runs every `heartbeat_seconds` (and once at start-up)."""

    name = "reconciler"

    def __init__(self, handler: CommandHandler, settings: Settings, conn: redis.Redis | None = None) -> None:
        self.handler = handler
        self.conn = conn or redis_connection(settings)
        self.key = load_secret(settings.secret_path, create=True)
        self.every = settings.heartbeat_seconds
        self.grace = settings.heartbeat_timeout_seconds
        self.last_run = 0.0
        self.missing_since: dict[str, float] = {}
        self.recorded: dict[str, ev.AttemptScheduled] = {}  # job id -> its AttemptScheduled, read from the log
        self.redispatched = 0
        self.status: dict[str, bytes | None] = {}  # job id -> RQ status, as looked at in this pass
        self.beating: dict[str, bool] = {}  # job id -> heartbeat key present, in this pass

    def poll(self, now: datetime) -> bool:
        mono = time.monotonic()
        if mono - self.last_run < self.every:
            return False
        self.last_run = mono
        commands: list[cmd.Command] = []
        live: dict[str, tuple[TicketState, TaskState]] = {}
        state = self.handler.state
        for ticket in [state.tickets[tid] for tid in state.running]:
            for task in ticket.tasks.values():
                if task.status in LIVE:
                    live[job_id(ticket.id, task.id, task.attempt)] = (ticket, task)
        self._look(list(live))
        for jid, (ticket, task) in live.items():
            found = self.check(ticket, task, jid, now, mono)
            if found is not None:
                commands.append(found)
        self.status, self.beating = {}, {}
        commands.extend(self.check_workers(now, mono))
        marks = set(live) | {f"worker:{w}" for w in state.workers}
        self.missing_since = {k: v for k, v in self.missing_since.items() if k in marks}
        self.recorded = {k: v for k, v in self.recorded.items() if k in live}
        if commands:
            self.handler.handle_many(commands, meta={"source": "reconciler"})
        return bool(commands)

    def check(self, ticket: TicketState, task: TaskState, jid: str, now: datetime, mono: float) -> cmd.Command | None:
        started = task.started_at or task.scheduled_at
        if task.status == "running" and started is not None and (now - started).total_seconds() > task.timeout:
            self.conn.set(cancel_key(jid), "1", ex=86400)
            # A live worker still beating means the job itself ran too long; no beat, a dead worker.
            if self._beats(jid):
                return self._fail(ticket, task, f"timed out: ran longer than {task.timeout:g}s", now, "job")
            return self._fail(
                ticket, task, f"timed out: ran longer than {task.timeout:g}s with no live worker", now, "infrastructure"
            )
        if jid in self.status:  # looked at in this pass, with all the others
            raw = self.status[jid]
            status = raw.decode() if raw is not None else None
        else:
            job = self._job(jid)
            status = job.get_status(refresh=False) if job is not None else None
        if status is None:
            if task.status == "scheduled":
                # Lost before any worker took it (Redis flushed or restarted empty): send it again.
                scheduled = self._scheduled(ticket.id, jid)
                if scheduled is not None and dispatch(self.conn, self.key, scheduled):
                    self.redispatched += 1
                return None
            return self._missing_beat(ticket, task, jid, now, mono, "its RQ job vanished")
        if status in DEAD_JOB_STATES:
            job = self._job(jid)  # only for a dead one: what it died of
            result = job.latest_result() if job is not None else None
            info = (result.exc_string if result else None) or status
            return self._fail(
                ticket, task, f"worker lost the job ({status}): {str(info)[-500:]}", now, "infrastructure"
            )
        if status == "finished":
            # RQ says done but the log never heard: the reports went missing (a report stream lost
            # with Redis). Waiting would hang the ticket; after the grace period, retry the attempt.
            return self._missing_beat(ticket, task, jid, now, mono, "the job finished but its reports never arrived")
        if status == "started" or task.status == "running":
            return self._missing_beat(ticket, task, jid, now, mono, "no heartbeat")
        return None

    def check_workers(self, now: datetime, mono: float) -> list[cmd.Command]:
        """An advertised worker whose liveness key has been gone for the grace period is lost: what it
        had is no longer offered (the key's TTL is heartbeat_timeout, refreshed every heartbeat, and a
        Redis restarted empty gets it back within a beat, so it is noticed within 2 x timeout)."""
        lost: list[cmd.Command] = []
        names = list(self.handler.state.workers)
        if not names:
            return lost
        with self.conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(worker_key(name))
            alive = pipe.execute()
        for name, here in zip(names, alive, strict=True):
            mark = f"worker:{name}"
            if here:
                self.missing_since.pop(mark, None)
                continue
            first = self.missing_since.setdefault(mark, mono)
            if mono - first >= self.grace:
                self.missing_since.pop(mark, None)
                lost.append(
                    cmd.RecordWorkerGone(
                        now=now, worker=name, reason="lost", detail=f"no sign of life for {self.grace:g}s"
                    )
                )
        return lost

    def _look(self, jids: list[str]) -> None:
        """Each live job's RQ status and whether its heartbeat key exists, in one round trip for all
        (a look per job, with hundreds running, held the daemon's loop for a round trip each)."""
        pipe = self.conn.pipeline(transaction=False)
        for jid in jids:
            pipe.hget(Job.key_for(jid), "status")
            pipe.exists(heartbeat_key(jid))
        found = pipe.execute() if jids else []
        self.status = {jid: found[2 * i] for i, jid in enumerate(jids)}
        self.beating = {jid: bool(found[2 * i + 1]) for i, jid in enumerate(jids)}

    def _beats(self, jid: str) -> bool:
        seen = self.beating.get(jid)
        return bool(self.conn.exists(heartbeat_key(jid))) if seen is None else seen

    def _missing_beat(
        self, ticket: TicketState, task: TaskState, jid: str, now: datetime, mono: float, why: str
    ) -> cmd.Command | None:
        if self._beats(jid):
            self.missing_since.pop(jid, None)
            return None
        first = self.missing_since.setdefault(jid, mono)
        if mono - first < self.grace:
            return None  # a restarted Redis lost the key; a live worker sets it again within a beat
        self.missing_since.pop(jid, None)
        # The worker may only be cut off (a network partition), not dead: when it comes back, this
        # tells its job to stop at its next cancellation check instead of training on for nothing.
        # Whatever it reports meanwhile is fenced by the attempt number (StaleReportRefused).
        self.conn.set(cancel_key(jid), "1", ex=86400)
        worker = f" on {task.worker}" if task.worker else ""
        return self._fail(ticket, task, f"worker lost{worker}: {why} for {self.grace:g}s", now, "infrastructure")

    def _job(self, jid: str) -> Any:
        try:
            return Job.fetch(jid, connection=self.conn, serializer=JSONSerializer)
        except Exception:  # NoSuchJobError, or a job hash Redis half-lost
            return None

    def _scheduled(self, ticket: str, jid: str) -> ev.AttemptScheduled | None:
        """The attempt's `AttemptScheduled` as recorded (one read of the ticket's stream serves all of its
        lost attempts): the envelope is never rebuilt from state, which lacks what the decider added."""
        if jid not in self.recorded:
            for rec in self.handler.store.read(0, stream=ticket, types=["AttemptScheduled"]):
                e = rec.event
                if isinstance(e, ev.AttemptScheduled):
                    self.recorded[job_id(e.ticket, e.task, e.attempt)] = e
        found = self.recorded.get(jid)
        if found is None:  # cannot happen while state is built from the same log; say so if it does
            log.error("no AttemptScheduled recorded for %s; not re-dispatched", jid)
        return found

    def _fail(
        self, ticket: TicketState, task: TaskState, error: str, now: datetime, cause: FailureCause
    ) -> cmd.Command:
        """A retryable failure of the live attempt; the decider's retry policy takes it from there."""
        return cmd.RecordJobFailed(
            now=now, ticket=ticket.id, task=task.id, attempt=task.attempt, error=error, retryable=True, cause=cause
        )

    def close(self) -> None:
        self.conn.close()
