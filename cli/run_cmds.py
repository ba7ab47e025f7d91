"""jbctl worker | up: run workers, or the whole embedded installation on one machine."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cli.common import settings_from
from cli.main import CliError

JBCTL = str(Path(sys.executable).parent / "jbctl")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run an RQ worker for Jetbox jobs")
    p.add_argument("--queue", "-q", action="append", choices=["gpu", "cpu"], help="queue to work (repeatable)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--name", help="worker name (default: host and pid)")
    p.add_argument("--ticket", help="work only this ticket's jobs, and exit once it has ended")
    p.add_argument("--warm", action="store_true", help="load the current core's models before the first job")
    res = p.add_argument_group(
        "placement",
        "what the worker has (docs/SCHEDULING.md): a worker advertises itself when any of these is given or a "
        "GPU is detected (nvidia-smi, torch), and then gets the jobs the daemon places on it",
    )
    res.add_argument("--gpus", type=int, help="cards it may use (default: detected)")
    res.add_argument("--gpu-memory", help="memory of each card, e.g. 24G (default: detected)")
    res.add_argument("--cpus", type=float, help="CPUs it offers (default: those it may run on)")
    res.add_argument("--memory", help="memory it offers, e.g. 32G (default: the machine's)")
    res.add_argument("--node", help="the machine's name in card ids <node>/<index> (default: host name)")
    adv = res.add_mutually_exclusive_group()
    adv.add_argument("--advertise", dest="advertise", action="store_true", default=None, help="even with no card")
    adv.add_argument("--no-advertise", dest="advertise", action="store_false", help="never (a plain queue worker)")
    p.add_argument(
        "--join",
        metavar="FILE",
        help="join another host's installation with the file `jbctl join-token` wrote there (- reads it from "
        "standard input): Redis URL and password, HMAC key, artifacts URL, queues",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="accept a TCP Redis on another host that asks for no password (a network you trust)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("run", help="submit a ticket with a worker of its own (systemd-run, or --detach)")
    p.add_argument("file", type=Path)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--background",
        action="store_true",
        help="a transient systemd unit with the ticket's memory, wall-time and network limits "
        "(the system manager as root, else systemd --user)",
    )
    mode.add_argument("--detach", action="store_true", help="a detached process logging under JETBOX_HOME/logs")
    p.add_argument("--gpu", default="0", help="CUDA_VISIBLE_DEVICES for the worker (default 0)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "up",
        help="private Redis + daemon + one worker per queue on this machine",
        description="Private Redis + daemon + one worker per queue on this machine. SIGINT (Ctrl-C) and SIGTERM "
        "both stop everything, even when started in the background of a script (which ignores SIGINT).",
    )
    p.add_argument("--tickets", type=Path, help="folder to watch (default: JETBOX_TICKETS_DIR or HOME/tickets)")
    p.add_argument("--exit-when-idle", action="store_true", help="stop once every ticket in the folder has ended")
    p.add_argument("--quiet", action="store_true", help="no live status lines")
    p.add_argument("--console-port", type=int, default=8470, help="the web console's port on 127.0.0.1 (0: none)")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="start no worker here: this host only coordinates, workers join from others (`jbctl join-token`)",
    )
    add_listen_arguments(
        p,
        "the private Redis also listens on this TCP address, with a password (HOME/redis.password), for "
        "workers on other hosts (`jbctl join-token`)",
    )
    p.set_defaults(func=cmd_up)


def add_listen_arguments(p: argparse.ArgumentParser, listen_help: str) -> None:
    """--listen and the --tls-* options that go with it (`jbctl up`, `jbctl install-units`); `_tls` reads them."""
    p.add_argument("--listen", metavar="ADDRESS:PORT", type=_address, help=listen_help)
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        type=Path,
        help="with --listen: that port speaks TLS only, with this PEM certificate (its subjectAltName must name "
        "the address workers use); needs --tls-key (a redis-server built with TLS: Debian's is)",
    )
    p.add_argument("--tls-key", metavar="FILE", type=Path, help="the certificate's PEM private key")
    p.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=Path,
        help="the CA that signed --tls-cert: join files carry it, so workers verify the server (default: the "
        "workers' own trust store)",
    )


def _tls(args: argparse.Namespace) -> Any:
    """`jbctl up`'s --tls-* options as the private Redis's TLS settings (None without them)."""
    from cli.embedded import RedisTls

    if not (args.tls_cert or args.tls_key or args.tls_ca):
        return None
    if not args.listen:
        raise CliError("--tls-cert/--tls-key/--tls-ca are for the TCP port: give --listen ADDRESS:PORT too")
    if not (args.tls_cert and args.tls_key):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    tls = RedisTls(args.tls_cert.absolute(), args.tls_key.absolute(), args.tls_ca.absolute() if args.tls_ca else None)
    try:
        tls.check()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return tls


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT (e.g. 10.0.0.5:6380), got {text!r}")
    return host, int(port)


def cmd_worker(args: argparse.Namespace) -> int:
    from cli.join_cmds import apply_token, check_redis_auth, read_token

    settings = settings_from(args)
    queues = args.queue
    if args.join:
        token = read_token(args.join)
        # The jobs this process runs read their settings again (workers/entry.py): hand them the file's.
        os.environ.update(apply_token(token, settings))
        settings = settings_from(args)
        queues = queues or list(token.queues)
        print(f"jetbox worker: joined {_redacted(token.redis_url)}, queues {', '.join(queues)}", file=sys.stderr)
    settings = settings.model_copy(update={"redis_url": settings.redis_url_or_private()})
    if not settings.redis_url:
        raise CliError("no Redis configured: set JETBOX_REDIS_URL (or run everything with `jbctl up`)")
    check_redis_auth(settings.redis_url, args.insecure)
    from schema.wire import SecretError, load_secret

    try:
        load_secret(settings.secret_path, create=True)
    except SecretError as exc:
        raise CliError(str(exc)) from None
    queues = queues or ["gpu", "cpu"]
    advert = _advert(args, queues) if args.ticket is None else None  # `jbctl run`'s worker: never placed
    import faulthandler
    import signal

    faulthandler.enable()  # a crash in native code (torch, ctypes) leaves its stack in the worker's log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    if args.ticket:
        from workers.worker import run_dedicated_worker

        return run_dedicated_worker(settings.redis_url, args.ticket, name=args.name)
    from workers.worker import run_worker

    if args.warm:
        _warm(settings, args.name or f"{socket.gethostname()}.{os.getpid()}", queues)
    return run_worker(settings.redis_url, queues, burst=args.burst, name=args.name, advert=advert)


def _advert(args: argparse.Namespace, queues: list[str]) -> Any:
    """What the worker advertises for placement (None: it does not take part), checked before it starts."""
    from workers.resources import ResourceError, build_advert

    name = args.name or f"{socket.gethostname().split('.')[0]}.{os.getpid()}"
    try:
        advert = build_advert(
            name,
            queues,
            node=args.node,
            gpus=args.gpus,
            gpu_memory=args.gpu_memory,
            cpus=args.cpus,
            memory=args.memory,
            advertise=args.advertise,
        )
    except ResourceError as exc:
        raise CliError(f"jbctl worker {exc}") from None
    if advert is not None:
        cards = ", ".join(f"{g['id']} {g['memory'] / (1 << 30):.3g}G" for g in advert.gpus) or "no GPU"
        print(
            f"jetbox worker {name}: advertising {cards}, {advert.cpus:g} CPUs, {advert.memory / (1 << 30):.3g}G "
            f"({'detected' if advert.detected else 'configured'}); placed jobs come on queue worker__{name}",
            file=sys.stderr,
            flush=True,
        )
    return advert


def _redacted(url: str) -> str:
    from cli.join_cmds import redact

    return redact(url)


def _warm(settings: Any, name: str, queues: list[str]) -> None:
    """Keep-alive: load the current core (as the dispatcher last published it) before the first job, then
    follow it: a promoted or rolled-back core is loaded in the background and switched to when ready."""
    from schema.artifact_store import ArtifactStore
    from workers.keepalive import CoreFollower

    follower = CoreFollower(settings.redis_url, name, ArtifactStore.from_settings(settings), queues)
    try:
        follower.step()
    except Exception as exc:  # Redis not there yet: the follower keeps trying
        print(f"jetbox worker: core not warmed yet ({exc})", file=sys.stderr)
    if follower.held is None:
        print("jetbox worker: no core to warm yet; following it", file=sys.stderr)
    follower.start()


def systemd_is_init() -> bool:
    """True when systemd is PID 1 (its runtime directory exists), as `sd_booted()` checks."""
    return Path("/run/systemd/system").is_dir()


def worker_env(settings: Any) -> dict[str, str]:
    """The settings a detached or transient worker needs, as environment variables."""
    env = {"JETBOX_HOME": str(settings.home)}
    if settings.redis_url:
        env["JETBOX_REDIS_URL"] = settings.redis_url
    if settings.database_url:
        env["JETBOX_DATABASE_URL"] = settings.database_url
    if settings.secret_file:
        env["JETBOX_SECRET_FILE"] = str(settings.secret_file)
    return env


def systemd_run_argv(ticket: Any, settings: Any, gpu: str, user: bool | None = None) -> list[str]:
    """`systemd-run` for a worker dedicated to `ticket`, with the ticket's limits as properties: the
    system manager for root, the user's manager otherwise."""
    user = os.geteuid() != 0 if user is None else user
    unit = f"jetbox-run-{ticket.id}"
    argv = ["systemd-run", *(["--user"] if user else []), f"--unit={unit}", "--collect"]
    argv += [f"--description=Jetbox worker for {ticket.id}"]
    if ticket.constraints.memory_bytes:
        argv += ["-p", f"MemoryMax={ticket.constraints.memory_bytes}"]
    if ticket.constraints.max_wall_minutes:
        argv += ["-p", f"RuntimeMaxSec={int(ticket.constraints.max_wall_minutes * 60)}"]
    if ticket.constraints.network == "deny" and not user:  # a user manager cannot attach the IP filter
        from cli.units import redis_choice

        allow = redis_choice(settings.redis_url, settings.home).allow if settings.redis_url else ()
        argv += ["-p", "IPAddressDeny=any", *(["-p", f"IPAddressAllow={' '.join(allow)}"] if allow else [])]
    env = {**worker_env(settings), "CUDA_VISIBLE_DEVICES": gpu}
    argv += [f"--setenv={k}={v}" for k, v in sorted(env.items())]
    return [*argv, JBCTL, "worker", "--ticket", ticket.id]


