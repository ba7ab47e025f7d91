"""`shapes`: RGB images of a few coloured geometric shapes, with labels and a templated caption.

Every shape is drawn as a vectorised mask over the whole batch: objects of one class in one
drawing slot are rasterised together as ``[K, H, W]`` boolean arrays. Only +, -, *, comparisons
and table look-ups touch pixels (rotation uses a table of cos/sin per whole degree, rounded to
2^-24), so the bytes do not depend on a platform's SIMD sin/cos.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from schema.artifacts import FieldSpec
from workers.synth.base import Arrays, ParamsModel, shard_rng

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
SIZE_WORDS = ("small", "large")
CAPTION_WIDTH = 160
MAX_OBJECTS = 4

# cos/sin per whole degree, rounded so that a 1-ulp libm difference cannot change a pixel.
_Q = float(2**24)
COS = np.array([round(math.cos(math.radians(d)) * _Q) / _Q for d in range(360)], dtype=np.float32)
SIN = np.array([round(math.sin(math.radians(d)) * _Q) / _Q for d in range(360)], dtype=np.float32)


def _unit(deg: int) -> tuple[float, float]:
    return float(COS[deg % 360]), float(SIN[deg % 360])


# Edge normals of an upward triangle and the five lines of a pentagram (image y points down).
_TRI_NORMALS = [_unit(90 + 120 * k) for k in range(3)]
_STAR_NORMALS = [_unit(-18 + 72 * k) for k in range(5)]
_STAR_OFFSET = float(COS[72])


class ShapesParams(ParamsModel):
    """Parameters of the `shapes` generator."""

    size: int = Field(default=32, ge=16, le=128, description="image height and width in pixels (32 or 64 usual)")
    min_objects: int = Field(default=1, ge=1, le=MAX_OBJECTS)
    max_objects: int = Field(default=3, ge=1, le=MAX_OBJECTS)
    shapes: tuple[str, ...] = Field(default=SHAPES, min_length=1)
    colours: tuple[str, ...] = Field(default=COLOURS, min_length=1)
    min_scale: float = Field(default=0.15, gt=0.0, le=0.5, description="smallest object radius / image size")
    max_scale: float = Field(default=0.22, gt=0.0, le=0.5, description="largest object radius / image size")
    rotate: bool = True
    noise: float = Field(default=0.15, ge=0.0, le=1.0, description="background noise amplitude (fraction of 255)")
    colour_jitter: float = Field(default=0.1, ge=0.0, le=0.5)
    overlap: bool = Field(default=False, description="allow objects to overlap")

    @field_validator("shapes")
    @classmethod
    def _shapes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in value if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
        return value

    @field_validator("colours")
    @classmethod
    def _colours(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in value if c not in PALETTE]
        if bad:
            raise ValueError(f"unknown colour(s) {bad}; choose from {list(COLOURS)}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> ShapesParams:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must be <= max_scale ({self.max_scale})")
        if self.min_scale * self.size < 2.0:
            raise ValueError(f"min_scale {self.min_scale} gives objects under 2 pixels at size {self.size}")
        return self


def _place(
    rng: np.random.Generator, radius: np.ndarray, active: np.ndarray, size: int, overlap: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) inside the image; without overlap, objects move apart and shrink if crowded."""
    n, m = radius.shape
    radius = radius.copy()

    def draw() -> tuple[np.ndarray, np.ndarray]:
        ux, uy = rng.random((n, m), dtype=np.float32), rng.random((n, m), dtype=np.float32)
        span = np.float32(size) - 2 * radius
        return radius + ux * span, radius + uy * span

    cx, cy = draw()
    if overlap or m == 1:
        return cx, cy, radius
    pair = active[:, :, None] & active[:, None, :] & np.triu(np.ones((m, m), dtype=bool), 1)[None]
    for round_ in range(200):
        dist2 = (cx[:, :, None] - cx[:, None, :]) ** 2 + (cy[:, :, None] - cy[:, None, :]) ** 2
        need = radius[:, :, None] + radius[:, None, :] + 1.0
        clash = pair & (dist2 < need * need)
        if not clash.any():
            break
        move = clash.any(axis=1)  # the later object of each clashing pair moves
        if round_ >= 20 and round_ % 5 == 0:
            radius = np.where(move, radius * np.float32(0.9), radius).astype(np.float32)
        nx, ny = draw()
        cx, cy = np.where(move, nx, cx), np.where(move, ny, cy)
    return cx, cy, radius


