"""Determinism across processes, sharding as subtasks, and synthesis requests with bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from schema.artifact_store import ArtifactStore
from schema.artifacts import Lineage
from workers.synth.base import (
    SynthError,
    SynthesisRequest,
    UnknownGeneratorError,
    encode_npz,
    generate_shard,
    generators,
    get_generator,
    merge_manifest,
    shard_counts,
    synthesize,
)

ROOT = Path(__file__).resolve().parents[1]
WHEN = datetime(2026, 3, 1, tzinfo=UTC)

# Small but representative jobs: every generator, several shards each.
JOBS = {
    "shapes": ({"size": 32}, 30, 12),
    "sudoku": ({"n": 6}, 12, 5),
    "maze": ({"height": 9, "width": 11, "loops": 0.1}, 10, 4),
    "text": ({"split": "train", "split_mode": "values"}, 40, 15),
    "glyphs": ({"size": 16}, 30, 12),
    "visual_sudoku": ({"n": 4, "cell_size": 12}, 6, 4),
}

SCRIPT = """
import json, sys
from datetime import datetime, UTC
from schema.artifact_store import ArtifactStore
from schema.artifacts import Lineage
from workers.synth.base import synthesize
jobs = json.loads(sys.argv[2])
store = ArtifactStore(sys.argv[1])
out = {}
for name, (params, count, shard_size) in jobs.items():
    m = synthesize(name, params, 1234, count, shard_size, store, Lineage(ticket="T-1"),
                   created_at=datetime(2026, 3, 1, tzinfo=UTC))
    out[name] = {"manifest": m.manifest_id(), "shards": [s.id for s in m.shards]}
