"""JEPA models, training job and evaluation harness (CPU, one thread, real synthetic shapes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workers.context import JobCancelled, LocalContext
from workers.eval.encoders import (
    EvalParams,
    attribute_keys,
    collapse_stats,
    evaluate_encoder,
    recall_at,
    recall_chance,
)
from workers.models.jepa import JEPA, colour_augment, make_config, sample_masks, sigreg
from workers.models.text import CrossModalJEPA, TextConfig, TextEncoder, tokenize, train_tokenizer
from workers.synth.shapes import ShapesGenerator, ShapesParams
from workers.train_jepa import JepaTrainParams, load_checkpoint, load_model, train_jepa, train_supervised

ROOT = Path(__file__).resolve().parent.parent
# a model small enough that a few steps take well under a second
MICRO = {"embed_dim": 32, "depth": 1, "num_heads": 2, "pred_dim": 16, "pred_depth": 1, "pred_heads": 2,
         "sigreg_slices": 32}
MICRO_TEXT = {"hidden": 32, "layers": 1, "heads": 2, "pred_hidden": 32, "vocab_size": 128}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def shapes(n: int, seed: int) -> dict[str, np.ndarray]:
    return ShapesGenerator().generate(ShapesParams(), seed, 0, n)


@pytest.fixture(scope="module")
def small_data() -> dict[str, np.ndarray]:
    return shapes(256, seed=3)


# ----------------------------------------------------------------------------------------------------
# model pieces


@pytest.mark.parametrize("preset", ["tiny", "rtx3090"])
def test_masks_disjoint_in_bounds(preset: str) -> None:
    cfg = make_config(preset)
    for seed in range(5):
        ctx_idx, tgt_idx = sample_masks(cfg, 16, torch.Generator().manual_seed(seed))
        assert tgt_idx.shape[:2] == (cfg.num_targets, 16)
        assert ctx_idx.min() >= 0 and ctx_idx.max() < cfg.num_patches
        assert tgt_idx.min() >= 0 and tgt_idx.max() < cfg.num_patches
        assert ctx_idx.shape[1] >= cfg.min_context
        for b in range(16):
            ctx = set(ctx_idx[b].tolist())
            assert len(ctx) == ctx_idx.shape[1], "context indices repeat"
            assert torch.equal(ctx_idx[b], ctx_idx[b].sort().values)
            for t in range(cfg.num_targets):
                block = tgt_idx[t, b].tolist()
                assert not ctx & set(block), "a target patch leaked into the context"
                rows, cols = {i // cfg.grid for i in block}, {i % cfg.grid for i in block}
                assert len(rows) * len(cols) == len(block), "a target is not a rectangle"


def test_random_masks_split_every_patch() -> None:
    cfg = make_config(masking="random", mask_ratio=0.5)
    ctx_idx, tgt_idx = sample_masks(cfg, 8, torch.Generator().manual_seed(0))
    assert ctx_idx.shape == (8, 32) and tgt_idx.shape == (1, 8, 32)
    for b in range(8):
        assert sorted(ctx_idx[b].tolist() + tgt_idx[0, b].tolist()) == list(range(cfg.num_patches))
    again, _ = sample_masks(cfg, 8, torch.Generator().manual_seed(0))
    assert torch.equal(ctx_idx, again), "masks must be a function of the generator"
    assert not torch.equal(ctx_idx[0], ctx_idx[1]), "each sample gets its own mask"


def test_centred_multi_layer_targets() -> None:
    """`target_centre` removes what every image shares at a position (the positional shortcut)."""
    cfg = make_config(**{**MICRO, "depth": 2, "regularizer": "ema", "target_centre": True, "target_layers": 2,
                         "masking": "random", "loss": "l2"})
    model = JEPA(cfg)
    images = torch.randn(6, 3, 32, 32)
    assert model.target_encoder is not None
    targets = model.target_encoder.layer_targets(images, 2)
    assert targets.shape == (6, 64, 32)
    ctx_idx, tgt_idx = sample_masks(cfg, 6, torch.Generator().manual_seed(0))
    loss, out = model(images, ctx_idx, tgt_idx)
    assert torch.isfinite(loss) and "sigreg" not in out
    loss.backward()
    assert model.predictor.proj.weight.grad is not None
    # a batch of identical images has nothing left to predict once centred: the loss is the predictor's
    # output alone, so zeroing the predictor's last layer makes it exactly zero
    with torch.no_grad():
        model.predictor.proj.weight.zero_()
        model.predictor.proj.bias.zero_()
    same = images[:1].repeat(6, 1, 1, 1)
    with torch.no_grad():
        assert float(model(same, ctx_idx, tgt_idx)[0]) == pytest.approx(0.0, abs=1e-9)


def test_model_output_shapes() -> None:
    cfg = make_config(**MICRO)
    model = JEPA(cfg)
    images = torch.randn(4, 3, 32, 32)
    ctx_idx, tgt_idx = sample_masks(cfg, 4, torch.Generator().manual_seed(0))
    assert model.encoder(images).shape == (4, 64, 32)
    assert model.encoder(images, keep=ctx_idx).shape == (4, ctx_idx.shape[1], 32)
    pred = model.predictor(model.encoder(images, keep=ctx_idx), ctx_idx, tgt_idx)
    assert pred.shape == (*tgt_idx.shape, 32)
    loss, out = model(images, ctx_idx, tgt_idx)
    assert loss.ndim == 0 and torch.isfinite(loss) and "sigreg" in out
    assert model.embed(images).shape == (4, 32)
    ema = JEPA(make_config(**{**MICRO, "regularizer": "ema"}))
    assert ema.target_encoder is not None
    assert not any(p.requires_grad for p in ema.target_encoder.parameters())
    before = next(iter(ema.target_encoder.parameters())).clone()
    with torch.no_grad():
        for p in ema.encoder.parameters():
            p.add_(1.0)
    ema.update_target(0.5)
    assert torch.allclose(next(iter(ema.target_encoder.parameters())), before + 0.5)


def test_projected_sigreg_term() -> None:
    """`sigreg_on: projected`: SIGReg on an MLP projection of the pooled full-image embedding, mixed in
    with the small weight, and the projector (trained by SIGReg alone) gets gradients."""
    cfg = make_config(**{**MICRO, "sigreg_on": "projected", "sigreg_weight": 0.05, "sigreg_proj_dim": 8,
                         "sigreg_proj_hidden": 16})
    torch.manual_seed(0)
    model = JEPA(cfg)
    assert model.sigreg_proj is not None and model.sigreg_proj[-1].out_features == 8
    images = torch.randn(6, 3, 32, 32)
    ctx_idx, tgt_idx = sample_masks(cfg, 6, torch.Generator().manual_seed(0))
    loss, out = model(images, ctx_idx, tgt_idx, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and float(out["sigreg"]) > 0
    assert float(loss.detach()) == pytest.approx(0.95 * float(out["pred_loss"]) + 0.05 * float(out["sigreg"]), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sigreg_proj.parameters())
    assert JEPA(make_config(**MICRO)).sigreg_proj is None  # other recipes carry no projector
    with pytest.raises(ValidationError, match="projected needs regularizer: sigreg"):
        make_config(regularizer="ema", sigreg_on="projected")
    with pytest.raises(ValidationError, match="sigreg_proj_dim and sigreg_proj_hidden must be >= 1"):
        make_config(sigreg_on="projected", sigreg_proj_dim=0)


def test_colour_augment_keeps_outlines() -> None:
    """Recolouring changes colours, never where the objects are, and is a function of the generator."""
    images = torch.from_numpy(shapes(8, seed=5)["images"]).permute(0, 3, 1, 2).float() / 255.0
    x = (images - 0.5) / 0.25
    a = colour_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, colour_augment(x, torch.Generator().manual_seed(0)))
    assert a.shape == x.shape and not torch.allclose(a, x)
    # a pixel far from the background level stays far from it: the outline survives recolouring
    bright = images.amax(dim=1) > 0.6
    recoloured = (a * 0.25 + 0.5).amax(dim=1)
    assert float(recoloured[bright].mean()) > float(recoloured[~bright].mean()) + 0.2


def test_view_objective_learns(tmp_path: Path, small_data: dict[str, np.ndarray]) -> None:
    """`views`: the invariance + SIGReg term trains (its SIGReg falls, the projections spread instead of
    collapsing to a point) alongside the masked prediction, on a run of a few seconds."""
    arch = {**MICRO, "regularizer": "ema", "masking": "random", "loss": "l2", "views": 2, "view_keep": 0.5,
            "view_proj_dim": 16, "view_proj_hidden": 32, "view_shift": 2, "colour_aug": True}
    ctx = LocalContext(tmp_path)
    train_jepa(ctx, _params(steps=60, batch_size=32, warmup_steps=5, lr=2e-3, checkpoint_every=1000, arch=arch),
               small_data)
    log = ctx.progress_log

    def early_late(key: str) -> tuple[float, float]:
        return float(np.mean([e[key] for e in log[:10]])), float(np.mean([e[key] for e in log[-10:]]))

    pred0, pred1 = early_late("pred_loss")
    reg0, reg1 = early_late("view_sigreg")
    assert pred1 < 0.7 * pred0, (pred0, pred1)
    assert reg1 < 0.8 * reg0, (reg0, reg1)
    model, _, _ = load_model(ctx.checkpoints[-1][0])
    assert model.view_proj is not None  # type: ignore[union-attr]
    assert JEPA(make_config(**MICRO)).view_proj is None
    with pytest.raises(ValidationError, match="views must be 0"):
        make_config(views=1)
    # the view objective alone skips the masked prediction (no predictor gradient, no pred_loss)
    alone = JEPA(make_config(**{**arch, "view_weight": 1.0}))
    ctx_idx, tgt_idx = sample_masks(alone.cfg, 8, torch.Generator().manual_seed(0))
    loss, out = alone(torch.randn(8, 3, 32, 32), ctx_idx, tgt_idx, torch.Generator().manual_seed(1))
    loss.backward()
    assert "pred_loss" not in out and alone.predictor.proj.weight.grad is None
    with pytest.raises(ValueError, match="view_weight 1 skips them"):
        CrossModalJEPA(alone.cfg, TextConfig(**MICRO_TEXT), 64)


def test_sigreg_gaussian_vs_collapsed() -> None:
    gen = torch.Generator().manual_seed(0)
    gauss = sigreg(torch.randn(2048, 64, generator=gen), generator=gen)
    collapsed = sigreg(torch.zeros(2048, 64) + 0.3, generator=gen)
    shrunk = sigreg(0.05 * torch.randn(2048, 64, generator=gen), generator=gen)
    low_rank = sigreg(torch.randn(2048, 1, generator=gen).repeat(1, 64) / 8, generator=gen)
    assert gauss < 0.005
    assert collapsed > 0.2 and shrunk > 0.2 and low_rank > 0.05
    z = torch.zeros(256, 8, requires_grad=True)
    sigreg(z + 0.01 * torch.randn(256, 8, generator=gen), generator=gen).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_collapse_stats_centre_first() -> None:
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(500, 32))
    collapsed = 5.0 + 1e-3 * rng.normal(size=(500, 1)) * np.ones((1, 32))  # offset + one direction
    h, c = collapse_stats(healthy), collapse_stats(collapsed)
    assert h["rankme"] > 25 and c["rankme"] < 2
    assert h["std"] > 0.9


def test_bad_params_are_clear() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        JepaTrainParams(arch={"bogus": 1})
    with pytest.raises(ValidationError, match="not a multiple of patch_size"):
        JepaTrainParams(arch={"patch_size": 5})
    with pytest.raises(ValidationError, match="preset"):
        JepaTrainParams.model_validate({"preset": "huge"})
    with pytest.raises(ValidationError, match="steps"):
        JepaTrainParams(steps=0)
    with pytest.raises(ValidationError, match=r"(?s)learning_rate.*Extra inputs"):
        JepaTrainParams.model_validate({"learning_rate": 0.1})
    with pytest.raises(ValidationError, match="regularizer"):
        JepaTrainParams(arch={"regularizer": "vicreg"})
    with pytest.raises(ValidationError, match="mask_ratio"):
        JepaTrainParams(arch={"masking": "random", "mask_ratio": 1.0})
    with pytest.raises(ValidationError, match=r"target_layers must be in 1..depth \(4\)"):
        JepaTrainParams(arch={"target_layers": 5})
    with pytest.raises(ValidationError, match="masking"):
        JepaTrainParams(arch={"masking": "grid"})
    with pytest.raises(ValidationError, match="labels"):
        EvalParams.model_validate({"labels": ["size"]})
    with pytest.raises(ValidationError, match="align"):
        JepaTrainParams(model="jepa-text", text={"align": "clip"})
    with pytest.raises(ValidationError, match="temperature"):
        JepaTrainParams(model="jepa-text", text={"temperature": 0})
    with pytest.raises(ValidationError, match="infonce_weight"):
        JepaTrainParams(model="jepa-text", text={"infonce_weight": -1})
    assert JepaTrainParams(preset="rtx3090", arch={"depth": 6}).image_config().depth == 6


# ----------------------------------------------------------------------------------------------------
# training job: checkpoints, exact resume, cancellation


def _params(**extra: Any) -> dict[str, Any]:
    return {"steps": 8, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 4, "arch": MICRO, **extra}


RESUME_SCRIPT = """
import sys, torch
from pathlib import Path
from workers.context import LocalContext
from workers.synth.shapes import ShapesGenerator, ShapesParams
from workers.train_jepa import train_jepa
import json
torch.set_num_threads(1)
params = json.loads(sys.argv[1])
ctx = LocalContext(Path(sys.argv[2]), resume_from=Path(sys.argv[3]))
train_jepa(ctx, params, ShapesGenerator().generate(ShapesParams(), 3, 0, 256))
"""


@pytest.mark.integration
@pytest.mark.parametrize("extra", [
    {"model": "jepa"},
    {"model": "jepa-text", "arch": {**MICRO, "regularizer": "ema"}, "text": MICRO_TEXT},
    {"model": "jepa-text", "arch": MICRO, "text": {**MICRO_TEXT, "align": "both"}},
    {"model": "jepa", "arch": {**MICRO, "regularizer": "ema", "target_centre": True, "masking": "random",
                               "loss": "l2"}},
], ids=["jepa-sigreg", "jepa-text-ema", "jepa-text-both", "jepa-ema-random-centred"])
def test_resume_is_bit_exact(tmp_path: Path, small_data: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
    import json

    params = _params(**extra)
    straight = LocalContext(tmp_path / "straight")
    train_jepa(straight, params, small_data)
    first = LocalContext(tmp_path / "first")
    train_jepa(first, {**params, "stop_at_step": 4}, small_data)
    assert first.checkpoints[-1][1] == 4
    # resume in a fresh process, as a retried attempt on another worker would
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(params), str(tmp_path / "resumed"),
                    str(first.checkpoints[-1][0])], check=True, cwd=ROOT)
    a = load_checkpoint(straight.checkpoints[-1][0])
    b = load_checkpoint(sorted((tmp_path / "resumed" / "checkpoints").glob("*.pt"))[-1])
    assert a["step"] == b["step"] == 8
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"{key} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert a["history"] == b["history"]


@pytest.mark.integration
def test_progress_checkpoints_plot_and_cancel(tmp_path: Path, small_data: dict[str, np.ndarray]) -> None:
    class StopAfter(LocalContext):
        def cancelled(self) -> bool:
            return len(self.progress_log) >= 3

        def raise_if_cancelled(self) -> None:
            if self.cancelled():
                raise JobCancelled("stop")

    ctx = StopAfter(tmp_path / "a")
    with pytest.raises(JobCancelled):
        train_jepa(ctx, _params(), small_data)
    path, step = ctx.checkpoints[-1]
    assert step == 3 and path.exists()
    assert not list(path.parent.glob(".*tmp*")), "temporary checkpoint file left behind"
    entry = ctx.progress_log[-1]
    assert {"loss", "lr", "images_s", "eta_s"} <= set(entry) and entry["step"] == 3
    ckpt = load_checkpoint(path)
    assert {"model", "optimizer", "scheduler", "rng", "data_position"} <= set(ckpt)
    done = LocalContext(tmp_path / "b", resume_from=path)
    metrics = train_jepa(done, _params(), small_data)
    assert metrics["step"] == 8 and done.progress_log[0]["step"] == 4
    plots = [a for a in done.artifacts if a["kind"] == "plot"]
    assert plots and Path(plots[0]["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_checkpoints_from_before_align_load_as_predict(tmp_path: Path, small_data: dict[str, np.ndarray]) -> None:
    ctx = LocalContext(tmp_path)
    train_jepa(ctx, _params(model="jepa-text", steps=2, text={**MICRO_TEXT, "align": "predict"}), small_data)
    path = ctx.checkpoints[-1][0]
    ckpt = load_checkpoint(path)
    del ckpt["params"]["text"]["align"]  # as written before `align` existed (the default is now infonce)
    torch.save(ckpt, path)
    model, params, _ = load_model(path)
    assert params.text_config().align == "predict" and not model.contrastive  # type: ignore[union-attr]
    fresh = LocalContext(tmp_path / "new")
    train_jepa(fresh, _params(model="jepa-text", steps=2, text=MICRO_TEXT), small_data)
    model, params, _ = load_model(fresh.checkpoints[-1][0])
    assert params.text_config().align == "infonce" and model.contrastive  # type: ignore[union-attr]


@pytest.mark.integration
def test_projected_recipe_trains_and_supervised_reference(
    tmp_path: Path, small_data: dict[str, np.ndarray]
) -> None:
    arch = {**MICRO, "sigreg_on": "projected", "sigreg_weight": 0.05, "sigreg_proj_dim": 8}
    ctx = LocalContext(tmp_path / "jepa")
    metrics = train_jepa(ctx, _params(steps=2, arch=arch), small_data)
    assert all(np.isfinite(e["loss"]) and e["sigreg"] > 0 for e in ctx.progress_log)
    assert np.isfinite(metrics["final_loss"])
    model, _, _ = load_model(ctx.checkpoints[-1][0])
    assert model.sigreg_proj is not None  # type: ignore[union-attr]

    # the bench's supervised reference: same encoder, cross-entropy on a label, a checkpoint the probes read
    sup = train_supervised(_params(steps=3, arch=arch), small_data, "shape", tmp_path / "sup.pt")
    assert len(sup["step_times"]) == 3 and sup["step_times"] == sorted(sup["step_times"])
    assert np.isfinite(sup["final_loss"])
    ref, ref_params, _ = load_model(tmp_path / "sup.pt")
    assert ref_params.image_config().sigreg_on == "tokens" and ref.sigreg_proj is None  # type: ignore[union-attr]
    fresh = JEPA(ref_params.image_config())
    assert not torch.equal(ref.encoder.vit.patch_embed.proj.weight, fresh.encoder.vit.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="no label 'size'"):
        train_supervised(_params(steps=1), small_data, "size", tmp_path / "bad.pt")


@pytest.mark.integration
def test_wrong_image_size_is_clear(tmp_path: Path) -> None:
    data = ShapesGenerator().generate(ShapesParams(size=64), 0, 0, 8)
    with pytest.raises(ValueError, match="img_size 32"):
        train_jepa(LocalContext(tmp_path), _params(), data)


# ----------------------------------------------------------------------------------------------------
# text


def test_recall_counts_duplicate_captions() -> None:
    caps = ["a", "a", "b", "c"]
    sim = np.eye(4)
    sim[0, 1], sim[0, 0] = 2.0, 0.0  # query 0 retrieves item 1 first: same caption, so a hit
    assert recall_at(sim, caps, caps)[1] == 1.0
    assert recall_chance(caps, caps, ks=(1,))[1] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)


def test_attribute_set_hits_need_every_label() -> None:
    labels = {"shape": np.array([0, 0, 0, 1]), "colour": np.array([2, 2, 2, 2]),
              "count": np.array([1, 1, 1, 1]), "position": np.array([4, 4, 5, 4])}
    keys = attribute_keys(labels)
    assert keys[0] == keys[1] == "0/2/1/4" and len(set(keys)) == 3  # 2 differs in position, 3 in shape
    sim = np.eye(4)
    sim[0, 0], sim[0, 1] = 0.0, 1.0  # query 0 ranks item 1 first: another caption, the same attributes
    sim[1, 1], sim[1, 2] = 0.0, 1.0  # query 1 ranks item 2 first: only the position differs, a miss
    assert recall_at(sim, keys, keys, ks=(1,))[1] == pytest.approx(3 / 4)
    assert recall_chance(keys, keys, ks=(1,))[1] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    with pytest.raises(ValueError, match=r"needs labels \['position'\]"):
        attribute_keys({k: v for k, v in labels.items() if k != "position"})


@pytest.mark.integration
def test_tokenizer_and_text_encoder(small_data: dict[str, np.ndarray]) -> None:
    captions = [str(c) for c in small_data["caption"]]
    tok = train_tokenizer(captions, vocab_size=128)
    ids, mask = tokenize(tok, captions[:8], max_len=32)
    assert ids.shape == mask.shape == (8, 32)
    assert tok.token_to_id("[UNK]") not in ids[mask.bool()].tolist(), "caption words should be in vocabulary"
    assert tok.decode(ids[0].tolist()) == captions[0].lower()
    enc = TextEncoder(TextConfig(**MICRO_TEXT), tok.get_vocab_size())
    assert enc(ids, mask).shape == (8, 32)


# ----------------------------------------------------------------------------------------------------
# learning: measured margins on real synthetic shapes (fixed seeds)


@pytest.mark.integration
@pytest.mark.slow
def test_training_learns_and_beats_baselines(tmp_path: Path) -> None:
    train, held_out = shapes(3000, seed=0), shapes(1200, seed=1)
    ctx = LocalContext(tmp_path)
    params = {"steps": 200, "batch_size": 64, "warmup_steps": 20, "checkpoint_every": 1000,
              "arch": {"sigreg_slices": 64, "sigreg_weight": 0.5}}
    train_jepa(ctx, params, train)
    losses = [e["loss"] for e in ctx.progress_log]
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    report = evaluate_encoder(ctx, {"labels": ["shape", "count"]}, ctx.checkpoints[-1][0], held_out)
    print({k: round(v, 3) for k, v in report.items()})
    assert report["shape_linear_gain"] == report["shape_linear"] - report["shape_linear_random"]
    # measured at these seeds: shape 0.286 vs random 0.222 vs pixels 0.200, RankMe 43.9 vs 19.0
    assert report["shape_linear"] >= report["shape_linear_pixels"] + 0.05, report
    assert report["rankme"] >= 1.5 * report["rankme_random"], report
    kinds = sorted(a["kind"] for a in ctx.artifacts)
    assert kinds == ["plot", "plot", "report"]


@pytest.mark.integration
@pytest.mark.slow
def test_cross_modal_retrieval_beats_chance(tmp_path: Path) -> None:
    """The predictive objective (`align: predict`, the default before InfoNCE) still works a little."""
    train, held_out = shapes(2000, seed=0), shapes(500, seed=1)
    ctx = LocalContext(tmp_path)
    params = {"model": "jepa-text", "steps": 150, "batch_size": 64, "warmup_steps": 20,
              "checkpoint_every": 1000, "arch": {**MICRO, "embed_dim": 64, "num_heads": 4},
              "text": {**MICRO_TEXT, "align": "predict"}}
    train_jepa(ctx, params, train)
    report = evaluate_encoder(ctx, {"labels": ["shape"]}, ctx.checkpoints[-1][0], held_out)
    print({k: round(v, 3) for k, v in report.items() if k[:3] in ("i2t", "t2i")})
    chance = report["i2t_caption_r5_chance"]
    assert 0 < chance < 0.1
    # measured at these seeds (150 held-out captions, chance 0.033): i2t_r5 0.107 (random init 0.040),
    # t2i_r5 0.047 (0.033); text->image is weak so far, see docs/MODELS.md
    assert report["i2t_caption_r5"] >= 2 * chance and report["i2t_caption_r5_gain"] > 0, report
    assert report["t2i_caption_r5"] >= chance, report


@pytest.mark.integration
@pytest.mark.slow
def test_infonce_alignment_learns_retrieval(tmp_path: Path, small_data: dict[str, np.ndarray]) -> None:
    """Symmetric InfoNCE lifts attribute-set retrieval above chance in a few dozen steps on tiny data."""
    ctx = LocalContext(tmp_path)
    params = {"model": "jepa-text", "steps": 40, "batch_size": 32, "warmup_steps": 3, "lr": 3e-3,
              "checkpoint_every": 1000, "arch": MICRO, "text": {**MICRO_TEXT, "align": "infonce"}}
    metrics = train_jepa(ctx, params, small_data)
    assert "infonce_loss" in metrics and "cross_loss" not in metrics
    report = evaluate_encoder(ctx, {"labels": ["colour"], "test_fraction": 0.5}, ctx.checkpoints[-1][0],
                              shapes(200, seed=4))
    print({k: round(v, 3) for k, v in report.items() if "_attr_r" in k})
    # measured at these seeds (100 held-out queries, chance 0.053): i2t_attr_r5 0.14 (random init 0.07),
    # t2i_attr_r5 0.13 (0.05); the predictive objective at the same budget: 0.06 and 0.09
    for d in ("i2t", "t2i"):
        assert report[f"{d}_attr_r5"] >= 2 * report[f"{d}_attr_r5_chance"], report
        assert report[f"{d}_attr_r5_gain"] > 0, report
