"""jbctl daemon."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the daemon: watch the tickets folder, record events, dispatch")
    p.add_argument("--tickets", type=Path, help="tickets folder to watch (overrides JETBOX_TICKETS_DIR)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--no-dispatch",
        action="store_true",
        help="record tickets without a Redis: nothing is dispatched (without this flag, no Redis is an error)",
    )
    p.set_defaults(func=cmd_daemon)


# --- jbctl daemon --------------------------------------------------------------------------------


class _JournalFormatter(logging.Formatter):
    """Under journald, prefix `<N>` so each line gets its syslog priority; elsewhere, timestamps."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journald: bool) -> None:
        fmt = "%(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            return f"<{self._PRIORITY.get(record.levelno, 6)}>" + text.replace("\n", "\n ")
        return text


def _under_journald() -> bool:
    """True when stderr is journald's stream (systemd sets JOURNAL_STREAM=dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def cmd_daemon(args: argparse.Namespace) -> int:
    from daemon.service import Daemon, DaemonLocked
    from schema.settings import load_settings

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(_under_journald()))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("watchdog", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import faulthandler
    import signal

    faulthandler.enable()  # SIGABRT from systemd's watchdog: the wedged stack goes to the journal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    overrides = {"home": args.home, "tickets_dir": args.tickets}
    try:
        settings = load_settings(**overrides)
    except Exception as exc:
        raise CliError(f"bad settings: {exc}") from None
    if args.no_dispatch:
        settings = settings.model_copy(update={"redis_url": None})
    else:
        settings = settings.model_copy(update={"redis_url": settings.redis_url_or_private()})
        if not settings.redis_url:
            # A daemon without Redis records tickets and dispatches nothing: never let that be silent.
            raise CliError(
                "no Redis configured, so no step would ever be dispatched. Set JETBOX_REDIS_URL "
                f"(for the systemd units: in {settings.home / 'jetbox.env'}, or `jbctl install-units --redis ...`), "
                "run everything with `jbctl up`, or pass --no-dispatch to only record tickets"
            )
    from schema.wire import SecretError, load_secret

    try:  # refuse a key others can read before anything starts (the fix is printed)
        if settings.redis_url or settings.secret_path.exists():
            load_secret(settings.secret_path, create=True)
    except SecretError as exc:
        raise CliError(str(exc)) from None
    try:
        return Daemon(settings, overrides=overrides).run()
    except DaemonLocked as exc:
        raise CliError(str(exc)) from None
