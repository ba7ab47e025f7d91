"""The event store: an append-only, hash-chained log with projections updated in the same transaction.

SQLite (WAL, `BEGIN IMMEDIATE`) is the embedded default; PostgreSQL runs through the same code. The
dialects differ in three places: `_engine` (connection set-up and read-only engines), `_lock_head`
(`SELECT ... FOR UPDATE` on PostgreSQL, where SQLite's `BEGIN IMMEDIATE` already serialises writers)
and `wal_keeper` (SQLite only).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from schema import events as ev
from schema.engines import _engine as _engine
from schema.engines import _sqlite_ro as _sqlite_ro
from schema.engines import open_readonly as open_readonly
from schema.engines import sqlite_file, sqlite_writer
from schema.projections import MemoryRows, SqlRows, project
from schema.rawsql import StoreSql
from schema.tables import PROJECTION_TABLES, TYPE_INDEXED, SQLModel, type_indexed

GENESIS = "0" * 64
_events = SQLModel.metadata.tables["events"]
_head = SQLModel.metadata.tables["event_head"]
_checkpoints = SQLModel.metadata.tables["checkpoints"]


class ConcurrencyError(Exception):
    """Another writer appended to a stream first: reload and decide again."""


class StoreError(Exception):
    """The database is unusable (missing, not migrated, locked for too long)."""


@dataclass(frozen=True)
class Recorded:
    """An event as stored: its place in the log, its body, and its chained hash."""

    seq: int
    stream: str
    version: int
    type: str
    data: dict[str, Any]
    meta: dict[str, Any]
    recorded_at: datetime
    hash: str

    @property
    def event(self) -> ev.Event:
        try:
            return ev.event_from(self.type, self.data)
        except ValueError as exc:  # includes pydantic's ValidationError
            first = str(exc).splitlines()[:3]
            raise StoreError(f"seq {self.seq}: stored {self.type} event is unreadable: {' '.join(first)}") from None

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "data": self.data,
            "meta": self.meta,
            "recorded_at": _iso(self.recorded_at),
            "hash": self.hash,
        }


def _iso(ts: datetime) -> str:
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds")


def chain_hash(prev: str, seq: int, stream: str, version: int, type_: str, data: Any, meta: Any, at: datetime) -> str:
    """sha256 over the previous hash and this row's canonical JSON."""
    body = json.dumps(
        [seq, stream, version, type_, data, meta, _iso(at)], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256((prev + body).encode()).hexdigest()


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
# `_canonical`'s C encoder built once: `JSONEncoder.encode` builds one per call, with a dict to catch
# circular references, which JSON made of an event's body (`event_to_data`) cannot have (one would
# end in RecursionError). Half the time, the same text (a property test checks).
_encode_c = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, json.JSONEncoder().default, encode_basestring, None, ":", ",", True, False, True)
)


def _canonical_fast(value: Any) -> str:
    return "".join(_encode_c(value, 0)) if _encode_c is not None else _canonical(value)


def _chain_hash_tail(prev: str, seq: int, stream: str, version: int, type_: str, data: Any, tail: str) -> str:
    """`chain_hash` with the row's last two items already encoded: `tail` is `,<meta>,<at>]` in
    canonical JSON, the same for every event of a decision, so the append path encodes it once.
    A JSON list is its items' encodings joined by commas, so the text hashed is the same."""
    body = _canonical_fast([seq, stream, version, type_, data])[:-1] + tail
    return hashlib.sha256((prev + body).encode()).hexdigest()


def _hash_tail(meta: Any, at: datetime) -> str:
    return f",{_canonical(meta)},{_canonical(_iso(at))}]"


_INHERITED: list[sqlite3.Connection] = []  # writer connections a forked child inherited (see _transaction)

Progress = Callable[[int], None]  # told the seq reached, every PROGRESS_EVERY events
PROGRESS_EVERY = 5000


