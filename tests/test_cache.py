"""The step cache and reruns (`jbctl retry --from`): pure decider tests, one replay through a real
SQLite event store."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import commands as c
from daemon.state import State, evolve
from schema import cache
from schema import events as ev
from tests.helpers import make_ticket, submit
from tests.test_decider import T0, apply, report, types

SYNTH = "  - {id: data, kind: synthesize, with: {generator: shapes, count: 100, seed: 1}}\n"
PIPELINE = (
    SYNTH + "  - {id: train, kind: train, needs: [data], with: {model: jepa, data: data, max_steps: 100}}\n"
    "  - {id: eval, kind: evaluate, needs: [train, data], with: {model: jepa, data: data, checkpoint: train}}\n"
)
OUTPUTS = {
    "data": {"dataset": "sha256:" + "d" * 64},
    "train": {"checkpoint": "ckpt/train-100.pt", "component": "image-encoder"},
    "eval": {},
}


def scheduled(events: list[ev.Event]) -> list[str]:
    """The tasks that got a job (AttemptScheduled), in order: what the jobs count."""
    return [f"{e.ticket}/{e.task}" for e in events if isinstance(e, ev.AttemptScheduled)]


def reused(events: list[ev.Event]) -> list[str]:
    return [f"{e.ticket}/{e.task}" for e in events if isinstance(e, ev.AttemptReused)]


def run_all(s: State, tid: str, events: list[ev.Event] | None = None) -> list[ev.Event]:
    """Report success for every job of `tid` as it is scheduled, until the ticket ends; all events."""
    seen = list(events or [])
    while s.tickets[tid].status == "running":
        live = [t for t in s.tickets[tid].tasks.values() if t.status == "scheduled"]
        if not live:
            break
        for task in live:
            seen += apply(
                s,
                report(
                    c.RecordJobSucceeded,
                    task.id,
                    task.attempt,
                    ticket=tid,
                    metrics={"acc": 0.9},
                    outputs=OUTPUTS.get(task.id, {}),
                ),
            )
    return seen


def pipeline(tid: str = "TICKET-1", steps: str = PIPELINE, extra: str = "") -> c.SubmitTicket:
    return submit(make_ticket(tid, steps=steps, extra=extra), T0)


def test_revision_changing_only_evaluate_reruns_only_it() -> None:
    s = State()
    first = run_all(s, "TICKET-1", apply(s, pipeline()))
    assert scheduled(first) == ["TICKET-1/data", "TICKET-1/train", "TICKET-1/eval"]
    assert s.tickets["TICKET-1"].status == "completed"
    revised = PIPELINE.replace("checkpoint: train}", "checkpoint: train, limit: 50}")
    events = run_all(s, "TICKET-1", apply(s, pipeline(steps=revised)))
    assert scheduled(events) == ["TICKET-1/eval"]  # one job: the step that changed
    assert reused(events) == ["TICKET-1/data", "TICKET-1/train"]
    reuse = next(e for e in events if isinstance(e, ev.AttemptReused) and e.task == "train")
    assert (reuse.source_ticket, reuse.source_task, reuse.source_attempt) == ("TICKET-1", "train", 1)
    assert reuse.outputs == OUTPUTS["train"]
    # The evaluate step received the reused outputs as its inputs.
    job = next(e for e in events if isinstance(e, ev.AttemptScheduled))
    assert job.params["_inputs"]["train"] == OUTPUTS["train"] and job.attempt == 2
    assert s.tickets["TICKET-1"].status == "completed" and s.tickets["TICKET-1"].revision == 2


def test_two_tickets_with_the_same_synthesize_step_generate_once() -> None:
    """At the same time: the second waits for the first's job, then reuses it; later: at once."""
    s = State()
    other_id = SYNTH.replace("id: data", "id: shapes")  # the step's id is not part of its key
    steps2 = other_id + "  - {id: after, kind: diag, needs: [shapes]}\n"
    assert scheduled(apply(s, pipeline())) == ["TICKET-1/data"]
    waiting = apply(s, pipeline("TICKET-2", steps2))
    assert types(waiting) == ["TicketSubmitted", "TaskWaiting"]  # no job: it waits for TICKET-1's
    assert (waiting[1].holder_ticket, waiting[1].holder_task) == ("TICKET-1", "data")
    assert s.tickets["TICKET-2"].tasks["shapes"].status == "pending"
    assert apply(s, c.ScheduleTask(now=T0, ticket="TICKET-2", task="shapes")) == []  # said once
    events = apply(s, report(c.RecordJobSucceeded, "data", 1, outputs=OUTPUTS["data"]))
    assert reused(events) == ["TICKET-2/shapes"]
    assert scheduled(events) == ["TICKET-1/train", "TICKET-2/after"]
    assert s.tickets["TICKET-2"].tasks["shapes"].outputs == OUTPUTS["data"]
    late = apply(s, pipeline("TICKET-3", SYNTH))
    assert reused(late) == ["TICKET-3/data"] and scheduled(late) == []
    assert types(late)[-1] == "TicketCompleted"
    assert [e.hits for e in s.cache.values()] == [2]


