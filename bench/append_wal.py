#!/usr/bin/env python
"""What an append costs apart from the fsync: WAL bytes and pages per event, which B-trees those
pages belong to, and CPU time per event with `synchronous=OFF`; Jetbox, eventsourcing (when
installed) and raw sqlite3, as bench/peers.py runs them.

    .venv-bench/bin/python bench/append_wal.py            # the figures in docs/BENCHMARKS.md
    .venv-bench/bin/python bench/append_wal.py --profile  # also cProfile Jetbox's batched appends

The wall-clock rows of bench/peers.py depend on a slow, shared disk; these do not: WAL bytes are
counted with the automatic checkpoint off (the WAL only grows), and CPU time is the process's user +
system time around each side's appends (the sides take turns, so load hits each alike).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import resource
import shutil
import sqlite3
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers import BATCH, EventsourcingWriter, _es_attempt, _installed  # noqa: E402
from store import RawWriter, StoreWriter  # noqa: E402

PAGE = 4096
FRAME = 24 + PAGE  # a WAL frame: its header and one page


def _es_connection_pragmas(*pragmas: str) -> None:
    """Run these pragmas on every new eventsourcing SQLite connection (before its writer opens one)."""
    from eventsourcing import sqlite as es_sqlite

    create = es_sqlite.SQLiteConnectionPool._create_connection
    base = getattr(create, "_jetbox_base", create)

    def _with(pool: Any) -> Any:
        conn = base(pool)
        for pragma in pragmas:
            conn._sqlite_conn.execute(f"PRAGMA {pragma}")
        return conn

    _with._jetbox_base = base  # type: ignore[attr-defined]
    _with._jetbox_full = True  # type: ignore[attr-defined]  # bench/peers.py: patched already
    es_sqlite.SQLiteConnectionPool._create_connection = _with  # type: ignore[method-assign]


def _writers(workdir: Path, pragmas: tuple[str, ...]) -> dict[str, Any]:
    jetbox, raw = StoreWriter(workdir / "jetbox.db"), RawWriter(workdir / "raw.db")
    assert jetbox.store._writer is not None
    for pragma in pragmas:
        jetbox.store._writer.execute(f"PRAGMA {pragma}")
        raw.conn.execute(f"PRAGMA {pragma}")
    writers: dict[str, Any] = {"jetbox": jetbox, "raw sqlite3": raw}
    if _installed("eventsourcing"):
        from eventsourcing.application import Application

        _es_connection_pragmas(*pragmas)
        # EventsourcingWriter's own set-up, without its check that synchronous is FULL.
        es = EventsourcingWriter.__new__(EventsourcingWriter)
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(workdir / "eventsourcing.db")}
        es.app = Application(env=env)
        es.agg = _es_attempt()("TICKET-1", "shapes")
        es.app.save(es.agg)
        es.report = 1
        writers["eventsourcing"] = es
    return writers


def _db(name: str) -> str:
    return {"jetbox": "jetbox.db", "raw sqlite3": "raw.db", "eventsourcing": "eventsourcing.db"}[name]


def wal_bytes(workdir: Path, batches: int, singles: int) -> None:
    writers = _writers(workdir, ("synchronous=OFF", "wal_autocheckpoint=0"))
    print(f"WAL per event (automatic checkpoint off; {batches} batches of {BATCH}, {singles} single appends):")
    for name, w in writers.items():
        wal = workdir / (_db(name) + "-wal")
        w.batch(2, BATCH)
        w.single(3)
        s0 = wal.stat().st_size
        w.batch(batches, BATCH)
        s1 = wal.stat().st_size
        w.single(singles)
        s2 = wal.stat().st_size
        per_b, per_s = (s1 - s0) / (batches * BATCH), (s2 - s1) / singles
        print(
            f"  {name:14s} batched {per_b:6.0f} B/event ({(s1 - s0) / batches / FRAME:4.1f} pages/commit)"
            f"   single {per_s:6.0f} B/event ({per_s / FRAME:3.1f} pages/commit)"
        )
    for w in writers.values():
        w.close()


def wal_pages(workdir: Path, commits: int, size: int) -> None:
    """Jetbox's WAL frames of `commits` appends of `size` events, by the B-tree each page belongs to."""
    w = StoreWriter(workdir / "pages.db")
    conn = w.store._writer
    assert conn is not None
    conn.execute("PRAGMA synchronous=OFF")
    w.batch(60, BATCH)  # a log some pages deep
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    w.batch(commits, size) if size > 1 else w.single(commits)
    wal = (workdir / "pages.db-wal").read_bytes()
    pages = collections.Counter(struct.unpack(">I", wal[off : off + 4])[0] for off in range(32, len(wal) - 23, FRAME))
    ro = sqlite3.connect(workdir / "pages.db")
    owner = {pg: (name, kind) for name, pg, kind in ro.execute("SELECT name, pageno, pagetype FROM dbstat")}
    ro.close()
    by: collections.Counter[tuple[str, str]] = collections.Counter()
    for pg, n in pages.items():
        by[owner.get(pg, ("?", "?"))] += n
    print(f"Jetbox, pages per commit of {size} event(s), by B-tree: {sum(pages.values()) / commits:.1f} in all")
    for (name, kind), n in by.most_common():
        print(f"  {name} ({kind}): {n / commits:.1f}")
    w.close()


