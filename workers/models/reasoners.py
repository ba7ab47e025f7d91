"""Recursive reasoners over grids: HRM, TRM and a same-size one-pass baseline.

Written from the papers' descriptions:

- HRM, "Hierarchical Reasoning Model" (Wang et al., arXiv 2506.21734): a slow high-level module H and a
  fast low-level module L. In one *segment*, for each of ``h_cycles`` cycles L is updated ``l_cycles`` times
  from (z_L, z_H + x), then H from (z_H, z_L). Only the last L and H updates carry gradient (the "one-step
  gradient", O(1) memory). Deep supervision: a segment's state is detached and carried into the next
  segment, each segment gets its own loss and optimiser step. A Q-head on the high-level state decides
  halting (adaptive computation time) with Q-learning targets, exploration during training and a maximum
  number of segments.
- TRM, "Less is More: Recursive Reasoning with Tiny Networks" (Jolicoeur-Martineau, arXiv 2510.04871): one
  small network. A recursion updates the latent z ``l_cycles`` (= n) times from (z, y + x), then the answer
  y from (y, z). ``h_cycles`` (= T) recursions per segment: T-1 without gradient, the last with full
  backpropagation through its n+1 network calls. Deep supervision as HRM, one halting logit trained with
  BCE against "is the answer right" (no second forward pass). The trainer keeps an EMA of the weights.
- ``direct``: the same block stack applied once to the input, same parameter count: the honest baseline.

Blocks follow the papers: post-norm (parameter-free RMSNorm), SwiGLU, rotary or learned positions, no
biases, PyTorch ``scaled_dot_product_attention`` only. Inputs are either digit tokens (0 = blank) or
per-cell latents from an image encoder (visual sudoku); the sequence is a CLS slot (read by the halting
head) followed by the cells in row-major order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kind = Literal["hrm", "trm", "direct"]
KINDS: tuple[Kind, ...] = ("direct", "hrm", "trm")


@dataclass(frozen=True)
class ReasonerConfig:
    """Everything that shapes a reasoner. ``n_layers`` counts the blocks of one full pass (see below)."""

    kind: Kind = "trm"
    seq_len: int = 36  # cells (n*n); a CLS slot is added in front
    vocab_size: int = 7  # input tokens: 0 = blank, 1..n = digits
    n_classes: int = 6  # output classes: digit - 1
    input_dim: int | None = None  # set: inputs are latents [B, seq_len, input_dim] instead of tokens
    d_model: int = 64
    n_heads: int = 4
    # Blocks of the network. trm/direct: one stack of n_layers. hrm: H and L modules of n_layers // 2 each,
    # so all three kinds hold the same block parameters at the same d_model.
    n_layers: int = 2
    expansion: float = 4.0  # SwiGLU hidden = expansion * d * 2/3 (same parameter count as a 4x MLP)
    pos: Literal["rope", "learned"] = "learned"
    rope_theta: float = 10000.0
    h_cycles: int = 2  # hrm: high-level cycles per segment; trm: recursions T per segment
    l_cycles: int = 2  # hrm: low-level updates per cycle; trm: latent updates n per recursion
    max_segments: int = 8  # deep-supervision segments (ACT's maximum); direct always uses 1
    halt_explore: float = 0.1  # probability of forcing a random minimum number of segments in training
    q_continue: bool = True  # hrm: learn Q(continue) by bootstrapping (one extra no-grad segment)
    # Which updates of a segment carry gradient. "paper": each paper's own (hrm one-step, trm the last
    # recursion). The swaps are ablations: hrm "recursion" backpropagates through its whole last H cycle
    # (l_cycles L updates and the H update, TRM's rule); trm "one_step" only through the last z and y updates
    # (HRM's rule).
    grad: Literal["paper", "one_step", "recursion"] = "paper"
    norm_eps: float = 1e-5

    @property
    def segments(self) -> int:
        return 1 if self.kind == "direct" else self.max_segments


# ----------------------------------------------------------------------------------------------- blocks


def _lecun_(w: Tensor) -> Tensor:
    """Truncated LeCun-normal init (std 1/sqrt(fan_in)), as both papers use."""
    std = 1.0 / math.sqrt(w.shape[1])
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def rms_norm(x: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention, no bias, optional rotary positions."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        assert d % n_heads == 0, "d_model must divide by n_heads"
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, expansion: float) -> None:
        super().__init__()
        hidden = 8 * math.ceil(expansion * d * 2 / 3 / 8)  # round up to a multiple of 8
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm transformer block: the recurrent state stays at unit RMS however often it is applied."""

    def __init__(self, cfg: ReasonerConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.mlp = SwiGLU(cfg.d_model, cfg.expansion)
        self.eps = cfg.norm_eps

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = rms_norm(x + self.attn(x, rope), self.eps)
        return rms_norm(x + self.mlp(x), self.eps)


class Stack(nn.Module):
    """A module of blocks with input injection: ``net(state, inject) = blocks(state + inject)``."""

    def __init__(self, cfg: ReasonerConfig, n_layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n_layers))

    def forward(self, state: Tensor, inject: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        h = state + inject
        for block in self.blocks:
            h = block(h, rope)
        return h


# ----------------------------------------------------------------------------------------------- models

State = dict[str, Tensor]  # the carried latent state of one batch, e.g. {"zH": ..., "zL": ...}


@dataclass
class SegmentOut:
    logits: Tensor  # [B, seq_len, n_classes]
    q_halt: Tensor  # [B] halting logit (zeros for direct)
    q_continue: Tensor | None  # [B] hrm only


class Reasoner(nn.Module):
    """Shared I/O: input embedding (tokens or latents) + CLS + positions, answer head, halting head."""

    state_names: tuple[str, ...] = ()
    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, cfg: ReasonerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # Embeddings at std 1/sqrt(d) scaled by sqrt(d): unit-scale inputs like the post-norm states they are
        # added to, while AdamW's per-parameter steps stay small relative to the weights (HRM/TRM recipe).
        self.embed_scale = math.sqrt(d)
        if cfg.input_dim is None:
            self.embed: nn.Module = nn.Embedding(cfg.vocab_size, d)
            nn.init.trunc_normal_(self.embed.weight, std=1 / self.embed_scale)
        else:
            self.embed = nn.Linear(cfg.input_dim, d, bias=False)
            _lecun_(self.embed.weight)
            self.embed.weight.data /= self.embed_scale  # latents are O(1) too; keep the same convention
        self.cls = nn.Parameter(torch.zeros(d).normal_(std=1 / self.embed_scale))
        n_pos = cfg.seq_len + 1
        if cfg.pos == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(n_pos, d).normal_(std=1 / self.embed_scale))
        else:
            head_dim = d // cfg.n_heads
            assert head_dim % 2 == 0, "rotary positions need an even head dimension"
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
            ang = torch.outer(torch.arange(n_pos).float(), inv)
            ang = torch.cat((ang, ang), dim=-1)
            self.register_buffer("rope_cos", ang.cos(), persistent=False)
            self.register_buffer("rope_sin", ang.sin(), persistent=False)
        self.head = nn.Linear(d, cfg.n_classes, bias=False)
        _lecun_(self.head.weight)

    # -- pieces shared by the kinds

    def _rope(self) -> tuple[Tensor, Tensor] | None:
        if self.cfg.pos == "learned":
            return None
        return self.rope_cos, self.rope_sin

    def embed_input(self, x: Tensor) -> Tensor:
        """Tokens [B, L] (long) or latents [B, L, input_dim] -> [B, L + 1, d] (CLS first)."""
        e = self.embed(x)
        e = torch.cat((self.cls.expand(e.shape[0], 1, -1), e), dim=1)
        if self.cfg.pos == "learned":
            e = (e + self.pos_emb) * (0.5**0.5)  # keep the sum at the same variance
        return self.embed_scale * e

    def _init_linears(self) -> None:
        for m in self.modules():
            if isinstance(m, Block):
                for lin in (m.attn.qkv, m.attn.out, m.mlp.gate_up, m.mlp.down):
                    _lecun_(lin.weight)

    def initial_state(self, batch: int) -> State:
        """The state a fresh puzzle starts from (fixed vectors broadcast over cells)."""
        t = self.cfg.seq_len + 1
        return {n: getattr(self, f"{n}_init").expand(batch, t, -1).clone() for n in self.state_names}

    def reset_state(self, state: State, mask: Tensor) -> State:
        """Replace the state of the rows in ``mask`` (new puzzles) by the initial state."""
        fresh = self.initial_state(mask.shape[0])
        return {k: torch.where(mask.view(-1, 1, 1), fresh[k], v) for k, v in state.items()}

    def segment(self, state: State, x_emb: Tensor) -> tuple[State, SegmentOut]:
        """One deep-supervision segment; the returned state is detached."""
        raise NotImplementedError

    # -- ACT: one training/eval step of the carried batch

    @torch.no_grad()
    def halt(
        self, steps: Tensor, out: SegmentOut, generator: torch.Generator | None = None, limit: int | None = None
    ) -> Tensor:
        """Which rows stop after this segment. ``steps`` already counts it; ``limit`` (default: the maximum
        number of segments) caps them. Eval: always run to the cap, so a batch stays aligned (the evaluator
        reads the halting decisions off ``out.q_halt``)."""
        cfg = self.cfg
        limit = cfg.segments if limit is None else min(limit, cfg.segments)
        halted = steps >= limit
        if not self.training or limit == 1:
            return halted
        wants = out.q_halt > (out.q_continue if out.q_continue is not None else 0.0)
        # Exploration: with probability halt_explore a row must run at least U{2..max} segments, so the
        # Q-head sees (and learns values for) longer computations than it would currently choose.
        r = torch.rand(steps.shape, generator=generator, device=steps.device)
        m = torch.randint(2, limit + 1, steps.shape, generator=generator, device=steps.device)
        min_steps = torch.where(r < cfg.halt_explore, m, torch.zeros_like(m))
        return halted | (wants & (steps >= min_steps))

    @torch.no_grad()
    def q_target(self, state: State, x_emb: Tensor, steps: Tensor, limit: int | None = None) -> Tensor | None:
        """HRM's Q(continue) target: sigmoid of the best next-segment value (halt value at the last step)."""
        if self.cfg.kind != "hrm" or not self.cfg.q_continue:
            return None
        _, nxt = self.segment(state, x_emb)
        assert nxt.q_continue is not None
        last = steps >= (self.cfg.segments if limit is None else min(limit, self.cfg.segments))
        return torch.sigmoid(torch.where(last, nxt.q_halt, torch.maximum(nxt.q_halt, nxt.q_continue)))


