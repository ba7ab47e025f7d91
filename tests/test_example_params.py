"""Every example ticket's step parameters validate against the job that will run them.

The daemon cannot check `with:` (it never imports the workers); this catches a typo in an example
(`steps` for a reasoner's `max_steps`, say) before a user meets it as a failed attempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schema.ticket import load_ticket
from tests.conftest import EXAMPLES

FILES = sorted(EXAMPLES.rglob("TICKET-*.yaml"))


def validate_step(kind: str, params: dict[str, Any]) -> None:
    from workers.eval.encoders import EvalParams
    from workers.inference import InferParams
    from workers.jobs import CheckParams, DiagParams
    from workers.ml_jobs import JEPA_MODELS, REASONERS, _model_params
    from workers.synth.base import SynthesisRequest
    from workers.train_adapter import AdapterParams
    from workers.train_jepa import JepaTrainParams
    from workers.train_reasoning import ReasonerTrainParams

    model = params.get("model")
    if kind == "synthesize":
        SynthesisRequest.model_validate(params)
    elif kind == "diag":
        DiagParams.model_validate(params)
    elif kind == "check":
        CheckParams.model_validate(params)
    elif kind == "infer":
        InferParams.model_validate(params)
    elif kind == "train" and "adapter" in params:
        AdapterParams.model_validate(_model_params(params))
    elif kind == "train" and model in JEPA_MODELS:
        JepaTrainParams.model_validate(_model_params(params))
    elif kind in ("train", "evaluate") and model in REASONERS:
        ReasonerTrainParams.model_validate(_model_params(params))
    elif kind == "evaluate" and model in JEPA_MODELS:
        EvalParams.model_validate({k: v for k, v in _model_params(params).items() if k != "model"})
    else:
        raise AssertionError(f"no job validates {kind} with model {model!r}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_parameters_validate(path: Path) -> None:
    ticket = load_ticket(path)
    for step in ticket.steps:
        validate_step(step.kind, dict(step.with_))


def test_a_typo_is_caught() -> None:
    with pytest.raises(ValueError, match="steps"):
        validate_step("train", {"model": "trm", "steps": 300})


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_gain_check_proves_a_gain_or_the_goal_says_it_does_not(path: Path) -> None:
    """A gain check that a gain of exactly 0 passes holds for a model that learned nothing: then the goal
    must say the example only exercises the mechanism (TICKET-7; measured in docs/BENCHMARKS.md)."""
    from schema.ticket import MetricCheck

    ticket = load_ticket(path)
    for check in ticket.acceptance:
        if isinstance(check, MetricCheck) and "_gain" in check.metric and check.holds(0.0):
            assert "exercise" in ticket.goal.lower(), (path.name, check.metric, check.op, check.value)
