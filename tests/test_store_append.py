"""The append path (precompiled SQL on the DBAPI cursor, a writer connection of its own on SQLite)
writes byte for byte what SQLAlchemy Core wrote, hashes what `chain_hash` hashes, and keeps the
durability settings."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
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
from schema.projections import MemoryRows, project
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
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
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
    fast = _chain_hash_tail(prev, seq, stream, version, type_, data, _hash_tail(meta, at))
    assert fast == chain_hash(prev, seq, stream, version, type_, data, meta, at)


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


def test_rows_are_byte_for_byte_what_sqlalchemy_writes(tmp_path: Path) -> None:
    """Events and projections written by the append path, against the same records and rows written
    through SQLAlchemy Core into a second database: identical stored text (JSON null, timestamps)."""
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
    for table in ["events", *PROJECTION_TABLES]:
        assert _raw(live, table) == _raw(ref, table), table
    assert any(None in row for row in _raw(live, "tasks"))  # the comparison covers NULLs


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
