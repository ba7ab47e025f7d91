"""What every training loop shares: the device choice, the learning-rate schedule, checkpoint files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from workers.context import write_atomic


def pick_device(choice: str) -> torch.device:
    """`auto` means CUDA where there is one; `cpu` and `cuda` mean themselves."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float | None) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine to `min_lr` at `total` (constant when
    `min_lr` is None)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if min_lr is None:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save, atomically (see `write_atomic`)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]
