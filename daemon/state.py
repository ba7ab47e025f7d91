"""The decider's state and `evolve`: how each event changes it.

`evolve` applies an event to a state it owns and returns it. Mutating in place keeps replaying a
million events linear; `decide` never mutates the state it is given (it works on a scratch copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Literal, NamedTuple

from schema import events as ev
from schema.plan import LIVE, OPEN, TaskStatus, task_plan
from schema.policy import code_grant
from schema.ticket import Ticket

TicketStatus = Literal["running", "completed", "failed", "cancelled"]
ProposalStatus = Literal["open", "approved", "rejected", "expired", "withdrawn"]


@dataclass(frozen=True)
class Needs:
    """What a step declares beyond its GPU memory (placement, docs/SCHEDULING.md)."""

    gpus: int | None = None  # None: the queue's default (a gpu step: one card)
    cpus: float = 0.0
    memory: int = 0  # bytes


@dataclass(frozen=True)
class WorkerInfo:
    """An advertised worker (WorkerAdvertised), while it lives."""

    name: str
    node: str
    queues: tuple[str, ...]
    gpus: tuple[ev.GpuCard, ...]
    cpus: float
    memory: int
    order: int  # advert order: the later of two adverts naming one card sets its size


@dataclass
class TaskState:
    id: str
    kind: str
    needs: list[str]
    queue: str
    params: dict
    timeout: float
    retries: int
    status: TaskStatus = "pending"
    attempt: int = 0  # the current (or last) attempt number; the fencing token
    last_report_seq: int = 0
    retry_at: datetime | None = None
    checkpoint: str | None = None
    worker: str | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    progress: tuple[int, int | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the job's own failures' fingerprints, oldest first
    last_error: str | None = None
    reason: str | None = None
    parent: str | None = None  # a subtask's step
    subtasks: list[str] = field(default_factory=list)  # a fanned-out step's subtasks (also in its needs)
    join: str = "job"  # how a fanned-out step joins them (SubtasksPlanned.join): "job", "manifest" or "select"
    best: str | None = None  # a joined sweep's chosen subtask (SweepJoined.best)
    cache_key: str | None = None  # the key of the last attempt scheduled (None: not cached)
    resume_key: str | None = None  # a train step's key without its budget (schema.cache.resume_key)
    fresh: bool = False  # `jbctl retry --from`: run it even if its key has a recorded success
    waiting_on: str | None = None  # the key it waits on while another task runs that step (TaskWaiting)
    reused_from: tuple[str, str, int] | None = None  # (ticket, task, attempt) of a reused success
    # A train step's last run in an earlier revision: (resume_key, checkpoint, its own params), resumed
    # from when only the budget grew.
    carried: tuple[str, str, dict] | None = None
    deferred: str | None = None  # why a ready task is not scheduled (TaskDeferred)
    deferred_rule: str | None = None  # which rule (TaskDeferred.rule)
    deferred_since: datetime | None = None
    gpu_memory: int = 0  # what the step declares (bytes); 0: the whole card where the queue's memory is counted
    claimed: int = 0  # GPU memory the live attempt claims (AttemptScheduled.gpu_memory), on each of its cards
    needs_res: Needs | None = None  # the step's gpus/cpus/memory (placement); None: it declares none
    placed: tuple[str, tuple[str, ...]] | None = None  # the live attempt's worker and cards (AttemptScheduled)
    stop_attempt: int = 0  # the attempt `jbctl hold --stop` asked to stop (its failure is a stop)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A recorded success under a step key: what a later step with the same key reuses."""

    key: str
    kind: str
    ticket: str
    task: str
    attempt: int
    at: datetime
    metrics: dict
    outputs: dict
    hits: int = 0  # how many steps reused it (AttemptReused)


@dataclass
class TicketState:
    id: str
    spec: Ticket
    path: str
    content_hash: str
    revision: int
    submitted_at: datetime
    tasks: dict[str, TaskState]
    status: TicketStatus = "running"
    reason: str | None = None
    ended_at: datetime | None = None
    acceptance: list[dict] = field(default_factory=list)
    violations: int = 0
    loops: int = 0
    forged: int = 0
    allowed_binaries: set[str] = field(default_factory=set)  # installation extras + grants for this ticket
    awaiting: str | None = None  # the open core proposal this ticket waits on
    # Attempt numbers of an earlier revision's subtasks: a subtask planned again keeps counting.
    prior_attempts: dict[str, int] = field(default_factory=dict)
    held: str | None = None  # why it is held (TicketHeld), None when not
    stop_held: bool = False  # held with --stop: a failed live attempt is a stopped one
    priority: int = 0
    arrival: int = 0  # submission order over the installation: equal priorities keep it
    # Copy-on-write bookkeeping of scratch copies (not part of the state's value).
    shared: bool = field(default=False, compare=False, repr=False)
    owned: set[str] = field(default_factory=set, compare=False, repr=False)

    def copy(self) -> TicketState:
        """A copy that can be evolved independently. Tasks are copied lazily, when first changed
        (`task_for_update`): a ticket with 500 steps is not copied whole for every report."""
        return replace(
            self,
            tasks=dict(self.tasks),
            acceptance=list(self.acceptance),
            allowed_binaries=set(self.allowed_binaries),
            shared=True,
            owned=set(),
        )

    def task_for_update(self, task_id: str) -> TaskState:
        """The task, safe to change in place."""
        task = self.tasks[task_id]
        if self.shared and task_id not in self.owned:
            task = replace(
                task,
                needs=list(task.needs),
                params=dict(task.params),
                metrics=dict(task.metrics),
                outputs=dict(task.outputs),
                failures=list(task.failures),
                subtasks=list(task.subtasks),
            )
            self.tasks[task_id] = task
            self.owned.add(task_id)
        return task


