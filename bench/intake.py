"""Intake latency: an atomic rename into the tickets folder -> its TicketSubmitted committed.

Runs the real service loop (`daemon.service.Daemon`) in this process on a scratch home, times
each drop from just before `os.rename` to the moment `handle_many` returned (the transaction is
committed, durably with the default synchronous=FULL), and, in the same run, the raw watchdog latency
(rename -> a second observer's `moved` callback). Then a burst: N files dropped at once, time until
all are committed.

    .venv/bin/python bench/intake.py [--drops 300] [--burst 500] [--synchronous FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.commands import Command
from daemon.notify import Notifier
from daemon.service import Daemon
from schema.settings import load_settings

TICKET = "id: {tid}\ntitle: bench\ngoal: measure intake\nsteps:\n  - {{id: a, kind: diag, with: {{}}}}\n"


class TimedDaemon(Daemon):
    """The real daemon, noting when each ticket's submission was committed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed: dict[str, float] = {}
        self.cond = threading.Condition()

    def _commit(self, commands: Sequence[Command]) -> list[Any] | None:
        recorded = super()._commit(commands)
        done = time.perf_counter()
        with self.cond:
            for rec in recorded or []:
                if rec.type == "TicketSubmitted":
                    self.committed[rec.data["ticket"]] = done
            self.cond.notify_all()
        return recorded


def percentiles(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": ms[-1], "n": len(ms)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=300)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between timed drops")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL", help="SQLite durability")
    args = parser.parse_args()

    from watchdog.events import FileMovedEvent, FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    scratch = Path(tempfile.mkdtemp(prefix="jetbox-bench-intake-"))
    settings = load_settings(
        home=scratch, tickets_dir=scratch / "tickets", rescan_seconds=3600, sqlite_synchronous=args.synchronous
    )
    daemon = TimedDaemon(settings, [], notifier=Notifier({}), install_signals=False)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    if not daemon.ready.wait(60):
        print("daemon did not start", file=sys.stderr)
        return 1
    folder = settings.tickets_path

    raw: dict[str, float] = {}

    class Raw(FileSystemEventHandler):
        def on_moved(self, event: FileSystemEvent) -> None:
            raw[os.path.basename(os.fsdecode(event.dest_path))] = time.perf_counter()

    observer = Observer()
    observer.schedule(Raw(), str(folder), recursive=False, event_filter=[FileMovedEvent])
    observer.start()
    time.sleep(0.2)

    def drop(n: int) -> tuple[str, float]:
        tid = f"TICKET-{n}"
        tmp = folder / f".tmp-{n}"
        tmp.write_text(TICKET.format(tid=tid))
        start = time.perf_counter()
        os.rename(tmp, folder / f"{tid}.yaml")
        return tid, start

    # Timed drops, one at a time.
    intake_lat: list[float] = []
    raw_lat: list[float] = []
    for n in range(1, args.drops + 1):
        tid, start = drop(n)
        with daemon.cond:
            if not daemon.cond.wait_for(lambda tid=tid: tid in daemon.committed, timeout=10):  # type: ignore[misc]
                print(f"{tid} was not committed within 10 s", file=sys.stderr)
                return 1
        intake_lat.append(daemon.committed[tid] - start)
        deadline = time.monotonic() + 1
        while f"{tid}.yaml" not in raw and time.monotonic() < deadline:
            time.sleep(0.001)
        if f"{tid}.yaml" in raw:
            raw_lat.append(raw[f"{tid}.yaml"] - start)
        time.sleep(args.gap)

    # A burst: everything at once, then wait for the last commit.
    first = args.drops + 1
    begin = time.perf_counter()
    tids = [drop(n)[0] for n in range(first, first + args.burst)]
    with daemon.cond:
        ok = daemon.cond.wait_for(lambda: all(t in daemon.committed for t in tids), timeout=120)
    burst_s = (max(daemon.committed[t] for t in tids) if ok else time.perf_counter()) - begin

    observer.stop()
    daemon.stop()
    thread.join(10)

    i, r = percentiles(intake_lat), percentiles(raw_lat)
    print(f"# intake latency, {os.cpu_count()} CPUs, sqlite synchronous={settings.sqlite_synchronous}")
    print(f"{'':34}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'n':>6}")
    for name, p in (("rename -> watchdog event (raw)", r), ("rename -> TicketSubmitted committed", i)):
        print(f"{name:34}" + "".join(f"{p[k]:>7.2f}ms" for k in ("p50", "p90", "p99", "max")) + f"{p['n']:>6.0f}")
    rate = args.burst / burst_s if ok else float("nan")
    late = "" if ok else " (TIMED OUT)"
    print(f"burst of {args.burst} drops: all committed in {burst_s:.2f} s ({rate:.0f} tickets/s){late}")
    goal = i["p50"] < 20 and i["p99"] < 100
    print(f"goal p50 < 20 ms and p99 < 100 ms: {'met' if goal else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
