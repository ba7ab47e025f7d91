"""Commands: what may be asked of the decider. Each carries `now`, so the decider needs no clock."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schema.events import FailureCause, GpuCard
from schema.ticket import MAX_PRIORITY, Ticket


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    now: datetime
    actor: str | None = None


class SubmitTicket(Command):
    """A ticket file appeared or changed. `ticket` is None when it failed validation (`errors`)."""

    path: str
    content_hash: str
    ticket: Ticket | None = None
    ticket_id: str | None = None  # best guess from the file name, for rejected files
    errors: list[str] = Field(default_factory=list)
    allowed_binaries: list[str] = Field(default_factory=list)  # the installation's extra check allowlist
    after_line: int = 1  # where the file says `after:` (for a cycle through other tickets)


class TicketFileRemoved(Command):
    path: str


class CancelTicket(Command):
    ticket: str
    reason: str = "cancelled by a user"


class Tick(Command):
    """Time passed: due retries, deadlines and proposal expiries."""


class ScheduleTask(Command):
    """Schedule a task's next attempt if it is runnable and not yet scheduled (idempotent)."""

    ticket: str
    task: str


class RetryTask(Command):
    """A human's way out of a blocked task (a failed task ends its ticket; resubmit that instead)."""

    ticket: str
    task: str


class RetryFrom(Command):
    """`jbctl retry TICKET --from STEP`: run an ended ticket again from STEP, keeping what is upstream."""

    ticket: str
    task: str


class ClearCache(Command):
    """`jbctl cache clear`: forget the recorded successes that match every filter given (all: none given)."""

    kind: str | None = None
    ticket: str | None = None
    key: str | None = None  # a key or a prefix of one


class _Report(Command):
    ticket: str
    task: str
    attempt: int
    report_seq: int = 0
    # The sending worker (every worker report names it; the reconciler's commands do not): recorded
    # when a late report is refused, so the log says which host came back.
    sender: str | None = None


class RecordJobStarted(_Report):
    worker: str


class RecordProgress(_Report):
    step: int
    total: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class RecordCheckpoint(_Report):
    path: str
    step: int


class RecordArtifact(_Report):
    artifact: str
    kind: str
    meta: dict[str, Any] = Field(default_factory=dict)


class RecordJobSucceeded(_Report):
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class RecordJobFailed(_Report):
    error: str
    retryable: bool = True
    violation: str | None = None  # set when the failure is a safety violation
    cause: FailureCause = "job"  # `infrastructure`: the reconciler's verdict on a lost worker or job


class RecordViolation(Command):
    """Something untrustworthy arrived (a forged report, a refused job)."""

    what: str
    detail: str
    ticket: str | None = None
    task: str | None = None
    attempt: int | None = None


class RecordHomeOwner(Command):
    """The owner of the Jetbox home (recorded once, at the first start; later ones are no-ops)."""

    user: str
    uid: int | None = None
    home: str


class ApproveProposal(Command):
    """A human approves; `approvers` is the installation's setting (`decider.may_approve` says who may)."""

    proposal: str
    note: str | None = None
    scope: Literal["ticket", "all"] = "ticket"
    approvers: list[str] = Field(default_factory=list)


class RejectProposal(Command):
    proposal: str
    reason: str


class ReevaluateProposal(Command):
    """Set a stale core proposal aside and run its evaluation again against the current core."""

    proposal: str


class RollbackCore(Command):
    """Make an earlier core version current again (a new version with its components)."""

    version: int
    note: str | None = None


class RunSuite(Command):
    """`jbctl eval`: measure a core version (`core_version`) or a core proposal's candidate
    (`proposal`) on the standing evaluation suite, as a suite ticket."""

    core_version: int | None = None
    proposal: str | None = None


class PlanMilestones(Command):
    """`jbctl plan apply`: the plan's milestones (each as MilestonePlanned records its `spec`)."""

    plan: str
    path: str
    milestones: list[dict[str, Any]]


class RetireAdapter(Command):
    """`jbctl adapters retire A-n`: the adapter stops applying (inference and later tickets refuse it)."""

    adapter: str
    reason: str = "retired by a user"


class HoldTicket(Command):
    """Schedule nothing more of the ticket until released; `stop`: live attempts stop at their next
    checkpoint (and resume from it on release) instead of finishing."""

    ticket: str
    reason: str | None = None
    stop: bool = False


class ReleaseTicket(Command):
    ticket: str


class SetPriority(Command):
    ticket: str
    priority: int = Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)


class PauseInstallation(Command):
    """Maintenance: nothing new is scheduled anywhere; live attempts finish."""

    reason: str | None = None


class ResumeInstallation(Command):
    pass


class SetQueueLimits(Command):
    """The daemon's `queue_limits` setting (at start and on reload); recorded only when it changed."""

    limits: dict[str, int]
    gpu_memory: dict[str, int] = Field(default_factory=dict)  # queue_gpu_memory, in bytes


class RecordWorkerAdvertised(Command):
    """A worker's signed advert (inbox): what it has. Recorded only when new or changed."""

    worker: str
    node: str
    queues: list[str]
    gpus: list[GpuCard] = Field(default_factory=list)
    cpus: float = 0.0
    memory: int = 0
    detected: bool = False


class RecordWorkerGone(Command):
    """A worker said goodbye (inbox) or its liveness key expired (reconciler)."""

    worker: str
    reason: Literal["departed", "lost"]
    detail: str = ""
