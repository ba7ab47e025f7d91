"""Kernel network isolation for one job: the job's thread runs in a network namespace of its own.

The in-process guard (workers/netguard.py) patches Python's sockets, which code that calls C
directly (`ctypes`, a compiled extension) or a child process (`subprocess.run(["curl", ...])`) never
goes through. Here the worker's thread unshares its network namespace for the job's duration: a fresh
namespace has only a loopback interface, left down, so every connection or datagram to any address
(127.0.0.1 included) fails with "network unreachable", in the job, its threads and its children.
Sockets opened before (the worker's Redis connection) keep working: a socket belongs to the
namespace it was created in, and a unix socket path is reached through the file system.

Each refused attempt increments the namespace's `OutNoRoutes` counter, which is read after the job:
a job that hid its attempts (caught the error, or let a child fail) is still reported as a safety
violation. Only the calling thread moves (network namespaces are per thread), and it moves back
(`setns`) afterwards. It needs CAP_SYS_ADMIN (root); elsewhere `available()` says why not, and the
worker states which isolation it has (docs/OPERATIONS.md, "Threat model and limits").
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000


class IsolationError(RuntimeError):
    """The worker could not enter or leave a job's network namespace."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _own_ns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def no_route_count() -> int:
    """Packets the calling thread's network namespace could not route (IPv4 + IPv6 `OutNoRoutes`)."""
    net = Path(f"/proc/self/task/{threading.get_native_id()}/net")
    total = 0
    try:
        lines = (net / "snmp").read_text().splitlines()
        ip = [line.split() for line in lines if line.startswith("Ip:")]
        if len(ip) >= 2:
            total += int(dict(zip(ip[0][1:], ip[1][1:], strict=False)).get("OutNoRoutes", 0))
        for line in (net / "snmp6").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "Ip6OutNoRoutes":
                total += int(value.strip())
    except (OSError, ValueError):
        pass
    return total


_probe: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """Whether this process can give a job a namespace of its own, and if not, why (probed once, in a
    short-lived thread so the caller's namespace never changes)."""
    global _probe
    if _probe is None:
        out: list[tuple[bool, str]] = []

        def probe() -> None:
            try:
                with JobNamespace():
                    pass
                out.append((True, "a network namespace per job"))
            except IsolationError as exc:
                out.append((False, str(exc)))

        t = threading.Thread(target=probe, name="netns-probe")
        t.start()
        t.join()
        _probe = out[0] if out else (False, "the probe thread failed")
    return _probe


class JobNamespace:
    """`with JobNamespace() as ns:` runs the block in a fresh network namespace; `ns.blocked` counts
    the attempts the kernel refused (read when the block ends)."""

    def __init__(self) -> None:
        self.blocked = 0
        self._home: int | None = None
        self._start = 0

    def __enter__(self) -> JobNamespace:
        libc = _libc()
        self._home = os.open(_own_ns(), os.O_RDONLY | os.O_CLOEXEC)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.close(self._home)
            self._home = None
            why = "no CAP_SYS_ADMIN: run the worker as root, or under the systemd units (IPAddressDeny=)"
            if err not in (errno.EPERM, errno.EACCES):
                why = "unexpected error"
            raise IsolationError(f"cannot create a network namespace ({os.strerror(err)}): {why}")
        self._start = no_route_count()
        return self

    def __exit__(self, *exc: object) -> None:
        self.blocked = max(0, no_route_count() - self._start)
        assert self._home is not None
        try:
            if _libc().setns(self._home, CLONE_NEWNET) != 0:
                # A worker stuck without network would fail every later job: better to stop it.
                why = os.strerror(ctypes.get_errno())
                raise IsolationError(f"cannot return to the worker's network namespace: {why}")
        finally:
            os.close(self._home)
            self._home = None
