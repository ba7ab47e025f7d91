"""Who may change state through the console: per-user tokens, signed session cookies, CSRF tokens.

Tokens are created by `jbctl console token USER` and stored hashed (sha256) in
`$JETBOX_HOME/console/tokens.json`; the raw token is shown once. A token is exchanged at /login for a
session cookie signed with `$JETBOX_HOME/console/session.key` (HMAC-SHA256), so sessions survive a
restart and need no server-side table. Every form that changes state carries a CSRF token derived from
the session; scripts may instead send `Authorization: Bearer TOKEN` (no cookie, so no CSRF risk).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SESSION_COOKIE = "jetbox_session"
SESSION_SECONDS = 12 * 3600


def console_dir(home: Path) -> Path:
    return home / "console"


def tokens_path(home: Path) -> Path:
    return console_dir(home) / "tokens.json"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_tokens(home: Path) -> dict[str, dict[str, str]]:
    """user -> {"sha256": ..., "created": ...}; {} when none was created."""
    try:
        data = json.loads(tokens_path(home).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{tokens_path(home)}: cannot read console tokens: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{tokens_path(home)}: expected an object of users")
    return data


def create_token(home: Path, user: str) -> str:
    """A new token for `user` (replacing any older one); only its hash is stored."""
    if not user or any(c.isspace() for c in user):
        raise ValueError(f"bad user name {user!r}: one word, no spaces")
    token = "jbx_" + secrets.token_urlsafe(32)
    tokens = load_tokens(home)
    tokens[user] = {"sha256": _hash(token), "created": datetime.now(UTC).isoformat(timespec="seconds")}
    _write_private(tokens_path(home), json.dumps(tokens, indent=2, sort_keys=True).encode())
    return token


def revoke_token(home: Path, user: str) -> bool:
    tokens = load_tokens(home)
    if tokens.pop(user, None) is None:
        return False
    _write_private(tokens_path(home), json.dumps(tokens, indent=2, sort_keys=True).encode())
    return True


def user_for_token(home: Path, token: str) -> str | None:
    digest = _hash(token.strip())
    found = None
    for user, entry in load_tokens(home).items():
        # Compare every entry (constant time each) so timing says nothing about which matched.
        if hmac.compare_digest(digest, str(entry.get("sha256", ""))):
            found = user
    return found


def session_key(home: Path) -> bytes:
    path = console_dir(home) / "session.key"
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    _write_private(path, key)
    return key


@dataclass(frozen=True)
class Session:
    user: str
    nonce: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())


def make_session(key: bytes, user: str, now: float | None = None) -> str:
    """The cookie value for a new session of `user`."""
    expires = int((now or time.time()) + SESSION_SECONDS)
    body = _b64(json.dumps({"u": user, "n": secrets.token_urlsafe(16), "e": expires}).encode())
    return f"{body}.{_sign(key, body)}"


def read_session(key: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session a cookie carries, or None when absent, forged or expired."""
    if not cookie or "." not in cookie:
        return None
    body, sig = cookie.rsplit(".", 1)
    if not hmac.compare_digest(sig, _sign(key, body)):
        return None
    try:
        data = json.loads(_unb64(body))
        session = Session(str(data["u"]), str(data["n"]), int(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires > (now or time.time()) else None


def csrf_token(key: bytes, session: Session) -> str:
    return _sign(key, "csrf:" + session.nonce)


def csrf_ok(key: bytes, session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(str(token), csrf_token(key, session))
