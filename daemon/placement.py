"""Placement: which advertised worker (and which of its cards) an attempt runs on. Pure, like the decider.

A queue is *placed* while at least one live worker that serves it has advertised itself
(`WorkerAdvertised`); every attempt of a placed queue then goes to one worker's own queue
(`worker__<name>`), chosen here, and claims memory on that worker's cards. A queue no advertised
worker serves works as before: one shared RQ queue, any worker listening takes the job
(docs/SCHEDULING.md, "Placement").

What is counted: GPU memory per card, over every worker that advertises the card (two workers on one
card share it); a step's `gpus` (how many cards, all on one worker); its `cpus` and `memory` are
checked against the worker's totals (an RQ worker runs one job at a time, so they are never shared
by two running jobs of one worker). Nothing here measures what a job really uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.state import State, TaskState, WorkerInfo
from schema import events as ev


@dataclass
class Usage:
    """What the attempts out hold: jobs per queue and the legacy per-queue GPU memory (counted here),
    and, for placed attempts, the memory claimed per card and the jobs per worker (the state's own
    sums, `State.card_used`/`worker_load`, copied: `_fill` adds what it schedules as it goes)."""

    out_per_queue: dict[str, int] = field(default_factory=dict)
    gpu_used: dict[str, int] = field(default_factory=dict)  # queue -> bytes (queue_gpu_memory)
    card_used: dict[str, int] = field(default_factory=dict)  # card id -> bytes claimed
    load: dict[str, int] = field(default_factory=dict)  # worker -> attempts out placed on it

    def add(self, state: State, task: TaskState) -> None:
        self.out_per_queue[task.queue] = self.out_per_queue.get(task.queue, 0) + 1
        if task.placed is not None:
            worker, cards = task.placed
            self.load[worker] = self.load.get(worker, 0) + 1
            for card in cards:
                self.card_used[card] = self.card_used.get(card, 0) + task.claimed
        elif task.queue in state.queue_gpu_memory:
            self.gpu_used[task.queue] = self.gpu_used.get(task.queue, 0) + task.claimed


def usage(state: State) -> Usage:
    """One walk over the attempts out (`State.live`) for the counts per queue; a task is read only on a
    queue whose memory is counted per queue. Placed claims come from the state's sums."""
    out = Usage(card_used=dict(state.card_used), load=dict(state.worker_load))
    counted = state.queue_gpu_memory
    for (tid, task_id), queue in state.live.items():
        out.out_per_queue[queue] = out.out_per_queue.get(queue, 0) + 1
        if queue in counted and (tid, task_id) not in state.claims:
            out.gpu_used[queue] = out.gpu_used.get(queue, 0) + state.tickets[tid].tasks[task_id].claimed
    return out


def placed_queues(state: State) -> set[str]:
    return {q for w in state.workers.values() for q in w.queues}


@dataclass(frozen=True)
class Placement:
    worker: str
    cards: tuple[str, ...]
    indices: tuple[int, ...]  # the cards as the worker's CUDA numbers them
    claim: int  # bytes on each card (0: no card)


@dataclass(frozen=True)
class Need:
    gpus: int
    gpu_memory: int | None  # per card; None: the whole card
    cpus: float
    memory: int


def needs_of(task: TaskState) -> Need:
    declared = task.needs_res
    gpus = declared.gpus if declared is not None and declared.gpus is not None else (1 if task.queue == "gpu" else 0)
    return Need(
        gpus=gpus,
        gpu_memory=task.gpu_memory or None,
        cpus=declared.cpus if declared is not None else 0.0,
        memory=declared.memory if declared is not None else 0,
    )


def card_sizes(state: State) -> dict[str, int]:
    """Each card's memory, as the latest advert that names it says (workers sharing a card agree
    unless one was configured wrongly; the latest word wins, and is in the log)."""
    sizes: dict[str, int] = {}
    for w in sorted(state.workers.values(), key=lambda w: w.order):
        for card in w.gpus:
            sizes[card.id] = card.memory
    return sizes


def size(n: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.3g}{unit}"
    return f"{n}B"


def _fits_idle(w: WorkerInfo, need: Need) -> bool:
    """Whether the worker could ever hold the step (with nothing else on it)."""
    if need.cpus and w.cpus < need.cpus:
        return False
    if need.memory and w.memory < need.memory:
        return False
    big = [c for c in w.gpus if need.gpu_memory is None or c.memory >= need.gpu_memory]
    return len(big) >= need.gpus


