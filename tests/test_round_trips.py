"""Fewer round trips per job (docs/DISPATCH.md, "Round trips"), with every promise kept.

A short job sends started, progress and its result together and never writes a heartbeat key; a
long one still reports its start and beats while it runs, and its key is gone once it ends; the
dispatcher enqueues a batch in two round trips and stays idempotent; the handler's in-memory tail of
events is exactly the log's, other writers' events included; a job namespace is reused only while
jobs leave it as they found it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from cli.embedded import start_redis
from daemon.dispatcher import dispatch_many
from daemon.handler import CommandHandler
from schema import events as ev
from schema.wire import REPORT_STREAM, Envelope, dedicated_key, dedicated_queue, heartbeat_key, load_secret, verify
from tests.helpers import make_ticket, submit
from tests.jbdaemon import wait_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def worker_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[redis.Redis, bytes]]:
    """A private Redis, and this process set up as a worker of `home` (run_job called in-process)."""
    from workers import entry

    server = start_redis(home / "run")
    monkeypatch.setenv("JETBOX_REDIS_URL", server.url)
    monkeypatch.setenv("JETBOX_HEARTBEAT_SECONDS", "0.3")
    monkeypatch.setenv("JETBOX_HEARTBEAT_TIMEOUT_SECONDS", "5")
    monkeypatch.setenv("JETBOX_NETWORK_ISOLATION", "guard")  # the namespaces have tests of their own
    key = load_secret(home / "secret.key", create=True)
    entry._settings_and_key.cache_clear()
    try:
        yield redis.Redis.from_url(server.url), key
    finally:
        entry._settings_and_key.cache_clear()
        server.stop()


def _reports(conn: redis.Redis, key: bytes) -> list[dict[str, Any]]:
    out = []
    for _, fields in conn.xrange(REPORT_STREAM):
        data = json.loads(fields[b"report"])
        assert verify(data, fields[b"sig"].decode(), key), data  # every report is signed
        out.append(data)
    return out


def _signed(key: bytes, task: str, **params: Any) -> dict[str, Any]:
    return Envelope(kind="diag", ticket="TICKET-1", task=task, attempt=1, params=params, timeout=60).signed(key)


def _commands(conn: redis.Redis) -> dict[str, int]:
    stats = conn.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@pytest.mark.integration  # starts redis-server
def test_a_short_job_sends_its_reports_together_and_writes_no_heartbeat(worker_env: tuple[redis.Redis, bytes]) -> None:
    from workers.entry import run_job

    conn, key = worker_env
    conn.config_resetstat()
    assert run_job(_signed(key, "a", metrics={"score": 0.5}))["status"] == "succeeded"
    reports = _reports(conn, key)
    assert [(r["kind"], r["seq"]) for r in reports] == [("started", 1), ("progress", 2), ("succeeded", 3)]
    assert reports[2]["body"]["metrics"]["score"] == 0.5
    calls = _commands(conn)
    assert calls.get("xadd") == 3
    assert "set" not in calls and "del" not in calls  # no heartbeat key written, none deleted
    assert not conn.exists(heartbeat_key("jetbox__TICKET-1__a__1"))


@pytest.mark.integration  # starts redis-server
def test_a_long_job_reports_its_start_and_beats_while_it_runs(worker_env: tuple[redis.Redis, bytes]) -> None:
    from workers.entry import run_job

    conn, key = worker_env
    hb = heartbeat_key("jetbox__TICKET-1__b__1")
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(run_job(_signed(key, "b", sleep=4.0, steps=4))))
    job.start()
    try:
        # While it runs: its start is on the stream (before any result), and its heartbeat key is set.
        wait_for("the start report", lambda: [r["kind"] for r in _reports(conn, key)][:1] == ["started"], 3.5)
        wait_for("the heartbeat key", lambda: conn.exists(hb), 3.5)
        assert job.is_alive() and "succeeded" not in [r["kind"] for r in _reports(conn, key)]
        assert 0 < conn.pttl(hb) <= 5000  # JETBOX_HEARTBEAT_TIMEOUT_SECONDS
    finally:
        job.join(30)
    assert result["status"] == "succeeded"
    kinds = [r["kind"] for r in _reports(conn, key)]
    assert kinds[0] == "started" and kinds[-1] == "succeeded" and kinds.count("started") == 1
    assert [r["seq"] for r in _reports(conn, key)] == list(range(1, len(kinds) + 1))
    assert not conn.exists(hb)  # deleted with the result


@pytest.mark.integration  # starts redis-server
def test_a_failed_job_still_reports_its_start_first(worker_env: tuple[redis.Redis, bytes]) -> None:
    from workers.entry import run_job

    conn, key = worker_env
    assert run_job(_signed(key, "c", fail_attempts=1, error="boom"))["status"] == "failed"
    reports = _reports(conn, key)
    assert [r["kind"] for r in reports] == ["started", "progress", "failed"]
    assert "boom" in reports[-1]["body"]["error"] and reports[-1]["body"]["retryable"] is True


@pytest.mark.integration  # starts redis-server
def test_dispatch_many_is_idempotent_and_honours_dedicated_workers(
    home: Path, store: object, conn: redis.Redis
) -> None:
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    handler = CommandHandler(store)  # type: ignore[arg-type]
    steps = "".join(f"  - {{id: s{i}, kind: diag}}\n" for i in range(5))
    handler.handle(submit(make_ticket("TICKET-1", steps=steps), T0))
    handler.handle(submit(make_ticket("TICKET-2", steps="  - {id: a, kind: diag}\n"), T0))
    conn.set(dedicated_key("TICKET-2"), "1", ex=30)
    dispatcher = Dispatcher(handler, load_settings(), conn)
    dispatcher.poll(T0)
    assert dispatcher.enqueued == 6
    scheduled = [r.event for r in store.read(0, types=["AttemptScheduled"])]  # type: ignore[attr-defined]
    assert dispatch_many(conn, dispatcher.key, scheduled) == 0  # all known: nothing enqueued twice
    assert dispatch_many(conn, dispatcher.key, []) == 0
    for i in range(5):
        job = Job.fetch(f"jetbox__TICKET-1__s{i}__1", connection=conn, serializer=JSONSerializer)
        assert job.origin == "cpu" and job.func_name == "workers.entry.run_job"
    job = Job.fetch("jetbox__TICKET-2__a__1", connection=conn, serializer=JSONSerializer)
    assert job.origin == dedicated_queue("TICKET-2")
    assert conn.llen("rq:queue:cpu") == 5


def test_the_handlers_tail_is_the_log_including_other_writers(store: object) -> None:
    mine = CommandHandler(store)  # type: ignore[arg-type]
    assert mine.tail_after(0) == []  # an empty log: nothing new
    mine.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
    first = mine.state.last_seq
    other = CommandHandler(store)  # type: ignore[arg-type]  # e.g. `jbctl approve`, in its own process
    other.handle(submit(make_ticket("TICKET-2", steps="  - {id: a, kind: diag}\n"), T0))
    mine.handle(submit(make_ticket("TICKET-3", steps="  - {id: a, kind: diag}\n"), T0))  # folds TICKET-2 first
    logged = [r.event for r in store.read(0)]  # type: ignore[attr-defined]
    assert mine.tail_after(0) == logged
    assert mine.tail_after(first) == logged[first:]
    assert mine.tail_after(mine.state.last_seq) == []
    after = mine.tail_after(first) or []
    assert {e.ticket for e in after if isinstance(e, ev.TicketSubmitted)} == {"TICKET-2", "TICKET-3"}
    late = CommandHandler(store)  # type: ignore[arg-type]  # loaded from the log: no tail yet
    late.handle(submit(make_ticket("TICKET-4", steps="  - {id: a, kind: diag}\n"), T0))
    assert late.tail_after(0) is None  # does not reach back: the caller reads the log


# --- job namespaces ------------------------------------------------------------------------------

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _ns() -> str:
    return os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net")


def _bring_lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import fcntl

        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.mark.integration  # changes network namespaces
def test_a_job_namespace_is_kept_while_clean_and_dropped_once_changed() -> None:
    from workers.netns import JobNamespace, _pristine, available

    if not available()[0]:
        pytest.skip(f"no network namespaces here: {available()[1]}")

    def run(change: bool) -> tuple[str, bool, str]:
        home = _ns()
        with JobNamespace():
            inside, clean = _ns(), _pristine()
            if change:
                _bring_lo_up()
                assert not _pristine()
        return inside, clean, home

    first, clean1, home = _in_thread(lambda: run(False))
    second, clean2, _ = _in_thread(lambda: run(False))
    assert first != home and clean1 and clean2
    assert second == first  # kept: entering it again costs no new namespace
    third, _, _ = _in_thread(lambda: run(True))  # this job brings loopback up
    assert third == first
    fourth, clean4, _ = _in_thread(lambda: run(False))
    assert fourth != third and clean4  # a fresh one: loopback down again


@pytest.mark.integration  # starts redis-server
def test_cancel_is_still_seen_at_the_start_of_a_job(worker_env: tuple[redis.Redis, bytes]) -> None:
    """The cancel flag set while a job waited in its queue stops it at its first check."""
    from schema.wire import cancel_key
    from workers.entry import run_job

    conn, key = worker_env
    conn.set(cancel_key("jetbox__TICKET-1__d__1"), "1")
    assert run_job(_signed(key, "d", sleep=30.0, steps=30))["status"] == "cancelled"
    assert [r["kind"] for r in _reports(conn, key)] == ["started", "failed"]


@pytest.mark.integration  # starts redis-server
def test_a_short_jobs_burst_reaches_a_blocked_reader_in_one_read(worker_env: tuple[redis.Redis, bytes]) -> None:
    """The reports go out in one MULTI/EXEC: Redis serves the daemon's blocked read after the whole
    transaction (a plain pipeline woke it after the first report, and it had to read again)."""
    from daemon.inbox import ensure_group
    from schema.wire import REPORT_GROUP
    from workers.entry import run_job

    conn, key = worker_env
    ensure_group(conn)
    got: list[Any] = []
    reader = redis.Redis(connection_pool=conn.connection_pool)
    blocked = threading.Thread(
        target=lambda: got.append(reader.xreadgroup(REPORT_GROUP, "t", {REPORT_STREAM: ">"}, count=500, block=10_000))
    )
    blocked.start()
    wait_for("the reader to block", lambda: conn.info("clients")["blocked_clients"] == 1, 5)
    assert run_job(_signed(key, "e"))["status"] == "succeeded"
    blocked.join(10)
    kinds = [json.loads(fields[b"report"])["kind"] for _, fields in got[0][0][1]]
    assert kinds == ["started", "progress", "succeeded"]


@pytest.mark.integration  # starts redis-server
def test_reports_are_signed_on_the_text_sent_and_older_encodings_still_verify(
    home: Path, store: object, conn: redis.Redis
) -> None:
    from daemon import commands as cmd
    from daemon.inbox import Inbox
    from schema.settings import load_settings
    from schema.wire import Report, sign

    inbox = Inbox(CommandHandler(store), load_settings(), conn)  # type: ignore[arg-type]
    report = Report(kind="started", ticket="TICKET-1", task="a", attempt=1, seq=1, worker="w", body={"é": 1})
    fields = report.signed(inbox.key)
    data = report.model_dump(mode="json")
    # Sent as the canonical JSON the signature covers (one encoding, checked on the bytes received).
    assert fields["report"] == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    as_sent = {k.encode(): v.encode() for k, v in fields.items()}
    assert isinstance(inbox.parse(as_sent, T0), cmd.RecordJobStarted)
    # A worker of the release before sends `json.dumps(data, sort_keys=True)`, signed the same way.
    older = {b"report": json.dumps(data, sort_keys=True).encode(), b"sig": sign(data, inbox.key).encode()}
    assert isinstance(inbox.parse(older, T0), cmd.RecordJobStarted)
    # Changed by one byte, either way: a forged report.
    for forged in (
        {**as_sent, b"report": as_sent[b"report"].replace(b'"attempt":1', b'"attempt":2')},
        {**older, b"report": older[b"report"].replace(b'"attempt": 1', b'"attempt": 2')},
        {**as_sent, b"sig": b"0" * 64},
    ):
        found = inbox.parse(forged, T0)
        assert isinstance(found, cmd.RecordViolation) and found.what == "forged_report"
    inbox.close()


@pytest.mark.integration  # starts redis-server
def test_the_dispatcher_asks_rq_nothing_about_attempts_it_has_just_seen_recorded(
    home: Path, store: object, conn: redis.Redis
) -> None:
    """Attempts from the handler's tail, first time round: no EXISTS per job id, and the ticket's
    dedicated worker is asked about once a second: one round trip per job for a chain."""
    from daemon import commands as cmd
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    handler = CommandHandler(store)  # type: ignore[arg-type]
    dispatcher = Dispatcher(handler, load_settings(), conn)
    handler.handle(
        submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a]}\n"), T0)
    )
    conn.config_resetstat()
    assert dispatcher.poll(T0)
    assert _commands(conn).get("exists") == 1  # the ticket's dedicated worker, nothing per job
    base = {"now": T0, "ticket": "TICKET-1", "task": "a", "attempt": 1, "sender": "w"}
    handler.handle_many(
        [cmd.RecordJobStarted(**base, report_seq=1, worker="w"), cmd.RecordJobSucceeded(**base, report_seq=2)]
    )
    conn.config_resetstat()
    assert dispatcher.poll(T0)
    calls = _commands(conn)
    assert "exists" not in calls and calls.get("exec") == 1  # one transaction: the enqueue
    assert [Job.exists(f"jetbox__TICKET-1__{t}__1", connection=conn) for t in "ab"] == [True, True]
    assert dispatcher.enqueued == 2


@pytest.mark.integration  # starts redis-server
def test_an_enqueue_that_failed_part_way_is_retried_without_enqueuing_twice(
    home: Path, store: object, conn: redis.Redis
) -> None:
    """Redis refuses part of the enqueue transaction (its other commands are applied): the next poll
    asks RQ which jobs it knows before enqueuing again, so the job is in its queue once."""
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    handler = CommandHandler(store)  # type: ignore[arg-type]
    dispatcher = Dispatcher(handler, load_settings(), conn)
    handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
    conn.set("rq:queues", "not a set")  # RQ's SADD of the queue's name fails: WRONGTYPE
    with pytest.raises(redis.ResponseError):
        dispatcher.poll(T0)
    assert conn.llen("rq:queue:cpu") == 1  # the rest of the transaction was applied
    conn.delete("rq:queues")
    dispatcher.poll(T0)
    assert conn.llen("rq:queue:cpu") == 1 and dispatcher.enqueued == 0  # known: not enqueued twice
    assert Job.fetch("jetbox__TICKET-1__a__1", connection=conn, serializer=JSONSerializer).origin == "cpu"


@pytest.mark.integration  # starts redis-server
def test_other_writers_attempts_are_dispatched_by_the_poll_after_next(
    home: Path, store: object, conn: redis.Redis
) -> None:
    """The poll right after one that acted does not look at the log (the loop goes round again at once
    when busy); the one after it does, and dispatches what another writer recorded meanwhile."""
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    mine = CommandHandler(store)  # type: ignore[arg-type]
    dispatcher = Dispatcher(mine, load_settings(), conn)
    mine.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
    assert dispatcher.poll(T0)
    other = CommandHandler(store)  # type: ignore[arg-type]  # e.g. `jbctl retry`, in its own process
    other.handle(submit(make_ticket("TICKET-2", steps="  - {id: a, kind: diag}\n"), T0))
    assert not dispatcher.poll(T0)
    assert dispatcher.poll(T0) and Job.exists("jetbox__TICKET-2__a__1", connection=conn)
    assert dispatcher.enqueued == 2


def _work_one(conn: redis.Redis, key: bytes, task: str, **params: Any) -> None:
    """Enqueue one attempt as the dispatcher does and let a `JetboxWorker` (burst, in this process) run it."""
    from daemon.dispatcher import dispatch_many
    from workers.worker import JetboxWorker

    scheduled = ev.AttemptScheduled(
        at=T0, ticket="TICKET-1", task=task, attempt=1, kind="diag", queue="cpu", params=params, timeout=60
    )
    assert dispatch_many(conn, key, [scheduled]) == 1
    queue = Queue("cpu", connection=conn, serializer=JSONSerializer)
    JetboxWorker([queue], connection=conn, serializer=JSONSerializer).work(burst=True, logging_level="WARNING")


@pytest.mark.integration  # starts redis-server
def test_the_worker_looks_at_the_cancel_key_in_rqs_own_round_trip(worker_env: tuple[redis.Redis, bytes]) -> None:
    """A job cancelled while it waited in its queue stops at its start, and a job that was not makes
    no round trip of its own to find out: the look rides with RQ's bookkeeping before the job."""
    from schema.wire import cancel_key

    conn, key = worker_env
    conn.set(cancel_key("jetbox__TICKET-1__f__1"), "1")
    _work_one(conn, key, "f", sleep=30.0, steps=30)
    assert [r["kind"] for r in _reports(conn, key)] == ["started", "failed"]
    assert "cancelled" in _reports(conn, key)[-1]["body"]["error"]

    conn.delete(REPORT_STREAM)
    seen: list[str] = []

    def watch() -> None:  # every command Redis runs, until the marker
        with redis.Redis(connection_pool=conn.connection_pool).monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                seen.append(command["command"])
                if command["command"] == "ECHO done":
                    return

    ready = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    ready.wait(5)
    _work_one(conn, key, "g", steps=1)
    conn.echo("done")
    watcher.join(10)
    assert [r["kind"] for r in _reports(conn, key)] == ["started", "progress", "succeeded"]
    looks = [c for c in seen if c.startswith("EXISTS jetbox:cancel:")]
    assert looks == ["EXISTS jetbox:cancel:jetbox__TICKET-1__g__1"]  # one, in RQ's MULTI before the job
    # and with it whether the daemon reads bundled reports
    assert seen[seen.index(looks[0]) + 1 : seen.index(looks[0]) + 3] == ["EXISTS jetbox:caps:bundles", "EXEC"]


