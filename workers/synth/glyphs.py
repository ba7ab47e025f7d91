"""`glyphs` and `visual_sudoku`: digits 1..9 drawn procedurally as small grayscale images.

Each digit is a set of line segments in a unit box, in one of three styles ("segment": a
seven-segment display, "print": hand-print strokes with arcs, "block": strokes through a 3x5
pixel font). A glyph is the segments warped by a random affine map plus a smooth quadratic wobble,
rasterised by distance to the nearest segment (anti-aliased over one pixel), on a noisy
background. Blank sudoku cells (digit 0) are background noise only.

Only +, -, *, /, sqrt and comparisons run on pixels; angles come from a table rounded to
2^-24, so the bytes are the same on every platform.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from schema.artifacts import FieldSpec
from workers.synth.base import Arrays, ParamsModel, shard_rng
from workers.synth.sudoku import BOXES, MIN_GIVENS, render, sample_puzzles

STYLES = ("segment", "print", "block")
_Q = float(2**24)
Point = tuple[float, float]


def _cs(deg: int) -> tuple[float, float]:
    rad = math.radians(deg % 360)
    return round(math.cos(rad) * _Q) / _Q, round(math.sin(rad) * _Q) / _Q


def _arc(cx: float, cy: float, r: float, a0: int, a1: int, steps: int) -> list[Point]:
    """Points along a circular arc from a0 to a1 degrees (0 = right, 90 = down), whole degrees."""
    out = []
    for k in range(steps + 1):
        c, s = _cs(round(a0 + (a1 - a0) * k / steps))
        out.append((cx + r * c, cy + r * s))
    return out


def _segments(polylines: Sequence[Sequence[Point]]) -> list[tuple[Point, Point]]:
    segs = []
    for line in polylines:
        if len(line) == 1:
            segs.append((line[0], line[0]))
        segs.extend(itertools.pairwise(line))
    return segs


def _seven_segment() -> dict[int, list[tuple[Point, Point]]]:
    x0, x1, y0, y1, y2 = 0.3, 0.7, 0.15, 0.5, 0.85
    seg = {
        "a": ((x0, y0), (x1, y0)),
        "b": ((x1, y0), (x1, y1)),
        "c": ((x1, y1), (x1, y2)),
        "d": ((x0, y2), (x1, y2)),
        "e": ((x0, y1), (x0, y2)),
        "f": ((x0, y0), (x0, y1)),
        "g": ((x0, y1), (x1, y1)),
    }
    lit = {1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg"}
    return {d: [seg[s] for s in names] for d, names in lit.items()}


def _print() -> dict[int, list[tuple[Point, Point]]]:
    top2 = _arc(0.5, 0.33, 0.19, 190, 380, 8)
    lines: dict[int, list[list[Point]]] = {
        1: [[(0.36, 0.28), (0.52, 0.14), (0.52, 0.86)], [(0.36, 0.86), (0.68, 0.86)]],
        2: [[*top2, (0.3, 0.86), (0.72, 0.86)]],
        3: [_arc(0.5, 0.32, 0.17, 200, 450, 8), _arc(0.5, 0.67, 0.19, 270, 520, 8)],
        4: [[(0.62, 0.86), (0.62, 0.14), (0.26, 0.62), (0.76, 0.62)]],
        5: [[(0.7, 0.14), (0.36, 0.14), (0.33, 0.45), *_arc(0.5, 0.64, 0.21, 220, 520, 10)]],
        6: [[(0.64, 0.15), (0.36, 0.5)], _arc(0.5, 0.65, 0.2, 0, 360, 14)],
        7: [[(0.28, 0.15), (0.72, 0.15), (0.44, 0.86)]],
        8: [_arc(0.5, 0.31, 0.16, 0, 360, 12), _arc(0.5, 0.66, 0.2, 0, 360, 14)],
        9: [_arc(0.5, 0.34, 0.19, 0, 360, 14), [(0.69, 0.34), (0.6, 0.86)]],
    }
    return {d: _segments(p) for d, p in lines.items()}


_FONT = {
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", "..#", "..#", "..#"),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}


def _block() -> dict[int, list[tuple[Point, Point]]]:
    out = {}
    for digit, rows in _FONT.items():

        def at(i: int, j: int) -> Point:
            return (0.3 + 0.2 * j, 0.15 + 0.175 * i)

        segs = []
        for i, row in enumerate(rows):
            for j, ch in enumerate(row):
                if ch != "#":
                    continue
                if j + 1 < 3 and row[j + 1] == "#":
                    segs.append((at(i, j), at(i, j + 1)))
                if i + 1 < 5 and rows[i + 1][j] == "#":
                    segs.append((at(i, j), at(i + 1, j)))
        out[digit] = segs
    return out


@lru_cache(maxsize=1)
def stroke_table() -> np.ndarray:
    """Segments of every (style, digit) as float32 [styles, 10, max_segments, 4], padded far away."""
    styles = [_seven_segment(), _print(), _block()]
    most = max(len(s) for table in styles for s in table.values())
    out = np.full((len(styles), 10, most, 4), 100.0, dtype=np.float32)  # padding: never nearest
    for k, table in enumerate(styles):
        for digit, segs in table.items():
            out[k, digit, : len(segs)] = [(a[0], a[1], b[0], b[1]) for a, b in segs]
    return out


def render_digits(
    digits: np.ndarray,
    rng: np.random.Generator,
    size: int = 28,
    styles: Sequence[str] = STYLES,
    jitter: float = 0.5,
    noise: float = 0.1,
    thickness: tuple[float, float] = (0.05, 0.085),
) -> tuple[np.ndarray, np.ndarray]:
    """Render digits (0 = blank, 1..9) as uint8 [N, size, size]; also returns each glyph's style id."""
    digits = np.asarray(digits, dtype=np.int64).reshape(-1)
    n = len(digits)
    style_ids = np.array([STYLES.index(s) for s in styles])[rng.integers(len(styles), size=n)]
    f32 = np.float32
    # Per-glyph geometry: rotation, scale, shear, translation, quadratic wobble, stroke width and ink.
    deg = np.rint((rng.random(n) * 2 - 1) * 15 * jitter).astype(np.int64)
    cos = np.array([_cs(int(d))[0] for d in deg], dtype=f32)
    sin = np.array([_cs(int(d))[1] for d in deg], dtype=f32)
    scale = (1 + (rng.random(n) * 0.25 - 0.15) * jitter).astype(f32)
    shear = ((rng.random(n) * 2 - 1) * 0.25 * jitter).astype(f32)
    shift = ((rng.random((n, 2)) * 2 - 1) * 0.08 * jitter).astype(f32)
    wobble = ((rng.random((n, 4)) * 2 - 1) * 0.6 * jitter).astype(f32)
    width = (thickness[0] + rng.random(n) * (thickness[1] - thickness[0])).astype(f32)
    ink = (170 + rng.random(n) * 85).astype(f32)
    level = rng.integers(0, 30, size=(n, 1, 1), dtype=np.uint8)
    grain = rng.integers(0, int(noise * 200) + 1, size=(n, size, size), dtype=np.uint8)

    table = stroke_table()
    segs = table[style_ids, digits]  # [n, S, 4]
    ends = segs.reshape(n, -1, 2, 2) - f32(0.5)  # centred endpoints [n, S, 2, 2]
    x, y = ends[..., 0], ends[..., 1]
    w = wobble[:, None, None, :]
    x = x + w[..., 0] * x * y + w[..., 1] * y * y
    y = y + w[..., 2] * x * x + w[..., 3] * x * y
    x = x + shear[:, None, None] * y
    xr = (cos[:, None, None] * x - sin[:, None, None] * y) * scale[:, None, None] + shift[:, None, None, 0]
    yr = (sin[:, None, None] * x + cos[:, None, None] * y) * scale[:, None, None] + shift[:, None, None, 1]
    far = segs[..., 0] >= 50  # keep the padding far away
    ax = np.where(far, f32(100), xr[..., 0] + f32(0.5))
    ay = np.where(far, f32(100), yr[..., 0] + f32(0.5))
    bx = np.where(far, f32(100), xr[..., 1] + f32(0.5))
    by = np.where(far, f32(100), yr[..., 1] + f32(0.5))

    grid = (np.arange(size, dtype=f32) + f32(0.5)) / f32(size)
    px = np.tile(grid, size)[None, None, :]
    py = np.repeat(grid, size)[None, None, :]
    images = (level + grain).astype(np.uint8)  # at most 29 + 200
    chunk = 64
    for lo in range(0, n, chunk):
        sl = slice(lo, lo + chunk)
        live = digits[sl] > 0
        if not live.any():
            continue
        ax_, ay_, bx_, by_ = (v[sl][live][:, :, None] for v in (ax, ay, bx, by))
        dx, dy = bx_ - ax_, by_ - ay_
        len2 = np.maximum(dx * dx + dy * dy, f32(1e-8))
        qx, qy = px - ax_, py - ay_
        t = np.clip((qx * dx + qy * dy) / len2, f32(0), f32(1))
        ex, ey = qx - t * dx, qy - t * dy
        dist = np.sqrt((ex * ex + ey * ey).min(axis=1))  # [k, P]
        cover = np.clip((width[sl][live][:, None] - dist) * f32(size) + f32(0.5), f32(0), f32(1))
        idx = np.arange(lo, min(lo + chunk, n))[live]
        base = images[idx].reshape(len(idx), -1).astype(f32)
        out = base + cover * (ink[idx][:, None] - base)
        images[idx] = np.clip(out, 0, 255).astype(np.uint8).reshape(len(idx), size, size)
    return images, style_ids.astype(np.int64)


