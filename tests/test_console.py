"""The web console: pages and JSON over a real store, tokens and sessions, writes only through commands,
live updates, and (with Debian's chromium) the pages in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon import commands as c
from daemon.handler import CommandHandler
from schema.store import EventStore, replay_differences
from tests.conftest import JBCTL, ROOT
from tests.console_server import ConsoleServer
from tests.helpers import make_ticket, submit
from tests.test_postgres import pg_url  # noqa: F401  (the fixture: a fresh PostgreSQL database per test)

NOW = datetime.now(UTC)
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "console"
STEPS = "  - {id: train, kind: train}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
BAD_TICKET = "id: TICKET-9\ntitle: bad\ngoal: show errors\nsteps:\n  - {id: a, kind: diag}\n  - {id: b, kind: nope}\n"


def core_ticket(handler: CommandHandler, tid: str, progress: bool = True) -> str:
    """A ticket whose training ends in an open core proposal (the events its jobs would have reported)."""
    extra = "update: core\nexpires: 1d\nacceptance:\n  - {metric: eval.exact, op: '>=', value: 0.1}\n"
    handler.handle(submit(make_ticket(tid, steps=STEPS, extra=extra), NOW))
    t = handler.state.tickets[tid].tasks
    attempt = t["train"].attempt
    if progress:
        handler.handle(
            c.RecordJobStarted(now=NOW, ticket=tid, task="train", attempt=attempt, worker="gpu-0", report_seq=1)
        )
        for i in range(1, 16):
            handler.handle(
                c.RecordProgress(
                    now=NOW,
                    ticket=tid,
                    task="train",
                    attempt=attempt,
                    step=20 * i,
                    total=300,
                    metrics={"loss": 2.0 / i, "accuracy": 1 - 1 / (i + 1)},
                    report_seq=i + 1,
                )
            )
    handler.handle(
        c.RecordJobSucceeded(
            now=NOW,
            ticket=tid,
            task="train",
            attempt=attempt,
            outputs={"component": "reasoner", "checkpoint": f"ckpt-{tid}"},
        )
    )
    handler.handle(
        c.RecordJobSucceeded(
            now=NOW,
            ticket=tid,
            task="eval",
            attempt=t["eval"].attempt,
            metrics={"exact": 0.5, "blank": 0.6},
            outputs={"core_metrics": {"exact": 0.25, "blank": 0.7}},
        )
    )
    return handler.state.tickets[tid].awaiting or ""


def finish_diag(handler: CommandHandler, tid: str) -> None:
    for task in ("a", "b"):
        attempt = handler.state.tickets[tid].tasks[task].attempt
        handler.handle(c.RecordJobSucceeded(now=NOW, ticket=tid, task=task, attempt=attempt))


# Who may approve is the decider's rule: the configured approvers (else the home's owner). The
# console's web users are named by their tokens, so the tests list them.
APPROVERS = {"JETBOX_APPROVERS": '["ada", "grace"]'}


@pytest.fixture
def console(store: EventStore, home: Path) -> Iterator[ConsoleServer]:
    server = ConsoleServer(home, env=APPROVERS)
    yield server
    server.stop()


def token_for(home: Path, user: str) -> str:
    from console import auth

    return auth.create_token(home, user)


# --- without a browser -------------------------------------------------------------------------------


@pytest.mark.integration  # starts a python process
def test_console_never_imports_torch_or_workers() -> None:
    code = (
        "import sys, console.app, console.data, console.live, console.auth, console.playground, cli.console_cmds;"
        "import daemon.gate, daemon.adhoc, cli.plans, cli.milestone_report, schema.milestones;"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'workers', 'timm', 'gradio')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tokens_are_stored_hashed_and_sessions_signed(home: Path) -> None:
    from console import auth

    token = auth.create_token(home, "ada")
    stored = auth.tokens_path(home).read_text()
    assert token not in stored and "ada" in stored
    assert auth.tokens_path(home).stat().st_mode & 0o077 == 0
    assert auth.user_for_token(home, token) == "ada"
    assert auth.user_for_token(home, token + "x") is None
    key = auth.session_key(home)
    cookie = auth.make_session(key, "ada")
    session = auth.read_session(key, cookie)
    assert session is not None and session.user == "ada"
    _body, sig = cookie.rsplit(".", 1)
    forged = auth._b64(json.dumps({"u": "mallory", "n": "x", "e": 2**40}).encode())
    assert auth.read_session(key, f"{forged}.{sig}") is None
    assert auth.read_session(key, auth.make_session(key, "ada", now=time.time() - auth.SESSION_SECONDS - 1)) is None
    assert auth.csrf_ok(key, session, auth.csrf_token(key, session))
    assert not auth.csrf_ok(key, session, "nope") and not auth.csrf_ok(key, session, None)
    with pytest.raises(ValueError, match="one word"):
        auth.create_token(home, "two words")


@pytest.mark.integration
def test_pages_and_json_twins(store: EventStore, console: ConsoleServer) -> None:
    handler = CommandHandler(store)
    assert core_ticket(handler, "TICKET-1") == "P-1"
    handler.handle(submit(make_ticket("TICKET-2", extra=""), NOW))
    listing = console.get_json("/api/tickets")
    assert listing["total"] == 2 and [t["ticket"] for t in listing["tickets"]] == ["TICKET-2", "TICKET-1"]
    first = next(t for t in listing["tickets"] if t["ticket"] == "TICKET-1")
    assert first["waiting_on"] == "approval: jbctl approve P-1"
    # The same rows as `jbctl status --json` for the fields both show.
    status = json.loads(subprocess.run([JBCTL, "status", "--json"], capture_output=True, text=True, check=True).stdout)
    for row in status:
        mine = next(t for t in listing["tickets"] if t["ticket"] == row["ticket"])
        for k in ("state", "current_step", "progress", "waiting_on", "tasks_done", "tasks_total"):
            assert mine[k] == row[k], k
    assert console.get_json("/api/tickets?state=running&q=ticket-2&limit=1")["total"] == 1
    assert console.get_json("/api/tickets?limit=1&offset=1")["tickets"][0]["ticket"] == "TICKET-1"
    status_code, body = console.request("GET", "/tickets/TICKET-1", headers={"Accept": "application/json"})
    ticket = json.loads(body)
    assert status_code == 200 and ticket["goal"] == "test the pipeline"
    curves = {f"{x['task']}.{x['metric']}": x for x in ticket["curves"]}
    assert len(curves["train.loss"]["points"]) == 15 and curves["train.loss"]["svg_points"]
    assert ticket["acceptance"]["passed"] and ticket["tasks"][0]["task"] == "train"
    proposal = console.get_json("/api/proposals/P-1")
    assert [r["metric"] for r in proposal["comparison"]] == ["eval.exact", "eval.blank"]  # checked first
    assert proposal["comparison"][0]["checked"] and proposal["comparison"][1]["regression"]
    assert console.get_json("/api/core")["version"] == 0
    assert "no Redis configured" in console.get_json("/api/workers")["error"]
    assert [r["type"] for r in console.get_json("/api/audit")["rows"]] == ["ProposalOpened"]
    sql = console.get_json("/api/sql?" + urllib.parse.urlencode({"q": "SELECT id FROM tickets ORDER BY id"}))
    assert sql["rows"] == [["TICKET-1"], ["TICKET-2"]]
    code, body = console.request("GET", "/api/sql?" + urllib.parse.urlencode({"q": "DELETE FROM tickets"}))
    assert code == 400 and "read-only" in json.loads(body)["error"]
    code, body = console.request("GET", "/sql.csv?" + urllib.parse.urlencode({"q": "SELECT id, state FROM tickets"}))
    assert code == 200 and body.decode().splitlines()[0] == "id,state"
    for path in (
        "/",
        "/tickets/TICKET-1",
        "/proposals",
        "/proposals/P-1",
        "/core",
        "/workers",
        "/audit",
        "/sql",
        "/submit",
        "/playground",
        "/login",
    ):
        code, body = console.request("GET", path)
        assert code == 200, path
        assert b"<title>" in body
    assert console.request("GET", "/tickets/NOPE")[0] == 404


@pytest.mark.integration
def test_writes_need_a_token_and_go_through_the_commands(store: EventStore, home: Path, console: ConsoleServer) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1", progress=False)
    head = store.head()
    # No session, no token: refused, nothing recorded.
    code, body = console.request(
        "POST", "/proposals/P-1/approve", b"note=x", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert code == 403 and b"Nothing was recorded" in body
    code, body = console.request("POST", "/api/proposals/P-1/approve", b"{}", {"Content-Type": "application/json"})
    assert code == 403 and store.head() == head
    # A wrong bearer token is refused too.
    code, _ = console.request(
        "POST",
        "/api/proposals/P-1/approve",
        b"{}",
        {"Content-Type": "application/json", "Authorization": "Bearer jbx_wrong"},
    )
    assert code == 403 and store.head() == head
    token = token_for(home, "ada")
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    code, body = console.request("POST", "/api/proposals/P-1/reject", b"{}", auth)
    assert code == 409 and "reason is required" in json.loads(body)["message"] and store.head() == head
    code, body = console.request("POST", "/api/proposals/P-1/approve", json.dumps({"note": "via api"}).encode(), auth)
    assert code == 200, body
    answer = json.loads(body)
    assert answer["ok"] and "core is now v1" in answer["message"]
    promoted = list(store.read(0, types=["CorePromoted"]))
    assert promoted[0].data["actor"] == "ada" and promoted[0].meta["actor"]["user"] == "ada"
    assert promoted[0].meta["actor"]["via"] == "console"
    code, body = console.request("POST", "/api/proposals/P-1/approve", b"{}", auth)
    assert code == 409 and "is approved" in json.loads(body)["message"]
    # Cancel through the same command as `jbctl cancel`.
    handler.refresh()
    handler.handle(submit(make_ticket("TICKET-2"), NOW))
    code, body = console.request(
        "POST", "/api/tickets/TICKET-2/cancel", json.dumps({"reason": "enough"}).encode(), auth
    )
    assert code == 200, body
    cancelled = list(store.read(0, types=["TicketCancelled"]))
    assert cancelled[0].meta["actor"]["user"] == "ada"
    assert replay_differences(store) == []


@pytest.mark.integration
def test_scheduling_from_the_console_goes_through_the_clis_commands(
    store: EventStore, home: Path, console: ConsoleServer
) -> None:
    """Hold, release, priority, pause and resume: the commands `jbctl hold/...` run, the web user as actor."""
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1"), NOW))
    head = store.head()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/tickets/TICKET-1/hold", "/tickets/TICKET-1/priority", "/pause", "/resume"):
        code, body = console.request("POST", path, b"priority=5", form)
        assert code == 403 and b"Nothing was recorded" in body, path
    assert store.head() == head
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token_for(home, 'ada')}"}

    def post(path: str, body: dict[str, object]) -> tuple[int, dict[str, Any]]:
        code, raw = console.request("POST", path, json.dumps(body).encode(), auth)
        return code, json.loads(raw)

    code, answer = post("/api/tickets/TICKET-1/hold", {"reason": "gpu maintenance"})
    assert code == 200 and answer["message"].startswith("held TICKET-1"), answer
    code, answer = post("/api/tickets/TICKET-1/hold", {})
    assert code == 409 and "already held" in answer["message"]
    row = console.get_json("/api/tickets")["tickets"][0]
    assert row["held"] == "gpu maintenance"
    assert console.get_json("/api/tickets/TICKET-1")["held"] == "gpu maintenance"
    # Hostile priorities: a clear refusal, nothing recorded.
    head = store.head()
    for bad, why in (("high", "whole number"), (1.5, "whole number"), (True, "whole number"), (5000, "out of range")):
        code, answer = post("/api/tickets/TICKET-1/priority", {"priority": bad})
        assert code == 409 and why in answer["message"], (bad, answer)
    code, answer = post("/api/tickets/NOPE/priority", {"priority": 3})
    assert code == 409 and "no ticket 'NOPE'" in answer["message"]
    assert store.head() == head
    code, answer = post("/api/tickets/TICKET-1/priority", {"priority": "7"})
    assert code == 200 and answer["message"] == "TICKET-1: priority 7"
    assert console.get_json("/api/tickets")["tickets"][0]["priority"] == 7
    code, answer = post("/api/tickets/TICKET-1/release", {})
    assert code == 200 and answer["message"].startswith("released TICKET-1")
    code, answer = post("/api/tickets/TICKET-1/release", {})
    assert code == 409 and "is not held" in answer["message"]
    code, answer = post("/api/pause", {"reason": "disk swap"})
    assert code == 200 and answer["message"].startswith("paused")
    assert console.get_json("/api/tickets")["paused"] == "disk swap"
    code, body = console.request("GET", "/")
    assert b"Scheduling is paused" in body and b"disk swap" in body
    code, answer = post("/api/resume", {})
    assert code == 200 and answer["message"].startswith("resumed")
    assert console.get_json("/api/tickets")["paused"] is None
    kinds = ["TicketHeld", "TicketReleased", "PriorityChanged", "InstallationPaused", "InstallationResumed"]
    recorded = list(store.read(0, types=kinds))
    assert sorted({r.type for r in recorded}) == sorted(kinds)
    for r in recorded:
        assert r.meta["actor"]["user"] == "ada" and r.meta["actor"]["via"] == "console", r
        assert r.data.get("actor") == "ada", r
    # `jbctl status --json` agrees with the list about what the console changed.
    status = json.loads(subprocess.run([JBCTL, "status", "--json"], capture_output=True, text=True, check=True).stdout)
    assert status[0]["priority"] == 7 and status[0]["held"] is None
    assert replay_differences(store) == []


@pytest.mark.integration
def test_milestones_pages_follow_the_log(store: EventStore, console: ConsoleServer, tmp_path: Path) -> None:
    from tests.test_milestones import _report, plan_command, write_plan

    assert console.get_json("/api/milestones") == {"milestones": []}
    handler = CommandHandler(store)
    command, loaded = plan_command(write_plan(tmp_path / "plan").parent)
    handler.handle(command)
    tickets = {t.ticket.id: t.ticket for t in loaded.tickets}
    handler.handle(submit(tickets["TICKET-1"], NOW))
    handler.handle(_report(c.RecordJobSucceeded, "TICKET-1", "a", metrics={"score": 0.9}, now=NOW))
    listing = console.get_json("/api/milestones")["milestones"]
    assert [(m["milestone"], m["state"], m["done"], m["total"]) for m in listing] == [
        ("M1", "in progress", 2, 3),
        ("M2", "planned", 0, 1),
    ]
    # The same views as `jbctl milestones --json`.
    cli = json.loads(subprocess.run([JBCTL, "milestones", "--json"], capture_output=True, text=True, check=True).stdout)
    assert [(m["milestone"], m["state"], m["open"]) for m in cli] == [
        (m["milestone"], m["state"], m["open"]) for m in listing
    ]
    one = console.get_json("/api/milestones/M1")
    assert one["checklist"][0].startswith("[x] first accepted") and one["checklist"][2].startswith("[ ] smoke output")
    code, body = console.request("GET", "/milestones")
    assert code == 200 and b'data-milestone="M1"' in body and b'href="/milestones"' in body
    code, body = console.request("GET", "/milestones/M1")
    assert code == 200 and b"first accepted" in body and b"TICKET-2: not submitted" in body
    code, body = console.request("GET", "/milestones/M1/report")
    assert code == 200 and b"<h1>Milestone M1: First</h1>" in body
    code, body = console.request("GET", "/milestones/M1/report?format=md")
    assert code == 200 and body.startswith(b"# Milestone M1: First")
    assert console.request("GET", "/milestones/M1/report?format=pdf")[0] == 400
    assert console.request("GET", "/milestones/M9")[0] == 404
    # New events are folded into the console's book on the next read: M1 is done.
    handler.handle(submit(tickets["TICKET-2"], NOW))
    handler.handle(_report(c.RecordJobSucceeded, "TICKET-2", "b", metrics={"loss": 1.0}, now=NOW))
    handler.handle(_report(c.RecordArtifact, "TICKET-2", "smoke", artifact="ab" * 32, kind="check-output", now=NOW))
    handler.handle(_report(c.RecordJobSucceeded, "TICKET-2", "smoke", now=NOW))
    m1 = console.get_json("/api/milestones/M1")
    assert (m1["state"], m1["done"], m1["open"]) == ("done", 3, [])


@pytest.mark.integration
@pytest.mark.postgres
def test_console_on_postgresql(home: Path, pg_url: str) -> None:  # noqa: F811  (the imported fixture)
    """The pages, writes and the live poller on PostgreSQL (skipped without a server, as tests/test_postgres.py)."""
    from schema.migrations import upgrade

    url = pg_url
    upgrade(url)
    store = EventStore(url)
    handler = CommandHandler(store)
    assert core_ticket(handler, "TICKET-1") == "P-1"
    handler.handle(submit(make_ticket("TICKET-2"), NOW))
    server = ConsoleServer(home, env={**APPROVERS, "JETBOX_DATABASE_URL": url})
    try:
        listing = server.get_json("/api/tickets")
        assert [t["ticket"] for t in listing["tickets"]] == ["TICKET-2", "TICKET-1"] and listing["paused"] is None
        assert server.get_json("/api/tickets?q=ticket-2")["total"] == 1
        assert len(server.get_json("/api/tickets/TICKET-1")["curves"]) == 2
        for path in ("/", "/tickets/TICKET-1", "/proposals/P-1", "/core", "/audit", "/milestones", "/playground"):
            assert server.request("GET", path)[0] == 200, path
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token_for(home, 'ada')}"}
        code, body = server.request("POST", "/api/tickets/TICKET-2/priority", b'{"priority": 4}', auth)
        assert code == 200, body
        code, body = server.request("POST", "/api/proposals/P-1/approve", b'{"note": "on pg"}', auth)
        assert code == 200 and b"core is now v1" in body, body
        assert server.get_json("/api/core")["version"] == 1
        assert next(iter(store.read(0, types=["CorePromoted"]))).data["actor"] == "ada"
        assert server.get_json("/api/tickets?q=ticket-2")["tickets"][0]["priority"] == 4
        deadline = time.monotonic() + 10
        while server.get_json("/healthz")["last_seq"] != store.head():  # the live poller reads PostgreSQL
            assert time.monotonic() < deadline, server.get_json("/healthz")
            time.sleep(0.05)
    finally:
        server.stop()
    assert replay_differences(store) == []
    store.close()


@pytest.mark.integration
def test_session_cookie_needs_its_csrf_token(store: EventStore, home: Path, console: ConsoleServer) -> None:
    import http.client

    core_ticket(CommandHandler(store), "TICKET-1", progress=False)
    token = token_for(home, "ada")
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=10)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    conn.request("POST", "/login", urllib.parse.urlencode({"token": "jbx_wrong", "next": "/"}), form)
    r = conn.getresponse()
    assert r.status == 403 and b"unknown token" in r.read()
    conn.request("POST", "/login", urllib.parse.urlencode({"token": token, "next": "//evil.example/"}), form)
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("location") == "/"  # no open redirect
    cookie = r.getheader("set-cookie", "").split(";")[0]
    assert cookie.startswith("jetbox_session=") and "httponly" in r.getheader("set-cookie", "").lower()
    conn.request("GET", "/api/session", headers={"Cookie": cookie})
    session = json.loads(conn.getresponse().read())
    assert session["user"] == "ada" and session["csrf"]
    head = store.head()
    conn.request("POST", "/proposals/P-1/approve", "note=x", {**form, "Cookie": cookie})
    r = conn.getresponse()
    assert r.status == 403 and b"Nothing was recorded" in r.read() and store.head() == head
    body = urllib.parse.urlencode({"note": "x", "csrf": "forged"})
    conn.request("POST", "/proposals/P-1/approve", body, {**form, "Cookie": cookie})
    r = conn.getresponse()
    r.read()
    assert r.status == 403 and store.head() == head
    body = urllib.parse.urlencode({"note": "with csrf", "csrf": session["csrf"]})
    conn.request("POST", "/proposals/P-1/approve", body, {**form, "Cookie": cookie})
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and "core+is+now+v1" in r.getheader("location", "")
    assert next(iter(store.read(0, types=["CorePromoted"]))).data["actor"] == "ada"


@pytest.mark.integration
def test_approver_rule_is_the_clis(store: EventStore, home: Path, console: ConsoleServer) -> None:
    handler = CommandHandler(store)
    extra = "update: core\nexpires: 1d\napprovers: [grace]\n"
    handler.handle(submit(make_ticket("TICKET-1", steps=STEPS, extra=extra), NOW))
    t = handler.state.tickets["TICKET-1"].tasks
    handler.handle(
        c.RecordJobSucceeded(
            now=NOW,
            ticket="TICKET-1",
            task="train",
            attempt=t["train"].attempt,
            outputs={"component": "reasoner", "checkpoint": "ckpt"},
        )
    )
    handler.handle(
        c.RecordJobSucceeded(
            now=NOW,
            ticket="TICKET-1",
            task="eval",
            attempt=t["eval"].attempt,
            metrics={"exact": 0.5},
            outputs={"core_metrics": {"exact": 0.25}},
        )
    )
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token_for(home, 'ada')}"}
    code, body = console.request("POST", "/api/proposals/P-1/approve", b"{}", auth)
    assert code == 409 and "ada is not an approver of P-1" in json.loads(body)["message"]
    refused = list(store.read(0, types=["ApprovalRefused"]))
    assert len(refused) == 1 and refused[0].meta["actor"]["user"] == "ada"
    auth["Authorization"] = f"Bearer {token_for(home, 'grace')}"
    code, body = console.request("POST", "/api/proposals/P-1/approve", b"{}", auth)
    assert code == 200, body


@pytest.mark.integration
def test_submit_errors_match_jbctl_validate(
    store: EventStore, home: Path, console: ConsoleServer, tmp_path: Path
) -> None:
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token_for(home, 'ada')}"}
    code, body = console.request("POST", "/api/submit", json.dumps({"yaml": BAD_TICKET}).encode(), auth)
    assert code == 422
    errors = json.loads(body)["errors"]
    (tmp_path / "TICKET-9.yaml").write_text(BAD_TICKET)
    proc = subprocess.run([JBCTL, "validate", "TICKET-9.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert [e["text"] for e in errors] == proc.stderr.strip().splitlines()
    assert errors[0]["line"] == 6
    good = BAD_TICKET.replace("kind: nope", "kind: diag")
    code, body = console.request("POST", "/api/submit", json.dumps({"yaml": good}).encode(), auth)
    assert code == 200 and json.loads(body)["ticket"] == "TICKET-9"
    assert (home / "tickets" / "TICKET-9.yaml").read_text() == good
    code, _ = console.request(
        "POST", "/api/submit", json.dumps({"yaml": good}).encode(), {"Content-Type": "application/json"}
    )
    assert code == 403


@pytest.mark.integration
def test_live_stream_fans_out_new_events(store: EventStore, console: ConsoleServer) -> None:
    import threading
    import urllib.request

    got: list[dict[str, object]] = []
    ready = threading.Event()

    def listen() -> None:
        with urllib.request.urlopen(console.url + "/events/stream?ticket=TICKET-1", timeout=10) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("event: hello"):
                    ready.set()
                if line.startswith("data:") and ready.is_set() and '"seq"' in line:
                    got.append(json.loads(line[5:]))
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-2"), NOW))  # another ticket: filtered out
    handler.handle(submit(make_ticket("TICKET-1"), NOW))
    thread.join(10)
    assert got and got[0]["ticket"] == "TICKET-1" and got[0]["type"] == "TicketSubmitted"


@pytest.mark.integration  # starts jbctl processes
def test_token_commands(home: Path) -> None:
    run = [JBCTL, "console"]
    made = subprocess.run([*run, "token", "ada"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    from console import auth

    assert token.startswith("jbx_") and auth.user_for_token(home, token) == "ada"
    listed = subprocess.run([*run, "tokens"], capture_output=True, text=True, timeout=60)
    assert "ada" in listed.stdout and token not in listed.stdout
    assert subprocess.run([*run, "revoke", "ada"], capture_output=True, timeout=60).returncode == 0
    assert auth.user_for_token(home, token) is None
    gone = subprocess.run([*run, "revoke", "ada"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no console token for 'ada'" in gone.stderr


def test_sudoku_check() -> None:
    from console.app import sudoku_solved

    puzzle = [[1, 0, 0, 4], [0, 0, 1, 0], [0, 1, 0, 0], [4, 0, 0, 1]]
    good = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    assert sudoku_solved(puzzle, good)
    assert not sudoku_solved(puzzle, [[1, 2, 3, 4], [3, 3, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])
    assert not sudoku_solved([[2, 0, 0, 0], *puzzle[1:]], good)  # a given changed


@pytest.mark.integration  # starts jbctl processes
def test_non_local_bind_needs_tokens(store: EventStore, home: Path) -> None:
    proc = subprocess.run(
        [JBCTL, "console", "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "refusing to serve on 0.0.0.0 without authentication" in proc.stderr


@pytest.mark.integration
def test_non_local_console_needs_login_to_read(store: EventStore, home: Path) -> None:
    token_for(home, "ada")
    # Bound to every address: reading needs a login too.
    server = ConsoleServer(home, "--host", "0.0.0.0")
    try:
        code, _ = server.request("GET", "/api/tickets")
        assert code == 401
        code, _ = server.request("GET", "/api/tickets", headers={"Authorization": f"Bearer {token_for(home, 'bo')}"})
        assert code == 200
        code, body = server.request("GET", "/playground/gradio/config")  # the Gradio playground too
        assert code == 401 and b"log in first" in body
    finally:
        server.stop()


def gradio_call(server: ConsoleServer, api: str, data: list[Any]) -> list[Any]:
    """Call a Gradio playground event as its page does (POST, then read the answer from its event stream)."""
    code, raw = server.request(
        "POST",
        f"/playground/gradio/gradio_api/call/{api}",
        json.dumps({"data": data}).encode(),
        {"Content-Type": "application/json"},
    )
    assert code == 200, raw
    event = json.loads(raw)["event_id"]
    with urllib.request.urlopen(f"{server.url}/playground/gradio/gradio_api/call/{api}/{event}", timeout=60) as r:
        stream = r.read().decode()
    assert "event: complete" in stream, stream
    return json.loads(stream.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])  # type: ignore[no-any-return]


@pytest.mark.integration
def test_gradio_playground_is_mounted(store: EventStore, console: ConsoleServer) -> None:
    """The Gradio app serves under /playground/gradio with its two tabs, and its calls are the playground's."""
    code, page = console.request("GET", "/playground/gradio/")
    assert code == 200 and b"gradio" in page
    config = console.get_json("/playground/gradio/config")
    assert config["title"] == "Jetbox playground"
    tabs = [c["props"]["label"] for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Sudoku", "Picture"] and config["analytics_enabled"] is False
    assert {d.get("api_name") for d in config["dependencies"]} >= {"solve", "look"}
    for path in ("/playground", "/playground/image"):  # the HTML playground links to it
        code, html = console.request("GET", path)
        assert code == 200 and b'href="/playground/gradio/" id="gradio-link"' in html
    # The Sudoku tab's call, as the page makes it: a bad puzzle is refused with where it is wrong, and with
    # no Redis it says so; the same messages as the HTML playground (both call console.playground).
    answer, who, _, _ = gradio_call(console, "solve", ["1 2\n3 x\n", "cpu", ""])
    assert "bad puzzle" in answer and "puzzle:2:2: &#x27;x&#x27; is not a digit" in answer and who == ""
    answer, *_ = gradio_call(console, "solve", ["1 0 0 4\n0 0 1 0\n0 1 0 0\n4 0 0 1", "cpu", ""])
    assert "could not run" in answer and "no Redis configured" in answer
    seen, *_ = gradio_call(console, "look", [None, None, None, "cpu", 5, ""])
    assert "no picture" in seen


# --- in a real browser -------------------------------------------------------------------------------

browser_needed = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium): browser tests skipped",
)


