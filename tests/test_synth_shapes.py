"""The `shapes` generator: arrays, labels consistent with pixels, captions, parameters."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from pydantic import ValidationError

from workers.synth.base import SynthError, check_arrays, validate_params
from workers.synth.shapes import COLOURS, PALETTE, POSITIONS, SHAPES, ShapesGenerator, ShapesParams

GEN = ShapesGenerator()


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    return GEN.generate(ShapesParams(), seed=11, shard=0, count=400)


def test_arrays_match_the_schema(batch: dict[str, np.ndarray]) -> None:
    params = ShapesParams()
    check_arrays(GEN, params, batch, 400)
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (400, 32, 32, 3)
    assert batch["classes"].shape == (400, 3) and batch["classes"].dtype == np.int64
    big = GEN.generate(ShapesParams(size=64, max_objects=4, min_objects=4), 0, 0, 5)
    assert big["images"].shape == (5, 64, 64, 3) and big["classes"].shape == (5, 4)
    assert (big["count"] == 4).all()


def test_labels_are_consistent(batch: dict[str, np.ndarray]) -> None:
    count, classes, colours, radii = batch["count"], batch["classes"], batch["colours"], batch["radii"]
    assert set(np.unique(count).tolist()) == {1, 2, 3}
    for i in range(len(count)):
        k = int(count[i])
        assert (classes[i, :k] >= 0).all() and (classes[i, k:] == -1).all()
        assert (colours[i, :k] >= 0).all() and (colours[i, k:] == -1).all()
        assert (batch["sizes"][i, k:] == -1).all() and (radii[i, k:] == 0).all()
        largest = int(np.argmax(radii[i, :k]))
        assert batch["shape"][i] == classes[i, largest]
        assert batch["colour"][i] == colours[i, largest]
        x, y = batch["centers"][i, largest]
        assert batch["position"][i] == min(int(y * 3 / 32), 2) * 3 + min(int(x * 3 / 32), 2)
    # every class and colour shows up in a batch this size
    assert set(classes[classes >= 0].tolist()) == set(range(len(SHAPES)))
    assert set(colours[colours >= 0].tolist()) == set(range(len(COLOURS)))


def test_objects_do_not_overlap_and_stay_inside(batch: dict[str, np.ndarray]) -> None:
    for i in range(len(batch["count"])):
        k = int(batch["count"][i])
        c, r = batch["centers"][i, :k], batch["radii"][i, :k]
        assert (c - r[:, None] >= -1e-4).all() and (c + r[:, None] <= 32 + 1e-4).all()
        for a in range(k):
            for b in range(a + 1, k):
                assert np.hypot(*(c[a] - c[b])) >= r[a] + r[b] + 1 - 1e-4


def test_pixels_carry_the_object_colour(batch: dict[str, np.ndarray]) -> None:
    # The centre pixel of every solid shape (not the hollow ring) has the object's fill colour.
    checked = 0
    for i in range(len(batch["count"])):
        for j in range(int(batch["count"][i])):
            if SHAPES[batch["classes"][i, j]] == "ring":
                continue
            x, y = batch["centers"][i, j]
            pixel = batch["images"][i, int(y), int(x)].astype(float)
            rgb = np.array(PALETTE[COLOURS[batch["colours"][i, j]]], dtype=float)
            assert (pixel <= rgb + 1).all() and (pixel >= rgb * 0.9 - 1).all(), (i, j, pixel, rgb)
            checked += 1
    assert checked > 300


@pytest.mark.parametrize(
    ("shape", "area"),
    [("circle", math.pi), ("square", 1.44**2), ("triangle", 3 * math.sqrt(3) / 4), ("ring", math.pi * 0.7),
     ("cross", 2 * 0.6 * 1.9 - 0.36), ("star", 1.12)],
)
def test_each_shape_covers_its_expected_area(shape: str, area: float) -> None:
    # One large, unrotated object on a black background: the coloured area is the shape's area.
    p = ShapesParams(size=128, min_objects=1, max_objects=1, shapes=(shape,), colours=("white",),
                     min_scale=0.35, max_scale=0.35, rotate=False, noise=0.0, colour_jitter=0.0)
    out = GEN.generate(p, 0, 0, 2)
    r = float(out["radii"][0, 0])
    lit = (out["images"][0].min(axis=2) > 200).sum()
    assert lit / (r * r) == pytest.approx(area, rel=0.06)
    assert SHAPES[out["shape"][0]] == shape


def test_shapes_are_told_apart_by_their_masks() -> None:
    masks = {}
    for shape in SHAPES:
        p = ShapesParams(size=64, min_objects=1, max_objects=1, shapes=(shape,), colours=("white",),
                         min_scale=0.4, max_scale=0.4, rotate=False, noise=0.0, colour_jitter=0.0)
        masks[shape] = GEN.generate(p, 5, 0, 1)["images"][0].min(axis=2) > 200
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 100, (a, b)


def test_captions_follow_the_template(batch: dict[str, np.ndarray]) -> None:
    obj = rf"an? (small|large) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    one = re.compile(rf"^{obj} in the ({'|'.join(POSITIONS)})$")
    many = re.compile(rf"^{obj} (left of|right of|above|below) {obj}( and {obj})*$")
    for i in range(len(batch["count"])):
        text = str(batch["caption"][i])
        k = int(batch["count"][i])
        m = (one if k == 1 else many).match(text)
        assert m, text
        assert text.count(" a ") + 1 == k
        first = f"{COLOURS[batch['colours'][i, 0]]} {SHAPES[batch['classes'][i, 0]]}"
        assert text.split(" ", 2)[2].startswith(first)
        if k >= 2:
            dx, dy = batch["centers"][i, 0] - batch["centers"][i, 1]
            rel = m.group(4)
            if abs(dx) >= abs(dy):
                assert rel == ("left of" if dx < 0 else "right of")
            else:
                assert rel == ("above" if dy < 0 else "below")


def test_same_seed_same_images_other_shard_other_images() -> None:
    p = ShapesParams()
    a, b = GEN.generate(p, 4, 2, 30), GEN.generate(p, 4, 2, 30)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["images"], GEN.generate(p, 4, 3, 30)["images"])
    assert not np.array_equal(a["images"], GEN.generate(p, 5, 2, 30)["images"])


@pytest.mark.parametrize(
    ("params", "field"),
    [({"size": 0}, "size"), ({"min_objects": 3, "max_objects": 2}, "min_objects"), ({"max_objects": 5}, "max_objects"),
     ({"colours": ["red", "mauve"]}, "colours"), ({"shapes": ["hexagon"]}, "shapes"), ({"noise": -0.1}, "noise"),
     ({"min_scale": 0.3, "max_scale": 0.2}, "min_scale"), ({"sizes": 3}, "sizes")],
)
def test_bad_parameters_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        ShapesParams.model_validate(params)
    assert field in str(err.value)
    with pytest.raises(SynthError, match=field):
        validate_params("shapes", params)


def test_fast_enough() -> None:
    # The bench measures properly; this only guards against an accidental order-of-magnitude slowdown.
    GEN.generate(ShapesParams(), 0, 0, 50)
    start = time.perf_counter()
    GEN.generate(ShapesParams(), 1, 0, 2000)
    assert time.perf_counter() - start < 4.0
