"""The projection tables agree with the decider's state over random command sequences (hypothesis),
retries and re-evaluations of core proposals included."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import event as hyp_event
from hypothesis import strategies as st

from daemon import commands as c
from daemon.state import State
from schema.projections import MemoryRows, project
from tests.helpers import make_ticket, property_examples, submit
from tests.test_decider import T0, apply, interpret, report, types

# interpret()'s command kinds, plus: 10 re-evaluate an open core proposal, 11 retry a blocked task,
# 12 rerun an ended ticket from one of its tasks, 13 clear the step cache.
op = st.tuples(st.integers(0, 13), st.integers(0, 5), st.integers(0, 3), st.floats(0, 1))


def command(state: State, n: int, code: tuple[int, int, int, float], now: object) -> c.Command:
    kind, pick = code[0], code[1]
    if kind == 10:
        open_core = sorted(p.id for p in state.proposals.values() if p.status == "open" and p.kind == "core")
        if open_core:
            return c.ReevaluateProposal(now=now, proposal=open_core[pick % len(open_core)], actor="a")
    if kind == 11:
        tasks = [(t.id, k) for t in state.tickets.values() for k in t.tasks.values()]
        blocked = sorted((tid, k.id) for tid, k in tasks if k.status == "blocked")
        if blocked:
            tid, task = blocked[pick % len(blocked)]
            return c.RetryTask(now=now, ticket=tid, task=task, actor="a")
    if kind == 12:
        ended = sorted((t.id, sorted(t.tasks)) for t in state.tickets.values() if t.status != "running")
        if ended:
            tid, task_ids = ended[pick % len(ended)]
            return c.RetryFrom(now=now, ticket=tid, task=task_ids[code[2] % len(task_ids)], actor="a")
    if kind == 13:
        return c.ClearCache(now=now, kind=[None, "train", "evaluate"][code[2] % 3])
    return interpret(state, n, (kind % 10, *code[1:]), now)  # type: ignore[arg-type]


def check_counts(state: State, rows: MemoryRows) -> None:
    """`tasks_done` is the number of succeeded tasks, `tasks_total` the number of tasks; each task
    row is in the state the decider holds."""
    for ticket in state.tickets.values():
        row = rows.get("tickets", (ticket.id,))
        assert row is not None
        done = sum(t.status == "succeeded" for t in ticket.tasks.values())
        assert (row["tasks_done"], row["tasks_total"]) == (done, len(ticket.tasks)), ticket.id
        for task in ticket.tasks.values():
            task_row = rows.get("tasks", (ticket.id, task.id))
            assert task_row is not None and task_row["state"] == task.status, (ticket.id, task.id)


@settings(max_examples=property_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=15, max_size=80))
def test_task_counts_follow_retries_and_reevaluations(ops: list[tuple[int, int, int, float]]) -> None:
    state, rows, seq, now = State(), MemoryRows(), 0, T0
    for n, code in enumerate(ops):
        now = now + timedelta(seconds=30 * code[3])
        events = apply(state, command(state, n, code, now))
        for e in events:
            seq += 1
            project(rows, seq, e)
        check_counts(state, rows)
        hyp_event(f"{events[0].type if events else 'nothing'}")


def test_reevaluation_counts_the_evaluation_once() -> None:
    """The issue's case: after `retry P-n --reevaluate` a two-task ticket showed 3/2 tasks."""
    state, rows, seq = State(), MemoryRows(), 0
    steps = "  - {id: train, kind: train}\n  - {id: eval, kind: evaluate, needs: [train]}\n"

    def run(cmd: c.Command) -> list[str]:
        nonlocal seq
        events = apply(state, cmd)
        for e in events:
            seq += 1
            project(rows, seq, e)
        return types(events)

    for tid in ("TICKET-1", "TICKET-2"):
        run(submit(make_ticket(tid, steps=steps, extra="update: core\ncache: false\n"), T0))  # both tickets train
        run(report(c.RecordJobSucceeded, "train", 1, 0, tid, outputs={"component": "reasoner"}))
        run(report(c.RecordJobSucceeded, "eval", 1, 0, tid, metrics={"acc": 0.5}))
    run(c.ApproveProposal(now=T0, proposal="P-1", actor="a"))
    assert run(c.ReevaluateProposal(now=T0, proposal="P-2", actor="a"))[-1] == "AttemptScheduled"
    assert rows.get("tickets", ("TICKET-2",))["tasks_done"] == 1  # type: ignore[index]
    assert run(report(c.RecordJobSucceeded, "eval", 2, 0, "TICKET-2", metrics={"acc": 0.6}))[-1] == "ProposalOpened"
    row = rows.get("tickets", ("TICKET-2",))
    assert row is not None and (row["tasks_done"], row["tasks_total"]) == (2, 2)
    check_counts(state, rows)
