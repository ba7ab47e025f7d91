"""Subtasks (a synthesize step with `shards:` fans out, each shard its own job; the step joins them)
and the step protocol probe → verify → act (`probe:` before dispatch, `expect:` on success)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon import commands as c
from daemon.handler import CommandHandler
from daemon.state import State
from schema import events as ev
from schema.artifacts import Manifest
from schema.projections import MemoryRows, project
from schema.readmodel import waiting_on
from schema.store import EventStore, replay_differences
from schema.ticket import TicketInvalid, parse_ticket
from tests.helpers import make_ticket, submit
from tests.test_decider import T0, apply, report, types

SYNTH = "{generator: shapes, count: 400, shard_size: 100}"


def fanned(shards: int = 4, extra_step: str = "") -> Any:
    return make_ticket(
        steps=f"  - {{id: data, kind: synthesize, shards: {shards}, with: {SYNTH}}}\n"
        "  - {id: use, kind: diag, needs: [data]}\n" + extra_step
    )


def succeed_shard(s: State, k: int, attempt: int = 1) -> list[ev.Event]:
    shard = {"index": k, "id": f"{k:064x}", "size": 10, "count": 100, "format": "npz"}
    return apply(s, report(c.RecordJobSucceeded, f"data-S{k}", attempt, metrics={"count": 100.0},
                           outputs={"shards": [shard]}))


def test_a_sharded_step_fans_out_into_subtasks_that_the_step_joins() -> None:
    s = State()
    events = apply(s, submit(fanned(), T0))
    assert types(events) == ["TicketSubmitted", "SubtasksPlanned"] + ["AttemptScheduled"] * 4
    assert [e.task for e in events[2:]] == ["data-S0", "data-S1", "data-S2", "data-S3"]
    assert [e.params["_shard"] for e in events[2:]][1] == {"subtask": 1, "of": 4, "first": 1, "stop": 2}
    assert all(e.params["count"] == 400 and e.kind == "synthesize" for e in events[2:])
    data = s.tickets["TICKET-1"].tasks["data"]
    assert data.status == "pending" and data.subtasks == ["data-S0", "data-S1", "data-S2", "data-S3"]
    for k in range(3):
        assert types(succeed_shard(s, k)) == ["AttemptSucceeded"]  # the join waits for all
    events = succeed_shard(s, 3)
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"]
    join = events[1]
    assert join.task == "data" and join.attempt == 1 and join.params["_subtasks"] == data.subtasks
    assert [o["shards"][0]["index"] for o in join.params["_inputs"].values()] == [0, 1, 2, 3]
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, outputs={"dataset": "d" * 64}))
    assert types(events) == ["AttemptSucceeded", "AttemptScheduled"] and events[1].task == "use"
    assert events[1].params["_inputs"] == {"data": {"dataset": "d" * 64}}  # downstream sees the step only


def test_one_failed_shard_retries_alone_and_a_lost_one_fails_the_ticket_by_name() -> None:
    s = State()
    apply(s, submit(fanned(), T0))
    failed = apply(s, report(c.RecordJobFailed, "data-S2", 1, error="OSError: disk full"))
    assert types(failed) == ["AttemptFailed"] and failed[0].retry_at is not None
    for k in (0, 1, 3):
        succeed_shard(s, k)
    again = apply(s, c.Tick(now=failed[0].retry_at))
    assert [(e.task, e.attempt) for e in again] == [("data-S2", 2)]  # only the failed shard runs again
    assert types(succeed_shard(s, 2, attempt=2)) == ["AttemptSucceeded", "AttemptScheduled"]

    s = State()
    apply(s, submit(fanned(), T0))
    events = apply(s, report(c.RecordJobFailed, "data-S1", 1, error="ValueError: bad", retryable=False))
    assert types(events) == ["AttemptFailed", "TaskFailed", "TicketFailed"]
    assert events[-1].reason == "subtask data-S1 of step data failed: not retryable: ValueError: bad"


def test_one_shard_is_no_fan_out_and_a_revision_keeps_counting_subtask_attempts() -> None:
    s = State()
    events = apply(s, submit(fanned(shards=1), T0))
    assert types(events) == ["TicketSubmitted", "AttemptScheduled"] and events[1].task == "data"
    assert "_shard" not in events[1].params

    s = State()
    apply(s, submit(fanned(shards=2), T0))
    apply(s, report(c.RecordJobFailed, "data-S0", 1, error="x", retryable=False))
    assert s.tickets["TICKET-1"].status == "failed"
    revised = fanned(shards=2, extra_step="  - {id: more, kind: diag}\n")  # a new run of the failed ticket
    events = apply(s, c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash="h2", ticket=revised))
    scheduled = {e.task: e.attempt for e in events if isinstance(e, ev.AttemptScheduled)}
    assert scheduled == {"data-S0": 2, "data-S1": 2, "more": 1}  # (ticket, task, attempt) stays unique


def test_expectations_fail_the_step_at_once_or_retry_as_declared() -> None:
    steps = (
        "  - id: data\n    kind: synthesize\n    with: " + SYNTH + "\n"
        "    expect: [{metric: count, op: '>=', value: 400}, {metric: seconds, op: '<', value: 60}]\n"
        "  - {id: use, kind: diag, needs: [data]}\n"
    )
    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 300.0, "seconds": 2.0}))
    assert types(events) == ["StepCheckEvaluated", "StepCheckEvaluated", "AttemptFailed", "TaskFailed", "TicketFailed"]
    probe, ok = events[0], events[1]
    assert (probe.phase, probe.check, probe.ok, probe.observed, probe.value, probe.attempt) == (
        "expect", "count >= 400", False, "300", 300.0, 1
    )
    assert ok.ok and not events[2].retryable
    assert "ExpectationFailed: count >= 400 (observed 300)" in events[-1].reason

    s = State()
    apply(s, submit(make_ticket(steps=steps.replace("value: 400}", "value: 400, retryable: true}")), T0))
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"seconds": 2.0}))
    assert types(events) == ["StepCheckEvaluated", "StepCheckEvaluated", "AttemptFailed"]
    assert events[0].observed == "no such metric reported (reported: seconds)"
    assert events[2].retry_at is not None  # retried within the step's retries
    events = apply(s, c.Tick(now=events[2].retry_at))
    events = apply(s, report(c.RecordJobSucceeded, "data", 2, metrics={"count": 400.0, "seconds": 1.0}))
    assert types(events) == ["StepCheckEvaluated", "StepCheckEvaluated", "AttemptSucceeded", "AttemptScheduled"]


def test_an_output_expectation_fails_a_result_without_that_output() -> None:
    """`expect: [{output: dataset}]`: a synthesize whose result carries no dataset fails at once, with
    what it did output; one that carries it succeeds, and the observed value is the output's id."""
    steps = (
        "  - id: data\n    kind: synthesize\n    with: " + SYNTH + "\n"
        "    expect: [{output: dataset}]\n"
        "  - {id: use, kind: diag, needs: [data]}\n"
    )
    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 400.0}, outputs={"log": "abc"}))
    assert types(events) == ["StepCheckEvaluated", "AttemptFailed", "TaskFailed", "TicketFailed"]
    check = events[0]
    assert (check.check, check.ok, check.observed, check.value) == (
        "output dataset", False, "no output 'dataset' (outputs: log)", None
    )
    assert "ExpectationFailed: output dataset (observed no output 'dataset' (outputs: log))" in events[-1].reason

    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 400.0}, outputs={"dataset": "d1"}))
    assert types(events) == ["StepCheckEvaluated", "AttemptSucceeded", "AttemptScheduled"]
    assert events[0].ok and events[0].observed == "d1"


