"""Kernel network isolation for one job: the job's thread runs in a network namespace of its own.

The in-process guard (workers/netguard.py) patches Python's sockets, which code that calls C
directly (`ctypes`, a compiled extension) or a child process (`subprocess.run(["curl", ...])`) never
goes through. Here the worker's thread enters a network namespace of its own for the job's duration
(made once per worker and kept while jobs leave it as they found it): such a namespace has only a
loopback interface, left down, so every connection or datagram to any address
(127.0.0.1 included) fails with "network unreachable", in the job, its threads and its children.
Sockets opened before (the worker's Redis connection) keep working: a socket belongs to the
namespace it was created in, and a unix socket path is reached through the file system.

The worker's own traffic made while a job runs must therefore never open a socket in the job's
namespace: a Redis connection that the pool makes anew there (Redis closed an idle one, a connection
was cut, two threads each wanted one) would be refused, and its refusal counted against the job as a
network violation. Every Redis client the worker uses (`redis_client`) makes its sockets through
`outside`: on the calling thread when that thread is in the worker's own namespace, else on one
dialer thread that never enters a job's. The socket, once made, is used from any thread: its traffic
leaves through the namespace it was made in. So a job's reports, heartbeats and cancel checks reach
Redis over TCP (a joined host) however often the connection is re-made, and the counter still sees
every attempt the job's own code makes.

Each refused attempt increments the namespace's `OutNoRoutes` counter, which is read after the job:
a job that hid its attempts (caught the error, or let a child fail) is still reported as a safety
violation. Only the calling thread moves (network namespaces are per thread), and it moves back
(`setns`) afterwards. It needs CAP_SYS_ADMIN (root); elsewhere `available()` says why not, and the
worker states which isolation it has (docs/OPERATIONS.md, "Threat model and limits").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.connection import AbstractConnection, Connection, parse_url

from schema.io_thread import IoThread

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


class IsolationError(RuntimeError):
    """The worker could not enter or leave a job's network namespace."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _own_ns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def _read_proc(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def no_route_count() -> int:
    """Packets the calling thread's network namespace could not route (IPv4 + IPv6 `OutNoRoutes`).
    Read before and after every job, so it reads the two /proc files raw and parses only those two
    counters."""
    net = f"/proc/self/task/{threading.get_native_id()}/net"
    total = 0
    try:
        snmp = _read_proc(f"{net}/snmp")
        head = snmp.find(b"Ip:")
        values = snmp.find(b"\nIp:", head + 1)
        if head >= 0 and values >= 0:
            names = snmp[head : snmp.find(b"\n", head)].split()
            numbers = snmp[values + 1 : snmp.find(b"\n", values + 1)].split()
            if b"OutNoRoutes" in names:
                total += int(numbers[names.index(b"OutNoRoutes")])
        snmp6 = _read_proc(f"{net}/snmp6")
        at = snmp6.find(b"Ip6OutNoRoutes")
        if at >= 0:
            total += int(snmp6[at + len(b"Ip6OutNoRoutes") : snmp6.find(b"\n", at)])
    except (OSError, ValueError, IndexError):
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


