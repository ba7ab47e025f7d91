"""jbctl eval: run the standing evaluation suite on a core version or a candidate, and show its table."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from typing import Any

from cli.common import colour, open_store, print_json, settings_from
from cli.main import CliError

SUBJECT = re.compile(r"v(\d+)|P-\d+")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="the standing evaluation suite: run it on a core version or a proposal's candidate, or show its table",
        description=(
            "Every core version and every core proposal's candidate is measured on the same fixed, held-out "
            "data (docs/MODELS.md, 'The evaluation suite'). The daemon files these runs itself (TICKET-suite-v<N> "
            "on each promotion, TICKET-suite-P-<n> with each core proposal); `jbctl eval SUBJECT` files one by "
            "hand. `jbctl eval --table` (and `jbctl core`) shows every subject's row side by side."
        ),
    )
    p.add_argument("subject", nargs="?", help="v<N> (a core version; default: the current one) or P-<n> (a candidate)")
    p.add_argument("--table", action="store_true", help="show the suite's table instead of running it")
    p.add_argument("--all-metrics", action="store_true", help="with --table: every metric, not only the judged ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def suite_rows(store: Any, subjects: list[str] | None = None) -> list[dict[str, Any]]:
    from schema.readmodel import evaluation_rows

    with store.engine.connect() as conn:
        return evaluation_rows(conn, subjects)


def render(table: dict[str, Any]) -> str:
    """The suite's table as text: regressions marked in words (and red on a terminal)."""
    columns = table["columns"]
    if not table["lines"]:
        return "  (no suite results yet)"
    head = ["component", "yardstick", "metric", *columns]
    body = []
    for line in table["lines"]:
        cells = []
        for subject in columns:
            cell = line["cells"].get(subject)
            if cell is None:
                cells.append("")
                continue
            text = f"{cell['value']:.4f}"
            if cell["regression"]:
                text += f" ▼{cell['delta']:+.3f} regression"
            cells.append(text)
        body.append([line["component"], line["yardstick"], line["metric"], *cells])
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    out = ["  " + "  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    for row in body:
        text = "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        out.append(colour(text, "31") if "regression" in text else text)
    out.append(
        f"  (a regression: a judged metric more than {table['tolerance']} worse than the core version before it)"
    )
    return "\n".join(out)


def suite_section(store: Any, subjects: list[str] | None = None, all_metrics: bool = False) -> str:
    from schema.suite import suite_table

    return render(suite_table(suite_rows(store, subjects), all_metrics=all_metrics))


def cmd_eval(args: argparse.Namespace) -> int:
    from daemon.commands import RunSuite
    from daemon.handler import CommandHandler, local_actor
    from schema.suite import suite_table

    store = open_store(settings_from(args))
    if args.table:
        table = suite_table(suite_rows(store), all_metrics=args.all_metrics)
        if args.json:
            print_json(table)
        else:
            print("evaluation suite (docs/MODELS.md):")
            print(render(table))
        return 0
    handler = CommandHandler(store)
    state = handler.state
    subject = args.subject or f"v{state.core_version}"
    match = SUBJECT.fullmatch(subject)
    if match is None:
        raise CliError(f"{subject!r} is not a core version (v<N>) or a proposal (P-<n>)")
    if subject.startswith("P-"):
        proposal = state.proposals.get(subject)
        if proposal is None or proposal.kind != "core":
            raise CliError(f"no core proposal {subject} (`jbctl proposals` lists them)")
        command = RunSuite(now=datetime.now(UTC), proposal=subject, actor=str(local_actor()["user"]))
    else:
        version = int(match.group(1))
        if not any(h["version"] == version for h in state.core_history):
            raise CliError(
                f"no core version {subject}: the core is empty"
                if not state.core_version
                else f"no core version {subject} (current: v{state.core_version})"
            )
        command = RunSuite(now=datetime.now(UTC), core_version=version, actor=str(local_actor()["user"]))
    who = local_actor()
    recorded = handler.handle(command, meta={"actor": who})
    filed = [e for e in recorded if e.type == "TicketSubmitted"]
    if not filed:
        running = f"TICKET-suite-{subject}"
        if running in state.tickets and state.tickets[running].status == "running":
            raise CliError(f"{running} is already running: `jbctl status {running}`")
        raise CliError(f"nothing to measure for {subject}: the suite has no yardstick for its components")
    tid = filed[0].data["ticket"]
    if args.json:
        print_json({"ticket": tid, "subject": subject})
    else:
        print(f"{tid} filed: `jbctl status {tid}`; its results: `jbctl eval --table`")
    return 0
