"""Settings: environment (JETBOX_*), an optional jetbox.toml, and command-line overrides."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_home() -> Path:
    """The state directory under the user's XDG state dir."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jetbox"


class _TomlSource(PydanticBaseSettingsSource):
    """Reads `jetbox.toml` from JETBOX_CONFIG, else from the home, else from the current directory."""

    def _path(self) -> Path | None:
        explicit = os.environ.get("JETBOX_CONFIG")
        if explicit:
            return Path(explicit)
        home = os.environ.get("JETBOX_HOME")
        for candidate in ([Path(home) / "jetbox.toml"] if home else []) + [Path("jetbox.toml")]:
            if candidate.is_file():
                return candidate
        return None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._path()
        if path is None:
            return {}
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read settings: {exc}") from exc
        # Either flat keys or a [jetbox] table.
        return dict(data.get("jetbox", data))


ENV_FILE_NAME = "jetbox.env"


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines as systemd's EnvironmentFile= reads them (comments, optional quotes); {} when absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read settings: {exc}") from exc
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{n}: expected KEY=value, got {raw.strip()!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


class _EnvFileSource(PydanticBaseSettingsSource):
    """`$JETBOX_HOME/jetbox.env`: the file the systemd units read, so `jbctl` sees what the services see."""

    def __init__(self, settings_cls: type[BaseSettings], home: Any) -> None:
        super().__init__(settings_cls)
        self.home = Path(home) if home else Path(os.environ.get("JETBOX_HOME") or default_home())

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in read_env_file(self.home.expanduser() / ENV_FILE_NAME).items():
            name = key.removeprefix("JETBOX_").lower()
            if not key.startswith("JETBOX_") or name == "home" or name not in self.settings_cls.model_fields:
                continue  # the home located this file; other variables are for the services' environment
            if value.startswith("["):
                try:
                    out[name] = json.loads(value)
                    continue
                except ValueError:
                    pass
            out[name] = value
        return out


class Settings(BaseSettings):
    """Every knob Jetbox reads. Precedence: init kwargs > environment > $JETBOX_HOME/jetbox.env > jetbox.toml >
    defaults."""

    model_config = SettingsConfigDict(env_prefix="JETBOX_", extra="forbid")

    home: Path = Field(default_factory=default_home)
    tickets_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    secret_file: Path | None = None
    # FULL survives power loss; NORMAL is faster in WAL mode but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL"
    rescan_seconds: float = 30.0
    # The daemon writes a snapshot of its state every this many events (and at a clean stop), so a
    # start after a crash replays at most this many; 0: only at a clean stop. docs/OPERATIONS.md.
    snapshot_every: int = Field(default=20_000, ge=0, le=100_000_000)
    heartbeat_seconds: float = 2.0
    heartbeat_timeout_seconds: float = 20.0
    approvers: list[str] = Field(default_factory=list)
    check_allowlist: list[str] = Field(default_factory=list)
    # `network: deny` jobs: auto = a kernel network namespace per job where the worker may create one
    # (root), else the in-process guard, said in the job's log; required = refuse such jobs on a worker
    # that cannot isolate; guard = the in-process guard only.
    network_isolation: Literal["auto", "required", "guard"] = "auto"
    # At most this many jobs out (scheduled or running) per queue, e.g. {gpu = 1}; a queue not named has
    # no limit. What waits is ordered by priority (docs/SCHEDULING.md).
    queue_limits: dict[str, Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=dict)
    # GPU memory the workers of a queue share, e.g. {gpu = "24G"}: one card per queue (two workers on one
    # card may then run two steps that both fit); steps declare `gpu_memory` (none: the whole card).
    queue_gpu_memory: dict[str, str] = Field(default_factory=dict)
    # Where artifacts (datasets, checkpoints, reports) live: unset = the folder JETBOX_HOME/artifacts;
    # `s3://bucket/prefix` = an S3-compatible object store shared by every host (endpoint and credentials
    # from the usual AWS_* variables), read through a local cache of at most `artifacts_cache_size`.
    artifacts_url: str | None = None
    artifacts_cache_dir: Path | None = None
    artifacts_cache_size: str = "20G"

    @field_validator("artifacts_url")
    @classmethod
    def _artifacts_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from schema.artifact_s3 import parse_url  # stdlib only until a request is made

        try:
            parse_url(value)
        except Exception as exc:  # ArtifactBackendError: said as a settings error
            raise ValueError(str(exc)) from None
        return value.strip()

    @field_validator("artifacts_cache_size")
    @classmethod
    def _cache_size(cls, value: str) -> str:
        from schema.sizes import parse_memory

        try:
            parse_memory(value)
        except ValueError as exc:
            raise ValueError(f"JETBOX_ARTIFACTS_CACHE_SIZE: {exc}") from None
        return value

    @field_validator("queue_gpu_memory")
    @classmethod
    def _gpu_memory(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:  # the usual case: no import of the ticket models (every `jbctl` command loads settings)
            return value
        from schema.sizes import parse_memory

        for queue, size in value.items():
            try:
                parse_memory(size)
            except ValueError as exc:
                raise ValueError(f"queue_gpu_memory.{queue}: {exc}") from None
        return value

    @field_validator("home", "tickets_dir", "secret_file", "artifacts_cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        home = getattr(init_settings, "init_kwargs", {}).get("home")
        return (init_settings, env_settings, _EnvFileSource(settings_cls, home), _TomlSource(settings_cls))

    @property
    def tickets_path(self) -> Path:
        return self.tickets_dir or self.home / "tickets"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'jetbox.db'}"

    @property
    def artifacts_path(self) -> Path:
        return self.home / "artifacts"

    @property
    def artifacts_cache_path(self) -> Path:
        """The worker-local read cache of an object-store backend."""
        return self.artifacts_cache_dir or self.home / "cache" / "artifacts"

    @property
    def artifacts_cache_limit(self) -> int:
        from schema.sizes import parse_memory

        return parse_memory(self.artifacts_cache_size)

    @property
    def secret_path(self) -> Path:
        return self.secret_file or self.home / "secret.key"

    @property
    def logs_path(self) -> Path:
        return self.home / "logs"

    @property
    def private_redis_file(self) -> Path:
        """Where `jbctl up` writes the URL of the private Redis it started."""
        return self.home / "run" / "redis.url"

    @property
    def private_redis_tcp_file(self) -> Path:
        """Where `jbctl up --listen` writes the TCP URL (with its password) that other hosts use."""
        return self.home / "run" / "redis.tcp.url"

    @property
    def redis_password_path(self) -> Path:
        """The private Redis's password (0600), made by the first `jbctl up --listen`."""
        return self.home / "redis.password"

    def redis_url_or_private(self) -> str | None:
        """The configured Redis, else the private one a running `jbctl up` started for this home."""
        if self.redis_url:
            return self.redis_url
        try:
            url = self.private_redis_file.read_text().strip()
        except OSError:
            return None
        path = urlsplit(url).path
        return url if url.startswith("unix://") and Path(path).exists() else None


def load_settings(**overrides: Any) -> Settings:
    """Settings with explicit overrides (e.g. `--home`) taking precedence; None values are ignored."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
