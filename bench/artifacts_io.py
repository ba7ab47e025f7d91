#!/usr/bin/env python
"""Artifact throughput: a large blob up to and down from the store, object store against local folder.

    .venv/bin/python bench/artifacts_io.py               # 100 MB, moto's S3 server on loopback
    .venv/bin/python bench/artifacts_io.py --mb 10       # a smoke run
    JETBOX_ARTIFACTS_URL=s3://bucket/prefix AWS_ENDPOINT_URL=... .venv/bin/python bench/artifacts_io.py --url env

For each backend, in the same run on the same disk:
  up    `ArtifactStore.put_file` of a fresh random file (stage + hash + install; for S3 the multipart
        upload of PART_SIZE parts, MAX_CONCURRENCY in flight)
  down  `ArtifactStore.path` from an empty cache on another "host" (for S3: download + hash check into
        the read cache; for the local folder the object is already a file, so down is a streamed read of
        it through `open`, the nearest equivalent)
Printed as MB/s and seconds, and S3/local ratios. Nothing here is a pass/fail test.

`artifacts(store_factory, mb)` is reusable (bench/multihost.py runs it with workers in other namespaces).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.artifact_store import ArtifactStore  # noqa: E402

MB = 1_000_000


def artifacts(make_store: Callable[[Path], ArtifactStore], mb: int, scratch: Path) -> dict[str, float]:
    """Up and down MB/s of one `mb`-megabyte random blob through stores made by `make_store(home)`:
    the writer's home and a second, empty home (another host) that reads it back."""
    blob = scratch / "blob.bin"
    with blob.open("wb") as fh:
        for _ in range(mb):
            fh.write(os.urandom(MB))
    writer = make_store(scratch / "writer")
    t0 = time.perf_counter()
    artifact_id = writer.put_file(blob)
    up_s = time.perf_counter() - t0
    reader = make_store(scratch / "reader")
    t0 = time.perf_counter()
    local = reader.path(artifact_id)
    if local.is_file() and local == writer.path(artifact_id):  # the local folder: read it as a stream
        with reader.open(artifact_id) as fh:
            while fh.read(1 << 20):
                pass
    down_s = time.perf_counter() - t0
    assert reader.size(artifact_id) == mb * MB
    blob.unlink()
    return {"mb": float(mb), "up_s": up_s, "down_s": down_s, "up_mb_s": mb / up_s, "down_mb_s": mb / down_s}


def _local(root: Path) -> Callable[[Path], ArtifactStore]:
    return lambda home: ArtifactStore(root)  # one folder: both "hosts" share the disk


def _s3(url: str, cache_bytes: int) -> Callable[[Path], ArtifactStore]:
    from schema.artifact_s3 import S3Backend

    return lambda home: ArtifactStore(home / "artifacts", backend=S3Backend(url, home / "cache", cache_bytes))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100, help="blob size in MB (default 100)")
    ap.add_argument("--url", default=None, help="'env': use JETBOX_ARTIFACTS_URL and AWS_* as set; default: moto")
    args = ap.parse_args()
    if args.mb < 1 or args.mb > 10_000:
        ap.error("--mb must be between 1 and 10000")
    server: Any = None
    with tempfile.TemporaryDirectory(prefix="jetbox-bench-artifacts-") as tmp:
        scratch = Path(tmp)
        if args.url == "env":
            url = os.environ.get("JETBOX_ARTIFACTS_URL", "")
            if not url.startswith("s3://"):
                ap.error("--url env needs JETBOX_ARTIFACTS_URL=s3://bucket/prefix")
            where = f"{url} at {os.environ.get('AWS_ENDPOINT_URL', 'the default AWS endpoint')}"
        else:
            from tests.s3server import start_s3_server

            server = start_s3_server(scratch / "moto")
            os.environ.update(server.env())
            url = f"s3://{server.create_bucket()}/bench"
            where = f"moto's S3 server at {server.endpoint} (loopback)"
        try:
            (scratch / "l").mkdir()
            local = artifacts(_local(scratch / "l" / "store"), args.mb, scratch / "l")
            (scratch / "s").mkdir()
            s3 = artifacts(_s3(url, 4 * args.mb * MB), args.mb, scratch / "s")
        finally:
            if server is not None:
                server.stop()
    load = os.getloadavg()
    print(f"artifact throughput, {args.mb} MB random blob; S3 = {where}; load {load[0]:.2f} {load[1]:.2f}")
    print(f"{'backend':10} {'up MB/s':>10} {'down MB/s':>10} {'up s':>8} {'down s':>8}")
    for name, r in (("local", local), ("s3", s3)):
        print(f"{name:10} {r['up_mb_s']:10.1f} {r['down_mb_s']:10.1f} {r['up_s']:8.2f} {r['down_s']:8.2f}")
    print(f"ratio s3/local: up {s3['up_mb_s'] / local['up_mb_s']:.2f}, down {s3['down_mb_s'] / local['down_mb_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
