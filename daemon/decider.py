"""The decider: `decide(state, command) -> events`. Every rule of Jetbox lives here.

Pure: no I/O, no clock (time comes in the command), no randomness (retry jitter is a hash of the
attempt). `decide` never changes the state it is given; it emits events onto a scratch copy so that
one command's later rules see the effect of its earlier events.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from daemon import commands as cmd
from daemon.placement import Placement, Usage, card_sizes, place, placed_queues, size, usage
from daemon.state import ColdTicketNeeded, State, TaskState, TicketState, evolve
from schema import events as ev
from schema.artifacts import JoinError, Lineage, join_manifest
from schema.cache import BUDGET_KEYS, NEVER_CACHED, budget_grew, cache_key, cacheable, resume_key
from schema.plan import ACCEPT_PREFIX, LIVE, PROBE_FAILED, join_of, plan_subtasks
from schema.plans import spec_hash
from schema.policy import DEFAULT_CHECK_BINARIES, binary_of, code_grant, inline_code
from schema.suite import SUITE_PATH, suite_ticket
from schema.ticket import CoreAfter, MetricCheck, MetricProbe, Step, Ticket, after_tickets

BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0
LOOP_REPEATS = 3


class _Emitter:
    """Collects events and applies each to a scratch state as it is emitted.

    The scratch state shares every ticket with the caller's state until a rule or an event touches
    it. Rules get the tickets and tasks they act on through `ticket`, `get_ticket` and `task` only:
    the first access makes the scratch copy, and every later access (and `evolve`, when an event is
    emitted) works on that same copy, so a ticket or task a rule holds is never stale and the
    caller's state is never changed. `out.state.tickets` may be scanned to read, never to act on.
    """

    def __init__(self, state: State, own: set[str] | None = None) -> None:
        if own is None:
            self.state = state.scratch([])
            self._copied: set[str] = set()
        else:  # `decide_on`: the caller's scratch state, and the tickets already its own copies
            self.state = state
            self._copied = own
        self.events: list[ev.Event] = []
        self.filled = False  # a pass over waiting tasks ran (`_fill`)
        self.placing: dict[tuple[str, str], Placement] = {}  # chosen by `_fill`, recorded by `_schedule`

    def get_ticket(self, tid: str | None) -> TicketState | None:
        """The scratch copy of ticket `tid` (made on first access), or None when there is none."""
        if tid is None:
            return None
        if tid in self.state.cold:
            raise ColdTicketNeeded(tid)  # the handler loads it from the log and decides again
        ticket = self.state.tickets.get(tid)
        if ticket is not None and tid not in self._copied:
            ticket = self.state.tickets[tid] = ticket.copy()
            self._copied.add(tid)
        return ticket

    def ticket(self, tid: str) -> TicketState:
        ticket = self.get_ticket(tid)
        if ticket is None:
            raise KeyError(tid)
        return ticket

    def task(self, tid: str, task_id: str) -> TaskState:
        """The scratch copy of a ticket's task, current after any event emitted since."""
        return self.ticket(tid).task_for_update(task_id)

    def emit(self, event: ev.Event) -> None:
        tid = getattr(event, "ticket", None)
        if isinstance(tid, str) and self.get_ticket(tid) is None:
            self._copied.add(tid)  # a new ticket: evolve creates it in the scratch state only
        self.events.append(event)
        evolve(self.state, event)


def decide(state: State, command: cmd.Command) -> list[ev.Event]:
    """The events that `command` produces in `state` (possibly none)."""
    return _run(state, command).events


def decide_on(scratch: State, own: set[str], command: cmd.Command) -> list[ev.Event]:
    """`decide` on a scratch state the caller owns (made with `State.scratch`; `own`: the tickets in it
    that are already its own copies, kept up to date here): the rules work on it directly, and it ends
    as `scratch` with the events applied, as `decide`'s own scratch would (tested: `_run`'s state is
    its events applied to the state). The command handler decides a batch of commands in turn on one
    such state, instead of a scratch of a scratch per command and every event applied twice."""
    return _run(scratch, command, own).events


def _run(state: State, command: cmd.Command, own: set[str] | None = None) -> _Emitter:
    """`decide`, keeping the scratch state the rules worked on (tests compare it with a replay)."""
    out = _Emitter(state, own)
    _DECIDERS[type(command)](out, command)
    _release_waiters(out, command.now)
    if out.state.deferred and type(command) not in _NO_FREED_SLOT:
        # A gate may have opened (a release, a resume, a ticket or the core `after:` names): look at
        # everything that waits. Otherwise a slot may have freed: the rule already ran, or run it.
        gates = type(command) in _OPENS_GATES or any(isinstance(e, _GATE_EVENTS) for e in out.events)
        if gates or not out.filled:
            _fill(out, command.now, [], everything=gates)
    return out


def backoff_seconds(ticket: str, task: str, attempt: int) -> float:
    """Exponential backoff with deterministic jitter in [50%, 100%] of the step."""
    step = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempt - 1))
    digest = hashlib.sha256(f"{ticket}/{task}/{attempt}".encode()).digest()
    jitter = 0.5 + 0.5 * (int.from_bytes(digest[:4], "big") / 0xFFFFFFFF)
    return step * jitter


_VOLATILE = re.compile(r"0x[0-9a-f]+|\b\d+(\.\d+)?\b|/tmp/\S+|line \d+")


def fingerprint(kind: str, params: dict[str, Any], error: str) -> str:
    """Same action failing the same way → same fingerprint (numbers and addresses ignored)."""
    last_line = (error.strip().splitlines() or [""])[-1]
    normal = _VOLATILE.sub("#", last_line)[:300]
    action = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:12]
    return f"{kind}:{action}:" + hashlib.sha256(normal.encode()).hexdigest()[:16]


# --- intake ------------------------------------------------------------------------------------


def _refuse_file(out: _Emitter, c: cmd.SubmitTicket, ticket: str | None, errors: list[str]) -> None:
    """The file is refused as a whole: nothing of it is recorded but the reasons."""
    out.emit(ev.TicketRejected(at=c.now, path=c.path, content_hash=c.content_hash, ticket=ticket, errors=errors))


def _submit(out: _Emitter, c: cmd.SubmitTicket) -> None:
    st = out.state
    if st.files.get(c.path) == c.content_hash:
        return  # an unchanged save records nothing
    if c.ticket is None:
        _refuse_file(out, c, c.ticket_id, c.errors)
        return
    existing = out.get_ticket(c.ticket.id)
    if existing is not None and existing.path != c.path and existing.status == "running":
        why = f"{c.path}:1:1: ticket {c.ticket.id} is already running from {existing.path}"
        _refuse_file(out, c, c.ticket.id, [why])
        return
    if existing is not None and existing.status == "running":
        if existing.content_hash == c.content_hash:
            return
        out.emit(
            ev.TicketRevisionRefused(
                at=c.now,
                ticket=existing.id,
                path=c.path,
                content_hash=c.content_hash,
                reason="ticket is still running; the revision is applied as a new run once it has ended",
            )
        )
        return
    cycle = _after_cycle(out.state, c.ticket.id, after_tickets(c.ticket))
    if cycle:
        why = f"{c.path}:{c.after_line}:1: after: waiting would never end: {' -> '.join(cycle)} (a cycle)"
        _refuse_file(out, c, c.ticket.id, [why])
        return
    revision = existing.revision + 1 if existing else 1
    out.emit(
        ev.TicketSubmitted(
            at=c.now,
            ticket=c.ticket.id,
            path=c.path,
            content_hash=c.content_hash,
            revision=revision,
            spec=c.ticket.model_dump(mode="json", by_alias=True),
            allowed_binaries=sorted(set(c.allowed_binaries)),
        )
    )
    if c.ticket.hold:
        out.emit(ev.TicketHeld(at=c.now, ticket=c.ticket.id, reason="hold: true in the ticket", actor=c.actor))
    _advance(out, out.ticket(c.ticket.id), c.now)


def _after_cycle(state: State, tid: str, after: list[str]) -> list[str] | None:
    """A chain of `after:` through running tickets that leads back to `tid` (they would wait on each
    other forever), or None. Completed tickets end a chain: what waits for them can run. Iterative:
    a chain may be as long as the installation's history."""
    parent: dict[str, str] = {}
    stack = [(tid, dep) for dep in reversed(after)]
    while stack:
        via, dep = stack.pop()
        if dep == tid:
            chain = [dep, via]
            while chain[-1] != tid:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        other = state.tickets.get(dep)
        if dep in parent or other is None or other.status != "running":
            continue
        parent[dep] = via
        stack.extend((dep, nxt) for nxt in reversed(after_tickets(other.spec)))
    return None


def _file_removed(out: _Emitter, c: cmd.TicketFileRemoved) -> None:
    tid = out.state.file_tickets.get(c.path)
    if tid is not None and tid in out.state.cold:
        return  # over already (a folder tidied of old tickets need not load them)
    ticket = out.get_ticket(tid)
    if ticket is not None and ticket.status == "running" and ticket.path == c.path:
        out.emit(
            ev.TicketCancelled(at=c.now, ticket=ticket.id, reason=f"ticket file {c.path} was removed", path=c.path)
        )


def _cancel(out: _Emitter, c: cmd.CancelTicket) -> None:
    if c.ticket in out.state.cold:
        return  # over already
    ticket = out.get_ticket(c.ticket)
    if ticket is not None and ticket.status == "running":
        out.emit(ev.TicketCancelled(at=c.now, ticket=ticket.id, reason=c.reason, actor=c.actor))


# --- scheduling --------------------------------------------------------------------------------


def _runnable(ticket: TicketState, task: TaskState) -> bool:
    return task.status == "pending" and all(ticket.tasks[n].status == "succeeded" for n in task.needs)


