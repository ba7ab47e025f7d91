"""The `train` job for `model: jepa` and `model: jepa-text`.

AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast on CUDA only. Everything that
is random is a function of (seed, step): the data order (one permutation per epoch), the masks and the
SIGReg directions. So a checkpoint (model, EMA, optimiser, scheduler, RNG states, data position) taken at
step N and resumed in a fresh process continues exactly as if never stopped; on CPU the weights match
bit-for-bit (tests/test_jepa.py checks it).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer
from torch import Tensor, nn

from schema.artifact_store import ArtifactStore
from schema.artifacts import Manifest
from workers.context import JobCancelled, JobContext
from workers.models.jepa import JEPA, JepaConfig, make_config, preprocess, sample_masks
from workers.models.text import TEXT_PRESETS, CrossModalJEPA, TextConfig, tokenize, train_tokenizer
from workers.synth.base import load_arrays, read_shard
from workers.training import load_checkpoint, pick_device, save_atomic
from workers.training import lr_at as schedule

LABELS = ("shape", "colour", "count", "position")


class JepaTrainParams(BaseModel):
    """`with:` parameters of a `train` step whose model is `jepa` or `jepa-text`."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["jepa", "jepa-text"] = "jepa"
    preset: Literal["tiny", "rtx3090"] = "tiny"
    arch: dict[str, Any] = Field(default_factory=dict, description="overrides of JepaConfig fields")
    text: dict[str, Any] = Field(default_factory=dict, description="overrides of TextConfig fields")
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    stop_at_step: int | None = Field(None, ge=1, description="checkpoint and return at this step (chunked runs)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default")

    @model_validator(mode="after")
    def _check(self) -> JepaTrainParams:
        self.image_config()  # surfaces unknown or invalid arch fields now, not mid-job
        self.text_config()
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        return self

    def image_config(self) -> JepaConfig:
        return make_config(self.preset, **self.arch)

    def text_config(self) -> TextConfig:
        return TextConfig(**{**TEXT_PRESETS[self.preset], **self.text})


# ----------------------------------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    """Images (uint8 [N, H, W, 3]), integer labels by name, and captions (may be empty)."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> Dataset:
        caps = [self.captions[i] for i in idx] if self.captions else []
        return Dataset(self.images[idx], {k: v[idx] for k, v in self.labels.items()}, caps)


def load_data(data: Any, store: Any = None) -> Dataset:
    """Accept a `Dataset`, a mapping of arrays (what the synth generators return), a shard file
    (`.npz`/`.safetensors`), or a dataset manifest (`Manifest` or its JSON path) with its artifact store.

    Arrays: `images` uint8 [N, H, W, 3]; labels named as in LABELS (`color` is accepted for `colour`);
    optional `caption` or `captions`. Without `store`, a manifest's store is the nearest folder above the
    manifest that has an `objects/` folder (the artifact store's layout).
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str | os.PathLike) and Path(data).suffix in (".npz", ".safetensors"):
        data = read_shard(Path(data), "npz" if Path(data).suffix == ".npz" else "safetensors", mmap=False)
    elif isinstance(data, str | os.PathLike) or type(data).__name__ == "Manifest":
        if not isinstance(data, Manifest):
            path = Path(data).resolve()
            manifest = Manifest.model_validate_json(path.read_text())
            if store is None:
                root = next((p for p in path.parents if (p / "objects").is_dir()), None)
                if root is None:
                    raise ValueError(f"cannot find the artifact store of manifest {path}; pass store=")
                store = ArtifactStore(root)
            data = manifest
        if store is None:
            raise ValueError("loading a Manifest needs its artifact store")
        data = load_arrays(data, store)
    if not isinstance(data, Mapping) or "images" not in data:
        raise ValueError("data must provide `images` (uint8 [N, H, W, 3]) and labels")
    labels = {}
    for name in LABELS:
        for key in (name, "color" if name == "colour" else name):
            if key in data:
                labels[name] = np.asarray(data[key]).astype(np.int64)
                break
    cap_key = "captions" if "captions" in data else "caption" if "caption" in data else None
    captions = [str(c) for c in data[cap_key]] if cap_key else []
    images = np.asarray(data["images"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return Dataset(images, labels, captions)


def batch_indices(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Sample indices of `step`: epochs are seeded permutations, read in order; a batch may span two."""
    start = step * batch
    out = np.empty(batch, dtype=np.int64)
    for i in range(batch):
        epoch, pos = divmod(start + i, n)
        if i == 0 or pos == 0:
            perm = np.random.default_rng([seed, epoch]).permutation(n)
        out[i] = perm[pos]
    return out


# ----------------------------------------------------------------------------------------------------
# model, optimiser, checkpoints