@pytest.mark.integration  # starts redis-server
def test_a_wide_batch_is_enqueued_in_chunks_in_order(home: Path, conn: redis.Redis) -> None:
    from daemon.dispatcher import ENQUEUE_CHUNK

    n = 2 * ENQUEUE_CHUNK + 3
    batch = [
        ev.AttemptScheduled(
            at=T0, ticket="TICKET-1", task=f"s{i}", attempt=1, kind="diag", queue="cpu", params={}, timeout=60
        )
        for i in range(n)
    ]
    conn.config_resetstat()
    assert dispatch_many(conn, b"k" * 64, batch, unseen=True) == n
    assert _commands(conn).get("exec") == 3  # the workers get the first chunk while the rest is built
    queued = [j.decode() for j in conn.lrange("rq:queue:cpu", 0, -1)]
    assert queued == [f"jetbox__TICKET-1__s{i}__1" for i in range(n)]
    assert dispatch_many(conn, b"k" * 64, batch) == 0  # asked: all known


@pytest.mark.integration  # starts redis-server
def test_the_workers_heartbeat_is_one_round_trip(home: Path) -> None:
    """RQ's worker heartbeat (last_heartbeat, and the TTLs of the worker's keys), pipelined: RQ beats
    three times per job outside a pipeline, three round trips each."""
    from workers.worker import PLAIN_BEAT_S, JetboxWorker

    class Counting(redis.Redis):  # counts the commands sent one round trip each (pipelines are not)
        sent: list[str] = []

        def execute_command(self, *args: Any, **options: Any) -> Any:
            self.sent.append(str(args[0]))
            return super().execute_command(*args, **options)

    server = start_redis(home / "run")
    try:
        conn = Counting.from_url(server.url)
        worker = JetboxWorker([Queue("cpu", connection=conn, serializer=JSONSerializer)], connection=conn)
        worker.register_birth()
        conn.persist(worker.key)
        Counting.sent.clear()
        worker.heartbeat()
        assert Counting.sent == []  # one pipeline, no single commands
        assert conn.hget(worker.key, "last_heartbeat") and conn.ttl(worker.key) > 0

        # Once per job: a plain beat right after a plain one is skipped; one after a beat that set
        # another TTL (RQ's, before a job, in its pipeline) goes out, and so does one a while later.
        def beats(*calls: Any) -> int:
            conn.config_resetstat()
            for call in calls:
                call()
            return _commands(conn).get("hset", 0)

        assert beats(worker.heartbeat, worker.heartbeat) == 0
        suspension = conn.pipeline()  # RQ's suspension check beats in its pipeline: skipped as well
        assert beats(lambda: worker.heartbeat(pipeline=suspension), suspension.execute) == 0
        with_ttl = conn.pipeline()
        assert beats(lambda: worker.heartbeat(30, pipeline=with_ttl), with_ttl.execute) == 1
        assert 0 < conn.ttl(worker.key) <= 30
        assert beats(worker.heartbeat, worker.heartbeat) == 1  # the TTL set just before is not RQ's default
        assert conn.ttl(worker.key) > 30
        assert beats(lambda: worker.heartbeat(30)) == 1  # another TTL, outside a pipeline
        worker._plain_beat_at = time.monotonic() - PLAIN_BEAT_S  # a while later
        assert beats(worker.heartbeat) == 1
        worker._plain_beat_at = time.monotonic() - PLAIN_BEAT_S
        assert beats(lambda: worker.heartbeat(pipeline=suspension), suspension.execute) == 1
        assert beats(worker.heartbeat) == 0  # the one in that pipeline counts
    finally:
        server.stop()


