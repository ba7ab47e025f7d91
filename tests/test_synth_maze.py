"""The `maze` generator: the labelled path is a shortest path (checked by an independent BFS)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from pydantic import ValidationError

from workers.synth.base import SynthError, validate_params
from workers.synth.maze import GOAL, START, WALL, MazeGenerator, MazeParams

GEN = MazeGenerator()


def distances(free: np.ndarray, start: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Plain BFS written for the test, independent of the generator's code."""
    seen = {start: 0}
    todo = deque([start])
    while todo:
        cell = todo.popleft()
        for step in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            nxt = (cell[0] + step[0], cell[1] + step[1])
            if 0 <= nxt[0] < free.shape[0] and 0 <= nxt[1] < free.shape[1] and free[nxt] and nxt not in seen:
                seen[nxt] = seen[cell] + 1
                todo.append(nxt)
    return seen


def check_maze(out: dict[str, np.ndarray], i: int) -> int:
    maze, path = out["maze"][i], out["path"][i].astype(bool)
    start, goal = tuple(int(v) for v in out["start"][i]), tuple(int(v) for v in out["goal"][i])
    assert maze[start] == START and maze[goal] == GOAL and start != goal
    assert (maze == START).sum() == 1 and (maze == GOAL).sum() == 1
    free = maze != WALL
    # Border is wall; free cells all connected.
    assert not free[0].any() and not free[-1].any() and not free[:, 0].any() and not free[:, -1].any()
    dist = distances(free, start)
    assert len(dist) == int(free.sum())
    # The path: on free cells, from start to goal, consecutive cells adjacent, as short as BFS says.
    assert not (path & ~free).any() and path[start] and path[goal]
    assert int(out["length"][i]) == dist[goal] == int(path.sum()) - 1
    # Walk the path: each step goes one closer to the goal, so it is a simple shortest path.
    to_goal = distances(free, goal)
    cell, steps = start, 0
    while cell != goal:
        nxt = [(cell[0] + a, cell[1] + b) for a, b in ((0, 1), (1, 0), (0, -1), (-1, 0))]
        on = [c for c in nxt if 0 <= c[0] < free.shape[0] and 0 <= c[1] < free.shape[1] and path[c]
              and to_goal.get(c, -1) == to_goal[cell] - 1]
        assert len(on) >= 1
        cell, steps = on[0], steps + 1
    assert steps == dist[goal]
    return dist[goal]


@pytest.mark.parametrize("params", [
    MazeParams(), MazeParams(height=31, width=31), MazeParams(height=5, width=5),
    MazeParams(height=9, width=21, loops=0.2), MazeParams(height=15, width=15, hard=True),
])
def test_paths_are_shortest(params: MazeParams) -> None:
    out = GEN.generate(params, seed=2, shard=0, count=25)
    assert out["maze"].shape == (25, params.height, params.width) and out["maze"].dtype == np.int8
    assert out["path"].dtype == np.uint8
    for i in range(25):
        check_maze(out, i)


def test_perfect_mazes_are_trees_and_loops_add_cycles() -> None:
    def edges(free: np.ndarray) -> int:
        return int((free[1:, :] & free[:-1, :]).sum() + (free[:, 1:] & free[:, :-1]).sum())

    perfect = GEN.generate(MazeParams(height=15, width=15), 0, 0, 10)
    loopy = GEN.generate(MazeParams(height=15, width=15, loops=0.3), 0, 0, 10)
    for maze in perfect["maze"]:
        free = maze != WALL
        assert edges(free) == int(free.sum()) - 1  # connected with n-1 edges: a tree
    assert all(edges(m != WALL) > int((m != WALL).sum()) - 1 for m in loopy["maze"])


def test_hard_mazes_use_the_longest_path() -> None:
    params = MazeParams(height=11, width=11, hard=True)
    out = GEN.generate(params, seed=5, shard=0, count=8)
    for i in range(8):
        free = out["maze"][i] != WALL
        cells = [(r, c) for r in range(1, 11, 2) for c in range(1, 11, 2)]
        diameter = max(max(distances(free, a)[b] for b in cells) for a in cells)
        assert check_maze(out, i) == diameter
    easy = GEN.generate(MazeParams(height=11, width=11), seed=5, shard=0, count=40)
    assert out["length"].mean() > easy["length"].mean()


@pytest.mark.parametrize(("params", "field"), [
    ({"height": 10}, "height"), ({"width": 33}, "width"), ({"height": 3}, "height"), ({"loops": 2}, "loops"),
    ({"hard": "very"}, "hard"), ({"size": 9}, "size"),
])
def test_bad_parameters_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        MazeParams.model_validate(params)
    assert field in str(err.value)
    with pytest.raises(SynthError, match=field):
        validate_params("maze", params)


def test_preview_draws_the_path() -> None:
    out = GEN.generate(MazeParams(height=7, width=7), 0, 0, 1)
    text = GEN.preview(out, 1)
    assert "S" in text and "G" in text and "#" in text
    assert text.count("*") == int(out["length"][0]) - 1
