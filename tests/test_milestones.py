"""Plans and milestones: the plan file, `jbctl plan apply`, the milestone projection and the report."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cli.main import main as jbctl
from daemon import commands as c
from daemon.decider import decide
from daemon.state import State, evolve
from schema import events as ev
from schema.milestones import MilestoneBook, fold
from schema.plans import MAX_PLAN_BYTES, load_plan, parse_plan, plan_json_schema
from schema.ticket import TicketInvalid, parse_ticket
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import submit

T0 = datetime(2026, 1, 1, tzinfo=UTC)

TICKET_2 = """id: TICKET-2
title: second
goal: a check that records an artifact
steps:
  - {id: b, kind: diag, with: {metrics: {loss: 1.0}}}
  - {id: smoke, kind: check, needs: [b], with: {run: [test, -d, .]}}
"""

PLAN = """plan: test
title: A test plan
milestones:
  - id: M1
    title: First
    goal: Diagnostics pass.
    deliverables:
      - {name: first accepted, acceptance: TICKET-1}
      - {name: score, ticket: TICKET-1, metric: a.score, op: ">=", value: 0.5}
      - {name: smoke output, ticket: TICKET-2, artifact: smoke, kind: check-output}
    tickets:
      - id: TICKET-1
        title: first
        goal: a diagnostic with a score
        steps: [{id: a, kind: diag, with: {metrics: {score: 0.9}}}]
        acceptance: [{metric: a.score, op: ">=", value: 0.5}]
      - file: TICKET-2.yaml
  - id: M2
    title: Second
    goal: Later.
    deliverables:
      - {name: third accepted, acceptance: TICKET-3}
    tickets:
      - id: TICKET-3
        title: third
        goal: g
        steps: [{id: a, kind: diag}]
        acceptance: [{metric: a.resumed_from, op: "==", value: 0}]
