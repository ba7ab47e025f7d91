"""One long-lived daemon thread that runs callables for others, in the network namespace it was made in.

A `network: deny` job's thread runs in a network namespace of its own (workers/netns.py), and every
socket made there, by the job or by the worker's code on the job's behalf, reaches nothing. Work that
must leave through the worker's network while a job runs (the object store's requests, new Redis
connections) is handed to such a thread, made before any job's namespace was entered.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class IoThread:
    """Runs callables on one daemon thread, created where this object is (see the module's docstring)."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            fn, future = self.jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def alive(self) -> bool:
        """Whether it can still run anything (not a forked child's copy of a parent's thread)."""
        return self.pid == os.getpid() and self.thread.is_alive()

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self.thread:
            return fn()
        future: Future[T] = Future()
        self.jobs.put((fn, future))
        return future.result()
