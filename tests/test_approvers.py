"""Who may approve: the configured `approvers`, else the owner of the Jetbox home (recorded at the
first start); `["*"]` is the explicit "anyone"; a ticket's own list only narrows."""

from __future__ import annotations

import getpass
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.main import main as jbctl
from daemon import commands as c
from daemon.decider import decide
from daemon.handler import CommandHandler
from daemon.state import State, evolve
from schema.events import Event
from schema.store import EventStore, replay_differences
from tests.helpers import make_ticket, submit
from tests.jbdaemon import Daemon

T0 = datetime(2025, 1, 1, tzinfo=UTC)
ME = getpass.getuser()


def apply(state: State, command: c.Command) -> list[Event]:
    events = decide(state, command)
    for event in events:
        evolve(state, event)
    return events


def _policy_proposal(s: State, tid: str, approvers: str = "") -> str:
    """A ticket whose check needs `echo`: it opens a policy proposal (the same rule applies to core)."""
    ticket = make_ticket(tid, steps="  - {id: k, kind: check, with: {run: [echo, hi]}}\n", extra=approvers)
    events = apply(s, submit(ticket, T0))
    return str(events[-1].proposal)  # type: ignore[attr-defined]


def _approve(s: State, proposal: str, actor: str, configured: list[str] | None = None) -> list[Event]:
    return apply(s, c.ApproveProposal(now=T0, proposal=proposal, actor=actor, approvers=configured or []))


def test_nothing_configured_and_no_owner_recorded_refuses_everyone() -> None:
    s = State()
    p = _policy_proposal(s, "TICKET-1")
    (refused,) = _approve(s, p, "root")
    assert refused.type == "ApprovalRefused" and "owner of the Jetbox home is not recorded" in refused.reason  # type: ignore[attr-defined]


def test_the_home_owner_is_the_default_approver_recorded_once() -> None:
    s = State()
    (recorded,) = apply(s, c.RecordHomeOwner(now=T0, user="alice", uid=1000, home="/srv/jetbox"))
    assert recorded.type == "HomeOwnerRecorded" and s.home_owner == "alice"
    assert apply(s, c.RecordHomeOwner(now=T0, user="mallory", uid=1001, home="/srv/jetbox")) == []  # first one stands
    p = _policy_proposal(s, "TICKET-1")
    (refused,) = _approve(s, p, "mallory")
    reason = refused.reason  # type: ignore[attr-defined]
    assert "mallory is not an approver" in reason and "approvers: alice" in reason
    assert "owner of the Jetbox home" in reason and '["*"] for anyone' in reason
    assert _approve(s, p, "alice")[0].type == "ProposalApproved"


def test_star_is_anyone_and_a_list_is_that_list() -> None:
    s = State(home_owner="alice")
    p1 = _policy_proposal(s, "TICKET-1")
    assert _approve(s, p1, "anybody", ["*"])[0].type == "ProposalApproved"
    p2 = _policy_proposal(s, "TICKET-2")
    assert _approve(s, p2, "alice", ["bob"])[0].type == "ApprovalRefused"  # a configured list replaces the owner
    assert _approve(s, p2, "bob", ["bob"])[0].type == "ProposalApproved"


def test_a_ticket_cannot_name_its_own_approvers_only_narrow() -> None:
    s = State(home_owner="alice")
    p = _policy_proposal(s, "TICKET-1", "approvers: [mallory]\n")
    (refused,) = _approve(s, p, "mallory")
    assert refused.type == "ApprovalRefused" and "the ticket names mallory, within alice" in refused.reason  # type: ignore[attr-defined]
    p2 = _policy_proposal(s, "TICKET-2", "approvers: [alice, carol]\n")
    assert _approve(s, p2, "carol", ["alice", "bob"])[0].type == "ApprovalRefused"
    assert _approve(s, p2, "bob", ["alice", "bob"])[0].type == "ApprovalRefused"  # not on the ticket's list
    assert _approve(s, p2, "alice", ["alice", "bob"])[0].type == "ProposalApproved"
    p3 = _policy_proposal(s, "TICKET-3", "approvers: [carol]\n")
    assert _approve(s, p3, "carol", ["*"])[0].type == "ProposalApproved"  # anyone, narrowed to carol


# --- jbctl, with real homes -------------------------------------------------------------------


def _policy_ticket(store: EventStore) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1", steps="  - {id: k, kind: check, with: {run: [echo, hi]}}\n"), T0))


def test_approve_as_the_home_owner_records_the_owner_first(
    store: EventStore, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert os.stat(home).st_uid == os.getuid()  # the tests run as the home's owner
    _policy_ticket(store)
    assert jbctl(["approve", "P-1", "--yes"]) == 0, capsys.readouterr().err
    (owner,) = store.read(0, types=["HomeOwnerRecorded"])
    assert owner.data["user"] == ME and owner.data["home"] == str(home)
    assert replay_differences(store) == []


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the home to another user")
def test_someone_else_s_home_refuses_with_the_rule_and_star_opens_it(
    store: EventStore, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chown(home, 65534, 65534)  # the home belongs to nobody: root is not its owner
    _policy_ticket(store)
    assert jbctl(["approve", "P-1", "--yes"]) == 1
    err = capsys.readouterr().err
    owner = subprocess.run(["id", "-nu", "65534"], capture_output=True, text=True).stdout.strip()
    assert f"{ME} is not an approver of P-1 (approvers: {owner}: the owner of the Jetbox home" in err
    assert 'or ["*"] for anyone' in err and "the attempt is recorded" in err
    monkeypatch.setenv("JETBOX_APPROVERS", '["*"]')
    assert jbctl(["approve", "P-1", "--yes"]) == 0
    assert [r.type for r in store.read(0, types=["ApprovalRefused", "ProposalApproved"])] == [
        "ApprovalRefused",
        "ProposalApproved",
    ]


@pytest.mark.integration
def test_daemon_records_the_owner_at_first_start_only(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home").start()
    row = d.wait_event("HomeOwnerRecorded")
    assert row["data"]["user"] == ME and row["data"]["home"] == str(tmp_path / "home")
    assert d.stop() == 0
    d.start()
    d.barrier("TICKET-9")
    assert [r["type"] for r in d.rows()].count("HomeOwnerRecorded") == 1
    assert d.stop() == 0


def test_the_actor_is_the_uid_s_user_not_the_environment_s(
    store: EventStore, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    _policy_ticket(store)
    for var in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "alice")  # what getpass.getuser() would believe
    assert jbctl(["approve", "P-1", "--yes"]) == 0, capsys.readouterr().err
    (approved,) = store.read(0, types=["ProposalApproved"])
    assert approved.data["actor"] == me and approved.meta["actor"]["user"] == me
