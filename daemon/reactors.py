"""The reactors the daemon runs when a Redis is configured: dispatcher, report inbox, reconciler."""

from __future__ import annotations

from typing import Any

from daemon.handler import CommandHandler
from schema.settings import Settings


def dispatcher(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.dispatcher import Dispatcher  # rq: only for a daemon that has a Redis

    return Dispatcher(handler, settings)


def inbox(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.inbox import Inbox  # redis: only for a daemon that has one

    return Inbox(handler, settings)


def reconciler(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.reconciler import Reconciler  # rq: only for a daemon that has a Redis

    return Reconciler(handler, settings)


def default_factories(settings: Settings) -> list[Any]:
    """Inbox first, so reports are applied before the reconciler judges heartbeats."""
    if not settings.redis_url:
        return []
    return [inbox, dispatcher, reconciler]
