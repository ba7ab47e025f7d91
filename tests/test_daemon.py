"""The service loop as a real process: lock, signals, restart catch-up, kill -9 in a burst; reactors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.handler import CommandHandler
from daemon.intake import note_path
from daemon.notify import Notifier
from daemon.service import DEFAULT_REACTORS, Daemon, Reactor
from schema.settings import Settings, load_settings
from tests.jbdaemon import JBCTL, atomic_write, invalid_ticket, valid_ticket, wait_for
from tests.jbdaemon import Daemon as DaemonProc


@pytest.mark.integration
def test_second_daemon_on_the_same_home_is_refused(tmp_path: Path) -> None:
    first = DaemonProc(tmp_path).start()
    try:
        assert first.proc is not None
        argv = [JBCTL, "daemon", "--no-dispatch"]
        out = subprocess.run(argv, env=first.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert f"another jbctl daemon (pid {first.proc.pid}) is running" in out.stderr
        assert str(tmp_path / "daemon.lock") in out.stderr
    finally:
        assert first.stop() == 0
    assert (tmp_path / "daemon.lock").read_text() == ""  # released: no stale pid left behind


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: int) -> None:
    d = DaemonProc(tmp_path).start()
    atomic_write(d.tickets / "TICKET-1.yaml", valid_ticket("TICKET-1"))
    d.wait_event("TicketSubmitted", ticket="TICKET-1")
    assert d.stop(sig) == 0
    assert any("STOPPING=1" in m for m in d.messages)
    log = d.log_text()
    assert "stopped" in log and "Traceback" not in log
    out = subprocess.run([JBCTL, "verify"], env=d.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.integration
def test_sighup_reloads_settings(tmp_path: Path) -> None:
    config = tmp_path / "jetbox.toml"
    config.write_text("rescan_seconds = 1.0\n")
    d = DaemonProc(tmp_path, rescan=None).start()
    assert "rescan every 1s" in d.log_text()
    config.write_text("rescan_seconds = 7.5\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_message("RELOADING=1")
    d.wait_message("READY=1")
    wait_for("the reload in the log", lambda: "reloaded settings" in d.log_text())
    assert "rescan every 7.5s" in d.log_text()
    atomic_write(d.tickets / "TICKET-1.yaml", valid_ticket("TICKET-1"))  # still serving
    d.wait_event("TicketSubmitted", ticket="TICKET-1")
    assert d.stop() == 0


@pytest.mark.integration
def test_restart_catches_up_with_changes_made_while_down(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    for n in (1, 2, 3):
        atomic_write(d.tickets / f"TICKET-{n}.yaml", valid_ticket(f"TICKET-{n}"))
    d.wait_event("TicketSubmitted", ticket="TICKET-3")
    d.wait_event("TicketSubmitted", ticket="TICKET-2")
    d.wait_event("TicketSubmitted", ticket="TICKET-1")
    assert d.stop() == 0
    before = len(d.rows())

    (d.tickets / "TICKET-1.yaml").unlink()  # deleted while down
    atomic_write(d.tickets / "TICKET-2.yaml", valid_ticket("TICKET-2", title="changed"))  # changed while down
    atomic_write(d.tickets / "TICKET-4.yaml", valid_ticket("TICKET-4"))  # new while down
    (d.tickets / "TICKET-5.yaml").write_text(invalid_ticket("TICKET-5"))
    d.start()  # READY comes after the start-up rescan has been committed
    types = {(r["type"], r["data"].get("ticket")) for r in d.rows()[before:]}
    assert ("TicketCancelled", "TICKET-1") in types
    assert ("TicketRevisionRefused", "TICKET-2") in types
    assert ("TicketSubmitted", "TICKET-4") in types
    assert ("TicketRejected", "TICKET-5") in types
    assert not any(t == "TICKET-3" for _, t in types)  # unchanged: nothing recorded
    assert Path(note_path(str(d.tickets / "TICKET-5.yaml"))).exists()
    assert d.stop() == 0


@pytest.mark.integration
def test_kill9_in_a_burst_loses_nothing_and_records_nothing_twice(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    rng = random.Random(7)
    drops = [(n, n % 4 == 0) for n in range(1, 51)]  # every fourth is invalid
    rng.shuffle(drops)
    done = threading.Event()

    def dropper() -> None:
        for n, bad in drops:
            text = invalid_ticket(f"TICKET-{n}") if bad else valid_ticket(f"TICKET-{n}")
            atomic_write(d.tickets / f"TICKET-{n}.yaml", text)
            time.sleep(rng.uniform(0, 0.03))
        done.set()

    thread = threading.Thread(target=dropper)
    thread.start()
    wait_for("some drops recorded", lambda: sum(r["type"] == "TicketSubmitted" for r in d.rows()) >= 10)
    d.kill9()  # in the middle of the burst
    assert not done.is_set(), "the burst ended before the kill: nothing was tested"
    thread.join()
    assert done.is_set()
    d.start()

    valid = {f"TICKET-{n}" for n, bad in drops if not bad}
    invalid = {str(d.tickets / f"TICKET-{n}.yaml") for n, bad in drops if bad}

    def settled() -> bool:
        rows = d.rows()
        subs = {r["data"]["ticket"] for r in rows if r["type"] == "TicketSubmitted"}
        rejs = {r["data"]["path"] for r in rows if r["type"] == "TicketRejected"}
        return subs >= valid and rejs >= invalid

    wait_for("every drop recorded", settled, timeout=30)
    time.sleep(1.5)  # a periodic rescan must not add anything either
    events = d.jbctl_events()
    submitted = [e["data"]["ticket"] for e in events if e["type"] == "TicketSubmitted"]
    rejected = [e["data"]["path"] for e in events if e["type"] == "TicketRejected"]
    assert sorted(submitted) == sorted(valid)  # each exactly once
    assert sorted(rejected) == sorted(invalid)  # each exactly once
    for n, bad in drops:
        assert Path(note_path(str(d.tickets / f"TICKET-{n}.yaml"))).exists() == bad
    assert d.stop() == 0
    out = subprocess.run([JBCTL, "verify"], env=d.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.integration
def test_daemon_never_imports_torch_or_workers() -> None:
    code = (
        "import sys, cli.main, cli.daemon_cmds, daemon.service, daemon.intake, daemon.notify\n"
        "cli.main.build_parser()\n"
        "bad = [m for m in sys.modules if m == 'torch' or m == 'workers' or m.startswith(('torch.', 'workers.'))]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --- the reactor interface, in-process ----------------------------------------------------------


class _Recorder:
    """A reactor that counts its polls and fails on demand."""

    def __init__(self, name: str, handler: CommandHandler, settings: Settings, fail: bool = False) -> None:
        self.name, self.handler, self.settings, self.fail = name, handler, settings, fail
        self.polls: list[datetime] = []
        self.closed = False

    def poll(self, now: datetime) -> bool:
        self.polls.append(now)
        if self.fail:
            raise RuntimeError("boom")
        return False

    def close(self) -> None:
        self.closed = True


@pytest.mark.integration
def test_reactors_are_built_with_the_handler_polled_and_closed(home: Path) -> None:
    assert DEFAULT_REACTORS is not None  # the list other areas append their factories to
    built: list[_Recorder] = []

    def factory(fail: bool) -> Any:
        def make(handler: CommandHandler, settings: Settings) -> Reactor:
            r = _Recorder("failing" if fail else "ok", handler, settings, fail)
            built.append(r)
            return r

        return make

    settings = load_settings()
    daemon = Daemon(settings, [factory(False), factory(True)], notifier=Notifier({}), install_signals=False)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert daemon.ready.wait(30)
        ok, failing = built
        assert isinstance(ok, Reactor)
        assert ok.handler is daemon.handler and ok.settings is settings
        wait_for("several polls", lambda: len(ok.polls) >= 5, timeout=10)
        # A failing reactor is retried with back-off and does not stop the loop (intake still works).
        atomic_write(settings.tickets_path / "TICKET-1.yaml", valid_ticket("TICKET-1"))
        wait_for("the ticket", lambda: "TICKET-1" in daemon.handler.state.tickets if daemon.handler else False)
        assert 1 <= len(failing.polls) < len(ok.polls)
        assert "failing: failing" in daemon._status_text()
    finally:
        daemon.stop()
        thread.join(15)
    assert not thread.is_alive()
    assert ok.closed and failing.closed


@pytest.mark.integration
def test_deleted_tickets_folder_is_recreated_and_watched_again(tmp_path: Path) -> None:
    import shutil

    d = DaemonProc(tmp_path, rescan=600).start()  # no periodic rescan: the new watch must see TICKET-2
    atomic_write(d.tickets / "TICKET-1.yaml", valid_ticket("TICKET-1"))
    d.wait_event("TicketSubmitted", ticket="TICKET-1")
    shutil.rmtree(d.tickets)
    d.wait_event("TicketCancelled", ticket="TICKET-1")
    wait_for("the folder to be re-created", d.tickets.is_dir)
    time.sleep(0.3)  # the new watch is set up right after the folder is made
    atomic_write(d.tickets / "TICKET-2.yaml", valid_ticket("TICKET-2"))
    d.wait_event("TicketSubmitted", ticket="TICKET-2")
    assert d.stop() == 0


@pytest.mark.integration
def test_without_redis_the_daemon_refuses_to_start_and_says_how_to_fix_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(tmp_path))
    out = subprocess.run([JBCTL, "daemon"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    for hint in ("no Redis configured", "JETBOX_REDIS_URL", str(tmp_path / "jetbox.env"), "jbctl up", "--no-dispatch"):
        assert hint in out.stderr, hint
    assert not (tmp_path / "jetbox.db").exists()  # refused before anything was created


@pytest.mark.integration
def test_a_recording_only_daemon_says_so_in_status_and_jbctl_status(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()  # the harness passes --no-dispatch when no Redis is configured
    try:
        atomic_write(d.tickets / "TICKET-1.yaml", valid_ticket("TICKET-1"))
        d.wait_event("TicketSubmitted", ticket="TICKET-1")
        wait_for("STATUS= with the warning", lambda: any("NOT DISPATCHING" in m for m in d.messages))
        out = subprocess.run([JBCTL, "status"], env=d.env, capture_output=True, text=True, timeout=60)
        assert f"daemon: pid {d.proc.pid if d.proc else 0}:" in out.stdout
        assert "NOT DISPATCHING: no Redis" in out.stdout
    finally:
        assert d.stop() == 0
    out = subprocess.run([JBCTL, "status"], env=d.env, capture_output=True, text=True, timeout=60)
    assert "daemon: not running on this home: tickets wait" in out.stdout  # its status file went; TICKET-1 waits


@pytest.mark.integration
def test_status_line_counts_tickets_awaiting_approval(home: Path) -> None:
    """STATUS= (and so `systemctl status` and `jbctl status`) says how many tickets wait for a person."""
    from types import SimpleNamespace

    settings = load_settings().model_copy(update={"redis_url": "unix:///nonexistent.sock"})
    daemon = Daemon(settings, [], notifier=Notifier({}), install_signals=False)
    tickets = {
        "T1": SimpleNamespace(status="running", awaiting="P-1", held=None, tasks={}),
        "T2": SimpleNamespace(status="running", awaiting=None, held=None, tasks={}),
        "T3": SimpleNamespace(status="completed", awaiting=None, held=None, tasks={}),
    }
    running = {"T1": None, "T2": None}  # the state's index of running tickets (what the line walks)
    state = SimpleNamespace(tickets=tickets, deferred={}, paused=None, running=running)
    daemon.handler = SimpleNamespace(state=state)  # type: ignore[assignment]
    text = daemon._status_text()
    assert text.startswith("tickets: 2 running;") and "; 1 awaiting approval (jbctl proposals)" in text
    assert "NOT DISPATCHING" not in text
    tickets["T1"].awaiting = None
    assert "awaiting approval" not in daemon._status_text()


class _ReadyRecorder(Notifier):
    """Keeps what READY=1 said, and how many tickets the daemon held then."""

    def __init__(self) -> None:
        super().__init__({})
        self.at_ready: tuple[str | None, int] | None = None
        self.daemon: Daemon | None = None

    def ready(self, status: str | None = None) -> bool:
        held = len(self.daemon.handler.state.tickets) if self.daemon and self.daemon.handler else -1
        self.at_ready = (status, held)
        return False


@pytest.mark.integration
def test_a_full_folder_signals_ready_first_and_is_taken_in_batches(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of files at start-up would hold READY=1 past systemd's start timeout: above the
    backlog limit READY comes first, saying how many files are pending, and the loop reads them."""
    from daemon import service

    monkeypatch.setattr(service, "READY_BACKLOG", 4)  # stands for the 256 of a real start
    settings = load_settings()
    settings.tickets_path.mkdir(parents=True, exist_ok=True)
    for i in range(1, 11):
        atomic_write(settings.tickets_path / f"TICKET-{i}.yaml", valid_ticket(f"TICKET-{i}"))
    notifier = _ReadyRecorder()
    daemon = Daemon(settings, [], notifier=notifier, install_signals=False)
    notifier.daemon = daemon
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        assert daemon.ready.wait(30)
        assert notifier.at_ready is not None
        status, held = notifier.at_ready
        assert held == 0 and status is not None and "intake: 10 files pending" in status, notifier.at_ready
        wait_for("every file taken", lambda: daemon.handler is not None and len(daemon.handler.state.tickets) == 10)
        wait_for("the backlog gone from STATUS", lambda: "intake:" not in daemon._status_text())
    finally:
        daemon.stop()
        thread.join(15)
    assert not thread.is_alive()


