"""Multi-host benchmark: the same workers on the main host and on other hosts (network namespaces), one run.

    sudo .venv/bin/python bench/multihost.py                 # 2 workers, 200 wide + 50 chained jobs, 2 rounds
    sudo .venv/bin/python bench/multihost.py --jobs 60 --rounds 1

The main host (a network namespace, tests/netns_hosts.py) runs `jbctl up --listen ADDRESS:PORT
--no-workers`: daemon, SQLite event log, Redis with a password on its bridge address. Then, in
alternating rounds:
- local: W workers on the main host itself, reaching Redis through its unix socket (what `jbctl up`
  starts on one machine);
- remote: W workers on W other hosts (their own namespaces, homes and hostnames; every other host's
  folder hidden), joined with `jbctl worker --join FILE`, reaching Redis over TCP (veth + bridge).
Each round runs a ticket of N independent no-op steps (throughput: TicketSubmitted to
TicketCompleted, from the events' recorded times) and a chain of M steps (latency: each job is
dispatched after the previous report was committed; per job = chain span / M).

Artifact throughput (MB/s up and down through the object store) needs the S3 artifact backend
(JETBOX_ARTIFACTS_URL); it is reported as not measured when this tree has none.
Needs root (namespaces); prints one line and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schema.ticket import MAX_STEPS  # noqa: E402
from tests.netns_hosts import MAIN_ADDRESS, Hosts, unavailable  # noqa: E402

JBCTL = str(Path(sys.executable).parent / "jbctl")
PORT = 6392


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JETBOX_", "NOTIFY_", "WATCHDOG_"))}
    env.update(JETBOX_HOME=str(home), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def _start(hosts: Hosts, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(hosts.argv(host, argv), env=env, stdout=out, stderr=out, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _events(db: Path, tid: str) -> list[tuple[str, datetime]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT type, recorded_at FROM events WHERE stream = ? ORDER BY seq", (tid,)).fetchall()
    finally:
        conn.close()
    return [(t, datetime.fromisoformat(r)) for t, r in rows]


def _run_ticket(home: Path, tid: str, n: int, chain: bool, timeout: float) -> float:
    """Drop a ticket of `n` diag steps; the seconds from its submission to its completion."""
    lines = [f"id: {tid}", "title: multihost bench", "goal: measure", "steps:"]
    lines += [f"  - {{id: s{i}, kind: diag{f', needs: [s{i - 1}]' if chain and i else ''}}}" for i in range(n)]
    tmp = home / "tickets" / f".{tid}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, home / "tickets" / f"{tid}.yaml")
    db = home / "jetbox.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = _events(db, tid)
        except sqlite3.OperationalError:
            found = []
        ends = [(t, at) for t, at in found if t in ("TicketCompleted", "TicketFailed")]
        if ends:
            if ends[0][0] != "TicketCompleted":
                raise RuntimeError(f"{tid} failed; see the logs under {home}")
            return (ends[0][1] - found[0][1]).total_seconds()
        time.sleep(0.05)
    raise TimeoutError(f"{tid} did not finish within {timeout:g}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="workers on each side (1..4)")
    parser.add_argument("--jobs", type=int, default=MAX_STEPS, help=f"independent jobs per round (1..{MAX_STEPS})")
    parser.add_argument("--chain", type=int, default=50, help=f"chained jobs per round (0..{MAX_STEPS})")
    parser.add_argument("--rounds", type=int, default=2, help="alternating local/remote rounds")
    args = parser.parse_args()
    if not 1 <= args.workers <= 4:
        parser.error("--workers: 1 to 4")
    if not 1 <= args.jobs <= MAX_STEPS or not 0 <= args.chain <= MAX_STEPS:
        parser.error(f"--jobs and --chain: one ticket each, at most {MAX_STEPS} steps")
    why = unavailable()
    if why:
        print(f"bench/multihost.py: {why}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {m: {"tput": [], "lat": []} for m in ("local", "remote")}
    with tempfile.TemporaryDirectory(prefix="jetbox-multihost-") as tmp_name:
        hosts = Hosts(Path(tmp_name) / "hosts", workers=args.workers)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            hosts.up()
            main_home = hosts.homes[hosts.main]
            (main_home / "tickets").mkdir(parents=True, exist_ok=True)
            env = _env(main_home)
            up = [JBCTL, "up", "--listen", f"{MAIN_ADDRESS}:{PORT}", "--no-workers", "--console-port", "0", "--quiet"]
            procs.append(_start(hosts, hosts.main, up, env, main_home / "up.log"))
            deadline = time.monotonic() + 60
            while not (main_home / "run" / "redis.tcp.url").exists():
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(f"jbctl up did not start; see {main_home / 'up.log'}")
                time.sleep(0.1)
            join = main_home / "join.json"
            made = subprocess.run(
                hosts.argv(hosts.main, [JBCTL, "join-token", "-o", str(join), "-q", "cpu"]),
                env=env,
                capture_output=True,
            )
            if made.returncode != 0:
                raise RuntimeError(f"jbctl join-token: {made.stderr.decode()}")
            count = 0
            for rnd in range(args.rounds):
                for mode in ("local", "remote") if rnd % 2 == 0 else ("remote", "local"):
                    workers = []
                    for i, w in enumerate(hosts.workers):
                        if mode == "local":
                            argv = [JBCTL, "worker", "--queue", "cpu", "--name", f"local{i}"]
                            workers.append(_start(hosts, hosts.main, argv, env, main_home / f"local{i}.log"))
                        else:
                            home = hosts.homes[w]
                            copy = home / "join.json"
                            copy.write_bytes(join.read_bytes())
                            copy.chmod(0o600)
                            argv = [JBCTL, "worker", "--join", str(copy)]
                            workers.append(_start(hosts, w, argv, _env(home), home / "worker.log"))
                    try:
                        count += 1
                        _run_ticket(main_home, f"TICKET-{count}", args.workers * 2, False, 120)  # warm up
                        count += 1
                        span = _run_ticket(main_home, f"TICKET-{count}", args.jobs, False, 60 + 5 * args.jobs)
                        results[mode]["tput"].append(args.jobs / span)
                        if args.chain:
                            count += 1
                            span = _run_ticket(main_home, f"TICKET-{count}", args.chain, True, 60 + 5 * args.chain)
                            results[mode]["lat"].append(span / args.chain)
                    finally:
                        for proc in workers:
                            _stop(proc)
        finally:
            for proc in procs:
                _stop(proc)
            hosts.close()
    load = os.getloadavg()
    print(
        f"jetbox bench/multihost.py: {args.workers} worker(s) a side, {args.jobs} independent + {args.chain} chained "
        f"no-op jobs a round, {args.rounds} round(s), {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f}"
    )
    for mode in ("local", "remote"):
        tput, lat = results[mode]["tput"], results[mode]["lat"]
        where = "main host, unix socket" if mode == "local" else "other hosts, TCP over veth"
        line = f"  {mode:6} ({where:26}) throughput {statistics.median(tput):7.1f} jobs/s"
        if lat:
            line += f"   chained {1000 * statistics.median(lat):7.1f} ms/job"
        print(line + f"   rounds: {json.dumps([round(t, 1) for t in tput])}")
    ratio = statistics.median(results["remote"]["tput"]) / statistics.median(results["local"]["tput"])
    print(f"  throughput ratio (remote/local): {ratio:.2f}")
    if args.chain:
        added = 1000 * (statistics.median(results["remote"]["lat"]) - statistics.median(results["local"]["lat"]))
        print(f"  added latency per chained job (remote - local): {added:+.1f} ms")
    print("  artifact throughput (object store, 100 MB checkpoint): not measured: no S3 artifact backend in this tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