class ColdTicket(NamedTuple):
    """An ended ticket as the hot state keeps it (`freeze`): what later decisions read of a ticket
    that is over (its status for `after:`, its file for intake, its arrival for a rerun's place).

    The whole ticket stays in the log: a command that needs more of it (a retry, a revision of its
    file, a late report) makes the decider raise `ColdTicketNeeded`, and the command handler folds
    the ticket's own stream back into state (`thaw`) and decides again. The daemon's memory then
    follows live work, not history.

    `State.cold` holds these as plain tuples (`ColdRecord`; `State.lookup` gives this view): a
    snapshot of 100,000 of them then loads in a third of the time.
    """

    id: str
    status: TicketStatus
    reason: str | None
    path: str
    content_hash: str
    revision: int
    arrival: int


ColdRecord = tuple[str, TicketStatus, str | None, str, str, int, int]


class ColdTicketNeeded(Exception):  # a request, not an error: the handler thaws and decides again
    """A rule or an event needs the whole of an ended ticket the state holds only as a `ColdTicket`."""

    def __init__(self, ticket: str) -> None:
        super().__init__(f"ticket {ticket} is cold: load it from the log and decide again")
        self.ticket = ticket


@dataclass
class ProposalState:
    id: str
    ticket: str
    kind: str
    status: ProposalStatus
    base_core_version: int
    candidate: dict
    metrics: dict
    opened_at: datetime
    expires_at: datetime | None
    approvers: list[str] | None


