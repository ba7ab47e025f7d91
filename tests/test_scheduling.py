"""Scheduling a researcher steers: hold and release, pause, priorities with aging, `after:`, limits.

Pure decider tests (each rule), hostile ticket fields, and one real-process test (hold -> nothing
dispatched -> release -> completes)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import commands as c
from daemon.decider import AGING_S, _run, decide
from daemon.state import State, evolve
from schema import events as ev
from schema.plan import LIVE
from schema.ticket import TicketInvalid, parse_ticket
from tests.helpers import make_ticket, submit, ticket_yaml
from tests.test_decider import interpret

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ONE = "  - {id: a, kind: diag}\n"
GPU = "  - {id: a, kind: diag, queue: gpu}\n"


def apply(state: State, command: c.Command) -> list[ev.Event]:
    out = _run(state, command)
    for e in out.events:
        evolve(state, e)
    assert out.state == state, "the decider's scratch state differs from its events applied"
    return out.events


def types(events: list[ev.Event]) -> list[str]:
    return [e.type for e in events]


def scheduled(events: list[ev.Event]) -> list[tuple[str, str]]:
    return [(e.ticket, e.task) for e in events if isinstance(e, ev.AttemptScheduled)]


def done(tid: str, task: str = "a", attempt: int = 1, now: datetime = T0) -> c.Command:
    return c.RecordJobSucceeded(now=now, ticket=tid, task=task, attempt=attempt)


# --- hold and release ----------------------------------------------------------------------------


def test_a_ticket_that_arrives_held_waits_with_its_reason_until_released() -> None:
    s = State()
    events = apply(s, submit(make_ticket(extra="hold: true\n"), T0))
    assert types(events) == ["TicketSubmitted", "TicketHeld", "TaskDeferred"]
    assert "jbctl release TICKET-1" in events[-1].reason
    assert apply(s, c.Tick(now=T0 + timedelta(seconds=5))) == []  # still held: nothing, not even a repeat
    events = apply(s, c.ReleaseTicket(now=T0 + timedelta(seconds=9), ticket="TICKET-1", actor="ann"))
    assert types(events) == ["TicketReleased", "AttemptScheduled"]
    assert events[1].waited_since == T0  # placement records how long it waited
    assert s.deferred == {}


def test_hold_lets_live_attempts_finish_and_schedules_nothing_after() -> None:
    s = State()
    apply(s, submit(make_ticket(), T0))  # a -> b
    events = apply(s, c.HoldTicket(now=T0, ticket="TICKET-1", actor="ann"))
    assert types(events) == ["TicketHeld"]
    events = apply(s, done("TICKET-1"))
    assert types(events) == ["AttemptSucceeded", "TaskDeferred"]  # a finished; b waits
    assert "held (by ann)" in events[-1].reason
    assert apply(s, c.HoldTicket(now=T0, ticket="TICKET-1")) == []  # already held
    events = apply(s, c.ReleaseTicket(now=T0, ticket="TICKET-1"))
    assert scheduled(events) == [("TICKET-1", "b")]
    assert apply(s, c.ReleaseTicket(now=T0, ticket="TICKET-1")) == []  # not held any more


def test_hold_with_stop_turns_the_stopped_attempt_into_a_resumable_wait() -> None:
    s = State()
    apply(s, submit(make_ticket(steps=ONE), T0))
    apply(s, c.RecordCheckpoint(now=T0, ticket="TICKET-1", task="a", attempt=1, path="/ck/1", step=10))
    assert apply(s, c.HoldTicket(now=T0, ticket="TICKET-1", stop=True))[0].stop
    events = apply(
        s, c.RecordJobFailed(now=T0, ticket="TICKET-1", task="a", attempt=1, error="cancelled", retryable=False)
    )
    assert types(events) == ["AttemptStopped", "TaskDeferred"]  # not a failure: the ticket lives on
    assert s.tickets["TICKET-1"].status == "running"
    events = apply(s, c.ReleaseTicket(now=T0, ticket="TICKET-1"))
    again = [e for e in events if isinstance(e, ev.AttemptScheduled)]
    assert again[0].attempt == 2 and again[0].resume_checkpoint == "/ck/1"


def test_pause_and_resume_the_whole_installation() -> None:
    s = State()
    apply(s, submit(make_ticket("TICKET-1", steps=ONE), T0))
    assert types(apply(s, c.PauseInstallation(now=T0, actor="ops", reason="driver update"))) == ["InstallationPaused"]
    events = apply(s, submit(make_ticket("TICKET-2", steps=ONE), T0))
    assert types(events) == ["TicketSubmitted", "TaskDeferred"]
    assert "installation paused (driver update)" in events[-1].reason
    assert types(apply(s, done("TICKET-1"))) == ["AttemptSucceeded", "AcceptanceEvaluated", "TicketCompleted"]
    assert apply(s, c.PauseInstallation(now=T0)) == []
    events = apply(s, c.ResumeInstallation(now=T0))
    assert types(events) == ["InstallationResumed", "AttemptScheduled"]
    assert s.paused is None


# --- priorities ----------------------------------------------------------------------------------


def _busy_gpu(s: State) -> None:
    """One gpu slot, taken by TICKET-0."""
    apply(s, c.SetQueueLimits(now=T0, limits={"gpu": 1}))
    assert scheduled(apply(s, submit(make_ticket("TICKET-0", steps=GPU), T0))) == [("TICKET-0", "a")]


def test_higher_priority_goes_first_and_equal_priorities_keep_arrival_order() -> None:
    s = State()
    _busy_gpu(s)
    for tid, prio in (("TICKET-1", 0), ("TICKET-2", 5), ("TICKET-3", 0), ("TICKET-4", 5)):
        events = apply(s, submit(make_ticket(tid, steps=GPU, extra=f"priority: {prio}\n"), T0))
        assert types(events)[-1] == "TaskDeferred" and "queue gpu is full: 1 of 1" in events[-1].reason
    order = []
    running = "TICKET-0"
    for _ in range(4):
        events = apply(s, done(running))
        (nxt,) = scheduled(events)
        order.append(nxt[0])
        running = nxt[0]
    assert order == ["TICKET-2", "TICKET-4", "TICKET-1", "TICKET-3"]


def test_jbctl_priority_reorders_what_waits() -> None:
    s = State()
    _busy_gpu(s)
    apply(s, submit(make_ticket("TICKET-1", steps=GPU), T0))
    apply(s, submit(make_ticket("TICKET-2", steps=GPU), T0))
    assert types(apply(s, c.SetPriority(now=T0, ticket="TICKET-2", priority=3, actor="ann"))) == ["PriorityChanged"]
    assert apply(s, c.SetPriority(now=T0, ticket="TICKET-2", priority=3)) == []
    assert scheduled(apply(s, done("TICKET-0")))[0][0] == "TICKET-2"


def test_aging_a_starving_low_priority_ticket_is_scheduled_eventually() -> None:
    """A task gains a point per AGING_S waited: against a stream of priority-2 newcomers, the
    priority-0 ticket goes once it has waited 3 * AGING_S (2 points, then arrival order wins)."""
    s = State()
    _busy_gpu(s)
    apply(s, submit(make_ticket("TICKET-low", steps=GPU), T0))
    running, now, n = "TICKET-0", T0, 0
    while True:
        n += 1
        now = T0 + timedelta(seconds=n * AGING_S / 2)
        apply(s, submit(make_ticket(f"TICKET-hi{n}", steps=GPU, extra="priority: 2\n"), now))
        (nxt,) = scheduled(apply(s, done(running, now=now)))
        running = nxt[0]
        if running == "TICKET-low":
            break
        assert n < 10, "the low-priority ticket starved"
    assert now - T0 >= timedelta(seconds=2 * AGING_S)


# --- tickets that wait for tickets ---------------------------------------------------------------


def test_after_a_ticket_waits_with_the_reason_then_runs_when_it_completes() -> None:
    s = State()
    events = apply(s, submit(make_ticket("TICKET-7", steps=ONE, extra="after: [TICKET-2]\n"), T0))
    assert types(events) == ["TicketSubmitted", "TaskDeferred"]
    assert events[-1].reason == "after: TICKET-2 (not submitted yet)"
    events = apply(s, submit(make_ticket("TICKET-2", steps=ONE), T0))
    assert [e.reason for e in events if isinstance(e, ev.TaskDeferred)] == ["after: TICKET-2 (running)"]
    events = apply(s, done("TICKET-2"))
    assert "TicketCompleted" in types(events) and scheduled(events) == [("TICKET-7", "a")]


def test_after_a_failed_ticket_says_so_and_keeps_waiting() -> None:
    s = State()
    apply(s, submit(make_ticket("TICKET-2", steps=ONE), T0))
    apply(s, submit(make_ticket("TICKET-7", steps=ONE, extra="after: TICKET-2\n"), T0))
    apply(s, c.CancelTicket(now=T0, ticket="TICKET-2"))
    assert "TICKET-2 (cancelled; resubmit it" in (s.tickets["TICKET-7"].tasks["a"].deferred or "")


def test_after_core_component_waits_instead_of_failing() -> None:
    s = State()
    evolve(s, ev.CorePromoted(at=T0, version=1, components={"reasoner": {"sha": "x"}}, actor="ann"))
    evolve(s, ev.CorePromoted(at=T0, version=2, components={}, actor="ann", rollback_to=0))
    events = apply(s, submit(make_ticket("TICKET-7", steps=ONE, extra="after: {core: reasoner}\n"), T0))
    assert "the core has no 'reasoner' yet" in events[-1].reason
    assert apply(s, c.Tick(now=T0)) == []
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="ann"))  # the core has a reasoner again
    assert types(events) == ["CorePromoted", "AttemptScheduled"]


def test_after_cycle_is_refused_at_validation_for_itself() -> None:
    with pytest.raises(TicketInvalid) as exc:
        make_ticket("TICKET-3", extra="after: [TICKET-3]\n")
    assert "TICKET-3.yaml:7:9: after: ticket TICKET-3 cannot wait for itself" in str(exc.value.errors[0])


# --- limits --------------------------------------------------------------------------------------


def test_max_parallel_limits_one_tickets_jobs() -> None:
    steps = "".join(f"  - {{id: s{n}, kind: diag}}\n" for n in range(4))
    s = State()
    events = apply(s, submit(make_ticket(steps=steps, extra="max_parallel: 2\n"), T0))
    assert scheduled(events) == [("TICKET-1", "s0"), ("TICKET-1", "s1")]
    assert [e.reason for e in events if isinstance(e, ev.TaskDeferred)] == [
        "max_parallel: 2 of this ticket's 2 jobs are out"
    ] * 2
    assert scheduled(apply(s, done("TICKET-1", "s0"))) == [("TICKET-1", "s2")]


def test_queue_limit_is_recorded_once_and_other_queues_are_not_held_back() -> None:
    s = State()
    assert types(apply(s, c.SetQueueLimits(now=T0, limits={"gpu": 1}))) == ["QueueLimitsSet"]
    assert apply(s, c.SetQueueLimits(now=T0, limits={"gpu": 1})) == []
    apply(s, submit(make_ticket("TICKET-1", steps=GPU), T0))
    events = apply(s, submit(make_ticket("TICKET-2", steps=GPU + "  - {id: b, kind: diag}\n"), T0))
    assert scheduled(events) == [("TICKET-2", "b")]  # cpu is free; gpu waits
    assert types(apply(s, c.SetQueueLimits(now=T0, limits={})))[-1] == "AttemptScheduled"  # limit lifted


def test_no_waiting_no_extra_events_and_decide_never_mutates() -> None:
    s = State()
    apply(s, submit(make_ticket(), T0))
    before = [types(decide(s, done("TICKET-1")))]
    assert before == [["AttemptSucceeded", "AttemptScheduled"]]


# --- hostile ticket fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('priority: "x"\n', "6:1: priority: expected a whole number, not 'x'"),
        ("priority: true\n", "6:1: priority: expected a whole number, not True"),
        ("priority: 5000\n", "6:1: priority: Input should be less than or equal to 1000"),
        ("after: 5\n", "6:1: after: 5 is not a ticket id (TICKET-2) or {core: COMPONENT}"),
        ("after: [{ticket: TICKET-2}]\n", "is not a ticket id (TICKET-2) or {core: COMPONENT}"),
        ("after: {core: ../x}\n", "6:1: after: invalid core component '../x'"),
        ("hold: yes\n", "6:1: hold: expected true or false, not 'yes'"),
        ("max_parallel: 0\n", "6:1: max_parallel: Input should be greater than or equal to 1"),
    ],
)
def test_hostile_scheduling_fields_name_the_field_and_line(extra: str, message: str) -> None:
    with pytest.raises(TicketInvalid) as exc:
        parse_ticket(ticket_yaml("TICKET-1", ONE, extra).encode(), "TICKET-1.yaml")
    assert message in str(exc.value.errors[0]), exc.value.errors


# --- jbctl, in process, on a store without a daemon ---------------------------------------------


def test_jbctl_steering_commands_and_their_refusals(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from daemon.handler import CommandHandler

    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1", steps=GPU), T0))
    handler.handle(submit(make_ticket("TICKET-2", steps=GPU), T0))
    assert main(["hold", "TICKET-1", "-m", "review first"]) == 0
    assert "held TICKET-1; a will finish" in capsys.readouterr().out
    assert main(["hold", "TICKET-1"]) == 1
    assert "TICKET-1 is already held (review first)" in capsys.readouterr().err
    assert main(["hold", "TICKET-9"]) == 1
    assert "no ticket 'TICKET-9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["priority", "TICKET-1", "x"])
    assert "priority must be a whole number, not 'x'" in capsys.readouterr().err
    assert main(["priority", "TICKET-1", "5000"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["priority", "TICKET-2", "-3"]) == 0
    assert main(["pause", "-m", "driver update"]) == 0
    assert main(["pause"]) == 1
    capsys.readouterr()
    assert main(["status"]) == 0
    assert "installation paused (driver update)" in capsys.readouterr().out
    assert main(["resume"]) == 0 and main(["release", "TICKET-1"]) == 0
    assert main(["release", "TICKET-1"]) == 1
    assert "TICKET-1 is not held" in capsys.readouterr().err
    types_ = [r.type for r in store.read(0)]
    for name in ("TicketHeld", "PriorityChanged", "InstallationPaused", "InstallationResumed", "TicketReleased"):
        assert name in types_


# --- real processes ------------------------------------------------------------------------------


@pytest.mark.integration
def test_held_ticket_is_not_dispatched_until_released(
    running: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`jbctl submit --hold`: the daemon records the hold and why the task waits, dispatches nothing
    (a live worker stands idle), `jbctl status` says why; `jbctl release` and it completes. Then
    `jbctl hold --stop` on a running job: it stops at its next checkpoint (AttemptStopped, not a
    failure), and on release the next attempt is told to resume from that checkpoint."""
    from cli.main import main

    setup = running
    for key, value in setup.env.items():  # jbctl in this process (a subprocess costs seconds on a busy box)
        if key.startswith("JETBOX_"):
            monkeypatch.setenv(key, value)

    def jbctl(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out + out.err

    src = tmp_path / "TICKET-1.yaml"
    src.write_text(ticket_yaml("TICKET-1", ONE))
    code, text = jbctl("submit", "--hold", str(src))
    assert code == 0, text
    assert "hold" not in src.read_text()  # the user's file is left as it is
    waiting = setup.daemon.wait_event("TaskDeferred", ticket="TICKET-1", task="a")
    assert "held (hold: true in the ticket)" in waiting["data"]["reason"]
    time.sleep(1.0)  # a tick or two: still nothing for the worker
    assert not [r for r in setup.daemon.rows() if r["type"] == "AttemptScheduled"]
    code, text = jbctl("status", "TICKET-1")
    assert "a: held (hold: true in the ticket): jbctl release TICKET-1" in text, text
    code, text = jbctl("release", "TICKET-1")
    assert code == 0 and "released TICKET-1" in text, text
    assert setup.wait_done("TICKET-1", timeout=60) == "TicketCompleted"

    # A long job (a minute, a checkpoint every 0.2 s), held with --stop while it runs.
    setup.drop("TICKET-2", "  - {id: a, kind: diag, with: {sleep: 60, steps: 300, checkpoints: 300}}\n")
    setup.daemon.wait_event("CheckpointSaved", ticket="TICKET-2", task="a", timeout=30)
    code, text = jbctl("hold", "TICKET-2", "--stop")
    assert code == 0 and "a told to stop at the next checkpoint" in text, text
    stopped = setup.daemon.wait_event("AttemptStopped", ticket="TICKET-2", task="a", timeout=30)
    assert stopped["data"]["attempt"] == 1 and "cancelled" in stopped["data"]["error"]
    assert jbctl("release", "TICKET-2")[0] == 0
    again = setup.daemon.wait_event("AttemptScheduled", ticket="TICKET-2", task="a", attempt=2, timeout=30)
    assert again["data"]["resume_checkpoint"]  # the new attempt resumes where the stopped one left off
    assert jbctl("cancel", "TICKET-2")[0] == 0
    assert setup.wait_done("TICKET-2", timeout=30) == "TicketCancelled"
    setup.assert_consistent()  # replay --check: the projections (held, waiting, stopped) rebuild the same


def test_after_cycle_through_other_tickets_is_rejected_naming_the_line() -> None:
    s = State()
    apply(s, submit(make_ticket("TICKET-1", steps=ONE, extra="after: [TICKET-2]\n"), T0))
    apply(s, submit(make_ticket("TICKET-2", steps=ONE, extra="after: [TICKET-3]\n"), T0))
    cmd = submit(make_ticket("TICKET-3", steps=ONE, extra="after: [TICKET-1]\n"), T0)
    events = apply(s, cmd.model_copy(update={"after_line": 6}))
    assert types(events) == ["TicketRejected"]
    assert events[0].errors == [
        "/t/TICKET-3.yaml:6:1: after: waiting would never end: TICKET-3 -> TICKET-1 -> TICKET-2 -> TICKET-3 (a cycle)"
    ]
    # Once TICKET-2 has ended, the chain is broken: nothing waits in a circle and the file is accepted.
    apply(s, c.CancelTicket(now=T0, ticket="TICKET-2"))
    ok = submit(make_ticket("TICKET-3", steps=ONE, extra="after: [TICKET-1]\n"), T0)
    assert types(apply(s, ok.model_copy(update={"content_hash": "other"})))[0] == "TicketSubmitted"


def test_key_line_finds_the_top_level_key() -> None:
    from schema.ticket import key_line

    assert key_line(ticket_yaml("TICKET-1", ONE, "after: [TICKET-2]\n").encode(), "after") == 6
    assert key_line(b"id: x\n", "after") == 1


# --- properties under random steering --------------------------------------------------------------


steer_op = st.tuples(st.integers(0, 15), st.integers(0, 5), st.integers(0, 3), st.floats(0, 1))


def _steer(state: State, n: int, code: tuple[int, int, int, float], now: datetime) -> c.Command:
    """The decider tests' random commands, plus hold/release/priority/pause/resume/limits."""
    kind, pick, _, x = code
    if kind < 10 or not state.tickets:
        return interpret(state, n, (kind % 10, pick, code[2], x), now)
    tid = sorted(state.tickets)[pick % len(state.tickets)]
    if kind == 10:
        return c.HoldTicket(now=now, ticket=tid, stop=x < 0.3)
    if kind == 11:
        return c.ReleaseTicket(now=now, ticket=tid)
    if kind == 12:
        return c.SetPriority(now=now, ticket=tid, priority=pick - 2)
    if kind == 13:
        return c.PauseInstallation(now=now) if x < 0.5 else c.ResumeInstallation(now=now)
    if kind == 14:
        gpu = {"gpu": (1 + pick % 2) << 34} if pick % 3 else {}
        return c.SetQueueLimits(now=now, limits={"cpu": 1 + pick % 2} if x < 0.7 else {}, gpu_memory=gpu)
    if x < 0.5:
        t = STEER_TICKETS[pick % len(STEER_TICKETS)]
        return c.SubmitTicket(now=now, path=f"/t/{t.id}.yaml", content_hash=f"{t.id}{pick % 2}", ticket=t)
    return c.Tick(now=now + timedelta(seconds=AGING_S))


STEER_TICKETS = [
    make_ticket(
        "TICKET-8",
        steps="  - {id: p, kind: diag, queue: gpu, gpu_memory: 12G}\n"
        "  - {id: q, kind: diag, queue: gpu, gpu_memory: 6G}\n  - {id: r, kind: diag}\n",
        extra="after: [TICKET-1]\nmax_parallel: 2\npriority: 3\n",
    ),
    make_ticket("TICKET-9", steps="  - {id: p, kind: diag, queue: gpu, gpu_memory: 20G}\n", extra="after: {core: x}\n"),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steer_op, min_size=15, max_size=60))
