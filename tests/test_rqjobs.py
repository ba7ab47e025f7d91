"""The dispatcher's RQ jobs are the ones RQ's own `enqueue_call` writes (daemon/rqjobs.py): the same hash
field for field, the same queue, and RQ's `Job.fetch`, worker and `rq info` take them as RQ's own."""

from __future__ import annotations

import subprocess
import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from cli.embedded import start_redis
from daemon import dispatcher as dsp
from daemon.rqjobs import RQ_LAYOUT_KNOWN, JobWriter, rq_time
from schema import events as ev
from schema.wire import ENTRY_POINT, verify

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEY = b"k" * 64
TIMES = (b"created_at", b"enqueued_at")


def _scheduled(task: str, **params: object) -> ev.AttemptScheduled:
    return ev.AttemptScheduled(
        at=T0, ticket="TICKET-1", task=task, attempt=2, kind="diag", queue="cpu", params=params, timeout=90
    )


def test_rq_layout_is_known_for_the_pinned_release() -> None:
    """The project pins rq 3.0: the dispatcher writes its jobs itself (were this false, every job would
    silently take RQ's slower path, and the test below would test nothing)."""
    assert RQ_LAYOUT_KNOWN


def test_rq_time_is_rqs_format() -> None:
    from rq.utils import utcformat

    at = datetime(2026, 11, 28, 5, 6, 7, 890123, tzinfo=UTC)
    assert rq_time(at) == utcformat(at) == "2026-11-28T05:06:07.890123Z"


