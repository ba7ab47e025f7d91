"""Read-side views over the projections, shared by `jbctl` and the web console.

Pure functions of rows (plain dicts) plus a few SQL queries that stay fast at 100,000 tickets: pages
are read with LIMIT/OFFSET on an index, and only the tasks of the tickets on the page are loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa

# The pure row views, re-exported: the read side's callers (the console, jbctl) import them here.
from schema.status_rows import Key as Key
from schema.status_rows import _order as _order
from schema.status_rows import age as age
from schema.status_rows import current_step as current_step
from schema.status_rows import human_age as human_age
from schema.status_rows import naive_dt as naive_dt
from schema.status_rows import status_row as status_row
from schema.status_rows import summary as summary
from schema.status_rows import topo as topo
from schema.status_rows import waiting_on as waiting_on
from schema.tables import SQLModel

AUDIT_TYPES = [
    "ProposalOpened",
    "ProposalApproved",
    "ProposalRejected",
    "ProposalExpired",
    "ProposalWithdrawn",
    "ApprovalRefused",
    "CorePromoted",
    "SafetyViolation",
    "LoopDetected",
    "TaskBlocked",
    "TaskRetried",
    "TicketRetried",
    "CacheCleared",
    "TicketCancelled",
]

TICKET_STATES = ["running", "completed", "failed", "cancelled", "blocked"]


def select(conn: sa.Connection, name: str, order: tuple[str, ...] = (), **equal: Any) -> list[dict[str, Any]]:
    """Rows of a projection table through its model (so JSON columns come back decoded)."""
    table = SQLModel.metadata.tables[name]
    query = sa.select(table).order_by(*(table.c[o] for o in order))
    for column, value in equal.items():
        query = query.where(table.c[column] == value)
    return [dict(r) for r in conn.execute(query).mappings()]


def sweep_rows(conn: sa.Connection, ticket: str) -> list[dict[str, Any]]:
    """The ticket's joined `matrix:` steps, one row per combination (the latest join of each step)."""
    t = SQLModel.metadata.tables["sweeps"]
    x = t.alias("x")
    latest = sa.select(sa.func.max(x.c.seq)).where(x.c.ticket == t.c.ticket, x.c.task == t.c.task).scalar_subquery()
    query = (
        sa.select(t.c.task, t.c.subtask, t.c.position, t.c.params, t.c.metrics, t.c.best)
        .where(t.c.ticket == ticket, t.c.seq == latest)
        .order_by(t.c.task, t.c.position)
    )
    return [dict(r) for r in conn.execute(query).mappings()]


def evaluation_rows(conn: sa.Connection, subjects: list[str] | None = None) -> list[dict[str, Any]]:
    """The standing evaluation suite's rows (`evaluations`), for some subjects (`v3`, `P-4`) or all."""
    t = SQLModel.metadata.tables["evaluations"]
    query = sa.select(t).order_by(t.c.component, t.c.metric, t.c.subject)
    if subjects is not None:
        query = query.where(t.c.subject.in_(subjects))
    return [dict(r) for r in conn.execute(query).mappings()]


