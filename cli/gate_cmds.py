"""jbctl proposals | approve | reject | core | retry | audit: the human side of the gate."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from cli.common import colour, human_age, open_store, print_json, print_table, settings_from
from cli.main import CliError

AUDIT_TYPES = [
    "ProposalOpened",
    "ProposalApproved",
    "ProposalRejected",
    "ProposalExpired",
    "ProposalWithdrawn",
    "ApprovalRefused",
    "CorePromoted",
    "SafetyViolation",
    "LoopDetected",
    "TaskBlocked",
    "TaskRetried",
    "TicketCancelled",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proposals", help="open proposals (core promotions, policy requests) with age and expiry")
    p.add_argument("--all", action="store_true", help="include decided ones")
    p.add_argument("--detail", action="store_true", help="the side-by-side table and the approve line for each")
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

    p = sub.add_parser("retry", help="retry a blocked task, or re-evaluate a stale proposal")
    p.add_argument("target", help="TICKET (with --task) or P-n (with --reevaluate)")
    p.add_argument("--task")
    p.add_argument("--reevaluate", action="store_true")
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


def proposal_rows(handler: Any, include_all: bool) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    out = []
    for p in sorted(handler.state.proposals.values(), key=lambda p: int(p.id.split("-")[1])):
        if not include_all and p.status != "open":
            continue
        out.append(
            {
                "proposal": p.id,
                "ticket": p.ticket,
                "kind": p.kind,
                "state": p.status,
                "base_core_version": p.base_core_version,
                "age": human_age((now - p.opened_at).total_seconds()),
                "expires_in": human_age((p.expires_at - now).total_seconds()) if p.expires_at else None,
                "candidate": p.candidate,
                "metrics": p.metrics,
                "approvers": p.approvers,
            }
        )
    return out


def cmd_proposals(args: argparse.Namespace) -> int:
    handler = _handler(args)
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
            proposal = handler.state.proposals[r["proposal"]]
            print()
            print(side_by_side(proposal, acceptance_metrics(handler, proposal)))
            if proposal.status == "open":
                print(f"  to approve: jbctl approve {proposal.id} -m 'why'")
                print(f"  to reject:  jbctl reject {proposal.id} -m 'why'")
    return 0


def side_by_side(proposal: Any, focus: list[str] | None = None, limit: int = 12) -> str:
    """The candidate's and the current core's metrics on the same evaluation, with the deltas.

    The metrics the ticket's acceptance checks name come first; at most `limit` rows are shown.
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
    width = max([len(k) for k in cand] + [6])
    lines.append(f"  {'metric':<{width}}  {'candidate':>10}  {'current':>10}  {'delta':>9}")
    names = [n for n in (focus or []) if n in cand] + [n for n in sorted(cand) if n not in (focus or [])]
    for name in names[:limit]:
        now_v = cur.get(name)
        d = delta.get(name)
        sign = "" if d is None else colour(f"{d:+9.4f}", "32" if d >= 0 else "31")
        now_s = "" if now_v is None else f"{now_v:10.4f}"
        lines.append(f"  {name:<{width}}  {cand[name]:10.4f}  {now_s:>10}  {sign:>9}")
    if len(names) > limit:
        lines.append(f"  (+{len(names) - limit} more metrics: jbctl proposals --json)")
    return "\n".join(lines)


def acceptance_metrics(handler: Any, proposal: Any) -> list[str]:
    """`task.metric` names the proposal's ticket checks: the rows a reviewer looks at first."""
    from schema.ticket import MetricCheck

    ticket = handler.state.tickets.get(proposal.ticket)
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
    from daemon.commands import ApproveProposal
    from daemon.handler import ensure_home_owner

    settings = settings_from(args)
    handler = _handler(args)
    ensure_home_owner(handler, settings.home)  # a home the daemon never started on: its owner decides
    proposal = _proposal(handler, args.proposal)
    if proposal.status != "open":
        raise CliError(f"{proposal.id} is {proposal.status}; only an open proposal can be approved")
    print(side_by_side(proposal, acceptance_metrics(handler, proposal), limit=40))
    _confirm(f"approve {proposal.id}?", args.yes)
    user, meta = _actor()
    recorded = handler.handle(
        ApproveProposal(
            now=datetime.now(UTC),
            proposal=proposal.id,
            note=args.note,
            scope=args.scope,
            approvers=list(settings.approvers),
            actor=user,
        ),
        meta=meta,
    )
    refused = [r for r in recorded if r.type == "ApprovalRefused"]
    if refused:
        raise CliError(f"approval refused: {refused[0].data['reason']} (the attempt is recorded)")
    if not recorded:
        raise CliError(f"{proposal.id} is no longer open")
    promoted = [r for r in recorded if r.type == "CorePromoted"]
    if promoted:
        print(f"approved {proposal.id}: core is now v{promoted[0].data['version']}")
    else:
        print(f"approved {proposal.id} ({args.scope})")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from daemon.commands import RejectProposal

    if not args.reason.strip():
        raise CliError("a reason is required: -m REASON")
    handler = _handler(args)
    proposal = _proposal(handler, args.proposal)
    if proposal.status != "open":
        raise CliError(f"{proposal.id} is {proposal.status}; only an open proposal can be rejected")
    user, meta = _actor()
    handler.handle(
        RejectProposal(now=datetime.now(UTC), proposal=proposal.id, reason=args.reason, actor=user), meta=meta
    )
    print(f"rejected {proposal.id}: {args.reason}")
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
    history = [{**h, "at": h["at"].isoformat()} for h in state.core_history]
    if args.json:
        print_json({"version": state.core_version, "components": state.core_components, "history": history})
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
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from daemon.commands import ReevaluateProposal, RetryTask

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
    if not args.task:
        raise CliError("which task? `jbctl retry TICKET --task T` (or `jbctl retry P-n --reevaluate`)")
    ticket = handler.state.tickets.get(args.target)
    if ticket is None:
        raise CliError(f"no ticket {args.target!r}")
    task = ticket.tasks.get(args.task)
    if task is None:
        raise CliError(f"{args.target} has no task {args.task!r} (tasks: {', '.join(ticket.tasks)})")
    recorded = handler.handle(RetryTask(now=now, ticket=ticket.id, task=task.id, actor=user), meta=meta)
    if not recorded:
        raise CliError(
            f"{ticket.id}/{task.id} is {task.status} (ticket {ticket.status}); only a blocked task of a "
            "running ticket can be retried"
        )
    print(f"retrying {ticket.id}/{task.id}")
    return 0


def audit_rows(store: Any, since: int) -> list[dict[str, Any]]:
    out = []
    for rec in store.read(since, types=AUDIT_TYPES):
        d = rec.data
        meta_actor = rec.meta.get("actor")
        actor = d.get("actor") or (meta_actor.get("user") if isinstance(meta_actor, dict) else meta_actor)
        detail = d.get("reason") or d.get("note") or d.get("detail") or d.get("proposal") or ""
        if rec.type == "CorePromoted":
            detail = f"v{d['version']}" + (
                f" (rollback to v{d['rollback_to']})" if d.get("rollback_to") else f" from {d.get('proposal')}"
            )
        if rec.type == "SafetyViolation":
            detail = f"{d.get('what')}: {d.get('detail')}"
        out.append(
            {
                "seq": rec.seq,
                "at": rec.recorded_at.isoformat(timespec="seconds"),
                "type": rec.type,
                "ticket": d.get("ticket"),
                "actor": actor,
                "detail": str(detail)[:200],
            }
        )
    return out


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