@pytest.fixture
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def shot(page: object, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)  # type: ignore[attr-defined]


def login(page: object, console: ConsoleServer, token: str, next_path: str) -> None:
    page.goto(f"{console.url}/login?next={next_path}")  # type: ignore[attr-defined]
    page.fill("#token", token)  # type: ignore[attr-defined]
    page.click("#login")  # type: ignore[attr-defined]
    page.wait_for_url(f"{console.url}{next_path}")  # type: ignore[attr-defined]


@pytest.mark.integration
@browser_needed
def test_browser_ticket_list_updates_by_itself(store: EventStore, console: ConsoleServer, browser: object) -> None:
    handler = CommandHandler(store)
    handler.handle(submit(make_ticket("TICKET-1"), NOW))
    core_ticket(handler, "TICKET-2")
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    page.goto(console.url + "/")
    row = page.locator('tr[data-ticket="TICKET-1"]')
    assert row.get_attribute("data-state") == "running"
    page.wait_for_selector("#live-dot.on")
    shot(page, "tickets-before")
    finish_diag(handler, "TICKET-1")
    page.wait_for_selector('tr[data-ticket="TICKET-1"][data-state="completed"]', timeout=5000)
    shot(page, "tickets")
    page.goto(console.url + "/tickets/TICKET-2")
    assert page.locator(".curve").count() == 2
    shot(page, "ticket")
    shot(page, "ticket-top", full_page=False)  # docs/img/console-ticket.png
    for name, path in (
        ("proposals", "/proposals"),
        ("core", "/core"),
        ("audit", "/audit"),
        ("workers", "/workers"),
        ("playground-empty", "/playground"),
        ("playground-image-empty", "/playground/image"),
        ("milestones-empty", "/milestones"),
        ("sql", "/sql?q=SELECT+id,+state,+title+FROM+tickets"),
    ):
        page.goto(console.url + path)
        shot(page, name)