def place(state: State, task: TaskState, use: Usage, sizes: dict[str, int]) -> Placement | tuple[ev.WaitRule, str]:
    """The worker and cards for the task's next attempt, or why it waits: `placement` (it fits on a
    live worker, not now) or `no_worker` (no live worker could ever hold it).

    Choice, deterministic: the worker with the fewest attempts out on it (a free worker first: two
    workers on one card each take one of two small jobs, so they share it at once), then the best
    fit (the least memory left free on the cards it takes), then fewer cards (a CPU job leaves the
    GPU workers alone), then the name."""
    need = needs_of(task)
    serving = [w for w in state.workers.values() if task.queue in w.queues]
    able = [w for w in serving if _fits_idle(w, need)]
    if not able:
        return "no_worker", _never(serving, need, task.queue)
    best: tuple[tuple[int, int, int, str], Placement] | None = None
    for w in able:
        picked: list[tuple[int, ev.GpuCard]] = []
        for card in w.gpus:
            total = sizes.get(card.id, card.memory)
            free = total - use.card_used.get(card.id, 0)
            claim = need.gpu_memory if need.gpu_memory is not None else total
            if free >= claim:
                picked.append((free - claim, card))
        if len(picked) < need.gpus:
            continue
        picked.sort(key=lambda p: (p[0], p[1].id))
        chosen = picked[: need.gpus]
        claim = (need.gpu_memory or max((sizes.get(c.id, c.memory) for _, c in chosen), default=0)) if chosen else 0
        key = (use.load.get(w.name, 0), sum(left for left, _ in chosen), len(w.gpus), w.name)
        if best is None or key < best[0]:
            best = (
                key,
                Placement(
                    worker=w.name,
                    cards=tuple(c.id for _, c in chosen),
                    indices=tuple(c.index for _, c in chosen),
                    claim=claim,
                ),
            )
    if best is not None:
        return best[1]
    return "placement", _not_now(able, need, use, sizes)


def _never(serving: list[WorkerInfo], need: Need, queue: str) -> str:
    """Why no live worker of the queue could hold the step, naming what is missing and the most there is."""
    if not serving:
        return f"no live worker serves queue {queue} (every advertised one is gone): start one"
    most = max(serving, key=lambda w: (len(w.gpus), w.name))
    if len(most.gpus) < need.gpus:
        return f"no worker has {need.gpus} GPUs (the most: {len(most.gpus)}, on {most.name})"
    with_gpus = [w for w in serving if len(w.gpus) >= need.gpus]
    if (
        need.gpu_memory is not None
        and need.gpus
        and not any(sum(c.memory >= need.gpu_memory for c in w.gpus) >= need.gpus for w in with_gpus)
    ):
        card = max((c for w in serving for c in w.gpus), key=lambda c: (c.memory, c.id))
        many = f"{need.gpus} GPUs" if need.gpus > 1 else "a GPU"
        return f"no worker has {many} with {size(need.gpu_memory)} (the largest card: {size(card.memory)}, {card.id})"
    if need.cpus and not any(w.cpus >= need.cpus for w in serving):
        top = max(serving, key=lambda w: (w.cpus, w.name))
        return f"no worker has {need.cpus:g} CPUs (the most: {top.cpus:g}, on {top.name})"
    top = max(serving, key=lambda w: (w.memory, w.name))
    return f"no worker has {size(need.memory)} of memory (the most: {size(top.memory)}, on {top.name})"


def _not_now(able: list[WorkerInfo], need: Need, use: Usage, sizes: dict[str, int]) -> str:
    """Why a step that fits some live worker waits: the memory it needs is claimed."""
    cards = {c.id: c for w in able for c in w.gpus}
    free = {cid: sizes.get(cid, c.memory) - use.card_used.get(cid, 0) for cid, c in cards.items()}
    top = max(cards, key=lambda cid: (free[cid], cid))
    most = f"the most free: {size(free[top])} of {size(sizes.get(top, cards[top].memory))} on {top}"
    many = f"{need.gpus} GPUs" if need.gpus > 1 else "a GPU"
    if need.gpu_memory is None:
        return f"waiting for {many} with nothing on {'them' if need.gpus > 1 else 'it'} ({most})"
    return f"waiting for {many} with {size(need.gpu_memory)} free ({most})"
