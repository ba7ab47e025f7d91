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


def test_a_signed_but_unreadable_snapshot_falls_back_to_the_one_before(store: EventStore, tmp_path: Path) -> None:
    import hashlib
    import hmac

    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1"), T0))
    path = tmp_path / "state.snapshot"
    assert snapshot.save(path, handler.state, store, KEY)
    first = handler.state.last_seq
    handler.handle(submit(make_ticket("TICKET-2"), T0))
    assert snapshot.save(path, handler.state, store, KEY)  # the first one is kept as .prev
    assert snapshot.previous(path).exists()
    state, why = snapshot.load(path, store, KEY)
    assert state is not None and state.last_seq == handler.state.last_seq and why == f"snapshot at seq {state.last_seq}"
    # Signed with our key, yet not a pickle of ours (a bug, or a class that changed shape).
    body = b"not a pickle"
    path.write_bytes(snapshot.MAGIC + hmac.new(KEY, body, hashlib.sha256).digest() + body)
    state, why = snapshot.load(path, store, KEY)
    assert state is not None and state.last_seq == first
    assert why.startswith(f"snapshot at seq {first} (the newer one: snapshot unreadable (UnpicklingError")
    snapshot.previous(path).write_bytes(b"garbage")
    state, why = snapshot.load(path, store, KEY)
    assert state is None
    assert why.startswith("snapshot unreadable") and why.endswith("state.snapshot.prev: not a snapshot of this format")


def test_a_snapshot_written_by_a_forked_child_is_the_state_when_it_forked(store: EventStore, tmp_path: Path) -> None:
    handler = CommandHandler(store)
    for i in (1, 2, 3):
        handler.handle(submit(make_ticket(f"TICKET-{i}"), T0))
    handler.handle(c.CancelTicket(now=T0, ticket="TICKET-2"))
    handler.freeze_ended()
    assert "TICKET-2" in handler.state.cold
    path = tmp_path / "state.snapshot"
    at = handler.state.last_seq
    pid = snapshot.save_in_background(path, handler.state, store, KEY)
    assert pid is not None
    handler.handle(c.CancelTicket(now=T0, ticket="TICKET-3"))  # the parent goes on meanwhile
    assert snapshot.reaped(pid, block=True) is True
    state, _why = snapshot.load(path, store, KEY)
    assert state is not None and state.last_seq == at and "TICKET-3" in state.tickets
    assert CommandHandler(store, state).state == load_state(store)
    # Nothing to anchor a snapshot of an empty log to: no child.
    empty = EventStore(f"sqlite:///{tmp_path / 'empty.db'}")
    from schema.migrations import upgrade

    upgrade(empty.url)
    assert snapshot.save_in_background(tmp_path / "other", load_state(empty), empty, KEY) is None
    empty.close()
