"""The model jobs `train` and `evaluate`, for JEPA encoders and reasoners (`infer`: `workers/inference.py`).

Each job resolves the step's data (a synthesize step it needs, or `sha256:<id>`), calls the
model code with the job context, stores the final checkpoint as an artifact, and returns metrics
(for acceptance checks) and outputs (for the steps that need it, and for proposals to the core).
torch is imported only when one of these jobs runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workers.context import JobContext
from workers.jobs import JobFailed, JobResult, finite_metrics, own_params
from workers.loading import checkpoint_path, core_checkpoint, load_dataset
from workers.synth.sudoku import split_of, split_puzzles

JEPA_MODELS = ("jepa", "jepa-text")
REASONERS = ("hrm", "trm", "direct")
COMPONENT = {
    "jepa": "image-encoder",
    "jepa-text": "image-text-encoder",
    "hrm": "reasoner",
    "trm": "reasoner",
    "direct": "reasoner",
}
ORCHESTRATION_KEYS = ("data", "train_data", "test_data", "checkpoint", "test_fraction", "_core", "visual", "suite")


class _LastCheckpoint:
    """Wraps a context to remember the last checkpoint the model code reported."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self.last: Path | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def checkpoint(self, path: Path, step: int) -> None:
        self.last = Path(path)
        self._ctx.checkpoint(path, step)


def _finish_training(
    ctx: JobContext, tracked: _LastCheckpoint, model: str, metrics: dict[str, float], extra: dict[str, Any]
) -> JobResult:
    if tracked.last is None or not tracked.last.exists():
        raise JobFailed(f"{model} training reported no checkpoint")
    artifact = ctx.artifact(tracked.last, "checkpoint", {"model": model, **extra})
    outputs = {"checkpoint": artifact, "component": COMPONENT[model], "model": model}
    return JobResult(metrics=finite_metrics(metrics), outputs=outputs)


def _split_sudoku(arrays: dict[str, np.ndarray], test_fraction: float) -> tuple[dict, dict]:
    """Train/test by canonical key: every symmetry class lands in one split (no leaks)."""
    if "key" in arrays:
        test = np.array([split_of(str(k), test_fraction) == "test" for k in arrays["key"]], dtype=bool)
    else:
        test = split_puzzles(arrays["puzzles"], test_fraction)
    if test.all() or not test.any():
        raise JobFailed(f"the dataset is too small to split at test_fraction={test_fraction}")
    return {k: v[~test] for k, v in arrays.items()}, {k: v[test] for k, v in arrays.items()}


def _reasoner_data(ctx: JobContext, params: dict[str, Any]) -> tuple[Any, Any]:
    train = load_dataset(ctx, params, "train_data")
    test = load_dataset(ctx, params, "test_data")
    if train is not None and test is not None:
        return train, test
    data = load_dataset(ctx, params, "data")
    if data is None:
        raise JobFailed("a reasoner needs `data` (split by symmetry class) or `train_data` and `test_data`")
    if "maze" in data:
        n = len(data["maze"])
        cut = max(1, int(n * (1 - float(params.get("test_fraction", 0.2)))))
        return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}
    return _split_sudoku(data, float(params.get("test_fraction", 0.2)))


def _model_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in own_params(params).items() if k not in ORCHESTRATION_KEYS}


def _visual(ctx: JobContext, params: dict[str, Any]) -> Any:
    """Visual sudoku (`visual: true`): cells drawn as glyphs and read through the core's image encoder."""
    if not params.get("visual"):
        return None
    from workers.train_jepa import load_model  # torch: only when a job runs (the allowlist stays light)
    from workers.train_reasoning import Visual, glyph_render
    from workers.visual import GlyphEncoder

    path = core_checkpoint(ctx, params, "image-encoder")
    if path is None:
        raise JobFailed("visual sudoku reads cells through the core's image-encoder: approve one first")
    jepa, jparams, _ = load_model(path)
    return Visual(encoder=GlyphEncoder(jepa), render=glyph_render(jparams.image_config().img_size))


# --- train -------------------------------------------------------------------------------------


