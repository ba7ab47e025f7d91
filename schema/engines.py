"""SQLAlchemy engines on the event store's database, per dialect (SQLite pragmas, read-only engines).

Kept apart from `schema.store` so a reader (`jbctl status`, `migrations.current`) opens the database
without importing the event classes and projections that only writers need.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from schema.netfs import refuse_network_sqlite


def sqlite_path(url: str) -> Path | None:
    """The database file a sqlite:/// URL names (None for an in-memory database)."""
    path = url.split("///", 1)[1] if "///" in url else ""
    path = path.split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _engine(url: str, synchronous: str = "FULL", readonly: bool = False) -> sa.Engine:
    if url.startswith("sqlite"):
        db_file = sqlite_path(url)
        if db_file is not None:
            refuse_network_sqlite(db_file)
        if readonly:
            path = url.split("///", 1)[1]
            engine = sa.create_engine("sqlite://", creator=lambda: _sqlite_ro(path), poolclass=sa.pool.NullPool)
        else:
            # A pooled connection keeps the WAL open between commits; closing the last connection
            # would checkpoint and delete it every time (about 11 ms per append here).
            engine = sa.create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                poolclass=sa.pool.QueuePool,
                pool_size=2,
                max_overflow=8,
            )

        @sa_event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
            sqlite_pragmas(dbapi_conn, synchronous, readonly)

        @sa_event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql") and "+" not in url.split("://", 1)[0]:
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    options = {"postgresql_readonly": True} if readonly else {}
    engine = sa.create_engine(url, pool_pre_ping=True)
    if options:
        engine = engine.execution_options(**options)
    return engine


def sqlite_pragmas(dbapi_conn: sqlite3.Connection, synchronous: str, readonly: bool = False) -> None:
    """Every SQLite connection's settings: WAL, the durability level, a 30 s busy wait, foreign keys."""
    # Let the caller issue BEGIN itself (pysqlite would defer it).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    if not readonly:
        cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def sqlite_file(engine: sa.Engine) -> str | None:
    """The database file of a writable SQLite engine on a plain file path, else None."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.query or url.database in (None, "", ":memory:"):
        return None
    return url.database


def sqlite_writer(path: str, synchronous: str) -> sqlite3.Connection:
    """A plain sqlite3 connection with the engine's settings, for the store's append transactions."""
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    sqlite_pragmas(conn, synchronous)
    return conn


def _sqlite_ro(path: str) -> Any:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)


def open_readonly(url: str) -> sa.Engine:
    """An engine whose connections refuse writes (SQLite mode=ro; PostgreSQL read-only transactions)."""
    return _engine(url, readonly=True)
