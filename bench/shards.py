"""Subtask benchmark: one synthesize step as 1 shard on 1 worker against 4 shards on 2 workers.

    .venv/bin/python bench/shards.py                 # 20,000 shapes images, 3 rounds (docs/BENCHMARKS.md)
    .venv/bin/python bench/shards.py --count 2000 --rounds 1   # a quick run

One run: a private Redis, a real `jbctl daemon` and two `jbctl worker --queue cpu` processes, both
warmed up first. Each round submits the same step (shapes, `count` images in 4 shard files) twice:
`shards: 1` (one job: it runs on one worker, the other has nothing to take), then `shards: 4` (four
subtasks over the two workers, then the join). Time = TicketSubmitted to
TicketCompleted, from the events' recorded times (dispatch, reports and the join included). Both
tickets' manifests must list the same shard files, and each must be byte-identical to what
`synthesize` writes for that step (same lineage and time). The machine's load is printed: the
speed-up needs two idle cores.

`--breakdown` prints, per sharded round, where the time between the work went: the events'
recorded times (the daemon's commits) beside the report stream's entry ids (Redis's clock at each
worker's XADD, the same host), median ms over the rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import _stop, _worker  # noqa: E402
from cli.embedded import start_redis  # noqa: E402
from schema.artifact_store import ArtifactStore  # noqa: E402
from schema.wire import REPORT_STREAM  # noqa: E402

BIN = Path(sys.executable).parent


def _ticket(tid: str, count: int, shards: int) -> str:
    size = -(-count // 4)
    return (
        f"id: {tid}\ntitle: shards bench\ngoal: measure fan-out\nsteps:\n"
        # cache: false: every round generates (the step cache would reuse the first round's dataset)
        f"  - {{id: data, kind: synthesize, shards: {shards}, cache: false, "
        f"with: {{generator: shapes, count: {count}, shard_size: {size}}}}}\n"
    )


def _events(db: Path, tid: str) -> list[tuple[str, datetime, dict]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute("SELECT type, recorded_at, data FROM events WHERE stream = ? ORDER BY seq", (tid,)).fetchall()
    conn.close()
    return [(t, datetime.fromisoformat(r), json.loads(d)) for t, r, d in rows]


def _run(home: Path, tid: str, count: int, shards: int, timeout: float = 600) -> tuple[float, str, float]:
    """Submit, wait for the end; (seconds from submission to completion, the dataset's manifest id, the
    step's `seconds` metric: the generation time of its job, or of its subtasks summed, plus the join)."""
    db = home / "jetbox.db"
    (home / "tickets" / f"{tid}.yaml").write_text(_ticket(tid, count, shards))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = _events(db, tid) if db.exists() else []
        except sqlite3.OperationalError:
            found = []
        if any(t == "TicketFailed" for t, _, _ in found):
            raise RuntimeError(f"{tid} failed: {found[-1][2]}")
        if any(t == "TicketCompleted" for t, _, _ in found):
            span = (found[-1][1] - found[0][1]).total_seconds()
            # the step's result: its job's (one shard, or a join job), or the decider's join of the shards
            step = next(d for t, _, d in found if t in ("AttemptSucceeded", "ShardsJoined") and d["task"] == "data")
            return span, step["outputs"]["dataset"], float(step["metrics"]["seconds"])
        time.sleep(0.05)
    raise TimeoutError(f"{tid} did not finish")


def _breakdown(db: Path, tid: str, reports: list[tuple[float, dict]]) -> dict[str, float]:
    """Milliseconds spent outside the work in one sharded round (see `--breakdown`)."""
    evs = _events(db, tid)
    t0 = evs[0][1].timestamp()
    at = {(t, d.get("task")): r.timestamp() - t0 for t, r, d in evs}
    mine = [(ts - t0, r) for ts, r in reports if r["ticket"] == tid]
    sent = {(r["kind"], r["task"]): ts for ts, r in mine}
    subs = sorted({r["task"] for _, r in mine if r["task"] != "data"})
    out = {"submit -> first started (dispatch, dequeue, job set-up)": min(sent[("started", t)] for t in subs)}
    gaps, lags = [], []
    by_worker: dict[str, list[tuple[float, dict]]] = {}
    for ts, r in mine:
        by_worker.setdefault(r["worker"], []).append((ts, r))
    for seq in by_worker.values():
        for (a, ra), (b, rb) in itertools.pairwise(seq):
            if ra["kind"] == "succeeded" and rb["kind"] == "started":
                gaps.append(b - a)  # the worker between two jobs: RQ's bookkeeping, dequeue, set-up
    for t in subs:
        lags.append(at[("AttemptSucceeded", t)] - sent[("succeeded", t)])
    last = max(sent[("succeeded", t)] for t in subs)
    out["worker: result sent -> next job started (mean)"] = statistics.mean(gaps) if gaps else 0.0
    out["inbox: subtask result sent -> recorded (mean)"] = statistics.mean(lags)
    if ("ShardsJoined", "data") in at:  # joined by the decider: no job
        out["last subtask result sent -> joined (ShardsJoined)"] = at[("ShardsJoined", "data")] - last
        out["joined -> ticket completed"] = at[("TicketCompleted", None)] - at[("ShardsJoined", "data")]
    else:  # a join job (the code before ShardsJoined, for A/B runs)
        out["last subtask result sent -> join scheduled"] = at[("AttemptScheduled", "data")] - last
        out["join scheduled -> join started"] = sent[("started", "data")] - at[("AttemptScheduled", "data")]
        out["join's own run (started -> result sent)"] = sent[("succeeded", "data")] - sent[("started", "data")]
        out["join result sent -> ticket completed"] = at[("TicketCompleted", None)] - sent[("succeeded", "data")]
    out["last subtask result sent -> ticket completed (the join, all told)"] = at[("TicketCompleted", None)] - last
    ends = [
        max(ts for ts, r in seq if r["kind"] == "succeeded" and r["task"] in subs)
        for seq in by_worker.values()
        if any(r["task"] in subs for _, r in seq)
    ]
    out["idle worker waiting for the other's last shard"] = max(ends) - min(ends) if len(ends) > 1 else 0.0
    return {k: v * 1000 for k, v in out.items()}


def _reports(url: str) -> list[tuple[float, dict]]:
    """Every report in the stream with the time Redis took it (the entry id's milliseconds)."""
    import redis

    conn = redis.Redis.from_url(url)
    out = []
    for mid, f in conn.xrange(REPORT_STREAM):
        at = int(mid.split(b"-")[0]) / 1000
        if b"bundle" in f:  # a job's reports sent together (docs/DISPATCH.md, "Bundled reports")
            out += [(at, report) for report in json.loads(f[b"bundle"])]
        elif b"report" in f:
            out.append((at, json.loads(f[b"report"])))
    return out


def _same_as_one_job(store: ArtifactStore, manifest_id: str, scratch: Path) -> bool:
    """The manifest is byte for byte what one `synthesize` call writes for the step (same lineage and
    time: the only fields that name who wrote it and when)."""
    from workers.synth.base import synthesize

    m = store.load_manifest(manifest_id)
    one = synthesize(
        m.generator, m.params, m.seed, m.count, m.shard_size, ArtifactStore(scratch), m.lineage, created_at=m.created_at
    )
    return one.to_bytes() == m.to_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="images per dataset (4 shard files)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="where the sharded rounds' overhead went")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jetbox-shards-") as tmp_name:
        tmp = Path(os.environ.get("JETBOX_BENCH_KEEP") or tmp_name)
        home = tmp / "home"
        (home / "tickets").mkdir(parents=True)
        server = start_redis(tmp / "run")
        env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
        env.update(JETBOX_HOME=str(home), JETBOX_REDIS_URL=server.url)
        jbctl = str(BIN / "jbctl")
        procs: list[subprocess.Popen[bytes]] = []
        one_s: list[float] = []
        four_s: list[float] = []
        work: dict[int, list[float]] = {1: [], 4: []}
        loads: list[float] = []
        try:
            procs.append(_worker([jbctl, "daemon"], env, tmp / "daemon.log"))
            for n in (1, 2):
                procs.append(_worker([jbctl, "worker", "--queue", "cpu"], env, tmp / f"worker{n}.log"))
            for w in range(2):  # warm up both workers (the generator's imports), not timed
                _run(home, f"TICKET-W{w}", 64, 2)
            datasets: list[str] = []
            for r in range(args.rounds):
                loads.append(os.getloadavg()[0])
                seconds, one_id, busy = _run(home, f"TICKET-A{r}", args.count, 1)
                one_s.append(seconds)
                work[1].append(busy)
                loads.append(os.getloadavg()[0])
                seconds, four_id, busy = _run(home, f"TICKET-B{r}", args.count, 4)
                four_s.append(seconds)
                work[4].append(busy)
                datasets += [one_id, four_id]
            parts: list[dict[str, float]] = []
            if args.breakdown:
                reports = _reports(server.url)
                parts = [_breakdown(home / "jetbox.db", f"TICKET-B{r}", reports) for r in range(args.rounds)]
            store = ArtifactStore(home / "artifacts")
            shard_lists = {tuple(s.id for s in store.load_manifest(d).shards) for d in datasets}
            identical = all(_same_as_one_job(store, d, tmp / f"one-{n}") for n, d in enumerate(datasets))
        finally:
            for proc in reversed(procs):
                _stop(proc)
            server.stop()
    one, four = statistics.median(one_s), statistics.median(four_s)
    ratio = one / four
    print(
        f"jetbox bench/shards.py: shapes, {args.count:,} images in 4 shard files, {args.rounds} round(s), "
        f"{os.cpu_count()} cores, 1-minute load {min(loads):.1f}..{max(loads):.1f}"
    )
    for name, spans, shards in (("1 shard  on 1 worker ", one_s, 1), ("4 shards on 2 workers", four_s, 4)):
        print(
            f"  {name}: median {statistics.median(spans):6.2f} s   ({', '.join(f'{s:.2f}' for s in spans)}); "
            f"the step's seconds metric (the work): median {statistics.median(work[shards]):.2f}"
        )
    print(
        f"  manifests: {'the same shard files' if len(shard_lists) == 1 else 'DIFFERENT shard files'}, "
        f"{'byte-identical to one synthesize call' if identical else 'NOT identical to one synthesize call'}"
    )
    print(f"  speed-up (1 shard / 4 shards): {ratio:.2f}x   goal >= 1.8x: {'met' if ratio >= 1.8 else 'not met'}")
    if parts:
        print("  overhead of the sharded rounds, median ms:")
        for name in parts[0]:
            print(f"    {name:58s} {statistics.median(p[name] for p in parts):7.1f}")
    if len(shard_lists) != 1 or not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