def visual_sudoku(
    puzzles: np.ndarray,
    rng: np.random.Generator,
    cell_size: int = 28,
    styles: Sequence[str] = STYLES,
    jitter: float = 0.5,
    noise: float = 0.1,
) -> np.ndarray:
    """Every cell of puzzles [N, n, n] (0 = blank) rendered: uint8 [N, n, n, cell_size, cell_size]."""
    puzzles = np.asarray(puzzles)
    n_puz, n = puzzles.shape[0], puzzles.shape[1]
    cells, _ = render_digits(puzzles.reshape(-1), rng, cell_size, styles, jitter, noise)
    return cells.reshape(n_puz, n, n, cell_size, cell_size)


def tile(cells: np.ndarray, line: int = 1) -> np.ndarray:
    """Cells [N, n, n, S, S] laid out as whole grids [N, H, W] with grid lines (brighter at box edges)."""
    n_puz, n, _, s, _ = cells.shape
    br, bc = BOXES[n]
    side_h = n * s + (n + 1) * line
    out = np.full((n_puz, side_h, side_h), 60, dtype=np.uint8)
    for r in range(n):
        for c in range(n):
            y, x = line + r * (s + line), line + c * (s + line)
            out[:, y : y + s, x : x + s] = cells[:, r, c]
    for k in range(0, n + 1):
        pos = k * (s + line)
        if k % br == 0:
            out[:, pos : pos + line, :] = 200
        if k % bc == 0:
            out[:, :, pos : pos + line] = 200
    return out


