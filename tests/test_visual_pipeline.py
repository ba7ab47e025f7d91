"""Visual sudoku through the pipeline: cells drawn as glyphs, read by the core's JEPA image encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_adapters import _ctx
from workers.jobs import JobFailed, run_synthesize
from workers.ml_jobs import run_evaluate, run_train

pytestmark = pytest.mark.integration  # starts processes or trains

torch.set_num_threads(1)
TINY_JEPA = {"embed_dim": 48, "depth": 2, "num_heads": 2, "pred_dim": 24, "pred_depth": 1, "pred_heads": 2}
REASONER = {"model": "trm", "loss_on": "all", "d_model": 32, "n_heads": 2, "max_segments": 2}


def test_visual_reasoner_reads_glyphs_through_the_core_encoder(tmp_path: Path) -> None:
    shapes = run_synthesize(_ctx(tmp_path, "a"), {"generator": "shapes", "count": 64, "seed": 1})
    enc = run_train(_ctx(tmp_path, "b"), {"model": "jepa", "data": "s", "steps": 3, "batch_size": 16,
                                          "arch": TINY_JEPA, "_inputs": {"s": shapes.outputs}})
    puzzles = run_synthesize(_ctx(tmp_path, "c"), {"generator": "sudoku", "count": 120, "seed": 2, "params": {"n": 4}})
    inputs = {"p": puzzles.outputs}
    core = {"version": 1, "components": {"image-encoder": {"checkpoint": enc.outputs["checkpoint"]}}}
    with pytest.raises(JobFailed, match="core's image-encoder"):
        run_train(_ctx(tmp_path, "x"), {**REASONER, "data": "p", "visual": True, "max_steps": 2, "_inputs": inputs})
    trained = run_train(_ctx(tmp_path, "d"), {**REASONER, "data": "p", "visual": True, "max_steps": 8,
                                              "_inputs": inputs, "_core": core})
    assert trained.outputs["component"] == "reasoner"
    assert {"blank_acc", "exact_acc", "mean_steps"} <= set(trained.metrics)
    # The visual reasoner's input is the encoder's latent: evaluating it on tokens must fail loudly,
    # and on glyphs it works.
    evaluated = run_evaluate(_ctx(tmp_path, "e"), {**REASONER, "data": "p", "checkpoint": "t", "visual": True,
                                                   "_inputs": {**inputs, "t": trained.outputs}, "_core": core})
    assert 0.0 <= evaluated.metrics["blank_acc"] <= 1.0
    with pytest.raises((ValueError, RuntimeError)):
        run_evaluate(_ctx(tmp_path, "f"), {**REASONER, "data": "p", "checkpoint": "t",
                                           "_inputs": {**inputs, "t": trained.outputs}})
