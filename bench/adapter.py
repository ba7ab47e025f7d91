"""TICKET-7's adapter, measured: the core reasoner as TICKET-2 trains it, then TICKET-7's adapter on top.

    python bench/adapter.py --seeds 3                      # the example tickets as they are
    python bench/adapter.py --seeds 3 --set max_steps=200 --synth givens=14
    python bench/adapter.py --seeds 2 --transpose --set max_steps=200 --set augment=false

`--transpose` gives the adapter a task the core cannot already do: every puzzle (and solution) is
transposed, so the 6x6 boxes are 3x2 instead of the 2x3 the core was trained on (a valid sudoku of
another geometry; the canonical keys, and so the train/test split, are unchanged). Sudoku
augmentation assumes 2x3 boxes, hence `augment=false` with it.

Runs the same job code the workers run (`run_synthesize`, `run_train`) with the steps' `with:` read
from `tickets/examples/TICKET-2.yaml` and `TICKET-7.yaml`, on one CPU thread. The core is trained
once (cached under `--work`); each seed re-runs TICKET-7's synthesis and adapter with that seed added
to the ticket's own (`seed` of the puzzles and of the adapter), and prints the adapter's metrics and
the wall-clock and CPU time of the ticket's steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schema.ticket import load_ticket
from workers.context import LocalContext
from workers.jobs import run_synthesize
from workers.ml_jobs import run_train

EXAMPLES = Path(__file__).resolve().parents[1] / "tickets" / "examples"


def _ctx(work: Path, name: str) -> LocalContext:
    """A job's context: its own folder, the one artifact store of the bench (where the core is)."""
    return LocalContext(workdir=work / name, artifact_root=work / "artifacts")


def _steps(ticket: str) -> dict[str, dict[str, Any]]:
    return {s.id: dict(s.with_) for s in load_ticket(EXAMPLES / f"{ticket}.yaml").steps}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def core_reasoner(work: Path) -> dict[str, Any]:
    """TICKET-2's puzzles and reasoner (cached in `work`): the `_core` a TICKET-7 job receives."""
    cached = work / "core.json"
    if cached.exists():
        return dict(json.loads(cached.read_text()))
    steps = _steps("TICKET-2")
    started = time.monotonic()
    data = run_synthesize(_ctx(work, "core-puzzles"), steps["puzzles"])
    result = run_train(_ctx(work, "core-train"), {**steps["train"], "_inputs": {"puzzles": data.outputs}})
    core = {"version": 1, "components": {"reasoner": {"checkpoint": result.outputs["checkpoint"]}}}
    print(f"core (TICKET-2 train) in {time.monotonic() - started:.0f} s: {result.metrics}", file=sys.stderr)
    cached.write_text(json.dumps(core))
    return core


def _transposed(work: Path, name: str, params: dict[str, Any], core: dict[str, Any]) -> dict[str, float]:
    """The adapter job's own code on the same puzzles, split as the job splits them, then transposed."""
    from workers.loading import load_dataset
    from workers.ml_jobs import _model_params, _split_sudoku
    from workers.train_adapter import AdapterParams, train_adapter

    ctx = _ctx(work, name)
    arrays = load_dataset(ctx, params)
    assert arrays is not None
    train, test = _split_sudoku(arrays, float(params.get("test_fraction", 0.2)))
    for part in (train, test):
        for key in ("puzzles", "solutions"):
            part[key] = np.ascontiguousarray(part[key].transpose(0, 2, 1))
    p = AdapterParams.model_validate(_model_params(params))
    core_path = Path(ctx.store.path(ctx.store.resolve(core["components"]["reasoner"]["checkpoint"])))
    metrics, _ = train_adapter(ctx, p, core_path, train, test)
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="offset of the first seed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/jetbox-bench-adapter"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the adapter's `with:`")
    ap.add_argument("--synth", action="append", default=[], metavar="KEY=VALUE", help="override the puzzles' params")
    ap.add_argument("--count", type=int, help="override the number of puzzles synthesized")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transpose", action="store_true", help="3x2 boxes: a distribution shift the core fails on")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    core = core_reasoner(args.work)
    steps = _steps("TICKET-7")
    adapt = {**steps["adapt"], **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    synth = dict(steps["puzzles"])
    if args.count:
        synth["count"] = args.count
    synth["params"] = {**synth.get("params", {}), **{k: _value(v) for k, v in (s.split("=", 1) for s in args.synth)}}
    print(f"puzzles: {json.dumps(synth)}\nadapt: {json.dumps(adapt)}")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run = f"run-{time.time_ns()}"
        started, cpu = time.monotonic(), time.process_time()
        data = run_synthesize(_ctx(args.work, f"{run}/puzzles"), {**synth, "seed": int(synth.get("seed", 0)) + seed})
        inputs = {"puzzles": data.outputs}
        params = {**adapt, "seed": int(adapt.get("seed", 0)) + seed, "_inputs": inputs, "_core": core}
        if args.transpose:
            m = _transposed(args.work, f"{run}/adapt", params, core)
        else:
            m = run_train(_ctx(args.work, f"{run}/adapt"), params).metrics
        m["wall_s"], m["cpu_s"] = time.monotonic() - started, time.process_time() - cpu
        rows.append(m)
        print(
            f"seed +{seed}: core blank {m['blank_acc_core']:.3f} -> {m['blank_acc']:.3f} "
            f"(gain {m['blank_acc_gain']:+.3f}), exact {m['exact_acc_core']:.3f} -> {m['exact_acc']:.3f} "
            f"(gain {m['exact_acc_gain']:+.3f}), {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} s CPU"
        )
    for key in ("blank_acc_gain", "exact_acc_gain", "wall_s", "cpu_s"):
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: mean {statistics.mean(values):+.4f} sd {sd:.4f} min {min(values):+.4f}")


if __name__ == "__main__":
    main()
