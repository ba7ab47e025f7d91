"""The papers' table in small: direct vs hrm vs trm at equal parameter count and equal compute budget.

    python bench/reasoning.py --minutes 2 --seeds 3            # 6x6 minimal sudoku, CPU
    python bench/reasoning.py --n 9 --minutes 2 --seeds 1 --device cuda --set d_model=256 --set batch_size=256
    # visual sudoku: digit tokens vs glyphs through a JEPA trained on glyphs here vs its random twin
    python bench/reasoning.py --models trm --steps 1200 --seeds 3 --visual-encoder jepa,random --bank 1000

Each (model, seed) run trains for ``--minutes`` of CPU time of its process (``--clock wall``: wall-clock, which
a loaded machine makes unfair) on the same 1,000 training puzzles (with on-the-fly symmetry augmentation) and is
scored on held-out puzzles from the fabric's leak-free test split.
Prints a table: exact full-grid and blank-cell accuracy (mean ± sd over seeds), optimiser steps, puzzles seen.

Visual sudoku (``--visual-encoder``): each model also runs on the same puzzles with every cell drawn as a
fabric glyph (``--cell`` px) and read through a frozen encoder: ``linear`` (a random linear map, the old
``--visual``), ``jepa`` (an image JEPA trained here on the fabric's glyphs for ``--jepa-steps``, or loaded
with ``--jepa PATH``) and ``random`` (the same JEPA architecture at its initialisation: what training
bought). All runs then use ``loss_on=all`` (the visual models read the givens from the pictures). With
``--bank K`` training reads each cell from K pre-encoded renderings per symbol (a ViT pass over every cell
costs ~8x a TRM step on CPU); visual runs are always scored on fresh renderings of the held-out puzzles.
A ridge probe of each encoder's digit readability on held-out glyphs (and of raw pixels) explains the
result. CPU seconds (``time.process_time``) are reported per run beside wall seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.context import LocalContext
from workers.eval.reasoners import evaluate_reasoner
from workers.train_reasoning import ReasonerTrainParams, Visual, glyph_render, train_reasoner

ENCODERS = ("linear", "random", "jepa")

# Settings per model (shared architecture: same d_model and block count, so equal parameters). The
# recursive models run fewer supervision segments and recursions than the papers (16 segments, T=3, n=6):
# in a CPU budget of minutes, optimiser steps are what they lack (see docs/BENCHMARKS.md).
COMMON: dict[str, Any] = {"d_model": 64, "n_heads": 4, "n_layers": 2, "batch_size": 64, "lr": 3e-3,
                          "warmup_steps": 100, "loss_on": "blanks", "pos": "learned"}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "direct": {},
    # hrm as trm for EMA (the reference HRM has none; without it the comparison measured EMA too), and without
    # the Q(continue) head (the TRM paper's simplification): its bootstrap target costs one more forward
    # segment per optimiser step. Both measured in docs/BENCHMARKS.md#reasoning.
    "hrm": {"max_segments": 4, "segment_ramp": 400, "h_cycles": 2, "l_cycles": 2, "ema": 0.999, "q_continue": False},
    "trm": {"max_segments": 4, "segment_ramp": 400, "h_cycles": 1, "l_cycles": 2},
}


def _shard(args: tuple[int, str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from workers.synth.sudoku import GENERATOR, SudokuParams

    n, split, shard, count = args
    arrays = GENERATOR.generate(SudokuParams(n=n, split=split), seed=0, shard=shard, count=count)  # type: ignore[arg-type]
    return arrays["puzzles"], arrays["solutions"]


def make_data(n: int, n_train: int, n_test: int, workers: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Minimal puzzles; train and test come from disjoint symmetry classes (the fabric's split)."""
    size = 50
    jobs = [(n, "train", i, min(size, n_train - i * size)) for i in range(-(-n_train // size))]
    jobs += [(n, "test", 10_000 + i, min(size, n_test - i * size)) for i in range(-(-n_test // size))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_shard, jobs))
    k = len(jobs) - (-(-n_test // size))
    train = tuple(np.concatenate([p[j] for p in parts[:k]]) for j in range(2))
    test = tuple(np.concatenate([p[j] for p in parts[k:]]) for j in range(2))
    return train, test


def per_segment(m: dict[str, float]) -> str:
    keys = sorted((k for k in m if k.startswith("blank_acc_seg")), key=lambda k: int(k[len("blank_acc_seg") :]))
    return " ".join(f"{m[k]:.3f}" for k in keys)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def glyph_images(digits: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Grey glyphs of `digits` (0 = blank) as the visual sudoku draws them: uint8 [N, size, size]."""
    from workers.synth.glyphs import visual_sudoku

    return visual_sudoku(digits.reshape(-1, 1, 1), np.random.default_rng(seed), size).reshape(-1, size, size)


def train_glyph_jepa(args: argparse.Namespace, arch: dict[str, Any]) -> tuple[Any, Any, dict[str, float]]:
    """An image JEPA trained on the fabric's glyphs (digits 1..9, the `glyphs` generator) in this run.

    Returns (trained JEPA, the same architecture at the initialisation training started from, metrics)."""
    from workers.synth.glyphs import GlyphGenerator, GlyphParams
    from workers.train_jepa import JepaTrainParams, build_model, train_jepa

    glyphs = GlyphGenerator().generate(GlyphParams(size=args.cell), seed=1, shard=0, count=args.jepa_glyphs)
    images = np.repeat(glyphs["images"][..., None], 3, axis=-1)  # the JEPA reads RGB
    params = JepaTrainParams(steps=args.jepa_steps, arch={"img_size": args.cell, **arch}, device=args.device,
                             seed=0, checkpoint_every=10**9, threads=args.threads)  # fmt: skip
    c0, t0 = time.process_time(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        m = train_jepa(LocalContext(Path(tmp)), params, {"images": images})
        path = next(Path(tmp, "checkpoints").glob("jepa-step*.pt"))
        trained = _load_jepa(path)[0]
        if args.save_jepa:  # reusable with --jepa (and by a ticket: it is an ordinary JEPA checkpoint)
            args.save_jepa.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, args.save_jepa)
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    info = {"steps": m["step"], "final_loss": m["final_loss"], "cpu_s": cpu, "wall_s": wall,
            "glyphs": float(len(images))}  # fmt: skip
    return trained, build_model(params).eval(), info


def _load_jepa(path: Path) -> tuple[Any, Any]:
    from workers.train_jepa import build_model, load_model

    model, params, _ = load_model(path)
    return model, build_model(params).eval()


Factory = Callable[[], torch.nn.Module]


def make_encoders(args: argparse.Namespace, names: list[str]) -> tuple[dict[str, Factory], dict[str, Any]]:
    """Factories of the frozen cell encoders by name, and what making them cost (the JEPA's training)."""
    from workers.visual import GlyphEncoder

    out: dict[str, Factory] = {}
    info: dict[str, Any] = {}
    if "linear" in names:
        out["linear"] = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(args.cell**2, 64))
    if "jepa" in names or "random" in names:
        if args.jepa:
            trained, init = _load_jepa(args.jepa)
            info["jepa"] = {"loaded": str(args.jepa)}
        else:
            arch = {k: _value(v) for k, v in (s.split("=", 1) for s in args.jepa_arch)}
            trained, init, info["jepa"] = train_glyph_jepa(args, arch)
        if trained.cfg.img_size != args.cell:
            raise SystemExit(f"--jepa: the encoder reads {trained.cfg.img_size} px images, --cell is {args.cell}")
        info["jepa"]["config"] = trained.cfg.model_dump()
        out["jepa"] = lambda: GlyphEncoder(trained)
        out["random"] = lambda: GlyphEncoder(init)
    return {k: v for k, v in out.items() if k in names}, info


@torch.no_grad()
def digit_probe(encoder: torch.nn.Module | None, n: int, size: int, count: int) -> dict[str, float]:
    """How readable the symbol (blank, 1..n) is from an encoder's glyph latent (None: from raw pixels), on
    fresh renderings, the probe's train and test glyphs drawn apart:

    - `acc`: held-out accuracy of a ridge probe on standardised latents (information, whatever its scale);
    - `digit_var`: the share of the latents' variance (unstandardised, summed over dimensions) that lies
      between the symbols' means: what a reasoner's linear input projection sees, which standardises nothing;
    - `spread`: RMS deviation of the latents from their mean over their RMS (near 0: every glyph maps to
      nearly the same vector, a common offset the projection must learn to ignore);
    - `std`: the latents' standard deviation per dimension (the reasoner's input projection is initialised
      for O(1) inputs, as digit-token embeddings are).
    """
    from workers.eval.encoders import linear_probe

    rng = np.random.default_rng(12345)
    digits = rng.integers(0, n + 1, size=count)
    images = glyph_images(digits, size, seed=12346).astype(np.float32)[:, None] / 255.0
    x = torch.from_numpy(images)
    if encoder is None:
        z = x.flatten(1).numpy()
    else:
        encoder.eval()
        z = torch.cat([encoder(x[i : i + 512]).float() for i in range(0, len(x), 512)]).numpy()
    cut = 2 * count // 3
    zc = z.astype(np.float64) - z.mean(0)
    total = float((zc**2).sum(1).mean())
    means = np.stack([zc[digits == d].mean(0) for d in range(n + 1)])
    between = float(((means[digits]) ** 2).sum(1).mean())
    return {
        "acc": linear_probe(z[:cut], digits[:cut], z[cut:], digits[cut:]),
        "digit_var": between / max(total, 1e-30),
        "spread": float(np.sqrt(total / max(float((z.astype(np.float64) ** 2).sum(1).mean()), 1e-30))),
        "std": float(np.sqrt(total / z.shape[1])),
    }


@torch.no_grad()
def standardised(encoder: torch.nn.Module, n: int, size: int, count: int = 2000) -> torch.nn.Module:
    """The encoder followed by a frozen per-dimension standardisation (statistics of `count` fresh glyphs,
    drawn apart from the probe's and the puzzles'), so every encoder hands the reasoner O(1), centred latents."""
    digits = np.random.default_rng(777).integers(0, n + 1, size=count)
    x = torch.from_numpy(glyph_images(digits, size, seed=778).astype(np.float32)[:, None] / 255.0)
    encoder.eval()
    z = torch.cat([encoder(x[i : i + 512]).float() for i in range(0, len(x), 512)])
    norm = torch.nn.BatchNorm1d(z.shape[1], affine=False, eps=1e-8).eval()  # eval: fixed running statistics
    norm.running_mean.copy_(z.mean(0))  # type: ignore[union-attr]
    norm.running_var.copy_(z.var(0))  # type: ignore[union-attr]
    return torch.nn.Sequential(encoder, norm)


def _load() -> str:
    """The 1-minute load average (the machine is shared: CPU seconds are the budget, not wall time)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="training budget of each run (see --clock)")
    ap.add_argument("--steps", type=int, help="a fixed number of optimiser steps per run instead of --minutes")
    ap.add_argument(
        "--clock", choices=["cpu", "wall"],
        help="what --minutes counts: CPU time of the training process (the default on --device cpu: the same "
        "work however loaded the machine is) or wall-clock time (the default on a GPU, whose work the CPU clock "
        "does not see)",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=6, choices=[4, 6, 9])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--models", default="direct,hrm,trm")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for all models")
    ap.add_argument("--json", type=Path, help="also write the raw results here (rewritten after every run)")
    ap.add_argument("--visual", action="store_true", help="same as --visual-encoder linear")
    ap.add_argument(
        "--visual-encoder", default="", metavar="NAMES",
        help=f"also run each model on visual sudoku through these frozen encoders (comma list of {ENCODERS})",
    )  # fmt: skip
    ap.add_argument("--cell", type=int, default=16, help="glyph size in pixels (= the JEPA's img_size)")
    ap.add_argument("--bank", type=int, default=0, help="train on K pre-encoded renderings per symbol (0: fresh)")
    ap.add_argument("--jepa", type=Path, help="a trained JEPA checkpoint to read glyphs with (else one is trained)")
    ap.add_argument("--save-jepa", type=Path, help="keep the glyph JEPA trained here (a checkpoint for --jepa)")
    ap.add_argument("--jepa-steps", type=int, default=600, help="training steps of the glyph JEPA")
    ap.add_argument("--jepa-glyphs", type=int, default=20_000, help="training glyphs of the glyph JEPA")
    ap.add_argument("--jepa-arch", action="append", default=[], metavar="KEY=VALUE",
                    help="JepaConfig overrides of the glyph JEPA (tiny preset; default patch_size=4)")  # fmt: skip
    ap.add_argument("--probe", type=int, default=3000, help="glyphs of the digit probe (2/3 fit, 1/3 scored)")
    ap.add_argument(
        "--standardise",
        action="store_true",
        help="standardise each latent dimension (mean and std of 2,000 glyphs) before the reasoner",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--no-tokens", action="store_true", help="visual runs only (no digit-token run)")
    args = ap.parse_args(argv)
    if not any(s.startswith("patch_size=") for s in args.jepa_arch):
        args.jepa_arch.append("patch_size=4")
    torch.set_num_threads(args.threads)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    models = args.models.split(",")
    encoders = [e for e in args.visual_encoder.split(",") if e] or (["linear"] if args.visual else [])
    bad = [e for e in encoders if e not in ENCODERS]
    if bad:
        ap.error(f"--visual-encoder: unknown encoder(s) {bad}; choose from {list(ENCODERS)}")
    variants: list[tuple[str, str | None]] = [] if args.no_tokens else [(m, None) for m in models]
    variants += [(m, e) for e in encoders for m in models]
    if encoders:
        overrides.setdefault("loss_on", "all")
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" else "wall"
    budget = {"max_steps": args.steps} if args.steps else {
        "max_steps": 10**9, "max_seconds": 60 * args.minutes, "budget_clock": args.clock}  # fmt: skip

    t0 = time.monotonic()
    train, test = make_data(args.n, args.train, args.test, workers=max(1, args.threads))
    blanks = float((train[0] == 0).mean())
    per_run = f"{args.steps} steps" if args.steps else f"{args.minutes:g} {args.clock} min"
    print(f"{args.n}x{args.n} minimal sudoku: {len(train[0])} train / {len(test[0])} test puzzles "
          f"({blanks:.0%} blank), made in {time.monotonic() - t0:.0f}s; "
          f"{per_run} per run, {len(variants) * args.seeds} runs", flush=True)  # fmt: skip
    made, enc_info = make_encoders(args, encoders)
    if "jepa" in enc_info and "cpu_s" in enc_info["jepa"]:
        j = enc_info["jepa"]
        print(f"glyph JEPA: {j['steps']:.0f} steps on {j['glyphs']:.0f} glyphs ({args.cell} px), loss "
              f"{j['final_loss']:.4f}, {j['cpu_s']:.0f} CPU s / {j['wall_s']:.0f} s wall", flush=True)  # fmt: skip
    probes: dict[str, dict[str, float]] = {}
    if encoders:
        probes["pixels"] = digit_probe(None, args.n, args.cell, args.probe)
        for name in encoders:
            torch.manual_seed(0)
            probes[name] = digit_probe(made[name](), args.n, args.cell, args.probe)
        print(f"digit probe (held-out glyphs, blank + 1..{args.n}; ridge accuracy, digit share of the variance, "
              "spread, std per dim):", flush=True)  # fmt: skip
        for k, v in probes.items():
            print(f"  {k:7s} {v['acc']:.3f}  {v['digit_var']:.3f}  {v['spread']:.3f}  {v['std']:.3f}", flush=True)

    rows: list[dict[str, Any]] = []

    def dump() -> None:
        if args.json:
            meta = vars(args) | {"json": str(args.json), "jepa": str(args.jepa) if args.jepa else None}
            args.json.write_text(json.dumps({"args": meta, "encoders": enc_info, "probes": probes, "rows": rows},
                                            indent=1, default=str))  # fmt: skip

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for model, enc in variants:
            kw = {**COMMON, **PRESETS.get(model, {}), **overrides, "model": model, "seed": seed, **budget,
                  "device": args.device, "log_every": 50, "checkpoint_every": 10**9}  # fmt: skip
            params = ReasonerTrainParams.model_validate(kw)
            vis = fresh = None
            if enc is not None:
                torch.manual_seed(seed)  # the linear encoder's draw; the JEPA ones are fixed modules
                encoder = made[enc]()
                if args.standardise:
                    encoder = standardised(encoder, args.n, args.cell)
                vis = Visual(encoder, glyph_render(args.cell), bank=args.bank)
                fresh = Visual(encoder, glyph_render(args.cell))
            c0, w0 = time.process_time(), time.monotonic()
            with tempfile.TemporaryDirectory() as tmp:
                m = train_reasoner(LocalContext(Path(tmp)), params, train, test, visual=vis)
                if vis is not None and vis.bank:  # score on renderings the training never saw
                    ckpt = Path(tmp, "checkpoints", "reasoner-final.pt")
                    ev = evaluate_reasoner(LocalContext(Path(tmp, "eval")), params, ckpt, test, visual=fresh)
                    m = {**m, **{f"{k}_bank": m[k] for k in ("exact_acc", "blank_acc")}, **ev,
                         "params": m["params"]}  # fmt: skip
            cpu, wall = time.process_time() - c0, time.monotonic() - w0
            name = model + (f"+{enc}" if enc else "") + ("+std" if enc and args.standardise else "")
            row = {"model": name, "seed": seed, **m, "cpu_s": cpu, "wall_s": wall, "loadavg": _load()}
            rows.append(row)
            dump()
            bank = ""
            if "exact_acc_bank" in m:
                bank = f" (bank renderings {m['exact_acc_bank']:.3f}/{m['blank_acc_bank']:.3f})"
            print(f"  {name:6s} seed {seed}: exact {m['exact_acc']:.3f}  blank {m['blank_acc']:.3f}{bank}  "
                  f"steps {m['steps']:.0f}  puzzles {m['puzzles_seen']:.0f}  segments {m['mean_steps']:.1f}  "
                  f"blank by test-time segments {per_segment(m)}  {cpu:.0f} CPU s / {wall:.0f} s wall "
                  f"(load {row['loadavg']})", flush=True)  # fmt: skip

    print()
    print("| model | params | exact acc | blank-cell acc | sup. steps (ACT) | optimiser steps | puzzles seen | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]

        def ms(key: str, rs: list[dict[str, Any]] = rs) -> str:
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.mean(r[key] for r in rs)

        print(f"| {model} | {int(rs[0]['params']):,} | {ms('exact_acc')} | {ms('blank_acc')} | "
              f"{mean('mean_steps'):.1f} | {mean('steps'):,.0f} | {mean('puzzles_seen'):,.0f} | "
              f"{mean('cpu_s'):,.0f} |")  # fmt: skip
    print(f"\nchance on a blank cell: {1 / args.n:.3f}; total {time.monotonic() - t0:.0f}s")
    dump()


if __name__ == "__main__":
    main()