print(json.dumps(out))
"""


def _run_in_subprocess(root: Path, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), json.dumps(JOBS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_generator_is_covered() -> None:
    assert set(JOBS) == set(generators())


def test_generators_come_from_one_literal_table() -> None:
    """Every name resolves through `GENERATORS` to a generator of that name; importing a generator
    module adds nothing (no registration by side effect), and an unknown name lists the known ones."""
    import ast
    import importlib

    from workers.synth.base import GENERATORS

    assert set(GENERATORS) == {"shapes", "sudoku", "maze", "text", "glyphs", "visual_sudoku"}
    for name in GENERATORS:
        assert get_generator(name).name == name
        assert get_generator(name) is get_generator(name)
    for module in {target.partition(":")[0] for target in GENERATORS.values()}:
        importlib.import_module(module)
        tree = ast.parse(Path(importlib.import_module(module).__file__ or "").read_text())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "register" not in calls, module
    assert set(generators()) == set(GENERATORS)
    with pytest.raises(UnknownGeneratorError, match="known generators: glyphs, maze, shapes"):
        get_generator("nope")


@pytest.mark.integration
def test_bit_identical_across_processes(tmp_path: Path) -> None:
    first = _run_in_subprocess(tmp_path / "a", "1")
    second = _run_in_subprocess(tmp_path / "b", "2")  # another hash seed: no dict/set-order dependence
    assert first == second
    # ... and identical to this process too.
    store = ArtifactStore(tmp_path / "c")
    for name, (params, count, shard_size) in JOBS.items():
        m = synthesize(name, params, 1234, count, shard_size, store, Lineage(ticket="T-1"), created_at=WHEN)
        assert [s.id for s in m.shards] == first[name]["shards"], name
        assert m.manifest_id() == first[name]["manifest"]
    # The shard files of both runs are byte for byte the same files.
    for name in JOBS:
        for shard_id in first[name]["shards"]:
            a = (tmp_path / "a" / "objects" / shard_id[:2] / shard_id).read_bytes()
            b = (tmp_path / "b" / "objects" / shard_id[:2] / shard_id).read_bytes()
            assert a == b


def test_seed_and_params_change_the_data(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    base = synthesize("maze", {}, 1, 5, 5, store, created_at=WHEN)
    other_seed = synthesize("maze", {}, 2, 5, 5, store, created_at=WHEN)
    other_params = synthesize("maze", {"hard": True}, 1, 5, 5, store, created_at=WHEN)
    assert len({base.shards[0].id, other_seed.shards[0].id, other_params.shards[0].id}) == 3


def test_shards_as_separate_subtasks_merge_to_the_same_manifest(tmp_path: Path) -> None:
    whole_store, split_store = ArtifactStore(tmp_path / "whole"), ArtifactStore(tmp_path / "split")
    lineage = Lineage(ticket="T-9", task="data", attempt=2)
    whole = synthesize("shapes", {}, 77, 25, 10, whole_store, lineage, created_at=WHEN)
    plan = shard_counts(25, 10)
    assert plan == [10, 10, 5]
    # Subtasks may run in any order, on any worker.
    shards = [generate_shard("shapes", {}, 77, i, plan[i], split_store) for i in reversed(range(len(plan)))]
    merged = merge_manifest("shapes", {}, 77, 25, 10, shards, split_store, lineage, WHEN)
    assert merged == whole and merged.manifest_id() == whole.manifest_id()
    assert split_store.load_manifest(merged.manifest_id()) == whole


def test_merge_refuses_an_incomplete_or_inconsistent_set(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    shards = [generate_shard("maze", {}, 0, i, 4, store) for i in range(2)]
    with pytest.raises(SynthError, match=r"expected shards 0\.\.2"):
        merge_manifest("maze", {}, 0, 10, 4, shards, store, created_at=WHEN)
    with pytest.raises(SynthError, match="the plan says 2"):
        merge_manifest("maze", {}, 0, 6, 4, shards, store, created_at=WHEN)
    assert store.entries() == []


def test_npz_bytes_do_not_depend_on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    arrays = {"b": np.arange(6, dtype=np.int16).reshape(2, 3), "a": np.array(["x", "yz"])}
    first = encode_npz(arrays)
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    later = time.struct_time((2033, 5, 18, 3, 33, 20, 2, 138, 0))
    monkeypatch.setattr(time, "localtime", lambda *a: later)
    assert encode_npz(arrays) == first
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        assert [i.date_time for i in zf.infolist()] == [(1980, 1, 1, 0, 0, 0)] * 2
    with np.load(io.BytesIO(first)) as loaded:
        np.testing.assert_array_equal(loaded["b"], arrays["b"])
        assert loaded["a"].tolist() == ["x", "yz"]


# --- bad input ----------------------------------------------------------------------------------


def _error(**request: object) -> str:
    with pytest.raises(ValidationError) as err:
        SynthesisRequest.model_validate(request)
    return str(err.value)


def test_unknown_generator() -> None:
    msg = _error(generator="fractals", count=10)
    assert "generator" in msg and "unknown generator 'fractals'" in msg and "shapes" in msg
    with pytest.raises(UnknownGeneratorError, match=r"known generators: .*sudoku"):
        get_generator("fractals")
    with pytest.raises(ValidationError, match="unknown generator"):
        synthesize("fractals", {}, 0, 1, 1, ArtifactStore("/nonexistent/never-written"))


@pytest.mark.parametrize(("request_", "field"), [
    ({"generator": "shapes", "count": -5}, "count"),
    ({"generator": "shapes", "count": 0}, "count"),
    ({"generator": "shapes", "count": 10, "shard_size": 0}, "shard_size"),
    ({"generator": "shapes", "count": 10, "seed": -1}, "seed"),
    ({"generator": "shapes", "count": 10, "format": "parquet"}, "format"),
    ({"generator": "shapes", "count": 10, "colour": "red"}, "colour"),
])
def test_bad_request_fields_are_named(request_: dict, field: str) -> None:
    assert field in _error(**request_)


@pytest.mark.parametrize(("generator", "params", "words"), [
    ("shapes", {"size": 0}, ["params", "size", "greater than or equal to 16"]),
    ("sudoku", {"n": 9, "givens": 10}, ["params", "givens", "at least 17"]),
    ("maze", {"height": 32}, ["params", "height"]),
    ("text", {"bogus": 1}, ["params", "bogus", "Extra inputs"]),
])
def test_impossible_parameters_are_named(generator: str, params: dict, words: list[str]) -> None:
    msg = _error(generator=generator, params=params, count=10)
    for word in words:
        assert word in msg


def test_bad_request_writes_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ValidationError):
        synthesize("sudoku", {"n": 9, "givens": 10}, 0, 5, 5, store)
    with pytest.raises(ValidationError):
        synthesize("shapes", {}, 0, -3, 5, store)
    assert not (tmp_path / "artifacts").exists() or list(store.ids()) == []


def test_request_normalises_params_with_defaults() -> None:
    req = SynthesisRequest(generator="sudoku", params={"n": 4}, count=3)
    assert req.params["n"] == 4 and req.params["givens"] is None and req.params["split"] == "all"
