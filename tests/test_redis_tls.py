"""Redis over TLS for workers on other hosts: `jbctl up --listen ... --tls-cert/--tls-key/--tls-ca`.

A throwaway CA and server certificate (tests/tls_certs.py) on loopback; the main host's daemon uses
the unix socket, a worker with a home of its own joins with a join file that carries the rediss://
URL and the CA. It verifies the server, runs a `network: deny` job (its connections over TLS, made
outside the job's namespace), and a join file with another CA is refused in one clear line.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.embedded import RedisTls
from cli.join_cmds import JoinToken, split_ca
from tests.harness import FAST, Setup
from tests.jbdaemon import JBCTL
from tests.tls_certs import TlsFiles, make_tls, need_tls_redis

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    need_tls_redis()
    return make_tls(tmp_path / "tls", "127.0.0.1")


def _tls_setup(home: Path, tls_files: TlsFiles) -> Setup:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tls = RedisTls(tls_files.cert, tls_files.key, tls_files.ca)
    return Setup(home, listen=("127.0.0.1", port), password="tls-test-password", tls=tls)


@pytest.fixture
def tls_main(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Setup]:
    """A main host: Redis (unix socket, and TLS on loopback) and the daemon."""
    s = _tls_setup(tmp_path / "main", tls_files)
    try:
        s.daemon.start()
        yield s
    finally:
        s.close()


def _join_file(main: Setup, folder: Path, ca_pem: str | None) -> Path:
    """The join file `jbctl join-token` writes (which refuses a loopback address: made here alike)."""
    assert main.redis.tcp_url is not None
    url, _ = split_ca(main.redis.tcp_url)  # the CA's path on the main host leaves the URL...
    token = JoinToken(
        redis_url=url,
        secret=_secret(main),
        queues=["cpu"],
        heartbeat_seconds=float(FAST["JETBOX_HEARTBEAT_SECONDS"]),
        heartbeat_timeout_seconds=float(FAST["JETBOX_HEARTBEAT_TIMEOUT_SECONDS"]),
        redis_ca=ca_pem,  # ...and the CA itself goes in the file
    )
    path = folder / "join.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token.model_dump_json(exclude_none=True))
    return path


def _secret(main: Setup) -> str:
    from schema.wire import load_secret

    return load_secret(main.home / "secret.key", create=True).decode()


def _worker_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    return {**env, "JETBOX_HOME": str(home), "NO_COLOR": "1"}


def test_a_worker_joins_over_tls_and_runs_a_job(tls_main: Setup, tls_files: TlsFiles, tmp_path: Path) -> None:
    assert tls_main.redis.tcp_url is not None and tls_main.redis.tcp_url.startswith("rediss://")
    assert tls_main.redis.listen is not None
    host, port = tls_main.redis.listen
    with pytest.raises(redis.ConnectionError):  # no plain-text TCP on that port: TLS only
        redis.Redis(host=host, port=port, password="tls-test-password", socket_timeout=2).ping()
    worker_home = tmp_path / "worker"
    join = _join_file(tls_main, worker_home, tls_files.ca.read_text())
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [JBCTL, "worker", "--join", str(join), "--no-advertise"],
        env=_worker_env(worker_home),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    tls_main.workers.append(proc)  # stopped by the fixture, by pid
    tls_main.drop("TICKET-5", "  - {id: a, kind: diag, with: {sleep: 0.6, steps: 3, checkpoints: 1}}\n")
    assert tls_main.wait_done("TICKET-5") == "TicketCompleted", (tmp_path / "worker.log").read_text()
    rows = tls_main.daemon.rows()
    started = [r["data"] for r in rows if r["type"] == "AttemptStarted"]
    assert started[0]["worker"].endswith(f":{proc.pid}")  # the joined worker ran it, over TLS
    assert [r for r in rows if r["type"] == "SafetyViolation"] == []
    ca = worker_home / "redis-ca.pem"
    assert ca.read_text() == tls_files.ca.read_text() and ca.stat().st_mode & 0o077 == 0


def test_a_join_file_with_another_ca_is_refused_clearly(tls_files: TlsFiles, tmp_path: Path) -> None:
    main = _tls_setup(tmp_path / "main", tls_files)  # Redis only: the worker never gets further
    try:
        other = make_tls(tmp_path / "other", "127.0.0.1", label="other")
        worker_home = tmp_path / "worker"
        join = _join_file(main, worker_home, other.ca.read_text())
        done = subprocess.run(
            [JBCTL, "worker", "--join", str(join), "--no-advertise"],
            env=_worker_env(worker_home),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        main.close()
    assert done.returncode != 0
    assert "TLS refused" in done.stderr and "certificate verify failed" in done.stderr, done.stderr
    assert "tls-test-password" not in done.stderr  # the message names the server, not its password
