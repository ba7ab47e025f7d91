"""The dispatcher: a reactor that turns AttemptScheduled events into RQ jobs, and cancellations into stop flags;
it also writes the dataset manifests the decider joined from shards (ShardsJoined), in log order.

It reads the log after its own checkpoint. Enqueueing is idempotent (the RQ job id is derived from
ticket, task and attempt), so a crash between acting and checkpointing only repeats harmless work.
The daemon never imports `workers`: jobs name the entry point as a string.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from daemon.handler import CommandHandler
from daemon.manifests import write_joined_manifest
from daemon.rqjobs import RQ_LAYOUT_KNOWN, JobWriter
from schema import events as ev
from schema.artifact_store import ArtifactStore
from schema.plan import LIVE
from schema.settings import Settings
from schema.wire import (
    CORE_KEY,
    ENTRY_POINT,
    Envelope,
    cancel_key,
    dedicated_key,
    dedicated_queue,
    ended_key,
    job_id,
    load_secret,
    worker_queue,
)

log = logging.getLogger("jetbox.dispatcher")
CHECKPOINT = "dispatcher"
_WATCHED = [
    "AttemptScheduled",
    "TicketCancelled",
    "TicketFailed",
    "TicketCompleted",
    "CorePromoted",
    "TicketHeld",
    "WorkerGone",
    "ShardsJoined",
]
_WATCHED_SET = frozenset(_WATCHED)
PAGE = 1000
KEEP_S = 7 * 86400  # how long RQ keeps a finished job (and so remembers its id)


def redis_connection(settings: Settings) -> redis.Redis:
    if not settings.redis_url:
        raise RuntimeError("no Redis configured (JETBOX_REDIS_URL); `jbctl up` starts a private one")
    return redis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=30)


def queue(conn: redis.Redis, name: str) -> Queue:
    return Queue(name, connection=conn, serializer=JSONSerializer)


@functools.lru_cache(maxsize=256)
def _queue_object(conn: redis.Redis, name: str) -> Queue:
    """A Queue to enqueue on, made once per connection and name (making one costs ~30 us; a chain
    enqueues one job at a time). It holds no state of the queue itself: every call reads Redis."""
    return queue(conn, name)


def enqueue(conn: redis.Redis, key: bytes, envelope: Envelope, queue_name: str) -> bool:
    """Put one attempt on its queue unless RQ already knows its job id; True if enqueued now."""
    if Job.exists(envelope.job_id, connection=conn):
        return False
    writer = _writer(conn)
    _enqueue_on(writer, conn, key, envelope, queue_name)
    writer.execute()
    return True


def _writer(conn: redis.Redis) -> Any:
    """Where `_enqueue_on` queues its commands: a `JobWriter` (one `MULTI`/`EXEC`) where RQ's layout is
    known (rq 3.0), else a `MULTI` pipeline for RQ's own `enqueue_call`. Either has `execute`."""
    return JobWriter(conn) if RQ_LAYOUT_KNOWN else conn.pipeline()


def _enqueue_on(writer: Any, conn: redis.Redis, key: bytes, envelope: Envelope, queue_name: str) -> None:
    """Queue the commands that enqueue one attempt on `writer` (`_writer`; RQ's own job layout, sent by
    its `execute`)."""
    timeout = int(envelope.timeout) + 60  # our own timeout fires first; RQ's is the backstop
    description = f"{envelope.ticket}/{envelope.task} attempt {envelope.attempt} ({envelope.kind})"
    if isinstance(writer, JobWriter):
        writer.add(
            queue_name,
            envelope.job_id,
            ENTRY_POINT,
            (envelope.signed(key),),
            timeout=timeout,
            result_ttl=KEEP_S,
            failure_ttl=KEEP_S,
            description=description,
        )
        return
    _queue_object(conn, queue_name).enqueue_call(
        func=ENTRY_POINT,
        args=(envelope.signed(key),),
        job_id=envelope.job_id,
        timeout=timeout,
        result_ttl=KEEP_S,
        failure_ttl=KEEP_S,
        description=description,
        pipeline=writer,
    )


