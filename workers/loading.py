"""Loading what a job names: artifacts from the store, datasets, checkpoints, trained models.

The leaf that the model jobs (`ml_jobs`, `inference`, `adapters`) share; it imports none of them.
torch is imported inside the model loaders only, so resolving a dataset stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from workers.context import JobContext
from workers.jobs import JobFailed, input_outputs
from workers.synth.base import load_arrays


def artifact_ref(params: dict[str, Any], key: str, output: str) -> str | None:
    """An artifact id from `with: {key: <step id> | sha256:<id>}`."""
    ref = params.get(key)
    if ref is None:
        return None
    if isinstance(ref, str) and ref.startswith("sha256:"):
        return ref.removeprefix("sha256:")
    found = input_outputs(params, str(ref)).get(output)
    if not found:
        raise JobFailed(f"step {ref!r} produced no {output} for `{key}`")
    return str(found)


def load_dataset(ctx: JobContext, params: dict[str, Any], key: str = "data") -> dict[str, np.ndarray] | None:
    """The arrays of the dataset `with: {key: ...}` names, or None when the step names none."""
    ref = artifact_ref(params, key, "dataset")
    if ref is None:
        return None
    return dict(load_arrays(ctx.store.load_manifest(ref), ctx.store))


def checkpoint_path(ctx: JobContext, params: dict[str, Any], key: str = "checkpoint") -> Path:
    ref = artifact_ref(params, key, "checkpoint")
    if ref is None:
        raise JobFailed(f"`{key}` is required: the train step (or sha256:<id>) whose checkpoint to use")
    path = ctx.store.path(ctx.store.resolve(ref))
    if not path.exists():
        raise JobFailed(f"checkpoint {ref[:16]} is not in the artifact store")
    return Path(path)


def core_checkpoint(ctx: JobContext, params: dict[str, Any], component: str) -> Path | None:
    """The current core's checkpoint of `component`, if the core has one."""
    comp = (params.get("_core") or {}).get("components", {}).get(component)
    if not comp or not comp.get("checkpoint"):
        return None
    try:
        return Path(ctx.store.path(ctx.store.resolve(str(comp["checkpoint"]))))
    except Exception:
        return None


def load_reasoner(path: Path) -> tuple[Any, dict[str, Any]]:
    """A reasoner from its checkpoint (EMA weights when present), in eval mode on the CPU or GPU."""
    from workers.models.reasoners import ReasonerConfig, build_reasoner  # torch: only when a model loads
    from workers.training import load_checkpoint, pick_device

    sd = load_checkpoint(path)
    cfg = ReasonerConfig(**sd["model_config"])
    model = build_reasoner(cfg)
    model.load_state_dict(sd["ema"] if sd.get("ema") is not None else sd["model"])
    device = pick_device("auto")
    model.to(device).eval()
    copy_givens = sd.get("params", {}).get("loss_on", "blanks") == "blanks"
    return model, {"kind": cfg.kind, "cells": cfg.seq_len, "copy_givens": copy_givens, "device": str(device)}


def load_image_encoder(path: Path) -> tuple[Any, dict[str, Any]]:
    from workers.train_jepa import load_model  # torch: only when a model loads

    model, params, tok = load_model(path)
    model.eval()
    # `tokenizer`: a jepa-text encoder's, to put captions in its text space (the playground's matches).
    info = {"preset": params.preset, "model": params.model, "img_size": params.image_config().img_size}
    return model, {**info, "tokenizer": tok}