class Overlay(MutableMapping[str, Any]):
    """A mapping that reads through to a `base` it never changes; writes and deletions stay here.

    A scratch state is made for every command: copying dicts of 100,000 tickets (and their streams'
    versions, and the ticket files) each time made every command's cost grow with the history.
    """

    __slots__ = ("_size", "base", "gone", "local", "moved")

    def __init__(self, base: Mapping[str, Any]) -> None:
        self.base = base
        self.local: dict[str, Any] = {}
        self.gone: set[str] = set()  # base keys deleted here
        self.moved: set[str] = set()  # base keys deleted here and set again
        self._size = len(base)

    def __getitem__(self, key: str) -> Any:
        if key in self.local:
            return self.local[key]
        if key in self.gone:
            raise KeyError(key)
        return self.base[key]

    def __contains__(self, key: object) -> bool:
        return key in self.local or (key not in self.gone and key in self.base)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.local:
            return self.local[key]
        if key in self.gone:
            return default
        return self.base.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            self._size += 1
        if key in self.gone:
            self.gone.discard(key)
            self.moved.add(key)
        self.local[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.local.pop(key, None)
        if key in self.base:
            self.gone.add(key)
            self.moved.discard(key)
        self._size -= 1

    def __iter__(self) -> Iterator[str]:
        # A dict's order: base keys where they stand, unless deleted (and maybe set again: then last).
        for key in self.base:
            if key not in self.gone and key not in self.moved:
                yield key
        for key in self.local:
            if key not in self.base or key in self.moved:
                yield key

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"Overlay({dict(self)!r})"


@dataclass(eq=False)
class State:
    tickets: dict[str, TicketState] = field(default_factory=dict)
    proposals: dict[str, ProposalState] = field(default_factory=dict)
    core_version: int = 0
    core_components: dict = field(default_factory=dict)
    core_history: list[dict] = field(default_factory=list)
    granted_binaries: set[str] = field(default_factory=set)  # policy approvals for every ticket
    home_owner: str | None = None  # the default approver (HomeOwnerRecorded)
    versions: dict[str, int] = field(default_factory=dict)  # stream -> last version
    files: dict[str, str] = field(default_factory=dict)  # ticket file path -> last content hash seen
    file_tickets: dict[str, str] = field(default_factory=dict)  # path -> ticket id
    violations: int = 0
    last_seq: int = 0
    milestones: dict[str, dict] = field(default_factory=dict)  # id -> {plan, revision, hash, spec}
    cache: dict[str, CacheEntry] = field(default_factory=dict)  # step key -> its recorded success
    inflight: dict[str, tuple[str, str]] = field(default_factory=dict)  # step key -> (ticket, task) last scheduled
    # step key -> the (ticket, task)s that wait for it (TaskWaiting; entries may be stale: check waiting_on)
    waiting: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    # Copy-on-write of the maps above in a scratch state: named ones are still the caller's (not part
    # of the state's value). Copying a cache of every step ever run for each command would dominate.
    shared_maps: set[str] = field(default_factory=set, compare=False, repr=False)

    def writable(self, name: Literal["cache", "inflight", "waiting"]) -> dict:
        """One of the step-cache maps, safe to change in place."""
        if name in self.shared_maps:
            setattr(self, name, dict(getattr(self, name)))
            self.shared_maps.discard(name)
        return getattr(self, name)  # type: ignore[no-any-return]

    # Working memory: A-<n> -> {id, ticket, component, base_core_version, checkpoint, core_checkpoint, active}.
    # Each record is replaced, never changed in place, so a scratch copy may share them.
    adapters: dict[str, dict] = field(default_factory=dict)
    paused: str | None = None  # why the installation is paused (InstallationPaused)
    queue_limits: dict[str, int] = field(default_factory=dict)  # queue -> most jobs out at once
    queue_gpu_memory: dict[str, int] = field(default_factory=dict)  # queue -> bytes its workers share
    arrivals: int = 0
    # Indexes kept by `evolve` from the tasks themselves: what is out per queue, and what waits.
    live: dict[tuple[str, str], str] = field(default_factory=dict)  # (ticket, task) -> queue
    deferred: dict[tuple[str, str], str] = field(default_factory=dict)  # ready tasks not scheduled -> their rule
    # The running tickets' ids, in the order they started running (an ordered set): what the clock,
    # the STATUS line and the reconciler walk, so their cost follows live work, not history.
    running: dict[str, None] = field(default_factory=dict)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)  # advertised workers that live, by name
    adverts: int = 0
    # Placed attempts out (kept by `evolve` with `live`): (ticket, task) -> (worker, cards, claim per card),
    # and their sums, so placing an attempt never walks the attempts out.
    claims: dict[tuple[str, str], tuple[str, tuple[str, ...], int]] = field(default_factory=dict)
    card_used: dict[str, int] = field(default_factory=dict)  # card id -> bytes claimed
    worker_load: dict[str, int] = field(default_factory=dict)  # worker -> placed attempts out
    # Ended tickets moved out of `tickets` (`freeze`); a ticket id is in one of the two, never both.
    cold: dict[str, ColdRecord] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        """The same state: every field equal, and the same tickets, whether an ended one is held
        whole or frozen (freezing happens between commands and in batches during a replay, so a
        live state and the replay of its log may differ only in that)."""
        if not isinstance(other, State):
            return NotImplemented
        names = [f.name for f in fields(self) if f.compare and f.name not in ("tickets", "cold")]
        return all(getattr(self, n) == getattr(other, n) for n in names) and self._frozen() == other._frozen()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _frozen(self) -> tuple[dict[str, TicketState], dict[str, ColdRecord]]:
        """(hot, cold) as if every ended ticket were frozen."""
        hot, cold = {}, dict(self.cold)
        for tid, ticket in self.tickets.items():
            record = cold_record(ticket)
            if record is None:
                hot[tid] = ticket
            else:
                cold[tid] = record
        return hot, cold

    def lookup(self, tid: str) -> TicketState | ColdTicket | None:
        """A ticket hot or cold (read only: what a `ColdTicket` has, every ticket has)."""
        found = self.tickets.get(tid)
        if found is not None:
            return found
        cold = self.cold.get(tid)
        return None if cold is None else ColdTicket(*cold)

    def scratch(self, ticket_ids: list[str]) -> State:
        """A copy that `evolve` may change, sharing every ticket except those named."""
        out = State(
            tickets=Overlay(self.tickets),  # type: ignore[arg-type]
            proposals={k: replace(v) for k, v in self.proposals.items()},
            core_version=self.core_version,
            core_components=dict(self.core_components),
            core_history=list(self.core_history),
            granted_binaries=set(self.granted_binaries),
            home_owner=self.home_owner,
            versions=Overlay(self.versions),  # type: ignore[arg-type]
            files=Overlay(self.files),  # type: ignore[arg-type]
            file_tickets=Overlay(self.file_tickets),  # type: ignore[arg-type]
            violations=self.violations,
            last_seq=self.last_seq,
            milestones=dict(self.milestones),
            # Read through like the tickets: the step cache holds every step ever run, and copying
            # it whole on a command's first write to it made that command's cost follow history.
            cache=Overlay(self.cache),  # type: ignore[arg-type]
            inflight=Overlay(self.inflight),  # type: ignore[arg-type]
            waiting=Overlay(self.waiting),  # type: ignore[arg-type]
            adapters=dict(self.adapters),
            paused=self.paused,
            queue_limits=dict(self.queue_limits),
            queue_gpu_memory=dict(self.queue_gpu_memory),
            arrivals=self.arrivals,
            live=dict(self.live),
            deferred=dict(self.deferred),
            running=Overlay(self.running),  # type: ignore[arg-type]
            workers=dict(self.workers),
            adverts=self.adverts,
            claims=dict(self.claims),
            card_used=dict(self.card_used),
            worker_load=dict(self.worker_load),
            cold=Overlay(self.cold),  # type: ignore[arg-type]
        )
        for tid in ticket_ids:
            if tid in out.tickets:
                out.tickets[tid] = out.tickets[tid].copy()
        return out