def test_properties_under_random_steering(ops: list[tuple[int, int, int, float]]) -> None:
    """Whatever the order of holds, pauses, priorities, limits and reports: decide never changes its
    input, its scratch state equals the log applied, nothing is scheduled while paused or for a held
    ticket, a queue limit in force is never exceeded by a new schedule, and the indexes agree with
    the tasks."""
    import copy

    state = State()
    now = T0
    for n, code in enumerate(ops):
        now = now + timedelta(seconds=30 * code[3])
        command = _steer(state, n, code, now)
        before = copy.deepcopy(state)
        out = _run(state, command)
        assert state == before, "decide must not change the state it is given"
        for e in out.events:
            if isinstance(e, ev.AttemptScheduled):
                assert state.paused is None, "scheduled while paused"
                assert state.tickets[e.ticket].held is None, "scheduled a held ticket"
                limit = state.queue_limits.get(e.queue)
                if limit is not None:
                    assert sum(q == e.queue for q in state.live.values()) < limit, "queue limit exceeded"
                budget = state.queue_gpu_memory.get(e.queue)
                if budget is not None:
                    used = sum(state.tickets[t].tasks[k].claimed for (t, k), q in state.live.items() if q == e.queue)
                    assert e.gpu_memory is not None and used + e.gpu_memory <= budget, "GPU memory over-committed"
            evolve(state, e)
        assert out.state == state
        for tid, ticket in state.tickets.items():
            for task in ticket.tasks.values():
                key = (tid, task.id)
                assert (key in state.live) == (ticket.status == "running" and task.status in LIVE)
                if key in state.deferred:
                    assert ticket.status == "running" and task.deferred is not None