class _Kept:
    """The namespace jobs enter, made once per worker process (making one costs about a millisecond of
    kernel time and more to tear down, per job) and replaced whenever a job left it other than fresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.count: int | None = None  # its refused-attempt counter as the last job left it

    def take(self) -> tuple[int, int | None]:
        """An fd of a pristine namespace for the calling thread to enter (the caller owns it), and its
        counter as the job before left it (None: a fresh one, or not known)."""
        with self.lock:
            fd, self.fd = self.fd, None
            count, self.count = self.count, None
        return (fd, count) if fd is not None else (_fresh(), None)

    def give_back(self, fd: int, count: int) -> None:
        with self.lock:
            if self.fd is None:
                self.fd, self.count = fd, count
                return
        os.close(fd)


def _fresh() -> int:
    """A new network namespace, made in a short-lived thread (the caller's namespace never changes),
    held open by the returned fd."""
    out: list[int | IsolationError] = []

    def make() -> None:
        try:
            if _libc().unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                why = "no CAP_SYS_ADMIN: run the worker as root, or under the systemd units (IPAddressDeny=)"
                if err not in (errno.EPERM, errno.EACCES):
                    why = "unexpected error"
                raise IsolationError(f"cannot create a network namespace ({os.strerror(err)}): {why}")
            out.append(os.open(_own_ns(), os.O_RDONLY | os.O_CLOEXEC))
        except IsolationError as exc:
            out.append(exc)

    t = threading.Thread(target=make, name="netns-make")
    t.start()
    t.join()
    found = out[0] if out else IsolationError("cannot create a network namespace: the thread failed")
    if isinstance(found, IsolationError):
        raise found
    return found


_kept = _Kept()


def _pristine() -> bool:
    """Whether the calling thread's namespace is as a fresh one is: only a loopback interface, down
    (a root job can bring it up, or add interfaces; such a namespace is never entered again)."""
    try:
        # Read raw (after every job): pathlib's text read cost twice as much as the whole file read.
        table = _read_proc(f"/proc/self/task/{threading.get_native_id()}/net/dev").splitlines()[2:]
        names = [line.split(b":", 1)[0].strip() for line in table]
        if names != [b"lo"]:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
        return not flags & IFF_UP
    except OSError:
        return False


class JobNamespace:
    """`with JobNamespace() as ns:` runs the block in a network namespace with only a loopback
    interface, left down; `ns.blocked` counts the attempts the kernel refused (read when the block
    ends). The namespace is kept for the next job while it is still in that state, else dropped."""

    def __init__(self) -> None:
        self.blocked = 0
        self._home: int | None = None
        self._job: int | None = None
        self._start = 0

    def __enter__(self) -> JobNamespace:
        _keep_dialer()  # here, in the worker's namespace: the thread the worker's connections are made on
        self._home = os.open(_own_ns(), os.O_RDONLY | os.O_CLOEXEC)
        count: int | None = None
        try:
            self._job, count = _kept.take()
            if _libc().setns(self._job, CLONE_NEWNET) != 0:
                raise IsolationError(f"cannot enter a job's network namespace: {os.strerror(ctypes.get_errno())}")
        except BaseException:
            os.close(self._home)
            self._home = None
            if self._job is not None:
                os.close(self._job)
                self._job = None
            raise
        # A kept namespace's counter is where the job before left it (read as it ended): nothing but
        # what that job left running can be in it meanwhile, and an attempt of that is counted against
        # this job, as one it makes while this job runs always was. Two /proc reads fewer per job.
        self._start = count if count is not None else no_route_count()
        return self

    def __exit__(self, *exc: object) -> None:
        end = no_route_count()
        self.blocked = max(0, end - self._start)
        clean = _pristine()
        assert self._home is not None and self._job is not None
        try:
            if _libc().setns(self._home, CLONE_NEWNET) != 0:
                # A worker stuck without network would fail every later job: better to stop it.
                why = os.strerror(ctypes.get_errno())
                raise IsolationError(f"cannot return to the worker's network namespace: {why}")
        finally:
            os.close(self._home)
            self._home = None
            job, self._job = self._job, None
            if clean:
                _kept.give_back(job, end)
            else:
                os.close(job)


# --- the worker's own connections: always made in the worker's namespace ---------------------------

T = TypeVar("T")
_dialer: IoThread | None = None
_dialer_ns: int | None = None  # the inode of the namespace the dialer thread lives in
_dialer_lock = threading.Lock()


def _ns_inode() -> int:
    return os.stat(_own_ns()).st_ino


def _keep_dialer() -> None:
    """Start the dialer thread if there is none, in the calling thread's namespace (called before a
    thread enters a job's, so it is the worker's own)."""
    global _dialer, _dialer_ns
    with _dialer_lock:
        if _dialer is None or not _dialer.alive():
            _dialer = IoThread("jetbox-dialer")
            _dialer_ns = _dialer.run(_ns_inode)


def outside(fn: Callable[[], T]) -> T:
    """Run `fn` (which makes a socket) in the worker's own network namespace: right here when the calling
    thread is in it, else on the dialer thread. A thread the job started is in the job's namespace too:
    the check is on the namespace, not on which thread calls. No job namespace was ever entered: here."""
    dialer = _dialer
    if dialer is None or not dialer.alive():
        return fn()
    try:
        here = _ns_inode()
    except OSError:
        here = None
    return fn() if here == _dialer_ns else dialer.run(fn)


_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def dialing_outside(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (redis-py's TCP, TLS or unix connection class) with its sockets made by `outside`; for TLS
    the handshake too, so a certificate error is raised to the caller as redis-py raises it."""
    found = _CLASSES.get(base)
    if found is None:

        class Outside(base):  # type: ignore[valid-type,misc]
            def _connect(self) -> Any:
                return outside(super()._connect)

        Outside.__name__ = Outside.__qualname__ = f"Outside{base.__name__}"
        found = _CLASSES[base] = Outside
    return found


CONNECT_TIMEOUT_S = 10.0  # a TCP connect to Redis taking longer is a lost Redis (the default is the kernel's ~2 min)


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """`redis.Redis.from_url(url, **kwargs)` whose connections are made in the worker's own namespace,
    even when a job's thread (or a thread it started) is the one that needs a new one. Connects give up
    after `CONNECT_TIMEOUT_S`: on a partitioned network a job's cancel check or report must not hang for
    the kernel's SYN retries (and the dialer serves one connect at a time)."""
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    base = parse_url(url).get("connection_class", Connection)
    pool = redis.ConnectionPool.from_url(url, connection_class=dialing_outside(base), **kwargs)
    return redis.Redis(connection_pool=pool)  # a worker's clients live as long as its process
