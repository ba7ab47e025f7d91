"""Settings: environment (JETBOX_*), an optional jetbox.toml, and command-line overrides."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

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


class Settings(BaseSettings):
    """Every knob Jetbox reads. Precedence: init kwargs > environment > jetbox.toml > defaults."""

    model_config = SettingsConfigDict(env_prefix="JETBOX_", extra="forbid")

    home: Path = Field(default_factory=default_home)
    tickets_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    secret_file: Path | None = None
    # FULL survives power loss; NORMAL is faster in WAL mode but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL"
    rescan_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    heartbeat_timeout_seconds: float = 20.0
    approvers: list[str] = Field(default_factory=list)
    check_allowlist: list[str] = Field(default_factory=list)

    @field_validator("home", "tickets_dir", "secret_file", mode="after")
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
        return (init_settings, env_settings, _TomlSource(settings_cls))

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
    def secret_path(self) -> Path:
        return self.secret_file or self.home / "secret.key"

    @property
    def logs_path(self) -> Path:
        return self.home / "logs"

    @property
    def private_redis_file(self) -> Path:
        """Where `jbctl up` writes the URL of the private Redis it started."""
        return self.home / "run" / "redis.url"

    def redis_url_or_private(self) -> str | None:
        """The configured Redis, else the private one a running `jbctl up` started for this home."""
        if self.redis_url:
            return self.redis_url
        try:
            url = self.private_redis_file.read_text().strip()
        except OSError:
            return None
        return url if url.startswith("unix://") and Path(url.removeprefix("unix://")).exists() else None


def load_settings(**overrides: Any) -> Settings:
    """Settings with explicit overrides (e.g. `--home`) taking precedence; None values are ignored."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
