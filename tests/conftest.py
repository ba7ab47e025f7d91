"""Shared fixtures: a private Jetbox home, a migrated store, a command handler, a clock."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis

# One torch thread: on 2 cores it is several times faster than the default.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tickets" / "examples"
JBCTL = str(Path(sys.executable).parent / "jbctl")


_ALL_INTEGRATION = re.compile(r"^pytestmark = pytest\.mark\.integration\b", re.M)


def _fast_lane(config: pytest.Config) -> bool:
    return (config.getoption("markexpr") or "").split() == ["not", "integration"]


def pytest_configure(config: pytest.Config) -> None:
    # Read by tests.helpers.property_examples: the fast lane runs a fifth of each property test's
    # examples (`make test` still runs them all).
    if _fast_lane(config):
        os.environ["JETBOX_TEST_LANE"] = "fast"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`make test-fast` (`-m "not integration"`) does not import a test module whose every test is
    integration: all would be deselected, and importing them (harnesses, torch) is collection time."""
    if not _fast_lane(config):
        return None
    is_test = collection_path.suffix == ".py" and collection_path.name.startswith("test_")
    if is_test and _ALL_INTEGRATION.search(collection_path.read_text(encoding="utf-8")):
        return True
    return None


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated JETBOX_HOME (and no stray settings from the environment)."""
    for key in list(os.environ):
        if key.startswith("JETBOX_"):
            monkeypatch.delenv(key)
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("JETBOX_HOME", str(path))
    return path


def _need_moto() -> None:
    from tests.s3server import have_moto

    if not have_moto():
        why = "boto3 and moto's server are not installed (pip install -e '.[s3,dev]')"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI installs them with `make test`")  # never a silent skip there
        pytest.skip(why)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """moto's standalone S3 server on a free loopback port for the whole session, stopped by pid."""
    _need_moto()
    from tests.s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: object, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's S3 server; the AWS_* variables and JETBOX_ARTIFACTS_URL point at it."""
    from tests.s3server import S3Server

    assert isinstance(s3_server, S3Server)
    url = f"s3://{s3_server.create_bucket()}/jetbox"
    for key, value in s3_server.env(url).items():
        monkeypatch.setenv(key, value)
    return url


@pytest.fixture
def store(home: Path) -> Iterator[object]:
    from schema.migrations import upgrade
    from schema.settings import load_settings
    from schema.store import EventStore

    url = load_settings().db_url
    upgrade(url)
    s = EventStore(url)
    yield s
    s.close()


@pytest.fixture
def conn(home: Path) -> Iterator[redis.Redis]:
    """A connection to a private redis-server of its own (a socket under `home`), stopped after."""
    import redis as redis_py

    from cli.embedded import start_redis

    server = start_redis(home / "run")
    try:
        yield redis_py.Redis.from_url(server.url)
    finally:
        server.stop()


class Clock:
    """A controllable `now` for commands."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[object]:
    """A private redis-server, a real `jbctl daemon` and one `cpu` worker on a fresh home."""
    from tests.harness import Setup

    s = Setup(tmp_path / "home")
    try:
        s.daemon.start()
        s.worker("cpu")
        yield s
    finally:
        s.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on a free loopback port that accepts nothing by itself (network-denial tests)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    yield srv
    srv.close()