def build_model(params: JepaTrainParams, vocab_size: int = 0) -> JEPA | CrossModalJEPA:
    """A fresh model; initialisation depends only on `params.seed`."""
    torch.manual_seed(params.seed)
    if params.model == "jepa":
        return JEPA(params.image_config())
    return CrossModalJEPA(params.image_config(), params.text_config(), vocab_size)


def lr_at(step: int, params: JepaTrainParams) -> float:
    """Linear warmup to `lr`, then cosine to `min_lr` at `steps`."""
    return schedule(step, params.lr, params.warmup_steps, params.steps, params.min_lr)


def make_optimizer(model: nn.Module, params: JepaTrainParams) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and learned tokens (1-D parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.95))


def load_model(path: Path | str) -> tuple[JEPA | CrossModalJEPA, JepaTrainParams, Any]:
    """Rebuild the trained model from a checkpoint: (model, params, tokenizer or None)."""
    ckpt = load_checkpoint(path)
    raw = ckpt["params"]
    if (
        raw.get("model") == "jepa-text"
        and "align" not in raw.get("text", {})
        and "img_proj.0.weight" not in ckpt["model"]
    ):
        # written before `align` existed: those checkpoints were all trained with the predictors only
        raw = {**raw, "text": {**raw.get("text", {}), "align": "predict"}}
    params = JepaTrainParams.model_validate(raw)
    tok = Tokenizer.from_str(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    model = build_model(params, tok.get_vocab_size() if tok else 0)
    model.load_state_dict(ckpt["model"])
    return model.eval(), params, tok


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loss_plot(history: list[tuple[int, float]], path: Path, title: str) -> Path:
    """Loss-curve PNG (matplotlib Agg, no display needed)."""
    import matplotlib  # only when a plot is drawn: the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history, strict=True)
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# the job


def train_jepa(ctx: JobContext, params: JepaTrainParams | Mapping[str, Any], data: Any) -> dict[str, float]:
    """Train an image (or image+text) JEPA on `data`; returns final metrics.

    Resumes from `ctx.resume_from` when set. Checkpoints every `checkpoint_every` steps, at the end, at
    `stop_at_step`, and when the job is cancelled (then raises `JobCancelled`).
    """
    params = JepaTrainParams.model_validate(params)
    if params.threads:
        torch.set_num_threads(params.threads)
    device = pick_device(params.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        return _train(ctx, params, data, device)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(ctx: JobContext, params: JepaTrainParams, data: Any, device: torch.device) -> dict[str, float]:
    ds = load_data(data)
    cfg = params.image_config()
    if ds.images.shape[1] != cfg.img_size:
        raise ValueError(f"images are {ds.images.shape[1]}px but the model expects img_size {cfg.img_size}")

    resume = load_checkpoint(ctx.resume_from) if ctx.resume_from else None
    tokenizer = None
    ids = mask = None
    if params.model == "jepa-text":
        if not ds.captions:
            raise ValueError("model jepa-text needs captions in the data")
        tcfg = params.text_config()
        tokenizer = Tokenizer.from_str(resume["tokenizer"]) if resume else train_tokenizer(ds.captions, tcfg.vocab_size)
        ids, mask = tokenize(tokenizer, ds.captions, tcfg.max_len)

    model = build_model(params, tokenizer.get_vocab_size() if tokenizer else 0).to(device)
    opt = make_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, params) / params.lr)
    step = 0
    history: list[tuple[int, float]] = []
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"])
        step, history = resume["step"], [tuple(h) for h in resume["history"]]  # type: ignore[misc]
        if resume["params"] != params.model_dump(exclude={"stop_at_step"}):
            ctx.log("resuming with changed parameters; the run is no longer an exact continuation")
        ctx.log(f"resumed from {ctx.resume_from} at step {step}")

    ckpt_dir = ctx.workdir / "checkpoints"

    def checkpoint() -> Path:
        path = ckpt_dir / f"jepa-step{step:07d}.pt"
        save_atomic(
            {
                "step": step,
                "data_position": step * params.batch_size,
                "params": params.model_dump(exclude={"stop_at_step"}),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": _rng_state(),
                "history": history,
                "tokenizer": tokenizer.to_str() if tokenizer else None,
            },
            path,
        )
        ctx.checkpoint(path, step)
        # only the latest checkpoint is ever resumed from; keep one spare in case the newest is unreadable
        for old in sorted(ckpt_dir.glob("jepa-step*.pt"))[:-2]:
            old.unlink(missing_ok=True)
        return path

    autocast = device.type == "cuda" and params.bf16
    end = min(params.steps, params.stop_at_step or params.steps)
    model.train()
    t0, start_step = time.perf_counter(), step
    last: dict[str, float] = {}
    while step < end:
        if ctx.cancelled():
            checkpoint()
            ctx.raise_if_cancelled()
            raise JobCancelled("cancelled")
        idx = batch_indices(len(ds), params.batch_size, step, params.seed)
        images = preprocess(torch.from_numpy(ds.images[idx])).to(device, non_blocking=True)
        gen = torch.Generator().manual_seed(params.seed * 1_000_003 + step)
        ctx_idx, tgt_idx = sample_masks(cfg, params.batch_size, gen)
        ctx_idx, tgt_idx = ctx_idx.to(device), tgt_idx.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if isinstance(model, CrossModalJEPA):
                assert ids is not None and mask is not None
                loss, out = model(images, ctx_idx, tgt_idx, ids[idx].to(device), mask[idx].to(device), gen)
            else:
                loss, out = model(images, ctx_idx, tgt_idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        sched.step()
        model.update_target(model.ema_momentum(step / params.steps))
        step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}")
        history.append((step, loss_value))
        elapsed = time.perf_counter() - t0
        ips = (step - start_step) * params.batch_size / max(elapsed, 1e-9)
        last = {
            "loss": loss_value,
            "lr": opt.param_groups[0]["lr"],
            "images_s": ips,
            "eta_s": (end - step) * params.batch_size / max(ips, 1e-9),
            "grad_norm": float(grad_norm),
            **{k: float(v) for k, v in out.items() if isinstance(v, Tensor) and v.ndim == 0},
        }
        ctx.progress(step, end, **last)
        if step % params.checkpoint_every == 0 and step < end:
            checkpoint()

    path = checkpoint()
    plot = loss_plot(history, ctx.workdir / "loss.png", f"{params.model} ({params.preset}) loss")
    ctx.artifact(plot, kind="plot", meta={"step": step, "checkpoint": str(path)})
    tail = [v for _, v in history[-50:]]
    metrics = {k: v for k, v in last.items() if k not in ("eta_s", "lr")}
    metrics.update(
        step=float(step),
        final_loss=float(np.mean(tail)) if tail else float("nan"),
        train_seconds=time.perf_counter() - t0,
    )
    return metrics


