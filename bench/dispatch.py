"""Dispatch benchmark: no-op jobs through Jetbox (event → RQ → worker → report → event) beside raw RQ.

    .venv/bin/python bench/dispatch.py            # 200 jobs each way (the figures in docs/BENCHMARKS.md)
    .venv/bin/python bench/dispatch.py --jobs 50  # a quick run
    .venv/bin/python bench/dispatch.py --placement  # also: the same with placement, in the same run

`--placement` runs the Jetbox side a second time with the worker advertising one 256G card
(`jbctl worker --queue gpu --gpus 1 --gpu-memory 256G`) and every step on the gpu queue asking for
`gpu_memory: 1G`: each attempt is placed by the decider (worker and card recorded on
AttemptScheduled, claims counted on the card) and goes to the worker's own queue. The card holds
all 200 claims, so what differs from the plain run is the placement itself, not a memory limit
(a smaller card bounds the attempts out, like `--queue-limits`, and so the throughput).

Beside the wall figures it prints the CPU each process spent per job in the throughput runs (which the
machine's load moves far less than the wall times), and the median durable SQLite commit measured in
the same folder: each job of the Jetbox chain includes one (its events and the next step's
AttemptScheduled), raw RQ none. Goals (issue 20): added latency p50 <= 3 ms, throughput >= 0.8x.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded import start_redis  # noqa: E402
from schema.ticket import MAX_STEPS  # noqa: E402

BIN = Path(sys.executable).parent


def _worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=ROOT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_result(job: Job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while job.get_status(refresh=True) != "finished":
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} not finished")
        time.sleep(0.0005)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_rq(url: str, n: int, tmp: Path, cpu: dict[str, float] | None = None) -> tuple[list[float], float]:
    """Raw RQ's per-job latency (enqueue, wait for the result, repeat) and throughput (n at once).
    `cpu`, when given, receives the worker's CPU seconds per job of the throughput run ("worker")."""
    conn = redis.Redis.from_url(url)
    q = Queue("raw", connection=conn, serializer=JSONSerializer)
    env = dict(os.environ)
    worker = _worker(
        [
            str(BIN / "rq"),
            "worker",
            "raw",
            "--url",
            url,
            "-w",
            "rq.worker.SimpleWorker",
            "--serializer",
            "rq.serializers.JSONSerializer",
            "--quiet",
        ],
        env,
        tmp / "raw.log",
    )
    try:
        _wait_result(q.enqueue_call(func="builtins.abs", args=(-1,)))  # warm up
        latencies = []
        for _ in range(n):
            t0 = time.perf_counter()
            _wait_result(q.enqueue_call(func="builtins.abs", args=(-1,)))
            latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        before = cpu_seconds(worker.pid)
        jobs = [q.enqueue_call(func="builtins.abs", args=(-i,)) for i in range(n)]
        for job in jobs:
            _wait_result(job, timeout=600)
        if cpu is not None:
            cpu["worker"] = (cpu_seconds(worker.pid) - before) / n
        return latencies, n / (time.perf_counter() - t0)
    finally:
        _stop(worker)


PLACED_STEP = ", queue: gpu, gpu_memory: 1G"
PLACED_WORKER = ["--queue", "gpu", "--name", "bench", "--node", "bench", "--gpus", "1", "--gpu-memory", "256G"]


def _ticket(tid: str, n: int, chain: bool, placed: bool = False) -> str:
    lines = [f"id: {tid}", "title: dispatch bench", "goal: measure", "steps:"]
    for i in range(n):
        needs = f", needs: [s{i - 1}]" if chain and i else ""
        lines.append(f"  - {{id: s{i}, kind: diag{needs}{PLACED_STEP if placed else ''}}}")
    return "\n".join(lines) + "\n"


def _events(db: Path, tid: str) -> list[tuple[str, datetime, dict]]:
    import json

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute("SELECT type, recorded_at, data FROM events WHERE stream = ? ORDER BY seq", (tid,)).fetchall()
    conn.close()
    return [(t, datetime.fromisoformat(r), json.loads(d)) for t, r, d in rows]


