"""Live updates: one poller per server process reads new events from the log and fans them out.

Browsers subscribe through server-sent events (`/events/stream`); each subscriber gets an asyncio
queue filled from the poller thread, so a hundred open pages cost one small query every
`interval` seconds, not a hundred.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

POLL_SQL = sa.text("SELECT seq, stream, type, data FROM events WHERE seq > :since ORDER BY seq LIMIT 500").columns(
    sa.column("seq"), sa.column("stream"), sa.column("type"), sa.column("data", sa.Text)
)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]]
    ticket: str | None


class Broadcaster:
    """Polls `events` for rows after the last seen seq; hands each to every subscriber."""

    def __init__(self, engine: sa.Engine, interval: float = 0.1) -> None:
        self.engine = engine
        self.interval = interval
        self.last_seq = 0
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> None:
        with self.engine.connect() as conn:
            self.last_seq = int(conn.execute(sa.text("SELECT COALESCE(MAX(seq), 0) FROM events")).scalar() or 0)
        self._thread = threading.Thread(target=self._run, name="console-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def subscribe(self, ticket: str | None = None) -> _Subscriber:
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(maxsize=1000), ticket)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
                self.error = None
            except Exception as exc:  # a locked or vanished database: say so on /healthz, keep trying
                self.error = str(exc).splitlines()[0][:200]

    def poll(self) -> int:
        """Read and fan out the events after `last_seq`; returns how many."""
        with self.engine.connect() as conn:
            rows = conn.execute(POLL_SQL, {"since": self.last_seq}).all()
        if not rows:
            return 0
        with self._lock:
            subs = list(self._subs)
        for seq, stream, type_, data in rows:
            body = json.loads(data) if isinstance(data, str | bytes) else data
            ticket = body.get("ticket") if isinstance(body, dict) else None
            item = {
                "seq": int(seq),
                "stream": stream,
                "type": type_,
                "ticket": ticket,
                "proposal": body.get("proposal") if isinstance(body, dict) else None,
            }
            for sub in subs:
                if sub.ticket is None or sub.ticket in (ticket, stream):
                    sub.loop.call_soon_threadsafe(_put, sub.queue, item)
            self.last_seq = int(seq)
        return len(rows)


def _put(queue: asyncio.Queue[dict[str, Any]], item: dict[str, Any]) -> None:
    # A browser that stopped reading loses old items rather than growing the server's memory.
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(item)
