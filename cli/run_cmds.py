"""jbctl worker | up: run workers, or the whole embedded installation on one machine."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cli.common import settings_from
from cli.main import CliError

JBCTL = str(Path(sys.executable).parent / "jbctl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run an RQ worker for Jetbox jobs")
    p.add_argument("--queue", "-q", action="append", choices=["gpu", "cpu"], help="queue to work (repeatable)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default: host and pid)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("up", help="private Redis + daemon + one worker per queue on this machine")
    p.add_argument("--tickets", type=Path, help="folder to watch (default: JETBOX_TICKETS_DIR or HOME/tickets)")
    p.add_argument("--exit-when-idle", action="store_true", help="stop once every ticket in the folder has ended")
    p.add_argument("--quiet", action="store_true", help="no live status lines")
    p.set_defaults(func=cmd_up)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not settings.redis_url:
        raise CliError("no Redis configured: set JETBOX_REDIS_URL (or run everything with `jbctl up`)")
    from schema.wire import SecretError, load_secret

    try:
        load_secret(settings.secret_path, create=True)
    except SecretError as exc:
        raise CliError(str(exc)) from None
    from workers.worker import run_worker

    return run_worker(settings.redis_url, args.queue or ["gpu", "cpu"], burst=args.burst, name=args.name)


class _Children:
    """Child processes started by `jbctl up`, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        out = log.open("ab")
        self.procs[name] = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _overview(store: Any, folder: Path) -> tuple[dict[str, int], bool]:
    """Ticket counts by state, and whether every ticket file in the folder has been seen and has ended."""
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        counts = dict(conn.execute(sa.text("SELECT state, count(*) FROM tickets GROUP BY state")).all())
    seen = {
        r.data.get("path") for r in store.read(0, types=["TicketSubmitted", "TicketRejected", "TicketRevisionRefused"])
    }
    files = {str(p) for p in folder.glob("*.y*ml") if not p.name.startswith(".")}
    idle = files <= seen and counts.get("running", 0) == 0
    return counts, idle


def cmd_up(args: argparse.Namespace) -> int:
    from cli.embedded import start_redis
    from schema import migrations
    from schema.store import EventStore
    from schema.wire import load_secret

    settings = settings_from(args)
    home = settings.home
    tickets = (args.tickets or settings.tickets_path).absolute()
    tickets.mkdir(parents=True, exist_ok=True)
    logs = settings.logs_path
    logs.mkdir(parents=True, exist_ok=True)
    load_secret(settings.secret_path, create=True)
    migrations.upgrade(settings.db_url)
    env = {**os.environ, "JETBOX_HOME": str(home), "JETBOX_TICKETS_DIR": str(tickets)}
    redis_server = None
    if not settings.redis_url:
        redis_server = start_redis(home / "run")
        env["JETBOX_REDIS_URL"] = redis_server.url
        print(f"jetbox: private Redis at {redis_server.url} (pid {redis_server.proc.pid})", flush=True)
    children = _Children()
    stopping = False

    def _stop(_signo: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        children.start("daemon", [JBCTL, "daemon"], env, logs / "daemon.log")
        for q in ("cpu", "gpu"):
            children.start(f"worker-{q}", [JBCTL, "worker", "--queue", q], env, logs / f"worker-{q}.log")
        print(f"jetbox: watching {tickets}; logs in {logs}; Ctrl-C stops everything", flush=True)
        store = EventStore(settings.db_url)
        last_line, idle_since = "", None
        while not stopping:
            time.sleep(0.5)
            dead = children.dead()
            if dead:
                name, rc = dead[0]
                print(f"jetbox: {name} exited with status {rc}; see {logs / (name + '.log')}", file=sys.stderr)
                code = 1
                break
            counts, idle = _overview(store, tickets)
            line = "tickets: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "no tickets"
            if line != last_line and not args.quiet:
                print(f"jetbox: {line}", flush=True)
                last_line = line
            if args.exit_when_idle:
                idle_since = (idle_since or time.monotonic()) if idle else None
                if idle_since is not None and time.monotonic() - idle_since > 1.5:
                    print("jetbox: every ticket has ended; stopping", flush=True)
                    break
        store.close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        children.stop()
        if redis_server is not None:
            redis_server.stop()
    return code
