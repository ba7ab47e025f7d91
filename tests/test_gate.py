"""The approval gate from the command line: proposals, approve, reject, core, retry, audit."""

from __future__ import annotations

import getpass
import json
import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from cli.main import main as jbctl
from daemon import commands as c
from daemon.handler import CommandHandler
from schema.store import EventStore, replay_differences
from tests.conftest import JBCTL
from tests.helpers import make_ticket, submit

NOW = datetime.now(UTC)
ME = getpass.getuser()
STEPS = "  - {id: train, kind: train}\n  - {id: eval, kind: evaluate, needs: [train]}\n"


def core_ticket(handler: CommandHandler, tid: str, approvers: list[str] | None = None) -> str:
    extra = "update: core\nexpires: 1d\n" + (f"approvers: [{', '.join(approvers)}]\n" if approvers else "")
    handler.handle(submit(make_ticket(tid, steps=STEPS, extra=extra), NOW))
    t = handler.state.tickets[tid].tasks
    handler.handle(c.RecordJobSucceeded(now=NOW, ticket=tid, task="train", attempt=t["train"].attempt,
                                        outputs={"component": "reasoner", "checkpoint": f"ckpt-{tid}"}))
    handler.handle(c.RecordJobSucceeded(now=NOW, ticket=tid, task="eval", attempt=t["eval"].attempt,
                                        metrics={"exact": 0.5, "blank": 0.8},
                                        outputs={"core_metrics": {"exact": 0.25, "blank": 0.7}}))
    return handler.state.tickets[tid].awaiting or ""


