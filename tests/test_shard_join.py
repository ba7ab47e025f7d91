"""A sharded synthesize step is joined by the decider (ShardsJoined), not by a job: the manifest is
built from the subtasks' reports, byte for byte what one job writes, and the dispatcher writes it
before it acts on anything later."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from daemon import commands as c
from daemon.dispatcher import write_joined_manifest
from daemon.state import State
from schema import events as ev
from schema.artifact_store import ArtifactStore
from schema.artifacts import JoinError, Lineage, Manifest, join_manifest
from schema.projections import MemoryRows, project
from tests.helpers import make_ticket, submit
from tests.test_decider import T0, apply, report, types
from workers.synth.base import SynthesisRequest, manifest_head

SYNTH = "{generator: shapes, count: 400, shard_size: 100}"
HEAD = manifest_head(SynthesisRequest(generator="shapes", count=400, shard_size=100))


def fanned(shards: int = 4, extra: str = "", cache: str = "", tid: str = "TICKET-1") -> Any:
    return make_ticket(
        tid,
        steps=f"  - {{id: data, kind: synthesize, shards: {shards}{cache}, with: {SYNTH}{extra}}}\n"
        "  - {id: use, kind: diag, needs: [data]}\n",
    )


def shard_info(k: int, count: int = 100) -> dict[str, Any]:
    return {"index": k, "id": f"{k + 1:064x}", "size": 10, "count": count, "format": "npz"}


def succeed(
    s: State, sub: str, files: list[int], head: dict[str, Any] | None = None, ticket: str = "TICKET-1", count: int = 100
) -> list[ev.Event]:
    outputs = {"shards": [shard_info(k, count) for k in files], "seconds": 0.5, "manifest": head or HEAD}
    return apply(
        s, report(c.RecordJobSucceeded, sub, 1, ticket=ticket, metrics={"count": 100.0 * len(files)}, outputs=outputs)
    )


def test_the_last_shard_joins_the_manifest_in_the_decider_and_downstream_runs_at_once() -> None:
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    assert types(succeed(s, "data-S0", [0, 1])) == ["AttemptSucceeded"]
    events = succeed(s, "data-S1", [2, 3])
    assert types(events) == ["AttemptSucceeded", "ShardsJoined", "AttemptScheduled"]
    joined, use = events[1], events[2]
    manifest = Manifest.model_validate(joined.manifest)
    assert joined.artifact == manifest.manifest_id() and [sh.index for sh in manifest.shards] == [0, 1, 2, 3]
    assert manifest.lineage == Lineage(ticket="TICKET-1", task="data") and manifest.created_at == T0
    assert joined.outputs == {"dataset": joined.artifact, "generator": "shapes"}
    assert joined.metrics == {"count": 400.0, "seconds": 1.0}  # the work of both subtasks, as one job's
    assert use.task == "use" and use.params["_inputs"] == {"data": joined.outputs}
    data = s.tickets["TICKET-1"].tasks["data"]
    assert data.status == "succeeded" and data.attempt == 0  # no job ran for the step itself


def test_the_joined_manifest_is_what_one_job_writes(tmp_path: Path) -> None:
    from workers.synth.base import synthesize

    single = synthesize(
        "shapes", {}, 0, 400, 100, ArtifactStore(tmp_path), Lineage(ticket="T", task="data"), created_at=T0
    )
    shards = [sh.model_dump(mode="json") for sh in single.shards]
    joined = join_manifest([HEAD, dict(HEAD)], shards[2:] + shards[:2], Lineage(ticket="T", task="data"), T0)
    assert joined.to_bytes() == single.to_bytes()


@pytest.mark.parametrize(
    ("files", "head", "count", "message"),
    [
        ([2], None, 100, r"expected shard files 0\.\.3, the subtasks reported \[0, 1, 2\]"),
        ([1, 2, 3], None, 100, r"reported \[0, 1, 1, 2, 3\]"),
        ([2, 3], None, 99, r"shard file 2 holds 99 examples, the plan says 100"),
        ([2, 3], HEAD | {"seed": 7}, 100, r"the shard subtasks describe different datasets"),
        ([2, 3], {"generator": "shapes"}, 100, r"the shard subtasks describe different datasets"),
    ],
)
def test_reports_that_do_not_make_the_dataset_fail_the_step_saying_why(
    files: list[int], head: dict[str, Any] | None, count: int, message: str
) -> None:
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    succeed(s, "data-S0", [0, 1])
    events = succeed(s, "data-S1", files, head=head, count=count)
    assert types(events) == ["AttemptSucceeded", "TaskFailed", "TicketFailed"]
    assert events[1].reason.startswith("shards: cannot join: ")
    assert re.search(message, events[1].reason), events[1].reason


def test_a_head_that_is_not_a_manifest_is_refused_not_raised() -> None:
    with pytest.raises(JoinError):
        join_manifest([], [], Lineage(), T0)
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    bad = HEAD | {"label_schema": "nonsense"}
    succeed(s, "data-S0", [0, 1], head=bad)
    events = succeed(s, "data-S1", [2, 3], head=bad)
    assert types(events) == ["AttemptSucceeded", "TaskFailed", "TicketFailed"]
    assert "label_schema" in events[1].reason


def test_expectations_judge_the_joined_result_and_a_miss_is_final() -> None:
    s = State()
    apply(
        s,
        submit(
            fanned(
                shards=2,
                extra="",
                cache=", expect: [{metric: count, op: '>', value: 400, retryable: true}, {output: dataset}]",
            ),
            T0,
        ),
    )
    succeed(s, "data-S0", [0, 1])
    events = succeed(s, "data-S1", [2, 3])
    assert types(events) == [
        "AttemptSucceeded",
        "StepCheckEvaluated",
        "StepCheckEvaluated",
        "TaskFailed",
        "TicketFailed",
    ]
    assert (events[1].ok, events[1].observed, events[1].attempt, events[2].ok) == (False, "400", 0, True)
    assert events[3].reason == "ExpectationFailed: count > 400 (observed 400)"


def test_shards_reported_without_the_manifest_fields_are_joined_by_a_job_as_before() -> None:
    """Subtask results from before ShardsJoined (in the step cache, or a replayed log) carry no
    `manifest`: the step runs its join job, which writes the manifest from the shards."""
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    apply(s, report(c.RecordJobSucceeded, "data-S0", 1, outputs={"shards": [shard_info(0), shard_info(1)]}))
    events = apply(s, report(c.RecordJobSucceeded, "data-S1", 1, outputs={"shards": [shard_info(2), shard_info(3)]}))
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"]
    assert events[1].task == "data" and events[1].params["_subtasks"] == ["data-S0", "data-S1"]


def test_a_second_ticket_with_the_same_sharded_step_reuses_shards_and_the_joined_manifest() -> None:
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    succeed(s, "data-S0", [0, 1])
    first = succeed(s, "data-S1", [2, 3])[1]
    assert isinstance(first, ev.ShardsJoined) and first.cache_key is not None
    events = apply(s, submit(fanned(shards=2, tid="TICKET-2"), T0))
    reused = [e for e in events if isinstance(e, ev.AttemptReused)]
    assert [e.task for e in reused] == ["data-S0", "data-S1", "data"]
    assert reused[-1].outputs == first.outputs and reused[-1].source_attempt == 0
    assert not [e for e in events if isinstance(e, ev.ShardsJoined)]  # the same dataset id, not a new one

    s = State()  # cache: false joins again (a fresh manifest: this ticket's lineage)
    apply(s, submit(fanned(shards=2, cache=", cache: false"), T0))
    succeed(s, "data-S0", [0, 1])
    assert succeed(s, "data-S1", [2, 3])[1].cache_key is None


def test_projection_records_the_artifact_and_replay_agrees(tmp_path: Path) -> None:
    s, rows = State(), MemoryRows()
    events = apply(s, submit(fanned(shards=2), T0)) + succeed(s, "data-S0", [0, 1]) + succeed(s, "data-S1", [2, 3])
    for seq, e in enumerate(events, start=1):
        project(rows, seq, e)
    joined = s.tickets["TICKET-1"].tasks["data"].outputs["dataset"]
    art = rows.get("artifacts", (joined,))
    assert art is not None and (art["kind"], art["task"], art["attempt"]) == ("dataset", "data", 0)
    assert rows.get("tasks", ("TICKET-1", "data"))["state"] == "succeeded"
    assert rows.get("metrics", ("TICKET-1", "data", "count"))["value"] == 400.0


def test_the_dispatcher_writes_the_joined_manifest_once_and_names_a_lost_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.synth.base import generate_shards

    store = ArtifactStore(tmp_path / "artifacts")
    req = SynthesisRequest(generator="shapes", count=40, shard_size=10)
    shards = [sh.model_dump(mode="json") for sh in generate_shards(req, 0, 4, store)]
    m = join_manifest([manifest_head(req)], shards, Lineage(ticket="T", task="data"), T0)
    event = ev.ShardsJoined(
        at=T0, ticket="T", task="data", manifest=m.model_dump(mode="json"), artifact=m.manifest_id()
    )
    write_joined_manifest(store, event)
    write_joined_manifest(store, event)  # the dispatcher acts again after a crash: same bytes, same id
    assert store.load_manifest(m.manifest_id()).to_bytes() == m.to_bytes()
    store.path(shards[1]["id"]).unlink()
    other = m.model_copy(update={"created_at": T0.replace(year=2030)})
    lost = event.model_copy(update={"manifest": other.model_dump(mode="json"), "artifact": other.manifest_id()})
    write_joined_manifest(store, lost)
    assert store.has(other.manifest_id()) and "lists shard file(s) [1]" in caplog.text
    forged = event.model_copy(update={"artifact": "f" * 64})
    write_joined_manifest(store, forged)
    assert not store.has("f" * 64) and "joined manifest does not hash to" in caplog.text
