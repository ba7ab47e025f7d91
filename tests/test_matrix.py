"""Sweeps and multi-seed evaluation: a step's `matrix:` fans out into one subtask per combination;
the step joins them without a job, choosing the best by `select:` (SweepJoined)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from daemon import commands as c
from daemon.state import State, evolve
from schema import events as ev
from schema.projections import MemoryRows, project
from schema.store import EventStore, replay_differences
from schema.ticket import TicketInvalid, parse_ticket
from tests.helpers import make_ticket, submit, ticket_yaml
from tests.test_decider import T0, apply, report, types

SELECT_MAX = "select: {metric: ev.acc, mode: max}"


def swept(matrix: str = "{lr: [0.1, 0.2], seed: [0, 1, 2]}", select: str = SELECT_MAX, retries: int = 2) -> Any:
    return make_ticket(
        steps=f"  - {{id: ev, kind: evaluate, retries: {retries}, matrix: {matrix}, {select}, with: {{split: test}}}}\n"
        "  - {id: use, kind: diag, needs: [ev]}\n"
    )


def succeed(s: State, k: int, acc: float | None, attempt: int = 1, **more: float) -> list[ev.Event]:
    metrics = ({} if acc is None else {"acc": acc}) | more
    return apply(s, report(c.RecordJobSucceeded, f"ev-S{k}", attempt, metrics=metrics, outputs={"model": f"m{k}"}))


def run_sweep(accs: list[float | None], select: str = SELECT_MAX, matrix: str | None = None) -> tuple[State, list]:
    s = State()
    log = apply(s, submit(swept(matrix or "{lr: [0.1, 0.2], seed: [0, 1, 2]}", select), T0))
    for k, acc in enumerate(accs):
        log += succeed(s, k, acc)
    return s, log


def test_a_matrix_fans_out_one_subtask_per_combination_overlaid_on_with() -> None:
    s = State()
    events = apply(s, submit(swept(), T0))
    assert types(events) == ["TicketSubmitted", "SubtasksPlanned"] + ["AttemptScheduled"] * 6
    assert events[1].join == "select"
    assert [e.task for e in events[2:]] == [f"ev-S{k}" for k in range(6)]
    # The first key varies slowest; each combination is overlaid on `with:`.
    assert [(e.params["lr"], e.params["seed"]) for e in events[2:]] == [
        (0.1, 0), (0.1, 1), (0.1, 2), (0.2, 0), (0.2, 1), (0.2, 2)
    ]
    assert all(e.params["split"] == "test" and e.kind == "evaluate" for e in events[2:])
    assert len({e.cache_key for e in events[2:]}) == 6  # each combination is its own step key


def test_the_join_runs_no_job_and_picks_the_best_by_max_with_mean_and_std() -> None:
    accs = [0.1, 0.5, 0.3, 0.2, 0.4, 0.0]
    s, log = run_sweep(accs[:5])
    assert "SweepJoined" not in types(log)  # waits for every combination
    events = succeed(s, 5, accs[5])
    assert types(events) == ["AttemptSucceeded", "SweepJoined", "AttemptScheduled"]
    joined, downstream = events[1], events[2]
    assert joined.best == "ev-S1" and (joined.metric, joined.mode) == ("acc", "max")
    assert [r["params"] for r in joined.rows][1] == {"lr": 0.1, "seed": 1}
    assert [r["metrics"]["acc"] for r in joined.rows] == accs
    mean = sum(accs) / 6
    assert joined.metrics["acc"] == 0.5
    assert math.isclose(joined.metrics["acc_mean"], mean)
    assert math.isclose(joined.metrics["acc_std"], math.sqrt(sum((a - mean) ** 2 for a in accs) / 6))
    step = s.tickets["TICKET-1"].tasks["ev"]
    assert step.status == "succeeded" and step.attempt == 0 and step.best == "ev-S1"  # no job ran
    assert step.outputs == {"model": "m1"} and step.metrics == joined.metrics
    assert downstream.task == "use" and downstream.params["_inputs"] == {"ev": {"model": "m1"}}
    events = apply(s, report(c.RecordJobSucceeded, "use", 1))
    assert types(events) == ["AttemptSucceeded", "AcceptanceEvaluated", "TicketCompleted"]


def test_min_and_the_tie_rule_first_in_combination_order() -> None:
    _, log = run_sweep([0.3, 0.1, 0.2, 0.1, 0.5, 0.1], select="select: {metric: acc, mode: min}")
    joined = next(e for e in log if isinstance(e, ev.SweepJoined))
    assert joined.best == "ev-S1" and joined.mode == "min"  # S1, S3 and S5 tie: the first wins
    _, log = run_sweep([0.7, 0.2, 0.7, 0.7, 0.1, 0.0])
    assert next(e for e in log if isinstance(e, ev.SweepJoined)).best == "ev-S0"


def test_a_single_combination_needs_no_select_and_aggregates_have_zero_std() -> None:
    s = State()
    apply(s, submit(swept("{seed: [7]}", select="queue: gpu"), T0))
    events = succeed(s, 0, 0.25, loss=2.0)
    joined = events[1]
    assert isinstance(joined, ev.SweepJoined) and joined.best == "ev-S0" and joined.metric is None
    assert joined.metrics == {"acc": 0.25, "loss": 2.0, "acc_mean": 0.25, "acc_std": 0.0, "acc_min": 0.25,
                              "acc_max": 0.25, "loss_mean": 2.0, "loss_std": 0.0, "loss_min": 2.0, "loss_max": 2.0}


def test_a_failed_combination_retries_alone_and_one_lost_for_good_fails_the_ticket() -> None:
    s = State()
    apply(s, submit(swept(), T0))
    failed = apply(s, report(c.RecordJobFailed, "ev-S4", 1, error="RuntimeError: CUDA OOM"))
    assert types(failed) == ["AttemptFailed"] and failed[0].retry_at is not None
    for k in (0, 1, 2, 3, 5):
        succeed(s, k, 0.1)
    again = apply(s, c.Tick(now=failed[0].retry_at))
    assert [(e.task, e.attempt) for e in again] == [("ev-S4", 2)]  # only that combination runs again
    assert types(succeed(s, 4, 0.9, attempt=2)) == ["AttemptSucceeded", "SweepJoined", "AttemptScheduled"]
    assert s.tickets["TICKET-1"].tasks["ev"].best == "ev-S4"

    s = State()
    apply(s, submit(swept(retries=0), T0))
    events = apply(s, report(c.RecordJobFailed, "ev-S2", 1, error="ValueError: bad split"))
    assert types(events) == ["AttemptFailed", "TaskFailed", "TicketFailed"]
    assert events[-1].reason == "subtask ev-S2 of step ev failed: failed after 1 attempts: ValueError: bad split"


def test_a_combination_without_the_selected_metric_fails_the_step_saying_which() -> None:
    _, log = run_sweep([0.1, None, 0.2, math.nan, 0.4, 0.5])
    assert types(log)[-3:] == ["AttemptSucceeded", "TaskFailed", "TicketFailed"]
    assert log[-2].task == "ev"
    assert log[-2].reason == (
        "select: metric 'acc' is missing or not a number for ev-S1, ev-S3 (ev-S1 reported: no metrics)"
    )
    assert log[-1].reason.startswith("task ev failed: select: metric 'acc'")


def test_replay_of_the_log_gives_the_same_state_and_projection_shows_the_table() -> None:
    s, log = run_sweep([0.1, 0.5, 0.3, 0.2, 0.4, 0.0])
    log += apply(s, report(c.RecordJobSucceeded, "use", 1))
    replayed = State()
    for e in log:
        evolve(replayed, e)
    assert replayed == s and replayed.tickets["TICKET-1"].status == "completed"

    rows = MemoryRows()
    for seq, e in enumerate(log, start=1):
        project(rows, seq, e)
    table = sorted(rows.data["sweeps"].values(), key=lambda r: r["position"])
    assert [r["subtask"] for r in table] == [f"ev-S{k}" for k in range(6)]
    assert [r["best"] for r in table] == [False, True, False, False, False, False]
    assert table[1]["params"] == {"lr": 0.1, "seed": 1} and table[1]["metrics"] == {"acc": 0.5}
    step = rows.get("tasks", ("TICKET-1", "ev"))
    assert step is not None and step["state"] == "succeeded"
    acc = rows.get("metrics", ("TICKET-1", "ev", "acc_mean"))
    assert acc is not None and math.isclose(acc["value"], 0.25)


def test_the_sweeps_table_in_sql_for_describe_and_console_and_a_replay_rebuilds_it(store: EventStore) -> None:
    """Through the real store (SQLite migrated to head): the sweeps rows, the console's tables, and
    `replay --check`'s comparison. A revision with another matrix shows only its latest join."""
    from console import data
    from daemon.handler import CommandHandler
    from schema import readmodel as rm

    handler = CommandHandler(store)
    handler.handle(submit(swept(), T0))
    for k, acc in enumerate([0.1, 0.5, 0.3, 0.2, 0.4, 0.0]):
        handler.handle(report(c.RecordJobSucceeded, f"ev-S{k}", 1, metrics={"acc": acc}, outputs={"model": f"m{k}"}))
    with store.engine.connect() as conn:
        rows = rm.sweep_rows(conn, "TICKET-1")
    assert [(r["subtask"], r["best"]) for r in rows][:2] == [("ev-S0", False), ("ev-S1", True)]
    page = data.ticket(store.engine, "TICKET-1")
    assert page is not None
    [sweep] = page["sweeps"]
    assert (sweep["step"], sweep["params"], sweep["metrics"]) == ("ev", ["lr", "seed"], ["acc"])
    assert sweep["rows"][1]["params"] == {"lr": 0.1, "seed": 1} and sweep["rows"][1]["metrics"] == {"acc": 0.5}
    handler.handle(report(c.RecordJobFailed, "use", 1, error="x", retryable=False))  # ends it: revise it
    revised = swept("{seed: [5, 6]}")
    handler.handle(c.SubmitTicket(now=T0, path="/t/TICKET-1.yaml", content_hash="h2", ticket=revised))
    for k, acc in enumerate([0.9, 0.8]):
        handler.handle(report(c.RecordJobSucceeded, f"ev-S{k}", 2, metrics={"acc": acc}, outputs={"model": "r"}))
    with store.engine.connect() as conn:
        rows = rm.sweep_rows(conn, "TICKET-1")
    assert [(r["subtask"], r["params"], r["best"]) for r in rows] == [
        ("ev-S0", {"seed": 5}, True), ("ev-S1", {"seed": 6}, False)
    ]  # the first join's ev-S2..S5 rows are older: not shown
    assert replay_differences(store) == []


