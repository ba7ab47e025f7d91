"""The ticket: a researcher's goal, its steps (a DAG of tasks), constraints and acceptance checks.

`load_ticket` turns a file's bytes into a validated `Ticket` or a list of `TicketError`s, each
pointing at a line and column of the YAML source, as `FILE:LINE:COL: message`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_TICKET_BYTES = 1_000_000
TICKET_ID = re.compile(r"^TICKET-[A-Za-z0-9][A-Za-z0-9_-]*$")
STEP_ID = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
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
# Parameters whose value names data: they must point at a step this one needs, or an artifact id.
DATA_KEYS = ("data", "dataset", "train_data", "test_data", "checkpoint", "encoder")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


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


def parse_memory(value: Any) -> int:
    """Bytes from `512M`, `8G`, `8GiB` or a plain number of bytes."""
    match = _MEMORY.match(str(value))
    if not match or isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}: expected e.g. 512M or 8G")
    unit = (match.group(2) or "B").upper()[0]
    factor = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    size = int(float(match.group(1)) * factor)
    if size <= 0:
        raise ValueError("memory size must be positive")
    return size


Duration = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Step(_Strict):
    """One task of the ticket."""

    id: str = Field(description="unique within the ticket; lowercase letters, digits, - and _")
    kind: StepKind
    needs: list[str] = Field(default_factory=list, description="ids of steps that must succeed first")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="parameters of the job")
    queue: Queue | None = Field(default=None, description="defaults by kind: train/evaluate/infer on gpu")
    timeout: Duration = Field(default=3600.0, description="seconds, or e.g. 30m; an attempt past it fails")
    retries: int = Field(default=2, ge=0, le=20, description="extra attempts after a failure")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not STEP_ID.match(value):
            raise ValueError(f"invalid step id {value!r}: use lowercase letters, digits, - and _")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        return parse_duration(value)

    @property
    def effective_queue(self) -> Queue:
        return self.queue or DEFAULT_QUEUE[self.kind]


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


class MetricCheck(_Strict):
    """`<step>.<name> op value`, evaluated on the metrics a step reported."""

    metric: str
    op: Literal[">=", "<=", ">", "<", "==", "!="]
    value: float

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        step, _, name = value.partition(".")
        if not step or not name:
            raise ValueError(f"metric {value!r} must be written <step>.<name>, e.g. eval.accuracy")
        return value

    @property
    def step(self) -> str:
        return self.metric.partition(".")[0]

    @property
    def name(self) -> str:
        return self.metric.partition(".")[2]

    def holds(self, observed: float) -> bool:
        """Whether `observed` satisfies the check."""
        return {
            ">=": observed >= self.value,
            "<=": observed <= self.value,
            ">": observed > self.value,
            "<": observed < self.value,
            "==": observed == self.value,
            "!=": observed != self.value,
        }[self.op]


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
    steps: list[Step] = Field(min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    acceptance: list[AcceptanceCheck] = Field(default_factory=list)
    update: Literal["none", "adapter", "core"] = "none"
    approvers: list[str] | None = None
    expires: Duration | None = Field(default=None, description="how long a proposal stays open, e.g. 7d")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not TICKET_ID.match(value):
            raise ValueError(f"invalid ticket id {value!r}: expected TICKET-<n>, e.g. TICKET-12")
        return value

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _graph(self) -> Ticket:
        ids = [s.id for s in self.steps]
        seen: set[str] = set()
        for n, step in enumerate(self.steps):
            if step.id in seen:
                raise _located(("steps", n, "id"), f"duplicate step id {step.id!r}")
            seen.add(step.id)
        for n, step in enumerate(self.steps):
            for k, need in enumerate(step.needs):
                if need not in seen:
                    hint = _did_you_mean(need, ids)
                    raise _located(("steps", n, "needs", k), f"needs unknown step {need!r}{hint}")
                if need == step.id:
                    raise _located(("steps", n, "needs", k), f"step {step.id!r} needs itself")
            _check_params(step, n)
        cycle = _find_cycle({s.id: list(s.needs) for s in self.steps})
        if cycle:
            n = ids.index(cycle[0])
            raise _located(("steps", n, "needs"), "needs form a cycle: " + " -> ".join(cycle))
        for n, check in enumerate(self.acceptance):
            if isinstance(check, MetricCheck) and check.step not in seen:
                hint = _did_you_mean(check.step, ids)
                raise _located(("acceptance", n, "metric"), f"metric names unknown step {check.step!r}{hint}")
        return self

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)


class LocatedError(ValueError):
    """A model-level error that knows where in the document it belongs."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _located(loc: tuple[str | int, ...], message: str) -> LocatedError:
    return LocatedError(loc, message)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle in `graph` (node -> needs) as a closed path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def _check_params(step: Step, n: int) -> None:
    """Synthetic-only and no-escape rules for every string in `with`."""

    def walk(value: Any, loc: tuple[str | int, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for k, item in enumerate(value):
                walk(item, (*loc, k))
        elif isinstance(value, str):
            if URL.match(value):
                raise _located(loc, f"{value!r} is a URL: Jetbox trains on synthetic data only")
            if value.startswith(("/", "~")) or ".." in Path(value).parts or value.startswith("\\"):
                raise _located(loc, f"{value!r} is a path outside the workspace (absolute or with ..)")

    walk(step.with_, ("steps", n, "with"))
    for key in DATA_KEYS:
        ref = step.with_.get(key)
        if ref is None:
            continue
        loc: tuple[str | int, ...] = ("steps", n, "with", key)
        if not isinstance(ref, str):
            raise _located(loc, f"{key} must name a step id or an artifact (sha256:...)")
        if ARTIFACT_REF.match(ref):
            continue
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


def _yaml_load(text: str) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt", pure=True)
    yaml.allow_duplicate_keys = False
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


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for "did you mean" hints)."""
    model: type[BaseModel] | None = Ticket
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        model = next(
            (c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)),
            None,
        )
    return model


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _message(err: dict[str, Any], doc: Any) -> tuple[tuple[str | int, ...], str]:
    loc = tuple(err.get("loc", ()))
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, LocatedError):
        return ctx_error.loc, ctx_error.message
    # Drop pydantic's union tags ('metric', 'run' for acceptance checks) from the location.
    loc = tuple(p for n, p in enumerate(loc) if not (n == 2 and loc[0] == "acceptance" and p in ("metric", "run")))
    where = ".".join(str(p) for p in loc) or "ticket"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        hint = _did_you_mean(str(loc[-1]), _field_names(owner)) if owner else ""
        return loc, f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return loc[:-1], f"missing required key {loc[-1]!r}"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return loc, f"{where}: {msg}"


def parse_ticket(data: bytes, filename: str = "<ticket>") -> Ticket:
    """Validate a ticket file's bytes; raises TicketInvalid listing every positioned error."""

    def fail(message: str, line: int = 1, col: int = 1) -> TicketInvalid:
        return TicketInvalid([TicketError(filename, line, col, message)])

    if len(data) > MAX_TICKET_BYTES:
        raise fail(f"file is {len(data):,} bytes; a ticket may be at most {MAX_TICKET_BYTES:,}")
    if b"\x00" in data:
        raise fail("binary data (NUL bytes): a ticket is a YAML text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start}): a ticket is a YAML text file") from None
    if not text.strip():
        raise fail("empty file: a ticket needs at least id, title, goal and steps")
    try:
        doc = _yaml_load(text)
    except Exception as exc:  # ruamel raises several unrelated types
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if mark is not None:
            raise fail(f"not valid YAML: {problem}", mark.line + 1, mark.column + 1) from None
        raise fail(f"not valid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise fail(f"a ticket must be a mapping of keys (id, title, ...), not a {type(doc).__name__}")
    try:
        ticket = Ticket.model_validate(_plain(doc))
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc, message = _message(dict(err), doc)
            line, col = _position(doc, loc)
            errors.append(TicketError(filename, line, col, message))
        raise TicketInvalid(errors) from None
    stem = Path(filename).name.rsplit(".", 1)[0]
    if filename != "<ticket>" and stem != ticket.id:
        line, col = _position(doc, ("id",))
        raise fail(f"id {ticket.id!r} does not match the file name {Path(filename).name!r}", line, col)
    return ticket


def _plain(value: Any) -> Any:
    """ruamel's commented containers to plain dicts and lists (pydantic wants plain types)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "__float__") and type(value).__name__ == "ScalarFloat":
        return float(value)
    if type(value).__name__ in {"ScalarInt", "HexInt", "OctalInt", "BinaryInt"}:
        return int(value)
    if type(value).__name__ in {"ScalarBoolean"}:
        return bool(value)
    if isinstance(value, str):
        return str(value)
    return value


def load_ticket(path: Path) -> Ticket:
    """Read and validate a ticket file; raises TicketInvalid."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TICKET_BYTES + 1)
    except OSError as exc:
        raise TicketInvalid([TicketError(str(path), 1, 1, f"cannot read: {exc.strerror}")]) from None
    return parse_ticket(data, str(path))


def ticket_json_schema() -> dict[str, Any]:
    """The JSON Schema editors use to complete and check ticket files."""
    schema = Ticket.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://jetbox.local/ticket.schema.json"
    return schema
