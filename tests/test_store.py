"""The event store: atomic appends, concurrency, the hash chain, projections and replay."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon import commands as c
from daemon.handler import CommandHandler, load_state
from schema import events as ev
from schema.store import ConcurrencyError, EventStore, replay_differences
from tests.helpers import make_ticket, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run_pipeline(handler: CommandHandler, tid: str = "TICKET-1") -> None:
    handler.handle(submit(make_ticket(tid), T0))
    handler.handle(c.RecordJobStarted(now=T0, ticket=tid, task="a", attempt=1, worker="w", report_seq=1))
    handler.handle(c.RecordJobFailed(now=T0, ticket=tid, task="a", attempt=1, error="boom", report_seq=2))
    handler.handle(c.Tick(now=T0.replace(hour=1)))
    handler.handle(c.RecordJobSucceeded(now=T0, ticket=tid, task="a", attempt=2, metrics={"acc": 0.7}, report_seq=1))
    handler.handle(c.RecordJobSucceeded(now=T0, ticket=tid, task="b", attempt=1, report_seq=1))


def test_append_read_and_versions(store: EventStore) -> None:
    e1 = ev.TicketCancelled(at=T0, ticket="TICKET-9", reason="x")
    recs = store.append([e1, e1], expected={"TICKET-9": 0}, meta={"actor": "me"})
    assert [(r.seq, r.stream, r.version) for r in recs] == [(1, "TICKET-9", 1), (2, "TICKET-9", 2)]
    back = list(store.read(0))
    assert back == recs
    assert back[0].event == e1 and back[0].meta == {"actor": "me"}
    assert store.stream_version("TICKET-9") == 2 and store.head() == 2
    with pytest.raises(ConcurrencyError, match="expected 1"):
        store.append([e1], expected={"TICKET-9": 1})
    assert store.head() == 2  # nothing written by the failed append


def test_group_commit_is_all_or_nothing(store: EventStore) -> None:
    e = ev.TicketCancelled(at=T0, ticket="TICKET-1", reason="x")
    f = ev.TicketCancelled(at=T0, ticket="TICKET-2", reason="y")
    store.append_batches([([e], {"TICKET-1": 0}, None), ([f], {"TICKET-2": 0}, None)])
    assert store.head() == 2
    with pytest.raises(ConcurrencyError):
        store.append_batches([([e], {"TICKET-1": 1}, None), ([f], {"TICKET-2": 0}, None)])
    assert store.head() == 2


def test_sqlite_pragmas(store: EventStore) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_projections_follow_events_and_replay_matches(store: EventStore) -> None:
    handler = CommandHandler(store)
    run_pipeline(handler)
    with store.engine.connect() as conn:
        ticket = conn.execute(sa.text("SELECT state, tasks_done, tasks_total FROM tickets")).one()
        jobs = conn.execute(sa.text("SELECT task, attempt, state FROM jobs ORDER BY task, attempt")).all()
        metric = conn.execute(sa.text("SELECT value FROM metrics WHERE task='a' AND name='acc'")).scalar()
        timeline = conn.execute(sa.text("SELECT count(*) FROM timeline")).scalar()
    assert tuple(ticket) == ("completed", 2, 2)
    assert [tuple(j) for j in jobs] == [("a", 1, "failed"), ("a", 2, "succeeded"), ("b", 1, "succeeded")]
    assert metric == 0.7 and timeline == store.head()
    assert replay_differences(store) == []
    # Tamper with a projection: --check must notice, replay must repair.
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tickets SET state = 'failed'"))
    diffs = replay_differences(store)
    assert diffs and "tickets" in diffs[0]
    store.replay()
    assert replay_differences(store) == []


def test_state_from_log_equals_live_state(store: EventStore) -> None:
    handler = CommandHandler(store)
    run_pipeline(handler, "TICKET-1")
    run_pipeline(handler, "TICKET-2")
    assert load_state(store) == handler.state


def _tamper(url: str, sql: str) -> None:
    conn = sqlite3.connect(url.split("///", 1)[1])
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("sql", "bad_seq"),
    [
        ("UPDATE events SET data = json_set(data, '$.worker', 'evil') WHERE seq = 4", 4),
        ("DELETE FROM events WHERE seq = 3", 3),
        ("UPDATE events SET seq = CASE seq WHEN 2 THEN 3 ELSE 2 END WHERE seq IN (2, 3)", 2),
        ("DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)", None),
    ],
)
def test_verify_names_first_bad_seq(store: EventStore, sql: str, bad_seq: int | None) -> None:
    run_pipeline(CommandHandler(store))
    total = store.head()
    assert store.verify() == (total, None, "ok")
    if "UPDATE events SET seq" in sql:  # reorder two rows: swap them through a free seq
        _tamper(store.url, "UPDATE events SET seq = -1 WHERE seq = 2")
        _tamper(store.url, "UPDATE events SET seq = 2 WHERE seq = 3")
        _tamper(store.url, "UPDATE events SET seq = 3 WHERE seq = -1")
    else:
        _tamper(store.url, sql)
    _checked, bad, reason = store.verify()
    assert bad == (bad_seq if bad_seq is not None else total)
    assert reason != "ok"


WRITER = """
import sys
from datetime import UTC, datetime
from daemon import commands as c
from daemon.handler import CommandHandler
from schema.store import EventStore
store = EventStore(sys.argv[1])
handler = CommandHandler(store)
for i in range(int(sys.argv[3])):
    handler.handle(c.RecordViolation(now=datetime.now(UTC), what="test", detail=f"{sys.argv[2]}-{i}"))