@pytest.mark.integration  # starts redis-server
def test_a_job_is_the_hash_rq_writes_field_for_field(home: Path, conn: redis.Redis) -> None:
    scheduled = _scheduled("a", n=1, text="é")
    envelope = dsp.envelope_from(scheduled)
    timeout = int(envelope.timeout) + 60
    description = f"TICKET-1/a attempt 2 ({envelope.kind})"
    # RQ's own: what the dispatcher did before (and does with another RQ release).
    pipe = conn.pipeline()
    dsp.queue(conn, "cpu").enqueue_call(
        func=ENTRY_POINT,
        args=(envelope.signed(KEY),),
        job_id=envelope.job_id,
        timeout=timeout,
        result_ttl=dsp.KEEP_S,
        failure_ttl=dsp.KEEP_S,
        description=description,
        pipeline=pipe,
    )
    pipe.execute()
    rqs = conn.hgetall(Job.key_for(envelope.job_id))
    rq_queue = conn.lrange("rq:queue:cpu", 0, -1)
    rq_queues = conn.smembers("rq:queues")
    conn.flushdb()

    assert dsp.dispatch_many(conn, KEY, [scheduled], unseen=True) == 1
    ours = conn.hgetall(Job.key_for(envelope.job_id))
    assert set(ours) == set(rqs)  # the same fields
    for field in TIMES:  # its own clock, in RQ's format
        assert datetime.strptime(ours.pop(field).decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
        rqs.pop(field)
    assert zlib.decompress(ours[b"data"]) == zlib.decompress(rqs[b"data"])
    assert ours == rqs
    assert conn.lrange("rq:queue:cpu", 0, -1) == rq_queue
    assert conn.smembers("rq:queues") == rq_queues

    job = Job.fetch(envelope.job_id, connection=conn, serializer=JSONSerializer)
    assert job.func_name == ENTRY_POINT and job.origin == "cpu" and job.get_status() == "queued"
    assert job.timeout == timeout and job.result_ttl == dsp.KEEP_S and job.description == description
    (signed,) = job.args
    assert verify(signed["body"], signed["sig"], KEY) and signed["body"]["params"] == {"n": 1, "text": "é"}
    assert Queue("cpu", connection=conn, serializer=JSONSerializer).job_ids == [envelope.job_id]


@pytest.mark.integration  # starts redis-server
def test_a_batch_adds_each_queue_once_per_transaction(home: Path) -> None:
    """Two queues in one transaction: each is added to `rq:queues` once (RQ adds it again for every job),
    and again in the next transaction (a pipeline forgets what it sent)."""
    server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(server.url)
        writer = JobWriter(conn)
        for i, name in enumerate(["cpu", "gpu", "cpu"]):
            writer.add(name, f"j{i}", ENTRY_POINT, ({"x": i},), timeout=1, result_ttl=2, failure_ttl=3, description="d")
        assert writer.commands.count(b"SADD") == 2
        writer.execute()
        writer.add("cpu", "j3", ENTRY_POINT, ({},), timeout=1, result_ttl=2, failure_ttl=3, description="d")
        assert writer.commands.count(b"SADD") == 1
        writer.execute()
        assert conn.smembers("rq:queues") == {b"rq:queue:cpu", b"rq:queue:gpu"}
        assert conn.lrange("rq:queue:cpu", 0, -1) == [b"j0", b"j2", b"j3"]
        assert conn.lrange("rq:queue:gpu", 0, -1) == [b"j1"]
        # `rq info` (RQ's own CLI) counts them.
        info = subprocess.run(
            [
                str(Path(sys.executable).parent / "rq"),
                "info",
                "--url",
                server.url,
                "--serializer",
                "rq.serializers.JSONSerializer",
                "--only-queues",
                "--raw",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        print(info)
        assert "queue cpu 3" in info and "queue gpu 1" in info
    finally:
        server.stop()


@pytest.mark.integration  # starts redis-server
def test_an_error_reply_is_raised_and_the_connection_is_left_clean(home: Path, conn: redis.Redis) -> None:
    conn.set("rq:queue:cpu", "not a list")  # the RPUSH fails inside the transaction (WRONGTYPE)
    writer = JobWriter(conn)
    writer.add("cpu", "j1", ENTRY_POINT, ({},), timeout=1, result_ttl=2, failure_ttl=3, description="d")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writer.execute()
    assert conn.ping() and conn.get("rq:queue:cpu") == b"not a list"  # every reply was read
    writer.add("gpu", "j2", ENTRY_POINT, ({},), timeout=1, result_ttl=2, failure_ttl=3, description="d")
    writer.execute()  # the writer is empty again after a failure, and works
    assert conn.lrange("rq:queue:gpu", 0, -1) == [b"j2"]


@pytest.mark.integration  # starts redis-server
def test_an_enqueue_lost_with_its_connection_is_made_by_the_next_poll(
    home: Path, store: object, monkeypatch: pytest.MonkeyPatch, conn: redis.Redis
) -> None:
    """The transaction is not sent again blindly (it could push a job twice): the dispatcher's next go
    asks RQ which jobs exist and enqueues the rest, once."""
    from daemon.dispatcher import Dispatcher
    from daemon.handler import CommandHandler
    from schema.settings import load_settings
    from tests.helpers import make_ticket, submit

    handler = CommandHandler(store)  # type: ignore[arg-type]
    dispatcher = Dispatcher(handler, load_settings(), conn)
    handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n  - {id: b, kind: diag}\n"), T0))
    sent = JobWriter.execute

    def lost(self: JobWriter) -> None:
        monkeypatch.setattr(JobWriter, "execute", sent)
        self._parts = []
        raise redis.ConnectionError("lost")

    monkeypatch.setattr(JobWriter, "execute", lost)
    with pytest.raises(redis.ConnectionError):
        dispatcher.poll(T0)
    assert conn.llen("rq:queue:cpu") == 0
    dispatcher.poll(T0)
    assert sorted(conn.lrange("rq:queue:cpu", 0, -1)) == [b"jetbox__TICKET-1__a__1", b"jetbox__TICKET-1__b__1"]
    dispatcher.poll(T0)
    assert conn.llen("rq:queue:cpu") == 2 and dispatcher.enqueued == 2
