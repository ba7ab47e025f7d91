"""What each console page shows, read from the projections and the event log with SQL that stays fast.

Every function takes an engine (or connection) and returns plain dicts: the same data is rendered as
HTML and served as JSON.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from schema import readmodel as rm
from schema.store import Recorded
from schema.suite import suite_table
from schema.tables import TYPE_INDEXED, SQLModel, type_indexed

T = SQLModel.metadata.tables
EVENT_COLUMNS: tuple[Any, ...] = (
    sa.column("seq"),
    sa.column("stream"),
    sa.column("version"),
    sa.column("type"),
    sa.column("data", sa.Text),
    sa.column("meta", sa.Text),
    sa.column("recorded_at"),
    sa.column("hash"),
)


# `type || ''` instead of `type` where the stream is known: it keeps SQLite from choosing the `type`
# index (every TicketSubmitted of 100,000 tickets, then a sort) over the stream's few rows. Portable SQL.
BY_STREAM = "type || ''"


def now_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _recorded(row: Any) -> Recorded:
    at = row.recorded_at
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return Recorded(row.seq, row.stream, row.version, row.type, _loads(row.data), _loads(row.meta), at, row.hash)


def events_where(
    conn: sa.Connection, where: str, params: dict[str, Any], limit: int, offset: int = 0
) -> list[Recorded]:
    """Newest first."""
    sql = sa.text(
        f"SELECT seq, stream, version, type, data, meta, recorded_at, hash FROM events WHERE {where} "
        "ORDER BY seq DESC LIMIT :limit OFFSET :offset"
    ).columns(*EVENT_COLUMNS)
    return [_recorded(r) for r in conn.execute(sql, {**params, "limit": limit, "offset": offset})]


def tickets(engine: sa.Engine, state: str | None, search: str | None, limit: int, offset: int) -> dict[str, Any]:
    with engine.connect() as conn:
        counts = rm.counts_by_state(conn)  # one covering-index scan; gives the total unless searching
        known = None if search else (counts.get(state, 0) if state else sum(counts.values()))
        rows, total = rm.ticket_page(
            conn, now_naive(), state=state, search=search, limit=limit, offset=offset, total=known
        )
        head = int(conn.execute(sa.text("SELECT COALESCE(MAX(seq), 0) FROM events")).scalar() or 0)
        paused = rm.installation_paused(conn)
    return {
        "tickets": rows,
        "total": total,
        "limit": limit,
        "offset": offset,
        "state": state,
        "search": search,
        "counts": counts,
        "head_seq": head,
        "paused": paused,
    }


def _spec(conn: sa.Connection, tid: str) -> dict[str, Any] | None:
    found = events_where(conn, f"stream = :s AND {BY_STREAM} = 'TicketSubmitted'", {"s": tid}, 1)
    return found[0].data.get("spec") if found else None


def ticket(engine: sa.Engine, tid: str, event_limit: int = 50) -> dict[str, Any] | None:
    """One ticket: summary, spec, task -> attempt tree, curves, probes and expectations, acceptance,
    metrics, artifacts, events."""
    now = now_naive()
    with engine.connect() as conn:
        rows = rm.select(conn, "tickets", id=tid)
        if not rows:
            return None
        tasks = rm.topo(rm.select(conn, "tasks", ("task",), ticket=tid))
        jobs = rm.select(conn, "jobs", ("task", "attempt"), ticket=tid)
        metrics = rm.select(conn, "metrics", ("task", "name"), ticket=tid)
        artifacts = rm.select(conn, "artifacts", ("recorded_at",), ticket=tid)
        proposals = rm.select(conn, "proposals", ("opened_at",), ticket=tid)
        checks = rm.select(conn, "step_checks", ("seq",), ticket=tid)
        sweeps = rm.sweep_tables(rm.sweep_rows(conn, tid))
        spec = _spec(conn, tid)
        acceptance = events_where(conn, f"stream = :s AND {BY_STREAM} = 'AcceptanceEvaluated'", {"s": tid}, 1)
        progress_sql = sa.text(
            f"SELECT data FROM events WHERE stream = :s AND {BY_STREAM} = 'ProgressRecorded' ORDER BY seq"
        ).columns(sa.column("data", sa.Text))
        progress = [_loads(r[0]) for r in conn.execute(progress_sql, {"s": tid})]
        events = events_where(conn, "stream = :s", {"s": tid}, event_limit)
        n_events = int(conn.execute(sa.text("SELECT COUNT(*) FROM events WHERE stream = :s"), {"s": tid}).scalar() or 0)
        paused = rm.installation_paused(conn)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for j in jobs:
        by_task[j["task"]].append(j)
    tree = []
    for t in tasks:
        fraction = None
        if t["progress_step"] is not None and t["progress_total"]:
            fraction = min(1.0, t["progress_step"] / t["progress_total"])
        elif t["state"] == "succeeded":
            fraction = 1.0
        tree.append({**t, "fraction": fraction, "attempts": by_task.get(t["task"], [])})
    return {
        **rm.summary(rows[0], tasks, now),
        "owner": rows[0]["owner"],
        "path": rows[0]["path"],
        "goal": (spec or {}).get("goal"),
        "spec": spec,
        "tasks": tree,
        "curves": curves(progress),
        "acceptance": acceptance[0].data if acceptance else None,
        "step_checks": checks,
        "sweeps": sweeps,
        "metrics": metrics,
        "artifacts": artifacts,
        "proposals": [{"id": p["id"], "state": p["state"], "kind": p["kind"]} for p in proposals],
        "events": [r.as_json() for r in events],
        "events_total": n_events,
        "paused": paused,
    }


def curves(progress: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, attempt and metric: the recorded (step, value) points, with an SVG polyline ready to draw."""
    series: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for p in progress:
        for name, value in (p.get("metrics") or {}).items():
            if isinstance(value, int | float):
                series[(p["task"], int(p.get("attempt", 0)), name)].append((float(p["step"]), float(value)))
    return [
        {"task": task, "attempt": attempt, "metric": name, "points": pts, **svg_polyline(pts)}
        for (task, attempt, name), pts in sorted(series.items())
    ]


