"""Migrations: upgrade, downgrade, upgrade again; and the models agree with the migrations."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from schema import migrations
from schema.tables import VIEWS, metadata


def test_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url)
    assert migrations.current(url) == migrations.head_revision()
    engine = sa.create_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    assert {
        "events",
        "event_head",
        "checkpoints",
        "tickets",
        "tasks",
        "jobs",
        "proposals",
        "artifacts",
        "metrics",
    } <= names
    assert set(VIEWS) <= set(sa.inspect(engine).get_view_names())
    migrations.downgrade(url, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrations.upgrade(url)
    assert migrations.current(url) == migrations.head_revision()
    engine.dispose()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata())
    engine.dispose()
    assert diff == [], f"autogenerate found differences; write a migration: {diff}"