def test_a_failed_probe_blocks_the_step_until_its_input_is_there() -> None:
    steps = (
        "  - {id: data, kind: synthesize, with: " + SYNTH + "}\n"
        "  - id: train\n    kind: diag\n    needs: [data]\n"
        "    probe: [{metric: data.count, op: '>=', value: 400}, {core: encoder}]\n"
    )
    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 400.0}))
    assert types(events) == ["AttemptSucceeded", "StepCheckEvaluated", "StepCheckEvaluated", "TaskBlocked"]
    assert [(e.check, e.ok, e.observed) for e in events[1:3]] == [
        ("data.count >= 400", True, "400"),
        ("core has encoder", False, "core v0 holds no components"),
    ]
    assert events[3].reason.startswith("probe failed: core has encoder (core v0 holds no components)")
    assert s.tickets["TICKET-1"].status == "running"  # waiting, not failed
    # A new core version holding the component re-probes the step, which then runs.
    s.core_version, s.core_history = 2, [{"version": 1, "components": {"encoder": {"task": "t"}}, "metrics": {}}]
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="me"))
    assert types(events) == ["CorePromoted", "TaskRetried", "StepCheckEvaluated", "StepCheckEvaluated",
                             "AttemptScheduled"]
    assert events[-1].task == "train" and all(e.ok for e in events[2:4])


