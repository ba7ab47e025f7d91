"""Training and evaluation of the grid reasoners (``hrm``, ``trm``, ``direct``) on sudoku.

Training follows the papers' carried-batch scheme: a batch of ``batch_size`` slots, each holding one puzzle
and its latent state. Every optimiser step runs one deep-supervision segment on all slots; a slot whose
puzzle halted (ACT, or the maximum number of segments) takes the next puzzle of the stream and a fresh
state. So the checkpoint must hold the carried state, the slots' puzzles and step counts, the halting
statistics, the optimiser, every RNG and the data position, which makes resume bit-exact on CPU.

Entry point for the `train` job: :func:`train_reasoner` (evaluation: `workers/eval/reasoners.py`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from workers.context import JobCancelled, JobContext
from workers.models.reasoners import Reasoner, ReasonerConfig, SegmentOut, build_reasoner, count_params
from workers.synth.glyphs import visual_sudoku
from workers.synth.sudoku import augment
from workers.training import load_checkpoint, pick_device, save_atomic
from workers.training import lr_at as schedule

# (inputs, answers): sudoku (puzzles [N, n, n] 0 = blank, solutions [N, n, n]) or maze (maze [N, H, W] with
# 0 free / 1 wall / 2 start / 3 goal, path [N, H, W] 1 on the shortest path)
Grids = tuple[np.ndarray, np.ndarray]
# (inputs, answers, rng) -> the same puzzles under random validity-preserving transforms
Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator], Grids]
# (puzzles [k, n, n], rng) -> cell images [k, n*n, C, H, W] (visual sudoku)
Render = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class ReasonerTrainParams(BaseModel):
    """Parameters of a ``train`` step with ``model: hrm | trm | direct`` (a ticket's ``with:``)."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["hrm", "trm", "direct"] = "trm"
    # architecture (see ReasonerConfig); hrm splits n_layers into its H and L modules
    d_model: int = Field(64, ge=8, le=4096)
    n_heads: int = Field(4, ge=1)
    n_layers: int = Field(2, ge=1, le=64)
    expansion: float = Field(4.0, gt=0)
    pos: Literal["rope", "learned"] = "learned"
    h_cycles: int = Field(2, ge=1, le=64, description="hrm: H cycles; trm: recursions T per segment")
    l_cycles: int = Field(2, ge=1, le=64, description="hrm: L steps per cycle; trm: latent updates n")
    max_segments: int = Field(4, ge=1, le=64, description="deep-supervision segments (ACT maximum)")
    # Defaults are the recipe that won the CPU benchmark (docs/BENCHMARKS.md#reasoning): without the
    # stagger, trm stayed at chance level for 1,400+ steps on 6x6.
    segment_ramp: int = Field(
        400, ge=0, description="stagger: train with 1 segment, one more every this many steps (0 = off)"
    )
    eval_segments: int | None = Field(None, ge=1, le=256, description="test-time segments (default: max)")
    halt_explore: float = Field(0.1, ge=0, le=1)
    q_continue: bool = True
    grad: Literal["paper", "one_step", "recursion"] = Field(
        "paper", description="updates with gradient: the paper's rule, or the other paper's (an ablation)"
    )
    # optimisation
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema: float | None = Field(None, ge=0, lt=1, description="EMA decay of weights; default 0.999 for hrm and trm")
    loss_on: Literal["all", "blanks"] = Field(
        "blanks", description="blanks: loss on blank cells only, givens are copied into the answer"
    )
    augment: bool = True
    # budget and bookkeeping
    max_steps: int = Field(2000, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="time budget of the training loop (see budget_clock)")
    # What max_seconds counts. "cpu": CPU seconds of this process (time.process_time, all its threads), so a
    # budget buys the same work on a loaded machine as on a quiet one (benchmarks); "wall": elapsed time.
    budget_clock: Literal["wall", "cpu"] = "wall"
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ReasonerTrainParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("pos 'rope' needs an even head dimension d_model / n_heads")
        if self.model == "hrm" and self.n_layers % 2:
            raise ValueError("model 'hrm' splits n_layers between its H and L modules: use an even n_layers")
        return self

    @property
    def ema_decay(self) -> float | None:
        # Both recursive kinds: the TRM paper adds the EMA, the HRM reference has none, but without it here hrm
        # lost 0.045 exact / 0.07 blank accuracy (docs/BENCHMARKS.md#reasoning) and a comparison measured the EMA
        return self.ema if self.ema is not None else (0.999 if self.model in ("hrm", "trm") else None)

    def model_config_for(self, task: Task, input_dim: int | None = None) -> ReasonerConfig:
        return ReasonerConfig(
            kind=self.model, seq_len=task.cells, vocab_size=task.vocab_size, n_classes=task.n_classes,
            input_dim=input_dim,
            d_model=self.d_model, n_heads=self.n_heads, n_layers=self.n_layers, expansion=self.expansion,
            pos=self.pos, h_cycles=self.h_cycles, l_cycles=self.l_cycles, max_segments=self.max_segments,
            halt_explore=self.halt_explore, q_continue=self.q_continue, grad=self.grad,
        )  # fmt: skip


def glyph_render(cell_size: int = 28) -> Render:
    """The fabric's glyph renderer: puzzles [k, n, n] -> float cell images [k, n*n, 1, S, S] in [0, 1]."""
    def render(puzzles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cells = visual_sudoku(puzzles, rng, cell_size)
        k, n = cells.shape[:2]
        return cells.reshape(k, n * n, 1, cell_size, cell_size).astype(np.float32) / 255.0

    return render


@dataclass
class Visual:
    """Visual sudoku: each cell is a glyph image (a fresh random rendering whenever a puzzle enters the
    batch) and a frozen encoder, any module [B,C,H,W] -> [B,D] (the core's JEPA encoder), turns it into a
    latent; the reasoner reads those latents instead of digit tokens."""

    encoder: nn.Module
    render: Render = field(default_factory=glyph_render)
    # > 0: encode this many renderings of each symbol (blank and every digit) once, and give each cell the
    # latent of a random one of its symbol's renderings. Reading a cell is then a lookup instead of an
    # encoder pass: a ViT encoder over every cell of every new puzzle costs ~8x a TRM step on CPU
    # (bench/reasoning.py). Evaluate with a bank-less Visual to score on renderings never seen in training.
    bank: int = 0

    def __post_init__(self) -> None:
        if self.bank < 0:
            raise ValueError(f"Visual.bank must be >= 0 renderings per symbol, got {self.bank}")


# --------------------------------------------------------------------------------------------- data


MAZE_WALL = 1


@dataclass(frozen=True)
class Task:
    """How a grid puzzle becomes tokens and answer classes, and which cells its input already gives away.

    sudoku: tokens 0..n (0 = blank), classes digit - 1, givens = the filled cells.
    maze: tokens 0 free / 1 wall / 2 start / 3 goal, classes "on the shortest path" 0/1, givens = walls
    (never on a path); the path through the free cells is what the model must find.
    """

    name: Literal["sudoku", "maze"]
    height: int
    width: int

    @property
    def cells(self) -> int:
        return self.height * self.width

    @property
    def vocab_size(self) -> int:
        return self.height + 1 if self.name == "sudoku" else 4

    @property
    def n_classes(self) -> int:
        return self.height if self.name == "sudoku" else 2

    def target(self, answers: Tensor) -> Tensor:
        return answers - 1 if self.name == "sudoku" else answers

    def given(self, inputs: Tensor) -> Tensor:
        return inputs > 0 if self.name == "sudoku" else inputs == MAZE_WALL

    def given_class(self, inputs: Tensor) -> Tensor:
        return (inputs - 1).clamp(min=0) if self.name == "sudoku" else torch.zeros_like(inputs)


def as_grids(data: Any) -> tuple[Task, Grids]:
    """Accept sudoku as (puzzles, solutions), a dict or an object with ``puzzles``/``solutions``, or mazes
    as a dict or object with ``maze``/``path`` (what the fabric's generators return)."""
    keys = ("maze", "path") if (isinstance(data, dict) and "maze" in data) or hasattr(data, "maze") else None
    if keys is None:
        keys = ("puzzles", "solutions")
    if isinstance(data, dict):
        a, b = data[keys[0]], data[keys[1]]
    elif hasattr(data, keys[0]):
        a, b = getattr(data, keys[0]), getattr(data, keys[1])
    else:
        a, b = data
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"expected {keys[0]} and {keys[1]} of the same shape [N, H, W], got {a.shape} and {b.shape}")
    if keys[0] == "puzzles" and a.shape[1] != a.shape[2]:
        raise ValueError(f"sudoku grids are square, got {a.shape[1]}x{a.shape[2]}")
    task = Task("maze" if keys[0] == "maze" else "sudoku", int(a.shape[1]), int(a.shape[2]))
    return task, (a.astype(np.int64), b.astype(np.int64))


def maze_augment(mazes: np.ndarray, paths: np.ndarray, rng: np.random.Generator) -> Grids:
    """Flips of the grid (and transposition when square): they keep walls, start, goal and shortest path."""
    out_m, out_p = [], []
    square = mazes.shape[1] == mazes.shape[2]
    for m, p in zip(mazes, paths, strict=True):
        flip = rng.integers(0, 2, size=3)
        if flip[0]:
            m, p = m[::-1], p[::-1]
        if flip[1]:
            m, p = m[:, ::-1], p[:, ::-1]
        if flip[2] and square:
            m, p = m.T, p.T
        out_m.append(m)
        out_p.append(p)
    return np.stack(out_m), np.stack(out_p)


def default_augment(task: Task | None = None) -> Augment:
    if task is not None and task.name == "maze":
        return maze_augment
    return sudoku_augment()


def sudoku_augment() -> Augment:
    """The sudoku fabric's validity-preserving symmetries (digit relabelling, band/stack and row/column
    permutations, transposition for square boxes), one random symmetry per puzzle."""
    def batch(puzzles: np.ndarray, solutions: np.ndarray, rng: np.random.Generator) -> Grids:
        pairs = [augment(p, s, rng) for p, s in zip(puzzles, solutions, strict=True)]
        return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs])

    return batch


