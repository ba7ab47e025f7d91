"""A real S3-compatible server for the tests: moto's standalone server (`python -m moto.server`) on
loopback, one process per test session, stopped by its pid.

No MinIO build installs from the package registries this project uses; moto's server speaks the S3
HTTP API, and the client code (`schema/artifact_s3.py`) only ever sees an endpoint URL and credentials
in the standard AWS variables, exactly as it would for MinIO or AWS.

Reusable: `start_s3_server(log_dir)` returns an `S3Server` with `env()` (the variables a Jetbox process
needs to use it), `create_bucket()` and `stop()`. The pytest fixtures in tests/conftest.py wrap it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "jetbox-test-key"
SECRET_KEY = "jetbox-test-secret"
REGION = "us-east-1"


def have_moto() -> bool:
    """True when boto3 and moto's server can be imported (the `s3` and `dev` extras)."""
    try:
        import boto3  # noqa: F401
        import flask  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    auth: bool = False

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self, url: str | None = None) -> dict[str, str]:
        """The variables a Jetbox process sets to use this server (nothing moto-specific among them)."""
        out = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            # Never a developer's own ~/.aws: the tests must see only these.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        if url is not None:
            out["JETBOX_ARTIFACTS_URL"] = url
        return out

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (a fresh random name by default); returns its name."""
        name = name or f"jetbox-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_s3_server(
    log_dir: Path,
    host: str = "127.0.0.1",
    auth: bool = False,
    python: str | None = None,
    tries: int = 3,
    wrap: Sequence[str] = (),
    port: int | None = None,
) -> S3Server:
    """Start `python -m moto.server` on a free port of `host` (or `port`) and wait until it answers.

    `wrap` goes before the command, e.g. `["ip", "netns", "exec", "jb-main"]` to run the server inside
    a network namespace (then pass `port`, since a free port is probed in this one, and `host` = an
    address of that namespace that this process can reach).

    `auth=True` makes the server check credentials from the first request on (moto's
    INITIAL_NO_AUTH_ACTION_COUNT=0): with no IAM users defined, every key is then refused, which is how
    the tests see what a wrong key looks like. `python` is the interpreter that has moto (default: this one).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    last = ""
    for _ in range(tries):  # a free port can be taken between the probe and the bind: try another
        chosen = port or free_port(host)
        log = log_dir / f"moto-{chosen}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*wrap, python or sys.executable, "-m", "moto.server", "-H", host, "-p", str(chosen)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        server = S3Server(host, chosen, proc, log, auth)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.alive():
            try:
                with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=1):
                    return server
            except urllib.error.HTTPError:
                return server  # it answers: that is all we wait for
            except OSError:
                time.sleep(0.1)
        server.stop()
        last = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto's S3 server did not start on {host}: {last}")
