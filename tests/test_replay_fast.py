"""The start-up replay skips the progress reports that a later one supersedes (daemon/replay.py): the
state it gives must be the full fold's, exactly (same tickets hot and frozen, in the same order), after
every event of realistic and hostile logs, whatever the batch boundaries and freezing."""

from __future__ import annotations

import random
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import replay
from daemon.handler import load_state
from daemon.state import State
from schema import events as ev
from schema import store as store_module
from schema.migrations import upgrade
from schema.store import EventStore, StoreError
from tests.helpers import make_ticket, property_examples
from tests.test_postgres import pg_url as pg_url  # the fixture: a database of its own
from tests.test_store import T0

STEPS = {
    0: "  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a]}\n",
    1: "  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a]}\n  - {id: c, kind: diag}\n",
}


def same(fast: State, full: State) -> None:
    """Equal, strictly: `State.__eq__` forgives a ticket held whole where the other froze it."""
    assert replay.differences(fast, full) == []
    assert fast == full and list(fast.tickets) == list(full.tickets) and list(fast.cold) == list(full.cold)


def both(store: EventStore, before: int | None = None, freeze_batch: int = 1000) -> tuple[State, State]:
    fast = load_state(store, before=before, freeze_batch=freeze_batch)
    full = load_state(store, before=before, freeze_batch=freeze_batch, full=True)
    return fast, full


