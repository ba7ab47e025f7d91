"""The append transaction's SQL, compiled once per dialect and run on the DBAPI cursor.

Going through SQLAlchemy Core cost more than the SQL itself on the append path: building each
statement, its cache key and its result object was about two thirds of a single-event append's CPU
time (docs/BENCHMARKS.md, "where the time goes"). The statements here are plain text built once per
dialect from the same `SQLModel` tables, and values still pass through SQLAlchemy's own type
processors for that dialect (DateTime as SQLite text, JSON encoding, booleans), so a row written
here reads back exactly as one written through SQLAlchemy, and the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from pydantic_core import PydanticSerializationError, to_json

from schema.tables import SQLModel

Processor = Callable[[Any], Any] | None


class TableSql:
    """One table's statements by primary key, with the dialect's bind and result processors."""

    def __init__(self, table: sa.Table, dialect: sa.Dialect) -> None:
        self.table = table
        self.dialect = dialect
        self.ph = "?" if dialect.paramstyle == "qmark" else "%s"
        self.columns = [c.name for c in table.columns]
        self.pk = [c.name for c in table.primary_key.columns]
        self.rest = [c for c in self.columns if c not in self.pk]
        self.impls = {c.name: c.type.dialect_impl(dialect) for c in table.columns}
        self.bind: dict[str, Processor] = {n: t.bind_processor(dialect) for n, t in self.impls.items()}
        self.result: list[tuple[str, Processor]] | None = None  # known from the first SELECT's description
        self.where = where = " AND ".join(f"{c} = {self.ph}" for c in self.pk)
        self.select = f"SELECT {', '.join(self.columns)} FROM {table.name} WHERE {where}"
        self.delete = f"DELETE FROM {table.name} WHERE {where}"
        self._inserts: dict[tuple[str, ...], str] = {}
        self._updates: dict[tuple[str, ...], str] = {}

    def insert(self, names: tuple[str, ...]) -> str:
        """INSERT naming these columns: the others get their server default, as SQLAlchemy does."""
        sql = self._inserts.get(names)
        if sql is None:
            unknown = [n for n in names if n not in self.bind]
            if unknown:
                raise KeyError(f"{self.table.name} has no column {unknown[0]!r}")
            sql = f"INSERT INTO {self.table.name} ({', '.join(names)}) VALUES ({', '.join([self.ph] * len(names))})"
            self._inserts[names] = sql
        return sql

    def update_of(self, names: tuple[str, ...]) -> str:
        """UPDATE of these columns only, by primary key (the others keep their stored values)."""
        sql = self._updates.get(names)
        if sql is None:
            unknown = [n for n in names if n not in self.rest]
            if unknown or not names:
                raise KeyError(f"{self.table.name}: cannot update {unknown[0] if unknown else 'no column'!r}")
            sets = ", ".join(f"{c} = {self.ph}" for c in names)
            sql = self._updates[names] = f"UPDATE {self.table.name} SET {sets} WHERE {self.where}"
        return sql

    def encode(self, names: Sequence[str], row: Mapping[str, Any]) -> tuple[Any, ...]:
        bind = self.bind
        out = []
        for n in names:
            value, proc = row[n], bind[n]
            out.append(proc(value) if proc is not None else value)  # None too: JSON binds it as 'null'
        return tuple(out)

    def decode(self, found: Sequence[Any], description: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """A row of `select` as a dict; `description` is the cursor's (the driver's column types,
        which some result processors depend on, as in SQLAlchemy)."""
        result = self.result
        if result is None:
            result = self.result = [
                (n, self.impls[n].result_processor(self.dialect, d[1]))
                for n, d in zip(self.columns, description, strict=True)
            ]
        return {n: (proc(v) if proc is not None else v) for (n, proc), v in zip(result, found, strict=True)}


class StoreSql:
    """Every table's `TableSql` for one dialect, built on first use, plus the event log's own statements."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self.is_sqlite = dialect.name == "sqlite"
        self._tables: dict[str, TableSql] = {}
        ph = "?" if dialect.paramstyle == "qmark" else "%s"
        # SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL locks the head row.
        lock = "" if self.is_sqlite else " FOR UPDATE"
        self.head = f"SELECT seq, hash FROM event_head WHERE id = 1{lock}"
        self.head_insert = f"INSERT INTO event_head (id, seq, hash) VALUES (1, {ph}, {ph})"
        self.head_update = f"UPDATE event_head SET seq = {ph}, hash = {ph} WHERE id = 1"
        self.version = f"SELECT max(version) FROM events WHERE stream = {ph}"
        self.task_keys = f"SELECT ticket, task FROM tasks WHERE ticket = {ph}"

    def table(self, name: str) -> TableSql:
        found = self._tables.get(name)
        if found is None:
            found = self._tables[name] = TableSql(SQLModel.metadata.tables[name], self.dialect)
        return found

    @cached_property
    def events(self) -> TableSql:
        return self.table("events")

    @cached_property
    def event_insert(self) -> str:
        names = ("seq", "stream", "version", "type", "data", "meta", "recorded_at", "hash")
        return self.events.insert(names)

    @cached_property
    def event_binds(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any], Callable[[Any], Any]]:
        """How `data`, `meta` and `recorded_at` are bound on this dialect (identity where it binds as is).

        On SQLite an event's `data` is stored as `json_text` writes it and `meta` (encoded once per
        decision) as compact `json.dumps`; on PostgreSQL both through the dialect's own JSON binding."""

        def bind(name: str) -> Callable[[Any], Any]:
            if self.is_sqlite and name == "data":
                return json_text
            if self.is_sqlite and name == "meta":
                return _compact_json
            proc = self.events.bind[name]
            return proc if proc is not None else _same

        return bind("data"), bind("meta"), bind("recorded_at")


def _same(value: Any) -> Any:
    return value


_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def json_text(value: Any) -> str:
    """JSON text of an event's body as `event_to_data` gives it (JSON types, string keys): compact, UTF-8
    as is, NaN and Infinity as Python's `json` writes them, every float in a form that reads back as
    the same float. pydantic-core encodes it in a fifth of the time `json.dumps` takes, and the text
    is shorter (no spaces, no escaped non-ASCII), so a batched append writes fewer bytes.

    `json.loads` of the text gives back exactly what `json.loads(json.dumps(value))` gives: the chain
    hash covers the decoded value (`schema.store.chain_hash`), so `verify` reads old and new rows alike.
    Values pydantic-core cannot write (a lone surrogate in a string) fall back to `json.dumps`."""
    try:
        return to_json(value).decode()
    except (PydanticSerializationError, UnicodeDecodeError):
        return json.dumps(value)