def test_a_waiting_step_runs_itself_when_the_one_it_waited_for_fails_or_is_cancelled() -> None:
    s = State()
    apply(s, pipeline(steps=SYNTH.replace("seed: 1}", "seed: 1}, retries: 0")))
    apply(s, pipeline("TICKET-2", SYNTH))
    apply(s, pipeline("TICKET-3", SYNTH))
    events = apply(s, report(c.RecordJobFailed, "data", 1, error="OSError: disk full"))
    assert types(events)[:3] == ["AttemptFailed", "TaskFailed", "TicketFailed"]
    assert scheduled(events) == ["TICKET-2/data"]  # one of the waiting ones takes over; TICKET-3 still waits
    assert s.tickets["TICKET-3"].tasks["data"].status == "pending"
    events = apply(s, c.CancelTicket(now=T0, ticket="TICKET-2"))
    assert scheduled(events) == ["TICKET-3/data"]


def test_a_code_version_bump_invalidates(monkeypatch: pytest.MonkeyPatch) -> None:
    s = State()
    run_all(s, "TICKET-1", apply(s, pipeline()))
    monkeypatch.setitem(cache.CODE_VERSIONS, "train", "2")
    events = run_all(s, "TICKET-2", apply(s, pipeline("TICKET-2")))
    assert scheduled(events) == ["TICKET-2/train"]
    # The new training reported the same outputs, so the evaluation's key (its inputs) is unchanged.
    assert reused(events) == ["TICKET-2/data", "TICKET-2/eval"]
    monkeypatch.setattr(cache, "PACKAGE_VERSION", "9.9.9")  # a new release invalidates every kind
    assert scheduled(apply(s, pipeline("TICKET-3"))) == ["TICKET-3/data"]


def test_cache_false_on_a_step_or_a_ticket_opts_out() -> None:
    s = State()
    run_all(s, "TICKET-1", apply(s, pipeline()))
    no_step = PIPELINE.replace("seed: 1}}", "seed: 1}, cache: false}")
    events = run_all(s, "TICKET-2", apply(s, pipeline("TICKET-2", no_step)))
    assert scheduled(events) == ["TICKET-2/data"] and reused(events) == ["TICKET-2/train", "TICKET-2/eval"]
    events = run_all(s, "TICKET-3", apply(s, pipeline("TICKET-3", extra="cache: false\n")))
    assert reused(events) == [] and len(scheduled(events)) == 3
    assert all(e.cache_key is None for e in events if isinstance(e, ev.AttemptScheduled))


