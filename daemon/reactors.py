"""The reactors the daemon runs when a Redis is configured: dispatcher, report inbox, reconciler."""

from __future__ import annotations

from typing import Any

from daemon.handler import CommandHandler
from schema.settings import Settings


def dispatcher(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.dispatcher import Dispatcher

    return Dispatcher(handler, settings)


def inbox(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.inbox import Inbox

    return Inbox(handler, settings)


def reconciler(handler: CommandHandler, settings: Settings) -> Any:
    from daemon.reconciler import Reconciler

    return Reconciler(handler, settings)


def default_factories(settings: Settings) -> list[Any]:
    """Inbox first, so reports are applied before the reconciler judges heartbeats."""
    if not settings.redis_url:
        return []
    return [inbox, dispatcher, reconciler]
