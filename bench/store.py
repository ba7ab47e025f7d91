#!/usr/bin/env python
"""Event store benchmark: durable appends against raw sqlite3, and replay of a large log.

    .venv/bin/python bench/store.py                 # the figures in docs/BENCHMARKS.md
    .venv/bin/python bench/store.py --quick         # a smoke run (seconds)
    .venv/bin/python bench/store.py --profile       # also cProfile the start-up replay

(a) single-event durable commits: `EventStore.append` of one event (with its expected version, as
    the daemon does) against raw sqlite3 with the same pragmas (WAL, synchronous=FULL,
    busy_timeout, BEGIN IMMEDIATE) inserting one comparable row with its sha256 chain hash.
(b) batched commits: 100 events per transaction, through `append` (one decision of 100 events) and
    `append_batches` (100 decisions of one event each, the daemon's group commit), against raw
    sqlite3 `executemany` of 100 rows.
(c) replay: a realistic log of N events (default 1,000,000) written straight into SQLite with the
    real `chain_hash` and `event_to_data`, then `daemon.handler.load_state` (what the daemon does
    at start-up: read, decode, evolve), `EventStore.rebuild_rows` (projection rebuild) and
    `EventStore.verify` (hash chain), each timed.

Each figure is printed as events/s and seconds; the ratio lines compare the store to raw sqlite3
measured in the same run on the same disk. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.handler import CommandHandler, load_state  # noqa: E402
from schema import events as ev  # noqa: E402
from schema.migrations import upgrade  # noqa: E402
from schema.store import GENESIS, EventStore, chain_hash  # noqa: E402
from schema.ticket import load_ticket  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EXAMPLE = ROOT / "tickets" / "examples" / "TICKET-1.yaml"
GOAL_BATCH_RATIO = 0.5
GOAL_REPLAY_S_PER_1M = 10.0


# --- helpers -----------------------------------------------------------------------------------


def _sqlite_ts(ts: datetime) -> str:
    """How SQLAlchemy's DateTime stores a naive UTC datetime in SQLite."""
    return ts.strftime("%Y-%m-%d %H:%M:%S.%f")


def _naive(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(tzinfo=None)


def _raw_connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A plain sqlite3 connection with the store's pragmas (autocommit; we BEGIN ourselves)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _migrated(path: Path) -> str:
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} ev/s ({seconds:.3f} s for {n:,})"


