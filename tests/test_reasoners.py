"""Reasoners (HRM / TRM / direct) and their training job: shapes, gradients, halting, resume, metrics."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from workers.context import JobCancelled, LocalContext
from workers.eval.reasoners import evaluate_reasoner
from workers.models.reasoners import (
    HRM,
    TRM,
    ReasonerConfig,
    SegmentOut,
    Stack,
    build_reasoner,
    config_for_params,
    count_params,
    matched_configs,
)
from workers.train_reasoning import (
    Inputs,
    ReasonerTrainParams,
    Task,
    Trainer,
    Visual,
    default_augment,
    evaluate_model,
    glyph_render,
    grid_metrics,
    maze_augment,
    predict,
    train_reasoner,
)

torch.set_num_threads(1)

SMALL = ReasonerConfig(seq_len=16, vocab_size=5, n_classes=4, d_model=32, n_heads=2, n_layers=2, max_segments=4)


@functools.cache
def sudoku(n: int, n_train: int, n_test: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Minimal puzzles from the fabric, train and test from its leak-free split."""
    from workers.synth.sudoku import GENERATOR, SudokuParams

    tr = GENERATOR.generate(SudokuParams(n=n, split="train"), seed=0, shard=0, count=n_train)
    te = GENERATOR.generate(SudokuParams(n=n, split="test"), seed=0, shard=1, count=n_test)
    return (tr["puzzles"], tr["solutions"]), (te["puzzles"], te["solutions"])


