"""Working memory, read side: the `adapters` projection, and what a name like `A-3` or `TICKET-7` refers to.

`jbctl adapters`, `jbctl infer --adapter/--memory` and the console read through here; the rules
(ids, replacement, retirement when the core rolls past) live in the decider.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa

from schema.tables import SQLModel

ADAPTER_ID = re.compile(r"^A-[A-Za-z0-9_.-]{1,110}$")
TICKET_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")


class AdapterError(ValueError):
    """An adapter reference that names nothing usable; the message says why and what exists."""


def adapter_rows(engine: sa.Engine, ticket: str | None = None, active_only: bool = False) -> list[dict[str, Any]]:
    """The adapters, oldest first (A-1, A-2, ...), as the projection holds them."""
    table = SQLModel.metadata.tables["adapters"]
    query = sa.select(table)
    if ticket is not None:
        query = query.where(table.c.ticket == ticket)
    if active_only:
        query = query.where(table.c.active.is_(True))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    return sorted(rows, key=_order)


def _order(row: dict[str, Any]) -> tuple[int, str]:
    tail = str(row["id"])[2:]
    return (int(tail), "") if tail.isdigit() else (1 << 62, tail)


def resolve_adapter(engine: sa.Engine, ref: str, component: str) -> dict[str, Any]:
    """The active adapter `ref` names: `A-<n>`, or a ticket id (its active adapter of `component`)."""
    if ADAPTER_ID.match(ref):
        found = [r for r in adapter_rows(engine) if r["id"] == ref]
        if not found:
            known = ", ".join(r["id"] for r in adapter_rows(engine, active_only=True)) or "none active"
            raise AdapterError(f"no adapter {ref} (active: {known}; `jbctl adapters` lists them)")
        row = found[0]
    elif TICKET_ID.match(ref):
        mine = [r for r in adapter_rows(engine, ticket=ref) if r["component"] == component]
        if not mine:
            raise AdapterError(f"{ref} has no {component} adapter (`jbctl adapters` lists the working memory)")
        active = [r for r in mine if r["active"]]
        row = active[-1] if active else mine[-1]
    else:
        raise AdapterError(f"{ref!r} is neither an adapter id (A-<n>) nor a ticket id")
    if row["component"] != component:
        raise AdapterError(f"{row['id']} adapts the {row['component']}, not the {component}")
    if not row["active"]:
        why = row.get("retired_detail") or row.get("retired_reason") or "retired"
        raise AdapterError(f"{row['id']} is retired ({row['retired_reason']}: {why}); it no longer applies")
    if not row.get("artifact"):
        raise AdapterError(f"{row['id']} recorded no adapter file")
    return row


def adapter_params(row: dict[str, Any]) -> dict[str, Any]:
    """What an `infer` job needs to apply the adapter (the same shape the decider gives a step)."""
    return {
        "id": row["id"],
        "ticket": row["ticket"],
        "component": row["component"],
        "base_core_version": row["base_core_version"],
        "checkpoint": row["artifact"],
        "core_checkpoint": row["core_checkpoint"],
        "active": bool(row["active"]),
    }
