"""jbctl plan validate | apply | schema, jbctl milestones, jbctl milestone (docs/PLANS.md)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cli.common import colour, open_store, print_json, print_table, settings_from
from cli.main import CliError

STATE_COLOURS = {"planned": "0", "in progress": "36", "done": "32", "blocked": "31"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan files: milestones that become tickets (validate, apply, schema)")
    plan_sub = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    v = plan_sub.add_parser("validate", help="check a plan file and its tickets; FILE:LINE:COL: message per error")
    v.add_argument("file", type=Path)
    v.set_defaults(func=cmd_validate)
    a = plan_sub.add_parser("apply", help="write the plan's tickets into the tickets folder and record its milestones")
    a.add_argument("file", type=Path)
    a.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    a.set_defaults(func=cmd_apply)
    s = plan_sub.add_parser("schema", help="print the plan JSON Schema")
    s.add_argument("--output", "-o", type=Path, help="write to a file instead of stdout")
    s.set_defaults(func=cmd_schema)

    p = sub.add_parser("milestones", help="every planned milestone: state and deliverables ticked")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_milestones)

    p = sub.add_parser("milestone", help="one milestone: its deliverables checklist, tickets and what is open")
    p.add_argument("milestone")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--report", nargs="?", const="md", choices=["md", "html"], help="compile the milestone report (md or html)"
    )
    p.add_argument("--output", "-o", type=Path, help="report: write here (and its curves beside it), not to stdout")
    p.set_defaults(func=cmd_milestone)


def _load(path: Path) -> Any:
    """The validated plan, or None after printing each error as FILE:LINE:COL: message."""
    from schema.plans import load_plan
    from schema.ticket import TicketInvalid

    try:
        return load_plan(path)
    except TicketInvalid as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args.file)
    if loaded is None:
        return 1
    n = len(loaded.tickets)
    print(f"{args.file}: {colour('ok', '32')} ({len(loaded.plan.milestones)} milestones, {n} tickets)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from schema.plans import plan_json_schema

    text = json.dumps(plan_json_schema(), indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from daemon.commands import PlanMilestones
    from daemon.handler import CommandHandler, local_actor
    from schema.artifacts import atomic_write_bytes

    loaded = _load(args.file)
    if loaded is None:
        return 1
    settings = settings_from(args)
    folder = settings.tickets_path
    writes: list[tuple[Path, bytes, str]] = []
    for planned in loaded.tickets:
        dest = folder / f"{planned.ticket.id}.yaml"
        try:
            current: bytes | None = dest.read_bytes()
        except FileNotFoundError:
            current = None
        if current != planned.data:
            writes.append((dest, planned.data, "new" if current is None else "revised"))
    specs = [loaded.milestone_spec(m) for m in loaded.plan.milestones]
    path = str(args.file.resolve())
    store = open_store(settings, migrate=True)
    handler = CommandHandler(store)
    if args.dry_run:
        from daemon.decider import decide

        events = decide(handler.state, _command(PlanMilestones, loaded.plan.plan, path, specs, None))
    else:
        # The milestones first, so that their tickets' submissions follow them in the log.
        actor = local_actor()
        recorded = handler.handle(
            _command(PlanMilestones, loaded.plan.plan, path, specs, actor["user"]), meta={"actor": actor}
        )
        events = [r.event for r in recorded]
        for dest, data, _ in writes:
            atomic_write_bytes(dest, data)
    changed = {getattr(e, "milestone", None): e for e in events}
    verb = "would " if args.dry_run else ""
    for spec in specs:
        e = changed.get(spec["id"])
        what = f"{verb}record revision {e.revision}" if e is not None else "unchanged"  # type: ignore[attr-defined]
        print(f"milestone {spec['id']}: {what}")
    for dest, _, how in writes:
        print(f"ticket {dest.stem}: {verb}write {how} file {dest}")
    unchanged = len(loaded.tickets) - len(writes)
    if unchanged:
        print(f"{unchanged} ticket file(s) unchanged")
    others = sorted(set(handler.state.milestones) - {s["id"] for s in specs})
    if others:
        print(f"note: milestones planned before and not in this plan stay recorded: {', '.join(others)}")
    return 0


def _command(cls: Any, plan: str, path: str, specs: list[dict[str, Any]], actor: str | None) -> Any:
    return cls(now=datetime.now(UTC), plan=plan, path=path, milestones=specs, actor=actor)


def book_of(settings: Any) -> Any:
    """The milestone projection, folded from the log."""
    from schema.milestones import fold

    store = open_store(settings)
    return fold(store.read_events())


def _duration(seconds: float | None) -> str:
    from cli.common import human_age

    return "" if seconds is None else human_age(seconds)


def cmd_milestones(args: argparse.Namespace) -> int:
    views = book_of(settings_from(args)).views()
    if args.json:
        print_json(views)
        return 0
    if not views:
        print("no milestones yet: `jbctl plan apply plan.yaml` (docs/PLANS.md)")
        return 0
    rows = [
        [
            v["milestone"],
            colour(v["state"], STATE_COLOURS[v["state"]]),
            f"{v['done']}/{v['total']}",
            f"{sum(1 for t in v['tickets'] if t['state'] == 'completed')}/{len(v['tickets'])}",
            v["title"][:50],
            (v["open"][0] if v["open"] else "")[:70],
        ]
        for v in views
    ]
    print_table(["MILESTONE", "STATE", "DELIVERABLES", "TICKETS DONE", "TITLE", "NEXT OPEN ITEM"], rows)
    return 0


def cmd_milestone(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    book = book_of(settings)
    if args.milestone not in book.milestones:
        known = ", ".join(sorted(book.milestones)) or "none yet"
        raise CliError(f"no milestone {args.milestone!r} (planned: {known})")
    if args.report:
        from cli.milestone_report import write_report

        return write_report(book, args.milestone, args.report, args.output, settings)
    view = book.view(args.milestone)
    if args.json:
        print_json(view)
        return 0
    state = colour(view["state"], STATE_COLOURS[view["state"]])
    print(f"{view['milestone']}  {state}  {view['title']}  (plan {view['plan']}, revision {view['revision']})")
    print(f"goal: {view['goal'].strip()}")
    print(f"\ndeliverables ({view['done']}/{view['total']}):")
    for line in checklist_lines(view):
        print(f"  {line}")
    print("\ntickets:")
    for t in view["tickets"]:
        extra = f"  {t['reason']}" if t["reason"] else ""
        print(f"  {t['ticket']}  {t['state']}  {_duration(t['duration_s'])}  {t['title']}{extra}".rstrip())
    if view["open"]:
        print("\nstill open:")
        for item in view["open"]:
            print(f"  - {item}")
    return 0


def checklist_lines(view: dict[str, Any]) -> list[str]:
    """`[x] name: value (check) seq N` per deliverable: the checklist the CLI and the report share."""
    out = []
    for d in view["deliverables"]:
        mark = "[x]" if d["ok"] else "[ ]"
        value = d["value"]
        shown = f"{value:g}" if isinstance(value, float) else (value or "—")
        verb = "proved by" if d["ok"] else "measured in"
        proof = f", {verb} {d['event']} seq {d['seq']}" if d["seq"] is not None else ""
        why = f"; {d['why']}" if not d["ok"] and d.get("why") else ""
        out.append(f"{mark} {d['name']}: {shown} ({d['check']}{proof}{why})")
    return out
