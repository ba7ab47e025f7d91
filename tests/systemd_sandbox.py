"""A real systemd (PID 1 of private PID and mount namespaces) for tests of the rendered units.

The boot script mounts private tmpfs over /tmp, /run and /var/tmp *before* systemd starts and boots a
target of its own with `DefaultDependencies=no`: without both, systemd-tmpfiles would empty the host's
/tmp and /run and every service installed on the machine would start. Paths the tests need that lie
under those folders (a checkout in /tmp, say) are carried over by bind mounts. Units go into the
sandbox's /run/systemd/system (private tmpfs), never into the host's /etc. The sandbox dies with its
systemd: `stop()` SIGKILLs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
PRIVATE = ("/tmp", "/run", "/var/tmp")
UNSHARE = ("unshare", "--pid", "--fork", "--mount", "--propagation", "private")

BOOT = r"""
set -eu
# Keep what the tests need from under the folders about to be hidden: bind them to a staging tmpfs.
mount -t tmpfs -o size=1m,mode=0700 jetbox-stage /media
n=0
for keep in "$@"; do
  n=$((n + 1)); mkdir -p "/media/$n"; mount --rbind "$keep" "/media/$n"
done
for dir in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 jetbox-sandbox "$dir"; done
n=0
for keep in "$@"; do
  n=$((n + 1)); mkdir -p "$keep"; mount --rbind "/media/$n" "$keep"
done
mkdir -p /run/systemd/system
cat > /run/systemd/system/sandbox.target <<'UNIT'
[Unit]
Description=Jetbox test sandbox
DefaultDependencies=no
UNIT
exec /lib/systemd/systemd --system --unit=sandbox.target
"""


class SandboxUnavailable(Exception):
    """This machine cannot boot systemd in namespaces (no unshare permission, no systemd)."""


def _under_private(path: Path) -> bool:
    return any(path == Path(p) or Path(p) in path.parents for p in PRIVATE)


class SystemdSandbox:
    """Boot with `start()`; run commands inside with `run()`/`systemctl()`; `stop()` kills it."""

    def __init__(self, keep: list[Path]) -> None:
        self.keep = sorted({str(p.resolve()) for p in keep if _under_private(p.resolve())})
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # systemd's pid, as this machine sees it

    @staticmethod
    def check() -> None:
        """Raise SandboxUnavailable with the reason when the sandbox cannot boot here."""
        for tool in ("unshare", "nsenter", "systemctl"):
            if shutil.which(tool) is None:
                raise SandboxUnavailable(f"{tool} is not installed (Debian: apt-get install systemd util-linux)")
        if not SYSTEMD.exists():
            raise SandboxUnavailable(f"{SYSTEMD} is missing (Debian: apt-get install systemd)")
        if os.geteuid() != 0:
            raise SandboxUnavailable("booting systemd in namespaces needs root")
        probe = subprocess.run(
            [*UNSHARE, "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode != 0:
            raise SandboxUnavailable(f"unshare is not permitted here: {probe.stderr.strip()}")

    def start(self, timeout: float = 60.0) -> SystemdSandbox:
        self.check()
        self.proc = subprocess.Popen(
            [*UNSHARE, "bash", "-c", BOOT, "boot", *self.keep],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SandboxUnavailable(f"the sandbox's boot failed: {err.strip()}")
            self.pid = self._systemd_pid()
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxUnavailable("systemd did not start in the sandbox")
            time.sleep(0.05)
        while True:
            state = self.systemctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise SandboxUnavailable(f"the sandbox's systemd says {state!r}")
            time.sleep(0.1)
        # journald for `journalctl -u`, D-Bus for `systemd-run --wait` and friends.
        self.systemctl("start", "systemd-journald.socket", "systemd-journald.service", "dbus.socket")
        return self

    def _systemd_pid(self) -> int | None:
        """The child of `unshare --fork`, once it has exec'ed systemd."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for child in children:
                if os.readlink(f"/proc/{child}/exe") == str(SYSTEMD.resolve()):
                    return int(child)
        except OSError:
            pass
        return None

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """`argv` inside the sandbox (its mounts and PID namespace), as root."""
        assert self.pid is not None, "the sandbox is not running"
        base = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8", "NO_COLOR": "1"}
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def systemctl(self, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *words], check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", unit, "-p", prop, "--value").stdout.strip()

    def journal(self, unit: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout

    def processes(self) -> list[str]:
        """Command lines of every process in the sandbox's PID namespace (read from this side: the
        sandbox's /proc is the host's)."""
        assert self.pid is not None
        ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") == ns:
                    out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                continue  # gone meanwhile
        return out

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # the namespace and everything in it die with PID 1
            except ProcessLookupError:
                pass
            self.pid = None
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None