class HRM(Reasoner):
    """Hierarchical Reasoning Model: slow H and fast L recurrent modules, one-step gradient."""

    state_names = ("zH", "zL")

    def __init__(self, cfg: ReasonerConfig) -> None:
        super().__init__(cfg)
        per = max(1, cfg.n_layers // 2)
        self.H = Stack(cfg, per)
        self.L = Stack(cfg, per)
        d = cfg.d_model
        # Fixed random initial states (buffers, not learned), as in the paper.
        self.register_buffer("zH_init", nn.init.trunc_normal_(torch.empty(d), std=1, a=-2, b=2))
        self.register_buffer("zL_init", nn.init.trunc_normal_(torch.empty(d), std=1, a=-2, b=2))
        self.q_head = nn.Linear(d, 2)
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)  # start "continue-ish" and near zero gradient
        self._init_linears()

    def segment(self, state: State, x_emb: Tensor) -> tuple[State, SegmentOut]:
        cfg, rope = self.cfg, self._rope()
        zH, zL = state["zH"], state["zL"]
        # one-step gradient (the paper): only the last L and the last H update build a graph (O(1) memory);
        # "recursion" (ablation): the whole last H cycle does
        with_grad = cfg.l_cycles if cfg.grad == "recursion" else 1
        with torch.no_grad():
            for i in range(cfg.h_cycles * cfg.l_cycles - with_grad):
                zL = self.L(zL, zH + x_emb, rope)
                if (i + 1) % cfg.l_cycles == 0:
                    zH = self.H(zH, zL, rope)
        for _ in range(with_grad):
            zL = self.L(zL, zH + x_emb, rope)
        zH = self.H(zH, zL, rope)
        q = self.q_head(zH[:, 0]).float()
        out = SegmentOut(self.head(zH[:, 1:]), q[:, 0], q[:, 1])
        return {"zH": zH.detach(), "zL": zL.detach()}, out


