"""The standing evaluation suite: one fixed yardstick per core component, run on every core version.

Each component is measured on held-out data from fixed generator seeds (a synthesize step the step
cache keeps, so the data is generated and stored once), by the ordinary `evaluate` job. A suite run
is a ticket like any other (`TICKET-suite-v3`, `TICKET-suite-P-4`) that the decider files itself:
on every `CorePromoted` for the new core, and on every core proposal for its candidate, so the
proposal compares candidate and current core on the same data. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from schema.readmodel import metric_direction

SUITE_PATH = "(suite)"  # the `path` of a suite ticket: it has no file in the tickets folder
SUITE_TICKET = re.compile(r"TICKET-suite-(v\d+|P-\d+)")
TOLERANCE = 0.02  # a drop larger than this (absolute, on a 0..1 metric) is a regression


@dataclass(frozen=True)
class Yardstick:
    """Held-out data for one component: a generator run with a fixed seed, and what to evaluate on it."""

    name: str  # e.g. "sudoku:6x6"
    generator: str
    count: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    eval_with: dict[str, Any] = field(default_factory=dict)
    judged: tuple[str, ...] = ()  # the metrics a regression is judged on (others are shown only)

    def data_step(self) -> dict[str, Any]:
        return {
            "id": _step_id("data", self.name),
            "kind": "synthesize",
            "with": {"generator": self.generator, "count": self.count, "seed": self.seed, "params": self.params},
        }


_SHAPES = {"size": 32, "max_objects": 3}
_ENCODER_JUDGED = ("shape_linear", "colour_linear", "count_linear", "position_linear")
YARDSTICKS: dict[str, Yardstick] = {
    "image-encoder": Yardstick("shapes:32", "shapes", 1000, 90_001, _SHAPES, {"test_fraction": 0.3}, _ENCODER_JUDGED),
    "image-text-encoder": Yardstick(
        "shapes:32",
        "shapes",
        1000,
        90_001,
        _SHAPES,
        {"test_fraction": 0.3},
        (*_ENCODER_JUDGED, "i2t_attr_r1", "t2i_attr_r1"),
    ),
    # Reasoners: a yardstick per grid. Held-out by symmetry class (the evaluate job keeps the test
    # split of the suite's puzzles, the same classes every training split holds out).
    "reasoner:sudoku:4x4": Yardstick("sudoku:4x4", "sudoku", 400, 90_004, {"n": 4}, {}, ("exact_acc", "blank_acc")),
    "reasoner:sudoku:6x6": Yardstick("sudoku:6x6", "sudoku", 600, 90_006, {"n": 6}, {}, ("exact_acc", "blank_acc")),
    "reasoner:sudoku:9x9": Yardstick("sudoku:9x9", "sudoku", 300, 90_009, {"n": 9}, {}, ("exact_acc", "blank_acc")),
}
DEFAULT_GRID = "sudoku:6x6"  # a core reasoner recorded before train jobs named their grid


def _step_id(prefix: str, name: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"


def _ref(checkpoint: str) -> str:
    """An artifact reference a step accepts (a bare content id would read as a step name)."""
    return checkpoint if checkpoint.startswith("sha256:") else f"sha256:{checkpoint}"


def yardstick_for(component: str, entry: dict[str, Any]) -> Yardstick | None:
    """The yardstick of a core component entry (None: the suite has none for it, e.g. a maze reasoner)."""
    if component == "reasoner":
        return YARDSTICKS.get(f"reasoner:{entry.get('grid') or DEFAULT_GRID}")
    return YARDSTICKS.get(component)


def suite_ticket(
    subject: str, components: dict[str, dict[str, Any]], *, core_version: int | None, proposal: str | None
) -> tuple[dict[str, Any], list[str]] | None:
    """The spec of the suite ticket measuring `components` (component -> core entry with `checkpoint` and
    `model`), and the components it leaves out with why; None when nothing can be measured."""
    steps: list[dict[str, Any]] = []
    left_out: list[str] = []
    data_ids: set[str] = set()
    for component, entry in sorted(components.items()):
        stick = yardstick_for(component, entry)
        if stick is None or not entry.get("checkpoint") or not entry.get("model"):
            left_out.append(f"{component}: no yardstick for {entry.get('grid') or entry.get('model') or 'it'}")
            continue
        data = stick.data_step()
        if data["id"] not in data_ids:
            data_ids.add(data["id"])
            steps.append(data)
        steps.append(
            {
                "id": _step_id("eval", component),
                "kind": "evaluate",
                "needs": [data["id"]],
                "retries": 1,
                "with": {
                    "model": entry["model"],
                    "data": data["id"],
                    "checkpoint": _ref(str(entry["checkpoint"])),
                    "suite": {
                        "component": component,
                        "yardstick": stick.name,
                        "seed": stick.seed,
                        "core_version": core_version,
                        "proposal": proposal,
                    },
                    **stick.eval_with,
                },
            }
        )
    if not steps:
        return None
    what = f"core v{core_version}" if proposal is None else f"the candidate of {proposal}"
    spec = {
        "id": f"TICKET-suite-{subject}",
        "title": f"Evaluation suite: {what}",
        "goal": f"Measure {what} on the standing evaluation suite (fixed held-out data, docs/MODELS.md)."
        + (f" Not measured: {'; '.join(left_out)}." if left_out else ""),
        "owner": "jetbox",
        "steps": steps,
        "constraints": {"max_wall_minutes": 60},
    }
    return spec, left_out


def judged(component: str, yardstick: str) -> tuple[str, ...]:
    for key, stick in YARDSTICKS.items():
        if stick.name == yardstick and (key == component or key.startswith(f"{component}:")):
            return stick.judged
    return ()


def regressions(
    component: str, yardstick: str, new: dict[str, float], old: dict[str, float], tolerance: float = TOLERANCE
) -> dict[str, float]:
    """Judged metrics that got worse by more than `tolerance`: metric -> delta (new - old)."""
    out: dict[str, float] = {}
    for name in judged(component, yardstick):
        if name not in new or name not in old:
            continue
        delta = new[name] - old[name]
        if delta * metric_direction(name) < -tolerance:
            out[name] = delta
    return out


def subject_order(subject: str) -> tuple[int, int]:
    """Core versions first, oldest first, then candidates by proposal number."""
    kind, _, n = subject.partition("-") if subject.startswith("P-") else ("v", "", subject[1:])
    return (0 if kind == "v" else 1, int(n) if n.isdigit() else 0)


def suite_table(
    rows: list[dict[str, Any]], *, all_metrics: bool = False, subjects: list[str] | None = None
) -> dict[str, Any]:
    """The suite as a table: one line per (component, yardstick, metric), one column per subject (core
    versions, then candidates). A cell is `{value, delta, regression}`: the delta is against the
    previous core version that has the metric (for a candidate: the newest core version), and a
    regression is a judged metric that dropped by more than `TOLERANCE`."""
    values: dict[tuple[str, str, str], dict[str, float]] = {}
    seen: set[str] = set()
    for r in rows:
        if subjects is not None and r["subject"] not in subjects:
            continue
        values.setdefault((r["component"], r["yardstick"], r["metric"]), {})[r["subject"]] = float(r["value"])
        seen.add(r["subject"])
    columns = sorted(seen, key=subject_order)
    lines = []
    for (component, yardstick, metric), by_subject in sorted(values.items()):
        is_judged = metric in judged(component, yardstick)
        if not all_metrics and not is_judged:
            continue
        cells: dict[str, dict[str, Any]] = {}
        last_version: float | None = None
        for subject in columns:
            value = by_subject.get(subject)
            if value is None:
                continue
            delta = None if last_version is None else value - last_version
            bad = bool(is_judged and delta is not None and delta * metric_direction(metric) < -TOLERANCE)
            cells[subject] = {"value": value, "delta": delta, "regression": bad}
            if subject.startswith("v"):
                last_version = value
        lines.append(
            {"component": component, "yardstick": yardstick, "metric": metric, "judged": is_judged, "cells": cells}
        )
    return {"columns": columns, "lines": lines, "tolerance": TOLERANCE}
