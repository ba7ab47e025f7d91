"""Linear-probe quality of JEPA vs a random-init encoder vs raw pixels after a fixed time budget.

For each seed: generate a training set and a disjoint held-out set of shapes, time a few steps to turn
`--minutes` into a step count (the cosine schedule needs its length up front), train, then run the
evaluation job (trained vs random init vs pixels, same split, same run). Prints mean and spread over
seeds per label.

The budget is counted in CPU seconds of this process by default (`--budget-clock cpu`,
`time.process_time`, one torch thread): on a shared machine a wall-clock budget buys fewer steps the
busier it is, a CPU budget buys the same number whatever else runs. `--budget-clock wall` restores the
old behaviour.

The supervised reference (on by default for `--model jepa`; `--no-supervised` skips it): the same
encoder, same seed, data order, optimiser and schedule, trained with cross-entropy on the shape label
for the same budget (its steps calibrated on its own, cheaper, step), then probed by the same evaluation
job. The last line prints the JEPA's shape gain over random init as a ratio of the supervised gain.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.context import LocalContext
from workers.eval.encoders import evaluate_encoder
from workers.synth.shapes import MAX_OBJECTS, ShapesGenerator, ShapesParams
from workers.train_jepa import JepaTrainParams, train_jepa, train_supervised

LABELS = ["shape", "count", "position", "colour"]


@dataclass
class ClockContext(LocalContext):
    """A LocalContext whose progress entries also carry `clock`: CPU seconds of this process
    (`time.process_time`) or wall seconds, as `--budget-clock` says."""

    clock: Callable[[], float] = time.process_time

    def progress(self, step: int, total: int | None = None, **metrics: float) -> None:
        super().progress(step, total, clock=self.clock(), **metrics)


def clock_of(name: str) -> Callable[[], float]:
    return time.process_time if name == "cpu" else time.perf_counter


def seconds_per_step(params: JepaTrainParams, data: dict[str, Any], clock: str, probe_steps: int = 16) -> float:
    """Budget-clock seconds per JEPA step, from a short run (the first step, with its warm-up, left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ClockContext(Path(tmp), clock=clock_of(clock))
        train_jepa(ctx, params.model_copy(update={"steps": probe_steps, "checkpoint_every": 10**9}), data)
        log = ctx.progress_log
        return float(log[-1]["clock"] - log[0]["clock"]) / (len(log) - 1)


def supervised_seconds_per_step(params: JepaTrainParams, data: dict[str, Any], clock: str,
                                probe_steps: int = 16) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        times = train_supervised(params.model_copy(update={"steps": probe_steps}), data, "shape",
                                 Path(tmp) / "probe.pt", clock_of(clock))["step_times"]
        return float(times[-1] - times[0]) / (len(times) - 1)


def budget_steps(args: argparse.Namespace, per_step: float) -> int:
    return args.steps or max(50, int(args.minutes * 60 / per_step))


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    base = JepaTrainParams(preset=args.preset, seed=seed, batch_size=args.batch, lr=args.lr,
                           arch=json.loads(args.arch), text=json.loads(args.text), model=args.model)
    size = base.image_config().img_size
    gen = ShapesGenerator()
    shapes = ShapesParams(size=size, **({"max_objects": args.objects} if args.objects else {}))
    train = gen.generate(shapes, 1000 + seed, 0, args.train_size)
    held_out = gen.generate(shapes, 2000 + seed, 0, args.eval_size)
    clock = clock_of(args.budget_clock)
    steps = budget_steps(args, 0.0 if args.steps else seconds_per_step(base, train, args.budget_clock))
    params = base.model_copy(update={"steps": steps, "warmup_steps": max(10, steps // 10),
                                     "checkpoint_every": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp))
        t0, c0 = time.perf_counter(), clock()
        metrics = train_jepa(ctx, params, train)
        train_s, train_clock = time.perf_counter() - t0, clock() - c0
        report = evaluate_encoder(ctx, {"labels": LABELS, "seed": seed}, ctx.checkpoints[-1][0], held_out)
        report.update(steps=float(steps), train_s=train_s, train_clock_s=train_clock,
                      final_loss=metrics["final_loss"])
        if args.supervised:
            sup_steps = budget_steps(args, 0.0 if args.steps else
                                     supervised_seconds_per_step(base, train, args.budget_clock))
            sup_params = params.model_copy(update={"steps": sup_steps, "warmup_steps": max(10, sup_steps // 10)})
            c0 = clock()
            train_supervised(sup_params, train, "shape", Path(tmp) / "supervised.pt", clock)
            sup_clock = clock() - c0
            sup = evaluate_encoder(ctx, {"labels": LABELS, "seed": seed}, Path(tmp) / "supervised.pt", held_out)
            report.update({f"sup_{k}": v for k, v in sup.items() if not k.endswith(("_random", "_pixels"))})
            report.update(sup_steps=float(sup_steps), sup_train_clock_s=sup_clock)
            report["shape_linear_ratio"] = report["shape_linear_gain"] / report["sup_shape_linear_gain"]
    keys = ["shape_linear", "shape_linear_random", "shape_linear_pixels", "count_linear", "count_linear_random",
            "position_linear", "position_linear_random", "rankme", "rankme_random"]
    if args.supervised:
        keys += ["sup_shape_linear", "shape_linear_ratio"]
    if args.model == "jepa-text":
        keys += [f"{d}_{hit}_r1{s}" for d in ("i2t", "t2i") for hit in ("attr", "caption") for s in ("", "_random")]
    sup_note = f", supervised {report['sup_steps']:.0f} steps in {report['sup_train_clock_s']:.0f}s" \
        if args.supervised else ""
    print(f"seed {seed}: {steps} steps in {train_clock:.0f}s {args.budget_clock} ({train_s:.0f}s wall){sup_note}, "
          + " ".join(f"{k}={report[k]:.3f}" for k in keys), flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per seed (see --budget-clock)")
    ap.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: --minutes are CPU minutes of the training process (time.process_time, the "
                         "same under load); wall: wall-clock minutes (depends on what else runs)")
    ap.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the same encoder with cross-entropy on the shape label, same budget, "
                         "same probe, and print the JEPA's shape gain as a ratio of its gain")
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
    ap.add_argument("--objects", type=int, choices=range(1, MAX_OBJECTS + 1), default=None,
                    help="at most this many objects per image (the generator's default: 1-3); with 1 the "
                         "shape label names the only object, not the largest of several")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per seed")
    ap.add_argument("--parallel", type=int, default=1,
                    help="seeds trained at once in separate processes (each calibrates its steps while the "
                         "others run, so every seed gets the same share of the machine)")
    ap.add_argument("--json", type=Path, help="also write all per-seed reports here")
    args = ap.parse_args()
    if args.model != "jepa":
        args.supervised = False  # the reference trains an image encoder on the shape label
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

    budget = f"steps={args.steps}" if args.steps else f"minutes={args.minutes} ({args.budget_clock})"
    print(f"\npreset={args.preset} model={args.model} arch={args.arch} {budget} train={args.train_size} "
          f"seeds={args.seeds} steps≈{statistics.mean(r['steps'] for r in reports):.0f}")
    print(f"{'label':10s} {'JEPA':>15s} {'random init':>15s} {'pixels':>15s} {'gain vs random':>15s}")
    for lab in LABELS:
        for probe in ("linear", "knn"):
            k = f"{lab}_{probe}"
            print(f"{k:17s} {stat(k):>15s} {stat(k + '_random'):>15s} {stat(k + '_pixels'):>15s} "
                  f"{stat(k + '_gain'):>15s}")
    print(f"{'rankme':17s} {stat('rankme'):>15s} {stat('rankme_random'):>15s} {stat('rankme_pixels'):>15s}")
    if args.supervised:
        print(f"\nsupervised reference (cross-entropy on shape, same encoder, same budget, "
              f"steps≈{statistics.mean(r['sup_steps'] for r in reports):.0f}):")
        print(f"{'label':17s} {'supervised':>15s} {'gain vs random':>15s} {'JEPA gain':>15s}")
        for lab in LABELS:
            key = f"{lab}_linear"
            print(f"{key:17s} {stat('sup_' + key):>15s} {stat('sup_' + key + '_gain'):>15s} "
                  f"{stat(key + '_gain'):>15s}")
        mean_ratio = statistics.mean(r["shape_linear_gain"] for r in reports) / statistics.mean(
            r["sup_shape_linear_gain"] for r in reports)
        per_seed = ", ".join(f"{r['shape_linear_ratio']:.2f}" for r in reports)
        print(f"shape gain, JEPA / supervised: {mean_ratio:.2f} (ratio of the means; per seed {per_seed})")
    if args.model == "jepa-text":
        print(f"\ntext={args.text}")
        print(f"{'retrieval':17s} {'trained':>15s} {'random init':>15s} {'chance':>15s} {'gain vs random':>15s}")
        for d in ("i2t", "t2i"):
            for hit in ("attr", "caption"):
                for rank in (1, 5):
                    n = f"{d}_{hit}_r{rank}"
                    print(f"{n:17s} {stat(n):>15s} {stat(n + '_random'):>15s} {stat(n + '_chance'):>15s} "
                          f"{stat(n + '_gain'):>15s}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
