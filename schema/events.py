"""Event types: the facts Jetbox records. Their JSON bodies are a public interface (docs/EVENTS.md).

Each event class is a frozen pydantic model; its `type` column value is the class name. Events only
ever gain optional fields; a breaking change gets a new class.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

SYSTEM_STREAM = "system"
INTAKE_STREAM = "intake"
CORE_STREAM = "core"
PLAN_STREAM = "plan"


class Event(BaseModel):
    """Base of every event. `at` is the decider's notion of now, passed in by the command."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    registry: ClassVar[dict[str, Any]] = {}

    at: datetime

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Event.registry[cls.__name__] = cls

    @property
    def type(self) -> str:
        return type(self).__name__


class TicketEvent(Event):
    ticket: str


class TaskEvent(TicketEvent):
    task: str


class AttemptEvent(TaskEvent):
    attempt: int = Field(ge=1)


# --- intake ---------------------------------------------------------------------------------


class TicketSubmitted(TicketEvent):
    """A valid ticket file was accepted: a new ticket or a new revision of a finished one."""

    path: str
    content_hash: str
    revision: int = Field(ge=1)
    spec: dict[str, Any]  # the validated Ticket, as JSON
    allowed_binaries: list[str] = Field(default_factory=list)  # the installation's extra check allowlist


class TicketRejected(Event):
    """An invalid ticket file; `errors` are `FILE:LINE:COL: message` lines."""

    path: str
    content_hash: str
    ticket: str | None = None
    errors: list[str]


class TicketRevisionRefused(TicketEvent):
    """A changed file for a ticket that is still running: recorded, not applied."""

    path: str
    content_hash: str
    reason: str


class TicketCancelled(TicketEvent):
    reason: str
    actor: str | None = None
    path: str | None = None  # set when removing the ticket file cancelled it


# --- tasks and attempts ------------------------------------------------------------------------


class AttemptScheduled(AttemptEvent):
    """A task's attempt is ready to run: the dispatcher enqueues it."""

    kind: str
    queue: str
    params: dict[str, Any]
    timeout: float
    resume_checkpoint: str | None = None
    network: Literal["deny", "allow"] = "deny"
    device: str = "auto"
    # Placement: the ticket's priority when it was chosen, since when it had waited (None: at once),
    # and the GPU memory it claims on its queue (bytes; None where the queue's memory is not counted).
    priority: int = 0
    waited_since: datetime | None = None
    gpu_memory: int | None = None
    # Placement onto an advertised worker (docs/SCHEDULING.md): the worker whose own queue gets the job,
    # and the cards it runs on (ids as the worker advertised them); `gpu_memory` is then the claim on
    # each of those cards. None/empty where the step's queue has no advertised worker.
    worker: str | None = None
    gpus: list[str] = Field(default_factory=list)
    cache_key: str | None = None  # set when the step is cached: its success is recorded under this key
    resume_key: str | None = None  # the key without the training budget (resuming when only it grew)


class AttemptReused(TaskEvent):
    """A step's key had a recorded success: its outputs are reused at once, no job runs. The source
    names the attempt that produced them (possibly in another ticket)."""

    cache_key: str
    source_ticket: str
    source_task: str
    source_attempt: int
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class TaskWaiting(TaskEvent):
    """The task's step (same key) is running in another task: it stays pending, no job is queued,
    and it reuses that result when it succeeds (or runs itself if it does not)."""

    cache_key: str
    holder_ticket: str
    holder_task: str


class CacheCleared(Event):
    """`jbctl cache clear`: these keys' recorded successes are forgotten (the steps run again)."""

    keys: list[str]
    actor: str | None = None
    reason: str = ""


class TicketRetried(TicketEvent):
    """`jbctl retry TICKET --from STEP`: an ended ticket runs again from STEP (its TaskRetried follow);
    the steps upstream of it keep their results."""

    from_task: str
    actor: str | None = None


class AttemptStarted(AttemptEvent):
    worker: str
    report_seq: int = 0


class ProgressRecorded(AttemptEvent):
    step: int
    total: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    report_seq: int = 0


class CheckpointSaved(AttemptEvent):
    path: str
    step: int
    report_seq: int = 0


class ArtifactRecorded(AttemptEvent):
    artifact: str  # sha256
    kind: str
    meta: dict[str, Any] = Field(default_factory=dict)
    report_seq: int = 0


