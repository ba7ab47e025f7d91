"""The decider's rules, and properties over random command sequences (hypothesis)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import commands as c
from daemon.decider import backoff_seconds, decide
from daemon.state import LIVE, State, evolve
from schema import events as ev
from tests.helpers import content_hash, make_ticket, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def apply(state: State, command: c.Command) -> list[ev.Event]:
    events = decide(state, command)
    for e in events:
        evolve(state, e)
    return events


def types(events: list[ev.Event]) -> list[str]:
    return [e.type for e in events]


def report(kind: type, task: str, attempt: int, seq: int = 0, ticket: str = "TICKET-1", **kw: object) -> c.Command:
    return kind(now=kw.pop("now", T0), ticket=ticket, task=task, attempt=attempt, report_seq=seq, **kw)


def test_submit_schedules_roots_and_needs_order_the_rest() -> None:
    s = State()
    events = apply(s, submit(make_ticket(), T0))
    assert types(events) == ["TicketSubmitted", "AttemptScheduled"]
    assert events[1].task == "a" and events[1].attempt == 1
    events = apply(s, report(c.RecordJobSucceeded, "a", 1, metrics={"x": 1.0}))
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"]
    events = apply(s, report(c.RecordJobSucceeded, "b", 1))
    assert types(events) == ["AttemptSucceeded", "AcceptanceEvaluated", "TicketCompleted"]
    assert s.tickets["TICKET-1"].status == "completed"


def test_unchanged_file_records_nothing_and_invalid_is_rejected_once() -> None:
    s = State()
    cmd = submit(make_ticket(), T0)
    assert apply(s, cmd)
    assert apply(s, cmd) == []
    bad = c.SubmitTicket(now=T0, path="/t/TICKET-2.yaml", content_hash="h", errors=["x:1:1: bad"])
    assert types(apply(s, bad)) == ["TicketRejected"]
    assert apply(s, bad) == []


def test_retry_with_backoff_then_fail_ticket() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 2}\n"), T0))
    retry_times = []
    for attempt in (1, 2):
        events = apply(s, report(c.RecordJobFailed, "a", attempt, error=f"boom {attempt}"))
        assert types(events) == ["AttemptFailed"]
        retry_times.append(events[0].retry_at)
        assert apply(s, c.Tick(now=events[0].retry_at - timedelta(milliseconds=1))) == []
        sched = apply(s, c.Tick(now=events[0].retry_at))
        assert types(sched) == ["AttemptScheduled"] and sched[0].attempt == attempt + 1
    assert (retry_times[1] - T0) > (retry_times[0] - T0)  # backoff grows
    events = apply(s, report(c.RecordJobFailed, "a", 3, error="ValueError: still broken"))
    assert types(events) == ["AttemptFailed", "TaskFailed", "TicketFailed"]
    assert "failed after 3 attempts" in events[-1].reason


def test_backoff_is_deterministic_and_bounded() -> None:
    assert backoff_seconds("T", "a", 1) == backoff_seconds("T", "a", 1)
    assert 1.0 <= backoff_seconds("T", "a", 1) <= 2.0
    assert backoff_seconds("T", "a", 30) <= 300


def test_old_attempt_and_duplicate_reports_are_ignored() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 3}\n"), T0))
    apply(s, report(c.RecordJobStarted, "a", 1, seq=1, worker="w1"))
    failed = apply(s, report(c.RecordJobFailed, "a", 1, seq=2, error="x"))
    apply(s, c.Tick(now=failed[0].retry_at))
    assert apply(s, report(c.RecordJobSucceeded, "a", 1, seq=3)) == []  # attempt 1 is fenced off
    assert types(apply(s, report(c.RecordProgress, "a", 2, seq=1, step=1))) == ["ProgressRecorded"]
    assert apply(s, report(c.RecordProgress, "a", 2, seq=1, step=1)) == []  # delivered twice
    assert types(apply(s, report(c.RecordJobSucceeded, "a", 2, seq=2))) == [
        "AttemptSucceeded",
        "AcceptanceEvaluated",
        "TicketCompleted",
    ]


def test_loop_detection_blocks_and_retry_unblocks() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 10}\n"), T0))
    now = T0
    events: list[ev.Event] = []
    for attempt in (1, 2, 3):
        events = apply(s, report(c.RecordJobFailed, "a", attempt, error=f"OSError: disk {attempt} full", now=now))
        if attempt < 3:
            now = events[0].retry_at
            apply(s, c.Tick(now=now))
    assert types(events) == ["AttemptFailed", "LoopDetected", "TaskBlocked"]
    assert apply(s, c.Tick(now=now + timedelta(hours=1))) == []
    assert types(apply(s, c.RetryTask(now=now, ticket="TICKET-1", task="a", actor="alice"))) == [
        "TaskRetried",
        "AttemptScheduled",
    ]
    assert s.tickets["TICKET-1"].tasks["a"].attempt == 4


def test_alternating_failures_are_a_loop() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 10}\n"), T0))
    now, last = T0, []
    for attempt, err in enumerate(["KeyError: x", "ValueError: y", "KeyError: x", "ValueError: y"], start=1):
        last = apply(s, report(c.RecordJobFailed, "a", attempt, error=err, now=now))
        if last[0].retry_at:
            now = last[0].retry_at
            apply(s, c.Tick(now=now))
    assert "LoopDetected" in types(last) and last[1].pattern == "alternate"


def test_acceptance_failure_fails_ticket() -> None:
    s = State()
    apply(
        s,
        submit(
            make_ticket(
                steps="  - {id: a, kind: diag}\n", extra="acceptance: [{metric: a.acc, op: '>=', value: 0.9}]\n"
            ),
            T0,
        ),
    )
    events = apply(s, report(c.RecordJobSucceeded, "a", 1, metrics={"acc": 0.5}))
    assert types(events) == ["AttemptSucceeded", "AcceptanceEvaluated", "TicketFailed"]
    assert "a.acc >= 0.9" in events[-1].reason and "observed 0.5" in events[-1].reason


def test_run_checks_become_check_tasks() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag}\n", extra="acceptance: [{run: [pytest, -q]}]\n"), T0))
    events = apply(s, report(c.RecordJobSucceeded, "a", 1))
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"]
    assert events[1].task == "accept-1" and events[1].kind == "check" and events[1].params["run"] == ["pytest", "-q"]
    events = apply(s, report(c.RecordJobFailed, "accept-1", 1, error="exit status 1"))
    assert types(events)[-1] == "TicketFailed" and "acceptance check accept-1" in events[-1].reason


def test_revision_refused_while_running_then_applied_with_new_attempt_numbers() -> None:
    s = State()
    t = make_ticket(steps="  - {id: a, kind: diag}\n")
    apply(s, submit(t, T0))
    changed = c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash=content_hash("v2"), ticket=t)
    assert types(apply(s, changed)) == ["TicketRevisionRefused"]
    apply(s, report(c.RecordJobSucceeded, "a", 1))
    v3 = c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash=content_hash("v3"), ticket=t)
    events = apply(s, v3)
    assert types(events) == ["TicketSubmitted", "AttemptScheduled"]
    assert events[0].revision == 2 and events[1].attempt == 2


def test_file_removed_cancels_and_fences_reports() -> None:
    s = State()
    apply(s, submit(make_ticket(), T0, path="/t/TICKET-1.yaml"))
    assert types(apply(s, c.TicketFileRemoved(now=T0, path="/t/TICKET-1.yaml"))) == ["TicketCancelled"]
    assert apply(s, report(c.RecordJobSucceeded, "a", 1)) == []
    assert apply(s, c.TicketFileRemoved(now=T0, path="/t/TICKET-1.yaml")) == []


def test_deadline_fails_ticket() -> None:
    s = State()
    apply(s, submit(make_ticket(extra="constraints: {max_wall_minutes: 1}\n"), T0))
    assert apply(s, c.Tick(now=T0 + timedelta(seconds=59))) == []
    events = apply(s, c.Tick(now=T0 + timedelta(seconds=61)))
    assert types(events) == ["TicketFailed"] and "deadline" in events[0].reason


def test_violation_fails_attempt_without_retry() -> None:
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 5}\n"), T0))
    events = apply(s, report(c.RecordJobFailed, "a", 1, error="NetworkDenied: 127.0.0.1:80", violation="network"))
    assert types(events) == ["SafetyViolation", "AttemptFailed", "TaskFailed", "TicketFailed"]


# --- properties --------------------------------------------------------------------------------

TICKETS = [
    make_ticket("TICKET-1"),
    make_ticket(
        "TICKET-2",
        steps="  - {id: a, kind: diag, retries: 1}\n  - {id: b, kind: diag}\n"
        "  - {id: c, kind: diag, needs: [a, b], retries: 3}\n",
        extra="acceptance: [{metric: c.m, op: '>=', value: 0.5}, {run: ['true']}]\n",
    ),
]

op = st.tuples(st.integers(0, 9), st.integers(0, 5), st.integers(0, 3), st.floats(0, 1))


def interpret(state: State, n: int, code: tuple[int, int, int, float], now: datetime) -> c.Command:
    kind, pick, attempt_delta, x = code
    if kind == 0 or not state.tickets:
        t = TICKETS[pick % len(TICKETS)]
        return c.SubmitTicket(now=now, path=f"/t/{t.id}.yaml", content_hash=content_hash(f"{t.id}{pick % 2}"), ticket=t)
    tickets = sorted(state.tickets)
    ticket = state.tickets[tickets[pick % len(tickets)]]
    tasks = sorted(ticket.tasks)
    task = ticket.tasks[tasks[(pick + n) % len(tasks)]]
    attempt = max(1, task.attempt - attempt_delta) if attempt_delta < 3 else task.attempt + 1
    seq = n + 1 if x < 0.8 else 1
    if kind == 1:
        return c.Tick(now=now)
    if kind == 2:
        return c.RecordJobStarted(now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, worker="w")
    if kind == 3:
        return c.RecordProgress(now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, step=n)
    if kind in (4, 5):
        return c.RecordJobSucceeded(
            now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, metrics={"m": x}
        )
    if kind in (6, 7):
        return c.RecordJobFailed(
            now=now,
            ticket=ticket.id,
            task=task.id,
            attempt=attempt,
            report_seq=seq,
            error=f"E{pick % 2}",
            retryable=x < 0.9,
        )
    if kind == 8:
        return c.RetryTask(now=now, ticket=ticket.id, task=task.id)
    return c.CancelTicket(now=now, ticket=ticket.id) if x < 0.3 else c.Tick(now=now)


def check_invariants(state: State) -> None:
    for ticket in state.tickets.values():
        for task in ticket.tasks.values():
            if task.status in LIVE or task.status == "succeeded":
                assert all(ticket.tasks[n].status == "succeeded" for n in task.needs), (ticket.id, task.id)
        if ticket.status == "completed":
            assert all(t.status == "succeeded" for t in ticket.tasks.values())
            assert len(ticket.acceptance) == len(ticket.spec.acceptance)
            assert all(r["ok"] for r in ticket.acceptance)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=60))
def test_properties_over_random_command_sequences(ops: list[tuple[int, int, int, float]]) -> None:
    state = State()
    log: list[ev.Event] = []
    live: set[tuple[str, str, int]] = set()
    now = T0
    for n, code in enumerate(ops):
        now = now + timedelta(seconds=30 * code[3])
        command = interpret(state, n, code, now)
        before = copy.deepcopy(state)
        events = decide(state, command)
        assert state == before, "decide must not change the state it is given"
        for e in events:
            # Never two live attempts of one task.
            if isinstance(e, ev.AttemptScheduled):
                assert not any(k[:2] == (e.ticket, e.task) for k in live), e
                live.add((e.ticket, e.task, e.attempt))
            elif isinstance(e, ev.AttemptSucceeded | ev.AttemptFailed):
                live.discard((e.ticket, e.task, e.attempt))
            elif isinstance(e, ev.TicketCancelled | ev.TicketFailed | ev.TicketSubmitted):
                live = {k for k in live if k[0] != e.ticket}
            evolve(state, e)
        log.extend(events)
        check_invariants(state)
    replayed = State()
    for e in log:
        evolve(replayed, e)
    assert replayed == state
