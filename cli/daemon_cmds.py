"""jbctl daemon | install-units."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from cli.common import settings_from
from cli.main import CliError

ROOT = Path(__file__).resolve().parent.parent
UNIT_TEMPLATES = ("jetbox-daemon.service", "jetbox-worker@.service", "jetbox.target")
SYSTEM_MARK = "@system@"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the daemon: watch the tickets folder, record events, dispatch")
    p.add_argument("--tickets", type=Path, help="tickets folder to watch (overrides JETBOX_TICKETS_DIR)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("install-units", help="write the systemd units for this installation")
    p.add_argument("--user", action="store_true", help="user units (systemctl --user) instead of system units")
    p.add_argument("--output", type=Path, help="folder to write to (default: the systemd unit folder)")
    p.add_argument("--dry-run", action="store_true", help="print the units instead of writing them")
    p.add_argument("--run-as", help="system units: the account the services run as (default: you, or SUDO_USER)")
    p.add_argument("--gpus", type=int, help="workers that jetbox.target starts (default: one per /dev/nvidiaN)")
    p.set_defaults(func=cmd_install_units)


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

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    overrides = {"home": args.home, "tickets_dir": args.tickets}
    try:
        settings = load_settings(**overrides)
    except Exception as exc:
        raise CliError(f"bad settings: {exc}") from None
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


# --- jbctl install-units -------------------------------------------------------------------------


def _jbctl_path() -> Path:
    """This installation's jbctl: the one beside the running interpreter (the venv), else PATH's."""
    beside = Path(sys.executable).parent / "jbctl"
    if beside.exists():
        return beside.absolute()
    found = shutil.which("jbctl")
    if found:
        return Path(found).absolute()
    raise CliError("cannot find the jbctl executable (install Jetbox with pip first)")


_UNSAFE = re.compile(r"[\s\"'\\$%;]")


def _safe(what: str, path: Path | str) -> str:
    """A path for a unit file: refused when systemd would need quoting or specifier escapes."""
    text = str(path)
    if _UNSAFE.search(text):
        raise CliError(f"{what} {text!r}: systemd units need a path without spaces, quotes, '$', '%' or ';'")
    return text


def detect_gpus() -> int:
    """GPUs on this machine, by their device nodes (no CUDA initialisation, no nvidia-smi)."""
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


def render_units(
    *,
    jbctl: Path,
    home: Path,
    tickets: Path,
    user_mode: bool,
    run_as: str,
    run_as_group: str,
    gpus: int,
) -> dict[str, str]:
    """The unit files (name -> text) for these paths."""
    values = {
        "@JBCTL@": _safe("jbctl", jbctl),
        "@JETBOX_HOME@": _safe("JETBOX_HOME", home),
        "@TICKETS_DIR@": _safe("tickets folder", tickets),
        "@RUN_AS@": run_as,
        "@RUN_AS_GROUP@": run_as_group,
        "@DOCS_URL@": "file://" + _safe("docs", ROOT / "docs" / "OPERATIONS.md"),
        "@WANTED_BY@": "default.target" if user_mode else "multi-user.target",
    }
    wants = " ".join(f"jetbox-worker@{n}.service" for n in range(gpus))
    out: dict[str, str] = {}
    for name in UNIT_TEMPLATES:
        lines: list[str] = []
        for line in (ROOT / "systemd" / name).read_text().splitlines():
            if line.startswith(SYSTEM_MARK):
                if user_mode:
                    continue  # user managers cannot set up these namespaces without privileges
                line = line[len(SYSTEM_MARK) :]
            if line.strip() == "@WORKER_WANTS@":
                if not wants:
                    continue
                line = f"Wants={wants}"
            if line.startswith("##"):
                continue  # the template's own instructions
            for key, value in values.items():
                line = line.replace(key, value)
            lines.append(line)
        text = "\n".join(lines) + "\n"
        leftover = re.findall(r"@[A-Z_]+@", text)
        if leftover:
            raise CliError(f"template {name}: unknown placeholders {sorted(set(leftover))}")
        out[name] = f"# Rendered by `jbctl install-units{' --user' if user_mode else ''}`.\n" + text
    return out


def _default_unit_dir(user_mode: bool) -> Path:
    if user_mode:
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "systemd" / "user"
    return Path("/etc/systemd/system")


def cmd_install_units(args: argparse.Namespace) -> int:
    import grp
    import pwd

    settings = settings_from(args)
    run_as = (
        args.run_as
        or (os.environ.get("SUDO_USER") if os.geteuid() == 0 else None)
        or pwd.getpwuid(os.geteuid()).pw_name
    )
    try:
        account = pwd.getpwnam(run_as)
    except KeyError:
        raise CliError(f"no user {run_as!r} (--run-as)") from None
    group = grp.getgrgid(account.pw_gid).gr_name
    gpus = detect_gpus() if args.gpus is None else args.gpus
    if gpus < 0:
        raise CliError("--gpus must be 0 or more")
    units = render_units(
        jbctl=_jbctl_path(),
        home=settings.home,
        tickets=settings.tickets_path,
        user_mode=args.user,
        run_as=run_as,
        run_as_group=group,
        gpus=gpus,
    )
    if args.dry_run:
        for name, text in units.items():
            print(f"### {name}\n{text}")
        return 0
    out = args.output or _default_unit_dir(args.user)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
    except PermissionError:
        raise CliError(f"cannot write to {out}: run with sudo, or use --user or --output DIR") from None
    # ProtectSystem=strict makes everything but ReadWritePaths= read-only, so they must exist first.
    for folder in (settings.home, settings.tickets_path):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and account.pw_uid != 0:
            os.chown(folder, account.pw_uid, account.pw_gid)
    for name in units:
        print(f"wrote {out / name}")
    flag = " --user" if args.user else ""
    enable = "jetbox.target jetbox-daemon.service" + "".join(f" jetbox-worker@{n}.service" for n in range(gpus))
    if args.output is None:
        print(f"next: systemctl{flag} daemon-reload && systemctl{flag} enable --now {enable}")
    return 0
