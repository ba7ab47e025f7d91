"""Network denial that the kernel enforces: C code and child processes cannot get past `network: deny`.

The in-process guard patches Python's sockets; these jobs go around it (libc's connect through
ctypes, a child Python process). The worker gives each `network: deny` job a network namespace of
its own (workers/netns.py), so both are refused by the kernel and recorded as a SafetyViolation.
Only loopback addresses are used; the listener proves nothing got through.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

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
def test_a_kept_namespace_counts_each_jobs_own_attempts(listener: socket.socket) -> None:
    """A namespace kept for the next job starts its count where the job before left it (read once, as
    that job ended): each job is blamed for its own attempts, none for the ones before."""
    port = listener.getsockname()[1]
    seen: list[tuple[int, int]] = []

    def one_job(attempts: int) -> None:
        with JobNamespace() as ns:
            inode = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
            for _ in range(attempts):
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=1)
        seen.append((inode, ns.blocked))

    def jobs() -> None:
        for attempts in (1, 0, 2, 0):
            one_job(attempts)

    t = threading.Thread(target=jobs)
    t.start()
    t.join()
    assert [blocked for _, blocked in seen] == [1, 0, 2, 0]
    assert len({inode for inode, _ in seen}) == 1  # one namespace, kept
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


# --- a worker that reaches Redis over TCP (a joined host) -------------------------------------------


@needs_isolation
def test_the_workers_redis_connections_are_made_outside_the_jobs_namespace(tmp_path: Path) -> None:
    """The cause of false network violations on joined hosts, and its fix: a Redis connection re-made
    from a job's thread (or a thread the job started) is refused and counted when it is made in the
    job's namespace; `redis_client` makes it in the worker's own."""
    from cli.embedded import start_redis
    from workers.netns import redis_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_redis(tmp_path / "run", listen=("127.0.0.1", port), password="pw")
    try:
        assert server.tcp_url is not None
        admin = redis.Redis.from_url(server.url)
        plain, ours = redis.Redis.from_url(server.tcp_url), redis_client(server.tcp_url)
        plain.ping(), ours.ping()
        seen: dict[str, object] = {}

        def ping(name: str, conn: redis.Redis) -> None:
            try:
                seen[name] = conn.ping()
            except redis.ConnectionError as exc:
                seen[name] = type(exc).__name__

        def job() -> None:
            with JobNamespace() as ns:
                admin.client_kill_filter(laddr=f"127.0.0.1:{port}")  # every TCP connection: all must be re-made
                ping("plain", plain)
                ping("ours", ours)
                admin.client_kill_filter(laddr=f"127.0.0.1:{port}")
                child = threading.Thread(target=ping, args=("ours from a job's thread", ours))
                child.start()
                child.join()
            seen["blocked"] = ns.blocked

        t = threading.Thread(target=job)
        t.start()
        t.join()
        assert seen["plain"] == "ConnectionError" and seen["blocked"] == 1, seen  # plain's, and only plain's
        assert seen["ours"] is True and seen["ours from a job's thread"] is True, seen
    finally:
        server.stop()


# --- a worker that reaches Redis over TCP (a joined host) -------------------------------------------


@pytest.fixture
def tcp_running(tmp_path: Path) -> Iterator[Setup]:
    """As `running`, but the worker reaches Redis over TCP with a password (a joined host), and Redis
    drops connections idle for a second (`timeout 1`), so the worker's pool keeps reconnecting."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = Setup(tmp_path / "home", listen=("127.0.0.1", port), password="tcp-test-password")
    try:
        s.conn().config_set("timeout", 1)
        s.daemon.start()
        assert s.redis.tcp_url is not None
        s.worker("cpu", env={"JETBOX_REDIS_URL": s.redis.tcp_url})
        yield s
    finally:
        s.close()


@needs_isolation
def test_deny_jobs_on_a_tcp_redis_worker_survive_dropped_connections_and_its_own_are_flagged(
    tcp_running: Setup, listener: socket.socket
) -> None:
    """A joined host's worker (Redis over TCP) whose connections are cut again and again while `network:
    deny` jobs report progress and checkpoints: the connections are re-made, no job is flagged. A job
    that does reach for the network (a child process, its error swallowed) is still flagged."""
    assert tcp_running.redis.listen is not None
    laddr = "{}:{}".format(*tcp_running.redis.listen)
    admin = tcp_running.conn()
    stop = threading.Event()
    kills = [0]

    def cut() -> None:
        """Every TCP client (the worker's connections) dropped, again and again while a job runs (its
        heartbeat key is set). Not between jobs: RQ waits 2 s before it dequeues again on a new one."""
        while not stop.wait(0.3):
            with contextlib.suppress(redis.RedisError):
                if admin.keys("jetbox:hb:*"):
                    kills[0] += int(admin.client_kill_filter(laddr=laddr))

    port = listener.getsockname()[1]
    steps = (
        "  - {id: s0, kind: diag, with: {sleep: 1.2, steps: 6, checkpoints: 2}}\n"
        "  - {id: s1, kind: diag, needs: [s0], with: {sleep: 1.2, steps: 6, checkpoints: 2}}\n"
        f"  - {{id: s2, kind: diag, needs: [s1], with: {{connect: '127.0.0.1:{port}', connect_via: child, "
        "swallow: true}}\n"
    )
    killer = threading.Thread(target=cut, daemon=True)
    killer.start()
    try:
        tcp_running.drop("TICKET-3", steps)  # network: deny, the default
        state = tcp_running.wait_done("TICKET-3", timeout=90)
    finally:
        stop.set()
        killer.join()
    rows = tcp_running.daemon.rows()
    assert kills[0] > 0  # the connections were cut while the jobs ran
    violations = [r["data"] for r in rows if r["type"] == "SafetyViolation"]
    assert [(v["task"], v["what"]) for v in violations] == [("s2", "network")], violations
    assert "refused by the kernel" in violations[0]["detail"]
    failed = [r["data"] for r in rows if r["type"] == "AttemptFailed"]
    assert [f["task"] for f in failed] == ["s2"], failed
    assert {r["data"]["task"] for r in rows if r["type"] == "AttemptSucceeded"} == {"s0", "s1"}
    assert state == "TicketFailed" and not accepted(listener)
    tcp_running.assert_consistent()
