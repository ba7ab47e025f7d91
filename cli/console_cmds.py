"""jbctl console: serve the web console; `jbctl console token USER` creates a user's login token."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from cli.common import open_store, print_table, settings_from
from cli.main import CliError

DEFAULT_PORT = 8470


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "console",
        help="the web console (tickets live, proposals side by side, approve); `console token USER` for logins",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["serve", "token", "tokens", "revoke"],
        default="serve",
        help="serve (default); token USER: create (or replace) USER's token; tokens: list; revoke USER",
    )
    p.add_argument("user", nargs="?")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--socket", help="serve on this unix socket instead of TCP (for a reverse proxy)")
    p.add_argument("--root-path", default="", help="the path prefix a reverse proxy serves the console under")
    p.set_defaults(func=cmd_console)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_console(args: argparse.Namespace) -> int:
    from console import auth

    settings = settings_from(args)
    if args.action == "token":
        if not args.user:
            raise CliError("whose token? `jbctl console token USER`")
        try:
            token = auth.create_token(settings.home, args.user)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        print(f"console token for {args.user} (shown once; stored hashed in {auth.tokens_path(settings.home)}):")
        print(token)
        return 0
    if args.action == "tokens":
        tokens = auth.load_tokens(settings.home)
        print_table(["USER", "CREATED"], [[u, e.get("created", "")] for u, e in sorted(tokens.items())])
        return 0
    if args.action == "revoke":
        if not args.user or not auth.revoke_token(settings.home, args.user):
            raise CliError(f"no console token for {args.user!r}")
        print(f"revoked {args.user}'s console token (their sessions end when they expire)")
        return 0
    return serve(args, settings)


def serve(args: argparse.Namespace, settings: object) -> int:
    import uvicorn

    from console import auth
    from console.app import Config, create_app

    open_store(settings).close()  # type: ignore[arg-type]  # a clear error when there is no database yet
    home = settings.home  # type: ignore[attr-defined]
    local = args.socket is not None or is_local(args.host)
    if not local and not auth.load_tokens(home):
        raise CliError(
            f"refusing to serve on {args.host} without authentication: create a token first "
            "(`jbctl console token USER`); reading then needs a login too"
        )
    app = create_app(Config(settings, login_to_read=not local))  # type: ignore[arg-type]
    where = f"unix socket {args.socket}" if args.socket else f"http://{_url_host(args.host)}:{args.port}/"
    print(f"jetbox console: {where}", flush=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        uds=args.socket,
        root_path=args.root_path,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1" if not args.socket else "*",
        timeout_graceful_shutdown=2,
    )
    try:
        uvicorn.Server(config).run()
    except OSError as exc:
        raise CliError(f"cannot serve on {where}: {exc}") from None
    return 0 if sys.exc_info()[0] is None else 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
