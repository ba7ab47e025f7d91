"""Test harness: one Jetbox home with its private Redis, a real `jbctl daemon` and workers."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
from pathlib import Path

import redis

from cli.embedded import PrivateRedis, RedisTls, start_redis
from tests.jbdaemon import JBCTL, Daemon, atomic_write, wait_for

FAST = {
    "JETBOX_HEARTBEAT_SECONDS": "0.3",
    "JETBOX_HEARTBEAT_TIMEOUT_SECONDS": "2",
    "JETBOX_RESCAN_SECONDS": "1",
}


class Setup:
    """One home with its Redis, daemon and workers."""

    def __init__(
        self,
        home: Path,
        listen: tuple[str, int] | None = None,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        """`listen` (with `password`, and `tls`): Redis listens on that TCP address too, as `jbctl up
        --listen` has it."""
        self.home = home
        self.redis: PrivateRedis = start_redis(home / "run", listen=listen, password=password, tls=tls)
        self.env_extra = {**FAST, "JETBOX_REDIS_URL": self.redis.url}
        self.daemon = Daemon(home, env=self.env_extra)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return self.daemon.env

    def conn(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def worker(self, *queues: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = [JBCTL, "worker"] + [a for q in (queues or ("cpu",)) for a in ("--queue", q)]
        with (self.home / "worker.log").open("ab") as log:
            proc = subprocess.Popen(
                args, env={**self.env, **(env or {})}, stdout=log, stderr=log, start_new_session=True
            )
        self.workers.append(proc)
        return proc

    def drop(self, tid: str, steps: str, extra: str = "") -> Path:
        path = self.home / "tickets" / f"{tid}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, f"id: {tid}\ntitle: t\ngoal: g\nsteps:\n{steps}{extra}")
        return path

    def ticket_state(self, tid: str) -> str | None:
        for row in reversed(self.daemon.rows()):
            if row["data"].get("ticket") == tid and row["type"] in (
                "TicketCompleted",
                "TicketFailed",
                "TicketCancelled",
            ):
                return row["type"]
        return None

    def wait_done(self, tid: str, timeout: float = 60.0) -> str:
        state = wait_for(f"{tid} to end", lambda: self.ticket_state(tid), timeout, every=0.2)
        return str(state)

    def jbctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([JBCTL, *args], env=self.env, capture_output=True, text=True, timeout=120)

    def assert_consistent(self) -> None:
        """No attempt applied twice, and the log and projections agree."""
        rows = self.daemon.rows()
        keys = collections.Counter(
            (r["type"], r["data"].get("ticket"), r["data"].get("task"), r["data"].get("attempt"))
            for r in rows
            if r["type"] in ("AttemptScheduled", "AttemptStarted", "AttemptSucceeded", "AttemptFailed")
        )
        assert [k for k, n in keys.items() if n > 1] == []
        seqs = collections.Counter(
            (r["data"]["ticket"], r["data"]["task"], r["data"]["attempt"], r["data"]["report_seq"])
            for r in rows
            if r["data"].get("report_seq")
        )
        assert [k for k, n in seqs.items() if n > 1] == []
        check = self.jbctl("replay", "--check")
        assert check.returncode == 0, check.stderr
        verify = self.jbctl("verify")
        assert verify.returncode == 0, verify.stderr

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.stop()
        self.redis.stop()
