"""A main host and worker hosts that share nothing but the network (tests/netns_hosts.py).

The main host runs `jbctl up --listen` (daemon, Redis with a password on its bridge address, no
worker); each worker host joins with `jbctl worker --join FILE` from its own home, under its own
hostname, with every other host's folder hidden. Steps run on the worker hosts; a worker cut off
from Redis (its link down) longer than the heartbeat bound has its attempt retried on the other,
and its late reports are refused and recorded when its link comes back.

The artifact store is a parameter (`store`): `local` keeps each host's artifacts in its own home,
which the tests account for (a checkpoint on a cut host cannot be resumed elsewhere); `s3` starts
an S3-compatible server (moto's standalone server) on the main host's address, which every host
reaches over the network: artifacts and checkpoints go there, the TICKET-1 pipeline runs across
hosts and a retried attempt resumes from its checkpoint on another host. `s3` is skipped, with the
reason, where the object-store backend or moto is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jbdaemon import JBCTL, atomic_write, event_rows, wait_for
from tests.netns_hosts import MAIN_ADDRESS, Hosts, unavailable
from tests.tls_certs import make_tls, need_tls_redis

pytestmark = pytest.mark.integration

WHY_NOT = unavailable()
needs_hosts = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
FAST = {"JETBOX_HEARTBEAT_SECONDS": "0.3", "JETBOX_HEARTBEAT_TIMEOUT_SECONDS": "2", "JETBOX_RESCAN_SECONDS": "1"}
PORT = 6390
S3_PORT = 6399
BUCKET = "jetbox-hosts"


def _no_object_store() -> str | None:
    """Why the `s3` parameter cannot run here, or None."""
    if importlib.util.find_spec("schema.artifact_s3") is None:
        return "no object-store artifact backend (schema/artifact_s3.py) in this tree"
    for module in ("boto3", "moto.server"):
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            return f"{module} is not installed (pip install -e '.[s3,dev]')"
    return None


STORES = [
    pytest.param("local", id="local-store"),
    pytest.param(
        "s3", id="s3-store", marks=pytest.mark.skipif(_no_object_store() is not None, reason=str(_no_object_store()))
    ),
]


def _clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JETBOX_", "NOTIFY_", "WATCHDOG_"))}
    return {**env, "JETBOX_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


class Lab:
    """The hosts and the processes started on them (stopped by pid, then the namespaces deleted)."""

    def __init__(self, hosts: Hosts, store: str = "local", tls: bool = False) -> None:
        self.hosts = hosts
        self.store = store
        self.tls = tls
        self.main_home = hosts.homes[hosts.main]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.join_file = self.main_home / "join.json"
        self.store_env: dict[str, str] = {}

    def object_store(self) -> None:
        """moto's S3 server on the main host's address (every host reaches it over the network), a bucket."""
        endpoint = f"http://{MAIN_ADDRESS}:{S3_PORT}"
        self.store_env = {
            "JETBOX_ARTIFACTS_URL": f"s3://{BUCKET}/jetbox",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "jetbox-test-key",
            "AWS_SECRET_ACCESS_KEY": "jetbox-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        server = [sys.executable, "-m", "moto.server", "-H", MAIN_ADDRESS, "-p", str(S3_PORT)]
        self.start(self.hosts.main, server, _clean_env(self.main_home), "moto.log")
        make = f"import boto3; boto3.client('s3', endpoint_url={endpoint!r}).create_bucket(Bucket={BUCKET!r})"
        env = _clean_env(self.main_home, self.store_env)
        wait_for(
            "the S3 server and its bucket",
            lambda: self.run(self.hosts.main, [sys.executable, "-c", make], env).returncode == 0,
            timeout=60,
            every=1.0,
        )

    def start(self, host: str, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.hosts.homes[host] / log).open("ab") as out:
            proc = subprocess.Popen(
                self.hosts.argv(host, argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def run(
        self, host: str, argv: list[str], env: dict[str, str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.hosts.argv(host, argv), env=env, capture_output=True, text=True, input=stdin, timeout=60
        )

    def main_env(self) -> dict[str, str]:
        return _clean_env(self.main_home, {**FAST, **self.store_env})

    def main_up(self) -> None:
        if self.store == "s3":
            self.object_store()
        env = self.main_env()
        listen = f"{MAIN_ADDRESS}:{PORT}"
        tls: list[str] = []
        if self.tls:  # a throwaway CA and a certificate for the main host's address, in its home
            need_tls_redis()
            files = make_tls(self.main_home / "tls", MAIN_ADDRESS)
            tls = ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]
        self.start(
            self.hosts.main,
            [JBCTL, "up", "--listen", listen, *tls, "--no-workers", "--console-port", "0", "--quiet"],
            env,
            "up.log",
        )
        wait_for("the main host's Redis on TCP", (self.main_home / "run" / "redis.tcp.url").exists, timeout=30)
        wait_for("the daemon's first events", self.rows, timeout=30)
        queues = ["--queue", "cpu"] + (["--queue", "gpu", "--include-credentials"] if self.store == "s3" else [])
        made = self.run(self.hosts.main, [JBCTL, "join-token", "--output", str(self.join_file), *queues], env)
        assert made.returncode == 0, made.stderr

    def join(self, host: str) -> subprocess.Popen[bytes]:
        """What an operator does on a new host: copy the join file over (scp), then one command."""
        home = self.hosts.homes[host]
        copy = home / "join.json"
        copy.write_bytes(self.join_file.read_bytes())
        copy.chmod(0o600)
        return self.start(host, [JBCTL, "worker", "--join", str(copy)], _clean_env(home), "worker.log")

    def rows(self) -> list[dict[str, Any]]:
        return event_rows(self.main_home)

    def events(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r["data"]
            for r in self.rows()
            if r["type"] == type_ and all(r["data"].get(k) == v for k, v in match.items())
        ]

    def drop(self, tid: str, steps: str) -> None:
        folder = self.main_home / "tickets"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{tid}.yaml", f"id: {tid}\ntitle: t\ngoal: g\nsteps:\n{steps}")

    def ended(self, tid: str) -> str | None:
        for row in reversed(self.rows()):
            if row["data"].get("ticket") == tid and row["type"] in (
                "TicketCompleted",
                "TicketFailed",
                "TicketCancelled",
            ):
                return str(row["type"])
        return None

    def logs(self) -> str:
        out = []
        for host, home in self.hosts.homes.items():
            for log in sorted(home.glob("*.log")) + sorted((home / "logs").glob("*.log")):
                out.append(f"--- {host} {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    hosts = Hosts(tmp_path / "hosts", workers=2)
    try:
        hosts.up()
        store, _, tls = str(getattr(request, "param", "local")).partition("+")
        lab = Lab(hosts, store, tls=tls == "tls")
        try:
            lab.main_up()
            yield lab
        finally:
            lab.stop()
            print(lab.logs())  # pytest shows a test's output only when it failed
    finally:
        hosts.close()  # even when a step above failed: no namespace outlives the test


@needs_hosts
def test_workers_join_in_one_command_and_run_the_steps(lab: Lab) -> None:
    w0, w1 = lab.hosts.workers
    # Hostile joins first: none of them gets a worker running.
    loose = lab.hosts.homes[w0] / "loose.json"
    loose.write_bytes(lab.join_file.read_bytes())
    loose.chmod(0o644)
    refused = lab.run(w0, [JBCTL, "worker", "--join", str(loose)], _clean_env(lab.hosts.homes[w0]))
    assert refused.returncode == 1 and "readable by others" in refused.stderr
    bare = f"redis://{MAIN_ADDRESS}:{PORT}/0"
    env = _clean_env(lab.hosts.homes[w0], {"JETBOX_REDIS_URL": bare})
    refused = lab.run(w0, [JBCTL, "worker", "--burst"], env)
    assert refused.returncode == 1 and "without a password" in refused.stderr, refused.stderr
    # A Redis that asks for no password, whatever password the URL gives, is refused too.
    from cli.embedded import redis_binary

    open_redis = [redis_binary(), "--port", str(PORT + 1), "--bind", MAIN_ADDRESS, "--save", "", "--appendonly", "no"]
    lab.start(lab.hosts.main, open_redis, _clean_env(lab.main_home), "open-redis.log")
    env = _clean_env(lab.hosts.homes[w0], {"JETBOX_REDIS_URL": f"redis://:guess@{MAIN_ADDRESS}:{PORT + 1}/0"})
    log = lab.main_home / "open-redis.log"
    wait_for("the open Redis", lambda: "Ready to accept connections" in log.read_text(errors="replace"), timeout=20)
    refused = lab.run(w0, [JBCTL, "worker", "--burst"], env)
    assert refused.returncode == 1 and "lets clients in without a password" in refused.stderr, refused.stderr
    token = json.loads(lab.join_file.read_text())
    assert token["redis_url"].startswith("redis://:") and token["queues"] == ["cpu"]
    assert token["heartbeat_timeout_seconds"] == 2.0 and "database_url" not in token

    workers = [lab.join(w0), lab.join(w1)]
    lab.drop("TICKET-1", "  - {id: a, kind: diag, with: {sleep: 1}}\n  - {id: b, kind: diag, with: {sleep: 1}}\n"
             "  - {id: c, kind: diag, needs: [a, b]}\n")  # fmt: skip
    wait_for("TICKET-1 to end", lambda: lab.ended("TICKET-1"), timeout=120)
    assert lab.ended("TICKET-1") == "TicketCompleted"
    hosts_used = {e["worker"].split(":")[0] for e in lab.events("AttemptStarted", ticket="TICKET-1")}
    assert hosts_used <= {w0, w1} and hosts_used, hosts_used  # every step ran on a worker host
    assert all(p.poll() is None for p in workers)
    # The worker hosts hold the key the join file carried; the main host's home stayed out of reach.
    for w in (w0, w1):
        assert (lab.hosts.homes[w] / "secret.key").stat().st_mode & 0o077 == 0
        assert not (lab.hosts.homes[w] / "jetbox.db").exists()


@needs_hosts
@pytest.mark.parametrize("lab", STORES, indirect=True)
def test_a_cut_off_worker_is_replaced_and_its_late_reports_are_refused(lab: Lab) -> None:
    w0, w1 = lab.hosts.workers
    lab.join(w0)
    # `network: deny` (the default): the job runs in a network namespace of its own while its worker's
    # reports reach Redis over TCP, through connections re-made after the cut (workers/netns.py).
    lab.drop("TICKET-2", "  - {id: t, kind: diag, retries: 2, with: {steps: 60, sleep: 12, checkpoints: 12}}\n")
    started = wait_for("the step to start", lambda: lab.events("AttemptStarted", ticket="TICKET-2"), timeout=30)[0]
    wait_for("a checkpoint", lambda: lab.events("CheckpointSaved", ticket="TICKET-2", attempt=1), timeout=30)
    assert started["worker"].startswith(w0 + ":")
    lab.join(w1)  # the host that takes over
    lab.hosts.cut(w0)
    try:
        # Heartbeat bound: 2 s without a beat, then 2 s of grace; the retry is on the other host.
        lost = wait_for(
            "the attempt to be failed", lambda: lab.events("AttemptFailed", ticket="TICKET-2", attempt=1), timeout=60
        )[0]
        assert lost["cause"] == "infrastructure" and "worker lost" in lost["error"]
        second = wait_for(
            "attempt 2 to start", lambda: lab.events("AttemptStarted", ticket="TICKET-2", attempt=2), timeout=60
        )[0]
        assert second["worker"].startswith(w1 + ":")
    finally:
        lab.hosts.mend(w0)
    # Back online: what it says about attempt 1 (its blocked report, then its end: the reconciler asked
    # it to stop) is refused and recorded, never applied.
    stale = wait_for(
        "the late reports",
        lambda: lab.events("StaleReportRefused", ticket="TICKET-2", attempt=1, report="failed"),
        timeout=120,
    )
    assert stale[0]["worker"].startswith(w0 + ":") and stale[0]["current_attempt"] == 2
    wait_for("TICKET-2 to end", lambda: lab.ended("TICKET-2"), timeout=120)
    assert lab.ended("TICKET-2") == "TicketCompleted"
    done = lab.events("AttemptSucceeded", ticket="TICKET-2")
    assert [d["attempt"] for d in done] == [2]
    assert lab.events("SafetyViolation") == []  # neither host's reports were taken for the job's own traffic
    resumed = done[0]["metrics"]["resumed_from"]
    if lab.store == "s3":  # checkpoints in the shared store: the other host resumes where the first stopped
        assert resumed > 0
    else:  # the checkpoint stayed on the cut host's disk, which the other host cannot see
        assert resumed == 0


TICKET_1_SMALL = """\
  - id: shapes
    kind: synthesize
    shards: 2
    with: {generator: shapes, count: 200, seed: 1, shard_size: 100, params: {size: 32, max_objects: 3}}
  - id: train
    kind: train
    needs: [shapes]
    retries: 2
    with: {model: jepa, preset: tiny, data: shapes, steps: 60, checkpoint_every: 10, seed: 1}
  - id: eval
    kind: evaluate
    needs: [train, shapes]
    with: {model: jepa, data: shapes, checkpoint: train}