def _schedule(out: _Emitter, ticket: TicketState, task: TaskState, now: datetime) -> bool:
    """Schedule the task's next attempt, or reuse a recorded success of its key (True: reused, the
    caller advances the ticket), or leave it pending while the same key runs elsewhere."""
    spec = ticket.spec
    params = resolved_params(ticket, task, out.state)
    key = _cache_key_of(ticket, task, params)
    held = _reused_or_waiting(out, ticket, task, key, now) if key is not None else None
    if held is not None:
        return held == "reused"
    resume = resume_key(task.kind, params) if task.kind == "train" else None
    waited_since = task.deferred_since
    placed = out.placing.pop((ticket.id, task.id), None)
    if placed is None and task.queue in placed_queues(out.state):
        found = place(out.state, task, usage(out.state), card_sizes(out.state))
        placed = found if isinstance(found, Placement) else None
    device: str = spec.constraints.device
    if placed is not None and placed.indices and device != "cpu":
        device = f"cuda:{placed.indices[0]}"  # the card the decider chose, as the worker's CUDA numbers it
    out.emit(
        ev.AttemptScheduled(
            at=now,
            ticket=ticket.id,
            task=task.id,
            attempt=task.attempt + 1,
            kind=task.kind,
            queue=task.queue,
            params=params,
            timeout=task.timeout,
            resume_checkpoint=task.checkpoint or _carried_checkpoint(task, resume),
            network=spec.constraints.network,
            device=device,
            cache_key=key,
            resume_key=resume,
            priority=ticket.priority,
            waited_since=waited_since,
            gpu_memory=(placed.claim or None) if placed is not None else gpu_claim(out.state, task),
            worker=placed.worker if placed is not None else None,
            gpus=list(placed.cards) if placed is not None else [],
        )
    )
    return False


# --- what waits, and in which order (docs/SCHEDULING.md) --------------------------------------

AGING_S = 600.0  # a waiting task gains one priority point per 10 minutes waited: nothing starves
UNPLACEABLE_S = 300.0  # a task no live worker could ever hold is blocked after waiting this long


def _unplaceable_too_long(task: TaskState, now: datetime) -> bool:
    """It already waited because no worker could hold it, and has waited UNPLACEABLE_S in all: a worker
    that has what it needs is not coming (a restarting one is back well within this), so a human decides."""
    since = task.deferred_since
    return task.deferred_rule == "no_worker" and since is not None and (now - since).total_seconds() >= UNPLACEABLE_S


def _ready(ticket: TicketState, task: TaskState, now: datetime) -> bool:
    """Whether `task` would be scheduled now but for the scheduling rules (`_wait_reason`)."""
    if ticket.status != "running" or ticket.awaiting:
        return False
    if task.status == "waiting_retry":
        return task.retry_at is not None and task.retry_at <= now
    return _runnable(ticket, task)