def test_projections_show_subtasks_and_every_check() -> None:
    s, rows, seq = State(), MemoryRows(), 0
    extra = "  - {id: p, kind: diag, needs: [data], probe: [{metric: data.count, op: '>', value: 1000}]}\n"
    for cmd in [submit(fanned(shards=2, extra_step=extra), T0)]:
        for e in apply(s, cmd):
            seq += 1
            project(rows, seq, e)
    for e in succeed_shard(s, 0) + succeed_shard(s, 1) + apply(
        s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 400.0}, outputs={"dataset": "x"})
    ):
        seq += 1
        project(rows, seq, e)
    sub = rows.get("tasks", ("TICKET-1", "data-S1"))
    assert sub is not None and sub["parent"] == "data" and sub["state"] == "succeeded"
    assert rows.get("tasks", ("TICKET-1", "data"))["needs"] == ["data-S0", "data-S1"]
    assert rows.get("tickets", ("TICKET-1",))["tasks_total"] == 5
    [check] = rows.data["step_checks"].values()
    seen = (check["task"], check["expected"], check["ok"], check["observed"])
    assert seen == ("p", "data.count > 1000", False, "400")
    assert rows.get("tasks", ("TICKET-1", "p"))["state"] == "blocked"
    tasks = [r for k, r in rows.data["tasks"].items() if k[0] == "TICKET-1"]
    assert waiting_on(tasks, T0) == "p: probe failed: data.count > 1000 (400) (then jbctl retry --task p)"


@pytest.mark.parametrize(
    ("step", "where", "message"),
    [
        ("shards: 0", "8:5", "shards: Input should be greater than or equal to 1"),
        ("shards: -1", "8:5", "shards: Input should be greater than or equal to 1"),
        ("shards: 1000000000", "8:5", "shards: Input should be less than or equal to 64"),
        ("shards: four", "8:5", "shards: Input should be a valid integer"),
        ("shards: 2.5", "8:5", "shards: Input should be a valid integer"),
        ("shards: true", "8:5", "shards: Input should be a valid integer"),
        ("shards: 5", "8:5", "shards: 5 but count 400 at shard_size 100 makes only 4 shard file(s)"),
        ("expect: [{metric: acuracy, op: '>', value: 1}]", "8:15", "expect names metric 'acuracy', which a "
         "synthesize step never reports; it reports count, seconds"),
        ("expect: [{metric: use.count, op: '>', value: 1}]", "8:15", "expect checks this step's own metrics"),
        ("expect: [{run: [true]}]", "8:14", "an expectation is a metric check (metric, op, value)"),
        ("expect: [{output: dataset, metric: count, op: '>', value: 1}]", "8:14", "either {metric, op, value} or"),
        ("expect: [{metric: count, op: '>'}]", "8:14", "needs metric, op and value (missing: value)"),
        ("expect: [{output: ''}]", "8:15", "String should have at least 1 character"),
        ("expect: [{}]", "8:14", "needs metric, op and value (missing: metric, op, value), or output: NAME"),
        ("probe: [{metric: dta.count, op: '>', value: 1}]", "8:14", "probe reads unknown step 'dta'"),
        ("probe: [{core: ''}]", "8:14", "String should have at least 1 character"),
    ],
)
def test_hostile_shards_expect_and_probe_are_refused_at_their_line(step: str, where: str, message: str) -> None:
    text = (
        "id: TICKET-1\ntitle: t\ngoal: g\nsteps:\n  - {id: use, kind: diag}\n"
        f"  - id: data\n    kind: synthesize\n    with: {SYNTH}\n"
    )
    text = text.replace("    kind: synthesize\n", f"    kind: synthesize\n    {step}\n")
    with pytest.raises(TicketInvalid) as info:
        parse_ticket(text.encode(), "TICKET-1.yaml")
    error = str(info.value)
    assert error.startswith(f"TICKET-1.yaml:{where}: ") and message in error, error