class EventStore:
    """Append, read and verify events; keep the projections in step."""

    def __init__(self, url: str, synchronous: str = "FULL") -> None:
        self.url = url
        self.synchronous = synchronous
        self.engine = _engine(url, synchronous)
        self.is_sqlite = url.startswith("sqlite")
        # SQLite: appends go through one plain sqlite3 connection of their own (opened on first use,
        # per process, one transaction at a time): SQLAlchemy's pool check-out, begin hook and
        # reset cost more than the durable commit's CPU time. Same pragmas, same BEGIN IMMEDIATE.
        self._sqlite_path = sqlite_file(self.engine)
        self._writer: sqlite3.Connection | None = None
        self._writer_pid = 0
        self._writer_lock = threading.Lock()
        # The stream versions this store's last appends left (head seq, stream -> version): while the
        # log's head is still that seq, nobody appended since, and they are the database's; two
        # `max(version)` queries per commit saved (a report's ticket stream and the core's).
        self._versions: tuple[int, dict[str, int]] = (-1, {})
        self._versions_lock = threading.Lock()

    def close(self) -> None:
        with self._writer_lock:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            self._writer = None
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A DBAPI cursor in a write transaction, committed when the block ends (rolled back on error).

        Driver errors come out as SQLAlchemy's (`sqlalchemy.exc.OperationalError` for a locked or
        failing database), as they did when the statements went through SQLAlchemy: the daemon
        retries on those and treats anything else as a bad command."""
        dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        if self._sqlite_path is None:
            with self.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite (schema.engines)
                dbapi_cur = conn.connection.cursor()
                try:
                    yield dbapi_cur
                except dbapi_error as exc:
                    raise self._sa_error(exc) from exc
                finally:
                    dbapi_cur.close()
            return
        with self._writer_lock:
            try:
                if self._writer is None or self._writer_pid != os.getpid():
                    if self._writer is not None:
                        # Inherited through fork: never used nor closed here (closing it in the
                        # child could touch the parent's WAL); the child opens its own.
                        _INHERITED.append(self._writer)
                    self._writer, self._writer_pid = sqlite_writer(self._sqlite_path, self.synchronous), os.getpid()
                writer = self._writer
                cur = writer.cursor()
                try:
                    cur.execute("BEGIN IMMEDIATE")  # take the write lock up front: writers never deadlock
                    try:
                        yield cur
                        writer.commit()  # synchronous=FULL: the WAL is on disk when this returns
                    except BaseException:
                        if writer.in_transaction:
                            writer.rollback()
                        raise
                finally:
                    cur.close()
            except sqlite3.Error as exc:
                raise self._sa_error(exc) from exc

    def _sa_error(self, exc: Exception) -> sa.exc.StatementError:
        dialect = self.engine.dialect
        return sa.exc.DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect)

    # --- writing -------------------------------------------------------------------------------

    def append(
        self,
        events: Sequence[ev.Event],
        expected: Mapping[str, int] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> list[Recorded]:
        """Append events atomically. `expected` maps stream -> the version the writer last saw."""
        return self.append_batches([(events, expected, meta)])

    def append_batches(
        self,
        batches: Sequence[tuple[Sequence[ev.Event], Mapping[str, int] | None, Mapping[str, Any] | None]],
    ) -> list[Recorded]:
        """Group commit: several decisions in one transaction (all or nothing)."""
        out: list[Recorded] = []
        if not any(events for events, _, _ in batches):
            return out
        now = datetime.now(UTC).replace(tzinfo=None)
        sql = self._sql
        # Statements compiled once per dialect on the DBAPI cursor (schema.rawsql): building them
        # through SQLAlchemy Core for each row cost more than the SQL itself.
        # The values every row of a decision shares (its meta, the commit's time) are encoded once.
        bind_data, bind_meta, bind_at = sql.event_binds
        stored_at = bind_at(now)
        values: list[tuple[Any, ...]] = []
        encoded: dict[int, tuple[str, Any]] = {}
        with self._transaction() as cur:
            seq, prev = self._lock_head(cur)
            began = seq
            known_at, known = self._versions
            versions: dict[str, int] = {}
            if known_at != seq:  # another writer appended since (or none known): ask the database
                known = {}
            rows = SqlRows(cur, sql)
            for events, expected, meta in batches:
                for stream, want in (expected or {}).items():
                    if stream in versions:
                        have = versions[stream]
                    else:
                        have = known[stream] if stream in known else self._version(cur, stream)
                        versions[stream] = have
                    if have != want:
                        raise ConcurrencyError(f"stream {stream!r} is at version {have}, expected {want}")
                if not events:
                    continue
                # A group commit passes the same meta with every decision: encode it once. The
                # batches hold their metas for the whole call, so an id is not reused meanwhile.
                if id(meta) not in encoded:
                    encoded[id(meta)] = (_hash_tail(dict(meta or {}), now), bind_meta(dict(meta or {})))
                tail, stored_meta = encoded[id(meta)]
                for event in events:
                    stream = ev.stream_of(event)
                    if stream in versions:
                        version = versions[stream] + 1
                    else:
                        version = (known[stream] if stream in known else self._version(cur, stream)) + 1
                    versions[stream] = version
                    seq += 1
                    type_ = event.type
                    data = ev.event_to_data(event)
                    digest = _chain_hash_tail(prev, seq, stream, version, type_, data, tail)
                    out.append(Recorded(seq, stream, version, type_, data, dict(meta or {}), now, digest))
                    values.append((seq, stream, version, type_, bind_data(data), stored_meta, stored_at, digest))
                    prev = digest
                    project(rows, seq, event)
            cur.executemany(sql.event_insert, values)
            rows.flush()
            cur.execute(sql.head_update, (seq, prev))
        self._remember_versions(began, seq, versions)
        return out

    def _remember_versions(self, began: int, head: int, versions: dict[str, int]) -> None:
        """After a commit that moved the head from `began` to `head`: the versions it read or wrote are
        the database's at `head` (added to what was known at `began`, or alone when another writer's
        commit came between)."""
        with self._versions_lock:
            known_at, known = self._versions
            if known_at > head:  # a later commit of another thread got here first
                return
            if known_at != began or len(known) > 100_000:  # a stream per ticket: forget them now and then
                known = {}
            known.update(versions)
            self._versions = (head, known)

    @cached_property
    def _sql(self) -> StoreSql:
        return StoreSql(self.engine.dialect)

    def _lock_head(self, cur: Any) -> tuple[int, str]:
        cur.execute(self._sql.head)
        row = cur.fetchone()
        if row is None:
            cur.execute(self._sql.head_insert, (0, GENESIS))
            return 0, GENESIS
        return int(row[0]), str(row[1])

    def _version(self, cur: Any, stream: str) -> int:
        cur.execute(self._sql.version, (stream,))
        found = cur.fetchone()
        return int(found[0] or 0) if found is not None else 0

    # --- reading -------------------------------------------------------------------------------

    def read(
        self,
        since: int = 0,
        *,
        stream: str | None = None,
        types: Sequence[str] | None = None,
        limit: int | None = None,
        page: int = 5000,
    ) -> Iterator[Recorded]:
        """Events with seq > since, in order, fetched a page at a time."""
        last, left = since, limit
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            query = sa.select(_events).where(_events.c.seq > last).order_by(_events.c.seq).limit(n)
            if stream is not None:
                query = query.where(_events.c.stream == stream)
            if types:
                query = query.where(_events.c.type.in_(list(types)))
                if type_indexed(types):
                    query = query.where(sa.text(TYPE_INDEXED))  # the partial index's own term
            with self.engine.connect() as conn:
                batch = conn.execute(query).all()
            for row in batch:
                yield _recorded(row)
            if len(batch) < n:
                return
            last = batch[-1].seq
            if left is not None:
                left -= len(batch)

    def read_events(
        self, since: int = 0, *, stream: str | None = None, until: int | None = None
    ) -> Iterator[tuple[int, ev.Event]]:
        """(seq, event) after `since` (up to `until`, of one `stream`, when given), decoded straight
        from the stored JSON text: the replay path.

        One streaming cursor, no SQLAlchemy JSON processing and no `meta`: several times faster than
        `read` for the million-event replays the daemon does at start-up.
        """
        return decode_events(self.engine, since, stream=stream, until=until)

    def read_rows(self, since: int = 0, *, until: int | None = None) -> Iterator[list[tuple[int, str, Any]]]:
        """The stored (seq, type, data) rows after `since` (up to `until`), in seq order and in
        batches, not decoded: `data` is the JSON text on SQLite (a dict on PostgreSQL). The start-up
        replay decodes what it needs of them itself (`daemon.replay`); `decode_row` decodes one."""
        sql, params = _events_sql(since, None, until)
        if self.engine.dialect.name == "sqlite":
            return _raw_batches_of(self.engine, sql, params)
        return _batches_of(self.engine, sql, params)

    def field_rows(self, types: Sequence[str], *names: str) -> Iterator[tuple[Any, ...]]:
        """(seq, type, each named top-level field as text) of every event of `types`, in order,
        without decoding their bodies (a `TicketSubmitted` carries its whole ticket)."""
        data = _events.c.data
        columns = [data[name].as_string() for name in names]
        query = sa.select(_events.c.seq, _events.c.type, *columns).where(_events.c.type.in_(list(types)))
        if type_indexed(types):
            query = query.where(sa.text(TYPE_INDEXED))  # the partial index's own term
        with self.engine.connect() as conn:
            yield from conn.execute(query.order_by(_events.c.seq))  # type: ignore[misc]

    def records(self, seqs: Sequence[int]) -> Iterator[Recorded]:
        """The events at these seqs, in order."""
        ordered = sorted(seqs)
        for lo in range(0, len(ordered), 500):
            query = sa.select(_events).where(_events.c.seq.in_(ordered[lo : lo + 500])).order_by(_events.c.seq)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            yield from (_recorded(row) for row in rows)

    def head(self) -> int:
        """The last seq (0 for an empty log)."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(_head.c.seq).where(_head.c.id == 1)).scalar()
        return int(found or 0)

    def stream_version(self, stream: str) -> int:
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(sa.func.max(_events.c.version)).where(_events.c.stream == stream)).scalar()
        return int(found or 0)

    # --- reactor checkpoints -------------------------------------------------------------------

    def checkpoint(self, name: str) -> int:
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(_checkpoints.c.seq).where(_checkpoints.c.name == name)).scalar()
        return int(found or 0)

    def set_checkpoint(self, name: str, seq: int) -> None:
        now = datetime.now(UTC).replace(tzinfo=None)
        with self.engine.begin() as conn:
            updated = conn.execute(
                _checkpoints.update().where(_checkpoints.c.name == name).values(seq=seq, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(_checkpoints.insert().values(name=name, seq=seq, updated_at=now))

    # --- integrity and rebuilding ----------------------------------------------------------------

    def verify(self, progress: Progress | None = None) -> tuple[int, int | None, str]:
        """Recompute the chain: (rows checked, first bad seq or None, reason); `progress(seq)` is
        called every `PROGRESS_EVERY` rows."""
        prev, expected_seq, count = GENESIS, 1, 0
        for seq, stream, version, type_, data, meta, recorded_at, digest_stored in self._raw_rows():
            if progress is not None and seq % PROGRESS_EVERY == 0:
                progress(seq)
            if seq != expected_seq:
                return count, expected_seq, f"seq {expected_seq} is missing (next row is {seq})"
            digest = chain_hash(prev, seq, stream, version, type_, data, meta, recorded_at)
            if digest != digest_stored:
                return count, seq, "hash does not match the row's content and its predecessor"
            prev, expected_seq, count = digest_stored, expected_seq + 1, count + 1
        with self.engine.connect() as conn:
            head = conn.execute(sa.select(_head.c.seq, _head.c.hash).where(_head.c.id == 1)).first()
        if head is not None and (int(head.seq) != count or (count and head.hash != prev)):
            return count, count + 1, f"the log ends at seq {count} but its head says {head.seq}"
        return count, None, "ok"

    def _raw_rows(self) -> Iterator[tuple[int, str, int, str, Any, Any, datetime, str]]:
        """Every row in order through one streaming cursor, JSON decoded once (verify's fast path)."""
        sql = sa.text(
            "SELECT seq, stream, version, type, data, meta, recorded_at, hash FROM events ORDER BY seq"
        ).columns(sa.column("data", sa.Text), sa.column("meta", sa.Text))
        loads = json.loads
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=5000).execute(sql):
                seq, stream, version, type_, data, meta, at, digest = row
                if isinstance(at, str):
                    at = datetime.fromisoformat(at)
                yield (
                    int(seq),
                    stream,
                    int(version),
                    type_,
                    loads(data) if isinstance(data, str | bytes) else data,
                    loads(meta) if isinstance(meta, str | bytes) else meta,
                    at,
                    digest,
                )

    def rebuild_rows(self, progress: Progress | None = None) -> MemoryRows:
        """Every projection row, computed from the events alone (`progress(seq)` now and then)."""
        rows = MemoryRows()
        for seq, event in self.read_events(0):
            project(rows, seq, event)
            if progress is not None and seq % PROGRESS_EVERY == 0:
                progress(seq)
        return rows

    def replay(self, progress: Progress | None = None) -> int:
        """Replace the live projections with ones rebuilt from the log; returns events read."""
        rows = self.rebuild_rows(progress)
        with self.engine.begin() as conn:
            for name in reversed(PROJECTION_TABLES):
                conn.execute(SQLModel.metadata.tables[name].delete())
            rows.flush(conn)
        return self.head()


def decode_events(
    engine: sa.Engine, since: int = 0, *, stream: str | None = None, until: int | None = None
) -> Iterator[tuple[int, ev.Event]]:
    """`EventStore.read_events` on any engine (a read-only one too, as the console's)."""
    sql, params = _events_sql(since, stream, until)
    rows = _raw_rows_of(engine, sql, params) if engine.dialect.name == "sqlite" else _rows_of(engine, sql, params)
    decoders = event_decoders()
    try:
        for seq, type_, data in rows:
            decode = decoders.get(type_)
            if decode is not None and type(data) is str:
                try:
                    event = decode(data)
                except ValueError:
                    event = decode_row(seq, type_, data, decoders)  # raises, naming the seq
            else:
                event = decode_row(seq, type_, data, decoders)  # a dict (PostgreSQL), or an unknown type
            yield seq, event
    finally:
        rows.close()  # type: ignore[attr-defined]


Decoder = Callable[[Any], ev.Event]


def event_decoders() -> dict[str, Decoder]:
    """Each event type's decoder of its stored JSON text: the type's validator itself
    (`model_validate_json`'s wrapper was a quarter of a replay's decode)."""
    return {name: cls.__pydantic_validator__.validate_json for name, cls in ev.Event.registry.items()}


def decode_row(seq: int, type_: str, data: Any, decoders: Mapping[str, Decoder]) -> ev.Event:
    """The event stored at `seq` (its `data` as JSON text, or already a dict on PostgreSQL); a
    `StoreError` naming the seq when it is of an unknown type or does not fit its type."""
    try:
        decode = decoders[type_]
    except KeyError:
        raise StoreError(f"seq {seq}: unknown event type {type_!r}") from None
    try:
        return decode(data) if type(data) is str else ev.Event.registry[type_].model_validate(data)  # type: ignore[no-any-return]
    except ValueError as exc:
        first = " ".join(str(exc).splitlines()[:3])
        raise StoreError(f"seq {seq}: stored {type_} event is unreadable: {first}") from None


def _events_sql(since: int, stream: str | None, until: int | None) -> tuple[str, dict[str, Any]]:
    where, params = "seq > :since", dict[str, Any](since=since)
    if stream is not None:
        where, params = where + " AND stream = :stream", params | {"stream": stream}
    if until is not None:
        where, params = where + " AND seq <= :until", params | {"until": until}
    return f"SELECT seq, type, data FROM events WHERE {where} ORDER BY seq", params  # fixed text, values bound


_BATCH = 5000


def _rows_of(engine: sa.Engine, sql: str, params: dict[str, Any]) -> Iterator[tuple[int, str, Any]]:
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=_BATCH).execute(
            sa.text(sql).columns(sa.column("seq"), sa.column("type"), sa.column("data", sa.Text)),
            params,
        )
        yield from result  # type: ignore[misc]