def _wait_done(db: Path, tid: str, timeout: float) -> list[tuple[str, datetime, dict]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                found = _events(db, tid)
            except sqlite3.OperationalError:
                found = []
            if any(t in ("TicketCompleted", "TicketFailed") for t, _, _ in found):
                return found
        time.sleep(0.05)
    raise TimeoutError(f"{tid} did not finish")


def jetbox(
    url: str,
    n: int,
    tmp: Path,
    queue_limits: str | None = None,
    placed: bool = False,
    cpu: dict[str, float] | None = None,
) -> tuple[list[float], float]:
    """Jetbox's per-job latency (a chain of n steps) and throughput (n independent steps).
    `cpu`, when given, receives the CPU seconds per job of the throughput run ("worker", "daemon")."""
    home = tmp / ("home-placed" if placed else "home")
    (home / "tickets").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home), JETBOX_REDIS_URL=url)
    if queue_limits:  # the scheduling rules in the path (docs/SCHEDULING.md)
        env.update(JETBOX_QUEUE_LIMITS=queue_limits)
    daemon = _worker([str(BIN / "jbctl"), "daemon"], env, tmp / "daemon.log")
    how = PLACED_WORKER if placed else ["--queue", "cpu"]
    worker = _worker([str(BIN / "jbctl"), "worker", *how], env, tmp / f"worker{'-placed' if placed else ''}.log")
    db = home / "jetbox.db"
    try:
        if placed:  # the advert reaches the log before any step: every attempt is placed
            _wait_type(db, "WorkerAdvertised", 120)
        (home / "tickets" / "TICKET-0.yaml").write_text(_ticket("TICKET-0", 1, False, placed))  # warm up
        _wait_done(db, "TICKET-0", 120)
        (home / "tickets" / "TICKET-1.yaml").write_text(_ticket("TICKET-1", n, True, placed))
        chain = _wait_done(db, "TICKET-1", 60 + n)
        where = {d.get("worker") for t, _, d in chain if t == "AttemptScheduled"}
        assert where == ({"bench"} if placed else {None}), f"placement not as expected: {where}"
        starts = [at for t, at, _ in chain if t == "AttemptScheduled"]
        ends = [at for t, at, _ in chain if t == "AttemptSucceeded"]
        per_job = [(e - s).total_seconds() for s, e in zip(starts, ends, strict=True)]
        before = cpu_seconds(worker.pid), cpu_seconds(daemon.pid)
        (home / "tickets" / "TICKET-2.yaml").write_text(_ticket("TICKET-2", n, False, placed))
        # The intake (the file read and parsed, the ticket decided, its n + 1 events appended in one
        # commit) ends where its events become visible: what the daemon spent until then is the
        # intake's, what it spends after is dispatch's.
        seen_at, intake_cpu = _wait_visible(db, "TICKET-2", daemon.pid, 60)
        wide = _wait_done(db, "TICKET-2", 60 + n)
        if cpu is not None:  # (includes up to one 50 ms poll of _wait_done's)
            cpu["worker"] = (cpu_seconds(worker.pid) - before[0]) / n
            cpu["daemon"] = (cpu_seconds(daemon.pid) - before[1]) / n
            cpu["intake"] = (intake_cpu - before[1]) / n
            # Throughput from the moment the intake's commit was seen (at most a poll, ~2 ms, late):
            # dispatch alone, without the intake of the n-step ticket; raw RQ's span does include its
            # client's n enqueues.
            cpu["tput_after_intake"] = n / (wide[-1][1] - seen_at).total_seconds()
        span = (wide[-1][1] - wide[0][1]).total_seconds()
        return per_job, n / span
    finally:
        _stop(worker)
        _stop(daemon)


def _found(db: Path, sql: str, arg: str, timeout: float, every: float) -> None:
    """Poll the log (read-only) every `every` s until `sql` finds a row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                if conn.execute(sql, (arg,)).fetchone():
                    return
            finally:
                conn.close()
        except sqlite3.OperationalError:
            pass
        time.sleep(every)
    raise TimeoutError(f"no row for {sql!r} with {arg!r}")


def _wait_visible(db: Path, tid: str, pid: int, timeout: float) -> tuple[datetime, float]:
    """Poll (every ~2 ms) until ticket `tid`'s first event is committed; then the time (UTC, naive, as
    events record theirs) and the CPU seconds process `pid` had used by then."""
    _found(db, "SELECT 1 FROM events WHERE stream = ? LIMIT 1", tid, timeout, 0.002)
    return datetime.now(UTC).replace(tzinfo=None), cpu_seconds(pid)


def _wait_type(db: Path, type_: str, timeout: float) -> None:
    _found(db, "SELECT 1 FROM events WHERE type = ? LIMIT 1", type_, timeout, 0.05)


def durable_commit(folder: Path, n: int = 100) -> float:
    """Median seconds of one durable SQLite commit (WAL, synchronous=FULL) of one small row in `folder`:
    the disk's share of each Jetbox job in the chain, which records one commit per job and raw RQ none."""
    path = folder / "fsync-probe.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (x INTEGER)")
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return statistics.median(times)


