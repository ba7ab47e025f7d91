"""The `text` generator: every answer re-derived by parsing the question; disjoint splits."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from workers.synth.base import SynthError, validate_params
from workers.synth.text import FAMILIES, NAMES, OBJECTS, TEMPLATES, TextGenerator, TextParams

GEN = TextGenerator()


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def solve(question: str) -> str:
    """Answer a question from its text alone (an independent oracle for the templates)."""
    q = question
    if m := re.fullmatch(r"(\w+) has (\d+) (\w+)s\. \1 buys (\d+) more and then gives (\d+) away\. .*", q):
        return str(int(m[2]) + int(m[4]) - int(m[5]))
    if m := re.fullmatch(r"What is (\d+) \+ (\d+) \* (\d+)\?", q):
        return str(int(m[1]) + int(m[2]) * int(m[3]))
    if m := re.fullmatch(r"A box holds (\d+) (\w+)s\. There are (\d+) boxes and (\d+) loose .*", q):
        return str(int(m[1]) * int(m[3]) + int(m[4]))
    if m := re.fullmatch(r"Compute \((\d+) - (\d+)\) \* (\d+) \+ (\d+)\.", q):
        return str((int(m[1]) - int(m[2])) * int(m[3]) + int(m[4]))
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Is (\d+) greater than (\d+)\? Answer yes or no\.", q):
        return "yes" if int(m[1]) > int(m[2]) else "no"
    if m := re.fullmatch(r"Which is the smallest of (\d+), (\d+) and (\d+)\?", q):
        return str(min(int(m[1]), int(m[2]), int(m[3])))
    if q.startswith(("What comes next:", "Continue the sequence:")):
        t = _ints(q)
        if t[1] - t[0] == t[2] - t[1] == t[3] - t[2]:
            return str(t[3] + t[3] - t[2])
        assert t[1] * t[1] == t[0] * t[2] and t[2] * t[2] == t[1] * t[3]
        return str(t[3] * t[3] // t[2])
    if q.startswith("Each number is the sum"):
        t = _ints(q)
        assert all(t[k] == t[k - 1] + t[k - 2] for k in range(2, len(t)))
        return str(t[-1] + t[-2])
    # Build "x before y" pairs (x is taller/older/heavier/further left), then order by position.
    before: list[tuple[str, str]] = []
    for m in re.finditer(r"(?:The )?(\w+) (?:is|sits) (taller|older|younger|heavier|left|right) (?:than|of) "
                         r"(?:the )?(\w+)", q):
        a, rel, b = m.groups()
        before.append((b, a) if rel in ("younger", "right") else (a, b))
    people = {x for pair in before for x in pair}
    ordered = sorted(people, key=lambda p: -_depth(p, before))
    assert len(before) == 2 and len(ordered) == 3, q
    if "tallest" in q:
        return ordered[0]
    if "lightest" in q:
        return ordered[-1]
    if "middle" in q:
        return ordered[1]
    m = re.search(r"Is (\w+) older than (\w+)\?", q)
    assert m, q
    return "yes" if ordered.index(m[1]) < ordered.index(m[2]) else "no"


def _depth(p: str, before: list[tuple[str, str]]) -> int:
    """How many others come after p (transitively)."""
    after = {b for a, b in before if a == p}
    frontier = set(after)
    while frontier:
        frontier = {b for a, b in before if a in frontier} - after
        after |= frontier
    return len(after)


@pytest.mark.parametrize("params", [TextParams(), TextParams(max_value=5000),
                                    TextParams(split="test", split_mode="values", test_fraction=0.3)])
def test_every_answer_is_exact(params: TextParams) -> None:
    out = GEN.generate(params, seed=1, shard=0, count=1500)
    assert out["question"].dtype.kind == "U" and out["answer"].dtype.kind == "U"
    assert out["family"].dtype == np.int64 and out["template"].dtype == np.int64
    for q, a, fam, t in zip(out["question"], out["answer"], out["family"], out["template"], strict=True):
        assert solve(str(q)) == str(a), q
        assert TEMPLATES[int(t)][0] == FAMILIES[int(fam)]
    assert set(out["template"].tolist()) == set(range(len(TEMPLATES)))


def test_families_can_be_restricted() -> None:
    out = GEN.generate(TextParams(families=("sequence",)), 0, 0, 100)
    assert set(out["family"].tolist()) == {FAMILIES.index("sequence")}


def test_template_split_is_disjoint() -> None:
    train = GEN.generate(TextParams(split="train"), 0, 0, 600)
    test = GEN.generate(TextParams(split="test"), 0, 1, 200)
    tr, te = set(train["template"].tolist()), set(test["template"].tolist())
    assert tr and te and not tr & te
    assert set(FAMILIES.index(TEMPLATES[t][0]) for t in te) == set(range(len(FAMILIES)))  # one per family
    assert not set(train["question"].tolist()) & set(test["question"].tolist())


def test_value_split_uses_disjoint_operands_and_names() -> None:
    params = {"split_mode": "values", "test_fraction": 0.25, "max_value": 200}
    train = GEN.generate(TextParams(split="train", **params), 0, 0, 800)
    test = GEN.generate(TextParams(split="test", **params), 0, 1, 400)

    def operands(out: dict[str, np.ndarray]) -> set[int]:
        # In arithmetic and comparison questions every number is an operand.
        keep = np.isin(out["family"], [FAMILIES.index("arithmetic"), FAMILIES.index("comparison")])
        return {v for q in out["question"][keep] for v in _ints(str(q))}

    def names(out: dict[str, np.ndarray]) -> set[str]:
        keep = out["family"] == FAMILIES.index("relation")
        words = {w for q in out["question"][keep] for w in re.findall(r"[A-Za-z]+", str(q))}
        return words & (set(NAMES) | set(OBJECTS))

    assert operands(train) and operands(test) and not operands(train) & operands(test)
    assert names(train) and names(test) and not names(train) & names(test)
    assert set(train["template"].tolist()) == set(test["template"].tolist())  # same templates, new values


@pytest.mark.parametrize(("params", "field"), [
    ({"families": ["poetry"]}, "families"), ({"max_value": 5}, "max_value"), ({"split": "val"}, "split"),
    ({"split_mode": "values", "test_fraction": 0.95}, "test_fraction"), ({"count": 3}, "count"),
])
def test_bad_parameters_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        TextParams.model_validate(params)
    assert field in str(err.value)
    with pytest.raises(SynthError):
        validate_params("text", params)