def _check_styles(value: tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in value if s not in STYLES]
    if bad:
        raise ValueError(f"unknown style(s) {bad}; choose from {list(STYLES)}")
    return value


class GlyphParams(ParamsModel):
    """Parameters of the `glyphs` generator."""

    size: int = Field(default=28, ge=8, le=64, description="glyph height and width in pixels (16 or 28 usual)")
    digits: tuple[int, ...] = Field(default=(1, 2, 3, 4, 5, 6, 7, 8, 9), min_length=1)
    styles: tuple[str, ...] = Field(default=STYLES, min_length=1)
    jitter: float = Field(default=0.5, ge=0.0, le=1.0)
    noise: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("digits")
    @classmethod
    def _digits(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [d for d in value if not 1 <= d <= 9]
        if bad:
            raise ValueError(f"digits must be 1..9, got {bad}")
        return value

    @field_validator("styles")
    @classmethod
    def _styles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_styles(value)


class GlyphGenerator:
    """Single digit glyphs with their digit and style labels."""

    name: ClassVar[str] = "glyphs"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[GlyphParams]] = GlyphParams

    def label_schema(self, params: GlyphParams) -> dict[str, FieldSpec]:
        s = params.size
        return {
            "images": FieldSpec(dtype="|u1", shape=[s, s], description="grayscale glyph"),
            "digit": FieldSpec(dtype="<i8", shape=[], description="digit 1..9"),
            "style": FieldSpec(dtype="<i8", shape=[], description=f"style id {list(STYLES)}"),
        }

    def generate(self, params: GlyphParams, seed: int, shard: int, count: int) -> Arrays:
        """`count` glyphs of shard `shard`."""
        rng = shard_rng(seed, shard)
        digits = np.array(params.digits, dtype=np.int64)[rng.integers(len(params.digits), size=count)]
        images, style = render_digits(digits, rng, params.size, params.styles, params.jitter, params.noise)
        return {"images": images, "digit": digits, "style": style}

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """Digits of the first glyphs."""
        k = min(limit, len(arrays["digit"]))
        return "digits: " + " ".join(str(int(d)) for d in arrays["digit"][:k])

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """The first glyphs."""
        return np.asarray(arrays["images"][:limit])