@pytest.mark.integration
@browser_needed
def test_browser_approve_records_the_web_user(
    store: EventStore, home: Path, console: ConsoleServer, browser: object
) -> None:
    handler = CommandHandler(store)
    core_ticket(handler, "TICKET-1")
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    page.goto(console.url + "/proposals/P-1")
    assert "regression" in page.locator('tr[data-metric="eval.blank"]').inner_text()
    shot(page, "proposal-anonymous")
    # Without a session the page's own form is refused and nothing is recorded.
    head = store.head()
    page.fill("#approve-form textarea[name=note]", "no session")
    page.click("#approve")
    assert "Nothing was recorded" in page.locator("#refused").inner_text()
    assert store.head() == head
    login(page, console, token_for(home, "ada"), "/proposals/P-1")
    assert page.locator("#whoami").inner_text() == "ada"
    shot(page, "proposal")
    page.fill("#approve-form textarea[name=note]", "better on exact")
    page.click("#approve")
    page.wait_for_selector("#flash")
    assert "core is now v1" in page.locator("#flash").inner_text()
    assert page.locator("#decided-by").inner_text() == "ada"
    shot(page, "proposal-approved")
    promoted = list(store.read(0, types=["CorePromoted"]))
    assert len(promoted) == 1 and promoted[0].data["actor"] == "ada" and promoted[0].data["note"] == "better on exact"
    assert promoted[0].meta["actor"]["user"] == "ada"