def _batches_of(engine: sa.Engine, sql: str, params: dict[str, Any]) -> Iterator[list[tuple[int, str, Any]]]:
    rows = _rows_of(engine, sql, params)
    try:
        while batch := list(itertools.islice(rows, _BATCH)):
            yield batch
    finally:
        rows.close()  # type: ignore[attr-defined]


def _raw_rows_of(engine: sa.Engine, sql: str, params: dict[str, Any]) -> Iterator[tuple[int, str, Any]]:
    batches = _raw_batches_of(engine, sql, params)
    try:
        for batch in batches:
            yield from batch
    finally:
        batches.close()  # type: ignore[attr-defined]


def _raw_batches_of(engine: sa.Engine, sql: str, params: dict[str, Any]) -> Iterator[list[tuple[int, str, Any]]]:
    """SQLite: the driver's cursor, without SQLAlchemy's per-row work (a third of a replay's read),
    and outside a transaction: one SELECT reads one consistent snapshot by itself, and takes no
    write lock (a SQLAlchemy connection to the store begins IMMEDIATE), so writers are not held up
    by a replay and a read inside a replay (a frozen ticket thawed) does not wait for it."""
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.execute(sql, params)  # type: ignore[union-attr]
        try:
            while batch := cursor.fetchmany(_BATCH):
                yield batch
        finally:
            cursor.close()
    finally:
        raw.close()


