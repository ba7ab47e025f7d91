"""Intake: the watched tickets folder turned into decider commands.

All of intake's file I/O lives here; every rule (is this a new revision? may it apply?) lives in the
decider. The flow:

* a watchdog observer thread marks paths dirty and wakes the service loop;
* `poll()` reads each dirty path once it is *ready* (an atomic rename or a closed write is ready at
  once; a bare create/modify/delete waits until the path has been quiet for `settle` seconds) and only
  when its size and mtime did not change while it was read; it hashes the bytes and, when the hash
  differs from the last one seen for that path, parses the file into a `SubmitTicket`;
* a path that vanished becomes `TicketFileRemoved`;
* `rescan()` lists the folder and marks dirty every file whose stat signature changed and every
  known file that is gone, so events missed while the daemon was down, or lost to an inotify
  overflow, are caught (the hash comparison makes a rescan of unchanged files record nothing);
* `committed()` writes or removes the `<stem>.rejected.txt` note beside each file according to what
  was recorded. Nothing in the folder except those notes is ever written or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.commands import Command, SubmitTicket, TicketFileRemoved
from daemon.state import State
from schema import events as ev
from schema.store import EventStore, Recorded
from schema.ticket import MAX_TICKET_BYTES, TicketInvalid, key_line, parse_ticket

log = logging.getLogger(__name__)

TICKET_SUFFIXES = (".yaml", ".yml")
NOTE_SUFFIX = ".rejected.txt"
NOTE_MARKER = "# jetbox:"
# Editors' temp, swap and backup names (vim, emacs, kate, JetBrains, our own `jbctl submit`).
_IGNORED_SUFFIXES = ("~", ".swp", ".swx", ".swo", ".tmp", ".bak", ".orig", ".part", ".crdownload")
_IGNORED_PREFIXES = (".", "#", "~")
SETTLE_S = 0.5  # how long a created/modified file must be quiet before it is read
MAX_BATCH = 256  # paths read per poll, so a huge rescan still lets the loop ping the watchdog
POLL_BUDGET_S = 0.25  # stop reading after this long in one poll: commit what was read, go on next turn
MAX_UNSTABLE = 8  # reads that saw the file change before it is rejected (until it changes again)
_VERDICT_TYPES = ("TicketSubmitted", "TicketRejected", "TicketRevisionRefused")


def is_ticket_name(name: str) -> bool:
    """True for `*.yaml`/`*.yml` names that are not editor temp, swap, backup or dot files."""
    if not name.endswith(TICKET_SUFFIXES) or name.startswith(_IGNORED_PREFIXES):
        return False
    return not name.endswith(_IGNORED_SUFFIXES) and ".tmp" not in name


def note_path(path: str) -> str:
    """Where the rejection note of a ticket file goes: `TICKET-1.yaml` -> `TICKET-1.rejected.txt`."""
    base, name = os.path.split(path)
    return os.path.join(base, name.rsplit(".", 1)[0] + NOTE_SUFFIX)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Dirty:
    ready_at: float  # monotonic time from which the path may be read
    tries: int = 0


@dataclass(frozen=True)
class _Sig:
    """What a stat says about a file's content; a change means it must be read again."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Sig:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Intake:
    """Watches one tickets folder (not its subfolders) and turns changes into commands."""

    def __init__(self, tickets_dir: Path, state: State, *, settle: float = SETTLE_S) -> None:
        self.dir = str(tickets_dir)
        self.state = state
        self.settle = settle
        self.wakeup = threading.Event()  # set by the observer thread and by `request_rescan`
        self._lock = threading.Lock()
        self._dirty: dict[str, _Dirty] = {}
        # The last content hash sent per path: starts from the log, so a restart re-sends nothing.
        self._seen: dict[str, str] = {p: h for p, h in state.files.items() if self._ours(p)}
        self._sigs: dict[str, _Sig] = {}
        # path -> (content hash, note text or None): the last decision recorded about the file.
        self._verdicts: dict[str, tuple[str, str | None]] = {}
        self._observer: Any = None
        self._watching = False  # started and not stopped: a rescan repairs a lost watch
        self._dir_ino: int | None = None
        self._rescan_requested = False
        self.events_seen = 0  # file-system events, for STATUS and tests

    # --- set-up ------------------------------------------------------------------------------

    def _ours(self, path: str) -> bool:
        return os.path.dirname(path) == self.dir

    def load_verdicts(self, store: EventStore) -> None:
        """Remember what was last decided about each file, so notes can be repaired after a crash.

        Only each file's last verdict is read whole (a rejection's errors make its note): decoding
        every `TicketSubmitted` of a year, each with its ticket, took seconds and hundreds of MB."""
        last: dict[str, tuple[int, str, str]] = {}
        for seq, type_, path, digest in store.field_rows(_VERDICT_TYPES, "path", "content_hash"):
            if isinstance(path, str) and isinstance(digest, str):
                last[path] = (seq, type_, digest)
        for path, (_seq, type_, digest) in last.items():
            if type_ == ev.TicketSubmitted.__name__:
                self._verdicts[path] = (digest, None)
        for rec in store.records([seq for seq, type_, _ in last.values() if type_ != ev.TicketSubmitted.__name__]):
            self._remember(rec)

    def start(self) -> None:
        """Create the folder if needed and start watching it."""
        from watchdog.events import (  # watchdog: only when watching, not for `jbctl validate`
            DirDeletedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        os.makedirs(self.dir, exist_ok=True)
        intake = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                intake._on_event(event)

        observer = Observer()
        # Only the kinds we act on: our own reads (open/close-nowrite) must not wake the loop.
        kinds = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent]
        observer.schedule(_Handler(), self.dir, recursive=False, event_filter=[*kinds, DirDeletedEvent])
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._watching = True
        self._dir_ino = os.stat(self.dir).st_ino
        _watch_overflows(self)

    def stop(self) -> None:
        """Stop watching (for good: a rescan will not start the watch again)."""
        self._watching = False
        self._stop_observer()

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None

    # --- events from the observer thread -------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        now = time.monotonic()
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        if event.is_directory:
            if kind == "deleted" and src == self.dir:
                self.request_rescan()  # our folder is gone: the rescan re-creates and re-watches it
                return
            if src == self.dir:
                return
            # A folder named like a ticket is read (and refused) like any other non-file.
        # A rename into place or a closed write means the writer is done: read at once. A bare
        # create/modify may be mid-write, and a file renamed away or deleted may be an editor's
        # save in progress (rename to backup, write anew), so those wait until quiet for `settle`.
        marks = [(src, 0.0 if kind == "closed" else self.settle)]
        if kind == "moved":
            marks.append((os.fsdecode(event.dest_path), 0.0))
        with self._lock:
            for path, delay in marks:
                if path and self._ours(path) and is_ticket_name(os.path.basename(path)):
                    self._mark(path, now + delay)
                    self.events_seen += 1
        self.wakeup.set()

    def _mark(self, path: str, ready_at: float) -> None:
        """Make `path` due at `ready_at`. Events for a pending path coalesce into one read (debounce),
        and the latest event decides when: a modify after a close means the file is written again."""
        entry = self._dirty.get(path)
        if entry is None:
            self._dirty[path] = _Dirty(ready_at)
        else:
            entry.ready_at = ready_at

    def request_rescan(self) -> None:
        """Ask for a full rescan at the next poll (an inotify overflow, a deleted folder, SIGHUP)."""
        self._rescan_requested = True
        self.wakeup.set()

    # --- the service loop's side ---------------------------------------------------------------

    def pending(self) -> int:
        with self._lock:
            return len(self._dirty)

    def next_due(self) -> float | None:
        """The monotonic time at which the earliest dirty path becomes ready (None when idle)."""
        with self._lock:
            return min((d.ready_at for d in self._dirty.values()), default=None)

    def rescan_requested(self) -> bool:
        return self._rescan_requested

    def rescan(self) -> int:
        """Mark dirty every file whose stat changed since it was last read and every known file
        that is gone; returns how many were marked. Also repairs a lost watch and stray notes."""
        self._rescan_requested = False
        self._ensure_watch()
        now = time.monotonic()
        on_disk: set[str] = set()
        notes: list[str] = []
        try:
            entries = list(os.scandir(self.dir))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.dir, exc)
            entries = []
        marked = 0
        with self._lock:
            for entry in entries:
                if entry.name.endswith(NOTE_SUFFIX):
                    notes.append(entry.path)
                if not is_ticket_name(entry.name):
                    continue
                on_disk.add(entry.path)
                try:
                    sig = _Sig.of(entry.stat(follow_symlinks=False))  # a link is judged, not followed
                except OSError:
                    continue
                if self._sigs.get(entry.path) != sig and entry.path not in self._dirty:
                    self._dirty[entry.path] = _Dirty(now)
                    marked += 1
            for path in self._seen:
                if path not in on_disk and path not in self._dirty and path in self.state.file_tickets:
                    self._dirty[path] = _Dirty(now)
                    marked += 1
        for note in notes:  # a note whose ticket file was deleted while we were not looking
            stem = note[: -len(NOTE_SUFFIX)]
            if not any(stem + suffix in on_disk for suffix in TICKET_SUFFIXES):
                _remove_note(note, None)
        if marked:
            self.wakeup.set()
        return marked

    def _ensure_watch(self) -> None:
        """Re-create and re-watch the folder if it was deleted, replaced or the observer died."""
        if not self._watching:
            return
        try:
            ino: int | None = os.stat(self.dir).st_ino
        except OSError:
            ino = None
        alive = self._observer is not None and self._observer.is_alive()
        if self._observer is not None and (ino != self._dir_ino or not alive):
            log.warning("tickets folder %s was replaced or its watch died: watching it again", self.dir)
            self._stop_observer()
        if self._observer is None:
            try:
                self.start()
            except OSError as exc:
                log.error("cannot watch %s: %s", self.dir, exc)

    def poll(
        self, now: datetime, mono: float | None = None, limit: int = MAX_BATCH, budget: float = POLL_BUDGET_S
    ) -> list[Command]:
        """Commands for the dirty paths that are ready now: at most `limit` paths, smallest files
        first, and no more once `budget` seconds were spent reading (the rest stay due, for the next
        poll), so that a costly file never delays the commit of the others by more than its own cost."""
        mono = time.monotonic() if mono is None else mono
        self.wakeup.clear()
        with self._lock:
            ready = [p for p, d in self._dirty.items() if d.ready_at <= mono]
        ready = sorted(ready, key=lambda p: (_size(p), p))[:limit]
        commands: list[Command] = []
        started = time.monotonic()
        for n, path in enumerate(ready):
            if n and time.monotonic() - started > budget:
                self.wakeup.set()  # more is due now
                break
            with self._lock:
                entry = self._dirty.pop(path, None)
            if entry is None:
                continue
            command = self._read(path, now, entry, mono)
            if command is not None:
                commands.append(command)
        return commands

    def _read(self, path: str, now: datetime, entry: _Dirty, mono: float) -> Command | None:
        try:
            data, sig, owner = _read_stable(path)
        except FileNotFoundError:
            self._sigs.pop(path, None)
            _remove_note(note_path(path), path)
            if self._seen.pop(path, None) is not None and path in self.state.file_tickets:
                return TicketFileRemoved(now=now, path=path)
            return None
        except _Unstable:
            entry.tries += 1
            if entry.tries < MAX_UNSTABLE:
                self._requeue(path, mono + min(self.settle * entry.tries, 5.0), entry)
                return None
            return self._refuse(
                path,
                now,
                f"the file changed while it was read, {entry.tries} times in a row: Jetbox reads a ticket once "
                "it stops changing (it is read again when it changes)",
            )
        except _Refused as exc:
            return self._refuse(path, now, str(exc))
        except OSError as exc:
            return self._refuse(path, now, f"cannot read: {exc.strerror or exc}")
        self._sigs[path] = sig
        digest = content_hash(data)
        if self._seen.get(path) == digest:
            self._sync_note(path, digest)  # unchanged: only make sure the note agrees
            return None
        name = os.path.basename(path)
        try:
            ticket = parse_ticket(data, path)
        except TicketInvalid as exc:
            errors = [str(e) for e in exc.errors]
        except Exception as exc:  # a bug in validation must cost one ticket, not intake
            log.exception("validating %s failed", path)
            errors = [f"{path}:1:1: internal error while validating ({type(exc).__name__}); please report it"]
        else:
            line = key_line(data, "after") if ticket.after else 1
            return SubmitTicket(
                now=now, actor=owner, path=path, content_hash=digest, ticket=ticket, after_line=line
            )
        return SubmitTicket(
            now=now,
            actor=owner,
            path=path,
            content_hash=digest,
            ticket=None,
            ticket_id=name.rsplit(".", 1)[0],
            errors=errors,
        )

    def _refuse(self, path: str, now: datetime, why: str) -> Command | None:
        """A ticket-named path that cannot be read as a ticket: rejected like an invalid one, once per
        distinct reason, and read again when its stat signature changes."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None  # gone meanwhile: the removal event follows
        except OSError:
            st = None
        if st is not None:
            self._sigs[path] = _Sig.of(st)
        digest = content_hash(f"refused: {why}".encode())
        if self._seen.get(path) == digest:
            self._sync_note(path, digest)
            return None
        log.warning("%s refused: %s", path, why)
        return SubmitTicket(
            now=now,
            actor=_owner(st.st_uid) if st is not None else None,
            path=path,
            content_hash=digest,
            ticket=None,
            ticket_id=os.path.basename(path).rsplit(".", 1)[0],
            errors=[f"{path}:1:1: {why}"],
        )

    def _requeue(self, path: str, ready_at: float, entry: _Dirty | None = None) -> None:
        with self._lock:
            current = self._dirty.get(path)
            if current is None:
                self._dirty[path] = entry or _Dirty(ready_at)
                self._dirty[path].ready_at = ready_at
        self.wakeup.set()

    def retry(self, commands: Sequence[Command], delay: float = 1.0) -> None:
        """The commands were not committed (a database error): read their files again later."""
        for command in commands:
            path = getattr(command, "path", None)
            if isinstance(path, str):
                if isinstance(command, TicketFileRemoved):
                    self._seen[path] = self.state.files.get(path, "")
                self._sigs.pop(path, None)
                self._requeue(path, time.monotonic() + delay)

    def committed(self, commands: Iterable[Command], recorded: Sequence[Recorded]) -> None:
        """Bring notes and memory in line with what was just recorded for `commands`."""
        for rec in recorded:
            self._remember(rec)
            _log_decision(rec)
        for command in commands:
            if isinstance(command, SubmitTicket):
                self._seen[command.path] = command.content_hash
                verdict = self._verdicts.get(command.path)
                if verdict is None or verdict[0] != command.content_hash:
                    # Nothing recorded (e.g. the file is back to what its running ticket already
                    # holds): the note follows the file's own validity.
                    text = None
                    if command.ticket is None:
                        text = _note_text(command.path, "is not a valid ticket:", command.errors)
                    self._verdicts[command.path] = (command.content_hash, text)
                self._sync_note(command.path, command.content_hash)

    def skip(self, command: Command) -> None:
        """A command the decider could not handle: don't send it again until the file changes."""
        if isinstance(command, SubmitTicket):
            self._seen[command.path] = command.content_hash

    def _remember(self, rec: Recorded) -> None:
        if rec.type not in _VERDICT_TYPES:
            return
        data = rec.data
        path, digest = data.get("path"), data.get("content_hash")
        if not isinstance(path, str) or not isinstance(digest, str):
            return
        at = data.get("at", rec.recorded_at)
        text: str | None = None
        if rec.type == ev.TicketRejected.__name__:
            text = _note_text(path, f"was rejected ({at}):", list(data.get("errors") or []))
        elif rec.type == ev.TicketRevisionRefused.__name__:
            reason = str(data.get("reason", ""))
            text = _note_text(path, f"is a revision that was refused ({at}):", [f"{path}:1:1: {reason}"])
        self._verdicts[path] = (digest, text)

    def _sync_note(self, path: str, digest: str) -> None:
        """Write or remove `path`'s note to match the decision recorded for this content."""
        verdict = self._verdicts.get(path)
        if verdict is None or verdict[0] != digest:
            return  # no decision about this content yet
        note = note_path(path)
        if verdict[1] is None:
            _remove_note(note, path)
        else:
            _write_note(note, verdict[1])


