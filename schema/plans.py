"""The plan file: milestones, each with a goal, the deliverables that say it is done and the tickets
that serve them (inline, or by file).

Loaded with the tickets' bounded YAML loader and positioned errors (`FILE:LINE:COL: message`);
`jbctl plan apply` turns it into ticket files and `MilestonePlanned` events (docs/PLANS.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from schema.ticket import (
    MAX_TICKET_BYTES,
    MILESTONE_ID,
    TICKET_ID,
    LocatedError,
    MetricCheck,
    Ticket,
    TicketError,
    TicketInvalid,
    _did_you_mean,
    _position,
    _Strict,
    load_yaml_document,
    parse_ticket,
    read_bounded,
    validate_document,
)

MAX_PLAN_BYTES = 256 * 1024  # a plan may hold several inline tickets
MAX_MILESTONES = 50
MAX_DELIVERABLES = 100  # per milestone
PLAN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class _Deliverable(_Strict):
    name: str = Field(min_length=1, max_length=200, description="what is delivered, as the checklist shows it")


class AcceptanceDeliverable(_Deliverable):
    """The ticket's acceptance checks passed (AcceptanceEvaluated with passed: true)."""

    acceptance: str = Field(description="a ticket of this plan, e.g. TICKET-5")


class MetricDeliverable(_Deliverable):
    """A metric a ticket's step recorded meets a threshold: `ticket` + `<step>.<name> op value`."""

    ticket: str
    metric: str = Field(description="<step>.<name>, as in a ticket's acceptance")
    op: Literal[">=", "<=", ">", "<", "==", "!="]
    value: float

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        return MetricCheck._metric(value)  # the same rule and message as acceptance checks

    @property
    def check(self) -> MetricCheck:
        return MetricCheck(metric=self.metric, op=self.op, value=self.value)


class ArtifactDeliverable(_Deliverable):
    """An artifact recorded by a ticket's step (of a given kind, if named) exists in the log."""

    ticket: str
    artifact: str = Field(description="the step that records it")
    kind: str | None = Field(default=None, description="e.g. dataset, checkpoint; any kind when left out")


# The kinds a deliverable may be, by the key that names it. A new kind (the core's standing
# evaluation suite, `suite:`) adds a model here and an evaluator in schema/milestones.py.
DELIVERABLE_KEYS = {"acceptance": "acceptance", "metric": "metric", "artifact": "artifact"}


def _deliverable_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((kind for key, kind in DELIVERABLE_KEYS.items() if key in value), None)
    kinds: dict[type, str] = {
        AcceptanceDeliverable: "acceptance",
        MetricDeliverable: "metric",
        ArtifactDeliverable: "artifact",
    }
    return kinds.get(type(value))


Deliverable = Annotated[
    Annotated[AcceptanceDeliverable, Tag("acceptance")]
    | Annotated[MetricDeliverable, Tag("metric")]
    | Annotated[ArtifactDeliverable, Tag("artifact")],
    Discriminator(
        _deliverable_kind,
        custom_error_type="deliverable_kind",
        custom_error_message="a deliverable needs one of the keys acceptance, metric or artifact",
    ),
]


class TicketFile(_Strict):
    """A ticket kept in its own file, relative to the plan file's folder."""

    file: str

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        if value.startswith(("/", "~", "\\")) or ".." in Path(value).parts:
            raise ValueError(f"{value!r}: a ticket file must be a relative path inside the plan's folder")
        if not value.endswith((".yaml", ".yml")):
            raise ValueError(f"{value!r}: a ticket file is a .yaml file")
        return value


def _ticket_entry_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "file" if "file" in value and "id" not in value else "inline"
    return "file" if isinstance(value, TicketFile) else "inline"


TicketEntry = Annotated[
    Annotated[TicketFile, Tag("file")] | Annotated[Ticket, Tag("inline")],
    Discriminator(_ticket_entry_kind),
]


class Milestone(_Strict):
    id: str = Field(description="e.g. M2; unique in the plan")
    title: str = Field(min_length=1, max_length=200)
    goal: str = Field(min_length=1)
    deliverables: list[Deliverable] = Field(min_length=1, max_length=MAX_DELIVERABLES)
    tickets: list[TicketEntry] = Field(default_factory=list, description="inline tickets or {file: TICKET-n.yaml}")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not MILESTONE_ID.fullmatch(value):
            raise ValueError(f"invalid milestone id {value!r}: e.g. M2 (letters, digits, - and _)")
        return value


class Plan(_Strict):
    """A project as milestones."""

    plan: str = Field(description="the plan's name: lowercase letters, digits, - and _")
    title: str = Field(min_length=1, max_length=200)
    milestones: list[Milestone] = Field(min_length=1, max_length=MAX_MILESTONES)

    @field_validator("plan")
    @classmethod
    def _name(cls, value: str) -> str:
        if not PLAN_NAME.fullmatch(value):
            raise ValueError(f"invalid plan name {value!r}: use lowercase letters, digits, - and _")
        return value

    @model_validator(mode="after")
    def _unique(self) -> Plan:
        seen: set[str] = set()
        for n, milestone in enumerate(self.milestones):
            if milestone.id in seen:
                raise LocatedError(("milestones", n, "id"), f"duplicate milestone id {milestone.id!r}")
            seen.add(milestone.id)
        return self