@pytest.mark.integration
def test_a_restart_starts_from_the_state_snapshot_and_replays_the_tail(home: Path) -> None:
    """A clean stop writes the decider's state; the next start folds only what came after it, and
    ends with the state a full replay gives."""
    from datetime import UTC

    from daemon.handler import load_state
    from tests.helpers import make_ticket, submit

    settings = load_settings()
    settings.tickets_path.mkdir(parents=True, exist_ok=True)
    atomic_write(settings.tickets_path / "TICKET-1.yaml", valid_ticket("TICKET-1"))

    def run_once() -> Daemon:
        daemon = Daemon(settings, [], notifier=Notifier({}), install_signals=False)
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            assert daemon.ready.wait(30)
            wait_for("TICKET-1", lambda: daemon.handler is not None and "TICKET-1" in daemon.handler.state.tickets)
        finally:
            daemon.stop()
            thread.join(15)
        return daemon

    first = run_once()
    assert first._snapshot_seq == 0 and (settings.home / "state.snapshot").exists()
    assert first.store is not None
    CommandHandler(first.store).handle(submit(make_ticket("TICKET-2"), datetime.now(UTC)))  # while it is down
    second = run_once()
    assert second._snapshot_seq > 0 and second.handler is not None and second.store is not None
    assert "TICKET-2" in second.handler.state.tickets
    assert second.handler.state == load_state(second.store)