def _log_decision(rec: Recorded) -> None:
    d = rec.data
    if rec.type == "TicketSubmitted":
        log.info("%s: revision %s accepted from %s", d.get("ticket"), d.get("revision"), d.get("path"))
    elif rec.type == "TicketRejected":
        log.warning("%s rejected: %s", d.get("path"), "; ".join(d.get("errors") or []))
    elif rec.type == "TicketRevisionRefused":
        log.warning("%s: revision in %s refused: %s", d.get("ticket"), d.get("path"), d.get("reason"))
    elif rec.type == "TicketCancelled":
        log.info("%s cancelled: %s", d.get("ticket"), d.get("reason"))


# --- file helpers ------------------------------------------------------------------------------


class _Unstable(Exception):
    """The file changed while it was being read."""


class _Refused(Exception):
    """The path is not something Jetbox reads as a ticket (a symlink, a FIFO, a device...)."""


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _read_stable(path: str) -> tuple[bytes, _Sig, str | None]:
    """The file's bytes (at most MAX_TICKET_BYTES + 1), its signature and owner, read only when the
    size and mtime did not change during the read. Symbolic links are refused (a link could make
    the daemon read, and quote in notes, any file it can read), and so are non-regular files (FIFOs,
    devices, sockets), without opening them for a blocking read."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise _Refused(
            f"is a symbolic link (to {target}): Jetbox reads only regular files in the tickets folder; "
            "copy the ticket in (jbctl submit FILE)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"is not a regular file but a {_file_kind(st.st_mode)}: a ticket is a YAML text file")
    # O_NOFOLLOW: a link swapped in after the lstat fails (ELOOP) instead of being followed.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise _Refused(f"is not a regular file but a {_file_kind(before.st_mode)}: a ticket is a YAML text file")
        chunks: list[bytes] = []
        left = MAX_TICKET_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise _Unstable(path)
    return b"".join(chunks), _Sig.of(after), _owner(after.st_uid)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def _owner(uid: int) -> str | None:
    """The file owner's user name: who submitted the ticket (recorded as the command's actor)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _note_text(path: str, what: str, lines: list[str]) -> str:
    name = os.path.basename(path)
    head = f"{NOTE_MARKER} {name} {what}\n# Jetbox removes this note once {name} is fixed or deleted.\n"
    return head + "".join(line + "\n" for line in lines)


