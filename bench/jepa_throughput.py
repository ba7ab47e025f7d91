"""Images/s of Jetbox's JEPA training job vs a bare PyTorch loop of the same model, same batch, same run.

Both loops do the same work per step (batch gather, preprocessing, mask sampling, forward, backward,
clipping, AdamW, EMA); the difference is the job's bookkeeping (progress reports, cancellation checks,
loss history, schedule). Rounds alternate between the two so that a noisy shared CPU hits both alike.

    python bench/jepa_throughput.py --steps 40 --rounds 3            # CPU, tiny preset
    python bench/jepa_throughput.py --preset rtx3090 --batch 256     # on a GPU
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workers.context import LocalContext
from workers.models.jepa import preprocess, sample_masks
from workers.synth.shapes import ShapesGenerator, ShapesParams
from workers.train_jepa import JepaTrainParams, batch_indices, build_model, load_data, make_optimizer, train_jepa


def bare_loop(params: JepaTrainParams, data: dict, steps: int, device: torch.device) -> float:
    """Images/s of a plain loop over the same model and batches (no job runtime)."""
    ds = load_data(data)
    cfg = params.image_config()
    model = build_model(params).to(device).train()
    opt = make_optimizer(model, params)
    autocast = device.type == "cuda" and params.bf16
    t0 = 0.0
    for step in range(steps + 2):
        if step == 2:  # the first steps pay for allocation and kernel selection
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = batch_indices(len(ds), params.batch_size, step, params.seed)
        images = preprocess(torch.from_numpy(ds.images[idx])).to(device)
        gen = torch.Generator().manual_seed(step)
        ctx_idx, tgt_idx = sample_masks(cfg, params.batch_size, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = model(images, ctx_idx.to(device), tgt_idx.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.step()
        model.update_target(0.996)
        float(loss.detach())  # the job reads the loss every step too
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * params.batch_size / (time.perf_counter() - t0)


def jetbox_loop(params: JepaTrainParams, data: dict, steps: int) -> float:
    """Images/s of `train_jepa` itself, from its own progress reports (first two steps excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = LocalContext(Path(tmp))
        train_jepa(ctx, params.model_copy(update={"steps": steps + 2, "checkpoint_every": 10**9}), data)
        log = ctx.progress_log
        return steps * params.batch_size / (log[-1]["time"] - log[1]["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "rtx3090"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--regularizer", default="sigreg", choices=["sigreg", "ema"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = JepaTrainParams(preset=args.preset, batch_size=args.batch, arch={"regularizer": args.regularizer})
    cfg = params.image_config()
    data = ShapesGenerator().generate(ShapesParams(size=cfg.img_size), 0, 0, max(1024, 4 * args.batch))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    jet, bare = [], []
    for r in range(args.rounds):
        jet.append(jetbox_loop(params, data, args.steps))
        bare.append(bare_loop(params, data, args.steps, device))
        print(f"round {r + 1}: jetbox {jet[-1]:.1f} img/s, bare {bare[-1]:.1f} img/s", flush=True)
    j, b = statistics.median(jet), statistics.median(bare)
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS")
    print(f"device={device.type} preset={args.preset} batch={args.batch} steps={args.steps} "
          f"threads={args.threads} regularizer={args.regularizer}")
    print(f"jetbox {j:.1f} img/s | bare {b:.1f} img/s | ratio {j / b:.3f} | overhead {100 * (1 - j / b):.1f}% "
          f"| peak memory {peak}")


if __name__ == "__main__":
    main()
