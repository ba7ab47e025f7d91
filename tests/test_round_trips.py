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
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
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
def test_dispatch_many_is_idempotent_and_honours_dedicated_workers(home: Path, store: object) -> None:
    from daemon.dispatcher import Dispatcher
    from schema.settings import load_settings

    server = start_redis(home / "run")
    try:
        conn = redis.Redis.from_url(server.url)
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
    finally:
        server.stop()


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
