"""The artifact store over every backend: the same test cases run over the local folder, a dict (a
backend with a local cache, written here in a page) and S3 (moto's standalone server on loopback), so
content addressing, manifests, verify, regenerate and gc behave the same wherever the bytes live.

Then what only the object store has: multipart uploads, the worker-local read cache and its limit,
clear errors for a bad configuration, and checkpoints that another host resumes from."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from schema.artifact_backend import ArtifactBackend, LocalDirBackend
from schema.artifact_store import ArtifactStore
from schema.artifacts import CorruptArtifactError, Lineage, UnknownArtifactError
from workers.synth.base import load_arrays, read_shard, regenerate, synthesize

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


class DictBackend:
    """Blobs in a dict; `path` materialises a blob into a cache folder, as a remote backend would."""

    def __init__(self, cache: Path) -> None:
        self.blobs: dict[str, bytes] = {}
        self.entries: dict[str, bytes] = {}
        self.cache = cache

    def exists(self, artifact_id: str) -> bool:
        return artifact_id in self.blobs

    def size(self, artifact_id: str) -> int | None:
        blob = self.blobs.get(artifact_id)
        return None if blob is None else len(blob)

    def put(self, artifact_id: str, staged: Path) -> None:
        self.blobs[artifact_id] = staged.read_bytes()
        staged.unlink()
        (self.cache / artifact_id).unlink(missing_ok=True)

    def get(self, artifact_id: str) -> bytes:
        if artifact_id not in self.blobs:
            raise UnknownArtifactError(f"no artifact {artifact_id}")
        return self.blobs[artifact_id]

    def open(self, artifact_id: str) -> BinaryIO:
        return io.BytesIO(self.get(artifact_id))

    def path(self, artifact_id: str) -> Path:
        local = self.cache / artifact_id
        if artifact_id in self.blobs and not local.exists():
            self.cache.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.blobs[artifact_id])
        return local

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(sorted(k for k in self.blobs if k.startswith(prefix)))

    def delete(self, artifact_id: str) -> None:
        self.blobs.pop(artifact_id, None)

    def strays(self) -> Iterator[tuple[str, str]]:
        return iter(())

    def where(self, artifact_id: str) -> str:
        return f"dict:{artifact_id}"

    def put_entry(self, artifact_id: str, data: bytes) -> None:
        self.entries[artifact_id] = data

    def get_entry(self, artifact_id: str) -> bytes | None:
        return self.entries.get(artifact_id)

    def entry_ids(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def delete_entry(self, artifact_id: str) -> None:
        self.entries.pop(artifact_id, None)


@dataclass
class Case:
    """A store over one backend, and how to damage what it holds behind its back."""

    name: str
    store: ArtifactStore
    damage: Callable[[str, bytes], None]  # replace the stored bytes of an object
    remove: Callable[[str], None]  # delete an object (its index entry stays)


def _local(tmp_path: Path) -> Case:
    store = ArtifactStore(tmp_path / "store")
    return Case("local", store, lambda i, b: store.path(i).write_bytes(b), lambda i: store.path(i).unlink())


def _dict(tmp_path: Path) -> Case:
    backend = DictBackend(tmp_path / "cache")
    store = ArtifactStore(tmp_path / "store", backend=backend)
    return Case("dict", store, backend.blobs.__setitem__, backend.blobs.__delitem__)


def _s3(tmp_path: Path, request: pytest.FixtureRequest) -> Case:
    from schema.artifact_s3 import S3Backend

    url = request.getfixturevalue("s3_url")
    server = request.getfixturevalue("s3_server")
    backend = S3Backend(url, cache_dir=tmp_path / "cache")
    store = ArtifactStore(tmp_path / "store", backend=backend)
    raw = server.client()

    def damage(artifact_id: str, data: bytes) -> None:
        # Behind the store's back, and the local copy goes too: the next read must see the server's bytes.
        raw.put_object(Bucket=backend.bucket, Key=backend._object_key(artifact_id), Body=data)
        backend._cached(artifact_id).unlink(missing_ok=True)

    def remove(artifact_id: str) -> None:
        raw.delete_object(Bucket=backend.bucket, Key=backend._object_key(artifact_id))
        backend._cached(artifact_id).unlink(missing_ok=True)

    return Case("s3", store, damage, remove)


@pytest.fixture(params=["local", "dict", pytest.param("s3", marks=pytest.mark.integration)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    if request.param == "local":
        return _local(tmp_path)
    if request.param == "dict":
        return _dict(tmp_path)
    return _s3(tmp_path, request)


def _dataset(store: ArtifactStore, ticket: str | None = "T-1") -> Any:
    lineage = Lineage(ticket=ticket, task="data", attempt=1) if ticket else Lineage()
    return synthesize("maze", {"height": 7, "width": 9}, 3, 12, 5, store, lineage, created_at=WHEN)


# --- one set of cases, every backend ----------------------------------------------------------


def test_every_backend_satisfies_the_protocol(case: Case) -> None:
    assert isinstance(case.store.backend, ArtifactBackend)


def test_objects_are_content_addressed(case: Case) -> None:
    store = case.store
    data = b"bytes kept elsewhere"
    artifact_id = store.put_bytes(data)
    assert artifact_id == hashlib.sha256(data).hexdigest()
    assert store.put_bytes(data) == artifact_id and store.put_stream(io.BytesIO(data)) == artifact_id
    assert list(store.ids()) == [artifact_id] and store.has(artifact_id) and not store.has("0" * 64)
    assert store.get_bytes(artifact_id) == data and store.size(artifact_id) == len(data)
    assert store.resolve(artifact_id[:6]) == artifact_id
    with store.open(artifact_id) as fh:
        assert fh.read() == data
    assert store.path(artifact_id).read_bytes() == data  # a local file for the readers that need one
    with pytest.raises(UnknownArtifactError, match="no artifact matches"):
        store.resolve("abcdef0")
    with pytest.raises(UnknownArtifactError):
        store.get_bytes("0" * 64)
    assert store.size("0" * 64) is None
    assert not any(store.tmp.iterdir())  # staged writes were consumed


def test_a_dataset_round_trips_through_the_ordinary_callers(case: Case) -> None:
    store = case.store
    manifest = _dataset(store)
    assert len(load_arrays(manifest, store)["maze"]) == 12
    first = manifest.shards[0]
    assert len(read_shard(store.path(first.id), first.format)["maze"]) == first.count
    assert [e.id for e in store.list_entries(ticket="T-1")] == [manifest.manifest_id()]
    assert store.load_manifest(manifest.manifest_id()[:10]) == manifest
    assert store.verify() == []


def test_verify_sees_damage_and_regenerate_repairs_it(case: Case) -> None:
    store = case.store
    manifest = _dataset(store)
    truncated, altered, missing = (s.id for s in manifest.shards)
    case.damage(truncated, store.get_bytes(truncated)[:-50])
    data = bytearray(store.get_bytes(altered))
    data[len(data) // 2] ^= 0xFF
    case.damage(altered, bytes(data))
    case.remove(missing)
    found = {(p.id, p.problem) for p in store.verify()}
    assert found == {(truncated, "truncated"), (altered, "corrupt"), (missing, "missing")}
    assert all(store.where(i) in {p.path for p in store.verify()} for i in (truncated, altered, missing))
    with pytest.raises(CorruptArtifactError):
        store.get_bytes(altered)
    report = regenerate(manifest.manifest_id(), store)
    assert report.ok and [s.restored for s in report.shards] == [True, True, True]
    assert store.verify() == []


def test_gc_keeps_what_is_referenced_and_drops_index_entries(case: Case, tmp_path: Path) -> None:
    store = case.store
    manifest = _dataset(store, ticket=None)
    orphan = store.put_bytes(b"nobody refers to me")
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"weights")
    ticketed = store.put_artifact(src, kind="checkpoint", lineage=Lineage(ticket="T-1"), created_at=WHEN)
    keep = store.referenced()
    assert keep == {manifest.manifest_id(), ticketed, *manifest.object_ids()}
    report = store.gc(keep)
    assert report.dry_run and report.removed == [orphan] and store.has(orphan)
    assert store.gc(keep, dry_run=False).removed == [orphan] and not store.has(orphan)
    assert store.gc({manifest.manifest_id()}, dry_run=False).removed == [ticketed]
    assert {e.id for e in store.entries()} == {manifest.manifest_id()} and store.verify() == []


def test_a_failed_upload_leaves_nothing(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    store = case.store

    def broken(artifact_id: str, staged: Path) -> None:
        raise OSError("connection reset mid-upload")

    monkeypatch.setattr(store.backend, "put", broken)
    with pytest.raises(OSError, match="mid-upload"):
        store.put_bytes(b"never lands")
    assert list(store.ids()) == [] and not any(store.tmp.iterdir())


# --- what only the object store has -----------------------------------------------------------


@pytest.fixture
def s3_store(s3_url: str, tmp_path: Path) -> ArtifactStore:
    from schema.settings import load_settings

    return ArtifactStore.from_settings(load_settings(home=tmp_path / "home"))


@pytest.mark.integration
def test_one_setting_selects_the_object_store(s3_url: str, tmp_path: Path) -> None:
    from schema.artifact_s3 import S3Backend
    from schema.settings import load_settings

    settings = load_settings(home=tmp_path / "home", artifacts_cache_size="1M")
    store = ArtifactStore.from_settings(settings)
    assert isinstance(store.backend, S3Backend) and store.backend.cache_bytes == 1 << 20
    assert store.backend.cache == tmp_path / "home" / "cache" / "artifacts"
    artifact_id = store.put_bytes(b"shared")
    assert store.where(artifact_id) == f"{s3_url}/objects/{artifact_id[:2]}/{artifact_id}"
    # Another host: another home, the same URL, sees it (and the local default is untouched).
    other = ArtifactStore.from_settings(load_settings(home=tmp_path / "other"))
    assert other.get_bytes(artifact_id) == b"shared"
    assert not (tmp_path / "home" / "artifacts" / "objects").exists()
    assert isinstance(
        ArtifactStore.from_settings(load_settings(home=tmp_path / "x", artifacts_url="")).backend, LocalDirBackend
    )


@pytest.mark.integration
def test_large_files_go_up_in_parts_atomically(s3_store: ArtifactStore, s3_server: Any, tmp_path: Path) -> None:
    backend: Any = s3_store.backend
    backend.part_size = 5 * 1024 * 1024  # S3's smallest part: 11 MiB go up as 3 parts
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 * 4096))
    artifact_id = s3_store.put_file(big)
    head = s3_server.client().head_object(Bucket=backend.bucket, Key=backend._object_key(artifact_id))
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object
    assert s3_store.verify() == [] and s3_store.size(artifact_id) == big.stat().st_size
    # An upload that never completes is invisible: nothing appears under a hash before completion.
    raw = s3_server.client()
    key = backend._object_key("f" * 64)
    upload = raw.create_multipart_upload(Bucket=backend.bucket, Key=key)
    raw.upload_part(Bucket=backend.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 100)
    assert not s3_store.has("f" * 64) and list(s3_store.ids()) == [artifact_id]


@pytest.mark.integration
def test_the_read_cache_is_verified_and_bounded(s3_url: str, s3_server: Any, tmp_path: Path) -> None:
    from schema.artifact_s3 import S3Backend

    writer = ArtifactStore(tmp_path / "w", backend=S3Backend(s3_url, cache_dir=tmp_path / "wcache", cache_bytes=0))
    ids = [writer.put_bytes(bytes([k]) * 1000) for k in range(3)]
    assert not (tmp_path / "wcache").exists() or not any((tmp_path / "wcache").rglob("*" * 64))
    backend = S3Backend(s3_url, cache_dir=tmp_path / "cache", cache_bytes=2500)
    reader = ArtifactStore(tmp_path / "r", backend=backend)
    a, b, c = (reader.path(i) for i in ids)  # three downloads; only two fit
    assert not a.exists() and b.exists() and c.exists() and backend.cache_usage() == 2000
    reader.path(ids[1])  # b is used again: c is now the least recently used
    reader.path(ids[0])
    assert a.exists() and b.exists() and not c.exists()
    # A remote copy that no longer matches its hash never lands in the cache.
    s3_server.client().put_object(Bucket=backend.bucket, Key=backend._object_key(ids[2]), Body=b"X" * 1000)
    with pytest.raises(CorruptArtifactError, match="corrupt in the object store"):
        reader.path(ids[2])
    assert not c.exists() and not list((tmp_path / "cache").rglob("*.part"))
    assert not reader.path("0" * 64).exists()  # absent: a path that does not exist, as the local backend


# --- a bad configuration, said plainly --------------------------------------------------------


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://bucket/prefix", "expected s3://bucket/prefix"),
        ("s3://", "is not an S3 bucket name"),
        ("s3://Bad_Bucket/x", "is not an S3 bucket name"),
        ("s3://bucket/a/../b", "unsafe characters"),
        ("s3://bucket/a//b", "unsafe characters"),
    ],
)
def test_a_bad_url_is_refused_naming_the_setting(url: str, why: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from schema.settings import load_settings

    with pytest.raises(ValidationError, match=f"JETBOX_ARTIFACTS_URL=.*{why}"):
        load_settings(home=tmp_path, artifacts_url=url)
    with pytest.raises(ValidationError, match="JETBOX_ARTIFACTS_CACHE_SIZE"):
        load_settings(home=tmp_path, artifacts_cache_size="lots")


@pytest.mark.integration
def test_a_missing_bucket_is_named(s3_url: str, s3_server: Any, tmp_path: Path) -> None:
    from schema.artifact_s3 import ArtifactBackendError, S3Backend

    store = ArtifactStore(tmp_path, backend=S3Backend("s3://no-such-bucket/p", cache_dir=tmp_path / "c"))
    with pytest.raises(ArtifactBackendError, match=r"JETBOX_ARTIFACTS_URL=s3://no-such-bucket/p .*does not exist"):
        store.put_bytes(b"x")


@pytest.mark.integration
def test_wrong_credentials_are_named(s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from schema.artifact_s3 import ArtifactBackendError, S3Backend
    from tests.s3server import start_s3_server

    strict = start_s3_server(tmp_path / "moto", auth=True)  # checks every key; knows none
    try:
        for key, value in strict.env().items():
            monkeypatch.setenv(key, value)
        store = ArtifactStore(tmp_path, backend=S3Backend("s3://jetbox/p", cache_dir=tmp_path / "c"))
        with pytest.raises(ArtifactBackendError, match=r"JETBOX_ARTIFACTS_URL=.*refused the credentials.*AWS_ACCESS"):
            store.has("0" * 64)
    finally:
        strict.stop()


@pytest.mark.integration
def test_a_server_that_is_down_is_named(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from schema.artifact_s3 import ArtifactBackendError, S3Backend
    from tests.s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    store = ArtifactStore(tmp_path, backend=S3Backend(s3_url, cache_dir=tmp_path / "c"))
    with pytest.raises(ArtifactBackendError, match=r"cannot reach the S3 endpoint .*AWS_ENDPOINT_URL"):
        list(store.ids())


@pytest.mark.integration
def test_jbctl_says_what_is_wrong_with_the_store(
    s3_server: Any, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    for key, value in s3_server.env("s3://never-created/x").items():
        monkeypatch.setenv(key, value)
    assert main(["artifacts", "verify"]) == 1
    err = capsys.readouterr().err
    assert "JETBOX_ARTIFACTS_URL=s3://never-created/x" in err and "does not exist" in err
    assert "Traceback" not in err


# --- checkpoints follow the job to another host -----------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_checkpoint_written_on_one_host_resumes_on_another(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host A trains (under `network: deny`: its requests leave through the store's I/O thread), host B
    (another home, an empty cache, the same JETBOX_ARTIFACTS_URL) continues from A's last checkpoint."""
    import json

    import redis

    from cli.embedded import start_redis
    from schema.settings import load_settings
    from schema.wire import REPORT_STREAM, Envelope, load_secret
    from workers import entry
    from workers.synth.sudoku import GENERATOR, SudokuParams  # noqa: F401  (the generator is registered)

    server = start_redis(tmp_path / "redis")
    try:
        for key in [k for k in os.environ if k.startswith("JETBOX_") and k != "JETBOX_ARTIFACTS_URL"]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("JETBOX_REDIS_URL", server.url)
        homes = [tmp_path / "host-a", tmp_path / "host-b"]
        secret = load_secret(homes[0] / "secret.key", create=True)
        (homes[1]).mkdir()
        (homes[1] / "secret.key").write_bytes((homes[0] / "secret.key").read_bytes())
        (homes[1] / "secret.key").chmod(0o600)
        main = ArtifactStore.from_settings(load_settings(home=tmp_path / "main"))
        data = synthesize("sudoku", {"n": 4}, 0, 64, 64, main, Lineage(ticket="T-1", task="data"), created_at=WHEN)
        tiny = {
            "model": "trm", "d_model": 16, "n_heads": 2, "n_layers": 2, "batch_size": 8, "max_segments": 3,
            "h_cycles": 2, "l_cycles": 1, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2, "seed": 3,
            "data": f"sha256:{data.manifest_id()}", "test_fraction": 0.25,
        }  # fmt: skip

        def run(home: Path, attempt: int, max_steps: int, resume: str | None) -> list[dict[str, Any]]:
            monkeypatch.setenv("JETBOX_HOME", str(home))
            entry._settings_and_key.cache_clear()
            env = Envelope(
                kind="train",
                ticket="T-1",
                task="train",
                attempt=attempt,
                params={**tiny, "max_steps": max_steps},
                resume_checkpoint=resume,
            )
            out = entry.run_job(env.signed(secret))
            assert out["status"] == "succeeded", out
            rows = redis.Redis.from_url(server.url).xrange(REPORT_STREAM)
            reports = [json.loads(fields[b"report"]) for _, fields in rows]
            return [r for r in reports if r["attempt"] == attempt]

        first = run(homes[0], 1, 6, None)
        ckpts = [r["body"]["path"] for r in first if r["kind"] == "checkpoint"]
        assert ckpts and all(c.startswith("sha256:") for c in ckpts)
        assert not (homes[1] / "cache").exists()
        second = run(homes[1], 2, 12, ckpts[-1])
        steps = [r["body"]["step"] for r in second if r["kind"] == "progress"]
        assert steps and min(steps) > 6  # it went on from A's step 6 instead of starting over
        log = (homes[1] / "work" / "T-1" / "train" / "attempt-2" / "job.log").read_text()
        assert "resumed from" in log and str(homes[1] / "cache" / "artifacts") in log
        assert main.verify() == []
    finally:
        server.stop()


