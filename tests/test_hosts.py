"""Joining hosts without processes: the join file, the TCP Redis refusal, SQLite on a network mount."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from cli.join_cmds import JoinToken, apply_token, build_token, check_redis_auth, read_token, redact
from cli.main import CliError, main
from schema.netfs import NetworkFilesystemError, mount_of, network_filesystem, refuse_network_sqlite
from schema.settings import Settings
from schema.wire import load_secret

KEY = "ab" * 32
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"  # its shape only: checked by TLS itself
GOOD = {"jetbox_join": 1, "redis_url": "redis://:pw@10.0.0.5:6380/0", "secret": KEY, "queues": ["gpu"]}

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
nas:/export/lab /mnt/lab nfs4 rw,vers=4.2 0 0
//files/share /mnt/smb cifs rw 0 0
user@box:/data /mnt/my\\040box fuse.sshfs rw 0 0
/dev/sdb1 /mnt/lab/local ext4 rw 0 0
"""


def _mounts(tmp_path: Path) -> Path:
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return path


def _private(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    path.chmod(0o600)
    return path


def test_network_file_systems_are_told_from_local_ones(tmp_path: Path) -> None:
    mounts = _mounts(tmp_path)
    assert network_filesystem(Path("/mnt/lab/home/jetbox.db"), mounts) == "nfs4 at /mnt/lab"
    assert network_filesystem(Path("/mnt/smb/x/jetbox.db"), mounts) == "cifs at /mnt/smb"
    assert network_filesystem(Path("/mnt/my box/jetbox.db"), mounts) == "fuse.sshfs at /mnt/my box"  # \040 is a space
    assert network_filesystem(Path("/mnt/lab/local/jetbox.db"), mounts) is None  # a local disk mounted inside it
    assert network_filesystem(Path("/mnt/laboratory/jetbox.db"), mounts) is None  # a prefix is not a parent
    assert network_filesystem(Path("/home/a/jetbox.db"), mounts) is None
    assert mount_of(Path("/x"), tmp_path / "absent") is None  # no mount table: not refused on a guess
    with pytest.raises(
        NetworkFilesystemError, match=r"on a network file system \(nfs4 at /mnt/lab\).*JETBOX_DATABASE_URL"
    ):
        refuse_network_sqlite(Path("/mnt/lab/jetbox.db"), mounts)


def test_the_event_store_refuses_sqlite_on_a_network_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import schema.netfs
    from schema.store import EventStore

    home = tmp_path / "home"
    home.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nnas:/x {home} nfs rw 0 0\n")
    monkeypatch.setattr(schema.netfs, "MOUNTS", mounts)
    with pytest.raises(NetworkFilesystemError, match="nfs at"):
        EventStore(f"sqlite:///{home / 'jetbox.db'}")
    assert not (home / "jetbox.db").exists()  # refused before SQLite made the file
    monkeypatch.setenv("JETBOX_HOME", str(home))
    assert main(["migrate"]) == 1  # the CLI says it in one line instead of a traceback


def test_a_join_file_is_read_and_checked(tmp_path: Path) -> None:
    token = read_token(str(_private(tmp_path / "join.json", GOOD)))
    assert token.queues == ["gpu"] and token.heartbeat_timeout_seconds == 20.0
    assert read_token("-", stdin=io.StringIO(json.dumps(GOOD))) == token


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (GOOD, 0o644, "readable by others (mode 644)"),
        ("not json", 0o600, "not a join file (JSON expected)"),
        ({"redis_url": "redis://:p@h:1/0"}, 0o600, "no jetbox_join field"),
        ({**GOOD, "jetbox_join": 2}, 0o600, "jetbox_join: Input should be 1"),
        ({**GOOD, "secret": "short"}, 0o600, "secret: String should have at least 32 characters"),
        (
            {**GOOD, "redis_url": "unix:///tmp/r.sock"},
            0o600,
            "redis_url: Value error, expected a redis:// or rediss://",
        ),
        ({**GOOD, "queues": ["gpu", "tpu"]}, 0o600, "queues.1: Input should be 'gpu' or 'cpu'"),
        ({**GOOD, "database_url": "sqlite:////x.db"}, 0o600, "SQLite event log cannot be shared"),
        ({**GOOD, "extra": 1}, 0o600, "extra: Extra inputs are not permitted"),
        ({**GOOD, "heartbeat_seconds": -1}, 0o600, "heartbeat_seconds: Input should be greater than 0"),
        (
            {**GOOD, "store_environment": {"LD_PRELOAD": "/tmp/x.so"}},
            0o600,
            "'LD_PRELOAD' is not an object-store variable",
        ),
        ({**GOOD, "redis_ca": CA_PEM}, 0o600, "redis_ca: Value error, a Redis CA is for a TLS Redis"),
        (
            {**GOOD, "redis_url": "rediss://:pw@10.0.0.5:6380/0", "redis_ca": "hello"},
            0o600,
            "redis_ca: Value error, expected the PEM certificate",
        ),
    ],
)
def test_a_bad_join_file_is_refused_naming_the_problem(
    tmp_path: Path, content: object, mode: int, message: str
) -> None:
    path = _private(tmp_path / "join.json", content)
    path.chmod(mode)
    with pytest.raises(CliError, match=r"--join .*join\.json") as err:
        read_token(str(path))
    assert message in str(err.value)
    assert ":pw@" not in str(err.value)  # the password is never echoed