def test_the_join_runs_no_job_so_a_hold_does_not_keep_it_but_keeps_what_follows() -> None:
    s = State()
    apply(s, submit(swept("{seed: [0, 1]}"), T0))
    succeed(s, 0, 0.1)
    apply(s, c.HoldTicket(now=T0, ticket="TICKET-1", reason="look at S0"))
    events = succeed(s, 1, 0.2)
    assert types(events)[:2] == ["AttemptSucceeded", "SweepJoined"]  # no slot needed
    assert "AttemptScheduled" not in types(events)  # `use` waits for the release


def parse_error(matrix_line: str, kind: str = "evaluate", extra: str = "") -> str:
    text = ticket_yaml(steps=f"  - id: ev\n    kind: {kind}\n{matrix_line}{extra}")
    with pytest.raises(TicketInvalid) as info:
        parse_ticket(text.encode(), "t.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("    matrix: {seed: []}\n", "t.yaml:7:14: matrix: seed is an empty list"),
        ("    matrix: {seed: 3}\n", "t.yaml:7:14: matrix: seed must be a list of values, e.g. [1, 2] (got int)"),
        ("    matrix: {_shard: [1, 2]}\n", "'_shard' is reserved"),
        ("    matrix: {}\n", "matrix: needs at least one parameter"),
        ("    matrix: {seed: [0, 1]}\n", "matrix: 2 combinations need `select: {metric: NAME, mode: max|min}`"),
        ("    matrix: {a: [0, 1, 2, 3], b: [0, 1, 2, 3], c: [0, 1, 2, 3], d: [0, 1, 2, 3], e: [0, 1]}\n"
         "    select: {metric: acc, mode: max}\n", "matrix: more than 256 combinations"),
        ("    select: {metric: acc, mode: max}\n", "select: only a step with a `matrix:`"),
        ("    matrix: {seed: [0, 1]}\n    select: {metric: acc, mode: best}\n", "mode"),
        ("    matrix: {seed: [0, 1]}\n    select: {metric: other.acc, mode: max}\n",
         "select reads this step's own metrics"),
        ("    matrix: {seed: ['/etc/passwd']}\n", "is a path outside the workspace"),
        ("    matrix: {data: [nowhere]}\n", "data refers to step 'nowhere', which is not in this step's needs"),
    ],
)
def test_hostile_matrices_are_refused_naming_field_and_line(lines: str, expected: str) -> None:
    assert expected in parse_error(lines)


