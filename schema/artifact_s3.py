"""An S3-compatible object store as an `ArtifactBackend` (AWS, MinIO, Ceph, moto's server, ...).

Chosen by one setting, ``JETBOX_ARTIFACTS_URL=s3://bucket/prefix``; the endpoint, region and
credentials come from the standard AWS variables that boto3 reads (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance
role...). Nothing here knows about any particular server: MinIO, AWS and the tests' moto server differ
only in those variables.

Layout under the prefix (the same as the local folder's, so a store can be copied with any S3 tool)::

    objects/ab/abcdef...   one object per artifact, named by the sha256 of its bytes
    index/<id>.json        the index entry of a recorded artifact

Atomic uploads: S3 makes an object visible only once its PUT, or its multipart upload's completion,
has succeeded, and the upload goes straight to the final key, so a reader sees the whole blob under its
hash or nothing. Files larger than `PART_SIZE` go up in parts (several in flight), and a failed upload
is aborted by the transfer manager. A bucket should also have a lifecycle rule that aborts incomplete
multipart uploads after a day (docs/OPERATIONS.md), for uploads cut by a killed process.

Requests run on one long-lived I/O thread per process (`schema.io_thread.IoThread`), started when the
first backend is built: a job under `network: deny` runs in a network namespace of its own (workers/netns.py), which
its thread and every thread it starts inherit, so its own sockets reach nothing; the store's requests,
made on the I/O thread, still leave through the worker's network (and the in-process guard lets the
store's endpoint through, as it does Redis: `S3Backend.endpoints`).

Reads: `open`/`get` stream from the object store (so `verify` checks what is stored, not a copy);
`path` (the readers that need a file: memory-mapped shards, `torch.load`) downloads into a worker-local
cache, checks the hash while downloading, and keeps at most `cache_bytes` there, evicting the least
recently used files (their modification time is bumped on each use: atime is unreliable under relatime).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlparse

from schema.artifacts import CHUNK, HEX64, ArtifactError, CorruptArtifactError, UnknownArtifactError
from schema.io_thread import IoThread

SETTING = "JETBOX_ARTIFACTS_URL"
PART_SIZE = 16 * 1024 * 1024  # multipart above this, in parts of this size
MAX_CONCURRENCY = 4
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
KEY_PART = re.compile(r"^[A-Za-z0-9!_.*'()\-]+$")
T = TypeVar("T")


class ArtifactBackendError(ArtifactError):
    """The object store cannot be used as configured (bad URL, no bucket, refused credentials,
    unreachable endpoint): the message names the setting to fix."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``; the prefix has no leading or trailing slash."""
    m = re.fullmatch(r"s3://([^/]*)(?:/(.*))?", url.strip())
    if m is None:
        raise ArtifactBackendError(f"{SETTING}={url!r}: expected s3://bucket/prefix")
    bucket, prefix = m.group(1), (m.group(2) or "").strip("/")
    if not BUCKET.match(bucket) or ".." in bucket:
        raise ArtifactBackendError(
            f"{SETTING}={url!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')"
        )
    for part in prefix.split("/") if prefix else []:
        if not KEY_PART.match(part) or part in (".", ".."):
            raise ArtifactBackendError(f"{SETTING}={url!r}: prefix part {part!r} is empty or has unsafe characters")
    return bucket, prefix


_io: IoThread | None = None
_io_lock = threading.Lock()


def io_thread() -> IoThread:
    """The process's I/O thread (a new one in a forked child, where the parent's thread does not exist)."""
    global _io
    with _io_lock:
        if _io is None or not _io.alive():
            _io = IoThread("jetbox-artifact-io")
        return _io


