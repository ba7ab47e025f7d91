"""jbctl infer: ad-hoc inference through the queue, on a worker, with the current core (or a checkpoint)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli.common import open_store, print_json, settings_from
from cli.main import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run a core component on an input, through the queue, on a worker")
    p.add_argument("--component", required=True, choices=["reasoner", "image-encoder", "image-text-encoder"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="a sudoku puzzle: one row per line, 0 or . for blanks")
    src.add_argument("--image", type=Path, help="a PNG image (RGB)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="sha256:<id> of a checkpoint artifact (default: the current core's)")
    which.add_argument("--adapter", metavar="A-N", help="apply this adapter (working memory) on its core")
    which.add_argument("--memory", metavar="TICKET", help="apply the active adapter this ticket trained")
    p.add_argument("--queue", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_infer)


def parse_puzzle(path: Path) -> list[list[int]]:
    """A grid from a file: rows of digits (space-separated or not), 0 . or _ for blanks."""
    from daemon.adhoc import parse_puzzle_text

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read: {exc}") from None
    try:
        return parse_puzzle_text(text, str(path))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def read_image(path: Path) -> list[list[list[int]]]:
    try:
        from PIL import Image

        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if max(rgb.size) > 512:
                raise CliError(f"{path}: {rgb.size[0]}x{rgb.size[1]} is too large (at most 512x512)")
            import numpy as np

            return np.asarray(rgb).tolist()  # type: ignore[no-any-return]
    except CliError:
        raise
    except Exception as exc:
        raise CliError(f"{path}: not a readable image: {exc}") from None


def current_core(store: Any) -> dict[str, Any]:
    from daemon.adhoc import current_core as core_of

    return core_of(store.engine)


def cmd_infer(args: argparse.Namespace) -> int:
    from daemon.adhoc import InferenceError, infer
    from daemon.memory import ADAPTER_ID, TICKET_ID

    if args.adapter and not ADAPTER_ID.match(args.adapter):
        raise CliError(f"--adapter {args.adapter!r}: an adapter id looks like A-3 (`jbctl adapters` lists them)")
    if args.memory and not TICKET_ID.match(args.memory):
        raise CliError(f"--memory {args.memory!r}: not a ticket id (e.g. TICKET-7)")
    settings = settings_from(args)
    if not settings.redis_url_or_private():
        raise CliError("no Redis configured (JETBOX_REDIS_URL): inference runs on a worker (try `jbctl up`)")
    params: dict[str, Any] = {"component": args.component}
    if args.input:
        params["puzzle"] = parse_puzzle(args.input)
    else:
        params["image"] = read_image(args.image)
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    if args.adapter or args.memory:
        params["adapter"] = args.adapter or args.memory
    try:
        out = infer(settings, open_store(settings).engine, params, queue=args.queue, timeout=args.timeout)
    except InferenceError as exc:
        raise CliError(str(exc)) from None
    total_ms = out["end_to_end_ms"]
    if args.json:
        print_json(out)
        return 0
    if out.get("answer"):
        for row in out["answer"]:
            print(" ".join(str(v) for v in row))
    else:
        head = json.dumps([round(v, 3) for v in out["head"]])
        print(f"embedding: dim {out['dim']}, norm {out['norm']:.3f}, head {head}")
    warm = "warm" if out["warm"] else "cold (loaded now)"
    memory = ""
    if out.get("adapter"):
        memory = f" + adapter {out['adapter']} (swapped in {out.get('swap_ms', 0.0):.1f} ms)"
    print(
        f"core v{out['core_version']} {args.component} {out['checkpoint'][:12]}{memory}: "
        f"forward {out['forward_ms']:.1f} ms, {warm}, end to end {total_ms:.1f} ms"
    )
    return 0