INSERT = (
    "INSERT INTO events (seq, stream, version, type, data, meta, recorded_at, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


# --- (a) and (b): appends ----------------------------------------------------------------------


class StoreWriter:
    """Appends ProgressRecorded events for a scheduled task of a real ticket, as the daemon would."""

    def __init__(self, path: Path) -> None:
        self.store = EventStore(_migrated(path))
        handler = CommandHandler(self.store)
        from daemon import commands as c

        ticket = load_ticket(EXAMPLE)
        handler.handle(c.SubmitTicket(now=T0, path=str(EXAMPLE), content_hash="0" * 64, ticket=ticket))
        handler.handle(c.RecordJobStarted(now=T0, ticket=ticket.id, task="shapes", attempt=1, worker="w", report_seq=1))
        self.ticket = ticket.id
        self.version = self.store.stream_version(ticket.id)
        self.report = 1

    def _event(self) -> ev.ProgressRecorded:
        self.report += 1
        return ev.ProgressRecorded(
            at=datetime.now(UTC),
            ticket=self.ticket,
            task="shapes",
            attempt=1,
            step=self.report,
            total=1_000_000,
            metrics={"loss": 1.0 / self.report},
            report_seq=self.report,
        )

    def single(self, n: int) -> None:
        meta = {"command": "RecordProgress"}
        for _ in range(n):
            self.store.append([self._event()], expected={self.ticket: self.version}, meta=meta)
            self.version += 1

    def batch(self, n_batches: int, size: int) -> None:
        meta = {"command": "RecordProgress"}
        for _ in range(n_batches):
            events = [self._event() for _ in range(size)]
            self.store.append(events, expected={self.ticket: self.version}, meta=meta)
            self.version += size

    def group(self, n_batches: int, size: int) -> None:
        """The handler's group commit: `size` decisions of one event each in one transaction."""
        meta = {"command": "RecordProgress"}
        for _ in range(n_batches):
            batches: list[Any] = []
            for k in range(size):
                batches.append(([self._event()], {self.ticket: self.version + k}, meta))
            self.store.append_batches(batches)
            self.version += size

    def close(self) -> None:
        self.store.close()


class RawWriter:
    """The baseline: plain sqlite3, same schema and pragmas, one comparable row per event incl. its hash."""

    def __init__(self, path: Path) -> None:
        _migrated(path)  # the same table and indexes as the store's
        self.conn = _raw_connect(path)
        self.seq, self.prev, self.report = 0, GENESIS, 1
        self.meta = {"command": "RecordProgress"}
        self.template = ev.event_to_data(
            ev.ProgressRecorded(at=T0, ticket="TICKET-1", task="shapes", attempt=1, step=1, total=1_000_000)
        )

    def _row(self) -> tuple[Any, ...]:
        self.seq += 1
        self.report += 1
        now = datetime.now(UTC).replace(tzinfo=None)
        data = dict(self.template, step=self.report, report_seq=self.report, metrics={"loss": 1.0 / self.report})
        data["at"] = now.isoformat() + "Z"
        digest = chain_hash(self.prev, self.seq, "TICKET-1", self.seq, "ProgressRecorded", data, self.meta, now)
        self.prev = digest
        return (
            self.seq,
            "TICKET-1",
            self.seq,
            "ProgressRecorded",
            json.dumps(data),
            json.dumps(self.meta),
            _sqlite_ts(now),
            digest,
        )

    def single(self, n: int) -> None:
        conn = self.conn
        for _ in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT, self._row())
            conn.execute("COMMIT")

    def batch(self, n_batches: int, size: int) -> None:
        conn = self.conn
        for _ in range(n_batches):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, [self._row() for _ in range(size)])
            conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def _alternate(rounds: int, runs: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Run each function `rounds` times, interleaved, so that noise from other processes hits all alike."""
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            spent[name] += time.perf_counter() - started
    return spent


def bench_appends(workdir: Path, n_single: int, n_batches: int, size: int, rounds: int) -> dict[str, float]:
    store = StoreWriter(workdir / "store.db")
    raw = RawWriter(workdir / "raw.db")
    # warm up both (first page allocations, imports, prepared statements)
    store.single(3)
    raw.single(3)

    per = max(1, n_single // rounds)
    keeper: list[sqlite3.Connection] = []

    def kept() -> None:
        # As the daemon runs it: an idle connection stays open, so closing the store's per-transaction
        # connection (NullPool) is not the last close and does not checkpoint the WAL.
        keeper.append(sqlite3.connect(workdir / "store.db"))
        keeper[-1].execute("SELECT 1 FROM event_head").fetchall()
        try:
            store.single(per)
        finally:
            keeper.pop().close()

    spent = _alternate(rounds, {"raw": lambda: raw.single(per), "store": lambda: store.single(per), "kept": kept})
    n = per * rounds
    raw_single, store_single = n / spent["raw"], n / spent["store"]
    print("(a) single-event durable commits (1 event per transaction, synchronous=FULL)")
    print(f"    raw sqlite3                          {_rate(n, spent['raw'])}")
    print(f"    EventStore.append                    {_rate(n, spent['store'])}")
    print(f"    EventStore.append, keeper conn open  {_rate(n, spent['kept'])}")
    print(f"    single ratio (store/raw): {store_single / raw_single:.2f}")
    print(f"    single ratio with a keeper connection (store/raw): {n / spent['kept'] / raw_single:.2f}")

    per_b = max(1, n_batches // rounds)
    spent = _alternate(
        rounds,
        {
            "raw": lambda: raw.batch(per_b, size),
            "append": lambda: store.batch(per_b, size),
            "group": lambda: store.group(per_b, size),
        },
    )
    n = per_b * rounds * size
    raw_b, app_b, grp_b = n / spent["raw"], n / spent["append"], n / spent["group"]
    print(f"(b) batched commits ({size} events per transaction)")
    print(f"    raw sqlite3 executemany               {_rate(n, spent['raw'])}")
    print(f"    EventStore.append ({size} events)       {_rate(n, spent['append'])}")
    print(f"    EventStore.append_batches ({size}x1)    {_rate(n, spent['group'])}")
    print(f"    batch ratio (append/raw): {app_b / raw_b:.2f}")
    print(f"    group ratio (append_batches/raw): {grp_b / raw_b:.2f}")
    verdict = "met" if app_b / raw_b >= GOAL_BATCH_RATIO else "NOT met"
    print(f"    goal: batched appends >= {GOAL_BATCH_RATIO:.0%} of raw sqlite3: {verdict}")
    assert store.store.verify()[1] is None, "the store's chain does not verify after the benchmark"
    store.close()
    raw.close()
    return {
        "raw_single": raw_single,
        "store_single": store_single,
        "raw_batch": raw_b,
        "append_batch": app_b,
        "group_batch": grp_b,
    }


# --- (c): a realistic log and its replay -------------------------------------------------------

# Per ticket (TICKET-1's pipeline): synthesize -> train -> evaluate. Training reports progress
# often and saves checkpoints; every 10th ticket's first training attempt fails and is retried.
PROGRESS = {"shapes": 12, "train": 250, "eval": 20}
CHECKPOINT_EVERY = 50


def _ticket_events(n: int, start: datetime, spec: dict[str, Any]) -> Iterator[tuple[ev.Event, str]]:
    """(event, command name) for one ticket's complete, successful run."""
    tid = f"TICKET-{n}"
    clock = [start]

    def at() -> datetime:
        clock[0] += timedelta(seconds=1)
        return clock[0]

    body = dict(spec, id=tid)
    yield (
        ev.TicketSubmitted(
            at=at(), ticket=tid, path=f"/srv/tickets/{tid}.yaml", content_hash=f"{n:064x}", revision=1, spec=body
        ),
        "SubmitTicket",
    )
    outputs: dict[str, Any] = {}
    for step in spec["steps"]:
        task = step["id"]
        attempts = 2 if (task == "train" and n % 10 == 0) else 1
        for attempt in range(1, attempts + 1):
            params = dict(step.get("with", {}))
            if outputs:
                params["_inputs"] = {k: v for k, v in outputs.items() if k in step.get("needs", [])}
            yield (
                ev.AttemptScheduled(
                    at=at(),
                    ticket=tid,
                    task=task,
                    attempt=attempt,
                    kind=step["kind"],
                    queue=step.get("queue") or ("cpu" if step["kind"] == "synthesize" else "gpu"),
                    params=params,
                    timeout=float(step.get("timeout", 3600)),
                    resume_checkpoint=f"/srv/jetbox/ckpt/{tid}/train/{attempt - 1}" if attempt > 1 else None,
                ),
                "SubmitTicket" if task == "shapes" else ("Tick" if attempt > 1 else "RecordJobSucceeded"),
            )
            report = 1
            yield (
                ev.AttemptStarted(at=at(), ticket=tid, task=task, attempt=attempt, worker="gpu0", report_seq=1),
                "RecordJobStarted",
            )
            total = PROGRESS[task]
            for i in range(1, total + 1):
                report += 1
                metrics = {"loss": round(2.0 / (i + 1), 6), "lr": 0.0003} if task == "train" else {}
                yield (
                    ev.ProgressRecorded(
                        at=at(),
                        ticket=tid,
                        task=task,
                        attempt=attempt,
                        step=i,
                        total=total,
                        metrics=metrics,
                        report_seq=report,
                    ),
                    "RecordProgress",
                )
                if task == "train" and i % CHECKPOINT_EVERY == 0:
                    report += 1
                    yield (
                        ev.CheckpointSaved(
                            at=at(),
                            ticket=tid,
                            task=task,
                            attempt=attempt,
                            path=f"/srv/jetbox/ckpt/{tid}/train/{attempt}/{i}.pt",
                            step=i,
                            report_seq=report,
                        ),
                        "RecordCheckpoint",
                    )
                if attempt < attempts and i == total // 2:
                    break
            report += 1
            if attempt < attempts:
                yield (
                    ev.AttemptFailed(
                        at=at(),
                        ticket=tid,
                        task=task,
                        attempt=attempt,
                        error="RuntimeError: CUDA out of memory",
                        fingerprint="train:abc:def",
                        retry_at=clock[0] + timedelta(seconds=2),
                        report_seq=report,
                    ),
                    "RecordJobFailed",
                )
                continue
            artifact = hashlib.sha256(f"{tid}/{task}/{attempt}".encode()).hexdigest()
            outputs[task] = {"artifact": artifact}
            metrics = {"shape_linear_gain": 0.12, "probe_accuracy": 0.61} if task == "eval" else {}
            yield (
                ev.AttemptSucceeded(
                    at=at(),
                    ticket=tid,
                    task=task,
                    attempt=attempt,
                    metrics=metrics,
                    outputs=outputs[task],
                    report_seq=report,
                ),
                "RecordJobSucceeded",
            )
    results = [{"check": "eval.shape_linear_gain >= 0", "ok": True, "observed": 0.12}]
    yield ev.AcceptanceEvaluated(at=at(), ticket=tid, results=results, passed=True), "RecordJobSucceeded"
    yield ev.TicketCompleted(at=at(), ticket=tid), "RecordJobSucceeded"


def _log(n_events: int) -> Iterator[tuple[ev.Event, str]]:
    spec = load_ticket(EXAMPLE).model_dump(mode="json", by_alias=True)
    produced, n = 0, 0
    while True:
        n += 1
        for item in _ticket_events(n, T0 + timedelta(minutes=10 * n), spec):
            yield item
            produced += 1
            if produced >= n_events:
                return


def generate_log(path: Path, n_events: int) -> dict[str, int]:
    """Write `n_events` rows straight into a migrated database: real data bodies, real chain hashes."""
    _migrated(path)
    conn = _raw_connect(path, synchronous="OFF")
    versions: dict[str, int] = {}
    counts: dict[str, int] = {}
    prev, seq, chunk = GENESIS, 0, []
    conn.execute("BEGIN IMMEDIATE")
    for event, command in _log(n_events):
        seq += 1
        stream = ev.stream_of(event)
        version = versions[stream] = versions.get(stream, 0) + 1
        data = ev.event_to_data(event)
        meta = {"command": command}
        recorded = _naive(event.at) + timedelta(microseconds=seq % 1000)
        digest = chain_hash(prev, seq, stream, version, event.type, data, meta, recorded)
        prev = digest
        counts[event.type] = counts.get(event.type, 0) + 1
        chunk.append(
            (seq, stream, version, event.type, json.dumps(data), json.dumps(meta), _sqlite_ts(recorded), digest)
        )
        if len(chunk) >= 20000:
            conn.executemany(INSERT, chunk)
            chunk.clear()
    if chunk:
        conn.executemany(INSERT, chunk)
    conn.execute("UPDATE event_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return counts


def _existing_log(path: Path, n_events: int) -> bool:
    if not path.is_file():
        return False
    conn = sqlite3.connect(path)
    try:
        (head,) = conn.execute("SELECT seq FROM event_head WHERE id = 1").fetchone()
        return bool(head == n_events)
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _timed(label: str, n: int, fn: Callable[[], Any], profile: bool = False) -> float:
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    fn()
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    # CPU time shows what the phase costs when other processes share the cores.
    print(f"    {label:<38}{_rate(n, seconds)}, cpu {cpu:.1f} s")
    if profiler:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        print("\n".join("      " + line for line in out.getvalue().splitlines() if line.strip()))
        print("      (profiled: times include cProfile's overhead)")
    return seconds


def bench_replay(workdir: Path, n_events: int, reuse: Path | None, profile: bool, breakdown: bool) -> dict[str, float]:
    path = reuse or workdir / "log.db"
    print(f"(c) replay of {n_events:,} events")
    if reuse is not None and _existing_log(path, n_events):
        print(f"    reusing {path}")
    else:
        if path.exists():
            path.unlink()
        started = time.perf_counter()
        counts = generate_log(path, n_events)
        mix = ", ".join(f"{k} {v / n_events:.1%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"    generated in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 1e6:.0f} MB): {mix}")
    store = EventStore(f"sqlite:///{path}")
    results: dict[str, float] = {}
    if breakdown:

        def read_only() -> None:
            for _ in store.read(0, page=20000):
                pass

        def read_decode() -> None:
            for rec in store.read(0, page=20000):
                rec.event  # noqa: B018

        results["read"] = _timed("store.read (rows + JSON)", n_events, read_only)
        results["decode"] = _timed("store.read + event decode", n_events, read_decode)
    state_holder: list[Any] = []
    results["load_state"] = _timed(
        "load_state (read+decode+evolve)", n_events, lambda: state_holder.append(load_state(store)), profile
    )
    state = state_holder[0]
    assert state.last_seq == n_events, (state.last_seq, n_events)
    # Ended tickets are frozen as they end (`daemon.state.ColdTicket`): counted from both maps.
    done = sum(1 for t in state.tickets.values() if t.status == "completed")
    done += sum(1 for record in state.cold.values() if record[1] == "completed")
    results["rebuild_rows"] = _timed("rebuild_rows (projections)", n_events, store.rebuild_rows, profile)
    verified: list[Any] = []
    results["verify"] = _timed("verify (hash chain)", n_events, lambda: verified.append(store.verify()), profile)
    assert verified[0][1] is None, f"generated log does not verify: {verified[0]}"
    held = len(state.tickets)
    print(f"    state: {held + len(state.cold):,} tickets ({done:,} completed; {held:,} held whole), chain verified")
    scaled = results["load_state"] * 1_000_000 / n_events
    verdict = "met" if scaled < GOAL_REPLAY_S_PER_1M else "NOT met"
    print(f"    goal: start-up replay of 1M events < {GOAL_REPLAY_S_PER_1M:g} s: {verdict} ({scaled:.1f} s per 1M)")
    store.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, help="events in the replay log (default 1,000,000; --quick 20,000)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--single", type=int, help="single-event commits per side (default 600; --quick 30)")
    parser.add_argument("--batches", type=int, help="batches of --batch-size per side (default 60; --quick 3)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, help="interleaved rounds for the append benchmarks (default 3)")
    parser.add_argument("--dir", type=Path, help="where to put the databases (default: a temporary folder)")
    parser.add_argument("--reuse", type=Path, help="replay log file to reuse if it holds --events events")
    parser.add_argument("--profile", action="store_true", help="cProfile each replay phase (top 25 by own time)")
    parser.add_argument("--breakdown", action="store_true", help="also time reading alone and reading + decoding")
    parser.add_argument("--skip-appends", action="store_true")
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args(argv)
    n_events = args.events or (20_000 if args.quick else 1_000_000)
    n_single = args.single or (30 if args.quick else 600)
    n_batches = args.batches or (3 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 3)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workdir = Path(tempfile.mkdtemp(prefix="jetbox-bench-", dir=args.dir))
    print(
        f"jetbox bench/store.py: python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{cpus} cores, {platform.machine()}, databases in {workdir}"
    )
    try:
        if not args.skip_appends:
            bench_appends(workdir, n_single, n_batches, args.batch_size, rounds)
        if not args.skip_replay:
            bench_replay(workdir, n_events, args.reuse, args.profile, args.breakdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
