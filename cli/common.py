"""Helpers shared by jbctl subcommands: settings from arguments, output formats, colour."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from schema.settings import Settings, load_settings
from schema.status_rows import human_age as human_age  # re-exported: the CLI's modules import it from here


def settings_from(args: Any) -> Settings:
    """Settings with `--home` applied; a bad setting is a clear error naming it."""
    from cli.main import CliError

    try:
        return load_settings(home=getattr(args, "home", None))
    except ValueError as exc:  # pydantic's ValidationError included
        lines = [ln for ln in str(exc).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        raise CliError("bad settings: " + " ".join(ln.strip() for ln in lines[:4])) from None


def use_colour(stream: Any = None) -> bool:
    """Colour only on a TTY and never with NO_COLOR set."""
    stream = stream if stream is not None else sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def colour(text: str, code: str, stream: Any = None) -> str:
    return f"\033[{code}m{text}\033[0m" if use_colour(stream) else text


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, sort_keys=False))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned table; empty input prints the headers only."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        print(colour(line, "1") if n == 0 else line)


def open_store(settings: Settings, migrate: bool = False) -> Any:
    """The event store for these settings; a clear error when there is no migrated database yet."""
    from schema import migrations
    from schema.store import EventStore

    if migrate:
        migrations.upgrade(settings.db_url)
    else:
        _check_database(settings.db_url)
    return EventStore(settings.db_url, settings.sqlite_synchronous)


def open_reader(settings: Settings) -> Any:
    """A read-only engine on the event store (the same checks as `open_store`): reads take no write
    lock, so a busy daemon neither waits for nor delays them."""
    from schema.engines import open_readonly

    _check_database(settings.db_url)
    return open_readonly(settings.db_url)


def check_sqlite(url: str) -> str:
    """The path of a SQLite database URL, with `_check_database`'s errors, read with sqlite3 alone
    (no SQLAlchemy: `jbctl status` does not import it)."""
    from cli.main import CliError
    from schema.status_sqlite import migrated

    path = url.split("///", 1)[1]
    if not os.path.exists(path):
        raise CliError(f"no database at {path}: run `jbctl migrate` (or start `jbctl daemon`)")
    if not migrated(path):
        raise CliError(f"database {_safe(url)} is not initialised: run `jbctl migrate`")
    return path


def _check_database(url: str) -> None:
    from cli.main import CliError
    from schema import migrations

    if url.startswith("sqlite:///") and not os.path.exists(url.split("///", 1)[1]):
        raise CliError(f"no database at {url.split('///', 1)[1]}: run `jbctl migrate` (or start `jbctl daemon`)")
    if migrations.current(url) is None:
        raise CliError(f"database {_safe(url)} is not initialised: run `jbctl migrate`")


def _safe(url: str) -> str:
    """A database URL without its password."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def now_utc() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


class Progress:
    """`done / total events (pct), about N s left` on one line of stderr, rewritten in place; only
    when stderr is a terminal (a pipe or a log gets nothing)."""

    def __init__(self, label: str, total: int, stream: Any = None, tty: bool | None = None) -> None:
        import sys
        import time

        self.label, self.total = label, max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty() if tty is None else tty
        self.clock = time.monotonic
        self.started = self.clock()
        self.shown = False

    def __call__(self, done: int) -> None:
        if not self.on:
            return
        spent = self.clock() - self.started
        left = spent / done * (self.total - done) if done else 0.0
        pct = 100 * done / self.total
        self.stream.write(f"\r{self.label}: {done:,} / {self.total:,} events ({pct:.0f}%), about {left:.0f} s left ")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        """Clear the line, so the result prints on a clean one."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
