"""Crash torture: tickets with DAGs, retries and checkpoints on real processes (Redis, the daemon, two
workers) while a seeded chaos loop kill -9s one of them every 0.5-2.5 s and restarts it, tickets still
being dropped during the chaos. Afterwards it checks that nothing was lost, duplicated or stuck.

    PYTHONPATH=. .venv/bin/python bench/torture.py                      # 100 kills (docs/BENCHMARKS.md)
    PYTHONPATH=. .venv/bin/python bench/torture.py --kills 20 --tickets 8 --seed 3   # the CI size

Checks: every dropped ticket submitted exactly once and completed (nothing rejected, failed or left
running), no task with two accepted successes, no ticket ended twice, no attempt recorded twice, no
report applied twice, no loop taken for the infrastructure's faults, `jbctl verify` and
`jbctl replay --check` pass. Exit status 0 when all hold. Redis comes back on the same unix socket,
empty (no persistence), as a flushed or restarted Redis would.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded import PrivateRedis, start_redis  # noqa: E402
from tests.jbdaemon import event_rows  # noqa: E402

JBCTL = str(Path(sys.executable).parent / "jbctl")
VICTIMS = ("daemon", "worker-1", "worker-2", "redis")
ENDS = ("TicketCompleted", "TicketFailed", "TicketCancelled")
# Fast failure detection, with enough slack for a loaded 2-core machine.
ENV = {
    "JETBOX_HEARTBEAT_SECONDS": "0.5",
    "JETBOX_HEARTBEAT_TIMEOUT_SECONDS": "3",
    "JETBOX_RESCAN_SECONDS": "1",
}


def ticket_text(tid: str, rng: random.Random) -> str:
    """A diamond DAG (a → b, c → d) of diag jobs that sleep, checkpoint, and sometimes fail once on their own."""

    def step(sid: str, needs: list[str]) -> str:
        steps = rng.randint(4, 12)
        with_ = {
            "steps": steps,
            "sleep": round(rng.uniform(0.3, 2.5), 2),
            "checkpoints": rng.choice([0, 2, steps // 2]),
            "fail_attempts": rng.choice([0, 0, 0, 1]),
            "error": f"flaky {sid}",
            "metrics": {"score": 0.9},
        }
        need = f", needs: [{', '.join(needs)}]" if needs else ""
        return f"  - {{id: {sid}, kind: diag, retries: 20{need}, with: {json.dumps(with_)}}}\n"

    steps = step("a", []) + step("b", ["a"]) + step("c", ["a"]) + step("d", ["b", "c"])
    return (
        f"id: {tid}\ntitle: torture {tid}\ngoal: survive the chaos\nsteps:\n{steps}"
        "acceptance: [{metric: a.score, op: '>=', value: 0.5}]\n"
    )


@dataclass
class Result:
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    self_exits: collections.Counter[str] = field(default_factory=collections.Counter)
    tickets: int = 0
    chaos_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kills = ", ".join(f"{v} {self.kills[v]}" for v in VICTIMS)
        out = [
            f"kills: {sum(self.kills.values())} ({kills})",
            f"tickets: {self.tickets} dropped, {self.counts.get('completed', 0)} completed",
            f"attempts: {self.counts.get('attempts', 0)} scheduled, {self.counts.get('succeeded', 0)} succeeded, "
            f"{self.counts.get('failed_job', 0)} failed (job), {self.counts.get('failed_infra', 0)} failed "
            f"(infrastructure); loops {self.counts.get('loops', 0)}",
            f"events: {self.counts.get('events', 0)}",
            f"time: chaos {self.chaos_s:.0f}s, drain {self.drain_s:.0f}s, total {self.total_s:.0f}s",
        ]
        if self.self_exits:
            out.append("exited on their own (restarted): " + ", ".join(f"{k} {n}" for k, n in self.self_exits.items()))
        verdict = f"PROBLEMS ({len(self.problems)}):" if self.problems else "OK: nothing lost, duplicated or stuck"
        out.append(verdict)
        out += [f"  - {p}" for p in self.problems[:40]]
        return out


class Rig:
    """One home: a private Redis on a fixed unix socket, `jbctl daemon`, and two `jbctl worker`s."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.tickets = home / "tickets"
        self.tickets.mkdir(parents=True, exist_ok=True)
        self.logs = home / "logs"
        self.logs.mkdir(exist_ok=True)
        self.redis: PrivateRedis = start_redis(home / "run")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JETBOX_", "NOTIFY_", "WATCHDOG_"))}
        self.env.update(ENV, JETBOX_HOME=str(home), JETBOX_REDIS_URL=self.redis.url, NO_COLOR="1")
        self.env.setdefault("PYTHONPATH", str(ROOT))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in VICTIMS[:3]:
            self.start(name)

    def start(self, name: str) -> None:
        if name == "redis":
            self.redis = start_redis(self.home / "run")  # same socket, empty
            return
        argv = [JBCTL, "daemon"] if name == "daemon" else [JBCTL, "worker", "--queue", "cpu", "--name", name]
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def kill(self, name: str) -> None:
        """kill -9 (the whole process group, for a worker's check subprocesses), then start it again."""
        if name == "redis":
            self.redis.proc.kill()
            self.redis.proc.wait()
        else:
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.start(name)

    def revive(self) -> list[str]:
        """Start again whatever exited by itself (a finding: nothing should)."""
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if self.redis.proc.poll() is not None:
            dead.append("redis")
        for name in dead:
            self.start(name)
        return dead

    def drop(self, tid: str, text: str) -> None:
        """What editors and `jbctl submit` do: a temp file in the folder, renamed over."""
        tmp = self.tickets / f".{tid}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.tickets / f"{tid}.yaml")

    def rows(self) -> list[tuple[int, str, dict[str, Any]]]:
        return [(r["seq"], r["type"], r["data"]) for r in event_rows(self.home)]

    def jbctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([JBCTL, *args], env=self.env, capture_output=True, text=True, timeout=300)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.redis.stop()


