"""The human side of the gate as functions: what `jbctl approve|reject|cancel|retry` and the web console call.

Each turns a user's request into one command for the decider (which holds every rule) and reads the
outcome back from the events it recorded. Both front ends call these, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import commands as cmd
from daemon.handler import CommandHandler
from schema.store import Recorded


@dataclass
class Outcome:
    """What happened: `ok`, a sentence for the user, and the events recorded (a refusal is recorded too)."""

    ok: bool
    message: str
    events: list[Recorded] = field(default_factory=list)


def approvers(settings: Any) -> list[str]:
    """The installation-wide approvers (a ticket's own `approvers:` list overrides them in the decider)."""
    return list(settings.approvers)


def _open_proposal(handler: CommandHandler, pid: str, verb: str) -> Any | Outcome:
    proposal = handler.state.proposals.get(pid)
    if proposal is None:
        known = ", ".join(sorted(handler.state.proposals)) or "none yet"
        return Outcome(False, f"no proposal {pid!r} (known: {known})")
    if proposal.status != "open":
        return Outcome(False, f"{proposal.id} is {proposal.status}; only an open proposal can be {verb}")
    return proposal


def approve(
    handler: CommandHandler,
    pid: str,
    *,
    actor: str,
    meta: Mapping[str, Any],
    approver_list: list[str],
    home: Path | None = None,
    note: str | None = None,
    scope: str = "ticket",
) -> Outcome:
    """Approve `pid` as `actor`; who may is the decider's rule (`may_approve`). With `home`, its owner is
    recorded first if nobody recorded it yet (the default approver when none is configured)."""
    from daemon.handler import ensure_home_owner

    if home is not None:
        ensure_home_owner(handler, home)
    proposal = _open_proposal(handler, pid, "approved")
    if isinstance(proposal, Outcome):
        return proposal
    recorded = handler.handle(
        cmd.ApproveProposal(
            now=datetime.now(UTC),
            proposal=proposal.id,
            note=note,
            scope=scope,  # type: ignore[arg-type]
            approvers=approver_list,
            actor=actor,
        ),
        meta=meta,
    )
    refused = [r for r in recorded if r.type == "ApprovalRefused"]
    if refused:
        return Outcome(False, f"approval refused: {refused[0].data['reason']} (the attempt is recorded)", recorded)
    if not recorded:
        return Outcome(False, f"{proposal.id} is no longer open")
    promoted = [r for r in recorded if r.type == "CorePromoted"]
    if promoted:
        return Outcome(True, f"approved {proposal.id}: core is now v{promoted[0].data['version']}", recorded)
    return Outcome(True, f"approved {proposal.id} ({scope})", recorded)


def reject(handler: CommandHandler, pid: str, *, actor: str, meta: Mapping[str, Any], reason: str) -> Outcome:
    if not reason.strip():
        return Outcome(False, "a reason is required")
    proposal = _open_proposal(handler, pid, "rejected")
    if isinstance(proposal, Outcome):
        return proposal
    recorded = handler.handle(
        cmd.RejectProposal(now=datetime.now(UTC), proposal=proposal.id, reason=reason, actor=actor), meta=meta
    )
    return Outcome(bool(recorded), f"rejected {proposal.id}: {reason}", recorded)


def cancel(handler: CommandHandler, tid: str, *, actor: str, meta: Mapping[str, Any], reason: str) -> Outcome:
    if not handler.known(tid):
        return Outcome(False, f"no ticket {tid!r}")
    command = cmd.CancelTicket(now=datetime.now(UTC), ticket=tid, reason=reason, actor=actor)
    recorded = handler.handle(command, meta=meta)
    if not recorded:
        found = handler.state.lookup(tid)
        state = found.status if found is not None else "unknown"
        return Outcome(False, f"{tid} is {state}; only a running ticket can be cancelled")
    return Outcome(True, f"cancelled {tid}", recorded)


def retry_from(handler: CommandHandler, tid: str, task: str, *, actor: str, meta: Mapping[str, Any]) -> Outcome:
    """`jbctl retry TICKET --from STEP`: an ended ticket runs again from STEP, keeping what is upstream."""
    ticket = handler.ticket(tid)
    if ticket is None:
        known = ", ".join(sorted([*handler.state.tickets, *handler.state.cold])[:10]) or "none yet"
        return Outcome(False, f"no ticket {tid!r} (known: {known})")
    if task not in ticket.tasks:
        return Outcome(False, f"{tid} has no step {task!r} (steps: {', '.join(ticket.tasks)})")
    if ticket.status == "running":
        return Outcome(
            False,
            f"{tid} is still running; --from reruns an ended ticket (completed, failed or cancelled): "
            f"cancel it first, or `jbctl retry {tid} --task T` for a blocked task",
        )
    recorded = handler.handle(cmd.RetryFrom(now=datetime.now(UTC), ticket=tid, task=task, actor=actor), meta=meta)
    if not recorded:
        return Outcome(False, f"{tid} could not be rerun from {task} (nothing recorded)")
    again = [r.data["task"] for r in recorded if r.type == "TaskRetried"]
    return Outcome(True, f"rerunning {tid} from {task}: {', '.join(again)} run again; the rest is kept", recorded)


def retry(handler: CommandHandler, tid: str, task: str, *, actor: str, meta: Mapping[str, Any]) -> Outcome:
    ticket = handler.ticket(tid)
    if ticket is None:
        return Outcome(False, f"no ticket {tid!r}")
    found = ticket.tasks.get(task)
    if found is None:
        return Outcome(False, f"{tid} has no task {task!r} (tasks: {', '.join(ticket.tasks)})")
    recorded = handler.handle(cmd.RetryTask(now=datetime.now(UTC), ticket=tid, task=task, actor=actor), meta=meta)
    if not recorded:
        return Outcome(
            False,
            f"{tid}/{task} is {found.status} (ticket {ticket.status}); only a blocked task of a running ticket "
            "can be retried",
        )
    return Outcome(True, f"retrying {tid}/{task}", recorded)


# --- steering the schedule: hold, release, priority, pause, resume ---------------------------------


def _running(handler: CommandHandler, tid: str, verb: str) -> Any | Outcome:
    ticket = handler.state.lookup(tid)
    if ticket is None:
        return Outcome(False, f"no ticket {tid!r}")
    if ticket.status != "running":
        return Outcome(False, f"{tid} is {ticket.status}; only a running ticket can be {verb}")
    return ticket


def hold(
    handler: CommandHandler,
    tid: str,
    *,
    actor: str,
    meta: Mapping[str, Any],
    reason: str | None = None,
    stop: bool = False,
) -> Outcome:
    """Hold `tid`: nothing more is scheduled; with `stop`, live attempts stop at their next checkpoint."""
    ticket = _running(handler, tid, "held")
    if isinstance(ticket, Outcome):
        return ticket
    command = cmd.HoldTicket(now=datetime.now(UTC), ticket=tid, reason=reason, stop=stop, actor=actor)
    recorded = handler.handle(command, meta=meta)
    if not recorded:
        return Outcome(False, f"{tid} is already held ({handler.state.tickets[tid].held})")
    live = [t.id for t in handler.state.tickets[tid].tasks.values() if t.status in ("scheduled", "running")]
    then = ""
    if live:
        then = (
            f"; {', '.join(live)} told to stop at the next checkpoint" if stop else f"; {', '.join(live)} will finish"
        )
    return Outcome(True, f"held {tid}{then} (jbctl release {tid})", recorded)


def release(handler: CommandHandler, tid: str, *, actor: str, meta: Mapping[str, Any]) -> Outcome:
    ticket = _running(handler, tid, "released")
    if isinstance(ticket, Outcome):
        return ticket
    recorded = handler.handle(cmd.ReleaseTicket(now=datetime.now(UTC), ticket=tid, actor=actor), meta=meta)
    if not recorded:
        return Outcome(False, f"{tid} is not held")
    started = [r.data["task"] for r in recorded if r.type == "AttemptScheduled" and r.data["ticket"] == tid]
    return Outcome(True, f"released {tid}" + (f": scheduled {', '.join(started)}" if started else ""), recorded)


def set_priority(handler: CommandHandler, tid: str, priority: int, *, actor: str, meta: Mapping[str, Any]) -> Outcome:
    from schema.ticket import MAX_PRIORITY

    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        return Outcome(False, f"priority {priority} is out of range: -{MAX_PRIORITY} to {MAX_PRIORITY}")
    ticket = _running(handler, tid, "reprioritised")
    if isinstance(ticket, Outcome):
        return ticket
    command = cmd.SetPriority(now=datetime.now(UTC), ticket=tid, priority=priority, actor=actor)
    recorded = handler.handle(command, meta=meta)
    if not recorded:
        return Outcome(True, f"{tid} already has priority {priority}")
    return Outcome(True, f"{tid}: priority {priority}", recorded)


def pause(handler: CommandHandler, *, actor: str, meta: Mapping[str, Any], reason: str | None = None) -> Outcome:
    recorded = handler.handle(cmd.PauseInstallation(now=datetime.now(UTC), reason=reason, actor=actor), meta=meta)
    if not recorded:
        return Outcome(False, f"already paused ({handler.state.paused}); jbctl resume")
    return Outcome(True, "paused: nothing new is scheduled; running jobs finish (jbctl resume)", recorded)


def resume(handler: CommandHandler, *, actor: str, meta: Mapping[str, Any]) -> Outcome:
    recorded = handler.handle(cmd.ResumeInstallation(now=datetime.now(UTC), actor=actor), meta=meta)
    if not recorded:
        return Outcome(False, "not paused")
    started = sum(r.type == "AttemptScheduled" for r in recorded)
    return Outcome(True, f"resumed: {started} waiting task(s) scheduled", recorded)
