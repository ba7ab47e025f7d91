"""Hosts that share nothing but the network, on one machine: network namespaces joined by veth pairs.

The main host's namespace holds a bridge with 10.231.0.1/24; each worker host's namespace holds one
end of a veth pair (10.231.0.<2+i>/24) whose other end is on that bridge. The addresses exist only
inside these namespaces: nothing leaves the machine, and nothing outside can reach them. A worker
host also gets a hostname of its own (UTS namespace) and a mount namespace in which the other hosts'
folders are hidden under empty tmpfs mounts, so a worker can read nothing of the main host's home
(its artifacts, its database, its Redis socket) nor of another worker's: only the network.

Used by tests/test_multihost.py and bench/multihost.py. Needs root and iproute2; `unavailable()`
says why not in one line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

SUBNET = "10.231.0"
MAIN_ADDRESS = f"{SUBNET}.1"


def unavailable() -> str | None:
    """Why network-namespace hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces, veth pairs)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"multi-host tests need `{tool}` (iproute2, util-linux)"
    probe = f"jbprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """A main host and `workers` worker hosts; `close()` deletes every namespace (call it in a finally)."""

    def __init__(self, base: Path, workers: int = 2) -> None:
        tag = uuid.uuid4().hex[:6]
        self.base = base
        self.main = f"jbm{tag}"
        self.workers = [f"jbw{i}{tag}" for i in range(workers)]
        self.homes = {name: base / name for name in [self.main, *self.workers]}
        self._veth = {w: (f"vm{i}{tag}", f"vw{i}{tag}") for i, w in enumerate(self.workers)}
        self.made: list[str] = []

    def address(self, host: str) -> str:
        return MAIN_ADDRESS if host == self.main else f"{SUBNET}.{2 + self.workers.index(host)}"

    def up(self) -> Hosts:
        for home in self.homes.values():
            home.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.main)
        self.made.append(self.main)
        _ip("-n", self.main, "link", "set", "lo", "up")
        _ip("-n", self.main, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.main, "addr", "add", f"{MAIN_ADDRESS}/24", "dev", "br0")
        _ip("-n", self.main, "link", "set", "br0", "up")
        for w in self.workers:
            _ip("netns", "add", w)
            self.made.append(w)
            near, far = self._veth[w]
            _ip("link", "add", near, "netns", self.main, "type", "veth", "peer", "name", far, "netns", w)
            _ip("-n", self.main, "link", "set", near, "master", "br0", "up")
            _ip("-n", w, "addr", "add", f"{self.address(w)}/24", "dev", far)
            _ip("-n", w, "link", "set", far, "up")
            _ip("-n", w, "link", "set", "lo", "up")
        return self

    def cut(self, worker: str) -> None:
        """Pull the worker host's cable: its link on the main host's bridge goes down."""
        _ip("-n", self.main, "link", "set", self._veth[worker][0], "down")

    def mend(self, worker: str) -> None:
        _ip("-n", self.main, "link", "set", self._veth[worker][0], "up")

    def argv(self, host: str, command: list[str]) -> list[str]:
        """`command` as run on `host`: in its network namespace and, for a worker host, under its own
        hostname with every other host's folder hidden. `exec` keeps the pid: Popen's is the command's."""
        if host == self.main:
            return ["ip", "netns", "exec", host, *command]
        hide = [str(h) for name, h in self.homes.items() if name != host]
        script = " && ".join(
            [
                *(f"mount -t tmpfs -o size=1m,mode=000 jetbox-elsewhere {shlex.quote(d)}" for d in hide),
                f"hostname {host}",
            ]
        )
        return [
            "ip", "netns", "exec", host, "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", f"{script} && exec \"$@\"", "sh", *command,
        ]  # fmt: skip

    def close(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()