class S3Backend:
    """Objects in `s3://bucket/prefix/objects/`, index entries in `.../index/`, a read cache on disk."""

    def __init__(
        self,
        url: str,
        cache_dir: Path | str,
        cache_bytes: int = 20 * 1024**3,
        client: Any = None,
        aws: dict[str, str] | None = None,
    ) -> None:
        self.url = url.strip()
        # AWS_* values from JETBOX_HOME/jetbox.env that the environment does not set (the environment wins,
        # as for every setting); boto3 reads the rest from the environment itself.
        self.aws = dict(aws or {})
        self.bucket, self.prefix = parse_url(self.url)
        self.cache = Path(cache_dir)
        self.cache_bytes = int(cache_bytes)
        self._client = client
        self.part_size = PART_SIZE
        self._checked = False
        self._io = io_thread()  # now, in the caller's network namespace

    # -- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ArtifactBackendError(
                    f"{SETTING}={self.url} needs boto3, which is not installed: pip install 'jetbox[s3]'"
                ) from None
            # Few, short retries: an unreachable endpoint must fail in seconds with a clear error, not hang.
            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
            aws = self.aws
            session = boto3.session.Session(
                aws_access_key_id=aws.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=aws.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=aws.get("AWS_SESSION_TOKEN"),
                region_name=aws.get("AWS_DEFAULT_REGION") or aws.get("AWS_REGION"),
                profile_name=aws.get("AWS_PROFILE"),
            )
            endpoint = aws.get("AWS_ENDPOINT_URL_S3") or aws.get("AWS_ENDPOINT_URL")
            self._client = session.client("s3", endpoint_url=endpoint, config=config)
        return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size, max_concurrency=MAX_CONCURRENCY
        )

    def endpoint(self) -> str:
        return str(getattr(getattr(self.client, "meta", None), "endpoint_url", "") or "the default AWS endpoint")

    def endpoints(self) -> builtins.list[tuple[str, int]]:
        """(host, port) pairs the requests go to: the endpoint, and the bucket's virtual host on it."""
        url = urlparse(self.endpoint() if "://" in self.endpoint() else "https://s3.amazonaws.com")
        if not url.hostname:
            return []
        port = url.port or (443 if url.scheme == "https" else 80)
        if re.fullmatch(r"[0-9.]+|\[?[0-9a-fA-F:]+\]?", url.hostname):
            return [(url.hostname, port)]  # an address: no virtual host of the bucket
        return [(url.hostname, port), (f"{self.bucket}.{url.hostname}", port)]

    def _call(self, what: str, fn: Callable[[], T], on_missing: Callable[[], T] | None = None) -> T:
        """Run one request on the I/O thread, turning the client's errors into an ArtifactBackendError that
        says which setting to look at; a missing key gives `on_missing()` where the caller expects that."""
        return self._io.run(lambda: self._call_here(what, fn, on_missing))

    def _call_here(self, what: str, fn: Callable[[], T], on_missing: Callable[[], T] | None = None) -> T:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        if not self._checked:
            self._checked = True  # before the first request: a wrong bucket or key is said plainly, once
            self._call_here(f"bucket {self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if on_missing is not None and code in ("404", "NoSuchKey", "NotFound"):
                return on_missing()
            raise self._explain(what, code, status, exc) from None
        except NoCredentialsError:
            raise ArtifactBackendError(
                f"{SETTING}={self.url}: no S3 credentials found for {what} "
                "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from None
        except EndpointConnectionError:
            raise ArtifactBackendError(
                f"{SETTING}={self.url}: cannot reach the S3 endpoint {self.endpoint()} for {what} "
                "(is the server up? the endpoint is AWS_ENDPOINT_URL)"
            ) from None
        except BotoCoreError as exc:
            raise ArtifactBackendError(f"{SETTING}={self.url}: {what} failed at {self.endpoint()}: {exc}") from None

    def _explain(self, what: str, code: str, status: Any, exc: Exception) -> ArtifactBackendError:
        where = f"{SETTING}={self.url} (endpoint {self.endpoint()})"
        if code == "NoSuchBucket" or (status == 404 and what.startswith("bucket")):
            return ArtifactBackendError(f"{where}: bucket {self.bucket!r} does not exist; create it or fix the URL")
        if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return ArtifactBackendError(
                f"{where}: the S3 server refused the credentials for {what} ({code or status}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy"
            )
        return ArtifactBackendError(f"{where}: {what} failed: {code or status}: {exc}")

    def check(self) -> None:
        """Raise ArtifactBackendError unless the bucket is there and the credentials may use it."""
        self._checked = True
        self._call(f"bucket {self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))

    # -- keys -----------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _object_key(self, artifact_id: str) -> str:
        return self._key("objects", artifact_id[:2], artifact_id)

    def _entry_key(self, artifact_id: str) -> str:
        return self._key("index", f"{artifact_id}.json")

    def where(self, artifact_id: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(artifact_id)}"

    def _head(self, key: str) -> dict[str, Any] | None:
        return self._call(
            f"HEAD {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=key), on_missing=lambda: None
        )

    def _get_body(self, key: str, artifact_id: str) -> Any:
        def missing() -> Any:
            raise UnknownArtifactError(f"no artifact {artifact_id} ({self.where(artifact_id)})")

        return self._call(
            f"GET {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"], on_missing=missing
        )

    # -- the protocol ---------------------------------------------------------------------

    def exists(self, artifact_id: str) -> bool:
        return self._head(self._object_key(artifact_id)) is not None

    def size(self, artifact_id: str) -> int | None:
        head = self._head(self._object_key(artifact_id))
        return None if head is None else int(head["ContentLength"])

    def put(self, artifact_id: str, staged: Path) -> None:
        key = self._object_key(artifact_id)
        # Straight to the final key: S3 shows an object only once its PUT or multipart completion succeeded.
        self._call(
            f"upload of {key}",
            lambda: self.client.upload_file(str(staged), self.bucket, key, Config=self._transfer_config()),
        )
        self._install_cached(staged, artifact_id)  # the writer reads it back for free

    def get(self, artifact_id: str) -> bytes:
        with self.open(artifact_id) as fh:
            return fh.read()

    def open(self, artifact_id: str) -> BinaryIO:
        body = self._get_body(self._object_key(artifact_id), artifact_id)
        return cast(BinaryIO, _Stream(body))

    def path(self, artifact_id: str) -> Path:
        local = self._cached(artifact_id)
        if local.is_file():
            _touch(local)
            return local
        try:
            self._io.run(lambda: self._download(artifact_id, local))
        except UnknownArtifactError:
            return local  # absent: like the local backend, a path that does not exist
        return local

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._key("objects") + "/"
        start = base + (f"{prefix[:2]}/{prefix}" if len(prefix) >= 2 else prefix)
        for key in self._keys(start):
            name = key[len(base) :]
            sub, _, artifact_id = name.partition("/")
            if HEX64.match(artifact_id) and artifact_id[:2] == sub and artifact_id.startswith(prefix):
                yield artifact_id

    def delete(self, artifact_id: str) -> None:
        key = self._object_key(artifact_id)
        self._call(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        self._cached(artifact_id).unlink(missing_ok=True)

    def strays(self) -> Iterator[tuple[str, str]]:
        base = self._key("objects") + "/"
        for key in self._keys(base):
            sub, _, name = key[len(base) :].partition("/")
            if not (HEX64.match(name) and name[:2] == sub):
                yield key.rsplit("/", 1)[-1], f"s3://{self.bucket}/{key}"

    def put_entry(self, artifact_id: str, data: bytes) -> None:
        key = self._entry_key(artifact_id)
        self._call(f"PUT {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def get_entry(self, artifact_id: str) -> bytes | None:
        try:
            with _Stream(self._get_body(self._entry_key(artifact_id), artifact_id)) as fh:
                return fh.read()
        except UnknownArtifactError:
            return None

    def entry_ids(self) -> Iterator[str]:
        base = self._key("index") + "/"
        for key in self._keys(base):
            name = key[len(base) :]
            if name.endswith(".json") and HEX64.match(name[:-5]):
                yield name[:-5]

    def delete_entry(self, artifact_id: str) -> None:
        key = self._entry_key(artifact_id)
        self._call(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def _keys(self, start: str) -> Iterator[str]:
        """Every key that starts with `start`, in S3's (lexicographic) order."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(f"LIST {start}", lambda: iter(paginator.paginate(Bucket=self.bucket, Prefix=start)))
        while True:
            page = self._call(f"LIST {start}", lambda: next(pages, None))
            if page is None:
                return
            for item in page.get("Contents", []):
                yield str(item["Key"])

    # -- the read cache -------------------------------------------------------------------

    def _cached(self, artifact_id: str) -> Path:
        return self.cache / artifact_id[:2] / artifact_id

    def _download(self, artifact_id: str, local: Path) -> None:
        """Fetch the object into the cache, hashing it on the way: a corrupt remote copy never lands."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{artifact_id}.{uuid.uuid4().hex}.part")
        try:
            h = hashlib.sha256()
            with self.open(artifact_id) as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != artifact_id:
                raise CorruptArtifactError(
                    f"artifact {artifact_id} is corrupt in the object store: content hashes to "
                    f"{h.hexdigest()[:16]} ({self.where(artifact_id)})"
                )
            os.replace(tmp, local)
            _touch(local)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=local)

    def _install_cached(self, staged: Path, artifact_id: str) -> None:
        local = self._cached(artifact_id)
        if self.cache_bytes <= 0 or staged.stat().st_size > self.cache_bytes:
            staged.unlink(missing_ok=True)
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, local)
        except OSError:  # the staging folder is on another file system
            shutil.move(str(staged), str(local))
        _touch(local)
        self._evict(keep=local)

    def cache_usage(self) -> int:
        """Bytes held in the read cache."""
        return sum(size for _, size, _ in self._cache_files())

    def _cache_files(self) -> builtins.list[tuple[float, int, Path]]:
        out: builtins.list[tuple[float, int, Path]] = []
        if not self.cache.is_dir():
            return out
        for sub in self.cache.iterdir():
            if not sub.is_dir():
                continue
            for item in sub.iterdir():
                if HEX64.match(item.name):
                    try:
                        st = item.stat()
                    except FileNotFoundError:  # evicted by another worker meanwhile
                        continue
                    out.append((st.st_mtime, st.st_size, item))
        return out

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache fits its limit (never `keep`)."""
        files = sorted(self._cache_files())
        total = sum(size for _, size, _ in files)
        for _, size, item in files:
            if total <= self.cache_bytes:
                break
            if item == keep:
                continue
            item.unlink(missing_ok=True)
            total -= size


def _touch(path: Path) -> None:
    """Mark a cache file as just used. An explicit time is kept to the nanosecond, where the kernel's own
    stamp may be a clock tick coarse (several reads in one tick would tie)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        pass


class _Stream:
    """A botocore streaming body as a readable binary file (a context manager that closes it)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def read(self, n: int = -1) -> bytes:
        return bytes(self.body.read() if n is None or n < 0 else self.body.read(n))

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
