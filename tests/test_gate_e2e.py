"""The whole gate with real processes: train (tiny) → proposal with both metric sets → approve by an
allowed user → CorePromoted → inference uses the new version; reject, expiry and an unlisted user
leave the core alone; `jbctl replay --check` equal after all of it."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from tests.harness import Setup

pytestmark = pytest.mark.integration  # starts processes or trains

ME = getpass.getuser()
PUZZLE = "1 0 0 4\n0 0 1 0\n0 1 0 0\n4 0 0 1\n"


def core_ticket(tid: str, approvers: str, expires: str = "1d", seed: int = 1) -> tuple[str, str]:
    return (
        f"  - {{id: puzzles, kind: synthesize, with: {{generator: sudoku, count: 300, seed: {seed},"
        " params: {n: 4}}}\n"
        "  - {id: train, kind: train, needs: [puzzles], queue: cpu, with: {model: trm, data: puzzles, max_steps: 40,"
        " d_model: 32, n_heads: 2, max_segments: 2, checkpoint_every: 20, seed: 0}}\n"
        "  - {id: eval, kind: evaluate, needs: [train, puzzles], queue: cpu,"
        " with: {model: trm, data: puzzles, checkpoint: train, max_segments: 2, d_model: 32, n_heads: 2}}\n"
    ), f"update: core\napprovers: [{approvers}]\nexpires: {expires}\n"


def _proposals(s: Setup) -> list[dict]:
    out = s.jbctl("proposals", "--all", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_train_propose_approve_infer_reject_expire(running: Setup, tmp_path: Path) -> None:
    steps, extra = core_ticket("TICKET-1", ME)
    running.drop("TICKET-1", steps, extra)
    opened = running.daemon.wait_event("ProposalOpened", ticket="TICKET-1", timeout=240)["data"]
    assert opened["kind"] == "core" and opened["base_core_version"] == 0
    assert "reasoner" in opened["candidate"] and opened["metrics"]["candidate"]["eval.blank_acc"] >= 0
    assert opened["metrics"]["current"] == {}  # the core is empty: nothing to compare yet
    approve = running.jbctl("approve", "P-1", "--yes", "-m", "first core")
    assert approve.returncode == 0, approve.stderr
    assert "core is now v1" in approve.stdout
    assert running.wait_done("TICKET-1") == "TicketCompleted"
    # A second candidate, trained and evaluated after the approval, so against core v1; only
    # someone-else may approve it.
    steps2, extra2 = core_ticket("TICKET-2", "someone-else", seed=2)
    running.drop("TICKET-2", steps2, extra2)
    # Inference through the queue uses the new core.
    puzzle = tmp_path / "puzzle.txt"
    puzzle.write_text(PUZZLE)
    running.worker("gpu")
    infer = running.jbctl("infer", "--component", "reasoner", "--input", str(puzzle), "--json")
    assert infer.returncode == 0, infer.stderr
    answer = json.loads(infer.stdout)
    assert answer["core_version"] == 1 and answer["checkpoint"] == opened["candidate"]["reasoner"]["checkpoint"]
    grid = answer["answer"]
    assert [row[0] for row in grid][:1] == [1] and grid[0][3] == 4  # givens are kept
    # The second proposal is measured against core v1, side by side.
    p2 = running.daemon.wait_event("ProposalOpened", ticket="TICKET-2", timeout=240)["data"]
    assert p2["base_core_version"] == 1 and set(p2["metrics"]["current"]) == set(p2["metrics"]["candidate"])
    refused = running.jbctl("approve", p2["proposal"], "--yes")
    assert refused.returncode == 1 and f"{ME} is not an approver" in refused.stderr
    reject = running.jbctl("reject", p2["proposal"], "-m", "no better than v1")
    assert reject.returncode == 0
    assert running.wait_done("TICKET-2") == "TicketFailed"
    # Expiry: a proposal nobody decides on.
    steps3, extra3 = core_ticket("TICKET-3", ME, expires="3s", seed=3)
    running.drop("TICKET-3", steps3, extra3)
    running.daemon.wait_event("ProposalExpired", ticket="TICKET-3", timeout=240)
    assert running.wait_done("TICKET-3") == "TicketFailed"
    core = json.loads(running.jbctl("core", "--json").stdout)
    assert core["version"] == 1 and len(core["history"]) == 1
    states = {p["proposal"]: p["state"] for p in _proposals(running)}
    assert states == {"P-1": "approved", p2["proposal"]: "rejected", "P-3": "expired"}
    audit = [a["type"] for a in json.loads(running.jbctl("audit", "--json").stdout)]
    assert {"ProposalApproved", "ApprovalRefused", "ProposalRejected", "ProposalExpired", "CorePromoted"} <= set(audit)
    running.assert_consistent()
