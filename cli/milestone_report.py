"""The milestone report (`jbctl milestone M2 --report md|html`): the goal, the deliverables checklist
with the measured values and the events that prove them, the tickets with their outcome and duration,
the artifacts, core versions and proposals, the training curves and what is still open.

It reads nothing but the log (through `MilestoneBook`): the same log gives the same report, byte for
byte, apart from the `Generated:` line. Curves are PNGs drawn with matplotlib, imported here only
(jbctl never imports it, nor numpy, at start-up).
"""

from __future__ import annotations

import base64
import html
import io
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cli.common import human_age

GENERATED = "Generated: "  # the one line that differs between two reports of the same log
HIDDEN_CURVE_METRICS = ("eta_s",)  # progress fields that are not a learning curve


def _duration(seconds: float | None) -> str:
    return "running" if seconds is None else human_age(seconds)


def curves(book: Any, view: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """File name -> (caption, PNG) for each task of the milestone that reported metrics with its
    progress (the last attempt's points), drawn deterministically."""
    wanted = []
    for t in view["tickets"]:
        run = book.tickets.get(t["ticket"])
        if run is None:
            continue
        for task in sorted(run.curves):
            attempts = run.curves[task]
            points = attempts[max(attempts)]
            names = sorted({k for _, m in points for k in m if k not in HIDDEN_CURVE_METRICS})
            if len(points) >= 2 and names:
                wanted.append((run.id, task, max(attempts), points, names))
    if not wanted:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, tuple[str, bytes]] = {}
    for ticket, task, attempt, points, names in wanted:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        for name in names:
            xs = [step for step, m in points if name in m]
            ys = [m[name] for _, m in points if name in m]
            ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(f"{ticket} {task} (attempt {attempt})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        # No Software/date metadata: the same points give the same bytes.
        fig.savefig(buf, format="png", metadata={"Software": None})
        plt.close(fig)
        name = f"{view['milestone']}-{ticket}-{task}.png"
        out[name] = (f"{ticket} {task}, attempt {attempt}", buf.getvalue())
    return out


def _rows_md(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return ("—" if v is None or v == "" else str(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _sections(view: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report's tables, shared by both formats."""
    return {
        "Tickets": (
            ["ticket", "title", "outcome", "duration", "revision", "reason"],
            [
                [
                    t["ticket"],
                    t["title"],
                    t["state"],
                    _duration(t["duration_s"]) if t["revision"] else "",
                    t["revision"] or "",
                    t["reason"],
                ]
                for t in view["tickets"]
            ],
        ),
        "Artifacts": (
            ["artifact", "kind", "ticket", "task", "seq"],
            [[a["id"], a["kind"], a["ticket"], a["task"], a["seq"]] for a in view["artifacts"]],
        ),
        "Core versions produced": (
            ["version", "proposal", "promoted by", "components", "seq"],
            [
                [f"v{c['version']}", c["proposal"], c["actor"], ", ".join(c["components"]), c["seq"]]
                for c in view["core_versions"]
            ],
        ),
        "Proposals": (
            ["proposal", "ticket", "kind", "state", "by", "note", "seq"],
            [[p["id"], p["ticket"], p["kind"], p["state"], p["actor"], p["note"], p["seq"]] for p in view["proposals"]],
        ),
    }


def render(book: Any, mid: str, fmt: str, now: datetime) -> tuple[bytes, dict[str, bytes]]:
    """The report's bytes and its curve PNGs (by file name). Only the `Generated:` line uses `now`."""
    from cli.plans import checklist_lines

    view = book.view(mid)
    figures = curves(book, view)
    stamp = GENERATED + now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary = (
        f"Plan {view['plan']}, milestone revision {view['revision']} (planned at seq {view['planned_seq']}); "
        f"state: {view['state']}, {view['done']}/{view['total']} deliverables; "
        f"from the log up to seq {view['log_seq']}."
    )
    checklist = checklist_lines(view)
    sections = _sections(view)
    if fmt == "md":
        lines = [
            f"# Milestone {mid}: {view['title']}",
            "",
            stamp,
            "",
            summary,
            "",
            "## Goal",
            "",
            view["goal"].strip(),
            "",
            "## Deliverables",
            "",
        ]
        lines += [f"- {line}" for line in checklist]
        for title, (headers, rows) in sections.items():
            lines += ["", f"## {title}", ""]
            lines += _rows_md(headers, rows) if rows else ["none"]
        lines += ["", "## Training curves", ""]
        lines += [f"![{caption}]({name})" for name, (caption, _) in figures.items()] or ["none recorded"]
        lines += ["", "## Still open", ""]
        lines += [f"- {item}" for item in view["open"]] or ["nothing: every deliverable is ticked"]
        text = "\n".join(lines) + "\n"
    else:
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            f'<html lang="en"><head><meta charset="utf-8"><title>Milestone {e(mid)}</title>',
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.ok{color:#080}.no{color:#b00}</style>",
            "</head><body>",
            f"<h1>Milestone {e(mid)}: {e(view['title'])}</h1>",
            f"<p>{e(stamp)}</p>",
            f"<p>{e(summary)}</p>",
            f"<h2>Goal</h2><p>{e(view['goal'].strip())}</p>",
            "<h2>Deliverables</h2><ul>",
        ]
        for line, d in zip(checklist, view["deliverables"], strict=True):
            parts.append(f'<li class="{"ok" if d["ok"] else "no"}">{e(line)}</li>')
        parts.append("</ul>")
        for title, (headers, rows) in sections.items():
            parts.append(f"<h2>{e(title)}</h2>")
            if not rows:
                parts.append("<p>none</p>")
                continue
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{e('—' if v is None else str(v))}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        parts.append("<h2>Training curves</h2>")
        for caption, png in figures.values():
            data = base64.b64encode(png).decode()
            parts.append(
                f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        if not figures:
            parts.append("<p>none recorded</p>")
        parts.append("<h2>Still open</h2><ul>")
        parts += [f"<li>{e(item)}</li>" for item in view["open"]] or ["<li>nothing: every deliverable is ticked</li>"]
        parts.append("</ul></body></html>")
        text = "\n".join(parts) + "\n"
    return text.encode(), {name: png for name, (_, png) in figures.items()}


def write_report(book: Any, mid: str, fmt: str, output: Path | None, settings: Any) -> int:
    """Render, store the report (and its curves) as artifacts, write it to `output` or stdout."""
    from schema.artifact_store import ArtifactStore
    from schema.artifacts import ArtifactEntry, atomic_write_bytes

    data, figures = render(book, mid, fmt, datetime.now(UTC))
    store = ArtifactStore.from_settings(settings)
    meta = {"milestone": mid, "format": fmt, "log_seq": book.head}
    report_id = store.put_bytes(data)
    store.record(ArtifactEntry(id=report_id, kind="milestone-report", name=f"{mid}.{fmt}", size=len(data), meta=meta))
    for name, png in figures.items():
        fid = store.put_bytes(png)
        store.record(ArtifactEntry(id=fid, kind="figure", name=name, size=len(png), meta={"milestone": mid}))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, data)
        if fmt == "md":  # html embeds its curves
            for name, png in figures.items():
                atomic_write_bytes(output.parent / name, png)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    print(f"report stored as artifact sha256:{report_id} (kind milestone-report)", file=sys.stderr)
    return 0
