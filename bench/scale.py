#!/usr/bin/env python
"""Costs against history: `jbctl status`, the daemon's start-up and per-ticket throughput with
1,000 / 10,000 / 100,000 tickets already in the log.

    .venv/bin/python bench/scale.py                       # 1,000 and 10,000 tickets
    .venv/bin/python bench/scale.py --big                 # and 100,000 (the fill alone takes minutes)
    .venv/bin/python bench/scale.py --tickets 2000        # one size
    .venv/bin/python bench/scale.py --quick               # a smoke run (seconds)
    .venv/bin/python bench/scale.py --profile             # and a cProfile of the live tickets, per size
    .venv/bin/python bench/scale.py --big --keep DIR      # keep the filled homes in DIR, reuse them next time

For each size, a fresh home is filled through the store's own append path (`bench/console.py`'s
`fill()`: the command handler's group commit, 500 tickets a transaction, every one completed: a
year's history is ended work), and 100 tickets submitted now wait for a worker. Then, each as a new
process the way a user runs it: `jbctl status` (the default view), `status --json`, `status
TICKET-n` and `status --all --json` (its peak RSS shows whether the output is streamed); and the
same work in-process, without Python's start-up. Then `jbctl daemon --no-dispatch` is started on
the home: the time until READY=1 and its RSS then. Last, live tickets on top, in-process through a
`CommandHandler` that holds the whole state (as the daemon does): each ticket submitted, its two
steps reported succeeded, each command its own transaction; tickets per second.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.console import fill, pct  # noqa: E402
from daemon import commands as c  # noqa: E402
from daemon.handler import CommandHandler  # noqa: E402
from daemon.state import State  # noqa: E402
from schema.migrations import upgrade  # noqa: E402
from schema.store import EventStore  # noqa: E402
from tests.conftest import JBCTL  # noqa: E402
from tests.helpers import make_ticket, submit  # noqa: E402
from tests.jbdaemon import Daemon  # noqa: E402

# History is ended work: every filled ticket completed; the live tickets come on top.
DONE_EVERY = 1


RUNNING = 100  # tickets running when `status` is timed (its default view shows the newest 50)


def running(store: EventStore, n: int) -> None:
    """`RUNNING` tickets submitted now, each waiting for a worker (decided on a fresh state: they
    are new tickets, independent of the history)."""
    handler = CommandHandler(store, State(last_seq=store.head()))
    template = make_ticket("TICKET-1")
    now = datetime.now(UTC)
    ids = range(n + 100_001, n + 100_001 + RUNNING)
    handler.handle_many([submit(template.model_copy(update={"id": f"TICKET-{i}"}), now) for i in ids])


def timed_process(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, peak RSS MB) of one command, its output read and thrown away."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    while proc.stdout.read(1 << 16):
        pass
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}")
    return (time.perf_counter() - started) * 1000, usage.ru_maxrss / 1024


def status_figures(home: Path, n: int, runs: int) -> dict[str, Any]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}, "JETBOX_HOME": str(home)}
    out: dict[str, Any] = {}
    for label, args in (
        ("status", ["status"]),
        ("status --json", ["status", "--json"]),
        ("status TICKET", ["status", f"TICKET-{max(1, n // 2)}"]),
    ):
        figures = [timed_process([JBCTL, *args], env) for _ in range(runs)]
        out[label] = pct([f[0] for f in figures], 50)
        out[label + " rss"] = max(f[1] for f in figures)
    out["jbctl --help"] = pct([timed_process([JBCTL, "--help"], env)[0] for _ in range(runs)], 50)
    out.update(status_in_process(home, n, runs))
    out["status --all --json"], out["status --all --json rss"] = timed_process(
        [JBCTL, "status", "--all", "--json"], env
    )
    return out


def status_in_process(home: Path, n: int, runs: int) -> dict[str, Any]:
    """What `jbctl status` and `status TICKET` run, without Python's start-up and imports (ms, p50)."""
    from cli.tickets import DEFAULT_LIMIT, StatusView
    from schema import readmodel as rm
    from schema.store import open_readonly

    engine = open_readonly(f"sqlite:///{home / 'jetbox.db'}")
    view_ms, one_ms = [], []
    for _ in range(runs):
        now = datetime.now(UTC).replace(tzinfo=None)
        started = time.perf_counter()
        with engine.connect() as conn:
            view = StatusView(conn, now, everything=False, since=None, limit=DEFAULT_LIMIT)
            rows = list(view.rows(home))
            view.rest(), rm.awaited_proposals(conn), rm.work_waiting(conn)
        view_ms.append((time.perf_counter() - started) * 1000)
        assert len(rows) == DEFAULT_LIMIT
        started = time.perf_counter()
        with engine.connect() as conn:
            assert rm.ticket_status(conn, f"TICKET-{max(1, n // 2)}", now) is not None
        one_ms.append((time.perf_counter() - started) * 1000)
    engine.dispose()
    return {"status in-process": pct(view_ms, 50), "status TICKET in-process": pct(one_ms, 50)}


