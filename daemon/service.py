"""The service loop: one process, the event store its only shared state.

Start-up: take the lock, migrate, rebuild state from the log, build the reactors, watch and rescan
the tickets folder, then send READY=1. Each loop iteration drains intake into one transaction (group
commit), sends `Tick(now)` about once a second, polls every reactor and pings the watchdog. Signal
handlers only set flags, so a signal never interrupts a transaction: SIGTERM/SIGINT finish the
current iteration and exit 0, SIGHUP reloads settings.

Reactors (dispatcher, report inbox, reconciler, ...) plug in through `reactor_factories`: callables
`(handler, settings) -> Reactor`, built once the state is loaded. `DEFAULT_REACTORS` is the list
`jbctl daemon` uses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

import sqlalchemy.exc

from daemon import snapshot
from daemon.commands import Command, SetQueueLimits, Tick
from daemon.handler import CommandHandler, ensure_home_owner
from daemon.intake import Intake
from daemon.manifests import manifest_writer
from daemon.notify import Notifier
from daemon.reactors import default_factories
from daemon.state import State
from schema import migrations
from schema.settings import Settings, load_settings
from schema.store import EventStore, wal_keeper
from schema.wire import SecretError, load_secret

log = logging.getLogger("jetbox.daemon")

TICK_S = 1.0  # how often the decider hears the time (retries due, deadlines, expiries)
IDLE_WAIT_S = 0.1  # longest sleep when nothing happened: reactors are polled at least this often
STATUS_EVERY_S = 5.0  # a STATUS= line is sent on change, and at least this often
STATUS_CHECK_S = 0.25  # how often the loop looks for a change
READY_BACKLOG = 256  # ticket files read before READY=1 at start-up; more are read after it
MAX_DB_FAILURES = 30  # consecutive failed commits before the daemon gives up (systemd restarts it)


@runtime_checkable
class Reactor(Protocol):
    """Something the loop drives: reads new events after its checkpoint and acts (idempotently)."""

    name: str

    def poll(self, now: datetime) -> bool:
        """Do a bounded amount of work; True when something was done (the loop then skips its sleep)."""
        ...

    def close(self) -> None: ...


ReactorFactory = Callable[[CommandHandler, Settings], Reactor]

# Filled by the areas that add reactors (dispatch, report inbox, reconciler); `jbctl daemon` uses it.
DEFAULT_REACTORS: list[ReactorFactory] = []


class DaemonLocked(Exception):
    """Another daemon holds this home's lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"another jbctl daemon ({holder}) is running on {path.parent} (lock {path})")
        self.path, self.pid = path, pid


