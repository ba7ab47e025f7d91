"""jbctl proposals | approve | reject | core | retry | audit: the human side of the gate."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from cli.common import colour, human_age, open_store, print_json, print_table, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proposals",
        help="open proposals (core promotions, policy requests) with age and expiry; `proposals P-n` shows one",
    )
    p.add_argument("proposal", nargs="?", help="one proposal (P-n): its side-by-side table and the approve line")
    p.add_argument(
        "--all", action="store_true", help="include decided proposals, and every metric in the side-by-side tables"
    )
    p.add_argument("--detail", action="store_true", help="after the list, each proposal as `proposals P-n` shows it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_proposals)

    p = sub.add_parser("approve", help="approve a proposal (prints the side-by-side table first)")
    p.add_argument("proposal")
    p.add_argument("-m", "--note")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (scripts)")
    p.add_argument(
        "--scope",
        choices=["ticket", "all"],
        default="ticket",
        help="policy proposals: allow the binary for this ticket only, or for every ticket",
    )
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("reject", help="reject a proposal; a reason is required")
    p.add_argument("proposal")
    p.add_argument("-m", "--reason", required=True)
    p.set_defaults(func=cmd_reject)

    p = sub.add_parser("core", help="the abstract core: current version and history; `core rollback VERSION`")
    p.add_argument("action", nargs="?", choices=["show", "rollback"], default="show")
    p.add_argument("version", nargs="?", type=int)
    p.add_argument("-m", "--note")
    p.add_argument("--yes", "-y", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_core)

    p = sub.add_parser(
        "retry", help="retry a blocked task, rerun an ended ticket from a step, or re-evaluate a stale proposal"
    )
    p.add_argument("target", help="TICKET (with --task or --from) or P-n (with --reevaluate)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--task", help="a blocked task of a running ticket: try it again")
    how.add_argument(
        "--from",
        dest="from_step",
        metavar="STEP",
        help="an ended ticket: run STEP and everything after it again (never from the cache), keep what is upstream",
    )
    how.add_argument("--reevaluate", action="store_true")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("audit", help="approvals, rejections, policy, violations, forged reports, loops")
    p.add_argument("--since", type=int, default=0, help="only events after this seq")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)


def _handler(args: argparse.Namespace) -> Any:
    from daemon.handler import CommandHandler

    return CommandHandler(open_store(settings_from(args)))


def _proposal(handler: Any, pid: str) -> Any:
    proposal = handler.state.proposals.get(pid)
    if proposal is None:
        known = ", ".join(sorted(handler.state.proposals)) or "none yet"
        raise CliError(f"no proposal {pid!r} (known: {known})")
    return proposal


def proposal_row(proposal: Any, now: datetime) -> dict[str, Any]:
    """One proposal as `proposals --json` prints it."""
    return {
        "proposal": proposal.id,
        "ticket": proposal.ticket,
        "kind": proposal.kind,
        "state": proposal.status,
        "base_core_version": proposal.base_core_version,
        "age": human_age((now - proposal.opened_at).total_seconds()),
        "expires_in": human_age((proposal.expires_at - now).total_seconds()) if proposal.expires_at else None,
        "candidate": proposal.candidate,
        "metrics": proposal.metrics,
        "approvers": proposal.approvers,
    }


def proposal_rows(handler: Any, include_all: bool) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    ordered = sorted(handler.state.proposals.values(), key=lambda p: int(p.id.split("-")[1]))
    return [proposal_row(p, now) for p in ordered if include_all or p.status == "open"]


def cmd_proposals(args: argparse.Namespace) -> int:
    handler = _handler(args)
    if args.proposal:
        proposal = _proposal(handler, args.proposal)
        if args.json:
            print_json(proposal_row(proposal, datetime.now(UTC)))
        else:
            print(proposal_detail(handler, proposal, all_metrics=args.all))
        return 0
    rows = proposal_rows(handler, args.all)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no open proposals" if not args.all else "no proposals")
        return 0
    table = []
    for r in rows:
        what = ", ".join(r["candidate"]) if r["kind"] == "core" else f"run {r['candidate'].get('binary')}"
        table.append(
            [
                r["proposal"],
                r["ticket"],
                r["kind"],
                r["state"],
                what,
                f"v{r['base_core_version']}",
                r["age"],
                r["expires_in"] or "never",
            ]
        )
    print_table(["PROPOSAL", "TICKET", "KIND", "STATE", "WHAT", "BASE CORE", "AGE", "EXPIRES IN"], table)
    if args.detail:
        for r in rows:
            print()
            print(proposal_detail(handler, handler.state.proposals[r["proposal"]], all_metrics=args.all))
    else:
        print("\none proposal's side-by-side metrics: jbctl proposals P-n")
    return 0


def proposal_detail(handler: Any, proposal: Any, all_metrics: bool = False, how_to_decide: bool = True) -> str:
    """What `jbctl proposals P-n` prints: state, the side-by-side table, and how to decide."""
    now = datetime.now(UTC)
    when = f"opened {human_age((now - proposal.opened_at).total_seconds())} ago"
    if proposal.status == "open" and proposal.expires_at is not None:
        when += f", expires in {human_age((proposal.expires_at - now).total_seconds())}"
    lines = [f"{proposal.id}: {proposal.status} ({when})"]
    lines.append(side_by_side(proposal, acceptance_metrics(handler, proposal), all_metrics=all_metrics))
    if proposal.kind == "core":
        lines.append(suite_comparison(handler, proposal))
    if proposal.status == "open" and how_to_decide:
        lines.append(f"  to approve: jbctl approve {proposal.id} -m 'why'   (add --yes in a script)")
        lines.append(f"  to reject:  jbctl reject {proposal.id} -m 'why'")
    return "\n".join(lines)


def suite_comparison(handler: Any, proposal: Any) -> str:
    """The candidate's suite row beside the current core's: the same held-out data for both."""
    from cli.suite_cmds import suite_section

    current = f"v{handler.state.core_version}"
    suite = handler.state.lookup(f"TICKET-suite-{proposal.id}")  # an ended one is cold: its status is enough
    head = f"  evaluation suite: {proposal.id} against core {current} on the suite's fixed held-out data"
    if suite is not None and suite.status == "running":
        head += f" ({suite.id} is still running)"
    elif suite is not None and suite.status != "completed":
        head += f" ({suite.id} {suite.status}: `jbctl status {suite.id}`)"
    elif suite is None:
        head += f" (not run: `jbctl eval {proposal.id}`)"
    return head + "\n" + suite_section(handler.store, [current, proposal.id])


def side_by_side(proposal: Any, focus: list[str] | None = None, all_metrics: bool = False) -> str:
    """The candidate's and the current core's metrics on the same evaluation, with the deltas.

    By default the ticket's checked metrics and the gains over the baselines (an evaluation without
    baselines shows its other measurements instead); `all_metrics` adds everything else. Each delta
    is marked `better` or `worse` in words, so the mark survives NO_COLOR and pipes.
    """
    if proposal.kind == "policy":
        argv = " ".join(proposal.candidate.get("argv", []))
        code = proposal.candidate.get("code")
        what = f" WITH INLINE CODE (`{code}`: approving lets it run any code it is given)" if code is not None else ""
        return (
            f"{proposal.id} (policy) from {proposal.ticket}: allow `{proposal.candidate.get('binary')}`{what} "
            f"for task {proposal.candidate.get('task')}\n  command: {argv}"
        )
    lines = [
        f"{proposal.id} (core) from {proposal.ticket}, evaluated against core v{proposal.base_core_version}",
        "  components: "
        + ", ".join(f"{k} ({str(v.get('checkpoint', ''))[:19]})" for k, v in proposal.candidate.items()),
    ]
    cand, cur, delta = (proposal.metrics.get(k, {}) for k in ("candidate", "current", "delta"))
    if not cur:
        lines.append(f"  (core v{proposal.base_core_version} has no such component yet: nothing to compare against)")
    from schema.readmodel import delta_mark, metric_sections  # here: `jbctl --help` need not load SQLAlchemy

    sections = metric_sections(list(cand), focus or [])
    if not all_metrics:
        checked, gains, other, _ = sections
        sections = [checked, gains if gains[1] else other]
    shown = sum(len(names) for _, names in sections)
    width = max([len(n) for _, names in sections for n in names] + [6])
    lines.append(f"  {'metric':<{width}}  {'candidate':>10}  {'current':>10}  {'delta':>9}")
    for title, names in sections:
        if not names:
            continue
        lines.append(f"  -- {title}")
        for name in names:
            now_v, d = cur.get(name), delta.get(name)
            now_s = "" if now_v is None else f"{now_v:10.4f}"
            mark = delta_mark(name, d)
            code = {"better": "32", "worse": "31"}.get(mark)
            d_s = "" if d is None else f"{d:+9.4f}"
            if code:
                d_s, mark = colour(d_s, code), colour(mark, code)
            lines.append(f"  {name:<{width}}  {cand[name]:10.4f}  {now_s:>10}  {d_s:>9}  {mark}".rstrip())
    if shown < len(cand):
        lines.append(f"  (+{len(cand) - shown} more metrics: jbctl proposals {proposal.id} --all)")
    return "\n".join(lines)


def acceptance_metrics(handler: Any, proposal: Any) -> list[str]:
    """`task.metric` names the proposal's ticket checks: the rows a reviewer looks at first."""
    from schema.ticket import MetricCheck

    ticket = handler.ticket(proposal.ticket)
    if ticket is None:
        return []
    return [c.metric for c in ticket.spec.acceptance if isinstance(c, MetricCheck)]