@pytest.mark.integration
def test_a_worker_on_another_home_resumes_a_killed_workers_checkpoint(s3_url: str, tmp_path: Path) -> None:
    """The daemon and two workers with three homes that share only Redis, the key and the object store:
    worker A is killed after a checkpoint, worker B resumes from it, verify is clean on the daemon's host."""
    import signal
    import subprocess

    from tests.harness import Setup
    from tests.jbdaemon import JBCTL

    setup = Setup(tmp_path / "main")
    try:
        setup.daemon.env["JETBOX_ARTIFACTS_URL"] = s3_url
        setup.daemon.start()

        def worker(name: str) -> subprocess.Popen[bytes]:
            home = tmp_path / name
            home.mkdir()
            env = {**setup.env, "JETBOX_HOME": str(home), "JETBOX_SECRET_FILE": str(setup.home / "secret.key")}
            with (home / "worker.log").open("ab") as log:
                proc = subprocess.Popen([JBCTL, "worker", "--queue", "cpu"], env=env, stdout=log, stderr=log,
                                        start_new_session=True)  # fmt: skip
            setup.workers.append(proc)
            return proc

        victim = worker("host-a")
        setup.drop("TICKET-9", "  - {id: a, kind: diag, retries: 2, with: {steps: 40, sleep: 6, checkpoints: 8}}\n")
        saved = setup.daemon.wait_event("CheckpointSaved", ticket="TICKET-9", timeout=60)
        assert str(saved["data"]["path"]).startswith("sha256:")
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        worker("host-b")
        assert setup.wait_done("TICKET-9", timeout=120) == "TicketCompleted"
        done = next(e for e in setup.daemon.rows() if e["type"] == "AttemptSucceeded")
        assert done["data"]["attempt"] == 2 and done["data"]["metrics"]["resumed_from"] > 0
        assert (tmp_path / "host-b" / "cache" / "artifacts").is_dir()  # B fetched A's checkpoint
        verify = setup.jbctl("artifacts", "verify")
        assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stdout + verify.stderr
    finally:
        setup.close()


