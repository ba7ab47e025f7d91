"""The demo's tickets under a real systemd: install the units into a sandboxed systemd (PID 1 of
private namespaces, as tests/test_systemd_service.py does), drop TICKET-1..5, and time each until it
completes or waits for approval. Prints one line per ticket and the total; needs root and unshare.

    .venv/bin/python bench/systemd_demo.py
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.systemd_sandbox import SandboxUnavailable, SystemdSandbox  # noqa: E402

JBCTL = str(Path(sys.executable).parent / "jbctl")
DEMO = ["TICKET-1", "TICKET-2", "TICKET-3", "TICKET-4", "TICKET-5"]


def states(db: Path) -> dict[str, tuple[str, str | None]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, state, awaiting FROM tickets")}
        finally:
            conn.close()
    except sqlite3.Error:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    home = ROOT / ".test-systemd" / f"demo-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    try:
        box = SystemdSandbox(keep=[ROOT, Path(sys.prefix)]).start()
    except SandboxUnavailable as exc:
        print(f"no systemd sandbox here: {exc}")
        return 2
    try:
        box.run([JBCTL, "--home", str(home), "install-units", "--output", "/run/systemd/system",
                 "--workers", "cpu=1,gpu=1", "--run-as", "root", "--now"])
        start = time.monotonic()
        for tid in DEMO:
            src = ROOT / "tickets" / "examples" / f"{tid}.yaml"
            tmp = home / "tickets" / f".{tid}.tmp"
            tmp.write_text(src.read_text())
            tmp.rename(home / "tickets" / f"{tid}.yaml")
        done: dict[str, float] = {}
        while len(done) < len(DEMO) and time.monotonic() - start < args.timeout:
            for tid, (state, awaiting) in states(home / "jetbox.db").items():
                if tid not in done and (state != "running" or awaiting):
                    done[tid] = time.monotonic() - start
                    what = f"awaiting approval of {awaiting}" if awaiting and state == "running" else state
                    print(f"{tid}: {what} after {done[tid]:.0f} s", flush=True)
            time.sleep(1)
        ok = box.run([JBCTL, "--home", str(home), "replay", "--check"], check=False).returncode == 0
        ok = ok and box.run([JBCTL, "--home", str(home), "verify"], check=False).returncode == 0
        print(f"{len(done)}/{len(DEMO)} tickets ended or waiting for approval in {time.monotonic() - start:.0f} s; "
              f"replay --check and verify {'pass' if ok else 'FAIL'}")
        print(box.run([JBCTL, "--home", str(home), "status", "--all"], check=False).stdout)
        box.systemctl("stop", "jetbox.target", check=False)
        return 0 if ok and len(done) == len(DEMO) else 1
    finally:
        box.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
