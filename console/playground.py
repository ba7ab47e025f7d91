"""The playground's calls, shared by its HTML pages and its Gradio app: solve a sudoku with the core's
reasoner, show a picture to the core's image encoder. Both go through `daemon.adhoc.infer`, the path
`jbctl infer` takes, so a warm worker answers with the core already loaded.

Nothing here imports gradio: `LazyGradio` builds the Gradio app (console/gradio_app.py) on its first
request, so a console that is never played with never pays for importing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import sqlalchemy as sa

from schema.settings import Settings

EXAMPLE = "1 0 0 4\n0 0 1 0\n0 1 0 0\n4 0 0 1\n"
GRADIO_PATH = "/playground/gradio"


class Playground:
    """The playground's two calls over one settings and read-only engine. Each returns (payload, HTTP status):
    200 with `result`, 422 for a bad request (nothing was sent), 409 when inference could not run."""

    def __init__(self, settings: Settings, engine: sa.Engine) -> None:
        self.settings, self.engine = settings, engine

    def sudoku_payload(self, puzzle: str, queue: str) -> dict[str, Any]:
        from daemon.adhoc import current_core

        core = current_core(self.engine)
        return {
            "core_version": core["version"],
            "reasoner": core["components"].get("reasoner"),
            "puzzle": puzzle,
            "queue": queue,
            "redis": self.settings.redis_url_or_private() is not None,
            "result": None,
            "error": None,
            "grid": None,
        }

    def solve(self, form: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Solve `form["puzzle"]` with the current core's reasoner (or `form["adapter"]`) on a worker."""
        from daemon.adhoc import InferenceError, infer, parse_puzzle_text

        puzzle = str(form.get("puzzle") or "")
        queue = "cpu" if form.get("queue") == "cpu" else "gpu"
        payload = self.sudoku_payload(puzzle, queue)
        payload["adapter"] = str(form.get("adapter") or "").strip()
        status = 200
        try:
            grid = parse_puzzle_text(puzzle, "puzzle")
            payload["grid"] = grid
            params: dict[str, Any] = {"component": "reasoner", "puzzle": grid}
            if payload["adapter"]:
                params["adapter"] = payload["adapter"]
            payload["result"] = infer(self.settings, self.engine, params, queue=queue, timeout=120)
            answer = payload["result"].get("answer")
            payload["solved"] = bool(answer) and sudoku_solved(grid, answer)
        except ValueError as exc:
            payload["error"], status = str(exc), 422
        except InferenceError as exc:
            payload["error"], status = str(exc), 409
        return payload, status

    def image_payload(self, form: dict[str, Any]) -> dict[str, Any]:
        from daemon.adhoc import IMAGE_COMPONENTS, current_core, default_gallery

        core = current_core(self.engine)
        have = [name for name in IMAGE_COMPONENTS if name in core["components"]]
        # The one asked for, else the core's image encoder, else its image-text encoder.
        component = str(form.get("component") or (have[0] if have else IMAGE_COMPONENTS[0]))
        return {
            "core_version": core["version"],
            "components": have,
            "component": component,
            "encoder": core["components"].get(component),
            "default_gallery": default_gallery(self.engine, core, component),
            "gallery": str(form.get("gallery") or "").strip(),
            "adapter": str(form.get("adapter") or "").strip(),
            "queue": "cpu" if form.get("queue") == "cpu" else "gpu",
            "top_k": 5 if form.get("top_k") in (None, "") else form.get("top_k"),
            "picture": None,
            "redis": self.settings.redis_url_or_private() is not None,
            "result": None,
            "error": None,
        }

    def look(self, form: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """What the core's image encoder sees in `form`'s picture: nearest captions and probe votes."""
        from daemon.adhoc import InferenceError, infer

        payload = self.image_payload(form)
        status = 200
        try:
            params = picture_params(form, payload)
            payload["result"] = infer(self.settings, self.engine, params, queue=payload["queue"], timeout=120)
        except ValueError as exc:
            payload["error"], status = str(exc), 422
        except InferenceError as exc:
            payload["error"], status = str(exc), 409
        return payload, status


class LazyGradio:
    """An ASGI app that builds the Gradio playground on its first request and then hands every request to it.

    `allowed(scope)` is the console's reading rule (a login when bound beyond localhost). The Gradio app's
    own start-up (its queue) runs when it is built, and its shutdown with the console's."""

    def __init__(self, play: Playground, allowed: Any) -> None:
        self.play, self.allowed = play, allowed
        self._app: Any = None
        self._lock = asyncio.Lock()
        self._lifespan: Any = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self.allowed(scope):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("log in first: this console is bound beyond localhost", status_code=401)
            await response(scope, receive, send)
            return
        app = await self.app()
        await app(scope, receive, send)

    async def app(self) -> Any:
        async with self._lock:
            if self._app is None:
                from console.gradio_app import mount

                # Importing gradio and building the app takes seconds: off the event loop.
                gradio_app = await asyncio.to_thread(mount, self.play)
                self._lifespan = gradio_app.router.lifespan_context(gradio_app)
                await self._lifespan.__aenter__()
                gradio_app.get_blocks().run_startup_events()
                await gradio_app.get_blocks().run_extra_startup_events()
                self._app = gradio_app
        return self._app

    async def close(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None


def sudoku_solved(puzzle: list[list[int]], answer: list[list[int]]) -> bool:
    """Whether `answer` keeps the givens and every row, column and box holds 1..n once."""
    n = len(puzzle)
    box_rows, box_cols = {4: (2, 2), 6: (2, 3), 9: (3, 3)}[n]
    if len(answer) != n or any(len(r) != n for r in answer):
        return False
    if any(puzzle[r][c] and puzzle[r][c] != answer[r][c] for r in range(n) for c in range(n)):
        return False
    want = set(range(1, n + 1))
    groups = [answer[r] for r in range(n)] + [[answer[r][c] for r in range(n)] for c in range(n)]
    for br in range(0, n, box_rows):
        for bc in range(0, n, box_cols):
            groups.append([answer[r][c] for r in range(br, br + box_rows) for c in range(bc, bc + box_cols)])
    return all(set(g) == want for g in groups)


PICTURE_MAX_CHARS = 6 * 2**20  # base64 of the 4 MiB a worker accepts
PICTURE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def picture_params(form: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The `infer` parameters of a playground picture (ValueError names what is wrong with the request).

    The picture arrives as a base64 PNG or JPEG (`image_png`, a `data:` URL from the page's canvas), or as
    `image`, HxWx3 numbers, from scripts. The console checks only its shape; the worker decodes it."""
    import base64
    import binascii
    import re

    from daemon.adhoc import IMAGE_COMPONENTS

    if payload["component"] not in IMAGE_COMPONENTS:
        raise ValueError(f"component: {payload['component']!r}; one of {', '.join(IMAGE_COMPONENTS)}")
    params: dict[str, Any] = {"component": payload["component"]}
    encoded, image = form.get("image_png"), form.get("image")
    if encoded and image is not None:
        raise ValueError("send either image_png or image, not both")
    if encoded:
        if not isinstance(encoded, str) or len(encoded) > PICTURE_MAX_CHARS:
            raise ValueError(f"image_png: a base64 PNG or JPEG of at most {PICTURE_MAX_CHARS:,} characters")
        body = encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded
        try:
            head = base64.b64decode(body[:24], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image_png: not base64") from None
        if not head.startswith(PICTURE_MAGIC):
            raise ValueError("image_png: not a PNG or JPEG picture")
        params["image_png"] = encoded
        payload["picture"] = encoded if encoded.startswith("data:") else None
    elif image is not None:
        if not (
            isinstance(image, list)
            and 0 < len(image) <= 512
            and all(isinstance(row, list) and len(row) == len(image[0]) for row in image)
            and all(isinstance(px, list) and len(px) == 3 for row in image for px in row)
            and all(type(v) is int and 0 <= v <= 255 for row in image for px in row for v in px)
        ):
            raise ValueError("image: HxWx3 whole numbers 0..255 (at most 512 rows), rows of equal length")
        params["image"] = image
    else:
        raise ValueError("no picture: draw one or choose a PNG/JPEG file (image_png), or send `image`")
    gallery = payload["gallery"] or payload["default_gallery"]
    if gallery:
        if not re.fullmatch(r"sha256:[0-9a-f]{8,64}", gallery):
            raise ValueError(f"gallery: {gallery!r} is not sha256:<dataset id>")
        params["gallery"] = gallery
    try:
        top_k = int(payload["top_k"])
    except (TypeError, ValueError):
        raise ValueError(f"top_k: {payload['top_k']!r} is not a whole number") from None
    if not 1 <= top_k <= 50:
        raise ValueError(f"top_k: {top_k} is out of range 1..50")
    params["top_k"] = payload["top_k"] = top_k
    if payload["adapter"]:
        params["adapter"] = payload["adapter"]
    return params