"""


@needs_hosts
@pytest.mark.parametrize(
    "lab", [pytest.param("s3+tls", id="s3-store-tls", marks=STORES[1].marks)], indirect=True
)
def test_ticket_1_runs_on_the_worker_hosts_with_the_object_store(lab: Lab) -> None:
    """TICKET-1's pipeline (synthesize, train, evaluate; small) with every step on a worker host and
    every artifact and checkpoint in the object store, Redis reached over TLS (`jbctl up --listen
    --tls-*`, the CA in the join file) by `network: deny` jobs. The training host's link is cut after
    its first checkpoint: the other host resumes from it; the cut host's late reports are refused.
    The main host's `jbctl artifacts verify` then finds everything intact."""
    token = json.loads(lab.join_file.read_text())
    assert token["redis_url"].startswith("rediss://") and "BEGIN CERTIFICATE" in token["redis_ca"]
    w0, w1 = lab.hosts.workers
    lab.join(w0)
    lab.join(w1)
    lab.drop("TICKET-1", TICKET_1_SMALL)
    first = wait_for(
        "a training checkpoint",
        lambda: lab.events("CheckpointSaved", ticket="TICKET-1", task="train", attempt=1),
        timeout=300,
        every=0.2,
    )[0]
    trainer = lab.events("AttemptStarted", ticket="TICKET-1", task="train", attempt=1)[0]["worker"].split(":")[0]
    other = w1 if trainer == w0 else w0
    lab.hosts.cut(trainer)
    try:
        again = wait_for(
            "the training to start again",
            lambda: lab.events("AttemptStarted", ticket="TICKET-1", task="train", attempt=2),
            timeout=60,
        )[0]
        assert again["worker"].startswith(other + ":")
    finally:
        lab.hosts.mend(trainer)
    wait_for("TICKET-1 to end", lambda: lab.ended("TICKET-1"), timeout=400, every=0.5)
    assert lab.ended("TICKET-1") == "TicketCompleted", lab.events("AttemptFailed", ticket="TICKET-1")
    hosts_used = {e["worker"].split(":")[0] for e in lab.events("AttemptStarted", ticket="TICKET-1")}
    assert hosts_used == {w0, w1}, hosts_used
    assert lab.events("ArtifactRecorded", ticket="TICKET-1")
    # Attempt 2 resumed from attempt 1's checkpoint, fetched from the store by the other host.
    log = (lab.hosts.homes[other] / "worker.log").read_text(errors="replace")
    resumed = re.search(r"\[TICKET-1/train#2\] resumed from \S+ at step (\d+)", log)
    saved = {e["step"] for e in lab.events("CheckpointSaved", ticket="TICKET-1", task="train", attempt=1)}
    # The cut lands just after the first checkpoint was recorded; one more may have got through first.
    assert resumed is not None and int(resumed.group(1)) in saved and int(resumed.group(1)) >= first["step"], log[
        -2000:
    ]
    wait_for(
        "the cut host's late reports to be refused",
        lambda: lab.events("StaleReportRefused", ticket="TICKET-1", task="train", attempt=1),
        timeout=120,
    )
    assert not lab.events("AttemptSucceeded", ticket="TICKET-1", task="train", attempt=1)
    verified = lab.run(lab.hosts.main, [JBCTL, "artifacts", "verify"], lab.main_env())
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert lab.events("SafetyViolation") == []