@pytest.mark.integration  # starts redis-server
def test_attempts_another_writer_recorded_are_checked_against_rq(home: Path, store: object, conn: redis.Redis) -> None:
    """Only what this process recorded skips the question to RQ: an attempt folded in from another
    writer (another daemon on the same database may have enqueued it) is enqueued once."""
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    mine = CommandHandler(store)  # type: ignore[arg-type]
    dispatcher = Dispatcher(mine, load_settings(), conn)
    mine.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
    assert dispatcher.poll(T0)
    other = CommandHandler(store)  # type: ignore[arg-type]
    other.handle(submit(make_ticket("TICKET-2", steps="  - {id: a, kind: diag}\n"), T0))
    scheduled = [r.event for r in store.read(0, types=["AttemptScheduled"])]  # type: ignore[attr-defined]
    assert dispatch_many(conn, dispatcher.key, scheduled[1:]) == 1  # the other daemon's enqueue
    mine.refresh()  # as the loop's tick does: the other writer's events enter the tail
    assert not mine.recorded_here(dispatcher.position or 0)
    dispatcher.poll(T0)
    assert conn.llen("rq:queue:cpu") == 2 and dispatcher.enqueued == 1  # TICKET-2's job once
    assert mine.recorded_here(mine.state.last_seq)


