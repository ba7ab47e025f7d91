"""Ended tickets leave the hot state (`ColdTicket`) and come back whole when a command needs them:
every decision is the one a state that never forgot anything makes, and a replay gives that state."""

from __future__ import annotations

from datetime import timedelta

from daemon import commands as c
from daemon.decider import decide
from daemon.handler import CommandHandler, load_state
from daemon.state import ColdTicket, State, evolve
from schema import events as ev
from schema.store import EventStore
from tests.helpers import make_ticket, submit
from tests.test_store import T0


def _steps(n: int) -> str:
    return f"  - {{id: a, kind: diag, cache: true, with: {{n: {n}}}}}\n  - {{id: b, kind: diag, needs: [a]}}\n"


def _whole(store: EventStore) -> State:
    """The log folded by `evolve` alone: nothing frozen."""
    state = State()
    for seq, event in store.read_events():
        evolve(state, event)
        state.last_seq = seq
    return state


def _scenario() -> list[c.Command]:
    t = [T0 + timedelta(seconds=i) for i in range(40)]
    return [
        submit(make_ticket("TICKET-1", steps=_steps(1)), t[0]),
        submit(make_ticket("TICKET-2", steps=_steps(2)), t[1]),
        submit(make_ticket("TICKET-3", steps=_steps(3)), t[2]),
        submit(make_ticket("TICKET-4", steps=_steps(4), extra="after: [TICKET-1]\n"), t[3]),
        c.RecordJobSucceeded(now=t[4], ticket="TICKET-1", task="a", attempt=1, metrics={"loss": 0.5}),
        c.RecordJobSucceeded(now=t[5], ticket="TICKET-1", task="b", attempt=1),  # TICKET-1 completed
        c.RecordJobFailed(now=t[6], ticket="TICKET-2", task="a", attempt=1, error="boom", retryable=False),
        c.CancelTicket(now=t[7], ticket="TICKET-3", reason="not needed"),
        # Commands about ended tickets that need no more than their cold record.
        c.RecordJobSucceeded(now=t[8], ticket="TICKET-1", task="b", attempt=1),  # a late duplicate
        c.CancelTicket(now=t[9], ticket="TICKET-2"),
        c.TicketFileRemoved(now=t[10], path="/t/TICKET-3.yaml"),
        submit(make_ticket("TICKET-6", steps=_steps(6), extra="after: [TICKET-3]\n"), t[11]),
        # The step cache keeps an ended ticket's successes: TICKET-5's step `a` is TICKET-1's.
        submit(make_ticket("TICKET-5", steps=_steps(1)), t[12]),
        # Commands that need an ended ticket whole: a rerun, and a revision of its file.
        c.RetryFrom(now=t[13], ticket="TICKET-2", task="a", actor="bob"),
        submit(make_ticket("TICKET-1", steps=_steps(1), extra="priority: 3\n"), t[14]),
        c.RecordJobSucceeded(now=t[15], ticket="TICKET-2", task="a", attempt=2),
        c.RecordJobSucceeded(now=t[16], ticket="TICKET-2", task="b", attempt=1),
        c.Tick(now=t[17]),
        c.RetryFrom(now=t[18], ticket="TICKET-2", task="b"),
    ]


def test_decisions_with_cold_tickets_are_those_of_a_state_that_keeps_everything(store: EventStore) -> None:
    handler = CommandHandler(store)
    whole = State()
    for command in _scenario():
        expected = decide(whole, command)
        recorded = handler.handle(command)
        assert [r.event for r in recorded] == expected, type(command).__name__
        for r in recorded:
            evolve(whole, r.event)
            whole.last_seq = r.seq
        for tid, ticket in handler.state.tickets.items():  # what is hot is whole and current
            assert ticket == whole.tickets[tid]
    handler.freeze_ended()
    assert set(handler.state.cold) == {t for t, k in whole.tickets.items() if k.status != "running"}
    assert set(handler.state.tickets) == set(whole.running)
    assert handler.state.cold["TICKET-3"] == ColdTicket(
        "TICKET-3", "cancelled", "not needed", "/t/TICKET-3.yaml", whole.tickets["TICKET-3"].content_hash,
        1, 2,
    )  # fmt: skip
    assert _events_of(store, ev.AttemptReused) == [("TICKET-5", "a", "TICKET-1"), ("TICKET-1", "a", "TICKET-1")]
    # A cold ticket read whole again is the ticket it was.
    for tid in list(handler.state.cold):
        assert handler.ticket(tid) == whole.tickets[tid]


def test_a_replay_freezes_what_ended_and_thaws_what_ran_again(store: EventStore) -> None:
    handler = CommandHandler(store)
    for command in _scenario():
        handler.handle(command)
    handler.freeze_ended()
    # Freezing after every ended ticket makes the replay thaw TICKET-1 and TICKET-2 from their streams.
    eager = load_state(store, freeze_batch=1)
    assert eager == load_state(store) == handler.state
    whole = _whole(store)
    assert eager.cold.keys() == {t for t, k in whole.tickets.items() if k.status != "running"}
    assert {tid: eager.tickets[tid] for tid in eager.tickets} == {tid: whole.tickets[tid] for tid in whole.running}
    assert eager.versions == whole.versions and eager.cache == whole.cache


def test_a_ticket_unknown_is_neither_hot_nor_cold(store: EventStore) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1", steps=_steps(1)), T0))
    assert handler.ticket("TICKET-9") is None and not handler.known("TICKET-9")
    assert handler.known("TICKET-1") and handler.ticket("TICKET-1") is not None


def _events_of(store: EventStore, kind: type[ev.AttemptReused]) -> list[tuple[str, str, str]]:
    return [(e.ticket, e.task, e.source_ticket) for _seq, e in store.read_events() if isinstance(e, kind)]