def cpu(workdir: Path, batches: int, singles: int, rounds: int) -> None:
    writers = _writers(workdir, ("synchronous=OFF",))
    for w in writers.values():
        w.single(3)
        w.batch(2, BATCH)
    spent = {name: [0.0, 0.0, 0.0, 0.0] for name in writers}
    for _ in range(rounds):
        for name, w in writers.items():
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            w.batch(batches, BATCH)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            w.single(singles)
            u2 = resource.getrusage(resource.RUSAGE_SELF)
            spent[name][0] += u1.ru_utime - u0.ru_utime
            spent[name][1] += u1.ru_stime - u0.ru_stime
            spent[name][2] += u2.ru_utime - u1.ru_utime
            spent[name][3] += u2.ru_stime - u1.ru_stime
    nb, ns = batches * BATCH * rounds, singles * rounds
    print(f"CPU per event, synchronous=OFF ({rounds} rounds, sides taking turns):")
    for name, (bu, bs, su, ss) in spent.items():
        print(
            f"  {name:14s} batched user {1e6 * bu / nb:5.1f} + sys {1e6 * bs / nb:4.1f} us"
            f"   single user {1e6 * su / ns:5.1f} + sys {1e6 * ss / ns:4.1f} us"
        )
    if "jetbox" in writers:
        assert writers["jetbox"].store.verify()[1] is None
    for w in writers.values():
        w.close()


def profile(workdir: Path, batches: int) -> None:
    w = StoreWriter(workdir / "profile.db")
    assert w.store._writer is not None
    w.store._writer.execute("PRAGMA synchronous=OFF")
    w.batch(2, BATCH)
    prof = cProfile.Profile()
    prof.enable()
    w.batch(batches, BATCH)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    print(out.getvalue())
    w.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=50, help=f"{BATCH}-event commits per side (default 50)")
    parser.add_argument("--single", type=int, default=500, help="single-event commits per side (default 500)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU rounds (default 5)")
    parser.add_argument("--profile", action="store_true", help="also cProfile Jetbox's batched appends")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"bench/append_wal.py: sqlite {sqlite3.sqlite_version}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for step in (
        lambda d: wal_bytes(d, args.batches, args.single),
        lambda d: wal_pages(d, 10, BATCH),
        lambda d: wal_pages(d, 100, 1),
        lambda d: cpu(d, max(1, args.batches // args.rounds), max(1, args.single // args.rounds), args.rounds),
        *([lambda d: profile(d, args.batches)] if args.profile else []),
    ):
        workdir = Path(tempfile.mkdtemp(prefix="jetbox-append-wal-"))
        try:
            step(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