def test_shards_elsewhere_are_refused() -> None:
    for steps, message in [
        ("  - {id: t, kind: train, shards: 2}\n", "only a synthesize step fans out into shards, not train"),
        ("  - {id: d, kind: synthesize, shards: 2, with: {generator: shapes}}\n",
         "shards: 2 needs an integer `count` >= 1 in `with` (got None)"),
        ("  - {id: d, kind: synthesize, shards: 2, with: {generator: shapes, count: 10, shard_size: x}}\n",
         "needs an integer `shard_size` >= 1"),
        ("  - {id: a, kind: diag}\n  - {id: b, kind: diag, probe: [{metric: a.x, op: '>', value: 1}]}\n",
         "probe reads a step that is not in this step's needs 'a'"),
        ("".join(f"  - {{id: d{k}, kind: synthesize, shards: 64, "
                 "with: {generator: shapes, count: 64, shard_size: 1}}\n" for k in range(5)),
         "more than 256 subtasks in all"),
    ]:
        with pytest.raises(TicketInvalid, match=re.escape(message)):
            make_ticket(steps=steps)


def test_status_tree_collapses_many_subtasks_and_describe_shows_checks(
    store: EventStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main as jbctl

    handler = CommandHandler(store)
    steps = (
        "  - {id: data, kind: synthesize, shards: 6, with: {generator: shapes, count: 600, shard_size: 100},"
        " expect: [{metric: count, op: '==', value: 600}]}\n"
        "  - {id: use, kind: diag, needs: [data], probe: [{metric: data.count, op: '>=', value: 600}]}\n"
    )
    handler.handle(submit(make_ticket(steps=steps), T0))
    for k in range(6):
        handler.handle(report(c.RecordJobStarted, f"data-S{k}", 1, 1, worker="w"))
    for k in range(5):
        shard = {"index": k, "id": f"{k:064x}", "size": 1, "count": 100, "format": "npz"}
        handler.handle(report(c.RecordJobSucceeded, f"data-S{k}", 1, 2, outputs={"shards": [shard]}))
    handler.handle(report(c.RecordJobFailed, "data-S5", 1, 2, error="OSError: disk full"))
    assert jbctl(["status", "TICKET-1"]) == 0
    tree = capsys.readouterr().out
    assert "data [synthesize/cpu] pending  6 subtasks" in tree
    assert "6 subtasks: 5 succeeded, 1 waiting_retry" in tree and "data-S5 [synthesize/cpu] waiting_retry" in tree
    assert "data-S0" not in tree  # collapsed
    retry_at = handler.state.tickets["TICKET-1"].tasks["data-S5"].retry_at
    handler.handle(c.Tick(now=retry_at + timedelta(seconds=1)))
    shard = {"index": 5, "id": f"{5:064x}", "size": 1, "count": 100, "format": "npz"}
    handler.handle(report(c.RecordJobSucceeded, "data-S5", 2, 1, outputs={"shards": [shard]}))
    handler.handle(report(c.RecordJobSucceeded, "data", 1, 1, metrics={"count": 600.0}, outputs={"dataset": "x"}))
    assert jbctl(["describe", "TICKET-1"]) == 0
    out = capsys.readouterr().out
    assert "pass  expect data attempt 1: count == 600  (observed 600)" in out
    assert "pass  probe  use: data.count >= 600  (observed 600)" in out
    assert jbctl(["describe", "TICKET-1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["phase"], r["ok"]) for r in info["step_checks"]] == [("expect", True), ("probe", True)]
    from console import data as console_data

    page = console_data.ticket(store.engine, "TICKET-1")
    assert page is not None and [r["expected"] for r in page["step_checks"]] == ["count == 600", "data.count >= 600"]
    assert {t["task"]: t["parent"] for t in page["tasks"]}["data-S5"] == "data"
    assert replay_differences(store) == []  # the projections rebuild from the log alone


@pytest.mark.integration
def test_sharded_synthesize_on_a_real_worker_writes_the_unsharded_manifest(tmp_path: Path) -> None:
    from schema.artifact_store import ArtifactStore
    from tests.harness import Setup
    from workers.synth.base import synthesize

    setup = Setup(tmp_path / "home")
    try:
        setup.daemon.start()
        setup.worker("cpu")
        setup.drop(
            "TICKET-1",
            "  - {id: data, kind: synthesize, shards: 2, with: {generator: shapes, count: 64, shard_size: 16},"
            " expect: [{metric: count, op: '==', value: 64}]}\n",
        )
        assert setup.wait_done("TICKET-1") == "TicketCompleted"
        rows = setup.daemon.rows()
        jobs = [(r["data"]["task"], r["data"]["attempt"]) for r in rows if r["type"] == "AttemptSucceeded"]
        assert sorted(jobs) == [("data-S0", 1), ("data-S1", 1)]  # the join is no job: the decider's
        [dataset] = [r["data"]["outputs"]["dataset"] for r in rows if r["type"] == "ShardsJoined"]
        store = ArtifactStore(setup.home / "artifacts")
        joined = store.load_manifest(dataset)  # written by the daemon's dispatcher
        # What one job writes for the same step (same lineage and time): byte for byte the same.
        one = synthesize("shapes", {}, 0, 64, 16, ArtifactStore(tmp_path / "one"), joined.lineage,
                         created_at=joined.created_at)
        assert one.to_bytes() == joined.to_bytes() and isinstance(joined, Manifest)
        described = setup.jbctl("describe", "TICKET-1")
        assert f"{dataset[:16]}  dataset  from data (joined from its subtasks, no job)" in described.stdout
        setup.assert_consistent()
    finally:
        setup.close()


def test_shard_jobs_and_their_join_write_the_one_job_manifest_and_the_join_refuses_a_lost_shard(
    tmp_path: Path,
) -> None:
    from workers.context import LocalContext
    from workers.jobs import run_synthesize

    req = {"generator": "shapes", "count": 30, "shard_size": 7, "params": {"size": 16}}

    def ctx(name: str, task: str) -> LocalContext:
        return LocalContext(tmp_path / name, artifact_root=tmp_path / "store", ticket="T", task=task)

    one = ctx("one", "data")
    single = one.store.load_manifest(run_synthesize(one, dict(req)).outputs["dataset"])
    outs = {}
    for k, (first, stop) in enumerate([(0, 2), (2, 3), (3, 5)]):  # 5 shard files over 3 subtasks
        part = {"subtask": k, "of": 3, "first": first, "stop": stop}
        outs[f"data-S{k}"] = run_synthesize(ctx(f"s{k}", f"data-S{k}"), req | {"_shard": part}).outputs
    join = run_synthesize(ctx("join", "data"), req | {"_subtasks": list(outs), "_inputs": outs})
    joined = one.store.load_manifest(join.outputs["dataset"])
    assert joined.model_copy(update={"created_at": single.created_at}).to_bytes() == single.to_bytes()
    assert join.metrics["count"] == 30 and join.metrics["seconds"] >= sum(o["seconds"] for o in outs.values())
    one.store.path(outs["data-S1"]["shards"][0]["id"]).unlink()
    with pytest.raises(RuntimeError, match=r"shard 2 .* reported by a subtask is missing in the store"):
        run_synthesize(ctx("join2", "data"), req | {"_subtasks": list(outs), "_inputs": outs})