def _write_note(note: str, text: str) -> None:
    """Write the note atomically (dot-named temp + rename), unless it already says exactly this."""
    try:
        with open(note, encoding="utf-8") as fh:
            current = fh.read()
    except FileNotFoundError:
        current = None
    except (OSError, UnicodeDecodeError):
        current = ""
    if current == text:
        return
    if current is not None and not current.startswith(NOTE_MARKER):
        log.warning("%s exists and is not a Jetbox note: leaving it alone", note)
        return
    folder, name = os.path.split(note)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, note)
    except OSError as exc:
        log.warning("cannot write %s: %s", note, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _remove_note(note: str, path: str | None) -> None:
    """Remove a note we wrote (about `path`, or about any file when None); never anyone else's file."""
    try:
        with open(note, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return
    if not first.startswith(NOTE_MARKER):
        return
    if path is not None and not first.startswith(f"{NOTE_MARKER} {os.path.basename(path)} "):
        return  # the note speaks of the other spelling (TICKET-1.yml vs TICKET-1.yaml)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(note)


class _OverflowWatch(logging.Handler):
    """watchdog only logs an inotify queue overflow; turn that log line into a rescan request."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.intakes: list[Intake] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            for intake in self.intakes:
                intake.request_rescan()


_overflow_watch = _OverflowWatch()


def _watch_overflows(intake: Intake) -> None:
    logger = logging.getLogger("watchdog.observers.inotify_c")
    if _overflow_watch not in logger.handlers:
        logger.addHandler(_overflow_watch)
    _overflow_watch.intakes = [i for i in _overflow_watch.intakes if i._observer is not None] + [intake]
