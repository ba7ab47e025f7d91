"""`sudoku`: nxn puzzles (n = 4, 6, 9) with exactly one solution, and their symmetries.

- Solver: bitmask backtracking that always branches on the empty cell with the fewest
  candidates; it counts solutions up to a limit (2 is enough to decide uniqueness).
- Generation: a random full grid (the solver with a random digit order per cell), then givens
  are removed in random order while the solution stays unique, down to a target or to a
  minimal puzzle. Removing a given v from cell c keeps uniqueness iff no solution has a digit
  other than v in c, which is one "is there any solution" search instead of a count to 2.
- Symmetries: digit relabelling, transposition (square boxes only), band/stack permutations
  and row/column permutations within a band/stack. `canonical_form` is the lexicographically
  smallest grid over that whole group (digits relabelled in order of first appearance), found
  row by row keeping only the ties for the smallest prefix; see its docstring for the cost.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from schema.artifacts import FieldSpec
from workers.synth.base import Arrays, ParamsModel, SynthError, shard_rng

BOXES: dict[int, tuple[int, int]] = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
# Fewest givens a puzzle with a unique solution can have (9x9: McGuire et al. 2012, 17 clues).
MIN_GIVENS: dict[int, int] = {4: 4, 6: 8, 9: 17}


# ---------------------------------------------------------------------------------------------
# Geometry and solver


@dataclass(frozen=True)
class Geometry:
    """Index tables of one grid size: which row, column and box each cell belongs to."""

    n: int
    box_rows: int
    box_cols: int
    row: tuple[int, ...]
    col: tuple[int, ...]
    box: tuple[int, ...]
    full: int


@cache
def geometry(n: int) -> Geometry:
    """The geometry of an nxn sudoku (boxes of BOXES[n] rows x columns)."""
    if n not in BOXES:
        raise SynthError(f"sudoku size must be one of {sorted(BOXES)}, got {n}")
    br, bc = BOXES[n]
    cells = range(n * n)
    return Geometry(
        n=n,
        box_rows=br,
        box_cols=bc,
        row=tuple(i // n for i in cells),
        col=tuple(i % n for i in cells),
        box=tuple((i // n) // br * (n // bc) + (i % n) // bc for i in cells),
        full=(1 << (n + 1)) - 2,  # bits 1..n
    )


_DIGIT_OF_BIT = {1 << d: d for d in range(1, 10)}


class _Search:
    """Backtracking over a flat grid with row/column/box masks of used digits."""

    def __init__(self, grid: list[int], geo: Geometry) -> None:
        self.geo = geo
        self.grid = list(grid)
        self.rows = [0] * geo.n
        self.cols = [0] * geo.n
        self.boxes = [0] * geo.n
        self.consistent = True
        for i, v in enumerate(self.grid):
            if v:
                bit = 1 << v
                r, c, b = geo.row[i], geo.col[i], geo.box[i]
                if (self.rows[r] | self.cols[c] | self.boxes[b]) & bit:
                    self.consistent = False
                self.rows[r] |= bit
                self.cols[c] |= bit
                self.boxes[b] |= bit
        self.empty = [i for i, v in enumerate(self.grid) if not v]
        self.count = 0
        self.first: list[int] | None = None
        self.order: list[list[int]] | None = None  # per-cell digit order (random fills)
        self.exclude: dict[int, int] = {}  # cell -> forbidden bit

    def run(self, limit: int) -> int:
        if self.consistent:
            self._go(limit)
        return self.count

    def _go(self, limit: int) -> bool:
        geo, rows, cols, boxes, grid = self.geo, self.rows, self.cols, self.boxes, self.grid
        best = -1
        best_mask = 0
        best_n = 99
        for i in self.empty:
            if grid[i]:
                continue
            mask = geo.full & ~(rows[geo.row[i]] | cols[geo.col[i]] | boxes[geo.box[i]])
            if i in self.exclude:
                mask &= ~self.exclude[i]
            k = mask.bit_count()
            if k < best_n:
                best, best_mask, best_n = i, mask, k
                if k <= 1:
                    break
        if best < 0:  # no empty cell left: a solution
            self.count += 1
            if self.first is None:
                self.first = list(grid)
            return self.count >= limit
        if best_n == 0:
            return False
        r, c, b = geo.row[best], geo.col[best], geo.box[best]
        if self.order is not None:
            digits = [d for d in self.order[best] if best_mask & (1 << d)]
        else:
            digits = []
            m = best_mask
            while m:
                low = m & -m
                digits.append(_DIGIT_OF_BIT[low])
                m ^= low
        for d in digits:
            bit = 1 << d
            grid[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            done = self._go(limit)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[best] = 0
            if done:
                return True
        return False


def _flat(grid: np.ndarray | list[int] | list[list[int]]) -> tuple[list[int], int]:
    arr = np.asarray(grid, dtype=np.int64)
    if arr.ndim == 2:
        if arr.shape[0] != arr.shape[1]:
            raise SynthError(f"sudoku grid must be square, got shape {arr.shape}")
        n = arr.shape[0]
    else:
        n = round(len(arr) ** 0.5)
    if n not in BOXES or arr.size != n * n:
        raise SynthError(f"sudoku grid must be 4x4, 6x6 or 9x9, got {arr.shape}")
    flat = arr.reshape(-1).tolist()
    if any(v < 0 or v > n for v in flat):
        raise SynthError(f"sudoku digits must be 0 (blank) to {n}")
    return flat, n


def count_solutions(grid: np.ndarray | list[int] | list[list[int]], limit: int = 2) -> int:
    """Number of solutions of `grid` (0 = blank), counting no further than `limit`."""
    flat, n = _flat(grid)
    return _Search(flat, geometry(n)).run(limit)


def solve(grid: np.ndarray | list[int] | list[list[int]]) -> np.ndarray | None:
    """One solution of `grid` as an int8 [n, n] array, or None if it has none."""
    flat, n = _flat(grid)
    search = _Search(flat, geometry(n))
    search.run(1)
    return None if search.first is None else np.array(search.first, dtype=np.int8).reshape(n, n)


def is_solution(grid: np.ndarray) -> bool:
    """True if `grid` is a complete, valid nxn sudoku."""
    flat, n = _flat(grid)
    if 0 in flat:
        return False
    return _Search(flat, geometry(n)).consistent


def agrees(puzzle: np.ndarray, solution: np.ndarray) -> bool:
    """True if every given of `puzzle` equals the digit of `solution` in that cell."""
    given = puzzle != 0
    return bool(np.array_equal(puzzle[given], solution[given]))


# ---------------------------------------------------------------------------------------------
# Generation


def random_solution(n: int, rng: np.random.Generator) -> list[int]:
    """A random complete grid (flat list)."""
    geo = geometry(n)
    search = _Search([0] * (n * n), geo)
    order = np.tile(np.arange(1, n + 1), (n * n, 1))
    search.order = rng.permuted(order, axis=1).tolist()
    search.run(1)
    assert search.first is not None  # an empty grid always has a solution
    return search.first


def _removable(puzzle: list[int], cell: int, value: int, geo: Geometry) -> bool:
    # With `cell` blanked, any solution avoiding `value` there would be a second solution.
    trial = list(puzzle)
    trial[cell] = 0
    search = _Search(trial, geo)
    search.exclude = {cell: 1 << value}
    return search.run(1) == 0


def carve(solution: list[int], n: int, rng: np.random.Generator, target: int | None) -> list[int]:
    """Remove givens from a full grid in random order while the solution stays unique.

    Stops at `target` givens (None: goes on until the puzzle is minimal).
    """
    geo = geometry(n)
    puzzle = list(solution)
    givens = n * n
    for cell in rng.permutation(n * n).tolist():
        if target is not None and givens <= target:
            break
        if _removable(puzzle, cell, puzzle[cell], geo):
            puzzle[cell] = 0
            givens -= 1
    return puzzle


def make_puzzle(
    n: int, givens: int | None, rng: np.random.Generator, max_tries: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution), int8 [n, n], with a unique solution and `givens` givens (None: minimal).

    Raises SynthError when the target is below what random removal reached in `max_tries` grids.
    """
    fewest = n * n
    for _ in range(max_tries):
        solution = random_solution(n, rng)
        puzzle = carve(solution, n, rng, givens)
        have = sum(1 for v in puzzle if v)
        if givens is None or have <= givens:
            return (np.array(puzzle, dtype=np.int8).reshape(n, n), np.array(solution, dtype=np.int8).reshape(n, n))
        fewest = min(fewest, have)
    raise SynthError(
        f"could not reach {givens} givens for a {n}x{n} sudoku in {max_tries} tries (fewest reached: "
        f"{fewest}); ask for more givens, or givens=null for minimal puzzles"
    )


