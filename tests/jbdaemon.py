"""Helpers for tests that run a real `jbctl daemon` process on a temporary home."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

JBCTL = str(Path(sys.executable).parent / "jbctl")


def valid_ticket(tid: str, title: str = "t") -> str:
    """A small valid ticket: one `diag` step."""
    return f"id: {tid}\ntitle: {title}\ngoal: g\nsteps:\n  - {{id: a, kind: diag, with: {{}}}}\n"


def invalid_ticket(tid: str) -> str:
    """A ticket with an unknown key on line 5."""
    return f"id: {tid}\ntitle: t\ngoal: g\nsteps:\n  - {{id: a, kind: diag, with: {{}}, bogus: 1}}\n"


def atomic_write(path: Path, text: str, tmp_name: str | None = None) -> None:
    """What editors and `jbctl submit` do: write a temp file in the folder, then rename over."""
    tmp = path.parent / (tmp_name or f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def event_rows(home: Path) -> list[dict[str, Any]]:
    """Every event of a home's SQLite log, read-only ([] while there is no log yet)."""
    db = home / "jetbox.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        found = conn.execute("SELECT seq, type, data FROM events ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    return [{"seq": s, "type": t, "data": json.loads(d)} for s, t, d in found]


class Daemon:
    """A `jbctl daemon` subprocess on `home`, with its own notify socket to learn when it is ready."""

    def __init__(self, home: Path, rescan: float | None = 1.0, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.tickets = home / "tickets"
        self.log = home / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JETBOX_", "NOTIFY_", "WATCHDOG_"))}
        self.env.update(JETBOX_HOME=str(home), NO_COLOR="1")
        if rescan is not None:
            self.env["JETBOX_RESCAN_SECONDS"] = str(rescan)
        self.env.update(env or {})
        self.messages: list[str] = []
        self.sock: socket.socket | None = None
        self.inbox: queue.Queue[tuple[float, str]] = queue.Queue()

    # --- process -------------------------------------------------------------------------------

    def start(self, wait: bool = True, extra_args: list[str] | None = None) -> Daemon:
        self.home.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"jetbox-test-{uuid.uuid4().hex}"
        self.sock.bind("\0" + name)  # an abstract socket, as systemd may hand out
        self.inbox = queue.Queue()
        threading.Thread(target=self._reader, args=(self.sock, self.inbox), daemon=True).start()
        env = dict(self.env, NOTIFY_SOCKET="@" + name)
        with self.log.open("ab") as log:
            # Without a Redis the daemon refuses to start unless told it is only recording.
            quiet = [] if "JETBOX_REDIS_URL" in env else ["--no-dispatch"]
            argv = [JBCTL, "daemon", *quiet, *(extra_args or [])]
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        if wait:
            self.wait_message("READY=1")
        return self

    def _reader(self, sock: socket.socket, inbox: queue.Queue[tuple[float, str]]) -> None:
        """Read every datagram as it arrives, as systemd does (an unread socket fills up)."""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:  # the socket was shut down
                return
            inbox.put((time.monotonic(), data.decode()))

    def recv(self, timeout: float) -> str | None:
        try:
            _, data = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        self.messages.append(data)
        return data

    def wait_message(self, key: str, timeout: float = 20.0) -> str:
        """The first notify datagram (not yet consumed) with a line starting with `key`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            msg = self.recv(min(0.5, max(0.01, deadline - time.monotonic())))
            if msg and any(line.startswith(key) for line in msg.splitlines()):
                return msg
            if msg is None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log_text()}")
        raise AssertionError(f"no {key} from the daemon within {timeout}s: {self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # stacks into the log, to see where it hangs
            time.sleep(0.5)
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError(f"daemon ignored signal {sig}: {self.log_text()}") from None
        if self.sock is not None:
            time.sleep(0.05)  # let the reader take the last datagrams (STOPPING=1)
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
            while self.recv(0.01) is not None:  # keep every datagram in `messages`
                pass
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # --- the log -------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """Every event, read straight from SQLite (fast, for polling; assert with `jbctl_events`)."""
        return event_rows(self.home)

    def wait_event(self, type_: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        """The first event of `type_` whose data has every `match` item."""

        def find() -> dict[str, Any] | None:
            for row in self.rows():
                if row["type"] == type_ and all(row["data"].get(k) == v for k, v in match.items()):
                    return row
            return None

        return wait_for(f"{type_} {match}", find, timeout)  # type: ignore[no-any-return]

    def jbctl_events(self, *args: str) -> list[dict[str, Any]]:
        """`jbctl events --json`: the user-facing view of the log."""
        out = subprocess.run(
            [JBCTL, "events", "--json", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def barrier(self, tid: str) -> None:
        """Drop a marker ticket and wait for it: every earlier file change has been handled by then."""
        path = self.tickets / f"{tid}.yaml"
        atomic_write(path, valid_ticket(tid))
        self.wait_event("TicketSubmitted", ticket=tid, path=str(path))
