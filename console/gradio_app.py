"""The playground as a Gradio app, mounted in the console at /playground/gradio (console/playground.py builds
it on the first request). Two tabs, Sudoku and Picture; their callbacks are the `Playground` calls the
HTML playground makes, so both go through `daemon.adhoc.infer` to a warm worker.

Gradio must not reach the network: analytics, the Hub and server-side rendering are switched off before it
is imported, and the theme uses the system's fonts (the default theme links Google Fonts).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from console.playground import GRADIO_PATH, Playground

OFFLINE = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_SSR_MODE": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_RUN_HISTORY": "False",
}
SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
HEADER = (
    '<div id="jb-header"><a href="/"><b>Jetbox</b></a> · <a href="/">Tickets</a> · <a href="/proposals">Proposals</a>'
    ' · <a href="/core">Core</a> · <a href="/workers">Workers</a> · Playground: <a href="/playground">sudoku page</a>'
    ' · <a href="/playground/image">picture page</a> · <b>Gradio</b></div>'
)


def produced_by(result: dict[str, Any], component: str) -> str:
    """Which core version, checkpoint and adapter answered (every answer says so)."""
    checkpoint = str(result.get("checkpoint") or "")[:16]
    return (
        f"**Answered by core v{result.get('core_version')} {component}** `{checkpoint}` · "
        f"adapter: **{result.get('adapter') or 'none'}**"
    )


def grid_html(answer: list[list[int]], grid: list[list[int]] | None, solved: bool) -> str:
    """The answer as a table: givens bold, the reasoner's digits blue."""
    rows = []
    for r, row in enumerate(answer):
        cells = []
        for c, v in enumerate(row):
            given = bool(grid and grid[r][c])
            style = "font-weight:700" if given else "color:#2b59c3"
            cells.append(
                f'<td style="width:38px;height:38px;text-align:center;font-size:18px;'
                f'border:1px solid #d0d5dd;{style}">{int(v)}</td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    verdict = "a valid solution" if solved else "not a valid solution"
    colour = "#067647" if solved else "#b42318"
    return (
        f'<p id="gr-verdict" style="font-weight:700;color:{colour}">{verdict}</p>'
        '<table id="gr-answer" style="width:auto;border:2px solid #10182b;border-collapse:collapse">'
        f"{''.join(rows)}</table>"
        '<p style="font-size:smaller;color:#667085">bold: the givens · blue: the digits the reasoner filled in</p>'
    )


def solve_view(play: Playground, puzzle: str, queue: str, adapter: str) -> tuple[str, str, str, dict[str, Any]]:
    """(answer grid, who answered, timings and recursion, the whole answer)."""
    payload, status = play.solve({"puzzle": puzzle, "queue": queue, "adapter": adapter})
    if status != 200:
        why = "bad puzzle" if status == 422 else "could not run"
        error = f'<p id="gr-error" style="color:#b42318"><b>{why}</b>: {html.escape(str(payload["error"]))}</p>'
        return error, "", "", {}
    result = payload["result"]
    answer = result.get("answer") or []
    segments = result.get("segments")
    details = [
        f"forward {float(result.get('forward_ms') or 0):.1f} ms",
        "warm" if result.get("warm") else "cold (loaded now)",
        f"end to end {float(result.get('end_to_end_ms') or 0):.1f} ms",
    ]
    if segments is not None:
        details.append(f"recursion: {segments} segment(s) before it halted")
    # The reasoner reports the number of segments it used; a model that exposes its intermediate
    # grids would send them as `trace`, shown here step by step.
    steps = result.get("trace") or []
    text = " · ".join(details)
    if steps:
        text += "\n\n" + "\n\n".join(f"step {i + 1}:\n```\n{_grid_text(g)}\n```" for i, g in enumerate(steps))
    shown = grid_html(answer, payload["grid"], bool(payload.get("solved")))
    return shown, produced_by(result, "reasoner"), text, result


def _grid_text(grid: list[list[int]]) -> str:
    return "\n".join(" ".join(str(v) for v in row) for row in grid)


def picture_file(upload: str | None, sketch: Any) -> str | None:
    """The picture to look at: the uploaded file, else the sketch's composite."""
    if upload:
        return upload
    if isinstance(sketch, dict) and sketch.get("composite"):
        return str(sketch["composite"])
    return None


def look_view(
    play: Playground, upload: str | None, sketch: Any, component: str, queue: str, top_k: float, adapter: str
) -> tuple[str, list[list[Any]], list[list[Any]], list[list[Any]], dict[str, Any]]:
    """(who answered or the error, nearest captions, probe votes, captions it would write, the whole answer)."""
    # top_k as given (a slider's float, or whatever an API caller sent): `picture_params` checks it.
    k = int(top_k) if isinstance(top_k, float) and top_k.is_integer() else top_k
    form: dict[str, Any] = {"queue": queue, "top_k": k, "adapter": adapter, "component": component or None}
    path = picture_file(upload, sketch)
    if path:
        # Gradio saved the picture as a PNG (format="png"); the console passes it on undecoded.
        form["image_png"] = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    payload, status = play.look(form)
    if status != 200:
        return f"**could not look**: {payload['error']}", [], [], [], {}
    result = payload["result"]
    neighbours = [[n.get("index"), round(float(n["similarity"]), 4), n.get("caption")] for n in result["neighbours"]]
    probes = [
        [label, p["prediction"], f"{100 * float(p['share']):.0f}%", _votes(p["votes"])]
        for label, p in (result.get("probes") or {}).items()
    ]
    texts = [[m["caption"], round(float(m["similarity"]), 4)] for m in result.get("text_matches") or []]
    who = produced_by(result, str(result.get("component") or payload["component"]))
    who += (
        f" · gallery `{str(result.get('gallery'))[:16]}` ({result.get('gallery_size')} images)"
        f" · forward {float(result.get('forward_ms') or 0):.1f} ms · end to end {float(result['end_to_end_ms']):.1f} ms"
    )
    return who, neighbours, probes, texts, result


def _votes(votes: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in votes.items())


def core_line(play: Playground) -> str:
    sudoku = play.sudoku_payload("", "gpu")
    image = play.image_payload({})
    reasoner = sudoku["reasoner"]
    parts = [f"**Core v{sudoku['core_version']}**"]
    parts.append(f"reasoner `{str(reasoner['checkpoint'])[:16]}`" if reasoner else "no reasoner yet")
    encoder = image["encoder"]
    parts.append(f"{image['component']} `{str(encoder['checkpoint'])[:16]}`" if encoder else "no image encoder yet")
    if not sudoku["redis"]:
        parts.append("**no Redis**: start Jetbox with `jbctl up` or set JETBOX_REDIS_URL")
    return " · ".join(parts) + " (approve a core proposal to change it: [Proposals](/proposals))"


def build(play: Playground) -> Any:
    """The Blocks app: a Sudoku tab and a Picture tab."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    import gradio as gr

    from console.playground import EXAMPLE

    with gr.Blocks(title="Jetbox playground", analytics_enabled=False) as blocks:
        gr.HTML(HEADER)
        gr.Markdown(
            "## Playground\nTry the current core on your own input. Each request is an `infer` job on a warm "
            "worker, through the queue, like `jbctl infer`."
        )
        core = gr.Markdown(elem_id="gr-core")
        blocks.load(lambda: core_line(play), None, core)
        with gr.Tabs():
            with gr.Tab("Sudoku", id="sudoku"):
                with gr.Row():
                    with gr.Column():
                        puzzle = gr.Textbox(
                            EXAMPLE.strip(),
                            lines=9,
                            label="Puzzle (4x4, 6x6 or 9x9; one row per line; 0 or . for a blank)",
                            elem_id="gr-puzzle",
                        )
                        queue = gr.Radio(["gpu", "cpu"], value="gpu", label="Queue", elem_id="gr-queue")
                        adapter = gr.Textbox(
                            "", label="Adapter (optional: its id or the ticket that trained it)", placeholder="none"
                        )
                        solve = gr.Button("Solve", variant="primary", elem_id="gr-solve")
                    with gr.Column():
                        answer = gr.HTML(elem_id="gr-sudoku-answer")
                        who = gr.Markdown(elem_id="gr-produced-by")
                        steps = gr.Markdown(elem_id="gr-steps")
                        with gr.Accordion("the whole answer (JSON)", open=False):
                            raw = gr.JSON()
                solve.click(
                    lambda p, q, a: solve_view(play, p, q, a),
                    [puzzle, queue, adapter],
                    [answer, who, steps, raw],
                    api_name="solve",
                )
            with gr.Tab("Picture", id="picture"):
                with gr.Row():
                    with gr.Column():
                        upload = gr.Image(
                            sources=["upload", "clipboard"],
                            type="filepath",
                            format="png",
                            label="Upload a picture",
                            elem_id="gr-upload",
                        )
                        sketch = gr.Sketchpad(
                            type="filepath", format="png", label="or draw one", canvas_size=(256, 256)
                        )
                        component = gr.Dropdown(
                            ["image-encoder", "image-text-encoder"],
                            value=None,
                            label="Encoder (empty: the core's)",
                        )
                        pqueue = gr.Radio(["gpu", "cpu"], value="gpu", label="Queue", elem_id="gr-pqueue")
                        top_k = gr.Slider(1, 50, value=5, step=1, label="Neighbours (k)")
                        padapter = gr.Textbox("", label="Adapter (optional)", placeholder="none")
                        look = gr.Button("Look", variant="primary", elem_id="gr-look")
                    with gr.Column():
                        seen = gr.Markdown(elem_id="gr-seen")
                        probes = gr.Dataframe(
                            headers=["probe", "prediction", "share", "votes"],
                            label="Probe predictions (kNN vote)",
                            elem_id="gr-probes",
                        )
                        captions = gr.Dataframe(
                            headers=["image", "cosine", "caption"],
                            label="Nearest captioned images",
                            elem_id="gr-captions",
                        )
                        texts = gr.Dataframe(headers=["caption", "cosine"], label="Captions it would write")
                        with gr.Accordion("the whole answer (JSON)", open=False):
                            praw = gr.JSON()
                look.click(
                    lambda u, s, c, q, k, a: look_view(play, u, s, c, q, k, a),
                    [upload, sketch, component, pqueue, top_k, padapter],
                    [seen, captions, probes, texts, praw],
                    api_name="look",
                )
    return blocks


def mount(play: Playground) -> Any:
    """The Gradio ASGI app for GRADIO_PATH, configured as `gr.mount_gradio_app` configures a mounted app."""
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    import gradio as gr
    from fastapi import FastAPI

    holder = FastAPI()
    theme = gr.themes.Default(font=SANS, font_mono=MONO)  # the default theme's fonts come from Google
    gr.mount_gradio_app(
        holder, build(play), path=GRADIO_PATH, footer_links=[], ssr_mode=False, mcp_server=False, theme=theme
    )
    return holder.routes[-1].app  # type: ignore[attr-defined]  # the Mount it added
