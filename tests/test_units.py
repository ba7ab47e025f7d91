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
NAMES = [
    "jetbox-daemon.service",
    "jetbox-worker@.service",
    "jetbox-cpu-worker@.service",
    "jetbox.target",
    "jetbox-redis.service",
    "jetbox-console.service",
]


def _install(tmp_path: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(home or tmp_path / "home"), JETBOX_TICKETS_DIR=str(tmp_path / "tickets"))
    return subprocess.run([JBCTL, "install-units", *args], env=env, capture_output=True, text=True, timeout=60)


def _render(tmp_path: Path, user: bool) -> Path:
    out = tmp_path / ("user" if user else "system")
    me = pwd.getpwuid(os.geteuid()).pw_name
    args = ["--output", str(out), "--workers", "gpu=2,cpu=1", "--run-as", me, *(["--user"] if user else [])]
    done = _install(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    return out


def _verify(unit_dir: Path, user: bool, tmp_path: Path) -> None:
    """`systemd-analyze verify` each unit (a template through an instance); any output is a failure,
    because it exits 0 on unknown keys and other warnings."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    instances = [unit_dir / "jetbox-worker@0.service", unit_dir / "jetbox-cpu-worker@0.service"]
    for instance in instances:
        instance.symlink_to(unit_dir / instance.name.replace("@0", "@"))
    env = dict(os.environ)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)  # a --user manager needs one, even for verify
    try:
        names = ["jetbox-daemon.service", "jetbox-redis.service", "jetbox-console.service", "jetbox.target"]
        for name in [*names, *(i.name for i in instances)]:
            cmd = [ANALYZE, *(["--user"] if user else []), "verify", str(unit_dir / name)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            output = (done.stdout + done.stderr).strip()
            if done.returncode != 0 and "Failed to initialize manager" in output:
                pytest.skip(f"systemd-analyze cannot run here: {output.splitlines()[-1]}")
            assert done.returncode == 0 and output == "", f"{name}:\n{output}"
    finally:
        for instance in instances:
            instance.unlink()


@pytest.mark.integration
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_verify_cleanly(tmp_path: Path, user: bool) -> None:
    _verify(_render(tmp_path, user), user, tmp_path)


@pytest.mark.integration
def test_system_units_carry_this_installations_paths_and_hardening(tmp_path: Path) -> None:
    out = _render(tmp_path, user=False)
    daemon = (out / "jetbox-daemon.service").read_text()
    worker = (out / "jetbox-worker@.service").read_text()
    cpu = (out / "jetbox-cpu-worker@.service").read_text()
    redis = (out / "jetbox-redis.service").read_text()
    target = (out / "jetbox.target").read_text()
    home = tmp_path / "home"
    assert "@" not in daemon.replace("jetbox-worker@", "")  # every placeholder filled
    assert f"ExecStart={JBCTL} daemon" in daemon
    assert f"EnvironmentFile={home / 'jetbox.env'}" in daemon.splitlines()
    rw = f"ReadWritePaths={home} {tmp_path / 'tickets'}"
    for line in ["Type=notify", "WatchdogSec=30s", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", rw, "Wants=jetbox-redis.service"]:
        assert line in daemon.splitlines(), line
    assert f"ExecStart={JBCTL} worker --queue gpu --warm" in worker
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker.splitlines()
    assert f"ExecStart={JBCTL} worker --queue cpu" in cpu
    for unit in (worker, cpu):
        assert "IPAddressDeny=any" in unit.splitlines()  # jobs reach Redis over its unix socket only
        assert not any(line.startswith("IPAddressAllow") for line in unit.splitlines())
    assert not any(line.startswith("PrivateDevices") for line in worker.splitlines())  # it hides GPUs
    assert f"--unixsocket {home}/run/redis.sock" in redis and "--save \"\"" in redis
    wants = "Wants=jetbox-daemon.service jetbox-redis.service jetbox-worker@0.service jetbox-worker@1.service "
    assert wants + "jetbox-cpu-worker@0.service jetbox-console.service" in target.splitlines()
    assert "WantedBy=multi-user.target" in target.splitlines()
    assert home.is_dir() and (tmp_path / "tickets").is_dir()  # ReadWritePaths must exist
    env = (home / "jetbox.env").read_text().splitlines()
    assert f"JETBOX_REDIS_URL=unix://{home}/run/redis.sock" in env
    assert f"JETBOX_TICKETS_DIR={tmp_path / 'tickets'}" in env


@pytest.mark.integration
def test_redis_choices_render_their_dependencies_and_network_policy(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    out = tmp_path / "sys"
    assert _install(tmp_path, "--output", str(out), "--redis", "system", "--run-as", me).returncode == 0
    daemon = (out / "jetbox-daemon.service").read_text().splitlines()
    assert "Wants=redis-server.service" in daemon and "After=redis-server.service" in daemon
    assert not (out / "jetbox-redis.service").exists()
    assert "IPAddressAllow=localhost" in (out / "jetbox-cpu-worker@.service").read_text().splitlines()
    assert "JETBOX_REDIS_URL=redis://localhost:6379/0" in (tmp_path / "home" / "jetbox.env").read_text()
    out = tmp_path / "url"
    url = "redis://:secret@10.11.12.13:6380/2"
    assert _install(tmp_path, "--output", str(out), "--redis", url, "--run-as", me).returncode == 0
    assert "IPAddressAllow=10.11.12.13" in (out / "jetbox-worker@.service").read_text().splitlines()
    assert not any("redis" in line for line in (out / "jetbox-daemon.service").read_text().splitlines()
                   if line.startswith(("Wants=", "After=")))
    assert f"JETBOX_REDIS_URL={url}" in (tmp_path / "home" / "jetbox.env").read_text()


@pytest.mark.integration
def test_the_environment_file_keeps_the_users_lines(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "jetbox.env").write_text("JETBOX_REDIS_URL=redis://old:1/0\nJETBOX_APPROVERS=[\"ann\"]\n# mine\n")
    assert _install(tmp_path, "--output", str(tmp_path / "u")).returncode == 0
    env = (home / "jetbox.env").read_text().splitlines()
    assert 'JETBOX_APPROVERS=["ann"]' in env and "# mine" in env
    assert [line for line in env if line.startswith("JETBOX_REDIS_URL=")] == [
        f"JETBOX_REDIS_URL=unix://{home}/run/redis.sock"
    ]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "gpu=two"], "gpu needs a whole number"),
        (["--workers", "tpu=1"], "expected cpu=N,gpu=M"),
        (["--workers", "cpu=0,gpu=0"], "at least one worker"),
        (["--workers", "cpu=999"], "outside 0..64"),
        (["--redis", "http://x"], "expected private, system, or a redis://"),
        (["--run-as", "no-such-user-here"], "no user 'no-such-user-here'"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(tmp_path: Path, args: list[str], message: str) -> None:
    done = _install(tmp_path, "--dry-run", *args)
    assert done.returncode == 1 and message in done.stderr, done.stderr


@pytest.mark.integration
def test_uninstall_removes_only_what_install_wrote(tmp_path: Path) -> None:
    out = _render(tmp_path, user=False)
    (out / "jetbox-mine.service").write_text("[Service]\nExecStart=/bin/true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    env.update(JETBOX_HOME=str(tmp_path / "home"))
    done = subprocess.run([JBCTL, "uninstall-units", "--output", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["jetbox-mine.service"]
    assert (tmp_path / "home" / "jetbox.env").exists()  # settings and state stay


@pytest.mark.integration  # starts jbctl processes
def test_user_units_drop_what_a_user_manager_cannot_do(tmp_path: Path) -> None:
    out = _render(tmp_path, user=True)
    daemon = (out / "jetbox-daemon.service").read_text()
    assert "Type=notify" in daemon and "NoNewPrivileges=yes" in daemon
    for key in ("User=", "ProtectSystem=", "ReadWritePaths=", "PrivateTmp="):
        assert not any(line.startswith(key) for line in daemon.splitlines()), key
    assert "WantedBy=default.target" in (out / "jetbox.target").read_text().splitlines()


@pytest.mark.integration
def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "units"
    done = _install(tmp_path, "--dry-run", "--output", str(out), "--workers", "gpu=0")
    assert done.returncode == 0, done.stderr
    assert not out.exists() and not (tmp_path / "home").exists()
    for name in NAMES:
        assert f"### {name}" in done.stdout
    wants = "Wants=jetbox-daemon.service jetbox-redis.service jetbox-cpu-worker@0.service jetbox-console.service"
    assert wants in done.stdout.splitlines()
    assert "### " + str(tmp_path / "home" / "jetbox.env") in done.stdout


@pytest.mark.integration
def test_a_path_systemd_cannot_take_is_refused(tmp_path: Path) -> None:
    done = _install(tmp_path, "--dry-run", home=tmp_path / "my home")
    assert done.returncode == 1
    assert "without spaces" in done.stderr


@pytest.mark.integration  # starts jbctl processes
def test_console_unit_is_optional_and_binds_localhost(tmp_path: Path) -> None:
    out = _render(tmp_path, user=False)
    console = (out / "jetbox-console.service").read_text().splitlines()
    assert f"ExecStart={JBCTL} console --host 127.0.0.1 --port 8470" in console
    assert f"ReadWritePaths={tmp_path / 'home'} {tmp_path / 'tickets'}" in console
    assert "PartOf=jetbox.target" in console and "After=jetbox-daemon.service" in console
    bare = tmp_path / "bare"
    me = pwd.getpwuid(os.geteuid()).pw_name
    done = _install(tmp_path, "--output", str(bare), "--run-as", me, "--no-console")
    assert done.returncode == 0, done.stderr
    assert not (bare / "jetbox-console.service").exists()
    assert "jetbox-console.service" not in (bare / "jetbox.target").read_text()
    done = _install(tmp_path, "--dry-run", "--console-port", "9001")
    assert "--port 9001" in done.stdout and "http://127.0.0.1:9001/" in done.stdout


@pytest.mark.integration
def test_the_private_redis_listens_on_tcp_with_a_password_kept_off_its_command_line(tmp_path: Path) -> None:
    """`install-units --listen` (for workers on other hosts): the Redis unit reads a 0600 configuration
    file with the address and the password, has the network, and the local URL carries the password;
    with --tls-* the port is TLS only. The units still verify."""
    from tests.tls_certs import make_tls

    me = pwd.getpwuid(os.geteuid()).pw_name
    home = tmp_path / "home"
    out = tmp_path / "tcp"
    done = _install(tmp_path, "--output", str(out), "--listen", "10.11.12.13:6380", "--run-as", me)
    assert done.returncode == 0, done.stderr
    password = (home / "redis.password").read_text().strip()
    conf = home / "redis-tcp.conf"
    assert conf.read_text().splitlines() == ["port 6380", "bind 10.11.12.13", f"requirepass {password}"]
    redis = (out / "jetbox-redis.service").read_text()
    assert f"{conf} --unixsocket {home}/run/redis.sock" in redis and password not in redis
    assert "PrivateNetwork=yes" not in redis.splitlines()  # it must reach the network now
    env = (home / "jetbox.env").read_text().splitlines()
    assert f"JETBOX_REDIS_URL=unix://:{password}@{home}/run/redis.sock" in env
    assert (home / "run" / "redis.tcp.url").read_text().strip() == f"redis://:{password}@10.11.12.13:6380/0"
    for secret in (conf, home / "jetbox.env", home / "run" / "redis.tcp.url", home / "redis.password"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    if ANALYZE is not None:  # the changed unit only (the others are as in test_rendered_units_verify_cleanly)
        check = subprocess.run([ANALYZE, "verify", str(out / "jetbox-redis.service")], capture_output=True, text=True)
        assert check.returncode == 0 and (check.stdout + check.stderr).strip() == "", check.stderr

    tls = make_tls(tmp_path / "tls", "10.11.12.13")
    out = tmp_path / "tls-units"
    args = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
    done = _install(tmp_path, "--output", str(out), "--listen", "10.11.12.13:6380", "--run-as", me, *args)
    assert done.returncode == 0, done.stderr
    lines = conf.read_text().splitlines()
    assert "port 0" in lines and "tls-port 6380" in lines and f'tls-cert-file "{tls.cert}"' in lines
    assert (home / "redis.password").read_text().strip() == password  # kept: join files stay valid
    assert (home / "run" / "redis.tcp.url").read_text().startswith(f"rediss://:{password}@10.11.12.13:6380/0?")
    redis = (out / "jetbox-redis.service").read_text()
    assert "Description=Jetbox private Redis (TLS 10.11.12.13:6380 and a unix socket, no persistence)" in redis
    bad = _install(tmp_path, "--output", str(out), "--redis", "system", "--listen", "10.11.12.13:6380")
    assert bad.returncode != 0 and "--listen is for the private Redis" in bad.stderr
