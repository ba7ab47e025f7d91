"""jbctl validate | schema | submit | status | describe | cancel."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import colour, open_reader, open_store, print_json, print_table, settings_from
from cli.main import CliError

if TYPE_CHECKING:  # SQLAlchemy and readmodel are imported where used: `jbctl status` on SQLite needs neither
    import sqlalchemy as sa

STATE_COLOURS = {"running": "36", "completed": "32", "failed": "31", "cancelled": "33", "blocked": "35"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check ticket files; prints FILE:LINE:COL: message per error")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the ticket JSON Schema")
    p.add_argument("--output", "-o", type=Path, help="write to a file instead of stdout")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("submit", help="validate a ticket and copy it atomically into the tickets folder")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--hold", action="store_true", help="it arrives held (adds `hold: true`): review, then jbctl release"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="tickets at a glance, or one ticket's task tree")
    p.add_argument("ticket", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="every ticket, not only the live and recently ended")
    p.add_argument("--limit", type=int, help=f"the newest N tickets (default {DEFAULT_LIMIT}; --all: every one)")
    p.add_argument("--since", help="ended tickets since an age (90m, 36h, 7d) or date (default: a day)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("describe", help="everything about one ticket: spec, tasks, attempts, metrics, events")
    p.add_argument("ticket")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("cancel", help="cancel a running ticket (its jobs are told to stop)")
    p.add_argument("ticket")
    p.add_argument("-m", "--reason", default="cancelled by a user")
    p.set_defaults(func=cmd_cancel)


def cmd_validate(args: argparse.Namespace) -> int:
    from schema.ticket import TicketInvalid, load_ticket

    bad = 0
    for path in args.files:
        try:
            load_ticket(path)
        except TicketInvalid as exc:
            bad += 1
            for err in exc.errors:
                print(err, file=sys.stderr)
        else:
            print(f"{path}: {colour('ok', '32')}")
    return 1 if bad else 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schema.ticket import ticket_json_schema

    text = json.dumps(ticket_json_schema(), indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def load_or_report(path: Path) -> Any:
    """The validated ticket at `path`, or None after printing each error as FILE:LINE:COL: message."""
    from schema.ticket import TicketInvalid, load_ticket

    try:
        return load_ticket(path)
    except TicketInvalid as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return None


def cmd_submit(args: argparse.Namespace) -> int:
    from schema.artifacts import atomic_write_bytes

    settings = settings_from(args)
    ticket = load_or_report(args.file)
    if ticket is None:
        return 1
    dest = settings.tickets_path / f"{ticket.id}.yaml"
    data = args.file.read_bytes()
    if args.hold and not ticket.hold:
        data = with_hold(data, args.file)
    atomic_write_bytes(dest, data)
    print(f"submitted {ticket.id} -> {dest}" + (f" (held: jbctl release {ticket.id})" if args.hold else ""))
    return 0


def with_hold(data: bytes, path: Path) -> bytes:
    """The ticket's bytes with `hold: true` appended as a top-level key (the copy in the tickets folder
    is what runs; the user's file is left as it is)."""
    import re

    from schema.ticket import TicketInvalid, parse_ticket

    if re.search(rb"(?m)^hold\s*:", data):
        raise CliError(f"{path}: the ticket says `hold:` already; set it to true there, or drop --hold")
    held = data + (b"" if data.endswith(b"\n") else b"\n") + b"hold: true\n"
    try:
        parse_ticket(held, path.name)
    except TicketInvalid as exc:  # e.g. a flow-style document that cannot take another key
        raise CliError(f"{path}: cannot add `hold: true` to this ticket ({exc.errors[0]}); add it yourself") from None
    return held


def _rows(conn: sa.Connection, sql: str, **params: Any) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


DEFAULT_LIMIT = 50  # rows of the default view
DEFAULT_SINCE = timedelta(days=1)  # ended tickets the default view still shows


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: an age (`90m`, `36h`, `7d`, `2w`) or an ISO date/time (UTC when it names no zone)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip()
    if value[:-1].isdigit() and value[-1:] in units:
        return now - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"--since {text!r}: give an age such as 90m, 36h, 7d or 2w, or a date such as 2026-11-01"
        ) from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


