"""A snapshot of the decider's state at a known log position, so that start-up replays only the tail.

The daemon writes it when it stops cleanly and reads it when it starts. It is used only when all of
these hold, and otherwise the state is rebuilt from the log as before (the log stays the truth):

- its HMAC, under the installation's secret key, matches: the body is a pickle, and a pickle from
  anyone but this daemon is never opened;
- it was written by this code: a fingerprint of the modules that define the state and how events
  change it (a release that changes `evolve` makes old snapshots stale);
- the log still holds, at the snapshot's seq, the event with the hash it recorded (its place in the
  hash chain): a database restored from a backup or replaced makes it stale.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
from pathlib import Path

import sqlalchemy as sa

from daemon.state import State
from schema.store import EventStore

log = logging.getLogger("jetbox.daemon")

MAGIC = b"jetbox-state-snapshot-1\n"
MAC_BYTES = 32
# The modules whose code decides what a state is and how an event changes it.
FINGERPRINTED = ("daemon/state.py", "schema/events.py", "schema/ticket.py", "schema/plan.py", "schema/policy.py")


def fingerprint() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in FINGERPRINTED:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()


def _hash_at(store: EventStore, seq: int) -> str | None:
    with store.engine.connect() as conn:
        found = conn.execute(sa.text("SELECT hash FROM events WHERE seq = :s"), {"s": seq}).scalar()
    return None if found is None else str(found)


def save(path: Path, state: State, store: EventStore, key: bytes) -> bool:
    """Write `state` (the fold of the log up to `state.last_seq`) atomically, readable by its owner
    only; False when there is nothing to anchor it to."""
    from schema.artifacts import atomic_write_bytes

    anchor = _hash_at(store, state.last_seq) if state.last_seq else None
    if anchor is None:
        return False
    body = pickle.dumps((fingerprint(), state.last_seq, anchor, state), protocol=pickle.HIGHEST_PROTOCOL)
    mac = hmac.new(key, body, hashlib.sha256).digest()
    atomic_write_bytes(path, MAGIC + mac + body)
    os.chmod(path, 0o600)
    return True


def load(path: Path, store: EventStore, key: bytes) -> tuple[State | None, str]:
    """(the snapshot's state, why) when it can be trusted and is not stale; (None, why not) otherwise."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None, "no snapshot"
    except OSError as exc:
        return None, f"snapshot unreadable: {exc}"
    head, mac, body = blob[: len(MAGIC)], blob[len(MAGIC) : len(MAGIC) + MAC_BYTES], blob[len(MAGIC) + MAC_BYTES :]
    if head != MAGIC:
        return None, "not a snapshot of this format"
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None, "snapshot signature does not match this installation's key (ignored, never opened)"
    made_by, seq, anchor, state = pickle.loads(body)  # authenticated above: only our own bytes
    if made_by != fingerprint():
        return None, "snapshot written by another version of the code"
    if not isinstance(state, State) or state.last_seq != seq:
        return None, "snapshot malformed"
    found = _hash_at(store, seq)
    if found != anchor:
        where = "beyond the end of the log" if found is None else "on another log (hash differs)"
        return None, f"snapshot at seq {seq} is {where}"
    return state, f"snapshot at seq {seq}"
