"""GPU-aware placement: workers advertise what they have, the decider places each attempt on a worker
(and its cards) where it fits, never over-commits a card, lets small jobs share one, and says what is
missing when a step waits (docs/SCHEDULING.md, "Placement").

Pure decider tests, hostile inputs (ticket fields, adverts, worker flags), and one real-process test:
two workers advertising different cards, a job lands on the one that fits, two small jobs share a card
at the same time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import commands as c
from daemon.decider import UNPLACEABLE_S
from daemon.placement import card_sizes
from daemon.state import State
from schema import events as ev
from schema.plan import LIVE
from schema.ticket import TicketInvalid, parse_ticket
from schema.wire import Advert, sign, worker_queue
from tests.helpers import make_ticket, submit, ticket_yaml
from tests.jbdaemon import JBCTL
from tests.test_scheduling import T0, apply, done, scheduled

G = 1 << 30


def advert(name: str, cards: list[tuple[str, int]], queues: tuple[str, ...] = ("gpu",), **kw: Any) -> c.Command:
    gpus = [ev.GpuCard(id=cid, index=i, memory=mem * G) for i, (cid, mem) in enumerate(cards)]
    return c.RecordWorkerAdvertised(
        now=kw.pop("now", T0), worker=name, node=name, queues=list(queues), gpus=gpus, cpus=4, memory=32 * G, **kw
    )


def gpu_step(mem: str | None = None, more: str = "", sid: str = "a") -> str:
    return f"  - {{id: {sid}, kind: diag, queue: gpu" + (f", gpu_memory: {mem}" if mem else "") + more + "}\n"


def placed(events: list[ev.Event]) -> list[tuple[str | None, list[str], int | None]]:
    return [(e.worker, e.gpus, e.gpu_memory) for e in events if isinstance(e, ev.AttemptScheduled)]


def deferred(events: list[ev.Event]) -> ev.TaskDeferred:
    found = [e for e in events if isinstance(e, ev.TaskDeferred)]
    assert found, [e.type for e in events]
    return found[-1]


def two_workers() -> State:
    s = State()
    apply(s, advert("small", [("small/0", 8)]))
    apply(s, advert("big", [("big/0", 24), ("big/1", 24)]))
    return s


def test_a_step_lands_on_the_worker_whose_card_fits_and_the_placement_is_recorded() -> None:
    s = two_workers()
    events = apply(s, submit(make_ticket("TICKET-1", steps=gpu_step("12G")), T0))
    assert placed(events) == [("big", ["big/0"], 12 * G)]
    sched = next(e for e in events if isinstance(e, ev.AttemptScheduled))
    assert sched.device == "cuda:0"  # the card as the worker's CUDA numbers it
    # A small one fits both: the free worker goes first (fewest attempts out on it).
    events = apply(s, submit(make_ticket("TICKET-2", steps=gpu_step("4G")), T0))
    assert placed(events) == [("small", ["small/0"], 4 * G)]


def test_two_small_jobs_share_a_card_a_third_waits_saying_what_is_missing() -> None:
    s = State()
    apply(s, advert("w1", [("box/0", 24)]))
    apply(s, advert("w2", [("box/0", 24)]))  # a second worker on the same card: they share its memory
    first = apply(s, submit(make_ticket("TICKET-1", steps=gpu_step("12G")), T0))
    second = apply(s, submit(make_ticket("TICKET-2", steps=gpu_step("10G")), T0))
    assert placed(first) == [("w1", ["box/0"], 12 * G)]
    assert placed(second) == [("w2", ["box/0"], 10 * G)]  # the other worker: they run at the same time
    events = apply(s, submit(make_ticket("TICKET-3", steps=gpu_step("12G")), T0))
    assert scheduled(events) == []
    why = deferred(events)
    assert why.rule == "placement"
    assert why.reason == "waiting for a GPU with 12G free (the most free: 2G of 24G on box/0)"
    events = apply(s, done("TICKET-1"))  # 12G freed on the card
    assert placed(events) == [("w1", ["box/0"], 12 * G)]


def test_a_step_that_declares_no_memory_takes_whole_cards_and_waits_for_an_empty_one() -> None:
    s = State()
    apply(s, advert("w", [("w/0", 24)]))
    apply(s, submit(make_ticket("TICKET-1", steps=gpu_step("1G")), T0))
    events = apply(s, submit(make_ticket("TICKET-2", steps=gpu_step(None)), T0))
    assert deferred(events).reason == "waiting for a GPU with nothing on it (the most free: 23G of 24G on w/0)"
    events = apply(s, done("TICKET-1"))
    assert placed(events) == [("w", ["w/0"], 24 * G)]


def test_no_worker_has_it_says_what_is_missing_and_blocks_after_a_while_unless_one_joins() -> None:
    s = two_workers()
    events = apply(s, submit(make_ticket("TICKET-1", steps=gpu_step("12G", ", gpus: 3")), T0))
    why = deferred(events)
    assert (why.rule, why.reason) == ("no_worker", "no worker has 3 GPUs (the most: 2, on big)")
    events = apply(s, submit(make_ticket("TICKET-2", steps=gpu_step("40G")), T0))
    assert deferred(events).reason == "no worker has a GPU with 40G (the largest card: 24G, big/1)"
    events = apply(s, submit(make_ticket("TICKET-3", steps=gpu_step("1G", ", cpus: 16")), T0))
    assert deferred(events).reason == "no worker has 16 CPUs (the most: 4, on small)"
    # Neither blocks the queue: a later step that fits runs at once.
    events = apply(s, submit(make_ticket("TICKET-4", steps=gpu_step("1G")), T0))
    assert [e.worker for e in events if isinstance(e, ev.AttemptScheduled)] == ["small"]
    # A worker with what TICKET-2 needs joins in time: it is placed there.
    events = apply(s, advert("huge", [("huge/0", 80)], now=T0 + timedelta(seconds=60)))
    assert placed(events) == [("huge", ["huge/0"], 40 * G)]
    # Nothing comes for the others: blocked once they waited UNPLACEABLE_S, with the way out.
    events = apply(s, c.Tick(now=T0 + timedelta(seconds=UNPLACEABLE_S - 1)))
    assert not [e for e in events if isinstance(e, ev.TaskBlocked)]
    events = apply(s, c.Tick(now=T0 + timedelta(seconds=UNPLACEABLE_S)))
    blocked = {e.ticket: e.reason for e in events if isinstance(e, ev.TaskBlocked)}
    assert set(blocked) == {"TICKET-1", "TICKET-3"}
    assert blocked["TICKET-1"] == (
        "no worker has 3 GPUs (the most: 2, on big), for 5 minutes: start a worker that has it, "
        "then `jbctl retry TICKET-1 --task a`"
    )
    # The way out: a worker with 4 cards, then `jbctl retry`; a retry with none waits 5 minutes again.
    later = T0 + timedelta(seconds=UNPLACEABLE_S + 10)
    events = apply(s, c.RetryTask(now=later, ticket="TICKET-3", task="a"))
    assert deferred(events).rule == "no_worker" and not [e for e in events if isinstance(e, ev.TaskBlocked)]
    apply(s, advert("quad", [(f"quad/{i}", 24) for i in range(4)], now=later))
    events = apply(s, c.RetryTask(now=later, ticket="TICKET-1", task="a"))
    assert placed(events) == [("quad", ["quad/0", "quad/1", "quad/2"], 12 * G)]


def test_multi_gpu_step_takes_cards_of_one_worker_and_cpu_memory_needs_pick_the_worker() -> None:
    s = two_workers()
    events = apply(s, submit(make_ticket("TICKET-1", steps=gpu_step("20G", ", gpus: 2")), T0))
    assert placed(events) == [("big", ["big/0", "big/1"], 20 * G)]
    s = State()
    apply(s, advert("lean", [], queues=("cpu",)))
    apply(s, c.RecordWorkerAdvertised(now=T0, worker="fat", node="fat", queues=["cpu"], cpus=32, memory=256 * G))
    events = apply(s, submit(make_ticket("TICKET-2", steps="  - {id: a, kind: diag, cpus: 8, memory: 64G}\n"), T0))
    assert placed(events) == [("fat", [], None)]
    events = apply(s, submit(make_ticket("TICKET-3", steps="  - {id: a, kind: diag, memory: 512G}\n"), T0))
    assert deferred(events).reason == "no worker has 512G of memory (the most: 256G, on fat)"


def test_a_queue_no_advertised_worker_serves_works_as_before() -> None:
    s = State()
    apply(s, advert("g", [("g/0", 24)]))  # serves gpu only
    events = apply(s, submit(make_ticket("TICKET-1", steps="  - {id: a, kind: diag}\n"), T0))
    sched = next(e for e in events if isinstance(e, ev.AttemptScheduled))
    assert (sched.queue, sched.worker, sched.gpus, sched.device) == ("cpu", None, [], "auto")


def test_a_lost_worker_frees_its_cards_and_its_unstarted_attempts_are_placed_again() -> None:
    s = State()
    apply(s, advert("w1", [("a/0", 24)]))
    apply(s, advert("w2", [("b/0", 24)]))
    assert placed(apply(s, submit(make_ticket("TICKET-1", steps=gpu_step(None)), T0)))[0][0] == "w1"
    assert placed(apply(s, submit(make_ticket("TICKET-2", steps=gpu_step(None)), T0)))[0][0] == "w2"
    events = apply(s, c.RecordWorkerGone(now=T0, worker="w1", reason="lost", detail="no sign of life for 2s"))
    assert [e.type for e in events][:2] == ["WorkerGone", "AttemptFailed"]
    failed = next(e for e in events if isinstance(e, ev.AttemptFailed))
    assert failed.cause == "infrastructure" and failed.retry_at is not None
    assert "worker w1 lost before it started the job" in failed.error
    assert "w1" not in s.workers and "a/0" not in card_sizes(s)
    # Its retry waits for a card (w2's is taken), then takes w2's when TICKET-2 is done.
    later = failed.retry_at
    events = apply(s, c.Tick(now=later))
    assert deferred(events).reason.startswith("waiting for a GPU with nothing on it")
    assert placed(apply(s, done("TICKET-2", now=later))) == [("w2", ["b/0"], 24 * G)]
    # A repeated advert (its liveness key set again after a Redis restart) records nothing.
    assert apply(s, advert("w2", [("b/0", 24)])) == []


def test_departed_worker_that_comes_back_is_advertised_again() -> None:
    s = State()
    apply(s, advert("w", [("w/0", 24)]))
    assert [e.type for e in apply(s, c.RecordWorkerGone(now=T0, worker="w", reason="departed"))] == ["WorkerGone"]
    assert apply(s, c.RecordWorkerGone(now=T0, worker="w", reason="departed")) == []
    assert [e.type for e in apply(s, advert("w", [("w/0", 24)]))] == ["WorkerAdvertised"]


# --- never over-committed, under random adverts, departures, submissions and results -------------


def _check_cards(state: State) -> None:
    sizes = card_sizes(state)
    used: dict[str, int] = {}
    for tid, task_id in state.live:
        task = state.tickets[tid].tasks[task_id]
        if task.placed is not None:
            assert task.placed[0] in state.workers or task.status == "running"
            for card in task.placed[1]:
                used[card] = used.get(card, 0) + task.claimed
    for card, n in used.items():
        if card in sizes:
            assert n <= sizes[card], f"card {card} over-committed: {n} > {sizes[card]}"
    assert state.card_used == used  # the sums evolve keeps agree with the attempts out
    load: dict[str, int] = {}
    for worker, _, _ in state.claims.values():
        load[worker] = load.get(worker, 0) + 1
    assert state.worker_load == load


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(1, 30)), min_size=1, max_size=25))
def test_cards_are_never_over_committed(ops: list[tuple[int, int, int]]) -> None:
    s = State()
    now = T0
    n = 0
    for op, pick, mem in ops:
        now += timedelta(seconds=1)
        if op == 0:
            apply(s, advert(f"w{pick % 3}", [(f"n{pick % 2}/0", 24)], now=now))
        elif op == 1:
            apply(s, c.RecordWorkerGone(now=now, worker=f"w{pick % 3}", reason="lost"))
        elif op in (2, 3):
            n += 1
            gpus = ", gpus: 2" if pick == 5 else ""
            apply(s, submit(make_ticket(f"TICKET-{n}", steps=gpu_step(f"{mem}G", gpus)), now))
        else:
            live = sorted(s.live)
            if live:
                tid, task_id = live[pick % len(live)]
                task = s.tickets[tid].tasks[task_id]
                apply(s, c.RecordJobSucceeded(now=now, ticket=tid, task=task_id, attempt=task.attempt))
        _check_cards(s)
        for tid, task_id in s.live:
            assert s.tickets[tid].tasks[task_id].status in LIVE


# --- hostile input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("  - {id: a, kind: synthesize, gpus: 1}\n", "gpus: only a gpu step can ask for GPUs (queue cpu)"),
        (gpu_step(None, ", gpus: -1"), "steps.0.gpus: Input should be greater than or equal to 0"),
        (gpu_step(None, ", gpus: 65"), "steps.0.gpus: Input should be less than or equal to 64"),
        (gpu_step(None, ", gpus: two"), "steps.0.gpus: Input should be a valid integer"),
        (gpu_step("2G", ", gpus: 0"), "gpu_memory: the step asks for gpus: 0"),
        ("  - {id: a, kind: diag, cpus: 0}\n", "steps.0.cpus: Input should be greater than 0"),
        ("  - {id: a, kind: diag, memory: lots}\n", "steps.0.memory: invalid memory size 'lots'"),
    ],
)
def test_hostile_resource_fields_name_the_field_and_line(steps: str, message: str) -> None:
    with pytest.raises(TicketInvalid) as exc:
        parse_ticket(ticket_yaml("TICKET-1", steps).encode(), "TICKET-1.yaml")
    assert message in str(exc.value.errors[0]) and ":5:" in str(exc.value.errors[0]), exc.value.errors


def test_hostile_adverts_and_worker_flags_are_refused_naming_the_problem(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from workers.resources import ResourceError, build_advert

    for bad in (
        {"kind": "advertised", "worker": "w/../x", "node": "n"},
        {"kind": "advertised", "worker": "w", "node": "n", "cpus": -1},
        {"kind": "advertised", "worker": "w", "node": "n", "surprise": 1},
    ):
        with pytest.raises(ValidationError):
            Advert.model_validate(bad)
    with pytest.raises(ValidationError):
        ev.GpuCard(id="n/0", index=0, memory=0)
    for kwargs, message in (
        ({"gpus": 2}, "--gpus 2: say how much memory each has (--gpu-memory 24G)"),
        ({"gpus": 65, "gpu_memory": "1G"}, "--gpus 65: expected 0 to 64"),
        ({"gpus": 1, "gpu_memory": "huge"}, "--gpu-memory: invalid memory size 'huge'"),
        ({"gpus": 0, "gpu_memory": "8G"}, "--gpu-memory without a card"),
        ({"cpus": 0}, "--cpus 0: expected more than 0"),
        ({"memory": "-1G"}, "--memory: invalid memory size '-1G'"),
        ({"node": "a b"}, "--node 'a b'"),
    ):
        with pytest.raises(ResourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_advert("w", ["gpu"], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ResourceError, match="--name"):
        build_advert("w:1", ["gpu"], gpus=1, gpu_memory="8G")
    made = build_advert("w", ["gpu"], node="box", gpus=2, gpu_memory="24G", cpus=4, memory="32G")
    assert made is not None and [g["id"] for g in made.gpus] == ["box/0", "box/1"] and made.memory == 32 * G


def test_worker_cli_refuses_bad_flags_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    monkeypatch.setenv("JETBOX_HOME", str(tmp_path))
    monkeypatch.setenv("JETBOX_REDIS_URL", f"unix://{tmp_path}/none.sock")
    assert main(["worker", "--gpus", "1", "--gpu-memory", "huge"]) != 0
    assert "jbctl worker --gpu-memory: invalid memory size 'huge'" in capsys.readouterr().err


def test_inbox_turns_signed_adverts_into_commands_and_refuses_forged_ones(tmp_path: Path) -> None:
    from daemon.inbox import Inbox

    key = b"k" * 32
    inbox = Inbox.__new__(Inbox)  # parse only: no Redis needed for it
    inbox.key = key
    body = Advert(
        kind="advertised", worker="w", node="n", queues=["gpu"], gpus=[{"id": "n/0", "index": 0, "memory": G}]
    ).model_dump(mode="json")
    got = inbox.parse({b"advert": json.dumps(body).encode(), b"sig": sign(body, key).encode()}, T0)
    assert isinstance(got, c.RecordWorkerAdvertised) and got.gpus[0].id == "n/0"
    forged = inbox.parse({b"advert": json.dumps(body).encode(), b"sig": b"0" * 64}, T0)
    assert isinstance(forged, c.RecordViolation) and forged.what == "forged_report"
    bad = {**body, "gpus": [{"id": "n/0", "index": 0, "memory": -5}]}
    got = inbox.parse({b"advert": json.dumps(bad).encode(), b"sig": sign(bad, key).encode()}, T0)
    assert isinstance(got, c.RecordViolation) and got.what == "malformed_report" and "memory" in got.detail
    bye = {**body, "kind": "departed"}
    got = inbox.parse({b"advert": json.dumps(bye).encode(), b"sig": sign(bye, key).encode()}, T0)
    assert isinstance(got, c.RecordWorkerGone) and got.reason == "departed"


# --- real processes -------------------------------------------------------------------------------


def _scheduled_rows(setup: Any, tid: str) -> list[dict[str, Any]]:
    return [r["data"] for r in setup.daemon.rows() if r["type"] == "AttemptScheduled" and r["data"]["ticket"] == tid]


@pytest.mark.integration
def test_two_real_workers_a_job_lands_where_it_fits_and_two_small_jobs_share_a_card(running: Any) -> None:
    """Worker `small` advertises one 8G card, workers `big-1` and `big-2` one 24G card they share
    (configured, as `jbctl worker --gpus 1 --gpu-memory 24G` on one machine). A 16G step runs on a big
    worker; two 10G steps run at the same time on the shared card, one on each big worker. A worker
    that stops is recorded as departed; one killed with -9, as lost (the reconciler)."""
    setup = running
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, node, mem in (("small", "s", "8G"), ("big-1", "b", "24G"), ("big-2", "b", "24G")):
        args = [JBCTL, "worker", "--queue", "gpu", "--name", name, "--node", node, "--gpus", "1", "--gpu-memory", mem]
        with (setup.home / f"worker-{name}.log").open("ab") as log:
            procs[name] = subprocess.Popen(args, env=setup.env, stdout=log, stderr=log, start_new_session=True)
        setup.workers.append(procs[name])  # stopped by the fixture, by pid
    for name in ("small", "big-1", "big-2"):
        setup.daemon.wait_event("WorkerAdvertised", timeout=60, worker=name)
    setup.drop("TICKET-1", gpu_step("16G", ", with: {sleep: 0.2}"))
    assert setup.wait_done("TICKET-1", timeout=60) == "TicketCompleted"
    (row,) = _scheduled_rows(setup, "TICKET-1")
    assert row["worker"] in ("big-1", "big-2") and row["gpus"] == ["b/0"]
    started = next(r["data"] for r in setup.daemon.rows() if r["type"] == "AttemptStarted")
    assert started["worker"].split(":")[1] == str(procs[row["worker"]].pid)  # it ran on that worker

    # Two 10G steps: each on its own big worker, the same card, running at the same time.
    setup.drop("TICKET-2", gpu_step("10G", ", with: {sleep: 2}", "x") + gpu_step("10G", ", with: {sleep: 2}", "y"))
    assert setup.wait_done("TICKET-2", timeout=60) == "TicketCompleted"
    rows = _scheduled_rows(setup, "TICKET-2")
    assert sorted(r["worker"] for r in rows) == ["big-1", "big-2"] and all(r["gpus"] == ["b/0"] for r in rows)
    spans: dict[str, list[datetime]] = {}
    for r in setup.daemon.rows():
        if r["data"].get("ticket") == "TICKET-2" and r["type"] in ("AttemptStarted", "AttemptSucceeded"):
            spans.setdefault(r["data"]["task"], []).append(datetime.fromisoformat(r["data"]["at"]))
    (x0, x1), (y0, y1) = spans["x"], spans["y"]
    assert x0 < y1 and y0 < x1, spans  # they overlapped: the card was shared at once

    # A worker that stops says so: its card is no longer offered.
    os.killpg(procs["small"].pid, signal.SIGTERM)
    procs["small"].wait(30)
    gone = setup.daemon.wait_event("WorkerGone", timeout=30, worker="small")
    assert gone["data"]["reason"] == "departed"
    assert setup.conn().llen(f"rq:queue:{worker_queue('small')}") == 0
    # One killed (-9) says nothing: its liveness key expires and the reconciler records it lost.
    os.killpg(procs["big-2"].pid, signal.SIGKILL)
    procs["big-2"].wait(30)
    lost = setup.daemon.wait_event("WorkerGone", timeout=30, worker="big-2")
    assert lost["data"]["reason"] == "lost" and "no sign of life" in lost["data"]["detail"]
    setup.assert_consistent()


def test_detection_reads_nvidia_smi_and_honours_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in `nvidia-smi` (a script answering the query the worker makes) on PATH: the cards, their
    memory, and which of them the worker may use, in CUDA's order."""
    from workers.resources import Card, build_advert, detect_gpus

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0, GPU-aaa, 24576\\n1, GPU-bbb, 81559\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == [Card(0, 0, 24576 << 20), Card(1, 1, 81559 << 20)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_gpus() == [Card(1, 0, 81559 << 20)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,7")  # a UUID, then one CUDA cannot use: it stops there
    assert detect_gpus() == [Card(0, 0, 24576 << 20)]
    made = build_advert("w", ["gpu"], node="box")  # nothing configured: detected, so it advertises
    assert made is not None and made.detected and made.gpus == [{"id": "box/0", "index": 0, "memory": 24576 << 20}]
    made = build_advert("w", ["gpu"], node="box", gpu_memory="20G")  # configured size wins, detected count
    assert made is not None and not made.detected and made.gpus[0]["memory"] == 20 * G
    assert build_advert("w", ["gpu"], node="box", advertise=False) is None
    assert build_advert("w", ["cpu"], node="box") is None  # a cpu worker does not offer the box's cards
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert build_advert("w", ["cpu"], node="box") is None  # nothing detected, nothing configured: a plain worker