@dataclass(frozen=True)
class PlannedTicket:
    """A ticket of the plan, resolved: where it came from and the bytes `plan apply` writes."""

    ticket: Ticket
    milestone: str
    source: str  # the plan file (inline) or the ticket file
    data: bytes


@dataclass(frozen=True)
class LoadedPlan:
    plan: Plan
    path: str
    tickets: list[PlannedTicket]

    def milestone_spec(self, milestone: Milestone) -> dict[str, Any]:
        """What MilestonePlanned records: the milestone with its tickets as ids (their specs are in
        their own TicketSubmitted events)."""
        spec = milestone.model_dump(mode="json", by_alias=True, exclude={"tickets"})
        spec["tickets"] = [t.ticket.id for t in self.tickets if t.milestone == milestone.id]
        return spec


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ticket_bytes(ticket: Ticket, original: bytes | None, milestone: str) -> bytes:
    """The ticket file `plan apply` writes: the original file with `milestone:` added (so its
    comments and layout survive), or, for an inline ticket, its spec as YAML-compatible JSON."""
    if original is not None:
        if ticket.milestone == milestone:
            return original
        text = original.decode()
        out = (text if text.endswith("\n") else text + "\n") + f"milestone: {milestone}\n"
        try:  # a flow-style document cannot take an appended key: fall back to the spec
            if parse_ticket(out.encode()).milestone == milestone:
                return out.encode()
        except TicketInvalid:
            pass
    spec = ticket.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    spec["milestone"] = milestone
    header = "# written by `jbctl plan apply`: edit the plan, not this file\n"
    return (header + json.dumps(spec, indent=2) + "\n").encode()


def parse_plan(data: bytes, filename: str = "<plan>", folder: Path | None = None) -> LoadedPlan:
    """Validate a plan file's bytes and the ticket files it names (relative to `folder`); raises
    TicketInvalid with every error as FILE:LINE:COL (a ticket file's own errors name that file)."""
    doc, plain = load_yaml_document(data, filename, "plan", MAX_PLAN_BYTES, "plan, title and milestones")
    plan = validate_document(Plan, doc, plain, filename)
    errors: list[TicketError] = []

    def error(loc: tuple[str | int, ...], message: str) -> None:
        line, col = _position(doc, loc)
        errors.append(TicketError(filename, line, col, message))

    tickets: list[PlannedTicket] = []
    owner: dict[str, str] = {}
    for m, milestone in enumerate(plan.milestones):
        for k, entry in enumerate(milestone.tickets):
            loc: tuple[str | int, ...] = ("milestones", m, "tickets", k)
            if isinstance(entry, TicketFile):
                if folder is None:
                    error((*loc, "file"), f"ticket file {entry.file!r}: no folder to read it from")
                    continue
                path = folder / entry.file
                try:
                    original: bytes | None = read_bounded(path, MAX_TICKET_BYTES, "ticket")
                    ticket = parse_ticket(original or b"", str(path))
                except TicketInvalid as exc:
                    errors.extend(exc.errors)
                    continue
                source = str(path)
            else:
                ticket, original, source = entry, None, filename
                loc = (*loc, "id")
            if ticket.milestone is not None and ticket.milestone != milestone.id:
                error(loc, f"{ticket.id} says milestone {ticket.milestone!r} but is listed under {milestone.id!r}")
            if ticket.id in owner:
                error(loc, f"{ticket.id} is already a ticket of milestone {owner[ticket.id]}")
                continue
            owner[ticket.id] = milestone.id
            data_out = ticket_bytes(ticket, original, milestone.id)
            tickets.append(PlannedTicket(ticket, milestone.id, source, data_out))
    by_id = {t.ticket.id: t.ticket for t in tickets}
    for m, milestone in enumerate(plan.milestones):
        for d, item in enumerate(milestone.deliverables):
            loc = ("milestones", m, "deliverables", d)
            tid = item.acceptance if isinstance(item, AcceptanceDeliverable) else item.ticket
            key = "acceptance" if isinstance(item, AcceptanceDeliverable) else "ticket"
            if not TICKET_ID.fullmatch(tid):
                error((*loc, key), f"invalid ticket id {tid!r}: expected TICKET-<n>")
                continue
            if tid not in by_id:
                hint = _did_you_mean(tid, sorted(by_id))
                error((*loc, key), f"{tid} is not a ticket of this plan{hint}")
                continue
            ticket = by_id[tid]
            steps = [s.id for s in ticket.steps]
            step = item.check.step if isinstance(item, MetricDeliverable) else getattr(item, "artifact", None)
            if step is not None and step not in steps:
                field = "metric" if isinstance(item, MetricDeliverable) else "artifact"
                error((*loc, field), f"{tid} has no step {step!r}{_did_you_mean(step, steps)}")
            if isinstance(item, AcceptanceDeliverable) and not ticket.acceptance:
                error((*loc, key), f"{tid} has no acceptance checks: name a metric or an artifact instead")
    if errors:
        raise TicketInvalid(errors)
    return LoadedPlan(plan, filename, tickets)


def load_plan(path: Path) -> LoadedPlan:
    """Read and validate a plan file and its ticket files; raises TicketInvalid."""
    path = Path(path)
    return parse_plan(read_bounded(path, MAX_PLAN_BYTES, "plan"), str(path), path.parent)


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema editors use to complete and check plan files."""
    schema = Plan.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://jetbox.local/plan.schema.json"
    return schema