def test_matrix_with_shards_on_other_kinds_and_over_the_ticket_cap_is_refused() -> None:
    synth = "    with: {generator: shapes, count: 400, shard_size: 100}\n"
    message = parse_error("    shards: 2\n    matrix: {seed: [0]}\n" + synth, kind="synthesize")
    assert "matrix: cannot be combined with shards" in message
    assert "matrix: a infer step cannot sweep" in parse_error("    matrix: {seed: [0]}\n", kind="infer")
    assert "matrix: a check step cannot sweep" in parse_error("    matrix: {seed: [0]}\n", kind="check")
    closed = "    matrix: {seed: [0, 1]}\n    select: {metric: count, mode: max}\n" + synth
    assert "expect names metric 'acc_mean', which a synthesize step never reports" in parse_error(
        closed + "    expect: [{metric: acc_mean, op: '>', value: 0}]\n", kind="synthesize"
    )
    wide = "[" + ", ".join(str(k) for k in range(200)) + "]"
    steps = "".join(
        f"  - {{id: e{n}, kind: diag, matrix: {{seed: {wide}}}, select: {{metric: m, mode: max}}}}\n" for n in range(2)
    )
    with pytest.raises(TicketInvalid, match=r"t.yaml:\d+:\d+: more than 256 subtasks in all"):
        parse_ticket(ticket_yaml(steps=steps).encode(), "t.yaml")


