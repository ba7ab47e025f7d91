"""Inference on a worker: models loaded lazily, kept warm between jobs, evicted least-recently-used.

A `SimpleWorker` runs every job in its own process, so the module-level `CACHE` outlives a job:
the second request for the same checkpoint skips loading. The budget is JETBOX_MODEL_CACHE_MB
(default 4096 MB of parameters and buffers).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from schema.artifact_store import ArtifactStore
from workers.context import JobContext
from workers.gallery import decode_picture, fit_image, gallery, look
from workers.jobs import JobFailed, JobResult, own_params
from workers.loading import load_dataset, load_image_encoder, load_reasoner
from workers.synth.base import load_arrays

COMPONENTS = ("reasoner", "image-encoder", "image-text-encoder")


@dataclass
class Loaded:
    model: Any
    info: dict[str, Any]
    nbytes: int
    adapter: str | None = None  # the adapter merged into the weights now (workers/memory.py)
    pristine: dict[str, Any] = field(default_factory=dict)  # the core's own weights of the layers adapters touch


def model_bytes(model: Any) -> int:
    """Bytes held by a torch module's parameters and buffers."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()
    return total


class ModelCache:
    """LRU over loaded models, bounded by bytes; thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.items: OrderedDict[str, Loaded] = OrderedDict()
        self.loading: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def used(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self.items

    def get(self, key: str, load: Callable[[], tuple[Any, dict[str, Any]]]) -> tuple[Loaded, bool]:
        """The model for `key`, loading it on a miss; returns (loaded, was_warm).

        A model enters the cache only once fully loaded. One loader per key at a time: a request for a
        model the keep-alive thread is loading in the background waits for that load, not a second one."""
        while True:
            with self.lock:
                if key in self.items:
                    self.items.move_to_end(key)
                    self.hits += 1
                    return self.items[key], True
                pending = self.loading.get(key)
                if pending is None:
                    pending = self.loading[key] = threading.Event()
                    break
            pending.wait()  # someone else's load ended (or failed): look again
        try:
            model, info = load()
            loaded = Loaded(model, info, model_bytes(model))
            with self.lock:
                self.misses += 1
                self.items[key] = loaded
                self.items.move_to_end(key)
                while self.used > self.budget and len(self.items) > 1:
                    self.items.popitem(last=False)
                    self.evictions += 1
        finally:
            with self.lock:
                self.loading.pop(key, None)
            pending.set()
        return loaded, False

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


CACHE = ModelCache(int(float(os.environ.get("JETBOX_MODEL_CACHE_MB", "4096")) * 2**20))


# --- loaders -----------------------------------------------------------------------------------


LOADERS: dict[str, Callable[[Path], tuple[Any, dict[str, Any]]]] = {
    "reasoner": load_reasoner,
    "image-encoder": load_image_encoder,
    "image-text-encoder": load_image_encoder,  # jepa-text: the same image encoder, with a text side
}


# --- solving -----------------------------------------------------------------------------------


def solve_grids(loaded: Loaded, puzzles: np.ndarray) -> tuple[np.ndarray, int]:
    """Answers for sudoku puzzles [B, n, n] (0 = blank) and the segments used (the halting head decides)."""
    import torch  # torch: only when a model runs, never when the worker starts

    from workers.train_reasoning import Task, predict

    model = loaded.model
    n = puzzles.shape[1]
    if n * n != loaded.info["cells"]:
        raise JobFailed(f"this reasoner reads {loaded.info['cells']} cells; the puzzle has {n * n}")
    task = Task("sudoku", n, n)
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(puzzles.reshape(len(puzzles), -1).astype(np.int64)).to(device)
        emb = model.embed_input(x)
        state = model.initial_state(len(x))
        segments = model.cfg.segments
        used = segments
        pred = None
        for k in range(segments):
            state, out = model.segment(state, emb)
            pred = predict(out.logits, x, task, loaded.info["copy_givens"])
            halt = out.q_halt > (out.q_continue if out.q_continue is not None else 0.0)
            if bool(halt.all()):
                used = k + 1
                break
    assert pred is not None
    return (pred + 1).reshape(puzzles.shape).cpu().numpy(), used


def embed_images(loaded: Loaded, images: np.ndarray) -> np.ndarray:
    import torch  # torch: only when a model runs, never when the worker starts

    from workers.eval.encoders import embed_images as embed

    return embed(loaded.model, images, batch=64, device=torch.device("cpu"))


def text_space(loaded: Loaded) -> tuple[Callable[[list[str]], np.ndarray], Callable[[np.ndarray], np.ndarray]] | None:
    """For a jepa-text encoder: (captions -> text keys, image latents -> their queries), in the space its
    objective trained (text latent and predicted latent, or the InfoNCE projections); else None."""
    tok = loaded.info.get("tokenizer")
    model = loaded.model
    if tok is None or not hasattr(model, "img2txt"):
        return None
    import torch  # torch: only when a model runs

    from workers.models.text import tokenize

    def captions(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            out = []
            for i in range(0, len(texts), 256):
                ids, mask = tokenize(tok, texts[i : i + 256], model.text_cfg.max_len)
                device = next(model.parameters()).device
                out.append(model.text_keys(model.embed_text(ids.to(device), mask.to(device))).float().cpu())
            return torch.cat(out).numpy()

    def predict(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            device = next(model.parameters()).device
            return model.image_to_text(torch.from_numpy(z).to(device)).float().cpu().numpy()

    return captions, predict


# --- the job -----------------------------------------------------------------------------------


class InferParams(BaseModel):
    """`with:` of an `infer` step (or what `jbctl infer` sends)."""

    model_config = ConfigDict(extra="forbid")

    component: str = Field(description="reasoner, image-encoder or image-text-encoder")
    checkpoint: str | None = Field(default=None, description="sha256:<id>; default: the current core's")
    puzzle: list[list[int]] | None = Field(default=None, description="a sudoku grid, 0 = blank (reasoner)")
    image: list[list[list[int]]] | None = Field(default=None, description="an HxWx3 uint8 image (image-encoder)")
    image_png: str | None = Field(
        default=None, description="a base64 PNG or JPEG (image-encoder), resized to the encoder's input size"
    )
    gallery: str | None = Field(
        default=None,
        description="sha256:<dataset> of captioned images (image-encoder): the picture's nearest captions and "
        "kNN probe predictions",
    )
    top_k: int = Field(default=5, ge=1, le=50, description="neighbours in the gallery")
    data: str | None = Field(default=None, description="a synthesize step whose first examples to run")
    limit: int = Field(default=8, ge=1, le=10_000)
    adapter: str | None = Field(
        default=None, description="working memory to apply: an adapter id (A-3) or the ticket that trained it"
    )


def _checkpoint(ctx: JobContext, params: dict[str, Any], p: InferParams) -> tuple[str, Path]:
    ref = p.checkpoint.removeprefix("sha256:") if p.checkpoint else None
    if ref is None:
        comp = (params.get("_core") or {}).get("components", {}).get(p.component)
        if not comp:
            raise JobFailed(f"the core has no {p.component!r} yet: approve a proposal first, or pass checkpoint")
        ref = str(comp["checkpoint"])
    full = ctx.store.resolve(ref)
    return full, Path(ctx.store.path(full))


def _adapter(params: dict[str, Any], p: InferParams) -> dict[str, Any] | None:
    """The adapter to apply (resolved by the daemon into `_adapter`), or None; refuses what does not apply."""
    found = params.get("_adapter")
    if found is None:
        if p.adapter is not None:
            raise JobFailed(f"adapter {p.adapter!r} was not resolved: no such adapter in the working memory")
        return None
    if "missing" in found:
        raise JobFailed(f"no adapter {found['missing']!r} in the working memory (`jbctl adapters` lists them)")
    if not found.get("active", True):
        raise JobFailed(f"adapter {found['id']} is retired; it no longer applies (`jbctl adapters`)")
    if found.get("component") != p.component:
        raise JobFailed(f"adapter {found.get('id')} adapts the {found.get('component')}, not the {p.component}")
    if p.checkpoint is not None:
        raise JobFailed("pass either an adapter or a checkpoint: an adapter runs on the core it was trained on")
    return dict(found)


def run_infer(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    from workers.memory import FILES, apply_adapter

    p = InferParams.model_validate({k: v for k, v in own_params(params).items()})
    if p.component not in LOADERS:
        raise JobFailed(f"unknown component {p.component!r} (known: {', '.join(LOADERS)})")
    adapter = _adapter(params, p)
    if adapter is not None and adapter.get("core_checkpoint"):
        # The weights it is a delta on: the current core's while it is active.
        p = p.model_copy(update={"checkpoint": "sha256:" + str(adapter["core_checkpoint"]).removeprefix("sha256:")})
    artifact, path = _checkpoint(ctx, params, p)
    started = time.perf_counter()
    loaded, warm = CACHE.get(f"{p.component}:{artifact}", lambda: LOADERS[p.component](path))
    load_ms = 1000 * (time.perf_counter() - started)
    t0 = time.perf_counter()
    if adapter is not None:
        full = ctx.store.resolve(str(adapter["checkpoint"]).removeprefix("sha256:"))
        apply_adapter(loaded, full, FILES.get(full, Path(ctx.store.path(full))))
    else:
        apply_adapter(loaded, None, None)
    swap_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    outputs: dict[str, Any] = {
        "component": p.component,
        "checkpoint": artifact,
        "warm": warm,
        "core_version": (params.get("_core") or {}).get("version", 0),
        "adapter": adapter["id"] if adapter is not None else None,
        "adapter_base_core_version": adapter.get("base_core_version") if adapter is not None else None,
        "swap_ms": swap_ms,
    }
    if p.component == "reasoner":
        data: dict[str, Any] | None = None
        if p.puzzle is not None:
            puzzles = np.asarray([p.puzzle], dtype=np.int64)
        else:
            data = load_dataset(ctx, params)
            if data is None:
                raise JobFailed("a reasoner needs `puzzle` (a grid) or `data` (a synthesize step)")
            puzzles = np.asarray(data["puzzles"][: p.limit], dtype=np.int64)
        answers, used = solve_grids(loaded, puzzles)
        outputs.update(answer=answers[0].tolist() if p.puzzle is not None else None, segments=used)
        metrics: dict[str, float] = {"segments": float(used)}
        if p.puzzle is None and data is not None and "solutions" in data:
            right = answers == np.asarray(data["solutions"][: p.limit])
            metrics["exact_acc"] = float(right.reshape(len(right), -1).all(-1).mean())
            blank = puzzles == 0
            metrics["blank_acc"] = float(right[blank].mean()) if blank.any() else 1.0
        outputs["answers"] = answers.tolist() if p.puzzle is None else None
    else:
        size = int(loaded.info.get("img_size") or 0)
        picture: np.ndarray | None = None
        if p.image is not None and p.image_png is not None:
            raise JobFailed("pass either `image` or `image_png`, not both")
        if p.image_png is not None:
            picture = decode_picture(p.image_png, size or 32)
        elif p.image is not None:
            try:
                picture = np.asarray(p.image, dtype=np.uint8)
            except ValueError:
                raise JobFailed("image: rows of unequal length; an image is HxWx3") from None
            picture = fit_image(picture, size) if size else picture
        if picture is not None:
            images = picture[None]
        else:
            found = load_dataset(ctx, params)
            if found is None:
                raise JobFailed("an image-encoder needs `image` (HxWx3), `image_png` or `data` (a synthesize step)")
            images = np.asarray(found["images"][: p.limit], dtype=np.uint8)
        z = embed_images(loaded, images)
        norms = np.linalg.norm(z, axis=-1)
        outputs.update(
            dim=int(z.shape[-1]), norm=float(norms[0]), head=[float(v) for v in z[0][:8]], images=len(images)
        )
        if p.gallery is not None:
            if picture is None:
                raise JobFailed("`gallery` needs a picture: `image` or `image_png`")
            ref = p.gallery.removeprefix("sha256:")

            def arrays() -> tuple[str, dict[str, np.ndarray]]:
                try:
                    manifest = ctx.store.load_manifest(ref)
                except Exception as exc:
                    raise JobFailed(f"gallery {p.gallery}: not a dataset in the artifact store ({exc})") from None
                return manifest.generator, dict(load_arrays(manifest, ctx.store))

            key = f"{p.component}:{artifact}:{outputs['adapter'] or ''}:{ref}"
            text = text_space(loaded)
            found_gallery, gallery_warm = gallery(
                key, arrays, lambda imgs: embed_images(loaded, imgs), text[0] if text else None
            )
            outputs.update(
                look(found_gallery, z[0], p.top_k, text[1](z[:1])[0] if text else None),
                gallery=ref,
                gallery_size=len(found_gallery.captions),
                gallery_warm=gallery_warm,
            )
        outputs["image_size"] = int(images.shape[1])
        metrics = {"norm": float(norms.mean()), "images": float(len(images))}
    forward_ms = 1000 * (time.perf_counter() - t0)
    metrics.update(load_ms=load_ms, forward_ms=forward_ms, swap_ms=swap_ms)
    outputs.update(load_ms=load_ms, forward_ms=forward_ms)
    return JobResult(metrics=metrics, outputs=outputs)


def _bound(loader: Callable[[Path], tuple[Any, dict[str, Any]]], path: Path) -> Callable[[], tuple[Any, dict]]:
    return lambda: loader(path)


def warm_core(components: dict[str, Any], artifacts: ArtifactStore | Path, log: Callable[[str], None] = print) -> int:
    """Load the core's components into the cache before the first request (a worker's --warm)."""
    store = artifacts if isinstance(artifacts, ArtifactStore) else ArtifactStore(artifacts)
    loaded = 0
    for name, comp in components.items():
        if name not in LOADERS or not comp.get("checkpoint"):
            continue
        full = store.resolve(str(comp["checkpoint"]))
        started = time.perf_counter()
        CACHE.get(f"{name}:{full}", _bound(LOADERS[name], Path(store.path(full))))
        log(f"warmed {name} ({full[:12]}) in {1000 * (time.perf_counter() - started):.0f} ms")
        loaded += 1
    return loaded