@pytest.mark.parametrize(
    ("steps", "extra"),
    [
        ("  - {id: k, kind: check, with: {run: ['true']}}\n", ""),  # side effects on the workspace
        ("  - {id: i, kind: infer, with: {component: image-encoder}}\n", ""),  # observes the model now
        ("  - {id: d, kind: diag}\n", ""),  # diagnostics run unless asked
        (SYNTH, "constraints: {network: allow}\n"),  # may read what no key covers
        ("  - {id: d, kind: diag, cache: true}\n", "cache: false\n"),  # the ticket's word wins
    ],
)
def test_what_is_never_cached(steps: str, extra: str) -> None:
    s = State()
    for tid in ("TICKET-1", "TICKET-2"):
        events = run_all(s, tid, apply(s, pipeline(tid, steps, extra)))
        assert len(scheduled(events)) == 1 and reused(events) == []
    assert s.cache == {}


def test_diag_is_cached_when_a_step_asks() -> None:
    s = State()
    steps = "  - {id: d, kind: diag, cache: true, with: {metrics: {m: 1.0}}}\n"
    run_all(s, "TICKET-1", apply(s, pipeline("TICKET-1", steps)))
    assert reused(apply(s, pipeline("TICKET-2", steps))) == ["TICKET-2/d"]


def test_the_cache_is_derived_from_the_log_and_survives_replay(store: object) -> None:
    """Replayed from a real SQLite log into a fresh state (what the daemon does at start), the
    cache is the same, and a new ticket reuses what the old run recorded."""
    from daemon.handler import CommandHandler, load_state

    handler = CommandHandler(store)  # type: ignore[arg-type]
    handler.handle(pipeline())
    for task in ("data", "train", "eval"):
        attempt = handler.state.tickets["TICKET-1"].tasks[task].attempt
        handler.handle(report(c.RecordJobSucceeded, task, attempt, outputs=OUTPUTS[task]))
    assert handler.state.tickets["TICKET-1"].status == "completed" and len(handler.state.cache) == 3
    replayed = load_state(store)  # type: ignore[arg-type]
    assert replayed.cache == handler.state.cache
    assert reused(apply(replayed, pipeline("TICKET-2"))) == ["TICKET-2/data", "TICKET-2/train", "TICKET-2/eval"]
    from schema.store import replay_differences

    handler.handle(pipeline("TICKET-2"))
    assert replay_differences(store) == []  # type: ignore[arg-type]


def test_clear_forgets_and_the_step_runs_again() -> None:
    s = State()
    run_all(s, "TICKET-1", apply(s, pipeline()))
    assert apply(s, c.ClearCache(now=T0, kind="evaluate", ticket="TICKET-9")) == []  # nothing matches
    cleared = apply(s, c.ClearCache(now=T0, kind="train", actor="alice"))
    assert isinstance(cleared[0], ev.CacheCleared) and len(cleared) == 1
    assert len(cleared[0].keys) == 1 and cleared[0].actor == "alice"
    events = run_all(s, "TICKET-2", apply(s, pipeline("TICKET-2")))
    assert reused(events) == ["TICKET-2/data", "TICKET-2/eval"]  # train reran to the same outputs
    assert scheduled(events) == ["TICKET-2/train"]
    assert types(apply(s, c.ClearCache(now=T0)))[0] == "CacheCleared" and s.cache == {}


def test_retry_from_reruns_the_step_and_what_follows_keeping_upstream() -> None:
    s = State()
    run_all(s, "TICKET-1", apply(s, pipeline()))
    events = apply(s, c.RetryFrom(now=T0, ticket="TICKET-1", task="train", actor="bob"))
    assert types(events) == ["TicketRetried", "TaskRetried", "TaskRetried", "AttemptScheduled"]
    assert [e.task for e in events if isinstance(e, ev.TaskRetried)] == ["train", "eval"]
    assert scheduled(events) == ["TICKET-1/train"]  # rerun although its key is cached; data kept
    assert isinstance(events[-1], ev.AttemptScheduled) and events[-1].resume_checkpoint is None  # starts over
    events = run_all(s, "TICKET-1", events)
    assert scheduled(events) == ["TICKET-1/train", "TICKET-1/eval"] and reused(events) == []
    assert s.tickets["TICKET-1"].status == "completed"


