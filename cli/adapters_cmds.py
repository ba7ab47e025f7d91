"""jbctl adapters: working memory (per-ticket adapters on a core version), and `adapters retire A-n`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from cli.common import open_store, print_json, print_table, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapters",
        help="working memory: each ticket's adapters, the core version they apply to, active or retired",
        description=(
            "An adapter is active from the moment its ticket passes its checks until it is replaced (its "
            "ticket trains a new one), its core is rolled past (a promotion or rollback changes the weights "
            "it was trained on), or it is retired by hand: `jbctl adapters retire A-n`."
        ),
    )
    p.add_argument("action", nargs="?", choices=["list", "retire"], default="list")
    p.add_argument("adapter", nargs="?", help="A-<n> (for retire)")
    p.add_argument("--ticket", help="only this ticket's adapters")
    p.add_argument("--active", action="store_true", help="only active adapters")
    p.add_argument("-m", "--reason", default="retired by a user", help="why (for retire)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters)


def _row_json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _retire(args: argparse.Namespace) -> int:
    from daemon.commands import RetireAdapter
    from daemon.handler import CommandHandler, local_actor
    from daemon.memory import ADAPTER_ID

    if not args.adapter:
        raise CliError("which adapter? `jbctl adapters retire A-<n>`")
    if not ADAPTER_ID.match(args.adapter):
        raise CliError(f"{args.adapter!r} is not an adapter id (A-<n>; `jbctl adapters` lists them)")
    handler = CommandHandler(open_store(settings_from(args)))
    found = handler.state.adapters.get(args.adapter)
    if found is None:
        known = ", ".join(a for a, v in handler.state.adapters.items() if v["active"]) or "none active"
        raise CliError(f"no adapter {args.adapter} (active: {known})")
    if not found["active"]:
        raise CliError(f"{args.adapter} is already retired")
    who = local_actor()
    handler.handle(
        RetireAdapter(now=datetime.now(UTC), adapter=args.adapter, reason=args.reason, actor=str(who["user"])),
        meta={"actor": who},
    )
    print(f"{args.adapter} retired: inference and later tickets no longer apply it")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from daemon.memory import adapter_rows

    if args.action == "retire":
        return _retire(args)
    if args.adapter:
        raise CliError(f"unexpected {args.adapter!r}: did you mean `jbctl adapters retire {args.adapter}`?")
    rows = adapter_rows(open_store(settings_from(args)).engine, ticket=args.ticket, active_only=args.active)
    if args.json:
        print_json([_row_json(r) for r in rows])
        return 0
    if not rows:
        print("no adapters yet: a ticket with `update: adapter` trains one (tickets/examples/TICKET-7.yaml)")
        return 0
    table = []
    for r in rows:
        m = r.get("metrics") or {}
        gain = m.get("blank_acc_gain")
        state = "active" if r["active"] else f"retired ({r['retired_reason']})"
        if r.get("replaced_by"):
            state += f" by {r['replaced_by']}"
        table.append(
            [
                r["id"],
                r["ticket"],
                r["component"],
                f"v{r['base_core_version']}",
                r["rank"] if r["rank"] is not None else "",
                f"{gain:+.3f}" if isinstance(gain, int | float) else "",
                (r.get("artifact") or "")[:12],
                state,
            ]
        )
    print_table(["ADAPTER", "TICKET", "COMPONENT", "CORE", "RANK", "BLANK GAIN", "ARTIFACT", "STATE"], table)
    return 0
