"""`text`: templated reasoning questions with exact answers.

Four families: multi-step arithmetic, comparisons, sequence continuation and relations between
named objects, each with several phrasings (templates). Train/test splits are either
- ``templates``: the last template of each family is held out for test (new phrasings), or
- ``values``: every number and name is assigned to train or test by a salted hash, and a
  question only uses values of its split (the operands of train and test never overlap).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from schema.artifacts import FieldSpec
from workers.synth.base import Arrays, ParamsModel, shard_rng

FAMILIES = ("arithmetic", "comparison", "sequence", "relation")
NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Erin",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Mallory",
    "Nina",
    "Oscar",
    "Peggy",
    "Quinn",
    "Rupert",
    "Sybil",
    "Trent",
    "Uma",
    "Victor",
    "Wendy",
    "Yara",
    "Zoe",
    "Omar",
    "Lena",
    "Kofi",
    "Mei",
    "Tariq",
    "Ines",
    "Pavel",
)
ITEMS = (
    "apple",
    "pencil",
    "marble",
    "coin",
    "book",
    "sticker",
    "card",
    "shell",
    "stamp",
    "button",
    "orange",
    "brick",
    "ribbon",
    "candle",
    "cookie",
)
OBJECTS = (
    "box",
    "ball",
    "lamp",
    "chair",
    "rock",
    "kettle",
    "drum",
    "vase",
    "bucket",
    "clock",
    "table",
    "bottle",
    "anvil",
    "pillow",
    "helmet",
    "basket",
    "guitar",
    "crate",
    "statue",
    "barrel",
)
# Smallest pools a split may leave: questions draw up to three distinct numbers, names or objects.
MIN_POOL = {"numbers": 4, "names": 3, "items": 1, "objects": 3}
QUESTION_WIDTH = 256
ANSWER_WIDTH = 32


def held_out(values: list[str], fraction: float, salt: str, minimum: int) -> set[str]:
    """The test share of a value pool: the `fraction` (at least `minimum`) with the smallest salted hash."""

    def rank(v: str) -> bytes:
        return hashlib.blake2b(f"{salt}:{v}".encode(), digest_size=8).digest()

    k = max(minimum, math.ceil(fraction * len(values)))
    return set(sorted(values, key=rank)[:k])


class _Draw:
    """Random operands restricted to the values of one split."""

    def __init__(
        self, rng: np.random.Generator, numbers: np.ndarray, names: list[str], items: list[str], objects: list[str]
    ) -> None:
        self.rng, self.numbers, self.names, self.items, self.objects = rng, numbers, names, items, objects

    def num(self, lo: int = 1, hi: int | None = None) -> int:
        pool = self.numbers
        if lo > 1 or hi is not None:
            pool = pool[(pool >= lo) & (pool <= (hi if hi is not None else pool[-1]))]
        if len(pool) == 0:  # the caller's bound excludes the whole pool: take the closest value
            pool = self.numbers[[int(np.argmin(np.abs(self.numbers - lo)))]]
        return int(pool[self.rng.integers(len(pool))])

    def distinct(self, k: int, lo: int = 1, hi: int | None = None) -> list[int]:
        pool = self.numbers[(self.numbers >= lo) & (self.numbers <= (hi or self.numbers[-1]))]
        return [int(v) for v in self.rng.choice(pool, size=k, replace=False)]

    def pick(self, options: list[str], k: int = 1) -> list[str]:
        return [options[i] for i in self.rng.choice(len(options), size=k, replace=False)]


# Each template: (family, function drawing a question and its answer).
Template = Callable[[_Draw], tuple[str, str]]


def _buy_give(d: _Draw) -> tuple[str, str]:
    (name,) = d.pick(d.names)
    (item,) = d.pick(d.items)
    a, b = d.num(), d.num()
    c = d.num(1, a + b)  # never empty: the pool's smallest value is <= a and so < a + b
    return (
        f"{name} has {a} {item}s. {name} buys {b} more and then gives {c} away. How many {item}s does {name} have now?",
        str(a + b - c),
    )


def _precedence(d: _Draw) -> tuple[str, str]:
    a, b, c = d.num(), d.num(1, 20), d.num(1, 20)
    return f"What is {a} + {b} * {c}?", str(a + b * c)


def _boxes(d: _Draw) -> tuple[str, str]:
    (item,) = d.pick(d.items)
    a, b, c = d.num(1, 30), d.num(1, 30), d.num()
    return (
        f"A box holds {a} {item}s. There are {b} boxes and {c} loose {item}s. How many {item}s are there in total?",
        str(a * b + c),
    )


def _brackets(d: _Draw) -> tuple[str, str]:
    a, b = d.distinct(2)
    a, b = max(a, b), min(a, b)
    c, e = d.num(1, 12), d.num()
    return f"Compute ({a} - {b}) * {c} + {e}.", str((a - b) * c + e)


def _larger(d: _Draw) -> tuple[str, str]:
    a, b = d.distinct(2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _greater_yes_no(d: _Draw) -> tuple[str, str]:
    a, b = d.distinct(2)
    return f"Is {a} greater than {b}? Answer yes or no.", "yes" if a > b else "no"


def _smallest(d: _Draw) -> tuple[str, str]:
    a, b, c = d.distinct(3)
    return f"Which is the smallest of {a}, {b} and {c}?", str(min(a, b, c))


def _arith_seq(d: _Draw) -> tuple[str, str]:
    start, step = d.num(), d.num(1, 25)
    terms = [start + k * step for k in range(5)]
    return f"What comes next: {', '.join(map(str, terms[:4]))}, ?", str(terms[4])


def _geom_seq(d: _Draw) -> tuple[str, str]:
    start, ratio = d.num(1, 20), d.num(2, 4)
    terms = [start * ratio**k for k in range(5)]
    return f"Continue the sequence: {', '.join(map(str, terms[:4]))}, ...", str(terms[4])


def _sum_seq(d: _Draw) -> tuple[str, str]:
    a, b = d.num(1, 30), d.num(1, 30)
    terms = [a, b]
    while len(terms) < 6:
        terms.append(terms[-1] + terms[-2])
    return (
        f"Each number is the sum of the two before it: {', '.join(map(str, terms[:5]))}. What is the next number?",
        str(terms[5]),
    )


def _tallest(d: _Draw) -> tuple[str, str]:
    a, b, c = d.pick(d.names, 3)  # a > b > c
    facts = [f"{a} is taller than {b}.", f"{b} is taller than {c}."]
    if d.rng.random() < 0.5:
        facts.reverse()
    return f"{' '.join(facts)} Who is the tallest?", a


def _older(d: _Draw) -> tuple[str, str]:
    a, b, c = d.pick(d.names, 3)  # a > b > c in age
    if d.rng.random() < 0.5:
        return f"{a} is older than {b}. {c} is younger than {b}. Is {a} older than {c}?", "yes"
    return f"{a} is older than {b}. {c} is younger than {b}. Is {c} older than {a}?", "no"


def _middle(d: _Draw) -> tuple[str, str]:
    a, b, c = d.pick(d.names, 3)  # left to right
    facts = [f"{a} sits left of {b}.", f"{c} sits right of {b}."]
    if d.rng.random() < 0.5:
        facts.reverse()
    return f"{' '.join(facts)} Who sits in the middle?", b


def _lightest(d: _Draw) -> tuple[str, str]:
    a, b, c = d.pick(d.objects, 3)  # heaviest to lightest
    return (f"The {a} is heavier than the {b}, and the {b} is heavier than the {c}. Which is the lightest?", c)


TEMPLATES: tuple[tuple[str, Template], ...] = (
    ("arithmetic", _buy_give),
    ("arithmetic", _precedence),
    ("arithmetic", _boxes),
    ("arithmetic", _brackets),
    ("comparison", _larger),
    ("comparison", _greater_yes_no),
    ("comparison", _smallest),
    ("sequence", _arith_seq),
    ("sequence", _geom_seq),
    ("sequence", _sum_seq),
    ("relation", _tallest),
    ("relation", _older),
    ("relation", _middle),
    ("relation", _lightest),
)
# Held out in `templates` mode: the last template of each family.
TEST_TEMPLATES = frozenset(max(i for i, (f, _) in enumerate(TEMPLATES) if f == fam) for fam in FAMILIES)


class TextParams(ParamsModel):
    """Parameters of the `text` generator."""

    families: tuple[str, ...] = Field(default=FAMILIES, min_length=1)
    max_value: int = Field(default=100, ge=20, le=100_000, description="largest operand")
    split: Literal["all", "train", "test"] = "all"
    split_mode: Literal["templates", "values"] = "templates"
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="share of values held out (values mode)")
    split_salt: str = "text"

    @field_validator("families")
    @classmethod
    def _families(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [f for f in value if f not in FAMILIES]
        if bad:
            raise ValueError(f"unknown famil(ies) {bad}; choose from {list(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _pools(self) -> TextParams:
        if self.split_mode == "values":
            for pool, size in {
                "numbers": self.max_value,
                "names": len(NAMES),
                "items": len(ITEMS),
                "objects": len(OBJECTS),
            }.items():
                test = max(MIN_POOL[pool], math.ceil(self.test_fraction * size))
                if size - test < MIN_POOL[pool]:
                    raise ValueError(
                        f"test_fraction {self.test_fraction} leaves fewer than {MIN_POOL[pool]} "
                        f"{pool} for training; lower it"
                    )
        return self


@dataclass(frozen=True)
class _Plan:
    templates: tuple[int, ...]
    numbers: np.ndarray
    names: list[str]
    items: list[str]
    objects: list[str]


@lru_cache(maxsize=16)
def _plan(p: TextParams) -> _Plan:
    templates = [i for i, (f, _) in enumerate(TEMPLATES) if f in p.families]
    numbers = np.arange(1, p.max_value + 1)
    names, items, objects = list(NAMES), list(ITEMS), list(OBJECTS)
    if p.split != "all" and p.split_mode == "templates":
        want_test = p.split == "test"
        templates = [i for i in templates if (i in TEST_TEMPLATES) == want_test]
    elif p.split != "all":
        pools = _value_split(p)
        numbers = np.array(sorted(int(v) for v in pools["numbers"]), dtype=np.int64)
        names, items, objects = pools["names"], pools["items"], pools["objects"]
    return _Plan(tuple(templates), numbers, names, items, objects)


def _value_split(p: TextParams) -> dict[str, list[str]]:
    """The values of each pool that belong to `p.split` (values mode)."""
    source = {
        "numbers": [str(v) for v in range(1, p.max_value + 1)],
        "names": list(NAMES),
        "items": list(ITEMS),
        "objects": list(OBJECTS),
    }
    out = {}
    for pool, values in source.items():
        test = held_out(values, p.test_fraction, f"{p.split_salt}:{pool}", MIN_POOL[pool])
        out[pool] = [v for v in values if (v in test) == (p.split == "test")]
    return out


def template_split(template: int) -> Literal["train", "test"]:
    """Which split a template belongs to in `templates` mode."""
    return "test" if template in TEST_TEMPLATES else "train"


class TextGenerator:
    """Reasoning questions with exact answers."""

    name: ClassVar[str] = "text"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[TextParams]] = TextParams

    def label_schema(self, params: TextParams) -> dict[str, FieldSpec]:
        return {
            "question": FieldSpec(dtype=f"<U{QUESTION_WIDTH}", shape=[], description="the question"),
            "answer": FieldSpec(dtype=f"<U{ANSWER_WIDTH}", shape=[], description="the exact answer"),
            "family": FieldSpec(dtype="<i8", shape=[], description=f"family id {list(FAMILIES)}"),
            "template": FieldSpec(dtype="<i8", shape=[], description="template id (0..13)"),
        }

    def generate(self, params: TextParams, seed: int, shard: int, count: int) -> Arrays:
        """`count` questions of shard `shard`."""
        rng = shard_rng(seed, shard)
        plan = _plan(params)
        draw = _Draw(rng, plan.numbers, plan.names, plan.items, plan.objects)
        chosen = np.array(plan.templates)[rng.integers(len(plan.templates), size=count)]
        questions, answers = [], []
        for t in chosen.tolist():
            q, a = TEMPLATES[t][1](draw)
            if len(q) > QUESTION_WIDTH or len(a) > ANSWER_WIDTH:
                raise ValueError(f"template {t} produced a question or answer too long to store; lower max_value")
            questions.append(q)
            answers.append(a)
        return {
            "question": np.array(questions, dtype=f"<U{QUESTION_WIDTH}").reshape(count),
            "answer": np.array(answers, dtype=f"<U{ANSWER_WIDTH}").reshape(count),
            "family": np.array([FAMILIES.index(TEMPLATES[t][0]) for t in chosen.tolist()], dtype=np.int64),
            "template": chosen.astype(np.int64).reshape(count),
        }

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """The first questions with their answers."""
        return "\n".join(
            f"[{i}] {arrays['question'][i]}  ->  {arrays['answer'][i]}"
            for i in range(min(limit, len(arrays["question"])))
        )

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """No image preview for this generator."""
        return None


GENERATOR = TextGenerator()