def envelope_from(e: ev.AttemptScheduled) -> Envelope:
    """The envelope of an attempt, exactly as the decider recorded it (params with `_core`, grants...)."""
    return Envelope(
        kind=e.kind,
        ticket=e.ticket,
        task=e.task,
        attempt=e.attempt,
        params=e.params,
        resume_checkpoint=e.resume_checkpoint,
        timeout=e.timeout,
        network=e.network,
        device=e.device,
    )


ENQUEUE_CHUNK = 16  # attempts per enqueue transaction
DEDICATED_KNOWN_S = 1.0  # how long the dispatcher trusts what it read of a ticket's dedicated worker


class Dedicated:
    """What the dispatcher last read of which tickets have a dedicated worker (`dedicated_key`), for
    `DEDICATED_KNOWN_S`: a chain of short jobs asks once a second instead of once per job. The claim is
    made before the ticket is submitted and lives for 30 s past its worker, so a second's delay in seeing
    it come or go changes nothing that the claim's own timing does not."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[bool, float]] = {}

    def get(self, ticket: str, mono: float) -> bool | None:
        found = self.known.get(ticket)
        return found[0] if found is not None and mono - found[1] < DEDICATED_KNOWN_S else None

    def put(self, ticket: str, value: bool, mono: float) -> None:
        if len(self.known) > 10_000:  # tickets come and go: forget the stale ones now and then
            self.known = {t: v for t, v in self.known.items() if mono - v[1] < DEDICATED_KNOWN_S}
        self.known[ticket] = (value, mono)


def dispatch_many(
    conn: redis.Redis,
    key: bytes,
    events: Sequence[ev.AttemptScheduled],
    unseen: bool = False,
    dedicated: Dedicated | None = None,
) -> int:
    """The one path from recorded `AttemptScheduled`s to RQ jobs, for the first dispatch and for the
    reconciler's re-dispatch after Redis lost the job: what was recorded is what runs. The attempts are
    enqueued each on its queue (`_queue_for`) in transactions of `ENQUEUE_CHUNK` (one for a short
    batch), after one pipeline that asks which job ids RQ already knows (those are skipped: dispatch is
    idempotent) and which tickets have a dedicated worker (`jbctl run --background`). Returns how many
    were enqueued now.

    `unseen`: the caller knows that no job of these attempts was ever enqueued (the dispatcher's first go
    at events it has just seen recorded), so nobody asks RQ; `dedicated`: the caller's memory of the
    dedicated workers. With both, a chain of short jobs costs one round trip per job here."""
    todo = list({job_id(e.ticket, e.task, e.attempt): e for e in events}.values())
    if not todo:
        return 0
    mono = time.monotonic()
    claims = {e.ticket: dedicated.get(e.ticket, mono) if dedicated is not None else None for e in todo}
    asked = [t for t, v in claims.items() if v is None]
    known: list[Any] = [False] * len(todo)
    if asked or not unseen:
        pipe = conn.pipeline(transaction=False)
        for ticket in asked:
            pipe.exists(dedicated_key(ticket))
        if not unseen:
            for e in todo:
                pipe.exists(Job.key_for(job_id(e.ticket, e.task, e.attempt)))
        found = pipe.execute()
        for ticket, value in zip(asked, found, strict=False):
            claims[ticket] = bool(value)
            if dedicated is not None:
                dedicated.put(ticket, bool(value), mono)
        if not unseen:
            known = found[len(asked) :]
    writer = _writer(conn)
    n = 0
    for e, exists in zip(todo, known, strict=True):
        if exists:
            continue
        name = _queue_for(e, dedicated=bool(claims[e.ticket]))
        _enqueue_on(writer, conn, key, envelope_from(e), name)
        n += 1
        if n % ENQUEUE_CHUNK == 0:
            # A wide ticket's first jobs reach the workers while the rest are still being built (200 RQ
            # jobs took the daemon ~50 ms to build, which the workers spent waiting).
            writer.execute()
    if n % ENQUEUE_CHUNK:
        writer.execute()
    return n


def _queue_for(event: ev.AttemptScheduled, dedicated: bool) -> str:
    """The queue of the worker the decider placed the attempt on; else the ticket's dedicated worker's
    queue while one runs (`jbctl run --background`); else the step's."""
    if event.worker is not None:
        return worker_queue(event.worker)
    if dedicated:
        return dedicated_queue(event.ticket)
    return event.queue


