"""The append path (precompiled SQL on the DBAPI cursor, a writer connection of its own on SQLite)
writes the rows SQLAlchemy Core wrote (projections byte for byte; an event's JSON compact, reading
back as the same values), hashes what `chain_hash` hashes, and keeps the durability settings."""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import commands as c
from daemon.handler import CommandHandler
from schema import events as ev
from schema.migrations import upgrade
from schema.projections import MemoryRows, project, same_value
from schema.rawsql import json_text
from schema.store import (
    ConcurrencyError,
    EventStore,
    _chain_hash_tail,
    _hash_tail,
    chain_hash,
)
from schema.tables import PROJECTION_TABLES, SQLModel
from tests.helpers import make_ticket, property_examples, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities: json writes them, so must the append path's encoder
    | st.text()
    | st.sampled_from(["\ud800 lone surrogate", 'é\u2028\x00"\\']),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=property_examples(300), deadline=None)
@given(
    seq=st.integers(1, 2**62),
    stream=st.text(max_size=20),
    version=st.integers(1, 2**40),
    type_=st.text(max_size=20),
    data=st.dictionaries(st.text(max_size=8), _json, max_size=5),
    meta=st.dictionaries(st.text(max_size=8), _json, max_size=3),
    at=st.datetimes(),
)
def test_the_append_paths_hash_is_chain_hash(
    seq: int, stream: str, version: int, type_: str, data: Any, meta: Any, at: datetime
) -> None:
    prev = "ab" * 32

    def outcome(fn: Any) -> Any:
        try:
            return fn()
        except UnicodeEncodeError as exc:  # a lone surrogate: neither can hash it, the append fails
            return type(exc)

    fast = outcome(lambda: _chain_hash_tail(prev, seq, stream, version, type_, data, _hash_tail(meta, at)))
    assert fast == outcome(lambda: chain_hash(prev, seq, stream, version, type_, data, meta, at))