@pytest.mark.integration
def test_a_diag_sweep_on_a_real_worker_joins_and_describe_shows_the_table(tmp_path: Path) -> None:
    from tests.console_server import ConsoleServer
    from tests.harness import Setup

    setup = Setup(tmp_path / "home")
    try:
        setup.daemon.start()
        setup.worker("cpu")
        setup.drop(
            "TICKET-1",
            # A diag job reports the metrics it is given: the sweep's values decide the best.
            "  - {id: sweep, kind: diag, matrix: {metrics: [{acc: 0.2}, {acc: 0.7}, {acc: 0.7}]},"
            " select: {metric: acc, mode: max}}\n"
            "  - {id: after, kind: diag, needs: [sweep]}\n",
        )
        assert setup.wait_done("TICKET-1") == "TicketCompleted"
        rows = setup.daemon.rows()
        joined = [r["data"] for r in rows if r["type"] == "SweepJoined"]
        assert len(joined) == 1 and [r["params"]["metrics"]["acc"] for r in joined[0]["rows"]] == [0.2, 0.7, 0.7]
        assert joined[0]["best"] == "sweep-S1" and joined[0]["metrics"]["acc"] == 0.7  # a tie: the first
        done = sorted(r["data"]["task"] for r in rows if r["type"] == "AttemptSucceeded")
        assert done == ["after", "sweep-S0", "sweep-S1", "sweep-S2"]  # the step itself ran no job
        described = setup.jbctl("describe", "TICKET-1")
        assert described.returncode == 0, described.stderr
        assert "sweep sweep (3 combinations, * = chosen):" in described.stdout
        best = joined[0]["best"]
        marked = [line.split()[:2] for line in described.stdout.splitlines() if line.strip().startswith("*")]
        assert marked == [["*", best]]
        console = ConsoleServer(setup.home, env=setup.env)  # the ticket page shows the same table
        try:
            code, page = console.request("GET", "/tickets/TICKET-1")
        finally:
            console.stop()
        assert code == 200 and "Sweep sweep" in page.decode() and page.decode().count("★") == 2  # legend + best
        setup.assert_consistent()
    finally:
        setup.close()


