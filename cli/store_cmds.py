"""jbctl events | sql | replay | verify | migrate: the event log as users see it."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.common import Progress, colour, open_store, print_json, print_table, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="the event log, filtered; --follow streams new events")
    p.add_argument("--ticket", help="only this ticket's stream")
    p.add_argument("--stream", help="any stream (intake, core, system, or a ticket id)")
    p.add_argument("--type", action="append", dest="types", help="only this event type (repeatable)")
    p.add_argument("--since", type=int, default=0, help="only events after this seq")
    p.add_argument("--limit", type=int)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events (Ctrl-C stops)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("sql", help="run a read-only SQL query over the events and projections")
    p.add_argument("query")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("replay", help="rebuild every projection from the events alone")
    p.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a scratch copy, fold the state both ways (start-up, every event); exit 1 on a difference",
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("verify", help="recompute the hash chain; exit 1 naming the first bad seq")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("backup", help="copy the SQLite event log to FILE while the daemon runs (consistent)")
    p.add_argument("dest", type=Path, help="the copy to write (refused if it exists)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    p.set_defaults(func=cmd_migrate)


def _summary(data: dict[str, Any]) -> str:
    keys = ("task", "attempt", "worker", "step", "reason", "error", "proposal", "what", "milestone", "path")
    parts = []
    for k in keys:
        if data.get(k) not in (None, ""):
            value = str(data[k]).strip().splitlines()[-1] if k == "error" else str(data[k])
            parts.append(f"{k}={value[:80]}")
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and metrics:
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        nested = [k for k, v in metrics.items() if isinstance(v, dict)]
        if flat:
            parts.append("metrics=" + ",".join(f"{k}:{v:.4g}" for k, v in list(flat.items())[:4]))
        if nested:
            parts.append("metrics=" + ",".join(nested))
    if data.get("errors"):
        parts.append(f"errors={len(data['errors'])}: {data['errors'][0][:100]}")
    return " ".join(parts)


def cmd_events(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be a positive number")
    if args.since < 0:
        raise CliError("--since must be 0 or a positive seq")
    store = open_store(settings_from(args))
    stream = args.ticket or args.stream
    last = args.since
    shown = 0
    while True:
        for rec in store.read(last, stream=stream, types=args.types, limit=args.limit):
            last = rec.seq
            shown += 1
            if args.json:
                print(json.dumps(rec.as_json(), default=str), flush=args.follow)
            else:
                at = rec.recorded_at.strftime("%Y-%m-%d %H:%M:%S")
                print(
                    f"{rec.seq:>7} {at} {rec.stream:<14} {colour(rec.type, '1'):<22} {_summary(rec.data)}",
                    flush=args.follow,
                )
            if args.limit is not None and shown >= args.limit:
                return 0
        if not args.follow:
            return 0
        try:
            time.sleep(0.3)
        except KeyboardInterrupt:
            return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from schema.readmodel import ReadOnlyQueryError, readonly_query

    settings = settings_from(args)
    open_store(settings).close()  # a clear error when there is no database
    try:
        headers, rows, _ = readonly_query(settings.db_url, args.query)
    except ReadOnlyQueryError as exc:
        message = str(exc)
        raise CliError(message if message.startswith("SQL error") else f"jbctl sql is {message}") from None
    if args.json:
        print_json([dict(zip(headers, r, strict=True)) for r in rows])
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(headers)
        writer.writerows(rows)
    else:
        print_table(headers, rows)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from schema.store import replay_differences

    store = open_store(settings_from(args))
    started = time.perf_counter()
    progress = Progress("replay", store.head())
    if args.check:
        from daemon.handler import load_state
        from daemon.replay import differences

        diffs = replay_differences(store, progress=progress)
        progress.end()
        # The daemon's start-up fold skips the progress reports a later one supersedes (daemon/replay.py):
        # it must give the state the full fold of every event gives.
        diffs += differences(load_state(store), load_state(store, full=True))
        if diffs:
            for d in diffs:
                print(d, file=sys.stderr)
            print(f"replay --check: projections or state differ from the log ({len(diffs)} shown)", file=sys.stderr)
            return 1
        print(
            f"replay --check: projections and the start-up state match the log ({store.head()} events, "
            f"{time.perf_counter() - started:.2f}s)"
        )
        return 0
    n = store.replay(progress)
    progress.end()
    print(f"replayed {n} events into the projections in {time.perf_counter() - started:.2f}s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(settings_from(args))
    progress = Progress("verify", store.head())
    count, bad, reason = store.verify(progress)
    progress.end()
    if args.json:
        print_json({"checked": count, "first_bad_seq": bad, "reason": reason, "ok": bad is None})
    elif bad is None:
        print(f"verify: hash chain intact ({count} events)")
    else:
        print(f"verify: chain broken at seq {bad}: {reason} ({count} events verified before it)", file=sys.stderr)
    return 0 if bad is None else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from schema import migrations

    settings = settings_from(args)
    before = migrations.current(settings.db_url)
    migrations.upgrade(settings.db_url)
    after = migrations.current(settings.db_url)
    if before == after:
        print(f"database already at revision {after}")
    else:
        print(f"migrated database from {before or 'empty'} to {after}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """SQLite's online backup: a consistent snapshot even while the daemon commits, then verified."""
    import sqlite3

    settings = settings_from(args)
    url = settings.db_url
    if not url.startswith("sqlite:///"):
        raise CliError("jbctl backup copies the SQLite event log; for PostgreSQL use pg_dump (docs/OPERATIONS.md)")
    source = Path(url.split("///", 1)[1])
    if not source.exists():
        raise CliError(f"no database at {source}")
    dest: Path = args.dest
    if dest.exists():
        raise CliError(f"{dest} exists: choose a new file (a backup never overwrites)")
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        out = sqlite3.connect(tmp)
        with out:
            src.backup(out)
        out.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        out.close()
        src.close()
        tmp.replace(dest)
    except (OSError, sqlite3.Error) as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"backup to {dest} failed: {exc}") from None
    from schema.store import EventStore

    copy = EventStore(f"sqlite:///{dest.absolute()}")
    try:
        count, bad, reason = copy.verify()
    finally:
        copy.close()
    if bad is not None:
        raise CliError(f"the copy's hash chain is broken at seq {bad}: {reason}")
    print(f"backup: {count} events to {dest} (hash chain verified)")
    return 0
