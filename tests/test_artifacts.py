"""The artifact store, dataset manifests, the torch loader and `jbctl artifacts`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cli.main import main
from schema.artifact_store import ArtifactStore
from schema.artifacts import AmbiguousArtifactError, CorruptArtifactError, Lineage, Manifest, UnknownArtifactError
from workers.synth import base
from workers.synth.base import synthesize

ROOT = Path(__file__).resolve().parents[1]
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _dataset(store: ArtifactStore, generator: str = "maze", params: dict | None = None, count: int = 12,
             shard_size: int = 5, ticket: str | None = "T-7", **kw: object) -> tuple[str, Manifest]:
    lineage = Lineage(ticket=ticket, task="data", attempt=1) if ticket else Lineage()
    manifest = synthesize(generator, params if params is not None else {"height": 7, "width": 9}, 3, count,
                          shard_size, store, lineage, created_at=WHEN, **kw)  # type: ignore[arg-type]
    return manifest.manifest_id(), manifest


def _leftovers(store: ArtifactStore) -> list[Path]:
    return sorted(store.tmp.iterdir()) if store.tmp.exists() else []


# --- store basics -------------------------------------------------------------------------------


def test_put_bytes_is_content_addressed(store: ArtifactStore) -> None:
    data = b"hello jetbox"
    artifact_id = store.put_bytes(data)
    assert artifact_id == hashlib.sha256(data).hexdigest()
    assert store.path(artifact_id) == store.root / "objects" / artifact_id[:2] / artifact_id
    assert store.get_bytes(artifact_id) == data
    assert store.put_bytes(data) == artifact_id  # idempotent
    assert list(store.ids()) == [artifact_id]
    assert _leftovers(store) == []


def test_put_file_streams_and_matches_put_bytes(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several chunks
    artifact_id = store.put_file(src)
    assert artifact_id == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.path(artifact_id).read_bytes() == src.read_bytes()
    assert _leftovers(store) == []


def test_resolve_prefixes(store: ArtifactStore) -> None:
    target = store.put_bytes(b"one")
    assert store.resolve(target[:12]) == target
    assert store.resolve(target.upper()[:12]) == target
    assert store.resolve(target) == target
    # Two objects whose ids share a prefix (names planted directly: resolve only looks at names).
    for last in "12":
        twin = store.objects / "ab" / ("abcd" + "0" * 59 + last)
        twin.parent.mkdir(parents=True, exist_ok=True)
        twin.write_bytes(b"")
    with pytest.raises(AmbiguousArtifactError, match="matches 2 artifacts"):
        store.resolve("abcd0")
    assert store.resolve("abcd" + "0" * 59 + "2").endswith("2")
    with pytest.raises(UnknownArtifactError, match="no artifact"):
        store.resolve("abce")
    with pytest.raises(UnknownArtifactError, match="not an artifact id"):
        store.resolve("xyz")


def test_failed_write_leaves_nothing(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def boom(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.put_bytes(b"x" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(store.ids()) == []
    assert _leftovers(store) == []


def test_failed_stream_mid_copy_leaves_nothing(store: ArtifactStore) -> None:
    class Flaky(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise ConnectionError("source vanished")
            return b"a" * 1000

    with pytest.raises(ConnectionError):
        store.put_stream(Flaky())  # type: ignore[arg-type]
    assert list(store.ids()) == []
    assert _leftovers(store) == []


def test_failed_synthesis_leaves_no_manifest_and_no_temp(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.synth import maze

    real = maze.MazeGenerator.generate
    calls = {"n": 0}

    def failing(self, params, seed, shard, count):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker killed mid-synthesis")
        return real(self, params, seed, shard, count)

    monkeypatch.setattr(maze.MazeGenerator, "generate", failing)
    with pytest.raises(RuntimeError):
        _dataset(store)
    assert store.entries() == []  # no manifest recorded
    assert _leftovers(store) == []
    assert store.verify() == []  # whatever was written is whole
    orphans = set(store.ids())
    assert len(orphans) == 1  # the first shard, complete but unreferenced
    report = store.gc(store.referenced(), dry_run=False)
    assert set(report.removed) == orphans and list(store.ids()) == []


def test_failed_encode_midway_writes_no_object(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    real = zipfile.ZipFile.writestr
    calls = {"n": 0}

    def flaky(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("no space left on device")
        return real(self, *args, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", flaky)
    with pytest.raises(OSError):
        _dataset(store)
    assert list(store.ids()) == [] and _leftovers(store) == [] and store.entries() == []


# --- manifests ----------------------------------------------------------------------------------


def test_manifest_is_stored_indexed_and_addressed(store: ArtifactStore) -> None:
    manifest_id, manifest = _dataset(store)
    assert store.has(manifest_id)
    assert store.load_manifest(manifest_id[:10]) == manifest
    assert [s.count for s in manifest.shards] == [5, 5, 2]
    assert manifest.created_at == WHEN
    assert manifest.lineage.ticket == "T-7"
    assert manifest.label_schema["maze"].shape == [7, 9]
    entry = store.entry(manifest_id)
    assert entry is not None and entry.kind == "dataset" and entry.name == "maze" and entry.count == 12
    assert [e.id for e in store.list_entries(ticket="T-7")] == [manifest_id]
    assert store.list_entries(ticket="T-8") == []
    assert [e.id for e in store.list_entries(kind="maze")] == [manifest_id]
    assert store.list_entries(kind="checkpoint") == []


def test_manifest_model_rejects_bad_fields() -> None:
    good = {
        "generator": "maze", "generator_version": "1", "params": {}, "seed": 0, "count": 1, "shard_size": 1,
        "shards": [], "label_schema": {}, "created_at": WHEN.isoformat(),
    }
    Manifest.model_validate(good)
    with pytest.raises(ValidationError, match="colour"):
        Manifest.model_validate({**good, "colour": "red"})
    with pytest.raises(ValidationError, match="created_at"):
        Manifest.model_validate({k: v for k, v in good.items() if k != "created_at"})
    with pytest.raises(ValidationError, match="seed"):
        Manifest.model_validate({**good, "seed": -1})
    with pytest.raises(ValidationError, match="64 hex"):
        Manifest.model_validate({**good, "shards": [{"index": 0, "id": "abc", "size": 1, "count": 1}]})


def test_manifest_listing_a_missing_shard_is_refused(store: ArtifactStore) -> None:
    _, manifest = _dataset(store)
    bad = manifest.model_copy(update={"shards": [manifest.shards[0].model_copy(update={"id": "0" * 64})]})
    with pytest.raises(UnknownArtifactError, match="not in the store"):
        store.put_manifest(bad)


@pytest.mark.integration
def test_schema_artifacts_imports_only_stdlib_and_pydantic() -> None:
    code = ("import sys, schema.artifacts, schema.artifact_store; "
            "bad = [m for m in ('numpy', 'torch', 'workers', 'daemon', 'cli') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- verify and gc ------------------------------------------------------------------------------


def test_verify_detects_truncated_altered_and_missing(store: ArtifactStore) -> None:
    _, manifest = _dataset(store)
    assert store.verify() == []
    truncated, altered, missing = (s.id for s in manifest.shards)
    path = store.path(truncated)
    path.write_bytes(path.read_bytes()[:-100])
    path = store.path(altered)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store.path(missing).unlink()
    found = {(p.id, p.problem) for p in store.verify()}
    assert found == {(truncated, "truncated"), (altered, "corrupt"), (missing, "missing")}


def test_verify_reports_stray_files(store: ArtifactStore) -> None:
    good = store.put_bytes(b"fine")
    misplaced = store.objects / "zz" / good
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(b"fine")
    (store.objects / good[:2] / "notes.txt").write_text("hello")
    problems = {(p.problem, Path(p.path).name) for p in store.verify()}
    assert problems == {("stray", good), ("stray", "notes.txt")}
    assert list(store.ids()) == [good]


def test_gc_keeps_referenced_and_is_a_dry_run_by_default(store: ArtifactStore, tmp_path: Path) -> None:
    manifest_id, manifest = _dataset(store, ticket=None)
    orphan = store.put_bytes(b"nobody refers to me")
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"weights")
    ticketed = store.put_artifact(src, kind="checkpoint", lineage=Lineage(ticket="T-1"), created_at=WHEN)
    keep = store.referenced()
    assert keep == {manifest_id, ticketed, *manifest.object_ids()}
    report = store.gc(keep)
    assert report.dry_run and report.removed == [orphan] and store.has(orphan)
    report = store.gc(keep, dry_run=False)
    assert report.removed == [orphan] and not store.has(orphan)
    assert store.verify() == []
    # The event log will pass its own set: a manifest id keeps everything it lists.
    report = store.gc({manifest_id}, dry_run=False)
    assert report.removed == [ticketed]
    assert {e.id for e in store.entries()} == {manifest_id}


def test_gc_removes_stale_temp_files(store: ArtifactStore) -> None:
    store.tmp.mkdir(parents=True)
    stale = store.tmp / "dead.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    fresh = store.tmp / "live.tmp"
    fresh.write_bytes(b"in progress")
    report = store.gc(set(), dry_run=False)
    assert report.temp_files == [str(stale)]
    assert not stale.exists() and fresh.exists()


# --- regenerate ---------------------------------------------------------------------------------


def test_regenerate_identical_and_repairs(store: ArtifactStore) -> None:
    manifest_id, manifest = _dataset(store)
    report = base.regenerate(manifest_id, store)
    assert report.ok and [s.restored for s in report.shards] == [False] * 3
    path = store.path(manifest.shards[1].id)
    path.write_bytes(path.read_bytes()[:50])
    report = base.regenerate(manifest_id[:8], store)
    assert report.ok and [s.restored for s in report.shards] == [False, True, False]
    assert store.verify() == []


def test_regenerate_reports_a_version_change(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.synth import maze

    manifest_id, _ = _dataset(store)
    monkeypatch.setattr(maze.MazeGenerator, "version", "2")
    report = base.regenerate(manifest_id, store)
    assert not report.ok and report.error is not None and "version 2" in report.error


# --- the torch Dataset --------------------------------------------------------------------------


def test_dataset_reads_every_example_memory_mapped(store: ArtifactStore) -> None:
    import torch

    from workers.synth.dataset import ShardDataset, load_tensors

    torch.set_num_threads(1)
    manifest_id, manifest = _dataset(store, "text", {}, count=11, shard_size=4)
    ds = ShardDataset(manifest_id, store)
    assert len(ds) == 11
    whole = base.load_arrays(manifest, store)
    for i in (0, 3, 4, 10, -1):
        item = ds[i]
        assert item["question"] == str(whole["question"][i])
        assert int(item["template"]) == int(whole["template"][i])
    assert isinstance(ds.shard_arrays(0)["family"], np.memmap)
    with pytest.raises(IndexError):
        ds[11]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert clone._open == {} and clone[3]["question"] == ds[3]["question"]
    tensors = load_tensors(manifest, store, ["family"])
    fam = tensors["family"]
    assert isinstance(fam, torch.Tensor)
    assert fam.tolist() == whole["family"].tolist()


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_dataset_detects_truncated_and_altered_shards(store: ArtifactStore, fmt: str) -> None:
    from workers.synth.dataset import ShardDataset

    manifest_id, manifest = _dataset(store, fmt=fmt)
    path = store.path(manifest.shards[0].id)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        ShardDataset(manifest_id, store)[0]
    # Without hash checks the parser still refuses a cut-off file.
    with pytest.raises(CorruptArtifactError, match=r"cannot be read|past the end"):
        ShardDataset(manifest_id, store, verify=False)[0]
    altered = bytearray(original)
    altered[-3] ^= 0x01
    path.write_bytes(bytes(altered))
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        ShardDataset(manifest_id, store)[1]
    assert ShardDataset(manifest_id, store)[5]["maze"].shape == (7, 9)  # other shards still load


def test_safetensors_shards_load_with_the_reference_library(store: ArtifactStore) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, manifest = _dataset(store, fmt="safetensors")
    ours = base.load_arrays(manifest, store, limit=5)
    theirs = safetensors_numpy.load(store.get_bytes(manifest.shards[0].id))
    assert set(theirs) == set(ours)
    for name, arr in theirs.items():
        np.testing.assert_array_equal(arr, ours[name])


def test_safetensors_refuses_string_arrays(store: ArtifactStore) -> None:
    with pytest.raises(base.SynthError, match="use format 'npz'"):
        _dataset(store, "text", {}, fmt="safetensors")


# --- jbctl artifacts ----------------------------------------------------------------------------


def _jb(tmp_path: Path, *argv: str) -> int:
    return main(["--home", str(tmp_path), "artifacts", *argv])


def test_cli_list_filters_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    maze_id, _ = _dataset(store, ticket="T-1")
    sudoku_id, _ = _dataset(store, "sudoku", {"n": 4}, count=3, ticket="T-2")
    capsys.readouterr()
    assert _jb(tmp_path) == 0
    out = capsys.readouterr().out
    assert maze_id[:12] in out and sudoku_id[:12] in out and "TICKET" in out
    assert _jb(tmp_path, "--ticket", "T-2", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [sudoku_id]
    assert _jb(tmp_path, "list", "--kind", "maze", "--json") == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [maze_id]


def test_cli_show_writes_a_contact_sheet_for_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    store = ArtifactStore(tmp_path / "artifacts")
    manifest_id, _ = _dataset(store, "shapes", {"size": 32}, count=10, shard_size=6)
    capsys.readouterr()
    assert _jb(tmp_path, "show", manifest_id[:8]) == 0
    out = capsys.readouterr().out
    assert '"generator": "shapes"' in out
    line = next(x for x in out.splitlines() if x.startswith("contact sheet: "))
    sheet = Path(line.removeprefix("contact sheet: "))
    assert sheet.is_file() and sheet.is_relative_to(tmp_path)
    with Image.open(sheet) as img:
        img.load()
        assert img.mode == "RGB" and img.width > 96 * 3


def test_cli_show_renders_text_for_puzzles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    manifest_id, manifest = _dataset(store, "sudoku", {"n": 4}, count=3)
    capsys.readouterr()
    assert _jb(tmp_path, "show", manifest_id[:10], "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["seed"] == manifest.seed and shown["contact_sheet"] is None
    assert "|" in shown["preview"] and "givens=" in shown["preview"]
    assert _jb(tmp_path, "show", "abcd" * 16) == 1
    assert "no artifact" in capsys.readouterr().err


def test_cli_show_a_plain_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    manifest_id, manifest = _dataset(store, count=5)
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    ckpt = store.put_artifact(src, kind="checkpoint", name="jepa", lineage=Lineage(ticket="T-3"), created_at=WHEN)
    capsys.readouterr()
    assert _jb(tmp_path, "show", manifest.shards[0].id[:10], "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["listed_by"] == [f"{manifest_id} shard 0"]
    assert _jb(tmp_path, "show", ckpt[:10]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "T-3" in out
    assert _jb(tmp_path, "--kind", "checkpoint", "--json") == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [ckpt]


def test_cli_verify_names_each_bad_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    _, manifest = _dataset(store)
    assert _jb(tmp_path, "verify") == 0
    assert "ok:" in capsys.readouterr().out
    bad = [manifest.shards[0].id, manifest.shards[2].id]
    for artifact_id in bad:
        path = store.path(artifact_id)
        path.write_bytes(path.read_bytes()[:-1])
    assert _jb(tmp_path, "verify") == 1
    out = capsys.readouterr().out
    assert all(artifact_id in out for artifact_id in bad)
    assert manifest.shards[1].id not in out


def test_cli_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    manifest_id, manifest = _dataset(store)
    assert _jb(tmp_path, "regenerate", manifest_id[:8]) == 0
    assert "bit for bit" in capsys.readouterr().out
    # A manifest whose shard was not made by its generator cannot be regenerated identically.
    fake = store.put_bytes(b"not what the generator makes")
    forged = manifest.model_copy(update={"shards": [manifest.shards[0].model_copy(update={"id": fake})]})
    forged = forged.model_copy(update={"count": 5, "shard_size": 5})
    forged_id = store.put_manifest(forged)
    assert _jb(tmp_path, "regenerate", forged_id) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_cli_gc_dry_run_then_yes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    _dataset(store)
    orphan = store.put_bytes(b"orphan")
    assert _jb(tmp_path, "gc") == 0
    out = capsys.readouterr().out
    assert f"would remove {orphan}" in out and "--yes" in out and store.has(orphan)
    assert _jb(tmp_path, "gc", "--yes") == 0
    assert f"removed {orphan}" in capsys.readouterr().out
    assert not store.has(orphan) and _jb(tmp_path, "verify") == 0


@pytest.mark.integration
def test_cli_never_imports_torch(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    manifest_id, _ = _dataset(store, "shapes", {"size": 32}, count=4)
    code = (
        "import sys\n"
        "from cli.main import main\n"
        f"home = {str(tmp_path)!r}\n"
        "assert main(['--home', home, 'artifacts']) == 0\n"
        f"assert main(['--home', home, 'artifacts', 'show', {manifest_id[:10]!r}]) == 0\n"
        f"assert main(['--home', home, 'artifacts', 'regenerate', {manifest_id[:10]!r}]) == 0\n"
        "import workers.synth\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