def dispatch(conn: redis.Redis, key: bytes, event: ev.AttemptScheduled) -> bool:
    """`dispatch_many` for one attempt: True if it was enqueued now."""
    return dispatch_many(conn, key, [event]) == 1


class Dispatcher:
    """Reactor: AttemptScheduled → RQ job; TicketCancelled/TicketFailed → stop flags for live attempts."""

    name = "dispatcher"

    def __init__(self, handler: CommandHandler, settings: Settings, conn: redis.Redis | None = None) -> None:
        self.handler = handler
        self.store = handler.store
        self.conn = conn or redis_connection(settings)
        self.key = load_secret(settings.secret_path, create=True)
        self.settings = settings
        self._artifacts: ArtifactStore | None = None  # where workers write (joined manifests); made on use
        self.enqueued = 0
        self.position: int | None = None
        self.saved = -1
        self.saved_at = 0.0
        self._looked = True  # whether the log was looked at since the last poll that acted
        self._unsure = False  # an act failed part-way: RQ may know some of the jobs it comes back to
        self._dedicated = Dedicated()

    def poll(self, now: datetime) -> bool:
        if self.position is None:
            self.position = self.store.checkpoint(CHECKPOINT)
        since = self.position
        fresh = self.handler.tail_after(since)
        if fresh:
            # What this process just recorded (and what other writers appended before it, which the
            # handler folded in first): from memory, with no query and no decoding.
            # Recorded by this process: no job of theirs was ever enqueued (another writer's events
            # might have been, by another daemon on the same database: those are asked about).
            self.act_all([e for e in fresh if e.type in _WATCHED_SET], unseen=self.handler.recorded_here(since))
            self.position = self.handler.state.last_seq
            self._persist(force=False)
            self._looked = False
            return True
        if fresh is not None and not self._looked:
            # The poll right after acting (the loop goes round again at once when busy): other writers
            # are looked for at the next one, at most the loop's idle wait later, not here. The query
            # cost about 0.6 ms of the daemon's CPU per job on a chain of short jobs.
            self._looked = True
            self._persist(force=False)
            return False
        # Nothing new here: has another writer (`jbctl approve`, `retry`) appended since?
        head = self.store.head()
        if head <= since:
            self._persist(force=False)
            return False
        if head > self.handler.state.last_seq:
            # Without catching up, `act` would take a fresh attempt for a moot one and drop it
            # (found by a CI failure).
            self.handler.refresh()
        recs = list(self.store.read(since, types=_WATCHED, limit=PAGE))
        self.act_all([rec.event for rec in recs])
        # A short page means every event up to `head` has been seen.
        self.position = recs[-1].seq if len(recs) == PAGE else max(head, recs[-1].seq if recs else since)
        self._persist(force=False)
        return bool(recs)

    def _persist(self, force: bool) -> None:
        """Save the position at most once a second: acting twice is harmless, a commit per job is not."""
        mono = time.monotonic()
        if self.position is not None and self.position != self.saved and (force or mono - self.saved_at >= 1.0):
            self.store.set_checkpoint(CHECKPOINT, self.position)
            self.saved, self.saved_at = self.position, mono

    def act_all(self, events: Sequence[ev.Event], unseen: bool = False) -> None:
        """Act on events in log order; consecutive AttemptScheduled are enqueued together (two round
        trips for the lot at most). `unseen`: events this dispatcher never acted on (from the handler's
        tail, after a poll that did not fail): RQ is not asked whether it knows their jobs. After a
        failure part of a batch may have been enqueued: the next go asks again."""
        unseen = unseen and not self._unsure
        self._unsure = True  # until this go has ended well
        run: list[ev.AttemptScheduled] = []
        for event in events:
            if isinstance(event, ev.AttemptScheduled):
                if self._live(event):
                    run.append(event)
                continue
            if run:
                self.enqueued += dispatch_many(self.conn, self.key, run, unseen, self._dedicated)
                run = []
            self.act(event)
        if run:
            self.enqueued += dispatch_many(self.conn, self.key, run, unseen, self._dedicated)
        self._unsure = False

    def _live(self, event: ev.AttemptScheduled) -> bool:
        state = self.handler.state.tickets.get(event.ticket)
        task = state.tasks.get(event.task) if state else None
        # A later attempt or an ended ticket makes this one moot.
        return task is not None and task.attempt == event.attempt and task.status in LIVE

    def act(self, event: ev.Event) -> None:
        if isinstance(event, ev.AttemptScheduled):
            if self._live(event) and dispatch(self.conn, self.key, event):
                self.enqueued += 1
        elif isinstance(event, ev.ShardsJoined):
            if self._artifacts is None:
                self._artifacts = ArtifactStore.from_settings(self.settings)
            write_joined_manifest(self._artifacts, event)
        elif isinstance(event, ev.TicketCancelled | ev.TicketFailed):
            self.stop_ticket(event.ticket)
        elif isinstance(event, ev.TicketHeld) and event.stop:
            self.stop_held(event.ticket)
        if isinstance(event, ev.TicketCancelled | ev.TicketFailed | ev.TicketCompleted):
            self.conn.set(ended_key(event.ticket), "1", ex=KEEP_S)
        if isinstance(event, ev.WorkerGone):
            # Its attempts that never started were failed and will be placed again: nobody takes
            # what is left in its queue (a worker coming back under the name starts clean).
            queue(self.conn, worker_queue(event.worker)).empty()
        if isinstance(event, ev.CorePromoted):
            self.conn.set(CORE_KEY, json.dumps({"version": event.version, "components": event.components}))

    def stop_ticket(self, ticket: str) -> None:
        """Ask every attempt of the ticket to stop, and drop the ones still waiting in a queue."""
        state = self.handler.ticket(ticket)  # it has just ended: it may be frozen already
        if state is None:
            return
        for task in state.tasks.values():
            if task.attempt < 1:
                continue
            jid = job_id(ticket, task.id, task.attempt)
            self.conn.set(cancel_key(jid), "1", ex=KEEP_S)
            try:
                job = Job.fetch(jid, connection=self.conn, serializer=JSONSerializer)
            except Exception:  # NoSuchJobError and friends
                continue
            if job.get_status(refresh=False) in ("queued", "deferred", "scheduled"):
                job.cancel()

    def stop_held(self, ticket: str) -> None:
        """`jbctl hold --stop`: tell the attempts it asked to stop to stop at their next checkpoint (queued
        ones stop as they start); the decider records each as AttemptStopped. Attempts scheduled since
        (after a release) are not touched."""
        state = self.handler.state.tickets.get(ticket)
        if state is None:
            return
        for task in state.tasks.values():
            if task.status in LIVE and task.stop_attempt == task.attempt:
                self.conn.set(cancel_key(job_id(ticket, task.id, task.attempt)), "1", ex=KEEP_S)

    def close(self) -> None:
        self._persist(force=True)
        self.conn.close()


def summary(conn: Any) -> dict[str, int]:
    """Queue depths, for STATUS lines."""
    return {name: queue(conn, name).count for name in ("gpu", "cpu")}
