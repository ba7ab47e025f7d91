"""Visual sudoku's encoders: the JEPA glyph encoder, the pre-encoded glyph bank, and the bench that compares
digit tokens with glyphs through a trained and a random JEPA (figures are not checked: docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from workers.context import LocalContext
from workers.eval.reasoners import evaluate_reasoner
from workers.models.jepa import JEPA, make_config
from workers.train_reasoning import Inputs, ReasonerTrainParams, Task, Visual, glyph_render, train_reasoner
from workers.visual import GlyphEncoder

ROOT = Path(__file__).resolve().parent.parent
SUDOKU4 = Task("sudoku", 4, 4)


def _flat_render(puzzles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A picture of digit d is the constant d/10 (plus a draw, so renderings differ): readable by a mean."""
    k, n = puzzles.shape[0], puzzles.shape[1] * puzzles.shape[2]
    noise = rng.integers(0, 2, size=(k, n, 1, 1, 1)) * 1e-3
    return (puzzles.reshape(k, n, 1, 1, 1) / 10 + noise) * np.ones((1, 1, 1, 4, 4), dtype=np.float32)


class _Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.w = nn.Parameter(torch.ones(()))  # so freezing has something to freeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1).mean(1, keepdim=True) * self.w


def test_bank_gives_each_cell_a_latent_of_its_own_symbol() -> None:
    enc = _Mean()
    inputs = Inputs(Visual(enc, _flat_render, bank=5), torch.device("cpu"), 0, SUDOKU4)
    assert inputs.bank is not None and inputs.bank.shape == (5, 5, 1)  # blank + 4 digits, 5 renderings each
    calls = enc.calls
    puzzles = np.random.default_rng(1).integers(0, 5, size=(3, 4, 4))
    z = inputs(puzzles)
    assert enc.calls == calls, "a banked cell is a lookup, not an encoder pass"
    assert z.shape == (3, 16, 1)
    # each latent is one of the renderings of that cell's symbol: d/10 (+ 0 or 1e-3)
    assert torch.allclose(z[..., 0], torch.from_numpy(puzzles.reshape(3, 16) / 10).float(), atol=2e-3)
    assert not enc.w.requires_grad  # frozen like the core's encoder
    with pytest.raises(ValueError, match="bank must be >= 0"):
        Visual(enc, _flat_render, bank=-1)


def test_glyph_encoder_reads_grey_glyphs_frozen() -> None:
    torch.manual_seed(0)
    jepa = JEPA(make_config("tiny", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            pred_dim=16, pred_depth=1, pred_heads=2))  # fmt: skip
    enc = GlyphEncoder(jepa)
    x = torch.from_numpy(glyph_render(16)(np.array([[[1, 2], [0, 3]]]), np.random.default_rng(0))[0])
    z = enc(x)
    assert z.shape == (4, 32) and torch.isfinite(z).all()
    assert not any(p.requires_grad for p in enc.parameters())
    # the same picture in three channels, normalised as the JEPA's training images
    assert torch.allclose(z, jepa.embed((x.expand(-1, 3, -1, -1) - 0.5) / 0.25))
    with pytest.raises(ValueError, match=r"grey glyphs \[B, 1, 16, 16\], got \(4, 1, 28, 28\)"):
        enc(torch.zeros(4, 1, 28, 28))


def test_trm_trains_on_a_glyph_bank_and_scores_on_fresh_renderings(tmp_path: Path) -> None:
    from workers.synth.sudoku import GENERATOR, SudokuParams

    data = GENERATOR.generate(SudokuParams(n=4), seed=0, shard=0, count=24)
    grids = (data["puzzles"], data["solutions"])
    torch.manual_seed(0)
    jepa = JEPA(make_config("tiny", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            pred_dim=16, pred_depth=1, pred_heads=2))  # fmt: skip
    enc = GlyphEncoder(jepa)
    p = ReasonerTrainParams(model="trm", d_model=16, n_heads=2, batch_size=4, max_steps=3, loss_on="all",
                            log_every=1, device="cpu")  # fmt: skip
    ctx = LocalContext(tmp_path / "t")
    m = train_reasoner(ctx, p, grids, grids, visual=Visual(enc, glyph_render(16), bank=3))
    assert m["steps"] == 3 and 0.0 <= m["blank_acc"] <= 1.0
    ckpt = torch.load(ctx.checkpoints[-1][0], weights_only=False)
    assert ckpt["model_config"]["input_dim"] == 32 and ckpt["carry"]["x"].shape == (4, 16, 32)
    fresh = evaluate_reasoner(LocalContext(tmp_path / "e"), p, ctx.checkpoints[-1][0], grids,
                              visual=Visual(enc, glyph_render(16)))  # fmt: skip
    assert set(fresh) >= {"exact_acc", "blank_acc"}


@pytest.mark.integration  # the bench makes its puzzles in worker processes
def test_bench_visual_encoders_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.reasoning import main

    out = tmp_path / "r.json"
    main(["--n", "4", "--train", "50", "--test", "10", "--models", "trm", "--seeds", "1", "--steps", "2",
          "--visual-encoder", "jepa,random", "--bank", "4", "--jepa-steps", "2", "--jepa-glyphs", "128",
          "--jepa-arch", "embed_dim=32", "--jepa-arch", "depth=1", "--jepa-arch", "num_heads=2",
          "--probe", "90", "--set", "d_model=16", "--set", "n_heads=2", "--set", "batch_size=4",
          "--save-jepa", str(tmp_path / "glyph-jepa.pt"), "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "glyph JEPA: 2 steps on 128 glyphs (16 px)" in printed
    assert (
        "digit probe" in printed and "  jepa " in printed and "| trm+jepa |" in printed and "| trm+random |" in printed
    )
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["rows"]] == ["trm", "trm+jepa", "trm+random"]
    assert set(res["probes"]) == {"pixels", "jepa", "random"}
    assert all(0 <= v["acc"] <= 1 and 0 <= v["digit_var"] <= 1 for v in res["probes"].values())
    assert all(r["cpu_s"] > 0 for r in res["rows"])
    assert "exact_acc_bank" in res["rows"][1] and "exact_acc_bank" not in res["rows"][0]
    # the kept JEPA reads glyphs again (loaded, not retrained), standardised, without a token run
    main(["--n", "4", "--train", "50", "--test", "10", "--models", "trm", "--seeds", "1", "--steps", "1",
          "--first-seed", "3", "--visual-encoder", "jepa", "--jepa", str(tmp_path / "glyph-jepa.pt"),
          "--standardise", "--no-tokens", "--probe", "90",
          "--set", "d_model=16", "--set", "n_heads=2", "--set", "batch_size=4"])  # fmt: skip
    again = capsys.readouterr().out
    assert "glyph JEPA:" not in again and "trm+jepa+std seed 3:" in again and "| trm |" not in again
    with pytest.raises(SystemExit):
        main(["--visual-encoder", "vit"])  # an unknown encoder is refused before any work
