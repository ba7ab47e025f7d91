"""jbctl hold | release | priority | pause | resume: steering what runs when (docs/SCHEDULING.md)."""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import open_store, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hold", help="schedule nothing more of a ticket until `jbctl release` (running jobs finish)")
    p.add_argument("ticket")
    p.add_argument("-m", "--reason", help="why (shown in jbctl status)")
    p.add_argument(
        "--stop",
        action="store_true",
        help="tell its running jobs to stop at their next checkpoint (they resume from it on release)",
    )
    p.set_defaults(func=cmd_hold)

    p = sub.add_parser("release", help="let a held ticket be scheduled again")
    p.add_argument("ticket")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("priority", help="set a ticket's priority (higher runs first among what waits)")
    p.add_argument("ticket")
    p.add_argument("priority", type=_int, help="a whole number, -1000 to 1000 (default of a ticket: 0)")
    p.set_defaults(func=cmd_priority)

    p = sub.add_parser("pause", help="schedule nothing new anywhere (maintenance); running jobs finish")
    p.add_argument("-m", "--reason", help="why (shown in STATUS= and jbctl status)")
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", help="end a pause: waiting tasks are scheduled, highest priority first")
    p.set_defaults(func=cmd_resume)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"priority must be a whole number, not {text!r}") from None


def _act(args: argparse.Namespace, fn: Any, *pos: Any, **kw: Any) -> int:
    from daemon.handler import CommandHandler, local_actor

    handler = CommandHandler(open_store(settings_from(args)))
    actor = local_actor()
    outcome = fn(handler, *pos, actor=actor["user"], meta={"actor": actor}, **kw)
    if not outcome.ok:
        raise CliError(outcome.message + (" (see `jbctl status`)" if outcome.message.startswith("no ticket") else ""))
    print(outcome.message)
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    from daemon import gate

    return _act(args, gate.hold, args.ticket, reason=args.reason, stop=args.stop)


def cmd_release(args: argparse.Namespace) -> int:
    from daemon import gate

    return _act(args, gate.release, args.ticket)


def cmd_priority(args: argparse.Namespace) -> int:
    from daemon import gate

    return _act(args, gate.set_priority, args.ticket, args.priority)


def cmd_pause(args: argparse.Namespace) -> int:
    from daemon import gate

    return _act(args, gate.pause, reason=args.reason)


def cmd_resume(args: argparse.Namespace) -> int:
    from daemon import gate

    return _act(args, gate.resume)
