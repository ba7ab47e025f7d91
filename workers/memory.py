"""Working memory on a warm core: apply an adapter to a loaded core reasoner, swap it, take it off.

An adapter is a set of low-rank deltas (`workers/models/lora.py`) trained on one core checkpoint.
Applying it merges `scale · B·A` into the core's linear weights in place, so inference with an adapter
runs exactly the core's forward (no extra matmuls); the first merge keeps a pristine copy of each
touched weight, so a swap restores the core bit for bit before merging the next adapter. Adapter
files are small and kept in memory (LRU), so a swap costs a few small matmuls, not a load.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from workers.jobs import JobFailed

ADAPTER_FILES = 64  # adapter files kept in memory (each is kilobytes to a few megabytes)


class AdapterFiles:
    """The adapter files read so far, by artifact id (LRU)."""

    def __init__(self, keep: int = ADAPTER_FILES) -> None:
        self.keep = keep
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, artifact: str, path: Path) -> dict[str, Any]:
        with self.lock:
            if artifact in self.items:
                self.items.move_to_end(artifact)
                return self.items[artifact]
        saved = read_adapter(path)
        with self.lock:
            self.items[artifact] = saved
            while len(self.items) > self.keep:
                self.items.popitem(last=False)
        return saved

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


FILES = AdapterFiles()


def read_adapter(path: Path) -> dict[str, Any]:
    """An adapter file: {adapter: {"<layer>.lora_a": A, "<layer>.lora_b": B}, rank, alpha}."""
    import torch  # torch: only when a model runs

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise JobFailed(f"adapter file {path.name[:16]} is unreadable: {exc}") from None
    if not isinstance(saved, dict) or "adapter" not in saved or "rank" not in saved:
        raise JobFailed(f"{path.name[:16]} is not an adapter file (no adapter weights and rank)")
    return dict(saved)


def _layers(saved: dict[str, Any]) -> list[str]:
    return sorted({k.removesuffix(".lora_a") for k in saved["adapter"] if k.endswith(".lora_a")})


def take_off(loaded: Any) -> None:
    """Restore the core's own weights (no adapter applied)."""
    if loaded.adapter is None:
        return
    import torch  # torch: only when a model runs

    with torch.no_grad():
        for name, weight in loaded.pristine.items():
            loaded.model.get_submodule(name).weight.copy_(weight)
    loaded.adapter = None


def apply_adapter(loaded: Any, key: str | None, saved: dict[str, Any] | None) -> bool:
    """Make `key`'s adapter (or none) the one applied to `loaded`; True when weights changed."""
    if loaded.adapter == key:
        return False
    take_off(loaded)
    if key is None or saved is None:
        return True
    import torch  # torch: only when a model runs

    scale = float(saved.get("alpha", 8.0)) / int(saved["rank"])
    state = saved["adapter"]
    layers = _layers(saved)
    try:
        modules = [loaded.model.get_submodule(name) for name in layers]
    except AttributeError as exc:
        raise JobFailed(f"adapter does not fit this core ({exc}): was it trained on another one?") from None
    for name, module in zip(layers, modules, strict=True):  # check every layer before changing any
        a, b = state[f"{name}.lora_a"], state[f"{name}.lora_b"]
        if tuple(module.weight.shape) != (b.shape[0], a.shape[1]):
            raise JobFailed(f"adapter does not fit this core (layer {name}): was it trained on another one?")
    with torch.no_grad():
        for name, module in zip(layers, modules, strict=True):
            a, b = state[f"{name}.lora_a"], state[f"{name}.lora_b"]
            weight = module.weight
            if name not in loaded.pristine:
                loaded.pristine[name] = weight.detach().clone()
            delta = (b.to(weight.device, weight.dtype) @ a.to(weight.device, weight.dtype)) * scale
            weight.copy_(loaded.pristine[name] + delta)
    loaded.adapter = key
    return True
