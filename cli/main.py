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

# Modules that add subcommands, in the order they appear in `jbctl --help`, with the subcommands each
# adds: `jbctl status` imports only `cli.tickets` (and what it needs), not every area's dependencies.
# tests/test_cli.py checks this table against what the modules register.
COMMANDS: dict[str, tuple[str, ...]] = {
    "cli.tickets": ("validate", "schema", "submit", "status", "describe", "cancel"),
    "cli.sched_cmds": ("hold", "release", "priority", "pause", "resume"),
    "cli.plans": ("plan", "milestones", "milestone"),
    "cli.store_cmds": ("events", "sql", "replay", "verify", "backup", "migrate"),
    "cli.artifacts": ("artifacts",),
    "cli.daemon_cmds": ("daemon",),
    "cli.units": ("install-units", "uninstall-units"),
    "cli.run_cmds": ("worker", "run", "up"),
    "cli.join_cmds": ("join-token",),
    "cli.gate_cmds": ("proposals", "approve", "reject", "core", "retry", "audit"),
    "cli.cache_cmds": ("cache",),
    "cli.infer_cmds": ("infer",),
    "cli.adapters_cmds": ("adapters",),
    "cli.suite_cmds": ("eval",),
    "cli.console_cmds": ("console",),
}
COMMAND_MODULES = list(COMMANDS)
MODULE_OF = {command: module for module, commands in COMMANDS.items() for command in commands}


class CliError(Exception):
    """A user-facing error: printed as `jbctl: message`, exit code 1 unless given."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def command_word(argv: Sequence[str]) -> str | None:
    """The subcommand these arguments name (skipping `--home DIR`), or None (none, or help asked first)."""
    args = list(argv)
    while args:
        word = args.pop(0)
        if word == "--home":
            if args:
                args.pop(0)
            continue
        if word.startswith("--home="):
            continue
        return None if word.startswith("-") else word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (given a known subcommand) one with only the area that adds it: the
    others' modules, and what they import, stay unloaded. Usage lines and errors read the same."""
    parser = argparse.ArgumentParser(prog="jbctl", description="Jetbox: event-sourced ML research orchestrator")
    parser.add_argument("--home", help="state directory (overrides JETBOX_HOME)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    only = MODULE_OF.get(command) if command is not None else None
    for name in [only] if only else COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # an area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_word(argv))
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
        from schema.artifacts import ArtifactError
        from schema.netfs import NetworkFilesystemError
        from schema.store import ConcurrencyError, StoreError

        # An artifact store that cannot be used as configured (JETBOX_ARTIFACTS_URL): the message says why.
        if isinstance(exc, StoreError | ConcurrencyError | ArtifactError | NetworkFilesystemError):
            print(f"jbctl: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