# --- GPU memory on a queue's card ------------------------------------------------------------------

G = 1 << 30


def _gpu_step(mem: str | None) -> str:
    return "  - {id: a, kind: diag, queue: gpu" + (f", gpu_memory: {mem}" if mem else "") + "}\n"


def test_two_small_steps_share_a_card_and_a_third_waits_saying_what_is_missing() -> None:
    s = State()
    apply(s, c.SetQueueLimits(now=T0, limits={}, gpu_memory={"gpu": 24 * G}))
    first = apply(s, submit(make_ticket("TICKET-1", steps=_gpu_step("12G")), T0))
    assert [e.gpu_memory for e in first if isinstance(e, ev.AttemptScheduled)] == [12 * G]  # placement recorded
    assert scheduled(apply(s, submit(make_ticket("TICKET-2", steps=_gpu_step("10G")), T0))) == [("TICKET-2", "a")]
    events = apply(s, submit(make_ticket("TICKET-3", steps=_gpu_step("12G")), T0))
    assert events[-1].rule == "gpu_memory"
    assert events[-1].reason == "waiting for a GPU with 12G free (2G of 24G free)"
    assert scheduled(apply(s, done("TICKET-1"))) == [("TICKET-3", "a")]  # 12G freed: it fits now


def test_a_step_that_declares_nothing_takes_the_whole_card_and_too_big_says_so() -> None:
    s = State()
    apply(s, c.SetQueueLimits(now=T0, limits={}, gpu_memory={"gpu": 24 * G}))
    apply(s, submit(make_ticket("TICKET-1", steps=_gpu_step(None)), T0))  # exclusive
    events = apply(s, submit(make_ticket("TICKET-2", steps=_gpu_step("1G")), T0))
    assert events[-1].reason == "waiting for a GPU with 1G free (0B of 24G free)"
    events = apply(s, submit(make_ticket("TICKET-3", steps=_gpu_step("32G")), T0))
    assert "needs 32G of GPU memory, more than queue gpu's card has (24G" in events[-1].reason