def tokens(cfg: ReasonerConfig, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("kind", ["hrm", "trm", "direct"])
@pytest.mark.parametrize("latents", [False, True])
def test_shapes(kind: str, latents: bool) -> None:
    cfg = replace(SMALL, kind=kind, input_dim=12 if latents else None)  # type: ignore[arg-type]
    model = build_reasoner(cfg)
    x = torch.randn(3, 16, 12) if latents else tokens(cfg)
    state = model.initial_state(3)
    assert set(state) == set(model.state_names)
    for v in state.values():
        assert v.shape == (3, 17, 32)  # CLS + 16 cells
    new, out = model.segment(state, model.embed_input(x))
    assert out.logits.shape == (3, 16, 4)
    assert out.q_halt.shape == (3,)
    assert (out.q_continue is not None) == (kind == "hrm")
    assert all(not v.requires_grad for v in new.values())  # carried state is detached between segments


def _record_calls(module: nn.Module, log: list[bool]) -> None:
    module.register_forward_hook(lambda *_: log.append(torch.is_grad_enabled()))


def test_hrm_one_step_gradient() -> None:
    """Only the last L and the last H update build a graph; the carried state receives no gradient."""
    model = build_reasoner(replace(SMALL, kind="hrm", h_cycles=3, l_cycles=4))
    assert isinstance(model, HRM)
    calls_h: list[bool] = []
    calls_l: list[bool] = []
    _record_calls(model.H, calls_h)
    _record_calls(model.L, calls_l)
    state = {k: v.requires_grad_() for k, v in model.initial_state(2).items()}
    _, out = model.segment(state, model.embed_input(tokens(model.cfg, 2)))
    assert calls_l == [False] * 11 + [True]  # 3 cycles x 4 low-level updates
    assert calls_h == [False, False, True]
    out.logits.sum().backward()
    assert all(v.grad is None for v in state.values())
    assert all(p.grad is not None for p in model.H.parameters())
    assert all(p.grad is not None for p in model.L.parameters())


def test_hrm_gradient_equals_last_step_only() -> None:
    """The gradient equals that of the last two updates applied to the (constant) no-grad states."""
    torch.manual_seed(0)
    model = build_reasoner(replace(SMALL, kind="hrm", h_cycles=2, l_cycles=2))
    assert isinstance(model, HRM)
    x = tokens(model.cfg, 2)
    state = model.initial_state(2)
    _, out = model.segment(state, model.embed_input(x))
    out.logits.square().sum().backward()
    g1 = [p.grad.clone() for p in model.L.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with torch.no_grad():  # replay the first three updates by hand
        e = model.embed_input(x)
        zh, zl = state["zH"], state["zL"]
        rope = model._rope()
        zl = model.L(zl, zh + e, rope)
        zl = model.L(zl, zh + e, rope)
        zh = model.H(zh, zl, rope)
        zl = model.L(zl, zh + e, rope)
    e = model.embed_input(x)
    zl = model.L(zl, zh + e, rope)
    zh = model.H(zh, zl, rope)
    model.head(zh[:, 1:]).square().sum().backward()
    g2 = [p.grad for p in model.L.parameters()]
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_trm_full_backprop_through_last_recursion_only() -> None:
    model = build_reasoner(replace(SMALL, kind="trm", h_cycles=3, l_cycles=2))
    assert isinstance(model, TRM)
    calls: list[bool] = []
    _record_calls(model.net, calls)
    _, out = model.segment(model.initial_state(2), model.embed_input(tokens(model.cfg, 2)))
    assert calls == [False] * 6 + [True] * 3  # T=3 recursions of n+1 = 3 calls; the last with gradient
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.net.parameters())


def test_gradient_rule_swaps() -> None:
    """The ablations: hrm backpropagating through its last H cycle (TRM's rule), trm through its last z and y
    updates only (HRM's one-step rule). Same forward computation, only the graph differs."""
    hrm = build_reasoner(replace(SMALL, kind="hrm", h_cycles=3, l_cycles=4, grad="recursion"))
    assert isinstance(hrm, HRM)
    calls_h: list[bool] = []
    calls_l: list[bool] = []
    _record_calls(hrm.H, calls_h)
    _record_calls(hrm.L, calls_l)
    x = hrm.embed_input(tokens(hrm.cfg, 2))
    state = hrm.initial_state(2)
    _, out = hrm.segment(state, x)
    assert calls_l == [False] * 8 + [True] * 4 and calls_h == [False, False, True]
    out.logits.sum().backward()
    one_step = build_reasoner(replace(hrm.cfg, grad="paper"))
    one_step.load_state_dict(hrm.state_dict())
    _, out2 = one_step.segment(state, one_step.embed_input(tokens(hrm.cfg, 2)))
    torch.testing.assert_close(out.logits, out2.logits)  # the forward pass is the same
    out2.logits.sum().backward()
    g_rec = [p.grad for p in hrm.L.parameters()]
    g_one = [p.grad for p in one_step.L.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(g_rec, g_one, strict=True))  # the gradient is not

    trm = build_reasoner(replace(SMALL, kind="trm", h_cycles=3, l_cycles=2, grad="one_step"))
    assert isinstance(trm, TRM)
    calls: list[bool] = []
    _record_calls(trm.net, calls)
    _, out = trm.segment(trm.initial_state(2), trm.embed_input(tokens(trm.cfg, 2)))
    assert calls == [False] * 6 + [False, True, True]  # last recursion: z (no grad), z, y
    out.logits.sum().backward()
    assert all(p.grad is not None for p in trm.net.parameters())


def test_direct_is_one_pass() -> None:
    model = build_reasoner(replace(SMALL, kind="direct", max_segments=16))
    calls: list[bool] = []
    _record_calls(next(m for m in model.modules() if isinstance(m, Stack)), calls)
    model.segment({}, model.embed_input(tokens(model.cfg)))
    assert calls == [True]
    assert model.cfg.segments == 1


def test_equal_parameter_builder() -> None:
    cfgs = matched_configs(replace(SMALL, d_model=64, n_layers=4))
    sizes = {k: count_params(build_reasoner(c)) for k, c in cfgs.items()}
    assert set(sizes) == {"hrm", "trm", "direct"}
    assert max(sizes.values()) - min(sizes.values()) <= 2 * 64 + 2  # only the halting heads differ
    assert max(sizes.values()) / min(sizes.values()) < 1.01
    # an odd layer count is rounded up for everyone, since hrm splits its blocks in two halves
    assert {c.n_layers for c in matched_configs(replace(SMALL, n_layers=3)).values()} == {4}
    target = 250_000
    sized = config_for_params(target, replace(SMALL, n_layers=2))
    for c in sized.values():
        assert abs(count_params(build_reasoner(c)) - target) / target < 0.05


# ------------------------------------------------------------------------------------------------ halting


def _out(q_halt: list[float], q_cont: list[float] | None = None) -> SegmentOut:
    qc = torch.tensor(q_cont) if q_cont is not None else None
    return SegmentOut(torch.zeros(len(q_halt), 16, 4), torch.tensor(q_halt), qc)


def test_halting_rules() -> None:
    trm = build_reasoner(replace(SMALL, kind="trm", max_segments=4, halt_explore=0.0)).train()
    steps = torch.tensor([1, 1, 4, 2])
    # trm: halt when the halting logit is positive, or at the maximum number of segments
    assert trm.halt(steps, _out([2.0, -2.0, -2.0, 0.5])).tolist() == [True, False, True, True]
    hrm = build_reasoner(replace(SMALL, kind="hrm", max_segments=4, halt_explore=0.0)).train()
    # hrm: halt when Q(halt) > Q(continue)
    assert hrm.halt(steps, _out([1.0, 1.0, -3.0, 0.0], [0.0, 2.0, 0.0, 1.0])).tolist() == [
        True,
        False,
        True,
        False,
    ]
    # evaluation always runs the maximum, so a batch stays aligned
    assert trm.eval().halt(steps, _out([9.0, 9.0, 9.0, 9.0])).tolist() == [False, False, True, False]


def test_halting_exploration_forces_longer_runs() -> None:
    model = build_reasoner(replace(SMALL, kind="trm", max_segments=6, halt_explore=1.0)).train()
    g = torch.Generator().manual_seed(0)
    wants = _out([5.0] * 1000)
    # with exploration every row draws a minimum in 2..6, so none may stop after its first segment...
    assert not model.halt(torch.ones(1000, dtype=torch.long), wants, g).any()
    # ...and the minimum is spread over 2..6
    frac = model.halt(torch.full((1000,), 3), wants, g).float().mean()
    assert 0.25 < frac < 0.55  # P(min <= 3) = 2/5
    assert model.halt(torch.full((1000,), 6), wants, g).all()


def test_trainer_halting_statistics_and_refill() -> None:
    """Every slot runs max_segments when the head never halts; the histogram counts finished puzzles."""
    train, _ = sudoku(4, 64, 8)
    p = ReasonerTrainParams(
        model="trm", d_model=16, n_heads=2, batch_size=8, max_segments=3, halt_explore=0.0, h_cycles=1,
        l_cycles=1, warmup_steps=0, lr=1e-9, segment_ramp=0,
    )  # fmt: skip
    tr = Trainer(p, train, augment=None)
    for _ in range(7):
        tr.train_step()
    assert tr.halt_hist.tolist() == [0, 0, 0, 16]  # two rounds of 8 puzzles, 3 segments each
    assert tr.stream.seen == 24  # a third round was drawn at step 7
    with torch.no_grad():
        tr.model.q_head.bias.fill_(5.0)  # type: ignore[operator, union-attr]
    for _ in range(3):
        tr.train_step()
    # step 8 ends the running puzzles after 2 segments, step 9's fresh ones stop after 1 (counted at refill)
    assert tr.halt_hist.tolist() == [0, 8, 8, 16]


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_never_count_givens() -> None:
    sudoku4 = Task("sudoku", 4, 4)
    puzzles = torch.tensor([[1, 0, 0, 2], [0, 3, 4, 0]])
    target = sudoku4.target(torch.tensor([[1, 3, 4, 2], [2, 3, 4, 1]]))
    given = sudoku4.given(puzzles)
    wrong_givens = torch.tensor([[4, 3, 4, 1], [2, 1, 1, 1]]) - 1  # every blank right, every given wrong
    m = grid_metrics(wrong_givens, target, given)
    assert m["blank_acc"] == 1.0
    assert m["exact_acc"] == 0.0  # but the grid is not solved
    right_givens = torch.tensor([[1, 1, 1, 2], [1, 3, 4, 2]]) - 1  # every given right, every blank wrong
    assert grid_metrics(right_givens, target, given)["blank_acc"] == 0.0
    half = torch.tensor([[1, 3, 1, 2], [2, 3, 4, 1]]) - 1
    assert grid_metrics(half, target, given) == {"exact_acc": 0.5, "blank_acc": 0.75}
    # copying givens writes them in over whatever the model says
    logits = torch.zeros(2, 4, 4)
    logits[..., 0] = 1.0  # "1" everywhere
    assert (predict(logits, puzzles, sudoku4, copy_givens=True) + 1).tolist() == [[1, 1, 1, 2], [1, 3, 4, 1]]
    assert (predict(logits, puzzles, sudoku4, copy_givens=False) + 1).tolist() == [[1] * 4] * 2


@pytest.mark.parametrize("copy_givens", [False, True])
def test_evaluation_counts_only_blank_cells(copy_givens: bool) -> None:
    """End to end through evaluate_model with a rigged model: right on every blank, wrong on every given."""
    _, (puzzles, solutions) = sudoku(4, 8, 16)
    task = Task("sudoku", 4, 4)
    target = task.target(torch.from_numpy(solutions.astype(np.int64)).view(16, -1))
    given = task.given(torch.from_numpy(puzzles.astype(np.int64)).view(16, -1))
    answer = torch.where(given, (target + 1) % 4, target)  # wrong exactly on the givens
    model = build_reasoner(replace(SMALL, kind="trm", max_segments=3))

    def rigged(state: dict[str, torch.Tensor], x_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], SegmentOut]:
        logits = F.one_hot(answer[: len(x_emb)], 4).float()
        return state, SegmentOut(logits, torch.full((len(x_emb),), 1.0), None)  # halts after one segment

    model.segment = rigged  # type: ignore[method-assign]
    inputs = Inputs(None, torch.device("cpu"), 0, task)
    ev = evaluate_model(model, task, (puzzles.astype(np.int64), solutions.astype(np.int64)), inputs, copy_givens)
    assert ev["blank_acc"] == 1.0 and ev["blank_acc_act"] == 1.0
    assert ev["exact_acc"] == (1.0 if copy_givens else 0.0)  # a wrong given spoils the grid unless copied
    assert ev["mean_steps"] == 1.0 and ev["blank_by_steps"] == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ params


