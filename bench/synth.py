"""Synthetic data throughput on one core: `python bench/synth.py [--seconds S]`.

Prints shapes images/s, glyphs/s, sudoku puzzles/s per size (every puzzle checked unique by the
solver), canonical keys/s, mazes/s, questions/s, and the wall time of the demo datasets (2,000
shapes at 32x32 and 1,000 6x6 sudoku, written to a temporary store with their manifests).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from schema.artifact_store import ArtifactStore
from workers.synth.base import get_generator, synthesize
from workers.synth.sudoku import canonical_key, count_solutions, make_puzzle


def one_core() -> str:
    """Pin this process to a single CPU so the figures mean 'per core'."""
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def rate(work: Callable[[int], int], seconds: float, batch: int) -> float:
    """Items per second: repeat `work(batch)` (which returns items done) for about `seconds`."""
    work(max(1, batch // 10))  # warm-up
    done = 0
    start = time.perf_counter()
    while True:
        done += work(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def generator_rate(name: str, params: dict, seconds: float, batch: int) -> float:
    gen = get_generator(name)
    p = gen.Params.model_validate(params)
    shard = iter(range(10**9))

    def work(n: int) -> int:
        gen.generate(p, 0, next(shard), n)
        return n

    return rate(work, seconds, batch)


def sudoku_rate(n: int, givens: int | None, seconds: float) -> float:
    rng = np.random.default_rng(0)

    def work(k: int) -> int:
        for _ in range(k):
            puzzle, _ = make_puzzle(n, givens, rng)
            if count_solutions(puzzle) != 1:
                raise AssertionError("generated a puzzle without a unique solution")
        return k

    return rate(work, seconds, {4: 200, 6: 50, 9: 3}[n])


def canonical_rate(n: int, seconds: float) -> float:
    puzzles = [make_puzzle(n, None, np.random.default_rng(i))[0] for i in range(20)]

    def work(k: int) -> int:
        for i in range(k):
            canonical_key(puzzles[i % len(puzzles)])
        return k

    return rate(work, seconds, {4: 200, 6: 50, 9: 5}[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    pinned = one_core()
    s = args.seconds
    print(f"# bench/synth.py — Python {platform.python_version()}, numpy {np.__version__}, "
          f"{platform.machine()}, {pinned}, {s:.0f} s per figure")
    rows: list[tuple[str, float, str]] = [
        ("shapes 32x32 (1-3 objects)", generator_rate("shapes", {"size": 32}, s, 1000), "images/s"),
        ("shapes 64x64 (1-3 objects)", generator_rate("shapes", {"size": 64}, s, 500), "images/s"),
        ("glyphs 28x28", generator_rate("glyphs", {"size": 28}, s, 1000), "glyphs/s"),
        ("glyphs 16x16", generator_rate("glyphs", {"size": 16}, s, 1000), "glyphs/s"),
    ]
    for n in (4, 6, 9):
        rows.append((f"sudoku {n}x{n} minimal, uniqueness checked", sudoku_rate(n, None, s), "puzzles/s"))
    rows.append(("sudoku 9x9, 30 givens, uniqueness checked", sudoku_rate(9, 30, s), "puzzles/s"))
    for n in (4, 6, 9):
        rows.append((f"sudoku {n}x{n} canonical key", canonical_rate(n, s), "keys/s"))
    rows += [
        ("maze 15x15", generator_rate("maze", {"height": 15, "width": 15}, s, 200), "mazes/s"),
        ("maze 31x31", generator_rate("maze", {"height": 31, "width": 31}, s, 100), "mazes/s"),
        ("maze 31x31 hard", generator_rate("maze", {"height": 31, "width": 31, "hard": True}, s, 50), "mazes/s"),
        ("text questions", generator_rate("text", {}, s, 2000), "questions/s"),
        ("visual sudoku 6x6, 28px cells", generator_rate("visual_sudoku", {"n": 6}, s, 20), "puzzles/s"),
    ]
    print()
    print("| what | rate |")
    print("|---|---|")
    for what, value, unit in rows:
        print(f"| {what} | {value:,.0f} {unit} |" if value >= 10 else f"| {what} | {value:.1f} {unit} |")

    print()
    print("| demo dataset (synthesize into a store, with manifest) | seconds |")
    print("|---|---|")
    when = datetime(2026, 1, 1, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp))
        total = 0.0
        for label, name, params, count in [("2,000 shapes 32x32", "shapes", {"size": 32}, 2000),
                                           ("1,000 sudoku 6x6", "sudoku", {"n": 6}, 1000)]:
            start = time.perf_counter()
            synthesize(name, params, 0, count, 500, store, created_at=when)
            took = time.perf_counter() - start
            total += took
            print(f"| {label} | {took:.2f} |")
        print(f"| both, one core | {total:.2f} |")


if __name__ == "__main__":
    main()
