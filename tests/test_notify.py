"""sd_notify: the protocol against a socket the test binds, and a real daemon's READY/WATCHDOG/STOPPING."""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from daemon.notify import Notifier
from tests.jbdaemon import Daemon, atomic_write, valid_ticket


def _bound(abstract: bool, tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"jetbox-notify-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(2)
    return sock, address


def test_messages_reach_path_and_abstract_sockets(tmp_path: Path) -> None:
    for abstract in (False, True):
        sock, address = _bound(abstract, tmp_path)
        n = Notifier({"NOTIFY_SOCKET": address})
        assert n.enabled
        assert n.ready("up")
        assert sock.recv(4096).decode().splitlines() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=up"]
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()
        sock.close()


def test_no_socket_is_a_quiet_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready() is False and n.watchdog() is False


def test_a_vanished_manager_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert n.status("x") is False
    assert n.status("y") is False  # warned once, still no exception


def test_watchdog_interval_is_half_of_watchdog_usec(tmp_path: Path) -> None:
    sock, address = _bound(True, tmp_path)
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 0.2
    assert n.watchdog(now=100.0)
    assert not n.watchdog(now=100.1)  # not due yet
    assert n.watchdog_due_in(now=100.1) is not None and abs((n.watchdog_due_in(now=100.1) or 0) - 0.1) < 1e-9
    assert n.watchdog(now=100.2)
    assert [sock.recv(4096), sock.recv(4096)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    sock.close()


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None


@pytest.mark.integration
def test_real_daemon_sends_ready_watchdog_status_and_stopping(tmp_path: Path) -> None:
    d = Daemon(tmp_path, env={"WATCHDOG_USEC": "600000"})  # a ping every 0.3 s
    d.start(wait=False)
    assert d.proc is not None
    ready = d.wait_message("READY=1")
    assert f"MAINPID={d.proc.pid}" in ready.splitlines()
    assert any(line.startswith("STATUS=tickets: 0 running") for line in ready.splitlines())

    d.inbox.queue.clear()
    time.sleep(1.5)
    pings = [t for t, m in list(d.inbox.queue) if m == "WATCHDOG=1"]
    assert len(pings) >= 3, pings  # ~5 expected; the loop pings while idle
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.6  # never later than the full WATCHDOG_USEC

    atomic_write(d.tickets / "TICKET-1.yaml", valid_ticket("TICKET-1"))
    status = d.wait_message("STATUS=tickets: 1 running")
    assert "tasks: 1 queued, 0 running" in status

    assert d.stop() == 0
    assert d.messages[-1].splitlines()[0] == "STOPPING=1"
