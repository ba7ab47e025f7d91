"""`jbctl`: the one command users type.

Each area of the CLI lives in its own module exposing `register(subparsers)`; every handler takes
the parsed arguments and returns an exit code. Keep imports here light: `jbctl` must start fast and
never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add subcommands, in the order they appear in `jbctl --help`.
COMMAND_MODULES = [
    "cli.tickets",
    "cli.sched_cmds",
    "cli.plans",
    "cli.store_cmds",
    "cli.artifacts",
    "cli.daemon_cmds",
    "cli.units",
    "cli.run_cmds",
    "cli.gate_cmds",
    "cli.cache_cmds",
    "cli.infer_cmds",
    "cli.adapters_cmds",
    "cli.console_cmds",
]


class CliError(Exception):
    """A user-facing error: printed as `jbctl: message`, exit code 1 unless given."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jbctl", description="Jetbox: event-sourced ML research orchestrator")
    parser.add_argument("--home", help="state directory (overrides JETBOX_HOME)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # an area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"jbctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `jbctl events | head`: the reader left; not an error
        import os

        # Python would complain again when it flushes stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from schema.store import ConcurrencyError, StoreError

        if isinstance(exc, StoreError | ConcurrencyError):
            print(f"jbctl: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
