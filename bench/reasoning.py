"""The papers' table in small: direct vs hrm vs trm at equal parameter count and equal wall-clock budget.

    python bench/reasoning.py --minutes 2 --seeds 3            # 6x6 minimal sudoku, CPU
    python bench/reasoning.py --n 9 --minutes 2 --seeds 1 --device cuda --set d_model=256 --set batch_size=256

Each (model, seed) run trains for ``--minutes`` of wall-clock time on the same 1,000 training puzzles (with
on-the-fly symmetry augmentation) and is scored on held-out puzzles from the fabric's leak-free test split.
Prints a table: exact full-grid and blank-cell accuracy (mean ± sd over seeds), optimiser steps, puzzles seen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.context import LocalContext
from workers.train_reasoning import ReasonerTrainParams, Visual, glyph_render, train_reasoner

# Settings per model (shared architecture: same d_model and block count, so equal parameters). The
# recursive models run fewer supervision segments and recursions than the papers (16 segments, T=3, n=6):
# in a CPU budget of minutes, optimiser steps are what they lack (see docs/BENCHMARKS.md).
COMMON: dict[str, Any] = {"d_model": 64, "n_heads": 4, "n_layers": 2, "batch_size": 64, "lr": 3e-3,
                          "warmup_steps": 100, "loss_on": "blanks", "pos": "learned"}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "direct": {},
    "hrm": {"max_segments": 4, "segment_ramp": 400, "h_cycles": 2, "l_cycles": 2},
    "trm": {"max_segments": 4, "segment_ramp": 400, "h_cycles": 1, "l_cycles": 2},
}


def _shard(args: tuple[int, str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from workers.synth.sudoku import GENERATOR, SudokuParams

    n, split, shard, count = args
    arrays = GENERATOR.generate(SudokuParams(n=n, split=split), seed=0, shard=shard, count=count)  # type: ignore[arg-type]
    return arrays["puzzles"], arrays["solutions"]


def make_data(n: int, n_train: int, n_test: int, workers: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Minimal puzzles; train and test come from disjoint symmetry classes (the fabric's split)."""
    size = 50
    jobs = [(n, "train", i, min(size, n_train - i * size)) for i in range(-(-n_train // size))]
    jobs += [(n, "test", 10_000 + i, min(size, n_test - i * size)) for i in range(-(-n_test // size))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_shard, jobs))
    k = len(jobs) - (-(-n_test // size))
    train = tuple(np.concatenate([p[j] for p in parts[:k]]) for j in range(2))
    test = tuple(np.concatenate([p[j] for p in parts[k:]]) for j in range(2))
    return train, test


def per_segment(m: dict[str, float]) -> str:
    keys = sorted((k for k in m if k.startswith("blank_acc_seg")), key=lambda k: int(k[len("blank_acc_seg") :]))
    return " ".join(f"{m[k]:.3f}" for k in keys)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="training wall-clock budget of each run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=6, choices=[4, 6, 9])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--models", default="direct,hrm,trm")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for all models")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--visual",
        action="store_true",
        help="also run each model on visual sudoku: fabric glyphs (16 px) through a frozen random linear "
        "encoder, loss on all cells (the symbolic runs then use loss_on=all too, for a like-for-like pair)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    models = args.models.split(",")
    variants = [(m, False) for m in models] + ([(m, True) for m in models] if args.visual else [])
    if args.visual:
        overrides.setdefault("loss_on", "all")

    t0 = time.monotonic()
    train, test = make_data(args.n, args.train, args.test, workers=max(1, args.threads))
    blanks = float((train[0] == 0).mean())
    print(f"{args.n}x{args.n} minimal sudoku: {len(train[0])} train / {len(test[0])} test puzzles "
          f"({blanks:.0%} blank), made in {time.monotonic() - t0:.0f}s; "
          f"{args.minutes:g} min per run, {len(variants) * args.seeds} runs", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for model, visual in variants:
            kw = {**COMMON, **PRESETS.get(model, {}), **overrides, "model": model, "seed": seed,
                  "max_steps": 10**9, "max_seconds": 60 * args.minutes, "device": args.device,
                  "log_every": 50, "checkpoint_every": 10**9}  # fmt: skip
            params = ReasonerTrainParams.model_validate(kw)
            vis = None
            if visual:
                torch.manual_seed(seed)
                encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 64))
                vis = Visual(encoder, glyph_render(16))
            with tempfile.TemporaryDirectory() as tmp:
                m = train_reasoner(LocalContext(Path(tmp)), params, train, test, visual=vis)
            name = model + ("+visual" if visual else "")
            row = {"model": name, "seed": seed, **m}
            rows.append(row)
            print(f"  {name:6s} seed {seed}: exact {m['exact_acc']:.3f}  blank {m['blank_acc']:.3f}  "
                  f"steps {m['steps']:.0f}  puzzles {m['puzzles_seen']:.0f}  segments {m['mean_steps']:.1f}  "
                  f"blank by test-time segments {per_segment(m)}", flush=True)  # fmt: skip

    print()
    print("| model | params | exact acc | blank-cell acc | sup. steps (ACT) | optimiser steps | puzzles seen |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]

        def ms(key: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.mean(r[key] for r in rs)

        print(f"| {model} | {int(rs[0]['params']):,} | {ms('exact_acc')} | {ms('blank_acc')} | "
              f"{mean('mean_steps'):.1f} | {mean('steps'):,.0f} | {mean('puzzles_seen'):,.0f} |")  # fmt: skip
    print(f"\nchance on a blank cell: {1 / args.n:.3f}; total {time.monotonic() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
