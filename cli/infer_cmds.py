"""jbctl infer: ad-hoc inference through the queue, on a worker, with the current core (or a checkpoint)."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from cli.common import open_store, print_json, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run a core component on an input, through the queue, on a worker")
    p.add_argument("--component", required=True, choices=["reasoner", "image-encoder"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="a sudoku puzzle: one row per line, 0 or . for blanks")
    src.add_argument("--image", type=Path, help="a PNG image (RGB)")
    p.add_argument("--checkpoint", help="sha256:<id> of a checkpoint artifact (default: the current core's)")
    p.add_argument("--queue", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_infer)


def parse_puzzle(path: Path) -> list[list[int]]:
    """A grid from text: rows of digits (space-separated or not), 0 . or _ for blanks."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read: {exc}") from None
    rows: list[list[int]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        cells = line.split() if " " in line.strip() else list(line.strip())
        if not cells:
            continue
        row = []
        for col, cell in enumerate(cells, start=1):
            if cell in (".", "_"):
                cell = "0"
            if not cell.isdigit():
                raise CliError(f"{path}:{n}:{col}: {cell!r} is not a digit (use 0 or . for a blank)")
            row.append(int(cell))
        rows.append(row)
    size = len(rows)
    if size not in (4, 6, 9):
        raise CliError(f"{path}: {size} rows; a sudoku has 4, 6 or 9")
    for n, row in enumerate(rows, start=1):
        if len(row) != size:
            raise CliError(f"{path}:{n}: {len(row)} cells in a {size}x{size} grid")
        if any(v > size for v in row):
            raise CliError(f"{path}:{n}: digits go up to {size} in a {size}x{size} grid")
    return rows


def read_image(path: Path) -> list[list[list[int]]]:
    try:
        from PIL import Image

        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if max(rgb.size) > 512:
                raise CliError(f"{path}: {rgb.size[0]}x{rgb.size[1]} is too large (at most 512x512)")
            import numpy as np

            return np.asarray(rgb).tolist()  # type: ignore[no-any-return]
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"{path}: not a readable image: {exc}") from None


def current_core(store: Any) -> dict[str, Any]:
    import sqlalchemy as sa

    from schema.tables import SQLModel

    table = SQLModel.metadata.tables["core_versions"]
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(table).order_by(table.c.version.desc()).limit(1)).mappings().first()
    return {"version": row["version"], "components": row["components"]} if row else {"version": 0, "components": {}}


def cmd_infer(args: argparse.Namespace) -> int:
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from daemon.dispatcher import enqueue
    from schema.wire import Envelope, load_secret

    settings = settings_from(args)
    redis_url = settings.redis_url_or_private()
    if not redis_url:
        raise CliError("no Redis configured (JETBOX_REDIS_URL): inference runs on a worker (try `jbctl up`)")
    params: dict[str, Any] = {"component": args.component}
    if args.input:
        params["puzzle"] = parse_puzzle(args.input)
    else:
        params["image"] = read_image(args.image)
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    core = current_core(open_store(settings))
    if not args.checkpoint and args.component not in core["components"]:
        raise CliError(
            f"the core (v{core['version']}) has no {args.component}: approve a proposal first, "
            "or pass --checkpoint sha256:<id>"
        )
    params["_core"] = core
    envelope = Envelope(
        kind="infer",
        ticket="ADHOC",
        task=f"infer-{uuid.uuid4().hex[:12]}",
        attempt=1,
        params=params,
        timeout=args.timeout,
    )
    conn = redis.Redis.from_url(redis_url)
    started = time.perf_counter()
    enqueue(conn, load_secret(settings.secret_path, create=False), envelope, args.queue)
    job = Job.fetch(envelope.job_id, connection=conn, serializer=JSONSerializer)
    deadline = time.monotonic() + args.timeout
    while job.get_status(refresh=True) not in ("finished", "failed", "stopped", "canceled"):
        if time.monotonic() > deadline:
            raise CliError(f"no answer within {args.timeout:g}s: is a worker running on the {args.queue} queue?")
        time.sleep(0.002)
    total_ms = 1000 * (time.perf_counter() - started)
    result = job.return_value() if job.get_status(refresh=False) == "finished" else None
    if not isinstance(result, dict) or result.get("status") != "succeeded":
        error = (result or {}).get("error") if isinstance(result, dict) else job.get_status(refresh=False)
        raise CliError(f"inference failed: {error}")
    out = result["outputs"]
    out["end_to_end_ms"] = total_ms
    if args.json:
        print_json(out)
        return 0
    if out.get("answer"):
        for row in out["answer"]:
            print(" ".join(str(v) for v in row))
    else:
        head = json.dumps([round(v, 3) for v in out["head"]])
        print(f"embedding: dim {out['dim']}, norm {out['norm']:.3f}, head {head}")
    warm = "warm" if out["warm"] else "cold (loaded now)"
    print(
        f"core v{out['core_version']} {args.component} {out['checkpoint'][:12]}: forward {out['forward_ms']:.1f} ms, "
        f"{warm}, end to end {total_ms:.1f} ms"
    )
    return 0