def test_ema_is_on_for_both_recursive_kinds() -> None:
    assert ReasonerTrainParams(model="hrm").ema_decay == ReasonerTrainParams(model="trm").ema_decay == 0.999
    assert ReasonerTrainParams(model="direct").ema_decay is None
    assert ReasonerTrainParams(model="hrm", ema=0.99).ema_decay == 0.99


def test_bad_params_give_clear_errors() -> None:
    with pytest.raises(ValidationError, match="lr_rate"):
        ReasonerTrainParams.model_validate({"lr_rate": 0.1})
    with pytest.raises(ValidationError, match="model"):
        ReasonerTrainParams.model_validate({"model": "gpt"})
    with pytest.raises(ValidationError, match="multiple of n_heads"):
        ReasonerTrainParams(d_model=30, n_heads=4)
    with pytest.raises(ValidationError, match="even n_layers"):
        ReasonerTrainParams(model="hrm", n_layers=3)
    with pytest.raises(ValidationError, match="greater than 0"):
        ReasonerTrainParams(lr=0)
    ReasonerTrainParams.model_validate({"model": "direct", "max_seconds": 30})


# ------------------------------------------------------------------------------------------------ training


def _tiny(model: str, **kw: object) -> ReasonerTrainParams:
    base: dict[str, object] = dict(
        model=model, d_model=16, n_heads=2, n_layers=2, batch_size=8, max_segments=3, h_cycles=2, l_cycles=1,
        halt_explore=0.5, warmup_steps=2, checkpoint_every=3, log_every=2, seed=3, segment_ramp=0,
    )  # fmt: skip
    return ReasonerTrainParams.model_validate({**base, **kw})


