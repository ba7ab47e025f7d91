"""jbctl install-units | uninstall-units: the systemd unit set of an installation."""

from __future__ import annotations

import argparse
import glob
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cli.common import settings_from
from cli.main import CliError
from cli.run_cmds import add_listen_arguments

ROOT = Path(__file__).resolve().parent.parent
RENDERED_MARK = "# Rendered by `jbctl install-units"
DAEMON, REDIS, TARGET = "jetbox-daemon.service", "jetbox-redis.service", "jetbox.target"
GPU_WORKER, CPU_WORKER = "jetbox-worker@.service", "jetbox-cpu-worker@.service"
CONSOLE = "jetbox-console.service"
CONSOLE_PORT = 8470
ENV_FILE_NAME = "jetbox.env"
# Keys of the environment file that install-units owns; any other line there is the user's and kept.
MANAGED_KEYS = ("JETBOX_HOME", "JETBOX_TICKETS_DIR", "JETBOX_REDIS_URL")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-units", help="write the systemd units (daemon, workers, Redis, console, target)")
    _scope_args(p)
    p.add_argument(
        "--redis",
        default="private",
        metavar="private|system|URL",
        help="private: a Redis unit of its own on a unix socket (default); system: the distribution's "
        "redis-server.service on localhost:6379; or a redis:// URL to use as it is",
    )
    add_listen_arguments(
        p,
        "with --redis private: Redis also listens on this TCP address, with a password (HOME/redis.password), "
        "for workers on other hosts (`jbctl join-token`); the unit then has the network",
    )
    p.add_argument(
        "--workers",
        default=None,
        metavar="cpu=N,gpu=M",
        help="worker instances jetbox.target starts (default: cpu=1, gpu=one per /dev/nvidiaN, at least 1)",
    )
    p.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also render jetbox-console.service, the web console on 127.0.0.1 (default: yes)",
    )
    p.add_argument("--console-port", type=int, default=CONSOLE_PORT, help=f"its port (default {CONSOLE_PORT})")
    p.add_argument("--run-as", help="system units: the account the services run as (default: you, or SUDO_USER)")
    p.add_argument("--dry-run", action="store_true", help="print the units and the environment file; write nothing")
    p.add_argument("--now", action="store_true", help="then daemon-reload, enable and start jetbox.target")
    p.set_defaults(func=cmd_install_units)

    p = sub.add_parser("uninstall-units", help="stop jetbox.target and remove the units install-units wrote")
    _scope_args(p)
    p.set_defaults(func=cmd_uninstall_units)