"""


def write_plan(folder: Path, text: str = PLAN, ticket2: str = TICKET_2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "TICKET-2.yaml").write_text(ticket2)
    path = folder / "plan.yaml"
    path.write_text(text)
    return path


def plan_errors(text: str, folder: Path | None = None) -> list[str]:
    with pytest.raises(TicketInvalid) as info:
        parse_plan(text.encode(), "plan.yaml", folder)
    return [str(e) for e in info.value.errors]


# --- the plan file ---------------------------------------------------------------------------------


def test_example_plan_validates_and_covers_the_demo_tickets() -> None:
    loaded = load_plan(EXAMPLES / "plan-demo.yaml")
    assert [m.id for m in loaded.plan.milestones] == ["M0", "M1"]
    assert sorted(t.ticket.id for t in loaded.tickets) == [f"TICKET-{n}" for n in range(1, 6)]
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "plan apply tickets/examples/plan-demo.yaml" in demo
    for planned in loaded.tickets:  # what apply writes is a valid ticket of its milestone
        ticket = parse_ticket(planned.data, f"{planned.ticket.id}.yaml")
        assert ticket.milestone == planned.milestone
        assert ticket.model_dump(exclude={"milestone"}) == planned.ticket.model_dump(exclude={"milestone"})


def test_plan_schema_file_is_fresh() -> None:
    on_disk = json.loads((ROOT / "schema" / "plan.schema.json").read_text())
    assert on_disk == plan_json_schema(), "stale: run `jbctl plan schema -o schema/plan.schema.json`"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "plan.yaml:1:1: empty file"),
        ("- a\n", "plan.yaml:1:1: a plan must be a mapping"),
        ("plan: [unclosed\n", "not valid YAML"),
        (PLAN.replace("title: A test plan", "titel: A test plan"), "plan.yaml:2:1: unknown key 'titel'"),
        (
            PLAN.replace("      - {name: score, ticket: TICKET-1, ", "      - {name: score, tiket: TICKET-1, "),
            "plan.yaml:9:23: unknown key 'tiket' (did you mean 'ticket'?)",
        ),
        (
            PLAN.replace("{name: first accepted, acceptance: TICKET-1}", "{name: x, ticket: TICKET-1}"),
            "plan.yaml:8:9: milestones.0.deliverables.0: a deliverable needs one of the keys acceptance, metric or",
        ),
        (
            PLAN.replace('op: ">=", value: 0.5}\n      - {name: smoke', 'op: ">>", value: 0.5}\n      - {name: smoke'),
            "plan.yaml:9:58: milestones.0.deliverables.1.op: Input should be",
        ),
        (
            PLAN.replace("{name: first accepted, acceptance: TICKET-1}", "{name: x, acceptance: TICKET-9}"),
            "plan.yaml:8:19: TICKET-9 is not a ticket of this plan (did you mean",
        ),
        (
            PLAN.replace("TICKET-1, metric: a.score", "TICKET-1, metric: z.score"),
            "plan.yaml:9:41: TICKET-1 has no step 'z'",
        ),
        (
            PLAN.replace("TICKET-1, metric: a.score", "TICKET-1, metric: score"),
            "plan.yaml:9:41: milestones.0.deliverables.1.metric: metric 'score' must be written",
        ),
        (PLAN.replace("  - id: M2", "  - id: M1"), "plan.yaml:18:5: duplicate milestone id 'M1'"),
        (
            PLAN.replace("- file: TICKET-2.yaml", "- file: ../TICKET-2.yaml"),
            "plan.yaml:17:9: milestones.0.tickets.1.file: '../TICKET-2.yaml': a ticket file must be",
        ),
        (PLAN.replace("- file: TICKET-2.yaml", "- file: TICKET-7.yaml"), "TICKET-7.yaml:1:1: cannot read"),
        (PLAN.replace("id: TICKET-3", "id: TICKET-1"), "plan.yaml:24:9: TICKET-1 is already a ticket of milestone M1"),
        (
            PLAN.replace("steps: [{id: a, kind: diag}]", "steps: [{id: a, kind: diag, neds: []}]"),
            "plan.yaml:27:37: unknown key 'neds' (did you mean 'needs'?)",
        ),
        (PLAN.replace("id: M2", "id: 'M 2'"), "plan.yaml:18:5: milestones.1.id: invalid milestone id 'M 2'"),
        (
            PLAN.replace("  - id: M2", "  - &m id: M2").replace("plan: test", "x: &a [*a]\nplan: test"),
            "alias *a is used inside the value it names",
        ),
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
            "expands to",
        ),
        ("plan: x\0\n", "binary data"),
        ("plan: " + "x" * MAX_PLAN_BYTES + "\n", "a plan may be at most"),
    ],
)
def test_invalid_plans_give_positioned_errors(tmp_path: Path, text: str, expected: str) -> None:
    write_plan(tmp_path)
    found = plan_errors(text, tmp_path)
    assert any(expected in e for e in found), found
    assert all(e.split(":")[1].isdigit() and e.split(":")[2].isdigit() for e in found), found


def test_written_tickets_carry_their_milestone_inline_file_or_flow_style(tmp_path: Path) -> None:
    flow = "{id: TICKET-2, title: second, goal: g, steps: [{id: b, kind: diag}, {id: smoke, kind: diag}]}\n"
    write_plan(tmp_path, ticket2=flow)
    loaded = load_plan(tmp_path / "plan.yaml")
    written = {t.ticket.id: t for t in loaded.tickets}
    for tid, planned in written.items():
        again = parse_ticket(planned.data, f"{tid}.yaml")
        assert again.milestone == planned.milestone
        assert again.model_dump(exclude={"milestone"}) == planned.ticket.model_dump(exclude={"milestone"})
    assert written["TICKET-1"].data.startswith(b"# written by `jbctl plan apply`")  # inline: generated
    assert written["TICKET-2"].data.startswith(b"# written by")  # flow style cannot take a key: regenerated
    assert written["TICKET-3"].milestone == "M2"


def test_a_bad_ticket_file_is_reported_at_its_own_line(tmp_path: Path) -> None:
    write_plan(tmp_path, ticket2=TICKET_2.replace("kind: check", "kind: chek"))
    found = plan_errors(PLAN, tmp_path)
    assert any(e.startswith(f"{tmp_path / 'TICKET-2.yaml'}:6:") and "steps.1.kind" in e for e in found), found


def test_a_ticket_that_names_another_milestone_is_refused(tmp_path: Path) -> None:
    write_plan(tmp_path, ticket2=TICKET_2 + "milestone: M2\n")
    found = plan_errors(PLAN, tmp_path)
    assert any("plan.yaml:17:9: TICKET-2 says milestone 'M2' but is listed under 'M1'" in e for e in found), found


# --- plan apply -------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("*.yaml"))}


def _planned(store: Any) -> list[dict[str, Any]]:
    return [r.data for r in store.read(0, types=["MilestonePlanned"])]


def test_apply_twice_changes_nothing(
    home: Path, store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path / "plan")
    assert jbctl(["plan", "apply", str(plan)]) == 0
    tickets = home / "tickets"
    first = _snapshot(tickets)
    assert sorted(first) == ["TICKET-1.yaml", "TICKET-2.yaml", "TICKET-3.yaml"]
    assert [(d["milestone"], d["revision"]) for d in _planned(store)] == [("M1", 1), ("M2", 1)]
    assert parse_ticket(first["TICKET-2.yaml"][0], "TICKET-2.yaml").milestone == "M1"
    assert first["TICKET-2.yaml"][0].startswith(TICKET_2.encode())  # the file's own text, milestone added
    head = store.head()
    capsys.readouterr()
    assert jbctl(["plan", "apply", str(plan)]) == 0
    assert store.head() == head
    assert _snapshot(tickets) == first  # not even rewritten (same mtimes)
    out = capsys.readouterr().out
    assert "milestone M1: unchanged" in out and "3 ticket file(s) unchanged" in out


def test_a_changed_plan_revises_only_what_changed(home: Path, store: Any, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan")
    assert jbctl(["plan", "apply", str(plan)]) == 0
    before = _snapshot(home / "tickets")
    head = store.head()
    # M2's goal changes; TICKET-2's file changes; M1 and TICKET-1, TICKET-3 do not.
    write_plan(
        tmp_path / "plan",
        PLAN.replace("goal: Later.", "goal: Later, and better."),
        TICKET_2.replace("loss: 1.0", "loss: 2.0"),
    )
    assert jbctl(["plan", "apply", "--dry-run", str(plan)]) == 0
    assert store.head() == head and _snapshot(home / "tickets") == before
    assert jbctl(["plan", "apply", str(plan)]) == 0
    new = [r for r in store.read(head)]
    assert [(r.type, r.data["milestone"], r.data["revision"]) for r in new] == [("MilestonePlanned", "M2", 2)]
    assert new[0].data["spec"]["goal"] == "Later, and better."
    after = _snapshot(home / "tickets")
    assert after["TICKET-1.yaml"] == before["TICKET-1.yaml"] and after["TICKET-3.yaml"] == before["TICKET-3.yaml"]
    assert after["TICKET-2.yaml"][0] != before["TICKET-2.yaml"][0]
    assert b"loss: 2.0" in after["TICKET-2.yaml"][0]


def test_invalid_plan_is_refused_with_positions_and_writes_nothing(
    home: Path, store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path / "plan", PLAN.replace("TICKET-1, metric: a.score", "TICKET-1, metric: z.score"))
    assert jbctl(["plan", "apply", str(plan)]) == 1
    assert f"{plan}:9:41: TICKET-1 has no step 'z'" in capsys.readouterr().err
    assert not (home / "tickets").exists() or not list((home / "tickets").glob("*.yaml"))
    assert store.head() == 0


# --- the milestone projection (decider level) ---------------------------------------------------


class Log:
    """Commands through the pure decider, events numbered as the store would."""

    def __init__(self) -> None:
        self.state = State()
        self.events: list[tuple[int, ev.Event]] = []

    def do(self, command: c.Command) -> list[ev.Event]:
        out = decide(self.state, command)
        for e in out:
            evolve(self.state, e)
            self.events.append((len(self.events) + 1, e))
        return out

    def book(self) -> MilestoneBook:
        return fold(self.events)


def plan_command(folder: Path, text: str = PLAN, now: datetime = T0) -> tuple[c.PlanMilestones, Any]:
    loaded = parse_plan(text.encode(), str(folder / "plan.yaml"), folder)
    specs = [loaded.milestone_spec(m) for m in loaded.plan.milestones]
    return c.PlanMilestones(now=now, plan=loaded.plan.plan, path="plan.yaml", milestones=specs), loaded


def _report(cls: type, ticket: str, task: str, attempt: int = 1, **kw: Any) -> c.Command:
    return cls(now=kw.pop("now", T0), ticket=ticket, task=task, attempt=attempt, **kw)


def run_ticket_1(log: Log, loaded: Any, score: float = 0.9, now: datetime = T0) -> None:
    t1 = next(t.ticket for t in loaded.tickets if t.ticket.id == "TICKET-1")
    log.do(submit(t1, now))
    log.do(_report(c.RecordJobStarted, "TICKET-1", "a", worker="w", now=now))
    for step in (1, 2, 3):
        log.do(_report(c.RecordProgress, "TICKET-1", "a", step=step, total=3, metrics={"loss": 1.0 / step}, now=now))
    later = now + timedelta(seconds=75)
    log.do(_report(c.RecordJobSucceeded, "TICKET-1", "a", metrics={"score": score}, now=later))


def run_ticket_2(log: Log, loaded: Any, fail: bool = False) -> None:
    t2 = next(t.ticket for t in loaded.tickets if t.ticket.id == "TICKET-2")
    log.do(submit(t2, T0))
    log.do(_report(c.RecordJobSucceeded, "TICKET-2", "b", metrics={"loss": 1.0}))
    if fail:
        log.do(_report(c.RecordJobFailed, "TICKET-2", "smoke", error="exit 1", retryable=False))
        return
    log.do(_report(c.RecordArtifact, "TICKET-2", "smoke", artifact="ab" * 32, kind="check-output"))
    log.do(_report(c.RecordJobSucceeded, "TICKET-2", "smoke"))


def test_plan_command_records_each_changed_milestone_once(tmp_path: Path) -> None:
    write_plan(tmp_path)
    log = Log()
    command, _ = plan_command(tmp_path)
    assert [e.type for e in log.do(command)] == ["MilestonePlanned", "MilestonePlanned"]
    assert log.do(command) == []
    changed, _ = plan_command(tmp_path, PLAN.replace("title: Second", "title: Second, renamed"))
    out = log.do(changed)
    assert [(e.milestone, e.revision) for e in out] == [("M2", 2)]  # type: ignore[attr-defined]
    assert ev.stream_of(out[0]) == ev.PLAN_STREAM


def test_milestone_state_follows_ticket_outcomes(tmp_path: Path) -> None:
    write_plan(tmp_path)
    log = Log()
    command, loaded = plan_command(tmp_path)
    log.do(command)
    assert log.book().view("M1")["state"] == "planned"
    run_ticket_1(log, loaded)
    view = log.book().view("M1")
    assert view["state"] == "in progress" and [d["ok"] for d in view["deliverables"]] == [True, True, False]
    run_ticket_2(log, loaded)
    view = log.book().view("M1")
    assert view["state"] == "done" and view["done"] == view["total"] == 3 and view["open"] == []
    seqs = {seq: e for seq, e in log.events}
    for d in view["deliverables"]:  # each tick is proved by the event it names
        assert seqs[d["seq"]].type == d["event"]
    assert view["deliverables"][1]["value"] == 0.9
    assert [t["duration_s"] for t in view["tickets"]] == [75.0, 0.0]
    assert log.book().view("M2")["state"] == "planned"


def test_a_failed_ticket_blocks_its_milestone(tmp_path: Path) -> None:
    write_plan(tmp_path)
    log = Log()
    command, loaded = plan_command(tmp_path)
    log.do(command)
    run_ticket_1(log, loaded)
    run_ticket_2(log, loaded, fail=True)
    view = log.book().view("M1")
    assert view["state"] == "blocked"
    assert [t["state"] for t in view["tickets"]] == ["completed", "failed"]
    assert any(item.startswith("TICKET-2: failed") for item in view["open"])
    assert any("smoke output" in item for item in view["open"])


def test_a_threshold_above_the_measured_value_stays_unticked(tmp_path: Path) -> None:
    write_plan(tmp_path)
    log = Log()
    # The ticket's own acceptance (>= 0.5) passes at 0.7; the deliverable asks for >= 0.8.
    broken = PLAN.replace(
        'TICKET-1, metric: a.score, op: ">=", value: 0.5}', 'TICKET-1, metric: a.score, op: ">=", value: 0.8}'
    )
    command, loaded = plan_command(tmp_path, broken)
    log.do(command)
    run_ticket_1(log, loaded, score=0.7)
    run_ticket_2(log, loaded)
    view = log.book().view("M1")
    assert [d["ok"] for d in view["deliverables"]] == [True, False, True]
    assert view["deliverables"][1]["value"] == 0.7 and "measured 0.7, needs >= 0.8" in view["deliverables"][1]["why"]
    assert view["state"] == "in progress"
    from cli.milestone_report import render

    md = render(fold(log.events), "M1", "md", T0)[0].decode()
    assert "- [ ] score: 0.7 (TICKET-1 a.score >= 0.8, measured in AttemptSucceeded seq" in md
    assert "measured 0.7, needs >= 0.8" in md and "state: in progress, 2/3 deliverables" in md


# --- the report ------------------------------------------------------------------------------------


def test_report_is_reproducible_from_the_log(tmp_path: Path) -> None:
    from cli.milestone_report import GENERATED, render

    write_plan(tmp_path)
    log = Log()
    command, loaded = plan_command(tmp_path)
    log.do(command)
    run_ticket_1(log, loaded)
    run_ticket_2(log, loaded)
    for fmt in ("md", "html"):
        a, figures_a = render(fold(log.events), "M1", fmt, T0)
        b, figures_b = render(fold(log.events), "M1", fmt, T0 + timedelta(days=3))
        assert a != b
        strip = [ln for ln in a.decode().splitlines() if GENERATED not in ln]
        assert strip == [ln for ln in b.decode().splitlines() if GENERATED not in ln]
        assert figures_a == figures_b and len(figures_a) == 1
        png = next(iter(figures_a.values()))
        assert png.startswith(b"\x89PNG")
    md = render(fold(log.events), "M1", "md", T0)[0].decode()
    assert "- [x] score: 0.9 (TICKET-1 a.score >= 0.5, proved by AttemptSucceeded seq" in md
    assert "![TICKET-1 a, attempt 1](M1-TICKET-1-a.png)" in md
    assert "| TICKET-1 | first | completed | 1m15s | 1 |" in md


def test_report_command_stores_an_artifact_and_writes_curves(
    home: Path, store: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from schema.artifact_store import ArtifactStore
    from schema.settings import load_settings

    plan = write_plan(tmp_path / "plan")
    assert jbctl(["plan", "apply", str(plan)]) == 0
    out = tmp_path / "out" / "M1.md"
    assert jbctl(["milestone", "M1", "--report", "md", "-o", str(out)]) == 0
    assert "## Deliverables" in out.read_text()
    assert "report stored as artifact" in capsys.readouterr().err
    kinds = {e.kind for e in ArtifactStore.from_settings(load_settings()).entries()}
    assert "milestone-report" in kinds
    assert jbctl(["milestone", "M1", "--report", "html"]) == 0
    assert capsys.readouterr().out.startswith("<!DOCTYPE html>")
    assert jbctl(["milestone", "M9"]) == 1
    assert "no milestone 'M9' (planned: M1, M2)" in capsys.readouterr().err


# --- real processes ------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_plan_runs_to_a_done_milestone_with_real_processes(running: Any, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan")
    applied = running.jbctl("plan", "apply", str(plan))
    assert applied.returncode == 0, applied.stderr
    for tid in ("TICKET-1", "TICKET-2", "TICKET-3"):
        assert running.wait_done(tid, timeout=90) == "TicketCompleted"
    listed = running.jbctl("milestones", "--json")
    assert listed.returncode == 0, listed.stderr
    views = {v["milestone"]: v for v in json.loads(listed.stdout)}
    assert views["M1"]["state"] == "done" and views["M2"]["state"] == "done"
    # The checklist agrees with what the tickets recorded.
    rows = running.daemon.rows()
    accepted = {r["data"]["ticket"]: r for r in rows if r["type"] == "AcceptanceEvaluated"}
    m1 = views["M1"]["deliverables"]
    assert m1[0]["ok"] is accepted["TICKET-1"]["data"]["passed"] is True
    assert m1[0]["seq"] == accepted["TICKET-1"]["seq"]
    score = next(r for r in rows if r["type"] == "AttemptSucceeded" and r["data"]["ticket"] == "TICKET-1")
    assert m1[1]["value"] == score["data"]["metrics"]["score"] and m1[1]["seq"] == score["seq"]
    smoke = next(r for r in rows if r["type"] == "ArtifactRecorded" and r["data"]["task"] == "smoke")
    assert m1[2]["ok"] and m1[2]["seq"] == smoke["seq"]
    report = running.jbctl("milestone", "M1", "--report", "md", "-o", str(tmp_path / "r" / "M1.md"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r" / "M1.md").read_text()
    assert text.count("- [x] ") == 3 and "state: done" in text
    running.assert_consistent()  # replay --check and verify stay true
    assert os.path.exists(running.home / "tickets" / "TICKET-2.yaml")