def test_expect_on_a_matrix_step_judges_the_joined_result_best_and_aggregates() -> None:
    """`expect:` on a sweep judges what the step hands on: the best's metrics and the aggregates over
    every combination (`acc_min` asks it of each one); a miss fails the step at once, naming it."""
    expect = "expect: [{metric: acc, op: '>=', value: 0.4}, {metric: acc_min, op: '>=', value: 0.2}]"
    s = State()
    apply(s, submit(swept("{seed: [0, 1, 2]}", select=f"{SELECT_MAX}, {expect}"), T0))
    for k, acc in enumerate([0.3, 0.5]):
        succeed(s, k, acc)
    events = succeed(s, 2, 0.1)
    assert types(events) == ["AttemptSucceeded", "StepCheckEvaluated", "StepCheckEvaluated", "TaskFailed",
                             "TicketFailed"]
    assert [(e.check, e.ok, e.value, e.attempt) for e in events[1:3]] == [
        ("acc >= 0.4", True, 0.5, 0), ("acc_min >= 0.2", False, 0.1, 0)
    ]
    assert events[3].reason == "ExpectationFailed: acc_min >= 0.2 (observed 0.1)"

    s = State()
    apply(s, submit(swept("{seed: [0, 1]}", select=f"{SELECT_MAX}, {expect}"), T0))
    succeed(s, 0, 0.3)
    events = succeed(s, 1, 0.5)
    assert types(events)[:4] == ["AttemptSucceeded", "StepCheckEvaluated", "StepCheckEvaluated", "SweepJoined"]
    assert events[3].metrics["acc_min"] == 0.3 and events[3].metrics["acc_max"] == 0.5


def test_a_probe_downstream_may_read_a_sweeps_aggregates_even_for_a_closed_kind() -> None:
    steps = (
        "  - {id: data, kind: synthesize, matrix: {seed: [0, 1]}, select: {metric: count, mode: max},"
        " expect: [{metric: count_min, op: '>=', value: 100}], with: {generator: shapes, count: 100}}\n"
        "  - {id: use, kind: diag, needs: [data], probe: [{metric: data.seconds_max, op: '<', value: 60}]}\n"
    )
    assert make_ticket(steps=steps).steps[0].expect[0].name == "count_min"


# --- inputs: {NAME: {from: SWEEP, use: all}} --------------------------------------------------


def downstream(inputs: str, needs: str = "[ev]") -> Any:
    return make_ticket(
        steps="  - {id: ev, kind: evaluate, matrix: {seed: [0, 1, 2]}, select: {metric: acc, mode: max},"
        " with: {split: test}}\n"
        f"  - {{id: use, kind: diag, needs: {needs}, inputs: {inputs}}}\n"
    )


def test_use_all_hands_the_downstream_job_every_combination_and_best_only_the_chosen() -> None:
    s = State()
    apply(s, submit(downstream("{models: {from: ev, use: all}, top: {from: ev}}"), T0))
    succeed(s, 0, 0.3)
    succeed(s, 1, 0.5)
    events = succeed(s, 2, 0.4)
    assert types(events) == ["AttemptSucceeded", "SweepJoined", "AttemptScheduled"]
    uses = events[2].params["_uses"]
    assert uses["models"] == [
        {"subtask": f"ev-S{k}", "params": {"seed": k}, "metrics": {"acc": acc}, "outputs": {"model": f"m{k}"},
         "best": k == 1}
        for k, acc in enumerate([0.3, 0.5, 0.4])
    ]
    assert uses["top"] == uses["models"][1]  # use: best (the default) is the chosen row
    assert events[2].params["_inputs"] == {"ev": {"model": "m1"}}  # `_inputs` is unchanged: the best's outputs
    # The rows are part of the step's key: another sweep result is another downstream job.
    assert events[2].cache_key is None  # diag is never cached; the rows still reach the job


def test_inputs_from_a_step_that_is_not_a_sweep_is_its_result_as_one_row() -> None:
    steps = (
        "  - {id: a, kind: diag, with: {metrics: {x: 1.0}}}\n"
        "  - {id: b, kind: diag, needs: [a], inputs: {first: {from: a, use: best}}}\n"
    )
    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    events = apply(s, report(c.RecordJobSucceeded, "a", 1, metrics={"x": 1.0}, outputs={"steps": 1}))
    assert events[-1].params["_uses"] == {
        "first": {"subtask": "a", "params": {}, "metrics": {"x": 1.0}, "outputs": {"steps": 1}, "best": True}
    }


