#!/usr/bin/env python
"""Jetbox beside its peers, in one run on one disk: eventsourcing, DBOS, raw RQ and raw sqlite3.

    make bench-peers                                     # builds .venv-bench, then runs this
    .venv-bench/bin/python bench/peers.py                # the table in docs/BENCHMARKS.md (~2-3 min)
    .venv-bench/bin/python bench/peers.py --quick        # a smoke run (under a minute)

The peers live in a separate environment (.venv-bench, pinned by bench/peers-constraints.txt) so they
never become Jetbox dependencies; a peer that is not installed is reported as such and its rows left
empty. Rows (each a median of --rounds interleaved rounds, so that noise from other processes hits
every side alike):

1. single durable append: one event per transaction, WAL, synchronous=FULL. The append rows take
   turns in slices of a tenth of a round (20 commits, 2 batches by default).
   Jetbox: `EventStore.append` of one ProgressRecorded with its expected version (hash chain and
   projections in the same transaction), as bench/store.py does. eventsourcing: `Application.save`
   of an aggregate with one new event (SQLite recorder, WAL, synchronous=FULL set on each connection).
   raw sqlite3: bench/store.py's RawWriter (the same events table, one row with its chain hash).
2. batched append: 100 events in one transaction, the same three.
3. per-step overhead: a DBOS workflow of N no-op `@DBOS.step`s (time per step) against a Jetbox
   attempt recorded in-process through the daemon's CommandHandler (RecordJobStarted, then
   RecordJobSucceeded, which also schedules the next step of a chain): what one unit of work costs
   to record durably, without a queue in the way.
4. queue throughput and per-job latency, no-op jobs, one worker: raw RQ and Jetbox through
   bench/dispatch.py's `raw_rq` and `jetbox` (a private redis-server each round), DBOS through a
   queue of trivial workflows (queue, results and notifications polled every 10 ms; DBOS's
   default is 1 s).

DBOS runs in a child process (its queue threads would otherwise run beside the other rows), on a
SQLite system database in the same folder by default (`--dbos-url` for PostgreSQL). Nothing here is
a pass/fail test; ratios >= 1.00 mean Jetbox is at least as fast as the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from store import RawWriter, StoreWriter  # noqa: E402

BATCH = 100
SLICES = 10  # turns per round in the append rows
POLL_S = 0.01  # DBOS polls its queue and results (1 s by default): a fair floor for no-op jobs


def _installed(name: str) -> str | None:
    """The installed version of a peer, or None (then its rows say so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _median_rates(
    rounds: int, runs: dict[str, tuple[Callable[[], None], int]], slices: int = 1
) -> tuple[dict[str, float], dict[str, float]]:
    """Each side's median rate (units/s) over `rounds`, and its process CPU time per unit (s; user +
    system, so the commits' write and fsync calls count). Within a round the sides take turns
    `slices` times (each slice one call), so a burst of load from other processes hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        spent = dict.fromkeys(runs, 0.0)
        for _ in range(slices):
            for name, (fn, _units) in runs.items():
                started, cpu0 = time.perf_counter(), time.process_time()
                fn()
                spent[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - cpu0
        for name, (_fn, units) in runs.items():
            rates[name].append(units * slices / spent[name])
    per_unit = {name: cpu[name] / (units * slices * rounds) for name, (_fn, units) in runs.items()}
    return {name: statistics.median(r) for name, r in rates.items()}, per_unit


# --- appends -----------------------------------------------------------------------------------


@cache
def _es_attempt() -> Any:
    """The eventsourcing aggregate (one class per process: eventsourcing registers it by name)."""
    from eventsourcing.domain import Aggregate, event

    class Attempt(Aggregate):
        def __init__(self, ticket: str, task: str) -> None:
            self.ticket, self.task, self.step = ticket, task, 0

        @event("Progress")
        def progress(self, step: int, total: int, metrics: dict[str, float], report_seq: int, at: str) -> None:
            self.step = step

    return Attempt


class EventsourcingWriter:
    """eventsourcing's Application with its SQLite recorder: `save` of one aggregate's new events."""

    def __init__(self, path: Path) -> None:
        from eventsourcing import sqlite as es_sqlite
        from eventsourcing.application import Application

        create = es_sqlite.SQLiteConnectionPool._create_connection
        if not getattr(create, "_jetbox_full", False):

            def _full(pool: Any) -> Any:
                # eventsourcing sets WAL itself; the durability level is made explicit here.
                conn = create(pool)
                conn._sqlite_conn.execute("PRAGMA synchronous=FULL")
                return conn

            _full._jetbox_full = True  # type: ignore[attr-defined]
            es_sqlite.SQLiteConnectionPool._create_connection = _full  # type: ignore[method-assign]

        Attempt = _es_attempt()
        self.app = Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)})
        self.agg = Attempt("TICKET-1", "shapes")
        self.app.save(self.agg)
        self.report = 1
        with self.app.recorder.datastore.transaction(commit=False) as cur:  # type: ignore[attr-defined]
            cur.execute("PRAGMA synchronous")
            sync = cur.fetchone()[0]
            cur.execute("PRAGMA journal_mode")
            mode = cur.fetchone()[0]
        assert (sync, mode) == (2, "wal"), f"eventsourcing's connection: synchronous={sync}, journal_mode={mode}"

    def _progress(self) -> None:
        self.report += 1
        self.agg.progress(
            step=self.report,
            total=1_000_000,
            metrics={"loss": 1.0 / self.report},
            report_seq=self.report,
            at=datetime.now(UTC).isoformat(),
        )

    def single(self, n: int) -> None:
        for _ in range(n):
            self._progress()
            self.app.save(self.agg)

    def batch(self, n_batches: int, size: int) -> None:
        for _ in range(n_batches):
            for _ in range(size):
                self._progress()
            self.app.save(self.agg)

    def close(self) -> None:
        self.app.close()


def bench_appends(workdir: Path, n_single: int, n_batches: int, rounds: int) -> dict[str, dict[str, float]]:
    jetbox = StoreWriter(workdir / "jetbox.db")
    raw = RawWriter(workdir / "raw.db")
    writers: dict[str, Any] = {"jetbox": jetbox, "raw sqlite3": raw}
    if _installed("eventsourcing"):
        writers["eventsourcing"] = EventsourcingWriter(workdir / "eventsourcing.db")
    for w in writers.values():
        w.single(3)  # warm up: first pages, prepared statements
    # Slices of 1/10 of a round (at least one commit), the sides taking turns.
    per, per_b = max(1, n_single // SLICES), max(1, n_batches // SLICES)
    single, single_cpu = _median_rates(
        rounds, {k: ((lambda w=w: w.single(per)), per) for k, w in writers.items()}, slices=SLICES
    )
    batched, batched_cpu = _median_rates(
        rounds, {k: ((lambda w=w: w.batch(per_b, BATCH)), per_b * BATCH) for k, w in writers.items()}, slices=SLICES
    )
    ok = jetbox.store.verify()
    assert ok[1] is None, f"Jetbox's chain does not verify after the benchmark: {ok}"
    for w in writers.values():
        w.close()
    return {"single": single, "batched": batched, "single_cpu": single_cpu, "batched_cpu": batched_cpu}


# --- Jetbox attempts, in-process ---------------------------------------------------------------


def jetbox_attempts(workdir: Path, n: int, rounds: int) -> float:
    """Median seconds per attempt recorded through the CommandHandler (started, then succeeded)."""
    from daemon import commands as c
    from daemon.handler import CommandHandler
    from schema.migrations import upgrade
    from schema.store import EventStore
    from schema.ticket import Ticket, parse_ticket

    url = f"sqlite:///{workdir / 'attempts.db'}"
    upgrade(url)
    store = EventStore(url)
    handler = CommandHandler(store)
    per: list[float] = []
    for r in range(rounds + 1):  # round 0 warms up
        tid = f"TICKET-{r + 1}"
        steps = "\n".join(f"  - {{id: s{i}, kind: diag{f', needs: [s{i - 1}]' if i else ''}}}" for i in range(n))
        text = f"id: {tid}\ntitle: peers bench\ngoal: measure\nsteps:\n{steps}\n"
        ticket: Ticket = parse_ticket(text.encode(), f"{tid}.yaml")
        now = datetime.now(UTC)
        handler.handle(c.SubmitTicket(now=now, path=f"{tid}.yaml", content_hash="0" * 64, ticket=ticket))
        started = time.perf_counter()
        for i in range(n):
            now = datetime.now(UTC)
            handler.handle(c.RecordJobStarted(now=now, ticket=tid, task=f"s{i}", attempt=1, worker="w", report_seq=1))
            handler.handle(c.RecordJobSucceeded(now=now, ticket=tid, task=f"s{i}", attempt=1, report_seq=2))
        if r:
            per.append((time.perf_counter() - started) / n)
        assert handler.state.tickets[tid].status == "completed", handler.state.tickets[tid].status
    store.close()
    return statistics.median(per)


# --- DBOS, in a child process -------------------------------------------------------------------


def dbos_child(url: str, steps: int, jobs: int, rounds: int) -> dict[str, float]:
    """Run inside `--dbos-child`: per-step overhead, queue latency and throughput of DBOS."""
    import logging

    from dbos import DBOS

    logging.getLogger("dbos").setLevel(logging.WARNING)
    DBOS(
        config={
            "name": "jetboxpeers",
            "system_database_url": url,
            "run_admin_server": False,
            "notification_listener_polling_interval_sec": POLL_S,
        }
    )

    @DBOS.step()
    def noop_step(i: int) -> int:
        return i

    @DBOS.workflow()
    def chain(n: int) -> int:
        return sum(noop_step(i) for i in range(n))

    @DBOS.workflow()
    def trivial(i: int) -> int:
        return i

    DBOS.launch()
    logging.getLogger("dbos").setLevel(logging.WARNING)
    try:
        queue = DBOS.register_queue("jetboxpeers", polling_interval_sec=POLL_S)
        chain(3)
        queue.enqueue(trivial, -1).get_result(polling_interval_sec=POLL_S)  # warm up
        per_step, latency, tput = [], [], []
        for _ in range(rounds):
            # A workflow of 1 step and one of 1+steps: the difference is `steps` recorded steps.
            t0 = time.perf_counter()
            chain(1)
            t1 = time.perf_counter()
            chain(1 + steps)
            t2 = time.perf_counter()
            per_step.append(((t2 - t1) - (t1 - t0)) / steps)
            lat = []
            for i in range(jobs):
                t0 = time.perf_counter()
                queue.enqueue(trivial, i).get_result(polling_interval_sec=POLL_S)
                lat.append(time.perf_counter() - t0)
            latency.append(statistics.median(lat))
            t0 = time.perf_counter()
            handles = [queue.enqueue(trivial, i) for i in range(jobs)]
            for h in handles:
                h.get_result(polling_interval_sec=POLL_S)
            tput.append(jobs / (time.perf_counter() - t0))
        return {
            "step_s": statistics.median(per_step),
            "latency_s": statistics.median(latency),
            "throughput": statistics.median(tput),
        }
    finally:
        DBOS.destroy()


def bench_dbos(workdir: Path, url: str | None, steps: int, jobs: int, rounds: int) -> dict[str, Any]:
    if not _installed("dbos"):
        return {"error": "dbos is not installed (run `make bench-peers`)"}
    url = url or f"sqlite:///{workdir / 'dbos.sqlite'}"
    argv = [sys.executable, __file__, "--dbos-child", url, str(steps), str(jobs), str(rounds)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=workdir, timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"DBOS run failed (exit {done.returncode}): {' | '.join(tail)}"}
    out: dict[str, Any] = json.loads(lines[-1])
    out["backend"] = url.split(":", 1)[0]
    return out


# --- queues through bench/dispatch.py ----------------------------------------------------------


def bench_queues(workdir: Path, jobs: int, rounds: int) -> dict[str, dict[str, float]]:
    """Raw RQ and Jetbox with bench/dispatch.py's own functions, alternating, medians over rounds."""
    from dispatch import jetbox, raw_rq

    from cli.embedded import start_redis

    results: dict[str, dict[str, list[float]]] = {
        "raw RQ": {"latency": [], "throughput": []},
        "jetbox": {"latency": [], "throughput": []},
    }
    for r in range(rounds):
        for name, fn in (("raw RQ", raw_rq), ("jetbox", jetbox)):
            tmp = workdir / f"queue-{name.replace(' ', '')}-{r}"
            tmp.mkdir()
            server = start_redis(tmp / "run")
            try:
                lat, tput = fn(server.url, jobs, tmp)
            finally:
                server.stop()
            results[name]["latency"].append(statistics.median(lat))
            results[name]["throughput"].append(tput)
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}


