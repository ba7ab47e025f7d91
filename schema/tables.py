"""SQL tables: the event log, its head, reactor checkpoints, and the projections built from the log.

The projections are a cache: `jbctl replay` rebuilds them from `events` alone. Column names are a
public interface (docs/EVENTS.md): users query them with plain SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.JSON, nullable=nullable))


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.DateTime(), nullable=nullable, index=index))


# The event types the type index leaves out: the progress reports, 94% of a training log, which no
# reader looks up by type (the console reads a ticket's through the stream index). Each indexed row
# cost pages of WAL in every commit (one of the six a single-event commit wrote, docs/BENCHMARKS.md).
UNINDEXED_TYPES = ("ProgressRecorded",)
# The index's condition, as SQL text: a query by type must carry it, word for word, for SQLite to use
# the partial index (its planner matches the term, it does not infer it from `type IN (...)`).
TYPE_INDEXED = "type <> 'ProgressRecorded'"


def type_indexed(types: Sequence[str]) -> bool:
    """Whether a query for these event types can read ix_events_type (adding `TYPE_INDEXED`)."""
    return not set(types) & set(UNINDEXED_TYPES)


class EventRow(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
        sa.Index(
            "ix_events_type",
            "type",
            sqlite_where=sa.text(TYPE_INDEXED),
            postgresql_where=sa.text(TYPE_INDEXED),
        ),
    )

    # On SQLite `seq` is the rowid (INTEGER PRIMARY KEY: no separate key index); 64-bit either way.
    seq: int = Field(
        sa_column=sa.Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False)
    )
    stream: str = Field(max_length=200)  # found through uq_events_stream_version (stream, version)
    version: int
    type: str = Field(max_length=100)  # ix_events_type: every type but UNINDEXED_TYPES
    data: dict = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    meta: dict = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    recorded_at: datetime = Field(sa_column=sa.Column(sa.DateTime(), nullable=False))
    hash: str = Field(max_length=64)


class EventHead(SQLModel, table=True):
    """One row: the last seq and hash. Writers lock it, which serialises appends on every backend."""

    __tablename__ = "event_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False, default=0))
    hash: str = Field(default="0" * 64, max_length=64)


class Checkpoint(SQLModel, table=True):
    """How far each reactor (dispatcher, notifier, ...) has read the log."""

    __tablename__ = "checkpoints"

    name: str = Field(primary_key=True, max_length=100)
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    updated_at: datetime | None = _ts()


# --- projections -------------------------------------------------------------------------------


class TicketRow(SQLModel, table=True):
    __tablename__ = "tickets"
    # The console's pages: newest first (ties by id), optionally of one state, read straight off an index.
    __table_args__ = (
        sa.Index("ix_tickets_submitted_at_id", "submitted_at", "id"),
        sa.Index("ix_tickets_state_submitted_at_id", "state", "submitted_at", "id"),
        # `jbctl status`: the live tickets (ended_at NULL) newest first, and those that ended since a
        # time, read off the index alone; the tickets waiting on a proposal, without a table scan.
        sa.Index("ix_tickets_ended_at_submitted_at_id", "ended_at", "submitted_at", "id"),
        sa.Index("ix_tickets_state_awaiting", "state", "awaiting"),
    )

    id: str = Field(primary_key=True, max_length=100)
    title: str
    owner: str | None = None
    state: str = Field(max_length=20, index=True)
    revision: int
    path: str
    content_hash: str = Field(max_length=64)
    update_kind: str = Field(max_length=20)
    tasks_total: int
    tasks_done: int
    reason: str | None = None
    submitted_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    last_seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    awaiting: str | None = Field(default=None, max_length=20)
    retries: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    loops: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    forged: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    violations: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    contradictions: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    consistency: float = Field(default=1.0, sa_column=sa.Column(sa.Float, nullable=False, server_default="1.0"))
    # Attempts the infrastructure lost (dead worker, vanished job): retried, outside the score.
    infra_failures: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    held: str | None = None  # why it is held (TicketHeld); None when not
    priority: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"

    ticket: str = Field(primary_key=True, max_length=100)
    task: str = Field(primary_key=True, max_length=100)
    kind: str = Field(max_length=20)
    queue: str = Field(max_length=20)
    state: str = Field(max_length=20, index=True)
    attempt: int
    needs: list | None = _json()
    progress_step: int | None = None
    progress_total: int | None = None
    worker: str | None = None
    last_error: str | None = None
    retry_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    # A subtask's step (a step fanned out with `shards:`); NULL for the ticket's own steps and checks.
    parent: str | None = Field(default=None, max_length=100)
    waiting: str | None = None  # why a ready task is not scheduled (TaskWaiting); None when it is not waiting


class JobRow(SQLModel, table=True):
    """One row per attempt (an action: one job on one worker)."""

    __tablename__ = "jobs"

    ticket: str = Field(primary_key=True, max_length=100)
    task: str = Field(primary_key=True, max_length=100)
    attempt: int = Field(primary_key=True)
    kind: str = Field(max_length=20)
    queue: str = Field(max_length=20)
    state: str = Field(max_length=20, index=True)
    worker: str | None = None
    error: str | None = None
    cause: str | None = Field(default=None, max_length=20)  # a failed attempt's: job or infrastructure
    scheduled_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()


class ProposalRow(SQLModel, table=True):
    __tablename__ = "proposals"

    id: str = Field(primary_key=True, max_length=20)
    ticket: str = Field(max_length=100, index=True)
    kind: str = Field(max_length=20)
    state: str = Field(max_length=20, index=True)
    base_core_version: int
    candidate: dict | None = _json()
    metrics: dict | None = _json()
    opened_at: datetime | None = _ts()
    expires_at: datetime | None = _ts()
    decided_at: datetime | None = _ts()
    actor: str | None = None
    note: str | None = None


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "artifacts"

    id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=40, index=True)
    ticket: str = Field(max_length=100, index=True)
    task: str = Field(max_length=100)
    attempt: int
    meta: dict | None = _json()
    recorded_at: datetime | None = _ts()


class MetricRow(SQLModel, table=True):
    """The final metrics of each task's successful attempt: `<task>.<name>` in acceptance checks."""

    __tablename__ = "metrics"

    ticket: str = Field(primary_key=True, max_length=100)
    task: str = Field(primary_key=True, max_length=100)
    name: str = Field(primary_key=True, max_length=100)
    attempt: int
    value: float
    recorded_at: datetime | None = _ts()


