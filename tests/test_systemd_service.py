"""The rendered units under a real systemd: a service that runs the example tickets and survives kills.

One sandbox (systemd as PID 1 of private namespaces, see tests/systemd_sandbox.py) serves the whole
module; the tests run in file order and build on each other: install and start, the examples, kill -9
of the daemon, the watchdog, kill -9 of a worker mid-job, `jbctl run --background`, and a clean stop.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jbdaemon import wait_for
from tests.systemd_sandbox import SandboxUnavailable, SystemdSandbox

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tickets" / "examples"
JBCTL = str(Path(sys.executable).parent / "jbctl")
UNITS = Path("/run/systemd/system")  # inside the sandbox: its private tmpfs
DAEMON, TARGET = "jetbox-daemon.service", "jetbox.target"
CPU, GPU, REDIS = "jetbox-cpu-worker@0.service", "jetbox-worker@0.service", "jetbox-redis.service"
WATCHDOG_S = 5


class Install:
    def __init__(self, box: SystemdSandbox, home: Path) -> None:
        self.box, self.home, self.tickets = box, home, home / "tickets"

    def jbctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """jbctl inside the sandbox, on this home (with this checkout's code when PYTHONPATH names it)."""
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
        return self.box.run([JBCTL, "--home", str(self.home), *args], env=env, check=check, timeout=timeout)

    def events(self, where: str = "1=1") -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.home / 'jetbox.db'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(f"SELECT * FROM events WHERE {where} ORDER BY seq").fetchall()
        except sqlite3.OperationalError:
            return []  # not migrated yet
        finally:
            conn.close()

    def ticket_state(self, tid: str) -> str | None:
        conn = sqlite3.connect(f"file:{self.home / 'jetbox.db'}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT state FROM tickets WHERE id = ?", (tid,)).fetchone()
        except sqlite3.OperationalError:
            return None
        finally:
            conn.close()
        return row[0] if row else None

    def wait_completed(self, *tids: str, timeout: float = 300.0) -> None:
        def done() -> bool:
            states = {t: self.ticket_state(t) for t in tids}
            bad = {t: s for t, s in states.items() if s in ("failed", "cancelled")}
            assert not bad, f"tickets ended badly: {bad}\n{self.jbctl('status', '--all', check=False).stdout}"
            return all(s == "completed" for s in states.values())

        try:
            wait_for(f"{tids} to complete", done, timeout=timeout, every=0.5)
        except AssertionError:
            print(self.jbctl("status", "--all", check=False).stdout)
            for unit in (DAEMON, CPU, GPU):
                print(f"--- {unit}\n{self.box.journal(unit)[-3000:]}")
            raise

    def main_pid(self, unit: str) -> int:
        return int(self.box.show(unit, "MainPID"))

    def drop(self, name: str, text: str | None = None) -> None:
        tmp = self.tickets / f".{name}.tmp"
        tmp.write_text(text if text is not None else (EXAMPLES / name).read_text())
        tmp.rename(self.tickets / name)


@pytest.fixture(scope="module")
def box() -> Iterator[SystemdSandbox]:
    try:
        sandbox = SystemdSandbox(keep=[ROOT, Path(sys.prefix)]).start()
    except SandboxUnavailable as exc:
        pytest.skip(f"no systemd sandbox here: {exc}")
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(scope="module")
def inst(box: SystemdSandbox) -> Iterator[Install]:
    # Not under /tmp: the sandbox's /tmp is its own. Removed afterwards.
    home = ROOT / ".test-systemd" / uuid.uuid4().hex[:8]
    home.mkdir(parents=True)
    try:
        yield Install(box, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_install_units_and_start_the_target(box: SystemdSandbox, inst: Install) -> None:
    out = inst.jbctl("install-units", "--output", str(UNITS), "--workers", "cpu=1,gpu=1", "--run-as", "root")
    assert "jetbox.env" in out.stdout
    env = (inst.home / "jetbox.env").read_text()
    assert f"JETBOX_REDIS_URL=unix://{inst.home}/run/redis.sock" in env.splitlines()
    # Faster failure detection for the kill tests, the way an operator tunes an installation: the
    # environment file for settings, a drop-in for unit properties.
    with (inst.home / "jetbox.env").open("a") as fh:
        fh.write("JETBOX_HEARTBEAT_SECONDS=1\nJETBOX_HEARTBEAT_TIMEOUT_SECONDS=6\nJETBOX_RESCAN_SECONDS=2\n")
    dropin = UNITS / f"{DAEMON}.d"
    box.run(["mkdir", "-p", str(dropin)])
    conf = f"[Service]\\nWatchdogSec={WATCHDOG_S}s\\nTimeoutAbortSec=3s\\n"
    box.run(["sh", "-c", f"printf '{conf}' > {dropin}/test.conf"])
    box.systemctl("daemon-reload")
    box.systemctl("start", TARGET)
    for unit in (REDIS, DAEMON, CPU, GPU):
        wait_for(f"{unit} active", lambda u=unit: box.show(u, "ActiveState") == "active", timeout=60)
    assert box.show(DAEMON, "Type") == "notify"
    assert box.show(DAEMON, "WatchdogUSec") == f"{WATCHDOG_S}s"
    status = box.systemctl("status", DAEMON, check=False).stdout
    assert "Status:" in status and "tickets:" in status, status  # the daemon's STATUS= line
    # The workers' kernel-level network policy is in force.
    assert box.show(CPU, "IPAddressDeny") != ""


def test_the_examples_complete_and_survive_a_killed_daemon(box: SystemdSandbox, inst: Install) -> None:
    before = inst.main_pid(DAEMON)
    inst.drop("TICKET-5.yaml")
    inst.drop("TICKET-3.yaml")
    wait_for("TICKET-5 recorded", lambda: inst.ticket_state("TICKET-5"), timeout=60)
    box.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", DAEMON)
    wait_for("a new daemon", lambda: inst.main_pid(DAEMON) not in (0, before), timeout=60)
    wait_for("the daemon ready again", lambda: box.show(DAEMON, "ActiveState") == "active", timeout=60)
    assert int(box.show(DAEMON, "NRestarts")) >= 1
    inst.wait_completed("TICKET-5", "TICKET-3")
    submitted = [r["stream"] for r in inst.events("type = 'TicketSubmitted'")]
    assert sorted(submitted) == ["TICKET-3", "TICKET-5"]  # the restart recorded nothing twice
    inst.jbctl("replay", "--check")
    inst.jbctl("verify")


def test_a_wedged_daemon_is_killed_by_the_watchdog_and_restarted(box: SystemdSandbox, inst: Install) -> None:
    before, restarts = inst.main_pid(DAEMON), int(box.show(DAEMON, "NRestarts"))
    box.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", DAEMON)
    stopped = time.monotonic()
    wait_for("a restart after the watchdog", lambda: inst.main_pid(DAEMON) not in (0, before), timeout=60)
    took = time.monotonic() - stopped
    wait_for("the daemon active again", lambda: box.show(DAEMON, "ActiveState") == "active", timeout=60)
    assert int(box.show(DAEMON, "NRestarts")) == restarts + 1
    assert "Watchdog timeout" in box.run(["journalctl", "--no-pager", "-u", DAEMON], check=False).stdout
    # WatchdogSec, then TimeoutAbortSec (SIGABRT to a stopped process waits for SIGKILL), then RestartSec.
    assert took < WATCHDOG_S + 3 + 2 + 15, took


def test_a_worker_killed_mid_job_is_restarted_and_the_attempt_resumes(box: SystemdSandbox, inst: Install) -> None:
    ticket = (
        "id: TICKET-41\ntitle: long checkpointed step\ngoal: survive a killed worker\n"
        "steps:\n  - {id: long, kind: diag, queue: cpu, with: {sleep: 6, steps: 30, checkpoints: 10}}\n"
    )
    inst.drop("TICKET-41.yaml", ticket)
    wait_for(
        "a checkpoint of attempt 1",
        lambda: inst.events("stream = 'TICKET-41' AND type = 'CheckpointSaved'"),
        timeout=120,
        every=0.2,
    )
    unit, pid = CPU, inst.main_pid(CPU)
    box.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", unit)
    wait_for(f"{unit} restarted", lambda: inst.main_pid(unit) not in (0, pid), timeout=60)
    inst.wait_completed("TICKET-41", timeout=180)
    results = [json.loads(r["data"]) for r in inst.events("stream = 'TICKET-41' AND type = 'AttemptSucceeded'")]
    assert len(results) == 1 and results[0]["attempt"] >= 2
    assert results[0]["metrics"]["resumed_from"] > 0  # from its checkpoint, not from zero


def test_run_background_creates_a_transient_unit_with_the_tickets_limits(box: SystemdSandbox, inst: Install) -> None:
    ticket = (
        "id: TICKET-42\ntitle: background\ngoal: run in a unit of its own\n"
        "steps:\n  - {id: a, kind: diag, with: {sleep: 3, steps: 6}}\n"
        "constraints: {max_wall_minutes: 5, memory: 2G, network: deny}\n"
    )
    src = inst.home / "TICKET-42.yaml"
    src.write_text(ticket)
    out = inst.jbctl("run", str(src), "--background")
    unit = "jetbox-run-TICKET-42.service"
    assert "jetbox-run-TICKET-42" in out.stdout and "journalctl -u" in out.stdout
    assert box.show(unit, "MemoryMax") == str(2 << 30)
    assert box.show(unit, "RuntimeMaxUSec") == "5min"
    assert box.show(unit, "IPAddressDeny") != ""
    inst.wait_completed("TICKET-42", timeout=120)
    # The dedicated worker ran the job, then exited once the ticket ended.
    jobs = [json.loads(r["data"]) for r in inst.events("stream = 'TICKET-42' AND type = 'AttemptStarted'")]
    assert jobs
    wait_for(f"{unit} gone", lambda: box.show(unit, "ActiveState") in ("inactive", ""), timeout=60)
    assert "jetbox worker" in box.journal(unit).lower() or "Jetbox worker for TICKET-42" in box.run(
        ["journalctl", "--no-pager", "-u", unit], check=False
    ).stdout


def test_status_shows_the_daemon(inst: Install) -> None:
    out = inst.jbctl("status").stdout
    assert "daemon: pid" in out and "tickets:" in out


def test_stopping_the_target_leaves_nothing_behind(box: SystemdSandbox, inst: Install) -> None:
    box.systemctl("stop", TARGET)
    # The stop propagates (PartOf=) as jobs of their own, which systemctl does not wait for.
    for unit in (DAEMON, CPU, GPU, REDIS):
        wait_for(f"{unit} stopped", lambda u=unit: box.show(u, "ActiveState") in ("inactive", "failed"), timeout=60)
    for unit in (DAEMON, CPU, GPU):  # Jetbox's own processes exit cleanly on SIGTERM, not killed after a timeout
        assert box.show(unit, "Result") == "success", unit
    # (Redis keeps nothing; in this sandbox it is sometimes recorded as killed on stop, so only "gone" is checked.)
    procs = box.processes()
    assert any("systemd" in p for p in procs)  # the check sees the sandbox's processes
    left = [p for p in procs if "jbctl" in p or "redis-server" in p]
    assert not left, procs
    assert not (inst.home / "run" / "redis.sock").exists() or not _answers(inst.home / "run" / "redis.sock")


def _answers(sock: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_the_redis_unit_listens_on_tcp_with_its_password(box: SystemdSandbox, inst: Install) -> None:
    """`install-units --listen` (for workers on other hosts) under systemd: the Redis unit starts with
    its 0600 configuration file (the password is not on its command line), answers on TCP only to
    the password, and the local URL in jetbox.env (which carries it) reaches it over the unix socket.
    Run last: it re-installs the units of this module's home."""
    import socket

    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--output", str(UNITS), "--workers", "cpu=1,gpu=1", "--run-as", "root", "--listen", f"127.0.0.1:{port}"]
    inst.jbctl("install-units", *args)
    box.systemctl("daemon-reload")
    box.systemctl("start", REDIS)
    try:
        wait_for(f"{REDIS} active", lambda: box.show(REDIS, "ActiveState") == "active", timeout=60)
        password = (inst.home / "redis.password").read_text().strip()
        assert password not in box.show(REDIS, "ExecStart")
        assert redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5).ping()
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        env = dict(line.split("=", 1) for line in (inst.home / "jetbox.env").read_text().splitlines() if "=" in line)
        assert redis.Redis.from_url(env["JETBOX_REDIS_URL"], socket_timeout=5).ping()
    finally:
        box.systemctl("stop", REDIS, check=False)