class TRM(Reasoner):
    """Tiny Recursive Model: one network, latent z and answer y, full backprop through the last recursion."""

    state_names = ("y", "z")

    def __init__(self, cfg: ReasonerConfig) -> None:
        super().__init__(cfg)
        self.net = Stack(cfg, cfg.n_layers)
        d = cfg.d_model
        self.register_buffer("y_init", nn.init.trunc_normal_(torch.empty(d), std=1, a=-2, b=2))
        self.register_buffer("z_init", nn.init.trunc_normal_(torch.empty(d), std=1, a=-2, b=2))
        self.q_head = nn.Linear(d, 1)
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)
        self._init_linears()

    def _recursion(self, y: Tensor, z: Tensor, x_emb: Tensor, one_step: bool = False) -> tuple[Tensor, Tensor]:
        rope = self._rope()
        for i in range(self.cfg.l_cycles):
            # refine the reasoning latent from the question and answer; with one_step (HRM's rule, an
            # ablation) all but the last latent update run without a graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (one_step and i < self.cfg.l_cycles - 1)):
                z = self.net(z, y + x_emb, rope)
        y = self.net(y, z, rope)  # then the answer from the latent (no x: that tells the net which task)
        return y, z

    def segment(self, state: State, x_emb: Tensor) -> tuple[State, SegmentOut]:
        y, z = state["y"], state["z"]
        with torch.no_grad():
            for _ in range(self.cfg.h_cycles - 1):
                y, z = self._recursion(y, z, x_emb)
        y, z = self._recursion(y, z, x_emb, one_step=self.cfg.grad == "one_step")
        out = SegmentOut(self.head(y[:, 1:]), self.q_head(y[:, 0]).float()[:, 0], None)
        return {"y": y.detach(), "z": z.detach()}, out


