"""The ticket: a researcher's goal, its steps (a DAG of tasks), constraints and acceptance checks.

`load_ticket` turns a file's bytes into a validated `Ticket` or a list of `TicketError`s, each
pointing at a line and column of the YAML source, as `FILE:LINE:COL: message`.

Validation runs in the daemon on files anyone with write access to the tickets folder drops there,
so its cost is bounded by the code, not by the file: the byte size is checked before parsing, and
the YAML composer stops at a nesting depth and at a number of values counted *after* expanding
aliases (so a "billion laughs" file is refused after a few hundred nodes, not expanded). The
limits are the `MAX_*` constants below; docs/OPERATIONS.md ("The tickets folder") lists them.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from schema.sizes import parse_memory as parse_memory  # re-exported: tickets name sizes the same way

# Limits on one ticket file. Pure-Python YAML costs ~0.1 ms per value, so MAX_NODES bounds the
# parse to well under a second; the rest keep any one ticket from bloating events, notes and the
# scheduler (which walks every task on each event).
MAX_TICKET_BYTES = 64 * 1024  # checked before parsing
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_NODES = 5_000  # values (keys, scalars, mappings, lists), counted after expanding aliases
MAX_STEPS = 200
MAX_NEEDS = 2_000  # `needs` entries over all steps (edges of the task graph)
MAX_KEY_CHARS = 128
MAX_PRIORITY = 1000  # `priority:` is within +-this
MAX_INT = 2**63 - 1  # integers must fit in 64 bits (JSON consumers, SQL, numpy)
MAX_ERRORS = 20  # errors reported per file (the rest are counted)
MAX_MESSAGE_CHARS = 400  # one error message, quoted values included
TICKET_ID = re.compile(r"TICKET-[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # always fullmatch: `$` accepts a final \n
MILESTONE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
COMPONENT = re.compile(r"[a-z][a-z0-9_-]{0,63}")  # a core component's name (`after: {core: NAME}`)
STEP_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ARTIFACT_REF = re.compile(r"^sha256:[0-9a-f]{8,64}$")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

StepKind = Literal["synthesize", "train", "evaluate", "infer", "check", "diag"]
Queue = Literal["gpu", "cpu"]
DEFAULT_QUEUE: dict[str, Queue] = {
    "synthesize": "cpu",
    "train": "gpu",
    "evaluate": "gpu",
    "infer": "gpu",
    "check": "cpu",
    "diag": "cpu",
}
# A step may fan out into at most this many subtasks (`shards:`); each is a task the scheduler walks.
MAX_SHARDS = 64
MAX_SUBTASKS = 256  # over all steps of a ticket: with MAX_STEPS, what the scheduler walks stays bounded
MAX_COMBINATIONS = 256  # a step's `matrix:` fans out into at most this many subtasks (and counts toward MAX_SUBTASKS)
MATRIX_KINDS = ("train", "evaluate", "synthesize", "diag")  # the kinds a `matrix:` may sweep
MAX_STEP_GPUS = 64  # cards one step may ask for (all on one worker)
DEFAULT_SHARD_SIZE = 10_000  # a synthesize step's `shard_size` when it names none (workers use it too)
# A synthesize step that does not say `shards:` fans out by its size: one subtask per
# AUTO_SHARD_EXAMPLES examples (rounded up), at most one per shard file and at most AUTO_SHARDS_MAX
# (docs/DATA.md). 20,000 shapes images take about 2 s on one core: a subtask costs 30-60 ms of
# dispatch, so two are worth it from there on; more than 8 rarely find idle workers.
AUTO_SHARD_EXAMPLES = 10_000
AUTO_SHARDS_MAX = 8
# The metrics a job kind always reports, for kinds whose set is closed: an `expect:` or `probe:` on any
# other name is an error at load time. Kinds not listed (train, evaluate, infer, diag) report metrics
# that depend on their parameters; a check on a name they did not report fails when it is evaluated.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "synthesize": ("count", "seconds"),
    "check": ("returncode", "seconds"),
}
# Parameters whose value names data: they must point at a step this one needs, or an artifact id.
DATA_KEYS = ("data", "dataset", "train_data", "test_data", "checkpoint", "encoder")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `90`, `30s`, `15m`, `2h`, `7d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 2h or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {value!r}: expected a number with s, m, h or d (e.g. 15m)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


Duration = Annotated[float, Field(gt=0)]
_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
Op = Literal[">=", "<=", ">", "<", "==", "!="]


class Expectation(_Strict):
    """`expect:` on a step: `<name> op value` on the step's own metrics (`<step>.<name>` also reads), or
    `output: NAME`, an output the step's result must carry (e.g. dataset, checkpoint)."""

    metric: str | None = Field(default=None, description="a metric this step reports, e.g. count (or data.count)")
    op: Op | None = None
    value: float | None = None
    output: str | None = Field(
        default=None, min_length=1, max_length=100, description="an output this step must produce, e.g. dataset"
    )
    retryable: bool = Field(default=False, description="a failed expectation may be retried (within retries)")

    @model_validator(mode="before")
    @classmethod
    def _no_commands(cls, value: Any) -> Any:
        if isinstance(value, dict) and "run" in value:
            raise ValueError(
                "an expectation is a metric check (metric, op, value) or an output (output: NAME); a command "
                "to run belongs in `acceptance` or a `check` step"
            )
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        if value is not None and (not value or value.startswith(".") or value.endswith(".")):
            raise ValueError(f"metric {value!r}: name one of this step's metrics, e.g. count")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Expectation:
        if self.output is not None:
            if self.metric is not None or self.op is not None or self.value is not None:
                raise ValueError("an expectation is either {metric, op, value} or {output: NAME}, not both")
        elif self.metric is None or self.op is None or self.value is None:
            missing = [k for k in ("metric", "op", "value") if getattr(self, k) is None]
            raise ValueError(
                f"an expectation needs metric, op and value (missing: {', '.join(missing)}), or output: NAME"
            )
        return self

    @property
    def name(self) -> str:
        return self.output if self.output is not None else str(self.metric).rpartition(".")[2]

    def holds(self, observed: float) -> bool:
        assert self.op is not None and self.value is not None
        return bool(_OPS[self.op](observed, self.value))

    def judge(self, metrics: dict[str, float], outputs: dict[str, Any]) -> tuple[bool, str, float | None]:
        """(holds, what was observed in words, the metric's value) on one result."""
        if self.output is not None:
            found = outputs.get(self.output)
            named = ", ".join(sorted(outputs)) or "none"
            if found in (None, "", [], {}):
                return False, f"no output {self.output!r} (outputs: {named})", None
            return True, str(found)[:200], None
        value = metrics.get(self.name)
        if value is None:
            return False, f"no such metric reported (reported: {', '.join(sorted(metrics)) or 'none'})", None
        return self.holds(value), f"{value:g}", value

    def text(self) -> str:
        if self.output is not None:
            return f"output {self.output}"
        return f"{self.name} {self.op} {self.value:g}"


