"""Working memory end to end, real processes: core v1 → an adapter trained by a ticket → inference with it
differs from the core and is better on its task → core v2 promoted → the adapter retires and the warm
worker holds v2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from schema.wire import warm_key
from tests.harness import Setup
from tests.jbdaemon import JBCTL, wait_for
from tests.test_recovery import TINY_CORE

# The adapter's own task: 4x4 puzzles of another seed, on a core trained two steps (blank accuracy near
# chance). 60 steps at lr 0.01 measured +0.073 held-out blank accuracy over the core.
ADAPTER = (
    "  - {id: puzzles, kind: synthesize, with: {generator: sudoku, count: 200, seed: 5, params: {n: 4}}}\n"
    "  - {id: adapt, kind: train, needs: [puzzles], queue: cpu, with: {model: trm, data: puzzles,"
    " adapter: {rank: 4}, max_steps: 60, lr: 0.01, batch_size: 32}}\n"
)
# Unseen puzzles of the same task, answered by the core alone and with the adapter.
ASK = (
    "  - {id: more, kind: synthesize, with: {generator: sudoku, count: 64, seed: 9, params: {n: 4}}}\n"
    "  - {id: core, kind: infer, needs: [more], queue: cpu, with: {component: reasoner, data: more, limit: 64}}\n"
    "  - {id: memory, kind: infer, needs: [more], queue: cpu,"
    " with: {component: reasoner, data: more, limit: 64, adapter: TICKET-2}}\n"
)
PUZZLE = "1 0 0 4\n0 0 1 0\n0 1 0 0\n4 0 0 1\n"


def _approve(setup: Setup, ticket: str) -> None:
    opened = setup.daemon.wait_event("ProposalOpened", ticket=ticket, timeout=120)["data"]
    done = setup.jbctl("approve", opened["proposal"], "--yes")
    assert done.returncode == 0, done.stdout + done.stderr


def _warm_line(setup: Setup, version: int) -> str:
    """Wait (on Redis, cheaply) until the warm worker says it holds `version`; then what `jbctl status` says."""
    conn = setup.conn()

    def held() -> bool:
        raw = conn.get(warm_key("warm-1"))
        return bool(raw) and json.loads(raw)["core_version"] == version

    wait_for(f"the warm worker to hold core v{version}", held, timeout=60, every=0.1)
    out = setup.jbctl("status").stdout
    return next((ln for ln in out.splitlines() if ln.startswith("warm worker")), out)


@pytest.mark.integration
def test_adapter_applies_at_inference_and_the_warm_worker_follows_the_core(tmp_path: Path) -> None:
    setup = Setup(tmp_path / "home")
    try:
        setup.daemon.start()
        with (setup.home / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [JBCTL, "worker", "--queue", "cpu", "--warm", "--name", "warm-1"],
                env=setup.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        setup.workers.append(worker)
        setup.drop("TICKET-1", TINY_CORE, "update: core\nexpires: 1d\n")
        _approve(setup, "TICKET-1")
        assert setup.wait_done("TICKET-1") == "TicketCompleted"
        assert "warm-1 (cpu): core v1" in _warm_line(setup, 1)

        setup.drop("TICKET-2", ADAPTER, "update: adapter\n")
        assert setup.wait_done("TICKET-2", timeout=90) == "TicketCompleted"
        listed = json.loads(setup.jbctl("adapters", "--json").stdout)
        assert [(a["id"], a["ticket"], a["base_core_version"], a["active"]) for a in listed] == [
            ("A-1", "TICKET-2", 1, True)
        ]
        assert listed[0]["metrics"]["blank_acc"] > listed[0]["metrics"]["blank_acc_core"]

        setup.drop("TICKET-3", ASK)
        assert setup.wait_done("TICKET-3", timeout=60) == "TicketCompleted"
        done = {
            r["data"]["task"]: r["data"]
            for r in setup.daemon.rows()
            if r["type"] == "AttemptSucceeded" and r["data"]["ticket"] == "TICKET-3"
        }
        core, memory = done["core"], done["memory"]
        assert memory["outputs"]["adapter"] == "A-1" and core["outputs"]["adapter"] is None
        assert memory["outputs"]["answers"] != core["outputs"]["answers"]  # the adapter changes answers
        # ... and is better on its task: measured 0.245 -> 0.292 blank-cell accuracy on these 64 unseen
        # puzzles (+0.047; +0.073 on the adapter's own held-out split), one torch thread; the margin asked
        # for is 0.03.
        gain = memory["metrics"]["blank_acc"] - core["metrics"]["blank_acc"]
        assert gain >= 0.03, (core["metrics"], memory["metrics"])

        puzzle = setup.home / "p.txt"
        puzzle.write_text(PUZZLE)
        ask = ["infer", "--component", "reasoner", "--input", str(puzzle), "--queue", "cpu", "--json"]
        with_memory = setup.jbctl(*ask, "--adapter", "A-1")
        assert with_memory.returncode == 0, with_memory.stderr
        out = json.loads(with_memory.stdout)
        assert out["adapter"] == "A-1" and out["warm"] and len(out["answer"]) == 4

        setup.drop("TICKET-4", TINY_CORE.replace("seed: 0}", "seed: 1}"), "update: core\nexpires: 1d\n")
        _approve(setup, "TICKET-4")
        retired = setup.daemon.wait_event("AdapterRetired", adapter="A-1", timeout=30)["data"]
        assert retired["reason"] == "core_rolled" and retired["core_version"] == 2
        assert "warm-1 (cpu): core v2" in _warm_line(setup, 2)
        refused = setup.jbctl(*ask, "--adapter", "A-1")
        assert refused.returncode == 1 and "A-1 is retired" in refused.stderr
        check = setup.jbctl("replay", "--check")  # the adapters projection rebuilds identically from the log
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        setup.close()
        for proc in setup.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
