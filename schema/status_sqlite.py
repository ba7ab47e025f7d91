"""`jbctl status`'s reads of the projections with the stdlib sqlite3 module (SQLite homes only).

Importing SQLAlchemy and the SQLModel tables costs a CLI process more than the reads themselves, so
on SQLite `jbctl status` asks the same questions as schema/readmodel.py in plain SQL, and converts
the columns SQLAlchemy would (DateTime, JSON, Boolean) the same way: the rows, and so what `status`
prints, are the same. PostgreSQL goes through readmodel. tests/test_status_view.py checks the
column lists against the tables and the answers against readmodel's.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from schema.status_rows import Key, _order, status_row, topo

STATUS_CHUNK = 500  # tickets read (with their tasks and attempts) per query, as readmodel's

# The columns of each table in the models' order (what SQLAlchemy's rows hold), and those whose
# values SQLAlchemy converts on SQLite.
COLUMNS: dict[str, tuple[str, ...]] = {
    "tickets": (
        "id", "title", "owner", "state", "revision", "path", "content_hash", "update_kind", "tasks_total",
        "tasks_done", "reason", "submitted_at", "updated_at", "ended_at", "last_seq", "awaiting", "retries",
        "loops", "forged", "violations", "contradictions", "consistency", "infra_failures", "held", "priority",
    ),
    "tasks": (
        "ticket", "task", "kind", "queue", "state", "attempt", "needs", "progress_step", "progress_total",
        "worker", "last_error", "retry_at", "updated_at", "parent", "waiting",
    ),
    "jobs": (
        "ticket", "task", "attempt", "kind", "queue", "state", "worker", "error", "cause", "scheduled_at",
        "started_at", "ended_at",
    ),
}  # fmt: skip
DATETIME = {"submitted_at", "updated_at", "ended_at", "retry_at", "scheduled_at", "started_at"}
JSON_COLUMNS = {("tasks", "needs")}


def _datetime(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _converters(table: str) -> list[tuple[int, Callable[[Any], Any]]]:
    out: list[tuple[int, Callable[[Any], Any]]] = []
    for i, name in enumerate(COLUMNS[table]):
        if (table, name) in JSON_COLUMNS:
            out.append((i, _json))
        elif name in DATETIME:
            out.append((i, _datetime))
    return out


def _bind(value: datetime) -> str:
    """A datetime as SQLAlchemy stores it on SQLite (so comparisons in SQL agree with its own)."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def connect(path: str) -> sqlite3.Connection:
    """A read-only connection holding one read transaction (one snapshot for every query, as the
    SQLAlchemy reader's), with the store's busy timeout."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.isolation_level = None
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("BEGIN")
    return conn


class SqliteStatus:
    """readmodel's status questions (same names, same answers) over one sqlite3 connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.conv = {name: _converters(name) for name in COLUMNS}
        self.select = {name: f"SELECT {', '.join(cols)} FROM {name}" for name, cols in COLUMNS.items()}

    def rows(self, table: str, where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        names, conv = COLUMNS[table], self.conv[table]
        out = []
        for raw in self.conn.execute(self.select[table] + where, params):
            values = list(raw)
            for i, fn in conv:
                values[i] = fn(values[i])
            out.append(dict(zip(names, values, strict=True)))
        return out

    def counts_by_state(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) FROM tickets GROUP BY state").fetchall()
        return {str(s): int(n) for s, n in rows}

    def _keys(self, sql: str, params: tuple[Any, ...] = ()) -> list[Key]:
        return [(_datetime(r[0]), r[1]) for r in self.conn.execute(sql, params)]

    def _count(self, where: str, params: tuple[Any, ...] = ()) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM tickets WHERE {where}", params).fetchone()[0] or 0)

    def status_keys(self, ended_since: datetime, limit: int | None) -> tuple[list[Key], int]:
        """readmodel.status_keys: the newest `limit` live or recently ended tickets, and how many in all."""
        sql = "SELECT submitted_at, id FROM tickets WHERE ended_at IS NULL ORDER BY submitted_at DESC, id DESC"
        live = self._keys(sql + (f" LIMIT {int(limit)}" if limit is not None else ""))
        since = (_bind(ended_since),)
        ended = self._keys("SELECT submitted_at, id FROM tickets WHERE ended_at >= ?", since)
        recent = heapq.nlargest(limit, ended, key=_order) if limit is not None else ended
        keys = sorted(live + recent, key=_order)
        if limit is not None:
            keys = keys[-limit:] if limit else []
        n_live = len(live) if limit is None or len(live) < limit else self._count("ended_at IS NULL")
        n_recent = len(recent) if limit is None or len(recent) < limit else self._count("ended_at >= ?", since)
        return keys, n_live + n_recent

    def newest_keys(self, limit: int) -> list[Key]:
        sql = f"SELECT submitted_at, id FROM tickets ORDER BY submitted_at DESC, id DESC LIMIT {int(limit)}"
        return sorted(self._keys(sql), key=_order)

    def _in(self, table: str, column: str, ids: list[str], order: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(ids))
        return self.rows(table, f" WHERE {column} IN ({marks}) ORDER BY {order}", tuple(ids))

    def status_rows(self, rows: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
        ids = [r["id"] for r in rows]
        tasks: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        jobs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            for r in self._in("tasks", "ticket", ids, "ticket, task"):
                tasks[r["ticket"]].append(r)
            for r in self._in("jobs", "ticket", ids, "ticket, task, attempt"):
                jobs[r["ticket"]].append(r)
        return [status_row(t, topo(tasks[t["id"]]), jobs[t["id"]], now) for t in rows]

    def ticket_status(self, tid: str, now: datetime) -> dict[str, Any] | None:
        rows = self.rows("tickets", " WHERE id = ?", (tid,))
        return self.status_rows(rows, now)[0] if rows else None

    def iter_status(self, now: datetime, keys: list[Key] | None = None) -> Iterator[dict[str, Any]]:
        """readmodel.iter_status: of these keys, or of every ticket, oldest first, a chunk at a time."""
        if keys is not None:
            for lo in range(0, len(keys), STATUS_CHUNK):
                ids = [k[1] for k in keys[lo : lo + STATUS_CHUNK]]
                found = {r["id"]: r for r in self._in("tickets", "id", ids, "id")}
                yield from self.status_rows([found[i] for i in ids if i in found], now)
            return
        dated = " WHERE submitted_at IS NOT NULL{} ORDER BY submitted_at, id LIMIT " + str(STATUS_CHUNK)
        rows = self.rows("tickets", dated.format(""))
        while rows:
            yield from self.status_rows(rows, now)
            last = rows[-1]
            after = " AND (submitted_at > ? OR (submitted_at = ? AND id > ?))"
            at = _bind(last["submitted_at"])
            rows = self.rows("tickets", dated.format(after), (at, at, last["id"]))
        undated = " WHERE submitted_at IS NULL{} ORDER BY id LIMIT " + str(STATUS_CHUNK)
        rows = self.rows("tickets", undated.format(""))
        while rows:
            yield from self.status_rows(rows, now)
            rows = self.rows("tickets", undated.format(" AND id > ?"), (rows[-1]["id"],))

    def awaited_proposals(self) -> list[str]:
        sql = "SELECT DISTINCT awaiting FROM tickets WHERE awaiting IS NOT NULL AND state = 'running'"
        return sorted(str(r[0]) for r in self.conn.execute(sql))

    def work_waiting(self) -> bool:
        sql = "SELECT id FROM tickets WHERE state = 'running' AND awaiting IS NULL LIMIT 1"
        return self.conn.execute(sql).fetchone() is not None

    def installation_paused(self) -> str | None:
        """cli.tickets.installation_paused: why the installation is paused, or None."""
        last = self.conn.execute(
            "SELECT type, data FROM events WHERE stream = 'system' "
            "AND type IN ('InstallationPaused', 'InstallationResumed') ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if last is None or last[0] != "InstallationPaused":
            return None
        data = json.loads(last[1]) if isinstance(last[1], str) else dict(last[1] or {})
        return str(data.get("reason") or "paused")


def migrated(path: str) -> bool:
    """Whether the database has an alembic revision (migrations.current is not None), read-only."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return False
    try:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        conn.close()
