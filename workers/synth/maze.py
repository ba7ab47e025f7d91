"""`maze`: grid mazes with a start, a goal and the shortest path between them (BFS) as the label.

Mazes are carved by a depth-first backtracker on the odd cells of the grid (a perfect maze:
exactly one path between two cells); `loops` then knocks out a fraction of the remaining inner
walls so that some mazes have several routes and the shortest one matters. The `hard` variant
puts start and goal at the two ends of a longest shortest path (found by two BFS passes: exact
for perfect mazes, a close approximation with loops).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from pydantic import Field, field_validator

from schema.artifacts import FieldSpec
from workers.synth.base import Arrays, ParamsModel, shard_rng

FREE, WALL, START, GOAL = 0, 1, 2, 3
MAX_SIZE = 31


class MazeParams(ParamsModel):
    """Parameters of the `maze` generator."""

    height: int = Field(default=15, ge=5, le=MAX_SIZE, description="odd, 5..31")
    width: int = Field(default=15, ge=5, le=MAX_SIZE, description="odd, 5..31")
    hard: bool = Field(default=False, description="start and goal at the ends of a longest path")
    loops: float = Field(default=0.0, ge=0.0, le=1.0, description="fraction of inner walls removed")

    @field_validator("height", "width")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (walls sit on even rows and columns), got {value}")
        return value


def carve(height: int, width: int, rng: np.random.Generator, loops: float = 0.0) -> np.ndarray:
    """A maze as uint8 [height, width]: 1 = wall, 0 = free; free cells sit at odd coordinates."""
    walls = np.ones((height, width), dtype=np.uint8)
    ch, cw = height // 2, width // 2
    visited = np.zeros((ch, cw), dtype=bool)
    # One pre-drawn random number per step keeps the walk fast and deterministic.
    draws = rng.random(ch * cw + 2).tolist()
    step = 1
    r, c = int(draws[0] * ch), int(draws[1] * cw)
    stack = [(r, c)]
    visited[r, c] = True
    walls[2 * r + 1, 2 * c + 1] = 0
    moves = ((-1, 0), (1, 0), (0, -1), (0, 1))
    while stack:
        r, c = stack[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in moves
            if 0 <= r + dr < ch and 0 <= c + dc < cw and not visited[r + dr, c + dc]
        ]
        if not options:
            stack.pop()
            continue
        step += 1
        nr, nc = options[int(draws[step % len(draws)] * len(options))]
        visited[nr, nc] = True
        walls[2 * nr + 1, 2 * nc + 1] = 0
        walls[r + nr + 1, c + nc + 1] = 0  # the wall between the two cells
        stack.append((nr, nc))
    if loops > 0:
        # Inner walls between two cells: one odd and one even coordinate, not on the border.
        rr, cc = np.meshgrid(np.arange(1, height - 1), np.arange(1, width - 1), indexing="ij")
        between = ((rr % 2) != (cc % 2)) & (walls[1:-1, 1:-1] == 1)
        knock = between & (rng.random(between.shape) < loops)
        walls[1:-1, 1:-1][knock] = 0
    return walls


def bfs(walls: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """Distances from `start` to every free cell (-1 where unreachable or a wall)."""
    h, w = walls.shape
    dist = np.full((h, w), -1, dtype=np.int64)
    dist[start] = 0
    queue = deque([start])
    free = walls == 0
    while queue:
        r, c = queue.popleft()
        d = dist[r, c] + 1
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and free[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = d
                queue.append((nr, nc))
    return dist


def shortest_path(walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells of a shortest path from start to goal, both included (BFS from the goal, then descend)."""
    dist = bfs(walls, goal)
    if dist[start] < 0:
        raise ValueError(f"goal {goal} is not reachable from {start}")
    h, w = walls.shape
    path = [start]
    r, c = start
    while (r, c) != goal:
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and dist[nr, nc] == dist[r, c] - 1:
                r, c = nr, nc
                break
        path.append((r, c))
    return path


def _farthest(dist: np.ndarray) -> tuple[int, int]:
    flat = int(np.argmax(dist))
    return flat // dist.shape[1], flat % dist.shape[1]


def render(maze: np.ndarray, path: np.ndarray | None = None) -> str:
    """ASCII: '#' wall, 'S' start, 'G' goal, '*' path, ' ' free."""
    chars = {FREE: " ", WALL: "#", START: "S", GOAL: "G"}
    lines = []
    for r in range(maze.shape[0]):
        row = []
        for c in range(maze.shape[1]):
            v = int(maze[r, c])
            row.append("*" if v == FREE and path is not None and path[r, c] else chars[v])
        lines.append("".join(row))
    return "\n".join(lines)


class MazeGenerator:
    """Mazes with start, goal and shortest path."""

    name: ClassVar[str] = "maze"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[MazeParams]] = MazeParams

    def label_schema(self, params: MazeParams) -> dict[str, FieldSpec]:
        h, w = params.height, params.width
        return {
            "maze": FieldSpec(dtype="|i1", shape=[h, w], description="0 free, 1 wall, 2 start, 3 goal"),
            "path": FieldSpec(dtype="|u1", shape=[h, w], description="1 on a shortest path (start and goal included)"),
            "start": FieldSpec(dtype="<i8", shape=[2], description="(row, col)"),
            "goal": FieldSpec(dtype="<i8", shape=[2], description="(row, col)"),
            "length": FieldSpec(dtype="<i8", shape=[], description="steps on the shortest path"),
        }

    def generate(self, params: MazeParams, seed: int, shard: int, count: int) -> Arrays:
        """`count` mazes of shard `shard`."""
        rng = shard_rng(seed, shard)
        h, w = params.height, params.width
        mazes = np.zeros((count, h, w), dtype=np.int8)
        paths = np.zeros((count, h, w), dtype=np.uint8)
        starts = np.zeros((count, 2), dtype=np.int64)
        goals = np.zeros((count, 2), dtype=np.int64)
        lengths = np.zeros(count, dtype=np.int64)
        cells = [(2 * r + 1, 2 * c + 1) for r in range(h // 2) for c in range(w // 2)]
        for i in range(count):
            walls = carve(h, w, rng, params.loops)
            if params.hard:
                first = cells[int(rng.integers(len(cells)))]
                a = _farthest(bfs(walls, first))
                b = _farthest(bfs(walls, a))
                start, goal = (a, b) if rng.random() < 0.5 else (b, a)
            else:
                pick = rng.choice(len(cells), size=2, replace=False)
                start, goal = cells[int(pick[0])], cells[int(pick[1])]
            route = shortest_path(walls, start, goal)
            maze = walls.astype(np.int8)
            maze[start], maze[goal] = START, GOAL
            mazes[i] = maze
            rows, cols = zip(*route, strict=True)
            paths[i][list(rows), list(cols)] = 1
            starts[i], goals[i] = start, goal
            lengths[i] = len(route) - 1
        return {"maze": mazes, "path": paths, "start": starts, "goal": goals, "length": lengths}

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """The first mazes with their shortest path drawn in."""
        blocks = []
        for i in range(min(limit, len(arrays["maze"]))):
            blocks.append(f"[{i}] length={int(arrays['length'][i])}\n" + render(arrays["maze"][i], arrays["path"][i]))
        return "\n\n".join(blocks)

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """No image preview for this generator."""
        return None


GENERATOR = MazeGenerator()
