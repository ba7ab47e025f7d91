"""Intake: a real `jbctl daemon` watching a folder, fed the ways editors, `cp` and `mv` write files."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.commands import SubmitTicket, TicketFileRemoved
from daemon.intake import Intake, is_ticket_name, note_path
from daemon.state import State
from tests.jbdaemon import JBCTL, Daemon, atomic_write, invalid_ticket, valid_ticket, wait_for

INTAKE_TYPES = ("TicketSubmitted", "TicketRejected", "TicketRevisionRefused", "TicketCancelled")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("intake-home"), rescan=1.0).start()
    yield d
    assert d.stop() == 0, d.log_text()
    assert "Traceback" not in d.log_text()


def decisions(d: Daemon, path: Path) -> list[str]:
    """The intake event types recorded about one file, in order."""
    return [r["type"] for r in d.rows() if r["data"].get("path") == str(path) and r["type"] in INTAKE_TYPES]


@pytest.mark.integration
def test_plain_write_is_submitted(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-101.yaml"
    path.write_text(valid_ticket("TICKET-101"))
    row = daemon.wait_event("TicketSubmitted", ticket="TICKET-101")
    assert row["data"]["path"] == str(path) and row["data"]["revision"] == 1
    assert row["data"]["spec"]["steps"][0]["kind"] == "diag"


@pytest.mark.integration
def test_slow_writer_is_read_once_complete(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-102.yaml"
    text = valid_ticket("TICKET-102")
    with path.open("w") as fh:  # half a ticket, a pause, then the rest: never read half
        fh.write(text[:20])
        fh.flush()
        time.sleep(0.3)
        fh.write(text[20:])
    daemon.wait_event("TicketSubmitted", ticket="TICKET-102")
    daemon.barrier("TICKET-199")
    assert decisions(daemon, path) == ["TicketSubmitted"]


@pytest.mark.integration
def test_unchanged_save_records_nothing(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-103.yaml"
    atomic_write(path, valid_ticket("TICKET-103"))
    daemon.wait_event("TicketSubmitted", ticket="TICKET-103")
    atomic_write(path, valid_ticket("TICKET-103"))  # an editor saving without changes
    os.utime(path)  # `touch`
    daemon.barrier("TICKET-198")
    time.sleep(1.3)  # and a periodic rescan sees the same content
    daemon.barrier("TICKET-197")
    assert decisions(daemon, path) == ["TicketSubmitted"]


@pytest.mark.integration
def test_revision_refused_while_running_then_applied(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-104.yaml"
    atomic_write(path, valid_ticket("TICKET-104", title="first"))
    daemon.wait_event("TicketSubmitted", ticket="TICKET-104")
    atomic_write(path, valid_ticket("TICKET-104", title="second"))
    refused = daemon.wait_event("TicketRevisionRefused", ticket="TICKET-104")
    assert "still running" in refused["data"]["reason"]
    note = Path(note_path(str(path)))
    wait_for("the refusal note", note.exists)
    assert "refused" in note.read_text()

    out = subprocess.run([JBCTL, "cancel", "TICKET-104"], env=daemon.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    atomic_write(path, valid_ticket("TICKET-104", title="third"))
    row = daemon.wait_event("TicketSubmitted", ticket="TICKET-104", revision=2)
    assert row["data"]["spec"]["title"] == "third"
    wait_for("the note to go", lambda: not note.exists())


@pytest.mark.integration
def test_editor_temp_and_backup_names_are_ignored(daemon: Daemon) -> None:
    bad = invalid_ticket("TICKET-105")  # would be rejected if intake read any of these
    names = [".#TICKET-105.yaml", "#TICKET-105.yaml#", "TICKET-105.yaml~", "TICKET-105.yaml.swp",
             ".TICKET-105.yaml.swx", ".tmp-x.yaml", "TICKET-105.tmp.yaml", ".hidden.yaml", "TICKET-105.txt"]
    for name in names:
        (daemon.tickets / name).write_text(bad)
    daemon.barrier("TICKET-196")
    time.sleep(1.3)  # the periodic rescan ignores them too
    daemon.barrier("TICKET-195")
    paths = {str(daemon.tickets / n) for n in names}
    assert [r for r in daemon.rows() if r["data"].get("path") in paths] == []
    for name in names:
        (daemon.tickets / name).unlink()


@pytest.mark.integration
def test_vim_style_save_is_a_revision_not_a_delete(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-106.yaml"
    atomic_write(path, valid_ticket("TICKET-106", title="first"))
    daemon.wait_event("TicketSubmitted", ticket="TICKET-106")
    backup = daemon.tickets / "TICKET-106.yaml~"
    os.rename(path, backup)  # vim with backupcopy=no: rename away, write anew, drop the backup
    path.write_text(valid_ticket("TICKET-106", title="second"))
    backup.unlink()
    daemon.wait_event("TicketRevisionRefused", ticket="TICKET-106")
    daemon.barrier("TICKET-194")
    assert decisions(daemon, path) == ["TicketSubmitted", "TicketRevisionRefused"]


@pytest.mark.integration
def test_cp_mv_and_delete(daemon: Daemon, tmp_path: Path) -> None:
    outside = tmp_path / "TICKET-107.yaml"
    outside.write_text(valid_ticket("TICKET-107"))
    subprocess.run(["cp", str(outside), str(daemon.tickets)], check=True)
    daemon.wait_event("TicketSubmitted", ticket="TICKET-107")

    moved_in = tmp_path / "TICKET-108.yaml"
    moved_in.write_text(valid_ticket("TICKET-108"))
    subprocess.run(["mv", str(moved_in), str(daemon.tickets)], check=True)
    daemon.wait_event("TicketSubmitted", ticket="TICKET-108")

    # mv out of the folder: the ticket is cancelled, naming the file.
    subprocess.run(["mv", str(daemon.tickets / "TICKET-107.yaml"), str(tmp_path / "gone.yaml")], check=True)
    cancelled = daemon.wait_event("TicketCancelled", ticket="TICKET-107")
    assert "TICKET-107.yaml" in cancelled["data"]["reason"]

    # mv within the folder: the old name is removed, the new name disagrees with the id inside.
    renamed = daemon.tickets / "TICKET-109.yaml"
    subprocess.run(["mv", str(daemon.tickets / "TICKET-108.yaml"), str(renamed)], check=True)
    daemon.wait_event("TicketCancelled", ticket="TICKET-108")
    rejected = daemon.wait_event("TicketRejected", path=str(renamed))
    assert "does not match the file name" in rejected["data"]["errors"][0]
    note = Path(note_path(str(renamed)))
    wait_for("the rejection note", note.exists)

    renamed.unlink()  # rm: the note goes with the file
    wait_for("the note to go", lambda: not note.exists())


@pytest.mark.integration
def test_invalid_ticket_rejected_once_with_note_until_fixed(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-110.yaml"
    path.write_text(invalid_ticket("TICKET-110"))
    rejected = daemon.wait_event("TicketRejected", path=str(path))
    assert rejected["data"]["errors"] == [f"{path}:5:35: unknown key 'bogus'"]
    note = Path(note_path(str(path)))
    assert note.name == "TICKET-110.rejected.txt"
    wait_for("the rejection note", note.exists)
    assert f"{path}:5:35: unknown key 'bogus'" in note.read_text()

    atomic_write(path, invalid_ticket("TICKET-110"))  # saved again, still the same mistake
    daemon.barrier("TICKET-193")
    assert decisions(daemon, path) == ["TicketRejected"]

    atomic_write(path, valid_ticket("TICKET-110"))  # fixed
    daemon.wait_event("TicketSubmitted", ticket="TICKET-110")
    wait_for("the note to go", lambda: not note.exists())
    assert path.read_text() == valid_ticket("TICKET-110")  # the ticket file itself is never rewritten

    seen = [e for e in daemon.jbctl_events("--type", "TicketRejected") if e["data"]["path"] == str(path)]
    assert len(seen) == 1 and seen[0]["data"]["ticket"] == "TICKET-110"


@pytest.mark.integration
def test_someone_elses_note_is_left_alone(daemon: Daemon) -> None:
    path = daemon.tickets / "TICKET-111.yaml"
    theirs = daemon.tickets / "TICKET-111.rejected.txt"
    theirs.write_text("my own notes\n")
    path.write_text(invalid_ticket("TICKET-111"))
    daemon.wait_event("TicketRejected", path=str(path))
    path.unlink()
    daemon.barrier("TICKET-192")
    time.sleep(1.3)  # a rescan sweeps notes of deleted files: only ours
    assert theirs.read_text() == "my own notes\n"


# --- intake in-process, without an observer: the rescan and file handling ---------------------


def test_ticket_names() -> None:
    assert is_ticket_name("TICKET-1.yaml") and is_ticket_name("TICKET-1.yml")
    for name in [".TICKET-1.yaml", ".#TICKET-1.yaml", "TICKET-1.yaml~", "TICKET-1.yaml.swp", "TICKET-1.json",
                 "#TICKET-1.yaml#", ".tmp123", "TICKET-1.tmp.yaml", "TICKET-1.rejected.txt"]:
        assert not is_ticket_name(name), name


def test_rescan_compares_hashes_with_the_log(tmp_path: Path) -> None:
    a, b = tmp_path / "TICKET-1.yaml", tmp_path / "TICKET-2.yaml"
    a.write_text(valid_ticket("TICKET-1"))
    b.write_text(valid_ticket("TICKET-2"))
    intake = Intake(tmp_path, State())
    now = datetime.now(UTC)
    assert intake.rescan() == 2
    commands = intake.poll(now)
    assert sorted(type(c).__name__ for c in commands) == ["SubmitTicket", "SubmitTicket"]
    intake.committed(commands, [])
    assert intake.rescan() == 0  # nothing changed on disk
    assert intake.poll(now) == []

    # A state rebuilt from a log that already holds this content: a restart re-sends nothing.
    first = commands[0]
    assert isinstance(first, SubmitTicket)
    state = State(files={first.path: first.content_hash}, file_tickets={first.path: "TICKET-1"})
    restarted = Intake(tmp_path, state)
    restarted.rescan()
    again = restarted.poll(now)
    assert [c.path for c in again if isinstance(c, SubmitTicket)] == [str(b)]

    os.unlink(first.path)  # gone while nobody watched
    restarted.committed(again, [])
    restarted.rescan()
    assert [type(c) for c in restarted.poll(now)] == [TicketFileRemoved]


def test_fifo_named_like_a_ticket_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "TICKET-1.yaml")
    intake = Intake(tmp_path, State())
    intake.rescan()
    (command,) = intake.poll(datetime.now(UTC))  # rejected (with a note), never opened for a blocking read
    assert isinstance(command, SubmitTicket) and command.ticket is None
    assert "not a regular file but a FIFO" in command.errors[0]
    intake.committed([command], [])
    intake.rescan()
    assert intake.poll(datetime.now(UTC)) == []  # judged once, until it changes


def test_huge_file_is_rejected_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "TICKET-1.yaml"
    with path.open("wb") as fh:
        fh.truncate(50_000_000)
    intake = Intake(tmp_path, State())
    intake.rescan()
    (command,) = intake.poll(datetime.now(UTC))
    assert isinstance(command, SubmitTicket) and command.ticket is None
    assert "at most" in command.errors[0]


@pytest.mark.integration
def test_jbctl_submit_lands_in_the_watched_folder(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "TICKET-112.yaml"
    src.write_text(valid_ticket("TICKET-112"))
    out = subprocess.run([JBCTL, "submit", str(src)], env=daemon.env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    daemon.wait_event("TicketSubmitted", ticket="TICKET-112")


def test_verdicts_loaded_at_start_are_each_files_last(tmp_path: Path) -> None:
    """`load_verdicts` reads only each file's last decision whole: the same verdicts as folding
    every decision in order."""
    from daemon.handler import CommandHandler
    from daemon.intake import _VERDICT_TYPES
    from schema.migrations import upgrade
    from schema.store import EventStore
    from tests.helpers import make_ticket, submit

    url = f"sqlite:///{tmp_path / 'j.db'}"
    upgrade(url)
    store = EventStore(url)
    handler = CommandHandler(store)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    d = str(tmp_path / "tickets")
    bad = SubmitTicket(now=now, path=f"{d}/a.yaml", content_hash="1" * 64, ticket_id="TICKET-1", errors=["a:1:1: no"])
    handler.handle(bad)  # rejected, then fixed: the last verdict is the submission
    handler.handle(submit(make_ticket("TICKET-1"), now, path=f"{d}/a.yaml"))
    handler.handle(bad.model_copy(update={"path": f"{d}/b.yaml", "ticket_id": "TICKET-2"}))  # still rejected
    handler.handle(submit(make_ticket("TICKET-3"), now, path=f"{d}/c.yaml"))  # a revision while it runs
    handler.handle(submit(make_ticket("TICKET-3", extra="priority: 2\n"), now, path=f"{d}/c.yaml"))
    every = Intake(tmp_path / "tickets", State())
    for rec in store.read(0, types=_VERDICT_TYPES):
        every._remember(rec)
    last = Intake(tmp_path / "tickets", State())
    last.load_verdicts(store)
    assert last._verdicts == every._verdicts
    assert last._verdicts[f"{d}/a.yaml"][1] is None
    assert "was rejected" in str(last._verdicts[f"{d}/b.yaml"][1])
    assert "revision that was refused" in str(last._verdicts[f"{d}/c.yaml"][1])
    store.close()