# ----------------------------------------------------------------------------------------------------
# the supervised reference (what self-supervision is measured against in bench/jepa_quality.py)


def train_supervised(
    params: JepaTrainParams | Mapping[str, Any],
    data: Any,
    label: str,
    path: Path,
    clock: Any = time.process_time,
) -> dict[str, Any]:
    """Train the JEPA's image encoder with cross-entropy on one label instead of the JEPA loss.

    Same encoder (built by `build_model` from the same seed), same data order (`batch_indices`), same
    optimiser, schedule and clipping as `train_jepa`, so a probe of it is the supervised ceiling at equal
    steps. The head is a linear layer on the mean-pooled final tokens (what the probes read). Writes a
    checkpoint `load_model` (and so `evaluate_encoder`) reads, with an encoder-only architecture
    (`regularizer: sigreg` on tokens: no EMA copy, no projector). Returns metrics, with `step_times`:
    `clock()` after each step (CPU seconds by default), for budget calibration.
    """
    params = JepaTrainParams.model_validate(params)
    if params.model != "jepa":
        raise ValueError(f"the supervised reference trains an image encoder; model {params.model!r} is not one")
    params = params.model_copy(update={"arch": {**params.arch, "regularizer": "sigreg", "sigreg_on": "tokens"}})
    params = JepaTrainParams.model_validate(params.model_dump())
    ds = load_data(data)
    if label not in ds.labels:
        raise ValueError(f"data has no label {label!r}; it has {sorted(ds.labels)}")
    cfg = params.image_config()
    if ds.images.shape[1] != cfg.img_size:
        raise ValueError(f"images are {ds.images.shape[1]}px but the model expects img_size {cfg.img_size}")
    device = pick_device(params.device)
    model = build_model(params)
    assert isinstance(model, JEPA)
    classes = int(ds.labels[label].max()) + 1
    head = nn.Linear(cfg.embed_dim, classes)
    both = nn.ModuleDict({"encoder": model.encoder, "head": head}).to(device)
    opt = make_optimizer(both, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, params) / params.lr)
    targets = torch.from_numpy(ds.labels[label])
    losses: list[float] = []
    times: list[float] = []
    both.train()
    for step in range(params.steps):
        idx = batch_indices(len(ds), params.batch_size, step, params.seed)
        images = preprocess(torch.from_numpy(ds.images[idx])).to(device)
        logits = head(model.encoder(images).mean(dim=1))
        loss = nn.functional.cross_entropy(logits, targets[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), params.grad_clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"supervised loss is {value} at step {step + 1}")
        losses.append(value)
        times.append(clock())
    save_atomic(
        {"step": params.steps, "params": params.model_dump(exclude={"stop_at_step"}), "model": model.state_dict(),
         "tokenizer": None, "history": list(enumerate(losses, 1))},
        path,
    )
    tail = losses[-50:]
    return {"final_loss": float(np.mean(tail)), "first_loss": losses[0], "step_times": times}