class PidLock:
    """An flock(2)ed file holding the owner's pid; the kernel drops it when the process dies, even by kill -9."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DaemonLocked(self.path, self.holder()) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            # Empty it first so a stale pid is never shown; the file stays (unlinking races a new owner).
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


@dataclass
class _Failing:
    since: float
    count: int = 0


class Daemon:
    """`jbctl daemon`: intake, ticks and reactors around one `CommandHandler`."""

    def __init__(
        self,
        settings: Settings,
        reactor_factories: Sequence[ReactorFactory] | None = None,
        *,
        notifier: Notifier | None = None,
        overrides: dict[str, Any] | None = None,
        install_signals: bool = True,
        settle: float | None = None,
    ) -> None:
        self.settings = settings
        if reactor_factories is None:
            reactor_factories = [*DEFAULT_REACTORS, *default_factories(settings)]
        self.factories = list(reactor_factories)
        self.notifier = notifier or Notifier()
        self.overrides = dict(overrides or {})  # command-line settings that survive a reload
        self.install_signals = install_signals
        self.settle = settle
        self.lock = PidLock(settings.home / "daemon.lock")
        self.store: EventStore | None = None
        self.handler: CommandHandler | None = None
        self.intake: Intake | None = None
        self.reactors: list[Reactor] = []
        self.ready = threading.Event()  # set once READY=1 would be sent (for in-process callers)
        self._snapshot_seq = 0  # the seq of the last state snapshot used or written (0: none)
        self._snapshot_child: tuple[int, int] | None = None  # (pid, seq) of a snapshot being written
        self._snapshot_tried = 0  # the seq of the last periodic snapshot begun (paces them)
        self._stop = False
        self._reload = False
        self._last_status = ""
        self._status_at = 0.0
        self._status_checked = 0.0
        self._db_failures = 0
        self._reactor_errors: dict[str, _Failing] = {}
        self._keeper: sqlite3.Connection | None = None

    # --- control -------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its iteration and exit (safe from a signal handler or thread)."""
        self._stop = True
        if self.intake is not None:
            self.intake.wakeup.set()

    def _on_hup(self, _signo: int, _frame: FrameType | None) -> None:
        self._reload = True
        if self.intake is not None:
            self.intake.wakeup.set()

    def _signals(self) -> None:
        if not self.install_signals:
            return
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # --- running -------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, loop until stopped, shut down; returns the exit code."""
        self._signals()  # before anything slow, so an early SIGTERM still exits cleanly
        started = time.monotonic()
        self.lock.acquire()
        try:
            self._start()
            log.info(
                "ready in %.0f ms: %d events, watching %s (rescan every %gs)",
                (time.monotonic() - started) * 1000,
                self.handler.state.last_seq if self.handler else 0,
                self.settings.tickets_path,
                self.settings.rescan_seconds,
            )
            self.notifier.ready(self._status_text())
            self.ready.set()
            self._loop()
            return 0
        finally:
            self._shutdown()

    def _start(self) -> None:

        s = self.settings
        self.store = EventStore(s.db_url, s.sqlite_synchronous)
        if not migrations.at_head(self.store.engine):  # importing alembic costs more than the rest of start-up
            log.info("migrating %s", s.db_url.split("@")[-1])
            migrations.upgrade(s.db_url)
        self._keeper = wal_keeper(s.db_url)
        state, why = self._load_snapshot()
        state_seq = self._snapshot_seq = self._snapshot_tried = state.last_seq if state is not None else 0
        # the log's tail (or all of it) folded in; joined manifests written before they are recorded
        self.handler = CommandHandler(self.store, state, before_append=manifest_writer(s))
        if state is None and why != "no snapshot":
            log.warning("state snapshot not used (%s): the whole log replayed", why)
        log.info("state: %s, %d events after it replayed", why, self.handler.state.last_seq - state_seq)
        # The state just loaded lives as long as the daemon: moved out of the collector's reach, a
        # full collection no longer walks every ticket held, nor does the one at exit (with 100,000
        # tickets that alone held SIGTERM up for over 15 s). Only in a process of its own (the one
        # that takes the signals): a test's in-process daemon must not freeze the test runner's heap.
        if self.install_signals:
            gc.freeze()
        ensure_home_owner(self.handler, s.home)  # the default approver, recorded at the first start
        self._record_queue_limits()
        self.notifier.watchdog()
        self.reactors = [factory(self.handler, s) for factory in self.factories]
        self._start_intake(s.tickets_path)
        assert self.intake is not None
        for reactor in self.reactors:  # reactors that can tell when work arrives wake the loop early
            attach = getattr(reactor, "attach_wakeup", None)
            if attach is not None:
                attach(self.intake.wakeup)
        # Drain the start-up rescan before READY, so READY means "caught up with the folder"
        # (files still settling are left to the loop). A folder of thousands of files would hold
        # READY past systemd's start timeout: then READY comes first and the loop takes the files in
        # batches, the STATUS line (and `jbctl status`) counting those pending.
        assert self.intake is not None
        backlog = self.intake.pending()
        if backlog > READY_BACKLOG:
            log.info("%d ticket files to read: ready first, then taken in batches", backlog)
            return
        while not self._stop:
            due = self.intake.next_due()
            if due is None or due > time.monotonic():
                break
            self._drain(datetime.now(UTC))
            self.notifier.watchdog()

    @property
    def snapshot_path(self) -> Path:
        return self.settings.home / "state.snapshot"

    def _snapshot_key(self) -> bytes | None:
        try:
            return load_secret(self.settings.secret_path, create=True)
        except (OSError, SecretError) as exc:
            log.warning("no state snapshots: %s", exc)
            return None

    def _load_snapshot(self) -> tuple[State | None, str]:
        assert self.store is not None
        key = self._snapshot_key()
        if key is None:
            return None, "no snapshot key"
        try:
            return snapshot.load(self.snapshot_path, self.store, key)
        except Exception as exc:  # a snapshot is an optimisation: never a reason not to start
            log.warning("state snapshot not used: %s", exc)
            return None, f"snapshot failed to load ({type(exc).__name__})"

    def _save_snapshot(self) -> None:
        if self.store is None or self.handler is None:
            return
        self._reap_snapshot(block=True)
        key = self._snapshot_key()
        if key is None:
            return
        try:
            self.handler.refresh()
            if self.handler.state.last_seq == self._snapshot_seq:
                return  # nothing happened since the snapshot it started from: that one still holds
            self.handler.freeze_ended()
            if snapshot.save(self.snapshot_path, self.handler.state, self.store, key):
                log.info("state snapshot written at seq %d", self.handler.state.last_seq)
        except Exception:
            log.exception("state snapshot not written (the next start replays the log)")

    def _maybe_snapshot(self) -> None:
        """Every `snapshot_every` events, a snapshot written by a forked child (one at a time)."""
        every = self.settings.snapshot_every
        assert self.handler is not None and self.store is not None
        self._reap_snapshot()
        if not every or self._snapshot_child is not None or self.handler.state.last_seq - self._snapshot_tried < every:
            return
        key = self._snapshot_key()
        self._snapshot_tried = self.handler.state.last_seq  # a failure is said once per period
        if key is None:
            return
        self.handler.freeze_ended()
        seq = self.handler.state.last_seq
        try:
            pid = snapshot.save_in_background(self.snapshot_path, self.handler.state, self.store, key)
        except OSError as exc:
            log.warning("state snapshot not written at seq %d (fork failed: %s)", seq, exc)
            return
        if pid is not None:
            self._snapshot_child = (pid, seq)

    def _reap_snapshot(self, block: bool = False) -> None:
        if self._snapshot_child is None:
            return
        pid, seq = self._snapshot_child
        wrote = snapshot.reaped(pid, block)
        if wrote is None:
            return
        self._snapshot_child = None
        if wrote:
            self._snapshot_seq = seq
            log.info("state snapshot written at seq %d", seq)
        else:
            log.warning("state snapshot at seq %d not written (its writer failed; the next one is tried later)", seq)

    def _start_intake(self, folder: Path) -> None:
        assert self.store is not None and self.handler is not None
        kwargs = {} if self.settle is None else {"settle": self.settle}
        intake = Intake(folder, self.handler.state, **kwargs)
        intake.load_verdicts(self.store)
        intake.start()  # watch first, then scan: nothing slips between the two
        intake.rescan()
        self.intake = intake

    def _loop(self) -> None:
        assert self.intake is not None and self.handler is not None
        next_tick = time.monotonic()
        next_rescan = time.monotonic() + self.settings.rescan_seconds
        while not self._stop:
            mono = time.monotonic()
            now = datetime.now(UTC)
            busy = self._drain(now)
            if mono >= next_tick:
                next_tick = mono + TICK_S
                self.handler.refresh()  # other writers (jbctl cancel/approve) appended meanwhile
                self._commit([Tick(now=now)])
            for reactor in self.reactors:
                busy = self._poll_reactor(reactor, now) or busy
            if self._reload:
                self._reload = False
                self._reload_settings()
                next_rescan = mono  # a reload may point at another folder: look now
            if mono >= next_rescan or self.intake.rescan_requested():
                next_rescan = mono + self.settings.rescan_seconds
                self.intake.rescan()
            self.notifier.watchdog(mono)
            self._maybe_status(mono)
            self._maybe_snapshot()
            if busy or self._stop:
                continue
            self._sleep(min(next_tick, next_rescan) - time.monotonic())

    def _sleep(self, until_deadline: float) -> None:
        """Wait for a file-system event, a signal, or the next deadline (whichever is first)."""
        assert self.intake is not None
        timeout = min(IDLE_WAIT_S, max(0.0, until_deadline))
        due = self.intake.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        wd = self.notifier.watchdog_due_in()
        if wd is not None:
            timeout = min(timeout, wd)
        if timeout > 0:
            self.intake.wakeup.wait(timeout)

    def _drain(self, now: datetime) -> bool:
        """Commit every ready intake command in one transaction; True when anything was read."""
        assert self.intake is not None
        commands = self.intake.poll(now)
        if commands:
            recorded = self._commit(commands)
            if recorded is not None:
                self.intake.committed(commands, recorded)
            else:
                self.intake.retry(commands)
        return bool(commands)

    def _commit(self, commands: Sequence[Command]) -> list[Any] | None:
        """handle_many with a safety net: a database error keeps the commands for a retry (None);
        a command the decider chokes on is logged and skipped instead of blocking the rest."""
        assert self.handler is not None

        try:
            recorded = self.handler.handle_many(commands, meta={"source": "daemon"})
        except sqlalchemy.exc.OperationalError as exc:
            self._db_failures += 1
            log.error("commit failed (%d in a row): %s", self._db_failures, exc)
            if self._db_failures >= MAX_DB_FAILURES:
                raise
            self.handler.refresh()
            time.sleep(min(1.0, 0.05 * self._db_failures))
            return None
        except Exception:
            if len(commands) == 1:
                log.exception("the decider failed on %s; skipped", type(commands[0]).__name__)
                if self.intake is not None:
                    self.intake.skip(commands[0])
                return []
            recorded = []
            for command in commands:  # find the culprit: one command per transaction
                one = self._commit([command])
                if one is None:
                    return None
                recorded.extend(one)
            return recorded
        self._db_failures = 0
        return recorded

    def _poll_reactor(self, reactor: Reactor, now: datetime) -> bool:
        """A failing reactor is logged (with back-off on repeats) and the loop goes on."""
        failing = self._reactor_errors.get(reactor.name)
        mono = time.monotonic()
        if failing is not None and mono < failing.since + min(30.0, 0.5 * 2**failing.count):
            return False
        try:
            did = bool(reactor.poll(now))
        except Exception:
            count = failing.count + 1 if failing else 1
            self._reactor_errors[reactor.name] = _Failing(mono, count)
            if count <= 3 or count % 20 == 0:
                log.exception("reactor %s failed (%d in a row)", reactor.name, count)
            return False
        if failing is not None:
            log.info("reactor %s recovered", reactor.name)
            del self._reactor_errors[reactor.name]
        return did

    def _reload_settings(self) -> None:
        """SIGHUP: read environment and jetbox.toml again; apply what can change without a restart."""
        self.notifier.reloading()
        try:
            new = load_settings(**self.overrides)
        except Exception as exc:
            log.error("reload failed, keeping the current settings: %s", exc)
            self.notifier.ready(self._status_text())
            return
        old = self.settings
        if (new.home, new.db_url) != (old.home, old.db_url):
            log.warning("home and database changes need a restart; keeping %s", old.db_url)
            new = new.model_copy(update={"home": old.home, "database_url": old.database_url})
        self.settings = new
        self._record_queue_limits()
        if new.tickets_path != old.tickets_path and self.intake is not None:
            log.info("tickets folder changed: %s -> %s", old.tickets_path, new.tickets_path)
            self.intake.stop()
            self._start_intake(new.tickets_path)
        for reactor in self.reactors:
            reload = getattr(reactor, "reload", None)
            if callable(reload):
                reload(new)
        log.info("reloaded settings (tickets %s, rescan every %gs)", new.tickets_path, new.rescan_seconds)
        self.notifier.ready(self._status_text())

    def _record_queue_limits(self) -> None:
        """The `queue_limits` setting into the log (QueueLimitsSet, only when it changed): the decider
        reads limits from its state, so a replay explains every wait."""
        assert self.handler is not None
        from schema.sizes import parse_memory

        limits = dict(self.settings.queue_limits)
        gpu = {q: parse_memory(size) for q, size in self.settings.queue_gpu_memory.items()}
        if limits != self.handler.state.queue_limits or gpu != self.handler.state.queue_gpu_memory:
            self._commit([SetQueueLimits(now=datetime.now(UTC), limits=limits, gpu_memory=gpu)])

    # --- status --------------------------------------------------------------------------------

    def _status_text(self) -> str:
        """One line for `systemctl status`: what runs, what waits, what intake holds."""
        if self.handler is None:
            return "starting"
        running = queued = active = retrying = blocked = awaiting = held = 0
        state = self.handler.state
        for ticket in (state.tickets[tid] for tid in state.running):
            running += 1
            awaiting += ticket.awaiting is not None
            held += ticket.held is not None
            for task in ticket.tasks.values():
                queued += task.status == "scheduled"
                active += task.status == "running"
                retrying += task.status == "waiting_retry"
                blocked += task.status == "blocked"
        text = (
            f"tickets: {running} running; tasks: {queued} queued, {active} running, "
            f"{retrying} waiting retry, {blocked} blocked"
        )
        waiting = len(self.handler.state.deferred)
        if waiting:
            text += f"; {waiting} waiting" + (f" ({held} tickets held)" if held else "")
        if awaiting:
            text += f"; {awaiting} awaiting approval (jbctl proposals)"
        if self.handler.state.paused is not None:
            text = f"PAUSED ({self.handler.state.paused}; jbctl resume); " + text
        if not self.settings.redis_url:
            text += "; NOT DISPATCHING: no Redis (--no-dispatch)"
        pending = self.intake.pending() if self.intake is not None else 0
        if pending:
            text += f"; intake: {pending} files pending"
        if self._reactor_errors:
            text += "; failing: " + ", ".join(sorted(self._reactor_errors))
        return text

    def _maybe_status(self, mono: float) -> None:
        # At most a few times a second: the text walks every running ticket's tasks.
        if mono - self._status_checked < STATUS_CHECK_S:
            return
        self._status_checked = mono
        text = self._status_text()
        if text != self._last_status or mono - self._status_at >= STATUS_EVERY_S:
            self._last_status, self._status_at = text, mono
            self.notifier.status(text)
            self._write_status_file(text)

    def _write_status_file(self, text: str) -> None:
        """`run/daemon.json`: the STATUS line for `jbctl status`, which cannot ask systemd (or may not be
        under it). Best effort: a full disk must not stop the loop."""
        body = {
            "pid": os.getpid(),
            "status": text,
            "dispatching": bool(self.settings.redis_url),
            "at": datetime.now(UTC).isoformat(),
        }
        path = self.status_path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(body) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)

    @property
    def status_path(self) -> Path:
        return self.settings.home / "run" / "daemon.json"

    # --- shutting down -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.notifier.stopping("stopping")
        with contextlib.suppress(OSError):
            self.status_path.unlink()
        if self.intake is not None:
            self.intake.stop()
        for reactor in self.reactors:
            try:
                reactor.close()
            except Exception:
                log.exception("reactor %s failed to close", reactor.name)
        if self.ready.is_set():  # a start that got as far as READY has a whole state to keep
            self._save_snapshot()
        if self.store is not None:
            self.store.close()
        if self._keeper is not None:
            self._keeper.close()
        self.lock.release()
        self.notifier.close()
        log.info("stopped")