@pytest.mark.integration
@pytest.mark.parametrize("model", ["hrm", "trm", "direct"])
def test_exact_resume(model: str, tmp_path: Path) -> None:
    """2N steps straight == N steps, checkpoint, a new process state, N more steps: bit for bit."""
    train, test = sudoku(4, 64, 8)
    full = LocalContext(tmp_path / "full")
    m_full = train_reasoner(full, _tiny(model, max_steps=12), train, test)
    first = LocalContext(tmp_path / "first")
    train_reasoner(first, _tiny(model, max_steps=6), train, test)
    ckpt = first.checkpoints[-1][0]
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG
    second = LocalContext(tmp_path / "second", resume_from=ckpt, attempt=2)
    m_resumed = train_reasoner(second, _tiny(model, max_steps=12), train, test)
    assert second.progress_log[0]["step"] == 8  # it did continue from step 6 rather than start over
    a = torch.load(full.checkpoints[-1][0], weights_only=False)
    b = torch.load(second.checkpoints[-1][0], weights_only=False)
    for key in ("model", "ema"):
        if a[key] is not None:
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name in ("state", "steps", "halted", "puzzles"):
        va, vb = a["carry"][name], b["carry"][name]
        if isinstance(va, dict):
            assert all(torch.equal(va[k], vb[k]) for k in va)
        else:
            assert torch.equal(va, vb), name
    assert torch.equal(a["halt_hist"], b["halt_hist"])
    assert a["stream"]["seen"] == b["stream"]["seen"] and a["stream"]["cursor"] == b["stream"]["cursor"]
    assert [h[:2] for h in a["history"]] == [h[:2] for h in b["history"]]
    for k in ("exact_acc", "blank_acc", "mean_steps", "puzzles_seen", "steps"):
        assert m_full[k] == m_resumed[k], k


