"""The same store, decider and CLI on PostgreSQL (127.0.0.1:5432, trust auth).

Each test creates and drops its own database. Skipped with a reason when no server answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from daemon.handler import CommandHandler, load_state
from schema import migrations
from schema.store import EventStore, replay_differences
from tests.conftest import JBCTL
from tests.test_store import WRITER, run_pipeline

ADMIN = os.environ.get("JETBOX_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

pytestmark = pytest.mark.postgres


def _admin() -> sa.Engine:
    return sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"jetbox_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at {ADMIN}: {str(exc).splitlines()[0]}")
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_migrations_round_trip_and_models_agree(pg_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from schema.tables import metadata

    migrations.upgrade(pg_url)
    migrations.downgrade(pg_url, "base")
    migrations.upgrade(pg_url)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata())
        views = set(sa.inspect(conn).get_view_names())
    engine.dispose()
    assert diff == []
    assert {"timeline", "pending_approvals"} <= views


def test_pipeline_replay_and_verify(pg_url: str) -> None:
    migrations.upgrade(pg_url)
    store = EventStore(pg_url)
    handler = CommandHandler(store)
    run_pipeline(handler, "TICKET-1")
    run_pipeline(handler, "TICKET-2")
    assert replay_differences(store) == []
    assert store.verify()[1] is None
    assert load_state(store) == handler.state
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE events SET data = jsonb_set(data::jsonb, '{worker}', '\"evil\"')::json WHERE seq = 4")
        )
    assert store.verify()[1] == 4
    store.close()


@pytest.mark.integration
def test_concurrent_writers_on_postgres(pg_url: str, tmp_path: Path) -> None:
    migrations.upgrade(pg_url)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen([sys.executable, str(script), pg_url, f"p{n}", "30"], cwd=Path(__file__).parent.parent)
        for n in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    store = EventStore(pg_url)
    recs = list(store.read(0))
    assert [r.seq for r in recs] == list(range(1, 91))
    assert [r.version for r in recs] == list(range(1, 91))
    assert store.verify()[1] is None
    store.close()


@pytest.mark.integration
def test_jbctl_against_postgres(pg_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(tmp_path), JETBOX_DATABASE_URL=pg_url)
    assert subprocess.run([JBCTL, "migrate"], env=env, capture_output=True).returncode == 0
    store = EventStore(pg_url)
    run_pipeline(CommandHandler(store), "TICKET-1")
    store.close()
    for args in (["status", "--all"], ["replay", "--check"], ["verify"], ["sql", "SELECT count(*) AS n FROM events"]):
        proc = subprocess.run([JBCTL, *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stderr)
    refused = subprocess.run([JBCTL, "sql", "DELETE FROM events"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "read-only" in refused.stderr


def test_cold_tickets_thaw_from_postgresql(pg_url: str) -> None:
    """The cold-ticket scenario on PostgreSQL: a frozen ticket is read back from its stream (mid-
    replay too) and every decision is the one a state that keeps everything makes."""
    from daemon.decider import decide
    from daemon.state import State, evolve
    from tests.test_cold_tickets import _scenario

    migrations.upgrade(pg_url)
    store = EventStore(pg_url)
    handler = CommandHandler(store)
    whole = State()
    for command in _scenario():
        expected = decide(whole, command)
        recorded = handler.handle(command)
        assert [r.event for r in recorded] == expected, type(command).__name__
        for r in recorded:
            evolve(whole, r.event)
    handler.freeze_ended()
    assert handler.state.cold and load_state(store, freeze_batch=1) == handler.state
    for tid in list(handler.state.cold):
        assert handler.ticket(tid) == whole.tickets[tid]
    store.close()
