"""Projections: how each event changes the query tables (tickets, tasks, jobs, ...).

The projector writes through a small `Rows` interface, so the same rules update the live tables
inside the append transaction (`SqlRows`) and rebuild them from the log in memory (`MemoryRows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa

from schema import events as ev
from schema.consistency import consistency_score
from schema.plan import LIVE, OPEN, PROBE_FAILED, task_plan
from schema.rawsql import StoreSql
from schema.tables import PROJECTION_TABLES, SQLModel
from schema.ticket import Ticket

Key = tuple[Any, ...]


def _table(name: str) -> sa.Table:
    return SQLModel.metadata.tables[name]


class Rows(Protocol):
    def get(self, table: str, key: Key) -> dict[str, Any] | None: ...

    def put(self, table: str, key: Key, row: dict[str, Any]) -> None: ...

    def update(self, table: str, key: Key, fields: dict[str, Any]) -> bool:
        """Change these fields of an existing row; False (and nothing changed) when there is none."""
        ...

    def delete(self, table: str, key: Key) -> None: ...


class MemoryRows:
    """Projection rows held in dicts; `flush` bulk-inserts them."""

    def __init__(self) -> None:
        self.data: dict[str, dict[Key, dict[str, Any]]] = {t: {} for t in PROJECTION_TABLES}
        # ticket -> its task keys, in the order of `data["tasks"]`: finding a ticket's tasks by
        # scanning every task made a rebuild (`jbctl replay`) quadratic in the number of tickets.
        self.task_keys: dict[Any, dict[Key, None]] = {}

    def get(self, table: str, key: Key) -> dict[str, Any] | None:
        return self.data[table].get(key)

    def put(self, table: str, key: Key, row: dict[str, Any]) -> None:
        self.data[table][key] = row
        if table == "tasks":
            self.task_keys.setdefault(key[0], {})[key] = None

    def update(self, table: str, key: Key, fields: dict[str, Any]) -> bool:
        row = self.data[table].get(key)
        if row is None:
            return False
        row.update(fields)
        return True

    def delete(self, table: str, key: Key) -> None:
        self.data[table].pop(key, None)
        if table == "tasks":
            self.task_keys.get(key[0], {}).pop(key, None)

    def flush(self, conn: sa.Connection) -> None:
        for name in PROJECTION_TABLES:
            rows = list(self.data[name].values())
            for start in range(0, len(rows), 5000):
                conn.execute(_table(name).insert(), rows[start : start + 5000])


class SqlRows:
    """Projection rows read on a live connection and written back once per transaction.

    A hundred progress reports in one group commit touch the same task row a hundred times; the
    row is written once, in one executemany per table, just before the commit. It works on the
    append transaction's DBAPI cursor with statements compiled once (`schema.rawsql`).

    An existing row's UPDATE sets only the columns whose values changed: a progress report moves a
    task's step and time, and rewriting its `state` too made SQLite rewrite a page of the state index
    in every commit (one of six pages a single-event commit wrote), and re-encode its `needs` JSON.
    """

    def __init__(self, cur: Any, sql: StoreSql) -> None:
        self.cur = cur
        self.sql = sql
        self.cache: dict[tuple[str, Key], dict[str, Any] | None] = {}
        # Rows as they are in the database (read, or last written here): absent, the row is not there.
        self.stored: dict[tuple[str, Key], dict[str, Any]] = {}
        self.dirty: dict[tuple[str, Key], dict[str, Any]] = {}

    def get(self, table: str, key: Key) -> dict[str, Any] | None:
        ck = (table, key)
        if ck not in self.cache:
            t = self.sql.table(table)
            self.cur.execute(t.select, key)
            found = self.cur.fetchone()
            if found is None:
                self.cache[ck] = None
            else:
                # One dict for both: `put` replaces the cached row, it never changes it in place.
                self.cache[ck] = self.stored[ck] = t.decode(found, self.cur.description)
        row = self.cache[ck]
        return dict(row) if row is not None else None

    def put(self, table: str, key: Key, row: dict[str, Any]) -> None:
        ck = (table, key)
        if ck not in self.cache:
            self.get(table, key)  # learn whether it exists in the database
        self.cache[ck] = self.dirty[ck] = dict(row)  # read back only through `get`, which copies

    def update(self, table: str, key: Key, fields: dict[str, Any]) -> bool:
        """In place after the first change in a transaction: a hundred progress reports on one task
        row copy it once, not two hundred times."""
        ck = (table, key)
        if ck not in self.cache:
            self.get(table, key)
        row = self.cache[ck]
        if row is None:
            return False
        if self.dirty.get(ck) is not row:  # still the stored row (shared with `stored`): copy it first
            row = self.cache[ck] = self.dirty[ck] = dict(row)
        row.update(fields)
        return True

    def delete(self, table: str, key: Key) -> None:
        ck = (table, key)
        self.dirty.pop(ck, None)
        self.cur.execute(self.sql.table(table).delete, key)
        self.cache[ck] = None
        self.stored.pop(ck, None)

    def stored_task_keys(self, ticket: str) -> set[Key]:
        self.cur.execute(self.sql.task_keys, (ticket,))
        return {(t, k) for t, k in self.cur.fetchall()}

    def flush(self) -> None:
        """Write every changed row: per table, an INSERT executemany per set of columns given and an
        UPDATE executemany per set of columns changed (a row that did not change is not written)."""
        writes: dict[str, tuple[dict[tuple[str, ...], list[tuple[Any, ...]]], ...]] = {}
        for ck, row in self.dirty.items():
            table, key = ck
            t = self.sql.table(table)
            updates, inserts = writes.setdefault(table, ({}, {}))
            old = self.stored.get(ck)
            if old is not None:
                changed = tuple(n for n in t.rest if n not in old or not same_value(row[n], old[n]))
                if changed:
                    updates.setdefault(changed, []).append((*t.encode(changed, row), *key))
            else:
                names = tuple(row)
                inserts.setdefault(names, []).append(t.encode(names, row))
            self.stored[ck] = row
        for table, (updates, inserts) in writes.items():
            t = self.sql.table(table)
            for names, values in inserts.items():
                self.cur.executemany(t.insert(names), values)
            for names, values in updates.items():
                self.cur.executemany(t.update_of(names), values)
        self.dirty.clear()


def same_value(a: Any, b: Any) -> bool:
    """Equal, and stored as the same text: the types match all the way down (1, 1.0 and True are
    equal in Python but not in a JSON column), dicts in the same key order, and 0.0 is not -0.0.
    NaN is never the same as itself: such a column is written again, which is always correct."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return len(a) == len(b) and all(
            ka == kb and same_value(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if kind is list:
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if kind is float:
        return bool(a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
    if kind is datetime:  # the same instant at another offset is stored as other text
        return bool(a == b and a.utcoffset() == b.utcoffset())
    return bool(a == b)


def _naive(ts: datetime | None) -> datetime | None:
    """Projections store UTC without tzinfo, the same on SQLite and PostgreSQL."""
    if ts is None:
        return None
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def _update(rows: Rows, table: str, key: Key, **fields: Any) -> None:
    rows.update(table, key, fields)


def _update_task(rows: Rows, ticket: str, task: str, **fields: Any) -> None:
    """Change a task row; `tasks_done` follows every move into or out of `succeeded` (a re-evaluation
    or a retry sends a succeeded task back to `pending`), so it always counts the succeeded tasks."""
    old = rows.get("tasks", (ticket, task))
    if old is None:
        return
    was, now = old["state"] == "succeeded", fields.get("state", old["state"]) == "succeeded"
    _update(rows, "tasks", (ticket, task), **fields)
    if was != now:
        row = rows.get("tickets", (ticket,))
        if row is not None:
            row["tasks_done"] += 1 if now else -1
            rows.put("tickets", (ticket,), row)


def _touch_ticket(rows: Rows, seq: int, ticket: str, at: datetime, **fields: Any) -> None:
    _update(rows, "tickets", (ticket,), updated_at=_naive(at), last_seq=seq, **fields)


def _submitted(rows: Rows, seq: int, e: ev.TicketSubmitted) -> None:
    spec = e.spec
    plan = task_plan(Ticket.model_validate(spec))
    rows.put(
        "tickets",
        (e.ticket,),
        {
            "id": e.ticket,
            "title": spec.get("title", ""),
            "owner": spec.get("owner"),
            "state": "running",
            "revision": e.revision,
            "path": e.path,
            "content_hash": e.content_hash,
            "update_kind": spec.get("update", "none"),
            "tasks_total": len(plan),
            "tasks_done": 0,
            "reason": None,
            "submitted_at": _naive(e.at),
            "updated_at": _naive(e.at),
            "ended_at": None,
            "last_seq": seq,
            "awaiting": None,
            "held": None,
            "priority": int(spec.get("priority", 0) or 0),
            **_FRESH_COUNTS,
        },
    )
    keep = {t.id for t in plan}
    for key in _task_keys(rows, e.ticket):
        if key[1] not in keep:  # a revision dropped this step
            rows.delete("tasks", key)
    for t in plan:
        old = rows.get("tasks", (e.ticket, t.id))
        rows.put(
            "tasks",
            (e.ticket, t.id),
            {
                "ticket": e.ticket,
                "task": t.id,
                "kind": t.kind,
                "queue": t.queue,
                "state": "pending",
                "attempt": old["attempt"] if old else 0,
                "needs": list(t.needs),
                "progress_step": None,
                "progress_total": None,
                "worker": None,
                "last_error": None,
                "retry_at": None,
                "updated_at": _naive(e.at),
                "parent": None,
                "waiting": None,
            },
        )


def _subtasks_planned(rows: Rows, seq: int, e: ev.SubtasksPlanned) -> None:
    """The step's subtasks become task rows (with `parent`); the step now also needs them."""
    step = rows.get("tasks", (e.ticket, e.task))
    if step is None:
        return
    ids = [str(sub["id"]) for sub in e.subtasks]
    for sid in ids:
        old = rows.get("tasks", (e.ticket, sid))
        rows.put(
            "tasks",
            (e.ticket, sid),
            {
                **step,
                "task": sid,
                "state": "pending",
                "attempt": old["attempt"] if old else 0,
                "needs": list(step["needs"] or []),
                "progress_step": None,
                "progress_total": None,
                "worker": None,
                "last_error": None,
                "retry_at": None,
                "updated_at": _naive(e.at),
                "parent": e.task,
                "waiting": None,
            },
        )
    _update(rows, "tasks", (e.ticket, e.task), needs=[*(step["needs"] or []), *ids], updated_at=_naive(e.at))
    row = rows.get("tickets", (e.ticket,))
    if row is not None:
        row["tasks_total"] += len(ids)
        rows.put("tickets", (e.ticket,), row)
    _touch_ticket(rows, seq, e.ticket, e.at)


def _step_check(rows: Rows, seq: int, e: ev.StepCheckEvaluated) -> None:
    rows.put(
        "step_checks",
        (seq,),
        {
            "seq": seq,
            "ticket": e.ticket,
            "task": e.task,
            "attempt": e.attempt,
            "phase": e.phase,
            "expected": e.check,
            "ok": e.ok,
            "observed": e.observed,
            "value": e.value,
            "retryable": e.retryable,
            "evaluated_at": _naive(e.at),
        },
    )
    _touch_ticket(rows, seq, e.ticket, e.at)


_FRESH_COUNTS = {
    "retries": 0,
    "loops": 0,
    "forged": 0,
    "violations": 0,
    "contradictions": 0,
    "consistency": 1.0,
    "infra_failures": 0,
}


def _count(rows: Rows, seq: int, ticket: str, at: datetime, **more: int) -> None:
    """Bump trouble counters and recompute the consistency score."""
    row = rows.get("tickets", (ticket,))
    if row is None:
        return
    for key, n in more.items():
        row[key] = row[key] + n
    row["consistency"] = consistency_score(
        row["retries"], row["loops"], row["forged"], row["violations"], row["contradictions"]
    )
    row["updated_at"], row["last_seq"] = _naive(at), seq
    rows.put("tickets", (ticket,), row)


def _cancelled(rows: Rows, seq: int, e: ev.TicketCancelled | ev.TicketFailed) -> None:
    state = "cancelled" if isinstance(e, ev.TicketCancelled) else "failed"
    _touch_ticket(rows, seq, e.ticket, e.at, state=state, reason=e.reason, ended_at=_naive(e.at))
    ticket = rows.get("tickets", (e.ticket,))
    if ticket is None:
        return
    for task in _tasks_of(rows, e.ticket):
        if task["state"] in OPEN:
            _update_task(rows, e.ticket, task["task"], state="cancelled", updated_at=_naive(e.at))
            job = rows.get("jobs", (e.ticket, task["task"], task["attempt"]))
            if job is not None and job["state"] in LIVE:
                _update(
                    rows, "jobs", (e.ticket, task["task"], task["attempt"]), state="cancelled", ended_at=_naive(e.at)
                )


def _tasks_of(rows: Rows, ticket: str) -> list[dict[str, Any]]:
    row = rows.get("tickets", (ticket,))
    if row is None:
        return []
    # The task list is not stored on the ticket row; walk the spec-derived keys we know.
    out = []
    for key in _task_keys(rows, ticket):
        task = rows.get("tasks", key)
        if task is not None:
            out.append(task)
    return out


def _task_keys(rows: Rows, ticket: str) -> list[Key]:
    if isinstance(rows, MemoryRows):
        return list(rows.task_keys.get(ticket, ()))
    if isinstance(rows, SqlRows):
        stored = rows.stored_task_keys(ticket)
        # Rows written or deleted earlier in this transaction are still only in the cache.
        for (table, key), row in rows.cache.items():
            if table == "tasks" and key[0] == ticket:
                (stored.add if row is not None else stored.discard)(key)
        return sorted(stored)
    raise TypeError(type(rows))


def _scheduled(rows: Rows, seq: int, e: ev.AttemptScheduled) -> None:
    _update_task(
        rows,
        e.ticket,
        e.task,
        state="scheduled",
        attempt=e.attempt,
        retry_at=None,
        waiting=None,
        progress_step=None,
        progress_total=None,
        worker=None,
        updated_at=_naive(e.at),
    )
    rows.put(
        "jobs",
        (e.ticket, e.task, e.attempt),
        {
            "ticket": e.ticket,
            "task": e.task,
            "attempt": e.attempt,
            "kind": e.kind,
            "queue": e.queue,
            "state": "scheduled",
            "worker": None,
            "error": None,
            "cause": None,
            "scheduled_at": _naive(e.at),
            "started_at": None,
            "ended_at": None,
        },
    )
    _touch_ticket(rows, seq, e.ticket, e.at)


def _started(rows: Rows, seq: int, e: ev.AttemptStarted) -> None:
    _update_task(rows, e.ticket, e.task, state="running", worker=e.worker, updated_at=_naive(e.at))
    _update(rows, "jobs", (e.ticket, e.task, e.attempt), state="running", worker=e.worker, started_at=_naive(e.at))
    _touch_ticket(rows, seq, e.ticket, e.at)


def _progress(rows: Rows, seq: int, e: ev.ProgressRecorded) -> None:
    _update(rows, "tasks", (e.ticket, e.task), progress_step=e.step, progress_total=e.total, updated_at=_naive(e.at))


def _artifact(rows: Rows, seq: int, e: ev.ArtifactRecorded) -> None:
    if rows.get("artifacts", (e.artifact,)) is None:
        rows.put(
            "artifacts",
            (e.artifact,),
            {
                "id": e.artifact,
                "kind": e.kind,
                "ticket": e.ticket,
                "task": e.task,
                "attempt": e.attempt,
                "meta": dict(e.meta),
                "recorded_at": _naive(e.at),
            },
        )


def _succeeded(rows: Rows, seq: int, e: ev.AttemptSucceeded) -> None:
    _update_task(rows, e.ticket, e.task, state="succeeded", updated_at=_naive(e.at))
    _update(rows, "jobs", (e.ticket, e.task, e.attempt), state="succeeded", ended_at=_naive(e.at))
    for name, value in e.metrics.items():
        rows.put(
            "metrics",
            (e.ticket, e.task, name),
            {
                "ticket": e.ticket,
                "task": e.task,
                "name": name,
                "attempt": e.attempt,
                "value": float(value),
                "recorded_at": _naive(e.at),
            },
        )
    _touch_ticket(rows, seq, e.ticket, e.at)


def _reused(rows: Rows, seq: int, e: ev.AttemptReused) -> None:
    """A cached success: the task succeeds with the source's metrics; no job row (no job ran)."""
    _succeeded_without_job(rows, seq, e.ticket, e.task, e.at, e.metrics)


def _succeeded_without_job(rows: Rows, seq: int, ticket: str, task_id: str, at: Any, metrics: dict) -> None:
    _update_task(rows, ticket, task_id, state="succeeded", last_error=None, updated_at=_naive(at))
    task = rows.get("tasks", (ticket, task_id))
    for name, value in metrics.items():
        rows.put(
            "metrics",
            (ticket, task_id, name),
            {
                "ticket": ticket,
                "task": task_id,
                "name": name,
                "attempt": task["attempt"] if task is not None else 0,
                "value": float(value),
                "recorded_at": _naive(at),
            },
        )
    _touch_ticket(rows, seq, ticket, at)


def _suite_evaluated(rows: Rows, seq: int, e: ev.SuiteEvaluated) -> None:
    """The suite's row for a core version or a candidate: one `evaluations` row per metric."""
    subject = e.proposal or f"v{e.core_version}"
    for metric, value in e.metrics.items():
        rows.put(
            "evaluations",
            (subject, e.component, metric),
            {
                "subject": subject,
                "component": e.component,
                "metric": metric,
                "value": float(value),
                "core_version": e.core_version,
                "proposal": e.proposal,
                "yardstick": e.yardstick,
                "seed": e.seed,
                "checkpoint": e.checkpoint,
                "ticket": e.ticket,
                "seq": seq,
                "evaluated_at": _naive(e.at),
            },
        )


def _sweep_joined(rows: Rows, seq: int, e: ev.SweepJoined) -> None:
    """A matrix step's table (one `sweeps` row per combination) and its joined metrics (no job ran)."""
    for position, row in enumerate(e.rows):
        sub = str(row["subtask"])
        rows.put(
            "sweeps",
            (e.ticket, e.task, sub),
            {
                "ticket": e.ticket,
                "task": e.task,
                "subtask": sub,
                "seq": seq,
                "position": position,
                "params": row.get("params") or {},
                "metrics": row.get("metrics") or {},
                "best": sub == e.best,
                "joined_at": _naive(e.at),
            },
        )
    _succeeded_without_job(rows, seq, e.ticket, e.task, e.at, e.metrics)


def _shards_joined(rows: Rows, seq: int, e: ev.ShardsJoined) -> None:
    """The shards' manifest, joined by the decider: the step's artifact (attempt 0: no job ran)."""
    if rows.get("artifacts", (e.artifact,)) is None:
        rows.put(
            "artifacts",
            (e.artifact,),
            {
                "id": e.artifact,
                "kind": "dataset",
                "ticket": e.ticket,
                "task": e.task,
                "attempt": 0,
                "meta": {"generator": e.outputs.get("generator"), "count": e.manifest.get("count")},
                "recorded_at": _naive(e.at),
            },
        )
    _succeeded_without_job(rows, seq, e.ticket, e.task, e.at, e.metrics)


def _ticket_retried(rows: Rows, seq: int, e: ev.TicketRetried) -> None:
    _touch_ticket(rows, seq, e.ticket, e.at, state="running", reason=None, ended_at=None, awaiting=None)


def _failed(rows: Rows, seq: int, e: ev.AttemptFailed) -> None:
    state = "waiting_retry" if e.retry_at is not None else "failed"
    _update_task(
        rows,
        e.ticket,
        e.task,
        state=state,
        last_error=e.error[-1000:],
        retry_at=_naive(e.retry_at),
        updated_at=_naive(e.at),
    )
    _update(
        rows,
        "jobs",
        (e.ticket, e.task, e.attempt),
        state="failed",
        error=e.error[-1000:],
        cause=e.cause,
        ended_at=_naive(e.at),
    )
    # The infrastructure's failures are counted apart and do not lower the ticket's score.
    _count(rows, seq, e.ticket, e.at, **({"retries": 1} if e.cause == "job" else {"infra_failures": 1}))


def _task_state(state: str) -> Callable[[Rows, int, Any], None]:
    def apply(rows: Rows, seq: int, e: Any) -> None:
        fields: dict[str, Any] = {"state": state, "updated_at": _naive(e.at), "waiting": None}
        if state == "pending":
            fields["last_error"] = None
        else:
            fields["retry_at"] = None
        if state == "blocked" and e.reason.startswith(PROBE_FAILED):  # say what the step's inputs lack
            fields["last_error"] = e.reason
        _update_task(rows, e.ticket, e.task, **fields)
        _touch_ticket(rows, seq, e.ticket, e.at)

    return apply


def _completed(rows: Rows, seq: int, e: ev.TicketCompleted) -> None:
    _touch_ticket(rows, seq, e.ticket, e.at, state="completed", reason=None, ended_at=_naive(e.at))


def _loop(rows: Rows, seq: int, e: ev.LoopDetected) -> None:
    _count(rows, seq, e.ticket, e.at, loops=1)


def _violation(rows: Rows, seq: int, e: ev.SafetyViolation) -> None:
    if e.ticket is not None:
        key = "forged" if e.what == "forged_report" else "violations"
        _count(rows, seq, e.ticket, e.at, **{key: 1})


def _acceptance(rows: Rows, seq: int, e: ev.AcceptanceEvaluated) -> None:
    bad = sum(1 for r in e.results if not r.get("ok") and not str(r.get("check", "")).startswith("run:"))
    _count(rows, seq, e.ticket, e.at, contradictions=bad)


def _promoted(rows: Rows, seq: int, e: ev.CorePromoted) -> None:
    rows.put(
        "core_versions",
        (e.version,),
        {
            "version": e.version,
            "components": dict(e.components),
            "metrics": dict(e.metrics),
            "proposal": e.proposal,
            "actor": e.actor,
            "rollback_to": e.rollback_to,
            "note": e.note,
            "promoted_at": _naive(e.at),
        },
    )


def _proposal_opened(rows: Rows, seq: int, e: ev.ProposalOpened) -> None:
    rows.put(
        "proposals",
        (e.proposal,),
        {
            "id": e.proposal,
            "ticket": e.ticket,
            "kind": e.kind,
            "state": "open",
            "base_core_version": e.base_core_version,
            "candidate": dict(e.candidate),
            "metrics": dict(e.metrics),
            "opened_at": _naive(e.at),
            "expires_at": _naive(e.expires_at),
            "decided_at": None,
            "actor": None,
            "note": None,
        },
    )
    _touch_ticket(rows, seq, e.ticket, e.at, **({"awaiting": e.proposal} if e.kind == "core" else {}))


def _proposal_decided(rows: Rows, seq: int, e: Any) -> None:
    state = {
        "ProposalApproved": "approved",
        "ProposalRejected": "rejected",
        "ProposalExpired": "expired",
        "ProposalWithdrawn": "withdrawn",
    }[e.type]
    note = getattr(e, "note", None) or getattr(e, "reason", None)
    _update(
        rows,
        "proposals",
        (e.proposal,),
        state=state,
        decided_at=_naive(e.at),
        actor=getattr(e, "actor", None),
        note=note,
    )
    ticket = rows.get("tickets", (e.ticket,))
    cleared = {"awaiting": None} if ticket is not None and ticket["awaiting"] == e.proposal else {}
    _touch_ticket(rows, seq, e.ticket, e.at, **cleared)


def _adapter_activated(rows: Rows, seq: int, e: ev.AdapterActivated) -> None:
    for component, out in e.adapters.items():
        aid = ev.adapter_id(e, component)
        rank = out.get("rank")
        rows.put(
            "adapters",
            (aid,),
            {
                "id": aid,
                "ticket": e.ticket,
                "task": out.get("task"),
                "component": component,
                "base_core_version": e.core_version,
                "core_checkpoint": out.get("core_checkpoint"),
                "artifact": out.get("checkpoint"),
                "rank": int(rank) if isinstance(rank, int | float) else None,
                "metrics": dict(e.metrics.get(component, {})),
                "active": True,
                "activated_at": _naive(e.at),
                "retired_at": None,
                "retired_reason": None,
                "retired_detail": None,
                "replaced_by": None,
            },
        )
    _touch_ticket(rows, seq, e.ticket, e.at)


def _adapter_retired(rows: Rows, seq: int, e: ev.AdapterRetired) -> None:
    _update(
        rows,
        "adapters",
        (e.adapter,),
        active=False,
        retired_at=_naive(e.at),
        retired_reason=e.reason,
        retired_detail=e.detail or None,
        replaced_by=e.replaced_by,
    )


def _held(rows: Rows, seq: int, e: ev.TicketHeld) -> None:
    _touch_ticket(rows, seq, e.ticket, e.at, held=e.reason)


def _released(rows: Rows, seq: int, e: ev.TicketReleased) -> None:
    _touch_ticket(rows, seq, e.ticket, e.at, held=None)


def _priority(rows: Rows, seq: int, e: ev.PriorityChanged) -> None:
    _touch_ticket(rows, seq, e.ticket, e.at, priority=e.priority)


def _deferred(rows: Rows, seq: int, e: ev.TaskDeferred) -> None:
    _update_task(rows, e.ticket, e.task, waiting=e.reason, updated_at=_naive(e.at))
    _touch_ticket(rows, seq, e.ticket, e.at)


def _stopped(rows: Rows, seq: int, e: ev.AttemptStopped) -> None:
    _update_task(rows, e.ticket, e.task, state="pending", worker=None, updated_at=_naive(e.at))
    _update(rows, "jobs", (e.ticket, e.task, e.attempt), state="stopped", error=e.error or None, ended_at=_naive(e.at))
    _touch_ticket(rows, seq, e.ticket, e.at)


def _other(rows: Rows, seq: int, e: Any) -> None:
    ticket = getattr(e, "ticket", None)
    if isinstance(ticket, str):
        _touch_ticket(rows, seq, ticket, e.at)


_PROJECTORS: dict[type, Callable[[Rows, int, Any], None]] = {
    ev.TicketSubmitted: _submitted,
    ev.TicketCancelled: _cancelled,
    ev.TicketFailed: _cancelled,
    ev.AttemptScheduled: _scheduled,
    ev.AttemptStarted: _started,
    ev.ProgressRecorded: _progress,
    ev.ArtifactRecorded: _artifact,
    ev.AttemptSucceeded: _succeeded,
    ev.AttemptFailed: _failed,
    ev.TaskFailed: _task_state("failed"),
    ev.TaskBlocked: _task_state("blocked"),
    ev.SubtasksPlanned: _subtasks_planned,
    ev.StepCheckEvaluated: _step_check,
    ev.TaskRetried: _task_state("pending"),
    ev.TicketCompleted: _completed,
    ev.ProposalOpened: _proposal_opened,
    ev.ProposalApproved: _proposal_decided,
    ev.ProposalRejected: _proposal_decided,
    ev.ProposalExpired: _proposal_decided,
    ev.ProposalWithdrawn: _proposal_decided,
    ev.LoopDetected: _loop,
    ev.SafetyViolation: _violation,
    ev.AcceptanceEvaluated: _acceptance,
    ev.CorePromoted: _promoted,
    ev.AttemptReused: _reused,
    ev.SweepJoined: _sweep_joined,
    ev.SuiteEvaluated: _suite_evaluated,
    ev.ShardsJoined: _shards_joined,
    ev.TicketRetried: _ticket_retried,
    ev.AdapterActivated: _adapter_activated,
    ev.AdapterRetired: _adapter_retired,
    ev.TicketHeld: _held,
    ev.TicketReleased: _released,
    ev.PriorityChanged: _priority,
    ev.TaskDeferred: _deferred,
    ev.AttemptStopped: _stopped,
}


def project(rows: Rows, seq: int, event: ev.Event) -> None:
    """Apply one recorded event to the projection tables."""
    _PROJECTORS.get(type(event), _other)(rows, seq, event)


def project_all(rows: Rows, recorded: Iterable[tuple[int, ev.Event]]) -> None:
    for seq, event in recorded:
        project(rows, seq, event)
