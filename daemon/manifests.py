"""Writing the dataset manifests the decider joins from a sharded step's subtasks (`ShardsJoined`).

The decider is pure: it builds the manifest and records it in the event. Two places in the shell
write it to the artifact store, both idempotent (the same bytes have the same id):

- the daemon's command handler, *before* the events are appended (`before_append`), so a step is
  never recorded as succeeded, nor its ticket completed, while its manifest is not on disk (a write
  that fails fails the commit: the report stays unacknowledged and is applied again later);
- the dispatcher, when it reads the event, before it acts on any later one: it covers a join
  decided by another process (`jbctl retry` in a shell), so no step that reads the dataset is
  dispatched before the manifest exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from schema import events as ev
from schema.artifact_store import ArtifactStore
from schema.artifacts import Manifest

log = logging.getLogger("jetbox.manifests")


def write_joined_manifest(artifacts: ArtifactStore, event: ev.ShardsJoined) -> None:
    """Write the manifest of `event` unless it is there. A shard lost since its subtask reported it
    does not stop the write: the manifest names what to regenerate (`jbctl artifacts regenerate`),
    and readers check every shard they open."""
    if artifacts.has(event.artifact):
        return
    manifest = Manifest.model_validate(event.manifest)
    if manifest.manifest_id() != event.artifact:  # cannot happen unless the log was edited
        log.error("%s/%s: joined manifest does not hash to %s; not written", event.ticket, event.task, event.artifact)
        return
    missing = [s.index for s in manifest.shards if not artifacts.has(s.id)]
    if missing:
        log.warning(
            "%s/%s: dataset %s lists shard file(s) %s that are not in the store; "
            "`jbctl artifacts regenerate %s` rebuilds them",
            event.ticket, event.task, event.artifact[:16], missing, event.artifact[:16],
        )  # fmt: skip
    artifacts.put_manifest(manifest, require_shards=False)


def manifest_writer(settings: Any) -> Callable[[Sequence[ev.Event]], None]:
    """A `CommandHandler(before_append=...)` hook: write every joined manifest among the events, to
    the store the settings name (the local folder, or the object store of `artifacts_url`: where the
    workers write; made on first use, so a daemon that never joins shards never opens it)."""
    artifacts: list[ArtifactStore] = []

    def write(events: Sequence[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.ShardsJoined):
                if not artifacts:
                    artifacts.append(ArtifactStore.from_settings(settings))
                write_joined_manifest(artifacts[0], event)

    return write