@pytest.mark.integration
@browser_needed
def test_browser_hold_priority_pause_and_milestones(
    store: EventStore, home: Path, console: ConsoleServer, browser: object, tmp_path: Path
) -> None:
    """Steering from the page (the web user recorded as actor), and the milestones pages."""
    from tests.test_milestones import _report, plan_command, write_plan

    handler = CommandHandler(store)
    command, loaded = plan_command(write_plan(tmp_path / "plan").parent)
    handler.handle(command)
    tickets = {t.ticket.id: t.ticket for t in loaded.tickets}
    handler.handle(submit(tickets["TICKET-1"], NOW))
    handler.handle(_report(c.RecordJobSucceeded, "TICKET-1", "a", metrics={"score": 0.9}, now=NOW))
    handler.handle(submit(tickets["TICKET-2"], NOW))
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    login(page, console, token_for(home, "ada"), "/tickets/TICKET-2")
    page.fill("#hold-form input[name=reason]", "waiting for the new GPU")
    page.click("#hold")
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text().startswith("held TICKET-2")
    assert "waiting for the new GPU" in page.locator("#held").inner_text()
    page.fill("#priority-form input[name=priority]", "5")
    page.click("#set-priority")
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text() == "TICKET-2: priority 5"
    shot(page, "ticket-steer", full_page=False)
    page.goto(console.url + "/")
    row = page.locator('tr[data-ticket="TICKET-2"]')
    assert "held" in row.inner_text() and "5" in row.locator("td.num").first.inner_text()
    page.fill("#pause-form input[name=reason]", "disk swap")
    page.click("#pause")
    page.wait_for_selector("#paused-banner")
    assert "disk swap" in page.locator("#paused-banner").inner_text()
    shot(page, "tickets-paused")
    page.click("#resume")
    page.wait_for_selector("#pause-form")
    page.goto(console.url + "/tickets/TICKET-2")
    page.click("#release")
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text().startswith("released TICKET-2")
    kinds = ["TicketHeld", "PriorityChanged", "InstallationPaused", "InstallationResumed", "TicketReleased"]
    recorded = list(store.read(0, types=kinds))
    assert [r.type for r in recorded] == kinds
    assert all(r.meta["actor"]["user"] == "ada" for r in recorded)
    page.click("header nav a[href='/milestones']")
    page.wait_for_selector("#milestones")
    assert page.locator('tr[data-milestone="M1"]').get_attribute("data-state") == "in progress"
    shot(page, "milestones")
    page.click('a[href="/milestones/M1"]')
    page.wait_for_selector("#deliverables")
    assert page.locator('#deliverables tr[data-ok="1"]').count() == 2
    shot(page, "milestone")


