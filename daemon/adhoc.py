"""Ad-hoc inference through the queue: what `jbctl infer` and the console's playground both run.

The job is an ordinary signed `infer` envelope on a worker queue, so warm workers answer it with the
current core loaded; nothing here loads a model (the daemon never imports torch).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa

from schema.settings import Settings
from schema.tables import SQLModel


class InferenceError(Exception):
    """Inference could not run or failed; the message says why."""


def parse_puzzle_text(text: str, where: str = "puzzle") -> list[list[int]]:
    """A grid from text: rows of digits (space-separated or not), 0 . or _ for blanks."""
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
                raise ValueError(f"{where}:{n}:{col}: {cell!r} is not a digit (use 0 or . for a blank)")
            row.append(int(cell))
        rows.append(row)
    size = len(rows)
    if size not in (4, 6, 9):
        raise ValueError(f"{where}: {size} rows; a sudoku has 4, 6 or 9")
    for n, row in enumerate(rows, start=1):
        if len(row) != size:
            raise ValueError(f"{where}:{n}: {len(row)} cells in a {size}x{size} grid")
        if any(v > size for v in row):
            raise ValueError(f"{where}:{n}: digits go up to {size} in a {size}x{size} grid")
    return rows


def current_core(engine: sa.Engine) -> dict[str, Any]:
    """The newest core version and its components ({"version": 0, "components": {}} when empty)."""
    table = SQLModel.metadata.tables["core_versions"]
    with engine.connect() as conn:
        row = conn.execute(sa.select(table).order_by(table.c.version.desc()).limit(1)).mappings().first()
    return {"version": row["version"], "components": row["components"]} if row else {"version": 0, "components": {}}


def infer(
    settings: Settings,
    engine: sa.Engine,
    params: dict[str, Any],
    *,
    queue: str = "gpu",
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run one `infer` job on a worker and return its outputs (with `end_to_end_ms`)."""
    import redis
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from daemon.dispatcher import enqueue
    from schema.wire import load_secret

    redis_url = settings.redis_url_or_private()
    if not redis_url:
        raise InferenceError("no Redis configured (JETBOX_REDIS_URL): inference runs on a worker (try `jbctl up`)")
    component = params["component"]
    core = current_core(engine)
    if params.get("adapter"):
        from daemon.memory import AdapterError, adapter_params, resolve_adapter

        try:
            params = {**params, "_adapter": adapter_params(resolve_adapter(engine, str(params["adapter"]), component))}
        except AdapterError as exc:
            raise InferenceError(str(exc)) from None
    if not params.get("checkpoint") and not params.get("_adapter") and component not in core["components"]:
        raise InferenceError(
            f"the core (v{core['version']}) has no {component}: approve a proposal first, "
            "or pass --checkpoint sha256:<id>"
        )
    from schema.wire import Envelope

    envelope = Envelope(
        kind="infer",
        ticket="ADHOC",
        task=f"infer-{uuid.uuid4().hex[:12]}",
        attempt=1,
        params={**params, "_core": core},
        timeout=timeout,
    )
    conn = redis.Redis.from_url(redis_url)
    started = time.perf_counter()
    enqueue(conn, load_secret(settings.secret_path, create=False), envelope, queue)
    job = Job.fetch(envelope.job_id, connection=conn, serializer=JSONSerializer)
    deadline = time.monotonic() + timeout
    while job.get_status(refresh=True) not in ("finished", "failed", "stopped", "canceled"):
        if time.monotonic() > deadline:
            raise InferenceError(f"no answer within {timeout:g}s: is a worker running on the {queue} queue?")
        time.sleep(0.002)
    total_ms = 1000 * (time.perf_counter() - started)
    result = job.return_value() if job.get_status(refresh=False) == "finished" else None
    if not isinstance(result, dict) or result.get("status") != "succeeded":
        error = (result or {}).get("error") if isinstance(result, dict) else job.get_status(refresh=False)
        raise InferenceError(f"inference failed: {error}")
    out = dict(result["outputs"])
    out["end_to_end_ms"] = total_ms
    return out


IMAGE_COMPONENTS = ("image-encoder", "image-text-encoder")


def default_gallery(engine: sa.Engine, core: dict[str, Any], component: str = "image-encoder") -> str | None:
    """The captioned images to compare a picture with: a `shapes` dataset of the ticket that trained the
    core's `component` (what it learned from), else the newest `shapes` dataset; None when there is none."""
    table = SQLModel.metadata.tables["artifacts"]
    trained_by = str((core["components"].get(component) or {}).get("ticket") or "")
    query = sa.select(table.c.id, table.c.ticket, table.c.meta).where(table.c.kind == "dataset")
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(table.c.recorded_at.desc()).limit(500)).all()
    captioned = [r for r in rows if (r.meta or {}).get("generator") == "shapes"]
    for r in sorted(captioned, key=lambda r: r.ticket != trained_by):  # stable: newest first within each
        return f"sha256:{r.id}"
    return None
