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

Artifact throughput, when the S3 artifact backend and moto are installed: an S3-compatible server
(moto's standalone server) on the main host's address; a 100 MB checkpoint (`--artifact-mb`) is put
into the store (MB/s up) and fetched into an empty read cache (MB/s down), from the main host and
from a worker host, alternating, each round. moto keeps objects in memory in one Python process: the
figures measure the path (client, network namespace hop), not a production object store.
Needs root (namespaces); prints one line and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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

from bench.dispatch import _stop  # noqa: E402
from schema.ticket import MAX_STEPS  # noqa: E402
from tests.netns_hosts import MAIN_ADDRESS, Hosts, unavailable  # noqa: E402

JBCTL = str(Path(sys.executable).parent / "jbctl")
PORT = 6392
S3_PORT = 6393
BUCKET = "jetbox-bench"
# Run on a host: put a fresh random file of N MB into the store, then fetch it with an empty cache.
TRANSFER = """
import json, os, sys, time
from pathlib import Path
from schema.artifact_store import ArtifactStore
from schema.settings import load_settings
size = int(sys.argv[1]) << 20
home = Path(os.environ["JETBOX_HOME"]) / f"transfer-{os.getpid()}"
home.mkdir(parents=True)
src = home / "checkpoint.bin"
with src.open("wb") as f:
    for _ in range(size >> 20):
        f.write(os.urandom(1 << 20))
store = ArtifactStore.from_settings(load_settings(home=home / "up"))
t = time.perf_counter()
aid = store.put_file(src)
up = time.perf_counter() - t
fresh = ArtifactStore.from_settings(load_settings(home=home / "down"))
t = time.perf_counter()
got = fresh.path(aid)
down = time.perf_counter() - t
assert got.stat().st_size == size, got
print(json.dumps({"up": size / up / 1e6, "down": size / down / 1e6}))
"""


def _no_object_store() -> str | None:
    if importlib.util.find_spec("schema.artifact_s3") is None:
        return "no S3 artifact backend in this tree"
    for module in ("boto3", "moto"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JETBOX_", "NOTIFY_", "WATCHDOG_"))}
    path = os.pathsep.join([str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    env.update(JETBOX_HOME=str(home), PYTHONPATH=path, PYTHONUNBUFFERED="1", NO_COLOR="1")
    return env


def _start(hosts: Hosts, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(hosts.argv(host, argv), env=env, stdout=out, stderr=out, start_new_session=True)


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
    parser.add_argument("--artifact-mb", type=int, default=100, help="checkpoint size for the store figures (0: none)")
    args = parser.parse_args()
    if not 1 <= args.workers <= 4:
        parser.error("--workers: 1 to 4")
    if not 1 <= args.jobs <= MAX_STEPS or not 0 <= args.chain <= MAX_STEPS:
        parser.error(f"--jobs and --chain: one ticket each, at most {MAX_STEPS} steps")
    why = unavailable()
    if why:
        print(f"bench/multihost.py: {why}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {
        m: {"tput": [], "lat": [], "up": [], "down": []} for m in ("local", "remote")
    }
    no_store = _no_object_store() if args.artifact_mb else "--artifact-mb 0"
    store_env: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="jetbox-multihost-") as tmp_name:
        hosts = Hosts(Path(tmp_name) / "hosts", workers=args.workers)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            hosts.up()
            main_home = hosts.homes[hosts.main]
            (main_home / "tickets").mkdir(parents=True, exist_ok=True)
            if no_store is None:
                store_env = _object_store(hosts, main_home, procs)
            env = {**_env(main_home), **store_env}
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
                    if no_store is None:
                        host = hosts.main if mode == "local" else hosts.workers[0]
                        rates = _transfer(hosts, host, {**_env(hosts.homes[host]), **store_env}, args.artifact_mb)
                        results[mode]["up"].append(rates["up"])
                        results[mode]["down"].append(rates["down"])
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
    if no_store is not None:
        print(f"  artifact throughput (object store): not measured: {no_store}")
        return 0
    for mode in ("local", "remote"):
        r = results[mode]
        print(
            f"  {mode:6} store, {args.artifact_mb} MB checkpoint: up {statistics.median(r['up']):7.1f} MB/s   "
            f"down {statistics.median(r['down']):7.1f} MB/s   rounds up {json.dumps([round(x) for x in r['up']])} "
            f"down {json.dumps([round(x) for x in r['down']])}"
        )
    for way in ("up", "down"):
        ratio = statistics.median(results["remote"][way]) / statistics.median(results["local"][way])
        print(f"  store {way} ratio (remote/local): {ratio:.2f}")
    return 0


def _object_store(hosts: Hosts, main_home: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, str]:
    """moto's S3 server on the main host's address, and a bucket; the variables every host uses."""
    endpoint = f"http://{MAIN_ADDRESS}:{S3_PORT}"
    store_env = {
        "JETBOX_ARTIFACTS_URL": f"s3://{BUCKET}/jetbox",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "jetbox-bench-key",
        "AWS_SECRET_ACCESS_KEY": "jetbox-bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server = [sys.executable, "-m", "moto.server", "-H", MAIN_ADDRESS, "-p", str(S3_PORT)]
    procs.append(_start(hosts, hosts.main, server, _env(main_home), main_home / "moto.log"))
    make = f"import boto3; boto3.client('s3', endpoint_url={endpoint!r}).create_bucket(Bucket={BUCKET!r})"
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(
            hosts.argv(hosts.main, [sys.executable, "-c", make]),
            env={**_env(main_home), **store_env},
            capture_output=True,
        )
        if done.returncode == 0:
            return store_env
        if time.monotonic() > deadline:
            raise RuntimeError(f"the S3 server did not come up: {done.stderr.decode()[-500:]}")
        time.sleep(1)


def _transfer(hosts: Hosts, host: str, env: dict[str, str], mb: int) -> dict[str, float]:
    done = subprocess.run(
        hosts.argv(host, [sys.executable, "-c", TRANSFER, str(mb)]), env=env, capture_output=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"artifact transfer on {host} failed: {done.stderr.decode()[-1000:]}")
    return {k: float(v) for k, v in json.loads(done.stdout.decode().strip().splitlines()[-1]).items()}


if __name__ == "__main__":
    sys.exit(main())