@pytest.mark.integration
def test_snapshots_every_n_events_bound_the_replay_after_a_crash(tmp_path: Path) -> None:
    """`snapshot_every`: a daemon killed with -9 starts from its last periodic snapshot; one that is
    corrupt is not used, and the log says why."""
    daemon = DaemonProc(tmp_path, env={"JETBOX_SNAPSHOT_EVERY": "5"}).start()
    try:
        for i in range(1, 4):
            atomic_write(daemon.tickets / f"TICKET-{i}.yaml", valid_ticket(f"TICKET-{i}"))
        wait_for("a periodic snapshot", lambda: "state snapshot written at seq" in daemon.log_text(), timeout=30)
    finally:
        daemon.kill9()  # no clean stop: no snapshot at the end
    text = daemon.log_text()
    written = int(text.split("state snapshot written at seq ")[-1].split()[0])
    assert written >= 5
    daemon.start()
    daemon.stop()
    text = daemon.log_text()
    assert f"state: snapshot at seq {written}, " in text, text[-3000:]
    (tmp_path / "state.snapshot").write_bytes(b"torn")
    (tmp_path / "state.snapshot.prev").unlink(missing_ok=True)
    daemon.start()
    daemon.stop()
    assert "state snapshot not used (not a snapshot of this format): the whole log replayed" in daemon.log_text()