def test_retry_from_a_failed_training_resumes_from_its_checkpoint() -> None:
    s = State()
    steps = PIPELINE.replace("max_steps: 100}", "max_steps: 100}, retries: 0")
    apply(s, pipeline(steps=steps))
    apply(s, report(c.RecordJobSucceeded, "data", 1, outputs=OUTPUTS["data"]))
    apply(s, report(c.RecordCheckpoint, "train", 1, path="ckpt/train-60.pt", step=60))
    apply(s, report(c.RecordJobFailed, "train", 1, error="RuntimeError: CUDA out of memory", retryable=False))
    assert s.tickets["TICKET-1"].status == "failed"
    events = apply(s, c.RetryFrom(now=T0, ticket="TICKET-1", task="train"))
    assert scheduled(events) == ["TICKET-1/train"]
    job = events[-1]
    assert isinstance(job, ev.AttemptScheduled) and job.resume_checkpoint == "ckpt/train-60.pt" and job.attempt == 2
    assert s.tickets["TICKET-1"].tasks["data"].status == "succeeded"  # not generated again


def test_retry_from_is_refused_for_running_and_unknown_tickets_and_steps() -> None:
    s = State()
    apply(s, pipeline())
    assert apply(s, c.RetryFrom(now=T0, ticket="TICKET-1", task="train")) == []  # still running
    run_all(s, "TICKET-1")
    assert apply(s, c.RetryFrom(now=T0, ticket="TICKET-1", task="nope")) == []
    assert apply(s, c.RetryFrom(now=T0, ticket="TICKET-404", task="train")) == []


def test_a_revision_that_only_grows_the_budget_resumes_training() -> None:
    s = State()
    apply(s, pipeline())
    apply(s, report(c.RecordJobSucceeded, "data", 1, outputs=OUTPUTS["data"]))
    apply(s, report(c.RecordCheckpoint, "train", 1, path="ckpt/train-100.pt", step=100))
    run_all(s, "TICKET-1")
    longer = PIPELINE.replace("max_steps: 100", "max_steps: 400")
    events = apply(s, pipeline(steps=longer))
    assert reused(events) == ["TICKET-1/data"]
    job = events[-1]
    assert isinstance(job, ev.AttemptScheduled) and job.task == "train"
    assert job.resume_checkpoint == "ckpt/train-100.pt"  # goes on from step 100, not from zero
    run_all(s, "TICKET-1")
    shorter = PIPELINE.replace("max_steps: 100", "max_steps: 50")
    events = apply(s, pipeline(steps=shorter))
    assert isinstance(events[-1], ev.AttemptScheduled) and events[-1].resume_checkpoint is None
    other = PIPELINE.replace("max_steps: 100", "max_steps: 800, lr: 0.1")  # not only the budget
    run_all(s, "TICKET-1")
    events = apply(s, pipeline(steps=other))
    assert isinstance(events[-1], ev.AttemptScheduled) and events[-1].resume_checkpoint is None


def test_cache_events_replay_to_the_same_state() -> None:
    s = State()
    log: list[ev.Event] = []
    log += run_all(s, "TICKET-1", apply(s, pipeline()))
    log += apply(s, pipeline("TICKET-2"))
    log += apply(s, c.ClearCache(now=T0 + timedelta(seconds=1), kind="evaluate"))
    log += apply(s, c.RetryFrom(now=T0, ticket="TICKET-2", task="eval"))
    log += run_all(s, "TICKET-2")
    replayed = State()
    for e in log:
        evolve(replayed, ev.event_from(e.type, ev.event_to_data(e)))
    assert replayed == s


