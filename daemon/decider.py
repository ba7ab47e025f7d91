"""The decider: `decide(state, command) -> events`. Every rule of Jetbox lives here.

Pure: no I/O, no clock (time comes in the command), no randomness (retry jitter is a hash of the
attempt). `decide` never changes the state it is given; it emits events onto a scratch copy so that
one command's later rules see the effect of its earlier events.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from daemon import commands as cmd
from daemon.state import ACCEPT_PREFIX, LIVE, State, TaskState, TicketState, evolve
from schema import events as ev
from schema.ticket import MetricCheck

BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0
LOOP_REPEATS = 3


class _Emitter:
    """Collects events and applies each to a scratch state as it is emitted."""

    def __init__(self, state: State, touched: list[str]) -> None:
        self.state = state.scratch(touched)
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)
        evolve(self.state, event)


def decide(state: State, command: cmd.Command) -> list[ev.Event]:
    """The events that `command` produces in `state` (possibly none)."""
    handler = _DECIDERS[type(command)]
    touched = [t for t in (getattr(command, "ticket", None),) if isinstance(t, str)]
    if isinstance(command, cmd.SubmitTicket | cmd.TicketFileRemoved):
        tid = state.file_tickets.get(command.path)
        if isinstance(command, cmd.SubmitTicket) and command.ticket is not None:
            tid = command.ticket.id
        touched = [tid] if tid else []
    elif isinstance(command, cmd.Tick):
        touched = [t.id for t in state.tickets.values() if t.status == "running"]
    out = _Emitter(state, touched)
    handler(out, command)
    return out.events


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


def _submit(out: _Emitter, c: cmd.SubmitTicket) -> None:
    st = out.state
    if st.files.get(c.path) == c.content_hash:
        return  # an unchanged save records nothing
    if c.ticket is None:
        out.emit(
            ev.TicketRejected(at=c.now, path=c.path, content_hash=c.content_hash, ticket=c.ticket_id, errors=c.errors)
        )
        return
    existing = st.tickets.get(c.ticket.id)
    if existing is not None and existing.path != c.path and existing.status == "running":
        out.emit(
            ev.TicketRejected(
                at=c.now,
                path=c.path,
                content_hash=c.content_hash,
                ticket=c.ticket.id,
                errors=[f"{c.path}:1:1: ticket {c.ticket.id} is already running from {existing.path}"],
            )
        )
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
                reason="ticket is still running; the revision applies once it has ended (save it again then)",
            )
        )
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
        )
    )
    _advance(out, out.state.tickets[c.ticket.id], c.now)


def _file_removed(out: _Emitter, c: cmd.TicketFileRemoved) -> None:
    tid = out.state.file_tickets.get(c.path)
    ticket = out.state.tickets.get(tid) if tid else None
    if ticket is not None and ticket.status == "running" and ticket.path == c.path:
        out.emit(ev.TicketCancelled(at=c.now, ticket=ticket.id, reason=f"ticket file {c.path} was removed"))


def _cancel(out: _Emitter, c: cmd.CancelTicket) -> None:
    ticket = out.state.tickets.get(c.ticket)
    if ticket is not None and ticket.status == "running":
        out.emit(ev.TicketCancelled(at=c.now, ticket=ticket.id, reason=c.reason, actor=c.actor))


# --- scheduling --------------------------------------------------------------------------------


def _runnable(ticket: TicketState, task: TaskState) -> bool:
    return task.status == "pending" and all(ticket.tasks[n].status == "succeeded" for n in task.needs)


def _schedule(out: _Emitter, ticket: TicketState, task: TaskState, now: datetime) -> None:
    spec = ticket.spec
    out.emit(
        ev.AttemptScheduled(
            at=now,
            ticket=ticket.id,
            task=task.id,
            attempt=task.attempt + 1,
            kind=task.kind,
            queue=task.queue,
            params=resolved_params(ticket, task),
            timeout=task.timeout,
            resume_checkpoint=task.checkpoint,
            network=spec.constraints.network,
            device=spec.constraints.device,
        )
    )


def resolved_params(ticket: TicketState, task: TaskState) -> dict[str, Any]:
    """Parameters with references to needed steps replaced by those steps' outputs."""
    params = dict(task.params)
    inputs = {n: ticket.tasks[n].outputs for n in task.needs if ticket.tasks[n].outputs}
    if inputs:
        params["_inputs"] = inputs
    return params


def _advance(out: _Emitter, ticket: TicketState, now: datetime) -> None:
    """Schedule what became runnable; end the ticket when nothing more can happen."""
    ticket = out.state.tickets[ticket.id]
    if ticket.status != "running":
        return
    for task in ticket.tasks.values():
        if _runnable(ticket, task):
            _schedule(out, ticket, task, now)
    ticket = out.state.tickets[ticket.id]
    failed = [t for t in ticket.tasks.values() if t.status == "failed"]
    if failed:
        first = failed[0]
        what = "acceptance check" if first.id.startswith(ACCEPT_PREFIX) else "task"
        out.emit(
            ev.TicketFailed(
                at=now,
                ticket=ticket.id,
                reason=f"{what} {first.id} failed: {first.reason or first.last_error}",
            )
        )
        return
    if all(t.status == "succeeded" for t in ticket.tasks.values()):
        _accept(out, ticket, now)


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
    if passed:
        out.emit(ev.TicketCompleted(at=now, ticket=ticket.id))
    else:
        bad = next(r for r in results if not r["ok"])
        seen = "no such metric reported" if bad["observed"] is None else f"observed {bad['observed']:g}"
        out.emit(ev.TicketFailed(at=now, ticket=ticket.id, reason=f"acceptance check failed: {bad['check']} ({seen})"))