class _StepMetric(_Strict):
    """`<step>.<name> op value` on a metric another step reported; subclasses say where it is read."""

    _example: ClassVar[str] = "eval.accuracy"
    metric: str = Field(description="<step>.<name>: a step of this ticket and one of its metrics")
    op: Op
    value: float

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        step, _, name = value.partition(".")
        if not step or not name:
            raise ValueError(f"metric {value!r} must be written <step>.<name>, e.g. {cls._example}")
        return value

    @property
    def step(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def name(self) -> str:
        return self.metric.partition(".")[2]

    def holds(self, observed: float) -> bool:
        """Whether `observed` satisfies the check."""
        return bool(_OPS[self.op](observed, self.value))

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class MetricProbe(_StepMetric):
    """`probe:` on a step's input: `<needed step>.<name> op value`, read before the step is dispatched."""

    _example: ClassVar[str] = "data.count"


class CoreProbe(_Strict):
    """`probe: {core: COMPONENT}`: the abstract core holds that component (e.g. a trained encoder)."""

    core: str = Field(min_length=1, max_length=100, description="a component the core must hold, e.g. encoder")

    def text(self) -> str:
        return f"core has {self.core}"


def _probe_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "core" if "core" in value else "metric"
    return "core" if isinstance(value, CoreProbe) else "metric"


ProbeCheck = Annotated[
    Annotated[MetricProbe, Tag("metric")] | Annotated[CoreProbe, Tag("core")],
    Discriminator(_probe_kind),
]


class SweepSelect(_Strict):
    """`select:` of a `matrix:` step: the combination whose metric is best names the step's result."""

    metric: str = Field(description="a metric the step reports, e.g. blank_acc (or <this step>.blank_acc)")
    mode: Literal["max", "min"] = Field(description="max: the highest value wins; min: the lowest")

    def name(self, step: str) -> str:
        """The metric's name on the step's own metrics (`<step>.` stripped)."""
        return self.metric.removeprefix(f"{step}.")


class StepInput(_Strict):
    """One entry of a step's `inputs:`: a needed step's result, by name (`_uses.<name>` in the job)."""

    from_: str = Field(alias="from", description="a step this one needs")
    use: Literal["best", "all"] = Field(
        default="best",
        description="best: the step's result (a sweep's chosen combination); all: every combination of a "
        "`matrix:` step, in combination order",
    )


class Step(_Strict):
    """One task of the ticket."""

    id: str = Field(description="unique within the ticket; lowercase letters, digits, - and _")
    kind: StepKind
    needs: list[str] = Field(default_factory=list, description="ids of steps that must succeed first")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="parameters of the job")
    queue: Queue | None = Field(default=None, description="defaults by kind: train/evaluate/infer on gpu")
    timeout: Duration = Field(default=3600.0, description="seconds, or e.g. 30m; an attempt past it fails")
    retries: int = Field(default=2, ge=0, le=20, description="extra attempts after a failure")
    shards: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_SHARDS,
        description="synthesize only: run as this many subtasks (jobs), each generating a contiguous range of "
        "the dataset's shard files, joined into the one manifest a single job would write; unset: implied by "
        f"the size (one per {AUTO_SHARD_EXAMPLES:,} examples, at most one per shard file and {AUTO_SHARDS_MAX}); "
        "1: one job",
    )
    matrix: dict[str, Any] | None = Field(
        default=None,
        description="train/evaluate/synthesize/diag: parameter name -> list of values; one subtask per "
        "combination, each with its values overlaid on `with`; the step's result is the best one (`select`)",
    )
    select: SweepSelect | None = Field(
        default=None, description="with matrix: the metric that picks the best combination, and max or min"
    )
    expect: list[Expectation] = Field(
        default_factory=list,
        description="checks on this step's own metrics, evaluated when it succeeds; a failed one fails the attempt",
    )
    probe: list[ProbeCheck] = Field(
        default_factory=list,
        description="checks on the step's inputs (needed steps' metrics, the core's components) before it is "
        "dispatched; a failed one blocks the step",
    )
    inputs: dict[str, StepInput] = Field(
        default_factory=dict,
        description="name -> {from: STEP, use: best|all}: a needed step's result for the job by name; "
        "`use: all` hands on every combination of a matrix step (params, metrics, outputs), not only the best",
    )
    cache: bool | None = Field(
        default=None,
        description="reuse a recorded success with the same key (default: yes, except diag, check and infer); "
        "false: always run",
    )
    gpu_memory: str | None = Field(
        default=None,
        description="GPU memory the step needs on each of its cards, e.g. 12G (a gpu step that declares none "
        "takes whole cards)",
    )
    gpus: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_STEP_GPUS,
        description="how many cards the step runs on (a gpu step: 1 unless it says; 0: none), all on one worker",
    )
    cpus: float | None = Field(default=None, gt=0, le=1024, description="CPUs the step needs on its worker")
    memory: str | None = Field(default=None, description="memory the step needs on its worker, e.g. 16G")

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_memory(cls, value: Any) -> Any:
        if value is not None:
            parse_memory(value)
            return str(value)
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if value is not None:
            parse_memory(value)
            return str(value)
        return value

    @model_validator(mode="after")
    def _gpu_memory_queue(self) -> Step:
        if self.gpu_memory is not None and self.effective_queue != "gpu":
            raise _located(
                ("gpu_memory",), f"gpu_memory: only a gpu step can ask for GPU memory (queue {self.effective_queue})"
            )
        if self.gpus and self.effective_queue != "gpu":
            raise _located(("gpus",), f"gpus: only a gpu step can ask for GPUs (queue {self.effective_queue})")
        if self.gpus == 0 and self.gpu_memory is not None:
            raise _located(("gpu_memory",), "gpu_memory: the step asks for gpus: 0 (no card to put it on)")
        return self

    @property
    def gpu_memory_bytes(self) -> int:
        return parse_memory(self.gpu_memory) if self.gpu_memory else 0

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory) if self.memory else 0

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not STEP_ID.fullmatch(value):
            raise ValueError(f"invalid step id {value!r}: use lowercase letters, digits, - and _{_non_ascii(value)}")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        return parse_duration(value)

    @property
    def effective_queue(self) -> Queue:
        return self.queue or DEFAULT_QUEUE[self.kind]

    @property
    def combinations(self) -> int:
        """How many subtasks the step's `matrix:` fans out into (0: no matrix; capped past MAX_COMBINATIONS)."""
        if not self.matrix:
            return 0
        n = 1
        for values in self.matrix.values():
            n *= len(values) if isinstance(values, list) else 1
            if n > MAX_COMBINATIONS:
                return MAX_COMBINATIONS + 1
        return n

    @property
    def shard_count(self) -> int:
        """How many shard subtasks the step runs as: its `shards:`, or the number its size implies."""
        return self.shards if self.shards is not None else implied_shards(self)

    @property
    def fan_out(self) -> int:
        """How many subtasks the step fans out into (0: it runs as one job)."""
        return self.combinations or (self.shard_count if self.shard_count > 1 else 0)