def daemon_figures(home: Path) -> dict[str, Any]:
    """A start with no snapshot (the whole log replayed), a stop (which writes one), a start from it."""
    for old in home.glob("state.snapshot*"):
        old.unlink()
    daemon, ready_ms, rss, cpu_ms = _started(home)
    stopping = time.perf_counter()
    daemon.stop(timeout=600)
    stop_ms = (time.perf_counter() - stopping) * 1000
    again, warm_ms, warm_rss, warm_cpu_ms = _started(home)
    again.stop(timeout=600)
    return {
        "daemon stop": stop_ms,
        "daemon ready": ready_ms,
        "daemon ready cpu": cpu_ms,
        "daemon rss": rss,
        "daemon ready snapshot": warm_ms,
        "daemon ready snapshot cpu": warm_cpu_ms,
        "daemon rss snapshot": warm_rss,
    }


def _started(home: Path) -> tuple[Daemon, float, float, float]:
    """A `jbctl daemon --no-dispatch` on `home`: ms from spawn to READY=1, its RSS (MB) then, and the
    CPU ms it had used by then (what the wall clock would be on an idle core)."""
    daemon = Daemon(home, rescan=None)
    started = time.perf_counter()
    daemon.start(wait=False)
    daemon.wait_message("READY=1", timeout=900)
    ready_ms = (time.perf_counter() - started) * 1000
    assert daemon.proc is not None
    return daemon, ready_ms, _rss_mb(daemon.proc.pid), _cpu_ms(daemon.proc.pid)


def _cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def live_figures(store: EventStore, n: int, live: int, profile: bool) -> dict[str, Any]:
    """Tickets per second on top of the history, through a handler holding the whole state."""
    started = time.perf_counter()
    handler = CommandHandler(store)
    load_s = time.perf_counter() - started
    cpu = time.process_time()
    template = make_ticket("TICKET-1")
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    for i in range(live):
        tid = f"TICKET-{n + 1 + i}"
        now = datetime.now(UTC)
        handler.handle(submit(template.model_copy(update={"id": tid, "title": f"live {i}"}), now))
        handler.handle(c.RecordJobSucceeded(now=now, ticket=tid, task="a", attempt=1))
        handler.handle(c.RecordJobSucceeded(now=now, ticket=tid, task="b", attempt=1))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(25)
        print(text.getvalue())
    assert handler.state.tickets[f"TICKET-{n + live}"].status == "completed"
    return {"state load": load_s * 1000, "tickets/s": live / wall, "cpu ms/ticket": cpu * 1000 / live}