def fs_type(path: Path) -> str:
    """The file system `path` is on (the longest mount point above it in /proc/mounts): `tmpfs` means
    the commits below never reach a disk."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The Jetbox side is one ticket with a step per job: at most a ticket's MAX_STEPS.
    parser.add_argument("--jobs", type=int, default=MAX_STEPS, help=f"jobs per side (1..{MAX_STEPS})")
    parser.add_argument("--queue-limits", help="JSON for the daemon's queue_limits, e.g. '{\"cpu\": 1}'")
    parser.add_argument("--placement", action="store_true", help="also run Jetbox with placement (see above)")
    parser.add_argument("--placed-first", action="store_true", help="with --placement: run the placed side first")
    parser.add_argument(
        "--dir",
        help="where the homes, Redis socket and the fsync probe go (default: the system's temporary folder); "
        "e.g. /dev/shm, a tmpfs, to see the code's cost without the disk's durable commit",
    )
    args = parser.parse_args()
    args.placement = args.placement or args.placed_first
    if not 1 <= args.jobs <= MAX_STEPS:
        parser.error(f"--jobs {args.jobs}: the Jetbox side runs one ticket, which holds 1..{MAX_STEPS} steps")
    keep = os.environ.get("JETBOX_BENCH_KEEP")
    raw_cpu: dict[str, float] = {}
    jb_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="jetbox-dispatch-", dir=args.dir) as tmp_name:
        tmp_name = keep or tmp_name
        tmp = Path(tmp_name)
        server = start_redis(tmp / "run")
        try:
            raw_lat, raw_tput = raw_rq(server.url, args.jobs, tmp, raw_cpu)
            server.stop()
            server = start_redis(tmp / "run")
            # `--placed-first`: the placed run before the plain one (the second run of a pair may gain
            # from warm caches: alternate the order between rounds to see it).
            order = [True, False] if args.placed_first else [False, True] if args.placement else [False]
            for placed in order:
                if placed:
                    pl_lat, pl_tput = jetbox(server.url, args.jobs, tmp, args.queue_limits, placed=True)
                else:
                    jb_lat, jb_tput = jetbox(server.url, args.jobs, tmp, args.queue_limits, cpu=jb_cpu)
                server.stop()
                server = start_redis(tmp / "run")
        finally:
            server.stop()
        commit = durable_commit(tmp)
        where = f"{tmp.parent} ({fs_type(tmp)})"
    print(
        f"jetbox bench/dispatch.py: {args.jobs} no-op jobs each way, one SimpleWorker-based worker, "
        f"{os.cpu_count()} cores, homes in {where}"
        + (f", queue_limits {args.queue_limits}" if args.queue_limits else "")
    )
    print(
        f"  raw RQ   latency p50 {1000 * statistics.median(raw_lat):7.2f} ms  p99 {1000 * _pct(raw_lat, 0.99):7.2f} ms"
        f"   throughput {raw_tput:8.1f} jobs/s"
    )
    print(
        f"  Jetbox   latency p50 {1000 * statistics.median(jb_lat):7.2f} ms  p99 {1000 * _pct(jb_lat, 0.99):7.2f} ms"
        f"   throughput {jb_tput:8.1f} jobs/s"
    )
    if args.placement:
        print(
            f"  placed   latency p50 {1000 * statistics.median(pl_lat):7.2f} ms  "
            f"p99 {1000 * _pct(pl_lat, 0.99):7.2f} ms   throughput {pl_tput:8.1f} jobs/s"
        )
        more = 1000 * (statistics.median(pl_lat) - statistics.median(jb_lat))
        ratio_p50 = statistics.median(pl_lat) / statistics.median(jb_lat)
        print(
            f"  placement vs Jetbox: p50 {more:+.2f} ms, p50 ratio {ratio_p50:.2f}, "
            f"throughput ratio {pl_tput / jb_tput:.2f}"
        )
    added = 1000 * (statistics.median(jb_lat) - statistics.median(raw_lat))
    ratio = jb_tput / raw_tput
    # Goals of issue 20: within 3 ms of raw RQ per job, and at least 0.8 of its throughput.
    print(f"  added latency per job (p50): {added:.2f} ms   goal <= 3 ms: {'met' if added <= 3 else 'not met'}")
    print(f"    of which one durable commit on this disk (SQLite WAL, synchronous=FULL, p50): {1000 * commit:.2f} ms")
    print(f"    added latency less that commit: {added - 1000 * commit:.2f} ms")
    print(f"  throughput ratio (Jetbox/raw): {ratio:.2f}   goal >= 0.80: {'met' if ratio >= 0.8 else 'not met'}")
    # The span above starts at the ticket's first event, whose time is taken as its intake's append
    # begins: the append and commit of its n + 1 events are inside it. Both figures, plainly:
    after = jb_cpu["tput_after_intake"]
    print(
        f"    from the intake's commit on (dispatch alone): {after:.1f} jobs/s, ratio {after / raw_tput:.2f} "
        "(raw RQ's span includes its client's enqueues)"
    )
    # CPU per job hardly depends on what else the machine runs; the wall figures above do.
    print(
        f"  CPU per job (throughput run): raw RQ worker {1000 * raw_cpu['worker']:.2f} ms; Jetbox worker "
        f"{1000 * jb_cpu['worker']:.2f} ms, daemon {1000 * jb_cpu['daemon']:.2f} ms (of which the intake of "
        f"the {args.jobs}-step ticket {1000 * jb_cpu['intake']:.2f} ms, dispatch "
        f"{1000 * (jb_cpu['daemon'] - jb_cpu['intake']):.2f} ms)"
    )


if __name__ == "__main__":
    main()
