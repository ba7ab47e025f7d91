"""Working memory as a first-class thing: adapter ids, lifecycle rules (decider), the `adapters` projection."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from daemon import commands as c
from daemon.state import State
from schema import events as ev
from schema.projections import MemoryRows, project_all
from tests.helpers import make_ticket, submit
from tests.test_decider import apply, report, types

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CORE_A, CORE_B = "a" * 64, "b" * 64


def _promote_reasoner(s: State, tid: str, checkpoint: str) -> list[ev.Event]:
    steps = "  - {id: train, kind: train, with: {model: trm}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
    apply(s, submit(make_ticket(tid, steps=steps, extra="update: core\n"), T0))
    out = {"component": "reasoner", "checkpoint": checkpoint}
    apply(s, report(c.RecordJobSucceeded, "train", 1, ticket=tid, outputs=out))
    apply(s, report(c.RecordJobSucceeded, "eval", 1, ticket=tid, metrics={"acc": 0.5}))
    proposal = max(s.proposals)
    return apply(s, c.ApproveProposal(now=T0, proposal=proposal, actor="bob"))


def _adapter_ticket(s: State, tid: str, gain: float = 0.1, steps: str | None = None) -> list[ev.Event]:
    steps = steps or "  - {id: tune, kind: train, with: {model: trm, adapter: {rank: 4}}}\n"
    apply(s, submit(make_ticket(tid, steps=steps, extra="update: adapter\n"), T0))
    core = s.core_components.get("reasoner", {}).get("checkpoint")
    out = {"adapter": "reasoner", "checkpoint": "c" * 63 + tid[-1], "rank": 4, "core_checkpoint": core}
    attempt = s.tickets[tid].tasks["tune"].attempt  # a revision keeps counting attempts
    return apply(s, report(c.RecordJobSucceeded, "tune", attempt, ticket=tid, outputs=out, metrics={"gain": gain}))


def test_adapters_get_ids_metrics_and_the_base_core() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    events = _adapter_ticket(s, "TICKET-2")
    activated = next(e for e in events if isinstance(e, ev.AdapterActivated))
    assert activated.ids == {"reasoner": "A-1"} and activated.metrics == {"reasoner": {"gain": 0.1}}
    assert activated.core_version == 1
    assert s.adapters["A-1"]["active"] and s.adapters["A-1"]["core_checkpoint"] == CORE_A
    _adapter_ticket(s, "TICKET-3")
    assert sorted(s.adapters) == ["A-1", "A-2"] and all(a["active"] for a in s.adapters.values())


def test_a_ticket_that_trains_again_replaces_its_adapter() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    # A revised ticket (new content) trains again: the new adapter replaces the old one.
    steps = "  - {id: tune, kind: train, with: {model: trm, adapter: {rank: 8}}}\n"
    events = _adapter_ticket(s, "TICKET-2", steps=steps)
    assert types(events)[-3:] == ["AdapterRetired", "AdapterActivated", "TicketCompleted"]
    retired = next(e for e in events if isinstance(e, ev.AdapterRetired))
    assert retired.adapter == "A-1" and retired.reason == "replaced" and retired.replaced_by == "A-2"
    assert not s.adapters["A-1"]["active"] and s.adapters["A-2"]["active"]


def test_rolling_the_core_past_retires_its_adapters_and_a_rollback_too() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = _promote_reasoner(s, "TICKET-3", CORE_B)
    assert types(events) == ["ProposalApproved", "CorePromoted", "AdapterRetired", "TicketCompleted"]
    assert events[2].adapter == "A-1" and events[2].reason == "core_rolled" and events[2].core_version == 2
    assert "core v2" in events[2].detail
    _adapter_ticket(s, "TICKET-4")  # A-2, on v2
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob"))
    assert types(events) == ["CorePromoted", "AdapterRetired"] and events[1].adapter == "A-2"
    assert not any(a["active"] for a in s.adapters.values())


def test_a_core_version_that_keeps_the_reasoner_keeps_its_adapters() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = apply(s, c.RollbackCore(now=T0, version=1, actor="bob"))  # same version: nothing
    assert events == []
    # A new core version whose reasoner is the same checkpoint (only an encoder changed).
    steps = "  - {id: train, kind: train, with: {model: jepa}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
    apply(s, submit(make_ticket("TICKET-3", steps=steps, extra="update: core\n"), T0))
    apply(s, report(c.RecordJobSucceeded, "train", 1, ticket="TICKET-3", outputs={"component": "image-encoder"}))
    apply(s, report(c.RecordJobSucceeded, "eval", 1, ticket="TICKET-3"))
    events = apply(s, c.ApproveProposal(now=T0, proposal="P-2", actor="bob"))
    assert "CorePromoted" in types(events) and "AdapterRetired" not in types(events)
    assert s.adapters["A-1"]["active"]


def test_retire_by_hand_once_and_unknown_ids_change_nothing() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    events = apply(s, c.RetireAdapter(now=T0, adapter="A-1", actor="carol", reason="wrong task"))
    assert types(events) == ["AdapterRetired"] and events[0].actor == "carol" and events[0].reason == "manual"
    assert events[0].ticket == "TICKET-2"  # it lands in the ticket's stream
    assert apply(s, c.RetireAdapter(now=T0, adapter="A-1", actor="carol")) == []
    assert apply(s, c.RetireAdapter(now=T0, adapter="A-9", actor="carol")) == []


def test_steps_that_name_an_adapter_get_it_resolved() -> None:
    s = State(home_owner="bob")
    _promote_reasoner(s, "TICKET-1", CORE_A)
    _adapter_ticket(s, "TICKET-2")
    steps = (
        "  - {id: ask, kind: infer, with: {component: reasoner, adapter: TICKET-2}}\n"
        "  - {id: more, kind: train, with: {model: trm, adapter: {rank: 4, start: A-1}}}\n"
        "  - {id: gone, kind: infer, with: {component: reasoner, adapter: A-7}}\n"
    )
    events = apply(s, submit(make_ticket("TICKET-3", steps=steps), T0))
    by_task = {e.task: e.params for e in events if isinstance(e, ev.AttemptScheduled)}
    assert by_task["ask"]["_adapter"]["id"] == "A-1" and by_task["ask"]["_adapter"]["core_checkpoint"] == CORE_A
    assert by_task["more"]["_adapter"]["id"] == "A-1"
    assert by_task["gone"]["_adapter"] == {"missing": "A-7"}


def test_projection_follows_the_lifecycle_and_reads_old_logs() -> None:
    s = State(home_owner="bob")
    log: list[ev.Event] = []
    log += _promote_reasoner(s, "TICKET-1", CORE_A)
    log += _adapter_ticket(s, "TICKET-2")
    log += _promote_reasoner(s, "TICKET-3", CORE_B)
    # An event written before adapters had ids (TICKET-7 in an old log).
    log.append(
        ev.AdapterActivated(
            at=T0, ticket="TICKET-7", adapters={"reasoner": {"checkpoint": "d" * 64, "task": "adapt"}}, core_version=2
        )
    )
    rows = MemoryRows()
    project_all(rows, list(enumerate(log, start=1)))
    a1 = rows.data["adapters"][("A-1",)]
    assert a1["ticket"] == "TICKET-2" and a1["component"] == "reasoner" and a1["base_core_version"] == 1
    assert a1["artifact"] == "c" * 63 + "2" and a1["metrics"] == {"gain": 0.1}
    assert not a1["active"] and a1["retired_reason"] == "core_rolled" and "core v2" in a1["retired_detail"]
    legacy = rows.data["adapters"][("A-TICKET-7.reasoner",)]
    assert legacy["active"] and legacy["base_core_version"] == 2 and legacy["metrics"] == {}


def test_swapping_adapters_on_a_warm_core_merges_and_restores_exactly() -> None:
    import copy

    import pytest
    import torch
    from torch import nn

    from workers.inference import Loaded
    from workers.jobs import JobFailed
    from workers.memory import apply_adapter
    from workers.models.lora import adapter_state, add_adapters

    torch.manual_seed(0)
    core = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    plain = core(x).detach()

    def trained(seed: int) -> tuple[nn.Module, dict]:
        torch.manual_seed(seed)
        wrapped = copy.deepcopy(core)
        add_adapters(wrapped, rank=2, alpha=4.0)
        for name, p in wrapped.named_parameters():
            if "lora_b" in name:
                p.data.normal_()
        return wrapped, {"adapter": adapter_state(wrapped), "rank": 2, "alpha": 4.0}

    (net_a, file_a), (net_b, file_b) = trained(1), trained(2)
    loaded = Loaded(core, {}, 0)
    assert apply_adapter(loaded, "a", file_a) and loaded.adapter == "a"
    assert torch.allclose(core(x), net_a(x), atol=1e-5) and not torch.allclose(core(x), plain)
    assert not apply_adapter(loaded, "a", file_a)  # already applied: nothing to do
    apply_adapter(loaded, "b", file_b)
    assert torch.allclose(core(x), net_b(x), atol=1e-5)
    apply_adapter(loaded, None, None)
    assert torch.equal(core(x), plain)  # the core's own weights, bit for bit
    bad = {"adapter": {"0.lora_a": torch.zeros(2, 3), "0.lora_b": torch.zeros(16, 2)}, "rank": 2}
    with pytest.raises(JobFailed, match="does not fit this core"):
        apply_adapter(loaded, "bad", bad)
    assert loaded.adapter is None and torch.equal(core(x), plain)
    missing = {"adapter": {"9.lora_a": torch.zeros(2, 8), "9.lora_b": torch.zeros(16, 2)}, "rank": 2}
    with pytest.raises(JobFailed, match="does not fit this core"):
        apply_adapter(loaded, "other", missing)


def test_infer_refuses_adapters_that_do_not_apply(tmp_path: Path) -> None:
    import pytest

    from workers.context import LocalContext
    from workers.inference import run_infer
    from workers.jobs import JobFailed

    ctx = LocalContext(workdir=tmp_path / "w", artifact_root=tmp_path / "a")
    base = {"component": "reasoner", "puzzle": [[1, 0], [0, 1]]}
    cases = [
        ({**base, "adapter": "A-3"}, "was not resolved"),
        ({**base, "adapter": "A-3", "_adapter": {"missing": "A-3"}}, "no adapter 'A-3'"),
        ({**base, "_adapter": {"id": "A-1", "active": False, "component": "reasoner"}}, "A-1 is retired"),
        ({**base, "_adapter": {"id": "A-1", "active": True, "component": "image-encoder"}}, "not the reasoner"),
        (
            {**base, "checkpoint": "sha256:" + "a" * 64, "_adapter": {"id": "A-1", "component": "reasoner"}},
            "either an adapter or a checkpoint",
        ),
    ]
    for params, message in cases:
        with pytest.raises(JobFailed, match=message):
            run_infer(ctx, params)


def test_jbctl_adapters_lists_retires_and_refuses_bad_input(store: object, capsys: object) -> None:
    import json

    import pytest

    from cli.main import main as jbctl
    from daemon.handler import CommandHandler

    cap: pytest.CaptureFixture[str] = capsys  # type: ignore[assignment]
    handler = CommandHandler(store)  # type: ignore[arg-type]
    assert jbctl(["adapters"]) == 0 and "no adapters yet" in cap.readouterr().out
    s = handler.state
    # The same commands as the decider tests, recorded through the store (projections in the same transaction).
    steps = "  - {id: train, kind: train, with: {model: trm}}\n  - {id: eval, kind: evaluate, needs: [train]}\n"
    handler.handle(submit(make_ticket("TICKET-1", steps=steps, extra="update: core\n"), T0))
    out = {"component": "reasoner", "checkpoint": CORE_A}
    handler.handle(report(c.RecordJobSucceeded, "train", 1, ticket="TICKET-1", outputs=out))
    handler.handle(report(c.RecordJobSucceeded, "eval", 1, ticket="TICKET-1"))
    handler.handle(c.ApproveProposal(now=T0, proposal="P-1", actor="bob", approvers=["bob"]))
    assert s.core_version == 1
    tune = "  - {id: tune, kind: train, with: {model: trm, adapter: {rank: 4}}}\n"
    handler.handle(submit(make_ticket("TICKET-2", steps=tune, extra="update: adapter\n"), T0))
    adapter = {"adapter": "reasoner", "checkpoint": "c" * 64, "rank": 4, "core_checkpoint": CORE_A}
    metrics = {"blank_acc_gain": 0.07}
    handler.handle(report(c.RecordJobSucceeded, "tune", 1, ticket="TICKET-2", outputs=adapter, metrics=metrics))

    assert jbctl(["adapters"]) == 0
    table = cap.readouterr().out
    assert "A-1" in table and "TICKET-2" in table and "+0.070" in table and "active" in table
    for argv, message in [
        (["adapters", "retire"], "which adapter?"),
        (["adapters", "retire", "A-1; rm -rf /"], "is not an adapter id"),
        (["adapters", "retire", "A-9"], "no adapter A-9 (active: A-1)"),
        (["adapters", "list", "A-1"], "did you mean `jbctl adapters retire A-1`"),
        (["infer", "--component", "reasoner", "--input", "/dev/null", "--adapter", "TICKET-2"], "looks like A-3"),
    ]:
        assert jbctl(argv) == 1, argv
        assert message in cap.readouterr().err, argv
    assert jbctl(["describe", "TICKET-2", "--json"]) == 0
    assert [a["id"] for a in json.loads(cap.readouterr().out)["adapters"]] == ["A-1"]
    assert jbctl(["adapters", "retire", "A-1", "-m", "wrong task"]) == 0
    assert "A-1 retired" in cap.readouterr().out
    assert jbctl(["adapters", "retire", "A-1"]) == 1 and "already retired" in cap.readouterr().err
    assert jbctl(["adapters", "--json"]) == 0
    row = json.loads(cap.readouterr().out)[0]
    assert row["active"] is False and row["retired_reason"] == "manual" and row["retired_detail"] == "wrong task"
    assert jbctl(["describe", "TICKET-2"]) == 0
    assert "A-1  reasoner on core v1  retired (manual: wrong task)" in cap.readouterr().out


def test_adhoc_inference_resolves_adapters_from_the_projection(store: object) -> None:
    import pytest

    from daemon.handler import CommandHandler
    from daemon.memory import AdapterError, resolve_adapter

    handler = CommandHandler(store)  # type: ignore[arg-type]
    engine = store.engine  # type: ignore[attr-defined]
    with pytest.raises(AdapterError, match="no adapter A-1"):
        resolve_adapter(engine, "A-1", "reasoner")
    tune = make_ticket("TICKET-2", steps="  - {id: tune, kind: train}\n", extra="update: adapter\n")
    handler.handle(submit(tune, T0))
    out = {"adapter": "reasoner", "checkpoint": "c" * 64, "core_checkpoint": CORE_A}
    handler.handle(report(c.RecordJobSucceeded, "tune", 1, ticket="TICKET-2", outputs=out))
    assert resolve_adapter(engine, "TICKET-2", "reasoner")["id"] == "A-1"
    assert resolve_adapter(engine, "A-1", "reasoner")["core_checkpoint"] == CORE_A
    with pytest.raises(AdapterError, match="TICKET-2 has no image-encoder adapter"):
        resolve_adapter(engine, "TICKET-2", "image-encoder")
    with pytest.raises(AdapterError, match="neither an adapter id"):
        resolve_adapter(engine, "../etc", "reasoner")
    handler.handle(c.RetireAdapter(now=T0, adapter="A-1", actor="bob"))
    with pytest.raises(AdapterError, match="A-1 is retired"):
        resolve_adapter(engine, "TICKET-2", "reasoner")


def test_one_load_per_model_and_a_request_waits_for_a_background_load() -> None:
    import threading

    from workers.inference import ModelCache

    cache = ModelCache(1 << 30)
    gate, calls = threading.Event(), []

    class Model:
        def parameters(self) -> list:
            return []

        def buffers(self) -> list:
            return []

    def load() -> tuple[Model, dict]:
        calls.append(1)
        gate.wait(5)
        return Model(), {}

    background = threading.Thread(target=cache.get, args=("core:v2", load))
    background.start()
    while not cache.loading:
        pass
    assert not cache.has("core:v2")  # half-loaded models are not in the cache
    got: list = []
    request = threading.Thread(target=lambda: got.append(cache.get("core:v2", load)))
    request.start()
    gate.set()
    background.join(5)
    request.join(5)
    assert len(calls) == 1 and got and got[0][1] is True  # the request got the background's model, warm


def test_warm_worker_switches_to_a_new_core_only_once_loaded(tmp_path: Path) -> None:
    import json
    import threading

    import redis

    from cli.embedded import start_redis
    from schema.wire import CORE_KEY, warm_key, warm_workers
    from workers.keepalive import CoreFollower

    server = start_redis(tmp_path / "run")
    try:
        conn = redis.Redis.from_url(server.url)
        release, warmed = threading.Event(), []

        def warm(components: dict, root: Path, log: object = None) -> int:
            if components.get("reasoner", {}).get("checkpoint") == "bad":
                raise RuntimeError("no artifact bad")
            if components.get("reasoner", {}).get("checkpoint") == "v2":
                release.wait(5)
            warmed.append(components)
            return 1

        follower = CoreFollower(server.url, "w1", tmp_path, ["gpu"], poll_s=0.01, warm=warm)
        follower.step()
        assert json.loads(conn.get(warm_key("w1")))["core_version"] is None  # no core published yet
        conn.set(CORE_KEY, json.dumps({"version": 1, "components": {"reasoner": {"checkpoint": "v1"}}}))
        follower.step()
        assert follower.held is not None and follower.held["version"] == 1
        conn.set(CORE_KEY, json.dumps({"version": 2, "components": {"reasoner": {"checkpoint": "v2"}}}))
        stepping = threading.Thread(target=follower.step)
        stepping.start()
        seen = None
        for _ in range(500):
            seen = json.loads(conn.get(warm_key("w1")))
            if seen["loading"] == 2:
                break
            threading.Event().wait(0.01)
        assert seen is not None and seen["loading"] == 2 and seen["core_version"] == 1  # still serving v1
        release.set()
        stepping.join(5)
        [info] = warm_workers(conn)
        assert info["core_version"] == 2 and info["loading"] is None and info["queues"] == ["gpu"]
        conn.set(CORE_KEY, json.dumps({"version": 3, "components": {"reasoner": {"checkpoint": "bad"}}}))
        follower.step()
        info = warm_workers(conn)[0]
        assert info["core_version"] == 2 and "no artifact bad" in info["error"]  # keeps the core it has
    finally:
        server.stop()