def run(n: int, runs: int, live: int, profile: bool, keep: Path | None, status: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jetbox-bench-scale-") as tmp:
        filled = keep / f"home-{n}" if keep else Path(tmp) / "home"
        fill_s = float("nan")  # a home kept by an earlier --keep run is reused as it is
        if not (filled / "jetbox.db").exists():
            filled.mkdir(parents=True, exist_ok=True)
            store, fill_s = fill(filled, n, done_every=DONE_EVERY)
            store.close()
        home = filled
        if keep:  # measured on a copy: the daemon and the live tickets leave the kept home as filled
            home = Path(tmp) / "home"
            shutil.copytree(filled, home)
        upgrade(f"sqlite:///{home / 'jetbox.db'}")
        store = EventStore(f"sqlite:///{home / 'jetbox.db'}", "NORMAL")
        print(f"{n:,} tickets ({store.head():,} events) recorded in {fill_s:.1f} s", flush=True)
        running(store, n)
        figures: dict[str, Any] = {"fill s": fill_s, "events": store.head()}
        if status:
            figures.update(status_figures(home, n, runs))
        figures.update(daemon_figures(home))
        figures.update(live_figures(store, n, live, profile))
        store.close()
    for k, v in figures.items():
        print(f"  {k:<28} {v:10.1f}")
    return figures


ROWS = [
    ("`jbctl status` (default view), p50 ms", "status", "{:,.0f}"),
    ("  its work in-process (no start-up, no imports), p50 ms", "status in-process", "{:,.1f}"),
    ("`status --json`, p50 ms", "status --json", "{:,.0f}"),
    ("`status TICKET-n`, p50 ms", "status TICKET", "{:,.0f}"),
    ("  its work in-process, p50 ms", "status TICKET in-process", "{:,.1f}"),
    ("`jbctl --help` (the floor: Python start-up and imports), p50 ms", "jbctl --help", "{:,.0f}"),
    ("`status --all --json` (every ticket), ms", "status --all --json", "{:,.0f}"),
    ("`status --all --json` peak RSS, MB", "status --all --json rss", "{:,.0f}"),
    ("daemon start to READY=1 (no snapshot: the whole log replayed), ms", "daemon ready", "{:,.0f}"),
    ("  its CPU time by READY, ms", "daemon ready cpu", "{:,.0f}"),
    ("daemon RSS at READY, MB", "daemon rss", "{:,.0f}"),
    ("daemon SIGTERM to exit (writes the snapshot), ms", "daemon stop", "{:,.0f}"),
    ("daemon restarted: to READY=1 from its snapshot, ms", "daemon ready snapshot", "{:,.0f}"),
    ("  its CPU time by READY, ms", "daemon ready snapshot cpu", "{:,.0f}"),
    ("daemon restarted: RSS at READY, MB", "daemon rss snapshot", "{:,.0f}"),
    ("handler state load (replay), ms", "state load", "{:,.0f}"),
    ("live tickets/s on top (3 commands each)", "tickets/s", "{:,.1f}"),
    ("  CPU ms per live ticket", "cpu ms/ticket", "{:,.1f}"),
    ("fill through the append path, s", "fill s", "{:,.0f}"),
]


def table(results: dict[int, dict[str, Any]]) -> str:
    sizes = sorted(results)
    lines = ["| | " + " | ".join(f"{n:,} tickets" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, key, fmt in ROWS:
        cells = [fmt.format(results[n][key]) if key in results[n] else "—" for n in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(sizes) > 1:
        lo, hi = results[sizes[0]]["tickets/s"], results[sizes[-1]]["tickets/s"]
        lines.append(f"\nthroughput at {sizes[-1]:,} / at {sizes[0]:,}: {hi / lo:.2f}")
        lo, hi = results[sizes[0]]["cpu ms/ticket"], results[sizes[-1]]["cpu ms/ticket"]
        lines.append(f"CPU per live ticket at {sizes[0]:,} / at {sizes[-1]:,}: {lo / hi:.2f} (1.00: no slower)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", type=int, action="append", help="sizes (default 1000 and 10000)")
    parser.add_argument("--big", action="store_true", help="add 100,000 tickets (the fill takes minutes)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each `jbctl status` form")
    parser.add_argument("--live", type=int, default=200, help="live tickets timed on top")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the live tickets")
    parser.add_argument("--keep", type=Path, help="keep each filled home under DIR/home-N and reuse it next time")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-status", action="store_true", help="leave out the `jbctl status` figures")
    args = parser.parse_args()
    sizes = args.tickets or ([200] if args.quick else [1000, 10_000])
    if args.big:
        sizes.append(100_000)
    if args.quick:
        args.runs, args.live = 2, 20
    print(f"scale benchmark: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    results = {n: run(n, args.runs, args.live, args.profile, args.keep, not args.no_status) for n in sizes}
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
