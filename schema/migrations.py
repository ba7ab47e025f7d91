"""Run the Alembic migrations programmatically (`jbctl migrate`, the daemon at start-up, tests)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> object:
    from alembic.config import Config  # alembic: only when migrating (keeps jbctl quick to start)

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (creating the SQLite file's folder if needed)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)  # type: ignore[arg-type]


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)  # type: ignore[arg-type]


def current(url: str) -> str | None:
    """The revision the database is at, or None before the first migration (read with plain SQL:
    importing alembic's runtime costs every `jbctl` command a tenth of a second)."""
    import sqlalchemy as sa

    from schema.engines import _engine

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT version_num FROM alembic_version")).first()
            return str(row[0]) if row else None
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return None
    finally:
        engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head())  # type: ignore[arg-type]


def at_head(engine: Any) -> bool:
    """True when the database is at the newest migration, found without importing alembic.

    The heads are the revisions in alembic/versions that no other revision names as its
    `down_revision`; anything unexpected (no scripts, no version table) answers False, and the
    caller runs the real `alembic upgrade`.
    """
    revisions: set[str] = set()
    downs: set[str] = set()
    for script in (ROOT / "alembic" / "versions").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        rev = re.search(r"^revision\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        down = re.search(r"^down_revision\b[^=\n]*=(.*)$", text, re.M)
        if rev is None or down is None:
            return False
        revisions.add(rev.group(1))
        downs.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    heads = revisions - downs
    if not heads:
        return False
    import sqlalchemy as sa

    try:
        with engine.connect() as conn:
            have = {row[0] for row in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}
    except sa.exc.DBAPIError:
        return False
    return have == heads
