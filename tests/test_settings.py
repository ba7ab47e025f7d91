"""Settings: defaults, environment, jetbox.toml, and --home, in that order of strength."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.main import main as jbctl
from schema.settings import load_settings


def test_defaults_follow_the_home(home: Path) -> None:
    s = load_settings()
    assert s.home == home and s.tickets_path == home / "tickets"
    assert s.db_url == f"sqlite:///{home / 'jetbox.db'}" and s.redis_url is None
    assert s.secret_path == home / "secret.key" and s.sqlite_synchronous == "FULL"


def test_toml_then_environment_then_overrides(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "jetbox.toml").write_text('[jetbox]\nredis_url = "redis://127.0.0.1:6390/1"\nrescan_seconds = 5\n'
                                      'approvers = ["alice"]\n')
    s = load_settings()
    assert s.redis_url == "redis://127.0.0.1:6390/1" and s.rescan_seconds == 5 and s.approvers == ["alice"]
    monkeypatch.setenv("JETBOX_RESCAN_SECONDS", "7")
    assert load_settings().rescan_seconds == 7
    other = tmp_path / "elsewhere"
    assert load_settings(home=other).home == other


def test_bad_settings_are_clear_errors(home: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (home / "jetbox.toml").write_text("redis_url = [unclosed\n")
    with pytest.raises(ValueError, match=r"jetbox\.toml: cannot read settings"):
        load_settings()
    (home / "jetbox.toml").write_text('sqlite_synchronous = "SOMETIMES"\n')
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        load_settings()
    (home / "jetbox.toml").write_text('colour = "blue"\n')
    with pytest.raises(ValueError, match="colour"):
        load_settings()
    (home / "jetbox.toml").write_text("snapshot_every = -5\n")
    with pytest.raises(ValueError, match="snapshot_every"):
        load_settings()
    (home / "jetbox.toml").unlink()
    monkeypatch.setenv("JETBOX_SNAPSHOT_EVERY", "often")
    with pytest.raises(ValueError, match="snapshot_every"):
        load_settings()
    monkeypatch.setenv("JETBOX_SNAPSHOT_EVERY", "0")  # only at a clean stop
    assert load_settings().snapshot_every == 0


def test_home_flag_wins(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-home"
    assert jbctl(["--home", str(other), "migrate"]) == 0
    assert (other / "jetbox.db").exists() and not (home / "jetbox.db").exists()


def test_cli_reports_bad_settings_without_a_traceback(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "jetbox.toml").write_text("heartbeat_seconds = -x\n")
    assert jbctl(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jbctl: bad settings:") and "jetbox.toml" in err and "Traceback" not in err


def test_the_units_environment_file_is_read_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("JETBOX_"):
            monkeypatch.delenv(key)
    (tmp_path / "jetbox.env").write_text(
        "# comment\nJETBOX_REDIS_URL='unix:///r.sock'\nJETBOX_APPROVERS=[\"ann\"]\n"
        "JETBOX_RESCAN_SECONDS=7\nPYTHONUNBUFFERED=1\n"
    )
    s = load_settings(home=tmp_path)
    assert (s.redis_url, s.approvers, s.rescan_seconds) == ("unix:///r.sock", ["ann"], 7.0)
    monkeypatch.setenv("JETBOX_RESCAN_SECONDS", "9")
    assert load_settings(home=tmp_path).rescan_seconds == 9.0  # the environment wins
    (tmp_path / "jetbox.env").write_text("JETBOX_REDIS_URL=x\nnot a setting\n")
    with pytest.raises(ValueError, match=r"jetbox.env:2: expected KEY=value"):
        load_settings(home=tmp_path)
