"""The console's picture playground, the whole way: a tiny image encoder (jepa-text) is trained on `shapes` by a real
worker, promoted by a web user, then a picture (a PNG, as the page's canvas sends it) goes through the
queue to the warm worker, which answers with the nearest captions and kNN probe predictions."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tests.console_server import ConsoleServer
from tests.test_console import APPROVERS, BROWSER_ARGS, CHROMIUM, shot, token_for

TINY_JEPA = "{embed_dim: 48, depth: 2, num_heads: 2, pred_dim: 24, pred_depth: 1, pred_heads: 2}"
TINY_TEXT = "{hidden: 32, layers: 1, heads: 2, pred_hidden: 32, vocab_size: 128}"
STEPS = (
    "  - {id: shapes, kind: synthesize, with: {generator: shapes, count: 64, seed: 1}}\n"
    "  - {id: train, kind: train, needs: [shapes], queue: cpu,"
    f" with: {{model: jepa-text, data: shapes, steps: 3, batch_size: 16, arch: {TINY_JEPA}, text: {TINY_TEXT}}}}}\n"
    "  - {id: eval, kind: evaluate, needs: [train, shapes], queue: cpu,"
    " with: {model: jepa, data: shapes, checkpoint: train, max_examples: 40, knn_k: 5}}\n"
)


def png(draw: str = "circle") -> str:
    """A 64x64 PNG of one red circle (or blue square) on black, base64 as the canvas sends it."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "black")
    pen = ImageDraw.Draw(img)
    if draw == "circle":
        pen.ellipse((18, 18, 46, 46), fill=(220, 40, 40))
    else:
        pen.rectangle((18, 18, 46, 46), fill=(50, 90, 230))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.integration
@pytest.mark.slow  # trains an encoder on a worker
def test_picture_playground_on_a_warm_worker(running: Any) -> None:
    running.drop("TICKET-1", STEPS, "update: core\nexpires: 1d\n")
    running.daemon.wait_event("ProposalOpened", ticket="TICKET-1", timeout=300)
    server = ConsoleServer(running.home, env={**running.env, **APPROVERS})
    try:
        before = server.get_json("/api/playground/image")
        assert before["core_version"] == 0 and before["encoder"] is None and before["components"] == []
        datasets = [
            r["data"]
            for r in running.daemon.rows()
            if r["type"] == "ArtifactRecorded" and r["data"]["kind"] == "dataset"
        ]
        # Before any encoder is in the core: the newest `shapes` dataset (an evaluation suite's may be newer).
        assert before["default_gallery"] in {"sha256:" + d["artifact"] for d in datasets}
        dataset = next(d for d in datasets if d["ticket"] == "TICKET-1")
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token_for(running.home, 'ada')}"}

        def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            code, raw = server.request("POST", path, json.dumps(body).encode(), auth)
            return code, json.loads(raw)

        code, answer = post("/api/playground/image", {"image_png": png(), "queue": "cpu"})
        assert code == 409 and "has no image-encoder" in answer["error"]  # no core yet: said plainly
        code, answer = post("/api/proposals/P-1/approve", {"note": "first encoder"})
        assert code == 200 and "core is now v1" in answer["message"], answer
        code, first = post("/api/playground/image", {"image_png": png(), "queue": "cpu", "top_k": 7})
        assert code == 200, first
        result = first["result"]
        assert result["core_version"] == 1 and result["adapter"] is None and result["component"] == "image-text-encoder"
        # With the encoder in the core: the dataset it learned from.
        assert result["gallery"] == dataset["artifact"] and result["gallery_size"] == 64
        assert result["image_size"] == 32 and len(result["neighbours"]) == 7 == result["k"]
        sims = [n["similarity"] for n in result["neighbours"]]
        assert sims == sorted(sims, reverse=True) and all(-1.001 <= s <= 1.001 for s in sims)
        assert result["captions"] and all(isinstance(c, str) and c for c in result["captions"])
        assert set(result["probes"]) == {"shape", "colour", "count", "position"}
        from workers.synth.shapes import COLOURS, SHAPES

        assert result["probes"]["shape"]["prediction"] in SHAPES
        assert result["probes"]["colour"]["prediction"] in COLOURS
        assert sum(result["probes"]["colour"]["votes"].values()) == 7
        # A jepa-text encoder also predicts the caption's latent: the nearest distinct captions in text space.
        matches = result["text_matches"]
        assert len(matches) == 7 and len({m["caption"] for m in matches}) == 7
        assert [m["similarity"] for m in matches] == sorted((m["similarity"] for m in matches), reverse=True)
        # The second picture finds the encoder and the embedded gallery warm on the worker.
        code, second = post("/api/playground/image", {"image_png": png("square"), "queue": "cpu"})
        assert code == 200 and second["result"]["warm"] and second["result"]["gallery_warm"], second
        # Hostile requests: a clear error naming the field, no job for the console-side ones.
        gif = "data:image/gif;base64," + base64.b64encode(b"GIF89a" + b"\0" * 30).decode()
        whole = base64.b64decode(png().split(",", 1)[1])
        truncated = base64.b64encode(whole[:40]).decode()  # a PNG's header, then nothing
        for body, code_want, why in (
            ({"image_png": "not base64 at all!", "queue": "cpu"}, 422, "image_png: not base64"),
            ({"image_png": gif, "queue": "cpu"}, 422, "not a PNG or JPEG"),
            ({"image": [[[1, 2]]], "queue": "cpu"}, 422, "HxWx3"),
            ({"image": [[[1, 2, 300]]], "queue": "cpu"}, 422, "0..255"),
            ({"image_png": png(), "image": [[[1, 2, 3]]]}, 422, "not both"),
            ({"queue": "cpu"}, 422, "no picture"),
            ({"image_png": png(), "top_k": 0, "queue": "cpu"}, 422, "top_k: 0 is out of range"),
            ({"image_png": png(), "component": "reasoner", "queue": "cpu"}, 422, "component: 'reasoner'"),
            ({"image_png": png(), "top_k": "many", "queue": "cpu"}, 422, "not a whole number"),
            ({"image_png": png(), "gallery": "sha256:zz'; drop", "queue": "cpu"}, 422, "is not sha256:"),
            ({"image_png": png(), "adapter": "A-99", "queue": "cpu"}, 409, "no adapter A-99"),
            ({"image_png": truncated, "queue": "cpu"}, 409, "not a readable image"),
            ({"image_png": png(), "gallery": "sha256:" + "ab" * 32, "queue": "cpu"}, 409, "not a dataset"),
        ):
            code, answer = post("/api/playground/image", body)
            assert code == code_want and why in answer["error"], (body.keys(), answer["error"])
        if Path(CHROMIUM).exists() and importlib.util.find_spec("playwright"):  # else: the API part only
            in_browser(server)
    finally:
        server.stop()


