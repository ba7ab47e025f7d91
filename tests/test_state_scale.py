"""Costs that follow live work, not history: scratch states read through to the state they copy,
and the clock walks only the running tickets."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon import commands as c
from daemon.decider import decide
from daemon.state import Overlay, State, evolve
from tests.helpers import make_ticket, submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class NoWalk(Mapping[str, Any]):
    """A mapping that fails when anything walks or copies it whole (lookups are fine)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("walked the whole history")

    def keys(self) -> Any:
        raise AssertionError("copied the whole history")

    def __len__(self) -> int:
        return len(self.data)


def test_overlay_behaves_like_a_copied_dict() -> None:
    rng = random.Random(22)
    base = {f"k{i}": i for i in range(30)}
    frozen = dict(base)
    over, twin = Overlay(base), dict(base)
    for _ in range(2000):
        key, op = f"k{rng.randrange(40)}", rng.randrange(5)
        if op == 0:
            over[key] = twin[key] = rng.random()
        elif op == 1:
            assert over.pop(key, None) == twin.pop(key, None)
        elif op == 2:
            assert (key in over) == (key in twin) and over.get(key) == twin.get(key)
        elif op == 3:
            with pytest.raises(KeyError) if key not in twin else _nothing():
                assert over[key] == twin[key]
        else:
            assert len(over) == len(twin) and list(over) == list(twin) and over == twin
    assert base == frozen  # the base never changes


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_command_does_not_copy_every_ticket_file_and_stream() -> None:
    state = State()
    for i in range(1, 4):
        for e in decide(state, submit(make_ticket(f"TICKET-{i}"), T0)):
            evolve(state, e)
    # A state as big as a year of history would be: nothing may walk or copy it whole per command.
    state.tickets = NoWalk(state.tickets)  # type: ignore[assignment]
    state.versions = NoWalk(state.versions)  # type: ignore[assignment]
    state.files = NoWalk(state.files)  # type: ignore[assignment]
    state.file_tickets = NoWalk(state.file_tickets)  # type: ignore[assignment]
    state.cache = NoWalk(state.cache)  # type: ignore[assignment]
    state.inflight = NoWalk(state.inflight)  # type: ignore[assignment]
    events = decide(state, c.RecordJobSucceeded(now=T0, ticket="TICKET-2", task="a", attempt=1))
    assert [e.type for e in events] == ["AttemptSucceeded", "AttemptScheduled"]
    assert decide(state, c.Tick(now=T0 + timedelta(minutes=1))) == []  # walks the running tickets only
    scratch = state.scratch(["TICKET-2"])
    for e in events:
        evolve(scratch, e)
    assert scratch.tickets["TICKET-2"].tasks["a"].status == "succeeded"
    assert state.tickets["TICKET-2"].tasks["a"].status == "scheduled"


def test_running_index_follows_ends_and_revisions() -> None:
    state = State()
    for i in (1, 2, 3):
        for e in decide(state, submit(make_ticket(f"TICKET-{i}"), T0)):
            evolve(state, e)
    for cmd in (
        c.CancelTicket(now=T0, ticket="TICKET-1"),
        c.RecordJobSucceeded(now=T0, ticket="TICKET-3", task="a", attempt=1),
        c.RecordJobSucceeded(now=T0, ticket="TICKET-3", task="b", attempt=1),
    ):
        for e in decide(state, cmd):
            evolve(state, e)
    assert list(state.running) == ["TICKET-2"]
    revised = make_ticket("TICKET-1").model_copy(update={"title": "again"})
    for e in decide(state, submit(revised, T0 + timedelta(hours=1))):
        evolve(state, e)
    assert list(state.running) == ["TICKET-2", "TICKET-1"]


class NoScan(dict[Any, Any]):
    """A table of rows that fails when a lookup walks it whole."""

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("scanned every task")


def test_rebuild_finds_a_tickets_tasks_without_scanning_all() -> None:
    """`jbctl replay` rebuilds the projections in memory: each cancel, failure or revision looked for
    its ticket's tasks by walking every task, quadratic over a long history."""
    from schema.projections import MemoryRows, project

    state, rows, seq = State(), MemoryRows(), 0
    rows.data["tasks"] = NoScan()
    for cmd in (
        submit(make_ticket("TICKET-1"), T0),
        submit(make_ticket("TICKET-2"), T0),
        c.CancelTicket(now=T0, ticket="TICKET-1"),
        submit(make_ticket("TICKET-2").model_copy(update={"title": "revised"}), T0),
    ):
        for e in decide(state, cmd):
            evolve(state, e)
            seq += 1
            project(rows, seq, e)
    assert rows.get("tasks", ("TICKET-1", "a"))["state"] == "cancelled"  # type: ignore[index]
    assert rows.get("tasks", ("TICKET-2", "a"))["state"] == "scheduled"  # type: ignore[index]
