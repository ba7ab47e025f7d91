"""A ticket run's plan (its tasks, their queues and order) and the task statuses, for every reader.

The decider's state (`daemon/state.py`) and the SQL projections (`schema/projections.py`) both build
a run from `task_plan`, so the two can never disagree about which tasks a ticket has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from schema.ticket import RunCheck, Ticket

TaskStatus = Literal["pending", "scheduled", "running", "waiting_retry", "succeeded", "failed", "blocked", "cancelled"]

LIVE: frozenset[str] = frozenset({"scheduled", "running"})  # a job is out for the task (jobs use the same two)
OPEN: frozenset[str] = LIVE | {"pending", "waiting_retry"}  # not ended: an ended ticket cancels these

ACCEPT_PREFIX = "accept-"  # task id of the n-th acceptance check that runs a command: accept-<n>


@dataclass(frozen=True)
class PlannedTask:
    id: str
    kind: str
    queue: str
    needs: tuple[str, ...]
    params: dict[str, Any]
    timeout: float
    retries: int


def task_plan(ticket: Ticket) -> list[PlannedTask]:
    """The tasks of a fresh run: the steps, then one `check` task per `run:` acceptance check (after
    every step, on the cpu queue, never retried)."""
    plan = [
        PlannedTask(s.id, s.kind, s.effective_queue, tuple(s.needs), dict(s.with_), s.timeout, s.retries)
        for s in ticket.steps
    ]
    step_ids = tuple(s.id for s in ticket.steps)
    for n, check in enumerate(ticket.acceptance, start=1):
        if isinstance(check, RunCheck):
            plan.append(
                PlannedTask(f"{ACCEPT_PREFIX}{n}", "check", "cpu", step_ids, {"run": list(check.run)}, check.timeout, 0)
            )
    return plan