class AttemptSucceeded(AttemptEvent):
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    report_seq: int = 0


FailureCause = Literal["job", "infrastructure"]


class AttemptFailed(AttemptEvent):
    """An attempt ended badly. `retry_at` set: another attempt follows then; unset: the task failed.

    `cause`: `job` when the job itself failed (its own report); `infrastructure` when the reconciler
    failed it for a lost worker, a vanished RQ job or a dead worker's timeout. Only job failures
    count towards loop detection."""

    error: str
    fingerprint: str
    retry_at: datetime | None = None
    retryable: bool = True
    report_seq: int = 0
    cause: FailureCause = "job"


class StaleReportRefused(AttemptEvent):
    """A worker's report for an attempt the log has already ended (a later attempt took over, or the
    reconciler failed it while its worker was cut off): fenced by the attempt number, recorded, never
    applied. `attempt` is the report's; `current_attempt` the task's at the time. Progress reports
    are refused without an event (they carry no result, and a worker that comes back may send many)."""

    current_attempt: int
    report: str  # started, checkpoint, artifact, succeeded or failed
    report_seq: int = 0
    worker: str | None = None


class TaskFailed(TaskEvent):
    reason: str


class TaskBlocked(TaskEvent):
    """Loop detection stopped the retries, or a probe on the step's inputs failed; a human
    `jbctl retry` is the way out."""

    reason: str


class TaskRetried(TaskEvent):
    """A human asked for another go at a failed or blocked task."""

    actor: str | None = None
    fresh: bool = False  # run it, even if its key has a recorded success (`jbctl retry --from`)


class SubtasksPlanned(TaskEvent):
    """A step fanned out: each subtask is a task of the step's kind with the step's parameters plus
    its own (`params`), its own attempts and retries. The step waits for all of them, then runs its
    own job (the join) with their outputs as inputs (`_subtasks` names them), or joins them without one."""

    subtasks: list[dict[str, Any]]  # {id, params}
    # How the step joins its subtasks: "job" runs its own job (shards planned before ShardsJoined
    # existed); "manifest" runs none, the decider joins the shards' manifest (ShardsJoined); "select"
    # runs none, the decider picks the best combination of a `matrix:` sweep (SweepJoined).
    join: Literal["job", "manifest", "select"] = "job"


class ShardsJoined(TaskEvent):
    """A sharded synthesize step's subtasks all succeeded: the decider joined their reports into the
    dataset's manifest (`manifest`, its JSON; `artifact` its id), byte for byte what one job writes.
    No job runs: the dispatcher writes the manifest to the artifact store before it acts on any later
    event. `metrics`/`outputs` are the step's (as one job's); `cache_key` records it in the step cache."""

    manifest: dict[str, Any]
    artifact: str  # the manifest's sha256
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    cache_key: str | None = None


class SweepJoined(TaskEvent):
    """A `matrix:` step's combinations all succeeded: the step succeeds without a job. `rows` is the
    table, one per combination in plan order ({subtask, params, metrics}); `best` the subtask chosen
    by `select:` (first in combination order on a tie); `metrics` the best's metrics plus `<name>_mean`
    and `<name>_std` (population std) of every metric across combinations; `outputs` the best's."""

    rows: list[dict[str, Any]]
    best: str
    metric: str | None = None  # what `select:` compared (None: a single combination)
    mode: Literal["max", "min"] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class SuiteEvaluated(TaskEvent):
    """A step of a suite ticket measured one core component (or a proposal's candidate for it) on the
    standing evaluation suite's fixed held-out data (`schema/suite.py`). Exactly one of `core_version`
    and `proposal` names the subject. `reused`: the step cache supplied the result (same checkpoint,
    same data, same code), so no job ran."""

    component: str
    yardstick: str  # e.g. "sudoku:6x6": the suite's data for this component
    seed: int  # the generator seed of that data
    core_version: int | None = None
    proposal: str | None = None
    checkpoint: str
    metrics: dict[str, float] = Field(default_factory=dict)
    reused: bool = False


class StepCheckEvaluated(TaskEvent):
    """One probe (before dispatch, on the step's inputs) or expectation (when an attempt succeeds, on
    its own metrics): what was predicted (`check`) and what was seen (`observed`)."""

    phase: Literal["probe", "expect"]
    check: str
    ok: bool
    observed: str  # as a human reads it: the number, "no such metric reported (...)", the core's components
    value: float | None = None  # the observed number, when there is one
    attempt: int = 0  # the attempt an expectation judged; 0 for a probe (no attempt yet)
    retryable: bool = False