def run_train(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    model = str(params.get("model", ""))
    if "adapter" in params:
        return _train_adapter(ctx, params)
    tracked = _LastCheckpoint(ctx)
    if model in JEPA_MODELS:
        from workers.train_jepa import JepaTrainParams, train_jepa  # torch: only when the job runs

        p = JepaTrainParams.model_validate(_model_params(params))
        data = load_dataset(ctx, params)
        if data is None:
            raise JobFailed("`data` is required: the synthesize step (or sha256:<id>) with the images")
        metrics = train_jepa(tracked, p, data)  # type: ignore[arg-type]
        return _finish_training(ctx, tracked, model, metrics, {"preset": p.preset})
    if model in REASONERS:
        # torch: only when the job runs
        from workers.train_reasoning import ReasonerTrainParams, as_grids, train_reasoner

        rp = ReasonerTrainParams.model_validate(_model_params(params))
        train, test = _reasoner_data(ctx, params)
        visual = _visual(ctx, params)
        metrics = train_reasoner(tracked, rp, train, test, visual=visual)  # type: ignore[arg-type]
        result = _finish_training(ctx, tracked, model, metrics, {"visual": visual is not None})
        if visual is None:  # the evaluation suite picks its yardstick by the grid (schema/suite.py)
            task, _ = as_grids(test)
            result.outputs["grid"] = f"{task.name}:{task.height}x{task.width}"
        return result
    raise JobFailed(f"unknown model {model!r} for a train step (known: {', '.join(JEPA_MODELS + REASONERS)})")


def _train_adapter(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    """Working memory: an adapter on the current core's reasoner (the core stays frozen)."""
    from workers.train_adapter import AdapterParams, train_adapter  # torch: only when a job trains

    p = AdapterParams.model_validate(_model_params(params))
    core = core_checkpoint(ctx, params, "reasoner")
    if core is None:
        raise JobFailed("an adapter needs a core reasoner to adapt: approve a reasoner proposal first")
    core_info = params.get("_core") or {}
    start = _start_adapter(ctx, params, p.adapter.start, core_info)
    train, test = _reasoner_data(ctx, params)
    metrics, path = train_adapter(ctx, p, core, train, test, start_from=start)
    artifact = ctx.artifact(path, "adapter", {"rank": p.adapter.rank, "component": "reasoner"})
    return JobResult(
        metrics=finite_metrics(metrics),
        outputs={
            "adapter": "reasoner",
            "checkpoint": artifact,
            "rank": p.adapter.rank,
            "core_version": core_info.get("version", 0),
            "core_checkpoint": core_info.get("components", {}).get("reasoner", {}).get("checkpoint"),
        },
    )


def _start_adapter(ctx: JobContext, params: dict[str, Any], ref: str | None, core: dict[str, Any]) -> Path | None:
    """The file of the adapter a train step starts from (`adapter: {start: A-3}`), checked against the core."""
    if ref is None:
        return None
    found = params.get("_adapter") or {"missing": ref}
    if "missing" in found:
        raise JobFailed(f"no adapter {ref!r} in the working memory to start from (`jbctl adapters` lists them)")
    if not found.get("active", True):
        raise JobFailed(f"adapter {found['id']} is retired: start from an active one (its core was rolled past?)")
    current = str((core.get("components", {}).get("reasoner") or {}).get("checkpoint") or "")
    if found.get("core_checkpoint") and str(found["core_checkpoint"]) != current:
        raise JobFailed(f"adapter {found['id']} was trained on another core reasoner than the current one")
    full = ctx.store.resolve(str(found["checkpoint"]).removeprefix("sha256:"))
    return Path(ctx.store.path(full))


# --- evaluate ----------------------------------------------------------------------------------


def run_evaluate(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    model = str(params.get("model", ""))
    ckpt = checkpoint_path(ctx, params)
    component = COMPONENT.get(model, "")
    # A suite step measures one checkpoint on the suite's data; the suite's row of the current core is
    # the comparison (`evaluations`), so the core is not evaluated again here.
    core_ckpt = None if params.get("suite") else core_checkpoint(ctx, params, component)
    if model in JEPA_MODELS:
        from workers.eval.encoders import EvalParams, evaluate_encoder  # torch: only when the job runs

        ep = EvalParams.model_validate({k: v for k, v in _model_params(params).items() if k != "model"})
        data = load_dataset(ctx, params)
        if data is None:
            raise JobFailed("`data` is required: the synthesize step with held-out images")
        metrics = evaluate_encoder(ctx, ep, ckpt, data)
        # The current core on the same evaluation, for the side-by-side table of a proposal.
        core = evaluate_encoder(ctx, ep, core_ckpt, data) if core_ckpt is not None else {}
    elif model in REASONERS:
        from workers.eval.reasoners import evaluate_reasoner  # torch: only when a job evaluates
        from workers.train_reasoning import ReasonerTrainParams

        rp = ReasonerTrainParams.model_validate(_model_params(params))
        _, test = _reasoner_data(ctx, params)
        visual = _visual(ctx, params)
        metrics = evaluate_reasoner(ctx, rp, ckpt, test, visual=visual)
        core = {}
        if core_ckpt is not None:
            try:
                core = evaluate_reasoner(ctx, rp, core_ckpt, test, visual=visual)
            except (ValueError, RuntimeError) as exc:  # e.g. a symbolic core reasoner on visual input
                ctx.log(f"the core's reasoner cannot read this input, so nothing to compare: {exc}")
    else:
        raise JobFailed(f"unknown model {model!r} for an evaluate step")
    version = (params.get("_core") or {}).get("version", 0)
    return JobResult(
        metrics=finite_metrics(metrics),
        outputs={
            "core_metrics": finite_metrics(core),
            "core_version": version,
            "checkpoint": str(ckpt.name),
            "model": model,
        },
    )
