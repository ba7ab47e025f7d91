"""Safety gates with real processes: the network guard, the command allowlist, loops, deadlines, the key file.

Each case ends in the stated event with nothing else changed, and `jbctl replay --check` equal.
Network tests only ever use loopback addresses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import Setup
from tests.helpers import accepted
from tests.jbdaemon import JBCTL

pytestmark = pytest.mark.integration  # starts processes or trains


def _violations(s: Setup) -> list[dict]:
    return [r["data"] for r in s.daemon.rows() if r["type"] == "SafetyViolation"]


@pytest.mark.parametrize("swallow", [False, True])
def test_connection_to_an_unlisted_loopback_port_is_denied(running: Setup, listener: socket.socket,
                                                           swallow: bool) -> None:
    port = listener.getsockname()[1]
    running.drop("TICKET-1", f"  - {{id: a, kind: diag, retries: 3, with: {{connect: '127.0.0.1:{port}', "
                 f"swallow: {str(swallow).lower()}}}}}\n")
    assert running.wait_done("TICKET-1") == "TicketFailed"
    v = _violations(running)
    assert len(v) == 1 and v[0]["what"] == "network" and f"127.0.0.1:{port}" in v[0]["detail"]
    failed = [r["data"] for r in running.daemon.rows() if r["type"] == "AttemptFailed"]
    assert len(failed) == 1 and failed[0]["retry_at"] is None  # no retry for a violation
    assert not accepted(listener)
    running.assert_consistent()
    status = json.loads(running.jbctl("status", "TICKET-1", "--json").stdout)[0]
    assert status["trouble"]["violations"] == 1
    audit = json.loads(running.jbctl("audit", "--json").stdout)
    assert any(a["type"] == "SafetyViolation" and "127.0.0.1" in a["detail"] for a in audit)


def test_name_lookup_is_denied(running: Setup) -> None:
    running.drop("TICKET-2", "  - {id: a, kind: diag, with: {resolve: example.invalid}}\n")
    assert running.wait_done("TICKET-2") == "TicketFailed"
    assert "name lookup of example.invalid" in _violations(running)[0]["detail"]
    running.assert_consistent()


def test_network_allowed_when_the_ticket_says_so(running: Setup, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    running.drop("TICKET-3", f"  - {{id: a, kind: diag, with: {{connect: '127.0.0.1:{port}'}}}}\n",
                 "constraints: {network: allow}\n")
    assert running.wait_done("TICKET-3") == "TicketCompleted"
    assert accepted(listener)
    assert _violations(running) == []


def test_check_subprocess_has_no_network(running: Setup, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    running.drop("TICKET-4", f"  - {{id: c, kind: check, with: {{run: [python, -c, \"{code}\"]}}}}\n")
    # python is no default and -c is inline code: it runs only once a human approved the code.
    opened = running.daemon.wait_event("ProposalOpened", ticket="TICKET-4")
    assert opened["data"]["candidate"]["code"] == "-c"
    approve = running.jbctl("approve", opened["data"]["proposal"], "--yes")
    assert approve.returncode == 0, approve.stderr
    assert running.wait_done("TICKET-4") == "TicketFailed"
    failed = [r["data"] for r in running.daemon.rows() if r["type"] == "AttemptFailed"]
    assert "exited with status 1" in failed[0]["error"]
    assert not accepted(listener)


def test_binary_outside_allowlist_opens_a_policy_proposal(running: Setup) -> None:
    running.drop("TICKET-5", "  - {id: c, kind: check, with: {run: [echo, hello]}}\n")
    opened = running.daemon.wait_event("ProposalOpened", ticket="TICKET-5")
    assert opened["data"]["kind"] == "policy" and opened["data"]["candidate"]["binary"] == "echo"
    assert [r for r in running.daemon.rows() if r["type"] == "AttemptScheduled"] == []  # nothing ran
    approve = running.jbctl("approve", "P-1", "--yes")
    assert approve.returncode == 0, approve.stderr
    assert running.wait_done("TICKET-5") == "TicketCompleted"
    running.assert_consistent()


def test_run_check_with_dotdot_argument_is_refused(running: Setup) -> None:
    running.drop("TICKET-6", "  - {id: a, kind: diag}\n", "acceptance: [{run: [wc, ../escape.py]}]\n")
    assert running.wait_done("TICKET-6") == "TicketFailed"
    failed = [r["data"] for r in running.daemon.rows() if r["type"] == "AttemptFailed"]
    assert "escapes the workspace" in failed[0]["error"] and failed[0]["task"] == "accept-1"
    running.assert_consistent()


def test_identical_failures_become_a_loop(running: Setup) -> None:
    running.drop("TICKET-7", "  - {id: a, kind: diag, retries: 6, with: {fail_attempts: 10, error: 'disk full'}}\n")
    loop = running.daemon.wait_event("LoopDetected", ticket="TICKET-7", timeout=60)
    assert loop["data"]["pattern"] == "repeat" and loop["data"]["count"] == 3
    running.daemon.wait_event("TaskBlocked", ticket="TICKET-7")
    status = json.loads(running.jbctl("status", "TICKET-7", "--json").stdout)[0]
    assert status["state"] == "running" and "jbctl retry" in status["waiting_on"]
    assert len([r for r in running.daemon.rows() if r["type"] == "AttemptScheduled"]) == 3
    running.assert_consistent()


def test_deadline_cancels_running_job(running: Setup) -> None:
    running.drop("TICKET-8", "  - {id: a, kind: diag, with: {steps: 100, sleep: 60}}\n",
                 "constraints: {max_wall_minutes: 0.05}\n")
    failed = running.daemon.wait_event("TicketFailed", ticket="TICKET-8", timeout=30)
    assert "deadline exceeded" in failed["data"]["reason"]
    conn = running.conn()
    from tests.jbdaemon import wait_for

    wait_for("the job to stop", lambda: not conn.exists("jetbox:hb:jetbox__TICKET-8__a__1"), timeout=20)
    running.assert_consistent()


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    key = home / "secret.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home), JETBOX_REDIS_URL="unix:///nonexistent.sock")
    for argv in (["worker", "--burst"], ["daemon"]):
        proc = subprocess.run([JBCTL, *argv], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "readable by others" in proc.stderr and f"chmod 600 {key}" in proc.stderr
    assert not (home / "jetbox.db").exists()  # refused before anything started
