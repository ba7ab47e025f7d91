"""The standing evaluation suite: suite tickets filed by the decider, their rows, the table's regressions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from daemon import commands as c
from daemon.decider import resolved_params
from daemon.state import State
from schema import events as ev
from schema.cache import cache_key
from schema.projections import MemoryRows, project_all
from schema.suite import SUITE_PATH, TOLERANCE, suite_table, suite_ticket
from tests.helpers import make_ticket, submit
from tests.test_decider import apply, report, types

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CKPT_A, CKPT_B = "a" * 64, "b" * 64  # bare content ids, as a train step's outputs name them
TRAIN_EVAL = "  - {id: train, kind: train, with: {model: trm}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"


def _propose(s: State, tid: str, checkpoint: str, extra: str = "update: core\n", grid: str = "sudoku:6x6") -> list:
    apply(s, submit(make_ticket(tid, steps=TRAIN_EVAL, extra=extra), T0))
    out = {"component": "reasoner", "checkpoint": checkpoint, "model": "trm", "grid": grid}
    apply(s, report(c.RecordJobSucceeded, "train", 1, ticket=tid, outputs=out))
    return apply(s, report(c.RecordJobSucceeded, "eval", 1, ticket=tid, metrics={"exact_acc": 0.5}))


def _run_suite_ticket(s: State, tid: str, metrics: dict[str, float]) -> list[ev.Event]:
    """Each dispatched step of the suite ticket succeeds (as a worker would report), until none is left."""
    events: list[ev.Event] = []
    while True:
        ticket = s.tickets[tid]
        out = [t for t in ticket.tasks.values() if t.status in ("scheduled", "running")]
        if not out:
            return events
        for task in out:
            result = {"metrics": metrics} if task.kind == "evaluate" else {"outputs": {"dataset": "sha256:" + "d" * 64}}
            events += apply(s, report(c.RecordJobSucceeded, task.id, task.attempt, ticket=tid, **result))


def test_a_core_proposal_files_a_suite_ticket_for_its_candidate() -> None:
    s = State(home_owner="bob")
    events = _propose(s, "TICKET-1", CKPT_A)
    assert types(events)[:5] == [
        "AttemptSucceeded", "AcceptanceEvaluated", "ProposalOpened", "TicketSubmitted", "AttemptScheduled"
    ]  # fmt: skip
    filed = events[3]
    assert filed.ticket == "TICKET-suite-P-1" and filed.path == SUITE_PATH and filed.revision == 1
    steps = {st["id"]: st for st in filed.spec["steps"]}
    assert steps["data-sudoku-6x6"]["with"] == {"generator": "sudoku", "count": 600, "seed": 90_006, "params": {"n": 6}}
    ev_with = steps["eval-reasoner"]["with"]
    assert ev_with["checkpoint"] == f"sha256:{CKPT_A}" and ev_with["model"] == "trm"
    assert ev_with["data"] == "data-sudoku-6x6"
    assert ev_with["suite"]["proposal"] == "P-1" and ev_with["suite"]["core_version"] is None
    # The suite ticket has no proposal of its own, and its steps do not read the core.
    ticket = s.tickets["TICKET-suite-P-1"]
    assert ticket.spec.update == "none"
    assert "_core" not in resolved_params(ticket, ticket.tasks["eval-reasoner"], s)


def test_its_result_is_a_suite_row_and_promotion_reuses_it_for_the_new_core() -> None:
    s = State(home_owner="bob")
    _propose(s, "TICKET-1", CKPT_A)
    done = _run_suite_ticket(s, "TICKET-suite-P-1", {"exact_acc": 0.4, "blank_acc": 0.8})
    row = next(e for e in done if isinstance(e, ev.SuiteEvaluated))
    assert (row.proposal, row.core_version, row.component, row.yardstick) == ("P-1", None, "reasoner", "sudoku:6x6")
    assert row.metrics == {"exact_acc": 0.4, "blank_acc": 0.8}
    assert row.checkpoint == f"sha256:{CKPT_A}" and not row.reused
    assert s.tickets["TICKET-suite-P-1"].status == "completed"
    promoted = apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="bob"))
    assert "TicketSubmitted" in types(promoted)
    # Same checkpoint, same data, same code: both steps of TICKET-suite-v1 come from the step cache.
    reused = [e for e in promoted if isinstance(e, ev.AttemptReused)]
    assert [e.task for e in reused] == ["data-sudoku-6x6", "eval-reasoner"]
    v1 = next(e for e in promoted if isinstance(e, ev.SuiteEvaluated))
    assert (v1.core_version, v1.proposal, v1.reused, v1.metrics) == (1, None, True, row.metrics)
    assert s.tickets["TICKET-suite-v1"].status == "completed"


def test_suite_false_files_nothing_and_a_grid_without_a_yardstick_is_left_out() -> None:
    s = State(home_owner="bob")
    events = _propose(s, "TICKET-1", CKPT_A, extra="update: core\nsuite: false\n")
    assert "TicketSubmitted" not in types(events)
    assert "TicketSubmitted" not in types(apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="bob")))
    events = _propose(s, "TICKET-2", CKPT_B, grid="maze:15x15")
    assert "TicketSubmitted" not in types(events)  # nothing to measure: no suite ticket at all
    built = suite_ticket("v9", {"reasoner": {"checkpoint": CKPT_B, "model": "trm", "grid": "maze:15x15"}},
                         core_version=9, proposal=None)  # fmt: skip
    assert built is None


def test_rollback_and_jbctl_eval_file_suite_runs_and_a_running_one_is_not_doubled() -> None:
    s = State(home_owner="bob")
    _propose(s, "TICKET-1", CKPT_A)
    _run_suite_ticket(s, "TICKET-suite-P-1", {"exact_acc": 0.5})
    apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="bob"))  # v1 (its suite result: reused)
    _propose(s, "TICKET-2", CKPT_B)
    apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="bob"))  # v2 (its suite ticket waits for P-2's)
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob"))  # v3 = v1's components
    filed = [e for e in events if isinstance(e, ev.TicketSubmitted)]
    assert [e.ticket for e in filed] == ["TICKET-suite-v3"]
    steps = {st["id"]: st for st in filed[0].spec["steps"]}
    assert steps["eval-reasoner"]["with"]["checkpoint"] == f"sha256:{CKPT_A}"
    assert s.tickets["TICKET-suite-v3"].status == "completed"  # v1's checkpoint: reused at once
    # `jbctl eval v2` while TICKET-suite-v2 runs (it waits for P-2's run of the same key): nothing new.
    assert s.tickets["TICKET-suite-v2"].status == "running"
    assert apply(s, c.RunSuite(now=T0, core_version=2)) == []
    # `jbctl eval P-2` after its run ended: a new revision of its suite ticket.
    _run_suite_ticket(s, "TICKET-suite-P-2", {"exact_acc": 0.6})
    again = apply(s, c.RunSuite(now=T0, proposal="P-2"))
    assert again[0].type == "TicketSubmitted" and again[0].revision == 2
    assert apply(s, c.RunSuite(now=T0, proposal="P-99")) == [] and apply(s, c.RunSuite(now=T0, core_version=42)) == []


def test_the_cache_key_of_a_suite_step_ignores_its_subject_but_not_that_it_is_one() -> None:
    base = {"model": "trm", "checkpoint": CKPT_A, "data": "d"}
    a = cache_key("evaluate", {**base, "suite": {"proposal": "P-1", "core_version": None}})
    b = cache_key("evaluate", {**base, "suite": {"proposal": None, "core_version": 1}})
    assert a == b != cache_key("evaluate", base)


def test_projection_and_table_mark_a_regression_beyond_the_tolerance() -> None:
    def row(subject: str, version: int | None, proposal: str | None, exact: float, blank: float) -> ev.SuiteEvaluated:
        return ev.SuiteEvaluated(
            at=T0, ticket=f"TICKET-suite-{subject}", task="eval-reasoner", component="reasoner",
            yardstick="sudoku:6x6", seed=90_006, core_version=version, proposal=proposal, checkpoint=CKPT_A,
            metrics={"exact_acc": exact, "blank_acc": blank, "params": 1000.0},
        )  # fmt: skip

    events = [
        row("v1", 1, None, 0.40, 0.80),
        row("v2", 2, None, 0.45, 0.79),  # -0.01 on blank_acc: within the tolerance
        row("P-3", None, "P-3", 0.40, 0.90),  # -0.05 on exact_acc against v2: a regression
        row("v2", 2, None, 0.46, 0.79),  # a rerun for v2 rewrites its rows
    ]
    rows = MemoryRows()
    project_all(rows, list(enumerate(events, start=1)))
    table_rows = list(rows.data["evaluations"].values())
    assert len(table_rows) == 9
    assert {(r["subject"], r["metric"]): r["value"] for r in table_rows}[("v2", "exact_acc")] == 0.46
    table = suite_table(table_rows)
    assert table["columns"] == ["v1", "v2", "P-3"] and table["tolerance"] == TOLERANCE
    lines = {line["metric"]: line for line in table["lines"]}
    assert set(lines) == {"exact_acc", "blank_acc"}  # `params` is shown only with all_metrics
    assert lines["exact_acc"]["cells"]["P-3"]["regression"] and lines["exact_acc"]["cells"]["P-3"]["delta"] == (
        pytest.approx(-0.06)
    )
    assert not lines["blank_acc"]["cells"]["v2"]["regression"] and not lines["exact_acc"]["cells"]["v2"]["regression"]
    assert "params" in {line["metric"] for line in suite_table(table_rows, all_metrics=True)["lines"]}
