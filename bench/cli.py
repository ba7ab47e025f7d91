#!/usr/bin/env python
"""`jbctl status` as a whole process, against the floor: what any Python CLI pays to print the table.

    .venv/bin/python bench/cli.py                 # 300 tickets, 15 runs of each (the figures in docs)
    .venv/bin/python bench/cli.py --quick         # a smoke run (seconds)
    .venv/bin/python bench/cli.py --baseline ../main   # and another checkout's `jbctl status`, same run

One run, same machine, same minutes: a fresh home with `--tickets` tickets recorded through the real
append path (bench/console.py's `fill`), then, interleaved so that load hits all alike, `--runs` new
processes each of
  - `jbctl status` (the console script, as a user types it);
  - the floor of issue #20: a typer + rich program that prints a table of the same shape (the same
    headers, as many rows) and reads nothing;
  - a bare floor: `python -c pass` with the same interpreter (Python's own start-up).
Prints p50 and p90 of each and the ratio of the p50s (`jbctl status` / typer+rich floor); the goal is
at most 1.5x. `python -X importtime -m cli.main status` shows where a slow start goes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLOOR = '''
import typer
from rich.console import Console
from rich.table import Table

HEADERS = ["TICKET", "STATE", "CURRENT STEP", "PROGRESS", "AGE", "WAITING ON / REASON"]


def main(rows: int = {rows}) -> None:
    table = Table(*HEADERS, box=None)
    for i in range(rows):
        row = ["running", "a (attempt 1, scheduled)", "0/2 tasks", "1d02h", "a cpu worker for a"]
        table.add_row(f"TICKET-{{i}}", *row)
    Console(width=140).print(table)
    print("daemon: not running on this home")


typer.run(main)
'''


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return (time.perf_counter() - t) * 1000


def run(tickets: int, runs: int, baseline: Path | None = None) -> float:
    from bench.console import fill

    jbctl = str(Path(sys.executable).parent / "jbctl")
    with tempfile.TemporaryDirectory(prefix="jetbox-bench-cli-") as tmp:
        home = Path(tmp)
        store, _ = fill(home, tickets)
        store.close()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}, "JETBOX_HOME": str(home)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
        shown = subprocess.run([jbctl, "status"], env=env, check=True, capture_output=True, text=True).stdout
        rows = sum(line.startswith("TICKET-") for line in shown.splitlines())
        floor = home / "floor.py"
        floor.write_text(FLOOR.format(rows=rows))
        cases = {
            "jbctl status": [jbctl, "status"],
            "floor: typer + rich table": [sys.executable, str(floor)],
            "bare: python -c pass": [sys.executable, "-c", "pass"],
        }
        envs = {name: env for name in cases}
        if baseline is not None:  # another checkout's `jbctl status` on the same home (e.g. main, before a change)
            cases["jbctl status, baseline"] = [jbctl, "status"]
            envs["jbctl status, baseline"] = {**env, "PYTHONPATH": str(baseline.resolve())}
        for name, cmd in cases.items():  # warm the page cache and .pyc files
            timed(cmd, envs[name])
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs):
            for name, cmd in cases.items():
                times[name].append(timed(cmd, envs[name]))
    print(f"{tickets} tickets ({rows} rows shown), {runs} runs of each, load {os.getloadavg()[0]:.2f}")
    for name, values in times.items():
        print(f"  {name:<28} p50 {pct(values, 50):7.1f} ms   p90 {pct(values, 90):7.1f} ms")
    ratio = pct(times["jbctl status"], 50) / pct(times["floor: typer + rich table"], 50)
    print(f"  ratio jbctl status / floor (p50): {ratio:.2f}x   (goal: at most 1.5x)")
    if baseline is not None:
        before = pct(times["jbctl status, baseline"], 50) / pct(times["floor: typer + rich table"], 50)
        print(f"  ratio baseline / floor (p50): {before:.2f}x   ({baseline})")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", type=int, default=300)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="20 tickets, 3 runs")
    parser.add_argument("--baseline", type=Path, help="also time this checkout's `jbctl status` (e.g. /work/main)")
    args = parser.parse_args()
    if args.quick:
        args.tickets, args.runs = 20, 3
    run(args.tickets, args.runs, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