# ---------------------------------------------------------------------------------------------
# Symmetries


@dataclass(frozen=True)
class Symmetry:
    """A validity-preserving transform: relabel digits, optionally transpose, permute rows and columns.

    `digits[d]` is the new digit of d (digits[0] == 0); `rows[i]`/`cols[j]` name the source row/column
    that ends up at i/j (after the optional transposition).
    """

    digits: tuple[int, ...]
    transpose: bool
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """The transformed grid (any int dtype, shape [n, n])."""
        g = grid.T if self.transpose else grid
        g = g[np.array(self.rows)][:, np.array(self.cols)]
        return np.asarray(self.digits, dtype=grid.dtype)[g]


def _line_perm(n: int, block: int, rng: np.random.Generator, shuffle_blocks: bool, shuffle_within: bool) -> list[int]:
    blocks = rng.permutation(n // block).tolist() if shuffle_blocks else list(range(n // block))
    out: list[int] = []
    for b in blocks:
        inner = rng.permutation(block).tolist() if shuffle_within else list(range(block))
        out.extend(b * block + i for i in inner)
    return out


def random_symmetry(
    n: int,
    rng: np.random.Generator,
    digits: bool = True,
    transpose: bool = True,
    bands: bool = True,
    within: bool = True,
) -> Symmetry:
    """A random element of the symmetry group (each kind of move can be switched off)."""
    br, bc = BOXES[n]
    perm = [0, *(rng.permutation(n) + 1).tolist()] if digits else list(range(n + 1))
    flip = bool(transpose and br == bc and rng.random() < 0.5)
    return Symmetry(
        digits=tuple(perm),
        transpose=flip,
        rows=tuple(_line_perm(n, br, rng, bands, within)),
        cols=tuple(_line_perm(n, bc, rng, bands, within)),
    )


def augment(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random symmetry applied to a puzzle and its solution."""
    sym = random_symmetry(puzzle.shape[0], rng)
    return sym.apply(puzzle), sym.apply(solution)


@cache
def _col_perms(n: int, block: int) -> np.ndarray:
    """Every column order that keeps stacks together: stack order x order inside each stack."""
    stacks = n // block
    inner = list(itertools.permutations(range(block)))
    out: list[list[int]] = []
    for order in itertools.permutations(range(stacks)):
        for choice in itertools.product(inner, repeat=stacks):
            out.append([s * block + i for s, perm in zip(order, choice, strict=True) for i in perm])
    return np.array(out, dtype=np.int64)


def canonical_form(puzzle: np.ndarray) -> np.ndarray:
    """The lexicographically smallest grid equivalent to `puzzle` under the symmetry group.

    Exact over the whole group (digit relabelling x transposition for square boxes x band/stack
    permutations x row/column permutations inside them; 3,359,232 elements times 9! relabellings for
    9x9). Relabelling is fixed by first appearance, so the search only picks rows and columns: the
    stack-preserving column orders are enumerated up front (1,296 for 9x9, 72 for 6x6, 8 for 4x4),
    and result rows are chosen one at a time, cell by cell, keeping only the candidates
    (orientation, column order, rows so far) that tie for the smallest prefix. The first cell of
    the first row looks at 2 x 1,296 x 9 candidates; ties collapse within a few cells, so a typical
    puzzle costs a few ms (9x9) or well under one (4x4, 6x6). A nearly empty grid keeps many ties
    (the empty 9x9 grid: every group element) and is slow and memory hungry, but no puzzle with a
    unique solution is that empty.
    """
    grid = np.asarray(puzzle, dtype=np.int64)
    n = grid.shape[0]
    br, bc = BOXES[n]
    grids = np.stack([grid, grid.T]) if br == bc else grid[None]
    cperm = _col_perms(n, bc)
    n_o, n_c = grids.shape[0], len(cperm)
    # One state per surviving candidate: orientation, column order, digit relabelling so far,
    # next free label, rows used and the band being filled.
    orient = np.repeat(np.arange(n_o), n_c)
    cols = np.tile(cperm, (n_o, 1))
    mapping = np.zeros((len(orient), n + 1), dtype=np.int64)
    nxt = np.ones(len(orient), dtype=np.int64)
    used = np.zeros((len(orient), n), dtype=bool)
    band = np.full(len(orient), -1, dtype=np.int64)
    row_band = np.arange(n) // br
    out = np.zeros((n, n), dtype=np.int64)
    for k in range(n):
        if k % br == 0:  # start a new band: any row of a band not used yet
            band_used = np.asarray(used.reshape(len(orient), n // br, br).any(axis=2))
            allowed = ~band_used[:, row_band]
        else:  # continue the current band
            allowed = (row_band[None, :] == band[:, None]) & ~used
        si, ri = np.nonzero(allowed)
        m = mapping[si]
        nx = nxt[si]
        vals = np.take_along_axis(grids[orient[si], ri], cols[si], axis=1)  # [E, n] candidate rows
        alive = np.arange(len(si))
        for j in range(n):
            v = vals[alive, j]
            cur = m[alive, v]
            new = (v != 0) & (cur == 0)
            cur = np.where(new, nx[alive], cur)
            best = cur.min()
            keep = cur == best
            alive, v, new = alive[keep], v[keep], new[keep]
            fresh = alive[new]
            m[fresh, v[new]] = nx[fresh]
            nx[fresh] += 1
            out[k, j] = best
        orient, cols, mapping, nxt = orient[si[alive]], cols[si[alive]], m[alive], nx[alive]
        used = used[si[alive]]
        used[np.arange(len(alive)), ri[alive]] = True
        band = row_band[ri[alive]]
    return out.astype(np.int8)


def canonical_key(puzzle: np.ndarray) -> str:
    """A short hex key, equal for two puzzles exactly when they are equivalent under the symmetries."""
    form = canonical_form(puzzle)
    return hashlib.blake2b(bytes([form.shape[0]]) + form.tobytes(), digest_size=16).hexdigest()


def split_of(key: str, test_fraction: float, salt: str = "sudoku") -> Literal["train", "test"]:
    """The split of an equivalence class, from its canonical key alone (stable, leak-free)."""
    h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(h, "big") / 2.0**64 < test_fraction else "train"


def split_puzzles(puzzles: np.ndarray, test_fraction: float, salt: str = "sudoku") -> np.ndarray:
    """Boolean mask over puzzles [N, n, n]: True for the test split. Equivalent puzzles share a split."""
    return np.array([split_of(canonical_key(p), test_fraction, salt) == "test" for p in puzzles], dtype=bool)


# ---------------------------------------------------------------------------------------------
# The generator


class SudokuParams(ParamsModel):
    """Parameters of the `sudoku` generator."""

    n: Literal[4, 6, 9] = Field(default=9, description="grid size; boxes 2x2, 2x3 (rows x cols), 3x3")
    givens: int | None = Field(default=None, description="target number of givens; null = minimal puzzles")
    max_tries: int = Field(default=50, ge=1, le=10_000, description="full grids tried to reach the target")
    split: Literal["all", "train", "test"] = "all"
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_salt: str = "sudoku"

    @model_validator(mode="after")
    def _givens(self) -> SudokuParams:
        if self.givens is not None:
            low = MIN_GIVENS[self.n]
            if self.givens < low:
                raise ValueError(
                    f"givens: a {self.n}x{self.n} sudoku needs at least {low} givens to have a unique "
                    f"solution, got {self.givens}"
                )
            if self.givens > self.n * self.n:
                raise ValueError(
                    f"givens: a {self.n}x{self.n} grid has only {self.n * self.n} cells, got {self.givens}"
                )
        return self


def render(grid: np.ndarray) -> str:
    """A grid as text, with box separators and '.' for blanks."""
    n = grid.shape[0]
    br, bc = BOXES[n]
    lines = []
    for r in range(n):
        if r and r % br == 0:
            lines.append("+".join(["-" * (2 * bc + 1)] * (n // bc)))
        cells = [str(int(v)) if v else "." for v in grid[r]]
        lines.append("|".join(" " + " ".join(cells[s : s + bc]) + " " for s in range(0, n, bc)))
    return "\n".join(lines)


def sample_puzzles(
    n: int,
    givens: int | None,
    rng: np.random.Generator,
    count: int,
    max_tries: int = 50,
    split: str = "all",
    test_fraction: float = 0.1,
    salt: str = "sudoku",
) -> Arrays:
    """`count` puzzles with solutions, givens and canonical keys, keeping only those of `split`."""
    puzzles = np.zeros((count, n, n), dtype=np.int8)
    solutions = np.zeros((count, n, n), dtype=np.int8)
    keys: list[str] = []
    while len(keys) < count:
        puzzle, solution = make_puzzle(n, givens, rng, max_tries)
        key = canonical_key(puzzle)
        if split != "all" and split_of(key, test_fraction, salt) != split:
            continue  # the class belongs to the other split: drawing again keeps splits leak-free
        puzzles[len(keys)], solutions[len(keys)] = puzzle, solution
        keys.append(key)
    return {
        "puzzles": puzzles,
        "solutions": solutions,
        "givens": (puzzles != 0).sum(axis=(1, 2)).astype(np.int16),
        "key": np.array(keys, dtype="<U32").reshape(count),
    }


class SudokuGenerator:
    """Sudoku puzzles with a unique solution, difficulty set by the number of givens."""

    name: ClassVar[str] = "sudoku"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[SudokuParams]] = SudokuParams

    def label_schema(self, params: SudokuParams) -> dict[str, FieldSpec]:
        n = params.n
        return {
            "puzzles": FieldSpec(dtype="|i1", shape=[n, n], description="digits 1..n, 0 = blank"),
            "solutions": FieldSpec(dtype="|i1", shape=[n, n], description="the unique solution"),
            "givens": FieldSpec(dtype="<i2", shape=[], description="number of givens"),
            "key": FieldSpec(dtype="<U32", shape=[], description="canonical key of the symmetry class"),
        }

    def generate(self, params: SudokuParams, seed: int, shard: int, count: int) -> Arrays:
        """`count` puzzles of shard `shard` (only those of the requested split)."""
        return sample_puzzles(
            params.n,
            params.givens,
            shard_rng(seed, shard),
            count,
            params.max_tries,
            params.split,
            params.test_fraction,
            params.split_salt,
        )

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """The first puzzles side by side with their solutions."""
        blocks = []
        for i in range(min(limit, len(arrays["puzzles"]))):
            left = render(arrays["puzzles"][i]).splitlines()
            right = render(arrays["solutions"][i]).splitlines()
            head = f"[{i}] givens={int(arrays['givens'][i])} key={str(arrays['key'][i])[:12]}"
            blocks.append("\n".join([head, *(f"{a}    {b}" for a, b in zip(left, right, strict=True))]))
        return "\n\n".join(blocks)

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """No image preview: puzzles are shown as text."""
        return None


GENERATOR = SudokuGenerator()
