"""Glyphs and visual sudoku: digits are drawn, readable, and blanks are only noise."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from workers.synth.base import SynthError, check_arrays, validate_params
from workers.synth.glyphs import (
    STYLES,
    GlyphGenerator,
    GlyphParams,
    VisualSudokuGenerator,
    VisualSudokuParams,
    render_digits,
    tile,
    visual_sudoku,
)
from workers.synth.sudoku import agrees, count_solutions

GLYPHS = GlyphGenerator()
VISUAL = VisualSudokuGenerator()
NOISE_CEILING = 29 + 20  # background level + noise 0.1 * 200


def test_glyph_arrays() -> None:
    for size in (16, 28):
        params = GlyphParams(size=size)
        out = GLYPHS.generate(params, seed=0, shard=0, count=90)
        check_arrays(GLYPHS, params, out, 90)
        assert out["images"].shape == (90, size, size) and out["images"].dtype == np.uint8
        assert set(out["digit"].tolist()) == set(range(1, 10))
        assert set(out["style"].tolist()) == set(range(len(STYLES)))


def test_every_glyph_has_ink_and_blanks_have_none() -> None:
    digits = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 30)
    images, _ = render_digits(digits, np.random.default_rng(0), size=28, noise=0.1)
    for img, d in zip(images, digits, strict=True):
        if d == 0:
            assert img.max() <= NOISE_CEILING
        else:
            assert (img >= 150).sum() >= 15  # a visible stroke
            assert (img >= 150).mean() < 0.5  # and not a filled square


@pytest.mark.parametrize("style", STYLES)
def test_clean_digits_differ_from_each_other(style: str) -> None:
    images, _ = render_digits(np.arange(1, 10), np.random.default_rng(0), size=28, styles=(style,), jitter=0.0,
                              noise=0.0)
    ink = images.astype(float) / 255
    for a in range(9):
        for b in range(a + 1, 9):
            assert np.abs(ink[a] - ink[b]).sum() > 12, (style, a + 1, b + 1)


def test_jittered_glyphs_are_readable_by_a_nearest_centroid_classifier() -> None:
    # If digits were ambiguous or the jitter destroyed them, even this crude reader would fail.
    out_train = GLYPHS.generate(GlyphParams(size=16), seed=1, shard=0, count=1800)
    out_test = GLYPHS.generate(GlyphParams(size=16), seed=1, shard=1, count=450)
    x_train = out_train["images"].reshape(len(out_train["digit"]), -1).astype(float)
    x_test = out_test["images"].reshape(len(out_test["digit"]), -1).astype(float)
    keys = [(d, s) for d in range(1, 10) for s in range(len(STYLES))]
    centroids = np.stack([x_train[(out_train["digit"] == d) & (out_train["style"] == s)].mean(axis=0) for d, s in keys])
    dist = ((x_test[:, None, :] - centroids[None]) ** 2).sum(axis=2)
    predicted = np.array([keys[k][0] for k in dist.argmin(axis=1)])
    accuracy = (predicted == out_test["digit"]).mean()
    assert accuracy > 0.85, accuracy  # measured 0.96 at the default jitter


def test_visual_sudoku_cells_follow_the_puzzle() -> None:
    params = VisualSudokuParams(n=6, cell_size=16)
    out = VISUAL.generate(params, seed=3, shard=0, count=4)
    check_arrays(VISUAL, params, out, 4)
    assert out["cells"].shape == (4, 6, 6, 16, 16)
    for cells, puzzle, solution in zip(out["cells"], out["puzzles"], out["solutions"], strict=True):
        assert count_solutions(puzzle) == 1 and agrees(puzzle, solution)
        for r in range(6):
            for c in range(6):
                if puzzle[r, c] == 0:
                    assert cells[r, c].max() <= NOISE_CEILING
                else:
                    assert (cells[r, c] >= 150).sum() >= 8


def test_visual_sudoku_function_and_tiling() -> None:
    puzzles = np.zeros((2, 9, 9), dtype=np.int8)
    puzzles[0, 4, 4] = 7
    cells = visual_sudoku(puzzles, np.random.default_rng(0), cell_size=12)
    assert cells.shape == (2, 9, 9, 12, 12)
    assert cells[0, 4, 4].max() > 150 and cells[1].max() <= NOISE_CEILING
    grid = tile(cells)
    assert grid.shape == (2, 9 * 12 + 10, 9 * 12 + 10)
    np.testing.assert_array_equal(grid[0, 1 + 4 * 13 : 1 + 4 * 13 + 12, 1 + 4 * 13 : 1 + 4 * 13 + 12], cells[0, 4, 4])
    assert VISUAL.preview_images({"cells": cells}, 1).shape == (1, 118, 118)  # type: ignore[union-attr]


def test_same_seed_same_pixels() -> None:
    a = GLYPHS.generate(GlyphParams(), 7, 0, 20)
    b = GLYPHS.generate(GlyphParams(), 7, 0, 20)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], GLYPHS.generate(GlyphParams(), 7, 1, 20)["images"])


@pytest.mark.parametrize(("generator", "params", "field"), [
    ("glyphs", {"size": 0}, "size"), ("glyphs", {"digits": [0, 1]}, "digits"),
    ("glyphs", {"styles": ["gothic"]}, "styles"),
    ("glyphs", {"noise": 3}, "noise"), ("visual_sudoku", {"n": 9, "givens": 10}, "givens"),
    ("visual_sudoku", {"cell_size": -1}, "cell_size"), ("visual_sudoku", {"styles": ["x"]}, "styles"),
])
def test_bad_parameters_name_the_field(generator: str, params: dict, field: str) -> None:
    model = GlyphParams if generator == "glyphs" else VisualSudokuParams
    with pytest.raises(ValidationError) as err:
        model.model_validate(params)
    assert field in str(err.value)
    with pytest.raises(SynthError, match=field):
        validate_params(generator, params)
