"""Keep-alive that follows the core: a warm worker loads a newly promoted core in the background.

The daemon publishes the current core under `CORE_KEY` when a `CorePromoted` (promotion or rollback)
is recorded. This thread notices a new version, loads its components into the model cache beside
the old ones, and only then says it holds the new version. Requests name their checkpoint
explicitly, and a model enters the cache only once fully loaded (a request for one the thread is
still loading waits for that load), so no request sees a half-loaded model. The version held is
published under `warm_key(name)` with a TTL, which `jbctl status` reads.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from schema.wire import CORE_KEY, warm_key
from workers.netns import redis_client

PUBLISH_TTL_S = 15
RETRY_S = 30.0  # how soon a core version that failed to load is tried again


def _log(line: str) -> None:
    print(f"jetbox worker: {line}", file=sys.stderr, flush=True)


class CoreFollower(threading.Thread):
    """Polls the published core; warms each new version, then reports it as held."""

    def __init__(
        self,
        redis_url: str,
        name: str,
        artifact_root: Any,  # the ArtifactStore (or the folder of a local one) checkpoints are read from
        queues: list[str],
        poll_s: float = 1.0,
        warm: Callable[..., int] | None = None,
    ) -> None:
        super().__init__(daemon=True, name="core-follower")
        self.conn = redis_client(redis_url, socket_timeout=10)
        self.name, self.root, self.queues, self.poll_s = name, artifact_root, queues, poll_s
        self.held: dict[str, Any] | None = None  # {version, components} fully loaded
        self.loading: int | None = None
        self.error: str | None = None
        self.failed: tuple[Any, float] | None = None  # (version, when) of the last load that failed
        self.stopping = threading.Event()
        if warm is None:
            from workers.inference import warm_core  # the cache this worker's jobs read

            warm = warm_core
        self.warm = warm

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except redis.RedisError:
                pass  # Redis restarting: the worker itself rides it out, so does this
            self.stopping.wait(self.poll_s)

    def step(self) -> None:
        raw = self.conn.get(CORE_KEY)
        core = json.loads(raw) if raw else None
        failed = self.failed
        if core is not None and failed and failed[0] == core.get("version") and time.monotonic() - failed[1] < RETRY_S:
            core = None  # that version failed to load a moment ago: try again later, not every poll
        if core is not None and (self.held is None or core.get("version") != self.held.get("version")):
            self.loading = int(core.get("version", 0))
            self.publish()
            started = time.perf_counter()
            try:
                self.warm(core.get("components", {}), self.root, log=_log)
            except Exception as exc:  # a missing artifact, a bad checkpoint: say so, keep the old core
                self.error = f"core v{self.loading}: {exc}"
                self.failed = (core.get("version"), time.monotonic())
                _log(f"could not warm {self.error}")
            else:
                self.held, self.error, self.failed = core, None, None
                _log(f"now holds core v{core.get('version')} (loaded in {time.perf_counter() - started:.1f} s)")
            self.loading = None
        self.publish()

    def publish(self) -> None:
        held = self.held or {}
        info = {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "core_version": held.get("version"),
            "components": sorted(held.get("components", {})),
            "loading": self.loading,
            "error": self.error,
        }
        self.conn.set(warm_key(self.name), json.dumps(info), ex=PUBLISH_TTL_S)
