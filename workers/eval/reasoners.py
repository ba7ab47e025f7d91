"""Evaluating a trained reasoner (HRM, TRM or the direct baseline) on held-out puzzles or mazes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from workers.context import JobContext
from workers.models.reasoners import ReasonerConfig, build_reasoner, count_params
from workers.train_reasoning import (
    Inputs,
    ReasonerTrainParams,
    Visual,
    as_grids,
    evaluate_model,
    report_metrics,
)
from workers.training import load_checkpoint, pick_device


def evaluate_reasoner(
    ctx: JobContext,
    params: ReasonerTrainParams,
    checkpoint_path: Path | str,
    test_data: Any,
    *,
    visual: Visual | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint (its EMA weights when present) on ``test_data``; the model is rebuilt from the
    configuration stored in the checkpoint, so ``params`` only supplies evaluation settings."""
    sd = load_checkpoint(Path(checkpoint_path))
    cfg = ReasonerConfig(**sd["model_config"])
    task, test = as_grids(test_data)
    if (task.cells, task.n_classes) != (cfg.seq_len, cfg.n_classes):
        raise ValueError(f"checkpoint is for {cfg.seq_len} cells / {cfg.n_classes} classes, data is {task}")
    device = pick_device(params.device)
    inputs = Inputs(visual, device, params.seed, task)
    model = build_reasoner(replace(cfg)).to(device)
    model.load_state_dict(sd["ema"] if sd.get("ema") is not None else sd["model"])
    copy_givens = sd["params"].get("loss_on", "blanks") == "blanks"
    ev = evaluate_model(model, task, test, inputs, copy_givens, params.eval_batch_size, params.eval_segments)
    return report_metrics(ctx, cfg.kind, ev, {"params": float(count_params(model))})
