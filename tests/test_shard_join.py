"""A sharded synthesize step is joined by the decider (ShardsJoined), not by a job: the manifest is
built from the subtasks' reports, byte for byte what one job writes, and the dispatcher writes it
before it acts on anything later."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from daemon import commands as c
from daemon.manifests import write_joined_manifest
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
    assert events[1].reason.endswith("; `jbctl retry TICKET-1 --from data` runs the shards again")


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


# --- shards implied by a step's size ----------------------------------------------------------


def synth_step(with_: str, extra: str = "") -> Any:
    return make_ticket(
        steps=f"  - {{id: data, kind: synthesize{extra}, with: {{generator: shapes, {with_}}}}}\n"
    ).steps[0]


@pytest.mark.parametrize(
    ("with_", "extra", "ranges"),
    [
        ("count: 10000", "", []),  # one subtask's worth: one job
        ("count: 20000, shard_size: 5000", "", [(0, 2), (2, 4)]),  # 2 per 10,000 examples
        ("count: 35000", "", [(0, 1), (1, 2), (2, 3), (3, 4)]),  # the last range is the 5,000 remainder
        ("count: 200000, shard_size: 20000", "", [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]),
        ("count: 30000, shard_size: 30000", "", []),  # one shard file: nothing to split
        ("count: 200000", ", shards: 1", []),  # said: one job
        ("count: 50000", ", shards: 2", [(0, 3), (3, 5)]),  # said: 2, the longer range first
    ],
)
def test_a_large_synthesize_step_fans_out_by_its_size_unless_it_says_shards(
    with_: str, extra: str, ranges: list[tuple[int, int]]
) -> None:
    from schema.plan import plan_subtasks

    planned = plan_subtasks(synth_step(with_, extra))
    assert [(p.params["_shard"]["first"], p.params["_shard"]["stop"]) for p in planned] == ranges
    assert [p.id for p in planned] == [f"data-S{k}" for k in range(len(ranges))]


def test_implied_shards_never_apply_to_a_sweep_or_other_kinds_and_count_toward_the_cap() -> None:
    from schema.ticket import MAX_SUBTASKS, TicketInvalid

    sweep = make_ticket(
        steps="  - {id: data, kind: synthesize, matrix: {seed: [1, 2]}, select: {metric: count, mode: max},\n"
        "    with: {generator: shapes, count: 100000}}\n"
    ).steps[0]
    assert sweep.shard_count == 1 and sweep.fan_out == 2
    diag = make_ticket(steps="  - {id: d, kind: diag, with: {count: 100000}}\n").steps[0]
    assert diag.shard_count == 1 and diag.fan_out == 0
    many = "".join(
        f"  - {{id: s{n}, kind: synthesize, with: {{generator: shapes, count: 80000, seed: {n}}}}}\n"
        for n in range(MAX_SUBTASKS // 8 + 1)
    )
    with pytest.raises(TicketInvalid, match=r"this step's size implies 8 shards: say `shards:` to run fewer"):
        make_ticket(steps=many)


def test_an_implied_fan_out_runs_and_joins_like_a_written_one() -> None:
    s = State()
    events = apply(
        s, submit(make_ticket(steps="  - {id: data, kind: synthesize, with: {generator: shapes, count: 20000}}\n"), T0)
    )
    assert types(events) == ["TicketSubmitted", "SubtasksPlanned", "AttemptScheduled", "AttemptScheduled"]
    head = manifest_head(SynthesisRequest(generator="shapes", count=20000))
    for k in range(2):
        outputs = {"shards": [shard_info(k, 10000)], "seconds": 1.0, "manifest": head}
        events = apply(s, report(c.RecordJobSucceeded, f"data-S{k}", 1, outputs=outputs))
    assert types(events) == ["AttemptSucceeded", "ShardsJoined", "AcceptanceEvaluated", "TicketCompleted"]


def test_retry_from_a_joined_step_runs_its_shards_again_and_joins_anew() -> None:
    s = State()
    apply(s, submit(fanned(shards=2), T0))
    succeed(s, "data-S0", [0, 1])
    first = succeed(s, "data-S1", [2, 3])[1]
    apply(s, report(c.RecordJobSucceeded, "use", 1))
    assert s.tickets["TICKET-1"].status == "completed"
    later = T0.replace(hour=T0.hour + 1)
    events = apply(s, c.RetryFrom(now=later, ticket="TICKET-1", task="data"))
    assert [(e.task, e.attempt) for e in events if isinstance(e, ev.AttemptScheduled)] == [
        ("data-S0", 2),
        ("data-S1", 2),
    ]
    apply(
        s,
        report(
            c.RecordJobSucceeded,
            "data-S0",
            2,
            now=later,
            outputs={"shards": [shard_info(0), shard_info(1)], "seconds": 0.5, "manifest": HEAD},
        ),
    )
    events = apply(
        s,
        report(
            c.RecordJobSucceeded,
            "data-S1",
            2,
            now=later,
            outputs={"shards": [shard_info(2), shard_info(3)], "seconds": 0.5, "manifest": HEAD},
        ),
    )
    again = next(e for e in events if isinstance(e, ev.ShardsJoined))  # fresh: not the cached join
    assert again.artifact != first.artifact and again.manifest["created_at"] != first.manifest["created_at"]
    assert again.manifest["shards"] == first.manifest["shards"]  # the same data


def test_the_daemons_handler_writes_the_manifest_before_the_join_is_recorded(store: Any, tmp_path: Path) -> None:
    """A ticket is never recorded complete while its joined manifest is not on disk: the daemon's
    handler writes it before it appends; a write that fails records nothing (the report is retried)."""
    from daemon.handler import CommandHandler
    from daemon.manifests import manifest_writer

    artifacts = ArtifactStore(tmp_path / "artifacts")
    from schema.settings import Settings

    settings = Settings(home=tmp_path)  # its artifacts_path: tmp_path / "artifacts"
    handler = CommandHandler(store, before_append=manifest_writer(settings))
    handler.handle(submit(fanned(shards=2), T0))
    for sub, files in (("data-S0", [0, 1]), ("data-S1", [2, 3])):
        outputs = {"shards": [shard_info(k) for k in files], "seconds": 0.5, "manifest": HEAD}
        recorded = handler.handle(report(c.RecordJobSucceeded, sub, 1, outputs=outputs))
    [joined] = [r.event for r in recorded if isinstance(r.event, ev.ShardsJoined)]
    assert artifacts.load_manifest(joined.artifact).model_dump(mode="json") == joined.manifest

    def broken(events: Any) -> None:
        if any(isinstance(e, ev.ShardsJoined) for e in events):
            raise OSError("No space left on device")

    failing = CommandHandler(store, before_append=broken)
    failing.handle(submit(fanned(shards=2, tid="TICKET-2", cache=", cache: false"), T0))
    outputs = {"shards": [shard_info(0), shard_info(1)], "seconds": 0.5, "manifest": HEAD}
    failing.handle(report(c.RecordJobSucceeded, "data-S0", 1, ticket="TICKET-2", outputs=outputs))
    head = store.head()
    last = {"shards": [shard_info(2), shard_info(3)], "seconds": 0.5, "manifest": HEAD}
    with pytest.raises(OSError, match="No space left"):
        failing.handle(report(c.RecordJobSucceeded, "data-S1", 1, ticket="TICKET-2", outputs=last))
    assert store.head() == head  # nothing recorded: the subtask's success comes again with its report


@pytest.mark.integration
def test_the_joined_manifest_goes_to_the_object_store_when_one_is_configured(s3_url: str, tmp_path: Path) -> None:
    """With JETBOX_ARTIFACTS_URL the daemon writes the joined manifest where the workers write (the
    object store), not into its own folder: a worker on another machine reads it."""
    from daemon.manifests import manifest_writer
    from schema.settings import load_settings
    from workers.synth.base import generate_shards

    settings = load_settings(home=tmp_path / "daemon-home")
    worker_store = ArtifactStore.from_settings(load_settings(home=tmp_path / "worker-home"))
    req = SynthesisRequest(generator="shapes", count=20, shard_size=10)
    shards = [sh.model_dump(mode="json") for sh in generate_shards(req, 0, 2, worker_store)]
    m = join_manifest([manifest_head(req)], shards, Lineage(ticket="T", task="data"), T0)
    event = ev.ShardsJoined(
        at=T0, ticket="T", task="data", manifest=m.model_dump(mode="json"), artifact=m.manifest_id()
    )
    manifest_writer(settings)([event])
    other = ArtifactStore.from_settings(load_settings(home=tmp_path / "third-home"))
    assert other.load_manifest(m.manifest_id()).to_bytes() == m.to_bytes()
    assert not (tmp_path / "daemon-home" / "artifacts" / "objects").exists() or not any(
        (tmp_path / "daemon-home" / "artifacts" / "objects").rglob("*")
    )  # nothing kept only on the daemon's disk
