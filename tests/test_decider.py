"""The decider's rules, and properties over random command sequences (hypothesis)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import event as hyp_event
from hypothesis import strategies as st

from daemon import commands as c
from daemon.decider import _cache_key_of, _Emitter, _in_flight, _run, backoff_seconds, decide, resolved_params
from daemon.state import State, evolve
from schema import events as ev
from schema.plan import LIVE
from tests.helpers import content_hash, make_ticket, property_examples, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def apply(state: State, command: c.Command) -> list[ev.Event]:
    events = decide(state, command)
    for e in events:
        evolve(state, e)
    return events


def types(events: list[ev.Event]) -> list[str]:
    return [e.type for e in events]


def report(cls: type, task: str, attempt: int, seq: int = 0, ticket: str = "TICKET-1", /, **kw: object) -> c.Command:
    return cls(
        now=kw.pop("now", T0),
        ticket=kw.pop("ticket", ticket),
        task=task,
        attempt=attempt,
        report_seq=kw.pop("seq", seq),
        **kw,
    )


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
    late = apply(s, report(c.RecordJobSucceeded, "a", 1, seq=3, sender="w1"))  # attempt 1 is fenced off
    assert types(late) == ["StaleReportRefused"] and s.tickets["TICKET-1"].tasks["a"].status == "scheduled"
    assert types(apply(s, report(c.RecordProgress, "a", 2, seq=1, step=1))) == ["ProgressRecorded"]
    assert apply(s, report(c.RecordProgress, "a", 2, seq=1, step=1)) == []  # delivered twice
    assert types(apply(s, report(c.RecordJobSucceeded, "a", 2, seq=2))) == [
        "AttemptSucceeded",
        "AcceptanceEvaluated",
        "TicketCompleted",
    ]


def test_a_cut_off_workers_late_reports_are_fenced_and_recorded_not_applied() -> None:
    """The reconciler failed attempt 1 (no heartbeat: its worker was cut off from Redis); the worker
    comes back and its reports arrive late, before and after attempt 2 is scheduled."""
    s = State()
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag, retries: 3}\n"), T0))
    apply(s, report(c.RecordJobStarted, "a", 1, seq=1, worker="hostb:1", sender="hostb:1"))
    apply(s, report(c.RecordCheckpoint, "a", 1, seq=2, path="/ck/1", step=10, sender="hostb:1"))
    lost = apply(s, report(c.RecordJobFailed, "a", 1, error="worker lost", cause="infrastructure"))
    assert types(lost) == ["AttemptFailed"]
    task = s.tickets["TICKET-1"].tasks["a"]
    # Before the retry: same attempt number, but the attempt has ended.
    early = apply(s, report(c.RecordCheckpoint, "a", 1, seq=3, path="/ck/2", step=20, sender="hostb:1"))
    assert types(early) == ["StaleReportRefused"]
    assert (early[0].attempt, early[0].current_attempt, early[0].report, early[0].worker) == (
        1,
        1,
        "checkpoint",
        "hostb:1",
    )
    assert task.status == "waiting_retry" and task.checkpoint == "/ck/1"  # not applied
    apply(s, c.Tick(now=lost[0].retry_at))
    assert s.tickets["TICKET-1"].tasks["a"].attempt == 2
    assert apply(s, report(c.RecordProgress, "a", 1, seq=4, step=25, sender="hostb:1")) == []  # no event per progress
    done = apply(s, report(c.RecordJobSucceeded, "a", 1, seq=5, sender="hostb:1"))
    assert types(done) == ["StaleReportRefused"] and (done[0].report, done[0].current_attempt) == ("succeeded", 2)
    assert s.tickets["TICKET-1"].status == "running" and s.tickets["TICKET-1"].tasks["a"].status == "scheduled"
    # The reconciler's own second verdict on attempt 1 (no report number) is no worker report: nothing.
    assert apply(s, report(c.RecordJobFailed, "a", 1, error="again", cause="infrastructure")) == []
    assert types(apply(s, report(c.RecordJobSucceeded, "a", 2, seq=1, sender="hostc:1")))[0] == "AttemptSucceeded"
    assert s.tickets["TICKET-1"].status == "completed"
    # Back after the ticket ended: still refused and recorded; a duplicate of an applied report is not.
    assert types(apply(s, report(c.RecordJobFailed, "a", 1, seq=6, error="cancelled", sender="hostb:1"))) == [
        "StaleReportRefused"
    ]
    assert apply(s, report(c.RecordJobSucceeded, "a", 2, seq=1, sender="hostc:1")) == []


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
    apply(s, submit(make_ticket(steps="  - {id: a, kind: diag}\n", extra="acceptance: [{run: [wc, x]}]\n"), T0))
    events = apply(s, report(c.RecordJobSucceeded, "a", 1))
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"]
    assert events[1].task == "accept-1" and events[1].kind == "check" and events[1].params["run"] == ["wc", "x"]
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
    make_ticket(
        "TICKET-3",
        steps="  - {id: t, kind: train}\n  - {id: e, kind: evaluate, needs: [t]}\n"
        "  - {id: k, kind: check, needs: [t], with: {run: [shellcheck]}}\n",
        extra="update: core\nexpires: 1m\n",
    ),
    make_ticket(  # subtasks, a probe and an expectation
        "TICKET-4",
        steps="  - {id: d, kind: synthesize, shards: 2, with: {generator: shapes, count: 20, shard_size: 10},"
        " expect: [{metric: count, op: '>=', value: 0.2, retryable: true}]}\n"
        "  - {id: p, kind: diag, needs: [d], probe: [{metric: d.count, op: '>=', value: 0.3}]}\n",
    ),
    # The same train step as TICKET-3's under another id: it waits for that job, or reuses its success.
    make_ticket("TICKET-5", steps="  - {id: t2, kind: train}\n  - {id: d, kind: diag, needs: [t2]}\n"),
    make_ticket(  # a sweep: one subtask per combination, joined by selecting the best (no job)
        "TICKET-6",
        steps="  - {id: s, kind: diag, matrix: {seed: [0, 1]}, select: {metric: m, mode: max}}\n"
        "  - {id: u, kind: diag, needs: [s]}\n",
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
    live = sorted(t for t, v in ticket.tasks.items() if v.status in LIVE)
    tasks = live if live and x < 0.85 else sorted(ticket.tasks)
    task = ticket.tasks[tasks[(pick + n) % len(tasks)]]
    # Mostly the live attempt; sometimes an old one (fenced) or one from the future.
    attempt = {0: task.attempt, 1: task.attempt, 2: max(1, task.attempt - 1), 3: task.attempt + 1}[attempt_delta]
    seq = n + 1 if x < 0.8 else 1
    if kind == 1:
        return c.Tick(now=now)
    if kind == 2:
        return c.RecordJobStarted(now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, worker="w")
    if kind == 3:
        return c.RecordProgress(now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, step=n)
    if kind in (4, 5, 6):
        return c.RecordJobSucceeded(
            now=now, ticket=ticket.id, task=task.id, attempt=attempt, report_seq=seq, metrics={"m": x, "count": x}
        )
    if kind == 7:
        return c.RecordJobFailed(
            now=now,
            ticket=ticket.id,
            task=task.id,
            attempt=attempt,
            report_seq=seq,
            error=f"E{pick % 2}",
            retryable=x < 0.9,
            cause="infrastructure" if n % 3 == 0 else "job",
        )
    if kind in (1, 8) and state.proposals and x < 0.5:
        proposal = sorted(state.proposals)[pick % len(state.proposals)]
        if x < 0.35:
            return c.ApproveProposal(
                now=now, proposal=proposal, actor="a", scope="ticket" if pick % 2 else "all", approvers=["a"]
            )
        return c.RejectProposal(now=now, proposal=proposal, actor="a", reason="no")
    if kind == 8:
        return c.RetryTask(now=now, ticket=ticket.id, task=task.id)
    return c.CancelTicket(now=now, ticket=ticket.id) if x < 0.3 else c.Tick(now=now)


def _replay_through_handles(state: State, events: list[ev.Event]) -> State:
    """Emit `events` on a fresh emitter whose tickets and tasks were taken before emitting, as a rule
    holds them; every handle must still be the current object afterwards (none went stale)."""
    out = _Emitter(state)
    tickets = {e.ticket: out.ticket(e.ticket) for e in events if getattr(e, "ticket", None) in state.tickets}
    tasks = {
        (e.ticket, e.task): out.task(e.ticket, e.task)
        for e in events
        if isinstance(e, ev.TaskEvent) and e.ticket in state.tickets and e.task in state.tickets[e.ticket].tasks
    }
    for e in events:
        out.emit(e)
    renewed = {e.ticket for e in events if isinstance(e, ev.TicketSubmitted)}  # a new run: new objects
    for tid, ticket in tickets.items():
        assert tid in renewed or out.state.tickets[tid] is ticket, f"stale ticket handle {tid}"
    for (tid, task_id), task in tasks.items():
        assert tid in renewed or out.state.tickets[tid].tasks[task_id] is task, f"stale task handle {tid}/{task_id}"
    return out.state


def check_invariants(state: State) -> None:
    # The index of running tickets (what the clock and the STATUS line walk) is exactly the running ones.
    assert set(state.running) == {t.id for t in state.tickets.values() if t.status == "running"}
    for ticket in state.tickets.values():
        for task in ticket.tasks.values():
            if task.status in LIVE or task.status == "succeeded":
                assert all(ticket.tasks[n].status == "succeeded" for n in task.needs), (ticket.id, task.id)
        if ticket.status == "running" and not ticket.awaiting:
            # Nothing is forgotten: a runnable task waits only on a policy proposal (checks) or on
            # the same step running in another task (the step cache).
            for task in ticket.tasks.values():
                needs_done = all(ticket.tasks[n].status == "succeeded" for n in task.needs)
                if task.status == "pending" and task.kind != "check" and needs_done:
                    key = _cache_key_of(ticket, task, resolved_params(ticket, task, state))
                    assert key is not None and _in_flight(state, key) not in (None, (ticket.id, task.id))
                    assert task.waiting_on == key and (ticket.id, task.id) in state.waiting[key]
        if ticket.status == "completed":
            assert all(t.status == "succeeded" for t in ticket.tasks.values())
            assert len(ticket.acceptance) == len(ticket.spec.acceptance)
            assert all(r["ok"] for r in ticket.acceptance)


@settings(max_examples=property_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=15, max_size=80))
def test_properties_over_random_command_sequences(ops: list[tuple[int, int, int, float]]) -> None:
    state = State()
    log: list[ev.Event] = []
    live: set[tuple[str, str, int]] = set()
    now = T0
    for n, code in enumerate(ops):
        now = now + timedelta(seconds=30 * code[3])
        command = interpret(state, n, code, now)
        before = copy.deepcopy(state)
        out = _run(state, command)
        events = out.events
        assert state == before, "decide must not change the state it is given"
        handles = _replay_through_handles(state, events)
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
        # What the rules saw is what the log gives: no change lost to a stale copy, none applied twice.
        assert out.state == state, "the decider's scratch state differs from its events applied to the state"
        assert handles == state, "events emitted through an emitter differ from the log applied to the state"
        names = types(events)
        if "CorePromoted" in names:  # only ever right after a human approval
            assert names[names.index("CorePromoted") - 1] == "ProposalApproved"
        log.extend(events)
        check_invariants(state)
    hyp_event(f"proposals opened: {min(len(state.proposals), 2)}")
    hyp_event(f"tickets completed: {min(sum(t.status == 'completed' for t in state.tickets.values()), 2)}")
    replayed = State()
    for e in log:
        evolve(replayed, e)
    assert replayed == state


def test_a_ticket_or_task_a_rule_holds_stays_current_after_emitting() -> None:
    state = State()
    apply(state, submit(make_ticket(), T0))
    scheduled = next(t for t in state.tickets["TICKET-1"].tasks.values() if t.status == "scheduled")
    out = _Emitter(state)
    ticket = out.ticket("TICKET-1")
    task = out.task("TICKET-1", scheduled.id)
    out.emit(ev.AttemptStarted(at=T0, ticket="TICKET-1", task=task.id, attempt=task.attempt, report_seq=1, worker="w"))
    assert task.status == "running" and ticket.tasks[task.id] is task  # the rule's references see the event
    assert out.ticket("TICKET-1") is ticket and out.state.tickets["TICKET-1"] is ticket
    assert state.tickets["TICKET-1"].tasks[task.id].status == "scheduled"  # the caller's state is untouched
    assert state.tickets["TICKET-1"] is not ticket


# --- proposals, policy, core, adapters ----------------------------------------------------------

CORE_STEPS = (
    "  - {id: train, kind: train, with: {model: jepa}}\n"
    "  - {id: eval, kind: evaluate, needs: [train], with: {model: jepa}}\n"
)


def _run_core_ticket(s: State, tid: str, approvers: str = "", now: datetime = T0) -> ev.ProposalOpened:
    # cache: false: these tests run the same steps in several tickets and report each one's jobs
    extra = f"update: core\nexpires: 1h\ncache: false\n{approvers}"
    apply(s, submit(make_ticket(tid, steps=CORE_STEPS, extra=extra), now))
    apply(
        s,
        report(
            c.RecordJobSucceeded,
            "train",
            s.tickets[tid].tasks["train"].attempt,
            ticket=tid,
            now=now,
            outputs={"component": "image-encoder", "checkpoint": "sha256:" + "a" * 64},
        ),
    )
    events = apply(
        s,
        report(
            c.RecordJobSucceeded,
            "eval",
            s.tickets[tid].tasks["eval"].attempt,
            ticket=tid,
            now=now,
            metrics={"acc": 0.6},
            outputs={"core_metrics": {"acc": 0.4}},
        ),
    )
    assert types(events) == ["AttemptSucceeded", "AcceptanceEvaluated", "ProposalOpened"]
    return events[-1]  # type: ignore[return-value]


def test_core_proposal_side_by_side_then_approved() -> None:
    s = State(home_owner="alice")  # the default approver (HomeOwnerRecorded)
    opened = _run_core_ticket(s, "TICKET-1", "approvers: [alice]\n")
    assert opened.proposal == "P-1" and opened.kind == "core" and opened.base_core_version == 0
    assert opened.metrics["candidate"] == {"eval.acc": 0.6} and opened.metrics["current"] == {"eval.acc": 0.4}
    assert abs(opened.metrics["delta"]["eval.acc"] - 0.2) < 1e-9
    assert opened.candidate["image-encoder"]["checkpoint"] == "sha256:" + "a" * 64
    assert s.tickets["TICKET-1"].status == "running"
    refused = apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="mallory"))
    assert types(refused) == ["ApprovalRefused"] and "not an approver" in refused[0].reason
    events = apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="alice", note="looks good"))
    assert types(events) == ["ProposalApproved", "CorePromoted", "TicketCompleted"]
    assert s.core_version == 1 and "image-encoder" in s.core_components
    assert apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="alice")) == []  # decided already


def test_stale_core_proposal_is_refused_then_reevaluated() -> None:
    s = State(home_owner="bob")  # the default approver (HomeOwnerRecorded)
    _run_core_ticket(s, "TICKET-1")
    _run_core_ticket(s, "TICKET-2")
    apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="bob"))
    refused = apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="bob"))
    assert types(refused) == ["ApprovalRefused"] and "jbctl retry --reevaluate P-2" in refused[0].reason
    events = apply(s, c.ReevaluateProposal(now=T0, proposal="P-2", actor="bob"))
    assert types(events) == ["ProposalWithdrawn", "TaskRetried", "AttemptScheduled"]
    assert events[-1].task == "eval" and events[-1].params["_core"]["version"] == 1
    events = apply(
        s,
        report(
            c.RecordJobSucceeded,
            "eval",
            events[-1].attempt,
            ticket="TICKET-2",
            metrics={"acc": 0.7},
            outputs={"core_metrics": {"acc": 0.6}},
        ),
    )
    assert types(events)[-1] == "ProposalOpened" and events[-1].base_core_version == 1
    assert types(apply(s, c.ApproveProposal(now=T0, proposal="P-3", actor="bob")))[1] == "CorePromoted"
    assert s.core_version == 2


def test_rejected_and_expired_core_proposals_leave_the_core_alone() -> None:
    s = State()
    _run_core_ticket(s, "TICKET-1")
    events = apply(s, c.RejectProposal(now=T0, proposal="P-1", actor="bob", reason="probe gain too small"))
    assert types(events) == ["ProposalRejected", "TicketFailed"] and "probe gain too small" in events[1].reason
    _run_core_ticket(s, "TICKET-2")
    assert apply(s, c.Tick(now=T0 + timedelta(minutes=59))) == []
    events = apply(s, c.Tick(now=T0 + timedelta(minutes=61)))
    assert types(events) == ["ProposalExpired", "TicketFailed"]
    assert s.core_version == 0


def test_rollback_is_a_new_core_version() -> None:
    s = State(home_owner="bob")  # the default approver (HomeOwnerRecorded)
    _run_core_ticket(s, "TICKET-1")
    apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="bob"))
    first = dict(s.core_components)
    _run_core_ticket(s, "TICKET-2")
    apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="bob"))
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob", note="v2 regressed"))
    assert types(events) == ["CorePromoted"] and events[0].rollback_to == 1 and events[0].version == 3
    assert s.core_components == first


def test_check_outside_allowlist_waits_for_a_policy_proposal() -> None:
    s = State(home_owner="ops")  # the default approver (HomeOwnerRecorded)
    steps = "  - {id: a, kind: diag}\n  - {id: lint, kind: check, needs: [a], with: {run: [shellcheck, x.sh]}}\n"
    apply(s, submit(make_ticket("TICKET-1", steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "a", 1))
    assert types(events) == ["AttemptSucceeded", "ProposalOpened"]
    assert events[1].kind == "policy" and events[1].candidate["binary"] == "shellcheck"
    assert apply(s, c.Tick(now=T0)) == []  # nothing runs meanwhile
    events = apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="ops", scope="ticket"))
    assert types(events) == ["ProposalApproved", "AttemptScheduled"]
    assert "shellcheck" in events[1].params["_allowed_binaries"]
    # Another ticket still has to ask; a global grant covers everyone after.
    apply(s, submit(make_ticket("TICKET-2", steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "a", 1, ticket="TICKET-2"))
    assert types(events)[-1] == "ProposalOpened"
    apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="ops", scope="all"))
    assert "shellcheck" in s.granted_binaries


def test_rejected_policy_fails_the_check() -> None:
    s = State()
    steps = "  - {id: lint, kind: check, with: {run: [curl, example.org]}}\n"
    events = apply(s, submit(make_ticket("TICKET-1", steps=steps), T0))
    assert types(events) == ["TicketSubmitted", "ProposalOpened"]
    events = apply(s, c.RejectProposal(now=T0, proposal="P-1", actor="ops", reason="no network tools"))
    assert types(events) == ["ProposalRejected", "TaskFailed", "TicketFailed"]
    assert "not allowed" in events[-1].reason


def test_installation_allowlist_comes_with_the_submission() -> None:
    s = State()
    t = make_ticket("TICKET-1", steps="  - {id: lint, kind: check, with: {run: [shellcheck, x.sh]}}\n")
    cmd_ = c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash="h", ticket=t, allowed_binaries=["shellcheck"])
    assert types(apply(s, cmd_)) == ["TicketSubmitted", "AttemptScheduled"]


def test_adapter_ticket_activates_working_memory_without_approval() -> None:
    s = State()
    apply(s, submit(make_ticket("TICKET-1", steps="  - {id: tune, kind: train}\n", extra="update: adapter\n"), T0))
    events = apply(s, report(c.RecordJobSucceeded, "tune", 1, outputs={"adapter": "image-encoder", "rank": 4}))
    assert types(events) == ["AttemptSucceeded", "AcceptanceEvaluated", "AdapterActivated", "TicketCompleted"]
    assert events[2].adapters["image-encoder"]["rank"] == 4


def test_no_worker_report_can_promote_the_core() -> None:
    """Every report kind, with forged content, through the decider: nothing produces CorePromoted."""
    s = State()
    _run_core_ticket(s, "TICKET-1")
    hostile: list[c.Command] = [
        report(
            c.RecordJobSucceeded,
            "eval",
            1,
            seq=50,
            metrics={"approved": 1.0},
            outputs={"proposal": "P-1", "approve": True, "core_version": 99},
        ),
        report(c.RecordJobFailed, "eval", 1, seq=51, error="CorePromoted P-1", violation="x"),
        report(c.RecordProgress, "train", 1, seq=52, step=1, metrics={"core": 1.0}),
        report(c.RecordArtifact, "train", 1, seq=53, artifact="a" * 64, kind="core", meta={"promote": True}),
        report(c.RecordCheckpoint, "train", 1, seq=54, path="/core", step=1),
        report(c.RecordJobStarted, "eval", 2, seq=1, worker="evil"),
        c.RecordViolation(now=T0, what="CorePromoted", detail="P-1"),
    ]
    for command in hostile:
        assert "CorePromoted" not in types(apply(s, command))
    assert s.core_version == 0 and s.proposals["P-1"].status == "open"


def test_refused_revision_is_applied_after_the_run_ends() -> None:
    s = State()
    t = make_ticket(steps="  - {id: a, kind: diag}\n")
    apply(s, submit(t, T0))
    revised = c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash=content_hash("v2"), ticket=t)
    assert types(apply(s, revised)) == ["TicketRevisionRefused"]
    assert apply(s, revised) == []  # a rescan while running records nothing more
    apply(s, report(c.RecordJobSucceeded, "a", 1))
    assert types(apply(s, revised)) == ["TicketSubmitted", "AttemptScheduled"]  # the next rescan applies it


def test_restoring_a_removed_file_starts_a_new_run() -> None:
    s = State()
    cmd_ = submit(make_ticket(), T0, path="/t/TICKET-1.yaml")
    apply(s, cmd_)
    apply(s, c.TicketFileRemoved(now=T0, path="/t/TICKET-1.yaml"))
    events = apply(s, cmd_)
    assert types(events)[0] == "TicketSubmitted" and events[0].revision == 2
