"""The evaluation suite end to end, real processes: a core proposal's candidate is measured on the suite by a
ticket the daemon files itself; the proposal shows it beside the core; promotion reuses it as the new core's
row; `jbctl eval` files another run; `jbctl core` and SQL show the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.console_server import ConsoleServer
from tests.harness import Setup
from tests.test_recovery import TINY_CORE


@pytest.mark.integration
def test_suite_runs_on_the_candidate_and_on_promotion(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "home")
    # Heartbeats are not what this test is about: a loaded machine must not turn a slow report into a retry.
    setup.env["JETBOX_HEARTBEAT_TIMEOUT_SECONDS"] = "15"
    try:
        setup.daemon.start()
        setup.worker("cpu", "gpu")
        setup.drop("TICKET-1", TINY_CORE, "update: core\n")
        opened = setup.daemon.wait_event("ProposalOpened", ticket="TICKET-1", timeout=120)["data"]
        assert opened["proposal"] == "P-1"
        assert setup.wait_done("TICKET-suite-P-1", timeout=120) == "TicketCompleted"
        rows = [r for r in setup.daemon.rows() if r["type"] == "SuiteEvaluated"]
        assert len(rows) == 1
        first = rows[0]["data"]
        assert (first["proposal"], first["component"], first["yardstick"]) == ("P-1", "reasoner", "sudoku:4x4")
        assert 0.0 <= first["metrics"]["exact_acc"] <= 1.0 and 0.0 < first["metrics"]["blank_acc"] <= 1.0

        shown = setup.jbctl("proposals", "P-1")
        assert shown.returncode == 0, shown.stderr
        assert "evaluation suite: P-1 against core v0" in shown.stdout
        assert f"{first['metrics']['blank_acc']:.4f}" in shown.stdout

        done = setup.jbctl("approve", "P-1", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert setup.wait_done("TICKET-suite-v1", timeout=60) == "TicketCompleted"
        v1 = [r["data"] for r in setup.daemon.rows() if r["type"] == "SuiteEvaluated"][-1]
        # Same checkpoint, data and code: the step cache gives the new core its candidate's row.
        assert (v1["core_version"], v1["reused"], v1["metrics"]) == (1, True, first["metrics"])

        core = setup.jbctl("core")
        assert core.returncode == 0, core.stderr
        line = next(ln for ln in core.stdout.splitlines() if "blank_acc" in ln)
        assert line.split()[:3] == ["reasoner", "sudoku:4x4", "blank_acc"]
        table = json.loads(setup.jbctl("eval", "--table", "--json").stdout)
        assert table["columns"] == ["v1", "P-1"]
        sql = setup.jbctl("sql", "--json", "select subject, value from evaluations where metric = 'exact_acc'")
        assert sql.returncode == 0, sql.stderr
        assert sorted(r["subject"] for r in json.loads(sql.stdout)) == ["P-1", "v1"]

        console = ConsoleServer(setup.home, env=setup.env)
        try:
            page = console.get_json("/api/proposals/P-1")["suite"]
            assert page["columns"] == ["v1", "P-1"]  # the current core's row beside the candidate's
            status, html = console.request("GET", "/core")
            assert status == 200 and b'id="suite"' in html and b"sudoku:4x4" in html
        finally:
            console.stop()

        again = setup.jbctl("eval", "v1")
        assert again.returncode == 0 and "TICKET-suite-v1 filed" in again.stdout, again.stdout + again.stderr
        for bad, message in (("v9", "no core version v9"), ("P-7", "no core proposal P-7"), ("x1", "not a core")):
            refused = setup.jbctl("eval", bad)
            assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        setup.assert_consistent()
    finally:
        setup.close()
