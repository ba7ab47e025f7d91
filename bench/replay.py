#!/usr/bin/env python
"""The daemon's start-up replay (`daemon.handler.load_state`) of one log, this tree against another
(a checkout of main, say), each in a process of its own, rounds alternating; CPU seconds, wall
seconds, peak RSS and the tickets held whole after it.

    .venv/bin/python bench/replay.py --log /tmp/log1m.db --baseline /path/to/main
    .venv/bin/python bench/replay.py --events 200000            # generate a log first (bench/store.py's)
    .venv/bin/python bench/replay.py --log L --profile          # and a cProfile of this tree's replay
    .venv/bin/python bench/replay.py --log L --full             # this tree's fold of every event too

The log is `bench/store.py`'s realistic one (TICKET-1's pipeline over and over: 94 % progress
reports), written straight into SQLite with the real chain hashes. CPU seconds are what to compare
on a shared machine: wall clock there is mostly waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time
from daemon.handler import load_state
from schema.store import EventStore
store = EventStore("sqlite:///" + sys.argv[1])
profile = cProfile.Profile() if sys.argv[2] == "1" else None
if profile:
    profile.enable()
wall, cpu = time.perf_counter(), time.process_time()
state = load_state(store, full=True) if sys.argv[3] == "1" else load_state(store)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
if profile:
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue(), file=sys.stderr)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
held = len(state.tickets)
print(json.dumps({"wall": wall, "cpu": cpu, "rss": rss, "events": state.last_seq, "held": held}))
"""


def replay(tree: Path, log: Path, profile: bool, full: bool = False) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-c", CHILD, str(log), "1" if profile else "0", "1" if full else "0"]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"replay with {tree} failed:\n{done.stderr[-3000:]}")
    if profile:
        print(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="a log written by bench/store.py (kept; made when missing)")
    parser.add_argument("--events", type=int, default=1_000_000, help="events of a log made here")
    parser.add_argument("--baseline", type=Path, help="another tree to compare with (e.g. a checkout of main)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile this tree's replay once, at the end")
    parser.add_argument(
        "--full", action="store_true", help="also this tree's fold of every event, decoded whole (load_state full=True)"
    )
    args = parser.parse_args()
    log = args.log or Path(tempfile.mkdtemp(prefix="jetbox-replay-")) / "log.db"
    if not log.exists():
        sys.path.insert(0, str(ROOT))
        from bench.store import generate_log

        print(f"generating {args.events:,} events into {log}", flush=True)
        generate_log(log, args.events)
    trees = {"this tree": (ROOT, False)} | ({"full fold": (ROOT, True)} if args.full else {})
    trees |= {"baseline": (args.baseline.resolve(), False)} if args.baseline else {}
    best: dict[str, dict[str, float]] = {}
    for n in range(1, args.rounds + 1):
        for name, (tree, full) in trees.items():
            r = replay(tree, log, False, full)
            print(
                f"round {n} {name:<10} cpu {r['cpu']:6.2f} s  wall {r['wall']:7.2f} s  peak RSS {r['rss']:5.0f} MB  "
                f"{r['events']:,} events, {r['held']:,} tickets held whole",
                flush=True,
            )
            if name not in best or r["cpu"] < best[name]["cpu"]:
                best[name] = r
    mine = best["this tree"]
    print(f"this tree: {mine['cpu'] * 1e6 / mine['events']:.2f} us CPU per event (best of {args.rounds})")
    if "full fold" in best:
        print(f"CPU seconds, this tree / its full fold: {mine['cpu'] / best['full fold']['cpu']:.2f}")
    if "baseline" in best:
        base = best["baseline"]
        print(f"CPU seconds, this tree / baseline: {mine['cpu'] / base['cpu']:.2f}")
    if args.profile:
        replay(ROOT, log, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