@pytest.mark.parametrize(
    ("inputs", "needs", "message"),
    [
        ("{models: {from: ev, use: all}}", "[]", "inputs: models reads a step that is not in this step's needs 'ev'"),
        ("{models: {from: evv, use: all}}", "[ev]", "inputs: models reads unknown step 'evv' (did you mean 'ev'?)"),
        ("{Models: {from: ev}}", "[ev]", "inputs: 'Models' must be a name of lowercase letters"),
        ("{models: {from: ev, use: some}}", "[ev]", "Input should be 'best' or 'all'"),
        ("{models: {use: all}}", "[ev]", "from"),
        ("{models: {from: ev, use: all, extra: 1}}", "[ev]", "extra"),
    ],
)
def test_hostile_inputs_are_refused_naming_the_field(inputs: str, needs: str, message: str) -> None:
    with pytest.raises(TicketInvalid, match=re.escape(message)):
        downstream(inputs, needs)


def test_use_all_of_a_step_without_combinations_is_refused() -> None:
    steps = "  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a], inputs: {x: {from: a, use: all}}}\n"
    with pytest.raises(TicketInvalid, match=r"use: all takes every combination of a `matrix:` step; 'a' has none"):
        make_ticket(steps=steps)
    clash = "  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a], with: {x: 1}, inputs: {x: {from: a}}}\n"
    with pytest.raises(TicketInvalid, match=r"inputs: 'x' is also a `with:` parameter"):
        make_ticket(steps=clash)


@pytest.mark.integration
def test_use_all_downstream_of_a_sweep_on_a_real_worker(tmp_path: Path) -> None:
    from tests.harness import Setup

    setup = Setup(tmp_path / "home")
    try:
        setup.daemon.start()
        setup.worker("cpu")
        setup.drop(
            "TICKET-1",
            "  - {id: sweep, kind: diag, matrix: {metrics: [{acc: 0.2}, {acc: 0.7}, {acc: 0.5}]},"
            " select: {metric: acc, mode: max}}\n"
            "  - {id: after, kind: diag, needs: [sweep], inputs: {runs: {from: sweep, use: all},"
            " chosen: {from: sweep}}}\n",
        )
        assert setup.wait_done("TICKET-1") == "TicketCompleted"
        rows = setup.daemon.rows()
        [after] = [r["data"] for r in rows if r["type"] == "AttemptSucceeded" and r["data"]["task"] == "after"]
        # What the job received, as it reports it: every combination, and the chosen one.
        assert after["outputs"]["uses"] == {"runs": ["sweep-S0", "sweep-S1", "sweep-S2"], "chosen": ["sweep-S1"]}
        assert after["metrics"]["runs_rows"] == 3.0 and after["metrics"]["chosen_rows"] == 1.0
        setup.assert_consistent()
    finally:
        setup.close()


def test_evaluation_across_datasets_is_a_matrix_over_a_data_key() -> None:
    """Several datasets fan out like several seeds: `matrix: {data: [a, b]}` over needed steps; each
    combination's job finds its dataset in `_inputs`, and the joined metrics aggregate over both."""
    steps = (
        "  - {id: a, kind: synthesize, with: {generator: shapes, count: 100}}\n"
        "  - {id: b, kind: synthesize, with: {generator: shapes, count: 100, seed: 1}}\n"
        "  - {id: ev, kind: evaluate, needs: [a, b], matrix: {data: [a, b]}, select: {metric: acc, mode: max},"
        " expect: [{metric: acc_min, op: '>', value: 0.1}], with: {model: jepa}}\n"
    )
    s = State()
    apply(s, submit(make_ticket(steps=steps), T0))
    apply(s, report(c.RecordJobSucceeded, "a", 1, outputs={"dataset": "1" * 64}))
    events = apply(s, report(c.RecordJobSucceeded, "b", 1, outputs={"dataset": "2" * 64}))
    scheduled = [e for e in events if isinstance(e, ev.AttemptScheduled)]
    assert [(e.task, e.params["data"]) for e in scheduled] == [("ev-S0", "a"), ("ev-S1", "b")]
    assert all(e.params["_inputs"] == {"a": {"dataset": "1" * 64}, "b": {"dataset": "2" * 64}} for e in scheduled)
    succeed(s, 0, 0.6)
    joined = next(e for e in succeed(s, 1, 0.4) if isinstance(e, ev.SweepJoined))
    assert isinstance(joined, ev.SweepJoined) and joined.metrics["acc_mean"] == 0.5 and joined.best == "ev-S0"
