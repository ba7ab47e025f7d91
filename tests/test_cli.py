"""jbctl's read side over a real store: status, describe, events, sql, replay, verify; and its start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main as jbctl
from daemon.handler import CommandHandler
from schema.store import EventStore
from tests.conftest import JBCTL
from tests.test_store import run_pipeline


@pytest.fixture
def filled(store: EventStore) -> EventStore:
    handler = CommandHandler(store)
    run_pipeline(handler, "TICKET-1")
    handler.handle(
        __import__("tests.helpers", fromlist=["submit"]).submit(
            __import__("tests.helpers", fromlist=["make_ticket"]).make_ticket("TICKET-2"),
            run_pipeline.__globals__["T0"],
        )
    )
    return store


def test_status_table_tree_and_json(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["status"]) == 0
    assert "TICKET-1" not in capsys.readouterr().out  # finished more than a day ago
    assert jbctl(["status", "--all"]) == 0
    out = capsys.readouterr().out
    assert "TICKET-1" in out and "completed" in out and "TICKET-2" in out and "a (attempt 1, scheduled)" in out
    assert "\033[" not in out  # no colour when not a TTY
    assert jbctl(["status", "TICKET-1"]) == 0
    tree = capsys.readouterr().out
    assert "attempt 1: failed" in tree and "attempt 2: succeeded" in tree and "needs a" in tree
    assert jbctl(["status", "--json", "--all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["ticket"] for d in data] == ["TICKET-1", "TICKET-2"]
    assert data[1]["waiting_on"] == "a cpu worker for a"
    assert jbctl(["status", "TICKET-404"]) == 1
    assert "no ticket 'TICKET-404'" in capsys.readouterr().err


def test_describe(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["describe", "TICKET-1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metrics"] == [{"task": "a", "name": "acc", "value": 0.7, "attempt": 2}]
    assert info["spec"]["id"] == "TICKET-1"
    assert jbctl(["describe", "TICKET-1"]) == 0
    assert "a.acc = 0.7" in capsys.readouterr().out


def test_events_filters(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["events", "--json", "--ticket", "TICKET-2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["stream"] for x in lines} == {"TICKET-2"}
    assert jbctl(["events", "--json", "--type", "AttemptFailed"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["type"] for x in lines] == ["AttemptFailed"]
    assert jbctl(["events", "--since", "5", "--limit", "2", "--json"]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [6, 7]
    assert jbctl(["events", "--limit", "0"]) == 1


def test_sql_read_only_and_formats(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["sql", "SELECT id, state FROM tickets ORDER BY id", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"id": "TICKET-1", "state": "completed"},
        {"id": "TICKET-2", "state": "running"},
    ]
    assert jbctl(["sql", "SELECT id FROM tickets ORDER BY id", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["id", "TICKET-1", "TICKET-2"]
    before = filled.head()
    for stmt in [
        "DELETE FROM events",
        "UPDATE tickets SET state='x'",
        "DROP TABLE events",
        "INSERT INTO checkpoints (name, seq) VALUES ('x', 1)",
    ]:
        assert jbctl(["sql", stmt]) == 1
        assert "read-only" in capsys.readouterr().err
    assert filled.head() == before
    assert jbctl(["sql", "SELECT nope FROM nowhere"]) == 1
    assert "SQL error" in capsys.readouterr().err


def test_replay_verify_commands(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["replay", "--check"]) == 0
    assert jbctl(["verify"]) == 0
    assert "hash chain intact" in capsys.readouterr().out
    import sqlite3

    conn = sqlite3.connect(filled.url.split("///", 1)[1])
    conn.execute("UPDATE tasks SET state = 'running'")
    conn.execute("UPDATE events SET hash = 'x' WHERE seq = 2")
    conn.commit()
    conn.close()
    assert jbctl(["replay", "--check"]) == 1
    assert jbctl(["verify"]) == 1
    assert "chain broken at seq 2" in capsys.readouterr().err
    assert jbctl(["replay"]) == 0
    conn = sqlite3.connect(filled.url.split("///", 1)[1])
    conn.execute("UPDATE events SET type = 'TicketCompleted' WHERE seq = 2")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert jbctl(["replay", "--check"]) == 1
    assert "seq 2: stored TicketCompleted event is unreadable" in capsys.readouterr().err


def test_commands_without_database_say_so(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["status"]) == 1
    assert "run `jbctl migrate`" in capsys.readouterr().err


def test_cancel(filled: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert jbctl(["cancel", "TICKET-2", "-m", "not needed"]) == 0
    assert jbctl(["cancel", "TICKET-2"]) == 1
    assert "only a running ticket" in capsys.readouterr().err
    rec = next(iter(filled.read(0, types=["TicketCancelled"])))
    assert rec.data["reason"] == "not needed" and "user" in rec.meta["actor"]


@pytest.mark.integration
def test_jbctl_and_daemon_never_import_torch() -> None:
    code = (
        "import sys, cli.main as m; m.build_parser();"
        "import daemon.handler, daemon.decider, schema.store;"
        "import importlib, pkgutil, daemon;"
        "[importlib.import_module('daemon.' + x.name) for x in pkgutil.iter_modules(daemon.__path__)];"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'workers', 'timm')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_command_table_matches_what_the_modules_register() -> None:
    """cli.main.COMMANDS (which module adds which subcommand, read without importing any) is true."""
    import argparse
    import importlib

    import cli.main as m

    for module, commands in m.COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert tuple(sub.choices) == commands, module
    assert m.command_word(["--home", "/x", "status", "--json"]) == "status"
    assert m.command_word(["--home=/x", "sql", "-h"]) == "sql"
    assert m.command_word(["--help"]) is None and m.command_word([]) is None
    assert m.build_parser("status").format_usage() == m.build_parser().format_usage()


@pytest.mark.integration
def test_jbctl_status_imports_neither_sqlalchemy_nor_other_areas(filled: EventStore, home: Path) -> None:
    """`jbctl status` on a SQLite home reads with sqlite3: no SQLAlchemy, Redis, RQ, alembic, ticket
    models or other subcommands' modules (their imports cost more than the reads; bench/cli.py)."""
    code = (
        "import sys; from cli.main import main; rc = main(['status']);"
        "heavy = ('sqlalchemy', 'sqlmodel', 'redis', 'rq', 'alembic', 'torch');"
        "light = ('schema.ticket', 'schema.events', 'schema.store', 'schema.tables', 'cli.gate_cmds', 'cli.run_cmds');"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in heavy or k in light);"
        "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc or (1 if bad else 0))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "TICKET-2  running" in proc.stdout and "IMPORTED []" in proc.stderr
    # `jbctl --help` lists every area (so imports every command module) but still not SQLAlchemy.
    code = (
        "import sys; from cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('sqlalchemy', 'sqlmodel', 'redis', 'rq'))\n"
        "print('IMPORTED', bad, file=sys.stderr)"
    )
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert "status" in proc.stdout and "IMPORTED []" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_jbctl_help_via_process() -> None:
    proc = subprocess.run([JBCTL, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "status" in proc.stdout and "sql" in proc.stdout


@pytest.mark.integration
def test_events_follow_streams_new_events(store: EventStore) -> None:
    import os
    import time
    from datetime import UTC, datetime

    from daemon import commands as c

    proc = subprocess.Popen([JBCTL, "events", "--follow", "--json", "--type", "SafetyViolation"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        time.sleep(1.0)
        CommandHandler(store).handle(c.RecordViolation(now=datetime.now(UTC), what="test", detail="streamed"))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line)["data"]["detail"] == "streamed"
    finally:
        proc.terminate()
        proc.wait(10)


def test_backup_copies_a_verified_event_log(
    filled: EventStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "copy.db"
    assert jbctl(["backup", str(dest)]) == 0
    out = capsys.readouterr().out
    count = len(list(filled.read(0)))
    assert f"backup: {count} events to {dest} (hash chain verified)" in out
    copy = EventStore(f"sqlite:///{dest}")
    try:
        assert [e.seq for e in copy.read(0)] == [e.seq for e in filled.read(0)]
    finally:
        copy.close()
    assert jbctl(["backup", str(dest)]) == 1  # never overwrites
    assert "exists" in capsys.readouterr().err


@pytest.mark.integration
def test_a_reader_that_leaves_early_is_not_an_error(filled: EventStore, home: Path) -> None:
    """`jbctl sql ... | head -c 1`: no traceback, exit 0 (the output is far larger than a pipe's buffer)."""
    import os

    env = {**os.environ, "JETBOX_HOME": str(home)}
    query = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) SELECT x FROM c"
    out = subprocess.run(
        f"set -o pipefail; '{JBCTL}' sql '{query}' --csv | head -c 1",
        shell=True,
        executable="/bin/bash",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(out.stdout) == 1
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does to `jbctl up &` in a script


@pytest.mark.integration
@pytest.mark.parametrize("when", ["starting", "running"])
def test_up_stops_on_sigint_even_when_started_with_it_ignored(tmp_path: Path, when: str) -> None:
    import os
    import signal

    from tests.jbdaemon import wait_for

    home = tmp_path / "uphome"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")} | {"JETBOX_HOME": str(home)}
    out = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen([JBCTL, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
    try:
        if when == "starting":  # the key is written before the database, Redis and the children
            wait_for("secret key", lambda: (home / "secret.key").exists(), timeout=30, every=0.005)
        else:
            wait_for("children", lambda: "watching" in Path(out.name).read_text(), timeout=60)
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(30)
    log = Path(out.name).read_text()
    assert (when == "running") == ("watching" in log), log
    for line in log.splitlines():
        if "private Redis" in line:  # stopped with everything else
            with pytest.raises(ProcessLookupError):
                os.kill(int(line.split("pid ")[1].rstrip(")")), 0)
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_replay_and_verify_report_progress_on_a_terminal_only(
    filled: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100,000 tickets `replay --check` and `verify` take minutes: on a TTY they say how far."""
    import io

    import schema.store
    from cli.common import Progress

    monkeypatch.setattr(schema.store, "PROGRESS_EVERY", 2)
    head = filled.head()
    seen: list[int] = []
    assert filled.verify(seen.append)[1] is None
    assert seen == list(range(2, head + 1, 2))
    seen.clear()
    filled.rebuild_rows(seen.append)
    assert seen == list(range(2, head + 1, 2))
    terminal = io.StringIO()
    progress = Progress("verify", 100, stream=terminal, tty=True)
    progress(50)
    progress.end()
    assert "\rverify: 50 / 100 events (50%), about " in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\033[K")  # the result then prints on a clean line
    piped = io.StringIO()  # not a TTY: nothing, so logs and pipes stay clean
    Progress("verify", 100, stream=piped)(50)
    assert piped.getvalue() == ""