def test_no_backfill_a_small_step_does_not_overtake_a_large_one_waiting_for_memory() -> None:
    s = State()
    apply(s, c.SetQueueLimits(now=T0, limits={}, gpu_memory={"gpu": 24 * G}))
    apply(s, submit(make_ticket("TICKET-1", steps=_gpu_step("16G")), T0))
    apply(s, submit(make_ticket("TICKET-2", steps=_gpu_step("20G")), T0))  # waits: 8G free
    events = apply(s, submit(make_ticket("TICKET-3", steps=_gpu_step("4G")), T0))  # would fit, but is behind
    assert scheduled(events) == []
    assert events[-1].reason == "behind TICKET-2/a on queue gpu (GPU memory)"
    events = apply(s, done("TICKET-1"))
    assert scheduled(events) == [("TICKET-2", "a"), ("TICKET-3", "a")]  # 20G + 4G = the card


def test_gpu_memory_field_hostile_values() -> None:
    for steps, message in (
        (_gpu_step("lots"), "steps.0.gpu_memory: invalid memory size 'lots'"),
        ("  - {id: a, kind: synthesize, gpu_memory: 2G}\n", "gpu_memory: only a gpu step can ask for GPU memory"),
    ):
        with pytest.raises(TicketInvalid) as exc:
            parse_ticket(ticket_yaml("TICKET-1", steps).encode(), "TICKET-1.yaml")
        assert message in str(exc.value.errors[0]) and ":5:" in str(exc.value.errors[0])