def _scope_args(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--user", action="store_true", help="user units (systemctl --user)")
    scope.add_argument("--system", action="store_true", help="system units (the default)")
    p.add_argument("--output", type=Path, help="unit folder (default: /etc/systemd/system, or the user's)")


# --- what to render ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    cpu: int = 1
    gpu: int = 1


def parse_workers(text: str | None, detected_gpus: int) -> Workers:
    """`cpu=N,gpu=M`; what is not named keeps its default."""
    counts = {"cpu": 1, "gpu": max(1, detected_gpus)}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in counts:
            raise CliError(f"--workers {text!r}: expected cpu=N,gpu=M, got {part.strip()!r}")
        try:
            n = int(value)
        except ValueError:
            raise CliError(f"--workers {text!r}: {key} needs a whole number, got {value.strip()!r}") from None
        if not 0 <= n <= 64:
            raise CliError(f"--workers {text!r}: {key}={n} is outside 0..64")
        counts[key] = n
    if counts["cpu"] + counts["gpu"] == 0:
        raise CliError(f"--workers {text!r}: at least one worker is needed, or no step would ever run")
    return Workers(cpu=counts["cpu"], gpu=counts["gpu"])


@dataclass(frozen=True)
class RedisChoice:
    mode: str  # private | system | url
    url: str
    allow: tuple[str, ...]  # IPAddressAllow= for workers (TCP Redis only)


def redis_choice(value: str, home: Path) -> RedisChoice:
    if value == "private":
        return RedisChoice("private", f"unix://{home / 'run' / 'redis.sock'}", ())
    if value == "system":
        return RedisChoice("system", "redis://localhost:6379/0", ("localhost",))
    parts = urlsplit(value)
    if parts.scheme == "unix":
        return RedisChoice("url", value, ())
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise CliError(f"--redis {value!r}: expected private, system, or a redis://, rediss:// or unix:// URL")
    return RedisChoice("url", value, _addresses(parts.hostname))


def _addresses(host: str) -> tuple[str, ...]:
    """IPAddressAllow= takes addresses, not names: resolve now (the rendered unit says so)."""
    if host == "localhost":
        return ("localhost",)
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise CliError(f"--redis: cannot resolve {host!r} for the workers' IPAddressAllow=: {exc}") from None
    return tuple(sorted({str(info[4][0]) for info in infos}))


@dataclass(frozen=True)
class Listening:
    """The private Redis's TCP side (`install-units --listen`): its configuration file and the URLs."""

    conf: Path
    conf_text: str
    local_url: str  # the unix socket, with the password (Redis asks every client for it)
    tcp_url: str  # what other hosts use (`jbctl join-token` reads it)
    where: str


def _listening(args: argparse.Namespace, redis: RedisChoice, settings: Any) -> Listening | None:
    from cli.embedded import tcp_config, tcp_url, unix_url
    from cli.run_cmds import _redis_password, _tls

    tls = _tls(args)
    if args.listen is None:
        return None
    if redis.mode != "private":
        raise CliError("--listen is for the private Redis (--redis private); another Redis is configured on its own")
    password = _redis_password(settings.redis_password_path) if not args.dry_run else "<password>"
    conf = settings.home / "redis-tcp.conf"
    host, port = args.listen
    return Listening(
        conf=conf,
        conf_text="\n".join(tcp_config(args.listen, password, tls)) + "\n",
        local_url=unix_url(settings.home / "run" / "redis.sock", password),
        tcp_url=tcp_url(args.listen, password, tls),
        where=f"{'TLS' if tls else 'TCP'} {host}:{port} and a unix socket",
    )


def detect_gpus() -> int:
    """GPUs on this machine, by their device nodes (no CUDA initialisation, no nvidia-smi)."""
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


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


def render_units(
    *,
    jbctl: Path,
    home: Path,
    tickets: Path,
    user_mode: bool,
    run_as: str,
    run_as_group: str,
    workers: Workers,
    redis: RedisChoice,
    redis_server: str | None = None,
    console: bool = True,
    console_port: int = CONSOLE_PORT,
    redis_conf: Path | None = None,
    redis_where: str = "unix socket",
) -> dict[str, str]:
    """The unit files (name -> text) for this installation. `redis_conf`: the private Redis's TCP side
    (`--listen`), a 0600 configuration file (cli.embedded.tcp_config); `redis_where` says where it listens."""
    private = redis.mode == "private"
    flags = {
        "private_net": not user_mode and redis_conf is None,
        "system": not user_mode,
        "private_redis": private,
        "system_redis": redis.mode == "system",
        "ip_allow": not user_mode and bool(redis.allow),
    }
    instances = [f"jetbox-worker@{n}.service" for n in range(workers.gpu)]
    instances += [f"jetbox-cpu-worker@{n}.service" for n in range(workers.cpu)]
    values = {
        "@JBCTL@": _safe("jbctl", jbctl),
        "@JETBOX_HOME@": _safe("JETBOX_HOME", home),
        "@TICKETS_DIR@": _safe("tickets folder", tickets),
        "@ENV_FILE@": _safe("environment file", home / ENV_FILE_NAME),
        "@RUN_AS@": run_as,
        "@RUN_AS_GROUP@": run_as_group,
        "@DOCS_URL@": "file://" + _safe("docs", ROOT / "docs" / "OPERATIONS.md"),
        "@WANTED_BY@": "default.target" if user_mode else "multi-user.target",
        "@WANTS@": " ".join([DAEMON, *([REDIS] if private else []), *instances, *([CONSOLE] if console else [])]),
        "@CONSOLE_PORT@": str(console_port),
        "@REDIS_ALLOW@": " ".join(redis.allow),
    }
    names = [DAEMON, GPU_WORKER, CPU_WORKER, TARGET, *([CONSOLE] if console else [])]
    if private:
        binary = redis_server or _redis_server(tls=redis_where.startswith("TLS"))
        values["@REDIS_SERVER@"] = _safe("redis-server", binary)
        values["@REDIS_TCP@"] = _safe("Redis configuration", redis_conf) if redis_conf else "--port 0"
        values["@REDIS_WHERE@"] = redis_where
        names.append(REDIS)
    flag_line = re.compile(r"^@([a-z_]+)@")
    out: dict[str, str] = {}
    for name in names:
        lines: list[str] = []
        for line in (ROOT / "systemd" / name).read_text().splitlines():
            if line.startswith("##"):
                continue  # the template's own instructions
            m = flag_line.match(line)
            if m:
                if m.group(1) not in flags:
                    raise CliError(f"template {name}: unknown flag @{m.group(1)}@")
                if not flags[m.group(1)]:
                    continue
                line = line[m.end() :]
            for key, value in values.items():
                line = line.replace(key, value)
            lines.append(line)
        text = "\n".join(lines) + "\n"
        leftover = re.findall(r"@[A-Z_]+@", text)
        if leftover:
            raise CliError(f"template {name}: unknown placeholders {sorted(set(leftover))}")
        out[name] = f"{RENDERED_MARK}{' --user' if user_mode else ''}`.\n" + text
    return out


def _redis_server(tls: bool = False) -> str:
    from cli.embedded import redis_binary, tls_binary

    try:
        return tls_binary() if tls else redis_binary()
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def render_env(existing: str, values: dict[str, str]) -> str:
    """The environment file: the managed keys set to `values`, every other line kept as it was."""
    kept = [
        line
        for line in existing.splitlines()
        if line.split("=", 1)[0].strip() not in MANAGED_KEYS and not line.startswith("# Managed by jbctl")
    ]
    head = ["# Managed by jbctl install-units: " + ", ".join(MANAGED_KEYS) + " (other lines are yours and kept)."]
    head += [f"{k}={values[k]}" for k in MANAGED_KEYS if k in values]
    return "\n".join(head + kept).rstrip("\n") + "\n"


# --- writing them --------------------------------------------------------------------------------


def _unit_dir(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    if args.user:
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "systemd" / "user"
    return Path("/etc/systemd/system")


def _systemctl(args: argparse.Namespace, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["systemctl", *(["--user"] if args.user else []), *words]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise CliError("systemctl not found: is this a systemd machine?") from None
    if check and done.returncode != 0:
        raise CliError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done


def cmd_install_units(args: argparse.Namespace) -> int:
    import grp
    import pwd

    from schema.artifacts import atomic_write_bytes

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
    workers = parse_workers(args.workers, detect_gpus())
    if not 1 <= args.console_port <= 65535:
        raise CliError(f"--console-port {args.console_port}: expected 1..65535")
    redis = redis_choice(args.redis, settings.home)
    listening = _listening(args, redis, settings)
    if listening is not None:
        redis = RedisChoice(redis.mode, listening.local_url, redis.allow)
    units = render_units(
        jbctl=_jbctl_path(),
        home=settings.home,
        tickets=settings.tickets_path,
        user_mode=args.user,
        run_as=run_as,
        run_as_group=grp.getgrgid(account.pw_gid).gr_name,
        workers=workers,
        redis=redis,
        console=args.console,
        console_port=args.console_port,
        redis_conf=listening.conf if listening else None,
        redis_where=listening.where if listening else "unix socket",
    )
    env_path = settings.home / ENV_FILE_NAME
    existing = env_path.read_text() if env_path.exists() else ""
    env_text = render_env(
        existing,
        {
            "JETBOX_HOME": str(settings.home),
            "JETBOX_TICKETS_DIR": str(settings.tickets_path),
            "JETBOX_REDIS_URL": redis.url,
        },
    )
    if args.dry_run:
        for name, text in units.items():
            print(f"### {name}\n{text}")
        print(f"### {env_path}\n{env_text}")
        return 0
    out = _unit_dir(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            atomic_write_bytes(out / name, text.encode())
    except PermissionError:
        raise CliError(f"cannot write to {out}: run with sudo, or use --user or --output DIR") from None
    # ProtectSystem=strict makes everything but ReadWritePaths= read-only, so they must exist first.
    for folder in (settings.home, settings.home / "run", settings.tickets_path):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and account.pw_uid != 0:
            os.chown(folder, account.pw_uid, account.pw_gid)
    if listening is None:
        atomic_write_bytes(env_path, env_text.encode())
    else:  # the local URL holds the password: these files are the run-as account's alone
        from cli.join_cmds import write_private

        for path, text in (
            (env_path, env_text),
            (listening.conf, listening.conf_text),
            (settings.private_redis_tcp_file, listening.tcp_url + "\n"),  # for `jbctl join-token`
        ):
            write_private(path, text)
            if os.geteuid() == 0 and account.pw_uid != 0:
                os.chown(path, account.pw_uid, account.pw_gid)
        print(f"wrote {listening.conf} (mode 600: Redis's address and password); Redis on {listening.where}")
    for name in units:
        print(f"wrote {out / name}")
    print(f"wrote {env_path} (settings for every unit; add your own KEY=value lines there)")
    flag = " --user" if args.user else ""
    if args.now:
        _systemctl(args, "daemon-reload")
        # Units written elsewhere (--output) are started, not enabled: enabling writes outside that folder.
        _systemctl(args, *(["start"] if args.output else ["enable", "--now"]), TARGET)
        print(f"started {TARGET}: systemctl{flag} status 'jetbox*'")
    elif args.output is None:
        print(f"next: systemctl{flag} daemon-reload && systemctl{flag} enable --now {TARGET}")
    return 0


def cmd_uninstall_units(args: argparse.Namespace) -> int:
    out = _unit_dir(args)
    ours = sorted(
        p for p in out.glob("jetbox*") if p.is_file() and p.read_text(errors="replace").startswith(RENDERED_MARK)
    )
    if not ours:
        print(f"no units written by install-units in {out}")
        return 0
    if args.output is None and Path("/run/systemd/system").is_dir():
        _systemctl(args, "disable", "--now", TARGET, check=False)
        _systemctl(args, "stop", "jetbox-*", check=False)  # instances the target no longer names
    for path in ours:
        path.unlink()
        print(f"removed {path}")
    if args.output is None and Path("/run/systemd/system").is_dir():
        _systemctl(args, "daemon-reload", check=False)
    print("the state directory, its jetbox.env and the event log are left as they were")
    return 0