class Direct(Reasoner):
    """The baseline: the same block stack applied once, no recursion, no deep supervision."""

    def __init__(self, cfg: ReasonerConfig) -> None:
        super().__init__(cfg)
        self.net = Stack(cfg, cfg.n_layers)
        self._init_linears()

    def segment(self, state: State, x_emb: Tensor) -> tuple[State, SegmentOut]:
        h = self.net(torch.zeros_like(x_emb), x_emb, self._rope())
        return {}, SegmentOut(self.head(h[:, 1:]), h.new_zeros(h.shape[0]), None)


# ----------------------------------------------------------------------------------------------- builders

_CLASSES: dict[str, type[Reasoner]] = {"hrm": HRM, "trm": TRM, "direct": Direct}


def build_reasoner(cfg: ReasonerConfig) -> Reasoner:
    """The model for ``cfg.kind``."""
    if cfg.kind == "hrm" and cfg.n_layers % 2:
        raise ValueError("hrm splits n_layers between its H and L modules: use an even n_layers")
    return _CLASSES[cfg.kind](cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_configs(base: ReasonerConfig, kinds: tuple[Kind, ...] = KINDS) -> dict[str, ReasonerConfig]:
    """Configs of ``kinds`` with (nearly) equal parameter counts.

    All kinds share the embedding, positions and answer head at the same ``d_model``; trm and direct run one
    stack of ``n_layers`` blocks and hrm splits the same blocks into H and L halves. They differ only by the
    halting head (hrm 2d+2, trm d+1, direct 0 parameters).
    """
    n_layers = base.n_layers + (base.n_layers % 2)  # hrm needs an even count; keep everyone equal
    return {k: replace(base, kind=k, n_layers=n_layers) for k in kinds}


def config_for_params(target: int, base: ReasonerConfig, kinds: tuple[Kind, ...] = KINDS) -> dict[str, ReasonerConfig]:
    """Matched configs whose size is closest to ``target`` parameters (searching d_model)."""
    step = 2 * base.n_heads  # rotary needs an even head dimension
    best: tuple[int, int] | None = None
    for d in range(step, 4097, step):
        n = count_params(build_reasoner(replace(base, kind="direct", d_model=d, n_layers=base.n_layers)))
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), d)
        if n > target:
            break
    assert best is not None
    return matched_configs(replace(base, d_model=best[1]), kinds)


def config_dict(cfg: ReasonerConfig) -> dict[str, object]:
    return asdict(cfg)