class PuzzleStream:
    """Shuffled epochs over the training set, each drawn puzzle augmented; fully resumable."""

    def __init__(self, grids: Grids, seed: int, augment: Augment | None) -> None:
        self.puzzles, self.solutions = grids
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.epoch, self.cursor = 0, 0
        self.order = self.rng.permutation(len(self.puzzles))
        self.seen = 0

    def take(self, k: int) -> Grids:
        idx: list[int] = []
        while len(idx) < k:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self.rng.permutation(len(self.puzzles))
            j = min(len(self.order), self.cursor + k - len(idx))
            idx.extend(self.order[self.cursor : j].tolist())
            self.cursor = j
        p, s = self.puzzles[idx], self.solutions[idx]
        if self.augment is not None:
            p, s = self.augment(p, s, self.rng)
        self.seen += k
        return np.asarray(p, dtype=np.int64), np.asarray(s, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "cursor": self.cursor,
                "order": self.order.copy(), "seen": self.seen}  # fmt: skip

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.rng.bit_generator.state = sd["rng"]
        self.epoch, self.cursor, self.order, self.seen = sd["epoch"], sd["cursor"], sd["order"], sd["seen"]


class Inputs:
    """Turns puzzles into model inputs: digit tokens, or latents of rendered glyphs through the encoder."""

    def __init__(self, visual: Visual | None, device: torch.device, seed: int, task: Task) -> None:
        self.visual = visual
        self.device = device
        self.rng = np.random.default_rng(seed + 7919)  # glyph style draws, separate from the data stream
        self.input_dim: int | None = None
        self.bank: Tensor | None = None  # [symbols, renderings, D] latents (Visual.bank)
        if visual is not None:
            visual.encoder.to(device).eval().requires_grad_(False)  # frozen: it is the core's encoder
            if visual.bank:
                # its own generator: the bank must not shift the draws of the per-cell choices below
                self.bank = self._encode_bank(visual, task.vocab_size, np.random.default_rng([seed, 7919, 1]))
            self.input_dim = int(self(np.zeros((1, task.height, task.width), dtype=np.int64)).shape[-1])

    @torch.no_grad()
    def _encode_bank(self, visual: Visual, symbols: int, rng: np.random.Generator, chunk: int = 1024) -> Tensor:
        cells = np.repeat(np.arange(symbols, dtype=np.int64), visual.bank)[:, None, None]  # [m, 1, 1] grids
        out = []
        for lo in range(0, len(cells), chunk):
            images = torch.as_tensor(np.asarray(visual.render(cells[lo : lo + chunk], rng)), dtype=torch.float32)
            out.append(visual.encoder(images.flatten(0, 1).to(self.device)).float())
        return torch.cat(out).reshape(symbols, visual.bank, -1)

    @torch.no_grad()
    def __call__(self, puzzles: np.ndarray) -> Tensor:
        if self.visual is None:
            return torch.from_numpy(puzzles.reshape(len(puzzles), -1)).to(self.device)
        if self.bank is not None:
            digits = torch.from_numpy(puzzles.reshape(len(puzzles), -1)).to(self.device)
            pick = torch.from_numpy(self.rng.integers(self.bank.shape[1], size=digits.shape)).to(self.device)
            return self.bank[digits, pick]
        images = torch.as_tensor(np.asarray(self.visual.render(puzzles, self.rng)), dtype=torch.float32)
        k, cells = images.shape[:2]
        z = self.visual.encoder(images.flatten(0, 1).to(self.device))
        return z.reshape(k, cells, -1).float()