def tasks_for(ticket: Ticket) -> dict[str, TaskState]:
    """The task states of a fresh run, as `task_plan` lays it out."""
    gpu = {s.id: s.gpu_memory_bytes for s in ticket.steps if s.gpu_memory}
    needs = {
        s.id: Needs(gpus=s.gpus, cpus=s.cpus or 0.0, memory=s.memory_bytes)
        for s in ticket.steps
        if s.gpus is not None or s.cpus or s.memory
    }
    return {
        t.id: TaskState(
            id=t.id,
            kind=t.kind,
            needs=list(t.needs),
            queue=t.queue,
            params=dict(t.params),
            timeout=t.timeout,
            retries=t.retries,
            gpu_memory=gpu.get(t.id, 0),
            needs_res=needs.get(t.id),
        )
        for t in task_plan(ticket)
    }


def cold_record(ticket: TicketState) -> ColdRecord | None:
    """What `freeze` keeps of `ticket`; None when it is not over (running, awaiting a proposal, a
    task still out or waiting on another's step)."""
    if ticket.status == "running" or ticket.awaiting is not None:
        return None
    if any(t.waiting_on is not None or t.status in LIVE for t in ticket.tasks.values()):
        return None
    return (
        ticket.id,
        ticket.status,
        ticket.reason,
        ticket.path,
        ticket.content_hash,
        ticket.revision,
        ticket.arrival,
    )


def freeze(state: State, tid: str) -> bool:
    """Move ended ticket `tid` out of the hot state, keeping its `ColdTicket`; False when it is not
    there or not over."""
    ticket = state.tickets.get(tid)
    record = cold_record(ticket) if ticket is not None else None
    if record is None:
        return False
    state.cold[tid] = record
    del state.tickets[tid]
    return True


def thaw(state: State, ticket: TicketState) -> None:
    """Put back a cold ticket, as the fold of its own stream rebuilt it (`CommandHandler.thaw`)."""
    cold = ColdTicket(*state.cold.pop(ticket.id))
    ticket.arrival = cold.arrival  # the fold of one stream counts arrivals from zero
    state.tickets[ticket.id] = ticket


def evolve(state: State, event: ev.Event) -> State:
    """Apply one event to `state` (in place) and return it."""
    # The replay's hot path (a million events at start-up without a snapshot): `ev.stream_of` and the
    # index upkeep inlined, per-type facts looked up once.
    kind = type(event)
    tid = getattr(event, "ticket", None)
    stream = ev.fixed_stream(kind) or (tid if isinstance(tid, str) else ev.SYSTEM_STREAM)
    if stream in state.cold:
        raise ColdTicketNeeded(stream)
    versions = state.versions
    versions[stream] = versions.get(stream, 0) + 1
    handler = _HANDLERS.get(kind)
    if handler is not None:
        handler(state, event)
    if kind not in _UNINDEXED and isinstance(tid, str):
        ticket = state.tickets.get(tid)
        if ticket is not None:
            task_id = getattr(event, "task", None)
            _index(state, ticket, [task_id] if isinstance(task_id, str) else None)
    return state


def _index(state: State, ticket: TicketState, task_ids: list[str] | None) -> None:
    """Keep `live` and `deferred` in step with the tasks an event touched (all of a ticket's for a
    ticket-level event; a new run's tasks that replace the last run's: `_submitted`)."""
    if task_ids is None:
        task_ids = list(ticket.tasks)
    running = ticket.status == "running"
    for task_id in task_ids:
        task = ticket.tasks.get(task_id)
        if task is None:
            continue
        key = (ticket.id, task_id)
        if running and task.status in LIVE:
            state.live[key] = task.queue
            claim = (task.placed[0], task.placed[1], task.claimed) if task.placed is not None else None
            if state.claims.get(key) != claim:
                _unclaim(state, key)
                if claim is not None:
                    _claim(state, key, claim)
        else:
            state.live.pop(key, None)
            _unclaim(state, key)
        if running and task.deferred_rule is not None and task.status in ("pending", "waiting_retry"):
            state.deferred[key] = task.deferred_rule
        else:
            state.deferred.pop(key, None)


def _claim(state: State, key: tuple[str, str], claim: tuple[str, tuple[str, ...], int]) -> None:
    worker, cards, size = claim
    state.claims[key] = claim
    state.worker_load[worker] = state.worker_load.get(worker, 0) + 1
    for card in cards:
        state.card_used[card] = state.card_used.get(card, 0) + size