class StepCheckRow(SQLModel, table=True):
    """Every probe (a step's inputs, before dispatch) and expectation (its own metrics, when an attempt
    succeeds): what was predicted and what was seen. One row per StepCheckEvaluated event."""

    __tablename__ = "step_checks"

    seq: int = Field(sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False))
    ticket: str = Field(max_length=100, index=True)
    task: str = Field(max_length=100)
    attempt: int  # the attempt an expectation judged; 0 for a probe
    phase: str = Field(max_length=10)  # probe | expect
    expected: str  # the check, as written: what was predicted
    ok: bool
    observed: str
    value: float | None = None
    retryable: bool
    evaluated_at: datetime | None = _ts()


class CoreVersionRow(SQLModel, table=True):
    """The abstract core's history: one row per version (promotions and rollbacks)."""

    __tablename__ = "core_versions"

    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    components: dict | None = _json()
    metrics: dict | None = _json()
    proposal: str | None = Field(default=None, max_length=20)
    actor: str
    rollback_to: int | None = None
    note: str | None = None
    promoted_at: datetime | None = _ts()


class AdapterRow(SQLModel, table=True):
    """Working memory: one row per adapter, active until replaced, rolled past, or retired by hand."""

    __tablename__ = "adapters"

    id: str = Field(primary_key=True, max_length=120)  # A-<n>
    ticket: str = Field(max_length=100, index=True)
    task: str | None = Field(default=None, max_length=100)
    component: str = Field(max_length=40)
    base_core_version: int
    core_checkpoint: str | None = Field(default=None, max_length=80)  # the core weights it is a delta on
    artifact: str | None = Field(default=None, max_length=80)  # the adapter file (sha256)
    rank: int | None = None
    metrics: dict | None = _json()
    active: bool = Field(index=True)
    activated_at: datetime | None = _ts()
    retired_at: datetime | None = _ts()
    retired_reason: str | None = Field(default=None, max_length=20)  # replaced | core_rolled | manual
    retired_detail: str | None = None
    replaced_by: str | None = Field(default=None, max_length=120)


class SweepRow(SQLModel, table=True):
    """One combination of a joined `matrix:` step (SweepJoined): its parameters, its metrics, and
    whether the step chose it. A later join of the same step rewrites its rows (`seq` names the join:
    rows of an earlier join with another matrix keep their older seq)."""

    __tablename__ = "sweeps"

    ticket: str = Field(primary_key=True, max_length=100)
    task: str = Field(primary_key=True, max_length=100)  # the step
    subtask: str = Field(primary_key=True, max_length=100)
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))  # the SweepJoined event
    position: int  # combination order (the tie rule: the first wins)
    params: dict | None = _json()
    metrics: dict | None = _json()
    best: bool
    joined_at: datetime | None = _ts()


class EvaluationRow(SQLModel, table=True):
    """One metric of the standing evaluation suite (SuiteEvaluated) for a core version (`v3`) or a
    proposal's candidate (`P-4`): every version's row side by side is the core's history as a table.
    A later run for the same subject and component rewrites its rows."""

    __tablename__ = "evaluations"

    subject: str = Field(primary_key=True, max_length=40)  # v<N> or P-<n>
    component: str = Field(primary_key=True, max_length=100)
    metric: str = Field(primary_key=True, max_length=200)
    value: float
    core_version: int | None = Field(default=None, index=True)
    proposal: str | None = Field(default=None, max_length=40)
    yardstick: str = Field(max_length=100)
    seed: int
    checkpoint: str = Field(max_length=200)
    ticket: str = Field(max_length=100)
    seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    evaluated_at: datetime | None = _ts()


PROJECTION_TABLES: list[str] = [
    "tickets",
    "tasks",
    "jobs",
    "proposals",
    "artifacts",
    "metrics",
    "core_versions",
    "step_checks",
    "adapters",
    "sweeps",
    "evaluations",
]

# Plain SQL views (dialect-neutral) for the questions users ask most.
VIEWS: dict[str, str] = {
    "timeline": (
        "SELECT e.seq, e.recorded_at, e.stream, e.type, e.version, e.data, e.meta FROM events e ORDER BY e.seq"
    ),
    "pending_approvals": (
        "SELECT p.id, p.ticket, p.kind, p.base_core_version, p.opened_at, p.expires_at, p.metrics "
        "FROM proposals p WHERE p.state = 'open'"
    ),
}


def metadata() -> sa.MetaData:
    return SQLModel.metadata