@pytest.mark.integration
def test_a_checkpoint_the_store_cannot_take_is_logged_and_training_goes_on(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from cli.embedded import start_redis
    from schema.artifact_s3 import S3Backend
    from schema.wire import REPORT_STREAM, Envelope
    from tests.s3server import free_port
    from workers.runtime import Reporter, RuntimeContext

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # the store is away
    server = start_redis(tmp_path / "redis")
    try:
        conn = redis.Redis.from_url(server.url)
        env = Envelope(kind="train", ticket="T-1", task="train", attempt=1, resume_checkpoint="sha256:" + "a" * 64)
        store = ArtifactStore(tmp_path / "a", backend=S3Backend(s3_url, cache_dir=tmp_path / "cache"))
        ctx = RuntimeContext(env, Reporter(conn, b"k" * 32, env, "w"), conn, tmp_path / "work", store)
        assert ctx.resume_from is None and "cannot reach the S3 endpoint" in str(ctx.resume_error)
        ctx.close()  # the entry point raises resume_error inside the attempt: a reported, retried failure
        env = Envelope(kind="train", ticket="T-1", task="train", attempt=1)
        ctx = RuntimeContext(env, Reporter(conn, b"k" * 32, env, "w"), conn, tmp_path / "work", store)
        ckpt = tmp_path / "ckpt.bin"
        ckpt.write_bytes(b"weights at step 3")
        ctx.checkpoint(ckpt, 3)  # does not raise
        ctx.close()
        assert conn.xlen(REPORT_STREAM) == 0  # nothing claims a checkpoint that is not stored
        assert "checkpoint at step 3 not stored, training goes on" in (tmp_path / "work" / "job.log").read_text()
    finally:
        server.stop()


@pytest.mark.integration
def test_the_whole_configuration_can_live_in_jetbox_env(
    s3_server: Any, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the units' EnvironmentFile= reads, `jbctl` reads too: the URL and the AWS_* variables."""
    from cli.main import main

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    url = f"s3://{s3_server.create_bucket()}/lab"
    lines = [f"{k}={v}" for k, v in s3_server.env(url).items()]
    (home / "jetbox.env").write_text("\n".join(lines) + "\n")
    src = home / "blob.bin"
    src.write_bytes(b"from the env file")
    from schema.settings import load_settings

    artifact_id = ArtifactStore.from_settings(load_settings()).put_file(src)
    assert main(["artifacts", "verify"]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 objects verified")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")  # the environment wins, as for settings,
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "its-secret")  # and a key pair comes whole from one place
    store = ArtifactStore.from_settings(load_settings())
    backend: Any = store.backend
    assert "AWS_ACCESS_KEY_ID" not in backend.aws and "AWS_SECRET_ACCESS_KEY" not in backend.aws
    assert store.has(artifact_id) and backend.aws["AWS_ENDPOINT_URL"] == s3_server.endpoint


@pytest.mark.integration
@pytest.mark.parametrize("isolation", ["guard", "auto"])
def test_jobs_under_network_deny_reach_the_store_and_nothing_else(
    isolation: str, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the in-process guard alone, and with a kernel namespace where the worker may make one (root):
    checkpoints reach the object store, a connection the job makes itself is still refused."""
    import json

    import redis

    from cli.embedded import start_redis
    from schema.wire import REPORT_STREAM, Envelope, load_secret
    from tests.s3server import free_port
    from workers import entry

    server = start_redis(tmp_path / "redis")
    try:
        for key in [k for k in os.environ if k.startswith("JETBOX_") and k != "JETBOX_ARTIFACTS_URL"]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("JETBOX_REDIS_URL", server.url)
        monkeypatch.setenv("JETBOX_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("JETBOX_NETWORK_ISOLATION", isolation)
        secret = load_secret(tmp_path / "home" / "secret.key", create=True)
        entry._settings_and_key.cache_clear()
        ok = Envelope(kind="diag", ticket="T-1", task="a", attempt=1, params={"steps": 4, "checkpoints": 2})
        assert entry.run_job(ok.signed(secret))["status"] == "succeeded"
        rows = redis.Redis.from_url(server.url).xrange(REPORT_STREAM)
        paths = [json.loads(f[b"report"])["body"].get("path") for _, f in rows]
        ckpts = [p for p in paths if p]
        assert len(ckpts) == 2 and all(ArtifactStore.from_settings(entry._settings_and_key()[0]).has(
            p.removeprefix("sha256:")) for p in ckpts)  # fmt: skip
        bad = Envelope(kind="diag", ticket="T-1", task="b", attempt=1, params={"connect": f"127.0.0.1:{free_port()}"})
        out = entry.run_job(bad.signed(secret))
        assert out["status"] == "failed" and "network access denied" in out["error"]
    finally:
        entry._settings_and_key.cache_clear()
        server.stop()