@pytest.mark.integration
def test_checkpoint_refuses_other_config(tmp_path: Path) -> None:
    train, test = sudoku(4, 64, 8)
    ctx = LocalContext(tmp_path / "a")
    train_reasoner(ctx, _tiny("trm", max_steps=2), train, test)
    other = LocalContext(tmp_path / "b", resume_from=ctx.checkpoints[-1][0])
    with pytest.raises(ValueError, match="different model configuration"):
        train_reasoner(other, _tiny("trm", max_steps=4, d_model=32), train, test)


@pytest.mark.integration
def test_training_learns_4x4(tmp_path: Path, seed: int = 0) -> None:
    """A short TRM run on real minimal 4x4 sudoku: loss falls and blank-cell accuracy clears chance.

    Chance on a blank cell is 1/4. Measured with this recipe (300 steps, CPU, 1 thread), blank-cell
    accuracy / final-to-initial loss ratio for seeds 0..4: 0.655/0.59, 0.524/0.79, 0.643/0.62,
    0.655/0.53, 0.658/0.61. The test runs seed 0 and asks for chance + 0.15 and a 15% loss drop.
    """
    train, test = sudoku(4, 300, 100)
    p = ReasonerTrainParams(
        model="trm", d_model=32, n_heads=2, n_layers=2, batch_size=32, max_segments=2, h_cycles=1,
        l_cycles=1, lr=3e-3, warmup_steps=20, max_steps=TRAIN_STEPS, log_every=10, seed=seed, segment_ramp=0,
    )  # fmt: skip
    ctx = LocalContext(tmp_path)
    m = train_reasoner(ctx, p, train, test)
    losses = [e["loss"] for e in ctx.progress_log]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    assert m["blank_acc"] > 0.25 + MARGIN, m
    # the job's contract: progress fields, checkpoints, both PNG artifacts
    assert {"loss", "lr", "puzzles_per_s", "eta_s"} <= set(ctx.progress_log[-1])
    assert ctx.progress_log[-1]["step"] == TRAIN_STEPS and ctx.checkpoints[-1][1] == TRAIN_STEPS
    kinds = {a["meta"]["what"] for a in ctx.artifacts}
    assert kinds == {"loss_curve", "accuracy_vs_steps"}
    assert all(Path(a["path"]).read_bytes()[:4] == b"\x89PNG" for a in ctx.artifacts)
    assert 1.0 <= m["mean_steps"] <= 2.0
    # evaluating the saved checkpoint reproduces the job's own evaluation
    again = evaluate_reasoner(LocalContext(tmp_path / "eval"), p, ctx.checkpoints[-1][0], test)
    assert again["exact_acc"] == m["exact_acc"] and again["blank_acc"] == m["blank_acc"]


TRAIN_STEPS = 300
MARGIN = 0.15


def test_augmentation_preserves_validity() -> None:
    from workers.synth.sudoku import agrees, is_solution

    (p, s), _ = sudoku(6, 16, 1)
    pa, sa = default_augment()(p, s, np.random.default_rng(0))
    assert not np.array_equal(pa, p)
    for a, b in zip(pa, sa, strict=True):
        assert is_solution(b) and agrees(a, b)


# ------------------------------------------------------------------------------------------------ visual


@pytest.mark.integration
def test_visual_reasoner_reads_latents(tmp_path: Path) -> None:
    train, test = sudoku(4, 64, 16)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 24))  # any [B,C,H,W] -> [B,D] module
    visual = Visual(encoder=encoder, render=glyph_render(cell_size=16))  # the fabric's glyphs
    with pytest.raises(ValueError, match="loss_on 'all'"):
        train_reasoner(LocalContext(tmp_path / "x"), _tiny("trm", max_steps=2), train, test, visual=visual)
    p = _tiny("trm", max_steps=4, loss_on="all")
    ctx = LocalContext(tmp_path / "v")
    m = train_reasoner(ctx, p, train, test, visual=visual)
    assert 0.0 <= m["blank_acc"] <= 1.0
    assert not any(w.requires_grad for w in encoder.parameters())  # the core's encoder stays frozen
    ckpt = torch.load(ctx.checkpoints[-1][0], weights_only=False)
    assert ckpt["model_config"]["input_dim"] == 24
    assert ckpt["carry"]["x"].shape == (8, 16, 24)  # slots hold latents, not tokens
    again = evaluate_reasoner(LocalContext(tmp_path / "e"), p, ctx.checkpoints[-1][0], test, visual=visual)
    assert set(again) >= {"exact_acc", "blank_acc", "mean_steps"}


