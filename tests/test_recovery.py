"""Recovery from infrastructure faults: a job Redis lost comes back exactly as recorded, and
infrastructure failures are retried, never taken for loops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from rq.job import Job
from rq.serializers import JSONSerializer

from cli.embedded import start_redis
from daemon import commands as c
from daemon.decider import _loop_pattern, backoff_seconds
from daemon.dispatcher import envelope_from
from daemon.handler import CommandHandler
from daemon.state import State, evolve
from schema import events as ev
from schema.plan import LIVE
from schema.store import EventStore, replay_differences
from tests.harness import Setup
from tests.helpers import make_ticket, property_examples, submit
from tests.jbdaemon import JBCTL, wait_for
from tests.test_decider import T0, apply, types

# The smallest reasoner training the tests use that still writes a real checkpoint.
TINY_CORE = (
    "  - {id: puzzles, kind: synthesize, with: {generator: sudoku, count: 60, seed: 1, params: {n: 4}}}\n"
    "  - {id: train, kind: train, needs: [puzzles], queue: cpu, with: {model: trm, data: puzzles, max_steps: 2,"
    " d_model: 16, n_heads: 2, n_layers: 1, max_segments: 1, checkpoint_every: 1, warmup_steps: 0,"
    " batch_size: 16, seed: 0}}\n"
)
PUZZLE = "[[1, 0, 0, 4], [0, 0, 1, 0], [0, 1, 0, 0], [4, 0, 0, 1]]"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _approve(setup: Setup, ticket: str, *more: str) -> None:
    opened = setup.daemon.wait_event("ProposalOpened", ticket=ticket, timeout=300)["data"]
    done = setup.jbctl("approve", opened["proposal"], "--yes", *more)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_lost_jobs_come_back_exactly_as_recorded(running: Setup) -> None:
    """Redis restarted empty while an `infer` on the core and a check allowed by a global grant wait:
    both are re-enqueued with the envelope the decider recorded (`_core`, `_allowed_binaries`), and run."""
    setup, worker = running, running.workers[0]
    setup.drop("TICKET-1", TINY_CORE, "update: core\nexpires: 1d\n")
    setup.drop("TICKET-2", "  - {id: c, kind: check, with: {run: [echo, granted]}}\n")
    _approve(setup, "TICKET-2", "--scope", "all")  # echo, for every ticket from now on
    _approve(setup, "TICKET-1")  # core v1
    assert setup.wait_done("TICKET-1", timeout=60) == "TicketCompleted"
    assert setup.wait_done("TICKET-2", timeout=60) == "TicketCompleted"
    _stop(worker)  # nothing takes the next jobs: they wait in Redis
    setup.drop(
        "TICKET-3",
        f"  - {{id: ask, kind: infer, queue: cpu, with: {{component: reasoner, puzzle: {PUZZLE}}}}}\n"
        "  - {id: c, kind: check, with: {run: [echo, still, granted]}}\n",
    )
    recorded = {
        t: ev.AttemptScheduled.model_validate(
            setup.daemon.wait_event("AttemptScheduled", ticket="TICKET-3", task=t)["data"]
        )
        for t in ("ask", "c")
    }
    jids = [envelope_from(e).job_id for e in recorded.values()]
    assert recorded["ask"].params["_core"]["version"] == 1
    assert "echo" in recorded["c"].params["_allowed_binaries"]
    conn = setup.conn()
    wait_for("both jobs in Redis", lambda: all(Job.exists(jid, connection=conn) for jid in jids))
    # Redis restarted empty on the same socket: the jobs are gone, the log still says "scheduled".
    setup.redis.stop()
    setup.redis = start_redis(setup.home / "run")
    conn = setup.conn()
    for e in recorded.values():
        jid = envelope_from(e).job_id
        job = wait_for(f"{jid} re-enqueued", lambda jid=jid: Job.exists(jid, connection=conn) and jid, timeout=30)
        body = Job.fetch(job, connection=conn, serializer=JSONSerializer).args[0]["body"]
        assert body == envelope_from(e).model_dump(mode="json")  # exactly what was recorded
    setup.worker("cpu")
    assert setup.wait_done("TICKET-3", timeout=120) == "TicketCompleted"
    answer = next(
        r["data"] for r in setup.daemon.rows() if r["type"] == "AttemptSucceeded" and r["data"]["task"] == "ask"
    )
    assert answer["outputs"]["core_version"] == 1 and answer["outputs"]["answer"][0][3] == 4
    assert not [r for r in setup.daemon.rows() if r["type"] == "AttemptFailed" and r["data"]["ticket"] == "TICKET-3"]
    setup.assert_consistent()


@pytest.mark.integration
def test_lost_job_goes_back_to_the_tickets_dedicated_queue(home: Path, store: object) -> None:
    """The reconciler re-enqueues through the dispatcher's path: a ticket with its own worker gets its
    lost job back on that worker's queue, not on the step's default queue."""
    from datetime import UTC, datetime

    from daemon.dispatcher import Dispatcher
    from daemon.reconciler import Reconciler
    from schema.settings import load_settings
    from schema.wire import dedicated_key, dedicated_queue

    redis_server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(redis_server.url)
        settings = load_settings()
        handler = CommandHandler(store)  # type: ignore[arg-type]
        now = datetime(2026, 1, 1, tzinfo=UTC)
        handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), now))
        conn.set(dedicated_key("TICKET-1"), "1", ex=30)
        Dispatcher(handler, settings, conn).poll(now)
        assert Job.exists("jetbox__TICKET-1__a__1", connection=conn)
        conn.flushall()  # Redis lost everything; the dedicated worker advertises itself again
        conn.set(dedicated_key("TICKET-1"), "1", ex=30)
        reconciler = Reconciler(handler, settings, conn)
        reconciler.poll(now)
        assert reconciler.redispatched == 1
        job = Job.fetch("jetbox__TICKET-1__a__1", connection=conn, serializer=JSONSerializer)
        assert job.origin == dedicated_queue("TICKET-1")
    finally:
        redis_server.stop()


@pytest.mark.integration  # starts redis-server
def test_dispatcher_acts_on_attempts_another_process_scheduled(home: Path, store: object) -> None:
    """`jbctl approve` schedules in its own process: the daemon's dispatcher reads that event before its
    state has caught up, and must still enqueue it (it used to drop it as moot; CI caught the hang)."""
    from datetime import UTC, datetime

    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    redis_server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(redis_server.url)
        daemon_side = CommandHandler(store)  # type: ignore[arg-type]
        dispatcher = Dispatcher(daemon_side, load_settings(), conn)
        dispatcher.poll(datetime(2026, 1, 1, tzinfo=UTC))
        other = CommandHandler(store)  # type: ignore[arg-type]  # e.g. `jbctl approve`
        now = datetime(2026, 1, 1, tzinfo=UTC)
        other.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), now))
        dispatcher.poll(now)
        assert Job.exists("jetbox__TICKET-1__a__1", connection=conn)
        assert dispatcher.enqueued == 1
    finally:
        redis_server.stop()


@pytest.mark.integration  # starts redis-server
def test_a_finished_job_whose_reports_never_arrived_is_retried(home: Path, store: object) -> None:
    """RQ says the job finished, the log never heard of it (its reports were lost with Redis): after
    the grace period the attempt fails as the infrastructure's fault and is retried, instead of hanging."""
    from datetime import UTC, datetime

    from rq.job import JobStatus

    from daemon.dispatcher import Dispatcher
    from daemon.reconciler import Reconciler
    from schema.settings import load_settings

    redis_server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(redis_server.url)
        handler = CommandHandler(store)  # type: ignore[arg-type]
        now = datetime(2026, 1, 1, tzinfo=UTC)
        handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), now))
        Dispatcher(handler, load_settings(), conn).poll(now)
        Job.fetch("jetbox__TICKET-1__a__1", connection=conn, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
        reconciler = Reconciler(handler, load_settings(), conn)
        reconciler.grace = 0.0
        reconciler.poll(now)  # first sight starts the grace period
        reconciler.last_run = 0.0
        reconciler.poll(now)
        task = handler.state.tickets["TICKET-1"].tasks["a"]
        assert task.status == "waiting_retry", (task.status, task.attempt)
        failed = [r.event for r in store.read(0, types=["AttemptFailed"])]  # type: ignore[attr-defined]
        assert len(failed) == 1 and failed[0].cause == "infrastructure"
        assert "reports never arrived" in failed[0].error
    finally:
        redis_server.stop()


# --- infrastructure faults are not loops (pure decider) ---------------------------------------

LOST = "worker lost on host-1: its RQ job vanished for 2s"


def _failing(retries: int, causes: list[str], errors: list[str] | None = None) -> tuple[State, list[ev.Event]]:
    """Fail attempt after attempt of task `a` (waiting for each retry), returning every event."""
    s, log = State(), []
    log += apply(s, submit(make_ticket(steps=f"  - {{id: a, kind: diag, retries: {retries}}}\n"), T0))
    now = T0
    for n, cause in enumerate(causes):
        task = s.tickets["TICKET-1"].tasks["a"]
        if task.status not in LIVE:
            break
        error = (errors or [LOST])[n % len(errors or [LOST])]
        events = apply(
            s, c.RecordJobFailed(now=now, ticket="TICKET-1", task="a", attempt=task.attempt, error=error, cause=cause)
        )
        log += events
        retry_at = events[0].retry_at if isinstance(events[0], ev.AttemptFailed) else None
        if retry_at is not None:
            now = retry_at
            log += apply(s, c.Tick(now=now))
    return s, log


def test_lost_workers_are_retried_with_backoff_not_blocked() -> None:
    s, log = _failing(20, ["infrastructure"] * 3)
    failed = [e for e in log if isinstance(e, ev.AttemptFailed)]
    assert [f.cause for f in failed] == ["infrastructure"] * 3
    assert all(f.retry_at is not None for f in failed)
    delays = [(f.retry_at - f.at).total_seconds() for f in failed if f.retry_at is not None]
    assert delays == pytest.approx([backoff_seconds("TICKET-1", "a", n) for n in (1, 2, 3)])  # back-off grows
    assert "LoopDetected" not in types(log) and "TaskBlocked" not in types(log)
    task = s.tickets["TICKET-1"].tasks["a"]
    assert task.status == "scheduled" and task.attempt == 4 and task.failures == []


def test_the_same_three_failures_from_the_job_are_a_loop() -> None:
    _, log = _failing(20, ["job"] * 3)
    assert types(log)[-2:] == ["LoopDetected", "TaskBlocked"]


def test_infrastructure_failures_spend_the_steps_retries() -> None:
    s, log = _failing(2, ["infrastructure"] * 3)
    assert types(log)[-3:] == ["AttemptFailed", "TaskFailed", "TicketFailed"]
    assert "failed after 3 attempts" in s.tickets["TICKET-1"].tasks["a"].reason


def test_lost_workers_between_the_jobs_own_failures_do_not_hide_a_loop() -> None:
    causes = ["job", "infrastructure", "job", "infrastructure", "job"]
    _, log = _failing(20, causes, errors=["OSError: disk full", LOST])
    assert types(log)[-2:] == ["LoopDetected", "TaskBlocked"]
    loop = next(e for e in log if isinstance(e, ev.LoopDetected))
    assert loop.count == 3


@settings(max_examples=property_examples(200), deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["job", "infrastructure"]), st.sampled_from(["E1", "E2", LOST])), max_size=12)
)
def test_loops_are_judged_on_the_jobs_own_failures_only(seq: list[tuple[str, str]]) -> None:
    s, log = _failing(20, [cause for cause, _ in seq], errors=[err for _, err in seq] or [LOST])
    own: list[str] = []
    for n, e in enumerate(log):
        if isinstance(e, ev.AttemptFailed):
            if e.cause == "job":
                own.append(e.fingerprint)
            looped = n + 1 < len(log) and isinstance(log[n + 1], ev.LoopDetected)
            # A loop is found exactly when the job's own failures end in a loop pattern.
            assert looped == (e.cause == "job" and _loop_pattern(own) is not None), (seq, types(log))
    replayed = State()
    for e in log:
        evolve(replayed, e)
    assert replayed == s


