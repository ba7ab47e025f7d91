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


def test_list_shows_the_logs_record_as_sql_does(store: EventStore, home: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """With a database, `jbctl artifacts list` and `jbctl sql` name the same artifacts with the same
    kind and lineage: the log is the record, the index only describes. An artifact written to the
    store whose report never reached the log is listed only by `--unrecorded`."""
    import json

    from schema.artifacts import Lineage

    artifacts = ArtifactStore(home / "artifacts")
    (tmp_path / "w.pt").write_bytes(b"weights of attempt 1")
    (tmp_path / "lost.pt").write_bytes(b"weights whose report was lost")
    lineage = Lineage(ticket="TICKET-1", task="a", attempt=1)
    logged = artifacts.put_artifact(tmp_path / "w.pt", kind="checkpoint", name="w.pt", lineage=lineage)
    lost = artifacts.put_artifact(tmp_path / "lost.pt", kind="checkpoint", name="lost.pt", lineage=lineage)
    bare = artifacts.put_bytes(b"reported, never indexed")  # e.g. ctx.record of an object without an entry
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket(steps="  - {id: a, kind: diag}\n"), NOW))
    for artifact, kind in ((logged, "checkpoint"), (bare, "dataset")):
        handler.handle(c.RecordArtifact(now=NOW, ticket="TICKET-1", task="a", attempt=1, artifact=artifact,
                                        kind=kind, meta={"generator": "maze"} if kind == "dataset" else {}))
    capsys.readouterr()

    def out_json(*argv: str) -> list[dict]:
        assert jbctl(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    sql = out_json("sql", "select id, kind, ticket, task, attempt from artifacts order by id", "--json")
    listed = out_json("artifacts", "list", "--json")
    assert sorted((e["id"], e["kind"], e["lineage"]["ticket"], e["lineage"]["task"], e["lineage"]["attempt"])
                  for e in listed) == sorted(tuple(r.values()) for r in sql)
    assert {e["id"] for e in listed} == {logged, bare}
    by_id = {e["id"]: e for e in listed}
    assert by_id[logged]["name"] == "w.pt" and by_id[logged]["size"] == len(b"weights of attempt 1")
    assert by_id[bare]["size"] == len(b"reported, never indexed") and by_id[bare]["name"] == "maze"
    assert [e["id"] for e in out_json("artifacts", "--kind", "maze", "--json")] == [bare]
    assert [e["id"] for e in out_json("artifacts", "list", "--unrecorded", "--json")] == [lost]
    assert out_json("artifacts", "list", "--ticket", "TICKET-2", "--json") == []