def effective_priority(ticket: TicketState, task: TaskState, now: datetime) -> int:
    """The ticket's priority plus one per AGING_S the task has waited (the starvation rule)."""
    waited = (now - task.deferred_since).total_seconds() if task.deferred_since is not None else 0.0
    return ticket.priority + max(0, int(waited // AGING_S))


def _after_reason(state: State, ticket: TicketState) -> str | None:
    """What of the ticket's `after:` is not met yet, in words."""
    for dep in ticket.spec.after:
        if isinstance(dep, CoreAfter):
            if dep.core not in state.core_components:
                have = ", ".join(sorted(state.core_components)) or "nothing yet"
                return f"after: the core has no {dep.core!r} yet (it has {have}; approve a proposal that trains one)"
            continue
        other = state.lookup(dep)
        if other is None:
            return f"after: {dep} (not submitted yet)"
        if other.status != "completed":
            more = "" if other.status == "running" else "; resubmit it, or cancel this ticket"
            return f"after: {dep} ({other.status}{more})"
    return None


def _wait_reason(
    state: State, ticket: TicketState, task: TaskState, use: Usage, placed: set[str]
) -> tuple[ev.WaitRule, str] | None:
    """Why a ready task may not be scheduled now (its rule and the words), or None. In this order."""
    if state.paused is not None:
        return "paused", f"installation paused ({state.paused}): jbctl resume"
    if ticket.held is not None:
        return "held", _held_reason(ticket)
    after = _after_reason(state, ticket)
    if after is not None:
        return "after", after
    limit = ticket.spec.max_parallel
    if limit is not None:
        out = sum(1 for t in ticket.tasks.values() if t.status in LIVE)
        if out >= limit:
            return "max_parallel", f"max_parallel: {out} of this ticket's {limit} jobs are out"
    qlimit = state.queue_limits.get(task.queue)
    if qlimit is not None and use.out_per_queue.get(task.queue, 0) >= qlimit:
        n = use.out_per_queue[task.queue]
        return "queue_limit", f"queue {task.queue} is full: {n} of {qlimit} jobs out (queue_limits)"
    need = gpu_claim(state, task) if task.queue not in placed else None  # placement counts per card instead
    if need is not None:
        budget = state.queue_gpu_memory[task.queue]
        free = budget - use.gpu_used.get(task.queue, 0)
        if need > free:
            if need > budget:
                return "gpu_memory", (
                    f"needs {_size(need)} of GPU memory, more than queue {task.queue}'s card has "
                    f"({_size(budget)}, queue_gpu_memory): lower the step's gpu_memory or raise the setting"
                )
            return "gpu_memory", f"waiting for a GPU with {_size(need)} free ({_size(free)} of {_size(budget)} free)"
    return None


def gpu_claim(state: State, task: TaskState) -> int | None:
    """The GPU memory an attempt of `task` claims on its queue's card: what the step declares, or the
    whole card when it declares nothing. None where the queue's memory is not counted."""
    budget = state.queue_gpu_memory.get(task.queue)
    if budget is None:
        return None
    return task.gpu_memory or budget


_size = size


def _full(state: State, queue: str, out_per_queue: dict[str, int]) -> bool:
    limit = state.queue_limits.get(queue)
    return limit is not None and out_per_queue.get(queue, 0) >= limit


def _held_reason(ticket: TicketState) -> str:
    return f"held ({ticket.held}): jbctl release {ticket.id}"


def _fill(out: _Emitter, now: datetime, candidates: list[tuple[str, str]], everything: bool = False) -> None:
    """Schedule ready tasks, the highest effective priority first, then arrival order; record why
    each of the rest waits (when that changed). Looked at: `candidates`, and the tasks waiting for a
    slot (a limit); with `everything`, every waiting task (a gate may have opened: a release, a
    resume, a ticket or core that `after:` names). While paused nothing is ranked: new waits are
    recorded, and the pause's own pass (`everything`) re-words what already waited."""
    out.filled = True
    st = out.state
    if everything:
        keys = [*st.deferred, *candidates]
    elif st.paused is not None:
        keys = candidates
    else:
        keys = [k for k, rule in st.deferred.items() if rule in ev.CAPACITY_RULES] + candidates
    # The counts of what is out (a walk over every live attempt) are made only when something needs
    # them: a finished step of a wide ticket usually leaves nothing to rank.
    use: Usage | None = None
    ranked: list[tuple[int, int, str, str]] = []
    tickets = st.tickets
    fresh = set(candidates)  # asked about now: always looked at in full (a hold may have changed why)
    for key in dict.fromkeys(keys):
        # Loose and cheap (this loop sees every task waiting for a slot): `_ready` is checked exactly
        # below, for the few that get as far as a free slot.
        ticket = tickets.get(key[0])
        task = ticket.tasks.get(key[1]) if ticket is not None else None
        if task is None or ticket is None or ticket.status != "running" or ticket.awaiting:
            continue
        if not everything and key not in fresh and task.deferred_rule == "queue_limit":
            if use is None:
                use = usage(st)
            if _full(st, task.queue, use.out_per_queue):
                continue  # its queue is still full: it keeps waiting, for the same reason
        if st.paused is None and ticket.held is not None and task.deferred == _held_reason(ticket):
            continue  # still held, and already says so
        since = task.deferred_since
        aging = int((now - since).total_seconds() // AGING_S) if since is not None and now > since else 0
        ranked.append((-(ticket.priority + aging), ticket.arrival, *key))
    if not ranked:
        return
    if use is None:
        use = usage(st)
    out_per_queue = use.out_per_queue
    ranked.sort(key=lambda r: (r[0], r[1]))  # stable: a ticket's tasks keep their plan order
    advance: list[str] = []
    gpu_behind: dict[str, str] = {}  # queue -> the first task that waits for its GPU memory
    placed = placed_queues(st)
    sizes = card_sizes(st) if placed else {}
    for *_, tid, task_id in ranked:
        ticket = st.tickets[tid]  # read only: a ticket is copied (out.ticket) only to act on it
        task = ticket.tasks[task_id]
        if (
            not everything
            and (tid, task_id) not in fresh
            and task.deferred_rule == "queue_limit"
            and _full(st, task.queue, out_per_queue)
        ):
            continue  # a task ranked above it took the last slot: it waits, for the same reason
        if not _ready(ticket, task, now):  # not runnable (yet, or any more: this pass ended its ticket)
            continue
        # A sweep's or the shards' join runs no job: no slot, memory, placement or hold keeps it waiting.
        joins = _joins_without_job(ticket, task)
        why = None if joins else _wait_reason(st, ticket, task, use, placed)
        if why is None and task.queue in gpu_behind:
            # No backfill: a task ranked lower never takes the memory a higher one waits for (it
            # would starve a large step forever); it waits behind it.
            rule: ev.WaitRule = "placement" if task.queue in placed else "gpu_memory"
            why = rule, f"behind {gpu_behind[task.queue]} on queue {task.queue} (GPU memory)"
        if why is None and not joins and task.queue in placed:
            found = place(st, task, use, sizes)
            if isinstance(found, Placement):
                out.placing[(tid, task_id)] = found
            else:
                why = found
        if why is not None and why[0] in ("gpu_memory", "placement"):
            gpu_behind.setdefault(task.queue, f"{tid}/{task_id}")
        if why is not None and why[0] == "no_worker" and _unplaceable_too_long(task, now):
            out.emit(
                ev.TaskBlocked(
                    at=now,
                    ticket=tid,
                    task=task_id,
                    reason=f"{why[1]}, for {UNPLACEABLE_S / 60:g} minutes: start a worker that has it, "
                    f"then `jbctl retry {tid} --task {task_id}`",
                )
            )
            continue
        if why is not None:
            if why[1] != task.deferred:
                out.emit(ev.TaskDeferred(at=now, ticket=tid, task=task_id, rule=why[0], reason=why[1]))
            continue
        ticket = out.ticket(tid)
        before = len(out.events)
        if task.status == "waiting_retry":
            reused = _schedule(out, ticket, out.task(tid, task_id), now)
        else:
            reused = _start(out, ticket, ticket.tasks[task_id], now)  # probes, a fan-out, or the job
        if reused:
            advance.append(tid)  # a result reused from the step cache: what needs it may run now
        out.placing.pop((tid, task_id), None)  # not scheduled after all (a probe, a policy): chosen afresh
        if any(isinstance(e, ev.SubtasksPlanned | ev.AttemptReused) for e in out.events[before:]):
            use = usage(st)  # others were scheduled meanwhile (a fan-out, an advance)
            out_per_queue = use.out_per_queue
            continue
        task = st.tickets[tid].tasks[task_id]
        if task.status in LIVE:
            use.add(st, task)
    for tid in dict.fromkeys(advance):
        _advance(out, out.ticket(tid), now)


def resolved_params(ticket: TicketState, task: TaskState, state: State | None = None) -> dict[str, Any]:
    """The step's parameters plus what the orchestrator adds: needed steps' outputs (`_inputs`),
    the binaries a check may run (`_allowed_binaries`), and the current core (`_core`)."""
    params = dict(task.params)
    inputs = {n: ticket.tasks[n].outputs for n in task.needs if ticket.tasks[n].outputs}
    if inputs:
        params["_inputs"] = inputs
    if task.subtasks:
        params["_subtasks"] = list(task.subtasks)  # the join: these inputs are its subtasks' outputs
    step = _step_spec(ticket, task.parent or task.id)  # a subtask takes its step's `inputs:`
    if step is not None and step.inputs:
        params["_uses"] = {name: _use(ticket, ref.from_, ref.use) for name, ref in step.inputs.items()}
    if task.kind == "check":
        granted = state.granted_binaries if state is not None else set()
        params["_allowed_binaries"] = sorted(ticket.allowed_binaries | granted)
    # A suite step measures a named checkpoint, whatever the core is (its cache key must not see the core).
    core_reader = task.kind in ("train", "evaluate", "infer") and "suite" not in params
    if state is not None and core_reader and state.core_version:
        params["_core"] = {"version": state.core_version, "components": dict(state.core_components)}
    if state is not None:
        ref = _adapter_ref(task)
        if ref is not None:
            # The worker refuses a reference that did not resolve, or to a retired adapter, saying which.
            params["_adapter"] = find_adapter(state, ref, str(task.params.get("component") or "reasoner")) or {
                "missing": ref
            }
    return params


def _use(ticket: TicketState, source: str, use: Literal["best", "all"]) -> dict[str, Any] | list[dict[str, Any]]:
    """What `inputs: {name: {from: source, use: ...}}` hands the job: a row `{subtask, params, metrics,
    outputs, best}` per combination of a sweep (`all`: every one, in combination order; `best`: the
    chosen one), or the step's own result as one row (a step that is not a sweep: `subtask` is the step)."""
    src = ticket.tasks[source]
    spec = _step_spec(ticket, source)
    keys = list(spec.matrix or {}) if spec is not None else []
    combos = [ticket.tasks[sid] for sid in src.subtasks] if src.join == "select" and src.subtasks else []

    def row(t: TaskState, best: bool) -> dict[str, Any]:
        params = {k: t.params.get(k) for k in keys} if combos else {}
        return {"subtask": t.id, "params": params, "metrics": dict(t.metrics), "outputs": dict(t.outputs), "best": best}

    if not combos:
        return row(src, True)
    if use == "best":
        return row(ticket.tasks[src.best or combos[0].id], True)
    return [row(t, t.id == src.best) for t in combos]


def _adapter_ref(task: TaskState) -> str | None:
    """The adapter a step names: an `infer` step's `adapter:`, or a train step's `adapter: {start: ...}`."""
    spec = task.params.get("adapter")
    if task.kind == "infer" and isinstance(spec, str):
        return spec
    if task.kind == "train" and isinstance(spec, dict) and isinstance(spec.get("start"), str):
        return str(spec["start"])
    return None


def _advance(out: _Emitter, ticket: TicketState, now: datetime) -> None:
    """Schedule what became runnable; end the ticket when nothing more can happen."""
    if ticket.status != "running" or ticket.awaiting:
        return
    tasks = ticket.tasks
    # `_runnable`, inlined: this walks every task of the ticket each time one of its steps ends.
    runnable = [
        (ticket.id, t.id)
        for t in tasks.values()
        if t.status == "pending" and all(tasks[n].status == "succeeded" for n in t.needs)
    ]
    _fill(out, now, runnable)
    ticket = out.ticket(ticket.id)
    if ticket.status != "running" or ticket.awaiting:
        return  # a reused result let `_fill` advance it to its end already
    first: TaskState | None = None  # the first failed task, in plan order
    done = True  # every task succeeded
    for t in ticket.tasks.values():
        if t.status == "failed":
            first = t
            break
        if t.status != "succeeded":
            done = False
    if first is not None:
        what = "acceptance check" if first.id.startswith(ACCEPT_PREFIX) else "task"
        if first.parent is not None:
            what = f"subtask {first.id} of step"
        name = first.parent or first.id
        out.emit(
            ev.TicketFailed(
                at=now,
                ticket=ticket.id,
                reason=f"{what} {name} failed: {first.reason or first.last_error}",
            )
        )
        return
    if done:
        _accept(out, ticket, now)


def _step_spec(ticket: TicketState, task_id: str) -> Step | None:
    """The ticket's step of that id (None for subtasks and acceptance checks)."""
    return ticket.spec.steps_by_id.get(task_id)


def _start(out: _Emitter, ticket: TicketState, task: TaskState, now: datetime) -> bool:
    """Act on a runnable task: probe its inputs (a failed probe blocks it), fan it out into subtasks
    (scheduled at once; the step's own job, the join, runs when they have all succeeded), or
    schedule its job. True when a result was reused from the step cache (the caller advances)."""
    if not _policy_allows(out, ticket, task, now):
        return False
    step = _step_spec(ticket, task.id)
    if step is not None and _joins_by_select(task):
        return _join_sweep(out, ticket, task, step, now)
    if step is not None and _joins_without_job(ticket, task):
        return _join_shards(out, ticket, task, step, now)
    if step is not None and not task.subtasks:  # a joining step was probed before it fanned out
        if step.probe and not _probes_pass(out, ticket, task, step, now):
            return False
        planned = plan_subtasks(step)
        if planned:
            subtasks = [{"id": p.id, "params": p.params} for p in planned]
            out.emit(ev.SubtasksPlanned(at=now, ticket=ticket.id, task=task.id, subtasks=subtasks, join=join_of(step)))
            # Subtasks are scheduled by the same rules as steps (limits, priority, holds); `_fill`
            # advances the ticket past any whose result was reused from the cache.
            _fill(out, now, [(ticket.id, p.id) for p in planned])
            return False
    return _schedule(out, ticket, out.task(ticket.id, task.id), now)


def _joins_by_select(task: TaskState) -> bool:
    """A fanned-out `matrix:` step, whose join picks the best combination instead of running a job."""
    return task.join == "select" and bool(task.subtasks)


def _joins_without_job(ticket: TicketState, task: TaskState) -> bool:
    """A fanned-out step the decider joins itself: a sweep, or shards that each reported the dataset's
    manifest fields (shards cached before they did are joined by a job, as they were then)."""
    if _joins_by_select(task):
        return True
    return (
        task.join == "manifest"
        and bool(task.subtasks)
        and all(isinstance(ticket.tasks[sid].outputs.get("manifest"), dict) for sid in task.subtasks)
    )


def _join_shards(out: _Emitter, ticket: TicketState, task: TaskState, step: Step, now: datetime) -> bool:
    """Every shard succeeded: join the dataset's manifest from their reports (ShardsJoined; the
    dispatcher writes it before acting on anything later), or reuse the step's recorded success.
    A job would only spend a dispatch and a worker's turn writing a few hundred bytes. The step's
    `expect:` checks judge the joined result. True: the step succeeded (the caller advances)."""
    params = resolved_params(ticket, task, out.state)
    key = _cache_key_of(ticket, task, params)
    held = _reused_or_waiting(out, ticket, task, key, now) if key is not None else None
    if held is not None:
        return held == "reused"
    subs = [ticket.tasks[sid] for sid in task.subtasks]
    try:
        manifest = join_manifest(
            [t.outputs["manifest"] for t in subs],
            [shard for t in subs for shard in t.outputs.get("shards") or []],
            Lineage(ticket=ticket.id, task=task.id),
            now,
        )
    except (JoinError, ValidationError) as exc:
        again = f"`jbctl retry {ticket.id} --from {task.id}` runs the shards again"
        out.emit(ev.TaskFailed(at=now, ticket=ticket.id, task=task.id, reason=f"shards: cannot join: {exc}; {again}"))
        return False
    artifact = manifest.manifest_id()
    metrics = {
        "count": float(manifest.count),
        "seconds": math.fsum(float(t.outputs.get("seconds") or 0.0) for t in subs),  # the work, as one job's
    }
    outputs = {"dataset": artifact, "generator": manifest.generator}
    failed = _judge_expectations(out, ticket, task, step, metrics, outputs, now)
    if failed:
        out.emit(ev.TaskFailed(at=now, ticket=ticket.id, task=task.id, reason=f"ExpectationFailed: {failed}"))
        return False
    out.emit(
        ev.ShardsJoined(
            at=now,
            ticket=ticket.id,
            task=task.id,
            manifest=manifest.model_dump(mode="json"),
            artifact=artifact,
            metrics=metrics,
            outputs=outputs,
            cache_key=key,
        )
    )
    return True


def _judge_expectations(
    out: _Emitter,
    ticket: TicketState,
    task: TaskState,
    step: Step,
    metrics: dict[str, float],
    outputs: dict[str, Any],
    now: datetime,
) -> str:
    """Judge the step's `expect:` checks on a result joined without a job (one event each, attempt 0);
    the failed ones, as the reason names them ("" when all hold). Joining again would give the same
    result, so a failure is final whatever `retry:` says."""
    about = {"at": now, "ticket": ticket.id, "task": task.id}
    failed, _ = _judge(out, about, step, metrics, outputs, final=True)
    return "; ".join(failed)


def _judge(
    out: _Emitter,
    about: dict[str, Any],
    step: Step | None,
    metrics: dict[str, float],
    outputs: dict[str, Any],
    *,
    final: bool = False,
) -> tuple[list[str], bool]:
    """Judge a result against the step's `expect:` checks, one `StepCheckEvaluated` each (`about`: the
    event's ticket, task, time and attempt). The failed ones as a reason names them, and whether any
    failed one may be retried (never when `final`)."""
    failed: list[str] = []
    retryable = False
    for exp in step.expect if step is not None else []:
        ok, observed, value = exp.judge(metrics, outputs)
        may_retry = exp.retryable and not final
        out.emit(
            ev.StepCheckEvaluated(
                **about, phase="expect", check=exp.text(), ok=ok, observed=observed, value=value, retryable=may_retry
            )
        )
        if not ok:
            failed.append(f"{exp.text()} (observed {observed})")
            retryable = retryable or may_retry
    return failed, retryable


def _join_sweep(out: _Emitter, ticket: TicketState, task: TaskState, step: Step, now: datetime) -> bool:
    """Every combination succeeded: record the table and the best by `select:` (SweepJoined), or fail
    the step when the compared metric is missing (or not a number) for every combination that should
    report it. True: the step succeeded (the caller advances the ticket)."""
    subs = [ticket.tasks[sid] for sid in task.subtasks]
    keys = list(step.matrix or {})
    rows = [{"subtask": t.id, "params": {k: t.params.get(k) for k in keys}, "metrics": dict(t.metrics)} for t in subs]
    best, metric = subs[0], None
    if step.select is not None and len(subs) > 1:
        metric = step.select.name(step.id)
        unranked = [t.id for t in subs if not _number(t.metrics.get(metric))]
        if unranked:
            first = ticket.tasks[unranked[0]]
            seen = f" ({first.id} reported: {', '.join(sorted(first.metrics)) or 'no metrics'})"
            out.emit(
                ev.TaskFailed(
                    at=now,
                    ticket=ticket.id,
                    task=task.id,
                    reason=f"select: metric {metric!r} is missing or not a number for {', '.join(unranked)}{seen}",
                )
            )
            return False
        sign = 1.0 if step.select.mode == "max" else -1.0
        for t in subs[1:]:
            if sign * t.metrics[metric] > sign * best.metrics[metric]:  # strictly better: ties keep the first
                best = t
    metrics = sweep_metrics(best.metrics, [t.metrics for t in subs])
    # `expect:` judges the joined result: the best's metrics and the aggregates over all combinations.
    failed = _judge_expectations(out, ticket, task, step, metrics, dict(best.outputs), now)
    if failed:
        out.emit(ev.TaskFailed(at=now, ticket=ticket.id, task=task.id, reason=f"ExpectationFailed: {failed}"))
        return False
    out.emit(
        ev.SweepJoined(
            at=now,
            ticket=ticket.id,
            task=task.id,
            rows=rows,
            best=best.id,
            metric=metric,
            mode=step.select.mode if metric is not None and step.select is not None else None,
            metrics=metrics,
            outputs=dict(best.outputs),
        )
    )
    return True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sweep_metrics(best: dict[str, float], table: list[dict[str, float]]) -> dict[str, float]:
    """The best combination's metrics plus `<name>_mean`, `<name>_std` (population), `<name>_min` and
    `<name>_max` of every metric over the combinations that report it as a finite number (so that
    `expect:` can ask for every combination: `acc_min >= 0.8`). A metric of the best's own that
    already bears such a name keeps its value."""
    aggregated: dict[str, float] = {}
    for name in sorted({n for m in table for n in m}):
        values = [float(m[name]) for m in table if _number(m.get(name))]
        if values:
            mean = math.fsum(values) / len(values)
            aggregated[f"{name}_mean"] = mean
            aggregated[f"{name}_std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
            aggregated[f"{name}_min"], aggregated[f"{name}_max"] = min(values), max(values)
    return aggregated | dict(best)


def _probes_pass(out: _Emitter, ticket: TicketState, task: TaskState, step: Step, now: datetime) -> bool:
    """Evaluate the step's probes (one event each); block the step when one fails."""
    failed = []
    for probe in step.probe:
        value: float | None = None
        if isinstance(probe, MetricProbe):
            value = ticket.tasks[probe.step].metrics.get(probe.name)
            ok = value is not None and probe.holds(value)
            observed = "no such metric reported" if value is None else f"{value:g}"
        else:
            have = out.state.core_components
            ok = probe.core in have
            observed = f"core v{out.state.core_version} holds " + (", ".join(sorted(have)) or "no components")
        out.emit(
            ev.StepCheckEvaluated(
                at=now,
                ticket=ticket.id,
                task=task.id,
                phase="probe",
                check=probe.text(),
                ok=ok,
                observed=observed,
                value=value,
            )
        )
        if not ok:
            failed.append(f"{probe.text()} ({observed})")
    if not failed:
        return True
    out.emit(
        ev.TaskBlocked(
            at=now,
            ticket=ticket.id,
            task=task.id,
            reason=f"{PROBE_FAILED}: {'; '.join(failed)}; fix the input, then "
            f"`jbctl retry {ticket.id} --task {task.id}` (a core probe is retried when the core changes)",
        )
    )
    return False


def _reprobe(out: _Emitter, now: datetime, actor: str) -> None:
    """The core changed: steps a probe blocked get another go (their probes run again)."""
    for tid in list(out.state.running):
        ticket = out.ticket(tid)
        blocked = [
            t.id for t in ticket.tasks.values() if t.status == "blocked" and (t.reason or "").startswith(PROBE_FAILED)
        ]
        for task_id in blocked:
            out.emit(ev.TaskRetried(at=now, ticket=tid, task=task_id, actor=actor))
        if blocked:
            _advance(out, ticket, now)


def _binary_allowed(state: State, ticket: TicketState, binary: str) -> bool:
    return binary in DEFAULT_CHECK_BINARIES or binary in ticket.allowed_binaries or binary in state.granted_binaries


def _policy_allows(out: _Emitter, ticket: TicketState, task: TaskState, now: datetime) -> bool:
    """A check whose binary is outside the allowlist, or that passes inline code to an interpreter
    without a grant for code (`python -c`), waits on a policy proposal instead of running."""
    if task.kind != "check":
        return True
    argv = list(task.params.get("run") or [])
    binary = binary_of(argv)
    code = inline_code(argv)
    if _binary_allowed(out.state, ticket, binary if code is None else code_grant(binary)):
        return True
    asked = [
        p
        for p in out.state.proposals.values()
        if p.ticket == ticket.id
        and p.kind == "policy"
        and p.candidate.get("binary") == binary
        and ("code" in p.candidate) == (code is not None)
    ]
    if any(p.status == "open" for p in asked):
        return False
    refused = [p for p in asked if p.status in ("rejected", "expired")]
    if refused:
        what = f"binary {binary!r}" + (" with inline code" if code is not None else "")
        out.emit(
            ev.TaskFailed(
                at=now,
                ticket=ticket.id,
                task=task.id,
                reason=f"{what} was not allowed (policy proposal {refused[-1].id} {refused[-1].status})",
            )
        )
        return False
    candidate: dict[str, Any] = {"binary": binary, "argv": argv, "task": task.id}
    if code is not None:
        candidate["code"] = code  # approving grants code_grant(binary) as well as the binary
    _propose(out, ticket, now, "policy", candidate)
    return False


def _propose(
    out: _Emitter,
    ticket: TicketState,
    now: datetime,
    kind: Literal["core", "policy"],
    candidate: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> None:
    """Open the next P-n for `ticket`, against the current core, expiring after the ticket's `expires`."""
    out.emit(
        ev.ProposalOpened(
            at=now,
            ticket=ticket.id,
            proposal=f"P-{len(out.state.proposals) + 1}",
            kind=kind,
            base_core_version=out.state.core_version,
            candidate=candidate,
            metrics=metrics or {},
            expires_at=now + timedelta(seconds=ticket.spec.expires) if ticket.spec.expires else None,
            approvers=ticket.spec.approvers,
        )
    )


def _open_core_proposal(out: _Emitter, ticket: TicketState, now: datetime) -> None:
    """Training and evaluation are done and the checks hold: ask a human to promote the candidate."""
    candidate: dict[str, Any] = {}
    for task in ticket.tasks.values():
        component = task.outputs.get("component")
        if task.kind == "train" and component:
            # A training reused from the step cache names the attempt that trained the weights.
            source = task.reused_from or (ticket.id, task.id, task.attempt)
            candidate[str(component)] = {k: v for k, v in task.outputs.items() if k != "component"} | {
                "ticket": source[0],
                "task": source[1],
                "attempt": source[2],
            }
    cand: dict[str, float] = {}
    current: dict[str, float] = {}
    for task in ticket.tasks.values():
        if task.kind == "evaluate":
            cand.update({f"{task.id}.{k}": v for k, v in task.metrics.items()})
            current.update({f"{task.id}.{k}": float(v) for k, v in (task.outputs.get("core_metrics") or {}).items()})
    delta = {k: cand[k] - current[k] for k in cand if k in current}
    _propose(out, ticket, now, "core", candidate, {"candidate": cand, "current": current, "delta": delta})
    if ticket.spec.suite:
        proposal = f"P-{len(out.state.proposals)}"
        _file_suite(out, now, proposal, candidate, core_version=None, proposal=proposal)


def _file_suite_for_core(out: _Emitter, now: datetime) -> None:
    version = out.state.core_version
    components = {k: dict(v) for k, v in out.state.core_components.items()}
    _file_suite(out, now, f"v{version}", components, core_version=version, proposal=None)


def _file_suite(
    out: _Emitter,
    now: datetime,
    subject: str,
    components: dict[str, Any],
    *,
    core_version: int | None,
    proposal: str | None,
) -> None:
    """File the suite ticket that measures `components` (a new core version's, or a proposal's
    candidate) on the standing evaluation suite: a ticket like any other, without a file."""
    built = suite_ticket(subject, components, core_version=core_version, proposal=proposal)
    if built is None:
        return
    try:
        spec = Ticket.model_validate(built[0]).model_dump(mode="json", by_alias=True)
    except ValueError:
        # Unreachable with the components a train step records; but a rule must never raise on
        # recorded data (the command would be retried forever), so an odd entry measures nothing.
        return
    existing = out.get_ticket(spec["id"])
    if existing is not None and existing.status == "running":
        return  # a suite run for this subject is still going (e.g. a rollback to the version it measures)
    out.emit(
        ev.TicketSubmitted(
            at=now,
            ticket=spec["id"],
            path=SUITE_PATH,
            content_hash=spec_hash(spec),
            revision=existing.revision + 1 if existing else 1,
            spec=spec,
        )
    )
    _advance(out, out.ticket(spec["id"]), now)


def _run_suite(out: _Emitter, c: cmd.RunSuite) -> None:
    if c.proposal is not None:
        proposal = out.state.proposals.get(c.proposal)
        if proposal is None or proposal.kind != "core":
            return
        components = {k: dict(v) for k, v in proposal.candidate.items()}
        _file_suite(out, c.now, proposal.id, components, core_version=None, proposal=proposal.id)
        return
    version = out.state.core_version if c.core_version is None else c.core_version
    found = next((h for h in out.state.core_history if h["version"] == version), None)
    if found is not None:
        components = {k: dict(v) for k, v in found["components"].items()}
        _file_suite(out, c.now, f"v{version}", components, core_version=version, proposal=None)


def _record_suite(
    out: _Emitter, ticket: TicketState, task_id: str, now: datetime, metrics: dict[str, Any], *, reused: bool
) -> None:
    """A suite step succeeded: record its metrics as the suite's row for its subject."""
    task = ticket.tasks[task_id]
    suite = task.params.get("suite")
    if task.kind != "evaluate" or not isinstance(suite, dict) or ticket.path != SUITE_PATH:
        return
    out.emit(
        ev.SuiteEvaluated(
            at=now,
            ticket=ticket.id,
            task=task_id,
            component=str(suite.get("component")),
            yardstick=str(suite.get("yardstick")),
            seed=int(suite.get("seed") or 0),
            core_version=suite.get("core_version"),
            proposal=suite.get("proposal"),
            checkpoint=str(task.params.get("checkpoint") or ""),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
            reused=reused,
        )
    )


def _accept(out: _Emitter, ticket: TicketState, now: datetime) -> None:
    results: list[dict[str, Any]] = []
    run_n = 0
    for n, check in enumerate(ticket.spec.acceptance, start=1):
        if isinstance(check, MetricCheck):
            observed = ticket.tasks[check.step].metrics.get(check.name)
            ok = observed is not None and check.holds(observed)
            text = f"{check.metric} {check.op} {check.value:g}"
            results.append({"check": text, "ok": ok, "observed": observed})
        else:
            run_n += 1
            task = ticket.tasks[f"{ACCEPT_PREFIX}{n}"]
            results.append({"check": "run: " + " ".join(check.run), "ok": task.status == "succeeded", "observed": None})
    passed = all(r["ok"] for r in results)
    out.emit(ev.AcceptanceEvaluated(at=now, ticket=ticket.id, results=results, passed=passed))
    if passed and ticket.spec.update == "core":
        _open_core_proposal(out, ticket, now)
    elif passed:
        adapters = {
            str(t.outputs["adapter"]): {k: v for k, v in t.outputs.items()} | {"task": t.id}
            for t in ticket.tasks.values()
            if t.kind == "train" and t.outputs.get("adapter")
        }
        if ticket.spec.update == "adapter" and adapters:
            _activate_adapters(out, ticket, adapters, now)
        out.emit(ev.TicketCompleted(at=now, ticket=ticket.id))
    else:
        bad = next(r for r in results if not r["ok"])
        seen = "no such metric reported" if bad["observed"] is None else f"observed {bad['observed']:g}"
        out.emit(ev.TicketFailed(at=now, ticket=ticket.id, reason=f"acceptance check failed: {bad['check']} ({seen})"))


# --- working memory (adapters) ------------------------------------------------------------------


def _next_adapter_number(state: State) -> int:
    numbers = [int(a[2:]) for a in state.adapters if a[2:].isdigit()]
    return max(numbers, default=0) + 1


def _activate_adapters(out: _Emitter, ticket: TicketState, adapters: dict[str, Any], now: datetime) -> None:
    """Name each new adapter A-<n>; the ticket's older adapter of the same component is replaced by it."""
    n = _next_adapter_number(out.state)
    ids = {component: f"A-{n + i}" for i, component in enumerate(sorted(adapters))}
    metrics = {c: dict(ticket.tasks[str(o["task"])].metrics) for c, o in adapters.items() if o["task"] in ticket.tasks}
    older = [
        a
        for a in out.state.adapters.values()
        if a["active"] and a["ticket"] == ticket.id and a["component"] in adapters
    ]
    for a in sorted(older, key=lambda a: str(a["id"])):
        out.emit(
            ev.AdapterRetired(
                at=now,
                ticket=ticket.id,
                adapter=a["id"],
                reason="replaced",
                detail=f"{ticket.id} trained a new {a['component']} adapter ({ids[a['component']]})",
                replaced_by=ids[a["component"]],
            )
        )
    out.emit(
        ev.AdapterActivated(
            at=now, ticket=ticket.id, adapters=adapters, core_version=out.state.core_version, ids=ids, metrics=metrics
        )
    )


def _retire_rolled_past(out: _Emitter, now: datetime) -> None:
    """After a promotion or rollback: an adapter whose component's core weights changed no longer fits.

    An adapter is a delta on the exact core checkpoint it was trained on; a new core version that
    keeps that checkpoint (another component changed) keeps the adapter active."""
    for a in sorted(out.state.adapters.values(), key=lambda a: str(a["id"])):
        if not a["active"]:
            continue
        now_ckpt = (out.state.core_components.get(a["component"]) or {}).get("checkpoint")
        if a["core_checkpoint"] is not None and now_ckpt == a["core_checkpoint"]:
            continue
        out.emit(
            ev.AdapterRetired(
                at=now,
                ticket=a["ticket"],
                adapter=a["id"],
                reason="core_rolled",
                detail=(
                    f"core v{out.state.core_version} changed the {a['component']} it was trained on "
                    f"(core v{a['base_core_version']})"
                ),
                core_version=out.state.core_version,
            )
        )


def _retire_adapter(out: _Emitter, c: cmd.RetireAdapter) -> None:
    adapter = out.state.adapters.get(c.adapter)
    if adapter is None or not adapter["active"]:
        return
    out.emit(
        ev.AdapterRetired(
            at=c.now, ticket=adapter["ticket"], adapter=adapter["id"], reason="manual", detail=c.reason, actor=c.actor
        )
    )


def find_adapter(state: State, ref: str, component: str | None = None) -> dict[str, Any] | None:
    """The adapter `ref` names: `A-<n>`, or a ticket id (its active adapter, of `component` when given)."""
    if ref in state.adapters:
        return dict(state.adapters[ref])
    found = [
        a
        for a in state.adapters.values()
        if a["ticket"] == ref and a["active"] and (component is None or a["component"] == component)
    ]
    return dict(found[-1]) if found else None


def _schedule_task(out: _Emitter, c: cmd.ScheduleTask) -> None:
    ticket = out.get_ticket(c.ticket)
    if ticket is None or ticket.status != "running" or c.task not in ticket.tasks:
        return
    if _runnable(ticket, ticket.tasks[c.task]):
        _fill(out, c.now, [(ticket.id, c.task)])


def _retry(out: _Emitter, c: cmd.RetryTask) -> None:
    ticket = out.get_ticket(c.ticket)
    if ticket is None or c.task not in ticket.tasks:
        return
    # A failed task ends its ticket; a blocked one waits here for a human.
    if ticket.status != "running" or ticket.tasks[c.task].status != "blocked":
        return
    out.emit(ev.TaskRetried(at=c.now, ticket=ticket.id, task=c.task, actor=c.actor))
    _advance(out, ticket, c.now)


def _tick(out: _Emitter, c: cmd.Tick) -> None:
    for proposal in list(out.state.proposals.values()):
        if proposal.status == "open" and proposal.expires_at is not None and proposal.expires_at <= c.now:
            out.emit(ev.ProposalExpired(at=c.now, ticket=proposal.ticket, proposal=proposal.id))
            _after_decision(out, proposal.id, c.now, f"proposal {proposal.id} expired undecided")
    due: list[tuple[str, str]] = []
    for tid in list(out.state.running):
        ticket = out.ticket(tid)
        limit = ticket.spec.constraints.max_wall_minutes
        if limit is not None and c.now - ticket.submitted_at > timedelta(minutes=limit):
            out.emit(
                ev.TicketFailed(at=c.now, ticket=ticket.id, reason=f"deadline exceeded: max_wall_minutes={limit:g}")
            )
            continue
        due.extend(
            (tid, t.id) for t in ticket.tasks.values() if t.status == "waiting_retry" and _ready(ticket, t, c.now)
        )
    _fill(out, c.now, due)


# --- reports from workers ----------------------------------------------------------------------


def _current(out: _Emitter, c: cmd._Report) -> tuple[TicketState, TaskState] | None:
    """The ticket and task a report speaks of, if it is for the live attempt and not a duplicate."""
    if c.ticket in out.state.cold:
        return None  # a late report for a ticket that is over
    ticket = out.get_ticket(c.ticket)
    if ticket is None:
        return None
    task = ticket.tasks.get(c.task)
    if task is None:
        return None
    if ticket.status != "running" or task.attempt != c.attempt or task.status not in LIVE:
        # An old attempt's report: the attempt number is the fencing token. A worker that was cut off
        # may come back after its ticket ended, too. Not after a cancel: the stopped jobs' last
        # reports are expected then.
        late = c.attempt < task.attempt or c.report_seq > task.last_report_seq
        recorded = c.report_seq and late and 1 <= c.attempt <= task.attempt and ticket.status != "cancelled"
        if recorded and not isinstance(c, cmd.RecordProgress):
            out.emit(
                ev.StaleReportRefused(
                    **_about(c), current_attempt=task.attempt, report=_REPORT_KIND[type(c)], worker=c.sender
                )
            )
        return None
    if c.report_seq and c.report_seq <= task.last_report_seq:
        return None  # delivered twice
    return ticket, out.task(ticket.id, task.id)


_REPORT_KIND: dict[type, str] = {
    cmd.RecordJobStarted: "started",
    cmd.RecordProgress: "progress",
    cmd.RecordCheckpoint: "checkpoint",
    cmd.RecordArtifact: "artifact",
    cmd.RecordJobSucceeded: "succeeded",
    cmd.RecordJobFailed: "failed",
}


def _about(c: cmd._Report, report_seq: bool = True) -> dict[str, Any]:
    """The fields every report event repeats from its command."""
    about = {"at": c.now, "ticket": c.ticket, "task": c.task, "attempt": c.attempt}
    return about | {"report_seq": c.report_seq} if report_seq else about


def _started(out: _Emitter, c: cmd.RecordJobStarted) -> None:
    if (found := _current(out, c)) and found[1].status == "scheduled":
        out.emit(ev.AttemptStarted(**_about(c), worker=c.worker))


def _progress(out: _Emitter, c: cmd.RecordProgress) -> None:
    if _current(out, c):
        out.emit(ev.ProgressRecorded(**_about(c), step=c.step, total=c.total, metrics=c.metrics))


def _checkpoint(out: _Emitter, c: cmd.RecordCheckpoint) -> None:
    if _current(out, c):
        out.emit(ev.CheckpointSaved(**_about(c), path=c.path, step=c.step))


def _artifact(out: _Emitter, c: cmd.RecordArtifact) -> None:
    if _current(out, c):
        out.emit(ev.ArtifactRecorded(**_about(c), artifact=c.artifact, kind=c.kind, meta=c.meta))


def _succeeded(out: _Emitter, c: cmd.RecordJobSucceeded) -> None:
    found = _current(out, c)
    if not found:
        return
    ticket, task = found
    failed, retryable = _judge(out, _about(c, report_seq=False), _step_spec(ticket, task.id), c.metrics, c.outputs)
    if failed:
        # The job ran, but its result is not what the step promised: downstream steps must not use it.
        error = f"ExpectationFailed: {'; '.join(failed)}"
        _fail_attempt(out, c, ticket, task, error, retryable=retryable, cause="job", violation=None)
        return
    out.emit(ev.AttemptSucceeded(**_about(c), metrics=c.metrics, outputs=c.outputs))
    _record_suite(out, ticket, task.id, c.now, c.metrics, reused=False)
    _advance(out, ticket, c.now)


def _failed(out: _Emitter, c: cmd.RecordJobFailed) -> None:
    found = _current(out, c)
    if not found:
        return
    ticket, task = found
    if task.stop_attempt == c.attempt and not c.violation:
        # `jbctl hold --stop` asked this attempt to stop (at a checkpoint; or it failed meanwhile): the
        # task runs again, from its last checkpoint, once the ticket is released (or at once, if it
        # was released before the attempt stopped).
        out.emit(ev.AttemptStopped(**_about(c), error=c.error[-4000:]))
        _advance(out, ticket, c.now)
        return
    _fail_attempt(out, c, ticket, task, c.error, retryable=c.retryable, cause=c.cause, violation=c.violation)


def _fail_attempt(
    out: _Emitter,
    c: cmd._Report,
    ticket: TicketState,
    task: TaskState,
    error: str,
    *,
    retryable: bool,
    cause: ev.FailureCause,
    violation: str | None,
) -> None:
    """The attempt failed: retry it with back-off (within the step's retries), block it on a loop, or
    fail the task (and so the ticket)."""
    if violation:
        out.emit(
            ev.SafetyViolation(
                at=c.now, what=violation, detail=_last_line(error), ticket=c.ticket, task=c.task, attempt=c.attempt
            )
        )
    fp = fingerprint(task.kind, task.params, error)
    can_retry = retryable and not violation and task.attempt <= task.retries
    retry_at = c.now + timedelta(seconds=backoff_seconds(c.ticket, c.task, c.attempt)) if can_retry else None
    out.emit(
        ev.AttemptFailed(
            **_about(c), error=error[-4000:], fingerprint=fp, retry_at=retry_at, retryable=retryable, cause=cause
        )
    )
    if retry_at is not None:
        # A lost worker or job says nothing about the job: the infrastructure's failures are retried
        # with back-off (within the step's retries) and never taken for a loop.
        pattern = _loop_pattern(task.failures) if cause == "job" else None
        if pattern:
            out.emit(
                ev.LoopDetected(
                    at=c.now,
                    ticket=c.ticket,
                    task=c.task,
                    fingerprint=fp,
                    pattern=pattern,
                    count=len(task.failures),
                )
            )
            out.emit(
                ev.TaskBlocked(
                    at=c.now,
                    ticket=c.ticket,
                    task=c.task,
                    reason=f"loop detected ({pattern}): the same failure {len(task.failures)} times; "
                    f"fix the cause, then `jbctl retry {c.ticket} --task {c.task}`",
                )
            )
        return
    why = "not retryable" if not retryable or violation else f"failed after {task.attempt} attempts"
    out.emit(ev.TaskFailed(at=c.now, ticket=c.ticket, task=c.task, reason=f"{why}: {_last_line(error)}"))
    _advance(out, ticket, c.now)


def _loop_pattern(failures: list[str]) -> str | None:
    """`repeat`: the last LOOP_REPEATS failures identical; `alternate`: A,B,A,B."""
    tail = failures[-LOOP_REPEATS:]
    if len(tail) == LOOP_REPEATS and len(set(tail)) == 1:
        return "repeat"
    last4 = failures[-4:]
    if len(last4) == 4 and last4[0] == last4[2] and last4[1] == last4[3] and last4[0] != last4[1]:
        return "alternate"
    return None


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:300]


ANYONE = "*"  # `approvers: ["*"]`: anyone who can run jbctl may approve (an explicit choice)


def may_approve(state: State, proposal: Any, actor: str, configured: list[str]) -> str | None:
    """Why `actor` may not approve `proposal`, or None. The one place this rule lives: jbctl and the
    web console both send ApproveProposal and get their answer (or ApprovalRefused) from here.

    Who may: the installation's `approvers` setting (`configured`; `["*"]` means anyone), or, when
    none is configured, the user who owns the Jetbox home (HomeOwnerRecorded). A ticket's own
    `approvers` list can only narrow that (a ticket author cannot name themselves approver)."""
    if ANYONE in configured:
        installation: list[str] | None = None
        source = '`approvers: ["*"]`: anyone'
    elif configured:
        installation = list(configured)
        source = "the `approvers` setting"
    elif state.home_owner is not None:
        installation = [state.home_owner]
        source = (
            "the owner of the Jetbox home, the default when no `approvers` are configured; "
            'set `approvers` in jetbox.toml or JETBOX_APPROVERS, or ["*"] for anyone'
        )
    else:
        return (
            "no `approvers` are configured and the owner of the Jetbox home is not recorded yet "
            "(the daemon records it at its first start)"
        )
    narrowed = [a for a in (proposal.approvers or []) if a != ANYONE]
    if narrowed:
        allowed = [a for a in narrowed if installation is None or a in installation]
        if actor not in allowed:
            within = "" if installation is None else f", within {', '.join(installation)} ({source})"
            return f"{actor} is not an approver of {proposal.id} (the ticket names {', '.join(narrowed)}{within})"
    elif installation is not None and actor not in installation:
        return f"{actor} is not an approver of {proposal.id} (approvers: {', '.join(installation)}: {source})"
    if proposal.kind == "core" and proposal.base_core_version != state.core_version:
        return (
            f"{proposal.id} was evaluated against core v{proposal.base_core_version}, but the core is now "
            f"v{state.core_version}; re-evaluate with `jbctl retry --reevaluate {proposal.id}`"
        )
    return None


def _approve(out: _Emitter, c: cmd.ApproveProposal) -> None:
    proposal = out.state.proposals.get(c.proposal)
    if proposal is None or proposal.status != "open":
        return
    actor = c.actor or "unknown"
    why_not = may_approve(out.state, proposal, actor, c.approvers)
    if why_not:
        out.emit(
            ev.ApprovalRefused(at=c.now, ticket=proposal.ticket, proposal=proposal.id, actor=actor, reason=why_not)
        )
        return
    scope = c.scope if proposal.kind == "policy" else None
    out.emit(
        ev.ProposalApproved(
            at=c.now, ticket=proposal.ticket, proposal=proposal.id, actor=actor, note=c.note, scope=scope
        )
    )
    if proposal.kind == "core":
        components = dict(out.state.core_components) | dict(proposal.candidate)
        out.emit(
            ev.CorePromoted(
                at=c.now,
                version=out.state.core_version + 1,
                components=components,
                metrics=dict(proposal.metrics.get("candidate", {})),
                proposal=proposal.id,
                actor=actor,
                note=c.note,
            )
        )
        _retire_rolled_past(out, c.now)
        ticket = out.ticket(proposal.ticket)
        if ticket.status == "running":
            out.emit(ev.TicketCompleted(at=c.now, ticket=ticket.id))
        if ticket.spec.suite:
            _file_suite_for_core(out, c.now)
        _reprobe(out, c.now, actor)
    else:
        _advance(out, out.ticket(proposal.ticket), c.now)


def _record_owner(out: _Emitter, c: cmd.RecordHomeOwner) -> None:
    if out.state.home_owner is None:  # the first start's answer stands
        out.emit(ev.HomeOwnerRecorded(at=c.now, user=c.user, uid=c.uid, home=c.home))


def _reject(out: _Emitter, c: cmd.RejectProposal) -> None:
    proposal = out.state.proposals.get(c.proposal)
    if proposal is None or proposal.status != "open":
        return
    actor = c.actor or "unknown"
    out.emit(ev.ProposalRejected(at=c.now, ticket=proposal.ticket, proposal=proposal.id, actor=actor, reason=c.reason))
    _after_decision(out, proposal.id, c.now, f"proposal {proposal.id} rejected by {actor}: {c.reason}")


def _after_decision(out: _Emitter, proposal_id: str, now: datetime, reason: str) -> None:
    """A core proposal that will not be approved ends its ticket; a refused policy fails its check."""
    proposal = out.state.proposals[proposal_id]
    ticket = out.ticket(proposal.ticket)
    if ticket.status != "running":
        return
    if proposal.kind == "core":
        out.emit(ev.TicketFailed(at=now, ticket=ticket.id, reason=reason))
    else:
        _advance(out, ticket, now)


def _reevaluate(out: _Emitter, c: cmd.ReevaluateProposal) -> None:
    proposal = out.state.proposals.get(c.proposal)
    if proposal is None or proposal.status != "open" or proposal.kind != "core":
        return
    ticket = out.ticket(proposal.ticket)
    out.emit(
        ev.ProposalWithdrawn(
            at=c.now,
            ticket=ticket.id,
            proposal=proposal.id,
            actor=c.actor,
            reason=f"re-evaluating against core v{out.state.core_version}",
        )
    )
    # Evaluations, and whatever depends on them, run again; training is kept.
    again = {t.id for t in ticket.tasks.values() if t.kind == "evaluate"}
    grew = True
    while grew:
        more = {t.id for t in ticket.tasks.values() if t.id not in again and again & set(t.needs)}
        again |= more
        grew = bool(more)
    for tid in sorted(again):
        out.emit(ev.TaskRetried(at=c.now, ticket=ticket.id, task=tid, actor=c.actor))
    _advance(out, ticket, c.now)


def _rollback(out: _Emitter, c: cmd.RollbackCore) -> None:
    target = next((h for h in out.state.core_history if h["version"] == c.version), None)
    if target is None or c.version == out.state.core_version:
        return
    out.emit(
        ev.CorePromoted(
            at=c.now,
            version=out.state.core_version + 1,
            components=dict(target["components"]),
            metrics=dict(target["metrics"]),
            proposal=None,
            actor=c.actor or "unknown",
            rollback_to=c.version,
            note=c.note,
        )
    )
    _retire_rolled_past(out, c.now)
    _file_suite_for_core(out, c.now)
    _reprobe(out, c.now, c.actor or "unknown")


def _violation(out: _Emitter, c: cmd.RecordViolation) -> None:
    out.emit(
        ev.SafetyViolation(at=c.now, what=c.what, detail=c.detail, ticket=c.ticket, task=c.task, attempt=c.attempt)
    )


def _plan(out: _Emitter, c: cmd.PlanMilestones) -> None:
    """Record each new or changed milestone; applying the same plan twice records nothing."""
    for spec in c.milestones:
        mid = str(spec["id"])
        digest = spec_hash(spec)
        known = out.state.milestones.get(mid)
        if known is not None and known["hash"] == digest and known["plan"] == c.plan:
            continue
        revision = known["revision"] + 1 if known is not None else 1
        out.emit(
            ev.MilestonePlanned(
                at=c.now, milestone=mid, plan=c.plan, path=c.path, revision=revision, content_hash=digest, spec=spec
            )
        )


# --- the step cache and reruns ------------------------------------------------------------------


def _cache_key_of(ticket: TicketState, task: TaskState, params: dict[str, Any]) -> str | None:
    """The task's cache key, or None when it is not cached (its kind, `cache: false`, network)."""
    if task.kind in NEVER_CACHED:
        return None
    step = _step_spec(ticket, task.parent or task.id)  # a subtask follows its step's `cache:`
    if not cacheable(task.kind, step.cache if step else None, ticket.spec.cache, ticket.spec.constraints.network):
        return None
    return cache_key(task.kind, params)


def _in_flight(state: State, key: str) -> tuple[str, str] | None:
    """The (ticket, task) running the step with this key now (live or waiting to retry), if any."""
    holder = state.inflight.get(key)
    if holder is None:
        return None
    ticket = state.tickets.get(holder[0])
    task = ticket.tasks.get(holder[1]) if ticket is not None else None
    if ticket is None or task is None or ticket.status != "running" or task.cache_key != key:
        return None
    return holder if task.status in LIVE or task.status == "waiting_retry" else None


def _reused_or_waiting(
    out: _Emitter, ticket: TicketState, task: TaskState, key: str, now: datetime
) -> Literal["reused", "waiting"] | None:
    """Reuse the recorded success of `key` (AttemptReused), or wait while another task runs the same
    step (it stays pending; `_release_waiters` comes back to it). None: run it."""
    if task.fresh:  # `jbctl retry --from` asked for it to run again
        return None
    entry = out.state.cache.get(key)
    if entry is not None and _meets_expectations(ticket, task, entry.metrics, entry.outputs):
        out.emit(
            ev.AttemptReused(
                at=now,
                ticket=ticket.id,
                task=task.id,
                cache_key=key,
                source_ticket=entry.ticket,
                source_task=entry.task,
                source_attempt=entry.attempt,
                metrics=dict(entry.metrics),
                outputs=dict(entry.outputs),
            )
        )
        _record_suite(out, out.ticket(ticket.id), task.id, now, dict(entry.metrics), reused=True)
        return "reused"
    holder = _in_flight(out.state, key)
    if task.status != "pending" or holder is None or holder == (ticket.id, task.id):
        return None
    if out.state.tickets[ticket.id].tasks[task.id].waiting_on != key:  # said once, not on every pass
        out.emit(
            ev.TaskWaiting(
                at=now, ticket=ticket.id, task=task.id, cache_key=key, holder_ticket=holder[0], holder_task=holder[1]
            )
        )
    return "waiting"


def _meets_expectations(
    ticket: TicketState, task: TaskState, metrics: dict[str, float], outputs: dict[str, Any]
) -> bool:
    """Whether a cached result holds this step's `expect:` checks (not in the key: another ticket's
    step may expect more of the same result). One that does not is not reused: the step runs."""
    step = _step_spec(ticket, task.id)
    return all(exp.judge(metrics, outputs)[0] for exp in (step.expect if step is not None else []))


def _carried_checkpoint(task: TaskState, resume: str | None) -> str | None:
    """The last checkpoint of this train step in an earlier revision, when the step is the same but
    for a budget that grew (more steps): training goes on from there instead of from zero."""
    if task.carried is None or resume is None:
        return None
    key, checkpoint, params = task.carried
    old_budget = {k: params.get(k) for k in BUDGET_KEYS}
    new_budget = {k: task.params.get(k) for k in BUDGET_KEYS}
    return checkpoint if key == resume and budget_grew(old_budget, new_budget) else None


_FREES_KEY = (ev.AttemptSucceeded, ev.AttemptFailed, ev.TaskFailed, ev.TaskBlocked)
_ENDS_TICKET = (ev.TicketCancelled, ev.TicketFailed)
_FREEING = frozenset(_FREES_KEY + _ENDS_TICKET)


def _release_waiters(out: _Emitter, now: datetime) -> None:
    """Tasks left pending while another ran the same step get their turn when it ends: they reuse
    its success, or one of them runs the step itself (the holder failed or was cancelled)."""
    done = 0
    while done < len(out.events) and out.state.waiting:  # nobody waits: nothing to release
        freed: set[str] = set()
        for e in out.events[done:]:
            if type(e) not in _FREEING:  # most commands: a progress report
                continue
            if isinstance(e, _ENDS_TICKET):
                ended = out.state.tickets[e.ticket]
                freed |= {t.cache_key for t in ended.tasks.values() if t.cache_key}
            elif isinstance(e, _FREES_KEY):
                task = out.state.tickets[e.ticket].tasks.get(e.task)
                if task is not None and task.cache_key:
                    freed.add(task.cache_key)
        done = len(out.events)
        waiters = {
            tid for key in freed if _in_flight(out.state, key) is None for tid, _task in out.state.waiting.get(key, ())
        }
        for tid in sorted(waiters):  # _advance reuses the result, or runs the step, or waits again
            _advance(out, out.ticket(tid), now)


def descendants(ticket: TicketState, task_id: str) -> set[str]:
    """`task_id` and every task that needs it, directly or not."""
    found = {task_id}
    grew = True
    while grew:
        more = {t.id for t in ticket.tasks.values() if t.id not in found and found & set(t.needs)}
        found |= more
        grew = bool(more)
    return found


def _retry_from(out: _Emitter, c: cmd.RetryFrom) -> None:
    """An ended ticket runs again from a step: it and what needs it run afresh (never from the
    cache), whatever did not succeed runs again, and what succeeded upstream is kept."""
    ticket = out.get_ticket(c.ticket)
    if ticket is None or c.task not in ticket.tasks or ticket.status == "running":
        return
    again = descendants(ticket, c.task)
    again |= {sub for t in list(again) for sub in ticket.tasks[t].subtasks}  # a fanned-out step: its shards too
    out.emit(ev.TicketRetried(at=c.now, ticket=ticket.id, from_task=c.task, actor=c.actor))
    for task in list(ticket.tasks.values()):
        if task.id in again or task.status != "succeeded":
            out.emit(ev.TaskRetried(at=c.now, ticket=ticket.id, task=task.id, actor=c.actor, fresh=task.id in again))
    _advance(out, ticket, c.now)


def _clear_cache(out: _Emitter, c: cmd.ClearCache) -> None:
    keys = sorted(
        key
        for key, entry in out.state.cache.items()
        if (c.kind is None or entry.kind == c.kind)
        and (c.ticket is None or entry.ticket == c.ticket)
        and (c.key is None or key.startswith(c.key))
    )
    if keys:
        what = ", ".join(f"{k}={v}" for k, v in (("kind", c.kind), ("ticket", c.ticket), ("key", c.key)) if v)
        out.emit(ev.CacheCleared(at=c.now, keys=keys, actor=c.actor, reason=what or "all"))


# --- steering: hold, release, priority, pause, limits -----------------------------------------


def _hold(out: _Emitter, c: cmd.HoldTicket) -> None:
    ticket = out.get_ticket(c.ticket)
    if ticket is None or ticket.status != "running" or (ticket.held is not None and ticket.stop_held >= c.stop):
        return
    who = f"by {c.actor}" if c.actor else "by a user"
    out.emit(ev.TicketHeld(at=c.now, ticket=ticket.id, reason=c.reason or who, actor=c.actor, stop=c.stop))
    _advance(out, out.ticket(ticket.id), c.now)  # record why its ready tasks now wait


def _release(out: _Emitter, c: cmd.ReleaseTicket) -> None:
    ticket = out.get_ticket(c.ticket)
    if ticket is None or ticket.status != "running" or ticket.held is None:
        return
    out.emit(ev.TicketReleased(at=c.now, ticket=ticket.id, actor=c.actor))
    _advance(out, out.ticket(ticket.id), c.now)


def _set_priority(out: _Emitter, c: cmd.SetPriority) -> None:
    ticket = out.get_ticket(c.ticket)
    if ticket is None or ticket.status != "running" or ticket.priority == c.priority:
        return
    out.emit(ev.PriorityChanged(at=c.now, ticket=ticket.id, priority=c.priority, actor=c.actor))


def _pause(out: _Emitter, c: cmd.PauseInstallation) -> None:
    if out.state.paused is None:
        out.emit(ev.InstallationPaused(at=c.now, reason=c.reason or f"by {c.actor or 'a user'}", actor=c.actor))
        _fill(out, c.now, [], everything=True)  # record the new reason of what already waits


def _resume(out: _Emitter, c: cmd.ResumeInstallation) -> None:
    if out.state.paused is not None:
        out.emit(ev.InstallationResumed(at=c.now, actor=c.actor))


def _queue_limits(out: _Emitter, c: cmd.SetQueueLimits) -> None:
    if dict(c.limits) != out.state.queue_limits or dict(c.gpu_memory) != out.state.queue_gpu_memory:
        out.emit(ev.QueueLimitsSet(at=c.now, limits=dict(c.limits), gpu_memory=dict(c.gpu_memory)))


def _worker_advertised(out: _Emitter, c: cmd.RecordWorkerAdvertised) -> None:
    """Recorded when the worker is new, came back, or has something else to offer; a repeated advert
    (its liveness key set anew after a Redis restart) records nothing."""
    known = out.state.workers.get(c.worker)
    offer = (c.node, tuple(c.queues), tuple(c.gpus), c.cpus, c.memory)
    if known is not None and (known.node, known.queues, known.gpus, known.cpus, known.memory) == offer:
        return
    out.emit(
        ev.WorkerAdvertised(
            at=c.now,
            worker=c.worker,
            node=c.node,
            queues=list(c.queues),
            gpus=list(c.gpus),
            cpus=c.cpus,
            memory=c.memory,
            detected=c.detected,
        )
    )


def _worker_gone(out: _Emitter, c: cmd.RecordWorkerGone) -> None:
    """What the worker had is no longer offered. Its attempts still waiting in its own queue would wait
    for nobody: they fail (the infrastructure's doing, retried elsewhere); a running one is the
    reconciler's to judge by its heartbeat, as for any worker."""
    if c.worker not in out.state.workers:
        return
    out.emit(ev.WorkerGone(at=c.now, worker=c.worker, reason=c.reason, detail=c.detail))
    stranded = []
    for tid, task_id in list(out.state.live):
        task = out.state.tickets[tid].tasks[task_id]
        if task.status == "scheduled" and task.placed is not None and task.placed[0] == c.worker:
            stranded.append((tid, task_id, task.attempt))
    for tid, task_id, attempt in stranded:
        _failed(
            out,
            cmd.RecordJobFailed(
                now=c.now,
                ticket=tid,
                task=task_id,
                attempt=attempt,
                error=f"worker {c.worker} {c.reason} before it started the job ({c.detail or 'no detail'})",
                retryable=True,
                cause="infrastructure",
            ),
        )


_DECIDERS: dict[type, Callable[[_Emitter, Any], None]] = {
    cmd.RecordHomeOwner: _record_owner,
    cmd.SubmitTicket: _submit,
    cmd.TicketFileRemoved: _file_removed,
    cmd.CancelTicket: _cancel,
    cmd.Tick: _tick,
    cmd.ScheduleTask: _schedule_task,
    cmd.RetryTask: _retry,
    cmd.RecordJobStarted: _started,
    cmd.RecordProgress: _progress,
    cmd.RecordCheckpoint: _checkpoint,
    cmd.RecordArtifact: _artifact,
    cmd.RecordJobSucceeded: _succeeded,
    cmd.RecordJobFailed: _failed,
    cmd.RecordViolation: _violation,
    cmd.ApproveProposal: _approve,
    cmd.RejectProposal: _reject,
    cmd.ReevaluateProposal: _reevaluate,
    cmd.RollbackCore: _rollback,
    cmd.RunSuite: _run_suite,
    cmd.PlanMilestones: _plan,
    cmd.RetryFrom: _retry_from,
    cmd.ClearCache: _clear_cache,
    cmd.RetireAdapter: _retire_adapter,
    cmd.HoldTicket: _hold,
    cmd.ReleaseTicket: _release,
    cmd.SetPriority: _set_priority,
    cmd.PauseInstallation: _pause,
    cmd.ResumeInstallation: _resume,
    cmd.SetQueueLimits: _queue_limits,
    cmd.RecordWorkerAdvertised: _worker_advertised,
    cmd.RecordWorkerGone: _worker_gone,
}
# Commands (and events) after which every waiting task is looked at again: a gate may have opened.
_OPENS_GATES: frozenset[type] = frozenset({cmd.ReleaseTicket, cmd.ResumeInstallation, cmd.SetQueueLimits})
_GATE_EVENTS = (ev.TicketSubmitted, ev.TicketCompleted, ev.TicketFailed, ev.TicketCancelled, ev.CorePromoted)
# Commands that cannot open a gate or free a slot: no pass over the waiting tasks after them.
_NO_FREED_SLOT: frozenset[type] = frozenset(
    {
        cmd.RecordProgress,
        cmd.RecordCheckpoint,
        cmd.RecordArtifact,
        cmd.RecordJobStarted,
        cmd.RecordViolation,
        cmd.RecordHomeOwner,
        cmd.PlanMilestones,
        cmd.HoldTicket,
        cmd.PauseInstallation,
    }
)