def test_old_logs_replay_unchanged() -> None:
    """An AttemptFailed recorded before `cause` existed reads as the job's own failure."""
    old = {"at": "2026-01-01T00:00:00Z", "ticket": "T", "task": "a", "attempt": 1, "error": "x", "fingerprint": "f"}
    assert ev.event_from("AttemptFailed", old).cause == "job"  # type: ignore[attr-defined]


def test_sql_tells_infrastructure_from_job_failures(store: EventStore) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket(steps="  - {id: a, kind: diag, retries: 5}\n"), T0))
    handler.handle(
        c.RecordJobFailed(now=T0, ticket="TICKET-1", task="a", attempt=1, error=LOST, cause="infrastructure")
    )
    handler.handle(c.Tick(now=T0 + timedelta(minutes=1)))
    handler.handle(c.RecordJobFailed(now=T0 + timedelta(minutes=1), ticket="TICKET-1", task="a", attempt=2, error="E"))
    with store.engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT attempt, cause FROM jobs ORDER BY attempt")).all()
        ticket = conn.execute(sa.text("SELECT retries, infra_failures, consistency FROM tickets")).one()
    assert [tuple(j) for j in jobs] == [(1, "infrastructure"), (2, "job")]
    assert tuple(ticket) == (1, 1, 0.95)  # only the job's own failure lowers the score
    assert replay_differences(store) == []