def _unclaim(state: State, key: tuple[str, str]) -> None:
    """Drop a placed attempt's claim (it ended, or its ticket did); sums that reach zero are removed,
    so a replay and the live state hold the same maps."""
    claim = state.claims.pop(key, None)
    if claim is None:
        return
    worker, cards, size = claim
    left = state.worker_load[worker] - 1
    if left:
        state.worker_load[worker] = left
    else:
        del state.worker_load[worker]
    for card in cards:
        used = state.card_used[card] - size
        if used:
            state.card_used[card] = used
        else:
            del state.card_used[card]


def _task(state: State, event: ev.TaskEvent) -> TaskState:
    return state.tickets[event.ticket].task_for_update(event.task)


def _submitted(state: State, e: ev.TicketSubmitted) -> None:
    spec = Ticket.model_validate(e.spec)
    previous = state.tickets.get(e.ticket)
    tasks = tasks_for(spec)
    prior: dict[str, int] = {}
    if previous is not None:
        # Attempt numbers keep counting across revisions, so (ticket, task, attempt) stays unique.
        for tid, task in tasks.items():
            if tid in previous.tasks:
                old = previous.tasks[tid]
                task.attempt = old.attempt
                if task.kind == "train" and old.kind == "train":
                    # Its last checkpoint, for a revision that only gives the training a larger budget.
                    if old.checkpoint is not None and old.resume_key is not None:
                        task.carried = (old.resume_key, old.checkpoint, dict(old.params))
                    else:
                        task.carried = old.carried
        prior = dict(previous.prior_attempts)
        prior.update({t.id: t.attempt for t in previous.tasks.values() if t.parent is not None})
    if previous is not None:  # a new run: the old one's tasks wait for nothing any more
        for old in previous.tasks.values():
            if old.waiting_on is not None:
                _unindex_waiter(state, old.waiting_on, e.ticket, old.id)
            if old.id not in tasks:  # nor are they out or deferred (those the new run has, `_index` redoes)
                state.live.pop((e.ticket, old.id), None)
                state.deferred.pop((e.ticket, old.id), None)
                _unclaim(state, (e.ticket, old.id))
    state.tickets[e.ticket] = TicketState(
        id=e.ticket,
        spec=spec,
        path=e.path,
        content_hash=e.content_hash,
        revision=e.revision,
        submitted_at=e.at,
        tasks=tasks,
        allowed_binaries=set(e.allowed_binaries),
        prior_attempts=prior,
        priority=spec.priority,
        arrival=state.arrivals,
    )
    state.arrivals += 1
    state.files[e.path] = e.content_hash
    state.file_tickets[e.path] = e.ticket
    state.running.setdefault(e.ticket, None)


def _rejected(state: State, e: ev.TicketRejected) -> None:
    state.files[e.path] = e.content_hash


def _refused(state: State, e: ev.TicketRevisionRefused) -> None:
    state.files[e.path] = e.content_hash


def _forget_revised_file(state: State, ticket: TicketState) -> None:
    """When a run ends, a refused revision of its file is no longer "seen": the next rescan submits it."""
    if state.files.get(ticket.path) != ticket.content_hash:
        state.files.pop(ticket.path, None)


def _end_live_tasks(ticket: TicketState, state: State) -> None:
    for tid, task in list(ticket.tasks.items()):
        if task.status in OPEN:
            task = ticket.task_for_update(tid)
            task.status = "cancelled"
            _stop_waiting(state, ticket.id, task)


def _cancelled(state: State, e: ev.TicketCancelled) -> None:
    ticket = state.tickets[e.ticket]
    ticket.status, ticket.reason, ticket.ended_at = "cancelled", e.reason, e.at
    state.running.pop(e.ticket, None)
    _end_live_tasks(ticket, state)
    if e.path is not None:  # the file is gone: restoring it, even unchanged, starts a new run
        state.files.pop(e.path, None)
    else:
        _forget_revised_file(state, ticket)


def _unindex_waiter(state: State, key: str, ticket: str, task: str) -> None:
    left = state.waiting.get(key, frozenset()) - {(ticket, task)}
    if left:
        state.writable("waiting")[key] = left
    else:
        state.writable("waiting").pop(key, None)


def _stop_waiting(state: State, ticket: str, task: TaskState) -> None:
    if task.waiting_on is not None:
        _unindex_waiter(state, task.waiting_on, ticket, task.id)
        task.waiting_on = None


def _waiting(state: State, e: ev.TaskWaiting) -> None:
    task = _task(state, e)
    _stop_waiting(state, e.ticket, task)
    task.waiting_on = e.cache_key
    state.writable("waiting")[e.cache_key] = state.waiting.get(e.cache_key, frozenset()) | {(e.ticket, e.task)}