def _claim_queue(redis_url: str, tid: str) -> None:
    """Route the ticket's jobs to its own queue before it is submitted (the worker keeps the claim alive)."""
    import redis

    from schema.wire import dedicated_key, ended_key

    conn = redis.Redis.from_url(redis_url)
    try:
        conn.delete(ended_key(tid))
        conn.set(dedicated_key(tid), "1", ex=60)
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at {redis_url}: {exc}") from None
    finally:
        conn.close()


def _record_run(settings: Any, tid: str, info: dict[str, Any]) -> Path:
    import json

    path = settings.home / "runs" / f"{tid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from cli.tickets import load_or_report
    from schema.artifacts import atomic_write_bytes

    settings = settings_from(args)
    ticket = load_or_report(args.file)
    if ticket is None:
        return 1
    settings = settings.model_copy(update={"redis_url": settings.redis_url_or_private()})
    if not settings.redis_url:
        raise CliError("no Redis configured (JETBOX_REDIS_URL): a background worker needs the daemon's Redis")
    _claim_queue(settings.redis_url, ticket.id)
    if args.background:
        if not systemd_is_init():
            print(
                "jbctl run: systemd is not the init system here (a container or CI?); "
                "use --detach for a detached worker instead",
                file=sys.stderr,
            )
            return 2
        argv = systemd_run_argv(ticket, settings, args.gpu)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CliError(f"systemd-run failed: {proc.stderr.strip()}")
        unit = f"jetbox-run-{ticket.id}"
        _record_run(settings, ticket.id, {"mode": "systemd", "unit": unit, "argv": argv})
        atomic_write_bytes(settings.tickets_path / f"{ticket.id}.yaml", args.file.read_bytes())
        scope = " --user" if "--user" in argv else ""
        print(f"submitted {ticket.id}; worker unit {unit} (it exits when the ticket ends)")
        print(f"follow it: journalctl{scope} -u {unit} -f   (systemctl{scope} status {unit})")
        return 0
    logs = settings.logs_path
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"run-{ticket.id}.log"
    env = {**os.environ, **worker_env(settings), "CUDA_VISIBLE_DEVICES": args.gpu}
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [JBCTL, "worker", "--ticket", ticket.id],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _record_run(settings, ticket.id, {"mode": "detached", "pid": worker.pid, "log": str(log)})
    atomic_write_bytes(settings.tickets_path / f"{ticket.id}.yaml", args.file.read_bytes())
    print(f"submitted {ticket.id}; detached worker pid {worker.pid}")
    print(f"follow it: tail -f {log}")
    return 0


