"""A ticket as `jbctl status` and the console show it, from its projection rows (plain dicts).

Pure functions, no database and no heavy imports: `jbctl status` reads the rows with the sqlite3
module (schema/status_sqlite.py) or through SQLAlchemy (schema/readmodel.py) and shapes them here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from schema.reasons import PROBE_FAILED

Key = tuple[Any, str]  # (submitted_at, id): the order tickets are listed in


def human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def naive_dt(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def age(ts: datetime | str | None, now: datetime) -> str:
    if ts is None:
        return ""
    return human_age((now - naive_dt(ts)).total_seconds())


def topo(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks in dependency order (`needs` first), stable otherwise."""
    by_id = {t["task"]: t for t in tasks}
    seen: set[str] = set()
    out: list[dict[str, Any]] = []

    def visit(tid: str) -> None:
        if tid in seen or tid not in by_id:
            return
        seen.add(tid)
        for need in by_id[tid]["needs"] or []:
            visit(need)
        out.append(by_id[tid])

    for t in tasks:
        visit(t["task"])
    return out


def waiting_on(task_rows: list[dict[str, Any]], now: datetime, awaiting: str | None = None) -> str:
    """What a running ticket waits for, in words (with the command that unblocks it)."""
    if awaiting:
        return f"approval: jbctl approve {awaiting}"
    by_id = {t["task"]: t for t in task_rows}
    for t in task_rows:  # a human's action first: nothing else frees a blocked task
        if t["state"] == "blocked":
            why = str(t.get("last_error") or "")
            if why.startswith(PROBE_FAILED):  # say what the step's inputs lack, not only who can act
                return f"{t['task']}: {why.split('; fix the input')[0]} (then jbctl retry --task {t['task']})"
            return f"human: jbctl retry --task {t['task']}"
    for t in task_rows:
        if t.get("waiting") and t["state"] in ("pending", "waiting_retry"):
            return f"{t['task']}: {t['waiting']}"  # held, paused, after:, a limit (TaskWaiting)
    for t in task_rows:
        if t["state"] == "waiting_retry" and t["retry_at"] is not None:
            return f"retry of {t['task']} in {age(now, naive_dt(t['retry_at']))}".replace(" in -", " in ")
        if t["state"] == "scheduled":
            return f"a {t['queue']} worker for {t['task']}"
    pending = [t for t in task_rows if t["state"] == "pending"]
    for t in pending:
        missing = [n for n in (t["needs"] or []) if by_id.get(n, {}).get("state") != "succeeded"]
        if missing:
            return f"{t['task']} needs {', '.join(missing)}"
    return ""


def current_step(task_rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(the live task in words, its progress as `step/total (pct%)`)."""
    live = [t for t in task_rows if t["state"] in ("running", "scheduled", "waiting_retry", "blocked")]
    if not live:
        return "", ""
    t = live[0]
    progress = ""
    if t["progress_step"] is not None:
        total = t["progress_total"]
        progress = f"{t['progress_step']}/{total}" if total else str(t["progress_step"])
        if total:
            progress += f" ({100 * t['progress_step'] / total:.0f}%)"
    return f"{t['task']} (attempt {t['attempt']}, {t['state']})", progress


def summary(t: dict[str, Any], task_rows: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """A ticket as its list row shows it (the same fields `jbctl status --json` prints)."""
    step, progress = current_step(task_rows)
    live = next((k for k in task_rows if k["state"] in ("running", "scheduled", "waiting_retry", "blocked")), None)
    fraction = None
    if live is not None and live["progress_step"] is not None and live["progress_total"]:
        fraction = min(1.0, live["progress_step"] / live["progress_total"])
    return {
        "ticket": t["id"],
        "title": t["title"],
        "state": t["state"],
        "revision": t["revision"],
        "current_step": step,
        "progress": progress,
        "progress_fraction": fraction,
        "tasks_done": t["tasks_done"],
        "tasks_total": t["tasks_total"],
        "age": age(t["submitted_at"], now),
        "submitted_at": t["submitted_at"],
        "waiting_on": waiting_on(task_rows, now, t["awaiting"]) if t["state"] == "running" else "",
        "reason": t["reason"],
        "awaiting_approval": t["awaiting"],
        "held": t.get("held"),
        "priority": t.get("priority", 0),
        "consistency": t["consistency"],
        "trouble": {k: t[k] for k in ("retries", "loops", "forged", "violations", "contradictions")},
        "last_seq": t["last_seq"],
    }


def status_row(
    t: dict[str, Any], task_rows: list[dict[str, Any]], job_rows: list[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """A ticket as `jbctl status --json` prints it: its list row (`summary`) and its task -> attempt tree."""
    attempts: dict[str, list[dict[str, Any]]] = {}
    for j in job_rows:
        attempts.setdefault(j["task"], []).append({k: v for k, v in j.items() if k not in ("ticket", "task")})
    return {
        **summary(t, task_rows, now),
        "tasks": [
            {**{k: v for k, v in task.items() if k != "ticket"}, "attempts": attempts.get(task["task"], [])}
            for task in task_rows
        ],
    }


def _order(key: Key) -> tuple[Any, str]:
    return (key[0] or datetime.min, key[1])