class Readmodel:
    """readmodel's status questions over a SQLAlchemy connection (PostgreSQL; any database), with the
    method names of schema.status_sqlite.SqliteStatus, which asks them of SQLite with sqlite3."""

    def __init__(self, conn: sa.Connection) -> None:
        from schema import readmodel

        self.conn, self.rm = conn, readmodel

    def counts_by_state(self) -> dict[str, int]:
        return self.rm.counts_by_state(self.conn)

    def status_keys(self, ended_since: datetime, limit: int | None) -> tuple[list[Any], int]:
        return self.rm.status_keys(self.conn, ended_since, limit)

    def newest_keys(self, limit: int) -> list[Any]:
        return self.rm.newest_keys(self.conn, limit)

    def iter_status(self, now: datetime, keys: list[Any] | None = None) -> Iterator[dict[str, Any]]:
        return self.rm.iter_status(self.conn, now, keys)

    def ticket_status(self, tid: str, now: datetime) -> dict[str, Any] | None:
        return self.rm.ticket_status(self.conn, tid, now)

    def awaited_proposals(self) -> list[str]:
        return self.rm.awaited_proposals(self.conn)

    def work_waiting(self) -> bool:
        return self.rm.work_waiting(self.conn)

    def installation_paused(self) -> str | None:
        return installation_paused(self.conn)


def status_reader(conn: Any) -> Any:
    """A status reader for a SQLAlchemy connection (wrapped in `Readmodel`) or a `SqliteStatus`."""
    return conn if hasattr(conn, "iter_status") else Readmodel(conn)


class StatusView:
    """Which tickets `jbctl status` lists: the default (live, or ended since a time; the newest
    `limit`), or every ticket (`--all`, optionally the newest `limit`). Rows are streamed. `conn`: a
    SQLAlchemy connection or a status reader (`status_reader`)."""

    def __init__(
        self, conn: Any, now: datetime, *, everything: bool, since: datetime | None, limit: int | None
    ) -> None:
        self.reader = status_reader(conn)
        self.now, self.everything = now, everything
        self.since = since or now - DEFAULT_SINCE
        self.counts = self.reader.counts_by_state()
        self.total = sum(self.counts.values())
        if everything:
            self.keys = self.reader.newest_keys(limit) if limit is not None else None
            self.matching = self.total
        else:
            self.keys, self.matching = self.reader.status_keys(self.since, limit)
        self.shown = self.total if self.keys is None else len(self.keys)

    def rows(self, home: Path | None) -> Iterator[dict[str, Any]]:
        for row in self.reader.iter_status(self.now, self.keys):
            row["background"] = _background(home, row["ticket"])
            yield row

    def rest(self) -> str:
        """What the view leaves out and how to see it; empty when it shows every ticket."""
        if self.shown >= self.total:
            return ""
        if self.everything:
            return f"showing the newest {self.shown:,} of {self.total:,} tickets: --limit N for more"
        parts = []
        if self.matching > self.shown:
            parts.append(f"showing the newest {self.shown:,} of {self.matching:,} live or recently ended")
        if self.total > self.matching:
            parts.append(f"{self.total - self.matching:,} more ended before {self.since:%Y-%m-%d %H:%M} UTC")
        return "; ".join(parts) + ": jbctl status --all | --since 7d | --limit N"


