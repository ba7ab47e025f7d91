"""The crash-torture suite, CI size: bench/torture.py with 20 kills (daemon, workers, Redis) while 8
tickets with DAGs, retries and checkpoints run; nothing may be lost, duplicated or stuck."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or trains

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_twenty_kills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "torture.py"),
            "--kills",
            "20",
            "--tickets",
            "8",
            "--seed",
            "3",
            "--drain-timeout",
            "90",
            "--dir",
            str(tmp_path / "home"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "kills: 20 (" in out and "tickets: 8 dropped, 8 completed" in out
    assert "OK: nothing lost, duplicated or stuck" in out