def _stream(conn: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in conn.xrange(REPORT_STREAM)]


def _recorded(tmp: Path, name: str, messages: list[dict[bytes, bytes]]) -> list[tuple[str, dict[str, Any]]]:
    """The events an inbox records for these stream messages, on a fresh log holding TICKET-1's attempt
    of step `a` (what a daemon of this release would record for them)."""
    from daemon.inbox import Inbox
    from schema.migrations import upgrade
    from schema.settings import load_settings
    from schema.store import EventStore

    url = f"sqlite:///{tmp / f'{name}.db'}"
    upgrade(url)
    log = EventStore(url)
    server = start_redis(tmp / f"run-{name}")
    try:
        handler = CommandHandler(log)
        handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
        before = log.head()
        inbox = Inbox(handler, load_settings(), redis.Redis.from_url(server.url))
        conn = redis.Redis.from_url(server.url)
        for fields in messages:
            conn.xadd(REPORT_STREAM, fields)  # type: ignore[arg-type]
        while inbox.poll(T0):
            pass
        inbox.close()
        return [(r.type, ev.event_to_data(r.event)) for r in log.read(before)]
    finally:
        server.stop()
        log.close()


@pytest.mark.integration  # starts redis-server
def test_a_short_jobs_reports_go_out_as_one_bundle_while_the_daemon_reads_bundles(
    worker_env: tuple[redis.Redis, bytes], home: Path
) -> None:
    """One stream message and one signature for a short job's burst while the daemon says it reads
    bundles; one message per report otherwise (a daemon of an earlier release would take a bundle
    for a forged report). Either way the daemon records exactly the same events."""
    from daemon.inbox import burst_over
    from schema.wire import BUNDLES_KEY, verify_text

    conn, key = worker_env
    conn.config_resetstat()
    _work_one(conn, key, "a", steps=1)  # no BUNDLES_KEY: the form every daemon reads
    sent_plain = _commands(conn)
    plain = _stream(conn)
    assert [json.loads(f[b"report"])["kind"] for f in plain] == ["started", "progress", "succeeded"]

    conn.delete(REPORT_STREAM, "rq:job:jetbox__TICKET-1__a__1")
    conn.set(BUNDLES_KEY, "1", ex=30)
    conn.config_resetstat()
    _work_one(conn, key, "a", steps=1)
    sent = _commands(conn)
    # Two XADDs and the transaction around the three fewer (RQ's own XADD of the job's result stays).
    assert sent["xadd"] == sent_plain["xadd"] - 2 and sent["multi"] == sent_plain["multi"] - 1
    bundled = _stream(conn)
    assert len(bundled) == 1 and set(bundled[0]) == {b"bundle", b"sig"} and burst_over(bundled[0])
    assert verify_text(bundled[0][b"bundle"], bundled[0][b"sig"].decode(), key)
    reports = json.loads(bundled[0][b"bundle"])
    assert [r["kind"] for r in reports] == ["started", "progress", "succeeded"]
    assert [r["seq"] for r in reports] == [1, 2, 3]
    # What was sent one by one is exactly what was bundled, and is recorded alike.
    assert [json.loads(f[b"report"]) for f in plain] == reports
    one_by_one = _recorded(home, "plain", plain)
    assert [t for t, _ in one_by_one][:3] == ["AttemptStarted", "ProgressRecorded", "AttemptSucceeded"]
    assert _recorded(home, "bundled", bundled) == one_by_one

    # A bundle changed by one byte, or signed with another key, is one forged report and nothing else.
    tampered = {**bundled[0], b"bundle": bundled[0][b"bundle"].replace(b'"seq":3', b'"seq":4')}
    for forged in (tampered, {**bundled[0], b"sig": b"0" * 64}):
        assert [(t, d["what"]) for t, d in _recorded(home, "forged", [forged])] == [
            ("SafetyViolation", "forged_report")
        ]
        (home / "forged.db").unlink()


