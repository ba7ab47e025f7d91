"""The decider's state snapshot: start-up folds only the log's tail onto it, and a snapshot that
is forged, from other code or from another log is never used."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import commands as c
from daemon import snapshot
from daemon.handler import CommandHandler, load_state
from schema.store import EventStore
from tests.helpers import make_ticket, submit
from tests.test_store import T0

KEY = b"k" * 32


def test_snapshot_plus_tail_is_the_full_replay(store: EventStore, tmp_path: Path) -> None:
    handler = CommandHandler(store)
    for i in (1, 2):
        handler.handle(submit(make_ticket(f"TICKET-{i}"), T0))
    handler.handle(c.RecordJobSucceeded(now=T0, ticket="TICKET-1", task="a", attempt=1))
    path = tmp_path / "state.snapshot"
    assert snapshot.save(path, handler.state, store, KEY)
    assert path.stat().st_mode & 0o077 == 0  # the owner's only
    at = handler.state.last_seq
    # The log moves on after the snapshot: the tail is folded in at start-up.
    handler.handle(c.RecordJobSucceeded(now=T0, ticket="TICKET-1", task="b", attempt=1))
    handler.handle(c.CancelTicket(now=T0, ticket="TICKET-2"))
    state, why = snapshot.load(path, store, KEY)
    assert state is not None and state.last_seq == at and why == f"snapshot at seq {at}"
    assert CommandHandler(store, state).state == load_state(store)


def test_a_forged_foreign_or_stale_snapshot_is_not_used(
    store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1"), T0))
    path = tmp_path / "state.snapshot"
    snapshot.save(path, handler.state, store, KEY)
    assert snapshot.load(path, store, b"x" * 32)[0] is None  # another installation's key
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1  # one bit of the pickle changed: never unpickled
    forged = tmp_path / "forged"
    forged.write_bytes(bytes(blob))
    state, why = snapshot.load(forged, store, KEY)
    assert state is None and "signature" in why
    assert snapshot.load(tmp_path / "none", store, KEY) == (None, "no snapshot")
    # A database restored or replaced: the snapshot's seq holds another event, or none at all.
    other = EventStore(f"sqlite:///{tmp_path / 'other.db'}")
    from schema.migrations import upgrade

    upgrade(other.url)
    state, why = snapshot.load(path, other, KEY)
    assert state is None and "beyond the end of the log" in why
    CommandHandler(other).handle(submit(make_ticket("TICKET-9"), T0))
    state, why = snapshot.load(path, other, KEY)
    assert state is None and "hash differs" in why
    other.close()
    # Code that changes what a state is: the snapshot is stale.
    monkeypatch.setattr(snapshot, "fingerprint", lambda: "another release")
    assert snapshot.load(path, store, KEY) == (None, "snapshot written by another version of the code")
