"""The in-process network guard: under `network: deny`, a job may reach its worker's Redis (and the
artifact store's endpoint, when that is an object store) and nothing else.

Installed around the job's code (the worker runs jobs in its own process, so the guard is lifted
again afterwards). It patches the socket layer: connections and name lookups other than to the
Redis endpoint raise `NetworkDenied` naming the address, and every attempt is remembered, so a job
that swallows the exception is still reported as a safety violation. System installs add systemd's
IPAddressDeny= on top (docs/OPERATIONS.md); subprocesses of `check` steps get no network at all.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse


class NetworkDenied(ConnectionRefusedError):
    """A connection or lookup that the ticket's `network: deny` forbids."""

    violation = "network"


class _Allowed:
    def __init__(self, redis_url: str | None, also: Sequence[tuple[str, int]] = ()) -> None:
        self.unix: set[str] = set()
        self.hosts: set[str] = set()
        self.addrs: set[tuple[str, int]] = set()
        for host, port in also:
            self._allow(host, port)
        if not redis_url:
            return
        url = urlparse(redis_url)
        if url.scheme == "unix":
            self.unix.add(url.path)
        elif url.hostname:
            self._allow(url.hostname, url.port or 6379)

    def _allow(self, host: str, port: int) -> None:
        self.hosts.add(host)
        try:  # resolved before the guard goes up
            infos = _REAL["getaddrinfo"](host, port)
        except OSError:
            infos = []
        for info in infos:
            self.addrs.add((str(info[4][0]), port))
        self.addrs.add((host, port))


_REAL: dict[str, Callable[..., Any]] = {
    "connect": socket.socket.connect,
    "connect_ex": socket.socket.connect_ex,
    "getaddrinfo": socket.getaddrinfo,
    "gethostbyname": socket.gethostbyname,
    "gethostbyname_ex": socket.gethostbyname_ex,
    "gethostbyaddr": socket.gethostbyaddr,
}
_lock = threading.Lock()


def _is_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _describe(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


@contextmanager
def network_denied(redis_url: str | None, also: Sequence[tuple[str, int]] = ()) -> Iterator[list[str]]:
    """Deny the network except Redis (and the (host, port) pairs in `also`) while the block runs; yields
    the list of denied attempts."""
    allowed = _Allowed(redis_url, also)
    denied: list[str] = []

    def refuse(what: str) -> NetworkDenied:
        denied.append(what)
        return NetworkDenied(f"network access denied by the ticket's policy (network: deny): {what}")

    def check_address(sock: socket.socket, address: Any) -> None:
        if sock.family == socket.AF_UNIX:
            path = address.decode() if isinstance(address, bytes) else str(address)
            if path not in allowed.unix:
                raise refuse(f"unix socket {path}")
            return
        if isinstance(address, tuple) and (str(address[0]), int(address[1])) in allowed.addrs:
            return
        raise refuse(f"connect to {_describe(address)}")

    def connect(self: socket.socket, address: Any) -> Any:
        check_address(self, address)
        return _REAL["connect"](self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        check_address(self, address)
        return _REAL["connect_ex"](self, address)

    def lookup(name: str) -> Callable[..., Any]:
        def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
            text = host.decode() if isinstance(host, bytes) else str(host)
            if _is_literal(text):  # an address, not a name: no lookup happens; connect() is checked
                return _REAL[name](host, *args, **kwargs)
            if text not in allowed.hosts and not any(text == a[0] for a in allowed.addrs):
                raise refuse(f"name lookup of {text}")
            return _REAL[name](host, *args, **kwargs)

        return guarded

    with _lock:
        socket.socket.connect = connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
        socket.getaddrinfo = lookup("getaddrinfo")
        socket.gethostbyname = lookup("gethostbyname")
        socket.gethostbyname_ex = lookup("gethostbyname_ex")
        socket.gethostbyaddr = lookup("gethostbyaddr")
    try:
        yield denied
    finally:
        with _lock:
            socket.socket.connect = _REAL["connect"]  # type: ignore[method-assign,assignment]
            socket.socket.connect_ex = _REAL["connect_ex"]  # type: ignore[method-assign,assignment]
            socket.getaddrinfo = _REAL["getaddrinfo"]
            socket.gethostbyname = _REAL["gethostbyname"]
            socket.gethostbyname_ex = _REAL["gethostbyname_ex"]
            socket.gethostbyaddr = _REAL["gethostbyaddr"]
