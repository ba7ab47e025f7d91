"""Small builders shared by tests."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

from schema.ticket import Ticket, parse_ticket


def property_examples(full: int) -> int:
    """Hypothesis examples for a property test: `full` in `make test`, a fifth (at least 20) in
    `make test-fast`, whose conftest hook sets JETBOX_TEST_LANE=fast before the modules are imported."""
    return max(20, full // 5) if os.environ.get("JETBOX_TEST_LANE") == "fast" else full


def ticket_yaml(tid: str = "TICKET-1", steps: str | None = None, extra: str = "") -> str:
    steps = steps or "  - {id: a, kind: diag}\n  - {id: b, kind: diag, needs: [a]}\n"
    return f"id: {tid}\ntitle: test ticket\ngoal: test the pipeline\nsteps:\n{steps}{extra}"


def make_ticket(tid: str = "TICKET-1", steps: str | None = None, extra: str = "") -> Ticket:
    return parse_ticket(ticket_yaml(tid, steps, extra).encode(), f"{tid}.yaml")


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def submit(ticket: Ticket, now: Any, path: str | None = None) -> Any:
    from daemon.commands import SubmitTicket

    text = ticket.model_dump_json()
    return SubmitTicket(now=now, path=path or f"/t/{ticket.id}.yaml", content_hash=content_hash(text), ticket=ticket)


def accepted(srv: socket.socket) -> bool:
    """Whether a connection reached this listening socket (it waits the socket's timeout)."""
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        return False
    conn.close()
    return True
