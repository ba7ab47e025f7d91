#!/usr/bin/env python
"""Web console benchmark: page times at scale, event-to-browser latency, against `jbctl status --json`.

    .venv/bin/python bench/console.py                      # 1,000 and 100,000 tickets (the figures in docs)
    .venv/bin/python bench/console.py --tickets 1000       # one size
    .venv/bin/python bench/console.py --quick              # a smoke run (seconds)

For each size: a fresh home whose tickets are recorded through the real append path (the command
handler's group commit, 500 tickets a transaction, each batch decided on a fresh state; a tenth of
them completed, the rest running), then a real `jbctl console`
process. Timed over keep-alive HTTP: the ticket list (first page, and a page in the middle with
OFFSET), a state filter, a search, one ticket's page, and the JSON twin of the list; p50 and p99 of
`--requests` each. In the same run on the same home: `jbctl status --json` as a user runs it (a new
process each time) and its `status_data` in-process. Then the live path: an event is appended and
the time until an SSE client (and, when Debian's chromium is installed, a real page's EventSource)
receives it is measured, p50 and p99; the clock starts before the append, so these are upper bounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import commands as c  # noqa: E402
from daemon.handler import CommandHandler  # noqa: E402
from daemon.state import State  # noqa: E402
from schema.migrations import upgrade  # noqa: E402
from schema.store import EventStore  # noqa: E402
from tests.conftest import JBCTL  # noqa: E402
from tests.console_server import ConsoleServer  # noqa: E402
from tests.helpers import make_ticket, submit  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def fill(home: Path, n: int, batch: int = 500, done_every: int = 10) -> tuple[EventStore, float]:
    """`n` tickets through the command handler (one transaction per `batch`): every `done_every`-th
    completed (a tenth by default), the rest running."""
    url = f"sqlite:///{home / 'jetbox.db'}"
    upgrade(url)
    store = EventStore(url, "NORMAL")
    handler = CommandHandler(store)
    template = make_ticket("TICKET-1")
    started = time.perf_counter()
    for lo in range(1, n + 1, batch):
        # Tickets are independent: each batch is decided on a fresh state (what the log holds is the
        # same), because `handle_many` copies the whole state per call and would make the fill quadratic.
        handler.state = State()
        handler.state.last_seq = store.head()
        cmds: list[Any] = []
        for i in range(lo, min(n + 1, lo + batch)):
            ticket = template.model_copy(update={"id": f"TICKET-{i}", "title": f"bench ticket {i}"})
            cmds.append(submit(ticket, T0 + timedelta(seconds=i)))
        handler.handle_many(cmds)
        done = []
        for i in range(lo, min(n + 1, lo + batch)):
            if i % done_every == 0:
                tid = f"TICKET-{i}"
                done.append(c.RecordJobSucceeded(now=T0, ticket=tid, task="a", attempt=1))
        handler.handle_many(done)
        handler.handle_many(
            [c.RecordJobSucceeded(now=T0, ticket=d.ticket, task="b", attempt=1) for d in done]  # type: ignore[attr-defined]
        )
    return store, time.perf_counter() - started


def timed_gets(port: int, path: str, requests: int, accept: str = "text/html") -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for _ in range(requests + 2):
        t = time.perf_counter()
        conn.request("GET", path, headers={"Accept": accept})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
        out.append((time.perf_counter() - t) * 1000)
    conn.close()
    return out[2:]  # the first two warm the connection and caches


def sse_latency(store: EventStore, port: int, samples: int) -> list[float]:
    """ms from before an append until an SSE client has the event."""
    received: dict[int, float] = {}
    ready = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/events/stream", headers={"Accept": "text/event-stream"})
        r = conn.getresponse()
        while not stop.is_set():
            line = r.fp.readline().decode()
            if line.startswith("event: hello"):
                ready.set()
            if line.startswith("data:") and '"seq"' in line:
                received[json.loads(line[5:])["seq"]] = time.perf_counter()
        conn.close()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    handler = CommandHandler(store)
    out = []
    for i in range(samples):
        t = time.perf_counter()
        recs = handler.handle(submit(make_ticket(f"TICKET-LIVE{i}"), datetime.now(UTC)))
        seq = recs[0].seq
        while seq not in received and time.perf_counter() - t < 5:
            time.sleep(0.001)
        out.append((received.get(seq, float("inf")) - t) * 1000)
        time.sleep(0.05 + (i % 7) * 0.02)  # land at different points of the poll interval
    stop.set()
    return out


def browser_latency(store: EventStore, url: str, samples: int) -> list[float] | None:
    """ms from before an append until the page's EventSource handler ran (Date.now on both sides)."""
    if not Path("/usr/bin/chromium").exists():
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    handler = CommandHandler(store)
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page()
        page.goto(url + "/core")  # a light page that still listens
        page.wait_for_selector("#live-dot.on")
        for i in range(samples):
            t = time.time()
            seq = handler.handle(submit(make_ticket(f"TICKET-WEB{i}"), datetime.now(UTC)))[0].seq
            page.wait_for_function(f"window.jetboxLastEvent && window.jetboxLastEvent.seq >= {seq}", timeout=5000)
            seen = page.evaluate("window.jetboxLastEventWall")
            out.append(seen - t * 1000)
            time.sleep(0.05 + (i % 7) * 0.02)
        browser.close()
    return out