def _actor() -> tuple[str, dict[str, Any]]:
    from daemon.handler import local_actor

    who = local_actor()
    return str(who["user"]), {"actor": who}


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError("not a terminal: pass --yes to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("not confirmed; nothing recorded")


def cmd_approve(args: argparse.Namespace) -> int:
    from daemon import gate
    from daemon.handler import ensure_home_owner

    settings = settings_from(args)
    handler = _handler(args)
    ensure_home_owner(handler, settings.home)  # a home the daemon never started on: its owner decides
    proposal = _proposal(handler, args.proposal)
    if proposal.status != "open":
        raise CliError(f"{proposal.id} is {proposal.status}; only an open proposal can be approved")
    print(proposal_detail(handler, proposal, how_to_decide=False))
    _confirm(f"approve {proposal.id}?", args.yes)
    user, meta = _actor()
    outcome = gate.approve(
        handler,
        proposal.id,
        actor=user,
        meta=meta,
        home=settings.home,
        approver_list=gate.approvers(settings),
        note=args.note,
        scope=args.scope,
    )
    if not outcome.ok:
        raise CliError(outcome.message)
    print(outcome.message)
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from daemon import gate

    if not args.reason.strip():
        raise CliError("a reason is required: -m REASON")
    handler = _handler(args)
    proposal = _proposal(handler, args.proposal)
    user, meta = _actor()
    outcome = gate.reject(handler, proposal.id, actor=user, meta=meta, reason=args.reason)
    if not outcome.ok:
        raise CliError(outcome.message)
    print(outcome.message)
    return 0


def cmd_core(args: argparse.Namespace) -> int:
    from daemon.commands import RollbackCore

    handler = _handler(args)
    state = handler.state
    if args.action == "rollback":
        if args.version is None:
            raise CliError("which version? `jbctl core rollback VERSION`")
        if not any(h["version"] == args.version for h in state.core_history):
            raise CliError(
                f"no core version {args.version} (history: "
                f"{', '.join(str(h['version']) for h in state.core_history) or 'empty'})"
            )
        if args.version == state.core_version:
            raise CliError(f"v{args.version} is already the current core")
        _confirm(f"make core v{args.version}'s components current again?", args.yes)
        user, meta = _actor()
        recorded = handler.handle(
            RollbackCore(now=datetime.now(UTC), version=args.version, note=args.note, actor=user), meta=meta
        )
        print(f"core rolled back to v{args.version}'s components as v{recorded[0].data['version']}")
        return 0
    from cli.suite_cmds import suite_rows, suite_section
    from schema.suite import suite_table

    history = [{**h, "at": h["at"].isoformat()} for h in state.core_history]
    if args.json:
        suite = suite_table(suite_rows(handler.store))
        print_json(
            {"version": state.core_version, "components": state.core_components, "history": history, "suite": suite}
        )
        return 0
    if not state.core_version:
        print("core: v0 (empty: no proposal approved yet)")
        return 0
    print(f"core: v{state.core_version}")
    for name, comp in sorted(state.core_components.items()):
        print(f"  {name}: {comp.get('checkpoint', '')}  (from {comp.get('ticket')}/{comp.get('task')})")
    print()
    print_table(
        ["VERSION", "PROMOTED", "BY", "PROPOSAL", "NOTE"],
        [
            [
                f"v{h['version']}",
                h["at"][:19],
                h["actor"],
                h["proposal"] or (f"rollback to v{h['rollback_to']}" if h["rollback_to"] else ""),
                h.get("note") or "",
            ]
            for h in history
        ],
    )
    print()
    print("evaluation suite (every version on the same held-out data; `jbctl eval --table --all-metrics`):")
    print(suite_section(handler.store, [f"v{h['version']}" for h in history]))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from daemon.commands import ReevaluateProposal

    handler = _handler(args)
    user, meta = _actor()
    now = datetime.now(UTC)
    if args.reevaluate:
        proposal = _proposal(handler, args.target)
        if proposal.kind != "core" or proposal.status != "open":
            raise CliError(
                f"{proposal.id} is a {proposal.status} {proposal.kind} proposal; only an open core "
                "proposal can be re-evaluated"
            )
        handler.handle(ReevaluateProposal(now=now, proposal=proposal.id, actor=user), meta=meta)
        print(f"{proposal.id} withdrawn; its evaluation runs again against core v{handler.state.core_version}")
        return 0
    from daemon import gate

    if args.from_step:
        outcome = gate.retry_from(handler, args.target, args.from_step, actor=user, meta=meta)
        if not outcome.ok:
            raise CliError(outcome.message)
        print(outcome.message)
        return 0
    if not args.task:
        raise CliError(
            "which task? `jbctl retry TICKET --task T`, `jbctl retry TICKET --from STEP` "
            "(or `jbctl retry P-n --reevaluate`)"
        )
    outcome = gate.retry(handler, args.target, args.task, actor=user, meta=meta)
    if not outcome.ok:
        raise CliError(outcome.message)
    print(outcome.message)
    return 0


def audit_rows(store: Any, since: int) -> list[dict[str, Any]]:
    from schema.readmodel import AUDIT_TYPES, audit_row

    return [audit_row(rec) for rec in store.read(since, types=AUDIT_TYPES)]


def cmd_audit(args: argparse.Namespace) -> int:
    rows = audit_rows(open_store(settings_from(args)), args.since)
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["SEQ", "AT", "WHAT", "TICKET", "ACTOR", "DETAIL"],
        [[r["seq"], r["at"], r["type"], r["ticket"] or "", r["actor"] or "", r["detail"][:90]] for r in rows],
    )
    return 0
