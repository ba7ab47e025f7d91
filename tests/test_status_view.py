"""`jbctl status` at scale: the default view (live, recently ended, a count of the rest), `--all`,
`--limit`, `--since`, one ticket, and `--json` streamed chunk by chunk off the indexes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from cli.main import main as jbctl
from cli.tickets import Readmodel
from daemon import commands as c
from daemon.handler import CommandHandler
from schema import readmodel as rm
from schema import status_sqlite
from schema.store import EventStore
from tests.helpers import make_ticket, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIVE = 55  # more than the default view's 50


@pytest.fixture
def crowded(store: EventStore) -> EventStore:
    """TICKET-101..155 live; TICKET-1..4 ended long ago; TICKET-900 ended a moment ago."""
    handler = CommandHandler(store)
    cmds = [submit(make_ticket(f"TICKET-{i}"), T0 + timedelta(seconds=i)) for i in range(1, 5)]
    cmds += [submit(make_ticket(f"TICKET-{100 + i}"), T0 + timedelta(minutes=1, seconds=i)) for i in range(1, LIVE + 1)]
    cmds.append(submit(make_ticket("TICKET-900"), T0 + timedelta(minutes=2)))
    handler.handle_many(cmds)
    handler.handle_many([c.CancelTicket(now=T0 + timedelta(hours=1), ticket=f"TICKET-{i}") for i in range(1, 5)])
    handler.handle(c.CancelTicket(now=datetime.now(UTC), ticket="TICKET-900", reason="just now"))
    return store


def listed(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line.startswith("TICKET-")]


def test_default_view_is_bounded_and_counts_the_rest(crowded: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["status"]) == 0
    out = capsys.readouterr().out
    shown = listed(out)
    # The newest 50 of the 56 live or recently ended, oldest first; the old ones only counted.
    assert len(shown) == 50 and shown[-1] == "TICKET-900" and shown[0] == "TICKET-107"
    assert not {"TICKET-1", "TICKET-2", "TICKET-3", "TICKET-4"} & set(shown)
    assert "showing the newest 50 of 56 live or recently ended; 4 more ended before" in out
    assert jbctl(["status", "--limit", "3"]) == 0
    assert listed(capsys.readouterr().out) == ["TICKET-154", "TICKET-155", "TICKET-900"]
    assert jbctl(["status", "--since", "2026-01-01", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert len(listed(out)) == 60 and "showing" not in out
    assert jbctl(["status", "--since", "3650d", "--limit", "2"]) == 0
    assert listed(capsys.readouterr().out) == ["TICKET-155", "TICKET-900"]


def test_all_limit_json_and_one_ticket(
    crowded: EventStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rm, "STATUS_CHUNK", 7)  # several chunks, and a keyset walk across them
    monkeypatch.setattr(status_sqlite, "STATUS_CHUNK", 7)  # what `jbctl status` reads SQLite with
    assert jbctl(["status", "--all"]) == 0
    shown = listed(capsys.readouterr().out)
    assert shown[:4] == ["TICKET-1", "TICKET-2", "TICKET-3", "TICKET-4"] and len(shown) == 60 and len(set(shown)) == 60
    assert jbctl(["status", "--all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["ticket"] for d in data] == shown
    assert data[0]["state"] == "cancelled" and data[0]["tasks"][0]["task"] == "a"
    assert jbctl(["status", "--all", "--limit", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert [d["ticket"] for d in json.loads(captured.out)] == ["TICKET-155", "TICKET-900"]
    assert "showing the newest 2 of 60 tickets" in captured.err  # JSON stays JSON; the note goes to stderr
    assert jbctl(["status", "--json", "--limit", "1000"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 56
    assert jbctl(["status", "TICKET-103", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [d["ticket"] for d in one] == ["TICKET-103"] and one[0]["tasks"][0]["attempts"][0]["attempt"] == 1
    assert one[0]["waiting_on"] == "a cpu worker for a"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--limit", "0"], "--limit 0: give a number of tickets, 1 or more"),
        (["--limit", "-5"], "--limit -5"),
        (["--since", "yesterday"], "--since 'yesterday': give an age such as 90m"),
        (["--since", "7x"], "--since '7x'"),
        (["--all", "--since", "1d"], "--all and --since: choose one"),
        (["NO-SUCH"], "no ticket 'NO-SUCH'"),
    ],
)
def test_bad_status_arguments_say_what_is_wrong(
    crowded: EventStore, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    assert jbctl(["status", *args]) == 1
    assert error in capsys.readouterr().err


def test_status_reads_come_off_indexes(crowded: EventStore) -> None:
    """The default view's queries read keys from an index, never every ticket row."""
    since = datetime(2026, 1, 1)
    t = rm.SQLModel.metadata.tables["tickets"]
    queries = [
        sa.select(t.c.submitted_at, t.c.id).where(t.c.ended_at.is_(None)).order_by(t.c.submitted_at.desc()).limit(5),
        sa.select(t.c.submitted_at, t.c.id).where(t.c.ended_at >= since),
        sa.select(t.c.awaiting).where(t.c.awaiting.is_not(None), t.c.state == "running").distinct(),
        sa.select(t.c.id).where(t.c.state == "running", t.c.awaiting.is_(None)).limit(1),
    ]
    with crowded.engine.connect() as conn:
        for q in queries:
            sql = str(q.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            # A search on an index (no table scan), and no sort of the matches.
            assert plan.startswith("SEARCH tickets USING") and "INDEX" in plan and "ORDER BY" not in plan, plan
        keys, matching = rm.status_keys(conn, since, 3)
    assert [k[1] for k in keys] == ["TICKET-154", "TICKET-155", "TICKET-900"] and matching == 60


def test_the_sqlite3_reader_knows_the_tables_columns() -> None:
    """status_sqlite's column lists and conversions are the models' (a new column must be added there)."""
    for name, columns in status_sqlite.COLUMNS.items():
        table = rm.SQLModel.metadata.tables[name]
        assert columns == tuple(c.name for c in table.columns), name
        for col in table.columns:
            converted = (name, col.name) in status_sqlite.JSON_COLUMNS or col.name in status_sqlite.DATETIME
            assert converted == isinstance(col.type, sa.DateTime | sa.JSON), (name, col.name, col.type)


def test_the_sqlite3_reader_answers_as_readmodel(crowded: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`jbctl status` on SQLite (sqlite3) and on PostgreSQL (readmodel through SQLAlchemy): the same rows."""
    monkeypatch.setattr(rm, "STATUS_CHUNK", 7)
    monkeypatch.setattr(status_sqlite, "STATUS_CHUNK", 7)
    CommandHandler(crowded).handle(c.PauseInstallation(now=datetime.now(UTC), reason="disk swap"))
    now = datetime.now(UTC).replace(tzinfo=None)
    path = crowded.engine.url.database
    assert path
    fast = status_sqlite.SqliteStatus(status_sqlite.connect(path))
    with crowded.engine.connect() as conn:
        slow = Readmodel(conn)
        for since, limit in [(datetime(2026, 1, 1), 3), (datetime(2026, 1, 1, 0, 30), None), (now, 50), (now, 1)]:
            assert fast.status_keys(since, limit) == slow.status_keys(since, limit)
        assert fast.newest_keys(5) == slow.newest_keys(5)
        every = list(slow.iter_status(now))
        assert len(every) == 60 and list(fast.iter_status(now)) == every  # datetimes, JSON, key order
        keys = slow.newest_keys(9)
        assert list(fast.iter_status(now, keys)) == list(slow.iter_status(now, keys))
        assert fast.ticket_status("TICKET-103", now) == slow.ticket_status("TICKET-103", now)
        assert fast.ticket_status("NO-SUCH", now) is None
        assert fast.counts_by_state() == slow.counts_by_state() == {"running": 55, "cancelled": 5}
        assert fast.awaited_proposals() == slow.awaited_proposals()
        assert fast.work_waiting() == slow.work_waiting() is True
        assert fast.installation_paused() == slow.installation_paused() == "disk swap"
    fast.conn.close()
    assert status_sqlite.migrated(path) and not status_sqlite.migrated(path + ".missing")
