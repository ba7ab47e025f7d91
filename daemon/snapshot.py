"""A snapshot of the decider's state at a known log position, so that start-up replays only the tail.

The daemon writes one every `snapshot_every` events (in a forked child: the loop only pays for the
fork) and when it stops cleanly, keeping the one before as `state.snapshot.prev`; at start it uses
the newest of the two that passes every check below. Otherwise the state is rebuilt from the log as
before (the log stays the truth), and the daemon's log says why:

- its HMAC, under the installation's secret key, matches: the body is a pickle, and a pickle from
  anyone but this daemon is never opened;
- it was written by this code: a fingerprint of the modules that define the state and how events
  change it (a release that changes `evolve` makes old snapshots stale);
- the log still holds, at the snapshot's seq, the event with the hash it recorded (its place in the
  hash chain): a database restored from a backup or replaced makes it stale.
"""

from __future__ import annotations

import gc
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


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save(path: Path, state: State, store: EventStore, key: bytes) -> bool:
    """Write `state` (the fold of the log up to `state.last_seq`) atomically, readable by its owner
    only; False when there is nothing to anchor it to."""
    anchor = _hash_at(store, state.last_seq) if state.last_seq else None
    if anchor is None:
        return False
    _write(path, state, anchor, key)
    return True


def _write(path: Path, state: State, anchor: str, key: bytes) -> None:
    from schema.artifacts import atomic_write_bytes

    body = pickle.dumps((fingerprint(), state.last_seq, anchor, state), protocol=pickle.HIGHEST_PROTOCOL)
    mac = hmac.new(key, body, hashlib.sha256).digest()
    if path.exists():  # the last one stays until this one is whole (a crash mid-write loses neither)
        os.replace(path, previous(path))
    atomic_write_bytes(path, MAGIC + mac + body)
    os.chmod(path, 0o600)


def save_in_background(path: Path, state: State, store: EventStore, key: bytes) -> int | None:
    """Write the snapshot from a forked child, which has the state as it is now (copy on write)
    while this process goes on changing it. The child's pid (reap it with `reaped`), or None when
    there is nothing to anchor it to. Raises OSError when the fork fails."""
    anchor = _hash_at(store, state.last_seq) if state.last_seq else None
    if anchor is None:
        return None
    pid = os.fork()
    if pid:
        return pid
    # The child: only this thread exists here, and nothing of the parent's (database connections,
    # locks, log handlers) is touched; no collection runs finalizers of objects the parent owns.
    code = 1
    try:
        gc.disable()
        _write(path, state, anchor, key)
        code = 0
    except BaseException:  # the parent says it: the exit status is all the child has
        code = 1
    finally:
        os._exit(code)


def reaped(pid: int, block: bool = False) -> bool | None:
    """Whether the child `pid` wrote its snapshot: True or False once it has exited, None while it runs."""
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return False
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status) == 0


def load(path: Path, store: EventStore, key: bytes) -> tuple[State | None, str]:
    """(the newest snapshot's state, why) when it can be trusted and is not stale, trying
    `state.snapshot` and then the one before it; (None, why not) otherwise."""
    state, why = load_one(path, store, key)
    if state is not None:
        return state, why
    older, why_older = load_one(previous(path), store, key)
    if older is not None:
        return older, f"{why_older} (the newer one: {why})"
    return None, why if why_older == "no snapshot" else f"{why}; {previous(path).name}: {why_older}"


def load_one(path: Path, store: EventStore, key: bytes) -> tuple[State | None, str]:
    """`load` of one file."""
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
    try:
        made_by, seq, anchor, state = pickle.loads(body)  # authenticated above: only our own bytes
    except Exception as exc:  # signed by us but unreadable (a bug, a changed class): not a reason to stop
        return None, f"snapshot unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if made_by != fingerprint():
        return None, "snapshot written by another version of the code"
    if not isinstance(state, State) or state.last_seq != seq:
        return None, "snapshot malformed"
    found = _hash_at(store, seq)
    if found != anchor:
        where = "beyond the end of the log" if found is None else "on another log (hash differs)"
        return None, f"snapshot at seq {seq} is {where}"
    return state, f"snapshot at seq {seq}"