# --------------------------------------------------------------------------------------------- metrics


def predict(logits: Tensor, inputs: Tensor, task: Task, copy_givens: bool) -> Tensor:
    """Answer classes [B, L] from logits; with ``copy_givens`` the givens' answers are written in as given."""
    pred = logits.argmax(-1)
    return torch.where(task.given(inputs), task.given_class(inputs), pred) if copy_givens else pred


def grid_metrics(pred: Tensor, target: Tensor, given: Tensor) -> dict[str, float]:
    """Exact full-grid accuracy and accuracy on blank cells only (givens never count), pooled over cells."""
    pred, target, given = (t.reshape(t.shape[0], -1) for t in (pred, target, given))
    blank = ~given
    right = pred == target
    n_blank = int(blank.sum())
    return {
        "exact_acc": float(right.all(-1).float().mean()),
        "blank_acc": float((right & blank).sum()) / max(n_blank, 1),
    }


# --------------------------------------------------------------------------------------------- training


class EMA:
    """Exponential moving average of the weights (TRM: stabilises training on small data)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up of the decay: a fixed 0.999 would keep most of the random init for the first ~1,000
        # steps, which is the whole run in a CPU budget.
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def lr_at(step: int, p: ReasonerTrainParams) -> float:
    """Linear warmup, then constant or cosine down to a tenth of `lr` at `max_steps`."""
    floor = 0.1 * p.lr if p.lr_schedule == "cosine" else None
    return schedule(step, p.lr, p.warmup_steps, p.max_steps, floor)


class Trainer:
    """One training run: model, optimiser, carried batch, stream, statistics; checkpointable as a whole."""

    def __init__(
        self,
        p: ReasonerTrainParams,
        train: Any,
        augment: Augment | None,
        visual: Visual | None = None,
    ) -> None:
        self.p = p
        self.device = pick_device(p.device)
        torch.manual_seed(p.seed)
        self.task, grids = as_grids(train)
        if visual is not None and self.task.name != "sudoku":
            raise ValueError("visual input is defined for sudoku only")
        self.inputs = Inputs(visual, self.device, p.seed, self.task)
        if visual is not None and p.loss_on == "blanks":
            raise ValueError("visual sudoku reads the givens from images: use loss_on 'all'")
        self.cfg = p.model_config_for(self.task, self.inputs.input_dim)
        self.model: Reasoner = build_reasoner(self.cfg).to(self.device)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, w in self.model.named_parameters():
            (decay if w.ndim >= 2 and "embed" not in name and "pos" not in name else no_decay).append(w)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=p.lr, betas=(0.9, p.beta2),
        )  # fmt: skip
        self.ema = EMA(self.model, p.ema_decay) if p.ema_decay else None
        self.stream = PuzzleStream(grids, p.seed, augment if p.augment else None)
        self.gen = torch.Generator(device=self.device).manual_seed(p.seed + 1)  # ACT exploration
        b, t = p.batch_size, self.task.cells
        self.state = self.model.initial_state(b)
        self.steps = torch.zeros(b, dtype=torch.long, device=self.device)
        self.halted = torch.ones(b, dtype=torch.bool, device=self.device)  # all slots take a puzzle first
        self.puzzles = torch.zeros(b, t, dtype=torch.long, device=self.device)
        self.solutions = torch.zeros(b, t, dtype=torch.long, device=self.device)
        x0 = self.inputs(np.zeros((1, self.task.height, self.task.width), dtype=np.int64))
        self.x = x0.new_zeros((b, *x0.shape[1:]))  # the slots' model inputs (tokens or latents)
        self.step = 0
        self.elapsed = 0.0  # training seconds on the budget clock, summed over attempts
        self.wall_seconds = 0.0  # both clocks, summed over attempts (reported beside each other)
        self.cpu_seconds = 0.0
        self.halt_hist = torch.zeros(self.cfg.segments + 1, dtype=torch.long)  # segments used per puzzle
        self.history: list[tuple[int, float, float]] = []  # (step, loss, lr) every log_every steps

    # -- one optimiser step on the carried batch

    def _refill(self) -> None:
        """Slots that halted take the next puzzles of the stream and a fresh state."""
        h = self.halted
        k = int(h.sum())
        if k == 0:
            return
        used = self.steps[h & (self.steps > 0)].cpu()  # steps 0: the empty slots of the first step
        self.halt_hist += torch.bincount(used, minlength=len(self.halt_hist))
        pz, sol = self.stream.take(k)
        self.puzzles[h] = torch.from_numpy(pz.reshape(k, -1)).to(self.device)
        self.solutions[h] = torch.from_numpy(sol.reshape(k, -1)).to(self.device)
        self.x[h] = self.inputs(pz)
        self.state = self.model.reset_state(self.state, h)
        self.steps = torch.where(h, 0, self.steps)

    def losses(self, out: SegmentOut, target_q: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        p = self.p
        targets = self.task.target(self.solutions)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        if p.loss_on == "blanks":  # the givens are copied into the answer, so they need no learning
            mask = ~self.task.given(self.puzzles)
        else:
            mask = torch.ones_like(self.puzzles, dtype=torch.bool)
        ce = ce.view_as(targets) * mask
        lm = (ce.sum(-1) / mask.sum(-1).clamp(min=1)).mean()  # each puzzle weighs the same
        with torch.no_grad():
            pred = predict(out.logits, self.puzzles, self.task, p.loss_on == "blanks")
            correct = (pred == targets).all(-1)
        loss = lm
        stats = {"lm_loss": float(lm.detach()), "train_exact": float(correct.float().mean())}
        if self.cfg.kind != "direct":
            q = F.binary_cross_entropy_with_logits(out.q_halt, correct.float())
            loss = loss + 0.5 * q
            stats["q_halt_loss"] = float(q.detach())
            if target_q is not None and out.q_continue is not None:
                qc = F.binary_cross_entropy_with_logits(out.q_continue, target_q)
                loss = loss + 0.5 * qc
                stats["q_cont_loss"] = float(qc.detach())
        return loss, stats

    def segment_cap(self) -> int:
        """Segments a puzzle may use now: all of them, or (stagger) 1 at first and one more every
        ``segment_ramp`` steps, so the early steps are spent on many puzzles rather than long ones."""
        if not self.p.segment_ramp:
            return self.cfg.segments
        return min(self.cfg.segments, 1 + self.step // self.p.segment_ramp)

    def train_step(self) -> dict[str, float]:
        self.model.train()
        self._refill()
        lr = lr_at(self.step, self.p)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x_emb = self.model.embed_input(self.x)
        self.state, out = self.model.segment(self.state, x_emb)
        self.steps = self.steps + 1
        cap = self.segment_cap()
        self.halted = self.model.halt(self.steps, out, self.gen, cap)
        target_q = self.model.q_target(self.state, x_emb.detach(), self.steps, cap)
        loss, stats = self.losses(out, target_q)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.p.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.p.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, **stats}

    @property
    def eval_model(self) -> Reasoner:
        return self.ema.model if self.ema is not None else self.model  # type: ignore[return-value]

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "jetbox-reasoner/1",
            "params": self.p.model_dump(),
            "model_config": self.cfg.__dict__,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "clocks": {"wall": self.wall_seconds, "cpu": self.cpu_seconds},
            "carry": {"state": self.state, "steps": self.steps, "halted": self.halted,
                      "puzzles": self.puzzles, "solutions": self.solutions, "x": self.x},
            "halt_hist": self.halt_hist,
            "history": list(self.history),
            "stream": self.stream.state_dict(),
            "rng": {"exploration": self.gen.get_state(), "torch": torch.get_rng_state(),
                    "inputs": self.inputs.rng.bit_generator.state},
        }  # fmt: skip

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != "jetbox-reasoner/1":
            raise ValueError("not a jetbox reasoner checkpoint")
        # fields added since (e.g. grad) take their defaults, so older checkpoints still load
        if ReasonerConfig(**sd["model_config"]).__dict__ != self.cfg.__dict__:
            raise ValueError("checkpoint was trained with a different model configuration")
        self.model.load_state_dict(sd["model"])
        if self.ema is not None and sd["ema"] is not None:
            self.ema.model.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["optimizer"])
        self.step, self.elapsed = sd["step"], sd["elapsed"]
        clocks = sd.get("clocks", {"wall": sd["elapsed"], "cpu": 0.0})  # older checkpoints: wall only
        self.wall_seconds, self.cpu_seconds = clocks["wall"], clocks["cpu"]
        c = sd["carry"]
        self.state = {k: v.to(self.device) for k, v in c["state"].items()}
        self.steps, self.halted = c["steps"].to(self.device), c["halted"].to(self.device)
        self.puzzles, self.solutions = c["puzzles"].to(self.device), c["solutions"].to(self.device)
        self.x = c["x"].to(self.device)
        self.halt_hist = sd["halt_hist"]
        self.history = [tuple(h) for h in sd["history"]]  # type: ignore[misc]
        self.stream.load_state_dict(sd["stream"])
        self.gen.set_state(sd["rng"]["exploration"])
        torch.set_rng_state(sd["rng"]["torch"])
        self.inputs.rng.bit_generator.state = sd["rng"]["inputs"]

    def save(self, path: Path) -> Path:
        """Write atomically: a reader (or a crash) never sees a half-written checkpoint."""
        return save_atomic(self.state_dict(), path)



# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(
    model: Reasoner,
    task: Task,
    test: Grids,
    inputs: Inputs,
    copy_givens: bool,
    batch_size: int = 256,
    segments: int | None = None,
) -> dict[str, Any]:
    """Run every test puzzle for the maximum number of segments, reading off the answer after each one.

    Returns headline metrics at the maximum (as the papers report), metrics when each puzzle stops where
    its halting head first says so (ACT), the mean segments ACT uses, and per-segment accuracy curves.
    Blank-cell accuracy pools the cells that are not givens; givens never count.
    """
    model.eval()
    raw_in, raw_ans = test
    device = next(model.parameters()).device
    segs = 1 if model.cfg.kind == "direct" else (segments or model.cfg.segments)
    right_exact = torch.zeros(segs)
    right_blank = torch.zeros(segs)
    act_exact = act_blank = 0.0
    steps_used = 0.0
    n_blank = 0
    for i in range(0, len(raw_in), batch_size):
        chunk = raw_in[i : i + batch_size]
        x = torch.from_numpy(chunk.reshape(len(chunk), -1)).to(device)
        target = task.target(torch.from_numpy(raw_ans[i : i + batch_size].reshape(x.shape)).to(device))
        blank = ~task.given(x)
        n_blank += int(blank.sum())
        x_emb = model.embed_input(inputs(chunk))
        state = model.initial_state(len(x))
        stop = torch.full((len(x),), segs, dtype=torch.long, device=device)
        act_pred = torch.zeros_like(x)
        for k in range(segs):
            state, out = model.segment(state, x_emb)
            pred = predict(out.logits, x, task, copy_givens)
            right = pred == target
            right_exact[k] += float(right.all(-1).sum())
            right_blank[k] += float((right & blank).sum())
            wants = out.q_halt > (out.q_continue if out.q_continue is not None else 0.0)
            first = (stop == segs) & (wants | (k == segs - 1))  # ACT: the first segment that says halt
            act_pred[first] = pred[first]
            stop = torch.where(first, torch.full_like(stop, k + 1), stop)
        act_right = act_pred == target
        act_exact += float(act_right.all(-1).sum())
        act_blank += float((act_right & blank).sum())
        steps_used += float(stop.sum())
    n = len(raw_in)
    return {
        "exact_acc": float(right_exact[-1]) / n,
        "blank_acc": float(right_blank[-1]) / max(n_blank, 1),
        "exact_acc_act": act_exact / n,
        "blank_acc_act": act_blank / max(n_blank, 1),
        "mean_steps": steps_used / n,
        "exact_by_steps": (right_exact / n).tolist(),
        "blank_by_steps": (right_blank / max(n_blank, 1)).tolist(),
    }


def _plot(path: Path, title: str, xlabel: str, curves: dict[str, tuple[list[float], list[float]]]) -> Path:
    import matplotlib  # only when a plot is drawn: the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 32 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_metrics(ctx: JobContext, kind: str, ev: dict[str, Any], extra: dict[str, float]) -> dict[str, float]:
    """Accuracy-vs-steps PNG artifact and the flat float metrics a job returns."""
    ks = [float(k) for k in range(1, len(ev["exact_by_steps"]) + 1)]
    png = _plot(
        ctx.workdir / "reasoner_accuracy_vs_steps.png", f"{kind}: accuracy vs test-time supervision steps",
        "supervision steps (segments)",
        {"exact grid": (ks, ev["exact_by_steps"]), "blank cells": (ks, ev["blank_by_steps"])},
    )  # fmt: skip
    ctx.artifact(png, "plot", {"what": "accuracy_vs_steps", "model": kind})
    metrics = {k: float(v) for k, v in ev.items() if not isinstance(v, list)}
    for k, (e, b) in enumerate(zip(ev["exact_by_steps"], ev["blank_by_steps"], strict=True), start=1):
        metrics[f"exact_acc_seg{k}"], metrics[f"blank_acc_seg{k}"] = float(e), float(b)
    return {**metrics, **extra}


# --------------------------------------------------------------------------------------------- job entry points


def train_reasoner(
    ctx: JobContext,
    params: ReasonerTrainParams,
    train_data: Any,
    test_data: Any,
    *,
    augment: Augment | None = None,
    visual: Visual | None = None,
) -> dict[str, float]:
    """Train, checkpoint, evaluate. Resumes exactly from ``ctx.resume_from``. Returns float metrics."""
    task, test = as_grids(test_data)
    if params.augment and augment is None:
        augment = default_augment(task)
    tr = Trainer(params, train_data, augment, visual)
    if tr.task != task:
        raise ValueError(f"train and test data differ: {tr.task} vs {task}")
    ckpt = ctx.workdir / "checkpoints" / "reasoner-last.pt"
    if ctx.resume_from is not None:
        tr.load_state_dict(load_checkpoint(Path(ctx.resume_from)))
        ctx.log(f"resumed from {ctx.resume_from} at step {tr.step}")
    ctx.log(f"{params.model}: {count_params(tr.model):,} parameters on {tr.device}")
    start_step, start_seen, t0, c0 = tr.step, tr.stream.seen, time.monotonic(), time.process_time()
    elapsed0, wall0, cpu0 = tr.elapsed, tr.wall_seconds, tr.cpu_seconds
    loss_sum, loss_n = 0.0, 0
    while tr.step < params.max_steps and (params.max_seconds is None or tr.elapsed < params.max_seconds):
        if ctx.cancelled():
            ctx.checkpoint(tr.save(ckpt), tr.step)
            raise JobCancelled(f"cancelled at step {tr.step}")
        stats = tr.train_step()
        tr.wall_seconds, tr.cpu_seconds = wall0 + time.monotonic() - t0, cpu0 + time.process_time() - c0
        tr.elapsed = elapsed0 + (tr.cpu_seconds - cpu0 if params.budget_clock == "cpu" else tr.wall_seconds - wall0)
        loss_sum, loss_n = loss_sum + stats["loss"], loss_n + 1
        if tr.step % params.log_every == 0 or tr.step == params.max_steps:
            tr.history.append((tr.step, loss_sum / loss_n, stats["lr"]))
            loss_sum, loss_n = 0.0, 0
            run = time.monotonic() - t0
            rate = (tr.step - start_step) / max(run, 1e-9)
            eta = (params.max_steps - tr.step) / max(rate, 1e-9)
            if params.max_seconds is not None:
                left = max(0.0, params.max_seconds - tr.elapsed)
                if params.budget_clock == "cpu":  # CPU seconds left, in wall seconds at this attempt's share
                    left *= run / max(tr.cpu_seconds - cpu0, 1e-9)
                eta = min(eta, left)
            ctx.progress(
                tr.step, params.max_steps, loss=stats["loss"], lr=stats["lr"], train_exact=stats["train_exact"],
                puzzles_per_s=(tr.stream.seen - start_seen) / max(run, 1e-9), eta_s=eta,
            )  # fmt: skip
        if tr.step % params.checkpoint_every == 0:
            ctx.checkpoint(tr.save(ckpt), tr.step)
    final = tr.save(ctx.workdir / "checkpoints" / "reasoner-final.pt")
    ctx.checkpoint(final, tr.step)
    if tr.history:
        steps, losses, _ = zip(*tr.history, strict=True)
        png = _plot(ctx.workdir / "reasoner_loss.png", f"{params.model}: training loss", "step",
                    {"loss": (list(steps), list(losses))})  # fmt: skip
        ctx.artifact(png, "plot", {"what": "loss_curve", "model": params.model})
    ev = evaluate_model(
        tr.eval_model, task, test, tr.inputs, params.loss_on == "blanks", params.eval_batch_size,
        params.eval_segments,
    )  # fmt: skip
    hist = tr.halt_hist.float()
    extra = {
        "steps": float(tr.step),
        "puzzles_seen": float(tr.stream.seen),
        "train_seconds": tr.elapsed,  # on the budget clock
        "train_wall_seconds": tr.wall_seconds,
        "train_cpu_seconds": tr.cpu_seconds,
        "params": float(count_params(tr.model)),
        "train_mean_segments": float((hist * torch.arange(len(hist))).sum() / hist.sum().clamp(min=1)),
    }
    return report_metrics(ctx, params.model, ev, extra)