def test_proposal_listing_and_side_by_side(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    assert core_ticket(handler, "TICKET-1") == "P-1"
    assert jbctl(["proposals", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["proposal"] == "P-1" and rows[0]["metrics"]["delta"]["eval.exact"] == 0.25
    assert jbctl(["status", "TICKET-1"]) == 0
    assert "approval: jbctl approve P-1" in capsys.readouterr().out
    assert jbctl(["approve", "P-1", "--yes", "-m", "better on exact"]) == 0
    out = capsys.readouterr().out
    assert "eval.exact" in out and "+0.2500" in out and "core is now v1" in out
    assert jbctl(["core", "--json"]) == 0
    core = json.loads(capsys.readouterr().out)
    assert core["version"] == 1 and core["components"]["reasoner"]["checkpoint"] == "ckpt-TICKET-1"
    assert jbctl(["approve", "P-1", "--yes"]) == 1
    assert "is approved" in capsys.readouterr().err
    assert replay_differences(store) == []


def test_core_shows_each_versions_note_and_approver(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1")
    assert jbctl(["approve", "P-1", "--yes", "-m", "first reasoner"]) == 0
    core_ticket(CommandHandler(store), "TICKET-2")
    assert jbctl(["approve", "P-2", "--yes"]) == 0
    assert jbctl(["core", "rollback", "1", "--yes", "-m", "v2 regressed"]) == 0
    capsys.readouterr()
    assert jbctl(["core", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)["history"]
    assert [(h["version"], h["actor"], h["note"]) for h in history] == [
        (1, ME, "first reasoner"), (2, ME, None), (3, ME, "v2 regressed")]
    assert jbctl(["core"]) == 0
    table = capsys.readouterr().out.splitlines()
    v1 = next(line for line in table if line.startswith("v1 "))
    assert ME in v1 and "P-1" in v1 and v1.endswith("first reasoner")
    assert next(line for line in table if line.startswith("v3 ")).endswith("v2 regressed")


def test_unlisted_user_is_refused_and_recorded(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1", approvers=["someone-else"])
    assert jbctl(["approve", "P-1", "--yes"]) == 1
    assert f"{ME} is not an approver of P-1" in capsys.readouterr().err
    refused = list(store.read(0, types=["ApprovalRefused"]))
    assert len(refused) == 1 and refused[0].meta["actor"]["user"] == ME
    assert jbctl(["audit", "--json"]) == 0
    assert "ApprovalRefused" in [r["type"] for r in json.loads(capsys.readouterr().out)]


def test_stale_core_refused_then_reevaluated(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1")
    core_ticket(handler, "TICKET-2")
    assert jbctl(["approve", "P-1", "--yes"]) == 0
    assert jbctl(["approve", "P-2", "--yes"]) == 1
    assert "jbctl retry --reevaluate P-2" in capsys.readouterr().err
    assert jbctl(["retry", "P-2", "--reevaluate"]) == 0
    scheduled = list(store.read(0, types=["AttemptScheduled"]))[-1]
    assert scheduled.data["task"] == "eval" and scheduled.data["params"]["_core"]["version"] == 1


def test_reject_needs_a_reason_and_leaves_core(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1")
    with pytest.raises(SystemExit):
        jbctl(["reject", "P-1"])
    assert jbctl(["reject", "P-1", "-m", "  "]) == 1
    assert jbctl(["reject", "P-1", "-m", "not convincing"]) == 0
    assert jbctl(["core", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["version"] == 0
    assert jbctl(["status", "TICKET-1", "--json"]) == 0
    assert "not convincing" in json.loads(capsys.readouterr().out)[0]["reason"]


def test_rollback(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1")
    assert jbctl(["approve", "P-1", "--yes"]) == 0
    core_ticket(CommandHandler(store), "TICKET-2")
    assert jbctl(["approve", "P-2", "--yes"]) == 0
    assert jbctl(["core", "rollback", "7", "--yes"]) == 1
    assert jbctl(["core", "rollback", "1", "--yes", "-m", "v2 regressed"]) == 0
    capsys.readouterr()
    assert jbctl(["core", "--json"]) == 0
    core = json.loads(capsys.readouterr().out)
    assert core["version"] == 3 and core["components"]["reasoner"]["checkpoint"] == "ckpt-TICKET-1"
    assert core["history"][-1]["rollback_to"] == 1


def test_retry_blocked_task_and_consistency(store: EventStore, capsys: pytest.CaptureFixture[str]) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag, retries: 9}\n"), NOW))
    now = NOW
    for attempt in (1, 2, 3):
        rec = handler.handle(c.RecordJobFailed(now=now, ticket="TICKET-1", task="a", attempt=attempt,
                                               error="OSError: same every time"))
        if attempt < 3:
            now = datetime.fromisoformat(rec[0].data["retry_at"]) + timedelta(seconds=1)
            handler.handle(c.Tick(now=now))
    assert jbctl(["status", "TICKET-1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)[0]
    assert data["tasks"][0]["state"] == "blocked"
    assert data["trouble"]["retries"] == 3 and data["trouble"]["loops"] == 1
    assert data["consistency"] == pytest.approx(1 - 3 * 0.05 - 0.2)
    assert jbctl(["retry", "TICKET-1", "--task", "a"]) == 0
    assert jbctl(["retry", "TICKET-1", "--task", "a"]) == 1
    assert "only a blocked task" in capsys.readouterr().err
    assert jbctl(["retry", "TICKET-1", "--task", "zz"]) == 1


@pytest.mark.integration
def test_approve_asks_on_a_terminal_only(store: EventStore) -> None:
    core_ticket(CommandHandler(store), "TICKET-1")
    proc = subprocess.run([JBCTL, "approve", "P-1"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "pass --yes" in proc.stderr
    assert list(store.read(0, types=["ProposalApproved"])) == []


# An image-encoder evaluation's shape: the candidate's probes, random-init and pixel baselines, the gains.
JEPA_EVAL = {
    "shape_linear": 0.62, "shape_linear_random": 0.50, "shape_linear_pixels": 0.40,
    "shape_linear_gain": 0.12, "shape_linear_gain_pixels": 0.22,
    "colour_knn": 0.70, "colour_knn_random": 0.75, "colour_knn_pixels": 0.90,
    "colour_knn_gain": -0.05, "colour_knn_gain_pixels": -0.20,
    "rankme": 20.0, "rankme_random": 30.0, "params": 1000.0,
}
JEPA_CORE = {**JEPA_EVAL, "shape_linear": 0.55, "shape_linear_gain": 0.05, "shape_linear_gain_pixels": 0.15,
             "colour_knn": 0.72, "colour_knn_gain": -0.03, "colour_knn_gain_pixels": -0.18, "params": 900.0}


def jepa_proposal(handler: CommandHandler, tid: str = "TICKET-4") -> str:
    extra = "update: core\nacceptance:\n  - {metric: eval.shape_linear_gain, op: '>=', value: 0.1}\n"
    handler.handle(submit(make_ticket(tid, steps=STEPS, extra=extra), NOW))
    t = handler.state.tickets[tid].tasks
    handler.handle(c.RecordJobSucceeded(now=NOW, ticket=tid, task="train", attempt=t["train"].attempt,
                                        outputs={"component": "image-encoder", "checkpoint": "ckpt"}))
    handler.handle(c.RecordJobSucceeded(now=NOW, ticket=tid, task="eval", attempt=t["eval"].attempt,
                                        metrics=JEPA_EVAL, outputs={"core_metrics": JEPA_CORE}))
    return handler.state.tickets[tid].awaiting or ""


def _metric_lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.startswith("  eval.")}


def test_one_proposal_shows_checks_then_gains_marked(store: EventStore, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert jepa_proposal(CommandHandler(store)) == "P-1"
    assert jbctl(["proposals", "P-1"]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out  # not a terminal: no colour, the words carry the marks
    shown = list(_metric_lines(out))
    assert shown == ["eval.shape_linear_gain", "eval.colour_knn_gain", "eval.colour_knn_gain_pixels",
                     "eval.shape_linear_gain_pixels"]
    lines = _metric_lines(out)
    assert lines["eval.shape_linear_gain"].split()[1:] == ["0.1200", "0.0500", "+0.0700", "better"]
    assert lines["eval.colour_knn_gain"].endswith("-0.0200  worse")
    assert out.index("-- checked by the ticket") < out.index("-- gains over the baselines")
    assert "(+9 more metrics: jbctl proposals P-1 --all)" in out
    assert "jbctl approve P-1 -m" in out and "P-1: open" in out
    assert jbctl(["proposals", "P-1", "--all"]) == 0
    everything = capsys.readouterr().out
    lines = _metric_lines(everything)
    assert len(lines) == len(JEPA_EVAL) and "more metrics" not in everything
    assert lines["eval.shape_linear"].endswith("better") and lines["eval.colour_knn"].endswith("worse")
    assert lines["eval.params"].endswith("+100.0000")  # a size: neither better nor worse
    assert lines["eval.colour_knn_random"].endswith("0.0000")  # a baseline: not the candidate's merit
    assert everything.index("-- other measurements") < everything.index("-- baselines")
    # --detail prints the same view for each proposal after the list.
    assert jbctl(["proposals", "--detail"]) == 0
    assert out.split("\n", 1)[1] in capsys.readouterr().out  # (the first line has the age, which moves on)
    assert jbctl(["proposals", "P-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["candidate"]["eval.params"] == 1000.0
    assert jbctl(["proposals", "P-9"]) == 1
    assert "no proposal 'P-9' (known: P-1)" in capsys.readouterr().err


def test_reasoner_proposal_without_baselines_shows_its_measurements(store: EventStore,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    core_ticket(CommandHandler(store), "TICKET-1")
    assert jbctl(["approve", "P-1", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "-- other measurements" in out and "eval.blank" in out and "to approve" not in out


@pytest.mark.integration
def test_marks_are_coloured_on_a_terminal_only(store: EventStore) -> None:
    import os
    import pty

    jepa_proposal(CommandHandler(store))
    for no_colour in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | ({"NO_COLOR": "1"} if no_colour else {})
        leader, follower = pty.openpty()
        proc = subprocess.Popen([JBCTL, "proposals", "P-1"], stdout=follower, stderr=subprocess.DEVNULL, env=env)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
        os.close(leader)
        assert proc.wait(timeout=60) == 0
        text = out.decode()
        assert "better" in text and "worse" in text
        assert bool(re.search(r"\033\[32m *\+0\.0700\033\[0m", text)) is not no_colour
        assert ("\033[31mworse\033[0m" in text) is not no_colour


def test_readme_says_where_a_script_needs_yes() -> None:
    """Each README command that asks for confirmation says, on its line, that a script needs --yes."""
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    asking = [ln for b in blocks for ln in b.splitlines() if re.search(r"jbctl (approve|core rollback)\b", ln)]
    assert len(asking) >= 2 and all("--yes" in ln for ln in asking), asking
    assert "not a terminal: pass --yes to confirm" in text  # the refusal a script meets, quoted