@pytest.mark.integration
def test_a_job_lost_three_times_in_a_row_is_not_a_loop(running: Setup) -> None:
    """Worker and Redis die together while the attempt runs, three times in a row: each attempt fails as
    the infrastructure's ("its RQ job vanished"), is retried with back-off, and the fourth completes."""
    setup = running
    setup.drop("TICKET-1", "  - {id: a, kind: diag, retries: 20, with: {steps: 20, sleep: 4, checkpoints: 4}}\n")
    for attempt in (1, 2, 3):
        setup.daemon.wait_event("AttemptStarted", ticket="TICKET-1", attempt=attempt, timeout=60)
        for proc in setup.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        setup.redis.stop()
        setup.redis = start_redis(setup.home / "run")
        setup.worker("cpu")
        setup.daemon.wait_event("AttemptFailed", ticket="TICKET-1", attempt=attempt, timeout=30)
    assert setup.wait_done("TICKET-1", timeout=90) == "TicketCompleted"
    rows = setup.daemon.rows()
    failed = [r["data"] for r in rows if r["type"] == "AttemptFailed"]
    assert [f["cause"] for f in failed] == ["infrastructure"] * 3
    assert all("its RQ job vanished" in f["error"] and f["retry_at"] for f in failed)
    assert not [r for r in rows if r["type"] in ("LoopDetected", "TaskBlocked")]
    sql = setup.jbctl("sql", "SELECT cause, count(*) AS n FROM jobs GROUP BY cause ORDER BY cause", "--json")
    assert sql.returncode == 0, sql.stderr
    assert {r["cause"]: r["n"] for r in json.loads(sql.stdout)} == {"infrastructure": 3, None: 1}
    setup.assert_consistent()


