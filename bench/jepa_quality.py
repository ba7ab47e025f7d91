"""Linear-probe quality of JEPA vs a random-init encoder vs raw pixels after a fixed time budget.

For each seed: generate a training set and a disjoint held-out set of shapes, time a few steps to turn
`--minutes` into a step count (the cosine schedule needs its length up front), train, then run the
evaluation job (trained vs random init vs pixels, same split, same run). Prints mean and spread over
seeds per label.

    python bench/jepa_quality.py --minutes 10 --seeds 3
    python bench/jepa_quality.py --minutes 10 --seeds 3 --parallel 3   # needs 3 free cores
    python bench/jepa_quality.py --minutes 2 --seeds 1 --arch '{"sigreg_weight": 0.3}'

Cross-modal retrieval of `jepa-text` at the demo's budget (TICKET-1's 2,000 images and 200 steps; held
out: 1,000 images, 300 of them queries), image->text and text->image recall@1 with attribute-set and
exact-caption hits against the random-init twin and chance:

    python bench/jepa_quality.py --model jepa-text --steps 200 --train-size 2000 --eval-size 1000 \
        --seeds 3 --text '{"align": "infonce"}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from workers.context import LocalContext
from workers.eval.encoders import evaluate_encoder
from workers.synth.shapes import ShapesGenerator, ShapesParams
from workers.train_jepa import JepaTrainParams, train_jepa

LABELS = ["shape", "count", "position", "colour"]


def seconds_per_step(params: JepaTrainParams, data: dict[str, Any], probe_steps: int = 12) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp))
        train_jepa(ctx, params.model_copy(update={"steps": probe_steps, "checkpoint_every": 10**9}), data)
        log = ctx.progress_log
        return (log[-1]["time"] - log[1]["time"]) / (len(log) - 2)


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    base = JepaTrainParams(preset=args.preset, seed=seed, batch_size=args.batch, lr=args.lr,
                           arch=json.loads(args.arch), text=json.loads(args.text), model=args.model)
    size = base.image_config().img_size
    gen = ShapesGenerator()
    train = gen.generate(ShapesParams(size=size), 1000 + seed, 0, args.train_size)
    held_out = gen.generate(ShapesParams(size=size), 2000 + seed, 0, args.eval_size)
    steps = args.steps or max(50, int(args.minutes * 60 / seconds_per_step(base, train)))
    params = base.model_copy(update={"steps": steps, "warmup_steps": max(10, steps // 10),
                                     "checkpoint_every": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp))
        t0 = time.perf_counter()
        metrics = train_jepa(ctx, params, train)
        train_s = time.perf_counter() - t0
        report = evaluate_encoder(ctx, {"labels": LABELS, "seed": seed}, ctx.checkpoints[-1][0], held_out)
    report.update(steps=float(steps), train_s=train_s, final_loss=metrics["final_loss"])
    keys = ["shape_linear", "shape_linear_random", "shape_linear_pixels", "count_linear", "count_linear_random",
            "rankme", "rankme_random"]
    if args.model == "jepa-text":
        keys += [f"{d}_{hit}_r1{s}" for d in ("i2t", "t2i") for hit in ("attr", "caption") for s in ("", "_random")]
    print(f"seed {seed}: {steps} steps in {train_s:.0f}s, " + " ".join(f"{k}={report[k]:.3f}" for k in keys),
          flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "rtx3090"])
    ap.add_argument("--model", default="jepa", choices=["jepa", "jepa-text"])
    ap.add_argument("--arch", default="{}", help="JSON overrides of JepaConfig")
    ap.add_argument("--text", default="{}", help="JSON overrides of TextConfig (jepa-text)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-size", type=int, default=8000)
    ap.add_argument("--eval-size", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per seed")
    ap.add_argument("--parallel", type=int, default=1,
                    help="seeds trained at once in separate processes (each calibrates its steps while the "
                         "others run, so every seed gets the same share of the machine)")
    ap.add_argument("--json", type=Path, help="also write all per-seed reports here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.parallel > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(args.threads,)) as pool:
            reports = list(pool.map(run_seed, seeds, [args] * args.seeds))
    else:
        reports = [run_seed(seed, args) for seed in seeds]

    def stat(key: str) -> str:
        vals = [r[key] for r in reports]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {spread:.3f}"

    budget = f"steps={args.steps}" if args.steps else f"minutes={args.minutes}"
    print(f"\npreset={args.preset} model={args.model} arch={args.arch} {budget} train={args.train_size} "
          f"seeds={args.seeds} steps≈{statistics.mean(r['steps'] for r in reports):.0f}")
    print(f"{'label':10s} {'JEPA':>15s} {'random init':>15s} {'pixels':>15s} {'gain vs random':>15s}")
    for lab in LABELS:
        for probe in ("linear", "knn"):
            k = f"{lab}_{probe}"
            print(f"{k:17s} {stat(k):>15s} {stat(k + '_random'):>15s} {stat(k + '_pixels'):>15s} "
                  f"{stat(k + '_gain'):>15s}")
    print(f"{'rankme':17s} {stat('rankme'):>15s} {stat('rankme_random'):>15s} {stat('rankme_pixels'):>15s}")
    if args.model == "jepa-text":
        print(f"\ntext={args.text}")
        print(f"{'retrieval':17s} {'trained':>15s} {'random init':>15s} {'chance':>15s} {'gain vs random':>15s}")
        for d in ("i2t", "t2i"):
            for hit in ("attr", "caption"):
                for k in (1, 5):
                    n = f"{d}_{hit}_r{k}"
                    print(f"{n:17s} {stat(n):>15s} {stat(n + '_random'):>15s} {stat(n + '_chance'):>15s} "
                          f"{stat(n + '_gain'):>15s}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
