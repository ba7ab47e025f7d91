"""What crosses Redis: signed job envelopes (daemon → worker) and signed reports (worker → daemon).

Both are JSON (never pickle) and carry an HMAC-SHA256 over their canonical JSON, keyed by a secret
that only the daemon and the workers hold. Redis is a transport: whoever can write to it can
neither run code on a worker nor forge a result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_STREAM = "jetbox:reports"
REPORT_GROUP = "jetbox-daemon"
ENTRY_POINT = "workers.entry.run_job"
QUEUES = ("gpu", "cpu")


class SecretError(Exception):
    """The key file is missing, unreadable or too open."""


def load_secret(path: Path, create: bool = True) -> bytes:
    """The HMAC key; created 0600 on first use. A key readable by others is refused."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise SecretError(f"no secret key at {path}: start the daemon once, or set JETBOX_SECRET_FILE")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"secret key {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); fix: chmod 600 {path}"
        )
    if info.st_uid != os.getuid():
        raise SecretError(f"secret key {path} is owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    key = path.read_text().strip()
    if len(key) < 32:
        raise SecretError(f"secret key {path} is too short (need at least 32 hex characters)")
    return key.encode()


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(key: bytes, raw: bytes) -> str:
    return hmac.new(key, raw, hashlib.sha256).hexdigest()


def sign(body: Any, key: bytes) -> str:
    return _mac(key, _canonical(body))


def verify(body: Any, signature: str, key: bytes) -> bool:
    return hmac.compare_digest(sign(body, key), signature or "")


def report_text(data: dict[str, Any]) -> str:
    """A report's data as the canonical JSON its signature covers: encoded directly when it is plain
    JSON already (every report a job sends: about 40 us less than through the model), else through
    `Report` as before (a body holding a path, a date or a float that is not finite: the model's JSON
    form of those, as it always was)."""
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return _canonical(Report.model_validate(data).model_dump(mode="json")).decode()


def signed_fields(field: str, text: str, key: bytes) -> dict[str, str]:
    """The fields of one stream message: `text` (canonical JSON) under `field`, and its signature. A
    report, bundle or advert is sent as exactly the text its signature covers, so the JSON is encoded
    once and the reader checks the signature on the bytes it received (`verify_text`)."""
    return {field: text, "sig": _mac(key, text.encode())}


def bundle_text(texts: list[str]) -> str:
    """Reports' canonical texts (`report_text`) as one canonical JSON list: what a bundle's signature
    covers (docs/DISPATCH.md, "Bundled reports")."""
    return "[" + ",".join(texts) + "]"


def verify_text(raw: bytes, signature: str, key: bytes) -> bool:
    """Whether `raw` is itself the signed canonical JSON (what `signed_fields` sends). False says nothing
    about a message encoded otherwise (an older worker's `json.dumps` with spaces): `verify` it."""
    return hmac.compare_digest(_mac(key, raw), signature or "")


def job_id(ticket: str, task: str, attempt: int) -> str:
    """The RQ job id of an attempt: the same attempt always maps to the same job (idempotent dispatch)."""
    # RQ allows letters, digits, - and _ only; ids never contain "__" next to each other.
    return f"jetbox__{ticket}__{task}__{attempt}"


class Envelope(BaseModel):
    """Everything a worker needs to run one attempt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    ticket: str
    task: str
    attempt: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    resume_checkpoint: str | None = None
    timeout: float = 3600.0
    network: Literal["deny", "allow"] = "deny"
    device: str = "auto"

    @property
    def job_id(self) -> str:
        return job_id(self.ticket, self.task, self.attempt)

    def signed(self, key: bytes) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        return {"body": body, "sig": sign(body, key)}


ReportKind = Literal["started", "progress", "checkpoint", "artifact", "succeeded", "failed", "violation"]


class Report(BaseModel):
    """One message from a running job; `seq` orders a single attempt's reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ReportKind
    ticket: str
    task: str
    attempt: int = Field(ge=1)
    seq: int = Field(ge=1)
    worker: str
    body: dict[str, Any] = Field(default_factory=dict)

    def signed(self, key: bytes) -> dict[str, str]:
        """Fields for XADD: the report as the canonical JSON its signature covers, and the signature."""
        return signed_fields("report", _canonical(self.model_dump(mode="json")).decode(), key)


WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Advert(BaseModel):
    """A worker's word about itself, on the report stream beside job reports (field `advert`):
    `advertised` with what it has (when it starts, and again whenever its liveness key had to be set
    anew: a Redis that restarted empty), `departed` as it stops. Signed like a report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["advertised", "departed"]
    worker: str = Field(pattern=f"^{WORKER_NAME.pattern}$")
    node: str = Field(pattern=f"^{WORKER_NAME.pattern}$")
    queues: list[str] = Field(default_factory=list, max_length=16)
    gpus: list[dict[str, Any]] = Field(default_factory=list, max_length=64)  # {id, index, memory} (GpuCard)
    cpus: float = Field(default=0.0, ge=0, le=4096)
    memory: int = Field(default=0, ge=0)
    detected: bool = False

    def signed(self, key: bytes) -> dict[str, str]:
        return signed_fields("advert", _canonical(self.model_dump(mode="json")).decode(), key)


def worker_queue(worker: str) -> str:
    """The queue of jobs the decider placed on `worker` (AttemptScheduled.worker)."""
    return f"worker__{worker}"


def worker_key(worker: str) -> str:
    """Set with a TTL while `worker` lives (refreshed every heartbeat); its expiry is the worker's loss."""
    return f"jetbox:worker:{worker}"


def heartbeat_key(jid: str) -> str:
    return f"jetbox:hb:{jid}"


def cancel_key(jid: str) -> str:
    return f"jetbox:cancel:{jid}"


def dedicated_key(ticket: str) -> str:
    """Set (with a TTL) while a worker dedicated to `ticket` runs: its jobs go to that worker's queue."""
    return f"jetbox:dedicated:{ticket}"


def ended_key(ticket: str) -> str:
    """Set once `ticket` has ended, so its dedicated worker can exit."""
    return f"jetbox:ended:{ticket}"


def dedicated_queue(ticket: str) -> str:
    return f"ticket__{ticket}"


# Set, with a TTL its daemon keeps renewing, while a daemon that reads bundled reports runs: a job's
# reports may then go out as one stream message (field `bundle`: a JSON list of reports, one
# signature) instead of one message each. A daemon of an earlier release would take a bundle for a
# forged report, so workers bundle only while they see this key (docs/DISPATCH.md, "Bundled reports").
BUNDLES_KEY = "jetbox:caps:bundles"
BUNDLES_TTL_S = 30


CORE_KEY = "jetbox:core"  # the current core ({version, components}), for workers that warm it up
WARM_PREFIX = "jetbox:warm:"  # + worker name: the core version a warm worker holds (JSON, with a TTL)


def warm_key(worker: str) -> str:
    return WARM_PREFIX + worker


def warm_workers(conn: Any) -> list[dict[str, Any]]:
    """What each warm worker last reported under `warm_key` (one that stopped reporting has expired)."""
    out = []
    for key in sorted(conn.scan_iter(match=WARM_PREFIX + "*", count=200)):
        raw = conn.get(key)
        if raw:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out