def _raw(path: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
    finally:
        conn.close()


def _pipeline(handler: CommandHandler) -> None:
    tid = "TICKET-1"
    handler.handle(submit(make_ticket(tid), T0))
    handler.handle(c.RecordJobStarted(now=T0, ticket=tid, task="a", attempt=1, worker="w", report_seq=1))
    handler.handle(c.RecordProgress(now=T0, ticket=tid, task="a", attempt=1, step=1, total=2, report_seq=2))
    handler.handle(c.RecordJobFailed(now=T0, ticket=tid, task="a", attempt=1, error="boom", report_seq=3))
    handler.handle(c.Tick(now=T0.replace(hour=1)))
    handler.handle(c.RecordJobSucceeded(now=T0, ticket=tid, task="a", attempt=2, metrics={"é": 0.7}, report_seq=1))
    handler.handle(c.RecordJobSucceeded(now=T0, ticket=tid, task="b", attempt=1, report_seq=1))
    handler.handle(c.CancelTicket(now=T0, ticket="TICKET-404"))  # no events: nothing to write


def _strict(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (1.0 is not 1, NaN is NaN), dicts in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_strict(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_strict(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b) and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


def test_rows_are_what_sqlalchemy_writes(tmp_path: Path) -> None:
    """Events and projections written by the append path, against the same records and rows written
    through SQLAlchemy Core into a second database: projections with identical stored text (JSON
    null, timestamps); events identical but for their JSON text, which is compact and reads back as
    the same values in the same order."""
    live = tmp_path / "live.db"
    upgrade(f"sqlite:///{live}")
    store = EventStore(f"sqlite:///{live}")
    _pipeline(CommandHandler(store))
    recorded = list(store.read(0))
    store.close()
    assert len(recorded) > 8

    ref = tmp_path / "ref.db"
    upgrade(f"sqlite:///{ref}")
    engine = sa.create_engine(f"sqlite:///{ref}")
    rows = MemoryRows()
    for rec in recorded:
        project(rows, rec.seq, rec.event)
    with engine.begin() as conn:
        conn.execute(
            SQLModel.metadata.tables["events"].insert(),
            [{k: v for k, v in rec.__dict__.items()} for rec in recorded],
        )
        rows.flush(conn)
    engine.dispose()
    for table in PROJECTION_TABLES:
        assert _raw(live, table) == _raw(ref, table), table
    assert any(None in row for row in _raw(live, "tasks"))  # the comparison covers NULLs
    ours, theirs = _raw(live, "events"), _raw(ref, "events")
    assert len(ours) == len(theirs)
    for mine, ref_row in zip(ours, theirs, strict=True):
        assert mine[:4] + mine[6:] == ref_row[:4] + ref_row[6:]  # seq, stream, version, type; time, hash
        for text, ref_text in zip(mine[4:6], ref_row[4:6], strict=True):  # data, meta
            assert _strict(json.loads(text), json.loads(ref_text)), (text, ref_text)
            assert ", " not in text or len(text) < len(ref_text)  # compact
    assert '"é":0.7' in next(r[4] for r in ours if r[3] == "AttemptSucceeded")  # UTF-8 as is


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats()  # NaN and the infinities too: json.dumps writes them, so must json_text
    | st.text(),  # lone surrogates included: the fallback
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=property_examples(200), deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_json_text_reads_back_as_json_dumps_does(value: dict[str, Any]) -> None:
    """The chain hash covers the decoded body, so the stored text must decode to exactly what the
    old encoding decoded to: same types, same floats (bit for bit), same key order."""
    text = json_text(value)
    assert _strict(json.loads(text), json.loads(json.dumps(value)))


def test_event_to_data_is_model_dump() -> None:
    events = [
        ev.ProgressRecorded(
            at=T0, ticket="T", task="t", attempt=1, step=3, total=None, metrics={"loss": float("nan"), "é": 1e-7}
        ),
        ev.TicketCancelled(at=T0, ticket="T", reason="x"),
        ev.ArtifactRecorded(at=T0, ticket="T", task="t", attempt=1, artifact="a" * 64, kind="model", meta={"k": [1]}),
    ]
    for e in events:
        assert _strict(ev.event_to_data(e), e.model_dump(mode="json"))


def test_an_update_sets_only_the_columns_that_changed(store: EventStore) -> None:
    """A progress report moves a task's step and time: its UPDATE sets those, not `state` (whose index
    page SQLite would otherwise rewrite in every commit) nor `needs` (JSON encoded again for nothing)."""
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1"), T0))
    handler.handle(c.RecordJobStarted(now=T0, ticket="TICKET-1", task="a", attempt=1, worker="w", report_seq=1))
    writer = store._writer
    assert writer is not None
    seen: list[str] = []
    writer.set_trace_callback(seen.append)
    try:
        for step in (1, 2):
            handler.handle(
                c.RecordProgress(
                    now=T0, ticket="TICKET-1", task="a", attempt=1, step=step, total=2, report_seq=1 + step
                )
            )
        # The same values again: the row is not written at all.
        version = store.stream_version("TICKET-1")
        same = ev.ProgressRecorded(at=T0, ticket="TICKET-1", task="a", attempt=1, step=2, total=2, report_seq=9)
        store.append([same], expected={"TICKET-1": version})
    finally:
        writer.set_trace_callback(None)
    updates = [sql for sql in seen if sql.startswith("UPDATE tasks")]
    assert len(updates) == 3 - 1 and all("SET progress_step = 1" in u or "SET progress_step = 2" in u for u in updates)
    assert not any("state" in u or "needs" in u for u in updates), updates
    with sqlite3.connect(store.url.split("///", 1)[1]) as conn:
        assert conn.execute("SELECT progress_step, progress_total, state FROM tasks WHERE task = 'a'").fetchone() == (
            2,
            2,
            "running",
        )
    assert store.verify()[1] is None and store.replay() == store.head()


def test_same_value_is_same_stored_text() -> None:
    assert same_value({"a": [1, 2.0]}, {"a": [1, 2.0]})
    assert not same_value(1, 1.0) and not same_value(1, True) and not same_value(0.0, -0.0)
    assert not same_value({"a": 1, "b": 2}, {"b": 2, "a": 1})  # equal dicts, different text
    assert not same_value([1], [1, 2]) and not same_value(float("nan"), float("nan"))
    assert same_value(datetime(2026, 1, 1), datetime(2026, 1, 1)) and same_value(None, None)
    utc, later = datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    assert utc == later and not same_value(utc, later) and not same_value(utc, utc.replace(tzinfo=None))


def test_the_writer_connection_keeps_the_durability_settings(store: EventStore) -> None:
    store.append([ev.TicketCancelled(at=T0, ticket="TICKET-9", reason="x")], expected={"TICKET-9": 0})
    writer = store._writer
    assert writer is not None
    pragmas = {p: writer.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous", "busy_timeout")}
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000}  # 2: FULL
    assert writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_a_failed_append_leaves_nothing_and_the_next_one_writes(store: EventStore) -> None:
    e = ev.TicketCancelled(at=T0, ticket="TICKET-1", reason="x")
    store.append([e], expected={"TICKET-1": 0})
    with pytest.raises(ConcurrencyError):
        store.append_batches([([e], {"TICKET-1": 1}, None), ([e], {"TICKET-1": 0}, None)])
    with pytest.raises(TypeError):  # not JSON: fails while encoding, after the head was read
        store.append([e], expected={"TICKET-1": 1}, meta={"bad": object()})
    assert store.head() == 1 and store.verify() == (1, None, "ok")
    store.append([e], expected={"TICKET-1": 1})
    assert store.head() == 2 and store.verify() == (2, None, "ok")
    # Another connection can take the write lock: the failed transactions released it.
    other = sqlite3.connect(store.url.split("///", 1)[1], timeout=1)
    other.execute("BEGIN IMMEDIATE")
    other.rollback()
    other.close()


def test_projection_writes_bind_none_as_sqlalchemy_does(tmp_path: Path) -> None:
    """JSON None is stored as the JSON text 'null' (SQLAlchemy's default), on INSERT and UPDATE."""
    from schema.projections import SqlRows

    row = {"id": "a" * 64, "kind": "model", "ticket": "T", "task": "t", "attempt": 1, "meta": None}
    row["recorded_at"] = datetime(2026, 1, 2, 3, 4, 5, 678)
    live, ref = tmp_path / "live.db", tmp_path / "ref.db"
    for path in (live, ref):
        upgrade(f"sqlite:///{path}")
    store = EventStore(f"sqlite:///{live}")
    for changed in (row, {**row, "kind": "data", "meta": None}):  # an INSERT, then an UPDATE
        with store._transaction() as cur:
            rows = SqlRows(cur, store._sql)
            rows.put("artifacts", (row["id"],), changed)
            rows.flush()
    store.close()
    engine = sa.create_engine(f"sqlite:///{ref}")
    with engine.begin() as conn:
        conn.execute(SQLModel.metadata.tables["artifacts"].insert(), [{**row, "kind": "data"}])
    engine.dispose()
    assert _raw(live, "artifacts") == _raw(ref, "artifacts")
    assert _raw(live, "artifacts")[0][-2:] == ("null", "2026-01-02 03:04:05.000678")


def test_a_locked_database_is_sqlalchemys_operational_error(store: EventStore) -> None:
    """The daemon retries on `sqlalchemy.exc.OperationalError` (daemon/service.py); the writer
    connection's driver errors must still come out as that, and leave the store usable."""
    e = ev.TicketCancelled(at=T0, ticket="TICKET-1", reason="x")
    store.append([e], expected={"TICKET-1": 0})
    assert store._writer is not None
    store._writer.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(store.url.split("///", 1)[1], timeout=1, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            store.append([e], expected={"TICKET-1": 1})
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.append([e], expected={"TICKET-1": 1})
    assert store.head() == 2 and store.verify() == (2, None, "ok")


def test_a_forked_child_appends_on_its_own_connection(store: EventStore) -> None:
    import os

    e = ev.TicketCancelled(at=T0, ticket="TICKET-1", reason="x")
    store.append([e], expected={"TICKET-1": 0})
    parent_writer = store._writer
    pid = os.fork()
    if pid == 0:  # the child: append once, exit without running pytest's teardown
        code = 1
        try:
            store.append([e], expected={"TICKET-1": 1})
            code = 0 if store._writer is not parent_writer else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.append([e], expected={"TICKET-1": 2})  # the parent's connection still works
    assert store._writer is parent_writer and store.verify() == (3, None, "ok")


def test_a_log_of_old_and_new_rows_verifies_and_replays(tmp_path: Path) -> None:
    """Rows written before the compact encoding (SQLAlchemy's `json.dumps` text, spaces and escaped
    non-ASCII) and rows the append path writes now verify as one chain and decode alike."""
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    upgrade(url)
    old = ev.ProgressRecorded(at=T0, ticket="T-1", task="t", attempt=1, step=1, metrics={"é": 8.925383791503035e-05})
    data, meta = ev.event_to_data(old), {"command": "é"}
    at = datetime(2026, 1, 1, 0, 0, 1)
    digest = chain_hash("0" * 64, 1, "T-1", 1, old.type, data, meta, at)
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # as the store wrote rows before: through SQLAlchemy's JSON type
        conn.execute(
            SQLModel.metadata.tables["events"].insert(),
            [dict(seq=1, stream="T-1", version=1, type=old.type, data=data, meta=meta, recorded_at=at, hash=digest)],
        )
        head = SQLModel.metadata.tables["event_head"]
        conn.execute(head.update().where(head.c.id == 1).values(seq=1, hash=digest))
    engine.dispose()
    store = EventStore(url)
    new = old.model_copy(update={"step": 2})
    store.append([new], expected={"T-1": 1}, meta=meta)
    texts = [r[4] for r in _raw(tmp_path / "mixed.db", "events")]
    assert "\\u00e9" in texts[0] and ", " in texts[0]  # the old text
    assert '"é":0.00008925383791503035' in texts[1] and ", " not in texts[1]  # the new one
    assert store.verify() == (2, None, "ok")
    assert [e for _, e in store.read_events(0)] == [old, new]
    assert [r.data for r in store.read(0)] == [data, ev.event_to_data(new)]
    store.close()


def test_the_type_index_leaves_out_progress_and_readers_by_type_use_it(store: EventStore) -> None:
    """0012's index is the models' (`TYPE_INDEXED`); a read by other types carries its term and reads
    the index; a read of progress reports (left out of it) still finds them all."""
    from schema.tables import TYPE_INDEXED, type_indexed

    at = T0
    store.append([ev.TicketCancelled(at=at, ticket="T-1", reason="x")], expected={"T-1": 0})
    progress = [ev.ProgressRecorded(at=at, ticket="T-1", task="t", attempt=1, step=k) for k in range(3)]
    store.append(progress, expected={"T-1": 1})
    conn = sqlite3.connect(store.url.split("///", 1)[1])
    try:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'ix_events_type'").fetchone()
        assert sql.endswith(f"WHERE {TYPE_INDEXED}")
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT seq FROM events WHERE type IN ('TicketCancelled') AND {TYPE_INDEXED}"
        ).fetchall()
        assert "ix_events_type" in str(plan)
    finally:
        conn.close()
    assert type_indexed(["TicketCancelled"]) and not type_indexed(["TicketCancelled", "ProgressRecorded"])
    assert [r.type for r in store.read(0, types=["TicketCancelled"])] == ["TicketCancelled"]
    assert [r.data["step"] for r in store.read(0, types=["ProgressRecorded"])] == [0, 1, 2]
    both = [r.type for r in store.read(0, types=["ProgressRecorded", "TicketCancelled"])]
    assert both == ["TicketCancelled"] + ["ProgressRecorded"] * 3
    assert [row[1] for row in store.field_rows(["ProgressRecorded"], "step")] == ["ProgressRecorded"] * 3