def _scheduled(state: State, e: ev.AttemptScheduled) -> None:
    task = _task(state, e)
    _stop_waiting(state, e.ticket, task)
    task.status, task.attempt, task.last_report_seq = "scheduled", e.attempt, 0
    task.scheduled_at, task.started_at, task.worker, task.retry_at = e.at, None, None, None
    task.progress = None
    task.cache_key, task.resume_key = e.cache_key, e.resume_key
    task.reused_from = None
    if e.cache_key is not None:
        state.writable("inflight")[e.cache_key] = (e.ticket, e.task)
    task.deferred, task.deferred_rule, task.deferred_since = None, None, None
    task.claimed = e.gpu_memory or 0
    task.placed = (e.worker, tuple(e.gpus)) if e.worker is not None else None


def _started(state: State, e: ev.AttemptStarted) -> None:
    task = _task(state, e)
    task.status, task.worker, task.started_at = "running", e.worker, e.at
    task.last_report_seq = max(task.last_report_seq, e.report_seq)


def _progress(state: State, e: ev.ProgressRecorded) -> None:
    # Most of a long log: `_task` and `max` inlined.
    task = state.tickets[e.ticket].task_for_update(e.task)
    task.progress = (e.step, e.total)
    if e.report_seq > task.last_report_seq:
        task.last_report_seq = e.report_seq


def _checkpoint(state: State, e: ev.CheckpointSaved) -> None:
    task = _task(state, e)
    task.checkpoint = e.path
    task.last_report_seq = max(task.last_report_seq, e.report_seq)


def _artifact(state: State, e: ev.ArtifactRecorded) -> None:
    task = _task(state, e)
    task.last_report_seq = max(task.last_report_seq, e.report_seq)


def _succeeded(state: State, e: ev.AttemptSucceeded) -> None:
    task = _task(state, e)
    task.status, task.metrics, task.outputs = "succeeded", dict(e.metrics), dict(e.outputs)
    task.last_report_seq = max(task.last_report_seq, e.report_seq)
    task.fresh = False
    if task.cache_key is not None:
        # The entry shares the task's dicts: evolve replaces them, never changes them in place.
        state.writable("cache")[task.cache_key] = CacheEntry(
            task.cache_key, task.kind, e.ticket, e.task, e.attempt, e.at, task.metrics, task.outputs
        )
        if state.inflight.get(task.cache_key) == (e.ticket, e.task):
            del state.writable("inflight")[task.cache_key]  # done (entries left by failures are checked on use)


def _reused(state: State, e: ev.AttemptReused) -> None:
    task = _task(state, e)
    _stop_waiting(state, e.ticket, task)
    task.status, task.metrics, task.outputs = "succeeded", dict(e.metrics), dict(e.outputs)
    task.cache_key, task.fresh, task.reason = e.cache_key, False, None
    task.reused_from = (e.source_ticket, e.source_task, e.source_attempt)
    entry = state.cache.get(e.cache_key)
    if entry is not None:
        state.writable("cache")[e.cache_key] = replace(entry, hits=entry.hits + 1)


def _cache_cleared(state: State, e: ev.CacheCleared) -> None:
    for key in e.keys:
        state.writable("cache").pop(key, None)


def _ticket_retried(state: State, e: ev.TicketRetried) -> None:
    ticket = state.tickets[e.ticket]
    ticket.status, ticket.reason, ticket.ended_at = "running", None, None
    ticket.acceptance, ticket.awaiting = [], None
    state.running.setdefault(e.ticket, None)


def _failed(state: State, e: ev.AttemptFailed) -> None:
    task = _task(state, e)
    if e.cause == "job":  # infrastructure failures are not the job repeating itself
        task.failures.append(e.fingerprint)
    task.last_error = e.error
    task.last_report_seq = max(task.last_report_seq, e.report_seq)
    if e.retry_at is not None:
        task.status, task.retry_at = "waiting_retry", e.retry_at
    else:
        task.status = "failed"


def _subtasks_planned(state: State, e: ev.SubtasksPlanned) -> None:
    ticket = state.tickets[e.ticket]
    step = ticket.task_for_update(e.task)
    ids = [str(sub["id"]) for sub in e.subtasks]
    for sub, sid in zip(e.subtasks, ids, strict=True):
        ticket.tasks[sid] = TaskState(
            id=sid,
            kind=step.kind,
            needs=list(step.needs),  # the step's inputs, already succeeded
            queue=step.queue,
            params=dict(step.params) | dict(sub.get("params") or {}),
            timeout=step.timeout,
            retries=step.retries,
            attempt=ticket.prior_attempts.get(sid, 0),
            parent=step.id,
            gpu_memory=step.gpu_memory,  # each subtask is one job: it needs what its step declares
            needs_res=step.needs_res,
        )
        if ticket.shared:
            ticket.owned.add(sid)  # created in this copy: safe to change in place
    step.subtasks, step.join = ids, e.join
    step.needs = [*step.needs, *ids]  # the join runs once every subtask has succeeded