class VisualSudokuParams(ParamsModel):
    """Parameters of the `visual_sudoku` generator: a sudoku plus how its cells are drawn."""

    n: Literal[4, 6, 9] = 9
    givens: int | None = None
    max_tries: int = Field(default=50, ge=1, le=10_000)
    split: Literal["all", "train", "test"] = "all"
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_salt: str = "sudoku"
    cell_size: int = Field(default=28, ge=8, le=64)
    styles: tuple[str, ...] = Field(default=STYLES, min_length=1)
    jitter: float = Field(default=0.5, ge=0.0, le=1.0)
    noise: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("styles")
    @classmethod
    def _styles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_styles(value)

    @model_validator(mode="after")
    def _givens(self) -> VisualSudokuParams:
        if self.givens is not None and not MIN_GIVENS[self.n] <= self.givens <= self.n * self.n:
            raise ValueError(
                f"givens: a {self.n}x{self.n} sudoku with a unique solution needs "
                f"{MIN_GIVENS[self.n]}..{self.n * self.n} givens, got {self.givens}"
            )
        return self


class VisualSudokuGenerator:
    """Sudoku puzzles whose cells are rendered as glyph images (blanks as noise)."""

    name: ClassVar[str] = "visual_sudoku"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[VisualSudokuParams]] = VisualSudokuParams

    def label_schema(self, params: VisualSudokuParams) -> dict[str, FieldSpec]:
        n, s = params.n, params.cell_size
        return {
            "cells": FieldSpec(dtype="|u1", shape=[n, n, s, s], description="each cell rendered, blanks as noise"),
            "puzzles": FieldSpec(dtype="|i1", shape=[n, n], description="digits 1..n, 0 = blank"),
            "solutions": FieldSpec(dtype="|i1", shape=[n, n], description="the unique solution"),
            "givens": FieldSpec(dtype="<i2", shape=[], description="number of givens"),
            "key": FieldSpec(dtype="<U32", shape=[], description="canonical key of the symmetry class"),
        }

    def generate(self, params: VisualSudokuParams, seed: int, shard: int, count: int) -> Arrays:
        """`count` rendered puzzles of shard `shard`."""
        rng = shard_rng(seed, shard)
        arrays = sample_puzzles(
            params.n, params.givens, rng, count, params.max_tries, params.split, params.test_fraction, params.split_salt
        )
        arrays["cells"] = visual_sudoku(
            arrays["puzzles"], rng, params.cell_size, params.styles, params.jitter, params.noise
        )
        return arrays

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """The first puzzles as text (the contact sheet shows the rendering)."""
        return "\n\n".join(f"[{i}]\n{render(arrays['puzzles'][i])}" for i in range(min(limit, len(arrays["puzzles"]))))

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """The first puzzles as whole rendered grids."""
        return tile(np.asarray(arrays["cells"][:limit]))