def ended(rows: list[tuple[int, str, dict[str, Any]]]) -> dict[str, str]:
    return {d["ticket"]: t for _, t, d in rows if t in ENDS}


def check(rig: Rig, dropped: list[str], result: Result) -> None:
    rows = rig.rows()
    by_type = collections.Counter(t for _, t, _ in rows)
    problems = result.problems
    submitted = collections.Counter(d["ticket"] for _, t, d in rows if t == "TicketSubmitted")
    rejected = [d for _, t, d in rows if t == "TicketRejected"]
    ends = collections.Counter(d["ticket"] for _, t, d in rows if t in ENDS)
    last_end = ended(rows)
    for tid in dropped:
        if submitted[tid] != 1:
            problems.append(f"{tid} submitted {submitted[tid]} times")
        if ends[tid] > 1:
            problems.append(f"{tid} ended {ends[tid]} times")
        if last_end.get(tid) != "TicketCompleted":
            problems.append(f"{tid} did not complete: {last_end.get(tid, 'still running')}")
    problems += [f"rejected: {r['path']}: {r['errors']}" for r in rejected]
    successes = collections.Counter((d["ticket"], d["task"]) for _, t, d in rows if t == "AttemptSucceeded")
    problems += [f"{k[0]}/{k[1]} succeeded {n} times" for k, n in successes.items() if n > 1]
    attempts = collections.Counter(
        (t, d["ticket"], d["task"], d["attempt"])
        for _, t, d in rows
        if t in ("AttemptScheduled", "AttemptStarted", "AttemptSucceeded", "AttemptFailed")
    )
    problems += [f"{k} recorded {n} times" for k, n in attempts.items() if n > 1]
    reports = collections.Counter(
        (d["ticket"], d["task"], d["attempt"], d["report_seq"]) for _, _, d in rows if d.get("report_seq")
    )
    problems += [f"report {k} applied {n} times" for k, n in reports.items() if n > 1]
    loops = [d for _, t, d in rows if t in ("LoopDetected", "TaskBlocked")]
    problems += [f"blocked: {d['ticket']}/{d['task']}: {d.get('reason', d.get('pattern'))}" for d in loops]
    for args in (("verify",), ("replay", "--check")):
        out = rig.jbctl(*args)
        if out.returncode != 0:
            problems.append(f"jbctl {' '.join(args)} failed: {(out.stdout + out.stderr).strip()[-500:]}")
    failed = [d for _, t, d in rows if t == "AttemptFailed"]
    result.counts = {
        "events": len(rows),
        "attempts": by_type["AttemptScheduled"],
        "succeeded": by_type["AttemptSucceeded"],
        "failed_job": sum(1 for d in failed if d.get("cause", "job") == "job"),
        "failed_infra": sum(1 for d in failed if d.get("cause") == "infrastructure"),
        "loops": by_type["LoopDetected"],
        "completed": sum(1 for tid in dropped if last_end.get(tid) == "TicketCompleted"),
    }