def _recorded(row: Any) -> Recorded:
    data = row.data if isinstance(row.data, dict) else json.loads(row.data)
    meta = row.meta if isinstance(row.meta, dict) else json.loads(row.meta)
    return Recorded(row.seq, row.stream, row.version, row.type, data, meta, row.recorded_at, row.hash)


def projection_snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection row, normalised for comparison (JSON canonical, times as ISO strings)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for name in PROJECTION_TABLES:
            table = SQLModel.metadata.tables[name]
            pk = list(table.primary_key.columns)
            rows = conn.execute(sa.select(table).order_by(*pk)).all()
            out[name] = [tuple(_normal(v) for v in row) for row in rows]
    return out


def _normal(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float):
        return repr(value)
    return value


def replay_differences(store: EventStore, limit: int = 20, progress: Progress | None = None) -> list[str]:
    """Rebuild the projections into a scratch database and list how they differ from the live ones."""
    rows = store.rebuild_rows(progress)
    with tempfile.TemporaryDirectory(prefix="jetbox-replay-") as tmp:
        scratch = sa.create_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        tables = [SQLModel.metadata.tables[n] for n in PROJECTION_TABLES]
        SQLModel.metadata.create_all(scratch, tables=tables)
        with scratch.begin() as conn:
            rows.flush(conn)
        fresh = projection_snapshot(scratch)
        scratch.dispose()
    live = projection_snapshot(store.engine)
    diffs: list[str] = []
    for name in PROJECTION_TABLES:
        a, b = set(live[name]), set(fresh[name])
        for row in sorted(a - b, key=repr)[:limit]:
            diffs.append(f"{name}: live row not produced by replay: {row}")
        for row in sorted(b - a, key=repr)[:limit]:
            diffs.append(f"{name}: replay produced a row missing from live: {row}")
    return diffs[:limit]


def wal_keeper(url: str) -> sqlite3.Connection | None:
    """An idle read connection held for the daemon's life (SQLite only).

    The store opens a connection per transaction; when the last connection to a WAL database
    closes, SQLite checkpoints the WAL into the database (more fsyncs). Holding one open keeps
    every commit's close cheap: it halves intake latency (bench/intake.py). Checkpoints still run
    automatically as the WAL grows.
    """
    if not url.startswith("sqlite:///"):
        return None
    try:
        conn = sqlite3.connect(f"file:{url.split('///', 1)[1]}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM events LIMIT 1").fetchall()
    except sqlite3.Error:
        return None  # not created yet: the daemon migrates first, and runs without a keeper
    return conn