@pytest.mark.integration  # starts redis-server
def test_the_daemon_says_it_reads_bundles_while_it_runs(home: Path, store: object) -> None:
    from daemon.inbox import Inbox
    from schema.settings import load_settings
    from schema.wire import BUNDLES_KEY, BUNDLES_TTL_S

    server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(server.url)
        inbox = Inbox(CommandHandler(store), load_settings(), conn)  # type: ignore[arg-type]
        assert conn.exists(BUNDLES_KEY) and 0 < conn.ttl(BUNDLES_KEY) <= BUNDLES_TTL_S  # gone if it dies
        conn.delete(BUNDLES_KEY)  # as in a Redis restarted empty
        inbox._caps_at -= BUNDLES_TTL_S
        inbox.poll(T0)
        assert conn.exists(BUNDLES_KEY)  # said again, within a third of its TTL
        inbox.close()
        assert not redis.Redis.from_url(server.url).exists(BUNDLES_KEY)  # stopped: workers send the old form
    finally:
        server.stop()


@pytest.mark.integration  # starts redis-server
def test_rqs_bookkeeping_around_a_job_takes_few_round_trips_and_rq_suspend_still_stops_it(
    worker_env: tuple[redis.Redis, bytes],
) -> None:
    """After a job, RQ's state change, its worker beat and its suspension check go out as one round trip
    (three before), and the `idle` it writes again as it waits is not sent twice: ten round trips per
    short job in all (RQ's own SimpleWorker makes twenty). `rq suspend` still keeps the next job from
    being taken, and the worker's state is `idle` between jobs as RQ keeps it."""
    from redis.connection import AbstractConnection
    from rq.suspension import WORKERS_SUSPENDED

    from daemon.dispatcher import dispatch_many
    from workers.worker import JetboxWorker

    conn, key = worker_env

    def enqueue(*tasks: str) -> None:
        scheduled = [
            ev.AttemptScheduled(
                at=T0, ticket="TICKET-1", task=t, attempt=1, kind="diag", queue="cpu", params={}, timeout=60
            )
            for t in tasks
        ]
        assert dispatch_many(conn, key, scheduled) == len(tasks)

    states: list[bytes | None] = []

    class Watched(JetboxWorker):
        def perform_job(self, job: Any, queue: Queue, execution: Any) -> bool:
            states.append(conn.hget(self.key, "state"))
            return super().perform_job(job, queue, execution)

    def work() -> Watched:
        worker = Watched(
            [Queue("cpu", connection=conn, serializer=JSONSerializer)], connection=conn, serializer=JSONSerializer
        )
        worker.work(burst=True, logging_level="WARNING")
        return worker

    enqueue("warm")
    work()
    sends: list[int] = []
    send = AbstractConnection.send_packed_command

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        sends.append(1)
        return send(self, *args, **kwargs)

    enqueue(*(f"t{i}" for i in range(5)))
    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        work()
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    empty = len(sends)
    sends.clear()
    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        work()  # nothing queued: what a worker's start and end cost
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    assert (empty - len(sends) - 5) / 5 <= 10  # (less the test's own look at the state, once a job)
    assert states[-5:] == [b"busy"] * 5  # set in RQ's pipeline before each job

    class Suspending(Watched):
        def perform_job(self, job: Any, queue: Queue, execution: Any) -> bool:
            conn.set(WORKERS_SUSPENDED, 1)  # `rq suspend` while the first job runs
            return super().perform_job(job, queue, execution)

    enqueue("u1", "u2")
    suspending = Suspending(
        [Queue("cpu", connection=conn, serializer=JSONSerializer)], connection=conn, serializer=JSONSerializer
    )
    suspending.work(burst=True, logging_level="WARNING")
    assert [j.decode() for j in conn.lrange("rq:queue:cpu", 0, -1)] == ["jetbox__TICKET-1__u2__1"]
