"""Dispatch end to end with real processes: a private redis-server, `jbctl daemon`, `jbctl worker`.

Each fault test asserts that the ticket still completes, nothing is recorded twice, and that
`jbctl replay --check` and `jbctl verify` pass afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from cli.embedded import start_redis
from schema.wire import REPORT_STREAM, Report, load_secret
from tests.harness import FAST, Setup
from tests.jbdaemon import JBCTL, atomic_write, wait_for

pytestmark = pytest.mark.integration  # starts processes or trains


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path / "home")
    try:
        yield s
    finally:
        s.close()
        assert s.redis.proc.poll() is not None  # no orphan redis-server


TWO_STEPS = (
    "  - {id: a, kind: diag, with: {sleep: 0.2, metrics: {score: 0.8}}}\n"
    "  - {id: b, kind: diag, needs: [a], with: {sleep: 0.1}}\n"
)


def test_ticket_runs_end_to_end_on_a_real_worker(setup: Setup) -> None:
    setup.daemon.start()
    setup.worker("cpu")
    setup.drop("TICKET-1", TWO_STEPS, "acceptance: [{metric: a.score, op: '>=', value: 0.5}]\n")
    assert setup.wait_done("TICKET-1") == "TicketCompleted"
    types = [e["type"] for e in setup.daemon.jbctl_events("--ticket", "TICKET-1")]
    assert types[:3] == ["TicketSubmitted", "AttemptScheduled", "AttemptStarted"]
    assert types[-2:] == ["AcceptanceEvaluated", "TicketCompleted"]
    setup.assert_consistent()
    # Standard RQ tooling sees our queues and workers.
    info = subprocess.run(
        [
            str(Path(JBCTL).parent / "rq"),
            "info",
            "--url",
            setup.redis.url,
            "--serializer",
            "rq.serializers.JSONSerializer",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert "cpu" in info.stdout and "worker" in info.stdout.lower()


def test_failing_job_is_retried_then_succeeds(setup: Setup) -> None:
    setup.daemon.start()
    setup.worker("cpu")
    setup.drop("TICKET-2", "  - {id: a, kind: diag, retries: 2, with: {fail_attempts: 1, error: flaky disk}}\n")
    assert setup.wait_done("TICKET-2") == "TicketCompleted"
    failed = [e for e in setup.daemon.rows() if e["type"] == "AttemptFailed"]
    assert len(failed) == 1 and "flaky disk" in failed[0]["data"]["error"]
    setup.assert_consistent()


def test_worker_killed_mid_job_resumes_from_checkpoint(setup: Setup) -> None:
    setup.daemon.start()
    victim = setup.worker("cpu")
    setup.drop("TICKET-3", "  - {id: a, kind: diag, retries: 2, with: {steps: 40, sleep: 6, checkpoints: 8}}\n")
    setup.daemon.wait_event("CheckpointSaved", ticket="TICKET-3", timeout=30)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    setup.worker("cpu")
    assert setup.wait_done("TICKET-3", timeout=90) == "TicketCompleted"
    rows = setup.daemon.rows()
    failed = [e for e in rows if e["type"] == "AttemptFailed"]
    assert failed and "worker lost" in failed[0]["data"]["error"]
    done = next(e for e in rows if e["type"] == "AttemptSucceeded")
    assert done["data"]["attempt"] == 2 and done["data"]["metrics"]["resumed_from"] > 0
    setup.assert_consistent()


def test_daemon_killed_between_dispatch_and_reports(setup: Setup) -> None:
    setup.daemon.start()
    setup.drop("TICKET-4", TWO_STEPS)
    setup.daemon.wait_event("AttemptScheduled", ticket="TICKET-4", task="a")
    setup.daemon.kill9()  # dispatched (maybe), no report applied yet
    setup.worker("cpu")
    time.sleep(1.0)  # reports pile up in the stream while the daemon is down
    setup.daemon.start()
    setup.daemon.wait_event("AttemptStarted", ticket="TICKET-4", task="b", timeout=30)
    setup.daemon.kill9()  # while reports are arriving
    setup.daemon.start()
    assert setup.wait_done("TICKET-4") == "TicketCompleted"
    setup.assert_consistent()


def test_redis_replaced_by_an_empty_one(setup: Setup) -> None:
    setup.daemon.start()
    setup.drop(
        "TICKET-5",
        "  - {id: a, kind: diag, retries: 3, with: {steps: 10, sleep: 3, checkpoints: 5}}\n"
        "  - {id: b, kind: diag, with: {sleep: 0.1}}\n",
    )
    setup.worker("cpu")
    setup.daemon.wait_event("AttemptStarted", ticket="TICKET-5", task="a", timeout=30)
    # Stop Redis and start a fresh, empty one on the same socket while a job runs and one waits.
    setup.redis.stop()
    time.sleep(0.5)
    setup.redis = start_redis(setup.home / "run")
    setup.worker("cpu")  # the old worker may have died with its connection
    assert setup.wait_done("TICKET-5", timeout=150) == "TicketCompleted"
    setup.assert_consistent()


def _send(conn: redis.Redis, fields: dict[str, str]) -> None:
    conn.xadd(REPORT_STREAM, fields)  # type: ignore[arg-type]


def test_forged_replayed_and_stale_reports(setup: Setup) -> None:
    setup.daemon.start()
    setup.drop("TICKET-6", "  - {id: a, kind: diag, retries: 2, with: {fail_attempts: 1, steps: 3, sleep: 1}}\n")
    setup.daemon.wait_event("AttemptScheduled", ticket="TICKET-6", task="a")
    conn = setup.conn()
    key = load_secret(setup.home / "secret.key", create=False)
    good = Report(kind="succeeded", ticket="TICKET-6", task="a", attempt=1, seq=99, worker="evil", body={"metrics": {}})
    # 1. A bad signature: recorded as a violation, nothing else changes.
    forged = good.signed(b"not-the-key" * 4)
    _send(conn, forged)
    v = setup.daemon.wait_event("SafetyViolation", what="forged_report")
    assert v["data"]["ticket"] == "TICKET-6"
    assert not [e for e in setup.daemon.rows() if e["type"] == "AttemptSucceeded"]
    # 2. Unsigned garbage.
    _send(conn, {"report": "{not json", "sig": "x"})
    wait_for("second violation", lambda: len([e for e in setup.daemon.rows() if e["type"] == "SafetyViolation"]) == 2)
    # Run it for real: attempt 1 fails, attempt 2 succeeds.
    setup.worker("cpu")
    assert setup.wait_done("TICKET-6", timeout=60) == "TicketCompleted"
    before = len(setup.daemon.rows())
    # 3. A validly signed report for the old attempt, and 4. an old report replayed: both ignored.
    _send(conn, good.signed(key))
    replay = conn.xrange(REPORT_STREAM, count=3)[2][1]
    conn.xadd(REPORT_STREAM, replay)
    setup.daemon.barrier("TICKET-60")
    after = [e for e in setup.daemon.rows()[before:] if e["data"].get("ticket") == "TICKET-6"]
    assert after == []
    setup.assert_consistent()


def test_foreign_job_pushed_into_queue_is_refused(setup: Setup, tmp_path: Path) -> None:
    setup.daemon.start()
    marker = tmp_path / "pwned"
    q = Queue("cpu", connection=setup.conn(), serializer=JSONSerializer)
    q.enqueue_call(func="os.system", args=(f"touch {marker}",), job_id="evil-1")
    setup.worker("cpu")
    v = setup.daemon.wait_event("SafetyViolation", what="foreign_job", timeout=30)
    assert "os.system" in v["data"]["detail"]
    assert not marker.exists()
    # A signed envelope of a kind outside the allowlist is refused too.
    from schema.wire import Envelope

    key = load_secret(setup.home / "secret.key", create=False)
    env = Envelope(kind="shell", ticket="TICKET-7", task="a", attempt=1, params={"cmd": "touch x"})
    q.enqueue_call(func="workers.entry.run_job", args=(env.signed(key),), job_id="evil-2")
    bad_sig = {"body": env.model_dump(mode="json"), "sig": "0" * 64}
    q.enqueue_call(func="workers.entry.run_job", args=(bad_sig,), job_id="evil-3")
    setup.daemon.wait_event("SafetyViolation", what="forged_envelope", timeout=30)
    setup.assert_consistent()


def _event_types(rows: list[dict[str, Any]]) -> list[str]:
    return [r["type"] for r in rows]


def test_cancel_stops_a_running_job(setup: Setup) -> None:
    setup.daemon.start()
    setup.worker("cpu")
    path = setup.drop("TICKET-8", "  - {id: a, kind: diag, with: {steps: 100, sleep: 50}}\n")
    setup.daemon.wait_event("AttemptStarted", ticket="TICKET-8")
    path.unlink()  # removing the file cancels the ticket
    setup.daemon.wait_event("TicketCancelled", ticket="TICKET-8")
    conn = setup.conn()
    wait_for("the job to stop", lambda: not conn.exists("jetbox:hb:jetbox__TICKET-8__a__1"), timeout=20)
    assert "AttemptSucceeded" not in _event_types(setup.daemon.rows())
    setup.assert_consistent()


def test_jbctl_up_runs_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "uphome"
    tickets = home / "tickets"
    tickets.mkdir(parents=True)
    atomic_write(tickets / "TICKET-9.yaml", f"id: TICKET-9\ntitle: t\ngoal: g\nsteps:\n{TWO_STEPS}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home), **FAST)
    proc = subprocess.run([JBCTL, "up", "--exit-when-idle"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every ticket has ended" in proc.stdout
    status = subprocess.run([JBCTL, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)[0]["state"] == "completed"
    # Ctrl-C on a running `up` stops every child: no orphan redis-server or worker.
    up = subprocess.Popen([JBCTL, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert up.stdout is not None
    pid_line = wait_for("redis pid", lambda: up.stdout.readline(), timeout=30)
    redis_pid = int(pid_line.split("pid ")[1].rstrip(")\n"))
    time.sleep(2)
    up.send_signal(signal.SIGINT)
    assert up.wait(30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(redis_pid, 0)
    leftovers = subprocess.run(["pgrep", "-f", f"{home}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_run_detach_starts_a_dedicated_worker_that_exits_when_done(setup: Setup, tmp_path: Path) -> None:
    setup.daemon.start()
    src = tmp_path / "TICKET-10.yaml"
    src.write_text(f"id: TICKET-10\ntitle: t\ngoal: g\nsteps:\n{TWO_STEPS}")
    out = setup.jbctl("run", str(src), "--detach")
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split("detached worker pid ")[1].split()[0])
    assert setup.wait_done("TICKET-10") == "TicketCompleted"
    workers = {r["data"]["worker"] for r in setup.daemon.rows() if r["type"] == "AttemptStarted"}
    assert len(workers) == 1 and workers.pop().endswith(f":{pid}")  # the dedicated worker ran both jobs
    wait_for(
        "the dedicated worker to exit",
        lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(),
        timeout=30,
    )
    status = setup.jbctl("status", "TICKET-10")
    assert f"background worker: pid {pid}" in status.stdout
    # --background where systemd is not the init system says so in one line and suggests --detach.
    if not Path("/run/systemd/system").is_dir():
        bg = setup.jbctl("run", str(src), "--background")
        assert bg.returncode == 2 and "use --detach" in bg.stderr and len(bg.stderr.strip().splitlines()) == 1


def test_systemd_run_arguments_as_built(tmp_path: Path) -> None:
    from cli.run_cmds import JBCTL as jbctl_path
    from cli.run_cmds import systemd_run_argv
    from schema.settings import Settings
    from tests.helpers import make_ticket

    ticket = make_ticket("TICKET-11", extra="constraints: {memory: 6G, max_wall_minutes: 90}\n")
    settings = Settings(home=tmp_path, redis_url="redis://127.0.0.1:6390/0")
    argv = systemd_run_argv(ticket, settings, "1", user=True)
    assert argv[:4] == ["systemd-run", "--user", "--unit=jetbox-run-TICKET-11", "--collect"]
    assert ["-p", f"MemoryMax={6 << 30}"] == argv[argv.index("-p") : argv.index("-p") + 2]
    assert "RuntimeMaxSec=5400" in argv and "--setenv=CUDA_VISIBLE_DEVICES=1" in argv
    assert f"--setenv=JETBOX_HOME={tmp_path}" in argv and "--setenv=JETBOX_REDIS_URL=redis://127.0.0.1:6390/0" in argv
    assert argv[-4:] == [jbctl_path, "worker", "--ticket", "TICKET-11"]
    assert not any(a.startswith("IPAddress") for a in argv)  # a user manager cannot attach the IP filter
    # The system manager (root's default): the ticket's network: deny becomes the kernel's IP filter,
    # with the TCP Redis as the one exception.
    argv = systemd_run_argv(ticket, settings, "1", user=False)
    assert argv[:3] == ["systemd-run", "--unit=jetbox-run-TICKET-11", "--collect"]
    assert "IPAddressDeny=any" in argv and "IPAddressAllow=127.0.0.1" in argv


@pytest.mark.integration
def test_a_dedicated_worker_outlives_a_redis_restart(tmp_path: Path) -> None:
    """`jbctl run`'s worker keeps its claim across a Redis restarted empty, and still exits when told."""
    import redis

    from cli.embedded import start_redis
    from schema.wire import dedicated_key, ended_key

    home = tmp_path / "home"
    server = start_redis(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home), JETBOX_REDIS_URL=server.url)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([JBCTL, "worker", "--ticket", "TICKET-9"], env=env, stdout=log, stderr=log)
    try:
        conn = redis.Redis(unix_socket_path=str(server.socket))
        wait_for("the claim", lambda: conn.exists(dedicated_key("TICKET-9")), timeout=30)
        server.stop()
        time.sleep(1.5)
        server = start_redis(tmp_path / "run")  # the same socket, empty
        conn = redis.Redis(unix_socket_path=str(server.socket))
        assert not conn.exists(dedicated_key("TICKET-9"))
        wait_for("the claim again", lambda: conn.exists(dedicated_key("TICKET-9")), timeout=15)
        assert worker.poll() is None
        conn.set(ended_key("TICKET-9"), "1")
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop()
        log.close()


@pytest.mark.integration
def test_a_worker_stopped_while_redis_is_down_exits(tmp_path: Path) -> None:
    """SIGTERM while Redis is away (`systemctl stop jetbox.target` stops both at once): the worker
    exits 0 instead of starting its loop again and waiting for systemd's SIGKILL."""
    server = start_redis(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(tmp_path / "home"), JETBOX_REDIS_URL=server.url)
    conn = redis.Redis(unix_socket_path=str(server.socket))
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([JBCTL, "worker", "--queue", "cpu"], env=env, stdout=log, stderr=log)
    try:
        wait_for("the worker to register", lambda: conn.scard("rq:workers"), timeout=30)
        server.stop()
        wait_for("a reconnect attempt", lambda: "could not connect" in log_path.read_text(), timeout=30)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, log_path.read_text()[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop()
