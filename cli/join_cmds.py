"""jbctl join-token: what a worker on another host needs, in one small file; `jbctl worker --join` reads it.

The join file is JSON (`JoinToken`): the Redis URL with its password, the HMAC key, the artifacts
URL, the queues, the heartbeat bounds the daemon judges by, the database URL when the event log
is on PostgreSQL, and, when Redis speaks TLS (`rediss://`) with a certificate from a private CA, that
CA's certificate, so the worker verifies the server it sends its reports to. It is a secret: written
0600, refused when others can read it, and read from a file or standard input, never from the command
line (where `ps` and shell history would keep it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cli.common import settings_from
from cli.main import CliError

Queue = Literal["gpu", "cpu"]
# What the object store's client reads (the standard AWS variables): the only environment a join file
# may set. Anything else (PYTHONPATH, LD_PRELOAD...) would let whoever writes a join file run code.
STORE_ENDPOINT = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)  # not AWS_CA_BUNDLE: a path here
STORE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class JoinToken(BaseModel):
    """Everything a worker on another host takes from the main host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jetbox_join: Literal[1] = 1  # the format's version
    redis_url: str
    secret: str = Field(min_length=32, pattern=r"^[0-9a-f]+$")
    queues: list[Queue] = Field(default_factory=lambda: list[Queue](["gpu", "cpu"]), min_length=1)
    artifacts_url: str | None = None
    database_url: str | None = None
    heartbeat_seconds: float = Field(default=2.0, gt=0)
    heartbeat_timeout_seconds: float = Field(default=20.0, gt=0)
    # The object store's endpoint and region (and, with --include-credentials, its keys).
    store_environment: dict[str, str] = Field(default_factory=dict)
    # With a rediss:// URL: the PEM certificate of the CA that signed the Redis server's certificate
    # (None: the worker's system trust store must know it).
    redis_ca: str | None = None

    @field_validator("store_environment")
    @classmethod
    def _store_env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in STORE_ENDPOINT + STORE_CREDENTIALS:
                allowed = ", ".join(STORE_ENDPOINT + STORE_CREDENTIALS)
                raise ValueError(f"{key!r} is not an object-store variable a join file may set ({allowed})")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"expected a redis:// or rediss:// URL another host can reach, got {redact(value)!r}")
        return value

    @field_validator("redis_ca")
    @classmethod
    def _ca(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return value
        if "-----BEGIN CERTIFICATE-----" not in value or "PRIVATE KEY" in value:
            raise ValueError("expected the PEM certificate of the CA that signed the Redis server's certificate")
        if urlsplit(str(info.data.get("redis_url", ""))).scheme != "rediss":
            raise ValueError("a Redis CA is for a TLS Redis: the redis_url must be rediss://")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("sqlite"):
            raise ValueError("a SQLite event log cannot be shared between hosts: use PostgreSQL")
        return value


def redact(url: str) -> str:
    """A URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "join-token",
        help="write the file a worker on another host joins with (`jbctl worker --join FILE`)",
        description="Write (or print) the join file for workers on other hosts: the Redis URL with its "
        "password, the HMAC key, the artifacts URL, the queues and, with PostgreSQL, the database URL. "
        "It is a secret: keep it 0600 and copy it over ssh.",
    )
    p.add_argument("--output", "-o", type=Path, help="write the file here, mode 0600 (default: print it)")
    p.add_argument("--queue", "-q", action="append", choices=["gpu", "cpu"], help="queues the worker works")
    p.add_argument(
        "--redis-url",
        help="the Redis URL as other hosts reach it (default: JETBOX_REDIS_URL, else `jbctl up --listen`'s)",
    )
    p.add_argument(
        "--include-credentials",
        action="store_true",
        help="put this host's object-store keys (AWS_ACCESS_KEY_ID, ...) in the file too (default: the "
        "endpoint and region only; the new host brings its own keys)",
    )
    p.set_defaults(func=cmd_join_token)


def _redis_for_others(settings: Any, explicit: str | None) -> str:
    if explicit:
        return explicit
    if settings.redis_url and urlsplit(settings.redis_url).scheme in ("redis", "rediss"):
        return str(settings.redis_url)
    try:
        return settings.private_redis_tcp_file.read_text().strip()
    except OSError:
        pass
    raise CliError(
        "no Redis that other hosts can reach: start `jbctl up --listen ADDRESS:PORT` (a private Redis on TCP "
        "with a password), or set JETBOX_REDIS_URL=redis://:PASSWORD@HOST:PORT/0, or pass --redis-url"
    )


CA_PARAM = "ssl_ca_certs"  # redis-py's option (in a URL's query) naming the CA file it verifies TLS with


def split_ca(redis_url: str) -> tuple[str, str | None]:
    """A Redis URL without its `ssl_ca_certs=PATH` (a path on this host), and that CA file's PEM text."""
    parts = urlsplit(redis_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    paths = [v for k, v in query if k == CA_PARAM]
    if not paths:
        return redis_url, None
    rest = urlencode([(k, v) for k, v in query if k != CA_PARAM])
    path = Path(paths[-1])
    try:
        pem = path.read_text(encoding="ascii")
    except (OSError, ValueError) as exc:
        raise CliError(f"Redis URL's {CA_PARAM}={path}: cannot read the CA certificate: {exc}") from None
    return urlunsplit(parts._replace(query=rest)), pem


def with_ca(redis_url: str, ca_file: Path) -> str:
    """The URL with `ssl_ca_certs=` naming `ca_file` (redis-py reads it from there, in every process)."""
    parts = urlsplit(redis_url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != CA_PARAM]
    query.append((CA_PARAM, str(ca_file)))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/", quote_via=quote)))


def build_token(settings: Any, redis_url: str, queues: list[str] | None, credentials: bool = False) -> JoinToken:
    from schema.wire import SecretError, load_secret

    redis_url, redis_ca = split_ca(redis_url)
    parts = urlsplit(redis_url)
    if is_loopback(parts.hostname):
        raise CliError(f"Redis at {redact(redis_url)} is a loopback address: other hosts cannot reach it")
    if not parts.password:
        raise CliError(
            f"Redis at {redact(redis_url)} has no password in its URL: a worker refuses an unauthenticated "
            "TCP Redis (set requirepass, or use `jbctl up --listen`, which does)"
        )
    try:
        secret = load_secret(settings.secret_path, create=False).decode()
    except SecretError as exc:
        raise CliError(str(exc)) from None
    shared = settings.database_url and not settings.database_url.startswith("sqlite")
    database = settings.database_url if shared else None
    artifacts = os.environ.get("JETBOX_ARTIFACTS_URL") or getattr(settings, "artifacts_url", None)
    names = STORE_ENDPOINT + (STORE_CREDENTIALS if credentials else ())
    store_env = {k: os.environ[k] for k in names if os.environ.get(k)} if artifacts else {}
    try:
        return JoinToken(
            redis_url=redis_url,
            secret=secret,
            queues=queues or ["gpu", "cpu"],  # type: ignore[arg-type]
            artifacts_url=str(artifacts) if artifacts else None,
            database_url=database,
            heartbeat_seconds=settings.heartbeat_seconds,
            heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds,
            store_environment=store_env,
            redis_ca=redis_ca,
        )
    except ValidationError as exc:
        raise CliError(f"cannot make a join file: {_problems(exc)}") from None


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cmd_join_token(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    token = build_token(settings, _redis_for_others(settings, args.redis_url), args.queue, args.include_credentials)
    text = token.model_dump_json(indent=2, exclude_none=True) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    write_private(args.output, text)
    host = urlsplit(token.redis_url).hostname
    print(f"wrote {args.output} (mode 600; it holds the Redis password and the HMAC key)")
    print(f"on the new host: scp this file there, then `jbctl worker --join {args.output.name}` (Redis at {host})")
    if not token.artifacts_url:
        print(
            "note: no JETBOX_ARTIFACTS_URL: the artifact store is this host's folder, which other hosts "
            "cannot read; set an object store (s3://...) before jobs run elsewhere",
            file=sys.stderr,
        )
    return 0


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())


def read_token(source: str, stdin: Any = None) -> JoinToken:
    """The join file at `source` (`-`: standard input), checked: private, JSON, every field valid."""
    if source == "-":
        text = (stdin or sys.stdin).read()
        where = "standard input"
    else:
        path = Path(source)
        if "://" in source:
            raise CliError(
                f"--join {source.split('://', 1)[0]}://...: give the join file's path (or - for standard input); "
                "a URL on the command line would show its secrets to `ps`"
            )
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"--join {path}: cannot read the join file: {exc.strerror or exc}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CliError(
                f"--join {path}: the join file is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"it holds the Redis password and the HMAC key: chmod 600 {path}"
            )
        where = str(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--join {where}: not a join file (JSON expected): {exc}") from None
    if not isinstance(data, dict) or "jetbox_join" not in data:
        raise CliError(f"--join {where}: not a join file (no jetbox_join field); make one with `jbctl join-token`")
    try:
        return JoinToken.model_validate(data)
    except ValidationError as exc:
        raise CliError(f"--join {where}: {_problems(exc)}") from None


def apply_token(token: JoinToken, settings: Any, own: dict[str, str] | None = None) -> dict[str, str]:
    """Install the HMAC key in this host's home (0600) and return the environment the worker (and the
    jobs it runs, which read settings again) takes from the join file. Object-store variables that
    this host's environment (`own`, default os.environ) already sets stay its own: per-host keys."""
    from schema.wire import SecretError, load_secret

    path = settings.secret_path
    if path.exists():
        try:
            held = load_secret(path, create=False).decode()
        except SecretError as exc:
            raise CliError(str(exc)) from None
        if held != token.secret:
            raise CliError(
                f"{path} holds a different HMAC key than the join file: this home belongs to another "
                "installation; use a fresh JETBOX_HOME (or remove the old key if it is no longer used)"
            )
    else:
        write_private(path, token.secret + "\n")
    redis_url = token.redis_url
    if token.redis_ca:  # a file of this host's, named in the URL: every process here verifies the server with it
        ca_file = settings.home / "redis-ca.pem"
        write_private(ca_file, token.redis_ca)
        redis_url = with_ca(redis_url, ca_file)
    env = {
        "JETBOX_REDIS_URL": redis_url,
        "JETBOX_HEARTBEAT_SECONDS": repr(token.heartbeat_seconds),
        "JETBOX_HEARTBEAT_TIMEOUT_SECONDS": repr(token.heartbeat_timeout_seconds),
    }
    if token.artifacts_url:
        env["JETBOX_ARTIFACTS_URL"] = token.artifacts_url
    if token.database_url:
        env["JETBOX_DATABASE_URL"] = token.database_url
    here = os.environ if own is None else own
    env.update({k: v for k, v in token.store_environment.items() if not here.get(k)})
    return env


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS reason a connection failed (a certificate that does not verify...), else None."""
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return None


def check_redis_auth(url: str, insecure: bool) -> None:
    """Refuse a TCP Redis on another host that anyone can use (no password, or one that lets a client
    in without it), unless `insecure`. A unix socket and a loopback address stay on this machine.
    A TLS Redis (rediss://) must also show a certificate that verifies (with the join file's CA, or
    this host's trust store), loopback or not, insecure or not: a wrong CA is refused here, in one line,
    rather than retried for ever by the worker's loop."""
    import redis

    parts = urlsplit(url)
    tls = parts.scheme == "rediss"
    need_password = parts.scheme != "unix" and not insecure and not is_loopback(parts.hostname)
    if not (tls or need_password):
        return
    fix = "give Redis a password (requirepass; `jbctl up --listen` does) and join with `jbctl join-token`'s file"
    if need_password and not parts.password:
        raise CliError(
            f"Redis at {redact(url)} is reached over TCP without a password: anyone who reaches that port could "
            f"queue jobs and read reports: {fix}, or pass --insecure on a network you trust"
        )
    ca = dict(parse_qsl(parts.query)).get(CA_PARAM)
    if tls and ca and not Path(ca).is_file():
        raise CliError(
            f"Redis at {redact(url)}: the CA certificate {ca} ({CA_PARAM} in the URL) is missing: "
            "join again with a join file from the main host (`jbctl join-token`)"
        )
    # Without the password: whether the server asks for one is the question.
    probe = redis.Redis.from_url(_without_password(url), socket_connect_timeout=5, socket_timeout=5)
    try:
        probe.ping()
    except redis.AuthenticationError:
        return  # it asks for the password: as it should
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "AUTH" in str(exc).upper():
            return
        raise CliError(f"Redis at {redact(url)}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        why = _tls_failure(exc) if tls else None
        if why is not None:
            trusted = f"the CA in {ca}" if ca else "this host's trust store (the join file carried no CA)"
            raise CliError(
                f"Redis at {redact(url)}: TLS refused: {why}. The server's certificate is not signed by "
                f"{trusted}, or does not name {parts.hostname}: get a fresh join file from the main host "
                "(`jbctl join-token`)"
            ) from None
        return  # not reachable now: the worker's loop waits for it and authenticates when it is
    finally:
        probe.close()
    if need_password:
        raise CliError(
            f"Redis at {redact(url)} lets clients in without a password (the URL's is not checked): {fix}, "
            "or pass --insecure on a network you trust"
        )