def skipped(store: EventStore) -> int:
    """Reports the start-up replay does not decode."""
    return sum(item[2] for _, item in replay.items(store.read_rows(0)) if isinstance(item, list))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty store, copied for each log (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("replay") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def fresh_store(template: Path) -> Iterator[EventStore]:
    folder = Path(tempfile.mkdtemp(prefix="jetbox-replay-test-"))
    shutil.copyfile(template, folder / "log.db")
    store = EventStore(f"sqlite:///{folder / 'log.db'}")
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(folder)


# --- hostile logs: what evolve accepts, in orders the decider would never record ------------------------


class Log:
    """Events for `evolve` built from drawn operations; operations that evolve would refuse (a task
    the ticket does not have) are left out."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self.tasks: dict[str, set[str]] = {}  # ticket -> its current run's task ids
        self.revisions: dict[str, int] = {}
        self.attempts: dict[tuple[str, str], int] = {}

    def at(self) -> Any:
        return T0 + timedelta(seconds=len(self.events))

    def add(self, op: tuple[Any, ...]) -> None:
        kind, n, *rest = op
        tid = f"TICKET-{n}"
        if kind == "submit":
            ticket = make_ticket(tid, STEPS[rest[0]])
            self.revisions[tid] = self.revisions.get(tid, 0) + 1
            self.tasks[tid] = {s.id for s in ticket.steps}
            spec = ticket.model_dump(mode="json", by_alias=True)
            self.events.append(
                ev.TicketSubmitted(
                    at=self.at(),
                    ticket=tid,
                    path=f"/t/{tid}.yaml",
                    content_hash=f"{rest[0]}{self.revisions[tid]}",
                    revision=self.revisions[tid],
                    spec=spec,
                )
            )
            return
        if tid not in self.tasks:
            return
        if kind == "complete":
            self.events.append(ev.TicketCompleted(at=self.at(), ticket=tid))
            return
        if kind == "cancel":
            self.events.append(ev.TicketCancelled(at=self.at(), ticket=tid, reason="drawn"))
            return
        if kind == "violation":  # an event of the ticket's stream that is not a report
            self.events.append(ev.SafetyViolation(at=self.at(), what="forged_report", detail="x", ticket=tid))
            return
        task = "abc"[rest[0]]
        if task not in self.tasks[tid]:
            return
        key = (tid, task)
        about = {"at": self.at(), "ticket": tid, "task": task}
        if kind == "schedule":
            self.attempts[key] = self.attempts.get(key, 0) + 1
            self.events.append(
                ev.AttemptScheduled(**about, attempt=self.attempts[key], kind="diag", queue="cpu", params={}, timeout=9)
            )
            return
        attempt = max(1, self.attempts.get(key, 1) - rest[1])  # sometimes an old attempt's report
        report = rest[2]
        if kind == "progress":  # a run of reports, report_seq going up, down or staying at 0
            for i in range(rest[3]):
                step_seq = report + i * rest[4]
                self.events.append(
                    ev.ProgressRecorded(
                        **about,
                        attempt=attempt,
                        step=len(self.events),  # never the same twice: a report folded or not shows
                        total=rest[3],
                        metrics={"loss": 1.0 / (i + 1)},
                        report_seq=max(0, step_seq),
                    )
                )
                about["at"] = self.at()
        elif kind == "checkpoint":
            self.events.append(ev.CheckpointSaved(**about, attempt=attempt, path=f"/c/{len(self.events)}", step=1))
        elif kind == "start":
            self.events.append(ev.AttemptStarted(**about, attempt=attempt, worker="w", report_seq=report))
        elif kind == "succeed":
            self.events.append(ev.AttemptSucceeded(**about, attempt=attempt, report_seq=report))
        elif kind == "fail":
            self.events.append(
                ev.AttemptFailed(**about, attempt=attempt, error="e", fingerprint="f", report_seq=report)
            )


tickets = st.sampled_from([1, 1, 2, 2, 3])  # TICKET-3 is submitted late, or not at all
tasks = st.integers(0, 2)  # c: only in the second spec (a report for it waits for that revision)


def reports(kinds: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.sampled_from(kinds),
        tickets,
        tasks,
        st.integers(0, 1),  # how many attempts back
        st.integers(0, 6),  # report_seq
        st.integers(1, 5),  # reports in a run
        st.integers(-1, 1),  # report_seq's step within a run
    )


progress = reports(["progress"])
operation = st.one_of(
    progress,
    progress,
    progress,
    progress,
    reports(["checkpoint", "start", "succeed", "fail"]),
    st.tuples(st.just("submit"), tickets, st.integers(0, 1)),
    st.tuples(st.sampled_from(["complete", "complete", "cancel", "violation", "schedule"]), tickets, tasks),
    st.tuples(st.just("worker"), st.integers(0, 1)),  # events without a ticket
)


def worker_event(log: Log, n: int) -> ev.Event:
    if n:
        return ev.SafetyViolation(at=log.at(), what="denied_connection", detail="no ticket")
    return ev.WorkerAdvertised(at=log.at(), worker="w", node="n", queues=["cpu"])


@settings(
    max_examples=property_examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(operation, min_size=4, max_size=40),
    batch=st.sampled_from([1, 2, 3, 7, 5000]),
    freeze_batch=st.sampled_from([1, 2, 1000]),
)
def test_the_start_up_replay_is_the_full_fold_after_every_event(
    template: Path, monkeypatch: pytest.MonkeyPatch, ops: list[tuple[Any, ...]], batch: int, freeze_batch: int
) -> None:
    log = Log()
    for op in [("submit", 1, 0), ("submit", 2, 1), ("schedule", 1, 0), *ops]:
        if op[0] == "worker":
            log.events.append(worker_event(log, op[1]))
        else:
            log.add(op)
    monkeypatch.setattr(store_module, "_BATCH", batch)
    for store in fresh_store(template):
        store.append(log.events)
        for before in range(2, len(log.events) + 2):
            same(*both(store, before=before, freeze_batch=freeze_batch))


def long_log(seed: int) -> Log:
    """A longer log than the property above draws (its lists stay short): reports of several tasks
    and attempts interleaved, with everything else in between."""
    rng = random.Random(seed)
    log = Log()
    for first in [("submit", 1, 0), ("submit", 2, 1), ("schedule", 1, 0), ("schedule", 2, 2)]:
        log.add(first)
    while len(log.events) < 150:
        op: tuple[Any, ...]
        roll = rng.random()
        n = rng.choice([1, 1, 2, 2, 3])
        if roll < 0.75:
            kind = "progress" if roll < 0.6 else rng.choice(["checkpoint", "start", "succeed", "fail"])
            op = (kind, n, rng.randrange(3), rng.randrange(2), rng.randrange(7), rng.randint(1, 5), rng.randint(-1, 1))
        elif roll < 0.85:
            op = (rng.choice(["complete", "cancel", "violation", "schedule"]), n, rng.randrange(3))
        elif roll < 0.95:
            op = ("submit", n, rng.randrange(2))
        else:
            log.events.append(worker_event(log, rng.randrange(2)))
            continue
        log.add(op)
    return log


@pytest.mark.parametrize("seed", range(8))
def test_long_hostile_logs(template: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    log = long_log(seed)
    monkeypatch.setattr(store_module, "_BATCH", [3, 16, 5000][seed % 3])
    for store in fresh_store(template):
        store.append(log.events)
        assert skipped(store) > 10
        for before in range(2, len(log.events) + 2):
            same(*both(store, before=before, freeze_batch=1 + seed % 3))


@pytest.mark.postgres
def test_the_same_on_postgresql(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL hands the rows' data over decoded (dicts): the same skips, the same state."""
    upgrade(pg_url)
    store = EventStore(pg_url)
    try:
        log = long_log(1)
        store.append(log.events)
        monkeypatch.setattr(store_module, "_BATCH", 16)
        assert isinstance(next(store.read_rows(0))[0][2], dict)
        assert skipped(store) > 10
        for before in range(2, len(log.events) + 2, 5):
            same(*both(store, before=before, freeze_batch=2))
    finally:
        store.close()


def test_what_the_skip_keeps(template: Path) -> None:
    """The report that the next one supersedes is skipped; one followed by a lower report_seq, by another
    task's report or by any other event of its ticket is folded; a frozen ticket's report is folded
    where the full fold thaws it (the same order of tickets after)."""
    log = Log()
    for op in [
        ("submit", 1, 1),
        ("submit", 2, 0),
        ("schedule", 1, 0),
        ("progress", 1, 0, 0, 5, 3, 1),  # 5, 6, 7: the first two skipped
        ("progress", 1, 0, 0, 4, 1, 1),  # 4 after 7: 7 is folded (the counter keeps the highest)
        ("progress", 1, 1, 0, 0, 2, 0),  # task b, report_seq 0 twice: the first skipped
        ("progress", 1, 0, 0, 9, 2, 1),
        ("violation", 1),
        ("complete", 2),
        ("progress", 2, 0, 0, 1, 3, 1),  # after TICKET-2 ended and froze: thawed at the first report
        ("submit", 3, 0),
        ("progress", 2, 0, 0, 4, 2, 1),
    ]:
        log.add(op)
    for store in fresh_store(template):
        store.append(log.events)
        fast, full = both(store, freeze_batch=1)
        same(fast, full)
        assert list(fast.tickets) == ["TICKET-1", "TICKET-2", "TICKET-3"]  # TICKET-2 thawed before TICKET-3 came
        task = fast.tickets["TICKET-1"].tasks["a"]
        assert task.progress == (10, 2) and task.last_report_seq == 10
        assert fast.tickets["TICKET-1"].tasks["b"].progress == (8, 2)
        assert fast.versions["TICKET-1"] == 1 + 1 + 3 + 1 + 2 + 2 + 1
        plan = [item for _, item in replay.items(store.read_rows(0))]
        kinds = [f"skip {item[2]}" if isinstance(item, list) else type(item).__name__ for item in plan]
        report = "ProgressRecorded"
        assert kinds[3:11] == ["skip 2", report, report, "skip 1", report, "skip 1", report, "SafetyViolation"]
        # TICKET-2's reports after it ended: the first is planned as skipped but folded (its ticket is cold
        # then), the one before TICKET-3's submission is skipped (another ticket's event is no barrier).
        assert kinds[11:] == ["TicketCompleted", "skip 3", "TicketSubmitted", "skip 1", report]
        for before in range(13, 21):
            same(*both(store, before=before, freeze_batch=1))
        assert "TICKET-2" in load_state(store, before=14, freeze_batch=1).cold


def test_a_realistic_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/store.py's log (a training pipeline over and over, 94 % progress reports): the same state
    at batch boundaries that split runs of reports, and most reports never decoded."""
    from bench.store import generate_log

    path = tmp_path / "log.db"
    generate_log(path, 2500)
    store = EventStore(f"sqlite:///{path}")
    try:
        assert skipped(store) > 2000
        same(*both(store))
        monkeypatch.setattr(store_module, "_BATCH", 97)
        for before in (2, 300, 301, 1234, 2499, 2501):
            same(*both(store, before=before, freeze_batch=1))
        # Going on from a state folded part of the way (a snapshot, or a catch-up): the same too.
        resumed = load_state(store, load_state(store, before=1500))
        same(resumed, load_state(store, load_state(store, before=1500), full=True))
    finally:
        store.close()


def test_a_skipped_report_is_still_checked_by_replay_check(template: Path) -> None:
    """A stored report broken outside its ticket, task and report_seq does not stop the daemon's start (it is
    never decoded there), but the full fold and `jbctl replay --check` name it."""
    log = Log()
    for op in [("submit", 1, 0), ("schedule", 1, 0), ("progress", 1, 0, 0, 1, 3, 1)]:
        log.add(op)
    for store in fresh_store(template):
        store.append(log.events)
        path = store.engine.url.database
        assert path is not None
        conn = sqlite3.connect(path)
        with conn:
            # json_set, not a text replace: the stored text's spacing is the writer's (docs/EVENTS.md).
            conn.execute("UPDATE events SET data = json_set(data, '$.step', 'x') WHERE seq = 3")
        conn.close()
        assert load_state(store).tickets["TICKET-1"].tasks["a"].progress == (4, 3)
        with pytest.raises(StoreError, match="seq 3: stored ProgressRecorded event is unreadable"):
            load_state(store, full=True)
        with pytest.raises(StoreError, match="seq 3"):
            store.rebuild_rows()  # what `jbctl replay --check` does first
        # The key a skip depends on, broken: the start-up replay stops there, naming the row.
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE events SET data = json_set(data, '$.task', 7) WHERE seq = 4")
        conn.close()
        with pytest.raises(StoreError, match="seq 4: stored ProgressRecorded event is unreadable"):
            load_state(store)