def test_segment_stagger_ramps_the_cap() -> None:
    """segment_ramp=2: one segment per puzzle for steps 0-1, two for steps 2-3, then the maximum (3)."""
    train, _ = sudoku(4, 64, 8)
    p = ReasonerTrainParams(
        model="hrm", d_model=16, n_heads=2, batch_size=8, max_segments=3, segment_ramp=2, halt_explore=0.0,
        h_cycles=1, l_cycles=1, warmup_steps=0, lr=1e-9,
    )  # fmt: skip
    tr = Trainer(p, train, augment=None)
    caps = []
    for _ in range(6):
        caps.append(tr.segment_cap())
        tr.train_step()
    assert caps == [1, 1, 2, 2, 3, 3]
    assert tr.halt_hist.tolist() == [0, 16, 8, 0]
    assert tr.stream.seen == 32


# ------------------------------------------------------------------------------------------------ mazes


@pytest.mark.integration
def test_maze_task_trains_and_never_scores_walls(tmp_path: Path) -> None:
    from workers.synth.maze import GENERATOR, MazeParams, shortest_path

    mp = MazeParams(height=7, width=7)
    train = GENERATOR.generate(mp, seed=0, shard=0, count=32)
    test = GENERATOR.generate(mp, seed=0, shard=1, count=8)
    # flips/transposition keep the shortest path a shortest path
    m, path = maze_augment(train["maze"], train["path"], np.random.default_rng(0))
    for mi, pi in zip(m, path, strict=True):
        start = tuple(int(v) for v in np.argwhere(mi == 2)[0])
        goal = tuple(int(v) for v in np.argwhere(mi == 3)[0])
        assert len(shortest_path(mi == 1, start, goal)) == int(pi.sum())  # type: ignore[arg-type]
        assert not (pi.astype(bool) & (mi == 1)).any()
    ctx = LocalContext(tmp_path)
    metrics = train_reasoner(ctx, _tiny("trm", max_steps=4), train, test)
    ckpt = torch.load(ctx.checkpoints[-1][0], weights_only=False)
    assert ckpt["model_config"]["seq_len"] == 49 and ckpt["model_config"]["n_classes"] == 2
    assert 0.0 <= metrics["blank_acc"] <= 1.0
    again = evaluate_reasoner(LocalContext(tmp_path / "e"), _tiny("trm"), ctx.checkpoints[-1][0], test)
    assert again["blank_acc"] == metrics["blank_acc"]
    with pytest.raises(ValueError, match="checkpoint is for"):
        evaluate_reasoner(LocalContext(tmp_path / "x"), _tiny("trm"), ctx.checkpoints[-1][0], sudoku(4, 8, 8)[1])


@dataclass
class SlowContext(LocalContext):
    """A machine under load: between steps the job waits (descheduled), which costs wall time, not CPU."""

    wait: float = 0.02

    def cancelled(self) -> bool:
        time.sleep(self.wait)
        return super().cancelled()


@pytest.mark.integration
def test_cpu_budget_clock_ignores_waiting(tmp_path: Path) -> None:
    """budget_clock cpu: max_seconds counts the process's CPU time, so waiting does not eat the budget."""
    train, test = sudoku(4, 64, 8)
    budget = 0.3
    wall = train_reasoner(SlowContext(tmp_path / "w"), _tiny("trm", max_steps=10**6, max_seconds=budget), train, test)
    cpu = train_reasoner(
        SlowContext(tmp_path / "c"), _tiny("trm", max_steps=10**6, max_seconds=budget, budget_clock="cpu"), train, test
    )
    assert wall["train_seconds"] == wall["train_wall_seconds"] >= budget
    assert cpu["train_seconds"] == cpu["train_cpu_seconds"] >= budget
    # every step of the CPU-clocked run waited 0.02 s that its budget did not count
    assert cpu["train_wall_seconds"] >= cpu["train_cpu_seconds"] + 0.9 * 0.02 * cpu["steps"]
    assert cpu["steps"] > wall["steps"]


@pytest.mark.integration
def test_cancel_saves_a_checkpoint_then_stops(tmp_path: Path) -> None:
    train, test = sudoku(4, 32, 8)
    ctx = LocalContext(tmp_path, stop_requested=True)
    with pytest.raises(JobCancelled):
        train_reasoner(ctx, _tiny("trm", max_steps=5), train, test)
    assert ctx.checkpoints and ctx.checkpoints[-1][0].exists()  # the next attempt resumes from here
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically: no temp file left behind