# --- the table ---------------------------------------------------------------------------------


def _fmt_rate(x: float | None, unit: str) -> str:
    return "n/a" if x is None else f"{x:,.0f} {unit}"


def _fmt_us(x: float | None) -> str:
    return "n/a" if x is None else f"{1e6 * x:,.0f} us"


def _fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{1000 * x:.2f} ms"


def table(res: dict[str, Any]) -> list[str]:
    app = res.get("appends", {})
    single, batched = app.get("single", {}), app.get("batched", {})
    dbos, queues = res.get("dbos", {}), res.get("queues", {})
    rows: list[tuple[str, str, str, str]] = []

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    for label, figures, cpu in (
        ("durable single-event append", single, app.get("single_cpu", {})),
        (f"batched append, {BATCH}/txn", batched, app.get("batched_cpu", {})),
    ):
        if not figures:
            continue
        jb, es, raw = figures.get("jetbox"), figures.get("eventsourcing"), figures.get("raw sqlite3")
        rows.append(
            (
                label,
                _fmt_rate(jb, "ev/s"),
                f"eventsourcing {_fmt_rate(es, 'ev/s')}; raw sqlite3 {_fmt_rate(raw, 'ev/s')}",
                f"{ratio(jb, es)} eventsourcing, {ratio(jb, raw)} raw",
            )
        )
        jc, ec, rc = cpu.get("jetbox"), cpu.get("eventsourcing"), cpu.get("raw sqlite3")
        rows.append(
            (
                "  the same, CPU per event (user + sys)",
                _fmt_us(jc),
                f"eventsourcing {_fmt_us(ec)}; raw sqlite3 {_fmt_us(rc)}",
                f"{ratio(ec, jc)} eventsourcing, {ratio(rc, jc)} raw",
            )
        )
    if "attempt_s" in res or dbos:
        jb_step, db_step = res.get("attempt_s"), dbos.get("step_s")
        peer = f"DBOS step ({dbos['backend']}): {_fmt_ms(db_step)}" if "step_s" in dbos else dbos.get("error", "")
        rows.append(("per recorded step / attempt", _fmt_ms(jb_step), peer, f"{ratio(db_step, jb_step)} DBOS"))
    if queues or dbos:
        jb, rq = queues.get("jetbox", {}), queues.get("raw RQ", {})
        db_t = dbos.get("throughput")
        rows.append(
            (
                "queue throughput, no-op jobs, 1 worker",
                _fmt_rate(jb.get("throughput"), "jobs/s"),
                f"raw RQ {_fmt_rate(rq.get('throughput'), 'jobs/s')}; DBOS queue {_fmt_rate(db_t, 'jobs/s')}",
                f"{ratio(jb.get('throughput'), rq.get('throughput'))} raw RQ, {ratio(jb.get('throughput'), db_t)} DBOS",
            )
        )
        jl, rl, dl = jb.get("latency"), rq.get("latency"), dbos.get("latency_s")
        added = "n/a" if jl is None or rl is None else f"+{1000 * (jl - rl):.2f} ms over raw RQ"
        rows.append(
            (
                "per-job latency p50, one at a time",
                _fmt_ms(jl),
                f"raw RQ {_fmt_ms(rl)}; DBOS queue {_fmt_ms(dl)}",
                f"{added}, {ratio(dl, jl)} DBOS",
            )
        )
    head = ("what", "Jetbox", "peers, same run", "ratio (>= 1.00x: Jetbox as fast)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--dbos-child"]:
        url, steps, jobs, rounds = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(dbos_child(url, steps, jobs, rounds)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, medians reported (default 3; --quick 1)")
    parser.add_argument("--single", type=int, help="single-event appends per side per round (default 200)")
    parser.add_argument("--batches", type=int, help=f"{BATCH}-event batches per side per round (default 20)")
    parser.add_argument("--steps", type=int, help="DBOS steps / Jetbox attempts per round (default 50)")
    parser.add_argument("--jobs", type=int, help="queue jobs per side per round (default 100; at most 200)")
    parser.add_argument("--dbos-url", help="DBOS system database (default: SQLite in the bench folder)")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: a temporary folder)")
    parser.add_argument("--only", choices=["appends", "steps", "queues"], action="append", help="run only these")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    n_single = args.single or (30 if args.quick else 200)
    n_batches = args.batches or (2 if args.quick else 20)
    steps = args.steps or (10 if args.quick else 50)
    jobs = args.jobs or (20 if args.quick else 100)
    if not 1 <= jobs <= 200:
        parser.error(f"--jobs {jobs}: bench/dispatch.py's Jetbox side runs one ticket of at most 200 steps")
    only = set(args.only or ["appends", "steps", "queues"])
    workdir = Path(tempfile.mkdtemp(prefix="jetbox-peers-", dir=args.dir))
    load = os.getloadavg()
    print(
        f"jetbox bench/peers.py: python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, rounds {rounds}, "
        f"eventsourcing {_installed('eventsourcing') or 'not installed'}, "
        f"dbos {_installed('dbos') or 'not installed'}, "
        f"rq {_installed('rq')}, databases in {workdir}",
        flush=True,
    )
    res: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        if "appends" in only:
            res["appends"] = bench_appends(workdir, n_single, n_batches, rounds)
            print(f"  appends done ({time.perf_counter() - started:.0f} s)", flush=True)
        if "steps" in only:
            res["attempt_s"] = jetbox_attempts(workdir, steps, rounds)
            print(f"  Jetbox attempts done ({time.perf_counter() - started:.0f} s)", flush=True)
        if "steps" in only or "queues" in only:
            res["dbos"] = bench_dbos(workdir, args.dbos_url, steps, jobs, rounds)
            print(f"  DBOS done ({time.perf_counter() - started:.0f} s)", flush=True)
        if "queues" in only:
            res["queues"] = bench_queues(workdir, jobs, rounds)
            print(f"  queues done ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n{time.perf_counter() - started:.0f} s, load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("\n".join(table(res)))
    if "error" in res.get("dbos", {}):
        print(f"\nDBOS: {res['dbos']['error']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
