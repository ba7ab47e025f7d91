"""bench/store.py runs end to end in its smoke mode and prints its ratio lines (figures are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or trains

ROOT = Path(__file__).resolve().parent.parent


def test_bench_store_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "store.py"),
            "--quick",
            "--events",
            "3000",
            "--single",
            "10",
            "--batches",
            "2",
            "--dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "single ratio (store/raw):" in out
    assert "batch ratio (append/raw):" in out
    assert "group ratio (append_batches/raw):" in out
    for phase in ("load_state", "rebuild_rows", "verify"):
        assert phase in out
    assert "chain verified" in out
    assert not any(tmp_path.iterdir()), "the benchmark left its databases behind"


def test_bench_cli_quick() -> None:
    """bench/cli.py: `jbctl status` and the typer + rich floor, timed in one run, with their ratio."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cli.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jbctl status" in proc.stdout and "floor: typer + rich table" in proc.stdout
    assert "ratio jbctl status / floor (p50):" in proc.stdout


def test_bench_peers_quick_runs_without_the_peers(tmp_path: Path) -> None:
    """bench/peers.py in Jetbox's own environment (no eventsourcing, no dbos: `make bench-peers` adds
    them in .venv-bench): the Jetbox and raw sqlite3 rows still come out, the peers' say why not."""
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "peers.py"), "--quick", "--only", "appends", "--only", "steps"),
            *("--single", "5", "--batches", "1", "--steps", "3", "--dir", str(tmp_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| durable single-event append |" in out and "| batched append, 100/txn |" in out
    assert "| per recorded step / attempt |" in out
    if "eventsourcing not installed" in out:
        assert "eventsourcing n/a" in out
    if "dbos not installed" in out:
        assert "DBOS: dbos is not installed" in out
