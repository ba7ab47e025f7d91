"""A ticket run's plan (its tasks, their queues and order) and the task statuses, for every reader.

The decider's state (`daemon/state.py`) and the SQL projections (`schema/projections.py`) both build
a run from `task_plan`, so the two can never disagree about which tasks a ticket has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from schema.reasons import PROBE_FAILED as PROBE_FAILED  # re-exported: the planner's callers import it here
from schema.ticket import RunCheck, Step, Ticket, shard_files

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


# --- subtasks --------------------------------------------------------------------------------------
# A step may fan out into subtasks: tasks of the same kind, each its own job with its own attempts and
# retries, which the step then joins (its own job runs last, with the subtasks' outputs as inputs).
# Subtask ids are `<step>-S<k>`: the capital S can never appear in a step id, so they never collide.
SUBTASK_MARK = "-S"


@dataclass(frozen=True)
class PlannedSubtask:
    """One subtask: its id and the parameters it adds to its step's (keys starting with `_`)."""

    id: str
    params: dict[str, Any]


def subtask_id(step: str, k: int) -> str:
    return f"{step}{SUBTASK_MARK}{k}"


def parent_of(task_id: str) -> str | None:
    """The step a subtask id belongs to, or None for a step (or check) id."""
    step, mark, k = task_id.rpartition(SUBTASK_MARK)
    return step if mark and k.isdigit() else None


def plan_subtasks(step: Step) -> list[PlannedSubtask]:
    """The subtasks a step fans out into when it becomes runnable (none: it runs as one job). The one
    place that decides it: shards of a synthesize step, or one subtask per `matrix:` combination."""
    return matrix_subtasks(step) if step.matrix else shard_subtasks(step)


def join_of(step: Step) -> Literal["manifest", "select"]:
    """How a fanned-out step joins its subtasks, both without a job: the decider joins the shards'
    manifest from their reports (ShardsJoined), or selects the best combination (matrix, SweepJoined)."""
    return "select" if step.matrix else "manifest"


def matrix_subtasks(step: Step) -> list[PlannedSubtask]:
    """A `matrix:` step as one subtask per combination of its values (the product, the first key
    varying slowest, as written), each with its combination overlaid on the step's `with:`."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in (step.matrix or {}).items():
        combos = [{**c, key: v} for c in combos for v in values]
    return [PlannedSubtask(subtask_id(step.id, k), combo) for k, combo in enumerate(combos)]


def shard_subtasks(step: Step) -> list[PlannedSubtask]:
    """A synthesize step with `shards: N` (or a size that implies N) as N subtasks, each generating a
    contiguous range `[first, stop)` of the dataset's shard files (the files a single job would write,
    in order, so the joined manifest is the single job's). One shard, or any other kind: none.

    Largest first: ranges differ by one file at most, the longer ones first, and the remainder file
    (when `count` is not a multiple of `shard_size`) is the last; subtasks are dispatched in this
    order, so the last to start is never longer than one before it and the workers' idle tail
    (one waiting for the other's last range) stays short."""
    n = step.shard_count  # `shards:`, or what the step's size implies (schema.ticket.implied_shards)
    if n <= 1 or step.kind != "synthesize":
        return []
    files = shard_files(step)
    planned, first = [], 0
    for k in range(n):
        stop = first + files // n + (1 if k < files % n else 0)
        planned.append(
            PlannedSubtask(subtask_id(step.id, k), {"_shard": {"subtask": k, "of": n, "first": first, "stop": stop}})
        )
        first = stop
    return planned