def status_cli(home: Path, runs: int, limit_s: float) -> tuple[list[float], list[float]]:
    """`jbctl status --json` in new processes, then its `status_data` in-process; a run past `limit_s`
    is stopped and counted as infinite (status reads every ticket's tasks for every ticket)."""
    from cli.tickets import status_data

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}, "JETBOX_HOME": str(home)}
    proc_ms: list[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        try:
            subprocess.run([JBCTL, "status", "--json"], env=env, check=True, capture_output=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return [float("inf")], []  # in-process would take as long: not run
        proc_ms.append((time.perf_counter() - t) * 1000)
    store = EventStore(f"sqlite:///{home / 'jetbox.db'}")
    inproc = []
    for _ in range(runs):
        t = time.perf_counter()
        status_data(store.engine, None, True, home)
        inproc.append((time.perf_counter() - t) * 1000)
    store.close()
    return proc_ms, inproc


def line(label: str, values: list[float]) -> None:
    if values and values[0] == float("inf"):
        print(f"  {label:<44} did not finish within --status-limit (stopped)")
        return
    print(f"  {label:<44} p50 {pct(values, 50):9.1f} ms   p99 {pct(values, 99):9.1f} ms   (n={len(values)})")


def run(n: int, requests: int, live: int, status_runs: int, status_limit: float) -> None:
    with tempfile.TemporaryDirectory(prefix="jetbox-bench-console-") as tmp:
        home = Path(tmp)
        store, fill_s = fill(home, n)
        print(f"\n{n:,} tickets ({store.head():,} events) recorded in {fill_s:.1f} s through the append path")
        server = ConsoleServer(home)
        try:
            mid = n // 2
            line("ticket list, first page (/)", timed_gets(server.port, "/", requests))
            line(f"ticket list, page at offset {mid:,}", timed_gets(server.port, f"/?offset={mid}", requests))
            line("ticket list, state=completed", timed_gets(server.port, "/?state=completed", requests))
            line("ticket list, search 'ticket 4242'", timed_gets(server.port, "/?q=ticket+4242", requests))
            line(
                "ticket list JSON (/api/tickets)", timed_gets(server.port, "/api/tickets", requests, "application/json")
            )
            line(f"ticket page (/tickets/TICKET-{mid})", timed_gets(server.port, f"/tickets/TICKET-{mid}", requests))
            if status_runs:
                proc_ms, inproc = status_cli(home, status_runs, status_limit)
                line("jbctl status --json (new process)", proc_ms)
                if inproc:
                    line("status_data() in-process (what it runs)", inproc)
            line("event -> SSE client", sse_latency(store, server.port, live))
            web = browser_latency(store, server.url, live)
            if web is None:
                print("  event -> browser page: skipped (no /usr/bin/chromium or playwright)")
            else:
                line("event -> browser page (EventSource handler)", web)
        finally:
            server.stop()
            store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", type=int, action="append", help="sizes (default 1000, 10000 and 100000)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--live", type=int, default=30, help="events timed for the live path")
    parser.add_argument("--status-runs", type=int, default=5, help="0: leave `jbctl status` out")
    parser.add_argument(
        "--status-limit", type=float, default=300, help="seconds before a `jbctl status` run is stopped"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = args.tickets or ([200] if args.quick else [1000, 10_000, 100_000])
    if args.quick:
        args.requests, args.live, args.status_runs = 5, 5, 2
    print(f"console benchmark: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for n in sizes:
        run(n, args.requests, args.live, args.status_runs, args.status_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