def _sweep_joined(state: State, e: ev.SweepJoined) -> None:
    task = _task(state, e)
    task.status, task.metrics, task.outputs = "succeeded", dict(e.metrics), dict(e.outputs)
    task.best, task.reason, task.fresh = e.best, None, False


def _shards_joined(state: State, e: ev.ShardsJoined) -> None:
    task = _task(state, e)
    task.status, task.metrics, task.outputs = "succeeded", dict(e.metrics), dict(e.outputs)
    task.cache_key, task.reason, task.fresh = e.cache_key, None, False
    if e.cache_key is not None:  # attempt 0: joined by the decider, no job ran
        state.writable("cache")[e.cache_key] = CacheEntry(
            e.cache_key, task.kind, e.ticket, e.task, 0, e.at, task.metrics, task.outputs
        )


def _task_failed(state: State, e: ev.TaskFailed) -> None:
    task = _task(state, e)
    task.status, task.reason = "failed", e.reason


def _blocked(state: State, e: ev.TaskBlocked) -> None:
    task = _task(state, e)
    task.status, task.reason, task.retry_at = "blocked", e.reason, None


def _retried(state: State, e: ev.TaskRetried) -> None:
    task = _task(state, e)
    if e.fresh and task.status == "succeeded":
        task.checkpoint = None  # a finished run starts over; a failed one resumes from its checkpoint
    task.status, task.reason, task.failures = "pending", None, []
    task.fresh = task.fresh or e.fresh
    task.deferred, task.deferred_rule, task.deferred_since = None, None, None


def _loop(state: State, e: ev.LoopDetected) -> None:
    state.tickets[e.ticket].loops += 1


def _accepted(state: State, e: ev.AcceptanceEvaluated) -> None:
    state.tickets[e.ticket].acceptance = list(e.results)


def _completed(state: State, e: ev.TicketCompleted) -> None:
    ticket = state.tickets[e.ticket]
    ticket.status, ticket.ended_at, ticket.reason = "completed", e.at, None
    state.running.pop(e.ticket, None)
    _forget_revised_file(state, ticket)


def _ticket_failed(state: State, e: ev.TicketFailed) -> None:
    ticket = state.tickets[e.ticket]
    ticket.status, ticket.reason, ticket.ended_at = "failed", e.reason, e.at
    state.running.pop(e.ticket, None)
    _end_live_tasks(ticket, state)
    _forget_revised_file(state, ticket)


def _opened(state: State, e: ev.ProposalOpened) -> None:
    state.proposals[e.proposal] = ProposalState(
        id=e.proposal,
        ticket=e.ticket,
        kind=e.kind,
        status="open",
        base_core_version=e.base_core_version,
        candidate=dict(e.candidate),
        metrics=dict(e.metrics),
        opened_at=e.at,
        expires_at=e.expires_at,
        approvers=list(e.approvers) if e.approvers is not None else None,
    )
    if e.kind == "core":
        state.tickets[e.ticket].awaiting = e.proposal


def _decided(status: ProposalStatus) -> Callable[[State, Any], None]:
    def apply(state: State, e: Any) -> None:
        proposal = state.proposals[e.proposal]
        proposal.status = status
        ticket = state.tickets[e.ticket]
        if ticket.awaiting == e.proposal:
            ticket.awaiting = None
        if status == "approved" and proposal.kind == "policy":
            binary = str(proposal.candidate.get("binary"))
            grants = {binary, code_grant(binary)} if "code" in proposal.candidate else {binary}
            if e.scope == "all":
                state.granted_binaries |= grants
            else:
                ticket.allowed_binaries |= grants

    return apply


def _home_owner(state: State, e: ev.HomeOwnerRecorded) -> None:
    state.home_owner = e.user


def _promoted(state: State, e: ev.CorePromoted) -> None:
    state.core_version = e.version
    state.core_components = dict(e.components)
    state.core_history.append(
        {
            "version": e.version,
            "components": dict(e.components),
            "metrics": dict(e.metrics),
            "proposal": e.proposal,
            "actor": e.actor,
            "note": e.note,
            "at": e.at,
            "rollback_to": e.rollback_to,
        }
    )


def _violation(state: State, e: ev.SafetyViolation) -> None:
    state.violations += 1
    if e.ticket and e.ticket in state.tickets:
        ticket = state.tickets[e.ticket]
        ticket.violations += 1
        if e.what == "forged_report":
            ticket.forged += 1


def _held(state: State, e: ev.TicketHeld) -> None:
    ticket = state.tickets[e.ticket]
    ticket.held, ticket.stop_held = e.reason, e.stop
    if e.stop:  # the attempts out now are asked to stop, even if the ticket is released before they do
        for tid in [t.id for t in ticket.tasks.values() if t.status in LIVE]:
            task = ticket.task_for_update(tid)
            task.stop_attempt = task.attempt


def _released(state: State, e: ev.TicketReleased) -> None:
    ticket = state.tickets[e.ticket]
    ticket.held, ticket.stop_held = None, False


