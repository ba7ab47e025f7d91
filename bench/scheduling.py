"""Scheduling benchmark: what the ordering rules cost the decider per report (docs/SCHEDULING.md).

    .venv/bin/python bench/scheduling.py                          # this tree
    .venv/bin/python bench/scheduling.py --tree /path/to/main     # another checkout's decider (baseline only
                                                                  # when it has no scheduling rules)

A ticket whose steps form a chain: each success report is decided (and its events applied) and
schedules the next step, the path every job takes between two dispatches. Timed per report:
- baseline: no limits, nothing waits (all a tree without the scheduling rules can run);
- held: the same while W other tickets are held (their tasks wait);
- ranked: `queue_limits = {cpu: 1}` and W lower-priority tasks waiting for the same queue, so every
  report ranks all of them before scheduling the chain's next step (the worst case).
- placed: the chain on the gpu queue (`gpu_memory: 1G`) with 8 advertised workers of 2 cards
  each, and W other 1G attempts out on those cards: every report places the next step (finds a
  worker and a card, counting the claims of all W).
The end-to-end dispatch latency (bench/dispatch.py) is ~10 ms per job; compare the figures with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv[:-1] else None
sys.path.insert(0, _TREE or str(Path(__file__).resolve().parent.parent))

from daemon import commands as c  # noqa: E402
from daemon.decider import decide  # noqa: E402
from daemon.state import State, evolve  # noqa: E402
from schema.ticket import parse_ticket  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _ticket(tid: str, body: str, extra: str = "") -> c.SubmitTicket:
    text = f"id: {tid}\ntitle: bench\ngoal: measure\nsteps:\n{body}{extra}"
    return c.SubmitTicket(now=T0, path=f"/t/{tid}.yaml", content_hash=tid + extra, ticket=parse_ticket(text.encode()))


def _apply(state: State, command: c.Command) -> list:
    events = decide(state, command)
    for e in events:
        evolve(state, e)
    return events


def per_report_us(steps: int, waiting: int, mode: str) -> float:
    """Median microseconds to decide and apply one success report of the chain."""
    state = State()
    if mode == "ranked":
        _apply(state, c.SetQueueLimits(now=T0, limits={"cpu": 1}))
    placed = ", queue: gpu, gpu_memory: 1G" if mode == "placed" else ""
    if mode == "placed":
        from schema.events import GpuCard

        for w in range(8):
            cards = [GpuCard(id=f"n{w}/{i}", index=i, memory=max(1, waiting // 16 + 2) << 30) for i in range(2)]
            _apply(state, c.RecordWorkerAdvertised(now=T0, worker=f"w{w}", node=f"n{w}", queues=["gpu"], gpus=cards))
    chain = "".join(
        f"  - {{id: s{i}, kind: diag{placed}{f', needs: [s{i - 1}]' if i else ''}}}\n" for i in range(steps)
    )
    # First, so its first step takes the one cpu slot; priority 10 keeps it ahead of all that waits.
    _apply(state, _ticket("TICKET-chain", chain, "priority: 10\n" if mode == "ranked" else ""))
    for i in range(waiting):
        body = f"  - {{id: a, kind: diag{placed}}}\n"
        _apply(state, _ticket(f"TICKET-w{i}", body, "hold: true\n" if mode == "held" else ""))
    if mode == "placed":
        assert len(state.live) == waiting + 1 and not state.deferred, (len(state.live), len(state.deferred))
    else:
        assert mode == "baseline" or len(state.deferred) == waiting, (mode, len(state.deferred))
    times = []
    for i in range(steps):
        cmd = c.RecordJobSucceeded(now=T0 + timedelta(seconds=i), ticket="TICKET-chain", task=f"s{i}", attempt=1)
        t0 = time.perf_counter()
        events = _apply(state, cmd)
        times.append(time.perf_counter() - t0)
        if i + 1 < steps:
            assert any(e.type == "AttemptScheduled" and e.task == f"s{i + 1}" for e in events), (mode, i, events)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--tree", help="import the decider from this checkout instead")
    args = parser.parse_args()
    baseline_only = not hasattr(c, "SetQueueLimits")
    print(
        f"bench/scheduling.py: median time to decide one report of a {args.steps}-step chain, "
        f"decider from {Path(c.__file__).parent.parent}"
    )
    print(f"  baseline (nothing waits)                 {per_report_us(args.steps, 0, 'baseline'):8.1f} us")
    if baseline_only:
        return
    print(
        f"  {args.waiting} held tickets waiting             {per_report_us(args.steps, args.waiting, 'held'):8.1f} us"
    )
    ranked = per_report_us(args.steps, args.waiting, "ranked")
    print(f"  queue limit, {args.waiting} tasks ranked per report  {ranked:8.1f} us")
    if hasattr(c, "RecordWorkerAdvertised"):
        placed = per_report_us(args.steps, args.waiting, "placed")
        print(f"  placed, 16 cards, {args.waiting} attempts out     {placed:8.1f} us")


if __name__ == "__main__":
    main()