def _schedule_task(out: _Emitter, c: cmd.ScheduleTask) -> None:
    ticket = out.state.tickets.get(c.ticket)
    if ticket is None or ticket.status != "running" or c.task not in ticket.tasks:
        return
    task = ticket.tasks[c.task]
    if _runnable(ticket, task):
        _schedule(out, ticket, task, c.now)


def _retry(out: _Emitter, c: cmd.RetryTask) -> None:
    ticket = out.state.tickets.get(c.ticket)
    if ticket is None or c.task not in ticket.tasks:
        return
    # A failed task ends its ticket; a blocked one waits here for a human.
    if ticket.status != "running" or ticket.tasks[c.task].status != "blocked":
        return
    out.emit(ev.TaskRetried(at=c.now, ticket=ticket.id, task=c.task, actor=c.actor))
    _advance(out, ticket, c.now)


def _tick(out: _Emitter, c: cmd.Tick) -> None:
    for ticket in list(out.state.tickets.values()):
        if ticket.status != "running":
            continue
        limit = ticket.spec.constraints.max_wall_minutes
        if limit is not None and c.now - ticket.submitted_at > timedelta(minutes=limit):
            out.emit(
                ev.TicketFailed(at=c.now, ticket=ticket.id, reason=f"deadline exceeded: max_wall_minutes={limit:g}")
            )
            continue
        for task in ticket.tasks.values():
            if task.status == "waiting_retry" and task.retry_at is not None and task.retry_at <= c.now:
                _schedule(out, ticket, task, c.now)


# --- reports from workers ----------------------------------------------------------------------


def _current(out: _Emitter, c: cmd._Report) -> tuple[TicketState, TaskState] | None:
    """The ticket and task a report speaks of, if it is for the live attempt and not a duplicate."""
    ticket = out.state.tickets.get(c.ticket)
    if ticket is None or ticket.status != "running":
        return None
    task = ticket.tasks.get(c.task)
    if task is None or task.attempt != c.attempt or task.status not in LIVE:
        return None  # an old attempt's report: the attempt number is the fencing token
    if c.report_seq and c.report_seq <= task.last_report_seq:
        return None  # delivered twice
    return ticket, task


def _started(out: _Emitter, c: cmd.RecordJobStarted) -> None:
    if (found := _current(out, c)) and found[1].status == "scheduled":
        out.emit(
            ev.AttemptStarted(
                at=c.now,
                ticket=c.ticket,
                task=c.task,
                attempt=c.attempt,
                worker=c.worker,
                report_seq=c.report_seq,
            )
        )


def _progress(out: _Emitter, c: cmd.RecordProgress) -> None:
    if _current(out, c):
        out.emit(
            ev.ProgressRecorded(
                at=c.now,
                ticket=c.ticket,
                task=c.task,
                attempt=c.attempt,
                step=c.step,
                total=c.total,
                metrics=c.metrics,
                report_seq=c.report_seq,
            )
        )


def _checkpoint(out: _Emitter, c: cmd.RecordCheckpoint) -> None:
    if _current(out, c):
        out.emit(
            ev.CheckpointSaved(
                at=c.now,
                ticket=c.ticket,
                task=c.task,
                attempt=c.attempt,
                path=c.path,
                step=c.step,
                report_seq=c.report_seq,
            )
        )


def _artifact(out: _Emitter, c: cmd.RecordArtifact) -> None:
    if _current(out, c):
        out.emit(
            ev.ArtifactRecorded(
                at=c.now,
                ticket=c.ticket,
                task=c.task,
                attempt=c.attempt,
                artifact=c.artifact,
                kind=c.kind,
                meta=c.meta,
                report_seq=c.report_seq,
            )
        )


def _succeeded(out: _Emitter, c: cmd.RecordJobSucceeded) -> None:
    if found := _current(out, c):
        out.emit(
            ev.AttemptSucceeded(
                at=c.now,
                ticket=c.ticket,
                task=c.task,
                attempt=c.attempt,
                metrics=c.metrics,
                outputs=c.outputs,
                report_seq=c.report_seq,
            )
        )
        _advance(out, found[0], c.now)


def _failed(out: _Emitter, c: cmd.RecordJobFailed) -> None:
    found = _current(out, c)
    if not found:
        return
    ticket, task = found
    if c.violation:
        out.emit(
            ev.SafetyViolation(
                at=c.now, what=c.violation, detail=c.error, ticket=c.ticket, task=c.task, attempt=c.attempt
            )
        )
    fp = fingerprint(task.kind, task.params, c.error)
    can_retry = c.retryable and not c.violation and task.attempt <= task.retries
    retry_at = c.now + timedelta(seconds=backoff_seconds(c.ticket, c.task, c.attempt)) if can_retry else None
    out.emit(
        ev.AttemptFailed(
            at=c.now,
            ticket=c.ticket,
            task=c.task,
            attempt=c.attempt,
            error=c.error[-4000:],
            fingerprint=fp,
            retry_at=retry_at,
            retryable=c.retryable,
            report_seq=c.report_seq,
        )
    )
    task = out.state.tickets[c.ticket].tasks[c.task]
    if retry_at is not None:
        pattern = _loop_pattern(task.failures)
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
    why = "not retryable" if not c.retryable or c.violation else f"failed after {task.attempt} attempts"
    out.emit(ev.TaskFailed(at=c.now, ticket=c.ticket, task=c.task, reason=f"{why}: {_last_line(c.error)}"))
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


def _violation(out: _Emitter, c: cmd.RecordViolation) -> None:
    out.emit(
        ev.SafetyViolation(at=c.now, what=c.what, detail=c.detail, ticket=c.ticket, task=c.task, attempt=c.attempt)
    )


_DECIDERS: dict[type, Callable[[_Emitter, Any], None]] = {
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
}
