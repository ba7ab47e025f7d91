"""The systemd notify protocol (sd_notify) in a few lines: no dependency, a no-op outside systemd.

systemd passes `$NOTIFY_SOCKET` (a datagram socket path, or an abstract one when it starts with
`@`) and, with `WatchdogSec=`, `$WATCHDOG_USEC` (and `$WATCHDOG_PID`). Each message is one datagram
of `KEY=value` lines.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]  # Linux abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of `KEY=value` lines; False (and one warning) when it cannot be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the main loop on a manager that does not read: drop the datagram instead.
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
            return True
        except BlockingIOError:
            log.debug("sd_notify socket full; dropped %s", lines)
            return False
        except OSError as exc:
            if not self._warned:  # the manager went away: say so once, keep running
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        return self.send(*lines, *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets newer systemd match the reload to this request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self, now: float | None = None) -> bool:
        """Ping the watchdog if it is due (every `watchdog_interval` seconds); True when sent."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_watchdog < self.watchdog_interval:
            return False
        self._last_watchdog = now
        return self.send("WATCHDOG=1")

    def watchdog_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next watchdog ping is due (None without a watchdog)."""
        if self.watchdog_interval is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_watchdog + self.watchdog_interval - now)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3) recommends; None when unset."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None