def test_a_join_url_on_the_command_line_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="would show its secrets to `ps`"):
        read_token("redis://:pw@10.0.0.5:6380/0")
    with pytest.raises(CliError, match="cannot read the join file"):
        read_token(str(tmp_path / "nope.json"))


def test_joining_installs_the_key_once_and_refuses_another_installations(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "w")
    env = apply_token(JoinToken.model_validate(GOOD | {"artifacts_url": "s3://b/p"}), settings)
    assert env == {
        "JETBOX_REDIS_URL": GOOD["redis_url"],
        "JETBOX_HEARTBEAT_SECONDS": "2.0",
        "JETBOX_HEARTBEAT_TIMEOUT_SECONDS": "20.0",
        "JETBOX_ARTIFACTS_URL": "s3://b/p",
    }
    assert load_secret(settings.secret_path, create=False).decode() == KEY
    assert stat.S_IMODE(settings.secret_path.stat().st_mode) == 0o600
    apply_token(JoinToken.model_validate(GOOD), settings)  # the same key again: fine
    with pytest.raises(CliError, match="holds a different HMAC key"):
        apply_token(JoinToken.model_validate(GOOD | {"secret": "cd" * 32}), settings)


def test_the_object_store_settings_travel_and_a_hosts_own_keys_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path)
    load_secret(settings.secret_path, create=True)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "JETBOX_ARTIFACTS_URL": "s3://lab/jetbox",
        "AWS_ENDPOINT_URL": "http://10.0.0.5:9000",
        "AWS_ACCESS_KEY_ID": "main-key",
        "AWS_SECRET_ACCESS_KEY": "main-secret",
    }.items():
        monkeypatch.setenv(key, value)
    plain = build_token(settings, "redis://:pw@10.0.0.5:6379/0", None)
    assert plain.artifacts_url == "s3://lab/jetbox"
    assert plain.store_environment == {"AWS_ENDPOINT_URL": "http://10.0.0.5:9000"}  # keys only when asked
    full = build_token(settings, "redis://:pw@10.0.0.5:6379/0", None, credentials=True)
    assert full.store_environment["AWS_SECRET_ACCESS_KEY"] == "main-secret"
    worker = Settings(home=tmp_path / "w")
    env = apply_token(full, worker, own={"AWS_ACCESS_KEY_ID": "host-key"})
    assert "AWS_ACCESS_KEY_ID" not in env and env["AWS_SECRET_ACCESS_KEY"] == "main-secret"
    assert env["JETBOX_ARTIFACTS_URL"] == "s3://lab/jetbox" and env["AWS_ENDPOINT_URL"] == "http://10.0.0.5:9000"