# --- found by bench/torture.py ------------------------------------------------------------------


def test_a_job_that_lost_redis_is_the_infrastructures_failure() -> None:
    """A job whose report or heartbeat hit a Redis restart reports `cause: infrastructure`, and the
    inbox passes the cause on (anything else in a signed report is malformed, not trusted)."""
    from daemon.inbox import to_command
    from schema.wire import Report
    from workers.entry import _lost_redis

    try:
        try:
            raise redis.ConnectionError("Connection closed by server.")
        except redis.ConnectionError as exc:
            raise RuntimeError("progress report failed") from exc
    except RuntimeError as chained:
        assert _lost_redis(chained)
    assert not _lost_redis(RuntimeError("flaky disk"))

    def failed(**body: object) -> c.Command:
        report = Report(kind="failed", ticket="T", task="a", attempt=1, seq=2, worker="w", body=body)
        return to_command(report, T0)

    assert failed(error="x", cause="infrastructure").cause == "infrastructure"  # type: ignore[attr-defined]
    assert failed(error="x").cause == "job"  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        failed(error="x", cause="cosmic rays")


@pytest.mark.integration
def test_a_named_worker_killed_hard_restarts_at_once(tmp_path: Path) -> None:
    """`jbctl worker --name w` killed with -9 left its RQ registration behind, and the restarted worker
    was refused ("There exists an active worker named 'w' already") for RQ's worker TTL (minutes)."""
    server = start_redis(tmp_path / "run")
    conn = redis.Redis.from_url(server.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(tmp_path / "home"), JETBOX_REDIS_URL=server.url)
    procs: list[subprocess.Popen[bytes]] = []

    def worker() -> subprocess.Popen[bytes]:
        with (tmp_path / "worker.log").open("ab") as log:
            proc = subprocess.Popen(
                [JBCTL, "worker", "--queue", "cpu", "--name", "w"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        procs.append(proc)
        wait_for("the worker to register", lambda: conn.hget("rq:worker:w", "pid") == str(proc.pid).encode(), 60)
        return proc

    try:
        first = worker()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = worker()
        time.sleep(1.0)
        assert second.poll() is None, (tmp_path / "worker.log").read_text()
        # Redis restarted empty, and a dying worker's late heartbeat left a fragment of its registration.
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        conn.flushall()
        conn.hset("rq:worker:w", mapping={"last_heartbeat": "2026-01-01T00:00:00Z", "state": "busy"})
        conn.expire("rq:worker:w", 480)
        third = worker()
        time.sleep(1.0)
        assert third.poll() is None, (tmp_path / "worker.log").read_text()
        os.killpg(third.pid, signal.SIGTERM)  # a stop request still ends it, at once and cleanly
        assert third.wait(20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        server.stop()


@pytest.mark.integration
def test_worker_outlives_redis_dying_under_a_job(running: Setup) -> None:
    """Redis gone while a job ran and still gone when RQ recorded the job's end: RQ's loop returned as
    if stopped and `jbctl worker` exited 0 (which systemd's Restart=on-failure leaves dead). It must
    keep going, and the ticket complete on it once Redis is back."""
    worker = running.workers[0]
    running.drop("TICKET-1", "  - {id: a, kind: diag, retries: 5, with: {steps: 6, sleep: 3}}\n")
    running.daemon.wait_event("AttemptStarted", ticket="TICKET-1", timeout=30)
    running.redis.proc.kill()
    running.redis.proc.wait()
    time.sleep(6)  # the job's reports give up, then RQ fails to record its end
    running.redis = start_redis(running.home / "run")
    time.sleep(3)
    assert worker.poll() is None, (running.home / "worker.log").read_text()[-3000:]
    assert running.wait_done("TICKET-1", timeout=90) == "TicketCompleted"
    assert len(running.workers) == 1 and worker.poll() is None
    running.assert_consistent()


def test_a_result_ends_the_inbox_burst_and_is_still_verified(store: EventStore, tmp_path: Path) -> None:
    """The inbox waits a moment after a report for the rest of a job's burst, but not after its result
    (what waits on a result, a join or the next step, would wait for nothing); that hint never skips
    the signature check: a forged result is still a violation, and every report is applied."""
    from daemon.inbox import Inbox, burst_over
    from schema.settings import load_settings
    from schema.wire import REPORT_STREAM, Report, load_secret

    server = start_redis(tmp_path / "run")
    try:
        settings = load_settings(redis_url=server.url)
        inbox = Inbox(CommandHandler(store), settings)
        key = load_secret(settings.secret_path, create=False)

        def fields(kind: str, seq: int, sign_with: bytes = key) -> dict[bytes, bytes]:
            report = Report(kind=kind, ticket="-", task="-", attempt=1, seq=seq, worker="w", body={})  # type: ignore[arg-type]
            return {k.encode(): v.encode() for k, v in report.signed(sign_with).items()}

        assert burst_over(fields("succeeded", 3)) and burst_over(fields("failed", 3))
        assert not burst_over(fields("started", 1)) and not burst_over(fields("progress", 2))
        assert not burst_over({b"report": b"\xff{not json"}) and not burst_over({})
        assert not burst_over({b"report": b'["succeeded"]'})
        # A forged result ends the burst too, and is still judged by its signature.
        forged = fields("succeeded", 3, sign_with=b"not-the-key" * 3)
        assert burst_over(forged)
        conn = redis.Redis.from_url(server.url)
        conn.xadd(REPORT_STREAM, forged)  # type: ignore[arg-type]
        assert inbox.poll(T0)
        recorded = [r.event for r in store.read(0)]
        assert [type(e).__name__ for e in recorded][-1] == "SafetyViolation"
        assert recorded[-1].what == "forged_report"  # type: ignore[attr-defined]
        assert conn.xpending(REPORT_STREAM, "jetbox-daemon")["pending"] == 0  # applied, then acknowledged
        inbox.close()
    finally:
        server.stop()
