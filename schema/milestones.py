"""Milestone state: a projection folded from the event log alone (MilestonePlanned and the events of
the milestones' tickets), the same way on every read, so a rebuild is equal by construction.

`MilestoneBook.apply(seq, event)` follows the log; `book.view(id)` says where a milestone stands:
planned, in progress, done or blocked, each deliverable ticked or not with the measured value and
the seq of the event that proves it, and what is still open. The report (cli/milestone_report.py)
renders a view; it reads nothing but the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from schema import events as ev
from schema.plans import AcceptanceDeliverable, ArtifactDeliverable, Deliverable, MetricDeliverable

MilestoneState = Literal["planned", "in progress", "done", "blocked"]
ENDED = ("completed", "failed", "cancelled")
_DELIVERABLE: TypeAdapter[Any] = TypeAdapter(Deliverable)


@dataclass
class TicketRun:
    """The latest revision of one ticket, as far as milestones care."""

    id: str
    title: str = ""
    revision: int = 0
    state: str = "running"  # running | completed | failed | cancelled
    reason: str | None = None
    submitted_at: datetime | None = None
    submitted_seq: int = 0
    ended_at: datetime | None = None
    ended_seq: int | None = None
    acceptance: dict[str, Any] | None = None  # {results, passed, seq}
    metrics: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # (task, name) -> value, seq
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # {id, kind, task, seq}
    blocked: dict[str, str] = field(default_factory=dict)  # task -> reason
    awaiting: str | None = None
    curves: dict[str, dict[int, list[tuple[int, dict[str, float]]]]] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.submitted_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.submitted_at).total_seconds()


@dataclass
class MilestoneRecord:
    id: str
    plan: str
    path: str
    revision: int
    seq: int
    at: datetime
    spec: dict[str, Any]


@dataclass
class MilestoneBook:
    """Everything the milestone views and reports need, folded from the log in order."""

    milestones: dict[str, MilestoneRecord] = field(default_factory=dict)
    tickets: dict[str, TicketRun] = field(default_factory=dict)
    proposals: dict[str, dict[str, Any]] = field(default_factory=dict)
    core: list[dict[str, Any]] = field(default_factory=list)
    head: int = 0
    # (ticket, task, attempt) -> the artifacts it recorded, across revisions: a step reused from the
    # step cache (AttemptReused) shows its source attempt's artifacts.
    produced: dict[tuple[str, str, int], list[dict[str, Any]]] = field(default_factory=dict)

    def apply(self, seq: int, e: ev.Event) -> None:
        self.head = max(self.head, seq)
        if isinstance(e, ev.MilestonePlanned):
            self.milestones[e.milestone] = MilestoneRecord(
                e.milestone, e.plan, e.path, e.revision, seq, e.at, dict(e.spec)
            )
            return
        if isinstance(e, ev.CorePromoted):
            self.core.append(
                {
                    "version": e.version,
                    "proposal": e.proposal,
                    "actor": e.actor,
                    "components": sorted(e.components),
                    "rollback_to": e.rollback_to,
                    "seq": seq,
                    "at": e.at,
                }
            )
            return
        tid = getattr(e, "ticket", None)
        if not isinstance(tid, str):
            return
        if isinstance(e, ev.TicketSubmitted):
            self.tickets[tid] = TicketRun(
                tid, str(e.spec.get("title", "")), e.revision, submitted_at=e.at, submitted_seq=seq
            )
            return
        run = self.tickets.get(tid)
        if run is None:
            return
        if isinstance(e, ev.AttemptSucceeded | ev.AttemptReused | ev.ShardsJoined | ev.SweepJoined):
            for name, value in e.metrics.items():
                run.metrics[(e.task, name)] = (float(value), seq)
            run.blocked.pop(e.task, None)
            if isinstance(e, ev.AttemptReused):  # the source's artifacts count for this ticket too
                made = self.produced.get((e.source_ticket, e.source_task, e.source_attempt), [])
                run.artifacts += [{**a, "task": e.task, "seq": seq} for a in made]
            if isinstance(e, ev.ShardsJoined):  # the manifest the decider joined (attempt 0: no job)
                run.artifacts.append({"id": e.artifact, "kind": "dataset", "task": e.task, "seq": seq})
                self.produced.setdefault((tid, e.task, 0), []).append({"id": e.artifact, "kind": "dataset"})
        elif isinstance(e, ev.ArtifactRecorded):
            run.artifacts.append({"id": e.artifact, "kind": e.kind, "task": e.task, "seq": seq})
            self.produced.setdefault((tid, e.task, e.attempt), []).append({"id": e.artifact, "kind": e.kind})
        elif isinstance(e, ev.ProgressRecorded) and e.metrics:
            run.curves.setdefault(e.task, {}).setdefault(e.attempt, []).append((e.step, dict(e.metrics)))
        elif isinstance(e, ev.TaskBlocked):
            run.blocked[e.task] = e.reason
        elif isinstance(e, ev.TaskRetried):
            run.blocked.pop(e.task, None)
        elif isinstance(e, ev.TicketRetried):
            run.state, run.reason, run.ended_at, run.ended_seq = "running", None, None, None
        elif isinstance(e, ev.AcceptanceEvaluated):
            run.acceptance = {"results": list(e.results), "passed": e.passed, "seq": seq}
        elif isinstance(e, ev.TicketCompleted | ev.TicketFailed | ev.TicketCancelled):
            run.state = {ev.TicketCompleted: "completed", ev.TicketFailed: "failed"}.get(type(e), "cancelled")
            run.reason = getattr(e, "reason", None)
            run.ended_at, run.ended_seq = e.at, seq
            run.blocked.clear()
        elif isinstance(e, ev.ProposalOpened):
            self.proposals[e.proposal] = {
                "id": e.proposal,
                "ticket": tid,
                "kind": e.kind,
                "state": "open",
                "actor": None,
                "note": None,
                "opened_seq": seq,
                "seq": seq,
            }
            if e.kind == "core":
                run.awaiting = e.proposal
        elif isinstance(e, ev.ProposalApproved | ev.ProposalRejected | ev.ProposalExpired | ev.ProposalWithdrawn):
            proposal = self.proposals.get(e.proposal)
            if proposal is not None:
                proposal["state"] = {
                    ev.ProposalApproved: "approved",
                    ev.ProposalRejected: "rejected",
                    ev.ProposalExpired: "expired",
                }.get(type(e), "withdrawn")
                proposal["actor"] = getattr(e, "actor", None)
                proposal["note"] = getattr(e, "note", None) or getattr(e, "reason", None)
                proposal["seq"] = seq
            if run.awaiting == e.proposal:
                run.awaiting = None

    # --- views -------------------------------------------------------------------------------------

    def evaluate(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One deliverable: {name, kind, check, ok, value, seq, event}."""
        try:
            item = _DELIVERABLE.validate_python(raw)
        except ValidationError:  # a kind this version does not know (recorded by a newer plan)
            name = str(raw.get("name", "?"))
            return {
                "name": name,
                "kind": "unknown",
                "check": str(raw),
                "ok": False,
                "value": None,
                "seq": None,
                "event": None,
                "why": "not a deliverable kind this Jetbox knows",
            }
        if isinstance(item, AcceptanceDeliverable):
            return self._acceptance(item)
        if isinstance(item, MetricDeliverable):
            return self._metric(item)
        return self._artifact(item)

    def _acceptance(self, item: AcceptanceDeliverable) -> dict[str, Any]:
        out = {
            "name": item.name,
            "kind": "acceptance",
            "check": f"{item.acceptance} acceptance passes",
            "ok": False,
            "value": None,
            "seq": None,
            "event": None,
        }
        run = self.tickets.get(item.acceptance)
        if run is None or run.acceptance is None:
            return out | {"why": "not evaluated yet" if run else "ticket not submitted yet"}
        results = run.acceptance["results"]
        ok = sum(1 for r in results if r.get("ok"))
        value = "passed" if run.acceptance["passed"] else "failed"
        return out | {
            "ok": bool(run.acceptance["passed"]),
            "value": f"{value} ({ok}/{len(results)} checks)",
            "seq": run.acceptance["seq"],
            "event": "AcceptanceEvaluated",
            "why": None if run.acceptance["passed"] else "acceptance failed",
        }

    def _metric(self, item: MetricDeliverable) -> dict[str, Any]:
        check = item.check
        out = {
            "name": item.name,
            "kind": "metric",
            "check": f"{item.ticket} {check.metric} {check.op} {check.value:g}",
            "ok": False,
            "value": None,
            "seq": None,
            "event": None,
        }
        run = self.tickets.get(item.ticket)
        found = run.metrics.get((check.step, check.name)) if run else None
        if found is None:
            return out | {"why": "ticket not submitted yet" if run is None else "metric not recorded yet"}
        value, seq = found
        ok = check.holds(value)
        return out | {
            "ok": ok,
            "value": value,
            "seq": seq,
            "event": "AttemptSucceeded",
            "why": None if ok else f"measured {value:g}, needs {check.op} {check.value:g}",
        }

    def _artifact(self, item: ArtifactDeliverable) -> dict[str, Any]:
        what = f"{item.ticket} {item.artifact}" + (f" ({item.kind})" if item.kind else "")
        out = {
            "name": item.name,
            "kind": "artifact",
            "check": f"artifact from {what}",
            "ok": False,
            "value": None,
            "seq": None,
            "event": None,
        }
        run = self.tickets.get(item.ticket)
        found = [
            a
            for a in (run.artifacts if run else [])
            if a["task"] == item.artifact and (item.kind is None or a["kind"] == item.kind)
        ]
        if not found:
            return out | {"why": "ticket not submitted yet" if run is None else "no such artifact recorded yet"}
        last = found[-1]
        return out | {
            "ok": True,
            "value": f"{last['kind']} {last['id'][:19]}",
            "seq": last["seq"],
            "event": "ArtifactRecorded",
            "why": None,
        }

    def view(self, mid: str) -> dict[str, Any]:
        """Where milestone `mid` stands (KeyError if it was never planned)."""
        record = self.milestones[mid]
        spec = record.spec
        ids = [str(t) for t in spec.get("tickets", [])]
        deliverables = [self.evaluate(d) for d in spec.get("deliverables", [])]
        runs = [self.tickets[t] for t in ids if t in self.tickets]
        tickets: list[dict[str, Any]] = []
        for tid in ids:
            run = self.tickets.get(tid)
            tickets.append(
                {
                    "ticket": tid,
                    "title": run.title if run else "",
                    "state": run.state if run else "not submitted",
                    "revision": run.revision if run else 0,
                    "duration_s": run.duration_s if run else None,
                    "submitted_seq": run.submitted_seq if run else None,
                    "ended_seq": run.ended_seq if run else None,
                    "reason": run.reason if run else None,
                    "awaiting": run.awaiting if run else None,
                    "blocked": dict(run.blocked) if run else {},
                }
            )
        running = [r for r in runs if r.state == "running"]
        trouble = [r for r in runs if r.state in ("failed", "cancelled") or r.blocked]
        state: MilestoneState
        if not runs:
            state = "planned"
        elif all(d["ok"] for d in deliverables) and not running:
            state = "done"
        elif trouble:
            state = "blocked"
        else:
            state = "in progress"
        open_items: list[str] = []
        for d in deliverables:
            if not d["ok"]:
                open_items.append(f"deliverable '{d['name']}': {d.get('why') or 'not met'}")
        for t in tickets:
            if t["state"] == "not submitted":
                open_items.append(f"{t['ticket']}: not submitted (is the daemon watching the tickets folder?)")
            elif t["awaiting"]:
                open_items.append(f"{t['ticket']}: awaits approval of {t['awaiting']} (jbctl approve {t['awaiting']})")
            elif t["blocked"]:
                for task, why in sorted(t["blocked"].items()):
                    open_items.append(f"{t['ticket']}: task {task} blocked: {why}")
            elif t["state"] == "running":
                open_items.append(f"{t['ticket']}: running")
            elif t["state"] in ("failed", "cancelled"):
                open_items.append(f"{t['ticket']}: {t['state']}: {t['reason']}")
        mine = set(ids)
        proposals = [p for p in self.proposals.values() if p["ticket"] in mine]
        promoted = {p["id"] for p in proposals}
        core = [c for c in self.core if c["proposal"] in promoted]
        artifacts = [{"ticket": r.id, **a} for r in runs for a in r.artifacts]
        return {
            "milestone": mid,
            "plan": record.plan,
            "revision": record.revision,
            "planned_seq": record.seq,
            "title": spec.get("title", ""),
            "goal": spec.get("goal", ""),
            "state": state,
            "deliverables": deliverables,
            "done": sum(1 for d in deliverables if d["ok"]),
            "total": len(deliverables),
            "tickets": tickets,
            "artifacts": artifacts,
            "proposals": proposals,
            "core_versions": core,
            "open": open_items,
            "log_seq": self.head,
        }

    def views(self) -> list[dict[str, Any]]:
        return [self.view(mid) for mid in sorted(self.milestones, key=_milestone_order)]


def _milestone_order(mid: str) -> tuple[str, int, str]:
    """M2 before M10."""
    head = mid.rstrip("0123456789")
    tail = mid[len(head) :]
    return (head, int(tail) if tail else -1, mid)


def fold(recorded: Any) -> MilestoneBook:
    """A book from `(seq, event)` pairs, e.g. `EventStore.read_events()`."""
    book = MilestoneBook()
    for seq, event in recorded:
        book.apply(seq, event)
    return book