def test_join_token_needs_a_reachable_redis_with_a_password(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    load_secret(settings.secret_path, create=True)
    with pytest.raises(CliError, match="loopback address"):
        build_token(settings, "redis://:pw@127.0.0.1:6379/0", None)
    with pytest.raises(CliError, match="no password in its URL"):
        build_token(settings, "redis://10.0.0.5:6379/0", None)
    pg = settings.model_copy(update={"database_url": "postgresql://u:p@db/jetbox"})
    token = build_token(pg, "redis://:pw@10.0.0.5:6379/0", ["cpu"])
    assert (
        token.database_url == "postgresql://u:p@db/jetbox" and token.secret == settings.secret_path.read_text().strip()
    )
    assert build_token(settings, "redis://:pw@10.0.0.5:6379/0", None).database_url is None  # SQLite stays home
    out = tmp_path / "join.json"
    assert (
        main(["--home", str(tmp_path), "join-token", "--redis-url", "redis://:pw@10.0.0.5:6379/0", "-o", str(out)]) == 0
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and read_token(str(out)).redis_url.endswith("10.0.0.5:6379/0")
    assert main(["--home", str(tmp_path), "join-token"]) == 1  # no TCP Redis known: says how to get one


def test_a_worker_refuses_a_tcp_redis_without_a_password_unless_insecure() -> None:
    with pytest.raises(CliError, match=r"redis://10.0.0.5:6379/0 is reached over TCP without a password.*--insecure"):
        check_redis_auth("redis://10.0.0.5:6379/0", insecure=False)
    check_redis_auth("redis://10.0.0.5:6379/0", insecure=True)
    check_redis_auth("redis://127.0.0.1:6379/0", insecure=False)  # loopback: this machine only
    check_redis_auth("unix:///run/jetbox/redis.sock", insecure=False)
    with pytest.raises(CliError, match=r"CA certificate /nonexistent/ca\.pem \(ssl_ca_certs in the URL\) is missing"):
        check_redis_auth("rediss://:pw@127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/ca.pem", insecure=True)
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("postgresql://ann:s3cret@db/j") == "postgresql://ann:***@db/j"


def test_a_tls_redis_url_travels_with_its_ca_not_its_path(tmp_path: Path) -> None:
    """`jbctl up --listen --tls-ca` writes the CA's path into its rediss:// URL; the join file carries the
    CA's certificate instead (the path means nothing on the other host), and joining writes it to the
    worker's home and names it in the URL every process there uses."""
    settings = Settings(home=tmp_path)
    load_secret(settings.secret_path, create=True)
    ca = tmp_path / "lab ca.pem"
    ca.write_text(CA_PEM)
    url = f"rediss://:pw@10.0.0.5:6380/0?ssl_ca_certs={ca}&socket_timeout=5"
    token = build_token(settings, url, ["cpu"])
    assert token.redis_ca == CA_PEM
    assert token.redis_url == "rediss://:pw@10.0.0.5:6380/0?socket_timeout=5"  # other options stay
    worker = Settings(home=tmp_path / "w")
    env = apply_token(token, worker)
    held = worker.home / "redis-ca.pem"
    assert held.read_text() == CA_PEM and stat.S_IMODE(held.stat().st_mode) == 0o600
    assert env["JETBOX_REDIS_URL"] == f"rediss://:pw@10.0.0.5:6380/0?socket_timeout=5&ssl_ca_certs={held}"
    from redis.connection import parse_url

    assert parse_url(env["JETBOX_REDIS_URL"])["ssl_ca_certs"] == str(held)  # as redis-py reads it
    with pytest.raises(CliError, match="cannot read the CA certificate"):
        build_token(settings, "rediss://:pw@10.0.0.5:6380/0?ssl_ca_certs=/nonexistent/ca.pem", None)
    plain = build_token(settings, "rediss://:pw@10.0.0.5:6380/0", None)  # a CA the workers' trust store knows
    assert plain.redis_ca is None and apply_token(plain, worker)["JETBOX_REDIS_URL"] == plain.redis_url


def test_up_refuses_tls_options_that_cannot_work(tmp_path: Path) -> None:
    from cli.embedded import RedisTls

    home = str(tmp_path / "h")
    assert main(["--home", home, "up", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 1  # no --listen
    assert main(["--home", home, "up", "--listen", "10.0.0.5:6380", "--tls-cert", "c.pem"]) == 1  # no key
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match=r"TLS certificate .*nope\.pem: cannot read it"):
        RedisTls(tmp_path / "nope.pem", tmp_path / "key.pem").check()
    with pytest.raises(ValueError, match=r"TLS certificate .*key\.pem: not a PEM certificate"):
        RedisTls(tmp_path / "key.pem", tmp_path / "key.pem").check()
