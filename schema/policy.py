"""Which binaries `check` steps and `run:` acceptance checks may execute without asking a human.

The daemon (deciding whether to open a policy proposal) and the worker (refusing anything else)
read the same list, extended per installation by JETBOX_CHECK_ALLOWLIST and by approved policy
proposals.
"""

from __future__ import annotations

DEFAULT_CHECK_BINARIES: frozenset[str] = frozenset({"python", "python3", "pytest", "ruff", "mypy", "true", "false"})


def binary_of(argv: list[str]) -> str:
    """The program an argv runs (its first word)."""
    return argv[0] if argv else ""
