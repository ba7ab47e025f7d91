"""Runs commands: replay the log into state, decide, append with optimistic concurrency, evolve.

Every writer (the daemon, `jbctl approve`, `jbctl cancel`) goes through a `CommandHandler`; a
version conflict means another writer got there first, so the handler catches up and decides again.
"""

from __future__ import annotations

import gc
import os
import pwd
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import replay
from daemon.commands import Command, RecordHomeOwner
from daemon.decider import decide_on
from daemon.state import ColdTicketNeeded, State, TicketState, evolve, freeze, thaw
from schema import events as ev
from schema.store import ConcurrencyError, EventStore, Recorded

MAX_CONFLICT_RETRIES = 50
TAIL = 4096  # recent events kept in memory for the reactors (`CommandHandler.tail`)


def local_actor() -> dict[str, Any]:
    """Who is acting: OS user name, uid and host (recorded in event metadata). The name comes from
    the process's uid, not from $USER or $LOGNAME (getpass reads those first, and anyone can set
    them: `USER=alice jbctl approve` must not act as alice)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):  # no passwd entry in some containers
        user = str(os.getuid())
    return {"user": user, "uid": os.getuid(), "host": socket.gethostname()}


def ensure_home_owner(handler: CommandHandler, home: Path) -> None:
    """Record who owns the Jetbox home, once (the default approver). The home folder's owner, or
    the user running this when the home does not exist (a database-only setup)."""
    if handler.state.home_owner is not None:
        return
    try:
        uid = os.stat(home).st_uid
    except OSError:
        uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = str(uid)
    command = RecordHomeOwner(now=datetime.now(UTC), user=user, uid=uid, home=str(home))
    handler.handle(command, meta={"actor": local_actor()})


# Ended tickets are frozen (`daemon.state.freeze`) in batches, not at their last event: the events
# a command records after a ticket ends (a proposal withdrawn, say) then find it still hot.
FREEZE_BATCH = 1000
_ENDS = (ev.TicketCompleted, ev.TicketFailed, ev.TicketCancelled)
_ENDS_TYPES = frozenset(_ENDS)


def load_state(
    store: EventStore,
    state: State | None = None,
    before: int | None = None,
    freeze_batch: int = FREEZE_BATCH,
    sink: Callable[[tuple[int, ev.Event]], None] | None = None,
    *,
    full: bool = False,
) -> State:
    """Fold every event after `state.last_seq` (and before seq `before`, when given) into `state`
    (a fresh one by default), telling `sink` about each. Tickets that end on the way are frozen,
    `freeze_batch` at a time: replaying a year of history holds what is live, not every ticket ever run.

    Without a `sink`, the progress reports that a later report of the same task supersedes are only
    counted, not decoded or folded (`daemon.replay`: the same state in about 0.6 of the CPU time:
    the daemon's start-up); `full` folds every event, each decoded whole (`jbctl replay --check`
    compares the two)."""
    state = state or State()
    until = before - 1 if before is not None else None
    source: Any  # what to close at the end (a generator of the store's)
    events: Iterator[tuple[int, ev.Event | replay.Superseded]]
    if sink is None and not full:
        source = store.read_rows(state.last_seq, until=until)
        events = replay.items(source)
    else:
        source = events = store.read_events(state.last_seq, until=until)
    ended: set[str] = set()
    cold, versions = state.cold, state.versions
    last = state.last_seq  # set on the state once, at the end (a million attribute writes saved)
    # No cyclic garbage collection while folding (on again after): what the fold drops is freed by
    # reference counting, and the collector's passes over the growing state were a fifth of a
    # 1M-event replay (bench/replay.py).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for seq, event in events:
            if isinstance(event, list):  # progress reports that the next one of their task supersedes
                tid, count = event[0], event[2]
                if tid in cold:  # a frozen ticket's: the first is folded whole, to thaw it where the full fold does
                    versions[tid] = versions.get(tid, 0) + count - 1
                    event = replay.decode_first(event)
                else:
                    versions[tid] = versions.get(tid, 0) + count  # all that is left of them (`evolve`)
                    last = seq
                    continue
            try:
                evolve(state, event)
            except ColdTicketNeeded as cold_ticket:  # a frozen ticket run again (a retry, a revision)
                state.last_seq = last
                thaw_ticket(store, state, cold_ticket.ticket)
                evolve(state, event)
            last = seq
            if sink is not None:
                sink((seq, event))
            if type(event) in _ENDS_TYPES:
                ended.add(event.ticket)  # type: ignore[attr-defined]
                if len(ended) >= freeze_batch:
                    freeze_all(state, ended)
    finally:
        if collecting:
            gc.enable()
        state.last_seq = last
        source.close()
    freeze_all(state, ended)
    return state


def freeze_all(state: State, ids: set[str]) -> None:
    """Freeze those of `ids` that are over (the rest stay hot), and forget them all."""
    for tid in ids:
        freeze(state, tid)
    ids.clear()


def thaw_ticket(store: EventStore, state: State, tid: str) -> TicketState:
    """Bring cold ticket `tid` back into `state`: its own stream, up to `state.last_seq`, folded
    into an empty state (a ticket's state is a fold of its own stream alone)."""
    alone = State()
    events = store.read_events(0, stream=tid, until=state.last_seq)
    try:
        for _seq, event in events:
            evolve(alone, event)
    finally:
        events.close()  # type: ignore[attr-defined]
    ticket = alone.tickets.get(tid)
    if ticket is None:
        raise RuntimeError(f"ticket {tid} is cold but its stream holds no TicketSubmitted")
    thaw(state, ticket)
    return ticket


class CommandHandler:
    """Decide-and-append for one process; keeps its in-memory state in step with the log."""

    def __init__(
        self,
        store: EventStore,
        state: State | None = None,
        before_append: Callable[[Sequence[ev.Event]], None] | None = None,
    ) -> None:
        self.store = store
        self.state = load_state(store, state)
        # Effects that must be done before the events that announce them are recorded (the daemon
        # writes joined manifests: daemon/manifests.py). Idempotent: a conflict decides again.
        self.before_append = before_append
        # Tickets that ended since the last command: frozen before the next one, so that right after
        # a command its tickets can still be read whole. Tickets thawed to be read or acted on wait
        # one command more (the command they were thawed for comes next).
        self.ended: set[str] = set()
        self.thawed: set[str] = set()
        # The events folded into `state` since it was loaded, in log order and without gaps, up to
        # `state.last_seq`: reactors in this process (the dispatcher) take new events from here
        # instead of reading and decoding them again from the database.
        self.tail: deque[tuple[int, ev.Event]] = deque(maxlen=TAIL)
        # The seqs in the tail that other writers recorded (folded in by `refresh` or before a commit):
        # what this process recorded itself it knows it never acted on before (`recorded_here`).
        self.foreign: set[int] = set()

    def _fold_foreign(self, item: tuple[int, ev.Event]) -> None:
        self.tail.append(item)
        self.foreign.add(item[0])
        if len(self.foreign) > TAIL:  # forget those the tail no longer holds
            self.foreign = {seq for seq in self.foreign if seq >= self.tail[0][0]}

    def recorded_here(self, after: int) -> bool:
        """Whether every event in the tail after seq `after` was recorded by this handler (none was
        folded in from another writer: another process, perhaps another daemon, may have acted on those).
        Forgets the other writers' seqs up to `after`: the caller (the dispatcher) moves only forward."""
        if self.foreign:
            self.foreign = {seq for seq in self.foreign if seq > after}
        return not self.foreign

    def refresh(self) -> None:
        """Catch up with events other writers appended."""
        load_state(self.store, self.state, sink=self._fold_foreign)

    def tail_after(self, seq: int) -> list[ev.Event] | None:
        """The events after `seq` up to `state.last_seq`, from memory; None when the tail does not
        reach back that far (the caller reads the log)."""
        tail = self.tail
        if seq >= self.state.last_seq:
            return []
        if not tail or tail[0][0] > seq + 1 or tail[-1][0] != self.state.last_seq:
            return None
        out: list[ev.Event] = []
        for at, event in reversed(tail):
            if at <= seq:
                break
            out.append(event)
        out.reverse()
        return out

    def freeze_ended(self) -> None:
        """Move the tickets that ended since the last command out of the hot state."""
        freeze_all(self.state, self.ended)

    def known(self, tid: str) -> bool:
        """Whether ticket `tid` was ever submitted (hot or cold)."""
        return tid in self.state.tickets or tid in self.state.cold

    def ticket(self, tid: str) -> TicketState | None:
        """Ticket `tid` whole (loaded from the log when it is cold), or None when there is none."""
        if tid in self.state.cold:
            self.thawed.add(tid)
            return thaw_ticket(self.store, self.state, tid)
        return self.state.tickets.get(tid)

    def handle(self, command: Command, meta: Mapping[str, Any] | None = None) -> list[Recorded]:
        """Decide on `command` and record the events (none is a valid answer)."""
        return self.handle_many([command], meta)

    def handle_many(self, commands: Sequence[Command], meta: Mapping[str, Any] | None = None) -> list[Recorded]:
        """Decide on several commands and record them in one transaction (group commit)."""
        self.freeze_ended()
        for attempt in range(MAX_CONFLICT_RETRIES):
            while True:
                try:
                    batches = self._decide(commands, meta)
                    break
                except ColdTicketNeeded as cold:  # a command about an ended ticket: load it, decide again
                    self.ticket(cold.ticket)
            if not batches:
                self.ended |= self.thawed
                self.thawed.clear()
                return []
            if self.before_append is not None:
                self.before_append([e for events, _, _ in batches for e in events])
            try:
                recorded = self.store.append_batches(batches)
            except ConcurrencyError:
                # Another writer got there first: back off a little (random, so writers spread out).
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                self.refresh()
                continue
            if recorded[0].seq > self.state.last_seq + 1:
                # Other writers appended since this state last read the log (on other streams, or
                # the append would have conflicted): fold theirs first, in log order. Skipping
                # them left this state blind to them for good (a later refresh starts after ours).
                load_state(self.store, self.state, before=recorded[0].seq, sink=self._fold_foreign)
            for rec in recorded:
                event = rec.event  # decoded from what was stored (a property: decode once)
                evolve(self.state, event)
                self.state.last_seq = rec.seq
                self.tail.append((rec.seq, event))
                if isinstance(event, _ENDS):
                    self.ended.add(event.ticket)
            self.ended |= self.thawed
            self.thawed.clear()
            return recorded
        raise ConcurrencyError(f"gave up after {MAX_CONFLICT_RETRIES} version conflicts")

    def _decide(
        self, commands: Sequence[Command], meta: Mapping[str, Any] | None
    ) -> list[tuple[list[ev.Event], dict[str, int], Mapping[str, Any] | None]]:
        """Each command's events and the stream versions they expect, decided in turn on one scratch
        state. Raises `ColdTicketNeeded` when a command needs an ended ticket whole."""
        scratch = self.state.scratch([])
        own: set[str] = set()  # the tickets the scratch holds copies of
        batches: list[tuple[list[ev.Event], dict[str, int], Mapping[str, Any] | None]] = []
        for command in commands:
            # The rules apply their events to the scratch as they emit them: later commands see this
            # one's effect.
            events = decide_on(scratch, own, command)
            if not events:
                continue
            # The versions the streams had before these events (each event moved its stream's by one).
            streams = [ev.stream_of(e) for e in events]
            expected = {st: scratch.versions.get(st, 0) - streams.count(st) for st in streams}
            # Decisions read the core (proposal bases, `_core` in jobs): if another writer
            # promoted meanwhile, the append conflicts and we decide again on fresh state.
            expected.setdefault(ev.CORE_STREAM, scratch.versions.get(ev.CORE_STREAM, 0))
            batches.append((events, expected, _meta(command, meta)))
        return batches


def _meta(command: Command, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Who and why: the command (its id is the events' causation id) and the ticket they correlate to."""
    meta: dict[str, Any] = {"command": type(command).__name__, "causation_id": uuid.uuid4().hex}
    correlation = getattr(command, "ticket", None) or getattr(command, "proposal", None)
    if isinstance(correlation, str):
        meta["correlation_id"] = correlation
    if command.actor:
        meta["actor"] = command.actor
    meta.update(extra or {})
    return meta