def _priority(state: State, e: ev.PriorityChanged) -> None:
    state.tickets[e.ticket].priority = e.priority


def _paused(state: State, e: ev.InstallationPaused) -> None:
    state.paused = e.reason


def _resumed(state: State, e: ev.InstallationResumed) -> None:
    state.paused = None


def _limits(state: State, e: ev.QueueLimitsSet) -> None:
    state.queue_limits = dict(e.limits)
    state.queue_gpu_memory = dict(e.gpu_memory)


def _deferred(state: State, e: ev.TaskDeferred) -> None:
    task = _task(state, e)
    if task.deferred is None:
        task.deferred_since = e.at  # a changed reason keeps the wait's start (aging counts from it)
    task.deferred, task.deferred_rule = e.reason, e.rule


def _stopped(state: State, e: ev.AttemptStopped) -> None:
    task = _task(state, e)
    task.status, task.worker, task.progress = "pending", None, None
    task.last_report_seq = max(task.last_report_seq, e.report_seq)


def _worker_advertised(state: State, e: ev.WorkerAdvertised) -> None:
    state.adverts += 1
    state.workers[e.worker] = WorkerInfo(
        name=e.worker,
        node=e.node,
        queues=tuple(e.queues),
        gpus=tuple(e.gpus),
        cpus=e.cpus,
        memory=e.memory,
        order=state.adverts,
    )


def _worker_gone(state: State, e: ev.WorkerGone) -> None:
    state.workers.pop(e.worker, None)


def _milestone_planned(state: State, e: ev.MilestonePlanned) -> None:
    state.milestones[e.milestone] = {"plan": e.plan, "revision": e.revision, "hash": e.content_hash, "spec": e.spec}


def _adapter_activated(state: State, e: ev.AdapterActivated) -> None:
    for component, out in e.adapters.items():
        aid = ev.adapter_id(e, component)
        state.adapters[aid] = {
            "id": aid,
            "ticket": e.ticket,
            "component": component,
            "base_core_version": e.core_version,
            "checkpoint": out.get("checkpoint"),
            "core_checkpoint": out.get("core_checkpoint"),
            "active": True,
        }


def _adapter_retired(state: State, e: ev.AdapterRetired) -> None:
    if e.adapter in state.adapters:
        state.adapters[e.adapter] = {**state.adapters[e.adapter], "active": False}


# Events whose handler changes neither a task's status or deferral nor its ticket's status: the
# `live` and `deferred` indexes need no look (94% of a training log is ProgressRecorded).
_UNINDEXED = frozenset({ev.ProgressRecorded, ev.CheckpointSaved, ev.ArtifactRecorded})

_HANDLERS: dict[type, Callable[[State, Any], None]] = {
    ev.TicketSubmitted: _submitted,
    ev.TicketRejected: _rejected,
    ev.TicketRevisionRefused: _refused,
    ev.TicketCancelled: _cancelled,
    ev.AttemptScheduled: _scheduled,
    ev.AttemptStarted: _started,
    ev.ProgressRecorded: _progress,
    ev.CheckpointSaved: _checkpoint,
    ev.ArtifactRecorded: _artifact,
    ev.AttemptSucceeded: _succeeded,
    ev.AttemptFailed: _failed,
    ev.TaskFailed: _task_failed,
    ev.TaskBlocked: _blocked,
    ev.SubtasksPlanned: _subtasks_planned,
    ev.SweepJoined: _sweep_joined,
    ev.ShardsJoined: _shards_joined,
    ev.TaskRetried: _retried,
    ev.LoopDetected: _loop,
    ev.AcceptanceEvaluated: _accepted,
    ev.TicketCompleted: _completed,
    ev.TicketFailed: _ticket_failed,
    ev.SafetyViolation: _violation,
    ev.ProposalOpened: _opened,
    ev.ProposalApproved: _decided("approved"),
    ev.ProposalRejected: _decided("rejected"),
    ev.ProposalExpired: _decided("expired"),
    ev.ProposalWithdrawn: _decided("withdrawn"),
    ev.CorePromoted: _promoted,
    ev.HomeOwnerRecorded: _home_owner,
    ev.MilestonePlanned: _milestone_planned,
    ev.AttemptReused: _reused,
    ev.TaskWaiting: _waiting,
    ev.CacheCleared: _cache_cleared,
    ev.TicketRetried: _ticket_retried,
    ev.AdapterActivated: _adapter_activated,
    ev.AdapterRetired: _adapter_retired,
    ev.TicketHeld: _held,
    ev.TicketReleased: _released,
    ev.PriorityChanged: _priority,
    ev.InstallationPaused: _paused,
    ev.InstallationResumed: _resumed,
    ev.QueueLimitsSet: _limits,
    ev.TaskDeferred: _deferred,
    ev.AttemptStopped: _stopped,
    ev.WorkerAdvertised: _worker_advertised,
    ev.WorkerGone: _worker_gone,
}