def _mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside shape `cls`; u, v are coordinates in units of the object's radius."""
    name = SHAPES[cls]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.3)
    if name == "square":
        return (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for nx, ny in _TRI_NORMALS:
            inside &= nx * u + ny * v <= 0.5
        return inside
    # star: inside the pentagram iff at most one of its five lines is crossed
    outside = np.zeros(u.shape, dtype=np.int8)
    for nx, ny in _STAR_NORMALS:
        outside += nx * u + ny * v > _STAR_OFFSET
    return outside <= 1


def _describe(cls: int, colour: int, size: int) -> str:
    return f"a {SIZE_WORDS[size]} {COLOURS[colour]} {SHAPES[cls]}"


def _relation(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(classes: np.ndarray, colours: np.ndarray, sizes: np.ndarray, centers: np.ndarray, position: int) -> str:
    """The caption of one image from its labels (objects in drawing order)."""
    k = int((classes >= 0).sum())
    parts = [_describe(int(classes[i]), int(colours[i]), int(sizes[i])) for i in range(k)]
    if k == 1:
        return f"{parts[0]} in the {POSITIONS[position]}"
    dx, dy = float(centers[0, 0] - centers[1, 0]), float(centers[0, 1] - centers[1, 1])
    text = f"{parts[0]} {_relation(dx, dy)} {parts[1]}"
    return text + "".join(f" and {p}" for p in parts[2:])


class ShapesGenerator:
    """Coloured geometric shapes on a noisy background."""

    name: ClassVar[str] = "shapes"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[ShapesParams]] = ShapesParams

    def label_schema(self, params: ShapesParams) -> dict[str, FieldSpec]:
        s, m = params.size, params.max_objects
        return {
            "images": FieldSpec(dtype="|u1", shape=[s, s, 3], description="RGB image"),
            "classes": FieldSpec(dtype="<i8", shape=[m], description=f"shape id per object {list(SHAPES)}, -1 pad"),
            "colours": FieldSpec(dtype="<i8", shape=[m], description=f"colour id per object {list(COLOURS)}, -1 pad"),
            "sizes": FieldSpec(dtype="<i8", shape=[m], description="0 small, 1 large, -1 pad"),
            "centers": FieldSpec(dtype="<f4", shape=[m, 2], description="object centre (x, y) in pixels, -1 pad"),
            "radii": FieldSpec(dtype="<f4", shape=[m], description="object radius in pixels, 0 pad"),
            "count": FieldSpec(dtype="<i8", shape=[], description="number of objects"),
            "shape": FieldSpec(dtype="<i8", shape=[], description="shape id of the largest object"),
            "colour": FieldSpec(dtype="<i8", shape=[], description="colour id of the largest object"),
            "position": FieldSpec(dtype="<i8", shape=[], description=f"3x3 cell of the largest object {POSITIONS}"),
            "caption": FieldSpec(dtype=f"<U{CAPTION_WIDTH}", shape=[], description="templated caption"),
        }

    def generate(self, params: ShapesParams, seed: int, shard: int, count: int) -> Arrays:
        """Draw `count` images of shard `shard`."""
        rng = shard_rng(seed, shard)
        n, m, size = count, params.max_objects, params.size
        shape_ids = np.array([SHAPES.index(s) for s in params.shapes])
        colour_ids = np.array([COLOURS.index(c) for c in params.colours])

        n_obj = rng.integers(params.min_objects, params.max_objects + 1, size=n)
        active = np.arange(m)[None, :] < n_obj[:, None]
        classes = shape_ids[rng.integers(0, len(shape_ids), size=(n, m))]
        colours = colour_ids[rng.integers(0, len(colour_ids), size=(n, m))]
        lo, hi = params.min_scale * size, params.max_scale * size
        radius = (lo + rng.random((n, m), dtype=np.float32) * np.float32(hi - lo)).astype(np.float32)
        angle = rng.integers(0, 360, size=(n, m)) if params.rotate else np.zeros((n, m), dtype=np.int64)
        cx, cy, radius = _place(rng, radius, active, size, params.overlap)
        jitter = 1.0 - params.colour_jitter * rng.random((n, m, 1), dtype=np.float32)
        base = rng.integers(0, 40, size=(n, 1, 1, 3), dtype=np.uint8)
        noise = rng.integers(0, int(params.noise * 215) + 1, size=(n, size, size, 3), dtype=np.uint8)
        images = base + noise  # at most 39 + 215: no uint8 overflow
        rgb = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
        fill = np.clip(rgb[colours] * jitter, 0, 255).astype(np.uint8)  # [n, m, 3]
        grid = np.arange(size, dtype=np.float32) + np.float32(0.5)
        for slot in range(m):
            for cls in np.unique(classes[active[:, slot], slot]):
                idx = np.nonzero(active[:, slot] & (classes[:, slot] == cls))[0]
                c, s = COS[angle[idx, slot]], SIN[angle[idx, slot]]
                inv = (np.float32(1.0) / radius[idx, slot])[:, None, None]
                dx = grid[None, None, :] - cx[idx, slot][:, None, None]
                dy = grid[None, :, None] - cy[idx, slot][:, None, None]
                u = (dx * c[:, None, None] + dy * s[:, None, None]) * inv
                v = (dy * c[:, None, None] - dx * s[:, None, None]) * inv
                mask = _mask(int(cls), u, v)
                images[idx] = np.where(mask[..., None], fill[idx, slot][:, None, None, :], images[idx])

        largest = np.argmax(np.where(active, radius, -1.0), axis=1)
        rows = np.arange(n)
        mid = (lo + hi) / 2
        sizes = np.where(active, (radius >= mid).astype(np.int64), -1)
        centers = np.where(active[:, :, None], np.stack([cx, cy], axis=-1), np.float32(-1)).astype(np.float32)
        lx, ly = cx[rows, largest], cy[rows, largest]
        position = np.minimum((ly * 3 / size).astype(np.int64), 2) * 3 + np.minimum((lx * 3 / size).astype(np.int64), 2)
        classes = np.where(active, classes, -1).astype(np.int64)
        colours = np.where(active, colours, -1).astype(np.int64)
        captions = [caption(classes[i], colours[i], sizes[i], centers[i], int(position[i])) for i in range(n)]
        return {
            "images": images,
            "classes": classes,
            "colours": colours,
            "sizes": sizes.astype(np.int64),
            "centers": centers,
            "radii": np.where(active, radius, 0).astype(np.float32),
            "count": n_obj.astype(np.int64),
            "shape": classes[rows, largest],
            "colour": colours[rows, largest],
            "position": position,
            "caption": np.array(captions, dtype=f"<U{CAPTION_WIDTH}"),
        }

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """Captions and labels of the first images."""
        lines = []
        for i in range(min(limit, len(arrays["caption"]))):
            lines.append(
                f"[{i}] {arrays['caption'][i]}  (count={int(arrays['count'][i])}, "
                f"shape={SHAPES[int(arrays['shape'][i])]}, position={POSITIONS[int(arrays['position'][i])]})"
            )
        return "\n".join(lines)

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """The first images."""
        return np.asarray(arrays["images"][:limit])


GENERATOR = ShapesGenerator()
