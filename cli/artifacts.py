"""`jbctl artifacts`: list, show, verify, regenerate and garbage-collect stored artifacts.

Which artifacts exist, and which ticket, task and attempt produced each, is the event log's record
(`ArtifactRecorded`, the `artifacts` projection that `jbctl sql` reads): with a database, `list` shows
exactly those rows, joined to the store's index for the descriptive columns (name, size, count,
split), and `gc` keeps what the log names. The index decides only for a store without a database;
`list --unrecorded` shows the indexed artifacts the log does not name (local runs, milestone
reports, an attempt whose report never arrived): what `gc` removes unless the log names them otherwise
(a step output, a core component).

Only the store (stdlib + pydantic) is imported at start-up; numpy and the generators are
imported inside the handlers that need them, and torch never.
"""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path
from typing import Any

from cli.common import print_json, print_table, settings_from
from cli.main import CliError
from schema.artifact_store import ArtifactStore
from schema.artifacts import (
    MANIFEST_KIND,
    AmbiguousArtifactError,
    ArtifactEntry,
    ArtifactError,
    Lineage,
    Manifest,
    UnknownArtifactError,
)

PREVIEW_IMAGES = 36
PREVIEW_TEXT = 3


def register(subparsers: Any) -> None:
    """Add `artifacts` and its actions to jbctl."""
    p = subparsers.add_parser(
        "artifacts",
        help="list, show, verify, regenerate and gc stored artifacts",
        description="Without an action: list artifacts.",
    )
    _list_options(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_list, ticket=None, kind=None, json=False, unrecorded=False)
    sub = p.add_subparsers(dest="artifacts_action", metavar="ACTION")

    ls = sub.add_parser("list", help="list artifacts (the default)")
    _list_options(ls, argparse.SUPPRESS)
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="a manifest and a preview of its data")
    show.add_argument("id", help="artifact id or unique prefix")
    show.add_argument("--limit", type=int, default=None, help="examples to preview")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser("verify", help="re-hash every object; exit 1 on corruption")
    verify.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    verify.set_defaults(func=cmd_verify)

    regen = sub.add_parser("regenerate", help="rebuild a dataset from its manifest and compare hashes")
    regen.add_argument("id", help="manifest id or unique prefix")
    regen.add_argument("--no-repair", action="store_true", help="do not restore damaged shards")
    regen.set_defaults(func=cmd_regenerate)

    gc = sub.add_parser("gc", help="remove unreferenced objects (dry run unless --yes)")
    gc.add_argument("--yes", action="store_true", help="really delete")
    gc.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    gc.set_defaults(func=cmd_gc)


