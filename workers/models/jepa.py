"""I-JEPA for small synthetic images, in one readable file.

A context encoder (timm `VisionTransformer`, never pretrained) sees a large block of the image with some
smaller target blocks cut out; a narrow predictor gets the context tokens plus one mask token per target
patch (each with its position) and predicts the target encoder's layer-normalised features of those
patches. The loss lives in latent space, not pixels.

Two ways to stop the representation from collapsing to a constant:

- `ema` (I-JEPA): the target encoder is an exponential moving average of the context encoder, momentum
  rising from 0.996 to 1.0, with a stop-gradient on the targets.
- `sigreg` (LeJEPA): one encoder for context and targets, no EMA, no stop-gradient; instead the
  embeddings are pushed towards an isotropic Gaussian by SIGReg, an Epps-Pulley goodness-of-fit test on
  random 1-D projections (see `sigreg`).

Config and presets follow the nanoGPT habit: one `JepaConfig`, named presets that a ticket can override.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn


class JepaConfig(BaseModel):
    """Architecture, masking and objective of an image JEPA. Defaults are the `tiny` preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pred_dim: int = 48
    pred_depth: int = 2
    pred_heads: int = 3
    # multi-block masking (I-JEPA's ranges: 4 targets of 15-20 % with aspect 0.75-1.5, context 85-100 %)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_context: int = 4
    loss: Literal["l2", "smooth_l1"] = "smooth_l1"
    regularizer: Literal["ema", "sigreg"] = "sigreg"
    ema_momentum: tuple[float, float] = (0.996, 1.0)
    sigreg_weight: float = 0.5  # measured best of {0.1, 0.5} on shapes (docs/MODELS.md)
    sigreg_slices: int = 64  # the cost is N x slices x knots; 64 halved the step time at 32x32
    sigreg_knots: int = 17
    # `projected`: SIGReg on a small MLP projection of the mean-pooled full-image embedding (LeJEPA's
    # projector); the projector is trained by SIGReg alone and is not part of the probed encoder
    sigreg_on: Literal["tokens", "pooled", "projected"] = "tokens"
    sigreg_proj_dim: int = 64
    sigreg_proj_hidden: int = 256
    target_centre: bool = False
    masking: Literal["multiblock", "random"] = "multiblock"
    mask_ratio: float = 0.5
    target_layers: int = 1
    # `colour_aug`: the context and target branches see independently colour-augmented copies of the
    # image (channel permutation, per-channel gain, sometimes greyscale), so the colour of a hidden patch
    # cannot be predicted and the encoder is pushed to describe what survives recolouring: outlines
    colour_aug: bool = False
    # multi-view invariance (LeJEPA): `views` colour-augmented copies of each whole image through the
    # online encoder, mean-pooled and projected (`view_proj_hidden` -> `view_proj_dim`); the views of
    # one image are pulled to their mean, with SIGReg (weight `view_sigreg`) on the projections against
    # collapse. The total loss is (1 - view_weight) * prediction + view_weight * that. 0 views: off.
    views: int = 0
    view_weight: float = 0.5
    view_sigreg: float = 0.5  # our SIGReg is not multiplied by N, so LeJEPA's 0.05 is far too weak here
    view_proj_dim: int = 64
    view_proj_hidden: int = 256
    view_keep: float = 1.0  # share of patches each view keeps (random per view): patch dropout
    view_shift: int = 0  # each view moved by up to this many pixels in x and y (wrapping round)

    @model_validator(mode="after")
    def _check(self) -> JepaConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.pred_dim % self.pred_heads:
            raise ValueError("embed_dim/pred_dim must be divisible by num_heads/pred_heads")
        for name in ("target_scale", "context_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 1 <= self.target_layers <= self.depth:
            raise ValueError(f"target_layers must be in 1..depth ({self.depth}), got {self.target_layers}")
        if not 0 <= self.sigreg_weight <= 1:
            raise ValueError("sigreg_weight is a mixing weight in [0, 1]")
        if self.sigreg_proj_dim < 1 or self.sigreg_proj_hidden < 1:
            raise ValueError(
                f"sigreg_proj_dim and sigreg_proj_hidden must be >= 1, got {self.sigreg_proj_dim}, "
                f"{self.sigreg_proj_hidden}"
            )
        if self.views == 1 or self.views < 0:
            raise ValueError(f"views must be 0 (off) or at least 2, got {self.views}")
        if self.view_shift < 0:
            raise ValueError(f"view_shift must be >= 0, got {self.view_shift}")
        if not 0 < self.view_keep <= 1:
            raise ValueError(f"view_keep must be in (0, 1], got {self.view_keep}")
        if not 0 <= self.view_weight <= 1 or not 0 <= self.view_sigreg <= 1:
            raise ValueError("view_weight and view_sigreg are mixing weights in [0, 1]")
        if self.sigreg_on == "projected" and self.regularizer != "sigreg":
            raise ValueError("sigreg_on: projected needs regularizer: sigreg (EMA has no SIGReg term)")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


PRESETS: dict[str, dict[str, Any]] = {
    # trains in minutes on a 2-core CPU
    "tiny": {},
    # ViT-S/8 on 64x64 (64 tokens): fits a 24 GB card at batch 256 with bf16 and leaves headroom
    "rtx3090": {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "pred_dim": 192,
        "pred_depth": 6,
        "pred_heads": 6,
    },
}


def make_config(preset: str = "tiny", **overrides: Any) -> JepaConfig:
    """A preset with ticket overrides applied (pydantic reports unknown or bad fields)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return JepaConfig(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------------
# building blocks


def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings, [grid*grid, dim] in raster order (as in MAE/I-JEPA)."""
    if dim % 4:
        raise ValueError("sincos position embeddings need dim divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def preprocess(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] (as the synth generators store them) -> normalised float [B, 3, H, W]."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ImageEncoder(nn.Module):
    """A timm ViT without class token or head; encodes all patches or only those in `keep`."""

    def __init__(self, cfg: JepaConfig) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            global_pool="",
            class_token=False,
            pos_embed="none",
        )
        self.pos: Tensor
        self.register_buffer("pos", sincos_pos_embed(cfg.embed_dim, cfg.grid), persistent=False)

    def _embed(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Positioned patch embeddings, only those in `keep` when given: the input of the first block."""
        x = self.vit.patch_embed(images) + self.pos
        if keep is not None:
            x = gather_tokens(x, keep)
        return self.vit.norm_pre(x)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """images [B, 3, H, W] (normalised) -> tokens [B, N or K, D]."""
        return self.vit.norm(self.vit.blocks(self._embed(images, keep)))

    def layer_targets(self, images: Tensor, last: int) -> Tensor:
        """Mean of the layer-normalised outputs of the last `last` blocks (data2vec-style targets)."""
        x = self._embed(images)
        outs = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i >= len(self.vit.blocks) - last:
                outs.append(F.layer_norm(x, (x.shape[-1],)))
        return torch.stack(outs).mean(0)


class Predictor(nn.Module):
    """Narrow transformer: context tokens + positioned mask tokens -> predicted target features."""

    def __init__(self, cfg: JepaConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.embed_dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.pred_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos: Tensor
        self.register_buffer("pos", sincos_pos_embed(cfg.pred_dim, cfg.grid), persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(cfg.pred_dim, cfg.pred_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True)
                for _ in range(cfg.pred_depth)
            ]
        )
        self.norm = nn.LayerNorm(cfg.pred_dim)
        self.proj = nn.Linear(cfg.pred_dim, cfg.embed_dim)

    def forward(self, ctx: Tensor, ctx_idx: Tensor, tgt_idx: Tensor) -> Tensor:
        """ctx [B, Nc, D], ctx_idx [B, Nc], tgt_idx [T, B, Nt] -> predictions [T, B, Nt, D].

        The T target blocks are predicted in one batched pass (context repeated T times), so blocks do
        not see each other's mask tokens, as in I-JEPA.
        """
        n_blocks, batch, n_tgt = tgt_idx.shape
        z = self.embed(ctx) + self.pos[ctx_idx]
        z = z.repeat(n_blocks, 1, 1)
        m = self.mask_token + self.pos[tgt_idx.reshape(n_blocks * batch, n_tgt)]
        out = self.blocks(torch.cat([z, m], dim=1))
        out = self.proj(self.norm(out[:, -n_tgt:]))
        return out.reshape(n_blocks, batch, n_tgt, -1)


# ----------------------------------------------------------------------------------------------------
# masking


def _block_shape(
    gen: torch.Generator, grid: int, scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    s = scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=gen))
    log_a = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * float(torch.rand(1, generator=gen))
    area, a = s * grid * grid, math.exp(log_a)
    h = max(1, min(grid, round(math.sqrt(area * a))))
    w = max(1, min(grid, round(math.sqrt(area / a))))
    return h, w


def _place(gen: torch.Generator, grid: int, h: int, w: int) -> set[int]:
    top = int(torch.randint(0, grid - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, grid - w + 1, (1,), generator=gen))
    return {(top + i) * grid + left + j for i in range(h) for j in range(w)}


def sample_masks(cfg: JepaConfig, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Multi-block masks for one batch: (context indices [B, Nc], target indices [T, B, Nt]).

    Block shapes are drawn once per batch, one shape for all target blocks (as I-JEPA's collator does:
    every sample then has the same number of target patches, which keeps tensors rectangular), and
    placed independently per sample. The context is one large block with every target patch removed;
    samples are trimmed to the batch's smallest context by a random subset.
    Indices are sorted raster positions in [0, grid*grid).
    """
    grid = cfg.grid
    if cfg.masking == "random":
        n = grid * grid
        n_tgt = max(1, min(n - cfg.min_context, round(cfg.mask_ratio * n)))
        perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
        return perms[:, n_tgt:].sort(dim=1).values, perms[:, :n_tgt].sort(dim=1).values.unsqueeze(0)
    tgt_shape = _block_shape(gen, grid, cfg.target_scale, cfg.target_aspect)
    ctx_h, ctx_w = _block_shape(gen, grid, cfg.context_scale, (1.0, 1.0))
    targets: list[list[list[int]]] = [[] for _ in range(cfg.num_targets)]
    contexts: list[list[int]] = []
    for _ in range(batch):
        for _attempt in range(20):
            blocks = [_place(gen, grid, *tgt_shape) for _ in range(cfg.num_targets)]
            context = _place(gen, grid, ctx_h, ctx_w) - set().union(*blocks)
            if len(context) >= cfg.min_context:
                break
        else:  # tiny grids with huge targets: keep the context non-empty rather than loop forever
            context = set(range(grid * grid)) - set().union(*blocks) or {0}
        for t, block in enumerate(blocks):
            targets[t].append(sorted(block))
        contexts.append(sorted(context))
    n_ctx = min(len(c) for c in contexts)
    trimmed = []
    for c in contexts:
        keep = torch.randperm(len(c), generator=gen)[:n_ctx].sort().values
        trimmed.append([c[i] for i in keep.tolist()])
    return torch.tensor(trimmed, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def colour_augment(images: Tensor, gen: torch.Generator, grey_p: float = 0.2) -> Tensor:
    """Recolour normalised images [B, 3, H, W]: a random channel order and a per-channel gain in
    [0.6, 1.4] per image, greyscale with probability `grey_p`. Outlines, positions and counts survive;
    the palette colour does not (red can become blue or grey). Draws from `gen` on the CPU."""
    b = images.shape[0]
    pix = images * 0.25 + 0.5  # undo `preprocess`
    perm = torch.rand(b, 3, generator=gen).argsort(dim=1).to(images.device)
    pix = torch.gather(pix, 1, perm[:, :, None, None].expand_as(pix))
    gain = (0.6 + 0.8 * torch.rand(b, 3, 1, 1, generator=gen)).to(images)
    grey = (torch.rand(b, 1, 1, 1, generator=gen) < grey_p).to(images.device)
    pix = pix * gain
    pix = torch.where(grey, pix.mean(dim=1, keepdim=True).expand_as(pix), pix)
    return (pix.clamp(0.0, 1.0) - 0.5) / 0.25


# ----------------------------------------------------------------------------------------------------
# SIGReg


def sigreg(
    z: Tensor, num_slices: int = 256, knots: int = 17, t_max: float = 5.0, generator: torch.Generator | None = None
) -> Tensor:
    """Sketched isotropic Gaussian regulariser (LeJEPA): how far `z` [N, D] is from N(0, I).

    Project the embeddings on `num_slices` random unit directions; for each 1-D projection compare its
    empirical characteristic function phi_N(t) = mean(exp(i t x)) with the standard normal's exp(-t^2/2)
    by the Epps-Pulley statistic  integral |phi_N(t) - phi(t)|^2 w(t) dt,  w(t) = exp(-t^2/2), evaluated
    with the trapezoid rule on `knots` points of [0, t_max] (the integrand is even, so twice the half
    line). By Cramer-Wold, matching every 1-D marginal matches the joint distribution; resampling the
    directions every step covers them over training. The statistic is not multiplied by N: it is ~1/N
    for Gaussian samples and O(1) for collapsed ones, whatever the batch size.
    """
    dirs = torch.randn(z.shape[1], num_slices, generator=generator, device="cpu").to(z.device, z.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    x = (z @ dirs).float()  # [N, M]
    t = torch.linspace(0.0, t_max, knots, device=z.device)
    xt = x.unsqueeze(-1) * t  # [N, M, K]
    gauss = torch.exp(-0.5 * t**2)
    err = (xt.cos().mean(0) - gauss) ** 2 + xt.sin().mean(0) ** 2  # |phi_N - phi|^2, [M, K]
    stat = 2.0 * torch.trapezoid(err * gauss, t, dim=-1)  # [M]
    return stat.mean()


# ----------------------------------------------------------------------------------------------------
# the model


class JEPA(nn.Module):
    """Context encoder, target encoder (EMA copy or the same module) and predictor."""

    def __init__(self, cfg: JepaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder: ImageEncoder | None = None
        self.sigreg_proj: nn.Sequential | None = None
        if cfg.regularizer == "sigreg" and cfg.sigreg_on == "projected":
            self.sigreg_proj = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.sigreg_proj_hidden),
                nn.GELU(),
                nn.Linear(cfg.sigreg_proj_hidden, cfg.sigreg_proj_dim),
            )
        self.view_proj: nn.Sequential | None = None
        if cfg.views:
            # batch norm as in LeJEPA's projector: pooled embeddings of different images differ little at
            # first, and without it the projections start near a point, where SIGReg's pull is weak
            self.view_proj = nn.Sequential(
                nn.Linear(cfg.embed_dim, cfg.view_proj_hidden),
                nn.BatchNorm1d(cfg.view_proj_hidden),
                nn.GELU(),
                nn.Linear(cfg.view_proj_hidden, cfg.view_proj_dim),
            )
        if cfg.regularizer == "ema":
            self.target_encoder = copy.deepcopy(self.encoder)
            self.target_encoder.requires_grad_(False)

    @property
    def eval_encoder(self) -> ImageEncoder:
        """The encoder whose features are probed: the EMA target if there is one (as I-JEPA does)."""
        return self.target_encoder if self.target_encoder is not None else self.encoder

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Pooled image embeddings [B, D] from normalised images, for probes and retrieval."""
        return self.eval_encoder(images).mean(dim=1)

    def ema_momentum(self, progress: float) -> float:
        lo, hi = self.cfg.ema_momentum
        return lo + (hi - lo) * min(max(progress, 0.0), 1.0)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA step of the target encoder (no-op for `sigreg`)."""
        if self.target_encoder is None:
            return
        for p_t, p in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            p_t.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)

    def forward(
        self, images: Tensor, ctx_idx: Tensor, tgt_idx: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for one batch of normalised images and its masks; also returns the full-image tokens."""
        cfg = self.cfg
        if self.view_proj is not None and cfg.view_weight == 1.0:
            # the view objective alone (LeJEPA without prediction): skip the masked-prediction branch
            if generator is None:
                raise ValueError("views need the step's generator")
            view_loss, parts = self._view_loss(images, generator)
            return view_loss, parts
        ctx_images = tgt_images = images
        if cfg.colour_aug:
            if generator is None:
                raise ValueError("colour_aug needs the step's generator")
            ctx_images, tgt_images = colour_augment(images, generator), colour_augment(images, generator)
        if self.target_encoder is not None:
            with torch.no_grad():
                if cfg.target_layers > 1:
                    full = self.target_encoder.layer_targets(tgt_images, cfg.target_layers)
                else:
                    full = self.target_encoder(tgt_images)
        else:
            full = self.encoder(tgt_images)  # gradients flow into the targets too: SIGReg prevents collapse
        target = F.layer_norm(full, (full.shape[-1],))
        if cfg.target_centre:
            target = target - target.mean(dim=0, keepdim=True)
        n_blocks, batch, n_tgt = tgt_idx.shape
        target = gather_tokens(target.repeat(n_blocks, 1, 1), tgt_idx.reshape(n_blocks * batch, n_tgt))
        target = target.reshape(n_blocks, batch, n_tgt, -1)
        ctx = self.encoder(ctx_images, keep=ctx_idx)
        pred = self.predictor(ctx, ctx_idx, tgt_idx)
        if cfg.loss == "l2":
            pred_loss = F.mse_loss(pred.float(), target.float())
        else:
            pred_loss = F.smooth_l1_loss(pred.float(), target.float())
        out = {"pred_loss": pred_loss.detach(), "tokens": full}
        if cfg.regularizer == "sigreg":
            if cfg.sigreg_on == "tokens":
                emb = full.reshape(-1, full.shape[-1])
            elif self.sigreg_proj is not None:
                emb = self.sigreg_proj(full.mean(dim=1))
            else:
                emb = full.mean(dim=1)
            reg = sigreg(emb, cfg.sigreg_slices, cfg.sigreg_knots, generator=generator)
            out["sigreg"] = reg.detach()
            loss = (1.0 - cfg.sigreg_weight) * pred_loss + cfg.sigreg_weight * reg
        else:
            loss = pred_loss
        if self.view_proj is not None:
            if generator is None:
                raise ValueError("views need the step's generator")
            view_loss, parts = self._view_loss(images, generator)
            out.update(parts)
            loss = (1.0 - cfg.view_weight) * loss + cfg.view_weight * view_loss
        return loss, out

    def _view_loss(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """LeJEPA's objective on colour-augmented whole-image views: invariance + SIGReg on projections."""
        assert self.view_proj is not None
        cfg, batch = self.cfg, images.shape[0]
        views = torch.cat([colour_augment(images, generator) for _ in range(cfg.views)])
        if cfg.view_shift:
            shifts = torch.randint(-cfg.view_shift, cfg.view_shift + 1, (len(views), 2), generator=generator)
            views = torch.stack(
                [v.roll((int(dy), int(dx)), dims=(1, 2)) for v, (dy, dx) in zip(views, shifts, strict=True)]
            )
        keep = None
        if cfg.view_keep < 1:
            n = cfg.num_patches
            k = max(1, round(cfg.view_keep * n))
            keep = torch.rand(len(views), n, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values
            keep = keep.to(images.device)
        z = self.view_proj(self.encoder(views, keep=keep).mean(dim=1)).reshape(cfg.views, batch, -1)
        inv = (z - z.mean(dim=0, keepdim=True)).square().mean()
        reg = torch.stack([sigreg(v, cfg.sigreg_slices, cfg.sigreg_knots, generator=generator) for v in z]).mean()
        view_loss = (1.0 - cfg.view_sigreg) * inv + cfg.view_sigreg * reg
        return view_loss, {"view_inv": inv.detach(), "view_sigreg": reg.detach()}