def test_status_line_says_paused_and_how_many_wait(home: Path) -> None:
    from types import SimpleNamespace

    from daemon.notify import Notifier
    from daemon.service import Daemon
    from schema.settings import load_settings

    settings = load_settings().model_copy(update={"redis_url": "unix:///nonexistent.sock"})
    daemon = Daemon(settings, [], notifier=Notifier({}), install_signals=False)
    s = State()
    apply(s, submit(make_ticket("TICKET-1", steps=ONE, extra="hold: true\n"), T0))
    apply(s, submit(make_ticket("TICKET-2", steps=ONE, extra="after: [TICKET-1]\n"), T0))
    daemon.handler = SimpleNamespace(state=s)  # type: ignore[assignment]
    assert "; 2 waiting (1 tickets held)" in daemon._status_text()
    apply(s, c.PauseInstallation(now=T0, reason="driver update"))
    assert daemon._status_text().startswith("PAUSED (driver update; jbctl resume); tickets: 2 running;")


def test_daemon_records_the_queue_settings_once_and_again_when_they_change(store: Any) -> None:
    from daemon.handler import CommandHandler
    from daemon.notify import Notifier
    from daemon.service import Daemon
    from schema.settings import load_settings

    settings = load_settings().model_copy(update={"queue_limits": {"gpu": 1}, "queue_gpu_memory": {"gpu": "24G"}})
    daemon = Daemon(settings, [], notifier=Notifier({}), install_signals=False)
    daemon.handler = CommandHandler(store)
    daemon._record_queue_limits()
    daemon._record_queue_limits()  # unchanged: nothing more
    daemon.settings = settings.model_copy(update={"queue_limits": {}})
    daemon._record_queue_limits()
    recorded = [r.data for r in store.read(0, types=["QueueLimitsSet"])]
    assert recorded[0]["limits"] == {"gpu": 1} and recorded[0]["gpu_memory"] == {"gpu": 24 * G}
    assert [r["limits"] for r in recorded] == [{"gpu": 1}, {}]


