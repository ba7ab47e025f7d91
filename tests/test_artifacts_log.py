"""`jbctl artifacts gc` keeps what the event log refers to and removes what no ticket does."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.main import main as jbctl
from daemon import commands as c
from daemon.handler import CommandHandler
from schema.artifact_store import ArtifactStore
from schema.store import EventStore
from tests.helpers import make_ticket, submit

NOW = datetime.now(UTC)


def test_gc_keeps_logged_artifacts_and_removes_orphans(store: EventStore, home: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = ArtifactStore(home / "artifacts")
    kept = artifacts.put_bytes(b"a checkpoint a ticket produced")
    output = artifacts.put_bytes(b"a dataset named in a step's outputs")
    orphan = artifacts.put_bytes(b"left behind by an attempt whose report never arrived")
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket(steps="  - {id: a, kind: diag}\n"), NOW))
    handler.handle(c.RecordArtifact(now=NOW, ticket="TICKET-1", task="a", attempt=1, artifact=kept, kind="checkpoint"))
    handler.handle(c.RecordJobSucceeded(now=NOW, ticket="TICKET-1", task="a", attempt=1,
                                        outputs={"dataset": output}))
    assert jbctl(["artifacts", "gc"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {orphan}" in out and kept not in out and output not in out
    assert artifacts.has(orphan)
    assert jbctl(["artifacts", "gc", "--yes"]) == 0
    assert not artifacts.has(orphan) and artifacts.has(kept) and artifacts.has(output)
