"""Memory sizes as people write them (`512M`, `8G`): stdlib only, so every `jbctl` command's settings can
check them without loading the ticket models."""

from __future__ import annotations

import re
from typing import Any

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_memory(value: Any) -> int:
    """Bytes from `512M`, `8G`, `8GiB` or a plain number of bytes."""
    match = _MEMORY.match(str(value))
    if not match or isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}: expected e.g. 512M or 8G")
    unit = (match.group(2) or "B").upper()[0]
    factor = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    size = int(float(match.group(1)) * factor)
    if size <= 0:
        raise ValueError("memory size must be positive")
    return size