def test_queue_gpu_memory_setting_is_validated() -> None:
    from schema.settings import load_settings

    with pytest.raises(ValueError, match=r"queue_gpu_memory\.gpu: invalid memory size 'big'"):
        load_settings(queue_gpu_memory={"gpu": "big"})


def test_release_before_the_stopped_attempt_reports_still_counts_it_as_stopped() -> None:
    s = State()
    apply(s, submit(make_ticket(steps=ONE), T0))
    apply(s, c.HoldTicket(now=T0, ticket="TICKET-1", stop=True))
    assert apply(s, c.ReleaseTicket(now=T0, ticket="TICKET-1")) == [ev.TicketReleased(at=T0, ticket="TICKET-1")]
    failed = c.RecordJobFailed(now=T0, ticket="TICKET-1", task="a", attempt=1, error="cancelled", retryable=False)
    events = apply(s, failed)
    assert types(events) == ["AttemptStopped", "AttemptScheduled"]  # released already: runs again at once
    assert s.tickets["TICKET-1"].status == "running"


def test_a_hold_rewords_a_task_that_waited_for_a_full_queue() -> None:
    s = State()
    _busy_gpu(s)
    apply(s, submit(make_ticket("TICKET-1", steps=GPU), T0))
    events = apply(s, c.HoldTicket(now=T0, ticket="TICKET-1", reason="review"))
    assert events[-1].rule == "held" and events[-1].reason.startswith("held (review)")


def test_a_fanned_out_steps_subtasks_obey_max_parallel() -> None:
    """Subtasks (`shards:`) go through the same rules: a fan-out of 4 with max_parallel: 2 has two
    jobs out at a time, the rest waiting with the reason; the join still runs once all succeeded."""
    s = State()
    ticket = make_ticket(
        steps="  - {id: data, kind: synthesize, shards: 4, with: {generator: shapes, count: 400, shard_size: 100}}\n",
        extra="max_parallel: 2\n",
    )
    events = apply(s, submit(ticket, T0))
    assert scheduled(events) == [("TICKET-1", "data-S0"), ("TICKET-1", "data-S1")]
    assert [e.task for e in events if isinstance(e, ev.TaskDeferred)] == ["data-S2", "data-S3"]
    shard = {"id": "0" * 64, "size": 10, "count": 100, "format": "npz"}
    for k in range(4):
        out = {"shards": [{**shard, "index": k}]}
        events = apply(s, c.RecordJobSucceeded(now=T0, ticket="TICKET-1", task=f"data-S{k}", attempt=1, outputs=out))
        if k < 2:
            assert scheduled(events) == [("TICKET-1", f"data-S{k + 2}")]
    assert scheduled(events) == [("TICKET-1", "data")]  # the join
