"""`jbctl cache ls | clear`: the step cache, as the event log defines it (docs/DECIDER.md, "The step cache")."""

from __future__ import annotations

import argparse
import re
from typing import Any

from cli.common import human_age, now_utc, open_store, print_json, print_table, settings_from
from cli.main import CliError
from schema.cache import CODE_VERSIONS

_KEY = re.compile(r"[0-9a-f]{4,64}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="the step cache: recorded successes that identical steps reuse (ls, clear)")
    p.set_defaults(func=cmd_ls, kind=None, ticket=None, json=False)
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION")

    ls = actions.add_parser("ls", help="list cached step results (the default)")
    _filters(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    clear = actions.add_parser(
        "clear", help="forget cached results (recorded as CacheCleared); the matching steps run again next time"
    )
    _filters(clear)
    clear.add_argument("--key", help="a key, or a prefix of one (at least 4 hex digits), as `cache ls` shows it")
    clear.add_argument("--all", action="store_true", help="every cached result (required when no filter is given)")
    clear.set_defaults(func=cmd_clear)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", help=f"only steps of this kind ({', '.join(sorted(CODE_VERSIONS))})")
    p.add_argument("--ticket", help="only results recorded by this ticket")


def _check_filters(args: argparse.Namespace) -> None:
    if args.kind is not None and args.kind not in CODE_VERSIONS:
        raise CliError(f"--kind {args.kind!r}: not a step kind (kinds: {', '.join(sorted(CODE_VERSIONS))})")
    key = getattr(args, "key", None)
    if key is not None and not _KEY.fullmatch(key):
        raise CliError(f"--key {key!r}: expected at least 4 lowercase hex digits of a key, as `jbctl cache ls` shows")


def _state(args: argparse.Namespace) -> Any:
    from daemon.handler import CommandHandler

    return CommandHandler(open_store(settings_from(args)))


def cmd_ls(args: argparse.Namespace) -> int:
    _check_filters(args)
    state = _state(args).state
    entries = sorted(
        (
            e
            for e in state.cache.values()
            if (args.kind is None or e.kind == args.kind) and (args.ticket is None or e.ticket == args.ticket)
        ),
        key=lambda e: (e.at, e.key),
    )
    if getattr(args, "json", False):
        print_json(
            [
                {
                    "key": e.key,
                    "kind": e.kind,
                    "ticket": e.ticket,
                    "task": e.task,
                    "attempt": e.attempt,
                    "recorded_at": e.at.isoformat(),
                    "hits": e.hits,
                    "metrics": e.metrics,
                    "outputs": e.outputs,
                }
                for e in entries
            ]
        )
        return 0
    now = now_utc()
    print_table(
        ["KEY", "KIND", "SOURCE", "AGE", "REUSED"],
        [
            [e.key[:12], e.kind, f"{e.ticket}/{e.task}#{e.attempt}", human_age((now - e.at).total_seconds()), e.hits]
            for e in entries
        ],
    )
    if not entries:
        print("(no cached results" + (" match" if args.kind or args.ticket else "") + ")")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    from daemon.commands import ClearCache
    from daemon.handler import local_actor

    _check_filters(args)
    if not (args.kind or args.ticket or args.key or args.all):
        raise CliError("clear what? give --kind, --ticket or --key, or --all for every cached result")
    handler = _state(args)
    if args.ticket is not None and not handler.known(args.ticket):
        raise CliError(f"no ticket {args.ticket!r}")
    who = local_actor()
    command = ClearCache(now=now_utc(), kind=args.kind, ticket=args.ticket, key=args.key, actor=str(who["user"]))
    recorded = handler.handle(command, meta={"actor": who})
    cleared = len(recorded[0].data["keys"]) if recorded else 0
    print(f"cleared {cleared} cached result{'s' if cleared != 1 else ''}")
    return 0
