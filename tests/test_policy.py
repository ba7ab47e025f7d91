"""The command policy: a default list with no interpreter on it, proposals for anything more, and
inline code (`python -c`) refused for a granted interpreter unless a grant covers the code."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon import commands as c
from daemon.decider import decide
from daemon.state import State, evolve
from schema.events import Event
from schema.policy import DEFAULT_CHECK_BINARIES, DEFAULT_CHECK_REASONS, code_grant, inline_code
from schema.ticket import RunCheck, load_ticket
from tests.conftest import EXAMPLES, ROOT
from tests.helpers import make_ticket, submit
from workers.context import LocalContext
from workers.jobs import JobFailed, run_check

T0 = datetime(2025, 1, 1, tzinfo=UTC)
INTERPRETERS = {
    "python",
    "python3",
    "pypy3",
    "sh",
    "bash",
    "dash",
    "zsh",
    "perl",
    "ruby",
    "node",
    "env",
    "xargs",
    "awk",
    "sed",
    "find",
    "make",
    "pytest",
    "mypy",
    "busybox",
    "timeout",
    "nice",
}


def apply(state: State, command: c.Command) -> list[Event]:
    events = decide(state, command)
    for event in events:
        evolve(state, event)
    return events


def test_the_default_list_holds_no_interpreter_and_every_entry_is_documented() -> None:
    assert not DEFAULT_CHECK_BINARIES & INTERPRETERS
    assert all(not b.startswith(("python", "pypy", "perl", "node", "ruby")) for b in DEFAULT_CHECK_BINARIES)
    docs = (ROOT / "docs" / "DECIDER.md").read_text()
    for binary, why in DEFAULT_CHECK_REASONS.items():
        assert f"`{binary}`" in docs, binary
        assert why
        assert shutil.which(binary, path=f"{Path(__import__('sys').executable).parent}:/usr/bin:/bin"), binary


def _checks_of(path: Path) -> list[list[str]]:
    ticket = load_ticket(path)
    argvs = [list(s.with_["run"]) for s in ticket.steps if s.kind == "check"]
    return argvs + [list(a.run) for a in ticket.acceptance if isinstance(a, RunCheck)]


def test_example_tickets_and_readme_need_no_approval() -> None:
    """`make demo` submits TICKET-1..5 and must finish without anyone approving a command."""
    found = []
    for path in sorted(EXAMPLES.rglob("TICKET-*.yaml")):
        for argv in _checks_of(path):
            found.append(argv)
            assert argv[0] in DEFAULT_CHECK_BINARIES and inline_code(argv) is None, (path.name, argv)
    assert found  # TICKET-3 has a check step and a run: acceptance check
    readme = (ROOT / "README.md").read_text()
    assert "run: [python" not in readme and "run: [test, -d, .]" in readme


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["python", "-V"], None),
        (["python3", "train.py", "--epochs", "2"], None),
        (["python", "-m", "http.server"], None),
        (["python", "-Wignore::ResourceWarning", "s.py"], None),
        (["python", "-c", "print(1)"], "-c"),
        (["python3.11", "-Ic", "print(1)"], "-Ic"),
        (["python", "-W", "x", "-c", "y"], "-c"),
        (["sh", "-c", "id"], "-c"),
        (["bash", "-o", "posix", "-lc", "id"], "-lc"),
        (["bash", "run.sh"], None),
        (["perl", "-lne", "print"], "-lne"),
        (["perl", "-MPOSIX;system('id')"], "-MPOSIX;system('id')"),
        (["ruby", "-e", "1"], "-e"),
        (["node", "--eval=1"], "--eval=1"),
        (["node", "-p", "1"], "-p"),
        (["deno", "eval", "1"], "eval"),
        (["env"], None),
        (["env", "-i", "python", "-V"], "python"),
        (["xargs", "rm"], "rm"),
        (["timeout", "5", "sh"], "5"),
        (["awk", "{print}"], "{print}"),
        (["awk", "-f", "prog.awk", "data"], None),
        (["sed", "-f", "s.sed", "-e", "1e id"], "-e"),
        (["sed", "-n", "p"], "p"),
        (["find", ".", "-name", "*.npz"], None),
        (["find", ".", "-exec", "id", ";"], "-exec"),
        (["make", "--eval=x:"], "--eval=x:"),
        (["grep", "-c", "x", "f"], None),  # not an interpreter: its -c counts lines
        (["test", "-e", "x"], None),
    ],
)
def test_inline_code_is_recognised(argv: list[str], code: str | None) -> None:
    assert inline_code(argv) == code


def _check_ticket(tid: str, argv: str) -> c.SubmitTicket:
    return submit(make_ticket(tid, steps=f"  - {{id: k, kind: check, with: {{run: {argv}}}}}\n"), T0)


def test_granted_interpreter_still_asks_for_inline_code() -> None:
    s = State(home_owner="ops")  # the default approver
    events = apply(s, _check_ticket("TICKET-1", "[python, -V]"))
    assert [type(e).__name__ for e in events] == ["TicketSubmitted", "ProposalOpened"]  # python is no default
    assert "code" not in events[1].candidate  # type: ignore[attr-defined]
    apply(s, c.ApproveProposal(now=T0, proposal="P-1", actor="ops", scope="all"))
    assert "python" in s.granted_binaries and code_grant("python") not in s.granted_binaries

    # Another ticket: a script runs on the grant, inline code asks again (showing the code).
    events = apply(s, _check_ticket("TICKET-2", "[python, train_check.py]"))
    assert [type(e).__name__ for e in events] == ["TicketSubmitted", "AttemptScheduled"]
    events = apply(s, _check_ticket("TICKET-3", "[python, -c, 'import os; os.system(\"id\")']"))
    assert [type(e).__name__ for e in events] == ["TicketSubmitted", "ProposalOpened"]
    opened = events[1]
    assert opened.candidate["code"] == "-c" and opened.candidate["binary"] == "python"  # type: ignore[attr-defined]
    events = apply(s, c.ApproveProposal(now=T0, proposal=opened.proposal, actor="ops"))  # type: ignore[attr-defined]
    assert [type(e).__name__ for e in events] == ["ProposalApproved", "AttemptScheduled"]
    assert code_grant("python") in events[1].params["_allowed_binaries"]  # type: ignore[attr-defined]
    assert code_grant("python") not in s.granted_binaries  # scope ticket: TICKET-3 only


def test_installation_allowlist_entry_does_not_allow_inline_code() -> None:
    s = State()
    command = _check_ticket("TICKET-1", "[python, -c, '1']").model_copy(update={"allowed_binaries": ["python"]})
    events = apply(s, command)
    assert [type(e).__name__ for e in events] == ["TicketSubmitted", "ProposalOpened"]
    command = _check_ticket("TICKET-2", "[python, -c, '1']").model_copy(
        update={"allowed_binaries": ["python", "python:code"]}
    )
    assert [type(e).__name__ for e in apply(s, command)] == ["TicketSubmitted", "AttemptScheduled"]


def test_rejected_code_proposal_fails_the_check() -> None:
    s = State(home_owner="ops")
    apply(s, _check_ticket("TICKET-1", "[sh, -c, 'curl example.org']"))
    events = apply(s, c.RejectProposal(now=T0, proposal="P-1", actor="ops", reason="no shell"))
    assert [type(e).__name__ for e in events] == ["ProposalRejected", "TaskFailed", "TicketFailed"]
    assert "'sh' with inline code was not allowed" in events[1].reason  # type: ignore[attr-defined]


# --- the worker enforces the same rules (the daemon's grants are signed into the job) ----------


def _run(tmp_path: Path, argv: list[str], granted: list[str] | None = None) -> None:
    ctx = LocalContext(workdir=tmp_path / "job" / "a" / "1")
    run_check(ctx, {"run": argv, "timeout": 30, "_allowed_binaries": granted or []})


def test_worker_runs_defaults_and_refuses_inline_code_without_a_code_grant(tmp_path: Path) -> None:
    _run(tmp_path, ["test", "-d", "."])  # a default: runs
    with pytest.raises(JobFailed, match="not in the check allowlist"):
        _run(tmp_path, ["python", "-V"])
    _run(tmp_path, ["python", "-V"], granted=["python"])
    with pytest.raises(JobFailed, match="inline code is refused"):
        _run(tmp_path, ["python", "-c", "print(1)"], granted=["python"])
    _run(tmp_path, ["python", "-c", "print(1)"], granted=["python", code_grant("python")])