def _list_options(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--ticket", default=default, help="only artifacts produced by this ticket")
    p.add_argument("--kind", default=default, help="only this kind (dataset, checkpoint, ...) or generator")
    p.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    p.add_argument(
        "--unrecorded",
        action="store_true",
        default=default,
        help="indexed artifacts the event log does not record (candidates for gc)",
    )


def _store(args: argparse.Namespace) -> ArtifactStore:
    return ArtifactStore.from_settings(settings_from(args))


def _resolve(store: ArtifactStore, prefix: str) -> str:
    try:
        return store.resolve(prefix)
    except (UnknownArtifactError, AmbiguousArtifactError) as exc:
        raise CliError(str(exc)) from None


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def recorded_rows(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The `artifacts` projection (the log's record), oldest first; None when there is no database."""
    from cli.common import open_store
    from schema import readmodel as rm

    try:
        store = open_store(settings_from(args))
    except CliError:
        return None
    try:
        with store.engine.connect() as conn:
            return rm.select(conn, "artifacts", ("recorded_at", "id"))
    finally:
        store.close()


def _recorded_entry(row: dict[str, Any], indexed: ArtifactEntry | None, store: ArtifactStore) -> ArtifactEntry:
    """A projection row as an index-shaped entry: identity, kind and lineage from the log; name,
    size, count and split from the index where it has them."""
    from datetime import UTC

    meta = {**(indexed.meta if indexed else {}), **(row["meta"] or {})}
    recorded_at = row["recorded_at"].replace(tzinfo=UTC) if row["recorded_at"] is not None else None
    return ArtifactEntry(
        id=row["id"],
        kind=row["kind"],
        name=indexed.name if indexed else str(meta.get("generator", "")),
        size=indexed.size if indexed else (store.size(row["id"]) or 0),
        count=indexed.count if indexed else None,
        split=indexed.split if indexed else None,
        lineage=Lineage(
            ticket=row["ticket"],
            task=row["task"],
            attempt=row["attempt"],
            inputs=indexed.lineage.inputs if indexed else [],
        ),
        created_at=(indexed.created_at if indexed and indexed.created_at else recorded_at),
        meta=meta,
    )


def listed(args: argparse.Namespace) -> list[ArtifactEntry]:
    """What `jbctl artifacts list` shows: the log's rows (or, without a database, the index), filtered."""
    store = _store(args)
    rows = recorded_rows(args)
    if rows is None:  # a store without a log: its index is the only record (and no log names any)
        entries = store.entries()
    elif args.unrecorded:
        named = {row["id"] for row in rows}
        entries = [e for e in store.entries() if e.id not in named]
    else:
        entries = [_recorded_entry(row, store.entry(row["id"]), store) for row in rows]
    return [
        e
        for e in entries
        if (args.ticket is None or e.lineage.ticket == args.ticket)
        and (args.kind is None or args.kind in (e.kind, e.name, e.meta.get("generator")))
    ]


def cmd_list(args: argparse.Namespace) -> int:
    """`jbctl artifacts [--ticket T] [--kind K] [--unrecorded] [--json]`."""
    entries = listed(args)
    if args.json:
        print_json([e.model_dump(mode="json") for e in entries])
        return 0
    rows = [
        [
            e.id[:12],
            e.kind,
            e.name,
            e.count,
            _size(e.size),
            e.split or "",
            e.lineage.ticket or "",
            e.created_at.isoformat(timespec="seconds") if e.created_at else "",
        ]
        for e in entries
    ]
    print_table(["ID", "KIND", "NAME", "COUNT", "SIZE", "SPLIT", "TICKET", "CREATED"], rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`jbctl artifacts show ID`: the manifest, then a preview (text, and a PNG for images)."""
    settings = settings_from(args)
    store = ArtifactStore.from_settings(settings)
    full = _resolve(store, args.id)
    entry = store.entry(full)
    as_json = getattr(args, "json", False)
    if entry is None or entry.kind != MANIFEST_KIND:
        info: dict[str, Any] = {"id": full, "size": store.size(full), "path": store.where(full)}
        if entry is not None:
            info["entry"] = entry.model_dump(mode="json")
        info["listed_by"] = [f"{mid} shard {s.index}" for mid, m in store.manifests() for s in m.shards if s.id == full]
        if as_json:
            print_json(info)
        else:
            for key, value in info.items():
                print(f"{key}: {value}")
        return 0
    try:
        manifest = store.load_manifest(full)
    except ArtifactError as exc:
        raise CliError(str(exc)) from None
    preview, sheet = _preview(manifest, store, settings.home, full, args.limit)
    if as_json:
        print_json(
            {
                "id": full,
                "manifest": manifest.model_dump(mode="json"),
                "preview": preview,
                "contact_sheet": str(sheet) if sheet else None,
            }
        )
        return 0
    print(f"dataset {full}")
    print_json(manifest.model_dump(mode="json"))
    print()
    print(preview)
    if sheet is not None:
        print(f"contact sheet: {sheet}")
    return 0


def _preview(
    manifest: Manifest, store: ArtifactStore, home: Path, full: str, limit: int | None
) -> tuple[str, Path | None]:
    from workers.synth.base import UnknownGeneratorError, get_generator, load_arrays

    try:
        gen = get_generator(manifest.generator)
    except UnknownGeneratorError as exc:
        return f"(no preview: {exc})", None
    try:
        arrays = load_arrays(manifest, store, limit=max(limit or PREVIEW_IMAGES, PREVIEW_TEXT))
    except ArtifactError as exc:
        raise CliError(f"cannot preview {full[:12]}: {exc}") from None
    text = gen.preview(arrays, limit or PREVIEW_TEXT)
    images = gen.preview_images(arrays, limit or PREVIEW_IMAGES)
    if images is None or len(images) == 0:
        return text, None
    path = home / "previews" / f"{full[:16]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(contact_sheet(images)))
    return text, path


def contact_sheet(images: Any, gap: int = 2) -> Any:
    """Images [K, H, W] or [K, H, W, 3] (uint8) on one grid; small images are scaled up for viewing."""
    import numpy as np

    imgs = np.asarray(images, dtype=np.uint8)
    scale = max(1, 96 // max(imgs.shape[1], imgs.shape[2]))
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    k, h, w = imgs.shape[:3]
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, *imgs.shape[3:]), 255, dtype=np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y : y + h, x : x + w] = imgs[i]
    return sheet


def png_bytes(image: Any) -> bytes:
    """A PNG of a uint8 [H, W] (grey) or [H, W, 3] (RGB) array, with the stdlib only."""
    import numpy as np

    arr = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    rows = arr.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def cmd_verify(args: argparse.Namespace) -> int:
    """`jbctl artifacts verify`: exit 1 when any object is corrupt, truncated or missing."""
    store = _store(args)
    problems = store.verify()
    if getattr(args, "json", False):
        print_json({"ok": not problems, "problems": [p.model_dump() for p in problems]})
    elif problems:
        for p in problems:
            print(f"{p.problem:12} {p.id}  {p.detail}  {p.path}")
        print(f"{len(problems)} problem(s) found")
    else:
        print(f"ok: {sum(1 for _ in store.ids())} objects verified")
    return 1 if problems else 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    """`jbctl artifacts regenerate ID`: rebuild from the manifest; exit 1 unless every hash matches."""
    from workers.synth.base import SynthError, regenerate

    store = _store(args)
    full = _resolve(store, args.id)
    try:
        report = regenerate(full, store, repair=not args.no_repair)
    except ArtifactError as exc:
        raise CliError(str(exc)) from None
    except SynthError as exc:
        raise CliError(f"cannot regenerate {full[:12]}: {exc}") from None
    if report.error:
        print(f"{full[:12]}: {report.error}")
        return 1
    for s in report.shards:
        status = "identical" if s.ok else f"DIFFERS (got {s.actual[:16]})"
        extra = " (restored damaged copy)" if s.restored else ""
        print(f"shard {s.index}: {s.expected[:16]} {status}{extra}")
    bad = sum(1 for s in report.shards if not s.ok)
    if bad:
        print(f"{bad} of {len(report.shards)} shard(s) did not regenerate identically")
        return 1
    print(f"ok: {len(report.shards)} shard(s) regenerated bit for bit")
    return 0


def referenced_by_log(args: argparse.Namespace) -> set[str] | None:
    """Artifact ids the event log refers to (recorded artifacts, step outputs, core components, the
    last checkpoint of each task), or None when there is no database to ask."""
    import re

    from cli.common import open_store, settings_from
    from cli.main import CliError

    try:
        store = open_store(settings_from(args))
    except CliError:
        return None
    hex64 = re.compile(r"^[0-9a-f]{64}$")
    keep: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str):
            ref = value.removeprefix("sha256:")
            if hex64.match(ref):
                keep.add(ref)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for rec in store.read(
        0, types=["ArtifactRecorded", "AttemptSucceeded", "CorePromoted", "AdapterActivated", "ProposalOpened"]
    ):
        collect(rec.data.get("artifact"))
        collect(rec.data.get("outputs"))
        collect(rec.data.get("components"))
        collect(rec.data.get("candidate"))
        collect(rec.data.get("adapters"))
    # The last checkpoint of each task: what its next attempt (here or on another host) resumes from.
    last: dict[tuple[str, str], Any] = {}
    for rec in store.read(0, types=["CheckpointSaved"]):
        last[(str(rec.data.get("ticket")), str(rec.data.get("task")))] = rec.data.get("path")
    for ref in last.values():
        collect(ref)
    store.close()
    return keep


def cmd_gc(args: argparse.Namespace) -> int:
    """`jbctl artifacts gc [--yes]`: remove objects no ticket refers to (dry run by default).

    With a database, "referred to" means named by the event log (and everything a kept manifest
    lists); without one, the store's own index decides (manifests and anything with a lineage).
    """
    store = _store(args)
    from_log = referenced_by_log(args)
    keep = store.closure(from_log) if from_log is not None else store.referenced()
    report = store.gc(keep, dry_run=not args.yes)
    if getattr(args, "json", False):
        print_json(report.model_dump())
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for artifact_id in report.removed:
        print(f"{verb} {artifact_id}")
    for tmp in report.temp_files:
        print(f"{verb} stale temp file {tmp}")
    print(f"{verb} {len(report.removed)} object(s), {_size(report.freed_bytes)}; kept {report.kept}")
    if report.dry_run and (report.removed or report.temp_files):
        print("dry run: pass --yes to delete")
    return 0
