"""The RQ worker Jetbox runs: JSON only, one entry point, no fork.

`SimpleWorker` runs jobs in its own process: CUDA is never initialised in a process that then
forks, and loaded models stay warm between jobs. A worker that dies stops refreshing its job's
heartbeat key; the reconciler fails the attempt once the key expires (heartbeat_timeout_seconds).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.utils import now as rq_now
from rq.version import VERSION as RQ_VERSION
from rq.worker import WorkerStatus

from schema.settings import load_settings
from schema.wire import (
    BUNDLES_KEY,
    ENTRY_POINT,
    REPORT_STREAM,
    Advert,
    cancel_key,
    dedicated_key,
    dedicated_queue,
    ended_key,
    load_secret,
    worker_key,
    worker_queue,
)
from workers.entry import BUNDLES_SEEN, CANCEL_SEEN, report_violation
from workers.netns import redis_client

PLAIN_BEAT_S = 1.0  # see JetboxWorker.heartbeat
# The RQ release whose `prepare_job_execution` the override below repeats (checked: 3.0.0).
_RQ_PREPARE_KNOWN = RQ_VERSION.split(".")[:2] == ["3", "0"]


class ForeignJobError(Exception):
    """A job in our queue names a function other than Jetbox's entry point."""


class JetboxWorker(SimpleWorker):
    """Refuses any job that does not call `workers.entry.run_job`."""

    def perform_job(self, job: Any, queue: Queue, execution: Any) -> bool:  # type: ignore[override]
        if job.func_name != ENTRY_POINT:
            self._refuse(job, queue, execution)
            return False
        return bool(super().perform_job(job, queue, execution))

    # When the worker's last beat was a plain one (RQ's default TTL, minutes) less than this long ago,
    # another plain beat changes nothing that matters: it is skipped.
    _plain_beat_at: float | None = None

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat (the same three commands) in one round trip instead of three, and only
        once per job: RQ beats four times per job with its default TTL (after the job, with its
        suspension check, and before and after taking the next), three of them as round trips of their
        own. A beat with the default TTL (`worker_ttl` + 60 s: minutes) within `PLAIN_BEAT_S` of the
        last one is skipped: the TTL it would set is the one just set. A beat with another TTL (RQ's,
        before a job) always goes out, and the next default one after it too."""
        mono = time.monotonic()
        if timeout is None and self._plain_beat_at is not None and mono - self._plain_beat_at < PLAIN_BEAT_S:
            return
        if pipeline is not None:  # goes out with the caller's pipeline
            super().heartbeat(timeout, pipeline=pipeline)
            self._plain_beat_at = mono if timeout is None else None
            return
        self._plain_beat_at = None  # until this beat has gone out
        with self.connection.pipeline(transaction=False) as batch:
            super().heartbeat(timeout, pipeline=batch)
            batch.execute()
        if timeout is None:
            self._plain_beat_at = mono

    # When the last round trip after a job found the workers not suspended (monotonic), and the state
    # this worker last wrote (with when): RQ's next suspension check and an unchanged state are not asked
    # or written again within `PLAIN_BEAT_S`.
    _not_suspended_at: float | None = None
    _state_written: tuple[str, float] | None = None

    def execute_job(self, job: Any, queue: Queue) -> None:
        """rq 3.0's `SimpleWorker.execute_job`, with RQ's bookkeeping after the job in one round trip
        (`_after_job`) instead of three: the state back to idle, the worker's beat, and the suspension
        check the loop makes before taking the next job. Another RQ release gets RQ's own."""
        if not _RQ_PREPARE_KNOWN:
            super().execute_job(job, queue)
            return
        execution = self.prepare_execution(job)
        self.perform_job(job, queue, execution)
        self._after_job()

    def _after_job(self) -> None:
        mono = time.monotonic()
        with self.connection.pipeline(transaction=False) as pipeline:
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            self.heartbeat(pipeline=pipeline)  # the loop's beat right after this is then skipped
            pipeline.exists(WORKERS_SUSPENDED)
            suspended = pipeline.execute()[-1]
        self._not_suspended_at = None if suspended else mono

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check (`rq suspend`), unless the round trip after the job just made it: a suspension is
        seen before the next job is taken either way."""
        seen, self._not_suspended_at = self._not_suspended_at, None
        if seen is not None and time.monotonic() - seen < PLAIN_BEAT_S:
            return
        super().check_for_suspension(burst)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's, less a write of the state this worker wrote less than `PLAIN_BEAT_S` ago (RQ sets `idle`
        after each job and again as it waits for the next)."""
        mono = time.monotonic()
        last = self._state_written
        if pipeline is None and last is not None and last[0] == state and mono - last[1] < PLAIN_BEAT_S:
            self._state = state
            return
        super().set_state(state, pipeline=pipeline)
        self._state_written = (state, mono)

    def prepare_job_execution(self, job: Any, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's bookkeeping before a job (rq 3.0's `BaseWorker.prepare_job_execution`: the same commands
        in the same pipeline), with one command more in its round trip: whether the job's cancel key
        exists, and one more: whether the daemon reads bundled reports (`BUNDLES_KEY`). The job's first
        look at its cancel key (a job cancelled while it waited in its queue stops at its start) then
        costs no round trip of its own: `run_job` reads what was seen. Another RQ release gets RQ's own
        method, the job its own look, and one stream message per report."""
        if not _RQ_PREPARE_KNOWN:
            super().prepare_job_execution(job, remove_from_intermediate_queue)
            return
        with self.connection.pipeline() as pipeline:
            heartbeat_ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(heartbeat_ttl, pipeline=pipeline)
            job.heartbeat(rq_now(), heartbeat_ttl, pipeline=pipeline)
            job.prepare_for_execution(self.name, pipeline=pipeline)
            pipeline.persist(job.key)
            if remove_from_intermediate_queue:
                pipeline.lrem(Queue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id)
            pipeline.exists(cancel_key(job.id))
            pipeline.exists(BUNDLES_KEY)
            found = pipeline.execute()
        setattr(job, CANCEL_SEEN, bool(found[-2]))
        setattr(job, BUNDLES_SEEN, bool(found[-1]))
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")

    def register_birth(self) -> None:
        """Take over our name when whoever registered it is gone, instead of being refused.

        RQ refuses a name that is registered and not marked dead. Three stale cases would otherwise
        stall a restart for RQ's worker TTL (minutes): a worker killed with -9 on this host (its pid no
        longer runs); this very process registering again after a lost connection (`run_worker`); and
        a fragment without birth fields, which a dying worker's late heartbeat writes into a Redis that
        restarted empty. A registration by a live process, or from another machine, is still refused."""
        if self.connection.exists(self.key):
            host, pid, death = self.connection.hmget(self.key, ["hostname", "pid", "death"])
            if death is None and _stale(host, pid, self.hostname):
                self.connection.delete(self.key)
        super().register_birth()

    def _refuse(self, job: Any, queue: Queue, execution: Any) -> None:
        detail = f"job {job.id} in queue {queue.name} names {job.func_name!r}; only {ENTRY_POINT} may run"
        try:
            report_violation(
                self.connection, load_secret(load_settings().secret_path, create=False), "foreign_job", detail
            )
        finally:
            try:
                raise ForeignJobError(detail)
            except ForeignJobError:
                self.handle_job_failure(job, queue=queue, exc_string=detail, execution=execution)
            print(f"jetbox worker: refused {detail}", file=sys.stderr)


def _stop_requested(worker: JetboxWorker) -> bool:
    """SIGTERM/SIGINT reached RQ: it notes the date (and, mid-job, `_stop_requested`) before its loop ends."""
    return bool(worker._stop_requested or worker._shutdown_requested_date is not None)


def _stale(host: bytes | None, pid: bytes | None, hostname: str | None) -> bool:
    """Whether a worker registration (its hostname and pid fields) belongs to no live worker."""
    if host is None or pid is None:
        return True  # a fragment: no worker was born in this Redis under that name
    if host.decode() != hostname:
        return False  # another machine's: its liveness cannot be told from here
    return int(pid) == os.getpid() or not _running(int(pid))


def _running(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class Advertiser(threading.Thread):
    """Keeps an advertised worker known to the daemon: its liveness key (`worker_key`, TTL
    heartbeat_timeout) is refreshed every heartbeat; whenever the key had to be set anew (the first
    beat, or a Redis that restarted empty) the signed advert goes out again. `stop` says goodbye."""

    def __init__(self, redis_url: str, advert: Advert) -> None:
        super().__init__(daemon=True, name="advertise")
        settings = load_settings()
        self.conn = redis_client(redis_url)
        self.key = load_secret(settings.secret_path, create=False)
        self.advert = advert
        self.every = settings.heartbeat_seconds
        self.ttl = max(1, math.ceil(settings.heartbeat_timeout_seconds))
        self.halt = threading.Event()

    def beat(self) -> None:
        liveness = worker_key(self.advert.worker)
        if self.conn.set(liveness, "1", ex=self.ttl, nx=True):
            self.conn.xadd(REPORT_STREAM, self.advert.signed(self.key))  # type: ignore[arg-type]
        else:
            self.conn.expire(liveness, self.ttl)

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.beat()
            except redis.RedisError:
                pass  # Redis away: the next beat advertises again if the key was lost with it
            self.halt.wait(self.every)

    def stop(self) -> None:
        self.halt.set()
        farewell = self.advert.model_copy(update={"kind": "departed"})
        with contextlib.suppress(redis.RedisError):
            self.conn.delete(worker_key(self.advert.worker))
            self.conn.xadd(REPORT_STREAM, farewell.signed(self.key))  # type: ignore[arg-type]


def run_worker(
    redis_url: str, queues: list[str], burst: bool = False, name: str | None = None, advert: Advert | None = None
) -> int:
    """`advert`: the worker takes part in placement: it works its own queue (the jobs the decider
    placed on it) first, then the shared ones (jobs scheduled before placement knew of it), and
    keeps itself known (`Advertiser`) until it stops."""
    if advert is None:
        return _run_worker(redis_url, queues, burst, name)
    advertiser = Advertiser(redis_url, advert)
    advertiser.start()
    try:
        return _run_worker(redis_url, [worker_queue(advert.worker), *queues], burst, advert.worker)
    finally:
        advertiser.stop()


def _run_worker(redis_url: str, queues: list[str], burst: bool = False, name: str | None = None) -> int:
    """Work the named queues until stopped (or until empty with burst).

    Redis going away (a restart, a failover) is survived: the worker reconnects with back-off
    rather than exiting, since a fresh empty Redis is a case the reconciler repairs. RQ's own loop
    returns normally on an error it did not expect (a lost connection while it records a job's end,
    a Redis timeout), as if it had been stopped: only a stop request (SIGTERM) or burst mode ends
    this function, so systemd's `Restart=on-failure` is never left with a worker that exited 0.
    """
    delay = 0.5
    while True:
        conn = redis_client(redis_url, health_check_interval=30)
        qs = [Queue(q, connection=conn, serializer=JSONSerializer) for q in queues]
        began = time.monotonic()
        worker: JetboxWorker | None = None
        try:
            worker = JetboxWorker(qs, connection=conn, serializer=JSONSerializer, name=name)  # talks to Redis
            worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
            if burst or _stop_requested(worker):
                return 0
            why = "the RQ loop ended without a stop request (Redis lost while it recorded a job?)"
        except redis.ConnectionError as exc:
            # A SIGTERM while Redis is down: RQ's loop stops, then its farewell to Redis fails. The stop
            # still stands (else `systemctl stop` waits for its SIGKILL while this loop starts again).
            if worker is not None and _stop_requested(worker):
                return 0
            why = f"Redis unavailable ({exc})"
        if time.monotonic() - began > 60:
            delay = 0.5  # it worked for a while: this is a fresh outage, not the same one
        print(f"jetbox worker: {why}; starting again in {delay:.1f}s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(10.0, delay * 2)


ADVERTISE_EVERY_S = 2.0  # a Redis restarted empty forgets the claim: re-set it well before a lost job is re-sent


def run_dedicated_worker(redis_url: str, ticket: str, name: str | None = None, poll: float = 0.5) -> int:
    """Work only `ticket`'s queue, advertising it to the dispatcher, until the ticket has ended.

    Like `run_worker`, it rides out Redis going away (a `jbctl run` worker outlives a Redis restart);
    a stop request (SIGTERM, e.g. the transient unit's RuntimeMaxSec=) ends it.
    """
    conn = redis_client(redis_url)
    stop = threading.Event()

    def advertise() -> None:
        while not stop.is_set():
            try:
                conn.set(dedicated_key(ticket), "1", ex=30)
            except redis.RedisError:
                pass
            stop.wait(ADVERTISE_EVERY_S)

    threading.Thread(target=advertise, daemon=True, name="advertise").start()
    q = Queue(dedicated_queue(ticket), connection=conn, serializer=JSONSerializer)
    delay = poll
    try:
        while True:
            worker: JetboxWorker | None = None
            try:
                worker = JetboxWorker([q], connection=conn, serializer=JSONSerializer, name=name)
                worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
                if _stop_requested(worker):
                    return 0
                if conn.exists(ended_key(ticket)) and q.count == 0:
                    return 0
                delay = poll
            except redis.ConnectionError as exc:
                if worker is not None and _stop_requested(worker):
                    return 0  # stopped while Redis was down (see run_worker)
                print(f"jetbox worker: Redis unavailable ({exc}); again in {delay:.1f}s", file=sys.stderr, flush=True)
                delay = min(10.0, delay * 2)
            time.sleep(delay)
    finally:
        stop.set()
        with contextlib.suppress(redis.RedisError):
            conn.delete(dedicated_key(ticket))
