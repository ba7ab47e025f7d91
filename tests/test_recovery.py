"""Recovery from infrastructure faults: a job Redis lost comes back exactly as recorded, and
infrastructure failures are retried, never taken for loops."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from cli.embedded import start_redis
from daemon.dispatcher import envelope_from
from schema import events as ev
from tests.jbdaemon import wait_for
from tests.test_dispatch import Setup

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
    from daemon.handler import CommandHandler
    from daemon.reconciler import Reconciler
    from schema.settings import load_settings
    from schema.wire import dedicated_key, dedicated_queue
    from tests.helpers import make_ticket, submit

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
