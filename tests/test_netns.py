"""Network denial that the kernel enforces: C code and child processes cannot get past `network: deny`.

The in-process guard patches Python's sockets; these jobs go around it (libc's connect through
ctypes, a child Python process). The worker gives each `network: deny` job a network namespace of
its own (workers/netns.py), so both are refused by the kernel and recorded as a SafetyViolation.
Only loopback addresses are used; the listener proves nothing got through.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from tests.harness import Setup
from tests.helpers import accepted
from workers.netns import JobNamespace, available, no_route_count

pytestmark = pytest.mark.integration


needs_isolation = pytest.mark.skipif(not available()[0], reason=f"no network namespaces here: {available()[1]}")


@needs_isolation
def test_a_job_namespace_refuses_and_counts_and_the_thread_comes_back(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def job() -> None:
        before = os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net")
        with JobNamespace() as ns:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1)
                seen["inside"] = "connected"
            except OSError as exc:
                seen["inside"] = exc.errno
            seen["count"] = no_route_count()
        seen["blocked"] = ns.blocked
        seen["same"] = os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net") == before
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # the network is back
            seen["after"] = "connected"

    t = threading.Thread(target=job)
    t.start()
    t.join()
    import errno

    assert seen == {"inside": errno.ENETUNREACH, "count": 1, "blocked": 1, "same": True, "after": "connected"}
    assert accepted(listener)  # the one connection made after leaving the namespace, nothing else
    assert not accepted(listener)


@needs_isolation
@pytest.mark.parametrize("via", ["ctypes", "child"])
@pytest.mark.parametrize("swallow", [False, True])
def test_c_code_and_child_processes_cannot_reach_the_network(
    running: Setup, listener: socket.socket, via: str, swallow: bool
) -> None:
    port = listener.getsockname()[1]
    running.drop(
        "TICKET-1",
        f"  - {{id: a, kind: diag, retries: 3, with: {{connect: '127.0.0.1:{port}', connect_via: {via}, "
        f"swallow: {str(swallow).lower()}}}}}\n",
    )
    assert running.wait_done("TICKET-1") == "TicketFailed"
    violations = [r["data"] for r in running.daemon.rows() if r["type"] == "SafetyViolation"]
    assert len(violations) == 1 and violations[0]["what"] == "network", violations
    assert "refused by the kernel" in violations[0]["detail"]
    failed = [r["data"] for r in running.daemon.rows() if r["type"] == "AttemptFailed"]
    assert len(failed) == 1 and failed[0]["retry_at"] is None  # a violation is not retried
    assert not accepted(listener)
    running.assert_consistent()


@needs_isolation
def test_network_allowed_jobs_keep_the_network(running: Setup, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    running.drop(
        "TICKET-2",
        f"  - {{id: a, kind: diag, with: {{connect: '127.0.0.1:{port}', connect_via: child}}}}\n",
        extra="constraints: {network: allow}\n",
    )
    assert running.wait_done("TICKET-2") == "TicketCompleted"
    assert accepted(listener)