def sweep_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`sweep_rows` grouped by step: {step, rows, params (the matrix keys), metrics (every name)}."""
    by_step: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(r["task"], []).append({**r, "params": r["params"] or {}, "metrics": r["metrics"] or {}})
    return [
        {
            "step": step,
            "rows": table,
            "params": list(dict.fromkeys(k for r in table for k in r["params"])),
            "metrics": sorted({n for r in table for n in r["metrics"]}),
        }
        for step, table in by_step.items()
    ]


def ticket_page(
    conn: sa.Connection,
    now: datetime,
    *,
    state: str | None = None,
    search: str | None = None,
    limit: int = 50,
    offset: int = 0,
    total: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of tickets, newest first, with their current step and what they wait on; and the total
    (counted unless the caller knows it, e.g. from the per-state counts).

    Only the tickets of the page and their tasks are read (the `submitted_at` indexes order them).
    """
    tickets = SQLModel.metadata.tables["tickets"]
    where = []
    if state:
        where.append(tickets.c.state == state)
    if search:
        like = f"%{search.lower()}%"
        where.append(sa.or_(sa.func.lower(tickets.c.id).like(like), sa.func.lower(tickets.c.title).like(like)))
    if total is None:
        total = int(conn.execute(sa.select(sa.func.count()).select_from(tickets).where(*where)).scalar() or 0)
    query = (
        sa.select(tickets)
        .where(*where)
        .order_by(tickets.c.submitted_at.desc(), tickets.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = [dict(r) for r in conn.execute(query).mappings()]
    by_ticket = tasks_of(conn, [r["id"] for r in rows])
    return [summary(t, by_ticket[t["id"]], now) for t in rows], total


def tasks_of(conn: sa.Connection, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The tasks of these tickets (one query on the tasks' primary key), each ticket's in `topo` order."""
    tasks = SQLModel.metadata.tables["tasks"]
    by_ticket: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        query = sa.select(tasks).where(tasks.c.ticket.in_(ids)).order_by(tasks.c.ticket, tasks.c.task)
        for r in conn.execute(query).mappings():
            by_ticket[r["ticket"]].append(dict(r))
    return {i: topo(v) for i, v in by_ticket.items()}


# --- status: the tickets with their task trees, streamed -----------------------------------------

STATUS_CHUNK = 500  # tickets read (with their tasks and attempts) per query


def status_rows(conn: sa.Connection, rows: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """`status_row` for each of these ticket rows: their tasks and attempts in two indexed queries."""
    jobs = SQLModel.metadata.tables["jobs"]
    ids = [r["id"] for r in rows]
    by_ticket = tasks_of(conn, ids)
    jobs_of: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        query = sa.select(jobs).where(jobs.c.ticket.in_(ids)).order_by(jobs.c.ticket, jobs.c.task, jobs.c.attempt)
        for r in conn.execute(query).mappings():
            jobs_of[r["ticket"]].append(dict(r))
    return [status_row(t, by_ticket[t["id"]], jobs_of[t["id"]], now) for t in rows]


def ticket_status(conn: sa.Connection, tid: str, now: datetime) -> dict[str, Any] | None:
    """One ticket's `status_row`, or None when there is no such ticket (three primary-key lookups)."""
    tickets = SQLModel.metadata.tables["tickets"]
    rows = [dict(r) for r in conn.execute(sa.select(tickets).where(tickets.c.id == tid)).mappings()]
    return status_rows(conn, rows, now)[0] if rows else None


def status_keys(conn: sa.Connection, ended_since: datetime, limit: int | None) -> tuple[list[Key], int]:
    """The newest `limit` (all when None) tickets that are live (not ended) or ended at or after
    `ended_since`, oldest first; and how many there are in all.

    Both parts come off the `(ended_at, submitted_at, id)` index alone: the live tickets in order
    (ended_at NULL), the recently ended as a range. Only keys are held, never rows.
    """
    import heapq

    t = SQLModel.metadata.tables["tickets"]
    live_q = sa.select(t.c.submitted_at, t.c.id).where(t.c.ended_at.is_(None))
    live_q = live_q.order_by(t.c.submitted_at.desc(), t.c.id.desc())
    if limit is not None:
        live_q = live_q.limit(limit)
    live = [(r[0], r[1]) for r in conn.execute(live_q)]
    ended = ((r[0], r[1]) for r in conn.execute(sa.select(t.c.submitted_at, t.c.id).where(t.c.ended_at >= ended_since)))
    recent = heapq.nlargest(limit, ended, key=_order) if limit is not None else list(ended)
    keys = sorted(live + recent, key=_order)
    if limit is not None:
        keys = keys[-limit:] if limit else []
    n_live = len(live) if limit is None or len(live) < limit else _count(conn, t.c.ended_at.is_(None))
    n_recent = len(recent) if limit is None or len(recent) < limit else _count(conn, t.c.ended_at >= ended_since)
    return keys, n_live + n_recent


def newest_keys(conn: sa.Connection, limit: int) -> list[Key]:
    """The newest `limit` tickets of all, oldest first (off the `(submitted_at, id)` index)."""
    t = SQLModel.metadata.tables["tickets"]
    query = sa.select(t.c.submitted_at, t.c.id).order_by(t.c.submitted_at.desc(), t.c.id.desc()).limit(limit)
    return sorted(((r[0], r[1]) for r in conn.execute(query)), key=_order)


def _count(conn: sa.Connection, where: Any) -> int:
    t = SQLModel.metadata.tables["tickets"]
    return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(where)).scalar() or 0)


def iter_status(conn: sa.Connection, now: datetime, keys: list[Key] | None = None) -> Iterator[dict[str, Any]]:
    """`status_row`s, oldest first, `STATUS_CHUNK` tickets at a time: of these keys, or of every
    ticket when `keys` is None (a keyset walk of the `(submitted_at, id)` index). Memory holds one
    chunk, whatever the number of tickets."""
    t = SQLModel.metadata.tables["tickets"]
    if keys is not None:
        for lo in range(0, len(keys), STATUS_CHUNK):
            ids = [k[1] for k in keys[lo : lo + STATUS_CHUNK]]
            found = {r["id"]: dict(r) for r in conn.execute(sa.select(t).where(t.c.id.in_(ids))).mappings()}
            yield from status_rows(conn, [found[i] for i in ids if i in found], now)
        return
    # Keyset walk: each chunk starts after the last one's (submitted_at, id), so no OFFSET re-scans.
    dated = sa.select(t).where(t.c.submitted_at.is_not(None)).order_by(t.c.submitted_at, t.c.id).limit(STATUS_CHUNK)
    rows = [dict(r) for r in conn.execute(dated).mappings()]
    while rows:
        yield from status_rows(conn, rows, now)
        last = rows[-1]
        after = sa.or_(
            t.c.submitted_at > last["submitted_at"],
            sa.and_(t.c.submitted_at == last["submitted_at"], t.c.id > last["id"]),
        )
        rows = [dict(r) for r in conn.execute(dated.where(after)).mappings()]
    # Rows without a submission time (none are written so; kept reachable all the same), by id.
    undated = sa.select(t).where(t.c.submitted_at.is_(None)).order_by(t.c.id).limit(STATUS_CHUNK)
    rows = [dict(r) for r in conn.execute(undated).mappings()]
    while rows:
        yield from status_rows(conn, rows, now)
        rows = [dict(r) for r in conn.execute(undated.where(t.c.id > rows[-1]["id"])).mappings()]


def counts_by_state(conn: sa.Connection) -> dict[str, int]:
    """Tickets per state (one covering-index scan)."""
    rows = conn.execute(sa.text("SELECT state, COUNT(*) FROM tickets GROUP BY state")).all()
    return {str(s): int(n) for s, n in rows}


def awaited_proposals(conn: sa.Connection) -> list[str]:
    """The proposals running tickets wait on (off the `(awaiting, state)` index)."""
    t = SQLModel.metadata.tables["tickets"]
    query = sa.select(t.c.awaiting).where(t.c.awaiting.is_not(None), t.c.state == "running").distinct()
    return sorted(str(r[0]) for r in conn.execute(query))


def work_waiting(conn: sa.Connection) -> bool:
    """Whether some running ticket has work for the daemon (it does not only wait for an approval)."""
    t = SQLModel.metadata.tables["tickets"]
    query = sa.select(t.c.id).where(t.c.state == "running", t.c.awaiting.is_(None)).limit(1)
    return conn.execute(query).first() is not None


# --- proposals -----------------------------------------------------------------------------------


def acceptance_focus(spec: dict[str, Any] | None) -> list[str]:
    """`task.metric` names a ticket's acceptance checks read: the rows a reviewer looks at first."""
    if not spec:
        return []
    out = []
    for check in spec.get("acceptance") or []:
        if isinstance(check, dict) and isinstance(check.get("metric"), str):
            out.append(check["metric"])
    return out


# A metric whose name ends so is a reference point (random init, raw pixels, chance), not the candidate.
BASELINE_SUFFIXES = ("_random", "_pixels", "_chance")
# Sizes and counts: a change is neither better nor worse.
NEUTRAL_METRICS = ("params", "mean_steps", "n_train", "n_test")


def is_gain(name: str) -> bool:
    return "_gain" in name.rsplit(".", 1)[-1]


def metric_direction(name: str) -> int:
    """+1 when a larger value is better, -1 when smaller is, 0 when neither (baselines, sizes)."""
    base = name.rsplit(".", 1)[-1]
    if is_gain(base):
        return 1
    if base.endswith(BASELINE_SUFFIXES) or base in NEUTRAL_METRICS:
        return 0
    if "loss" in base or "error" in base:
        return -1
    return 1


def metric_sections(names: list[str], focus: list[str]) -> list[tuple[str, list[str]]]:
    """The metrics in the order a reviewer reads them: the ticket's checks, the gains over the
    baselines, the other measurements, the baselines themselves."""
    checked = [n for n in dict.fromkeys(focus) if n in names]
    rest = [n for n in sorted(names) if n not in checked]
    gains = [n for n in rest if is_gain(n)]
    baselines = [n for n in rest if not is_gain(n) and n.endswith(BASELINE_SUFFIXES)]
    other = [n for n in rest if n not in gains and n not in baselines]
    return [
        ("checked by the ticket", checked),
        ("gains over the baselines", gains),
        ("other measurements", other),
        ("baselines", baselines),
    ]


def delta_mark(name: str, delta: float | None) -> str:
    """`better` / `worse` / `same` for a delta of the candidate over the current core."""
    direction = metric_direction(name)
    if delta is None or direction == 0:
        return ""
    if abs(delta) < 1e-12:
        return "same"
    return "better" if delta * direction > 0 else "worse"


def comparison(metrics: dict[str, Any] | None, focus: list[str] | None = None) -> list[dict[str, Any]]:
    """Side-by-side rows in the order `jbctl proposals P-n` prints them (checked by the ticket, gains
    over the baselines, other measurements, baselines), each with its section, delta and `better` /
    `worse` / `same` mark (as the CLI marks them); `regression` is a `worse` mark."""
    metrics = metrics or {}
    cand, cur, delta = (metrics.get(k) or {} for k in ("candidate", "current", "delta"))
    rows = []
    for section, names in metric_sections(list(cand), focus or []):
        for n in names:
            mark = delta_mark(n, delta.get(n))
            rows.append(
                {
                    "metric": n,
                    "section": section,
                    "candidate": cand[n],
                    "current": cur.get(n),
                    "delta": delta.get(n),
                    "mark": mark,
                    "checked": section == "checked by the ticket",
                    "regression": mark == "worse",
                }
            )
    return rows


# --- audit ---------------------------------------------------------------------------------------


def audit_row(rec: Any) -> dict[str, Any]:
    """One audit line from a recorded event (`schema.store.Recorded`)."""
    d = rec.data
    meta_actor = rec.meta.get("actor")
    actor = d.get("actor") or (meta_actor.get("user") if isinstance(meta_actor, dict) else meta_actor)
    detail = d.get("reason") or d.get("note") or d.get("detail") or d.get("proposal") or ""
    if rec.type == "CorePromoted":
        detail = f"v{d['version']}" + (
            f" (rollback to v{d['rollback_to']})" if d.get("rollback_to") else f" from {d.get('proposal')}"
        )
    if rec.type == "SafetyViolation":
        detail = f"{d.get('what')}: {d.get('detail')}"
    if rec.type == "TicketRetried":
        detail = f"from {d.get('from_task')}"
    if rec.type == "CacheCleared":
        detail = f"{len(d.get('keys') or [])} cached results ({d.get('reason') or 'all'})"
    return {
        "seq": rec.seq,
        "at": rec.recorded_at.isoformat(timespec="seconds"),
        "type": rec.type,
        "ticket": d.get("ticket"),
        "actor": actor,
        "detail": str(detail)[:200],
    }


# --- read-only SQL -------------------------------------------------------------------------------


class ReadOnlyQueryError(Exception):
    """A query `jbctl sql` (and the console's SQL page) refuses or the database rejects."""


def readonly_query(url: str, query: str, max_rows: int | None = None) -> tuple[list[str], list[list[Any]], bool]:
    """Run `query` on a connection that refuses writes: (headers, rows, truncated)."""
    from schema.engines import open_readonly

    engine = open_readonly(url)
    refused = "read-only: write statements are refused"
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(query))
            if not result.returns_rows:
                raise ReadOnlyQueryError("read-only: the statement returned no rows (write statements are refused)")
            headers = list(result.keys())
            if max_rows is None:
                return headers, [list(r) for r in result], False
            rows = [list(r) for r in result.fetchmany(max_rows + 1)]
            return headers, rows[:max_rows], len(rows) > max_rows
    except sa.exc.OperationalError as exc:
        message = str(exc.orig) if exc.orig else str(exc)
        if "readonly" in message or "read-only" in message or "read only" in message:
            raise ReadOnlyQueryError(refused) from None
        raise ReadOnlyQueryError(f"SQL error: {message}") from None
    except sa.exc.InternalError as exc:
        message = str(exc.orig) if exc.orig else str(exc)
        if "read-only" in message:
            raise ReadOnlyQueryError(refused) from None
        raise ReadOnlyQueryError(f"SQL error: {message}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise ReadOnlyQueryError(f"SQL error: {getattr(exc, 'orig', None) or exc}") from None
    finally:
        engine.dispose()


def installation_paused(conn: sa.Connection) -> str | None:
    """Why the installation is paused (the last InstallationPaused not followed by a resume), or None.
    One row, read backwards off the stream index (not every `system` event since the first)."""
    import json

    last = conn.execute(
        sa.text(
            "SELECT type, data FROM events WHERE stream = 'system' "
            "AND type IN ('InstallationPaused', 'InstallationResumed') ORDER BY seq DESC LIMIT 1"
        )
    ).first()
    if last is None or last[0] != "InstallationPaused":
        return None
    data = json.loads(last[1]) if isinstance(last[1], str) else dict(last[1] or {})
    return str(data.get("reason") or "paused")