def in_browser(server: ConsoleServer) -> None:
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/playground/image")
        page.click("#example-circle")
        page.select_option("select[name=queue]", "cpu")
        page.click("#look")
        page.wait_for_selector("#seen", timeout=120_000)
        assert "core v1 image-text-encoder" in page.locator("#produced-by").inner_text()
        assert "adapter: none" in page.locator("#produced-by").inner_text()
        assert page.locator("#probes tr[data-label=shape]").count() == 1
        assert page.locator("#captions tbody tr").count() == 5
        assert page.locator("#text-matches tbody tr").count() == 5
        shot(page, "playground-image")
        # The Gradio playground's Picture tab: the same call, the same answer's shape.
        picture = Path(server.home) / "circle.png"
        picture.write_bytes(base64.b64decode(png().split(",", 1)[1]))
        page.goto(server.url + "/playground/gradio/")
        page.get_by_role("tab", name="Picture").click()
        page.locator("#gr-upload input[type=file]").set_input_files(str(picture))
        page.locator("#gr-pqueue").get_by_label("cpu").check()
        page.click("#gr-look")
        page.wait_for_function("document.querySelector('#gr-seen')?.innerText.includes('Answered by')", timeout=120_000)
        seen = page.locator("#gr-seen").inner_text()
        assert "core v1 image-text-encoder" in seen and "adapter: none" in seen and "(64 images)" in seen, seen
        probes = page.locator("#gr-probes").inner_text()
        assert all(label in probes for label in ("shape", "colour", "count", "position")), probes
        captions = page.locator("#gr-captions").inner_text()
        assert (
            "cosine" in captions
            and sum(line.startswith(("a small ", "a large ")) for line in captions.split("\n")) >= 1
        )
        shot(page, "playground-gradio-picture")
        browser.close()


def test_gallery_look_votes_and_names() -> None:
    """The worker's nearest-captions and kNN vote on a hand-made gallery (no model, no jepa-text side)."""
    import numpy as np

    from workers.gallery import Gallery, look

    z = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    found = Gallery(
        z=z,
        captions=["a red circle", "a red circle", "a blue square", "a green star"],
        labels={"shape": np.array([0, 0, 1, 4]), "count": np.array([1, 2, 1, 3])},
        names={"shape": ["circle", "square", "triangle", "cross", "star", "ring"]},
    )
    out = look(found, np.array([1.0, 0.05]), 3)
    assert [n["index"] for n in out["neighbours"]] == [0, 1, 2]
    assert out["captions"] == ["a red circle", "a blue square"]  # distinct, nearest first
    assert out["probes"]["shape"] == {"prediction": "circle", "share": 2 / 3, "votes": {"circle": 2, "square": 1}}
    assert out["probes"]["count"]["prediction"] == "1"  # no names for counts: the value itself
    assert out["text_matches"] is None
    assert look(found, np.array([1.0, 0.0]), 50)["k"] == 4  # k is capped by the gallery