class Constraints(_Strict):
    """Limits that apply to every job of the ticket."""

    max_wall_minutes: float | None = Field(default=None, gt=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    network: Literal["deny", "allow"] = "deny"
    memory: str | None = Field(default=None, description="e.g. 8G; becomes MemoryMax= for background runs")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_memory(value)
        return value

    @property
    def memory_bytes(self) -> int | None:
        return parse_memory(self.memory) if self.memory else None


class MetricCheck(_StepMetric):
    """`<step>.<name> op value`, evaluated on the metrics a step reported."""


class RunCheck(_Strict):
    """A command (argv, no shell) that must exit 0; it runs as a `check` job."""

    run: list[str] = Field(min_length=1)
    timeout: Duration = 300.0

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        return parse_duration(value)


def _check_kind(value: Any) -> str:
    """`run:` checks are commands; everything else is read as a metric check (for precise errors)."""
    if isinstance(value, dict):
        return "run" if "run" in value else "metric"
    return "run" if isinstance(value, RunCheck) else "metric"


class CoreAfter(_Strict):
    """`after: {core: reasoner}`: wait until the abstract core has this component."""

    core: str


TicketAfter = Annotated[str, Field(pattern=TICKET_ID.pattern)]


def after_tickets(ticket: Ticket) -> list[str]:
    """The ticket ids a ticket waits for (`after:`)."""
    return [a for a in ticket.after if isinstance(a, str)]


AcceptanceCheck = Annotated[
    Annotated[MetricCheck, Tag("metric")] | Annotated[RunCheck, Tag("run")],
    Discriminator(_check_kind),
]


class Ticket(_Strict):
    """A goal with the steps to reach it and how to check it."""

    id: str = Field(description="TICKET-<n>; must match the file name")
    title: str = Field(min_length=1, max_length=200)
    goal: str = Field(min_length=1)
    owner: str | None = None
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    constraints: Constraints = Field(default_factory=Constraints)
    acceptance: list[AcceptanceCheck] = Field(default_factory=list)
    update: Literal["none", "adapter", "core"] = "none"
    approvers: list[str] | None = None
    expires: Duration | None = Field(default=None, description="how long a proposal stays open, e.g. 7d")
    milestone: str | None = Field(
        default=None, description="the plan milestone this ticket serves (set by `jbctl plan apply`), e.g. M2"
    )
    cache: bool = Field(default=True, description="false: no step of this ticket reuses or records a cached result")
    suite: bool = Field(
        default=True,
        description="update: core only: measure the candidate on the standing evaluation suite (a TICKET-suite-P-<n> "
        "filed with the proposal) and the core it becomes (TICKET-suite-v<N>); false: neither",
    )
    hold: bool = Field(default=False, description="arrive held: nothing is scheduled until `jbctl release`")
    priority: int = Field(
        default=0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description="higher runs first among tasks waiting for the same queue; equal keeps arrival order",
    )
    after: list[TicketAfter | CoreAfter] = Field(
        default_factory=list,
        description="wait until these tickets have completed (TICKET-2) or the core has a component ({core: reasoner})",
    )
    max_parallel: int | None = Field(default=None, ge=1, le=1000, description="at most this many jobs out at once")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not TICKET_ID.fullmatch(value):
            raise ValueError(f"invalid ticket id {value!r}: expected TICKET-<n>, e.g. TICKET-12{_non_ascii(value)}")
        return value

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("hold", mode="before")
    @classmethod
    def _hold(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, not {value!r}")
        return value

    @field_validator("priority", "max_parallel", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"expected a whole number, not {value!r}")
        return value

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, value: Any) -> Any:
        """`after: TICKET-2`, `after: {core: reasoner}` and lists of either; anything else is refused here
        with the accepted forms (pydantic's union error would list every member's complaint)."""
        items = value if isinstance(value, list) else [value]
        for n, item in enumerate(items):
            if isinstance(item, str) and TICKET_ID.fullmatch(item):
                continue
            if isinstance(item, dict) and set(item) == {"core"} and isinstance(item["core"], str):
                if not COMPONENT.fullmatch(item["core"]):
                    raise ValueError(f"invalid core component {item['core']!r}: e.g. reasoner, encoder")
                continue
            where = f" (item {n + 1})" if isinstance(value, list) else ""
            raise ValueError(
                f"{item!r}{where} is not a ticket id (TICKET-2) or {{core: COMPONENT}} (e.g. {{core: reasoner}})"
            )
        return items

    @field_validator("milestone")
    @classmethod
    def _milestone(cls, value: str | None) -> str | None:
        if value is not None and not MILESTONE_ID.fullmatch(value):
            raise ValueError(f"invalid milestone id {value!r}: e.g. M2 (letters, digits, - and _){_non_ascii(value)}")
        return value

    @model_validator(mode="after")
    def _graph(self) -> Ticket:
        edges = 0
        for n, step in enumerate(self.steps):
            edges += len(step.needs)
            if edges > MAX_NEEDS:
                raise _located(
                    ("steps", n, "needs"), f"more than {MAX_NEEDS:,} needs in all: a ticket's task graph is limited"
                )
        ids = [s.id for s in self.steps]
        seen: set[str] = set()
        for n, step in enumerate(self.steps):
            if step.id in seen:
                raise _located(("steps", n, "id"), f"duplicate step id {step.id!r}")
            seen.add(step.id)
        by_id = {s.id: s for s in self.steps}  # once: made per step, it cost a 200-step ticket 80,000 inserts
        for n, step in enumerate(self.steps):
            for k, need in enumerate(step.needs):
                if need not in seen:
                    hint = _did_you_mean(need, ids)
                    raise _located(("steps", n, "needs", k), f"needs unknown step {need!r}{hint}")
                if need == step.id:
                    raise _located(("steps", n, "needs", k), f"step {step.id!r} needs itself")
            _check_params(step, n)
            _check_step_checks(step, n, by_id)
            _check_shards(step, n)
            _check_matrix(step, n)
            _check_inputs(step, n, by_id)
        subtasks = 0
        for n, step in enumerate(self.steps):
            subtasks += step.fan_out
            if subtasks > MAX_SUBTASKS:
                message = (
                    f"more than {MAX_SUBTASKS} subtasks in all (shards and matrix combinations): "
                    "a ticket's fan-out is limited"
                )
                if step.shards is None and not step.matrix:
                    message += f" (this step's size implies {step.shard_count} shards: say `shards:` to run fewer)"
                raise _located(("steps", n, "matrix" if step.matrix else "shards"), message)
        cycle = _find_cycle({s.id: list(s.needs) for s in self.steps})
        if cycle:
            n = ids.index(cycle[0])
            raise _located(("steps", n, "needs"), "needs form a cycle: " + " -> ".join(cycle))
        for n, dep in enumerate(self.after):
            if dep == self.id:
                raise _located(("after", n), f"after: ticket {self.id} cannot wait for itself")
        for n, check in enumerate(self.acceptance):
            if isinstance(check, MetricCheck) and check.step not in seen:
                hint = _did_you_mean(check.step, ids)
                raise _located(("acceptance", n, "metric"), f"metric names unknown step {check.step!r}{hint}")
        return self

    def step(self, step_id: str) -> Step:
        return self.steps_by_id[step_id]

    @cached_property
    def steps_by_id(self) -> dict[str, Step]:
        """The steps by id, made on first use (the model is frozen: it never goes stale). The decider
        looks a step up for every report: a scan of a 200-step ticket's list each time."""
        return {s.id: s for s in self.steps}


class LocatedError(ValueError):
    """A model-level error that knows where in the document it belongs."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _located(loc: tuple[str | int, ...], message: str) -> LocatedError:
    return LocatedError(loc, message)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle in `graph` (node -> needs) as a closed path, or None. Iterative: a chain of
    MAX_STEPS steps must not hit Python's recursion limit."""
    state: dict[str, int] = {}
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack[-1]
            nexts = graph.get(node, [])
            if i == len(nexts):
                state[node] = 2
                stack.pop()
                continue
            stack[-1] = (node, i + 1)
            nxt = nexts[i]
            if state.get(nxt) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                state[nxt] = 1
                stack.append((nxt, 0))
    return None


# What a joined sweep adds to each metric of its combinations (daemon.decider.sweep_metrics).
SWEEP_AGGREGATES = ("_mean", "_std", "_min", "_max")


def _known_metric(kind: str, name: str, loc: tuple[str | int, ...], what: str, sweep: bool = False) -> None:
    """Refuse a metric a kind with a closed set of metrics never reports (with a hint); a sweep's
    (`sweep`) also reports each one's aggregates over its combinations (`count_mean`, ...)."""
    known = KIND_METRICS.get(kind)
    base = name
    if sweep:
        base = next((name[: -len(a)] for a in SWEEP_AGGREGATES if name.endswith(a) and name[: -len(a)]), name)
    if known is not None and base not in known:
        hint = _did_you_mean(name, list(known))
        raise _located(
            loc, f"{what} names metric {name!r}, which a {kind} step never reports{hint}; it reports {', '.join(known)}"
        )


def _check_step_checks(step: Step, n: int, steps: dict[str, Step]) -> None:
    """`expect:` reads the step's own metrics; `probe:` reads the steps it needs (or the core)."""
    for k, exp in enumerate(step.expect):
        if exp.metric is None:
            continue  # `output:`: what a job kind outputs is open (a diag's are whatever it reports)
        loc: tuple[str | int, ...] = ("steps", n, "expect", k, "metric")
        owner, dot, _ = exp.metric.rpartition(".")
        if dot and owner != step.id:
            raise _located(
                loc,
                f"expect checks this step's own metrics: write {exp.name!r} "
                f"(probe a needed step's metrics with `probe:`)",
            )
        _known_metric(step.kind, exp.name, loc, "expect", sweep=step.matrix is not None)
    for k, probe in enumerate(step.probe):
        if isinstance(probe, MetricProbe):
            loc = ("steps", n, "probe", k, "metric")
            if probe.step not in step.needs:
                where = "unknown step" if probe.step not in steps else "a step that is not in this step's needs"
                hint = _did_you_mean(probe.step, list(step.needs)) if probe.step not in steps else ""
                raise _located(loc, f"probe reads {where} {probe.step!r}{hint}: a probe checks this step's inputs")
            _known_metric(steps[probe.step].kind, probe.name, loc, "probe", sweep=steps[probe.step].matrix is not None)


def shard_files(step: Step) -> int:
    """How many shard files a synthesize step's dataset has (`count` over `shard_size`, rounded up)."""
    count = int(step.with_.get("count") or 0)
    size = int(step.with_.get("shard_size") or DEFAULT_SHARD_SIZE)
    return -(-count // size)


def implied_shards(step: Step) -> int:
    """The subtasks a synthesize step without `shards:` runs as (1: one job): one per
    AUTO_SHARD_EXAMPLES examples, rounded up, at most one per shard file and AUTO_SHARDS_MAX. A sweep
    (`matrix:`) never fans out again, and a step whose size is not plain integers runs as one job
    (its parameters are checked elsewhere)."""
    count, size = step.with_.get("count"), step.with_.get("shard_size", DEFAULT_SHARD_SIZE)
    if step.kind != "synthesize" or step.matrix is not None:
        return 1
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (count, size)):
        return 1
    return max(1, min(-(-int(count or 0) // AUTO_SHARD_EXAMPLES), shard_files(step), AUTO_SHARDS_MAX))


def _check_shards(step: Step, n: int) -> None:
    """`shards:` splits a synthesize step's shard files among subtasks: the files must be enough."""
    if step.shards is None or step.shards == 1:
        return
    if step.kind != "synthesize":
        raise _located(("steps", n, "shards"), f"shards: only a synthesize step fans out into shards, not {step.kind}")
    for key, default in (("count", None), ("shard_size", DEFAULT_SHARD_SIZE)):
        value = step.with_.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            where = ("steps", n, "with", key) if key in step.with_ else ("steps", n, "with")
            raise _located(where, f"shards: {step.shards} needs an integer `{key}` >= 1 in `with` (got {value!r})")
    files = shard_files(step)
    if step.shards > files:
        count, size = step.with_["count"], step.with_.get("shard_size", DEFAULT_SHARD_SIZE)
        raise _located(
            ("steps", n, "shards"),
            f"shards: {step.shards} but count {count} at shard_size {size} makes only {files} shard file(s); "
            f"set shard_size to at most {max(1, count // step.shards)} or use fewer shards",
        )


INPUT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _check_inputs(step: Step, n: int, steps: dict[str, Step]) -> None:
    """`inputs:` names needed steps' results; `use: all` only of a step that has combinations."""
    for name, ref in step.inputs.items():
        loc: tuple[str | int, ...] = ("steps", n, "inputs", name)
        if not INPUT_NAME.match(name):
            raise _located(loc, f"inputs: {name!r} must be a name of lowercase letters, digits and _ (a letter first)")
        if name in step.with_:
            raise _located(loc, f"inputs: {name!r} is also a `with:` parameter; pick another name")
        if ref.from_ not in step.needs:
            where = "unknown step" if ref.from_ not in steps else "a step that is not in this step's needs"
            hint = _did_you_mean(ref.from_, list(step.needs)) if ref.from_ not in steps else ""
            raise _located((*loc, "from"), f"inputs: {name} reads {where} {ref.from_!r}{hint}")
        if ref.use == "all" and not steps[ref.from_].matrix:
            raise _located(
                (*loc, "use"),
                f"inputs: {name}: use: all takes every combination of a `matrix:` step; {ref.from_!r} has none "
                "(use: best, or leave `use` out)",
            )


def _check_matrix(step: Step, n: int) -> None:
    """`matrix:` values are parameters like `with:`'s (same rules); `select:` picks among them."""
    where: tuple[str | int, ...] = ("steps", n)
    if step.matrix is None:
        if step.select is not None:
            raise _located((*where, "select"), "select: only a step with a `matrix:` selects a combination")
        return
    if step.kind not in MATRIX_KINDS:
        only = ", ".join(MATRIX_KINDS)
        raise _located((*where, "matrix"), f"matrix: a {step.kind} step cannot sweep (only {only})")
    if step.shards is not None and step.shards > 1:
        message = "matrix: cannot be combined with shards (each combination would fan out again)"
        raise _located((*where, "matrix"), message)
    if not step.matrix:
        raise _located((*where, "matrix"), "matrix: needs at least one parameter (name: [values, ...])")
    for key, values in step.matrix.items():
        loc: tuple[str | int, ...] = (*where, "matrix", key)
        if key.startswith("_") or not key:
            raise _located(loc, f"matrix: {key!r} is reserved (parameters starting with _ are the orchestrator's)")
        if not isinstance(values, list):
            raise _located(loc, f"matrix: {key} must be a list of values, e.g. [1, 2] (got {type(values).__name__})")
        if not values:
            raise _located(loc, f"matrix: {key} is an empty list: give at least one value")
        for k, value in enumerate(values):
            _check_strings(value, (*loc, k))
            if key in DATA_KEYS and value is not None:
                _check_ref(step, key, value, (*loc, k))
    if step.combinations > MAX_COMBINATIONS:
        raise _located((*where, "matrix"), f"matrix: more than {MAX_COMBINATIONS} combinations: sweep fewer values")
    if step.select is None:
        if step.combinations > 1:
            raise _located(
                (*where, "matrix"),
                f"matrix: {step.combinations} combinations need "
                "`select: {metric: NAME, mode: max|min}` to name the best",
            )
        return
    loc = (*where, "select", "metric")
    name = step.select.name(step.id)
    if not name or "." in name:
        message = f"select reads this step's own metrics: write NAME or {step.id}.NAME (got {step.select.metric!r})"
        raise _located(loc, message)
    _known_metric(step.kind, name, loc, "select")


def _check_strings(value: Any, loc: tuple[str | int, ...]) -> None:
    """Synthetic-only and no-escape rules for every string in a parameter value."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_strings(item, (*loc, key))
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_strings(item, (*loc, k))
    elif isinstance(value, str):
        if URL.match(value):
            raise _located(loc, f"{value!r} is a URL: Jetbox trains on synthetic data only")
        if value.startswith(("/", "~")) or ".." in Path(value).parts or value.startswith("\\"):
            raise _located(loc, f"{value!r} is a path outside the workspace (absolute or with ..)")


def _check_params(step: Step, n: int) -> None:
    """Synthetic-only and no-escape rules for every string in `with`."""
    _check_strings(step.with_, ("steps", n, "with"))
    for key in DATA_KEYS:
        ref = step.with_.get(key)
        if ref is not None:
            _check_ref(step, key, ref, ("steps", n, "with", key))


def _check_ref(step: Step, key: str, ref: Any, loc: tuple[str | int, ...]) -> None:
    """A data parameter names a step this one needs, or an artifact."""
    if not isinstance(ref, str):
        raise _located(loc, f"{key} must name a step id or an artifact (sha256:...)")
    if ARTIFACT_REF.match(ref):
        return
    if ref not in step.needs:
        if "/" in ref or "." in ref:
            raise _located(loc, f"{ref!r} looks like a file: {key} must name a synthesize step or sha256:<id>")
        raise _located(loc, f"{key} refers to step {ref!r}, which is not in this step's needs")


# ---------------------------------------------------------------------------------------------
# Loading with positions


@dataclass(frozen=True)
class TicketError:
    """One problem with a ticket file, positioned (1-based line and column)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class TicketInvalid(Exception):
    """Raised by `parse_ticket` with every error found."""

    def __init__(self, errors: list[TicketError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class LimitExceeded(Exception):
    """The document is over one of the MAX_* limits; `line` and `col` are 1-based."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(message)
        self.message, self.line, self.col = message, line, col


def _bounded_composer() -> Any:
    """ruamel's composer, stopping at MAX_DEPTH and at MAX_NODES values counted after alias expansion."""
    from ruamel.yaml.composer import Composer  # ruamel: only when a YAML file is parsed
    from ruamel.yaml.events import AliasEvent
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    def expanded(node: Any, sizes: dict[int, int]) -> int:
        """Values in `node` with every alias inside it expanded (memoised, so linear in the nodes)."""
        todo = [node]
        while todo:
            current = todo[-1]
            if id(current) in sizes:
                todo.pop()
                continue
            if isinstance(current, SequenceNode):
                children = list(current.value)
            elif isinstance(current, MappingNode):
                children = [part for pair in current.value for part in pair]
            else:
                children = []
            missing = [c for c in children if id(c) not in sizes]
            if missing:
                todo.extend(missing)
                continue
            sizes[id(current)] = 1 + sum(sizes[id(c)] for c in children)
            todo.pop()
        return sizes[id(node)]

    class BoundedComposer(Composer):  # type: ignore[misc]
        def compose_document(self) -> Any:
            self.jb_total = 0
            self.jb_open: list[str] = []  # anchors whose node is being composed
            self.jb_sizes: dict[int, int] = {}
            return super().compose_document()

        def _count(self, size: int, mark: Any, what: str) -> None:
            self.jb_total += size
            if self.jb_total > MAX_NODES:
                raise LimitExceeded(
                    f"{what}: a ticket may hold at most {MAX_NODES:,} values (keys, items and scalars, "
                    "aliases counted at their expanded size)",
                    mark.line + 1,
                    mark.column + 1,
                )

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.parser.peek_event()
            mark = event.start_mark
            if isinstance(event, AliasEvent):
                name = event.anchor
                if name in self.jb_open:
                    raise LimitExceeded(
                        f"alias *{name} is used inside the value it names (a recursive structure)",
                        mark.line + 1,
                        mark.column + 1,
                    )
                node = super().compose_node(parent, index)
                size = expanded(node, self.jb_sizes)
                self._count(size, mark, f"alias *{name} expands to {size:,} values ({self.jb_total + size:,} so far)")
                return node
            if self.depth >= MAX_DEPTH:
                raise LimitExceeded(
                    f"nested more than {MAX_DEPTH} levels deep: a ticket's structure is limited",
                    mark.line + 1,
                    mark.column + 1,
                )
            self._count(1, mark, "too many values")
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                self.jb_open.append(anchor)
            try:
                return super().compose_node(parent, index)
            finally:
                if anchor is not None:
                    self.jb_open.pop()

    return BoundedComposer


def _yaml_load(text: str) -> Any:
    from ruamel.yaml import YAML  # ruamel: only when a YAML file is parsed

    yaml = YAML(typ="rt", pure=True)
    yaml.allow_duplicate_keys = False
    yaml.Composer = _bounded_composer()
    return yaml.load(text)


def _position(doc: Any, loc: tuple[str | int, ...]) -> tuple[int, int]:
    """Best (line, col), 1-based, for `loc` in a ruamel round-trip document."""
    line, col = 1, 1
    node = doc
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(node, dict) and part in node:
                if lc is not None:
                    kl, kc = lc.key(part)
                    line, col = kl + 1, kc + 1
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                if lc is not None:
                    il, ic = lc.item(part)
                    line, col = il + 1, ic + 1
                node = node[part]
            else:
                break
        except (KeyError, TypeError, AttributeError):
            break
    return line, col


def _models_at(loc: tuple[str | int, ...], root: type[BaseModel] | None = None) -> list[type[BaseModel]]:
    """The pydantic models that may own the field at `loc` (several inside a union), for "did you
    mean" hints."""
    models: list[type[BaseModel]] = [root or Ticket]
    for part in loc:
        if isinstance(part, int):
            continue
        owner = next((m for m in models if part in _field_names(m)), None)
        if owner is None:
            return models
        field = next(f for name, f in owner.model_fields.items() if part in (name, f.alias))
        models = _models_in(field.annotation)
        if not models:
            return []
    return models


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (`X`, `X | None`, `list[X]`, `Annotated[X | Y, ...]`)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    found: list[type[BaseModel]] = []
    for arg in getattr(ann, "__args__", ()) or ():
        found += [m for m in _models_in(arg) if m not in found]
    origin = getattr(ann, "__origin__", None)
    if not found and origin is not None and origin is not ann:
        found = _models_in(origin)
    return found


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


# The tags pydantic puts in an error's location for a discriminated list item, by the list's key
# (tickets' acceptance checks; a plan's deliverables and tickets).
_UNION_TAGS: dict[str, tuple[str, ...]] = {
    "acceptance": ("metric", "run"),
    "probe": ("metric", "core"),
    "deliverables": ("acceptance", "metric", "artifact"),
    "tickets": ("file", "inline"),
}


def _message(err: dict[str, Any], doc: Any, root: type[BaseModel] | None = None) -> tuple[tuple[str | int, ...], str]:
    loc = tuple(err.get("loc", ()))
    ctx_error = (err.get("ctx") or {}).get("error")
    # Drop pydantic's union tags ('metric', 'run' for acceptance checks, ...) from the location.
    loc = tuple(
        p
        for n, p in enumerate(loc)
        if not (n >= 2 and isinstance(loc[n - 1], int) and p in _UNION_TAGS.get(str(loc[n - 2]), ()))
    )
    if isinstance(ctx_error, LocatedError):  # raised by a model at `loc` (a ticket inside a plan, say)
        return (*loc, *ctx_error.loc), ctx_error.message
    where = ".".join(str(p) for p in loc) or (root.__name__.lower() if root else "ticket")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        names = [n for m in _models_at(loc[:-1], root) for n in _field_names(m)]
        hint = _did_you_mean(str(loc[-1]), names)
        return loc, f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return loc[:-1], f"missing required key {loc[-1]!r}"
    if kind == "too_long" and loc == ("steps",):
        return loc, f"{where}: a ticket may have at most {MAX_STEPS} steps"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return loc, f"{where}: {msg}"


def load_yaml_document(
    data: bytes, filename: str, what: str = "ticket", max_bytes: int = MAX_TICKET_BYTES, needs: str = ""
) -> tuple[Any, Any]:
    """Bounded YAML loading shared by tickets and plans: the ruamel document (for positions) and its
    plain JSON value. Raises TicketInvalid with one positioned error."""

    def fail(message: str, line: int = 1, col: int = 1) -> TicketInvalid:
        return TicketInvalid([TicketError(filename, line, col, _clip(message))])

    if len(data) > max_bytes:
        raise fail(f"file is {len(data):,} bytes; a {what} may be at most {max_bytes:,}")
    if b"\x00" in data:
        raise fail(f"binary data (NUL bytes): a {what} is a YAML text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start}): a {what} is a YAML text file") from None
    if not text.strip():
        raise fail(f"empty file: a {what} needs at least {needs}" if needs else "empty file")
    try:
        doc = _yaml_load(text)
    except LimitExceeded as exc:
        raise fail(exc.message, exc.line, exc.col) from None
    except RecursionError:  # not expected within MAX_DEPTH; a clear refusal all the same
        raise fail(f"nested too deeply: a {what}'s structure is limited to {MAX_DEPTH} levels") from None
    except Exception as exc:  # ruamel raises several unrelated types
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if mark is not None:
            raise fail(f"not valid YAML: {problem}", mark.line + 1, mark.column + 1) from None
        raise fail(f"not valid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise fail(f"a {what} must be a mapping of keys ({needs or '...'}), not a {type(doc).__name__}")
    try:
        plain = _plain(doc)
    except LocatedError as exc:
        raise fail(exc.message, *_position(doc, exc.loc)) from None
    return doc, plain


def validate_document(model: type[_M], doc: Any, plain: Any, filename: str) -> _M:
    """`model` validated from a loaded document; every error positioned as FILE:LINE:COL."""
    try:
        return model.model_validate(plain)
    except ValidationError as exc:
        errors = []
        found = exc.errors()
        for err in found[:MAX_ERRORS]:
            loc, message = _message(dict(err), doc, model)
            line, col = _position(doc, loc)
            errors.append(TicketError(filename, line, col, _clip(message)))
        if len(found) > MAX_ERRORS:
            errors.append(TicketError(filename, 1, 1, f"... and {len(found) - MAX_ERRORS:,} more errors"))
        raise TicketInvalid(errors) from None


def parse_ticket(data: bytes, filename: str = "<ticket>") -> Ticket:
    """Validate a ticket file's bytes; raises TicketInvalid listing every positioned error."""
    doc, plain = load_yaml_document(data, filename, "ticket", MAX_TICKET_BYTES, "id, title, goal and steps")
    ticket = validate_document(Ticket, doc, plain, filename)
    stem = Path(filename).name.rsplit(".", 1)[0]
    if filename != "<ticket>" and stem != ticket.id:
        line, col = _position(doc, ("id",))
        message = f"id {ticket.id!r} does not match the file name {Path(filename).name!r}"
        raise TicketInvalid([TicketError(filename, line, col, _clip(message))])
    return ticket


def key_line(data: bytes, key: str) -> int:
    """The 1-based line of a top-level `key:` in a ticket's bytes (1 when not found): for errors the
    decider finds later, such as an `after:` cycle through other tickets."""
    match = re.search(rb"(?m)^" + re.escape(key.encode()) + rb"\s*:", data)
    return data.count(b"\n", 0, match.start()) + 1 if match else 1


def _clip(message: str) -> str:
    """Error messages quote values; a hostile value must not make the note or the event huge."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 20] + f"... ({len(message):,} chars)"


# C0 and C1 controls (tab and newline allowed) and the bidirectional overrides and isolates that
# make text display differently from what it is ("Trojan Source"): titles and ids reach terminals.
_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _non_ascii(value: str) -> str:
    """A hint naming the first non-ASCII character (a confusable such as a Cyrillic letter), or ''."""
    for ch in value:
        if ord(ch) > 127:
            return f" (it contains {unicodedata.name(ch, 'an unnamed character')}, U+{ord(ch):04X}; ids are ASCII)"
    return ""


def _plain(value: Any, loc: tuple[str | int, ...] = ()) -> Any:
    """ruamel's round-trip values as plain JSON types (pydantic wants them, and events are JSON),
    refusing what has no honest JSON form: tagged scalars, timestamps, binary, non-finite floats,
    integers beyond 64 bits, complex or over-long keys and control characters. Raises LocatedError."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key is not None and not isinstance(key, str | int | float):
                raise LocatedError(loc, f"a key must be a plain word, not a {type(key).__name__}")
            name = str(key)
            if len(name) > MAX_KEY_CHARS:
                raise LocatedError(loc, f"a key of {len(name):,} characters: keys may have at most {MAX_KEY_CHARS}")
            _text(name, loc)
            part: Any = key  # the document's own key, so that _position finds it
            out[name] = _plain(item, (*loc, part))
        return out
    if isinstance(value, list):
        return [_plain(v, (*loc, n)) for n, v in enumerate(value)]
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise LocatedError(loc, f"an integer of {len(str(abs(value)))} digits: integers must fit in 64 bits")
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise LocatedError(loc, f"{float(value)} is not a finite number")
        return float(value)
    if isinstance(value, str):
        _text(value, loc)
        return str(value)
    if value is None:
        return None
    raise LocatedError(
        loc,
        f"unsupported YAML value ({type(value).__name__}): a ticket holds mappings, lists, strings, numbers "
        "and booleans (quote dates and tagged values)",
    )


def _text(value: str, loc: tuple[str | int, ...]) -> None:
    bad = _FORBIDDEN_CHARS.search(value)
    if bad:
        raise LocatedError(loc, f"control character U+{ord(bad.group()):04X} in text: tickets are plain text")


def load_ticket(path: Path) -> Ticket:
    """Read and validate a ticket file; raises TicketInvalid."""
    return parse_ticket(read_bounded(Path(path), MAX_TICKET_BYTES, "ticket"), str(path))


def read_bounded(path: Path, max_bytes: int, what: str = "ticket") -> bytes:
    """At most `max_bytes + 1` bytes of a regular file; raises TicketInvalid (a FIFO must not hang)."""
    try:
        # Non-blocking, and only regular files: `jbctl validate` on a FIFO must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                message = f"not a regular file: a {what} is a YAML text file"
                raise TicketInvalid([TicketError(str(path), 1, 1, message)])
            with os.fdopen(os.dup(fd), "rb") as fh:
                return fh.read(max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TicketInvalid([TicketError(str(path), 1, 1, f"cannot read: {exc.strerror}")]) from None


def ticket_json_schema() -> dict[str, Any]:
    """The JSON Schema editors use to complete and check ticket files."""
    schema = Ticket.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://jetbox.local/ticket.schema.json"
    return schema