class AcceptanceEvaluated(TicketEvent):
    results: list[dict[str, Any]]  # {check, ok, observed}
    passed: bool


class TicketCompleted(TicketEvent):
    pass


class TicketFailed(TicketEvent):
    reason: str


# --- scheduling a researcher steers (docs/SCHEDULING.md) --------------------------------------


class TicketHeld(TicketEvent):
    """Nothing more of the ticket is scheduled until TicketReleased. `stop`: its live attempts were
    told to stop at their next checkpoint (and run again from it on release)."""

    reason: str
    actor: str | None = None
    stop: bool = False


class TicketReleased(TicketEvent):
    actor: str | None = None


class PriorityChanged(TicketEvent):
    """`jbctl priority`: the ticket's priority from now on (its spec's `priority:` until then)."""

    priority: int
    actor: str | None = None


class InstallationPaused(Event):
    """`jbctl pause`: nothing new is scheduled anywhere until InstallationResumed; live attempts finish."""

    reason: str
    actor: str | None = None


class InstallationResumed(Event):
    actor: str | None = None


class QueueLimitsSet(Event):
    """The `queue_limits` setting as the daemon found it: at most N jobs out per queue (absent: no limit);
    and `queue_gpu_memory`: the bytes of GPU memory a queue's workers share (absent: not counted)."""

    limits: dict[str, int]
    gpu_memory: dict[str, int] = Field(default_factory=dict)


WaitRule = Literal["paused", "held", "after", "max_parallel", "queue_limit", "gpu_memory", "placement", "no_worker"]
# A freed slot (or a worker joining) may end these.
CAPACITY_RULES: frozenset[str] = frozenset({"max_parallel", "queue_limit", "gpu_memory", "placement", "no_worker"})


class TaskDeferred(TaskEvent):
    """A ready task was not scheduled, and why (held, paused, after, a limit). Recorded when the reason
    changes, so the log explains every wait; AttemptScheduled ends it. `rule`: which rule holds it
    (paused, held, after, max_parallel, queue_limit)."""

    reason: str
    rule: WaitRule = "held"


class AttemptStopped(AttemptEvent):
    """A live attempt stopped because its ticket was held with `--stop`: the task waits again, and its
    next attempt resumes from the last checkpoint."""

    error: str = ""
    report_seq: int = 0


# --- workers and what they have (placement) ------------------------------------------------------


class GpuCard(BaseModel):
    """One GPU a worker can use: `id` names the physical card across workers (`<node>/<index>`: two
    workers on one card advertise the same id and share its memory), `index` is the card as the
    worker's CUDA sees it (`cuda:<index>`), `memory` its total in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    index: int = Field(ge=0, le=1023)
    memory: int = Field(gt=0)


class WorkerAdvertised(Event):
    """A worker joined (or came back after it was lost) with what it has: the queues it serves, its
    cards, CPUs and memory (bytes); `detected`: read from the device (nvidia-smi, torch) rather than
    configured. Its own queue (`worker__<name>`) gets the jobs placed on it."""

    worker: str
    node: str
    queues: list[str]
    gpus: list[GpuCard] = Field(default_factory=list)
    cpus: float = 0.0
    memory: int = 0
    detected: bool = False


class WorkerGone(Event):
    """A worker left (`departed`: it said so as it stopped) or was lost (`lost`: its liveness key
    expired); what it had is no longer offered, and its attempts that never started are failed
    (infrastructure) so they are placed again."""

    worker: str
    reason: Literal["departed", "lost"]
    detail: str = ""


# --- proposals and the core --------------------------------------------------------------------


class ProposalOpened(TicketEvent):
    proposal: str  # P-<n>
    kind: Literal["core", "policy"] = "core"
    base_core_version: int = 0
    candidate: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    expires_at: datetime | None = None
    approvers: list[str] | None = None


class ProposalApproved(TicketEvent):
    proposal: str
    actor: str
    note: str | None = None
    scope: Literal["ticket", "all"] | None = None  # policy proposals: this ticket only, or every ticket


class ApprovalRefused(TicketEvent):
    """Someone tried to approve and was refused (not an approver, a stale core): recorded for audit."""

    proposal: str
    actor: str
    reason: str


class ProposalWithdrawn(TicketEvent):
    """A stale proposal set aside so its evaluation can run again against the current core."""

    proposal: str
    actor: str | None = None
    reason: str


class ProposalRejected(TicketEvent):
    proposal: str
    actor: str
    reason: str


class ProposalExpired(TicketEvent):
    proposal: str


class CorePromoted(Event):
    """The only way weights enter the abstract core: an approved proposal, or a human rollback."""

    version: int
    components: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)
    proposal: str | None = None
    actor: str
    rollback_to: int | None = None
    note: str | None = None


class AdapterActivated(TicketEvent):
    """Working memory: a ticket's adapters apply on top of the core version they were trained on."""

    adapters: dict[str, Any]  # component -> the train step's outputs (checkpoint, core_checkpoint, rank, task)
    core_version: int
    ids: dict[str, str] = Field(default_factory=dict)  # component -> A-<n>; empty in logs from before ids
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # component -> the train step's metrics


