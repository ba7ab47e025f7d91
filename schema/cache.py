"""The step cache's keys and the code versions they include (read by the decider and `jbctl cache`).

A step's key is the hash of its kind, its resolved parameters (the step's `with:` plus what the
orchestrator adds: the outputs of the steps it needs, which carry their content ids, and the core it
runs against), the version of the code that runs its kind (`CODE_VERSIONS`) and the package
version. The daemon reads this module without importing `workers` (which may load torch); a test
checks that `CODE_VERSIONS` names exactly the kinds of `workers.jobs.JOBS`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import Any

# Bump a kind's version when a change to its job code changes what a step of that kind produces
# (another generator, a fixed training bug, a new metric): every cached result of that kind is then
# ignored, and the next step of that kind runs again.
CODE_VERSIONS: dict[str, str] = {
    "diag": "1",
    "check": "1",
    "synthesize": "1",
    "train": "1",
    "evaluate": "1",
    "infer": "1",
}

# Kinds never cached, whatever a ticket says: a `check` runs a command against the workspace (its
# outcome depends on files the key does not see), and `infer` exists to observe the model as it is
# now (working memory and warm workers are not in its parameters).
NEVER_CACHED: frozenset[str] = frozenset({"check", "infer"})
# Kinds cached only when a step asks (`cache: true`): `diag` jobs exist to exercise the machinery
# (they sleep, fail on purpose, crash their worker); reusing one would defeat its purpose.
OPT_IN: frozenset[str] = frozenset({"diag"})
# Parameters that only set a training's budget: a step whose key differs from an earlier run of the
# same task only in these resumes from that run's last checkpoint when the budget grew.
BUDGET_KEYS: tuple[str, ...] = ("max_steps", "steps", "max_seconds")
# Keys the orchestrator adds that are not part of what the step computes.
_NOT_IN_KEY = ("_allowed_binaries",)


def _package_version() -> str:
    try:
        return importlib.metadata.version("jetbox")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without installing
        return "unknown"


PACKAGE_VERSION = _package_version()


def cacheable(kind: str, step_cache: bool | None, ticket_cache: bool, network: str) -> bool:
    """Whether a step's result may be reused and recorded. A ticket that allows the network is never
    cached (its jobs may read what no key covers)."""
    if kind in NEVER_CACHED or not ticket_cache or network == "allow" or step_cache is False:
        return False
    return step_cache is True or kind not in OPT_IN


def _digest(material: dict[str, Any]) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(kind: str, params: dict[str, Any]) -> str:
    """The key of a step of `kind` with resolved `params` (as `AttemptScheduled.params` carries them)."""
    body = {k: v for k, v in params.items() if k not in _NOT_IN_KEY}
    if "suite" in body:
        # A suite step's subject (which core version or proposal it measures) is not what it computes:
        # the promoted core reuses its candidate's suite result.
        body["suite"] = True
    return _digest({"kind": kind, "params": body, "code": CODE_VERSIONS.get(kind, "?"), "package": PACKAGE_VERSION})


def resume_key(kind: str, params: dict[str, Any]) -> str:
    """The key without the budget (`BUDGET_KEYS`): equal for two runs that differ only in how long they train."""
    return cache_key(kind, {k: v for k, v in params.items() if k not in BUDGET_KEYS})


def budget_grew(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether every budget parameter of `new` is at least that of `old` (a missing one: unlimited
    for `max_seconds`, the same default otherwise)."""
    for name in BUDGET_KEYS:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if after is None and name == "max_seconds":
            continue
        if before is None or after is None or not isinstance(after, int | float) or after < before:
            return False
    return True
