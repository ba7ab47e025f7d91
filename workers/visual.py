"""Visual sudoku's cell encoder: an image JEPA reading the fabric's grey glyphs (frozen).

Used by a `train`/`evaluate` step with `visual: true` (the core's image-encoder, `workers/ml_jobs.py`)
and by `bench/reasoning.py --visual-encoder jepa|random` (a JEPA trained on glyphs, or its random twin).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.models.jepa import JEPA
from workers.models.text import CrossModalJEPA


class GlyphEncoder(nn.Module):
    """Grey glyphs [B, 1, S, S] in [0, 1] -> the JEPA's pooled embedding [B, D], frozen.

    The JEPA takes RGB; a grey glyph is the same picture in all three channels, normalised as the JEPA's
    training images are (`workers.models.jepa.preprocess`: (x - 0.5) / 0.25).
    """

    def __init__(self, jepa: JEPA | CrossModalJEPA) -> None:
        super().__init__()
        self.jepa = jepa.eval().requires_grad_(False)
        self.img_size = jepa.cfg.img_size

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(
                f"GlyphEncoder takes grey glyphs [B, 1, {self.img_size}, {self.img_size}], got {tuple(x.shape)}"
            )
        with torch.no_grad():
            return self.jepa.embed((x.expand(-1, 3, -1, -1) - 0.5) / 0.25)