def adapter_id(event: AdapterActivated, component: str) -> str:
    """The adapter's id: the one the decider gave it, or (logs written before ids) one named after it."""
    return event.ids.get(component) or f"A-{event.ticket}.{component}"


class AdapterRetired(TicketEvent):
    """An adapter stops applying: replaced by a newer one of its ticket, its core rolled past, or by hand."""

    adapter: str  # A-<n>
    reason: Literal["replaced", "core_rolled", "manual"]
    detail: str = ""
    replaced_by: str | None = None
    core_version: int | None = None  # the core version that rolled past it
    actor: str | None = None


class HomeOwnerRecorded(Event):
    """Who owns the Jetbox home, recorded once: the approver when no `approvers` are configured."""

    user: str
    uid: int | None = None
    home: str


# --- plans ---------------------------------------------------------------------------------------


class MilestonePlanned(Event):
    """A plan's milestone, new or changed (`jbctl plan apply`): its goal, deliverables and ticket ids
    (`spec`). `revision` counts the changes of this milestone; an unchanged one records nothing."""

    milestone: str
    plan: str
    path: str
    revision: int = Field(ge=1)
    content_hash: str  # of `spec`, canonical JSON
    spec: dict[str, Any]


# --- safety ------------------------------------------------------------------------------------


class SafetyViolation(Event):
    """Something tried what it must not: a forged report, a denied connection, a refused job."""

    what: str
    detail: str
    ticket: str | None = None
    task: str | None = None
    attempt: int | None = None


class LoopDetected(TaskEvent):
    fingerprint: str
    pattern: Literal["repeat", "alternate"]
    count: int


def event_from(type_name: str, data: dict[str, Any]) -> Event:
    """Rebuild an event from its stored type and JSON body."""
    try:
        cls = Event.registry[type_name]
    except KeyError:
        raise ValueError(f"unknown event type {type_name!r}") from None
    return cls.model_validate(data)


def event_to_data(event: Event) -> dict[str, Any]:
    """The JSON body stored for an event: `model_dump(mode="json")`, through the model's serializer
    itself (the wrapper's keyword handling was half the cost, on every append)."""
    data: dict[str, Any] = event.__pydantic_serializer__.to_python(event, mode="json")
    return data


def fixed_stream(kind: type) -> str | None:
    """The system stream every event of this type belongs to; None: its ticket's (or `system`)."""
    try:
        return _FIXED_STREAMS[kind]
    except KeyError:
        pass
    found = next((stream for base, stream in _SYSTEM_TYPES if issubclass(kind, base)), None)
    _FIXED_STREAMS[kind] = found
    return found


_SYSTEM_TYPES: tuple[tuple[type, str], ...] = (
    (CorePromoted, CORE_STREAM),
    (TicketRejected, INTAKE_STREAM),
    (MilestonePlanned, PLAN_STREAM),
)
_FIXED_STREAMS: dict[type, str | None] = {}  # per event type, looked up once (the replay's hot path)


def stream_of(event: Event) -> str:
    """The stream an event belongs to: its ticket's, or a system stream."""
    fixed = fixed_stream(type(event))
    if fixed is not None:
        return fixed
    ticket = getattr(event, "ticket", None)
    return ticket if isinstance(ticket, str) else SYSTEM_STREAM