@pytest.mark.integration
@browser_needed
def test_browser_bad_ticket_shows_errors_at_their_line(
    store: EventStore, home: Path, console: ConsoleServer, browser: object
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    login(page, console, token_for(home, "ada"), "/submit")
    page.fill("#yaml", BAD_TICKET)
    page.click("#submit")
    page.wait_for_selector("#errors")
    marked = page.locator(".listing .ln.err")
    assert marked.count() == 1 and marked.get_attribute("data-line") == "6"
    assert "kind: nope" in marked.inner_text()
    assert "TICKET-9.yaml:6:" in page.locator("#errors").inner_text()
    shot(page, "submit-errors")
    assert not (home / "tickets" / "TICKET-9.yaml").exists()


@pytest.mark.integration
@pytest.mark.slow
@browser_needed
def test_browser_train_approve_then_play(running: Any, browser: object) -> None:
    """The whole way through the console: a tiny reasoner is trained and proposed by real workers,
    approved in the page by a web user, then the playground solves a sudoku with it on a worker."""
    from tests.test_gate_e2e import PUZZLE
    from tests.test_gate_e2e import core_ticket as trm_ticket

    steps, extra = trm_ticket("TICKET-1", "ada")
    running.drop("TICKET-1", steps, extra)
    server = ConsoleServer(running.home, env={**running.env, **APPROVERS})
    try:
        workers = server.get_json("/api/workers")  # read from the real Redis, as rq-dashboard does
        assert workers["error"] is None and any("cpu" in w["queues"] for w in workers["workers"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
        page.goto(server.url + "/playground")
        assert "no reasoner yet" in page.inner_text("main")
        running.daemon.wait_event("ProposalOpened", ticket="TICKET-1", timeout=300)
        login(page, server, token_for(running.home, "ada"), "/proposals/P-1")
        shot(page, "proposal-trained")
        page.click("#approve")
        page.wait_for_selector("#flash")
        assert "core is now v1" in page.locator("#flash").inner_text()
        page.goto(server.url + "/playground")
        page.fill("#puzzle", PUZZLE)
        page.select_option("select[name=queue]", "cpu")
        page.click("#solve")
        page.wait_for_selector("#answer", timeout=120_000)
        cells = page.locator("#answer td")
        assert cells.count() == 16
        assert cells.nth(0).inner_text() == "1" and cells.nth(3).inner_text() == "4"  # givens are kept
        assert "core v1 reasoner" in page.locator("#answer").inner_text()
        assert page.locator("#verdict").inner_text() in ("a valid solution", "not a valid solution")
        shot(page, "playground", full_page=False)
        # The same through the Gradio playground's Sudoku tab; the page never leaves the console's origin.
        outside: list[str] = []
        page.on(
            "request",
            lambda r: (
                outside.append(r.url)
                if r.url.split(":")[0] in ("http", "https") and not r.url.startswith(server.url)
                else None
            ),
        )
        page.goto(server.url + "/playground/gradio/")
        page.locator("#gr-puzzle textarea").fill(PUZZLE)
        page.locator("#gr-queue").get_by_label("cpu").check()
        page.click("#gr-solve")
        page.wait_for_selector("#gr-answer", timeout=120_000)
        cells = page.locator("#gr-answer td")
        assert cells.count() == 16 and cells.nth(0).inner_text() == "1" and cells.nth(3).inner_text() == "4"
        who = page.locator("#gr-produced-by").inner_text()
        assert "core v1 reasoner" in who and "adapter: none" in who, who
        assert page.locator("#gr-verdict").inner_text() in ("a valid solution", "not a valid solution")
        assert "segment(s) before it halted" in page.locator("#gr-steps").inner_text()
        assert "Core v1" in page.locator("#gr-core").inner_text()
        shot(page, "playground-gradio", full_page=False)
        assert outside == [], outside
    finally:
        server.stop()
