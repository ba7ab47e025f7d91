"""The allowlist: every job kind a worker will run, and the code behind each.

A job takes `(ctx, params)` and returns `JobResult` (metrics for acceptance checks, outputs for the
steps that need it). Anything not named in `ALLOWED` is refused before any code runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.context import JobContext


class JobResult(BaseModel):
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class JobFailed(Exception):
    """A failure that retrying will not fix (bad parameters, a failing check)."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def own_params(params: dict[str, Any]) -> dict[str, Any]:
    """The step's own `with:` parameters, without what the orchestrator adds (`_inputs`)."""
    return {k: v for k, v in params.items() if not k.startswith("_")}


def input_outputs(params: dict[str, Any], step: str) -> dict[str, Any]:
    """The outputs of a needed step (e.g. its dataset id), as the orchestrator passed them."""
    found = params.get("_inputs", {}).get(step)
    if found is None:
        raise JobFailed(f"step {step!r} left no outputs for this job (is it in `needs`?)")
    return dict(found)


# --- diag: a diagnostic job for tests and smoke runs -------------------------------------------


class DiagParams(_Params):
    sleep: float = Field(default=0.0, ge=0, le=3600)
    steps: int = Field(default=1, ge=1, le=100_000)
    checkpoints: int = Field(default=0, ge=0, le=1000, description="write this many checkpoints along the way")
    metrics: dict[str, float] = Field(default_factory=dict)
    fail_attempts: int = Field(default=0, ge=0, description="fail while attempt <= this")
    error: str = "diagnostic failure"
    exit_on_step: int | None = Field(default=None, description="hard-exit the worker process at this step")


def run_diag(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    p = DiagParams.model_validate(own_params(params))
    start = 0
    if ctx.resume_from is not None and ctx.resume_from.exists():
        start = int(ctx.resume_from.read_text())
        ctx.log(f"resuming from step {start}")
    every = max(1, p.steps // p.checkpoints) if p.checkpoints else 0
    for step in range(start, p.steps):
        ctx.raise_if_cancelled()
        if p.exit_on_step is not None and step == p.exit_on_step and ctx.attempt == 1:
            os._exit(3)  # simulates a crashed worker (tests)
        time.sleep(p.sleep / p.steps)
        done = step + 1
        ctx.progress(done, p.steps)
        if every and done % every == 0:
            path = ctx.workdir / f"ckpt-{done}.txt"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(done))
            os.replace(tmp, path)
            ctx.checkpoint(path, done)
    if ctx.attempt <= p.fail_attempts:
        raise RuntimeError(p.error)
    return JobResult(metrics={**p.metrics, "resumed_from": float(start)}, outputs={"steps": p.steps})


# --- check: run a command (argv, no shell) -----------------------------------------------------


DEFAULT_CHECK_BINARIES = ("python", "python3", "pytest", "ruff", "mypy", "true", "false")


class CheckParams(_Params):
    run: list[str] = Field(min_length=1)
    timeout: float = Field(default=300.0, gt=0, le=86400)


def allowed_binaries() -> set[str]:
    extra = os.environ.get("JETBOX_CHECK_ALLOWLIST", "")
    return set(DEFAULT_CHECK_BINARIES) | {b for b in extra.replace(",", " ").split() if b}


def run_check(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    p = CheckParams.model_validate(own_params(params))
    binary = p.run[0]
    if "/" in binary or binary not in allowed_binaries():
        raise JobFailed(f"binary {binary!r} is not in the check allowlist ({', '.join(sorted(allowed_binaries()))})")
    for arg in p.run[1:]:
        if arg.startswith("/") or ".." in Path(arg).parts:
            raise JobFailed(f"argument {arg!r} escapes the workspace")
    exe = shutil.which(binary, path=_check_path())
    if exe is None:
        raise JobFailed(f"binary {binary!r} not found on PATH")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [exe, *p.run[1:]],
            cwd=ctx.workdir,
            capture_output=True,
            timeout=p.timeout,
            stdin=subprocess.DEVNULL,
            env=_check_env(ctx),
        )
    except subprocess.TimeoutExpired:
        raise JobFailed(f"{' '.join(p.run)} timed out after {p.timeout:g}s") from None
    out = ctx.workdir / "check-output.txt"
    out.write_bytes(proc.stdout + b"\n--- stderr ---\n" + proc.stderr)
    ctx.artifact(out, "check-output", {"argv": p.run, "returncode": proc.returncode})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise JobFailed(f"{' '.join(p.run)} exited with status {proc.returncode}: {' | '.join(tail)}")
    return JobResult(metrics={"returncode": 0.0, "seconds": time.monotonic() - started})


def _check_path() -> str:
    # The project's own interpreter comes first, so `python` means the venv's python.
    import sys

    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _check_env(ctx: JobContext) -> dict[str, str]:
    return {
        "PATH": _check_path(),
        "HOME": str(ctx.workdir),
        "LANG": "C.UTF-8",
        "JETBOX_TICKET": ctx.ticket,
        "JETBOX_TASK": ctx.task,
        "JETBOX_WORKDIR": str(ctx.workdir),
    }


# --- synthesize --------------------------------------------------------------------------------


def run_synthesize(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    from schema.artifacts import ArtifactStore, Lineage
    from workers.synth.base import SynthesisRequest, synthesize

    req = SynthesisRequest.model_validate(own_params(params))
    store = ArtifactStore(_artifact_root(ctx))
    started = time.monotonic()
    manifest = synthesize(
        req.generator,
        req.params,
        req.seed,
        req.count,
        req.shard_size,
        store,
        Lineage(ticket=ctx.ticket, task=ctx.task, attempt=ctx.attempt),
        fmt=req.format,
        progress=lambda done, total: ctx.progress(done, total),
    )
    manifest_id = manifest.manifest_id()
    ctx.record(manifest_id, "dataset", {"generator": req.generator, "count": req.count})
    seconds = time.monotonic() - started
    return JobResult(
        metrics={"count": float(req.count), "seconds": seconds},
        outputs={"dataset": manifest_id, "generator": req.generator},
    )


def _artifact_root(ctx: JobContext) -> Path:
    root = getattr(ctx, "artifact_root", None)
    return Path(root) if root else ctx.workdir / "artifacts"


JobFn = Callable[[JobContext, dict[str, Any]], JobResult]

ALLOWED: dict[str, JobFn] = {
    "diag": run_diag,
    "check": run_check,
    "synthesize": run_synthesize,
}


def register(kind: str, fn: JobFn) -> None:
    """Add a job kind to the allowlist (done at import by the model modules)."""
    ALLOWED[kind] = fn
