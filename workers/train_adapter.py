"""Working memory: train a low-rank adapter on the core's reasoner while the core stays frozen.

A `train` step with `adapter: {rank, alpha}` (and the ticket's `update: adapter`) loads the current
core's reasoner, wraps its linear layers (`workers/models/lora.py`), and trains only the deltas
with deep supervision (one optimiser step per segment, the carried state detached between them, as
the reasoner itself trains). It reports the held-out accuracy with and without the adapter, so the
gain is a metric a ticket can check, and stores the adapter, tied to the core checkpoint it was
trained on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from workers.context import JobContext
from workers.jobs import JobFailed
from workers.loading import load_reasoner
from workers.models.lora import adapter_state, add_adapters, load_adapter, trainable
from workers.train_reasoning import Inputs, Task, evaluate_model, sudoku_augment
from workers.training import save_atomic


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(4, ge=1, le=256)
    alpha: float = Field(8.0, gt=0)
    start: str | None = Field(
        default=None, description="an adapter (A-3, or the ticket that trained it) to start from instead of zero"
    )


class AdapterParams(BaseModel):
    """`with:` of a `train` step that trains an adapter on the core's reasoner."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["hrm", "trm", "direct"] = "trm"
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)


def _evaluate(model: Any, test: tuple[np.ndarray, np.ndarray], copy_givens: bool) -> dict[str, float]:
    n = test[0].shape[1]
    task = Task("sudoku", n, n)
    device = next(model.parameters()).device
    ev = evaluate_model(model, task, test, Inputs(None, device, 0, task), copy_givens)
    return {"exact_acc": float(ev["exact_acc"]), "blank_acc": float(ev["blank_acc"])}


def train_adapter(
    ctx: JobContext,
    params: AdapterParams,
    core_checkpoint: Path,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    start_from: Path | None = None,
) -> tuple[dict[str, float], Path]:
    """Train an adapter (from zero, or from the adapter file `start_from`); returns metrics (with the core
    alone beside them) and the adapter file."""
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model, info = load_reasoner(core_checkpoint)
    puzzles, solutions = train["puzzles"].astype(np.int64), train["solutions"].astype(np.int64)
    held = (test["puzzles"].astype(np.int64), test["solutions"].astype(np.int64))
    n = puzzles.shape[1]
    if n * n != info["cells"]:
        raise JobFailed(f"the core reasoner reads {info['cells']} cells; these puzzles have {n * n}")
    base = _evaluate(model, held, info["copy_givens"])
    add_adapters(model, params.adapter.rank, params.adapter.alpha)
    if start_from is not None:
        saved = torch.load(start_from, map_location="cpu", weights_only=False)
        if int(saved.get("rank", -1)) != params.adapter.rank:
            rank = params.adapter.rank
            raise JobFailed(f"the starting adapter has rank {saved.get('rank')}; this step asks for {rank}")
        try:
            load_adapter(model, saved["adapter"])
        except (ValueError, RuntimeError) as exc:
            raise JobFailed(f"the starting adapter does not fit the core reasoner: {exc}") from None
    start_metrics = _evaluate(model, held, info["copy_givens"]) if start_from is not None else None
    opt = torch.optim.AdamW(trainable(model), lr=params.lr, weight_decay=0.0)
    task = Task("sudoku", n, n)
    augment = sudoku_augment() if params.augment else None
    start = 0
    ckpt = ctx.workdir / "adapter-last.pt"
    if ctx.resume_from is not None and Path(ctx.resume_from).exists():
        saved = torch.load(ctx.resume_from, map_location="cpu", weights_only=False)
        load_adapter(model, saved["adapter"])
        opt.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        start = int(saved["step"])
    device = next(model.parameters()).device
    model.train()
    started, losses = time.monotonic(), []
    for step in range(start, params.max_steps):
        ctx.raise_if_cancelled()
        idx = rng.integers(0, len(puzzles), size=params.batch_size)
        x_np, y_np = puzzles[idx], solutions[idx]
        if augment is not None:
            x_np, y_np = augment(x_np, y_np, rng)
        x = torch.from_numpy(np.asarray(x_np).reshape(len(idx), -1)).to(device)
        target = task.target(torch.from_numpy(np.asarray(y_np).reshape(x.shape)).to(device))
        blank = ~task.given(x)
        state = model.initial_state(len(x))
        for _ in range(model.cfg.segments):
            state, out = model.segment(state, model.embed_input(x))
            loss = F.cross_entropy(out.logits[blank], target[blank])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        rate = (done - start) / max(1e-9, time.monotonic() - started)
        ctx.progress(done, params.max_steps, loss=losses[-1], eta_s=(params.max_steps - done) / max(rate, 1e-9))
        if done % params.checkpoint_every == 0 or done == params.max_steps:
            save_atomic(
                {
                    "adapter": adapter_state(model),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt,
            )
            ctx.checkpoint(ckpt, done)
    model.eval()
    tuned = _evaluate(model, held, info["copy_givens"])
    out_path = ctx.workdir / "adapter.pt"
    save_atomic(
        {
            "adapter": adapter_state(model),
            "rank": params.adapter.rank,
            "alpha": params.adapter.alpha,
            "base_checkpoint": str(core_checkpoint.name),
        },
        out_path,
    )
    metrics = {
        **tuned,
        "exact_acc_core": base["exact_acc"],
        "blank_acc_core": base["blank_acc"],
        "blank_acc_gain": tuned["blank_acc"] - base["blank_acc"],
        "exact_acc_gain": tuned["exact_acc"] - base["exact_acc"],
        "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "adapter_params": float(sum(p.numel() for p in trainable(model))),
    }
    if start_metrics is not None:
        metrics["blank_acc_start"] = start_metrics["blank_acc"]
    return metrics, out_path