def svg_polyline(
    points: list[tuple[float, float]], width: int = 320, height: int = 120, pad: int = 6
) -> dict[str, Any]:
    """`points` scaled into a width x height box (y up), as an SVG `points` attribute, with the axis ranges."""
    if not points:
        return {"svg_points": "", "x_range": None, "y_range": None, "last": None}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    coords = [
        f"{pad + (x - x0) / dx * (width - 2 * pad):.1f},{height - pad - (y - y0) / dy * (height - 2 * pad):.1f}"
        for x, y in points
    ]
    return {"svg_points": " ".join(coords), "x_range": (x0, x1), "y_range": (y0, y1), "last": points[-1][1]}


def proposals(engine: sa.Engine, include_all: bool) -> list[dict[str, Any]]:
    now = now_naive()
    with engine.connect() as conn:
        query = sa.select(T["proposals"]).order_by(T["proposals"].c.opened_at.desc())
        if not include_all:
            query = query.where(T["proposals"].c.state == "open")
        rows = [dict(r) for r in conn.execute(query.limit(500)).mappings()]
        specs = {tid: _spec(conn, tid) for tid in {r["ticket"] for r in rows}}
    return [_proposal_view(r, specs.get(r["ticket"]), now) for r in rows]


def proposal(engine: sa.Engine, pid: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        rows = rm.select(conn, "proposals", id=pid)
        if not rows:
            return None
        spec = _spec(conn, rows[0]["ticket"])
        history = events_where(
            conn,
            f"stream = :s AND {BY_STREAM} IN ('ProposalOpened', 'ProposalApproved', 'ProposalRejected', "
            "'ProposalExpired', 'ProposalWithdrawn', 'ApprovalRefused')",
            {"s": rows[0]["ticket"]},
            100,
        )
        core = int(conn.execute(sa.text("SELECT COALESCE(MAX(version), 0) FROM core_versions")).scalar() or 0)
        suite_rows = rm.evaluation_rows(conn, [f"v{core}", pid])
    view = _proposal_view(rows[0], spec, now_naive())
    view["suite"] = suite_table(suite_rows, all_metrics=False)
    view["history"] = [rm.audit_row(r) for r in history if r.data.get("proposal") == pid]
    view["core_version"] = core
    view["stale"] = view["kind"] == "core" and view["base_core_version"] != core
    return view


def _proposal_view(r: dict[str, Any], spec: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    focus = rm.acceptance_focus(spec)
    rows = rm.comparison(r["metrics"], focus) if r["kind"] == "core" else []
    return {
        "proposal": r["id"],
        "ticket": r["ticket"],
        "kind": r["kind"],
        "state": r["state"],
        "base_core_version": r["base_core_version"],
        "candidate": r["candidate"] or {},
        "metrics": r["metrics"] or {},
        "comparison": rows,
        "regressions": sum(1 for x in rows if x["regression"]),
        # what the list shows: the ticket's checks and the gains over the baselines, else the first rows
        "headline": ([x for x in rows if x["checked"] or x["section"] == "gains over the baselines"] or rows)[:3],
        "checked": focus,
        "approvers": (spec or {}).get("approvers"),
        "opened_at": r["opened_at"],
        "age": rm.age(r["opened_at"], now),
        "expires_in": rm.human_age((rm.naive_dt(r["expires_at"]) - now).total_seconds()) if r["expires_at"] else None,
        "decided_at": r["decided_at"],
        "actor": r["actor"],
        "note": r["note"],
        "title": (spec or {}).get("title"),
    }


def core(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        history = rm.select(conn, "core_versions", ("version",))
        suite_rows = rm.evaluation_rows(conn, [f"v{h['version']}" for h in history])
    history.reverse()
    current = history[0] if history else None
    return {
        "version": current["version"] if current else 0,
        "components": (current or {}).get("components") or {},
        "history": history,
        "suite": suite_table(suite_rows),
    }


def audit(engine: sa.Engine, limit: int, offset: int) -> dict[str, Any]:
    types = ", ".join(f"'{t}'" for t in rm.AUDIT_TYPES)  # constants, not user input
    with engine.connect() as conn:
        where = f"type IN ({types})" + (f" AND {TYPE_INDEXED}" if type_indexed(rm.AUDIT_TYPES) else "")
        rows = events_where(conn, where, {}, limit, offset)
    return {"rows": [rm.audit_row(r) for r in rows], "limit": limit, "offset": offset}


def workers(redis_url: str | None) -> dict[str, Any]:
    """Alive RQ workers, what each runs, and queue depths, read from Redis as rq-dashboard does."""
    if not redis_url:
        return {
            "redis": None,
            "error": "no Redis configured (JETBOX_REDIS_URL) and no `jbctl up` running on this home",
            "workers": [],
            "queues": [],
        }
    import redis
    from rq import Queue, Worker
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    from schema.wire import warm_workers

    safe = redis_url.split("@")[-1] if "@" in redis_url else redis_url
    try:
        conn = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        found = []
        warm = {(str(h.get("host")), h.get("pid")): h for h in warm_workers(conn)}  # keep-alive: the core held
        for w in Worker.all(connection=conn):
            held = warm.get((str(w.hostname), w.pid))
            core = ""
            if held is not None:
                core = f"v{held['core_version']}" if held.get("core_version") is not None else "none yet"
                if held.get("loading") is not None:
                    core += f" (loading v{held['loading']})"
            found.append(
                {
                    "name": w.name,
                    "state": w.get_state(),
                    "queues": [q.name for q in w.queues],
                    "current_job": w.get_current_job_id(),
                    "last_heartbeat": w.last_heartbeat,
                    "hostname": w.hostname,
                    "pid": w.pid,
                    "successful": w.successful_job_count,
                    "failed": w.failed_job_count,
                    "core": core,
                }
            )
        queues = []
        for q in Queue.all(connection=conn):
            queues.append(
                {
                    "name": q.name,
                    "queued": q.count,
                    "started": StartedJobRegistry(queue=q).count,
                    "failed": FailedJobRegistry(queue=q).count,
                }
            )
    except (redis.RedisError, OSError) as exc:
        return {"redis": safe, "error": f"cannot read Redis at {safe}: {exc}", "workers": [], "queues": []}
    return {
        "redis": safe,
        "error": None,
        "workers": sorted(found, key=lambda w: w["name"]),
        "queues": sorted(queues, key=lambda q: q["name"]),
    }


class Milestones:
    """The milestone book (`schema/milestones.py`, what `jbctl milestones` folds), kept by this console
    process and caught up with the new events on each read: the log is folded once, not per page."""

    def __init__(self, engine: sa.Engine) -> None:
        from schema.milestones import MilestoneBook

        self.engine = engine
        self.book = MilestoneBook()
        self.seq = 0
        self._lock = threading.Lock()

    def _catch_up(self) -> bool:
        """Fold the new events into the book (under the lock); False while no milestone was ever planned,
        so a log without plans is never folded."""
        from schema.store import decode_events

        if not self.book.milestones:
            with self.engine.connect() as conn:
                planned = conn.execute(
                    sa.text(f"SELECT 1 FROM events WHERE type = 'MilestonePlanned' AND {TYPE_INDEXED} LIMIT 1")
                ).first()
            if planned is None:
                return False
        for seq, event in decode_events(self.engine, self.seq):
            self.book.apply(seq, event)
            self.seq = seq
        return True

    # Views are read under the lock too: another request may be folding new events into the same book.

    def listing(self) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            return {"milestones": self.book.views()}

    def one(self, mid: str) -> dict[str, Any] | None:
        from cli.plans import checklist_lines

        with self._lock:
            self._catch_up()
            if mid not in self.book.milestones:
                return None
            view = self.book.view(mid)
        view["checklist"] = checklist_lines(view)
        return view

    def report(self, mid: str, fmt: str) -> bytes | None:
        """The report `jbctl milestone MID --report FMT` writes (without storing it), or None: no such milestone."""
        from cli.milestone_report import render

        with self._lock:
            self._catch_up()
            if mid not in self.book.milestones:
                return None
            body, _ = render(self.book, mid, fmt, datetime.now(UTC))
        return body
