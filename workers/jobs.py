"""The allowlist: every job kind a worker will run (`JOBS`), and the light jobs themselves.

A job takes `(ctx, params)` and returns `JobResult` (metrics for acceptance checks, outputs for the
steps that need it). Anything not named in `JOBS` is refused before any code runs.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schema.artifacts import Lineage, ShardInfo
from schema.policy import DEFAULT_CHECK_BINARIES, binary_of, code_grant, inline_code
from workers.context import JobContext, write_atomic
from workers.synth.base import SynthesisRequest, generate_shards, manifest_head, merge_manifest, synthesize


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
    connect: str | None = Field(default=None, description="host:port to open a TCP connection to (guard tests)")
    resolve: str | None = Field(default=None, description="a host name to look up (guard tests)")
    swallow: bool = Field(default=False, description="catch network errors and carry on (guard tests)")
    connect_via: Literal["python", "ctypes", "child"] = Field(
        default="python", description="how `connect` connects: Python's socket, libc through ctypes, or a child process"
    )


def run_diag(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    p = DiagParams.model_validate(own_params(params))
    start = 0
    if ctx.resume_from is not None and ctx.resume_from.exists():
        start = int(ctx.resume_from.read_text())
        ctx.log(f"resuming from step {start}")
    _diag_network(p)
    every = max(1, p.steps // p.checkpoints) if p.checkpoints else 0
    for step in range(start, p.steps):
        ctx.raise_if_cancelled()
        if p.exit_on_step is not None and step == p.exit_on_step and ctx.attempt == 1:
            os._exit(3)  # simulates a crashed worker (tests)
        if p.sleep:  # sleep(0) would still give up the CPU: a no-op job must not wait for it back
            time.sleep(p.sleep / p.steps)
        done = step + 1
        ctx.progress(done, p.steps)
        if every and done % every == 0:
            path = write_atomic(ctx.workdir / f"ckpt-{done}.txt", functools.partial(_write_step, done))
            ctx.checkpoint(path, done)
    if ctx.attempt <= p.fail_attempts:
        raise RuntimeError(p.error)
    metrics = {**p.metrics, "resumed_from": float(start)}
    outputs: dict[str, Any] = {"steps": p.steps}
    # `inputs:` (`_uses`): say what arrived, so tests and smoke runs see what a job receives.
    uses = params.get("_uses") or {}
    for name, got in uses.items():
        rows = got if isinstance(got, list) else [got]
        metrics[f"{name}_rows"] = float(len(rows))
    if uses:
        outputs["uses"] = {
            name: [r.get("subtask") for r in (got if isinstance(got, list) else [got])] for name, got in uses.items()
        }
    return JobResult(metrics=metrics, outputs=outputs)


def _write_step(step: int, f: IO[bytes]) -> None:
    f.write(str(step).encode())


def _diag_network(p: DiagParams) -> None:
    try:
        if p.resolve:
            socket.getaddrinfo(p.resolve, 80)
        if p.connect:
            host, _, port = p.connect.rpartition(":")
            if p.connect_via == "ctypes":
                _connect_with_libc(host, int(port))
            elif p.connect_via == "child":
                code = f"import socket; socket.create_connection(({host!r}, {int(port)}), timeout=2).close()"
                subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=30)
            else:
                with socket.create_connection((host, int(port)), timeout=2):
                    pass
    except (OSError, subprocess.SubprocessError):
        if not p.swallow:
            raise


def _connect_with_libc(host: str, port: int) -> None:
    """connect(2) straight through libc: what a compiled extension does, past Python's socket module."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "socket() failed")
    addr = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(host))
    addr = struct.pack("=H", socket.AF_INET) + addr[2:]  # sa_family is in host byte order
    try:
        if libc.connect(fd, ctypes.c_char_p(addr), len(addr)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        libc.close(fd)


# --- check: run a command (argv, no shell) -----------------------------------------------------


class CheckParams(_Params):
    run: list[str] = Field(min_length=1)
    timeout: float = Field(default=300.0, gt=0, le=86400)
    memory: int = Field(default=4 << 30, ge=64 << 20, description="address-space limit in bytes")


def allowed_binaries(params: dict[str, Any] | None = None) -> set[str]:
    """The defaults, the installation's JETBOX_CHECK_ALLOWLIST, and grants the daemon signed into the job."""
    extra = os.environ.get("JETBOX_CHECK_ALLOWLIST", "")
    granted = (params or {}).get("_allowed_binaries") or []
    return set(DEFAULT_CHECK_BINARIES) | {b for b in extra.replace(",", " ").split() if b} | set(granted)


def run_check(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    p = CheckParams.model_validate(own_params(params))
    binary = binary_of(p.run)
    allowed = allowed_binaries(params)
    if "/" in binary or binary not in allowed:
        raise JobFailed(f"binary {binary!r} is not in the check allowlist ({', '.join(sorted(allowed))})")
    code = inline_code(p.run)
    if code is not None and code_grant(binary) not in allowed:
        raise JobFailed(
            f"{binary} {code}: inline code is refused without a grant for it (a policy proposal showing "
            f"the command, or {code_grant(binary)} in JETBOX_CHECK_ALLOWLIST)"
        )
    for arg in p.run[1:]:
        if arg.startswith(("/", "~")) or ".." in Path(arg).parts:
            raise JobFailed(f"argument {arg!r} escapes the workspace (absolute paths and .. are refused)")
    exe = shutil.which(binary, path=_check_path())
    if exe is None:
        raise JobFailed(f"binary {binary!r} not found on PATH")
    argv = [exe, *p.run[1:]]
    if ctx.network == "deny":
        argv = [*no_network_prefix(), *argv]
    workspace = ctx.workdir.parent.parent / "workspace"  # shared by the ticket's checks
    workspace.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            cwd=workspace,
            capture_output=True,
            timeout=p.timeout,
            stdin=subprocess.DEVNULL,
            env=_check_env(ctx, params, workspace),
            preexec_fn=_limits(p),
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


_NO_NETWORK: list[str] | None = None


def no_network_prefix() -> list[str]:
    """`unshare -n` (a fresh, empty network namespace), or a clear refusal where it is not permitted."""
    global _NO_NETWORK
    if _NO_NETWORK is None:
        unshare = shutil.which("unshare")
        for prefix in ([unshare, "-n"], [unshare, "-rn"]) if unshare else []:
            probe = subprocess.run([*prefix, "true"], capture_output=True)
            if probe.returncode == 0:
                _NO_NETWORK = prefix
                break
        else:
            _NO_NETWORK = []
    if not _NO_NETWORK:
        raise JobFailed(
            "cannot run the check without network: `unshare -n` is not permitted here "
            "(run the worker as root or enable unprivileged user namespaces), and it is never run "
            "with network silently"
        )
    return list(_NO_NETWORK)


def _limits(p: CheckParams) -> Callable[[], None]:
    def apply() -> None:
        cpu = int(p.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (p.memory, p.memory))

    return apply


def _check_path() -> str:
    # The project's own interpreter comes first, so `python` means the venv's python.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _check_env(ctx: JobContext, params: dict[str, Any], workspace: Path) -> dict[str, str]:
    env = {
        "PATH": _check_path(),
        "HOME": str(workspace),
        "LANG": "C.UTF-8",
        "JETBOX_TICKET": ctx.ticket,
        "JETBOX_TASK": ctx.task,
        "JETBOX_WORKSPACE": str(workspace),
        "JETBOX_ARTIFACTS": str(ctx.store.root),
    }
    # The ticket's artifacts, readable by the check: JETBOX_INPUT_<STEP>_<KEY>=value.
    for step, outputs in (params.get("_inputs") or {}).items():
        for key, value in outputs.items():
            if isinstance(value, str | int | float):
                env[f"JETBOX_INPUT_{step}_{key}".upper().replace("-", "_")] = str(value)
    return env


# --- synthesize --------------------------------------------------------------------------------


class ShardRange(BaseModel):
    """A synthesize subtask's part of the dataset: shard files `first..stop-1` (`_shard`)."""

    subtask: int = Field(ge=0)
    of: int = Field(ge=1)
    first: int = Field(ge=0)
    stop: int = Field(ge=1)


def run_synthesize(ctx: JobContext, params: dict[str, Any]) -> JobResult:
    """Generate a dataset; as a subtask (`_shard`) only its range of shard files; as the join of
    subtasks (`_subtasks`) only the manifest, from the shards they report."""
    req = SynthesisRequest.model_validate(own_params(params))
    started = time.monotonic()
    if "_shard" in params:
        part = ShardRange.model_validate(params["_shard"])
        shards = generate_shards(req, part.first, part.stop, ctx.store, progress=ctx.progress)
        seconds = time.monotonic() - started
        return JobResult(
            metrics={"count": float(sum(s.count for s in shards)), "seconds": seconds},
            # `manifest`: the dataset's fields but its shards, from which the decider joins the
            # manifest without a job (schema.artifacts.join_manifest)
            outputs={
                "shards": [s.model_dump(mode="json") for s in shards],
                "seconds": seconds,
                "manifest": manifest_head(req),
            },
        )
    generated = 0.0  # the subtasks' generation time, so that `seconds` means what one job's does
    if "_subtasks" in params:
        parts = [input_outputs(params, str(sub)) for sub in params["_subtasks"]]
        shards = [ShardInfo.model_validate(info) for part_out in parts for info in part_out.get("shards", [])]
        generated = sum(float(part_out.get("seconds", 0.0)) for part_out in parts)
        for shard in shards:  # a lost or cut-off shard fails the join, not the steps that read the data
            _shard_present(ctx, shard)
        manifest = merge_manifest(
            req.generator,
            req.params,
            req.seed,
            req.count,
            req.shard_size,
            shards,
            ctx.store,
            Lineage(ticket=ctx.ticket, task=ctx.task, attempt=ctx.attempt),
        )
    else:
        manifest = synthesize(
            req.generator,
            req.params,
            req.seed,
            req.count,
            req.shard_size,
            ctx.store,
            Lineage(ticket=ctx.ticket, task=ctx.task, attempt=ctx.attempt),
            fmt=req.format,
            progress=lambda done, total: ctx.progress(done, total),
        )
    manifest_id = manifest.manifest_id()
    ctx.record(manifest_id, "dataset", {"generator": req.generator, "count": req.count})
    seconds = generated + time.monotonic() - started
    return JobResult(
        metrics={"count": float(req.count), "seconds": seconds},
        outputs={"dataset": manifest_id, "generator": req.generator},
    )


def _shard_present(ctx: JobContext, shard: ShardInfo) -> None:
    """The shard a subtask reported is in the store at its size (readers re-hash it on first open;
    hashing every shard here would cost the join what the fan-out saved; `size` asks the backend, so an
    object store answers without a download)."""
    size = ctx.store.size(shard.id)
    if size != shard.size:
        found = "missing" if size is None else f"{size} bytes, expected {shard.size}"
        raise RuntimeError(f"shard {shard.index} ({shard.id[:16]}) reported by a subtask is {found} in the store")


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite metrics as floats: what a report and an acceptance check can carry."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


# --- the allowlist -----------------------------------------------------------------------------

JobFn = Callable[[JobContext, dict[str, Any]], JobResult]

# Every job kind a worker runs, and its entry point as "module:function". Named by string (as rq
# names job functions) so that resolving `diag` never imports the model code, and torch is loaded
# only by a worker that runs a model job. A kind missing here is refused before any code runs.
JOBS: dict[str, str] = {
    "diag": "workers.jobs:run_diag",
    "check": "workers.jobs:run_check",
    "synthesize": "workers.jobs:run_synthesize",
    "train": "workers.ml_jobs:run_train",
    "evaluate": "workers.ml_jobs:run_evaluate",
    "infer": "workers.inference:run_infer",
}


def job_function(kind: str) -> JobFn | None:
    """The entry point of an allowlisted job kind (imported on first use), or None for any other."""
    target = JOBS.get(kind)
    if target is None:
        return None
    module, _, name = target.partition(":")
    fn: JobFn = getattr(importlib.import_module(module), name)
    return fn