def stuck_report(rig: Rig, dropped: list[str]) -> list[str]:
    """Where the unfinished tickets stand: their tasks' last events."""
    rows = rig.rows()
    done = ended(rows)
    last: dict[tuple[str, str], str] = {}
    for seq, t, d in rows:
        if d.get("ticket") in dropped and "task" in d:
            last[(d["ticket"], d["task"])] = f"{t}#{d.get('attempt', '')}@{seq}"
    return [
        f"{tid}: " + ", ".join(f"{task}={what}" for (tk, task), what in sorted(last.items()) if tk == tid)
        for tid in dropped
        if tid not in done
    ]


def run(kills: int, tickets: int, seed: int, home: Path, drain_timeout: float = 600.0, quiet: bool = False) -> Result:
    rng = random.Random(seed)
    result = Result(tickets=tickets)
    say = (lambda _m: None) if quiet else (lambda m: print(m, flush=True))
    started = time.monotonic()
    rig = Rig(home)
    dropped: list[str] = []
    texts = [(f"TICKET-{n + 1}", ticket_text(f"TICKET-{n + 1}", rng)) for n in range(tickets)]
    # Ticket j is dropped after kill floor(j * 0.8 * kills / tickets): the first before any kill, the
    # last well inside the chaos.
    when = [int(j * 0.8 * kills / max(1, tickets)) for j in range(tickets)]
    try:
        for k in range(kills + 1):
            while texts and when[len(dropped)] <= k:
                tid, text = texts.pop(0)
                rig.drop(tid, text)
                dropped.append(tid)
            if k == kills:
                break
            time.sleep(rng.uniform(0.5, 2.5))
            for name in rig.revive():
                result.self_exits[name] += 1
            victim = rng.choice(VICTIMS)
            rig.kill(victim)
            result.kills[victim] += 1
            if (k + 1) % 10 == 0:
                say(f"  {k + 1} kills, {len(dropped)} tickets dropped, {len(ended(rig.rows()))} ended")
        result.chaos_s = time.monotonic() - started
        drain_start = time.monotonic()
        deadline = drain_start + drain_timeout
        while len(ended(rig.rows())) < len(dropped) and time.monotonic() < deadline:
            for name in rig.revive():
                result.self_exits[name] += 1
            time.sleep(0.5)
        result.drain_s = time.monotonic() - drain_start
        if len(ended(rig.rows())) < len(dropped):
            result.problems += ["stuck after the chaos: " + s for s in stuck_report(rig, dropped)]
    finally:
        rig.stop()
    check(rig, dropped, result)
    result.problems += [f"{name} exited on its own {n} times" for name, n in result.self_exits.items()]
    result.total_s = time.monotonic() - started
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--tickets", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the tickets afterwards")
    ap.add_argument("--dir", type=Path, help="keep the home here (default: a temporary folder, removed if all is well)")
    args = ap.parse_args()
    home = args.dir or Path(tempfile.mkdtemp(prefix="jetbox-torture-"))
    print(f"torture: {args.kills} kills, {args.tickets} tickets, seed {args.seed}, home {home}", flush=True)
    result = run(args.kills, args.tickets, args.seed, home, args.drain_timeout)
    for line in result.lines():
        print(line)
    if not result.problems and args.dir is None:
        shutil.rmtree(home, ignore_errors=True)
    elif result.problems:
        print(f"home kept for inspection: {home}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