def _write_private(path: Path, text: str) -> None:
    from cli.join_cmds import write_private

    write_private(path, text)


def _redis_password(path: Path) -> str:
    """The private Redis's password: made once (0600), then kept, so join files stay valid across restarts."""
    import secrets
    import stat

    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CliError(f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 {path}")
    password = path.read_text().strip()
    if len(password) < 16 or not password.isprintable() or " " in password:
        raise CliError(f"{path}: the Redis password must be at least 16 printable characters without spaces")
    return password


class _Children:
    """Child processes started by `jbctl up`, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        out = log.open("ab")
        self.procs[name] = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _overview(store: Any, folder: Path) -> tuple[dict[str, int], bool]:
    """Ticket counts by state, and whether every ticket file in the folder has been seen and has ended."""
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        counts = dict(conn.execute(sa.text("SELECT state, count(*) FROM tickets GROUP BY state")).all())
        waiting = conn.execute(sa.text("SELECT count(*) FROM tickets WHERE state = 'running' AND awaiting IS NOT NULL"))
        awaiting = int(waiting.scalar() or 0)
    seen = {
        r.data.get("path") for r in store.read(0, types=["TicketSubmitted", "TicketRejected", "TicketRevisionRefused"])
    }
    files = {str(p) for p in folder.glob("*.y*ml") if not p.name.startswith(".")}
    # A ticket waiting for a human's approval is as far as it goes on its own.
    idle = files <= seen and counts.get("running", 0) == awaiting
    if awaiting:
        counts["awaiting approval"] = awaiting
        counts["running"] = counts.get("running", 0) - awaiting
    return {k: v for k, v in counts.items() if v}, idle


def cmd_up(args: argparse.Namespace) -> int:
    from cli.embedded import start_redis
    from schema import migrations
    from schema.store import EventStore
    from schema.wire import load_secret

    tls = _tls(args)  # before anything is made or any signal taken: a bad option changes nothing
    stopping = False

    def _stop(_signo: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    # First thing, and whatever was inherited: a shell starts `jbctl up &` with SIGINT ignored, and a
    # signal that comes while ignored is lost. A stop asked for during start-up starts no children.
    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    settings = settings_from(args)
    home = settings.home
    tickets = (args.tickets or settings.tickets_path).absolute()
    tickets.mkdir(parents=True, exist_ok=True)
    logs = settings.logs_path
    logs.mkdir(parents=True, exist_ok=True)
    load_secret(settings.secret_path, create=True)
    migrations.upgrade(settings.db_url)
    env = {**os.environ, "JETBOX_HOME": str(home), "JETBOX_TICKETS_DIR": str(tickets)}
    redis_server = None
    if args.listen and settings.redis_url:
        raise CliError("--listen starts the private Redis on TCP, but JETBOX_REDIS_URL names another Redis")
    if not settings.redis_url:
        password = _redis_password(settings.redis_password_path) if args.listen else None
        try:
            redis_server = start_redis(home / "run", listen=args.listen, password=password, tls=tls)
        except (RuntimeError, ValueError) as exc:
            raise CliError(f"cannot start the private Redis: {exc}") from None
        env["JETBOX_REDIS_URL"] = redis_server.url
        # For jbctl infer/run/worker on this host; 0600: with --listen the URL holds the password.
        _write_private(settings.private_redis_file, redis_server.url + "\n")
        where = redis_server.url.replace(f":{password}@", ":***@") if password else redis_server.url
        print(f"jetbox: private Redis at {where} (pid {redis_server.proc.pid})", flush=True)
        if redis_server.tcp_url:
            _write_private(settings.private_redis_tcp_file, redis_server.tcp_url + "\n")
            host, port = args.listen
            how = "TLS and a password" if tls else "a password"
            print(
                f"jetbox: Redis also on {host}:{port} with {how}; add a host with `jbctl join-token -o join.json`",
                flush=True,
            )
    children = _Children()
    code = 0
    try:
        if not stopping:
            children.start("daemon", [JBCTL, "daemon"], env, logs / "daemon.log")
            for q in () if args.no_workers else ("cpu", "gpu"):
                warm = ["--warm"] if q == "gpu" else []  # the inference worker keeps the core loaded, following it
                children.start(f"worker-{q}", [JBCTL, "worker", "--queue", q, *warm], env, logs / f"worker-{q}.log")
            if args.console_port:
                port = str(args.console_port)
                children.start("console", [JBCTL, "console", "--port", port], env, logs / "console.log")
                print(f"jetbox: console at http://127.0.0.1:{port}/", flush=True)
            print(f"jetbox: watching {tickets}; logs in {logs}; Ctrl-C stops everything", flush=True)
        store = EventStore(settings.db_url)
        last_line, idle_since = "", None
        while not stopping:
            time.sleep(0.5)
            dead = children.dead()
            if dead and dead[0][0] == "console":  # the web console is a convenience: the rest carries on
                print(f"jetbox: the console exited (status {dead[0][1]}); see {logs / 'console.log'}", file=sys.stderr)
                children.procs.pop("console")
                continue
            if dead:
                name, rc = dead[0]
                print(f"jetbox: {name} exited with status {rc}; see {logs / (name + '.log')}", file=sys.stderr)
                code = 1
                break
            counts, idle = _overview(store, tickets)
            line = "tickets: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "no tickets"
            if line != last_line and not args.quiet:
                print(f"jetbox: {line}", flush=True)
                last_line = line
            if args.exit_when_idle:
                idle_since = (idle_since or time.monotonic()) if idle else None
                if idle_since is not None and time.monotonic() - idle_since > 1.5:
                    print("jetbox: every ticket has ended; stopping", flush=True)
                    break
        store.close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        children.stop()
        if redis_server is not None:
            redis_server.stop()
            settings.private_redis_file.unlink(missing_ok=True)
            settings.private_redis_tcp_file.unlink(missing_ok=True)
    return code
