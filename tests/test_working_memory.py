"""Working memory as a first-class thing: adapter ids, lifecycle rules (decider), the `adapters` projection."""

from __future__ import annotations

from datetime import UTC, datetime

from daemon import commands as c
from daemon.state import State
from schema import events as ev
from schema.projections import MemoryRows, project_all
from tests.helpers import make_ticket, submit
from tests.test_decider import apply, report, types

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CORE_A, CORE_B = "a" * 64, "b" * 64


def _promote_reasoner(s: State, tid: str, checkpoint: str) -> list[ev.Event]:
    steps = "  - {id: train, kind: train, with: {model: trm}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
    apply(s, submit(make_ticket(tid, steps=steps, extra="update: core\n"), T0))
    out = {"component": "reasoner", "checkpoint": checkpoint}
    apply(s, report(c.RecordJobSucceeded, "train", 1, ticket=tid, outputs=out))
    apply(s, report(c.RecordJobSucceeded, "eval", 1, ticket=tid, metrics={"acc": 0.5}))
    proposal = max(s.proposals)
    return apply(s, c.ApproveProposal(now=T0, proposal=proposal, actor="bob"))


def _adapter_ticket(s: State, tid: str, gain: float = 0.1, steps: str | None = None) -> list[ev.Event]:
    steps = steps or "  - {id: tune, kind: train, with: {model: trm, adapter: {rank: 4}}}\n"
    apply(s, submit(make_ticket(tid, steps=steps, extra="update: adapter\n"), T0))
    core = s.core_components.get("reasoner", {}).get("checkpoint")
    out = {"adapter": "reasoner", "checkpoint": "c" * 63 + tid[-1], "rank": 4, "core_checkpoint": core}
    attempt = s.tickets[tid].tasks["tune"].attempt  # a revision keeps counting attempts
    return apply(s, report(c.RecordJobSucceeded, "tune", attempt, ticket=tid, outputs=out, metrics={"gain": gain}))


def test_adapters_get_ids_metrics_and_the_base_core() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    events = _adapter_ticket(s, "TICKET-2")
    activated = next(e for e in events if isinstance(e, ev.AdapterActivated))
    assert activated.ids == {"reasoner": "A-1"} and activated.metrics == {"reasoner": {"gain": 0.1}}
    assert activated.core_version == 1
    assert s.adapters["A-1"]["active"] and s.adapters["A-1"]["core_checkpoint"] == CORE_A
    _adapter_ticket(s, "TICKET-3")
    assert sorted(s.adapters) == ["A-1", "A-2"] and all(a["active"] for a in s.adapters.values())


def test_a_ticket_that_trains_again_replaces_its_adapter() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    # A revised ticket (new content) trains again: the new adapter replaces the old one.
    steps = "  - {id: tune, kind: train, with: {model: trm, adapter: {rank: 8}}}\n"
    events = _adapter_ticket(s, "TICKET-2", steps=steps)
    assert types(events)[-3:] == ["AdapterRetired", "AdapterActivated", "TicketCompleted"]
    retired = next(e for e in events if isinstance(e, ev.AdapterRetired))
    assert retired.adapter == "A-1" and retired.reason == "replaced" and retired.replaced_by == "A-2"
    assert not s.adapters["A-1"]["active"] and s.adapters["A-2"]["active"]


def test_rolling_the_core_past_retires_its_adapters_and_a_rollback_too() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = _promote_reasoner(s, "TICKET-3", CORE_B)
    assert types(events) == ["ProposalApproved", "CorePromoted", "AdapterRetired", "TicketCompleted"]
    assert events[2].adapter == "A-1" and events[2].reason == "core_rolled" and events[2].core_version == 2
    assert "core v2" in events[2].detail
    _adapter_ticket(s, "TICKET-4")  # A-2, on v2
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob"))
    assert types(events) == ["CorePromoted", "AdapterRetired"] and events[1].adapter == "A-2"
    assert not any(a["active"] for a in s.adapters.values())


def test_a_core_version_that_keeps_the_reasoner_keeps_its_adapters() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob"))  # same version: nothing
    assert events == []
    # A new core version whose reasoner is the same checkpoint (only an encoder changed).
    steps = "  - {id: train, kind: train, with: {model: jepa}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
    apply(s, submit(make_ticket("TICKET-3", steps=steps, extra="update: core\n"), T0))
    apply(s, report(c.RecordJobSucceeded, "train", 1, ticket="TICKET-3", outputs={"component": "image-encoder"}))
    apply(s, report(c.RecordJobSucceeded, "eval", 1, ticket="TICKET-3"))
    events = apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="bob"))
    assert "CorePromoted" in types(events) and "AdapterRetired" not in types(events)
    assert s.adapters["A-1"]["active"]


def test_retire_by_hand_once_and_unknown_ids_change_nothing() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = apply(s, c.RetireAdapter(now=T0, adapter="A-1", actor="carol", reason="wrong task"))
    assert types(events) == ["AdapterRetired"] and events[0].actor == "carol" and events[0].reason == "manual"
    assert events[0].ticket == "TICKET-2"  # it lands in the ticket's stream
    assert apply(s, c.RetireAdapter(now=T0, adapter="A-1", actor="carol")) == []
    assert apply(s, c.RetireAdapter(now=T0, adapter="A-9", actor="carol")) == []


def test_steps_that_name_an_adapter_get_it_resolved() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    steps = (
        "  - {id: ask, kind: infer, with: {component: reasoner, adapter: TICKET-2}}\n"
        "  - {id: more, kind: train, with: {model: trm, adapter: {rank: 4, start: A-1}}}\n"
        "  - {id: gone, kind: infer, with: {component: reasoner, adapter: A-7}}\n"
    )
    events = apply(s, submit(make_ticket("TICKET-3", steps=steps), T0))
    by_task = {e.task: e.params for e in events if isinstance(e, ev.AttemptScheduled)}
    assert by_task["ask"]["_adapter"]["id"] == "A-1" and by_task["ask"]["_adapter"]["core_checkpoint"] == CORE_A
    assert by_task["more"]["_adapter"]["id"] == "A-1"
    assert by_task["gone"]["_adapter"] == {"missing": "A-7"}


def test_projection_follows_the_lifecycle_and_reads_old_logs() -> None:
    s = State(home_owner="bob")
    log: list[ev.Event] = []
    log += _promote_reasoner(s, "TICKET-1", CORE_A)
    log += _adapter_ticket(s, "TICKET-2")
    log += _promote_reasoner(s, "TICKET-3", CORE_B)
    # An event written before adapters had ids (TICKET-7 in an old log).
    log.append(
        ev.AdapterActivated(
            at=T0, ticket="TICKET-7", adapters={"reasoner": {"checkpoint": "d" * 64, "task": "adapt"}}, core_version=2
        )
    )
    rows = MemoryRows()
    project_all(rows, list(enumerate(log, start=1)))
    a1 = rows.data["adapters"][("A-1",)]
    assert a1["ticket"] == "TICKET-2" and a1["component"] == "reasoner" and a1["base_core_version"] == 1
    assert a1["artifact"] == "c" * 63 + "2" and a1["metrics"] == {"gain": 0.1}
    assert not a1["active"] and a1["retired_reason"] == "core_rolled" and "core v2" in a1["retired_detail"]
    legacy = rows.data["adapters"][("A-TICKET-7.reasoner",)]
    assert legacy["active"] and legacy["base_core_version"] == 2 and legacy["metrics"] == {}