"""


@pytest.mark.integration
def test_several_processes_write_at_once(store: EventStore, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen([sys.executable, str(script), store.url, f"p{n}", "40"], cwd=Path(__file__).parent.parent)
        for n in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    recs = list(store.read(0))
    assert len(recs) == 120
    assert [r.seq for r in recs] == list(range(1, 121))
    assert [r.version for r in recs] == list(range(1, 121))  # one stream, no gaps, no duplicates
    assert sorted(r.data["detail"] for r in recs) == sorted(f"p{n}-{i}" for n in range(3) for i in range(40))
    assert store.verify()[1] is None


def test_unknown_event_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown event type 'Nope'"):
        ev.event_from("Nope", {})


def test_a_handler_folds_what_other_writers_appended_before_its_own(store: EventStore) -> None:
    """`jbctl cancel` appends while the daemon decides: the daemon's next append lands after it, and
    its state must hold both (a refresh only reads after the daemon's own last event)."""
    daemon, cli = CommandHandler(store), CommandHandler(store)
    cli.handle(submit(make_ticket("TICKET-1"), T0))
    daemon.handle(submit(make_ticket("TICKET-2"), T0))
    daemon.refresh()
    assert list(daemon.state.tickets) == ["TICKET-1", "TICKET-2"]
    assert daemon.state.last_seq == store.head()


def test_known_stream_versions_are_used_only_while_nobody_else_appended(store: EventStore) -> None:
    """An append takes the stream versions its store's last commit left (no `max(version)` query) only
    while the log's head is where that commit left it: another writer's append makes it ask again."""
    other = EventStore(store.url)
    e = ev.TicketCancelled(at=T0, ticket="TICKET-7", reason="x")
    try:
        store.append([e], expected={"TICKET-7": 0})
        asked: list[str] = []
        store._writer.set_trace_callback(asked.append)  # type: ignore[union-attr]
        store.append([e], expected={"TICKET-7": 1})  # known: the head is where this store left it
        assert not any("max(version)" in sql for sql in asked)
        other.append([e, e], expected={"TICKET-7": 2})  # another writer moves the stream on
        with pytest.raises(ConcurrencyError, match="at version 4, expected 2"):
            store.append([e], expected={"TICKET-7": 2})
        assert any("max(version)" in sql for sql in asked)
        recs = store.append([e], expected={"TICKET-7": 4})
        assert [(r.seq, r.version) for r in recs] == [(5, 5)] and store.stream_version("TICKET-7") == 5
        assert [r.version for r in store.read(0, stream="TICKET-7")] == [1, 2, 3, 4, 5]
    finally:
        other.close()