def test_jbctl_cache_and_retry_from(store: object, capsys: pytest.CaptureFixture[str]) -> None:
    """`jbctl cache ls|clear` and `jbctl retry --from`, their hostile inputs included."""
    import json

    from cli.main import main as jbctl
    from daemon.handler import CommandHandler

    handler = CommandHandler(store)  # type: ignore[arg-type]
    handler.handle(pipeline())

    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert jbctl(list(argv)) == 1
        return capsys.readouterr().err

    assert "still running" in fails("retry", "TICKET-1", "--from", "train")
    handler.handle(pipeline("TICKET-3", SYNTH))
    capsys.readouterr()
    assert jbctl(["describe", "TICKET-3"]) == 0
    assert "waiting for the same step running elsewhere" in capsys.readouterr().out  # and names it:
    assert jbctl(["describe", "TICKET-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["waiting_for_same_step"][0]["holder_ticket"] == "TICKET-1"
    for task in ("data", "train", "eval"):
        attempt = handler.state.tickets["TICKET-1"].tasks[task].attempt
        handler.handle(report(c.RecordJobSucceeded, task, attempt, outputs=OUTPUTS[task]))
    assert "no ticket 'TICKET-404'" in fails("retry", "TICKET-404", "--from", "train")
    assert "has no step 'trian' (steps: data, train, eval)" in fails("retry", "TICKET-1", "--from", "trian")
    assert "not a step kind" in fails("cache", "ls", "--kind", "bogus")
    assert "clear what?" in fails("cache", "clear")
    assert "hex digits" in fails("cache", "clear", "--key", "../etc")
    assert "no ticket 'TICKET-9'" in fails("cache", "clear", "--ticket", "TICKET-9")
    handler.handle(pipeline("TICKET-2"))  # every step reused
    capsys.readouterr()
    assert jbctl(["describe", "TICKET-2"]) == 0
    assert "reused from the step cache (no job ran):\n  data  <- TICKET-1/data attempt 1" in capsys.readouterr().out
    assert jbctl(["describe", "TICKET-3", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["waiting_for_same_step"] == [] and described["reused"][0]["source_ticket"] == "TICKET-1"
    assert jbctl(["cache", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["kind"] for e in listed) == ["evaluate", "synthesize", "train"]
    assert jbctl(["cache", "clear", "--key", listed[0]["key"][:8]]) == 0
    assert capsys.readouterr().out.strip() == "cleared 1 cached result"
    assert jbctl(["retry", "TICKET-1", "--from", "eval"]) == 0
    assert "rerunning TICKET-1 from eval: eval run again" in capsys.readouterr().out
    handler.refresh()
    assert handler.state.tickets["TICKET-1"].tasks["eval"].status == "scheduled"


@pytest.mark.integration
def test_identical_steps_run_once_on_real_processes_and_across_a_daemon_restart(tmp_path: object) -> None:
    """A real daemon, Redis and worker: two tickets dropped together with the same synthesize step
    (two shards) generate once; after the daemon restarts (its state replayed from the log) a third
    reuses it."""
    from pathlib import Path

    from tests.harness import Setup

    setup = Setup(Path(str(tmp_path)) / "home")
    step = (
        "  - {id: shapes, kind: synthesize, shards: 2,"
        " with: {generator: shapes, count: 8, shard_size: 4, seed: 5, params: {size: 16}}}\n"
    )
    try:
        setup.daemon.start()
        setup.worker("cpu")
        setup.drop("TICKET-1", step)
        setup.drop("TICKET-2", step)
        assert setup.wait_done("TICKET-1") == setup.wait_done("TICKET-2") == "TicketCompleted"
        setup.daemon.stop()
        setup.daemon.start()
        setup.drop("TICKET-3", step)
        assert setup.wait_done("TICKET-3") == "TicketCompleted"
        rows = setup.daemon.rows()
        jobs = [r for r in rows if r["type"] == "AttemptScheduled"]
        reuses = [r["data"] for r in rows if r["type"] == "AttemptReused"]
        # Two shard jobs and their join (by the decider: no job), once for three tickets.
        assert sorted(j["data"]["task"] for j in jobs) == ["shapes-S0", "shapes-S1"], jobs
        assert [(r["data"]["ticket"], r["data"]["task"]) for r in rows if r["type"] == "ShardsJoined"] == [
            ("TICKET-1", "shapes")
        ]
        assert sorted((r["ticket"], r["task"]) for r in reuses) == [
            (t, task) for t in ("TICKET-2", "TICKET-3") for task in ("shapes", "shapes-S0", "shapes-S1")
        ]
        assert {r["source_ticket"] for r in reuses} == {jobs[0]["data"]["ticket"]}
        from schema.store import EventStore, replay_differences

        log = EventStore(f"sqlite:///{setup.home / 'jetbox.db'}")
        try:  # in-process: `jbctl replay --check` would cost two interpreter starts
            assert replay_differences(log) == []
        finally:
            log.close()
    finally:
        setup.close()


def test_every_job_kind_has_a_code_version() -> None:
    from schema.ticket import DEFAULT_QUEUE
    from workers.jobs import JOBS

    assert set(cache.CODE_VERSIONS) == set(JOBS) == set(DEFAULT_QUEUE)


def test_the_demo_generates_the_shapes_of_ticket_1_and_4_once() -> None:
    """`make demo` shows a cache hit: TICKET-4's shapes step is TICKET-1's (keep them identical), both
    fanned out into two shards: each shard runs once, for TICKET-1, whose step the decider joins
    (no job); TICKET-4 reuses that very manifest."""
    from pathlib import Path

    from schema.ticket import load_ticket
    from workers.synth.base import SynthesisRequest, manifest_head

    examples = Path(__file__).resolve().parent.parent / "tickets" / "examples"
    s = State()
    first = apply(s, submit(load_ticket(examples / "TICKET-1.yaml"), T0))
    assert scheduled(first) == ["TICKET-1/shapes-S0", "TICKET-1/shapes-S1"]
    events = apply(s, submit(load_ticket(examples / "TICKET-4.yaml"), T0))
    assert scheduled(events) == [] and types(events).count("TaskWaiting") == 2
    step = s.tickets["TICKET-1"].tasks["shapes"].params
    head = manifest_head(SynthesisRequest.model_validate(step))
    for k, shard in enumerate(("shapes-S0", "shapes-S1")):
        info = {"index": k, "id": f"{k + 1:064x}", "size": 1, "count": 1000, "format": "npz"}
        outputs = {"shards": [info], "seconds": 1.0, "manifest": head}
        events = apply(s, report(c.RecordJobSucceeded, shard, 1, metrics={"count": 1000.0}, outputs=outputs))
    assert reused(events) == ["TICKET-4/shapes-S1", "TICKET-4/shapes"]  # S0 was reused on its success
    [joined] = [e for e in events if isinstance(e, ev.ShardsJoined)]
    assert joined.ticket == "TICKET-1" and s.tickets["TICKET-4"].tasks["shapes"].outputs == joined.outputs
    assert scheduled(events) == ["TICKET-1/train", "TICKET-4/train"]


def _cache_command(state: State, n: int, code: tuple[int, int, int, float], now: datetime) -> c.Command:
    """test_decider's random commands, plus reruns from a task (10) and cache clears (11)."""
    from tests.test_decider import interpret

    kind, pick = code[0], code[1]
    if kind == 10:
        ended = sorted((t.id, sorted(t.tasks)) for t in state.tickets.values() if t.status != "running")
        if ended:
            tid, task_ids = ended[pick % len(ended)]
            return c.RetryFrom(now=now, ticket=tid, task=task_ids[code[2] % len(task_ids)], actor="a")
    if kind == 11:
        return c.ClearCache(now=now, kind=[None, "train", "evaluate", "synthesize"][code[2] % 4])
    return interpret(state, n, (kind % 10, *code[1:]), now)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 5), st.integers(0, 3), st.floats(0, 1)), max_size=60))
def test_properties_with_reruns_and_cache_clears(ops: list[tuple[int, int, int, float]]) -> None:
    """The decider's properties (tests/test_decider.py) hold with reuse, waiting, reruns and clears:
    decide leaves its input alone, the scratch state is the log applied, replay gives the same state
    (the cache included), no task is left runnable and forgotten."""
    import copy

    from daemon.decider import _run
    from tests.test_decider import _replay_through_handles, check_invariants

    state, log, now = State(), [], T0
    for n, code in enumerate(ops):
        now = now + timedelta(seconds=30 * code[3])
        command = _cache_command(state, n, code, now)
        before = copy.deepcopy(state)
        out = _run(state, command)
        assert state == before
        handles = _replay_through_handles(state, out.events)
        for e in out.events:
            evolve(state, e)
        assert out.state == state and handles == state
        log.extend(out.events)
        check_invariants(state)
    replayed = State()
    for e in log:
        evolve(replayed, ev.event_from(e.type, ev.event_to_data(e)))
    assert replayed == state


def test_a_reused_step_shows_its_sources_artifacts_in_milestone_reports() -> None:
    from schema.milestones import MilestoneBook

    s, book = State(), MilestoneBook()
    log = apply(s, pipeline(steps=SYNTH))
    log += apply(s, report(c.RecordArtifact, "data", 1, artifact="d" * 64, kind="dataset"))
    log += apply(s, report(c.RecordJobSucceeded, "data", 1, outputs=OUTPUTS["data"]))
    log += apply(s, pipeline(steps=SYNTH.replace("seed: 1}", "seed: 1}, timeout: 5m")))  # revision 2
    assert reused(log) == ["TICKET-1/data"]
    for seq, e in enumerate(log, start=1):
        book.apply(seq, e)
    assert [(a["id"], a["task"]) for a in book.tickets["TICKET-1"].artifacts] == [("d" * 64, "data")]


@pytest.mark.parametrize(
    ("steps", "extra", "error"),
    [
        ("  - {id: a, kind: diag, cache: maybe}\n", "", "TICKET-1.yaml:5:25: steps.0.cache: Input should be a valid"),
        ("  - {id: a, kind: diag}\n", "cache: [1]\n", "TICKET-1.yaml:6:1: cache: Input should be a valid boolean"),
        ("  - {id: a, kind: diag, cahce: false}\n", "", "unknown key 'cahce' (did you mean 'cache'?)"),
    ],
)
def test_a_bad_cache_field_is_a_positioned_error(steps: str, extra: str, error: str) -> None:
    from schema.ticket import TicketInvalid, parse_ticket
    from tests.helpers import ticket_yaml

    with pytest.raises(TicketInvalid) as info:
        parse_ticket(ticket_yaml(steps=steps, extra=extra).encode(), "TICKET-1.yaml")
    assert error in str(info.value)


def test_a_revision_after_a_failed_training_resumes_it_and_keeps_the_data() -> None:
    s = State()
    steps = PIPELINE.replace("max_steps: 100}", "max_steps: 100}, retries: 0")
    apply(s, pipeline(steps=steps))
    apply(s, report(c.RecordJobSucceeded, "data", 1, outputs=OUTPUTS["data"]))
    apply(s, report(c.RecordCheckpoint, "train", 1, path="ckpt/train-70.pt", step=70))
    apply(s, report(c.RecordJobFailed, "train", 1, error="MemoryError", retryable=False))
    events = apply(s, pipeline(steps=steps.replace("checkpoint: train}", "checkpoint: train, limit: 9}")))
    assert reused(events) == ["TICKET-1/data"] and scheduled(events) == ["TICKET-1/train"]
    job = events[-1]
    assert isinstance(job, ev.AttemptScheduled) and job.resume_checkpoint == "ckpt/train-70.pt"


def test_a_core_proposal_names_the_attempt_that_trained_a_reused_candidate() -> None:
    """TICKET-2 proposes for the core what TICKET-1 trained (the same steps): the proposal says
    which attempt trained the weights, not the step that reused them."""
    s = State()
    run_all(s, "TICKET-1", apply(s, pipeline()))
    revised = PIPELINE.replace("checkpoint: train}", "checkpoint: train, limit: 500}")
    events = run_all(s, "TICKET-2", apply(s, pipeline("TICKET-2", steps=revised, extra="update: core\n")))
    assert reused(events) == ["TICKET-2/data", "TICKET-2/train"] and scheduled(events) == ["TICKET-2/eval"]
    opened = events[-1]
    assert isinstance(opened, ev.ProposalOpened) and opened.ticket == "TICKET-2"
    component = opened.candidate["image-encoder"]
    assert (component["ticket"], component["task"], component["attempt"]) == ("TICKET-1", "train", 1)
    assert component["checkpoint"] == OUTPUTS["train"]["checkpoint"]


def test_a_cached_result_that_misses_this_steps_expectations_is_not_reused() -> None:
    """`expect:` is not in the key: a step that expects more of the same result runs its own job."""
    s = State()
    apply(s, pipeline(steps=SYNTH))
    apply(s, report(c.RecordJobSucceeded, "data", 1, metrics={"count": 100.0}, outputs=OUTPUTS["data"]))
    strict = SYNTH.replace("seed: 1}}", "seed: 1}, expect: [{metric: count, op: '>=', value: 200}]}")
    assert scheduled(apply(s, pipeline("TICKET-2", strict))) == ["TICKET-2/data"]
    met = SYNTH.replace("seed: 1}}", "seed: 1}, expect: [{metric: count, op: '==', value: 100}]}")
    assert reused(apply(s, pipeline("TICKET-3", met))) == ["TICKET-3/data"]


def test_shards_are_cached_one_by_one_and_follow_their_steps_cache_setting() -> None:
    s = State()
    sharded = "  - {id: data, kind: synthesize, shards: 2, with: {generator: shapes, count: 20, shard_size: 10}}\n"
    log = apply(s, pipeline(steps=sharded))
    for task in ("data-S0", "data-S1", "data"):
        log += apply(s, report(c.RecordJobSucceeded, task, 1, outputs={"part": task}))
    assert scheduled(log) == ["TICKET-1/data-S0", "TICKET-1/data-S1", "TICKET-1/data"]
    events = apply(s, pipeline("TICKET-2", sharded))
    assert reused(events) == ["TICKET-2/data-S0", "TICKET-2/data-S1", "TICKET-2/data"] and scheduled(events) == []
    opted_out = sharded.replace("shards: 2,", "shards: 2, cache: false,")
    events = apply(s, pipeline("TICKET-3", opted_out))
    assert reused(events) == [] and scheduled(events) == ["TICKET-3/data-S0", "TICKET-3/data-S1"]


def test_retry_from_a_fanned_out_step_reruns_its_shards() -> None:
    s = State()
    sharded = "  - {id: data, kind: synthesize, shards: 2, with: {generator: shapes, count: 20, shard_size: 10}}\n"
    apply(s, pipeline(steps=sharded))
    for task in ("data-S0", "data-S1", "data"):
        apply(s, report(c.RecordJobSucceeded, task, 1, outputs={"part": task}))
    assert s.tickets["TICKET-1"].status == "completed"
    events = apply(s, c.RetryFrom(now=T0, ticket="TICKET-1", task="data"))
    assert scheduled(events) == ["TICKET-1/data-S0", "TICKET-1/data-S1"] and reused(events) == []
