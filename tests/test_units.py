"""systemd units: rendered by `jbctl install-units`, checked by `systemd-analyze verify`."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.jbdaemon import JBCTL

ANALYZE = shutil.which("systemd-analyze")
NAMES = ["jetbox-daemon.service", "jetbox-worker@.service", "jetbox.target"]


def _install(tmp_path: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home or tmp_path / "home"), JETBOX_TICKETS_DIR=str(tmp_path / "tickets"))
    return subprocess.run([JBCTL, "install-units", *args], env=env, capture_output=True, text=True, timeout=60)


def _render(tmp_path: Path, user: bool) -> Path:
    out = tmp_path / ("user" if user else "system")
    me = pwd.getpwuid(os.geteuid()).pw_name
    done = _install(tmp_path, "--output", str(out), "--gpus", "2", "--run-as", me, *(["--user"] if user else []))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    return out


def _verify(unit_dir: Path, user: bool, tmp_path: Path) -> None:
    """`systemd-analyze verify` each unit (a template through an instance); any output is a failure,
    because it exits 0 on unknown keys and other warnings."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    instance = unit_dir / "jetbox-worker@0.service"
    instance.symlink_to(unit_dir / "jetbox-worker@.service")
    env = dict(os.environ)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)  # a --user manager needs one, even for verify
    try:
        for name in ["jetbox-daemon.service", "jetbox-worker@0.service", "jetbox.target"]:
            cmd = [ANALYZE, *(["--user"] if user else []), "verify", str(unit_dir / name)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            output = (done.stdout + done.stderr).strip()
            if done.returncode != 0 and "Failed to initialize manager" in output:
                pytest.skip(f"systemd-analyze cannot run here: {output.splitlines()[-1]}")
            assert done.returncode == 0 and output == "", f"{name}:\n{output}"
    finally:
        instance.unlink()


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_verify_cleanly(tmp_path: Path, user: bool) -> None:
    _verify(_render(tmp_path, user), user, tmp_path)


def test_system_units_carry_this_installations_paths_and_hardening(tmp_path: Path) -> None:
    out = _render(tmp_path, user=False)
    daemon = (out / "jetbox-daemon.service").read_text()
    worker = (out / "jetbox-worker@.service").read_text()
    target = (out / "jetbox.target").read_text()
    assert "@" not in daemon.replace("jetbox-worker@", "")  # every placeholder filled
    assert f"ExecStart={JBCTL} daemon" in daemon
    assert f'Environment="JETBOX_HOME={tmp_path / "home"}"' in daemon
    assert f'Environment="JETBOX_TICKETS_DIR={tmp_path / "tickets"}"' in daemon
    rw = f"ReadWritePaths={tmp_path / 'home'} {tmp_path / 'tickets'}"
    for line in ["Type=notify", "WatchdogSec=30s", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", rw]:
        assert line in daemon.splitlines(), line
    assert f"ExecStart={JBCTL} worker --queue gpu" in worker
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker.splitlines()
    assert not any(line.startswith("PrivateDevices") for line in worker.splitlines())  # it hides GPUs
    assert "Wants=jetbox-worker@0.service jetbox-worker@1.service" in target.splitlines()
    assert "WantedBy=multi-user.target" in target.splitlines()
    assert (tmp_path / "home").is_dir() and (tmp_path / "tickets").is_dir()  # ReadWritePaths must exist


def test_user_units_drop_what_a_user_manager_cannot_do(tmp_path: Path) -> None:
    out = _render(tmp_path, user=True)
    daemon = (out / "jetbox-daemon.service").read_text()
    assert "Type=notify" in daemon and "NoNewPrivileges=yes" in daemon
    for key in ("User=", "ProtectSystem=", "ReadWritePaths=", "PrivateTmp="):
        assert not any(line.startswith(key) for line in daemon.splitlines()), key
    assert "WantedBy=default.target" in (out / "jetbox.target").read_text().splitlines()


def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "units"
    done = _install(tmp_path, "--dry-run", "--output", str(out), "--gpus", "0")
    assert done.returncode == 0, done.stderr
    assert not out.exists() and not (tmp_path / "home").exists()
    for name in NAMES:
        assert f"### {name}" in done.stdout
    assert "Wants=jetbox-worker@" not in done.stdout


def test_a_path_systemd_cannot_take_is_refused(tmp_path: Path) -> None:
    done = _install(tmp_path, "--dry-run", home=tmp_path / "my home")
    assert done.returncode == 1
    assert "without spaces" in done.stderr