def status_data(
    engine: sa.Engine, ticket: str | None = None, include_old: bool = True, home: Path | None = None
) -> list[dict[str, Any]]:
    """Tickets with their tasks and attempts, as plain dicts (what `status --json` prints): one ticket,
    every ticket, or the default view's (a list in memory: for tests and small homes; `jbctl status`
    streams)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.connect() as conn:
        if ticket is not None:
            row = Readmodel(conn).ticket_status(ticket, now)
            return [] if row is None else [{**row, "background": _background(home, ticket)}]
        view = StatusView(conn, now, everything=include_old, since=None, limit=None)
        return list(view.rows(home))


def _background(home: Path | None, tid: str) -> str | None:
    """How a `jbctl run` worker for this ticket was started, if one was."""
    path = home / "runs" / f"{tid}.json" if home else None
    if path is None or not path.exists():
        return None
    info = json.loads(path.read_text())
    return f"unit {info['unit']}" if info.get("mode") == "systemd" else f"pid {info.get('pid')}, log {info.get('log')}"


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit {args.limit}: give a number of tickets, 1 or more")
    if args.all and args.since:
        raise CliError("--all and --since: choose one (--all lists every ticket; --since, those ended since then)")
    now = datetime.now(UTC).replace(tzinfo=None)
    since = parse_since(args.since, now) if args.since else None
    url = settings.db_url
    if url.startswith("sqlite:///"):  # sqlite3 directly: SQLAlchemy's import costs more than the reads
        from cli.common import check_sqlite
        from schema.status_sqlite import SqliteStatus, connect

        path = check_sqlite(url)
        conn = connect(path)
        try:
            return _status(args, settings, SqliteStatus(conn), now, since)
        finally:
            conn.close()
    engine = open_reader(settings)
    try:
        with engine.connect() as sa_conn:
            return _status(args, settings, Readmodel(sa_conn), now, since)
    finally:
        engine.dispose()


def _status(args: argparse.Namespace, settings: Any, reader: Any, now: datetime, since: datetime | None) -> int:
    """`jbctl status` on a status reader (`SqliteStatus` or `Readmodel`)."""
    if args.ticket:
        row = reader.ticket_status(args.ticket, now)
        if row is None:
            raise CliError(f"no ticket {args.ticket!r} (see `jbctl status`)")
        row["background"] = _background(settings.home, args.ticket)
        if args.json:
            print_json([row])
        else:
            _print_tree(row)
        return 0
    limit = args.limit if args.limit is not None else (None if args.all else DEFAULT_LIMIT)
    view = StatusView(reader, now, everything=args.all, since=since, limit=limit)
    if args.json:
        _stream_json(view.rows(settings.home))
        if view.rest():
            print(view.rest(), file=sys.stderr)
        return 0
    if not view.total:
        print("no tickets yet: drop a ticket into the tickets folder or run `jbctl submit FILE`")
        return 0
    rows = [_table_row(d) for d in view.rows(settings.home)]
    print_table(["TICKET", "STATE", "CURRENT STEP", "PROGRESS", "AGE", "WAITING ON / REASON"], rows)
    if view.rest():
        print(view.rest())
    awaiting = reader.awaited_proposals()
    if awaiting:
        line = f"{len(awaiting)} proposal(s) await approval: {', '.join(awaiting)} (jbctl proposals)"
        print(colour(line, "33"))
    busy = reader.work_waiting()
    paused = reader.installation_paused()
    if paused:
        print(colour(f"installation paused ({paused}): nothing new is scheduled; jbctl resume", "33"))
    print(daemon_line(settings.home, work_waiting=busy))
    for line in warm_lines(settings):
        print(line)
    return 0


def warm_lines(settings: Any) -> list[str]:
    """One line per warm worker: the core version it holds (and the one it is loading), from Redis."""
    url = settings.redis_url_or_private()
    if not url:
        return []
    import redis

    from schema.wire import warm_workers

    try:
        conn = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        found = warm_workers(conn)
    except (redis.RedisError, OSError):
        return []
    lines = []
    for w in found:
        held = f"core v{w['core_version']}" if w.get("core_version") is not None else "no core yet"
        if w.get("loading") is not None:
            held += f", loading v{w['loading']} in the background"
        if w.get("error"):
            held += colour(f", could not load {w['error']}", "31")
        lines.append(f"warm worker {w['worker']} ({', '.join(w.get('queues') or [])}): {held}")
    return lines


def installation_paused(conn: sa.Connection) -> str | None:
    from schema.readmodel import installation_paused as paused

    return paused(conn)


def _table_row(d: dict[str, Any]) -> list[Any]:
    return [
        d["ticket"],
        colour(d["state"], STATE_COLOURS.get(d["state"], "0")),
        d["current_step"] or ("—" if d["state"] != "running" else ""),
        f"{d['tasks_done']}/{d['tasks_total']} tasks" + (f", {d['progress']}" if d["progress"] else ""),
        d["age"],
        d["waiting_on"] or (d["reason"] or "")[:60],
    ]


def _stream_json(rows: Iterator[dict[str, Any]]) -> None:
    """A JSON array written one element at a time (what `print_json` prints, without holding it)."""
    out = sys.stdout
    first = True
    for row in rows:
        body = json.dumps(row, indent=2, default=str).replace("\n", "\n  ")
        out.write(("[\n  " if first else ",\n  ") + body)
        first = False
    out.write("[]\n" if first else "\n]\n")


def daemon_line(home: Path, work_waiting: bool = True) -> str:
    """What the daemon last said (its STATUS= line, from run/daemon.json), or that none is running (in red
    when tickets have work that waits for it)."""
    try:
        info = json.loads((home / "run" / "daemon.json").read_text())
        pid = int(info["pid"])
        try:
            os.kill(pid, 0)
        except PermissionError:
            pass  # alive, under another account (a system unit's User=)
    except (OSError, ValueError, KeyError, TypeError):
        if not work_waiting:
            return "daemon: not running on this home"
        hint = "tickets wait (jbctl daemon, jbctl up, or systemctl start jetbox.target)"
        return colour(f"daemon: not running on this home: {hint}", "31")
    text = f"daemon: pid {pid}: {info.get('status', '')}"
    return colour(text, "31") if not info.get("dispatching", True) else text


def _print_tree(d: dict[str, Any]) -> None:
    print(f"{d['ticket']}  {colour(d['state'], STATE_COLOURS.get(d['state'], '0'))}  {d['title']}  (age {d['age']})")
    if d["reason"]:
        print(f"  reason: {d['reason']}")
    if d["waiting_on"]:
        print(f"  waiting on: {d['waiting_on']}")
    if d.get("held"):
        print(f"  held: {d['held']} (jbctl release {d['ticket']})")
    if d.get("priority"):
        print(f"  priority: {d['priority']}")
    if d.get("background"):
        print(f"  background worker: {d['background']}")
    trouble = ", ".join(f"{k} {v}" for k, v in d["trouble"].items() if v)
    print(f"  consistency: {d['consistency']:.2f}" + (f" ({trouble})" if trouble else ""))
    steps = [t for t in d["tasks"] if not t.get("parent")]
    subtasks_of: dict[str, list[dict[str, Any]]] = {}
    for t in d["tasks"]:
        if t.get("parent"):
            subtasks_of.setdefault(t["parent"], []).append(t)
    for n, task in enumerate(steps):
        last = n == len(steps) - 1
        subs = subtasks_of.get(task["task"], [])
        needs = [x for x in task["needs"] or [] if x not in {s["task"] for s in subs}]
        _print_task(task, "  ", last, needs, f"  {len(subs)} subtasks" if subs else "")
        pipe = "  " + ("    " if last else "│   ")
        if len(subs) > SUBTASKS_SHOWN:
            _print_subtask_count(subs, pipe, not task["attempts"])
        else:
            for k, sub in enumerate(subs):
                _print_task(sub, pipe, k == len(subs) - 1 and not task["attempts"], [], "")
        _print_attempts(task, pipe)


SUBTASKS_SHOWN = 4  # a step with more subtasks shows them as one count line (and the troubled ones)


def _print_task(task: dict[str, Any], indent: str, last: bool, needs: list[str], extra: str) -> None:
    branch = "└─" if last else "├─"
    progress = ""
    if task["progress_step"] is not None:
        progress = f"  {task['progress_step']}/{task['progress_total'] or '?'}"
    after = f"  needs {', '.join(needs)}" if needs else ""
    state = colour(task["state"], STATE_COLOURS.get(task["state"], "0"))
    if task.get("waiting") and task["state"] in ("pending", "waiting_retry"):
        extra += f"  waiting: {task['waiting']}"  # held, paused, after:, a limit (docs/SCHEDULING.md)
    print(f"{indent}{branch} {task['task']} [{task['kind']}/{task['queue']}] {state}{progress}{after}{extra}")
    if task.get("parent"):
        _print_attempts(task, indent + ("    " if last else "│   "))


def _print_subtask_count(subs: list[dict[str, Any]], indent: str, last: bool) -> None:
    """Many subtasks: one line of counts by state, then only those that failed or wait on a human."""
    counts: dict[str, int] = {}
    for sub in subs:
        counts[sub["state"]] = counts.get(sub["state"], 0) + 1
    done = sum(s["progress_step"] or 0 for s in subs if s["state"] != "succeeded")
    what = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    progress = f", {done} items in progress" if done else ""
    troubled = [s for s in subs if s["state"] in ("failed", "blocked", "waiting_retry")]
    print(f"{indent}{'└─' if last and not troubled else '├─'} {len(subs)} subtasks: {what}{progress}")
    for k, sub in enumerate(troubled):
        _print_task(sub, indent, last and k == len(troubled) - 1, [], "")


def _print_attempts(task: dict[str, Any], pipe: str) -> None:
    for k, job in enumerate(task["attempts"]):
        twig = "└─" if k == len(task["attempts"]) - 1 else "├─"
        err = f"  {str(job['error']).splitlines()[-1][:80]}" if job["error"] else ""
        worker = f" on {job['worker']}" if job["worker"] else ""
        print(f"{pipe}{twig} attempt {job['attempt']}: {job['state']}{worker}{err}")


def cmd_describe(args: argparse.Namespace) -> int:
    from schema import readmodel as rm

    settings = settings_from(args)
    store = open_store(settings)
    data = status_data(store.engine, args.ticket, home=settings.home)
    if not data:
        raise CliError(f"no ticket {args.ticket!r} (see `jbctl status`)")
    with store.engine.connect() as conn:
        metrics = _rows(conn, "SELECT task, name, value, attempt FROM metrics WHERE ticket = :t", t=args.ticket)
        artifacts = _rows(conn, "SELECT id, kind, task, attempt FROM artifacts WHERE ticket = :t", t=args.ticket)
        checks = _rows(
            conn,
            "SELECT task, attempt, phase, expected, ok, observed, value, retryable, evaluated_at "
            "FROM step_checks WHERE ticket = :t ORDER BY seq",
            t=args.ticket,
        )
        sweeps = rm.sweep_rows(conn, args.ticket)
    events = [r.as_json() for r in store.read(0, stream=args.ticket)]
    spec = next((e["data"]["spec"] for e in reversed(events) if e["type"] == "TicketSubmitted"), None)
    acceptance = next((e["data"] for e in reversed(events) if e["type"] == "AcceptanceEvaluated"), None)
    run_start = max((n for n, e in enumerate(events) if e["type"] == "TicketSubmitted"), default=0)
    reused_by: dict[str, dict] = {}  # this revision's steps that took a cached result, and still hold it
    waiting: dict[str, dict] = {}  # its steps that wait for the same step running elsewhere
    for e in events[run_start:]:
        task = e["data"].get("task")
        if e["type"] in ("AttemptScheduled", "AttemptReused", "TaskRetried"):
            reused_by.pop(task, None)
            waiting.pop(task, None)
        if e["type"] == "AttemptReused":
            reused_by[task] = e["data"]
        elif e["type"] == "TaskWaiting":
            waiting[task] = e["data"]
    reused = list(reused_by.values())
    if data[0]["state"] != "running":
        waiting.clear()
    info = {
        **data[0],
        "spec": spec,
        "metrics": metrics,
        "artifacts": artifacts,
        "acceptance": acceptance,
        "step_checks": checks,
        "sweeps": sweeps,
        "reused": reused,
        "waiting_for_same_step": list(waiting.values()),
        "adapters": _adapters_of(store.engine, args.ticket),
        "events": len(events),
    }
    if args.json:
        print_json(info)
        return 0
    _print_tree(data[0])
    if spec:
        print(f"\ngoal: {spec['goal'].strip()}")
    if metrics:
        print("\nmetrics:")
        for m in metrics:
            print(f"  {m['task']}.{m['name']} = {m['value']:g}  (attempt {m['attempt']})")
    if checks:
        print("\nprobes (before dispatch) and expectations (on success):")
        for r in checks:
            mark = colour("pass", "32") if r["ok"] else colour("FAIL", "31")
            when = "" if r["phase"] == "probe" else f" attempt {r['attempt']}"
            print(f"  {mark}  {r['phase']:<6} {r['task']}{when}: {r['expected']}  (observed {r['observed']})")
    if sweeps:
        _print_sweeps(sweeps)
    if acceptance:
        print("\nacceptance:")
        for r in acceptance["results"]:
            mark = colour("pass", "32") if r["ok"] else colour("FAIL", "31")
            seen = "" if r["observed"] is None else f"  (observed {r['observed']:g})"
            print(f"  {mark}  {r['check']}{seen}")
    if artifacts:
        print("\nartifacts:")
        for a in artifacts:
            origin = f"attempt {a['attempt']}" if a["attempt"] else "(joined from its subtasks, no job)"
            print(f"  {a['id'][:16]}  {a['kind']}  from {a['task']} {origin}")
    if reused:
        print("\nreused from the step cache (no job ran):")
        for r in reused:
            origin = f"attempt {r['source_attempt']}" if r["source_attempt"] else "(joined, no job)"
            print(f"  {r['task']}  <- {r['source_ticket']}/{r['source_task']} {origin}")
    if waiting:
        print("\nwaiting for the same step running elsewhere (reused when it succeeds):")
        for w in waiting.values():
            print(f"  {w['task']}  -> {w['holder_ticket']}/{w['holder_task']}")
    if info["adapters"]:
        print("\nworking memory:")
        for a in info["adapters"]:
            state = "active" if a["active"] else f"retired ({a['retired_reason']}: {a['retired_detail'] or ''})"
            print(f"  {a['id']}  {a['component']} on core v{a['base_core_version']}  {state}")
    print(f"\n{len(events)} events: jbctl events --ticket {args.ticket}")
    return 0


def _print_sweeps(rows: list[dict[str, Any]]) -> None:
    """Each sweep as a table: combination -> metrics, the chosen one marked with *."""
    from schema import readmodel as rm

    for sweep in rm.sweep_tables(rows):
        step, table, keys, names = sweep["step"], sweep["rows"], sweep["params"], sweep["metrics"]
        head = ["", "subtask", *keys, *names]
        body = [
            [
                "*" if r["best"] else "",
                r["subtask"],
                *(_cell(r["params"].get(k)) for k in keys),
                *(_cell(r["metrics"].get(n)) for n in names),
            ]
            for r in table
        ]
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
        print(f"\nsweep {step} ({len(table)} combinations, * = chosen):")
        for row in [head, *body]:
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def _adapters_of(engine: Any, ticket: str) -> list[dict[str, Any]]:
    from daemon.memory import adapter_rows

    return [
        {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        for row in adapter_rows(engine, ticket=ticket)
    ]


def cmd_cancel(args: argparse.Namespace) -> int:
    from daemon import gate
    from daemon.handler import CommandHandler, local_actor

    store = open_store(settings_from(args))
    handler = CommandHandler(store)
    actor = local_actor()
    outcome = gate.cancel(handler, args.ticket, actor=actor["user"], meta={"actor": actor}, reason=args.reason)
    if not outcome.ok:
        raise CliError(outcome.message + (" (see `jbctl status`)" if outcome.message.startswith("no ticket") else ""))
    print(outcome.message)
    return 0
