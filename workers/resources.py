"""What a worker has, for placement: its cards (detected or configured), CPUs and memory.

Detection, in this order: `nvidia-smi` (cheap, no CUDA context), then torch's CUDA (only where a
driver is present: `/dev/nvidia0` exists, so a CPU-only machine never pays for importing torch).
Both honour `CUDA_VISIBLE_DEVICES`: the worker's `cuda:<index>` is the card's position in it. A
card's id is `<node>/<physical index>`, so two workers on one card name it alike and share its memory.
Configured values (`jbctl worker --gpus 1 --gpu-memory 24G --cpus 4 --memory 32G`) win over detection.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from schema.sizes import parse_memory
from schema.wire import WORKER_NAME, Advert

MIB = 1 << 20


class ResourceError(ValueError):
    """A configured resource that makes no sense, named with the flag that set it."""


@dataclass(frozen=True)
class Card:
    physical: int  # nvidia-smi's index
    index: int  # as this process's CUDA numbers it (its place in CUDA_VISIBLE_DEVICES)
    memory: int  # bytes


def _visible(count: int, uuids: list[str] | None = None) -> list[int]:
    """The physical indices this process may use, in CUDA order (CUDA_VISIBLE_DEVICES, else all)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(range(count))
    out: list[int] = []
    for part in (p.strip() for p in raw.split(",")):
        if part.isdigit() and int(part) < count:
            out.append(int(part))
        elif uuids and part in uuids:
            out.append(uuids.index(part))
        else:
            break  # CUDA stops at the first entry it cannot use
    return out


def _configured(count: int) -> list[int]:
    """Physical indices for `count` configured cards: CUDA_VISIBLE_DEVICES's numbers first (a worker
    of `jetbox-worker@N` names card N), then the lowest others."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES") or ""
    named = [int(p) for p in raw.split(",") if p.strip().isdigit()]
    return (named + [i for i in range(count + len(named)) if i not in named])[:count]


def detect_gpus(timeout: float = 10.0) -> list[Card]:
    """The cards this process can use, from nvidia-smi, else torch; [] when neither finds one."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            )
            rows = [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
            sizes = {int(r[0]): int(float(r[2])) * MIB for r in rows}
            uuids = [r[1] for r in sorted(rows, key=lambda r: int(r[0]))]
            return [Card(p, i, sizes[p]) for i, p in enumerate(_visible(len(sizes), uuids))]
        except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError):
            pass
    if Path("/dev/nvidia0").exists():
        try:
            import torch  # a worker may import torch; only here, where a driver says there is a card

            if torch.cuda.is_available():
                physical = _configured(torch.cuda.device_count())  # CUDA_VISIBLE_DEVICES's numbers, in order
                return [
                    Card(physical[i], i, int(torch.cuda.get_device_properties(i).total_memory))
                    for i in range(torch.cuda.device_count())
                ]
        except Exception:  # no usable torch or driver: nothing detected
            return []
    return []


def detect_cpus() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return float(os.cpu_count() or 1)


def detect_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def build_advert(
    worker: str,
    queues: list[str],
    *,
    node: str | None = None,
    gpus: int | None = None,
    gpu_memory: str | None = None,
    cpus: float | None = None,
    memory: str | None = None,
    advertise: bool | None = None,
) -> Advert | None:
    """The worker's advert, or None when it does not take part in placement: nothing configured, no
    card detected (or `advertise=False`). `advertise=True` advertises even a worker with no card."""
    if advertise is False:
        return None
    if not WORKER_NAME.fullmatch(worker):
        raise ResourceError(f"--name {worker!r}: use letters, digits, '.', '-' and '_' (at most 100)")
    node = node or socket.gethostname().split(".")[0]
    if not WORKER_NAME.fullmatch(node):
        raise ResourceError(f"--node {node!r}: use letters, digits, '.', '-' and '_' (at most 100)")
    if gpus is not None and not 0 <= gpus <= 64:
        raise ResourceError(f"--gpus {gpus}: expected 0 to 64")
    if cpus is not None and not 0 < cpus <= 4096:
        raise ResourceError(f"--cpus {cpus:g}: expected more than 0, at most 4096")
    try:
        card_memory = parse_memory(gpu_memory) if gpu_memory is not None else None
    except ValueError as exc:
        raise ResourceError(f"--gpu-memory: {exc}") from None
    try:
        mem = parse_memory(memory) if memory is not None else None
    except ValueError as exc:
        raise ResourceError(f"--memory: {exc}") from None
    configured = any(v is not None for v in (gpus, gpu_memory, cpus, memory))
    # A worker that serves no gpu queue looks for cards only when told to use some: `jbctl up`'s cpu
    # worker on a GPU box stays a plain queue worker.
    looks = gpus != 0 and ("gpu" in queues or bool(gpus) or card_memory is not None)
    detected = detect_gpus() if looks else []
    if gpus is None and card_memory is None:
        cards = detected
    else:
        count = gpus if gpus is not None else len(detected)
        if card_memory is None and len(detected) < count:
            raise ResourceError(
                f"--gpus {count}: say how much memory each has (--gpu-memory 24G): "
                f"{len(detected)} card(s) detected to read it from"
            )
        if count == 0 and card_memory is not None:
            raise ResourceError("--gpu-memory without a card: add --gpus N (none detected)")
        physical = [c.physical for c in detected[:count]] if len(detected) >= count else _configured(count)
        cards = [
            Card(physical[i], i, card_memory if card_memory is not None else detected[i].memory) for i in range(count)
        ]
    if not (configured or cards or advertise):
        return None
    return Advert(
        kind="advertised",
        worker=worker,
        node=node,
        queues=list(queues),
        gpus=[{"id": f"{node}/{c.physical}", "index": c.index, "memory": c.memory} for c in cards],
        cpus=cpus if cpus is not None else detect_cpus(),
        memory=mem if mem is not None else detect_memory(),
        detected=bool(detected) and gpus is None and card_memory is None,
    )
